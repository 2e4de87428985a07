"""MODEL arguments: a catalogue name, `NAME:tiny`, a local KerasHub preset
directory or a saved `.keras` file, each resolved to a `ModelSpec`."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from keras_tensor_parallel.catalogue.entries import CATALOGUE
from keras_tensor_parallel.catalogue.spec import ModelSpec


def get(name: str) -> ModelSpec:
    """The catalogue entry `name` (`NAME:tiny` for its debug flavour).

    Raises:
        ValueError: naming the built-in models, for an unknown name.

    Example:

    ```python
    spec = get("gpt2:tiny")
    assert spec.vocab == 1001
    ```
    """
    base, _, flavour = name.partition(":")
    if base in CATALOGUE and flavour in ("", "tiny"):
        spec = CATALOGUE[base]
        return spec.tiny() if flavour else spec
    raise ValueError(
        f"Unknown model {name!r}. Built-in models: {sorted(CATALOGUE)} "
        f"(NAME:tiny for a tiny config). Received: {name!r}"
    )


def resolve(name: str) -> ModelSpec:
    """The spec for a catalogue name, a preset directory or a .keras file.

    Raises:
        ValueError: saying what to give instead, when `name` is none of
            those or cannot be loaded.

    Example:

    ```python
    spec = resolve("seed-mlp")
    y = spec.build()(spec.inputs(batch=2))
    ```
    """
    if name.partition(":")[0] in CATALOGUE:
        return get(name)
    if os.path.isdir(name):
        return _from_preset(name)
    if name.endswith(".keras"):
        if not os.path.isfile(name):
            raise ValueError(
                f"No such .keras file: {name!r}. Give the path of a model "
                "saved with `model.save('model.keras')`."
            )
        return _from_file(name)
    raise ValueError(
        f"Unknown model {name!r}: give a built-in name ("
        + ", ".join(CATALOGUE)
        + "), a local KerasHub preset directory, or a .keras file."
    )


@dataclasses.dataclass(frozen=True)
class _Loader:
    """Loads a model from disk; the same weights on every call."""

    path: str
    kind: str

    def __call__(self):
        if self.kind == "preset":
            import keras_hub

            return keras_hub.models.Backbone.from_preset(self.path)
        import keras

        return keras.saving.load_model(self.path, compile=False)


def _from_preset(path: str) -> ModelSpec:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"{path!r} is a directory but not a KerasHub preset (no "
            "config.json): give a directory written by "
            "`backbone.save_to_preset(dir)`."
        )
    return _from_loader(_Loader(path, "preset"), "KerasHub preset")


def _from_file(path: str) -> ModelSpec:
    return _from_loader(_Loader(path, "file"), "saved .keras model")


def _from_loader(loader: _Loader, kind: str) -> ModelSpec:
    try:
        model = loader()
    except Exception as e:  # noqa: BLE001 - reported to the user in one line
        raise ValueError(
            f"Could not load {kind} {loader.path!r}: {type(e).__name__}: {e}"
        ) from e
    vocab = _vocabulary(model)
    return ModelSpec(
        name=loader.path,
        family=loader,
        input_maker=InputsLike(_input_struct(model)),
        description=f"{kind} {type(model).__name__} "
        f"({model.count_params():,} params)",
        lm=_lm_kind(model, vocab),
        vocab=vocab,
        source=loader.kind,
    )


def _vocabulary(model) -> int:
    for owner in (model, getattr(model, "backbone", None)):
        vocab = getattr(owner, "vocabulary_size", 0)
        if vocab:
            return int(vocab)
    return 0


def _lm_kind(model, vocab: int) -> str:
    """`"backbone"`, `"logits"` or `""` (see `ModelSpec.lm`)."""
    struct = _input_struct(model)
    names = list(struct) if isinstance(struct, dict) else []
    if not vocab or "token_ids" not in names or "segment_ids" in names:
        return ""
    out = getattr(model, "output", None)
    shape = tuple(getattr(out, "shape", ()))
    if len(shape) == 3 and shape[-1] == vocab:
        return "logits"  # a CausalLM task: next-token logits already
    return "backbone" if hasattr(model, "token_embedding") else ""


def _input_struct(model):
    # Not `a or b`: a single-input model's structure is one KerasTensor,
    # which has no truth value.
    struct = getattr(model, "_inputs_struct", None)
    return model.inputs if struct is None else struct


class InputsLike:
    """Random inputs matching a model's input structure: valid token ids,
    an all-ones padding mask, zero segment ids, normal floats."""

    def __init__(self, struct):
        self.struct = struct

    def __call__(self, batch: int, seq: int, seed: int, vocab: int):
        rng = np.random.RandomState(seed)
        struct = self.struct
        if isinstance(struct, dict):
            return {
                k: _one(t, batch, seq, rng, vocab, k) for k, t in struct.items()
            }
        if isinstance(struct, (list, tuple)):
            if len(struct) == 1:
                return _one(struct[0], batch, seq, rng, vocab)
            return [_one(t, batch, seq, rng, vocab) for t in struct]
        return _one(struct, batch, seq, rng, vocab)


def _one(t, batch, seq, rng, vocab, name=""):
    shape = [batch] + [d if d is not None else seq for d in t.shape[1:]]
    if "int" not in str(t.dtype):
        return rng.randn(*shape).astype(str(t.dtype))
    if name == "padding_mask":
        return np.ones(shape, "int32")
    if name == "segment_ids":
        return np.zeros(shape, "int32")
    return rng.randint(0, vocab if vocab > 0 else 2, shape).astype("int32")
