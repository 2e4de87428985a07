"""Give unallocated variables their values on the torch engine, each rank
creating every split variable at its local shard shape.

A rank reads only its own rows of a saved value (`H5Weights.read` and
`HFWeights.read` take an index), so no rank ever holds a whole split
variable; a kv block shared by several ranks and a fused kernel's block of
every part are read and split as the engine splits them
(`adopt_torch.py`). A fresh value is drawn by the initializer at the
local shape (ranks sharing a kv block draw the same one):
variance-scaling initializers (Glorot, He, LeCun) get their scale
corrected so the shard has the full shape's variance, and every random
initializer gets a seed that differs per shard (shards of one seed would
be copies of each other). An initializer whose values depend on the whole
shape in another way (orthogonal, identity, a plain function) runs at the
full shape on the host and only the local rows are kept: on a CPU rank
that one variable is then held whole for a moment (a known exception to
"never whole", for initializers that cannot be drawn by shard).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from keras_tensor_parallel.backends import torch as torch_engine
from keras_tensor_parallel.backends import torch_collectives as tc
from keras_tensor_parallel.backends import torch_groups as tg
from keras_tensor_parallel.loading import adopt_torch, observers

# Initializers whose values do not depend on the shape they are drawn at.
_SHAPE_FREE = (
    "Zeros",
    "Ones",
    "Constant",
    "RandomNormal",
    "RandomUniform",
    "TruncatedNormal",
)


def local_index(shape, dim: int, rank: int, size: int):
    """`(index, sizes)`: this rank's rows of `shape` split on `dim`, as
    the torch engine splits (`torch_collectives.shard_sizes`)."""
    sizes = tc.shard_sizes(shape[dim], size)
    start = sum(sizes[:rank])
    index = [slice(None)] * len(shape)
    index[dim] = slice(start, start + sizes[rank])
    return tuple(index), sizes


def model_rank(size: int) -> int:
    """This rank's place on the model axis of `size` ranks (the global
    rank without a data axis): ranks fill the `(data, model)` mesh
    row-major, as `torch_groups.mesh_ranks` lays them out, so data-axis
    partners read the same rows and draw the same values."""
    rank, world = tc.rank(), tc.world_size()
    if size == world:
        return rank
    groups = tg.mesh_ranks(world, size)["model"]  # raises unless a divisor
    return next(g.index(rank) for g in groups if rank in g)


def _fan(shape, mode: str) -> float:
    from keras.src.initializers.random_initializers import compute_fans

    fan_in, fan_out = compute_fans(shape)
    return {"fan_in": fan_in, "fan_out": fan_out}.get(
        mode, (fan_in + fan_out) / 2
    )


def local_initializer(initializer, full_shape, local_shape, rank: int):
    """An initializer that draws this rank's shard at `local_shape` with
    the distribution of `full_shape`, or None when there is no such one."""
    from keras.src.initializers.random_initializers import (
        RandomInitializer,
        VarianceScaling,
    )

    name = type(initializer).__name__
    if not isinstance(initializer, VarianceScaling) and name not in _SHAPE_FREE:
        return None
    out = copy.copy(initializer)
    if isinstance(initializer, VarianceScaling):
        mode = initializer.mode
        out.scale = initializer.scale * (
            _fan(local_shape, mode) / _fan(full_shape, mode)
        )
    if isinstance(initializer, RandomInitializer):
        if not isinstance(initializer.seed, int):
            return None  # a SeedGenerator: one stream, cannot fork per rank
        out.seed = (initializer.seed * 1_000_003 + rank + 1) % (2**31 - 1)
    return out


def _fresh(variable, entry, index, local_shape, rank: int):
    init = variable._initializer
    local = local_initializer(init, entry.shape, local_shape, rank)
    if local is not None:
        return local(local_shape, dtype=variable.dtype)
    index = tuple(
        torch.as_tensor(i) if isinstance(i, np.ndarray) else i for i in index
    )  # a fused kernel's block of every part
    with torch.device("cpu"):  # whole on the host only, then sliced
        return torch.as_tensor(init(entry.shape, dtype=variable.dtype))[
            index
        ].clone()


def _where(entry, rank: int, size: int):
    """`(index, local shape, draw rank, kind)` of this rank's values:
    kind "shared" / "fused" (`adopt_torch.py`), "split" or None."""
    special = adopt_torch.kind(entry) if size > 1 else None
    if special:
        return (*adopt_torch.local_index(entry, rank, size), special)
    if entry.is_split and size > 1:
        index, sizes = local_index(entry.shape, entry.split_dim, rank, size)
        shape = list(entry.shape)
        shape[entry.split_dim] = sizes[rank]
        return index, tuple(shape), rank, "split"
    return tuple(slice(None) for _ in entry.shape), entry.shape, rank, None


def to_torch(value) -> torch.Tensor:
    """A numpy array (bfloat16 from ml_dtypes too) as a torch tensor."""
    value = np.ascontiguousarray(value)
    if value.dtype.name == "bfloat16":
        return torch.from_numpy(value.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(value)


def place_local(variables, plan, *, weights=None, names=None) -> None:
    """Set each unallocated variable's value; split ones at this rank's
    local shard shape (they then read and assign full arrays, as after
    `TorchEngine.apply`).

    Args:
        variables: Variables created under `abstract.unallocated()`.
        plan: The `ShardingPlan` (its world size is the model axis: all
            ranks, or each replica's with a data axis).
        weights: A reader with `read(name, index)`, or None.
        names: `{id(variable): dataset name}` for variables in `weights`.

    Example:

    ```python
    place_local(src.created, plan, weights=reader, names=names)
    ```
    """
    names = names or {}
    size = plan.world_size
    rank = model_rank(size)
    by_path = {e.path: e for e in plan}
    kinds = [_where(by_path[v.path], rank, size)[3] for v in variables]
    styles = None  # checked before any value is placed
    if {"shared", "fused"} & set(kinds):
        styles = adopt_torch.styles(plan)
    for v in variables:
        entry = by_path[v.path]
        index, shape, draw, kind = _where(entry, rank, size)
        name = names.get(id(v))
        if weights is not None and name is not None:
            if kind in ("shared", "fused"):
                value = adopt_torch.read(weights, name, index, shape, to_torch)
            else:
                value = to_torch(weights.read(name, index))
        elif kind is not None:
            value = _fresh(v, entry, index, shape, draw)
        else:
            value = v._initializer(entry.shape, dtype=v.dtype)
        if kind == "split":
            torch_engine.adopt_shard(v, entry.split_dim, rank, size, value)
        elif kind is not None:
            adopt_torch.adopt(v, entry, rank, size, value, styles)
        else:
            v._initialize(value)
        v._initializer = None
        # Sampled while the read slice is still referenced: a copy made
        # from it (a dtype cast) is alive here too.
        observers.notify()
        del value
        if hasattr(weights, "done"):
            weights.done()
