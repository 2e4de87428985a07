"""clipnorm / global_clipnorm with full norms across ranks, for the
one-process-per-device engines (torch, TensorFlow).

A split variable's gradient is a shard: its squared norm is all-reduced;
a replicated variable's is counted once (every rank holds all of it).
Written with `keras.ops`; each engine passes its all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from keras_tensor_parallel.backends.roles import is_split


def _identity(x):
    return x


def install_clipping(
    optimizer, all_reduce: Callable, dense: Callable = _identity
) -> None:
    """Make clipnorm/global_clipnorm use full (all-reduced) norms.

    Args:
        optimizer: A Keras optimizer (patched in place, once).
        all_reduce: Sum of a scalar tensor over every rank.
        dense: A gradient as a dense tensor (TensorFlow's embedding
            gradients are `IndexedSlices`).

    Example:

    ```python
    install_clipping(model.optimizer, tc.all_reduce)
    ```
    """
    if getattr(optimizer, "_tp_clipping", False):
        return
    apply = optimizer._backend_apply_gradients
    clip = optimizer._clip_gradients
    # The variables of the current update live in this closure, NOT in an
    # optimizer attribute: Keras tracks a list of variables assigned to a
    # tracked object, so the model's variables would be listed again in
    # `optimizer.variables` (and saved with the optimizer state).
    current: dict = {"variables": None}

    def tp_apply(grads, trainable_variables):
        # Called after empty gradients were filtered: the lists align.
        current["variables"] = list(trainable_variables)
        try:
            return apply(grads, trainable_variables)
        finally:
            current["variables"] = None

    def tp_clip(grads):
        variables = current["variables"]
        if not variables or len(variables) != len(grads):
            return clip(grads)
        if not (optimizer.clipnorm or optimizer.global_clipnorm):
            return clip(grads)
        grads = [None if gr is None else dense(gr) for gr in grads]
        if optimizer.clipnorm and optimizer.clipnorm > 0:
            return [
                _clip_one(gr, v, optimizer.clipnorm, all_reduce)
                for gr, v in zip(grads, variables)
            ]
        if optimizer.global_clipnorm and optimizer.global_clipnorm > 0:
            return _clip_global(
                grads, variables, optimizer.global_clipnorm, all_reduce
            )
        return clip(grads)

    optimizer._backend_apply_gradients = tp_apply
    optimizer._clip_gradients = tp_clip
    optimizer._tp_clipping = True


def _sq(grad):
    return keras.ops.sum(keras.ops.square(keras.ops.cast(grad, "float32")))


def _sq_norm(grads, variables, split: bool):
    total = keras.ops.zeros((), "float32")
    for gr, v in zip(grads, variables):
        if gr is not None and is_split(v) == split:
            total = total + _sq(gr)
    return total


def _scaled(grad, norm, clipnorm):
    scale = clipnorm / keras.ops.maximum(norm, clipnorm)
    return grad * keras.ops.cast(scale, grad.dtype)


def _clip_global(grads, variables, clipnorm, all_reduce):
    split = all_reduce(_sq_norm(grads, variables, True))
    norm = keras.ops.sqrt(split + _sq_norm(grads, variables, False))
    return [None if gr is None else _scaled(gr, norm, clipnorm) for gr in grads]


def _clip_one(grad, variable, clipnorm, all_reduce):
    if grad is None:
        return None
    sq = _sq(grad)
    if is_split(variable):
        sq = all_reduce(sq)
    return _scaled(grad, keras.ops.sqrt(sq), clipnorm)
