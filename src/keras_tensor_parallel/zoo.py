"""Built-in model architectures, built from config with random weights.

Used by the CLI (`keras-tp plan opt-125m`), the tests and the benchmarks, so
all of them exercise the same models. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """A named architecture.

    Attributes:
        name: CLI name.
        build: Builds the model (random weights, seeded by the caller).
        inputs: `inputs(batch, seq, seed)` -> a batch of model inputs.
        causal_lm: Whether `build` gives a backbone usable as a causal LM
            (token ids in, hidden states out; logits via its token embedding).
        description: One line for `--help`.
    """

    name: str
    build: Callable[[], keras.Model]
    inputs: Callable[..., object]
    causal_lm: bool = False
    vocab: int = 0
    description: str = ""


def _token_inputs(vocab: int, with_segments: bool = False):
    def make(batch: int = 2, seq: int = 16, seed: int = 0):
        rng = np.random.RandomState(seed)
        x = {
            "token_ids": rng.randint(0, vocab, (batch, seq)).astype("int32"),
            "padding_mask": np.ones((batch, seq), "int32"),
        }
        if with_segments:
            x["segment_ids"] = np.zeros((batch, seq), "int32")
        return x

    return make


def _dense_inputs(shape):
    def make(batch: int = 8, seq: int = 0, seed: int = 0):
        rng = np.random.RandomState(seed)
        return rng.randn(batch, *shape).astype("float32")

    return make


def _int_inputs(length: int, vocab: int):
    def make(batch: int = 8, seq: int = 0, seed: int = 0):
        rng = np.random.RandomState(seed)
        return rng.randint(0, vocab, (batch, length)).astype("int32")

    return make


# The seeds' four small models ---------------------------------------------


def seed_mlp() -> keras.Model:
    """MLP 64 -> 128 -> 256 -> 128 -> 32 (shared/seeds/001)."""
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(32),
        ],
        name="seed_mlp",
    )


def seed_attention() -> keras.Model:
    """Self-attention (8 heads of 8) + feed-forward 256, head to 16."""
    inp = keras.Input((32, 64))
    x = keras.layers.MultiHeadAttention(num_heads=8, key_dim=8)(inp, inp)
    x = keras.layers.LayerNormalization()(x + inp)
    h = keras.layers.Dense(256, activation="relu")(x)
    h = keras.layers.Dense(64)(h)
    x = keras.layers.LayerNormalization()(x + h)
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(16)(x)
    return keras.Model(inp, out, name="seed_attention")


def seed_einsum() -> keras.Model:
    """EinsumDense 48 -> 96 -> 64 -> 24."""
    inp = keras.Input((48,))
    x = keras.layers.EinsumDense("ab,bc->ac", 96, bias_axes="c")(inp)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.EinsumDense("ab,bc->ac", 64, bias_axes="c")(x)
    x = keras.layers.Activation("relu")(x)
    out = keras.layers.EinsumDense("ab,bc->ac", 24, bias_axes="c")(x)
    return keras.Model(inp, out, name="seed_einsum")


def seed_embedding() -> keras.Model:
    """Embedding(1000, 64) -> mean pool -> Dense 32 -> Dense 5."""
    return keras.Sequential(
        [
            keras.Input((16,), dtype="int32"),
            keras.layers.Embedding(1000, 64),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(5),
        ],
        name="seed_embedding",
    )


# KerasHub backbones -------------------------------------------------------


def _hub_backbone(class_name: str, doc: str, **defaults):
    """A builder for `keras_hub.models.<class_name>` with default config;
    keyword arguments override single fields (small configs in tests)."""

    def build(**overrides):
        import keras_hub

        return getattr(keras_hub.models, class_name)(
            **{**defaults, **overrides}
        )

    build.__name__ = class_name
    build.__doc__ = doc
    return build


_BASE = dict(num_layers=12, hidden_dim=768, intermediate_dim=3072)

opt = _hub_backbone(
    "OPTBackbone",
    "KerasHub OPTBackbone; defaults are the OPT-125M architecture.",
    vocabulary_size=50272,
    num_heads=12,
    max_sequence_length=2048,
    dropout=0.0,
    **_BASE,
)
gpt2 = _hub_backbone(
    "GPT2Backbone",
    "KerasHub GPT2Backbone; defaults are GPT-2 small (vocab 50257).",
    vocabulary_size=50257,
    num_heads=12,
    max_sequence_length=1024,
    dropout=0.0,
    **_BASE,
)
bert = _hub_backbone(
    "BertBackbone",
    "KerasHub BertBackbone; defaults are BERT base.",
    vocabulary_size=30522,
    num_heads=12,
    max_sequence_length=512,
    **_BASE,
)
roberta = _hub_backbone(
    "RobertaBackbone",
    "KerasHub RobertaBackbone; defaults are RoBERTa base.",
    vocabulary_size=50265,
    num_heads=12,
    max_sequence_length=512,
    **_BASE,
)
llama = _hub_backbone(
    "LlamaBackbone",
    "A small Llama-style config (GQA, SwiGLU, RMSNorm, rotary).",
    vocabulary_size=32000,
    num_layers=4,
    num_query_heads=8,
    num_key_value_heads=4,
    hidden_dim=512,
    intermediate_dim=1376,
)
gemma = _hub_backbone(
    "GemmaBackbone",
    "A small Gemma-style config (multi-query attention, GeGLU).",
    vocabulary_size=32000,
    num_layers=4,
    num_query_heads=8,
    num_key_value_heads=1,
    hidden_dim=512,
    intermediate_dim=2048,
    head_dim=64,
)


ZOO: dict[str, ZooEntry] = {
    "opt-125m": ZooEntry(
        "opt-125m",
        opt,
        _token_inputs(50272),
        True,
        50272,
        "OPT-125M architecture (KerasHub OPTBackbone, 125,237,760 params)",
    ),
    "gpt2": ZooEntry(
        "gpt2",
        gpt2,
        _token_inputs(50257),
        True,
        50257,
        "GPT-2 small architecture (vocab 50257, odd)",
    ),
    "bert-base": ZooEntry(
        "bert-base",
        bert,
        _token_inputs(30522, True),
        False,
        30522,
        "BERT base architecture",
    ),
    "roberta-base": ZooEntry(
        "roberta-base",
        roberta,
        _token_inputs(50265),
        False,
        50265,
        "RoBERTa base architecture",
    ),
    "llama-small": ZooEntry(
        "llama-small",
        llama,
        _token_inputs(32000),
        True,
        32000,
        "small Llama-style config (GQA 8q/4kv, SwiGLU, RMSNorm)",
    ),
    "gemma-small": ZooEntry(
        "gemma-small",
        gemma,
        _token_inputs(32000),
        True,
        32000,
        "small Gemma-style config (multi-query attention, GeGLU)",
    ),
    "seed-mlp": ZooEntry(
        "seed-mlp",
        seed_mlp,
        _dense_inputs((64,)),
        False,
        0,
        "the seeds' MLP 64-128-256-128-32",
    ),
    "seed-attention": ZooEntry(
        "seed-attention",
        seed_attention,
        _dense_inputs((32, 64)),
        False,
        0,
        "the seeds' self-attention model",
    ),
    "seed-einsum": ZooEntry(
        "seed-einsum",
        seed_einsum,
        _dense_inputs((48,)),
        False,
        0,
        "the seeds' EinsumDense model",
    ),
    "seed-embedding": ZooEntry(
        "seed-embedding",
        seed_embedding,
        _int_inputs(16, 1000),
        False,
        1000,
        "the seeds' Embedding model (vocab 1000)",
    ),
}


def get(name: str) -> ZooEntry:
    """The zoo entry called `name`."""
    if name not in ZOO:
        raise ValueError(
            f"Unknown model {name!r}. Built-in models: {sorted(ZOO)}. "
            f"Received: {name!r}"
        )
    return ZOO[name]


def build_pair(build: Callable[[], keras.Model], *, seed: int = 0):
    """Two independently built models with identical weights.

    Returns:
        `(reference, candidate, weights)`: the reference stays on one
        device; the candidate is the one to wrap.
    """
    keras.utils.set_random_seed(seed)
    reference = build()
    weights = reference.get_weights()
    candidate = build()
    candidate.set_weights(weights)
    return reference, candidate, weights
