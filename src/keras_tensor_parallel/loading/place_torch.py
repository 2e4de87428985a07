"""Give unallocated variables their values on the torch engine, each rank
creating every split variable at its local shard shape.

A rank reads only its own rows of a saved value (`H5Weights.read` and
`HFWeights.read` take an index), so no rank ever holds a whole split
variable. A fresh value is drawn by the initializer at the local shape:
variance-scaling initializers (Glorot, He, LeCun) get their scale
corrected so the shard has the full shape's variance, and every random
initializer gets a seed that differs per rank (shards of one seed would be
copies of each other). An initializer whose values depend on the whole
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
from keras_tensor_parallel.loading import observers

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


def _fresh(variable, entry, index, rank: int):
    local_shape = tuple(
        len(range(*s.indices(n))) for s, n in zip(index, entry.shape)
    )
    init = variable._initializer
    local = local_initializer(init, entry.shape, local_shape, rank)
    if local is not None:
        return local(local_shape, dtype=variable.dtype)
    with torch.device("cpu"):  # whole on the host only, then sliced
        return torch.as_tensor(init(entry.shape, dtype=variable.dtype))[
            index
        ].clone()


def _check_placeable(plan) -> None:
    """Refuse, before any variable is placed, what loading cannot yet
    place: kv heads shared by ranks and fused expert kernels."""
    odd = [e for e in plan if e.copies > 1 or getattr(e, "parts", 1) > 1]
    if odd:
        raise ValueError(
            "Loading straight into shards on torch does not place kv heads "
            "shared by several ranks or fused expert kernels yet: build "
            "the model, then wrap it with TensorParallelKeras, or replicate "
            f"them with overrides. Received: {odd[0].path} (copies="
            f"{odd[0].copies}, parts={getattr(odd[0], 'parts', 1)}) and "
            f"{len(odd) - 1} more"
        )


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
    _check_placeable(plan)
    names = names or {}
    size = plan.world_size
    rank = model_rank(size)
    by_path = {e.path: e for e in plan}
    for v in variables:
        entry = by_path[v.path]
        split = entry.is_split and size > 1
        if split:
            index, _ = local_index(entry.shape, entry.split_dim, rank, size)
        else:
            index = tuple(slice(None) for _ in entry.shape)
        name = names.get(id(v))
        if weights is not None and name is not None:
            value = to_torch(weights.read(name, index))
        elif split:
            value = _fresh(v, entry, index, rank)
        else:
            value = v._initializer(entry.shape, dtype=v.dtype)
        if split:
            torch_engine.adopt_shard(v, entry.split_dim, rank, size, value)
        else:
            v._initialize(value)
        v._initializer = None
        # Sampled while the read slice is still referenced: a copy made
        # from it (a dtype cast) is alive here too.
        observers.notify()
        del value
        if hasattr(weights, "done"):
            weights.done()
