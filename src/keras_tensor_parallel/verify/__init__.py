"""Fidelity checks: tensor-parallel vs single-device, measured."""

from keras_tensor_parallel.verify.checks import (
    Check,
    compare_forward,
    compare_gradients,
    memory_check,
)
from keras_tensor_parallel.verify.data import lm_batches, stdlib_corpus
from keras_tensor_parallel.verify.training import (
    TrainingComparison,
    causal_lm,
    compare_training,
    lm_inputs,
)

__all__ = [
    "Check",
    "TrainingComparison",
    "causal_lm",
    "compare_forward",
    "compare_gradients",
    "compare_training",
    "lm_batches",
    "lm_inputs",
    "memory_check",
    "stdlib_corpus",
]
