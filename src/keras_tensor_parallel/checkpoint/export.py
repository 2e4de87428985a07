"""Export a sharded checkpoint to a single-device `.keras` file that loads
without this library (`keras-tp export CHECKPOINT OUT`)."""

from __future__ import annotations

import os

import jax
import keras
import numpy as np

from keras_tensor_parallel.checkpoint import state as state_lib
from keras_tensor_parallel.checkpoint import store


def _rebuild(config_json: str | None, where: str):
    if not config_json:
        raise ValueError(
            f"Checkpoint {where!r} has no model config (the model was not "
            "serializable): export needs one. Received: a checkpoint "
            "without model_config"
        )
    try:
        import keras_hub  # noqa: F401 - registers KerasHub classes
    except ImportError:
        pass
    return keras.models.model_from_json(config_json)


def export(checkpoint, out) -> str:
    """Write the model weights of the newest complete checkpoint in
    `checkpoint` as a single-device `.keras` file `out`.

    Values are read back whole on the host, one variable at a time, and
    stripped of vocab padding; the file is written to a temporary name and
    renamed, so `out` is either the previous file or the complete new one.

    Args:
        checkpoint: A checkpoint directory (or one of its `step_` dirs).
        out: The `.keras` file to write.

    Returns:
        The path of the checkpoint exported.

    Example:

    ```python
    export("ckpt", "model.keras")
    model = keras.saving.load_model("model.keras")
    ```
    """
    out = os.fspath(out)
    if not out.endswith(".keras"):
        raise ValueError(
            f"The export target must be a .keras file. Received: out={out!r}"
        )
    path, meta, values = _read(checkpoint)
    model = _rebuild(meta.get("model_config"), path)
    saved = meta["fingerprint"]["variables"]["model"]
    by_key = state_lib.model_keys(model)
    missing = sorted(set(saved) - set(by_key))
    if missing:
        raise ValueError(
            f"The rebuilt model lacks saved variables {missing[:5]}. "
            f"Received: checkpoint {path!r}"
        )
    for key, (shape, _, _) in saved.items():
        index = tuple(slice(0, n) for n in shape)
        by_key[key].assign(np.asarray(values[key])[index])
    tmp = out + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, out)
    return path


def _read(checkpoint) -> tuple[str, dict, dict]:
    """`(path, metadata, model values)` of the newest complete checkpoint:
    Orbax (JAX engine) or torch.distributed.checkpoint (torch engine)."""
    from keras_tensor_parallel.checkpoint import store_torch

    if store_torch.is_complete(checkpoint) or store_torch.complete_steps(
        checkpoint
    ):
        path = store_torch.latest(checkpoint)
        return (path, *store_torch.model_values(path))
    path = store.latest(checkpoint)
    meta = store.read_metadata(path)
    saved = meta["fingerprint"]["variables"]["model"]
    storage = meta["storage"]["model"]
    values = store.load_partial(path, _one_device(storage, saved))["model"]
    return path, meta, values


def _one_device(storage: dict, saved: dict) -> dict:
    # The export holds the whole model on one device, as the file will.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {
        "model": {
            p: jax.ShapeDtypeStruct(tuple(shape), saved[p][1], sharding=device)
            for p, shape in storage.items()
        }
    }
