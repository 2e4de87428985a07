"""keras-tensor-parallel: automatic Megatron-style tensor parallelism for
any Keras 3 model."""

from keras_tensor_parallel.plan import (
    Role,
    ShardingPlan,
    VariablePlan,
    plan_model,
)

__version__ = "0.1.0"

__all__ = [
    "AutoTPDistribution",
    "Role",
    "ShardingPlan",
    "TensorParallelKeras",
    "VariablePlan",
    "plan_model",
]


def __getattr__(name):
    # Lazy: importing the package must not pull in a backend engine.
    if name == "TensorParallelKeras":
        from keras_tensor_parallel.model import TensorParallelKeras

        return TensorParallelKeras
    if name == "AutoTPDistribution":
        from keras_tensor_parallel.distribution import AutoTPDistribution

        return AutoTPDistribution
    raise AttributeError(name)
