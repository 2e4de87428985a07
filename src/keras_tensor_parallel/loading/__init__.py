"""Models larger than one device: plan without allocating, build straight
into shards, read saved values one shard at a time (JAX engine)."""

from keras_tensor_parallel.loading.abstract import (
    build_unallocated,
    unallocated,
)
from keras_tensor_parallel.loading.api import load, plan_source, resolve

__all__ = [
    "build_unallocated",
    "load",
    "plan_source",
    "resolve",
    "unallocated",
]
