"""Tiny models for the coverage rows of issue 12: mixture-of-experts,
layers that own their weights, Gemma 3, kv heads < N, heads that do not
divide N. Shared by tests/test_coverage*.py and benchmarks/bench_coverage.py.

Each row names what the ideal keeps replicated beyond vectors (MoE routers)
so that `ideal_fraction` is the Megatron ideal the issue states: vectors,
position tables and routers replicated, every other matrix split 1/N.
"""

from __future__ import annotations

import dataclasses
import math
import re

import keras
import numpy as np

V = 256


class OwnDense(keras.layers.Layer):
    """A layer that owns its kernel and bias and applies `ops.matmul`."""

    def __init__(self, units, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.activation = keras.activations.get(activation)

    def build(self, input_shape):
        self.w = self.add_weight(
            shape=(input_shape[-1], self.units), initializer="glorot_uniform"
        )
        self.b = self.add_weight(shape=(self.units,), initializer="zeros")

    def call(self, x):
        return self.activation(keras.ops.matmul(x, self.w) + self.b)


def own_weights_mlp():
    inp = keras.Input((8, 32))
    x = OwnDense(64, "relu")(inp)
    x = OwnDense(32)(x)
    h = keras.layers.LayerNormalization()(x + inp)
    y = OwnDense(128, "gelu")(h)
    y = OwnDense(32)(y)
    return keras.Model(inp, h + y)


def _hub(cls_name, **config):
    def build():
        import keras_hub

        return getattr(keras_hub.models, cls_name)(**config)

    build.__name__ = cls_name
    return build


_LAYERS = dict(vocabulary_size=V, num_layers=2)
mixtral = _hub(
    "MixtralBackbone",
    num_query_heads=8,
    num_key_value_heads=4,
    hidden_dim=32,
    intermediate_dim=64,
    num_experts=4,
    **_LAYERS,
)
qwen3_moe = _hub(
    "Qwen3MoeBackbone",
    num_query_heads=8,
    num_key_value_heads=4,
    head_dim=8,
    hidden_dim=32,
    intermediate_dim=64,
    moe_intermediate_dim=32,
    num_experts=4,
    top_k=2,
    **_LAYERS,
)
gemma3 = _hub(
    "Gemma3Backbone",
    image_size=None,
    num_query_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    hidden_dim=32,
    intermediate_dim=64,
    **_LAYERS,
)
# 8 q / 2 kv heads at N=4: Gemma reshapes the queries into (kv, group).
gemma3_kv2 = _hub(
    "Gemma3Backbone",
    image_size=None,
    num_query_heads=8,
    num_key_value_heads=2,
    head_dim=8,
    hidden_dim=32,
    intermediate_dim=64,
    **_LAYERS,
)
qwen3_kv2 = _hub(
    "Qwen3Backbone",
    num_query_heads=8,
    num_key_value_heads=2,
    head_dim=8,
    hidden_dim=32,
    intermediate_dim=64,
    **_LAYERS,
)

# Multi-query attention: 4 query heads, 1 kv head widened by ops.repeat.
llama_mqa = _hub(
    "LlamaBackbone",
    num_query_heads=4,
    num_key_value_heads=1,
    hidden_dim=32,
    intermediate_dim=64,
    **_LAYERS,
)


def opt_heads(heads):
    return _hub(
        "OPTBackbone",
        num_heads=heads,
        hidden_dim=8 * heads,
        intermediate_dim=16 * heads,
        max_sequence_length=32,
        dropout=0.0,
        **_LAYERS,
    )


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the coverage table.

    Attributes:
        build: Builds the model (random weights).
        n: World size of the row.
        router: Regex of variables the ideal keeps replicated (MoE
            routers) besides vectors and position tables.
    """

    build: object
    n: int
    router: str = ""


ROWS = {
    "mixtral": Row(mixtral, 4, r".*sparse_feedforward_gate_dense/kernel"),
    "mixtral-n2": Row(mixtral, 2, r".*sparse_feedforward_gate_dense/kernel"),
    "qwen3-moe": Row(qwen3_moe, 4, r".*feedforward_gate_dense/kernel"),
    "qwen3-moe-n2": Row(qwen3_moe, 2, r".*feedforward_gate_dense/kernel"),
    "own-weights": Row(own_weights_mlp, 4),
    "gemma3": Row(gemma3, 4),
    "gemma3-kv2": Row(gemma3_kv2, 4),
    "qwen3-kv2": Row(qwen3_kv2, 4),
    "opt-12-heads": Row(opt_heads(12), 8),
    "opt-6-heads": Row(opt_heads(6), 4),
}


def _ideal_replicated(entry, router: str) -> bool:
    if len(entry.shape) < 2 or "position" in entry.path:
        return True
    return bool(router) and re.fullmatch(router, entry.path) is not None


def ideal_fraction(plan, router: str = "") -> float:
    """Device-0 parameter bytes under the Megatron ideal, as a fraction of
    one device's."""
    n, total, held = plan.world_size, 0, 0.0
    for e in plan:
        size = math.prod(e.shape)
        total += size
        held += size if _ideal_replicated(e, router) else size / n
    return held / total


def inputs(batch=2, seq=8, seed=0):
    rng = np.random.RandomState(seed)
    mask = np.ones((batch, seq), "int32")
    mask[0, -2:] = 0
    return {
        "token_ids": rng.randint(1, V, (batch, seq)).astype("int32"),
        "padding_mask": mask,
    }
