"""TensorFlow collectives for the TF engine: the cluster, Megatron's f and
g, gathers with uneven shard sizes, and agreeing on errors across ranks.

Collectives run on TensorFlow's own runtime: `MultiWorkerMirroredStrategy`
starts the gRPC server from `TF_CONFIG` (which `keras-tp launch` sets,
127.0.0.1 only) and enables collective ops; `CollectiveReduceV2` /
`CollectiveGatherV2` then run eagerly or inside `tf.function`. Every rank
must issue the same collectives in the same order: instance keys come
from one counter, taken when an op is created (once per trace inside a
`tf.function`, whose later calls reuse them, as tf.distribute does).

TensorFlow enables collective ops only before its first tensor exists, so
the cluster is joined when the package's engines are imported under the
launcher (`backends.join_launched_cluster`), before the user's model is
built. Under Keras's symbolic shape inference (`compute_output_spec`)
no collective is created: f and g are identities there and a gather
only has to have the right shape.
"""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import tensorflow as tf
from keras.src.backend.common.symbolic_scope import in_symbolic_scope

from keras_tensor_parallel.backends import base

GROUP_KEY = 7001
ERROR_BYTES = 1024  # of an error message exchanged by `first_error`
_STATE: dict = {"strategy": None, "keys": itertools.count(1)}
# Collective ops created by f, g and the vocab gather: inside a
# `tf.function` once per trace (a traced step's count is the step's
# collectives), eagerly once per call. For accounting in tests.
COUNTS = {"forward": 0, "backward": 0, "gather": 0}


def reset_counts() -> None:
    for key in COUNTS:
        COUNTS[key] = 0


def _count(key: str) -> None:
    if world_size() > 1 and not in_symbolic_scope():
        COUNTS[key] += 1


class ClusterTooLateError(ValueError):
    """TensorFlow made a tensor before the cluster was joined."""


def ensure_cluster() -> bool:
    """Join the cluster `TF_CONFIG` describes (once); False without one.

    Raises:
        ClusterTooLateError: when TensorFlow already ran an op (collective
            ops can only be enabled at program start-up).

    Example:

    ```python
    ensure_cluster()  # under `KERAS_BACKEND=tensorflow keras-tp launch -n 2`
    ```
    """
    if _STATE["strategy"] is not None:
        return True
    if "TF_CONFIG" not in os.environ:
        return False
    _one_gpu_per_rank()
    try:
        _STATE["strategy"] = tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as e:
        raise ClusterTooLateError(
            "TensorFlow joins its multi-worker cluster only before its first "
            "tensor exists: run `from keras_tensor_parallel import "
            "TensorParallelKeras` (or `keras_tensor_parallel.initialize()`) "
            f"before building the model. Received: {e}"
        ) from e
    return True


def _one_gpu_per_rank() -> None:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        local = int(os.environ.get("LOCAL_RANK", 0)) % len(gpus)
        tf.config.set_visible_devices(gpus[local], "GPU")


def _config() -> dict:
    return json.loads(os.environ.get("TF_CONFIG", "{}"))


def rank() -> int:
    return int(_config().get("task", {}).get("index", 0))


def world_size() -> int:
    workers = _config().get("cluster", {}).get("worker", [])
    return max(len(workers), 1)


def device_kind() -> str:
    return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"


def _timeout() -> float:
    return float(os.environ.get("KERAS_TP_TIMEOUT", 120))


def _hint() -> str:
    # NCCL between GPUs, as MultiWorkerMirroredStrategy picks it (asked
    # once: eager collectives are made at every call).
    if _STATE.get("hint") is None:
        _STATE["hint"] = "nccl" if device_kind() == "gpu" else "auto"
    return _STATE["hint"]


def _ordering_token() -> list:
    """One resource every collective reads, as tf.distribute's launcher
    does: inside a `tf.function` automatic control dependencies then run
    the collectives in the order they were made, the same on every rank
    (unordered, ranks start them in different orders and wait on each
    other)."""
    if _STATE.get("token") is None:
        with tf.init_scope():
            _STATE["token"] = tf.Variable(0.0, trainable=False)
    return [_STATE["token"].handle]


def all_reduce(x):
    """Sum of `x` over every rank."""
    if world_size() == 1 or in_symbolic_scope():
        return tf.identity(x)
    return tf.raw_ops.CollectiveReduceV2(
        input=x,
        group_size=world_size(),
        group_key=GROUP_KEY,
        instance_key=next(_STATE["keys"]),
        ordering_token=_ordering_token(),
        merge_op="Add",
        final_op="Id",
        communication_hint=_hint(),
        timeout_seconds=_timeout(),
    )


def _all_gather_first(x):
    """Concatenation of every rank's `x` along dim 0 (equal shapes)."""
    if world_size() == 1:
        return tf.identity(x)
    if in_symbolic_scope():
        return tf.concat([x] * world_size(), 0)
    return tf.raw_ops.CollectiveGatherV2(
        input=x,
        group_size=world_size(),
        group_key=GROUP_KEY,
        instance_key=next(_STATE["keys"]),
        ordering_token=_ordering_token(),
        communication_hint=_hint(),
        timeout_seconds=_timeout(),
    )


def gather_dim(local, dim: int, sizes: list[int]):
    """All-gather `local` along `dim`; rank i holds `sizes[i]` of it."""
    local = tf.convert_to_tensor(local)
    dim = dim % len(local.shape)
    width = max(sizes)
    pad = [[0, 0]] * len(local.shape)
    pad[dim] = [0, width - local.shape[dim]]
    moved = tf.experimental.numpy.moveaxis(tf.pad(local, pad), dim, 0)
    parts = tf.split(_all_gather_first(moved), len(sizes), axis=0)
    trimmed = [p[:n] for p, n in zip(parts, sizes)]
    return tf.experimental.numpy.moveaxis(tf.concat(trimmed, 0), 0, dim)


def gather_last(x, sizes: list[int], index: int | None = None):
    """All-gather `x` along its last dim; rank i holds `sizes[i]` of it.
    Differentiable: backward keeps this rank's part (number `index`,
    default this rank)."""
    index = rank() if index is None else index
    start = sum(sizes[:index])
    stop = start + sizes[index]

    @tf.custom_gradient
    def gather(x):
        def grad(dy):
            return dy[..., start:stop]

        _count("gather")
        return gather_dim(x, -1, list(sizes)), grad

    return gather(x)


@tf.custom_gradient
def f(x):
    """Megatron's f: identity forward, all-reduce of the gradient."""

    def grad(dy):
        _count("backward")
        return all_reduce(dy)

    return tf.identity(x), grad


@tf.custom_gradient
def g(x):
    """Megatron's g: all-reduce forward, identity backward."""

    def grad(dy):
        return tf.identity(dy)

    _count("forward")
    return all_reduce(x), grad


# Agreeing across ranks (eager) -----------------------------------------------


def broadcast_seed() -> int:
    """A random seed drawn on rank 0, the same on every rank."""
    seed = np.random.randint(0, 2**31 - 1) if rank() == 0 else 0
    return int(all_reduce(tf.constant(seed, tf.int64)).numpy())


def first_error(error: BaseException | None) -> BaseException | None:
    """The error of the first rank that failed, on every rank (a
    collective), as `torch_collectives.first_error`: the messages travel
    as bytes through one `CollectiveGatherV2`.

    Returns None when no rank failed; this rank's own `error` when it
    failed; else an error of the same built-in type (RuntimeError for
    others) whose message names the failing rank and its message.
    """
    if world_size() == 1:
        return error
    text = "" if error is None else f"{type(error).__name__}:{error}"
    data = text.encode("utf-8", "replace")[:ERROR_BYTES]
    row = np.zeros((1, ERROR_BYTES + 1), "int32")
    row[0, 0] = len(data) + (error is not None)
    row[0, 1 : 1 + len(data)] = list(data)
    every = _all_gather_first(tf.constant(row)).numpy()
    for r, found in enumerate(every):
        if found[0]:
            message = bytes(found[1 : found[0]].astype("uint8"))
            name, _, rest = message.decode("utf-8", "replace").partition(":")
            return error or base.rank_error(name, rest, rank=r)
    return None
