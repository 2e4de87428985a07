"""Fidelity checks: tensor-parallel vs single-device, measured.

Every check compiles XLA programs: they need `KERAS_BACKEND=jax` and say so
with a ValueError otherwise.
"""

from keras_tensor_parallel.catalogue.lm import causal_lm, lm_inputs
from keras_tensor_parallel.verify.checks import (
    Check,
    compare_forward,
    compare_gradients,
    memory_check,
)
from keras_tensor_parallel.verify.data import lm_batches, stdlib_corpus
from keras_tensor_parallel.verify.pairs import (
    build_pair,
    build_tp_pair,
    require_jax,
)
from keras_tensor_parallel.verify.training import (
    TrainingComparison,
    compare_training,
)

__all__ = [
    "Check",
    "TrainingComparison",
    "build_pair",
    "build_tp_pair",
    "causal_lm",
    "compare_forward",
    "compare_gradients",
    "compare_training",
    "lm_batches",
    "lm_inputs",
    "memory_check",
    "require_jax",
    "stdlib_corpus",
]
