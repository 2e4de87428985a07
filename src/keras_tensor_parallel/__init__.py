"""keras-tensor-parallel: automatic Megatron-style tensor parallelism for
any Keras 3 model."""

__version__ = "0.1.0"

_PLAN_NAMES = ("Role", "ShardingPlan", "VariablePlan", "plan_model")

__all__ = [
    "AutoTPDistribution",
    "initialize",
    "Role",
    "ShardingPlan",
    "TensorParallelKeras",
    "VariablePlan",
    "plan_model",
]


def initialize(job_addresses=None, num_processes=None, process_id=None):
    """Join a multi-host JAX job (`keras.distribution.initialize`); call it
    on every host before building the model, then wrap as usual."""
    import keras

    keras.distribution.initialize(job_addresses, num_processes, process_id)


def __getattr__(name):
    # Lazy: importing the package must not pull in a backend engine.
    if name == "TensorParallelKeras":
        from keras_tensor_parallel.model import TensorParallelKeras

        return TensorParallelKeras
    if name == "AutoTPDistribution":
        from keras_tensor_parallel.distribution import AutoTPDistribution

        return AutoTPDistribution
    if name in _PLAN_NAMES:
        # Lazy too: `keras-tp` sets KERAS_BACKEND and quiets TensorFlow's
        # start-up logs before anything imports keras.
        from keras_tensor_parallel import plan

        return getattr(plan, name)
    raise AttributeError(name)
