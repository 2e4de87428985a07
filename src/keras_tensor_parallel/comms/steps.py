"""Compile the steps `fit` and `predict` run, and return their HLO text.

The train step is the trainer's own stateless `train_step(state, data)`,
jitted exactly as `keras/src/backend/jax/trainer.py` jits it (donated state,
state out-shardings from the distribution), inside the plan's distribution
scope: the HLO is what `fit` executes.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import keras
import numpy as np
from keras.src import tree
from keras.src.backend.jax.trainer import _distribute_data


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """HLO text and compile seconds of the train and forward steps."""

    train_hlo: str
    forward_hlo: str
    train_compile_s: float
    forward_compile_s: float


def example_inputs(model, *, batch_size: int = 2, seq_len: int = 16):
    """A batch matching `model.input`: ones for integer inputs (valid token,
    segment and mask values for any vocabulary), seeded normals otherwise."""
    rng = np.random.RandomState(0)

    def make(t):
        shape = [batch_size] + [
            seq_len if d is None else int(d) for d in t.shape[1:]
        ]
        if "int" in str(t.dtype) or "bool" in str(t.dtype):
            return np.ones(shape, keras.backend.standardize_dtype(t.dtype))
        return rng.randn(*shape).astype("float32")

    return tree.map_structure(make, _structure(model, "input"))


def example_targets(model, *, batch_size: int = 2, seq_len: int = 16):
    """Zeros shaped like `model.output` (a regression target for MSE)."""

    def make(t):
        shape = [batch_size] + [
            seq_len if d is None else int(d) for d in t.shape[1:]
        ]
        return np.zeros(shape, keras.backend.standardize_dtype(t.dtype))

    return tree.map_structure(make, _structure(model, "output"))


def _structure(model, which: str):
    """`model.input` / `model.output`: the nested structure. A Sequential
    that was never called has none, only its flat `inputs` / `outputs`."""
    try:
        return getattr(model, which)
    except AttributeError:
        flat = getattr(model, which + "s")
        return flat[0] if len(flat) == 1 else flat


def default_loss(y):
    """`"mse"` for every output (dict outputs get a dict of losses)."""
    if isinstance(y, dict):
        return {k: "mse" for k in y}
    return "mse"


def _compile(fn, *args) -> tuple[str, float]:
    start = time.perf_counter()
    text = fn.lower(*args).compile().as_text()
    return text, time.perf_counter() - start


def compile_steps(tp, x, y) -> CompiledSteps:
    """Compile `tp`'s train step on `(x, y)` and forward step on `x`.

    `tp` must be compiled (`tp.compile(...)`); its optimizer and metric state
    are built and placed on the mesh first, as `fit` would.
    """
    with tp.engine.scope():
        tp.engine.prepare_state(tp)
        tp._symbolic_build(data_batch=(x, y, None))
        tp.engine.prepare_state(tp)
        if getattr(tp, "_tp_zero_stage", 0):  # as `fit` lays slots out
            from keras_tensor_parallel.backends import jax_zero

            jax_zero.shard_optimizer_state(tp)
        state = tp._get_jax_state(
            trainable_variables=True,
            non_trainable_variables=True,
            optimizer_variables=True,
            metrics_variables=True,
        )
        data = _distribute_data((x, y, None))
        train = jax.jit(
            tp.train_step,
            donate_argnums=0,
            out_shardings=(None, tp._get_state_sharding_spec()),
        )
        train_hlo, train_s = _compile(train, state, data)
        forward = jax.jit(tp.predict_step)
        fwd_hlo, fwd_s = _compile(forward, state[:2], _distribute_data((x,)))
    return CompiledSteps(train_hlo, fwd_hlo, train_s, fwd_s)
