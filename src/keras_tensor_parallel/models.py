"""Resolve a MODEL argument: a zoo name, a KerasHub preset dir, a .keras file.

The CLI and the checks need a *builder* (called once per side of a
comparison, same weights every time) and a way to make matching inputs;
`resolve` gives both as a `ModelSpec`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

# Above this many parameters the training-stability check and `train` use a
# small config of the same family: a full OPT-125M step takes seconds on CPU.
LARGE_PARAMS = 30_000_000

# Small configs of the zoo's families: same layer classes, same vocabulary.
_SMALL = {
    "opt-125m": dict(num_layers=2, num_heads=4, hidden_dim=128,
                     intermediate_dim=512, max_sequence_length=256),
    "gpt2": dict(num_layers=2, num_heads=4, hidden_dim=128,
                 intermediate_dim=512, max_sequence_length=256),
    "llama-small": dict(num_layers=2, num_query_heads=4,
                        num_key_value_heads=2, hidden_dim=128,
                        intermediate_dim=344),
    "gemma-small": dict(num_layers=2, num_query_heads=4,
                        num_key_value_heads=1, hidden_dim=128,
                        intermediate_dim=512, head_dim=32),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model the CLI can build, feed and describe.

    Attributes:
        name: What the user typed (zoo name or path).
        source: `"zoo"`, `"preset"` or `"file"`.
        build: Builds the model; every call gives the same weights once the
            caller has set the random seed (zoo) or loads them (files).
        inputs: `inputs(batch, seq, seed)` -> a batch of model inputs.
        causal_lm: Whether the model is a token backbone usable as a causal
            LM (token ids in, hidden states out, tied token embedding).
        vocab: Vocabulary size (0 when not a token model).
        description: One line for reports.
        small: A builder of a smaller config of the same family, or `None`.
        small_description: One line describing `small`.
    """

    name: str
    source: str
    build: Callable
    inputs: Callable
    causal_lm: bool = False
    vocab: int = 0
    description: str = ""
    small: Callable | None = None
    small_description: str = ""


def resolve(name: str) -> ModelSpec:
    """The `ModelSpec` for a zoo name, a preset directory or a .keras file.

    Raises:
        ValueError: with what to do, when `name` is none of those.

    Example:

    ```python
    spec = resolve("seed-mlp")
    model = spec.build()
    y = model(spec.inputs(2, 0, 0))
    ```
    """
    from keras_tensor_parallel import zoo

    if name in zoo.ZOO:
        return _from_zoo(zoo.ZOO[name])
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
        + ", ".join(zoo.ZOO)
        + "), a local KerasHub preset directory, or a .keras file."
    )


def _from_zoo(entry) -> ModelSpec:
    from keras_tensor_parallel import zoo

    small = None
    small_description = ""
    if entry.name in _SMALL:
        kwargs = _SMALL[entry.name]
        family = entry.build

        def small():
            return family(**kwargs)

        small_description = (
            f"small {entry.name}-style config ("
            + ", ".join(f"{k}={v}" for k, v in kwargs.items())
            + f", vocabulary {entry.vocab})"
        )
    assert entry.name in zoo.ZOO
    return ModelSpec(
        name=entry.name,
        source="zoo",
        build=entry.build,
        inputs=entry.inputs,
        causal_lm=entry.causal_lm,
        vocab=entry.vocab,
        description=entry.description,
        small=small,
        small_description=small_description,
    )


def _from_preset(path: str) -> ModelSpec:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"{path!r} is a directory but not a KerasHub preset (no "
            "config.json): give a directory written by "
            "`backbone.save_to_preset(dir)`."
        )
    import keras_hub

    def build():
        return keras_hub.models.Backbone.from_preset(path)

    return _from_builder(path, "preset", build, "KerasHub preset")


def _from_file(path: str) -> ModelSpec:
    import keras

    def build():
        return keras.saving.load_model(path, compile=False)

    return _from_builder(path, "file", build, "saved .keras model")


def _from_builder(name, source, build, kind) -> ModelSpec:
    try:
        model = build()
    except Exception as e:  # noqa: BLE001 - reported to the user in one line
        raise ValueError(
            f"Could not load {kind} {name!r}: {type(e).__name__}: {e}"
        ) from e
    vocab = int(getattr(model, "vocabulary_size", 0) or 0)
    names = _input_names(model)
    token = vocab > 0 and "token_ids" in names
    causal = token and hasattr(model, "token_embedding")
    causal = causal and "segment_ids" not in names
    return ModelSpec(
        name=name,
        source=source,
        build=build,
        inputs=_inputs_like(model, vocab),
        causal_lm=causal,
        vocab=vocab,
        description=f"{kind} {type(model).__name__} "
        f"({model.count_params():,} params)",
    )


def _input_struct(model):
    # Not `a or b`: a single-input model's structure is one KerasTensor,
    # which has no truth value.
    struct = getattr(model, "_inputs_struct", None)
    return model.inputs if struct is None else struct


def _input_names(model) -> list[str]:
    inputs = _input_struct(model)
    if isinstance(inputs, dict):
        return list(inputs)
    return []


def _inputs_like(model, vocab: int):
    """A maker of random inputs matching `model.inputs`."""
    struct = _input_struct(model)

    def one(t, batch, seq, rng, name=""):
        shape = [batch] + [d if d is not None else seq for d in t.shape[1:]]
        if "int" in str(t.dtype):
            if name == "padding_mask":
                return np.ones(shape, "int32")
            if name == "segment_ids":
                return np.zeros(shape, "int32")
            high = vocab if vocab > 0 else 2
            return rng.randint(0, high, shape).astype("int32")
        return rng.randn(*shape).astype(str(t.dtype))

    def make(batch: int = 2, seq: int = 16, seed: int = 0):
        rng = np.random.RandomState(seed)
        if isinstance(struct, dict):
            return {k: one(t, batch, seq, rng, k) for k, t in struct.items()}
        if isinstance(struct, (list, tuple)):
            if len(struct) == 1:
                return one(struct[0], batch, seq, rng)
            return [one(t, batch, seq, rng) for t in struct]
        return one(struct, batch, seq, rng)

    return make


def count_params(build: Callable) -> int:
    """Parameters of the model `build` makes (builds it once)."""
    return int(build().count_params())


def pick_builder(spec: ModelSpec, size: str) -> tuple[Callable, str]:
    """`(build, description)` for `size` in auto/full/small: auto is small
    when the model has over `LARGE_PARAMS` parameters and a small config
    of its family exists."""
    if size == "small" and spec.small is None:
        raise ValueError(
            f"No small config of {spec.name!r}; use the full model. "
            f"Received: size={size!r}"
        )
    if size == "auto" and spec.small is not None:
        params = count_params(spec.build)
        size = "small" if params > LARGE_PARAMS else "full"
    if size == "small":
        return spec.small, spec.small_description
    return spec.build, f"{spec.name} itself ({spec.description})"


def read_text(path: str | None, max_bytes: int = 20_000_000) -> bytes:
    """Bytes of a file, or of the files under a directory (sorted); the
    Python standard library sources when `path` is None."""
    from keras_tensor_parallel.verify import data

    if path is None:
        return data.stdlib_corpus(max_bytes=max_bytes)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read(max_bytes)
    if not os.path.isdir(path):
        raise ValueError(f"--data: no such file or directory: {path!r}")
    chunks, total = [], 0
    for root, _, names in sorted(os.walk(path)):
        for n in sorted(names):
            with open(os.path.join(root, n), "rb") as f:
                chunks.append(f.read(max_bytes - total))
            total += len(chunks[-1])
            if total >= max_bytes:
                return b"".join(chunks)
    return b"".join(chunks)


def train_lm(
    spec: ModelSpec,
    world_size: int,
    *,
    steps: int,
    data_path: str | None,
    batch_size: int,
    seq_len: int,
    learning_rate: float,
    val_every: int | None,
    out_dir: str,
    model_size: str = "auto",
    seed: int = 0,
) -> dict:
    """Train `spec` as a byte-level causal LM with TP; Keras progress bar,
    validation every `val_every` steps, a .keras checkpoint and a loss PNG
    under `out_dir`. Returns a summary dict (also written as JSON)."""
    import json

    import keras

    from keras_tensor_parallel.model import TensorParallelKeras
    from keras_tensor_parallel.verify import data, plots, training

    if not spec.causal_lm:
        raise ValueError(
            f"{spec.name!r} is not a causal LM backbone: train one of "
            "opt-125m, gpt2, llama-small, gemma-small (or a preset of "
            "those families)."
        )
    build, description = pick_builder(spec, model_size)
    text = read_text(data_path)
    cut = int(len(text) * 0.95)
    if cut < seq_len + 2 or len(text) - cut < seq_len + 2:
        raise ValueError(
            f"--data has {len(text)} bytes: need at least "
            f"{40 * (seq_len + 2)} for training and validation windows."
        )
    x, y = data.lm_batches(
        text[:cut], batch_size=batch_size, seq_len=seq_len, steps=steps,
        seed=seed,
    )  # fmt: skip
    vx, vy = data.lm_batches(
        text[cut:], batch_size=batch_size, seq_len=seq_len, steps=4,
        seed=seed + 1,
    )  # fmt: skip
    keras.utils.set_random_seed(seed)
    lm = training.causal_lm(build())
    tp = TensorParallelKeras(lm, world_size=world_size)
    tp.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    val_every = val_every or max(1, steps // 5)
    epochs = -(-steps // val_every)
    recorder = _BatchLosses()
    history = tp.fit(
        training.lm_inputs(x),
        y,
        batch_size=batch_size,
        epochs=epochs,
        steps_per_epoch=val_every,
        validation_data=(training.lm_inputs(vx), vy),
        shuffle=False,
        callbacks=[recorder],
        verbose=1 if steps > 1 else 2,
    )
    losses = recorder.losses[:steps]
    val = [float(v) for v in history.history.get("val_loss", [])]
    val_steps = [min(steps, (i + 1) * val_every) for i in range(len(val))]
    os.makedirs(out_dir, exist_ok=True)
    checkpoint = os.path.join(out_dir, "model.keras")
    tp.save(checkpoint)
    plot = plots.train_curve(
        os.path.join(out_dir, "loss.png"),
        losses,
        val_steps,
        val,
        title=f"keras-tp train {spec.name}, world size {world_size}: "
        f"byte-level LM\n{description}",
    )
    summary = {
        "model": description,
        "world_size": world_size,
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "data": data_path or "Python standard library sources",
        "losses": losses,
        "val_steps": val_steps,
        "val_losses": val,
        "final_loss": losses[-1] if losses else float("nan"),
        "final_val_loss": val[-1] if val else float("nan"),
        "checkpoint": checkpoint,
        "plot": plot,
    }
    with open(os.path.join(out_dir, "train.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _batch_losses_class():
    import keras

    class BatchLosses(keras.callbacks.Callback):
        """Per-step losses from Keras's running epoch mean."""

        def __init__(self):
            super().__init__()
            self.losses: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._mean, self._k = 0.0, 0

        def on_train_batch_end(self, batch, logs=None):
            mean = float((logs or {}).get("loss", float("nan")))
            self._k += 1
            self.losses.append(mean * self._k - self._mean * (self._k - 1))
            self._mean = mean

    return BatchLosses


def _BatchLosses():  # noqa: N802 - a class made lazily (keras import)
    return _batch_losses_class()()
