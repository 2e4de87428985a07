"""Paired training: the same steps on one device and under tensor
parallelism, from the same weights and data, compared step by step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import keras
import numpy as np

from keras_tensor_parallel.catalogue.lm import causal_lm, lm_inputs
from keras_tensor_parallel.verify.checks import (
    Check,
    logical,
    model_gradients,
    scaled_diffs,
)
from keras_tensor_parallel.verify.pairs import build_tp_pair, dtype_policy_scope

__all__ = [
    "TrainingComparison",
    "causal_lm",
    "compare_training",
    "lm_inputs",
    "null_gradient_variables",
    "run_steps",
    "slot_sharding",
]


@dataclasses.dataclass
class TrainingComparison:
    """Result of `compare_training`.

    Attributes:
        losses_single: Per-step training loss on one device.
        losses_tp: Per-step training loss under tensor parallelism.
        max_loss_rel_diff: Worst `|l_tp - l_ref| / |l_ref|` over steps.
        weight_rel_diffs: Per variable, `max|w_tp - w_ref| / max|w_ref|`
            after the last step.
        max_weight_rel_diff: The worst of those, leaving out variables
            whose exact gradient is zero (see `null_gradient_variables`).
        slots_sharded: Every optimizer slot shaped like its parameter has
            the parameter's per-device shard shapes (and at least one
            sharded slot exists).
        slot_detail: Slots checked, sharded slots, mismatches.
        checks: `Check`s for losses, weights and slots.
    """

    losses_single: list
    losses_tp: list
    max_loss_rel_diff: float
    weight_rel_diffs: dict
    max_weight_rel_diff: float
    slots_sharded: bool
    slot_detail: dict
    checks: list

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def _take(x, rows):
    if isinstance(x, dict):
        return {k: v[rows] for k, v in x.items()}
    return x[rows]


def _num_rows(x) -> int:
    if isinstance(x, dict):
        return len(next(iter(x.values())))
    return len(x)


def _check_rows(inputs, rows: int) -> None:
    if _num_rows(inputs) < rows:
        raise ValueError(
            f"inputs need steps * batch_size = {rows} rows. "
            f"Received: {_num_rows(inputs)}"
        )


def run_steps(model, inputs, targets, *, steps, batch_size) -> list:
    """`steps` calls of `train_on_batch`; the per-step losses."""
    losses = []
    for i in range(steps):
        rows = slice(i * batch_size, (i + 1) * batch_size)
        logs = model.train_on_batch(
            _take(inputs, rows), targets[rows], return_dict=True
        )
        losses.append(float(logs["loss"]))
    return losses


def _compile(model, optimizer, loss):
    # keras.Model.compile, not a KerasHub Task's (which adds metrics).
    keras.Model.compile(model, optimizer=optimizer, loss=loss)
    return model


def slot_sharding(tp) -> dict:
    """Compare each optimizer slot's shard shapes with its parameter's.

    Returns:
        `{"checked", "sharded", "mismatched", "split_params"}`: slots shaped
        like their parameter, those of them split, the paths of those
        whose shards differ from their parameter's, and how many of those
        parameters are split at all.
    """
    from keras_tensor_parallel.backends.base import slot_owner

    params = list(tp.wrapped_model.variables)
    checked, sharded, split, mismatched = 0, 0, set(), []
    for slot in tp.optimizer.variables:
        param = slot_owner(slot, params)
        if param is None or tuple(slot.shape) != tuple(param.shape):
            continue  # e.g. Adafactor's factored row/column statistics
        checked += 1
        want = tp.engine.shard_shapes(param)
        if want[0] != tuple(param.shape):
            split.add(param.path)
        if tp.engine.shard_shapes(slot) != want:
            mismatched.append(slot.path)
        elif want[0] != tuple(param.shape):
            sharded += 1
    return {
        "checked": checked,
        "sharded": sharded,
        "mismatched": mismatched,
        "split_params": len(split),
    }


def _slots_check(tp) -> Check:
    slots = slot_sharding(tp)
    if not slots["mismatched"] and not slots["split_params"]:
        # No parameter with slots is split (e.g. nothing divides by N, or
        # plain SGD): there is nothing to compare.
        return Check.not_applicable(
            "optimizer_slots", "no split parameter has optimizer slots", slots
        )
    ok = not slots["mismatched"] and slots["sharded"] > 0
    return Check("optimizer_slots", ok, float(not ok), 0.0, slots)


def null_gradient_variables(model, inputs, targets, loss, rtol=1e-6):
    """Variables whose gradient is zero in exact arithmetic (e.g. attention
    key biases: softmax ignores a per-query shift), found as
    `max|g| <= rtol * max over all |g|` on one batch.

    Their float32 gradient is rounding noise; adaptive optimizers (Adam,
    RMSprop, Lion) normalize it into full-size steps of random sign, so
    their weights are not comparable between any two summation orders.
    """
    loss_obj = keras.losses.get(loss)

    def scalar_loss(out):
        return jnp.mean(loss_obj(targets, out))

    grads = model_gradients(model, inputs, scalar_loss)
    peaks = {k: float(np.max(np.abs(np.asarray(g)))) for k, g in grads.items()}
    top = max(peaks.values())
    return {k for k, p in peaks.items() if p <= rtol * top}


def _weight_diffs(reference, tp) -> dict:
    """Per variable, `max|w_tp - w_ref| / max|w_ref|`."""
    ref_w = {v.path: np.asarray(v) for v in reference.trainable_variables}
    # Paired by position: auto-generated layer names differ between builds.
    tp_w = {
        r.path: logical(v, ref_w[r.path].shape)
        for r, v in zip(
            reference.trainable_variables,
            tp.wrapped_model.trainable_variables,
        )
    }
    return {
        k: d / max(s, 1e-30) for k, (d, s) in scaled_diffs(ref_w, tp_w).items()
    }


def compare_training(
    model_fn: Callable[[], keras.Model],
    world_size: int,
    *,
    inputs,
    targets,
    loss,
    optimizer_fn: Callable[[], keras.optimizers.Optimizer],
    steps: int = 10,
    batch_size: int = 2,
    seed: int = 0,
    dtype_policy=None,
    loss_rtol: float = 1e-5,
    weight_rtol: float = 1e-4,
    tensor_parallel_size: int | None = None,
    **activations,
) -> TrainingComparison:
    """Train a single-device model and an independently built TP model.

    Both start from the same weights (`pairs.build_pair`) and RNG state, take
    `steps` `train_on_batch` steps on the same rows, and are compared per
    step (loss) and per variable (weights after the last step).

    Args:
        model_fn: Builds the model (called twice, under `seed`).
        world_size: Devices for the TP run.
        inputs: Model inputs, `steps * batch_size` rows (array or dict).
        targets, loss: Labels (same rows), a Keras loss (name or object).
        optimizer_fn: Returns a fresh optimizer (one per model).
        dtype_policy: e.g. `"float64"` or `"mixed_bfloat16"` while building.
        loss_rtol, weight_rtol: Bounds for the checks.
        tensor_parallel_size, activations: The model axis (default
            `world_size`), `sequence_parallel` and `recompute`.

    Example:

    ```python
    x, y = lm_batches(stdlib_corpus(50_000), batch_size=2, seq_len=16, steps=10)
    result = compare_training(
        lm_builder(catalogue.get("opt-125m:tiny")), 2, inputs=lm_inputs(x),
        targets=y, loss="sparse_categorical_crossentropy",
        optimizer_fn=lambda: keras.optimizers.Adam(1e-3))
    ```
    """
    _check_rows(inputs, steps * batch_size)
    kw = {"dtype_policy": dtype_policy, "seed": seed, **activations}
    kw = {**kw, "tensor_parallel_size": tensor_parallel_size}
    reference, tp = build_tp_pair(model_fn, world_size, **kw)
    first = slice(0, batch_size)
    null = null_gradient_variables(
        reference, _take(inputs, first), targets[first], loss
    )
    # Trained under the policy they were built with (float64 loss trackers).
    with dtype_policy_scope(dtype_policy):
        losses = [
            run_steps(_compile(m, optimizer_fn(), loss), inputs, targets,
                      steps=steps, batch_size=batch_size)
            for m in (reference, tp)
        ]  # fmt: skip
    return _comparison(reference, tp, *losses, null, loss_rtol, weight_rtol)


def _comparison(reference, tp, losses_ref, losses_tp, null, loss_rtol,
                weight_rtol) -> TrainingComparison:  # fmt: skip
    """Losses per step, weights after the last step, optimizer slots."""
    rel = [
        abs(a - b) / max(abs(a), 1e-30) for a, b in zip(losses_ref, losses_tp)
    ]
    weight_rel = _weight_diffs(reference, tp)
    slots = _slots_check(tp)
    max_w = max(v for k, v in weight_rel.items() if k not in null)
    detail = {"rel": weight_rel, "excluded_null_gradient": sorted(null)}
    checks = [
        Check.of("loss_per_step", max(rel), loss_rtol, {"rel": rel}),
        Check.of("weights", max_w, weight_rtol, detail),
        slots,
    ]
    return TrainingComparison(
        losses_single=losses_ref,
        losses_tp=losses_tp,
        max_loss_rel_diff=max(rel),
        weight_rel_diffs=weight_rel,
        max_weight_rel_diff=max_w,
        slots_sharded=slots.passed,
        slot_detail=slots.detail,
        checks=checks,
    )
