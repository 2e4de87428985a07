"""Generalization sweep: TensorParallelKeras on models no other test names.

Each case (tests/generalization_cases.py) is a small model (random
weights, nothing downloaded) checked at N=2 and, where its dims allow, N=4:

- `plan_model` works and gives every variable a reason;
- the TP forward matches an independently built single-device reference;
- the compiled forward gathers no split weight;
- two `train_on_batch` steps leave the same weights as a reference fit;
- a wrap that fails half-way leaves the model exactly as it was.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
from generalization_cases import CASES, INSIDE_EXPERTS, moe_block, own_weights
from helpers import (
    forward_hlo,
    max_abs_diff,
    rel_tol,
    split_dim_shards_ok,
    weight_gathers,
)

from keras_tensor_parallel import TensorParallelKeras, plan_model, zoo
from keras_tensor_parallel.plan import Role
from keras_tensor_parallel.verify.checks import model_gradients

# Checks ------------------------------------------------------------------


def _flat(out):
    return [np.asarray(t, "float32") for t in keras.tree.flatten(out)]


def _build_pair(case):
    old = keras.config.dtype_policy()
    if case.policy:
        keras.config.set_dtype_policy(case.policy)
    try:
        reference, candidate, _ = zoo.build_pair(case.build, seed=0)
    finally:
        keras.config.set_dtype_policy(old)
    # Seed-generator states are not weights: copy them so dropout matches.
    for r, c in zip(reference.variables, candidate.variables):
        if r.path.endswith("seed_generator_state"):
            c.assign(np.asarray(r))
    return reference, candidate


def check_plan(case, n, model=None):
    if model is None:
        keras.utils.set_random_seed(0)
        model = case.build()
    plan = plan_model(model, n)
    assert len(plan.variables) == len(model.variables)
    missing = [e.path for e in plan if not e.reason]
    assert missing == [], f"variables without a reason: {missing}"
    if case.expect_split:
        assert plan.split, "the plan split nothing"
    return plan


def check_forward_and_fit(case, n):
    reference, candidate = _build_pair(case)
    x = case.inputs(4)
    expected = _flat(reference(x, training=False))
    tp = TensorParallelKeras(candidate, world_size=n)
    got = _flat(tp(x, training=False))
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        diff = max_abs_diff(g, e)
        assert diff <= rel_tol(e, case.ftol), f"forward diff {diff}"

    assert weight_gathers(tp, forward_hlo(tp, x)) == []

    # Two fit steps: the same weights as a single-device fit.
    xs = case.inputs(4, seed=1)
    ys = keras.tree.map_structure(
        lambda e: np.random.RandomState(2).randn(4, *e.shape[1:]), expected
    )
    if len(ys) > 1:
        ys = keras.tree.pack_sequence_as(reference.output, ys)
    else:
        ys = ys[0]
    loss = keras.losses.MeanSquaredError()
    if case.lm:
        ys = xs["token_ids"]
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    null = _null_gradients(reference, case.inputs(2, seed=1), ys, loss)
    for model in (reference, tp):
        keras.Model.compile(
            model,
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
            loss=loss,
        )
        model.fit(xs, ys, batch_size=2, epochs=1, shuffle=False, verbose=0)
    worst, where = 0.0, None
    for r, t in zip(
        reference.trainable_variables, tp.wrapped_model.trainable_variables
    ):
        if r.path in null:
            continue
        ref = np.asarray(r, "float64")
        got_w = np.asarray(t, "float64")[tuple(slice(0, s) for s in ref.shape)]
        scale = max(float(np.max(np.abs(ref))), 1e-30)
        rel = float(np.max(np.abs(ref - got_w))) / scale
        if rel > worst:
            worst, where = rel, r.path
    assert worst <= case.wtol, f"weights after fit: rel {worst} at {where}"
    return tp


def _null_gradients(model, x, y, loss_fn, rtol=1e-6):
    """Variables whose gradient is zero in exact arithmetic (attention key
    biases): Adam turns their rounding noise into full steps of random
    sign, so no two summation orders agree on them."""
    targets = keras.tree.flatten(y)
    rows = len(keras.tree.flatten(x)[0])

    def loss(out):
        return sum(
            keras.ops.mean(loss_fn(t[:rows], o))
            for o, t in zip(keras.tree.flatten(out), targets)
        )

    grads = model_gradients(model, x, loss)
    peaks = {k: float(np.max(np.abs(np.asarray(g)))) for k, g in grads.items()}
    top = max(peaks.values())
    return {k for k, p in peaks.items() if p <= rtol * top}


def snapshot(model):
    return [
        (v.path, tuple(v.shape), str(v.value.sharding), np.asarray(v).copy())
        for v in model.variables
    ]


def check_failed_wrap(case, n):
    keras.utils.set_random_seed(0)
    model = case.build()
    plan = plan_model(model, n)
    before = snapshot(model)
    entries = list(plan.variables)
    entries[-1] = dataclasses.replace(entries[-1], path="no/such/variable")
    with pytest.raises(ValueError, match="does not match"):
        TensorParallelKeras(
            model, world_size=n, plan=plan.with_variables(entries)
        )
    after = snapshot(model)
    assert [a[:3] for a in after] == [b[:3] for b in before]
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a[3], b[3])
    assert not getattr(model, "_tp_wrapped", False)


FIT = [(name, n) for name, case in CASES.items() for n in case.fit_sizes]


@pytest.mark.parametrize("name", list(CASES))
def test_plan_gives_every_variable_a_reason(name):
    case = CASES[name]
    keras.utils.set_random_seed(0)
    model = case.build()
    for n in case.sizes:
        check_plan(case, n, model)


@pytest.mark.parametrize("name, n", FIT)
def test_forward_and_fit_match_single_device(name, n):
    check_forward_and_fit(CASES[name], n)


@pytest.mark.parametrize(
    "name", ["own-weights-layer", "multi-io-dict", "lstm-gru"]
)
def test_failed_wrap_leaves_model_unchanged(name):
    check_failed_wrap(CASES[name], 2)


# Families whose blocks the trace once could not enter -------------------

ATTENTION = {
    # DeBERTa: relative embedding computed from weights alone; key and
    # query also project the position states; take_along_axis on scores.
    "deberta-v3": r".*layer_0/self_attention_layer/(query|key|value)/kernel",
    # Falcon: ALiBi slopes (a backend array) times a symbolic mask.
    "falcon": r".*layer_0/attention/(query|key|value)_dense/kernel",
    # GPT-NeoX: attention returns (output, None).
    "gpt-neox": r".*layer_0/self_attention/query_key_value/kernel",
    # T5: T5LayerNorm.
    "t5": r".*encoder_layer_0/self_attention/(query|key|value)_projector/k.*",
}


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_traced_families_split_their_attention(name):
    import re

    keras.utils.set_random_seed(0)
    plan = plan_model(CASES[name].build(), 2)
    hits = [e for e in plan if re.fullmatch(ATTENTION[name], e.path)]
    assert len(hits) in (1, 3), [e.path for e in plan]
    for e in hits:
        assert e.role in (Role.HEADS, Role.COLUMN), (e.path, e.reason)
    assert not [e.path for e in plan if "could not be traced" in e.reason]


def test_own_weights_layer_is_split_by_its_matmul():
    # Split by operation: the layer has no rule, but `ops.matmul(x, self.w)`
    # makes its kernel the row of the Dense before it.
    keras.utils.set_random_seed(0)
    plan = plan_model(own_weights(), 2)
    own = [e for e in plan if e.layer.startswith("own_weights")]
    kernel = [e for e in own if len(e.shape) == 2]
    assert len(kernel) == 1 and kernel[0].role == Role.ROW
    assert "row-parallel" in kernel[0].reason
    # Its bias is added after the all-reduce: a vector, replicated.
    bias = [e for e in own if len(e.shape) == 1]
    assert bias[0].role == Role.REPLICATED and bias[0].reason


# Mixture-of-experts: expert parallel, or split inside each expert --------

MOE_TOKENS = 2 * 8  # batch 2, sequence 8


def _per_token(reason, pattern):
    import re

    return int(re.search(pattern, reason).group(1))


@pytest.mark.parametrize("n", [2, 4])
def test_moe_plan_picks_expert_parallel_by_its_bytes(n):
    keras.utils.set_random_seed(0)
    model = moe_block()
    plan = plan_model(model, n)
    bank = [e for e in plan if "experts/" in e.path]
    assert len(bank) == 3
    assert all(e.role == Role.EXPERT and e.split_dim == 0 for e in bank)
    reason = bank[0].reason
    assert reason.startswith(
        f"experts: 4 experts split over {n} devices (expert parallel): each "
        f"device holds {4 // n} whole expert"
    )
    # Hidden 16, 4 experts, top 2: forward 16 + backward 16 + 2 (routing
    # weights' gradient) per token, against 4 x 16 + 16 inside each expert.
    assert "all-reduces 34 values per token per step" in reason
    assert "against 80 splitting inside each expert" in reason
    assert "the same bytes per device" in reason
    inside = plan_model(model, n, overrides=INSIDE_EXPERTS)
    assert inside.per_device_bytes == plan.per_device_bytes
    roles = [inside[e.path].role for e in bank]
    assert roles == [Role.COLUMN, Role.COLUMN, Role.ROW]
    forced = plan_model(model, n, overrides={r".*experts/.*": "expert"})
    assert [forced[e.path].axes for e in bank] == [e.axes for e in bank]


def test_moe_splits_inside_each_expert_when_experts_do_not_divide():
    keras.utils.set_random_seed(0)
    plan = plan_model(moe_block(), 8)
    bank = [e for e in plan if "experts/" in e.path]
    assert [e.role for e in bank] == [Role.COLUMN, Role.COLUMN, Role.ROW]
    assert [e.split_dim for e in bank] == [2, 2, 1]
    assert bank[0].reason.endswith(
        "(split inside each expert: expert parallel needs the 4 experts to "
        "divide by 8 devices)"
    )


@pytest.mark.parametrize(
    "split, n", [("expert", 2), ("inside", 2), ("expert", 4)]
)
def test_moe_split_matches_one_device_at_its_stated_bytes(split, n):
    from keras_tensor_parallel import comms

    overrides = INSIDE_EXPERTS if split == "inside" else None
    reference, candidate, _ = zoo.build_pair(moe_block, seed=0)
    x = np.random.RandomState(0).randn(2, 8, 16).astype("float32")
    y = np.random.RandomState(2).randn(2, 8, 16).astype("float32")
    expected = np.asarray(reference(x))
    stated = plan_model(reference, n)  # the reason states both candidates
    reason = next(e.reason for e in stated if "experts/" in e.path)
    tp = TensorParallelKeras(candidate, world_size=n, overrides=overrides)
    got = np.asarray(tp(x))
    assert max_abs_diff(got, expected) <= rel_tol(expected, 1e-5)
    assert split_dim_shards_ok(tp, n) == []
    for model in (reference, tp):
        keras.Model.compile(
            model, optimizer=keras.optimizers.Adam(1e-3), loss="mse"
        )
    report = comms.analyze(tp, n, batch_size=2, seq_len=8, inputs=x)
    for model in (reference, tp):
        for _ in range(3):
            model.train_on_batch(x, y)
    for r, t in zip(
        reference.trainable_variables, tp.wrapped_model.trainable_variables
    ):
        ref = np.asarray(r, "float64")
        scale = max(float(np.max(np.abs(ref))), 1e-30)
        assert max_abs_diff(ref, np.asarray(t)) <= 1e-4 * scale, r.path
    # The compiled train step sends what the plan states, per token.
    pattern = (
        r"all-reduces (\d+) values per token"
        if split == "expert"
        else r"against (\d+) splitting inside"
    )
    values = _per_token(reason, pattern)
    assert report.train_bytes == MOE_TOKENS * values * 4, report.table()
    assert not report.weight_gathers
