"""Megatron roles on torch: the backend-neutral styles of `roles.py` with
torch's collectives (`torch_collectives.py`: our own autograd f, g and
uneven gathers).

Everything about what a role splits and computes lives in `roles.py`;
this module only says how torch detaches, slices and gathers tensors, and
offers the names the torch engine and its tests use.
"""

from __future__ import annotations

import numpy as np
import torch

from keras_tensor_parallel.backends import roles
from keras_tensor_parallel.backends import torch_collectives as tc
from keras_tensor_parallel.backends.roles import (  # noqa: F401
    Region,
    Shard,
    Style,
    full_value,
    is_split,
    shard_sizes,
    unsplit_variable,
)
from keras_tensor_parallel.plan import Role


class TorchCollectives:
    """`roles.Collectives` on one torch process group (`group`; None: the
    default group): with data parallelism, the model-axis group."""

    def __init__(self, group=None):
        self.group = group

    def f(self, x):
        return tc.f(x, self.group)

    def g(self, x):
        return tc.g(x, self.group)

    def gather_last(self, x, sizes: list[int], index: int):
        return tc.gather_last(x, sizes, index, self.group)

    def gather_dim(self, local, dim: int, sizes: list[int]):
        return tc.gather_dim(local, dim, sizes, self.group)

    @staticmethod
    def is_tensor(x) -> bool:
        return isinstance(x, torch.Tensor)

    @staticmethod
    def detach(value):
        return value.detach()

    @staticmethod
    def take(value, dim: int, start: int, stop: int):
        return value.narrow(dim, start, stop - start).clone()

    @staticmethod
    def to_numpy(value) -> np.ndarray:
        return value.detach().cpu().numpy()


COLLECTIVES = TorchCollectives()
STYLES: dict[Role, Style] = roles.make_styles(COLLECTIVES)
# Styles per model-axis group, kept alive with their group (split
# variable classes are keyed by their Collectives object).
_GROUP_STYLES: dict[int, tuple] = {}


def styles_for(group=None) -> dict[Role, Style]:
    """The styles running on `group` (None: the default group)."""
    if group is None:
        return STYLES
    if id(group) not in _GROUP_STYLES:
        comm = TorchCollectives(group)
        _GROUP_STYLES[id(group)] = (group, roles.make_styles(comm))
    return _GROUP_STYLES[id(group)][1]


def split_variable(variable, dim: int, rank: int, size: int) -> None:
    """Keep only this rank's shard of `variable` along `dim`, in place."""
    roles.split_variable(variable, dim, rank, size, COLLECTIVES)


def style_for(role: Role | str, styles=None) -> Style:
    """The style object of a role (of `styles`, default the world's)."""
    return (styles or STYLES)[Role(role)]


def layer_style(entries, styles=None) -> Style:
    """The style that runs a layer, from its variables' plan entries."""
    return roles.layer_style(entries, styles or STYLES)
