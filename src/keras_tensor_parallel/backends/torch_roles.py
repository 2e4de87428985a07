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

from keras_tensor_parallel.backends import roles, torch_experts
from keras_tensor_parallel.backends import torch_collectives as tc
from keras_tensor_parallel.backends import torch_heads as heads
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


class TorchHeads(roles.HeadsParallel):
    """Heads, with kv heads shared by `copies` ranks (`torch_heads.py`):
    a block per sharing set, its gradient summed over the set, and the
    model's repeat of it cut to the local query heads."""

    def __init__(self, comm, shared: dict):
        super().__init__(comm)
        self.shared = shared  # copies -> this rank's subgroup

    def partition(self, variable, entry, shard) -> None:
        if entry.copies == 1:
            return super().partition(variable, entry, shard)
        if entry.copies not in self.shared:
            raise ValueError(
                f"{variable.path} is shared by {entry.copies} ranks but the "
                "engine made no group for them. Received: a plan other than "
                "the engine's"
            )
        group = self.shared[entry.copies]
        heads.split_shared(variable, entry, shard, self.comm, group)

    def undo(self, variable, full) -> None:
        heads.undo(variable, full)

    def forward(self, layer, shard):
        call = super().forward(layer, shard)
        copies = _copies(layer)
        if copies == 1:
            return call

        def shared_call(*args, **kwargs):
            out = call(*args, **kwargs)
            heads.open_window(copies)  # until the region's row closes it
            return out

        return shared_call

    def install(self, layer, shard, journal) -> None:
        super().install(layer, shard, journal)
        if _copies(layer) > 1:
            heads.activate_repeat()
            journal.add(heads.deactivate_repeat)
            if heads.close_window not in shard.region.on_close:
                shard.region.on_close.append(heads.close_window)
                journal.add(
                    lambda: shard.region.on_close.remove(heads.close_window)
                )


def _copies(layer) -> int:
    return max(
        [getattr(v, "_tp_copies", 1) for v in layer._trainable_variables] or [1]
    )


class TorchColumn(roles.ColumnParallel):
    """Columns, with fused kernels (`torch_plan.FusedVariablePlan`)
    holding this rank's block of every part."""

    def partition(self, variable, entry, shard) -> None:
        if getattr(entry, "parts", 1) == 1:
            return super().partition(variable, entry, shard)
        heads.split_fused(variable, entry, shard, self.comm)

    def undo(self, variable, full) -> None:
        heads.undo(variable, full)


def sum_partial_grads(model, plan, styles, journal) -> None:
    """Sum the partial gradients of replicated variables applied to split
    heads over the styles' model-axis group (`torch_heads.py`)."""
    heads.sum_partial_grads(model, plan, styles[Role.HEADS].comm.group, journal)


def _make_styles(comm, shared=None) -> dict[Role, Style]:
    styles = roles.make_styles(comm)
    styles[Role.HEADS] = TorchHeads(comm, shared or {})
    styles[Role.COLUMN] = TorchColumn(comm)
    styles[Role.EXPERT] = torch_experts.ExpertParallel(comm)
    return styles


COLLECTIVES = TorchCollectives()
STYLES: dict[Role, Style] = _make_styles(COLLECTIVES)
# Styles per model-axis group and plan's shared kv heads, kept alive with
# their groups (split variable classes are keyed by their Collectives).
_GROUP_STYLES: dict[tuple, tuple] = {}


def styles_for(group=None, plan=None) -> dict[Role, Style]:
    """The styles running on `group` (None: the default group); with a
    `plan` sharing kv heads, its sharing subgroups are made here (a
    collective: every rank calls it with the same plan)."""
    copies = tuple(sorted({e.copies for e in plan or () if e.copies > 1}))
    if group is None and not copies:
        return STYLES
    key = (id(group), plan.world_size if copies else 0, copies)
    if key not in _GROUP_STYLES:
        comm = COLLECTIVES if group is None else TorchCollectives(group)
        shared = heads.shared_groups(plan, group) if copies else {}
        _GROUP_STYLES[key] = (group, shared, _make_styles(comm, shared))
    return _GROUP_STYLES[key][2]


def split_variable(variable, dim: int, rank: int, size: int) -> None:
    """Keep only this rank's shard of `variable` along `dim`, in place."""
    roles.split_variable(variable, dim, rank, size, COLLECTIVES)


def style_for(role: Role | str, styles=None) -> Style:
    """The style object of a role (of `styles`, default the world's)."""
    return (styles or STYLES)[Role(role)]


def layer_style(entries, styles=None) -> Style:
    """The style that runs a layer, from its variables' plan entries."""
    if any(e.role == Role.EXPERT for e in entries):  # torch_experts.py
        return (styles or STYLES)[Role.EXPERT]
    return roles.layer_style(entries, styles or STYLES)
