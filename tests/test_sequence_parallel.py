"""Issue 16: sequence parallelism and selective recomputation (JAX).

Parity: the same forward, 3 Adam steps and weights as one device (an
independently built reference with the same weights). Memory: XLA's memory
analysis of Keras's compiled train step (deterministic, no timing). Ring
traffic: counted from the compiled HLO, all-reduce 2(N-1)/N and all-gather
/ reduce-scatter (N-1)/N of the full tensor.
"""

import os

import keras
import numpy as np
import pytest

from keras_tensor_parallel import TensorParallelKeras, catalogue
from keras_tensor_parallel.backends.jax_recompute import compile_train_step
from keras_tensor_parallel.comms import collectives
from keras_tensor_parallel.verify import build_pair

MODELS = ["opt-125m:tiny", "gpt2:tiny", "llama-small:tiny", "gemma-small:tiny"]


def _targets(model, x, seed=1):
    out = model(x)
    return np.random.RandomState(seed).randn(*out.shape).astype("float32")


def _fit(model, x, y, steps=3):
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return [float(model.train_on_batch(x, y)) for _ in range(steps)]


def _bound(reference) -> float:
    return 1e-5 * max(1.0, float(np.max(np.abs(reference))))


# Gemma with 2 kv heads at N=4: each kv head shared by 2 devices (the
# (model, model_copies) mesh).
GEMMA_KV2 = ("gemma-small:tiny", {"num_key_value_heads": 2})


@pytest.mark.parametrize(
    "name, overrides, n, recompute",
    [
        ("opt-125m:tiny", {}, 4, "attention"),
        ("gpt2:tiny", {}, 4, None),  # odd vocab: the padded table
        ("llama-small:tiny", {}, 4, "attention"),  # GQA, untied logits
        ("gemma-small:tiny", {}, 4, None),  # replicated kv head, tied
        (*GEMMA_KV2, 4, "attention"),  # kv heads shared by 2 devices
    ],
)
def test_matches_one_device(name, overrides, n, recompute):
    # One block of the tiny config: every edge, compiled faster.
    spec = catalogue.get(name).variant(num_layers=1, **overrides)
    reference, candidate, _ = build_pair(spec.build)
    tp = TensorParallelKeras(
        candidate, world_size=n, sequence_parallel=True, recompute=recompute
    )
    x = spec.inputs(batch=2, seq=16)
    out_ref, out_tp = np.asarray(reference(x)), np.asarray(tp(x))
    assert np.max(np.abs(out_tp - out_ref)) <= _bound(out_ref)
    y = _targets(reference, x)
    losses_ref, losses_tp = _fit(reference, x, y), _fit(tp, x, y)
    np.testing.assert_allclose(losses_tp, losses_ref, rtol=1e-5)
    assert losses_ref[-1] != losses_ref[0]
    for v, w_ref, w_tp in zip(
        reference.weights, reference.get_weights(), tp.get_weights()
    ):
        if v.path.endswith("key/bias"):  # exactly zero gradient: Adam noise
            continue
        assert np.max(np.abs(w_tp - w_ref)) <= 10 * _bound(w_ref), v.path


# Memory and ring traffic ----------------------------------------------------

# Attention-heavy like the issue's shape (seq 512 over hidden 512), small
# enough to compile in seconds. Batch 3 tells activations apart from
# parameters by shape.
SHAPE = dict(num_layers=1, hidden_dim=64, num_heads=4, intermediate_dim=256)
BATCH, SEQ, N = 3, 128, 4


def _compiled(n, spec=None, **options):
    spec = spec or catalogue.get("opt-125m:tiny").variant(**SHAPE)
    keras.utils.set_random_seed(0)
    model = spec.build()
    x = spec.inputs(batch=BATCH, seq=SEQ)
    y = np.zeros((BATCH, SEQ, spec.config["hidden_dim"]), "float32")
    tp = TensorParallelKeras(model, world_size=n, **options)
    tp.compile(optimizer="adam", loss="mse")
    return compile_train_step(tp, x, y)


@pytest.fixture(scope="module")
def steps():
    return {
        "tp": _compiled(N),
        "sp": _compiled(N, sequence_parallel=True),
        "sp_rc": _compiled(N, sequence_parallel=True, recompute="attention"),
    }


def _temp(compiled) -> int:
    return compiled.memory_analysis().temp_size_in_bytes


def test_temp_memory_below_plain_tensor_parallel(steps):
    tp, sp = _temp(steps["tp"]), _temp(steps["sp"])
    assert sp < 0.85 * tp, (sp, tp)
    # Recomputing the attention core drops its [batch, heads, seq, seq]
    # tensors.
    assert _temp(steps["sp_rc"]) < 0.85 * sp, (steps["sp_rc"], sp)


def _activation_ring(compiled) -> tuple[float, set]:
    """Ring bytes of the collectives on [batch, ...] tensors, and their
    kinds."""
    found = [
        c
        for c in collectives(compiled.as_text())
        if all(s and s[0] == BATCH for s in c.shapes)
    ]
    return sum(c.ring_bytes for c in found), {c.kind for c in found}


def test_ring_traffic_equals_plain_tensor_parallel(steps):
    ring_tp, kinds_tp = _activation_ring(steps["tp"])
    ring_sp, kinds_sp = _activation_ring(steps["sp"])
    assert kinds_tp == {"all-reduce"}
    assert kinds_sp == {"all-gather", "reduce-scatter"}
    assert ring_sp == ring_tp
    assert _activation_ring(steps["sp_rc"])[0] == ring_tp
    # 2 forward + 2 backward region edges, and the token lookup.
    hidden = BATCH * SEQ * SHAPE["hidden_dim"] * 4
    assert ring_tp == 5 * hidden * 2 * (N - 1) / N
    # Besides, as in Megatron-SP, replicated parameters read by
    # sequence-split activations get partial gradients: norm and bias
    # vectors are all-reduced, and XLA updates the learned position table
    # (and its two Adam slots) in row shards, then all-gathers them.
    table = (128, SHAPE["hidden_dim"])  # max_sequence_length x hidden
    for c in collectives(steps["sp"].as_text()):
        if all(s and s[0] == BATCH for s in c.shapes):
            continue
        vectors = all(len(s) <= 1 for s in c.shapes)
        assert (c.kind == "all-reduce" and vectors) or (
            c.kind == "all-gather" and c.shapes == (table,)
        ), c


def _masked_model():
    # A vocab-split table (1024 rows) with mask_zero; the attention reads
    # the mask.
    ids = keras.Input((16,), dtype="int32")
    x = keras.layers.Embedding(1024, 32, mask_zero=True)(ids)
    x = keras.layers.LayerNormalization()(
        x + keras.layers.MultiHeadAttention(4, 8)(x, x)
    )
    h = keras.layers.Dense(64, activation="relu")(x)
    return keras.Model(ids, x + keras.layers.Dense(32)(h))


def test_mask_zero_embedding_matches_one_device():
    reference, candidate, _ = build_pair(_masked_model)
    tp = TensorParallelKeras(candidate, world_size=N, sequence_parallel=True)
    assert tp.wrapped_model.weights[0].value.sharding.shard_shape(
        (1024, 32)
    ) == (1024 // N, 32)
    x = np.random.RandomState(0).randint(1, 1024, (2, 16)).astype("int32")
    x[:, -5:] = 0  # padding
    out_ref, out_tp = np.asarray(reference(x)), np.asarray(tp(x))
    assert np.max(np.abs(out_tp - out_ref)) <= _bound(out_ref)
    other = x.copy()
    other[:, -5:] = 7  # unmasked: the other positions change
    assert np.max(np.abs(np.asarray(reference(other)) - out_ref)[:, :11]) > 0.1
    # (Training through the vocab-parallel lookup: test_matches_one_device.)


def test_shared_kv_heads_memory_and_ring_traffic():
    # The kv-head blocks are split over `model` only, the sequence over
    # (model, model_copies): activations 1/N, same ring traffic.
    name, overrides = GEMMA_KV2
    spec = catalogue.get(name).variant(num_layers=1, **overrides)
    tp, sp = _compiled(N, spec), _compiled(N, spec, sequence_parallel=True)
    assert _temp(sp) < 0.75 * _temp(tp), (_temp(sp), _temp(tp))
    ring_tp, _ = _activation_ring(tp)
    ring_sp, kinds_sp = _activation_ring(sp)
    assert {"all-gather", "reduce-scatter"} <= kinds_sp
    assert ring_sp == ring_tp


# Bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, rule",
    [
        (dict(sequence_parallel="yes"), "sequence_parallel must be"),
        (dict(sequence_parallel=1), "sequence_parallel must be"),
        (dict(recompute="all"), "recompute must be one of"),
        (dict(recompute=True), "recompute must be one of"),
    ],
)
def test_bad_options(kwargs, rule):
    model = catalogue.get("opt-125m:tiny").build()
    with pytest.raises(ValueError, match=rule) as err:
        TensorParallelKeras(model, world_size=2, **kwargs)
    assert "Received" in str(err.value)


def test_model_without_sequence_refused_and_unchanged():
    model = catalogue.get("seed-mlp").build()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="no sequence dim"):
        TensorParallelKeras(model, world_size=2, sequence_parallel=True)
    assert "call" not in vars(model.layers[1])
    for w, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, b)
    assert len(model.weights[0].value.sharding.device_set) == 1


def test_attention_dropout_refused_for_recompute():
    model = catalogue.get("opt-125m:tiny").variant(dropout=0.1).build()
    with pytest.raises(ValueError, match="attention dropout 0"):
        TensorParallelKeras(model, world_size=2, recompute="attention")


def test_torch_backend_refused():
    # Checked right after the backend name, before any device or process
    # group is looked up (a torch process is not started here: the rule
    # is the same function). torch splits the sequence and recomputes
    # (tests/test_torch_sequence.py); TensorFlow does neither.
    from keras_tensor_parallel import model as model_lib

    with pytest.raises(ValueError, match="JAX and torch engines only.*Rec"):
        model_lib._check_activations(True, None, "tensorflow")
    with pytest.raises(ValueError, match="JAX and torch engines only"):
        model_lib._check_activations(False, "attention", "tensorflow")
    model_lib._check_activations(True, "attention", "torch")
    model_lib._check_activations(False, None, "torch")  # plain TP is fine


def test_cli_comms_sequence_parallel_ring_equals_plain(capsys):
    import json

    from keras_tensor_parallel import cli

    ring = {}
    for flag in ([], ["--sequence-parallel"]):
        args = ["comms", "seed-attention", "-n", "2", "--format", "json"]
        assert cli.main(args + flag) == 0
        report = json.loads(capsys.readouterr().out)
        kinds = {c["kind"] for c in report["collectives"]}
        ring[bool(flag)] = (report["train"]["ring_bytes"], kinds)
    assert ring[False][1] == {"all-reduce"}
    assert {"all-gather", "reduce-scatter"} <= ring[True][1]
    # Plus the replicated norm and bias vectors' gradients.
    assert ring[False][0] <= ring[True][0] <= 1.05 * ring[False][0]


# verify: activation memory beside parameter memory ---------------------------


def test_megatron_estimate_is_the_issue_formula():
    from keras_tensor_parallel.verify.activations import (
        megatron_estimate,
        transformer_shape,
    )

    # The issue's shape: hidden 512, 8 heads, sequence 512, batch 4, N=4.
    shape = {"h": 512, "a": 8, "layers": 2}
    kw = dict(batch=4, seq=512, tensor_parallel_size=4)
    tp = megatron_estimate(shape, **kw)
    sbh = 512 * 4 * 512
    assert tp["per_device_bytes"] == 2 * sbh * (10 + 24 / 4 + 40 / 4)
    assert tp["single_device_bytes"] == 2 * sbh * (34 + 40)
    assert round(tp["fraction"], 2) == 0.35
    sp = megatron_estimate(shape, **kw, sequence_parallel=True)
    assert sp["fraction"] == pytest.approx(0.25)
    both = megatron_estimate(
        shape, **kw, sequence_parallel=True, recompute="attention"
    )
    assert both["fraction"] == pytest.approx(34 / 4 / 74)
    assert both["formula"] == "34sbh/t"
    # Two data replicas of 2-way TP: each device sees half the batch.
    half = megatron_estimate(shape, batch=4, seq=512, tensor_parallel_size=2)
    dp = megatron_estimate(
        shape, batch=4, seq=512, tensor_parallel_size=2, data=2
    )
    assert dp["fraction"] == pytest.approx(half["fraction"] / 2)
    config = catalogue.get("llama-small:tiny").config
    assert transformer_shape(config) == {"h": 64, "a": 8, "layers": 2}
    assert transformer_shape({"hidden_dim": 8}) is None


def test_report_shows_activation_memory_without_a_threshold(tmp_path):
    from keras_tensor_parallel.verify import report as report_lib
    from keras_tensor_parallel.verify.activations import (
        megatron_estimate,
        note,
    )
    from keras_tensor_parallel.verify.checks import Check

    estimate = megatron_estimate(
        {"h": 64, "a": 4, "layers": 2}, batch=2, seq=32,
        tensor_parallel_size=2, sequence_parallel=True,
    )  # fmt: skip
    detail = {
        "per_device_temp_bytes": 3 * 2**20,
        "single_device_temp_bytes": 8 * 2**20,
        "estimate": estimate,
        "sequence_parallel": True,
        "recompute": None,
    }
    check = Check("activations", True, 3 / 8, None, detail)
    row = report_lib.row_from_result(
        check, seconds=1.0, tolerance=0, note=note(detail)
    )
    assert (row.status, row.threshold, row.passed) == ("info", None, True)
    report = {
        "model": "m", "world_size": 2, "checks": [row.to_dict()],
        "settings": {"sequence_parallel": True},
    }  # fmt: skip
    files = report_lib.write_report(str(tmp_path), report)
    assert os.path.getsize(files["activations"]) > 0
    text = (tmp_path / "report.md").read_text()
    assert "| activations | info | 0.3750 | - |" in text
    assert "3.00 MiB per device vs 8.00 MiB on one device" in text
    assert "Megatron estimate 0.500 of one device (sbh(34+5as/h)/t" in text
    assert "TP + SP" in text and "## Activation memory per device" in text
    assert "0/0 checks passed, 1 measured without a threshold" in text
