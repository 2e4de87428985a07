"""Fidelity checks: a tensor-parallel model against an independently built
single-device model with the same weights.

Every check returns a `Check`; the CLI renders them and tests assert
`.passed`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_tensor_parallel.verify.pairs import build_tp_pair, require_jax


@dataclasses.dataclass
class Check:
    """One measured figure against its threshold.

    Attributes:
        name: What was checked ("gradients", "memory", ...).
        passed: `value <= threshold`.
        value: The measured figure (e.g. worst scaled max abs diff).
        threshold: The bound it had to meet.
        detail: Per-variable figures and context, JSON-friendly.
        skipped: Nothing to check (e.g. no variable is split at this
            world size); reported as "n/a", never as a failure.
    """

    name: str
    passed: bool
    value: float
    threshold: float
    detail: dict = dataclasses.field(default_factory=dict)
    skipped: bool = False

    @classmethod
    def of(cls, name, value, threshold, detail=None) -> Check:
        value = float(value)
        return cls(name, value <= threshold, value, threshold, detail or {})

    @classmethod
    def not_applicable(cls, name: str, reason: str, detail=None) -> Check:
        """A check with nothing to check; `detail["reason"]` says why."""
        detail = {**(detail or {}), "reason": reason}
        return cls(name, True, 0.0, 0.0, detail, skipped=True)


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
    model_fn,
    world_size: int,
    *,
    inputs,
    seed: int = 0,
    threshold=1e-5,
    tensor_parallel_size: int | None = None,
    **activations,
) -> Check:
    """Forward outputs of the TP model vs the single-device model
    (`activations`: `sequence_parallel`, `recompute` for the TP model).

    `value` is max abs diff / max(1, max |reference output|).

    Example:

    ```python
    spec = catalogue.get("opt-125m:tiny")
    check = compare_forward(spec.build, 2, inputs=spec.inputs(2, 16))
    ```
    """
    reference, tp = build_tp_pair(
        model_fn,
        world_size,
        seed=seed,
        tensor_parallel_size=tensor_parallel_size,
        **activations,
    )
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
    tensor_parallel_size: int | None = None,
    **activations,
) -> Check:
    """Every variable's gradient, TP (gathered, unpadded) vs single device
    (`activations`: `sequence_parallel`, `recompute` for the TP model).

    Per variable, `max|g_tp - g_ref| / max(1, max|g_ref|)`; `value` is the
    worst. `detail["per_variable"]` maps path -> max abs diff (a histogram's
    data), `detail["scaled"]` path -> the scaled figure.

    Example:

    ```python
    spec = catalogue.get("gpt2:tiny")
    check = compare_gradients(spec.build, 2, inputs=spec.inputs(2, 16))
    assert check.passed
    ```
    """
    loss_fn = loss_fn or default_loss
    reference, tp = build_tp_pair(
        model_fn,
        world_size,
        seed=seed,
        dtype_policy=dtype_policy,
        tensor_parallel_size=tensor_parallel_size,
        **activations,
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
    tensor_parallel_size: int | None = None,
) -> Check:
    """Per-device bytes of parameters + optimizer state vs Megatron's ideal.

    Bytes are read from each array's addressable shards. The ideal splits
    every sharded variable (and its same-shape slots) exactly by N and keeps
    the rest whole. `value` is the worst device's fraction of the
    single-device bytes; `threshold` is `ideal * slack`.

    Example:

    ```python
    check = memory_check(catalogue.get("opt-125m:tiny").build, 2)
    print(check.detail["measured_fraction"], check.detail["ideal_fraction"])
    ```
    """
    from keras_tensor_parallel.model import TensorParallelKeras

    require_jax("The memory check")
    keras.utils.set_random_seed(seed)
    model = model_fn()
    single = _single_device_bytes(model, optimizer)
    tp = TensorParallelKeras(
        model, world_size=world_size, tensor_parallel_size=tensor_parallel_size
    )
    opt = keras.optimizers.get(optimizer)
    with tp.engine.scope():
        opt.build(tp.trainable_variables)
    tp.engine.place_state(opt.variables)
    ideal = _ideal_bytes(tp, opt.variables)
    p_dev = tp.engine.per_device_bytes(tp.trainable_variables)
    o_dev = tp.engine.per_device_bytes(opt.variables)
    totals = {d: p_dev.get(d, 0) + o_dev.get(d, 0) for d in p_dev}
    measured = max(totals.values()) / single["total"]
    ideal_fraction = ideal / single["total"]
    return Check.of(
        "memory",
        measured,
        ideal_fraction * slack,
        {
            "world_size": world_size,
            "optimizer": str(optimizer),
            "per_device_params_bytes": p_dev,
            "per_device_optimizer_bytes": o_dev,
            "single_device_params_bytes": single["params"],
            "single_device_optimizer_bytes": single["optimizer"],
            "single_device_bytes": single["total"],
            "ideal_fraction": ideal_fraction,
            "measured_fraction": measured,
        },
    )


def _single_device_bytes(model, optimizer) -> dict:
    params = list(model.trainable_variables)
    opt = keras.optimizers.get(optimizer)
    opt.build(params)
    out = {"params": _nbytes(params), "optimizer": _nbytes(opt.variables)}
    out["total"] = out["params"] + out["optimizer"]
    return out


def _ideal_bytes(tp, slots) -> float:
    """Megatron's ideal: split variables and their same-shape slots divided
    by N, everything else whole; plus the cost the plan states for what
    does not divide (padded heads or vocab rows, kv heads held by several
    devices): a split variable counts at its plan's per-device shape."""
    from keras_tensor_parallel.backends.base import slot_owner

    plan = {e.path: e for e in tp.plan}
    params = list(tp.trainable_variables)
    n = tp.plan.world_size  # the model axis (data replicas hold copies)

    def ideal(path, shape, dtype) -> float:
        entry = plan[path]
        if entry.is_split:
            shape = entry.per_device_shape(n)
        return float(np.prod(shape)) * np.dtype(dtype).itemsize

    total = sum(ideal(v.path, plan[v.path].shape, v.dtype) for v in params)
    for slot in slots:
        owner = slot_owner(slot, params)
        entry = plan[owner.path] if owner is not None else None
        if entry and tuple(slot.shape) in (entry.shape, entry.storage_shape):
            total += ideal(owner.path, slot.shape, slot.dtype)
        else:
            total += _nbytes([slot])
    return total
