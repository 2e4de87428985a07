"""Issue 16 on torch: sequence parallelism across 2 gloo ranks.

One launch of 2 ranks runs every case and writes its measurements; the
tests assert on them. Parity: forward, 3 Adam steps and the weights after
them against a one-process model built independently with the same
weights. Traffic: ring bytes per train step counted by the collectives
themselves (`torch_collectives.RING`). Memory: bytes saved for backward
during one train step (`torch.autograd.graph.saved_tensors_hooks`,
parameters excluded), deterministic.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
TIMEOUT = 300
# Backbones (their output is gathered for the loss) and a causal LM (its
# untied vocab head gathers its input instead).
MODELS = ["opt-125m:tiny", "gpt2:tiny", "llama-small:tiny+lm"]
BATCH, SEQ = 2, 16


def _fit(model, x, y, steps=3):
    import keras

    # No metrics: a CausalLM's default accuracy would read float targets.
    optimizer = keras.optimizers.Adam(1e-3)
    model.compile(optimizer=optimizer, loss="mse", weighted_metrics=[])
    return [
        float(model.train_on_batch(x, y, return_dict=True)["loss"])
        for _ in range(steps)
    ]


def _saved_bytes(model, x, y) -> tuple[int, int]:
    """Bytes of the tensors a train step's forward keeps for backward (each
    storage once; parameters are not activations), and of those the float
    [..., seq, seq] ones (attention scores and probabilities)."""
    import torch

    params = {v.value.untyped_storage().data_ptr() for v in model.variables}
    seen: dict = {}
    square: dict = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
            if t.is_floating_point() and tuple(t.shape[-2:]) == (SEQ, SEQ):
                square[storage.data_ptr()] = storage.nbytes()
        return t

    # The forward of a train step and its loss (backward would add the
    # tensors a recomputation saves while it runs, and frees them).
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, training=True)
        torch.mean(torch.square(out - torch.as_tensor(y, device=out.device)))
    return sum(seen.values()), sum(square.values())


def _wrap(model, **options):
    from keras_tensor_parallel import TensorParallelKeras

    return TensorParallelKeras(
        model, world_size=2, distributed_backend="torch", **options
    )


def _parity(res, name, label=None, **extra):
    """SP vs one process: forward, losses, weights; then the traffic and
    the saved bytes of one more step (SP, and plain TP on the same
    weights)."""
    import keras

    from keras_tensor_parallel import catalogue
    from keras_tensor_parallel.backends import torch_collectives as tc
    from keras_tensor_parallel.catalogue.lm import causal_lm
    from keras_tensor_parallel.verify import build_pair

    spec = catalogue.get(name.split("+")[0]).variant(num_layers=1)
    lm = name.endswith("+lm")

    def build():
        return causal_lm(spec.build()) if lm else spec.build()

    reference, candidate, weights = build_pair(build)
    plain, again = build(), build()
    plain.set_weights(weights)
    again.set_weights(weights)
    sp = _wrap(candidate, sequence_parallel=True, **extra)
    tp = _wrap(plain, **extra)
    # Selective recomputation of the attention core on top.
    rc = _wrap(again, sequence_parallel=True, recompute="attention", **extra)
    x = spec.inputs(batch=BATCH, seq=SEQ)
    out_ref = keras.ops.convert_to_numpy(reference(x))
    out_sp = keras.ops.convert_to_numpy(sp(x))
    y = np.random.RandomState(1).randn(*out_ref.shape).astype("float32")
    r = {"forward": float(np.max(np.abs(out_sp - out_ref)))}
    r["losses_ref"], r["losses_sp"] = _fit(reference, x, y), _fit(sp, x, y)
    _fit(tp, x, y)
    r["losses_rc"] = _fit(rc, x, y)
    scale = [
        max(1.0, float(np.max(np.abs(w)))) for w in reference.get_weights()
    ]
    for key, model in (("weights", sp), ("weights_rc", rc)):
        r[key] = max(
            float(np.max(np.abs(a - b))) / s
            for a, b, s in zip(
                reference.get_weights(), model.get_weights(), scale
            )
        )
    models = (("sp", sp), ("tp", tp), ("one", reference), ("rc", rc))
    for key, model in models:
        tc.reset_counts()
        model.train_on_batch(x, y)
        r[f"ring_{key}"] = dict(tc.RING)
        r[f"seq_{key}"] = dict(tc.SEQ_COUNTS)
        r[f"saved_{key}"], r[f"scores_{key}"] = _saved_bytes(model, x, y)
    r["local_shapes"] = {
        v.path: list(v.value.shape)
        for v in candidate.weights
        if "kernel" in v.path
    }
    res[label or name] = r
    r["hidden_bytes"] = BATCH * SEQ * 64 * 4  # [batch, seq, hidden] f32
    if lm:  # decode steps run as plain TP: the same tokens
        prompt = {k: v[:, :8] for k, v in x.items()}
        want = reference.generate(prompt, max_length=12, stop_token_ids=None)
        got = sp.generate(prompt, max_length=12, stop_token_ids=None)
        r["generate"] = bool(
            np.array_equal(want["token_ids"], got["token_ids"])
        )


def _unchanged(model, before) -> bool:
    same = all(
        np.array_equal(a, b) for a, b in zip(model.get_weights(), before)
    )
    calls = [la.path for la in model._flatten_layers() if "call" in vars(la)]
    return same and not calls


def _refused(res, key, build, **options):
    model = build()
    before = model.get_weights()
    try:
        _wrap(model, sequence_parallel=True, **options)
        res[key] = "not refused"
    except ValueError as e:
        ok = "Received" in str(e) and _unchanged(model, before)
        res[key] = str(e) if ok else f"model changed: {e}"


def _refusals(res):
    """Bad input: a clear ValueError, the model as it was."""
    import keras

    from keras_tensor_parallel import catalogue

    opt = catalogue.get("opt-125m:tiny").variant(num_layers=1)
    _refused(res, "mlp", catalogue.get("seed-mlp").build)
    _refused(
        res, "recompute", opt.variant(dropout=0.1).build, recompute="attention"
    )
    tp = _wrap(opt.build(), sequence_parallel=True)
    x = opt.inputs(batch=BATCH, seq=SEQ - 1)
    tp.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    before = tp.get_weights()
    try:
        tp.train_on_batch(x, np.zeros((BATCH, SEQ - 1, 64), "float32"))
        res["indivisible"] = "not refused"
    except ValueError as e:
        same = all(
            np.array_equal(a, b) for a, b in zip(tp.get_weights(), before)
        )
        res["indivisible"] = str(e) if same else f"weights changed: {e}"
    # Gemma with 3 query heads at N=2: the plan splits value on its head
    # dim, which Gemma's reshapes cannot run per rank.
    gemma3q = catalogue.get("gemma-small:tiny").variant(
        num_layers=1, num_query_heads=3
    )
    _refused(res, "gemma-3-heads", gemma3q.build)
    # A forward of any length runs (as plain TP when it does not divide).
    res["indivisible_predict"] = list(tp(x).shape)


def _dropout(res):
    """Dropout between regions draws the whole sequence's mask and keeps
    the local chunk: SP trains as plain TP does with the same RNG (the
    dropout inside the attention core is per local head in both)."""
    import keras

    from keras_tensor_parallel import catalogue

    spec = catalogue.get("opt-125m:tiny").variant(num_layers=1, dropout=0.1)
    keras.utils.set_random_seed(0)
    a, b = spec.build(), spec.build()
    b.set_weights(a.get_weights())
    x = spec.inputs(batch=BATCH, seq=SEQ)
    y = np.zeros((BATCH, SEQ, 64), "float32")
    sp = _wrap(a, sequence_parallel=True)
    # The loss with dropout off, before any step (targets are zeros).
    out = keras.ops.convert_to_numpy(sp(x, training=False))
    res["dropout_eval"] = float(np.mean(np.square(out)))
    for key, model in (("sp", sp), ("tp", _wrap(b))):
        keras.utils.set_random_seed(7)
        res[f"dropout_{key}"] = _fit(model, x, y, steps=2)


def _attributes(res):
    """Gemma's head counts are local while the engine holds the model and
    global again after `unapply`, or after a wrap that fails late."""
    from keras_tensor_parallel import catalogue
    from keras_tensor_parallel.backends.torch import TorchEngine
    from keras_tensor_parallel.backends.torch_plan import plan_torch

    model = catalogue.get("gemma-small:tiny").variant(num_layers=1).build()
    layer = model.get_layer("decoder_block_0").attention

    def counts():
        return [layer.num_query_heads, layer.num_key_value_heads]

    before = model.get_weights()
    engine = TorchEngine(plan_torch(model, 2), ["cpu:0", "cpu:1"])
    engine.apply(model)
    res["counts_held"] = counts()
    engine.unapply(model)
    res["counts_after"] = counts()

    def interrupt():  # the check run's last step, after the counts are set
        if layer.num_query_heads != 4:
            raise KeyboardInterrupt

    engine = TorchEngine(plan_torch(model, 2), ["cpu:0", "cpu:1"])
    try:
        engine.apply(model, checkpoint=interrupt)
    except KeyboardInterrupt:
        res["counts_failed"] = counts()
    res["counts_unchanged"] = _unchanged(model, before)


def worker(out_path: str) -> None:
    from keras_tensor_parallel.backends import torch_collectives as tc

    tc.ensure_process_group()
    res = {"rank": tc.rank()}
    for name in MODELS:
        _parity(res, name)
    # Gemma's attention split (its reshapes read local head counts,
    # torch_attributes.py): 2 of 4 query heads per rank, the one kv head
    # whole (multi-query); its causal LM (tied vocab head) also generates.
    _parity(res, "gemma-small:tiny+lm", "gemma")
    _refusals(res)
    _dropout(res)
    _attributes(res)
    with open(f"{out_path}.{tc.rank()}", "w") as fh:
        json.dump(res, fh)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sequence")
    from ranks import launch

    proc = launch(HERE, str(tmp / "res"), backend="torch", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp / f"res.{r}").read_text()) for r in (0, 1)]


@pytest.mark.torch
@pytest.mark.parametrize("name", [*MODELS, "gemma"])
def test_matches_one_process(results, name):
    for res in results:
        r = res[name]
        assert r["forward"] <= 1e-5, r["forward"]
        for key in ("losses_sp", "losses_rc"):
            np.testing.assert_allclose(r[key], r["losses_ref"], rtol=1e-5)
        assert r["losses_ref"][-1] != r["losses_ref"][0]
        assert r["weights"] <= 1e-4, r["weights"]
        assert r["weights_rc"] <= 1e-4, r["weights_rc"]
    if name == "gemma":  # the attention is split: local heads per rank
        shapes = {
            p.split("attention/")[-1]: s
            for p, s in results[0]["gemma"]["local_shapes"].items()
            if "block_0/attention/" in p
        }
        assert shapes == {
            "query/kernel": [2, 64, 16],
            "key/kernel": [1, 64, 16],
            "value/kernel": [1, 64, 16],
            "attention_output/kernel": [2, 16, 64],
        }, shapes
        assert results[0]["gemma"]["generate"]


@pytest.mark.torch
@pytest.mark.parametrize("name", MODELS)
def test_ring_traffic_equals_plain_tensor_parallel(results, name):
    r = results[0][name]
    sp, tp, hidden = r["ring_sp"], r["ring_tp"], r["hidden_bytes"]
    assert tp["reduce-scatter"] == sp["all-reduce"] == 0
    assert tp["params"] == 0 < sp["params"]  # norms, row biases, positions
    # Each all-reduce of plain TP became a reduce-scatter + an all-gather;
    # a backbone's output is gathered once more for the loss (an LM's head
    # gathers its input where plain TP had f; both gather the logits).
    lm = name.endswith("+lm")

    def ring(x):
        return x["all-reduce"] + x["all-gather"] + x["reduce-scatter"]

    assert ring(sp) == ring(tp) + (0 if lm else hidden / 2), (sp, tp)
    assert r["ring_rc"] == sp
    # Per step: 2 column groups and the output (or the LM head's input)
    # gathered, 2 rows and the token lookup scattered (forward), and the
    # reverse in backward.
    assert r["seq_sp"] == {
        "all_gather": 3 + 3,
        "reduce_scatter": 3 + 2 + lm,
        "param_all_reduce": r["seq_sp"]["param_all_reduce"],
    }
    if lm:
        assert r["generate"]


@pytest.mark.torch
@pytest.mark.parametrize("name", [*MODELS, "gemma"])
def test_saved_activations_below_plain_tensor_parallel(results, name):
    for res in results:
        r = res[name]
        if name == "gemma":  # its [batch, seq, vocab] logits dominate:
            # SP keeps at least one [batch, seq, hidden] tensor less.
            saved = r["saved_tp"] - r["saved_sp"]
            assert saved >= r["hidden_bytes"], r
            assert r["saved_tp"] < 0.9 * r["saved_one"], r
        else:
            assert r["saved_sp"] < 0.9 * r["saved_tp"] < 0.9 * r["saved_one"]
        # Recomputed, the attention core keeps no [batch, heads, seq, seq]
        # tensor (at this short sequence its inputs weigh as much: see
        # benchmarks/bench_torch_sequence.py for the shape).
        assert r["scores_sp"] > 0 == r["scores_rc"], r


@pytest.mark.torch
@pytest.mark.parametrize(
    "key, rule",
    [
        ("mlp", "no sequence dim"),
        ("recompute", "attention dropout 0"),
        ("indivisible", "must divide by it"),
        ("gemma-3-heads", "value kernel on dim 2 (the head dim"),
    ],
)
def test_bad_input_refused_and_unchanged(results, key, rule):
    for res in results:
        assert rule in res[key], res[key]


@pytest.mark.torch
def test_dropout_between_regions_trains_as_plain_tensor_parallel(results):
    for res in results:
        sp, tp = res["dropout_sp"], res["dropout_tp"]
        np.testing.assert_allclose(sp, tp, rtol=1e-6)
        # Dropout was on: the first step's loss is not the loss without.
        assert abs(tp[0] - res["dropout_eval"]) > 1e-4 * abs(tp[0])


@pytest.mark.torch
def test_gemma_head_counts_local_while_held_and_restored(results):
    for res in results:
        assert res["counts_held"] == [2, 1], res["counts_held"]
        assert res["counts_after"] == [4, 1], res["counts_after"]
        assert res["counts_failed"] == [4, 1], res.get("counts_failed")
        assert res["counts_unchanged"]


@pytest.mark.torch
def test_forward_of_any_length_runs(results):
    assert results[0]["indivisible_predict"] == [BATCH, SEQ - 1, 64]


if __name__ == "__main__":
    worker(sys.argv[1])
