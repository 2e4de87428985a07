"""How a split dim travels through one op.

Each propagator takes a traced `OpNode` and, per input tensor, the dim that
is split over the model axis (or None), and returns the split dim of each
output. An op that would need the split dim gathered (a norm over it, a
contraction without a row-parallel kernel, an op we know nothing about)
raises `Conflict` with the reason; the planner then replicates the layers it
was trying to split and reports that reason.

Registered by op class name, so ops from any package (keras, keras-hub) are
matched the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

Dims = list  # list[int | None]


class Conflict(Exception):
    """The split cannot pass through this op."""


_PROPAGATORS: dict[str, Callable] = {}


def propagator(*names: str):
    def decorator(fn):
        for name in names:
            _PROPAGATORS[name] = fn
        return fn

    return decorator


# Layers kept whole during tracing because a propagator describes them (their
# `call` may not run on symbolic tensors, e.g. Softmax with a mask).
LAYER_LEAVES = {
    "Softmax",
    "Dropout",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "Identity",
}


def known(node) -> bool:
    return node.type_name in _PROPAGATORS


def propagate(node, dims: Sequence[int | None]) -> Dims:
    """Split dim of each output of `node`, given the split dim per input."""
    fn = _PROPAGATORS.get(node.type_name)
    if fn is None:
        raise Conflict(f"no sharding rule for op {node.type_name}")
    try:
        return fn(node, list(dims))
    except Conflict:
        raise
    except Exception as e:  # noqa: BLE001 - a call form the rule misreads
        # Planning must never crash: a call the propagator does not
        # understand stops the region, and the plan says which op.
        raise Conflict(
            f"{node.type_name} called in a form its rule does not read "
            f"({type(e).__name__})"
        ) from e


def _rank(t) -> int:
    return len(t.shape)


def _norm_axes(axis, rank: int) -> list[int]:
    if axis is None:
        return list(range(rank))
    if isinstance(axis, int):
        axis = [axis]
    return sorted(a % rank for a in axis)


def _only_split(dims: Dims) -> list[tuple[int, int]]:
    return [(i, d) for i, d in enumerate(dims) if d is not None]


def _operands(node, dims: Dims) -> list[tuple[tuple, int | None]]:
    """(shape, split dim) of each positional operand of `node`.

    `node.inputs` (and `dims`) list only the symbolic tensors; an operand
    that is a variable or constant (`ops.matmul(x, self.w)`) is not among
    them, so position-sensitive rules read the call's own arguments.
    """
    split = {id(t): d for t, d in zip(node.inputs, dims)}
    return [
        (tuple(getattr(a, "shape", ())), split.get(id(a))) for a in node.args
    ]


# Elementwise ------------------------------------------------------------------

_UNARY = """
Abs Absolute Arccos Arcsin Arctan Arccosh Arcsinh Arctanh Cast Ceil Celu Clip
ConvertToTensor Cos Cosh Elu Erf Erfinv Exp Exp2 Expm1 Floor Gelu Glu
HardShrink HardSigmoid HardSilu HardTanh Identity IsFinite IsInf IsNan
LeakyRelu Log Log10 Log1p Log2 LogSigmoid LogicalNot Negative NanToNum
OnesLike Relu Relu6 Reciprocal Round Rsqrt Selu Sigmoid Sign Silu Sin Sinh
SoftShrink Softplus Softsign Sparsemax Sqrt Square SquarePlus StopGradient
Tan Tanh TanhShrink Threshold Trunc ZerosLike FullLike Copy Real Imag
Conjugate Conj Swish SaturateCast
""".split()

_BINARY = """
Add Subtract Multiply Divide TrueDivide FloorDivide Mod Power Maximum
Minimum Where Equal NotEqual Greater GreaterEqual Less LessEqual LogicalAnd
LogicalOr LogicalXor Arctan2 DivideNoNan BitwiseAnd BitwiseOr BitwiseXor
Hypot Heaviside Copysign Nextafter Ldexp
""".split()


@propagator(
    *_UNARY, *_BINARY, "Dropout", "Activation", "ReLU", "ELU", "LeakyReLU"
)
def _broadcast(node, dims: Dims) -> Dims:
    """Elementwise with numpy broadcasting (dims right-aligned)."""
    out = node.outputs[0]
    rank = _rank(out)
    target = None
    for i, d in _only_split(dims):
        mapped = rank - _rank(node.inputs[i]) + d
        if target is not None and mapped != target:
            raise Conflict(
                f"{node.type_name} combines tensors split on different dims"
            )
        target = mapped
    return [target] * len(node.outputs)


@propagator("Softmax", "LogSoftmax")
def _softmax(node, dims: Dims) -> Dims:
    rank = _rank(node.inputs[0])
    axes = _norm_axes(getattr(node.op, "axis", -1), rank)
    out = _broadcast(node, dims)
    if out[0] in axes:
        raise Conflict(f"{node.type_name} normalizes over the split dim")
    return out


@propagator(
    "LayerNormalization",
    "RMSNormalization",
    "LlamaLayerNorm",
    "MistralLayerNormalization",
    "QwenLayerNorm",
    "T5LayerNorm",
    "UnitNormalization",
    "GroupNormalization",
    "Normalize",
    "L2Normalize",
)
def _feature_norm(node, dims: Dims) -> Dims:
    x = node.inputs[0]
    axis = getattr(node.op, "axis", -1)
    axes = _norm_axes(axis, _rank(x))
    if dims[0] in axes or getattr(node.op, "axis", -1) is None:
        raise Conflict(f"{node.type_name} normalizes over the split dim")
    if type(node.op).__name__ == "GroupNormalization":
        raise Conflict("GroupNormalization mixes channels of a group")
    return _broadcast(node, dims)


@propagator("BatchNormalization")
def _batch_norm(node, dims: Dims) -> Dims:
    # Statistics are per channel: a split channel axis stays local.
    return _broadcast(node, dims)


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
    rank = _rank(node.inputs[0])
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
    out_rank = _rank(node.outputs[0])
    axes = _norm_axes(node.op.axis, out_rank)
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
        else _norm_axes(axis, len(shape))
    )
    if d in axes:
        raise Conflict("Squeeze removes the split dim")
    return [d - sum(1 for a in axes if a < d)]


@propagator("Moveaxis")
def _moveaxis(node, dims: Dims) -> Dims:
    d = dims[0]
    if d is None:
        return [None]
    rank = _rank(node.inputs[0])
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
    rank_in, rank_out = _rank(node.inputs[0]), _rank(node.outputs[0])
    reps = [1] * (rank_out - len(reps)) + reps
    pos = rank_out - rank_in + d
    if reps[pos] != 1:
        raise Conflict("Tile repeats along the split dim")
    return [pos]


@propagator("Concatenate")
def _concatenate(node, dims: Dims) -> Dims:
    rank = _rank(node.outputs[0])
    axis = getattr(node.op, "axis", -1)
    axis = 0 if axis is None else axis % rank
    out = _broadcast(node, dims)
    if out[0] is not None and out[0] == axis:
        raise Conflict("Concatenate joins along the split dim")
    return out


@propagator("Stack")
def _stack(node, dims: Dims) -> Dims:
    rank = _rank(node.outputs[0])
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
    if d is not None and node.op.axis % _rank(node.inputs[0]) == d:
        raise Conflict("Split along the split dim")
    return [d] * len(node.outputs)


@propagator("TakeAlongAxis")
def _take_along_axis(node, dims: Dims) -> Dims:
    axis = node.op.axis
    if axis is None and any(d is not None for d in dims):
        raise Conflict("TakeAlongAxis without axis flattens the split dim")
    out = _broadcast(node, dims)
    if out[0] is not None and out[0] == axis % _rank(node.outputs[0]):
        raise Conflict("TakeAlongAxis gathers along the split dim")
    return out


@propagator("Take")
def _take(node, dims: Dims) -> Dims:
    (x_shape, d), (i_shape, di) = _operands(node, dims)[:2]
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
    rank = _rank(node.inputs[0])
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


# Reductions ---------------------------------------------------------------


@propagator(
    "Sum",
    "Mean",
    "Max",
    "Min",
    "Prod",
    "Var",
    "Std",
    "All",
    "Any",
    "Argmax",
    "Argmin",
    "Amax",
    "Amin",
    "Logsumexp",
    "Norm",
)
def _reduce(node, dims: Dims) -> Dims:
    d = dims[0]
    if d is None:
        return [None] * len(node.outputs)
    rank = _rank(node.inputs[0])
    axes = _norm_axes(getattr(node.op, "axis", None), rank)
    if d in axes:
        raise Conflict(f"{node.type_name} reduces over the split dim")
    if getattr(node.op, "keepdims", False):
        return [d]
    return [d - sum(1 for a in axes if a < d)]


@propagator("Cumsum", "Cumprod", "Sort", "Argsort", "TopK")
def _along_axis(node, dims: Dims) -> Dims:
    d = dims[0]
    if d is None:
        return [None] * len(node.outputs)
    rank = _rank(node.inputs[0])
    axis = getattr(node.op, "axis", -1)
    if axis is None or axis % rank == d:
        raise Conflict(f"{node.type_name} runs along the split dim")
    return [d] * len(node.outputs)


# Contractions -------------------------------------------------------------


@propagator("Einsum")
def _einsum(node, dims: Dims) -> Dims:
    subscripts = node.op.subscripts.replace(" ", "")
    if "." in subscripts:
        raise Conflict("Einsum with ellipsis")
    lhs, out = subscripts.split("->")
    specs = lhs.split(",")
    label = None
    operands = _operands(node, dims)
    for i, (_, d) in enumerate(operands):
        if d is None:
            continue
        here = specs[i][d]
        if label is not None and here != label:
            raise Conflict("Einsum operands split on different labels")
        label = here
    if label is None:
        return [None]
    if label not in out:
        raise Conflict("Einsum contracts the split dim (no kernel to shard)")
    return [out.index(label)]


@propagator("Matmul")
def _matmul(node, dims: Dims) -> Dims:
    operands = _operands(node, dims)[:2]
    rank = _rank(node.outputs[0])
    target = None
    for i, (shape, d) in enumerate(operands):
        if d is None:
            continue
        r = len(shape)
        if (i == 0 and d == r - 1) or (i == 1 and d == r - 2):
            raise Conflict("Matmul contracts the split dim")
        if r == 1:
            raise Conflict("Matmul with a split vector")
        if i == 0 and d == r - 2:
            mapped = rank - 2
        elif i == 1 and d == r - 1:
            mapped = rank - 1
        else:
            mapped = rank - r + d
        if target is not None and mapped != target:
            raise Conflict("Matmul operands split on different dims")
        target = mapped
    return [target]


@propagator("DotProductAttention")
def _dot_product_attention(node, dims: Dims) -> Dims:
    # query, key, value: [batch, seq, heads, head_dim]; heads are independent.
    for i, d in _only_split(dims):
        if i < 3 and d != 2:
            raise Conflict("attention inputs split on a dim other than heads")
    return [2 if any(d is not None for d in dims[:3]) else None]


# Pooling (channels stay independent) ---------------------------------------


@propagator(
    "MaxPool",
    "AveragePool",
    "MaxPooling1D",
    "MaxPooling2D",
    "MaxPooling3D",
    "AveragePooling1D",
    "AveragePooling2D",
    "AveragePooling3D",
)
def _pool(node, dims: Dims) -> Dims:
    d = dims[0]
    if d is None:
        return [None]
    rank = _rank(node.inputs[0])
    fmt = getattr(node.op, "data_format", "channels_last")
    channel = 1 if fmt == "channels_first" else rank - 1
    if d not in (0, channel):
        raise Conflict("pooling over the split dim")
    return [d]
