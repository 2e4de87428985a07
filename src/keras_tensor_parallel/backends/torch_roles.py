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
    """`roles.Collectives` on the default torch process group."""

    f = staticmethod(tc.f)
    g = staticmethod(tc.g)
    gather_last = staticmethod(tc.gather_last)
    gather_dim = staticmethod(tc.gather_dim)

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


def split_variable(variable, dim: int, rank: int, size: int) -> None:
    """Keep only this rank's shard of `variable` along `dim`, in place."""
    roles.split_variable(variable, dim, rank, size, COLLECTIVES)


def style_for(role: Role | str) -> Style:
    """The style object of a role."""
    return STYLES[Role(role)]


def layer_style(entries) -> Style:
    """The style that runs a layer, from its variables' plan entries."""
    return roles.layer_style(entries, STYLES)
