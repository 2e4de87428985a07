"""Device discovery and validation, backend-neutral."""

from __future__ import annotations

import keras

SUPPORTED_BACKENDS = ("jax", "torch")


def available_devices() -> list[str]:
    """Device ids Keras sees: accelerators if present, else CPU devices."""
    if keras.backend.backend() == "jax":
        return keras.distribution.list_devices()
    if keras.backend.backend() == "torch":
        import torch.distributed as dist

        from keras_tensor_parallel.backends.torch import ensure_process_group

        ensure_process_group()  # from torchrun's environment, if any
        n = dist.get_world_size() if dist.is_initialized() else 1
        kind = "cuda" if _torch_cuda() else "cpu"
        return [f"{kind}:{i}" for i in range(n)]
    return keras.distribution.list_devices()


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_devices(*, world_size=None, device_ids=None) -> list[str]:
    """The device ids to use, validated.

    Args:
        world_size: Number of devices; defaults to all (or len(device_ids)).
        device_ids: Explicit ids as `keras.distribution.list_devices()`
            returns them (`"cpu:0"`, `"gpu:1"`).

    Raises:
        ValueError: on a non-positive or too large world size, unknown or
            repeated ids, or a world size that disagrees with the ids.
    """
    available = available_devices()
    if device_ids is not None:
        if isinstance(device_ids, str) or not hasattr(device_ids, "__iter__"):
            raise ValueError(
                "device_ids must be a list of device id strings such as "
                f"['cpu:0', 'cpu:1']. Received: device_ids={device_ids!r}"
            )
        ids = [str(d).lower() for d in device_ids]
        if not ids:
            raise ValueError("device_ids must not be empty. Received: []")
        unknown = [d for d in ids if d not in available]
        if unknown:
            raise ValueError(
                f"Unknown device ids {unknown}: choose from {available}. "
                f"Received: device_ids={list(device_ids)}"
            )
        repeated = sorted({d for d in ids if ids.count(d) > 1})
        if repeated:
            raise ValueError(
                f"Each device may appear once in device_ids; repeated: "
                f"{repeated}. Received: device_ids={list(device_ids)}"
            )
        if world_size is not None and world_size != len(ids):
            raise ValueError(
                f"world_size ({world_size}) must equal len(device_ids) "
                f"({len(ids)}). Received: world_size={world_size}, "
                f"device_ids={list(device_ids)}"
            )
        return ids
    if world_size is None:
        return list(available)
    from keras_tensor_parallel.plan.planner import validate_world_size

    validate_world_size(world_size)
    if world_size > len(available):
        raise ValueError(
            f"world_size={world_size} is larger than the {len(available)} "
            f"devices available ({available}). On CPU, simulate more with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N set before "
            f"jax is imported. Received: world_size={world_size}"
        )
    return list(available[:world_size])


def validate_backend(distributed_backend) -> str:
    """The backend to run on; must match the Keras backend in use."""
    active = keras.backend.backend()
    name = (
        active
        if distributed_backend in (None, "auto")
        else (distributed_backend)
    )
    if name not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"distributed_backend must be one of {SUPPORTED_BACKENDS} or "
            f"'auto'. Received: distributed_backend={distributed_backend!r}"
        )
    if name != active:
        raise ValueError(
            f"distributed_backend={name!r} does not match the Keras backend "
            f"in use ({active!r}); set KERAS_BACKEND={name} before importing "
            f"keras. Received: distributed_backend={distributed_backend!r}"
        )
    return name
