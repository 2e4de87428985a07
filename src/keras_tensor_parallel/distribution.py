"""`AutoTPDistribution`: a `ShardingPlan` as a Keras distribution (JAX).

The class lives beside the JAX engine (`backends/jax_distribution.py`);
this module keeps the public import path.
"""

from keras_tensor_parallel.backends.jax_distribution import (
    AutoTPDistribution,
)

__all__ = ["AutoTPDistribution"]
