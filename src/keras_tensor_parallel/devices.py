"""Which backend and which devices: names as users write them, validated.

The backends answer which devices exist (`backends.available_devices`);
this module turns the user's `distributed_backend`, `world_size` and
`device_ids` into a checked engine name and device list.
"""

from __future__ import annotations

import keras

from keras_tensor_parallel import backends
from keras_tensor_parallel.backends import device_ids as device_ids_lib

SUPPORTED_BACKENDS = backends.ENGINES
# Names the first users wrote, with what each means here.
ALIASES = {"pytorch": "torch", "tf": "tensorflow"}
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
        "start N processes with `keras-tp launch -n N script.py` (torch, "
        "TensorFlow) or set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N (JAX)"
    ),
}


def available_devices(backend: str | None = None) -> list[str]:
    """Device ids the engine of `backend` (default: the Keras backend in
    use) can run on in this process."""
    return backends.available_devices(backend or keras.backend.backend())


def validate_backend(distributed_backend) -> str:
    """The engine to run on, from the name the user wrote.

    Accepts `"auto"`/`None` (the Keras backend in use), `"jax"`, `"torch"`
    or `"pytorch"`, `"tensorflow"` or `"tf"`, and `"nccl"` (the Keras
    backend's engine on GPUs, whose collectives are NCCL). The engine must
    match the Keras backend.

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
            f"'pytorch', 'tf', 'nccl' or 'auto'. {received}"
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
    return device_ids_lib.select_devices(
        world_size=world_size,
        device_ids=device_ids,
        available=available_devices(backend),
        backend=backend,
    )


def tensor_parallel_size(
    size,
    ids: list[str],
    backend: str,
    *,
    model=None,
    device_memory=None,
    overrides: dict | None = None,
    batch=None,
    sizes: list[int] | None = None,
) -> int:
    """The model-axis size: `size` (default all of `ids`), a positive
    divisor of `len(ids)`; data parallelism on the JAX and torch engines.

    `size="auto"` with `device_memory` (bytes, or a string like `"16GB"`)
    measures `model`'s train step at each divisor, smallest first, and
    takes the first that fits one device (JAX: `autosize.choose`, from
    XLA's compiled step; torch: `autosize_torch.choose`, computed from the
    plan's shards and a measured activation pass); it prints the choice
    and its figures. `batch` (`(inputs, targets)`, one global batch) and
    `sizes` (the divisors to try) are passed on (the CLI's).
    """
    if device_memory is not None and size != "auto":
        raise ValueError(
            "device_memory is read only with tensor_parallel_size='auto'. "
            f"Received: device_memory={device_memory!r} with "
            f"tensor_parallel_size={size!r}"
        )
    if isinstance(size, str) and size == "auto":
        return _auto_size(
            ids, backend, model, device_memory,
            dict(overrides=overrides, batch=batch, sizes=sizes))  # fmt: skip
    if size is None:
        return len(ids)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(
            "tensor_parallel_size must be a positive integer, 'auto' or "
            f"None. Received: tensor_parallel_size={size!r}"
        )
    if len(ids) % size:
        raise ValueError(
            f"tensor_parallel_size must divide world_size ({len(ids)}). "
            f"Received: tensor_parallel_size={size}"
        )
    if size != len(ids) and backend not in ("jax", "torch"):
        raise ValueError(
            "Data parallelism (tensor_parallel_size < world_size) runs on "
            f"the JAX and torch engines only. Received: "
            f"tensor_parallel_size={size} "
            f"with world_size={len(ids)} on the {backend} engine"
        )
    return size


def _auto_size(ids, backend, model, device_memory, options: dict) -> int:
    from keras_tensor_parallel import autosize

    if backend not in ("jax", "torch"):
        raise ValueError(
            "tensor_parallel_size='auto' measures the train step on the JAX "
            "engine (XLA's memory analysis) and computes it on the torch "
            f"engine. Received: tensor_parallel_size='auto' on the {backend} "
            "engine"
        )
    if device_memory is None:
        raise ValueError(
            "tensor_parallel_size='auto' needs device_memory (bytes per "
            "device, or a string like '16GB'). Received: "
            "tensor_parallel_size='auto' without device_memory"
        )
    autosize.parse_memory(device_memory)  # a bad value fails before work
    if backend == "torch":
        from keras_tensor_parallel import autosize_torch
        from keras_tensor_parallel.backends import torch_collectives as tc

        # Every rank computes the same choice from shapes; rank 0 prints.
        choice = autosize_torch.choose(
            model, len(ids), device_memory, verbose=tc.rank() == 0,
            **options)  # fmt: skip
    else:
        choice = autosize.choose(model, ids, device_memory, **options)
    return choice.tensor_parallel_size
