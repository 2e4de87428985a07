"""Shared kv heads and fused expert kernels on torch (issue 12).

Shared kv heads (`VariablePlan.copies > 1`, from `torch_plan.py`): with
fewer kv heads than ranks, rank `r` holds kv block `r // copies` of
`N // copies`, the one its query heads read (vLLM's duplication). Forward
runs the model's own code: its `ops.repeat(key, q_heads // kv_heads)`
would widen one local kv head to all the query heads, so while a shared
projection's output is in flight (from its call to the next row
projection, which closes the region) a repeat of a one-head axis by a
multiple of `copies` repeats `copies` times less: the local query count.
Backward, the gradient of a shared kernel holds only this rank's query
heads' part; a hook on its parameter sums it over the ranks sharing the
block (one `torch.distributed` subgroup per block, made on every rank
together when the engine starts; with a data axis, one per block of every
model-axis group). Reading the full value gathers the blocks once each.

Fused kernels (`torch_plan.FusedVariablePlan`, Qwen3-MoE's
`(experts, hidden, 2 * ffn)` gate/up bank): each rank holds its block of
every part side by side, so the model's `ops.split(gate_up, 2, -1)` cuts
the local gate and up blocks; the op-level column/row roles
(`roles_ops.py`) do the rest.
"""

from __future__ import annotations

import keras
import numpy as np
import torch
import torch.distributed as dist

from keras_tensor_parallel.backends import roles
from keras_tensor_parallel.backends import torch_collectives as tc
from keras_tensor_parallel.backends import torch_groups as tg

# Subgroup all-reduces of shared kv gradients (eager), for tests.
# "partial": model-axis all-reduces of replicated variables' gradients.
COUNTS = {"shared": 0, "partial": 0}


def shared_groups(plan, group=None) -> dict[int, object]:
    """`{copies: this rank's subgroup}` for every `copies > 1` of `plan`;
    a collective (every rank creates every group, in one order).

    Args:
        plan: The `ShardingPlan`.
        group: The model-axis group (None: the plan runs on all ranks).
    """
    wanted = sorted({e.copies for e in plan if e.copies > 1})
    if not wanted:
        return {}
    world, me = tc.world_size(), tc.rank()
    models = tg.mesh_ranks(world, plan.world_size)["model"]
    if group is None and len(models) > 1:
        raise ValueError(
            "Shared kv heads need the model-axis groups of the mesh. "
            f"Received: a plan for {plan.world_size} of {world} ranks "
            "without a model group"
        )
    mine = {}
    for copies in wanted:
        for members in models:
            for b in range(0, len(members), copies):
                ranks = members[b : b + copies]
                made = dist.new_group(ranks)
                if me in ranks:
                    mine[copies] = made
    return mine


class _SharedComm:
    """A `roles.Collectives` for a block held by `copies` adjacent ranks:
    gathers take each block once."""

    def __init__(self, comm, copies: int):
        self.base, self.copies = comm, copies

    def __getattr__(self, name):
        return getattr(self.base, name)

    def gather_dim(self, local, dim: int, sizes: list[int]):
        every = [s for s in sizes for _ in range(self.copies)]
        full = self.base.gather_dim(local, dim, every)
        parts = torch.split(full, every, dim)
        return torch.cat(parts[:: self.copies], dim)


class _FusedComm(_SharedComm):
    """Gathers of a fused kernel: rank blocks back into part order."""

    def gather_dim(self, local, dim: int, sizes: list[int]):
        full = self.base.gather_dim(local, dim, sizes)
        ranks = torch.split(full, sizes, dim)
        parts = [torch.chunk(r, self.copies, dim) for r in ranks]
        return torch.cat([p[i] for i in range(self.copies) for p in parts], dim)


class _FusedMixin:
    """`local_slice` of a fused kernel: this rank's block of each part."""

    def local_slice(self, value):
        dim, parts = self._tp_dim, self._tp_parts
        size = self._tp_full_shape[dim] // parts
        index = [slice(None)] * len(self._tp_full_shape)
        pieces = []
        for p in range(parts):
            index[dim] = slice(
                p * size + self._tp_start, p * size + self._tp_stop
            )
            pieces.append(value[tuple(index)])
        if isinstance(value, np.ndarray):
            return np.concatenate(pieces, axis=dim)
        return keras.ops.concatenate(pieces, axis=dim)


_COMMS: dict[tuple, object] = {}
_FUSED_CLASSES: dict[tuple, type] = {}


def _comm(kind, comm, copies: int):
    key = (kind, id(comm), copies)
    if key not in _COMMS:
        _COMMS[key] = kind(comm, copies)
    return _COMMS[key]


def _sum_over(group, key: str = "shared"):
    def hook(grad):
        grad = grad.contiguous().clone()
        if not torch.compiler.is_compiling():
            COUNTS[key] += 1
        dist.all_reduce(grad, group=group)
        return grad

    return hook


def split_shared(variable, entry, shard, comm, group) -> None:
    """Keep kv block `rank // copies` of `variable` and sum its gradient
    over `group` (the ranks sharing it)."""
    copies = entry.copies
    shared = _comm(_SharedComm, comm, copies)
    roles.split_variable(
        variable, entry.split_dim, shard.rank // copies,
        shard.size // copies, shared,
    )  # fmt: skip
    variable._tp_copies = copies
    variable._tp_hook = variable.value.register_hook(_sum_over(group))


def split_fused(variable, entry, shard, comm) -> None:
    """Keep this rank's block of each of the `entry.parts` parts."""
    dim, parts = entry.split_dim, entry.parts
    full = comm.detach(variable.value)
    size = full.shape[dim] // parts
    sizes = roles.shard_sizes(size, shard.size)
    start = sum(sizes[: shard.rank])
    stop = start + sizes[shard.rank]
    local = torch.cat(
        [
            full.narrow(dim, p * size + start, stop - start)
            for p in range(parts)
        ],
        dim,
    ).clone()
    fused = _comm(_FusedComm, comm, parts)
    cls = type(variable)
    key = (cls, id(fused))
    if key not in _FUSED_CLASSES:
        split = roles._split_class(cls, fused)
        _FUSED_CLASSES[key] = type(split.__name__, (_FusedMixin, split), {})
    variable._tp_full_shape = tuple(full.shape)
    variable._tp_dim = dim
    variable._tp_sizes = [s * parts for s in sizes]
    variable._tp_start, variable._tp_stop = start, stop
    variable._tp_parts = parts
    variable.__class__ = _FUSED_CLASSES[key]
    roles._set_value(variable, local)


def undo(variable, full) -> None:
    """Undo `split_shared` / `split_fused` (and a plain split)."""
    hook = variable.__dict__.pop("_tp_hook", None)
    if hook is not None:
        hook.remove()
    variable.__dict__.pop("_tp_copies", None)
    if "_tp_parts" in variable.__dict__:
        del variable._tp_parts
        mro = type(variable).__mro__
        variable.__class__ = mro[mro.index(roles._SplitMixin) + 1]
        for name in roles._SPLIT_ATTRS:
            variable.__dict__.pop(f"_tp_{name}", None)
        roles._set_value(variable, full)
        return
    roles.unsplit_variable(variable, full)


def sum_partial_grads(model, plan, group, journal) -> None:
    """Sum over `group` (the model axis) the gradient of every replicated
    variable the plan marks `sum_grad` (applied to split heads)."""
    marked = {e.path for e in plan if getattr(e, "sum_grad", False)}
    for v in model.trainable_variables:
        if v.path in marked and not roles.is_split(v):
            handle = v.value.register_hook(_sum_over(group, "partial"))
            journal.add(handle.remove)


def sum_grads(variables, group, journal) -> None:
    """Sum the gradient of each of `variables` over `group` (the model
    axis) in every backward: replicated weights whose gradient on a rank
    covers only its split heads (multi-query kv kernels, their norms)."""
    for v in variables:
        handle = v.value.register_hook(_sum_over(group, "partial"))
        journal.add(handle.remove)


def local_heads(plan, rank: int, heads: int) -> tuple[int, int] | None:
    """`(start, stop)` of the heads this model-axis `rank` holds of a
    heads dim of size `heads` (a kv cache's), or None when no heads
    kernel of that many heads is split: shared kv blocks, uneven real
    heads, or the even split."""
    n = plan.world_size
    for e in plan:
        if e.role.value != "heads" or not e.is_split:
            continue
        if e.shape[e.split_dim] != heads:
            continue
        if e.copies > 1:
            per = heads * e.copies // n
            block = rank // e.copies
            return block * per, (block + 1) * per
        sizes = roles.shard_sizes(heads, n)
        start = sum(sizes[:rank])
        return start, start + sizes[rank]
    return None


# The repeat of shared kv heads ----------------------------------------------

_REPEAT: dict = {}  # "original": backend repeat, "users": installed count
_WINDOW = {"copies": 0}  # copies of the shared output in flight (0: none)


def _repeat(x, repeats, axis=None):
    copies = _WINDOW["copies"]
    if (
        copies
        and axis is not None
        and isinstance(repeats, int)
        and repeats % copies == 0
        and x.shape[axis] == 1
    ):
        repeats //= copies
    return _REPEAT["original"](x, repeats, axis=axis)


def open_window(copies: int) -> None:
    _WINDOW["copies"] = copies


def close_window() -> None:
    _WINDOW["copies"] = 0


def activate_repeat() -> None:
    module = keras.src.backend.numpy
    if not _REPEAT:
        _REPEAT["original"] = module.repeat
        _REPEAT["users"] = 0
        module.repeat = _repeat
    _REPEAT["users"] += 1


def deactivate_repeat() -> None:
    _REPEAT["users"] -= 1
    if _REPEAT["users"] == 0:
        keras.src.backend.numpy.repeat = _REPEAT.pop("original")
        _REPEAT.clear()
        close_window()
