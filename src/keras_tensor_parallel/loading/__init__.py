"""Models larger than one device: plan without allocating, build straight
into shards, read saved values one shard at a time (JAX engine).

Importing this package imports no backend: `TensorParallelKeras` uses
`factory` at class creation, and the rest loads on first use.
"""

__all__ = [
    "build_unallocated",
    "load",
    "plan_model",
    "plan_source",
    "resolve",
    "unallocated",
]


def __getattr__(name):
    if name in ("build_unallocated", "unallocated"):
        from keras_tensor_parallel.loading import abstract

        return getattr(abstract, name)
    if name in ("load", "plan_model", "plan_source", "resolve"):
        from keras_tensor_parallel.loading import api

        return getattr(api, name)
    raise AttributeError(name)
