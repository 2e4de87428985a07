"""Backend-neutral planning: extract the dataflow, decide the split.

Imports keras only to read layers; never jax, torch or tensorflow.
"""

from keras_tensor_parallel.plan.layers import NORM_CLASSES, is_norm
from keras_tensor_parallel.plan.plan import (
    DATA_AXIS,
    MODEL_AXIS,
    Role,
    ShardingPlan,
    VariablePlan,
    format_bytes,
)
from keras_tensor_parallel.plan.planner import apply_overrides, plan_model
from keras_tensor_parallel.plan.rules import is_projection

__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "NORM_CLASSES",
    "Role",
    "ShardingPlan",
    "VariablePlan",
    "apply_overrides",
    "format_bytes",
    "is_norm",
    "is_projection",
    "plan_model",
]
