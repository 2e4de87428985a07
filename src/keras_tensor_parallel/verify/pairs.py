"""Paired models: a single-device reference and an independently built
candidate holding the same weights, the starting point of every check."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import keras
import numpy as np


def require_jax(what: str) -> None:
    """Raise unless Keras runs on JAX: the checks and the collective
    accounting compile and read XLA programs.

    Example:

    ```python
    require_jax("keras-tp verify")
    ```
    """
    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            f"{what} needs the JAX backend (it compiles and reads XLA "
            "programs): run it with KERAS_BACKEND=jax. Received: "
            f"KERAS_BACKEND={backend!r}"
        )


@contextlib.contextmanager
def dtype_policy_scope(policy):
    """Set the global Keras dtype policy for the block (None: unchanged)."""
    if policy is None:
        yield
        return
    old, old_floatx = keras.config.dtype_policy(), keras.config.floatx()
    keras.config.set_dtype_policy(policy)
    if policy == "float64":
        keras.config.set_floatx("float64")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(old)
        keras.config.set_floatx(old_floatx)


def build_pair(build: Callable[[], keras.Model], *, seed: int = 0):
    """Two independently built models with identical weights.

    Returns:
        `(reference, candidate, weights)`: the reference stays on one
        device; the candidate is the one to wrap.

    Example:

    ```python
    reference, candidate, _ = build_pair(catalogue.seed_mlp)
    ```
    """
    keras.utils.set_random_seed(seed)
    reference = build()
    weights = reference.get_weights()
    candidate = build()
    candidate.set_weights(weights)
    return reference, candidate, weights


def build_tp_pair(
    model_fn: Callable[[], keras.Model],
    world_size: int,
    *,
    seed: int = 0,
    dtype_policy=None,
    tensor_parallel_size: int | None = None,
    sequence_parallel: bool = False,
    recompute: str | None = None,
):
    """`(reference, tp)`: a single-device model and an independently built
    `TensorParallelKeras` with the same weights and RNG seed state, on a
    `(data, model=tensor_parallel_size)` mesh (default: model=world_size),
    with `sequence_parallel` / `recompute` as `TensorParallelKeras` takes
    them.

    Example:

    ```python
    reference, tp = build_tp_pair(catalogue.seed_mlp, 2)
    ```
    """
    from keras_tensor_parallel.model import TensorParallelKeras

    require_jax("The verify checks")
    with dtype_policy_scope(dtype_policy):
        reference, candidate, _ = build_pair(model_fn, seed=seed)
    # Seed-generator states are not weights; copy them so dropout matches.
    for ref_v, cand_v in zip(reference.variables, candidate.variables):
        if ref_v.path.endswith("seed_generator_state"):
            cand_v.assign(np.array(ref_v.value))
    tp = TensorParallelKeras(
        candidate,
        world_size=world_size,
        tensor_parallel_size=tensor_parallel_size,
        sequence_parallel=sequence_parallel,
        recompute=recompute,
    )
    return reference, tp
