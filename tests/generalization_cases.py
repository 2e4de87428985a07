"""The generalization sweep's models: small models no other test names
(random weights, nothing downloaded), each with its inputs and the world
sizes it is checked at. Used by tests/test_generalization.py."""

from __future__ import annotations

import dataclasses

import coverage_models as cov
import keras
import numpy as np

# Models ------------------------------------------------------------------


class ResidualMLP(keras.Model):
    """Subclassed model: Dense layers used from Python with residuals."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inp = keras.layers.Dense(32)
        self.up = keras.layers.Dense(64, activation="gelu")
        self.down = keras.layers.Dense(32)
        self.norm = keras.layers.LayerNormalization()
        self.head = keras.layers.Dense(8)

    def call(self, x):
        h = self.inp(x)
        h = h + self.down(self.up(h))
        h = self.norm(h)
        h = h + self.down(self.up(h)) * 0.5  # the block, reused
        return self.head(h)


def residual_mlp():
    model = ResidualMLP()
    model(np.zeros((1, 16), "float32"))
    return model


class OwnWeights(keras.layers.Layer):
    """A layer owning its weights, applied with `ops.matmul`."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.w = self.add_weight(
            shape=(input_shape[-1], self.units), initializer="glorot_uniform"
        )
        self.b = self.add_weight(shape=(self.units,), initializer="zeros")

    def call(self, x):
        return keras.ops.relu(keras.ops.matmul(x, self.w) + self.b)


def own_weights():
    inp = keras.Input((16,))
    x = keras.layers.Dense(32, activation="relu")(inp)
    x = OwnWeights(32)(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    out = keras.layers.Dense(8)(x)
    return keras.Model(inp, out)


def shared_layer():
    inp = keras.Input((16,))
    up = keras.layers.Dense(32, activation="relu")
    down = keras.layers.Dense(16)
    x = inp + down(up(inp))
    x = x + down(up(x))
    return keras.Model(inp, keras.layers.Dense(4)(x))


def multi_io():
    a = keras.Input((16,), name="a")
    b = keras.Input((8,), name="b")
    x = keras.layers.Concatenate()([a, b])
    h = keras.layers.Dense(64, activation="relu")(x)
    h = keras.layers.Dense(24)(h)
    y1 = keras.layers.Dense(32, activation="relu")(h)
    y1 = keras.layers.Dense(3, name="cls")(y1)
    y2 = keras.layers.Dense(1, name="reg")(h)
    return keras.Model({"a": a, "b": b}, {"cls": y1, "reg": y2})


def conv1d():
    return keras.Sequential(
        [
            keras.Input((16, 4)),
            keras.layers.Conv1D(16, 3, padding="same", activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.MaxPooling1D(2),
            keras.layers.Conv1D(8, 3, padding="same"),
            keras.layers.Flatten(),
            keras.layers.Dense(4),
        ]
    )


def conv2d():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.AveragePooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.0),
            keras.layers.Dense(4),
        ]
    )


def recurrent():
    inp = keras.Input((8, 8))
    x = keras.layers.Dense(16)(inp)
    x = keras.layers.LSTM(16, return_sequences=True)(x)
    x = keras.layers.GRU(8)(x)
    x = keras.layers.Dense(32, activation="relu")(x)
    return keras.Model(inp, keras.layers.Dense(4)(x))


def dense_3d():
    inp = keras.Input((8, 16))
    x = keras.layers.Dense(64, activation="silu")(inp)
    x = keras.layers.Dense(16)(x)
    x = keras.layers.LayerNormalization()(x + inp)
    return keras.Model(inp, x)


def einsum_bias():
    inp = keras.Input((8, 16))
    x = keras.layers.EinsumDense(
        "btd,dnh->btnh", (8, 4, 8), bias_axes="nh", activation="relu"
    )(inp)
    x = keras.layers.EinsumDense("btnh,nhd->btd", (8, 16), bias_axes="d")(x)
    y = keras.layers.EinsumDense("btd,de->bte", (8, 32), bias_axes="te")(x)
    y = keras.layers.Activation("relu")(y)
    y = keras.layers.EinsumDense("bte,ed->btd", (8, 16))(y)
    return keras.Model(inp, y)


def mha_cross():
    q = keras.Input((8, 16), name="query")
    kv = keras.Input((6, 24), name="context")
    mha = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8, value_dim=12)
    # Keras' fused attention path needs value_dim == key_dim under JAX; the
    # scores path computes the same attention with plain einsums.
    x, _ = mha(q, kv, return_attention_scores=True)
    x = keras.layers.LayerNormalization()(x + q)
    return keras.Model({"query": q, "context": kv}, x)


def gqa():
    inp = keras.Input((8, 32))
    x = keras.layers.GroupQueryAttention(
        head_dim=8, num_query_heads=4, num_key_value_heads=2
    )(inp, inp)
    return keras.Model(inp, keras.layers.LayerNormalization()(x + inp))


def masked_embedding():
    inp = keras.Input((8,), dtype="int32")
    x = keras.layers.Embedding(256, 16, mask_zero=True)(inp)
    x = keras.layers.Dense(32, activation="relu")(x)
    x = keras.layers.Dense(16)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inp, keras.layers.Dense(4)(x))


def sequential_dropout():
    return keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(32),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(4),
        ]
    )


def moe_block():
    """One Mixtral sparse-MoE block (4 experts, top 2) between Dense and
    LayerNorm: experts split across devices or inside each expert."""
    from keras_hub.src.models.mixtral.mixtral_decoder import (
        MixtralSparseMoeBlock,
    )

    inp = keras.Input((8, 16))
    x = keras.layers.Dense(16)(inp)
    h = keras.layers.LayerNormalization()(x)
    y, _ = MixtralSparseMoeBlock(
        hidden_dim=16, intermediate_dim=32, num_experts=4, top_k=2
    )(h)
    return keras.Model(inp, x + y)


# Forces the split inside each expert (ffn dim: gate/up column, down row).
INSIDE_EXPERTS = {
    r".*expert_feedforward_(gate|intermediate)_dense": (None, None, "model"),
    r".*expert_feedforward_output_dense": (None, "model", None),
}


def _hub(cls_name, **config):
    def build():
        import keras_hub

        return getattr(keras_hub.models, cls_name)(**config)

    build.__name__ = cls_name
    return build


def _lm(backbone_cls, lm_cls, **config):
    def build():
        import keras_hub

        backbone = getattr(keras_hub.models, backbone_cls)(**config)
        return getattr(keras_hub.models, lm_cls)(backbone, preprocessor=None)

    build.__name__ = lm_cls
    return build


V = 256
H = dict(num_layers=2, hidden_dim=32, intermediate_dim=64)
GQA = dict(vocabulary_size=V, num_query_heads=4, num_key_value_heads=2, **H)


def _float_inputs(*shape):
    def make(batch, seed=0):
        return (
            np.random.RandomState(seed).randn(batch, *shape).astype("float32")
        )

    return make


def _tokens(segments=False, seq=8):
    def make(batch, seed=0):
        rng = np.random.RandomState(seed)
        x = {
            "token_ids": rng.randint(1, V, (batch, seq)).astype("int32"),
            "padding_mask": np.ones((batch, seq), "int32"),
        }
        x["padding_mask"][0, -2:] = 0
        if segments:
            x["segment_ids"] = np.zeros((batch, seq), "int32")
        return x

    return make


def _ids(seq):
    def make(batch, seed=0):
        ids = np.random.RandomState(seed).randint(0, V, (batch, seq))
        ids[:, -2:] = 0  # masked padding
        return ids.astype("int32")

    return make


def _t5_inputs(batch, seed=0):
    rng = np.random.RandomState(seed)
    return {
        "encoder_token_ids": rng.randint(1, V, (batch, 8)).astype("int32"),
        "encoder_padding_mask": np.ones((batch, 8), "int32"),
        "decoder_token_ids": rng.randint(1, V, (batch, 8)).astype("int32"),
        "decoder_padding_mask": np.ones((batch, 8), "int32"),
    }


def _multi_io_inputs(batch, seed=0):
    rng = np.random.RandomState(seed)
    return {
        "a": rng.randn(batch, 16).astype("float32"),
        "b": rng.randn(batch, 8).astype("float32"),
    }


def _mha_inputs(batch, seed=0):
    rng = np.random.RandomState(seed)
    return {
        "query": rng.randn(batch, 8, 16).astype("float32"),
        "context": rng.randn(batch, 6, 24).astype("float32"),
    }


@dataclasses.dataclass
class Case:
    build: object
    inputs: object
    sizes: tuple = (2, 4)  # plan checks
    fit_sizes: tuple = (2,)  # forward + fit checks (time-bounded suite)
    policy: str | None = None
    expect_split: bool = True
    ftol: float = 1e-5
    wtol: float = 1e-4
    lm: bool = False  # logits out: token-id targets, cross-entropy


CASES = {
    "residual-subclassed": Case(residual_mlp, _float_inputs(16)),
    "own-weights-layer": Case(own_weights, _float_inputs(16)),
    "shared-layer": Case(shared_layer, _float_inputs(16)),
    "multi-io-dict": Case(multi_io, _multi_io_inputs, fit_sizes=(2, 4)),
    "conv1d-bn-pool": Case(conv1d, _float_inputs(16, 4), fit_sizes=()),
    "conv2d-bn-pool": Case(conv2d, _float_inputs(8, 8, 3)),
    "lstm-gru": Case(recurrent, _float_inputs(8, 8)),
    "dense-3d": Case(dense_3d, _float_inputs(8, 16)),
    "einsum-bias-axes": Case(einsum_bias, _float_inputs(8, 16)),
    "mha-cross": Case(mha_cross, _mha_inputs),
    "gqa": Case(gqa, _float_inputs(8, 32), sizes=(2,)),
    "embedding-mask-zero": Case(masked_embedding, _ids(8)),
    "sequential-dropout": Case(
        sequential_dropout, _float_inputs(16), fit_sizes=()
    ),
    "mixed-bfloat16": Case(
        sequential_dropout,
        _float_inputs(16),
        policy="mixed_bfloat16",
        ftol=1e-2,
        wtol=1e-2,
    ),
    "distilbert": Case(
        _hub("DistilBertBackbone", vocabulary_size=V, num_heads=4, **H),
        _tokens(),
        fit_sizes=(),
    ),
    "albert": Case(
        _hub(
            "AlbertBackbone",
            vocabulary_size=V,
            num_heads=4,
            embedding_dim=16,
            num_groups=1,
            num_inner_repetitions=1,
            **H,
        ),
        _tokens(segments=True),
        fit_sizes=(),
    ),
    "electra": Case(
        _hub(
            "ElectraBackbone", vocab_size=V, num_heads=4, embedding_dim=16, **H
        ),
        _tokens(segments=True),
        fit_sizes=(),
    ),
    "deberta-v3": Case(
        _hub(
            "DebertaV3Backbone",
            vocabulary_size=V,
            num_heads=4,
            bucket_size=8,
            **H,
        ),
        _tokens(),
    ),
    "mistral": Case(
        _hub("MistralBackbone", **GQA), _tokens(), sizes=(2,), fit_sizes=()
    ),
    "qwen": Case(
        _hub("QwenBackbone", **GQA), _tokens(), sizes=(2,), fit_sizes=()
    ),
    "phi3": Case(
        _hub("Phi3Backbone", **GQA), _tokens(), sizes=(2,), fit_sizes=()
    ),
    "falcon": Case(
        _hub("FalconBackbone", vocabulary_size=V, num_attention_heads=4, **H),
        _tokens(),
    ),
    "bloom": Case(
        _hub("BloomBackbone", vocabulary_size=V, num_heads=4, **H),
        _tokens(),
        fit_sizes=(),
    ),
    "gpt-neox": Case(
        _hub("GPTNeoXBackbone", vocabulary_size=V, num_heads=4, **H),
        _tokens(),
    ),
    "t5": Case(
        _hub("T5Backbone", vocabulary_size=V, num_heads=4, dropout=0.0, **H),
        _t5_inputs,
    ),
    "gpt2-causal-lm": Case(
        _lm(
            "GPT2Backbone",
            "GPT2CausalLM",
            vocabulary_size=V,
            num_heads=4,
            max_sequence_length=16,
            **H,
        ),
        _tokens(),
        lm=True,
        fit_sizes=(),
    ),
    "llama-causal-lm": Case(
        _lm("LlamaBackbone", "LlamaCausalLM", **GQA),
        _tokens(),
        sizes=(2,),
        lm=True,
    ),
    # Issue 12 rows (plans here; forward + Adam in tests/test_coverage.py).
    "mixtral-moe": Case(cov.mixtral, _tokens(), fit_sizes=()),
    "qwen3-moe": Case(cov.qwen3_moe, _tokens(), fit_sizes=()),
    "own-weights-mlp": Case(cov.own_weights_mlp, _float_inputs(8, 32)),
    "gemma3": Case(cov.gemma3, _tokens(), fit_sizes=()),
    "qwen3-2-kv-heads": Case(cov.qwen3_kv2, _tokens(), fit_sizes=()),
    "moe-block": Case(moe_block, _float_inputs(8, 16), fit_sizes=()),
    "opt-12-heads": Case(
        cov.opt_heads(12), _tokens(), sizes=(2, 4, 8), fit_sizes=()
    ),
}
