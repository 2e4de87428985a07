"""Device ids as users write them, checked against a list of available ids.

Pure: the caller says which devices exist (`devices.available_devices` for
the wrapper, Keras's device list for `AutoTPDistribution`), so the JAX
distribution and the user-facing device resolution share one set of rules
without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence


def select_devices(
    *,
    world_size=None,
    device_ids=None,
    available: Sequence[str],
    backend: str,
) -> list[str]:
    """The device ids to use, validated against `available`.

    Args:
        world_size: Number of devices; defaults to all (or len(device_ids)).
        device_ids: Explicit ids (`"cpu:0"`, `"gpu:1"`), a list or tuple.
        available: The ids the backend can use in this process.
        backend: The engine name, for the hint when there are too few.

    Raises:
        ValueError: on a world size that is not a positive int or is too
            large, unknown or repeated ids, or a world size that disagrees
            with the ids.

    Example:

    ```python
    select_devices(world_size=2, available=["cpu:0", "cpu:1", "cpu:2"],
                   backend="jax")  # ['cpu:0', 'cpu:1']
    ```
    """
    if world_size is not None:
        _check_world_size(world_size)
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
    if backend in ("torch", "tensorflow"):
        hint = (
            f"The {backend} engine runs one process per device: start "
            f"them with `keras-tp launch -n {world_size} script.py`"
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
