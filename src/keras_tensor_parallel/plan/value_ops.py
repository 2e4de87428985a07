"""How a split dim travels through value ops: elementwise, norms,
reductions, contractions, attention and pooling.

Each function is registered with `@propagator(op class names)`; see
`propagate.py` for the contract.
"""

from __future__ import annotations

from keras_tensor_parallel.plan import layers
from keras_tensor_parallel.plan.propagate import (
    Conflict,
    Dims,
    call_operands,
    ndim,
    normalize_axes,
    propagator,
    split_inputs,
)

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
def broadcast(node, dims: Dims) -> Dims:
    """Elementwise with numpy broadcasting (dims right-aligned)."""
    out = node.outputs[0]
    rank = ndim(out)
    target = None
    for i, d in split_inputs(dims):
        mapped = rank - ndim(node.inputs[i]) + d
        if target is not None and mapped != target:
            raise Conflict(
                f"{node.type_name} combines tensors split on different dims"
            )
        target = mapped
    return [target] * len(node.outputs)


@propagator("Softmax", "LogSoftmax")
def _softmax(node, dims: Dims) -> Dims:
    rank = ndim(node.inputs[0])
    axes = normalize_axes(getattr(node.op, "axis", -1), rank)
    out = broadcast(node, dims)
    if out[0] in axes:
        raise Conflict(f"{node.type_name} normalizes over the split dim")
    return out


@propagator(
    *(layers.NORM_CLASS_NAMES - layers.PER_CHANNEL_NORM_NAMES),
    "Normalize",
    "L2Normalize",
)
def _feature_norm(node, dims: Dims) -> Dims:
    x = node.inputs[0]
    axis = getattr(node.op, "axis", -1)
    axes = normalize_axes(axis, ndim(x))
    if dims[0] in axes or getattr(node.op, "axis", -1) is None:
        raise Conflict(f"{node.type_name} normalizes over the split dim")
    if type(node.op).__name__ == "GroupNormalization":
        raise Conflict("GroupNormalization mixes channels of a group")
    return broadcast(node, dims)


@propagator(*layers.PER_CHANNEL_NORM_NAMES)
def _batch_norm(node, dims: Dims) -> Dims:
    # Statistics are per channel: a split channel axis stays local.
    return broadcast(node, dims)


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
    rank = ndim(node.inputs[0])
    axes = normalize_axes(getattr(node.op, "axis", None), rank)
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
    rank = ndim(node.inputs[0])
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
    operands = call_operands(node, dims)
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
    operands = call_operands(node, dims)[:2]
    rank = ndim(node.outputs[0])
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
    for i, d in split_inputs(dims):
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
    rank = ndim(node.inputs[0])
    fmt = getattr(node.op, "data_format", "channels_last")
    channel = 1 if fmt == "channels_first" else rank - 1
    if d not in (0, channel):
        raise Conflict("pooling over the split dim")
    return [d]
