"""Loading straight into shards for what the torch engine holds beyond a
plain split: kv heads shared by several ranks (`copies > 1`) and fused
expert kernels (`parts > 1`), as `torch_heads.split_shared` /
`split_fused` would have split them, without ever creating the full value.

- Shared: rank `r` reads kv block `r // copies` of `N // copies`; its
  gradient is summed over the block's subgroup (the engine's, made here
  once: `torch_roles.styles_for` caches the styles the engine then uses).
- Fused: rank `r` reads its block of every part, side by side (one h5
  read with the block's indices, or one read per part into its place).
"""

from __future__ import annotations

import keras
import numpy as np
import torch

from keras_tensor_parallel.backends import roles as base_roles
from keras_tensor_parallel.backends import torch_collectives as tc
from keras_tensor_parallel.backends import torch_heads as heads
from keras_tensor_parallel.backends import torch_roles
from keras_tensor_parallel.plan import Role


def kind(entry) -> str | None:
    """ "shared", "fused" or None (a plain split or none)."""
    copies, parts = entry.copies, getattr(entry, "parts", 1)
    if not entry.is_split or (copies == 1 and parts == 1):
        return None
    if copies > 1 and entry.role == Role.HEADS and parts == 1:
        return "shared"
    if parts > 1 and entry.role == Role.EXPERT and copies == 1:
        return None  # split on the expert dim: a plain split
    if parts > 1 and entry.role == Role.COLUMN and copies == 1:
        return "fused"
    raise ValueError(
        "Loading straight into shards on torch places shared kv heads "
        "(heads with copies > 1) and fused column kernels (parts > 1). "
        f"Received: {entry.path} ({entry.role.value}, copies={copies}, "
        f"parts={parts})"
    )


def styles(plan):
    """The engine's styles for `plan` (its kv subgroups made here: a
    collective, every rank with the same plan)."""
    if plan.world_size != tc.world_size():
        raise ValueError(
            "Loading shared kv heads or fused expert kernels straight into "
            "shards on torch needs the plan on every rank (no data axis). "
            f"Received: a plan for {plan.world_size} of {tc.world_size()} "
            "ranks"
        )
    return torch_roles.styles_for(None, plan)


def local_index(entry, rank: int, size: int):
    """`(index, local shape, draw rank)` of this rank's shard: ranks
    sharing a kv block draw (and read) the same values."""
    dim, shape = entry.split_dim, list(entry.shape)
    index: list = [slice(None)] * len(shape)
    if kind(entry) == "shared":
        block, blocks = rank // entry.copies, size // entry.copies
        sizes = tc.shard_sizes(shape[dim], blocks)
        start = sum(sizes[:block])
        index[dim] = slice(start, start + sizes[block])
        shape[dim] = sizes[block]
        return tuple(index), tuple(shape), block
    parts = entry.parts
    part = shape[dim] // parts
    sizes = tc.shard_sizes(part, size)
    start = sum(sizes[:rank])
    index[dim] = np.concatenate(
        [np.arange(p * part + start, p * part + start + sizes[rank])
         for p in range(parts)]
    )  # fmt: skip
    shape[dim] = sizes[rank] * parts
    return tuple(index), tuple(shape), rank


def read(weights, name, index, shape, to_torch) -> torch.Tensor:
    """This rank's values of a shared block or fused kernel: one read of
    a slice (or, from h5, of the block's indices), else one per run of
    consecutive indices, each copied into its place."""
    from keras_tensor_parallel.loading.h5 import H5Weights

    arrays = [i for i, s in enumerate(index) if isinstance(s, np.ndarray)]
    if not arrays or isinstance(weights, H5Weights):
        return to_torch(weights.read(name, index))
    dim = arrays[0]
    rows = index[dim]
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    out = None
    at = 0
    for run in np.split(rows, cuts):
        piece = list(index)
        piece[dim] = slice(int(run[0]), int(run[-1]) + 1)
        value = to_torch(weights.read(name, tuple(piece)))
        if out is None:
            out = torch.empty(shape, dtype=value.dtype)
        out.narrow(dim, at, len(run)).copy_(value)
        at += len(run)
        del value
    return out


def adopt(variable, entry, rank: int, size: int, local, styles) -> None:
    """Make unallocated `variable` the engine's shared or fused split
    variable with local shard `local`, via a meta-device placeholder."""
    full = tuple(variable.shape)
    dtype = keras.backend.standardize_dtype(variable.dtype)
    shard = base_roles.Shard(rank, size, None)
    with keras.device("meta"):
        variable._initialize(
            torch.empty(full, dtype=getattr(torch, dtype), device="meta")
        )
        if kind(entry) == "shared":
            style = styles[Role.HEADS]
            group = style.shared[entry.copies]
            heads.split_shared(variable, entry, shard, style.comm, group)
            variable._tp_hook.remove()  # on the placeholder
        else:
            heads.split_fused(variable, entry, shard, styles[Role.COLUMN].comm)
    if tuple(local.shape) != tuple(variable.shape):
        raise ValueError(
            f"Shard of {variable.path} on rank {rank} of {size} must have "
            f"shape {tuple(variable.shape)} ({kind(entry)} on dim "
            f"{entry.split_dim} of {full}). Received: shape "
            f"{tuple(local.shape)}"
        )
    variable._value = None
    variable._initialize(local)
    if kind(entry) == "shared":
        hook = heads._sum_over(group)  # as split_shared registers it
        variable._tp_hook = variable.value.register_hook(hook)
