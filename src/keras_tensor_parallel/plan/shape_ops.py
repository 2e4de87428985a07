"""How a split dim travels through shape ops: reshape, transpose, expand,
squeeze, repeat, tile, concatenate, stack, split, take, pad and indexing.

Each function is registered with `@propagator(op class names)`; see
`propagate.py` for the contract.
"""

from __future__ import annotations

import math

from keras_tensor_parallel.plan.propagate import (
    Conflict,
    Dims,
    call_operands,
    ndim,
    normalize_axes,
    propagator,
)
from keras_tensor_parallel.plan.value_ops import broadcast

# Shape ops --------------------------------------------------------------------


@propagator("Reshape", "Flatten")
def _reshape(node, dims: Dims) -> Dims:
    (d,) = dims[:1] or [None]
    if d is None:
        return [None]
    src = tuple(node.inputs[0].shape)
    dst = tuple(node.outputs[0].shape)
    return [reshape_dim(src, dst, d, node.type_name)]


def reshape_dim(src, dst, d: int, what: str = "Reshape") -> int:
    """Where split dim `d` of `src` lands in `dst`, if it stays blocked."""
    prefix = math.prod(src[:d])
    size = src[d]
    acc = 1
    for e, n in enumerate(dst):
        if acc == prefix and n != 1:
            if n == size:
                return e
            if n > size and n % size == 0:
                return e  # merged with minor dims: blocks stay contiguous
            if n < size and size % n == 0:
                return e  # split: the major part carries the blocks
        if acc > prefix:
            break
        acc *= n
    raise Conflict(f"{what} {src}->{dst} scatters the split dim {d}")


@propagator("Transpose", "Permute")
def _transpose(node, dims: Dims) -> Dims:
    d = dims[0]
    if d is None:
        return [None]
    rank = ndim(node.inputs[0])
    axes = getattr(node.op, "axes", None)
    if type(node.op).__name__ == "Permute":
        axes = (0,) + tuple(node.op.dims)
    axes = list(range(rank))[::-1] if axes is None else [a % rank for a in axes]
    return [axes.index(d)]


@propagator("ExpandDims")
def _expand_dims(node, dims: Dims) -> Dims:
    d = dims[0]
    if d is None:
        return [None]
    out_rank = ndim(node.outputs[0])
    axes = normalize_axes(node.op.axis, out_rank)
    pos = d
    for a in axes:
        if a <= pos:
            pos += 1
    return [pos]


@propagator("Squeeze")
def _squeeze(node, dims: Dims) -> Dims:
    d = dims[0]
    if d is None:
        return [None]
    shape = node.inputs[0].shape
    axis = getattr(node.op, "axis", None)
    axes = (
        [i for i, n in enumerate(shape) if n == 1]
        if axis is None
        else normalize_axes(axis, len(shape))
    )
    if d in axes:
        raise Conflict("Squeeze removes the split dim")
    return [d - sum(1 for a in axes if a < d)]


@propagator("Moveaxis")
def _moveaxis(node, dims: Dims) -> Dims:
    d = dims[0]
    if d is None:
        return [None]
    rank = ndim(node.inputs[0])
    src = node.op.source
    dst = node.op.destination
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [a % rank for a in src]
    dst = [a % rank for a in dst]
    order = [a for a in range(rank) if a not in src]
    for s, t in sorted(zip(dst, src)):
        order.insert(s, t)
    return [order.index(d)]


@propagator("Repeat")
def _repeat(node, dims: Dims) -> Dims:
    d = dims[0]
    if d is None:
        return [None]
    axis = node.op.axis
    if axis is None:
        raise Conflict("Repeat without axis flattens the split dim")
    # numpy repeat keeps each element's copies adjacent: blocks stay blocks.
    return [d]


@propagator("Tile")
def _tile(node, dims: Dims) -> Dims:
    d = dims[0]
    if d is None:
        return [None]
    reps = node.op.repeats
    reps = [reps] if isinstance(reps, int) else list(reps)
    rank_in, rank_out = ndim(node.inputs[0]), ndim(node.outputs[0])
    reps = [1] * (rank_out - len(reps)) + reps
    pos = rank_out - rank_in + d
    if reps[pos] != 1:
        raise Conflict("Tile repeats along the split dim")
    return [pos]


@propagator("Concatenate")
def _concatenate(node, dims: Dims) -> Dims:
    rank = ndim(node.outputs[0])
    axis = getattr(node.op, "axis", -1)
    axis = 0 if axis is None else axis % rank
    out = broadcast(node, dims)
    if out[0] is not None and out[0] == axis:
        raise Conflict("Concatenate joins along the split dim")
    return out


@propagator("Stack")
def _stack(node, dims: Dims) -> Dims:
    rank = ndim(node.outputs[0])
    axis = node.op.axis % rank
    split = {d for d in dims if d is not None}
    if len(split) > 1:
        raise Conflict("Stack of tensors split on different dims")
    if not split:
        return [None]
    d = split.pop()
    return [d + 1 if d >= axis else d]


@propagator("Split", "ArraySplit")
def _split(node, dims: Dims) -> Dims:
    d = dims[0]
    if d is not None and node.op.axis % ndim(node.inputs[0]) == d:
        raise Conflict(
            "ops.split cuts the split dim into parts (a fused kernel)"
        )
    return [d] * len(node.outputs)


@propagator("TakeAlongAxis")
def _take_along_axis(node, dims: Dims) -> Dims:
    axis = node.op.axis
    if axis is None and any(d is not None for d in dims):
        raise Conflict("TakeAlongAxis without axis flattens the split dim")
    out = broadcast(node, dims)
    if out[0] is not None and out[0] == axis % ndim(node.outputs[0]):
        raise Conflict("TakeAlongAxis gathers along the split dim")
    return out


@propagator("Take")
def _take(node, dims: Dims) -> Dims:
    (x_shape, d), (i_shape, di) = call_operands(node, dims)[:2]
    if di is not None:
        raise Conflict("Take indexed by a split tensor")
    if d is None:
        return [None]
    axis = node.op.axis
    if axis is None or axis % len(x_shape) == d:
        raise Conflict("Take gathers along the split dim")
    axis %= len(x_shape)
    return [d if d < axis else d + len(i_shape) - 1]


@propagator("Pad")
def _pad(node, dims: Dims) -> Dims:
    d = dims[0]
    if d is None:
        return [None]
    widths = node.op.pad_width
    if any(widths[d]):
        raise Conflict("Pad along the split dim")
    return [d]


@propagator("GetItem")
def _getitem(node, dims: Dims) -> Dims:
    d = dims[0]
    if d is None:
        return [None]
    if any(x is not None for x in dims[1:]):
        raise Conflict("GetItem indexed by a split tensor")
    key = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
    key = key if isinstance(key, tuple) else (key,)
    rank = ndim(node.inputs[0])
    # Expand the Ellipsis into full slices.
    n_real = sum(1 for k in key if k is not None and k is not Ellipsis)
    expanded = []
    for k in key:
        if k is Ellipsis:
            expanded += [slice(None)] * (rank - n_real)
        else:
            expanded.append(k)
    expanded += [slice(None)] * (
        rank - sum(1 for k in expanded if k is not None)
    )
    out_dim, in_dim = 0, 0
    for k in expanded:
        if k is None:
            out_dim += 1
            continue
        if in_dim == d:
            if not (isinstance(k, slice) and k == slice(None)):
                raise Conflict("GetItem slices the split dim")
            return [out_dim]
        if isinstance(k, slice):
            out_dim += 1
        elif not isinstance(k, int):
            raise Conflict("GetItem with array indices")
        in_dim += 1
    raise Conflict("GetItem key not understood")
