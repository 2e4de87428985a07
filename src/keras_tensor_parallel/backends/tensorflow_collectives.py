"""TensorFlow collectives for a future TF engine: the cluster, Megatron's
f and g, and a gather along the last dim with uneven shard sizes.

Collectives run on TensorFlow's own runtime: `MultiWorkerMirroredStrategy`
starts the gRPC server from `TF_CONFIG` (which `keras-tp launch` sets,
127.0.0.1 only) and enables collective ops; `CollectiveReduceV2` /
`CollectiveGatherV2` then run eagerly or inside `tf.function`. Every rank
must issue the same collectives in the same order: instance keys come
from one counter, taken when an op is created (once per trace inside a
`tf.function`, whose later calls reuse them, as tf.distribute does).

Only the collectives exist so far: the engine (splitting variables, the
roles' forward, clipping, saving) is not written (issue 17).
"""

from __future__ import annotations

import itertools
import json
import os

import tensorflow as tf

GROUP_KEY = 7001
_STATE: dict = {"strategy": None, "keys": itertools.count(1)}


def ensure_cluster() -> bool:
    """Join the cluster `TF_CONFIG` describes (once); False without one.

    Example:

    ```python
    ensure_cluster()  # under `KERAS_BACKEND=tensorflow keras-tp launch -n 2`
    ```
    """
    if _STATE["strategy"] is not None:
        return True
    if "TF_CONFIG" not in os.environ:
        return False
    _STATE["strategy"] = tf.distribute.MultiWorkerMirroredStrategy()
    return True


def _config() -> dict:
    return json.loads(os.environ.get("TF_CONFIG", "{}"))


def rank() -> int:
    return int(_config().get("task", {}).get("index", 0))


def world_size() -> int:
    workers = _config().get("cluster", {}).get("worker", [])
    return max(len(workers), 1)


def _timeout() -> float:
    return float(os.environ.get("KERAS_TP_TIMEOUT", 120))


def all_reduce(x):
    """Sum of `x` over every rank."""
    if world_size() == 1:
        return tf.identity(x)
    return tf.raw_ops.CollectiveReduceV2(
        input=x,
        group_size=world_size(),
        group_key=GROUP_KEY,
        instance_key=next(_STATE["keys"]),
        ordering_token=[],
        merge_op="Add",
        final_op="Id",
        timeout_seconds=_timeout(),
    )


def _all_gather_first(x):
    """Concatenation of every rank's `x` along dim 0 (equal shapes)."""
    if world_size() == 1:
        return tf.identity(x)
    return tf.raw_ops.CollectiveGatherV2(
        input=x,
        group_size=world_size(),
        group_key=GROUP_KEY,
        instance_key=next(_STATE["keys"]),
        ordering_token=[],
        timeout_seconds=_timeout(),
    )


def gather_last(x, sizes: list[int]):
    """All-gather `x` along its last dim; rank i holds `sizes[i]` of it."""
    width = max(sizes)
    pad = [[0, 0]] * (len(x.shape) - 1) + [[0, width - x.shape[-1]]]
    moved = tf.experimental.numpy.moveaxis(tf.pad(x, pad), -1, 0)
    parts = tf.split(_all_gather_first(moved), len(sizes), axis=0)
    trimmed = [p[:n] for p, n in zip(parts, sizes)]
    return tf.experimental.numpy.moveaxis(tf.concat(trimmed, 0), 0, -1)


@tf.custom_gradient
def f(x):
    """Megatron's f: identity forward, all-reduce of the gradient."""

    def grad(dy):
        return all_reduce(dy)

    return tf.identity(x), grad


@tf.custom_gradient
def g(x):
    """Megatron's g: all-reduce forward, identity backward."""

    def grad(dy):
        return tf.identity(dy)

    return all_reduce(x), grad
