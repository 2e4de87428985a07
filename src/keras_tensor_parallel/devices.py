"""Which backend and which devices: names as users write them, validated.

The backends answer which devices exist (`backends.base.available_devices`);
this module turns the user's `distributed_backend`, `world_size` and
`device_ids` into a checked engine name and device list.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from keras_tensor_parallel.backends import base

SUPPORTED_BACKENDS = base.ENGINES
# Names the first users wrote, with what each means here.
ALIASES = {"pytorch": "torch"}
_NOT_PARALLELISM = {
    "horovod": (
        "Horovod only averages gradients across data-parallel replicas; it "
        "does not split a model's layers. Use distributed_backend='auto' "
        "for tensor parallelism, and tensor_parallel_size with a data axis "
        "to combine it with data parallelism"
    ),
    "fallback": (
        "a fallback that simulates devices in one process is not "
        "parallelism (every shard would share one device's memory). Use "
        "distributed_backend='auto'; to try N devices on a CPU machine, "
        "start N processes with `keras-tp launch -n N script.py` (torch) "
        "or set XLA_FLAGS=--xla_force_host_platform_device_count=N (JAX)"
    ),
}


def available_devices(backend: str | None = None) -> list[str]:
    """Device ids the engine of `backend` (default: the Keras backend in
    use) can run on in this process."""
    return base.available_devices(backend or keras.backend.backend())


def validate_backend(distributed_backend) -> str:
    """The engine to run on, from the name the user wrote.

    Accepts `"auto"`/`None` (the Keras backend in use), `"jax"`, `"torch"`
    or `"pytorch"`, and `"nccl"` (the Keras backend's engine on GPUs, whose
    collectives are NCCL). The engine must match the Keras backend.

    Raises:
        ValueError: for names that are not an engine here, saying why and
            what to use instead.

    Example:

    ```python
    validate_backend("pytorch")  # 'torch' when KERAS_BACKEND=torch
    ```
    """
    active = keras.backend.backend()
    raw = distributed_backend
    received = f"Received: distributed_backend={raw!r}"
    if raw is None:
        return _matching(active, active, received)
    if not isinstance(raw, str):
        raise ValueError(
            "distributed_backend must be a string such as 'auto', 'jax' or "
            f"'torch'. {received}"
        )
    name = ALIASES.get(raw.strip().lower(), raw.strip().lower())
    if name == "auto":
        return _matching(active, active, received)
    if name in ("tensorflow", "tf"):
        raise ValueError(
            "There is no TensorFlow engine yet: Keras's own TensorFlow "
            "distribution is a prototype and ours is not written. Run with "
            f"KERAS_BACKEND=jax or torch. {received}"
        )
    if name in _NOT_PARALLELISM:
        raise ValueError(
            f"distributed_backend={raw!r} is not supported: "
            f"{_NOT_PARALLELISM[name]}. {received}"
        )
    if name == "nccl":
        return _nccl(active, received)
    if name not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"distributed_backend must be one of {SUPPORTED_BACKENDS}, "
            f"'pytorch', 'nccl' or 'auto'. {received}"
        )
    return _matching(name, active, received)


def _matching(name: str, active: str, received: str) -> str:
    if name not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"The Keras backend in use ({active!r}) has no tensor-parallel "
            f"engine; engines exist for {SUPPORTED_BACKENDS}. {received}"
        )
    if name != active:
        raise ValueError(
            f"distributed_backend={name!r} does not match the Keras backend "
            f"in use ({active!r}); set KERAS_BACKEND={name} before importing "
            f"keras. {received}"
        )
    return name


def _nccl(active: str, received: str) -> str:
    """NCCL is what the engines already use between GPUs."""
    name = _matching(active, active, received)
    if not any(d.startswith(("gpu", "cuda")) for d in available_devices(name)):
        raise ValueError(
            "distributed_backend='nccl' needs GPUs: NCCL is NVIDIA's GPU "
            f"collective library, and the {active} engine sees no GPU in "
            "this process. On CPU use distributed_backend='auto'. "
            f"{received}"
        )
    return name


def _check_world_size(world_size) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise ValueError(
            "world_size must be a positive integer. Received: "
            f"world_size={world_size!r}"
        )
    if world_size <= 0:
        raise ValueError(
            f"world_size must be >= 1. Received: world_size={world_size}"
        )


def _check_device_ids(device_ids, available: Sequence[str]) -> list[str]:
    if not isinstance(device_ids, (list, tuple)) or not all(
        isinstance(d, str) for d in device_ids
    ):
        raise ValueError(
            "device_ids must be a list of device id strings such as "
            f"['cpu:0', 'cpu:1']. Received: device_ids={device_ids!r}"
        )
    ids = [d.lower() for d in device_ids]
    if not ids:
        raise ValueError("device_ids must not be empty. Received: []")
    unknown = [d for d in ids if d not in available]
    if unknown:
        raise ValueError(
            f"Unknown device ids {unknown}: choose from {list(available)}. "
            f"Received: device_ids={list(device_ids)}"
        )
    repeated = sorted({d for d in ids if ids.count(d) > 1})
    if repeated:
        raise ValueError(
            f"Each device may appear once in device_ids; repeated: "
            f"{repeated}. Received: device_ids={list(device_ids)}"
        )
    return ids


def _too_few(world_size: int, available, backend: str) -> ValueError:
    if backend == "torch":
        hint = (
            "The torch engine runs one process per device: start them with "
            f"`keras-tp launch -n {world_size} script.py`"
        )
    else:
        hint = (
            "On CPU, simulate more with XLA_FLAGS=--xla_force_host_platform"
            "_device_count=N set before jax is imported"
        )
    return ValueError(
        f"world_size={world_size} is larger than the {len(available)} "
        f"devices available ({list(available)}). {hint}. Received: "
        f"world_size={world_size}"
    )


def resolve_devices(
    *, world_size=None, device_ids=None, backend: str | None = None
) -> list[str]:
    """The device ids to use, validated.

    Args:
        world_size: Number of devices; defaults to all (or len(device_ids)).
        device_ids: Explicit ids as `keras.distribution.list_devices()`
            returns them (`"cpu:0"`, `"gpu:1"`), as a list or tuple.
        backend: The engine (default: the Keras backend in use).

    Raises:
        ValueError: on a world size that is not a positive int or is too
            large, unknown or repeated ids, or a world size that disagrees
            with the ids.

    Example:

    ```python
    resolve_devices(world_size=2)  # ['cpu:0', 'cpu:1']
    ```
    """
    backend = backend or keras.backend.backend()
    if world_size is not None:
        _check_world_size(world_size)
    available = available_devices(backend)
    if device_ids is not None:
        ids = _check_device_ids(device_ids, available)
        if world_size is not None and world_size != len(ids):
            raise ValueError(
                f"world_size ({world_size}) must equal len(device_ids) "
                f"({len(ids)}). Received: world_size={world_size}, "
                f"device_ids={list(device_ids)}"
            )
        return ids
    if world_size is None:
        return list(available)
    if world_size > len(available):
        raise _too_few(world_size, available, backend)
    return list(available[:world_size])
