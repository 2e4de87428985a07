"""Causal-LM heads and inputs for the catalogue's token backbones."""

from __future__ import annotations

import numpy as np

_CAUSAL_LM = {
    "OPTBackbone": "OPTCausalLM",
    "GPT2Backbone": "GPT2CausalLM",
    "LlamaBackbone": "LlamaCausalLM",
    "GemmaBackbone": "GemmaCausalLM",
}


def causal_lm(backbone):
    """A model whose output is next-token logits over the vocabulary.

    KerasHub backbones with a CausalLM task get that task (no
    preprocessor); any other backbone with a reversible `token_embedding`
    gets a functional head tying the embedding.

    Example:

    ```python
    lm = causal_lm(catalogue.get("opt-125m:tiny").build())
    ```
    """
    import keras
    import keras_hub

    task = _CAUSAL_LM.get(type(backbone).__name__)
    if task is not None:
        return getattr(keras_hub.models, task)(
            backbone=backbone, preprocessor=None
        )
    embedding = getattr(backbone, "token_embedding", None)
    if embedding is None:
        raise ValueError(
            "causal_lm needs a backbone with a `token_embedding`. "
            f"Received: {type(backbone).__name__}"
        )
    outputs = embedding(backbone(backbone.input), reverse=True)
    return keras.Model(backbone.input, outputs, name="causal_lm")


def lm_inputs(token_ids) -> dict:
    """Backbone inputs for a batch of token ids (no padding).

    Example:

    ```python
    x = lm_inputs([[1, 2, 3]])
    ```
    """
    token_ids = np.asarray(token_ids, dtype="int32")
    return {
        "token_ids": token_ids,
        "padding_mask": np.ones_like(token_ids),
    }


def lm_builder(spec):
    """A no-argument builder of `spec` as a logits model (a head added to
    a backbone).

    Example:

    ```python
    build = lm_builder(catalogue.get("gpt2:tiny"))
    logits = build()(lm_inputs([[1, 2, 3]]))
    ```
    """
    if spec.lm == "backbone":
        return lambda: causal_lm(spec.build())
    if spec.lm == "logits":
        return spec.build
    raise ValueError(
        f"{spec.name!r} is not a causal LM: train one of opt-125m, gpt2, "
        "llama-small, gemma-small, a preset of those families or a saved "
        f"causal LM. Received: {spec.name!r}"
    )
