"""When a split dim that does not divide by N may be padded, exactly.

A region whose split dim has size S not divisible by N can be stored with
the dim padded to P (a multiple of N) with zeros: zero heads (or features)
in every column, zero rows in every row. The rows make the forward exact
whatever the padded entries carry; training stays exact only if the
padded entries are exactly zero where the rows read them, for then the
rows' padded rows get a zero gradient (and every padded column entry gets
a zero gradient from the zero rows), so they stay zero under any
optimizer. This module says which ops a padded region may pass through
(they must not change the size of the split dim) and tracks which tensors
stay zero on the padded entries.
"""

from __future__ import annotations

from keras_tensor_parallel.plan import propagate as prop

# Propagators (by function name) of ops that keep the split dim's size.
PAD_SAFE = frozenset(
    {
        "broadcast",
        "_softmax",
        "_feature_norm",
        "_einsum",
        "_matmul",
        "_dot_product_attention",
        "_transpose",
        "_expand_dims",
        "_squeeze",
        "_reduce",
    }
)

# Products: zero wherever one split operand is zero.
_PRODUCTS = frozenset({"Multiply", "Einsum", "Matmul"})
# Zero stays zero through these (f(0) == 0).
_ZERO_KEEPING = frozenset(
    """
    Cast ConvertToTensor Dropout Identity Relu Relu6 Gelu Silu Swish Tanh
    Negative Square Sqrt Abs Sin Sinh Arcsin Arctan Transpose ExpandDims
    Squeeze Sum Mean Max Min Amax Amin Copy StopGradient
    """.split()
)


# Activations with f(0) == 0, by function name.
_ZERO_ACTIVATIONS = frozenset(
    """
    linear relu relu6 gelu silu swish tanh elu selu leaky_relu hard_silu
    hard_swish mish softsign
    """.split()
)


def zero_output(proj) -> bool:
    """Whether `proj` maps zero kernel columns (and zero bias) to a zero
    output: a layer's own activation must keep zero."""
    layer = proj.layer
    if not proj.nodes or proj.nodes[0].op is not layer:
        return True  # a traced op: any activation is a later op
    activation = getattr(layer, "activation", None)
    if activation is None:
        return True
    return getattr(activation, "__name__", "") in _ZERO_ACTIVATIONS


def pad_safe(node) -> bool:
    """Whether `node` may carry a padded split dim."""
    return prop.rule_name(node) in PAD_SAFE


def keeps_zero(node, zero: set) -> bool:
    """Whether `node`'s output is zero on the padded entries, given the
    ids of the tensors that are (`zero`)."""
    name = node.type_name
    args = [a for a in node.args if hasattr(a, "shape")]
    if name in _PRODUCTS:
        return any(id(a) in zero for a in args)
    if name == "DotProductAttention":
        return len(args) > 2 and id(args[2]) in zero  # zero values
    if name in ("Divide", "TrueDivide"):
        return bool(args) and id(args[0]) in zero
    if name in ("Add", "Subtract"):
        return bool(args) and all(id(a) in zero for a in args)
    if name in _ZERO_KEEPING:
        return bool(args) and id(args[0]) in zero
    return False


def padded_size(size: int, n: int) -> int:
    """`size` rounded up to a multiple of `n`."""
    return -(-size // n) * n
