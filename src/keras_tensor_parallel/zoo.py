"""Old name of the model catalogue, kept while tests owned by others still
import it: use `keras_tensor_parallel.catalogue` in new code.

`zoo.opt(**overrides)` builds the catalogue's `opt-125m` with some config
fields replaced (likewise gpt2, bert, roberta, llama, gemma);
`zoo.build_pair` is `verify.build_pair`.
"""

from __future__ import annotations

import functools

from keras_tensor_parallel.catalogue import (
    CATALOGUE as ZOO,
)
from keras_tensor_parallel.catalogue import (
    get,
    seed_attention,
    seed_einsum,
    seed_embedding,
    seed_mlp,
)
from keras_tensor_parallel.catalogue.spec import TokenInputs

__all__ = [
    "ZOO",
    "bert",
    "build_pair",
    "gemma",
    "get",
    "gpt2",
    "llama",
    "opt",
    "roberta",
    "seed_attention",
    "seed_einsum",
    "seed_embedding",
    "seed_mlp",
]


def _family(name: str):
    def build(**overrides):
        return get(name).variant(**overrides).build()

    build.__name__ = name
    return build


opt = _family("opt-125m")
gpt2 = _family("gpt2")
bert = _family("bert-base")
roberta = _family("roberta-base")
llama = _family("llama-small")
gemma = _family("gemma-small")


def build_pair(build, *, seed: int = 0):
    """`verify.build_pair` (reference, candidate, weights)."""
    from keras_tensor_parallel.verify.pairs import build_pair as pair

    return pair(build, seed=seed)


def _token_inputs(vocab: int, with_segments: bool = False):
    return functools.partial(
        _tokens, vocab=vocab, maker=TokenInputs(segments=with_segments)
    )


def _tokens(batch: int = 2, seq: int = 16, seed: int = 0, *, vocab, maker):
    return maker(batch, seq, seed, vocab)
