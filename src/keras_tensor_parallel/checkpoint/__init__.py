"""Sharded, reshardable checkpoints of a `TensorParallelKeras` (JAX engine:
Orbax), a `fit` callback, and export to a single-device `.keras` file."""

from keras_tensor_parallel.checkpoint.callback import ShardedCheckpoint
from keras_tensor_parallel.checkpoint.export import export
from keras_tensor_parallel.checkpoint.store import (
    complete_steps,
    latest,
    load,
    save,
)

__all__ = [
    "ShardedCheckpoint",
    "complete_steps",
    "export",
    "latest",
    "load",
    "save",
]
