"""Per-layer-class rules: what a layer's variables can be split on.

A rule is registered per layer class with `@rule(cls)`. It describes the
layer as data the planner understands:

- `LinearRule`: a projection with input, kernel and output specs as einsum
  labels (Dense, EinsumDense, Conv). The planner picks column dims from the
  labels only the kernel and the output carry, and row dims from the labels
  the kernel contracts away, following the dataflow.
- `EmbeddingRule`: a lookup table split on its vocab rows.
- `ReplicatedRule`: kept whole on every device, with the reason.

Layers with no rule are traced into (their sublayers get rules); a layer
with no rule that owns variables itself is replicated, and the plan says so.
"""

from __future__ import annotations

import dataclasses
import string

import keras

from keras_tensor_parallel.plan import layers
from keras_tensor_parallel.plan.lora import kernel_variable

_RULES: dict[type, object] = {}


def rule(*layer_classes):
    """Register a rule factory for the given layer classes."""

    def decorator(fn):
        for cls in layer_classes:
            _RULES[cls] = fn
        return fn

    return decorator


def rule_for(layer):
    """The rule object for `layer`, or None (no rule: trace into it)."""
    for cls in type(layer).__mro__:
        if cls in _RULES:
            return _RULES[cls](layer)
    return None


def has_rule(layer) -> bool:
    return any(cls in _RULES for cls in type(layer).__mro__)


def is_projection(layer) -> bool:
    """Whether the planner reads `layer` as a projection it can split.

    The one answer to "is this a projection": a layer whose rule is a
    `LinearRule` (Dense, EinsumDense, Conv). Engines ask this, not class
    names.

    Example:

    ```python
    is_projection(keras.layers.Dense(4))  # True
    is_projection(keras.layers.LayerNormalization())  # False
    ```
    """
    return isinstance(rule_for(layer), LinearRule)


@dataclasses.dataclass(frozen=True)
class LinearRule:
    """A projection `output = einsum(input, kernel) + bias`.

    Attributes:
        input_spec: einsum labels of the input tensor.
        kernel_spec: labels of the kernel.
        output_spec: labels of the output.
        kernel: the kernel variable.
        bias: the bias variable or None.
        bias_spec: labels of the bias (a subset of output labels).
        other: further variables (replicated: quantization scales, ...).
    """

    input_spec: str
    kernel_spec: str
    output_spec: str
    kernel: object
    bias: object = None
    bias_spec: str = ""

    def column_labels(self) -> list[str]:
        """Output-only labels in output order (major first)."""
        return [
            c
            for c in self.output_spec
            if c in self.kernel_spec and c not in self.input_spec
        ]

    def contracted_labels(self) -> list[str]:
        return [
            c
            for c in self.input_spec
            if c in self.kernel_spec and c not in self.output_spec
        ]

    def label_size(self, label: str) -> int:
        return int(self.kernel.shape[self.kernel_spec.index(label)])


@dataclasses.dataclass(frozen=True)
class EmbeddingRule:
    """A table indexed by token ids: `tables` split on `vocab_dims`."""

    tables: tuple  # variables
    vocab_dims: tuple[int, ...]
    vocab_size: int


@dataclasses.dataclass(frozen=True)
class ReplicatedRule:
    reason: str


# Dense ------------------------------------------------------------------------


@rule(keras.layers.Dense)
def _dense(layer):
    if getattr(layer, "quantization_mode", None):
        return ReplicatedRule("quantized Dense: split not supported")
    # Specs are right-aligned: leading (batch) dims pass straight through.
    return LinearRule(
        "y",
        "yz",
        "z",
        kernel_variable(layer),  # the stored kernel, also with LoRA on
        layer.bias,
        "z" if layer.bias is not None else "",
    )


# EinsumDense ----------------------------------------------------------------


@rule(keras.layers.EinsumDense)
def _einsum_dense(layer):
    if getattr(layer, "quantization_mode", None):
        return ReplicatedRule("quantized EinsumDense: split not supported")
    equation = layer.equation.replace(" ", "")
    lhs, out = equation.split("->")
    inp, ker = lhs.split(",")
    if "." in equation:
        return ReplicatedRule(
            f"EinsumDense equation {equation!r} uses an ellipsis: "
            "labels cannot be matched to dims"
        )
    bias_spec = ""
    if layer.bias is not None:
        axes = layer.bias_axes or ""
        # Keras EinsumDense stores the bias over the output dims from the
        # first bias axis onward (with 1-sized dims for axes not named).
        first = min(out.index(a) for a in axes)
        bias_spec = out[first:]
    kernel = kernel_variable(layer)
    return LinearRule(inp, ker, out, kernel, layer.bias, bias_spec)


# Convolutions ---------------------------------------------------------------


@rule(
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)
def _conv(layer):
    rank = layer.rank
    if layer.groups != 1:
        return ReplicatedRule(
            f"grouped convolution (groups={layer.groups}): replicated"
        )
    spatial = string.ascii_lowercase[1 : 1 + rank]  # b + spatial dims
    window = string.ascii_lowercase[10 : 10 + rank]
    if layer.data_format == "channels_first":
        inp, out = "b" + "y" + spatial, "b" + "z" + spatial
    else:
        inp, out = "b" + spatial + "y", "b" + spatial + "z"
    ker = window + "yz"
    return LinearRule(
        inp,
        ker,
        out,
        layer.kernel,
        layer.bias,
        "z" if layer.bias is not None else "",
    )


@rule(
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
def _unsupported_conv(layer):
    return ReplicatedRule(
        f"{type(layer).__name__}: no split rule (channel coupling differs "
        "from a plain convolution)"
    )


# Embeddings -----------------------------------------------------------------


@rule(keras.layers.Embedding)
def _embedding(layer):
    return EmbeddingRule((layer.embeddings,), (0,), int(layer.input_dim))


def _norm_reason(layer) -> str:
    return (
        f"{type(layer).__name__}: normalization parameters are small and "
        "applied per feature: replicated"
    )


@rule(*layers.NORM_CLASSES)
def _norm(layer):
    return ReplicatedRule(_norm_reason(layer))


def _register_keras_hub() -> None:
    try:
        from keras_hub.src.layers.modeling.position_embedding import (
            PositionEmbedding,
        )
        from keras_hub.src.layers.modeling.reversible_embedding import (
            ReversibleEmbedding,
        )
    except ImportError:  # keras-hub is optional for the planner
        return

    reversible = [ReversibleEmbedding]
    if hasattr(keras.layers, "ReversibleEmbedding"):
        reversible.append(keras.layers.ReversibleEmbedding)

    @rule(*reversible)
    def _reversible(layer):
        tables, dims = [layer.embeddings], [0]
        if not layer.tie_weights:
            tables.append(layer.reverse_embeddings)
            dims.append(1)
        return EmbeddingRule(tuple(tables), tuple(dims), int(layer.input_dim))

    @rule(PositionEmbedding)
    def _position(layer):
        return ReplicatedRule(
            "position table: indexed by position, not by token: replicated"
        )


_register_keras_hub()
