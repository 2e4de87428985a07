"""Selective activation recomputation of the attention core (JAX), and
the per-device memory of a compiled train step.

The attention core (scores, mask, softmax, probabilities x values) keeps
[batch, heads, seq, seq] tensors for backward: per layer more than all the
[batch, seq, hidden] activations together at long sequences (Korthikanti
et al. 2022, 5as/h against 34). Recomputed, only its inputs (q, k, v, the
mask) are kept, and backward runs the core again.

`jax.checkpoint` asks for exactly that, but XLA's CPU compiler drops the
optimization barriers that keep a recomputation apart and merges it back
into the forward pass (common-subexpression elimination), so the memory
stays as it was. Here the recomputation is a `jax.custom_vjp` whose
backward ties its inputs to the incoming gradient (adding a zero computed
from it): XLA can neither merge it with the forward nor schedule it
before the gradient exists, on any backend. The forward is the layer's
own code; results are bitwise those of the core computed once.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp


def attention_layers(model) -> list:
    """Layers with an attention core: Keras's `MultiHeadAttention` and
    KerasHub's attention layers all compute it in `_compute_attention`."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if callable(getattr(type(layer), "_compute_attention", None))
    ]


def _tied(arrays, ct):
    """`arrays` made to depend on the cotangent `ct` without changing a
    value (+ 0, computed from `ct`; floats only: masks pass as they
    are)."""
    leaves = [c for c in jax.tree.leaves(ct) if hasattr(c, "dtype")]
    if not leaves:
        return arrays
    # A reduction, not an element: picking one would gather a head-split
    # gradient onto every device; this costs a 4-byte all-reduce.
    zero = jnp.max(leaves[0] * 0)
    return tuple(
        a + zero.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating)
        else a
        for a in arrays
    )  # fmt: skip


def recomputed(fn):
    """`fn(*arrays)` that keeps only its inputs for backward and runs
    again there.

    Example:

    ```python
    core = recomputed(lambda q, k, v: softmax(q @ k.T) @ v)
    ```
    """

    @jax.custom_vjp
    def run(*arrays):
        return fn(*arrays)

    def fwd(*arrays):
        return fn(*arrays), arrays

    def bwd(arrays, ct):
        _, vjp = jax.vjp(fn, *_tied(arrays, ct))
        return vjp(ct)

    run.defvjp(fwd, bwd)
    return run


def _recomputed_call(original):
    """`original(*args, **kwargs)` with its arrays recomputed; everything
    else (flags, None, Python numbers) passes as a constant."""

    def call(*args, **kwargs):
        leaves, treedef = jax.tree.flatten((args, kwargs))
        where = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
        if not where:
            return original(*args, **kwargs)

        def core(*arrays):
            full = list(leaves)
            for i, a in zip(where, arrays):
                full[i] = a
            a, k = jax.tree.unflatten(treedef, full)
            return original(*a, **k)

        return recomputed(core)(*[leaves[i] for i in where])

    return call


def _check_no_dropout(layer) -> None:
    """Dropout inside the core draws from a seed generator whose state
    update would escape the recomputation: refused, not guessed."""
    rate = getattr(layer, "dropout", None)
    rate = getattr(layer, "_dropout", 0.0) if rate is None else rate
    if rate:
        raise ValueError(
            'recompute="attention" recomputes the attention core in '
            "backward, which needs attention dropout 0 (a dropout mask "
            "inside the core would be drawn again). "
            f"Received: dropout={rate} on {layer.path!r}"
        )


def checked_layers(model) -> list:
    """The model's attention layers, after checking that there is one and
    that none drops attention probabilities (what both engines' recompute
    refuse). Raises ValueError otherwise."""
    layers = attention_layers(model)
    if not layers:
        raise ValueError(
            'recompute="attention" recomputes attention cores, but the '
            "model has no attention layer (none defines "
            "`_compute_attention`). Use recompute=None. Received: "
            f"model {model.name!r}"
        )
    for layer in layers:
        _check_no_dropout(layer)
    return layers


def install(model, journal) -> int:
    """Recompute each attention core in backward; returns how many.

    Example:

    ```python
    install(model, base.Journal())
    ```
    """
    layers = checked_layers(model)
    for layer in layers:
        call = _recomputed_call(layer._compute_attention)
        journal.setattr(layer, "_compute_attention", call)
    return len(layers)


# Measuring ------------------------------------------------------------------


def compile_train_step(model, x, y, *, with_args: bool = False):
    """Keras's train step of `model` (compiled by the user) on `(x, y)`,
    jitted as `fit` jits it (donated state, the state's shardings; see
    `comms/steps.py`), and compiled: a `jax.stages.Compiled`, whose
    `memory_analysis().temp_size_in_bytes` is the activation and
    workspace memory per device and `as_text()` its HLO. `model` is a
    `TensorParallelKeras` or a plain Keras model (one device). With
    `with_args`, `(compiled, state, data)`: `compiled(state, data)` runs
    one step and returns `(logs, state)` (the state is donated).

    Example:

    ```python
    tp.compile(optimizer="adam", loss="mse")
    compiled = compile_train_step(tp, x, y)
    compiled.memory_analysis().temp_size_in_bytes
    ```
    """
    from keras.src.backend.jax.trainer import _distribute_data

    engine = getattr(model, "engine", None)
    with engine.scope() if engine else contextlib.nullcontext():
        for _ in range(2):  # state before and after the symbolic build
            if engine:
                engine.prepare_state(model)
            model._symbolic_build(data_batch=(x, y, None))
        state = model._get_jax_state(
            trainable_variables=True,
            non_trainable_variables=True,
            optimizer_variables=True,
            metrics_variables=True,
        )
        train = jax.jit(
            model.train_step,
            donate_argnums=0,
            out_shardings=(None, model._get_state_sharding_spec()),
        )
        data = _distribute_data((x, y, None))
        compiled = train.lower(state, data).compile()
    return (compiled, state, data) if with_args else compiled
