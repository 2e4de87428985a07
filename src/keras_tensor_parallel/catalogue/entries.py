"""The catalogue: every built-in model, with its full config and its tiny
debug flavour (as torchtitan's `debugmodel`). Tests, the CLI and the
benchmarks take their models from here instead of copying configs."""

from __future__ import annotations

from keras_tensor_parallel.catalogue import builders
from keras_tensor_parallel.catalogue.spec import (
    DenseInputs,
    IdInputs,
    ModelSpec,
    TokenInputs,
)

_BASE = dict(num_layers=12, hidden_dim=768, intermediate_dim=3072)

# Two blocks keep every Megatron region of a block (and the count of
# collectives per block) while a step compiles in seconds on CPU.
_TINY = dict(num_layers=2, hidden_dim=64, intermediate_dim=128)
_TINY_MHA = dict(_TINY, num_heads=4, max_sequence_length=128)


def _hub(name, class_name, description, *, config, tiny, lm="", **kw):
    return ModelSpec(
        name=name,
        family=builders.HubBackbone(class_name),
        input_maker=TokenInputs(segments=kw.pop("segments", False)),
        description=description,
        config=config,
        tiny_config=tiny,
        lm=lm,
        vocab=config["vocabulary_size"],
    )


def _seed(name, family, input_maker, description, vocab=0):
    return ModelSpec(
        name=name,
        family=family,
        input_maker=input_maker,
        description=description,
        tiny_config={},  # already tiny
        vocab=vocab,
    )


ENTRIES = (
    _hub(
        "opt-125m", "OPTBackbone",
        "OPT-125M architecture (KerasHub OPTBackbone, 125,237,760 params)",
        config=dict(_BASE, vocabulary_size=50272, num_heads=12,
                    max_sequence_length=2048, dropout=0.0),
        tiny=dict(_TINY_MHA, vocabulary_size=1000),
        lm="backbone",
    ),
    _hub(
        "gpt2", "GPT2Backbone",
        "GPT-2 small architecture (vocab 50257, odd)",
        config=dict(_BASE, vocabulary_size=50257, num_heads=12,
                    max_sequence_length=1024, dropout=0.0),
        # Odd like the real one: the padded vocab-parallel table is covered.
        tiny=dict(_TINY_MHA, vocabulary_size=1001),
        lm="backbone",
    ),
    _hub(
        "bert-base", "BertBackbone", "BERT base architecture",
        config=dict(_BASE, vocabulary_size=30522, num_heads=12,
                    max_sequence_length=512),
        tiny=dict(_TINY_MHA, vocabulary_size=1000),
        segments=True,
    ),
    _hub(
        "roberta-base", "RobertaBackbone", "RoBERTa base architecture",
        config=dict(_BASE, vocabulary_size=50265, num_heads=12,
                    max_sequence_length=512),
        tiny=dict(_TINY_MHA, vocabulary_size=1000),
    ),
    _hub(
        "llama-small", "LlamaBackbone",
        "small Llama-style config (GQA 8q/4kv, SwiGLU, RMSNorm)",
        config=dict(vocabulary_size=32000, num_layers=4, num_query_heads=8,
                    num_key_value_heads=4, hidden_dim=512,
                    intermediate_dim=1376),
        tiny=dict(_TINY, vocabulary_size=1000, num_query_heads=8,
                  num_key_value_heads=4),
        lm="backbone",
    ),
    _hub(
        "gemma-small", "GemmaBackbone",
        "small Gemma-style config (multi-query attention, GeGLU)",
        config=dict(vocabulary_size=32000, num_layers=4, num_query_heads=8,
                    num_key_value_heads=1, hidden_dim=512,
                    intermediate_dim=2048, head_dim=64),
        tiny=dict(_TINY, vocabulary_size=1000, num_query_heads=4,
                  num_key_value_heads=1, head_dim=16),
        lm="backbone",
    ),
    _seed("seed-mlp", builders.seed_mlp, DenseInputs((64,)),
          "the seeds' MLP 64-128-256-128-32"),
    _seed("seed-attention", builders.seed_attention, DenseInputs((32, 64)),
          "the seeds' self-attention model"),
    _seed("seed-einsum", builders.seed_einsum, DenseInputs((48,)),
          "the seeds' EinsumDense model"),
    _seed("seed-embedding", builders.seed_embedding, IdInputs(16),
          "the seeds' Embedding model (vocab 1000)", vocab=1000),
)  # fmt: skip

CATALOGUE: dict[str, ModelSpec] = {spec.name: spec for spec in ENTRIES}
