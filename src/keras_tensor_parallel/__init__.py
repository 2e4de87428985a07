"""keras-tensor-parallel: automatic Megatron-style tensor parallelism for
any Keras 3 model."""

__version__ = "0.1.0"

_PLAN_NAMES = ("Role", "ShardingPlan", "VariablePlan")

__all__ = [
    "AutoTPDistribution",
    "initialize",
    "Role",
    "ShardingPlan",
    "TensorParallelKeras",
    "VariablePlan",
    "plan_model",
]


def initialize(
    job_addresses: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: float | None = None,
) -> None:
    """Join a multi-process job; every fault ends it within `timeout`.

    Call it in every process before building the model, then wrap as
    usual. Under `keras-tp launch` no argument is needed. On JAX it joins
    `jax.distributed` (as `keras.distribution.initialize` does) with its
    start-up, heartbeat and shutdown timeouts bounded by `timeout`, and
    starts a watchdog: when a process raises, every process exits within
    about a second naming it; a killed process is named after
    `timeout / 2` seconds (5 to 30); a main thread that stands still (a
    hang, or a collective waiting for one) ends the job by `timeout`,
    naming where each process stands. On torch the engine joins the
    process group when wrapping; `timeout` bounds each collective. On
    TensorFlow it also joins the `TF_CONFIG` cluster now, before any
    tensor exists, as TensorFlow requires.

    Args:
        job_addresses: the coordinator's `host:port` (JAX), or all
            addresses comma-separated, the first being the coordinator.
        num_processes: processes in the job.
        process_id: this process's id, in `[0, num_processes)`.
        timeout: seconds; default `$KERAS_TP_TIMEOUT`, else 300.

    Example:

    ```python
    # On process i of 2 (JAX), before building the model:
    import keras_tensor_parallel as ktp
    ktp.initialize("127.0.0.1:1234", 2, i, timeout=60)
    ```
    """
    import os

    import keras

    from keras_tensor_parallel import processes

    seconds = processes.resolve_timeout(timeout)
    if keras.backend.backend() == "jax":
        from keras_tensor_parallel import watchdog

        watchdog.initialize_jax(
            job_addresses, num_processes, process_id, timeout=seconds
        )
    else:
        # The engine reads it when it creates the process group.
        os.environ[processes.TIMEOUT_ENV] = f"{seconds:g}"
    if keras.backend.backend() == "tensorflow":
        from keras_tensor_parallel import backends

        backends.join_launched_cluster()  # before any tensor exists


def __getattr__(name):
    # Lazy: importing the package must not pull in a backend engine.
    if name == "TensorParallelKeras":
        from keras_tensor_parallel.model import TensorParallelKeras

        return TensorParallelKeras
    if name == "AutoTPDistribution":
        from keras_tensor_parallel.distribution import AutoTPDistribution

        return AutoTPDistribution
    if name == "plan_model":
        # Takes builders and preset directories too (planned unallocated).
        from keras_tensor_parallel.loading import api

        return api.plan_model
    if name in _PLAN_NAMES:
        # Lazy too: `keras-tp` sets KERAS_BACKEND and quiets TensorFlow's
        # start-up logs before anything imports keras.
        from keras_tensor_parallel import plan

        return getattr(plan, name)
    raise AttributeError(name)
