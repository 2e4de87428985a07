"""The engines, one per backend, and how to pick one.

`make_engine` and `available_devices` live here, above the engine modules,
so that `base` (the contract) and the engines import only downwards. Engine
modules are imported lazily: importing this package imports no framework.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keras_tensor_parallel.backends.base import Engine
    from keras_tensor_parallel.plan import ShardingPlan

ENGINES = ("jax", "torch")


def make_engine(
    backend: str, plan: ShardingPlan, device_ids: Sequence[str]
) -> Engine:
    """The engine that runs `plan` on `backend`.

    Args:
        backend: `"jax"` or `"torch"` (already validated).
        plan: The sharding plan.
        device_ids: The devices: one per model-axis position, or a
            multiple of `plan.world_size` for data-parallel replicas
            (JAX; the mesh is `(data, model)`, see `jax_distribution`).

    Returns:
        An object implementing `Engine`.

    Example:

    ```python
    engine = make_engine("jax", plan_model(model, 2), ["cpu:0", "cpu:1"])
    engine.apply(model)
    ```
    """
    if backend == "jax":
        from keras_tensor_parallel.backends.jax import JaxEngine

        return JaxEngine(plan, list(device_ids))
    if backend == "torch":
        from keras_tensor_parallel.backends.torch import TorchEngine

        return TorchEngine(plan, list(device_ids))
    raise ValueError(
        f"No engine for backend {backend!r}; engines exist for {ENGINES}. "
        f"Received: backend={backend!r}"
    )


def available_devices(backend: str) -> list[str]:
    """Device ids this process can use on `backend`.

    JAX: every device Keras lists (accelerators first). Torch: one device
    per rank of the process group (`cpu:i`/`cuda:i`), or one when the
    process was not started by a launcher.

    Example:

    ```python
    available_devices("jax")  # ['cpu:0', 'cpu:1', 'cpu:2', 'cpu:3']
    ```
    """
    if backend == "jax":
        from keras_tensor_parallel.backends.jax import available_devices

        return available_devices()
    if backend == "torch":
        from keras_tensor_parallel.backends.torch import available_devices

        return available_devices()
    raise ValueError(
        f"No engine for backend {backend!r}; engines exist for {ENGINES}. "
        f"Received: backend={backend!r}"
    )
