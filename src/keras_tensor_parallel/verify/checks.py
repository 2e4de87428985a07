"""Fidelity checks: a tensor-parallel model against an independently built
single-device model with the same weights.

Every check returns a `Check`; the CLI renders them and tests assert
`.passed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_tensor_parallel import zoo


@dataclasses.dataclass
class Check:
    """One measured figure against its threshold.

    Attributes:
        name: What was checked ("gradients", "memory", ...).
        passed: `value <= threshold`.
        value: The measured figure (e.g. worst scaled max abs diff).
        threshold: The bound it had to meet.
        detail: Per-variable figures and context, JSON-friendly.
    """

    name: str
    passed: bool
    value: float
    threshold: float
    detail: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, name, value, threshold, detail=None) -> Check:
        value = float(value)
        return cls(name, value <= threshold, value, threshold, detail or {})


# Building a pair ------------------------------------------------------------


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


def build_tp_pair(
    model_fn: Callable[[], keras.Model],
    world_size: int,
    *,
    seed: int = 0,
    dtype_policy=None,
):
    """`(reference, tp)`: a single-device model and an independently built
    `TensorParallelKeras` with the same weights and RNG seed state."""
    from keras_tensor_parallel.model import TensorParallelKeras

    with dtype_policy_scope(dtype_policy):
        reference, candidate, _ = zoo.build_pair(model_fn, seed=seed)
    # Seed-generator states are not weights; copy them so dropout matches.
    for ref_v, cand_v in zip(reference.variables, candidate.variables):
        if ref_v.path.endswith("seed_generator_state"):
            cand_v.assign(np.array(ref_v.value))
    tp = TensorParallelKeras(candidate, world_size=world_size)
    return reference, tp


def logical(array, shape) -> np.ndarray:
    """`array` as numpy, cut to `shape` (drops vocab padding)."""
    out = np.asarray(array)
    return out[tuple(slice(0, n) for n in shape)]


def scaled_diffs(reference: dict, candidate: dict) -> dict:
    """{path: (max abs diff, max |reference|)} over matching paths."""
    out = {}
    for path, ref in reference.items():
        ref = np.asarray(ref, dtype=np.float64)
        got = np.asarray(candidate[path], dtype=np.float64)
        if ref.shape != got.shape:
            raise AssertionError(f"{path}: {ref.shape} vs {got.shape}")
        diff = float(np.max(np.abs(ref - got))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        out[path] = (diff, scale)
    return out


# Forward ---------------------------------------------------------------------


def _flat_outputs(out) -> list:
    return [np.asarray(t) for t in jax.tree_util.tree_leaves(out)]


def compare_forward(
    model_fn, world_size: int, *, inputs, seed: int = 0, threshold=1e-5
) -> Check:
    """Forward outputs of the TP model vs the single-device model.

    `value` is max abs diff / max(1, max |reference output|).

    Example:

    ```python
    x = zoo.get("opt-125m").inputs(batch=2, seq=16)
    check = compare_forward(lambda: zoo.opt(num_layers=2), 2, inputs=x)
    ```
    """
    reference, tp = build_tp_pair(model_fn, world_size, seed=seed)
    ref_out = _flat_outputs(reference(inputs, training=False))
    with tp.engine.scope():
        tp_out = _flat_outputs(tp(inputs, training=False))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ref_out, tp_out))
    scale = max(1.0, max(float(np.max(np.abs(a))) for a in ref_out))
    return Check.of(
        "forward",
        diff / scale,
        threshold,
        {"max_abs_diff": diff, "world_size": world_size},
    )


# Gradients -------------------------------------------------------------------


def default_loss(outputs):
    """Mean of squares over every float output (any model, no labels)."""
    leaves = jax.tree_util.tree_leaves(outputs)
    return sum(jnp.mean(jnp.square(t.astype("float32"))) for t in leaves)


def model_gradients(model, inputs, loss_fn) -> dict:
    """{path: gradient} of `loss_fn(model(inputs))` via one jitted grad."""
    trainable = [v.value for v in model.trainable_variables]
    others = [v.value for v in model.non_trainable_variables]

    def loss(trainable, others, inputs):
        out, _ = model.stateless_call(trainable, others, inputs)
        return loss_fn(out)

    grads = jax.jit(jax.grad(loss))(trainable, others, inputs)
    return {v.path: g for v, g in zip(model.trainable_variables, grads)}


def compare_gradients(
    model_fn,
    world_size: int,
    *,
    inputs,
    seed: int = 0,
    loss_fn=None,
    threshold: float = 1e-5,
    dtype_policy=None,
) -> Check:
    """Every variable's gradient, TP (gathered, unpadded) vs single device.

    Per variable, `max|g_tp - g_ref| / max(1, max|g_ref|)`; `value` is the
    worst. `detail["per_variable"]` maps path -> max abs diff (a histogram's
    data), `detail["scaled"]` path -> the scaled figure.

    Example:

    ```python
    x = zoo.get("gpt2").inputs(batch=2, seq=16)
    check = compare_gradients(lambda: zoo.gpt2(num_layers=2), 2, inputs=x)
    assert check.passed
    ```
    """
    loss_fn = loss_fn or default_loss
    reference, tp = build_tp_pair(
        model_fn, world_size, seed=seed, dtype_policy=dtype_policy
    )
    ref = model_gradients(reference, inputs, loss_fn)
    ref = {k: np.asarray(g) for k, g in ref.items()}
    inner = tp.wrapped_model
    with tp.engine.scope():
        got = model_gradients(inner, inputs, loss_fn)
    # Paired by position: auto-generated layer names differ between builds.
    got = {k: logical(g, ref[k].shape) for k, g in zip(ref, got.values())}
    diffs = scaled_diffs(ref, got)
    scaled = {k: d / max(1.0, s) for k, (d, s) in diffs.items()}
    worst = max(scaled, key=scaled.get)
    return Check.of(
        "gradients",
        scaled[worst],
        threshold,
        {
            "per_variable": {k: d for k, (d, _) in diffs.items()},
            "scaled": scaled,
            "worst_variable": worst,
            "max_abs_reference_grad": max(s for _, s in diffs.values()),
            "world_size": world_size,
        },
    )


# Memory ----------------------------------------------------------------------


def _nbytes(variables) -> int:
    return int(
        sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)
    )


def memory_check(
    model_fn,
    world_size: int,
    *,
    optimizer="adam",
    seed: int = 0,
    slack: float = 1.01,
) -> Check:
    """Per-device bytes of parameters + optimizer state vs Megatron's ideal.

    Bytes are read from each array's addressable shards. The ideal splits
    every sharded variable (and its same-shape slots) exactly by N and keeps
    the rest whole. `value` is the worst device's fraction of the
    single-device bytes; `threshold` is `ideal * slack`.

    Example:

    ```python
    check = memory_check(lambda: zoo.opt(num_layers=2), 2)
    print(check.detail["measured_fraction"], check.detail["ideal_fraction"])
    ```
    """
    from keras_tensor_parallel.backends import jax as engine_lib
    from keras_tensor_parallel.model import TensorParallelKeras

    keras.utils.set_random_seed(seed)
    model = model_fn()
    params = list(model.trainable_variables)
    single_opt = keras.optimizers.get(optimizer)
    single_opt.build(params)
    single_params_bytes = _nbytes(params)
    single_opt_bytes = _nbytes(single_opt.variables)
    single = single_params_bytes + single_opt_bytes
    del single_opt

    sizes = {v.path: _nbytes([v]) for v in params}
    tp = TensorParallelKeras(model, world_size=world_size)
    sharded = {e.path for e in tp.plan if any(e.axes)}
    param_ideal = sum(
        size / world_size if path in sharded else size
        for path, size in sizes.items()
    )
    opt = keras.optimizers.get(optimizer)
    with tp.engine.scope():
        opt.build(tp.trainable_variables)
    engine_lib.place_state(opt.variables, tp.engine.mesh, tp.engine._references)
    slot_ideal = 0.0
    by_key = {p.replace("/", "_"): p for p in sizes}
    for v in opt.variables:
        size = _nbytes([v])
        ref = _slot_reference(v, by_key)
        same = ref is not None and v.shape == tuple(
            engine_lib.logical_shape(_var(tp, ref))
        )
        slot_ideal += size / world_size if same and ref in sharded else size
    ideal_fraction = (param_ideal + slot_ideal) / single
    p_dev = engine_lib.per_device_bytes(tp.trainable_variables)
    o_dev = engine_lib.per_device_bytes(opt.variables)
    totals = {d: p_dev.get(d, 0) + o_dev.get(d, 0) for d in p_dev}
    measured = max(totals.values()) / single
    return Check.of(
        "memory",
        measured,
        ideal_fraction * slack,
        {
            "world_size": world_size,
            "optimizer": str(optimizer),
            "per_device_params_bytes": p_dev,
            "per_device_optimizer_bytes": o_dev,
            "single_device_params_bytes": single_params_bytes,
            "single_device_optimizer_bytes": single_opt_bytes,
            "single_device_bytes": single,
            "ideal_fraction": ideal_fraction,
            "measured_fraction": measured,
        },
    )


def _slot_reference(v, by_key):
    name = v.path.split("/")[-1]
    best = None
    for key, path in by_key.items():
        if name.startswith(key + "_") and (
            best is None or len(key) > len(best[0])
        ):
            best = (key, path)
    return None if best is None else best[1]


def _var(tp, path):
    for v in tp.trainable_variables:
        if v.path == path:
            return v
    raise KeyError(path)
