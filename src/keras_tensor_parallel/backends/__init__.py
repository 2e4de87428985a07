"""The engines, one per backend, and how to pick one.

`make_engine` and `available_devices` live here, above the engine modules,
so that `base` (the contract) and the engines import only downwards. Engine
modules are imported lazily: importing this package imports no framework,
except in a rank that `keras-tp launch` started for TensorFlow, which joins
its cluster here (`join_launched_cluster`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keras_tensor_parallel.backends.base import Engine
    from keras_tensor_parallel.plan import ShardingPlan

ENGINES = ("jax", "torch", "tensorflow")


def make_engine(
    backend: str, plan: ShardingPlan, device_ids: Sequence[str]
) -> Engine:
    """The engine that runs `plan` on `backend`.

    Args:
        backend: `"jax"`, `"torch"` or `"tensorflow"` (already
            validated).
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
    if backend == "tensorflow":
        from keras_tensor_parallel.backends.tensorflow import (
            TensorflowEngine,
        )

        return TensorflowEngine(plan, list(device_ids))
    raise ValueError(
        f"No engine for backend {backend!r}; engines exist for {ENGINES}. "
        f"Received: backend={backend!r}"
    )


def available_devices(backend: str) -> list[str]:
    """Device ids this process can use on `backend`.

    JAX: every device Keras lists (accelerators first). Torch: one device
    per rank of the process group (`cpu:i`/`cuda:i`), or one when the
    process was not started by a launcher. TensorFlow: one per rank of
    the `TF_CONFIG` cluster (`cpu:i`/`gpu:i`), or one.

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
    if backend == "tensorflow":
        from keras_tensor_parallel.backends.tensorflow import (
            available_devices,
        )

        return available_devices()
    raise ValueError(
        f"No engine for backend {backend!r}; engines exist for {ENGINES}. "
        f"Received: backend={backend!r}"
    )


def join_launched_cluster() -> None:
    """In a rank `keras-tp launch` started for TensorFlow (it sets
    `TF_CONFIG`), join the cluster now: TensorFlow enables collective ops
    only before its first tensor exists, that is before the user's model
    is built. Elsewhere it does nothing and imports nothing. Too late (a
    tensor exists already), the engine raises the error when wrapping."""
    if "TF_CONFIG" in os.environ and (
        os.environ.get("KERAS_BACKEND") == "tensorflow"
    ):
        from keras_tensor_parallel.backends import tensorflow_collectives

        try:
            tensorflow_collectives.ensure_cluster()
        except tensorflow_collectives.ClusterTooLateError:
            pass  # raised again, with its advice, by the engine


join_launched_cluster()
