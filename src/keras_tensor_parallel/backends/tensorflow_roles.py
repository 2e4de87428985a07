"""Megatron roles on TensorFlow: the backend-neutral styles of `roles.py`
with TensorFlow's collectives (`tensorflow_collectives.py`: f and g as
`tf.custom_gradient` functions, uneven gathers through
`CollectiveGatherV2`).

Everything about what a role splits and computes lives in `roles.py`;
this module only says how TensorFlow detaches, slices and gathers
tensors, and offers the names the TensorFlow engine uses.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_tensor_parallel.backends import roles
from keras_tensor_parallel.backends import tensorflow_collectives as tc
from keras_tensor_parallel.backends.roles import (  # noqa: F401
    Region,
    Shard,
    Style,
    full_value,
    is_split,
    unsplit_variable,
)
from keras_tensor_parallel.plan import Role


class TensorflowCollectives:
    """`roles.Collectives` on the cluster `TF_CONFIG` describes."""

    f = staticmethod(tc.f)
    g = staticmethod(tc.g)
    gather_last = staticmethod(tc.gather_last)
    gather_dim = staticmethod(tc.gather_dim)

    @staticmethod
    def is_tensor(x) -> bool:
        return tf.is_tensor(x)

    @staticmethod
    def detach(value):
        return tf.stop_gradient(tf.convert_to_tensor(value))

    @staticmethod
    def take(value, dim: int, start: int, stop: int):
        begin = [0] * len(value.shape)
        size = [-1] * len(value.shape)
        begin[dim], size[dim] = start, stop - start
        return tf.identity(tf.slice(value, begin, size))

    @staticmethod
    def to_numpy(value) -> np.ndarray:
        return np.asarray(tf.convert_to_tensor(value).numpy())


COLLECTIVES = TensorflowCollectives()
STYLES: dict[Role, Style] = roles.make_styles(COLLECTIVES)


def split_variable(variable, dim: int, rank: int, size: int) -> None:
    """Keep only this rank's shard of `variable` along `dim`, in place."""
    roles.split_variable(variable, dim, rank, size, COLLECTIVES)


def style_for(role: Role | str) -> Style:
    """The style object of a role."""
    return STYLES[Role(role)]


def layer_style(entries) -> Style:
    """The style that runs a layer, from its variables' plan entries."""
    return roles.layer_style(entries, STYLES)
