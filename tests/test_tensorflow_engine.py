"""TensorFlow engine: 2 processes on 127.0.0.1 against a single-process run.

The pytest process runs under JAX; one launched run (TensorFlow starts
slowly: its import alone takes seconds per rank) does every check in
turn: for an MLP, an attention model, OPT, GPT-2 (odd vocabulary) and
Llama (GQA) from the catalogue's tiny configs, forward, gradients, the
LM head's logits, 5 Adam `fit` steps, optimizer slots and the saved
`.keras` against a single-process model with the same weights; clipnorm
and global_clipnorm; a wrap failing on one rank rolled back on both.
Each check writes its results as it ends. Last, rank 1 raises on
purpose while rank 0 waits in a collective: the launcher must end the
run with rank 1's error.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

MODELS = {
    "mlp": "seed-mlp",
    "attention": "seed-attention",
    "opt": "opt-125m",
    "gpt2": "gpt2",
    "llama": "llama-small",
}
LMS = ("opt", "gpt2", "llama")


def _rel(a, b) -> float:
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _rel_all(xs, refs) -> float:
    """Largest abs difference over all arrays / largest abs reference."""
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(xs, refs)
    )
    return diff / max(float(np.max(np.abs(np.asarray(b)))) for b in refs)


def _grads(model, x):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.convert_to_tensor(model(x)) ** 2)
    variables = model.trainable_variables
    # A variable the forward does not read (an untied output head) gets
    # no gradient: compared as zeros on both sides.
    return [
        np.zeros(v.value.shape, "float32")
        if g is None
        else tf.convert_to_tensor(g).numpy()
        for g, v in zip(tape.gradient(loss, variables), variables)
    ]


def _write(out_dir: str, name: str, rank: int, res: dict) -> None:
    with open(os.path.join(out_dir, f"{name}.{rank}.json"), "w") as fh:
        json.dump(res, fh)


def _contract_problems(engine) -> list[str]:
    """Names of `base.Engine` the engine lacks or takes other parameters
    for (the torch and JAX engines are compared in test_engine_contract)."""
    import inspect

    from keras_tensor_parallel.backends import base

    problems = []
    for n in dir(base.Engine):
        if n.startswith("_") or n in dir(object):
            continue
        want = getattr(base.Engine, n)
        if not hasattr(engine, n):
            problems.append(n)
        elif callable(want) and (
            inspect.signature(want).parameters.keys()
            != inspect.signature(getattr(type(engine), n)).parameters.keys()
        ):
            problems.append(n)
    return problems + ([] if isinstance(engine, base.Engine) else ["type"])


def parity(name: str, out_dir: str) -> None:
    """One model on 2 ranks against one process from the same weights."""
    import keras

    from keras_tensor_parallel import TensorParallelKeras, catalogue, zoo
    from keras_tensor_parallel.backends import base
    from keras_tensor_parallel.backends import tensorflow_collectives as tc
    from keras_tensor_parallel.backends.roles import shard_sizes

    spec = catalogue.get(MODELS[name]).tiny()
    ref, cand, _ = zoo.build_pair(spec.build, seed=0)
    x = spec.inputs(batch=4, seq=8, seed=1)
    ref_out = np.asarray(ref(x))
    y = np.random.RandomState(2).randn(*ref_out.shape).astype("float32")
    ref_grads = _grads(ref, x)
    tp = TensorParallelKeras(cand, world_size=2)
    rank = tp.engine.rank
    res = {"forward": _rel(tp(x), ref_out)}
    res["contract"] = _contract_problems(tp.engine)
    local_ref = [
        v.local_slice(g) if hasattr(v, "local_slice") else g
        for g, v in zip(ref_grads, cand.trainable_variables)
    ]
    tc.reset_counts()
    res["grads"] = _rel_all(_grads(cand, x), local_ref)
    # An eager step creates its collectives once: Megatron's minimum is 2
    # all-reduces per block each way, +1 forward for the vocab embedding
    # (q, k and v share one f; the model input's f needs no backward).
    res["counts"] = [tc.COUNTS["forward"], tc.COUNTS["backward"]]
    blocks = spec.config.get("num_layers", 0) if name in LMS else 0
    res["expect"] = [2 * blocks + 1, 2 * blocks] if blocks else [2, 1]
    if name in LMS:
        want = np.asarray(ref.token_embedding(ref(x), reverse=True))
        got = cand.token_embedding(cand(x), reverse=True)
        res["logits"] = _rel(got, want)
    # Real sharding: each split variable holds this rank's rows only.
    res["shards"] = [
        [e.path, list(v.value.shape), e.split_dim]
        for v, e in zip(cand.variables, tp.plan.variables)
        if e.is_split
        and v.value.shape[e.split_dim]
        != shard_sizes(e.shape[e.split_dim], 2)[rank]
    ]
    res["n_split"] = sum(e.is_split for e in tp.plan)
    for model in (ref, tp):
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    # Built outside the step, as the engine builds tp's (a step that makes
    # variables is traced twice).
    ref.optimizer.build(ref.trainable_variables)
    kw = dict(epochs=5, batch_size=len(y), shuffle=False, verbose=0)
    ref_hist = ref.fit(x, y, **kw).history["loss"]
    res["fit_losses"] = _rel(tp.fit(x, y, **kw).history["loss"], ref_hist)
    # A key bias gets an exactly-zero gradient that rounding makes
    # +-1e-9; Adam scales that noise to full steps: not compared.
    keep = [i for i, v in enumerate(ref.weights) if "key/bias" not in v.path]
    full, want_w = tp.get_weights(), ref.get_weights()
    res["fit_weights"] = _rel_all(
        [full[i] for i in keep], [want_w[i] for i in keep]
    )
    params = list(cand.trainable_variables)
    res["slots"] = [
        s.path
        for s in tp.optimizer.variables
        if (owner := base.slot_owner(s, params)) is not None
        and tuple(s.shape) != tuple(owner.value.shape)
    ]
    path = os.path.join(out_dir, f"{name}.keras")
    tp.save(path)
    if rank == 0:
        res["loaded"] = _rel(keras.saving.load_model(path)(x), ref(x))
    # Later steps run the traced step again: no collective is created.
    tc.reset_counts()
    tp.fit(x, y, **dict(kw, epochs=2))
    res["retraced"] = sum(tc.COUNTS.values())
    _write(out_dir, name, rank, res)


def clip(out_dir: str) -> None:
    """clipnorm and global_clipnorm (SGD: the clip scale reaches the
    update unchanged) on the attention model against one process."""
    import keras

    from keras_tensor_parallel import TensorParallelKeras, catalogue, zoo

    spec = catalogue.get("seed-attention")
    x = spec.inputs(batch=4, seq=32, seed=1)
    res = {}
    ref, _, _ = zoo.build_pair(spec.build, seed=0)
    y = np.random.RandomState(2).randn(*ref(x).shape).astype("float32")
    ref.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    ref.optimizer.build(ref.trainable_variables)  # traced once
    plain = [float(ref.train_on_batch(x, y)) for _ in range(3)]
    for key, value in (("clipnorm", 0.01), ("global_clipnorm", 0.02)):
        ref, cand, _ = zoo.build_pair(spec.build, seed=0)
        tp = TensorParallelKeras(cand, world_size=2)
        for model in (ref, tp):
            opt = keras.optimizers.SGD(0.1, **{key: value})
            model.compile(optimizer=opt, loss="mse")
        ref.optimizer.build(ref.trainable_variables)
        ref_losses = [float(ref.train_on_batch(x, y)) for _ in range(3)]
        tp_losses = [float(tp.train_on_batch(x, y)) for _ in range(3)]
        res[key] = {
            "losses": _rel(tp_losses, ref_losses),
            "weights": _rel_all(tp.get_weights(), ref.get_weights()),
            "clipped": _rel(ref_losses, plain),  # the clip changes training
        }
    # Both ranks write to the launcher's stdout; only rank 0 may print.
    kw = dict(epochs=2, batch_size=len(y), shuffle=False)
    ref.fit(x, y, verbose=0, **kw)
    tp.fit(x, y, verbose=1, **kw)
    # predict and evaluate run Keras's own traced functions on the shards.
    res["predict"] = _rel(tp.predict(x, verbose=0), ref.predict(x, verbose=0))
    res["evaluate"] = _rel(
        tp.evaluate(x, y, verbose=0), ref.evaluate(x, y, verbose=0)
    )
    _write(out_dir, "clip", tp.engine.rank, res)


def rollback(out_dir: str) -> None:
    """Splitting fails on rank 1 only (its 5th split variable): both ranks
    raise, both models are as they were, and wrapping again works."""
    from keras_tensor_parallel import TensorParallelKeras, catalogue, zoo
    from keras_tensor_parallel.backends import roles
    from keras_tensor_parallel.backends import tensorflow_collectives as tc

    spec = catalogue.get("gpt2").tiny()
    _, cand, _ = zoo.build_pair(spec.build, seed=0)
    x = spec.inputs(batch=2, seq=8, seed=1)
    before = [np.asarray(v).copy() for v in cand.variables]
    want = np.asarray(cand(x))
    original, calls = roles.split_variable, []

    def fail(*args, **kwargs):
        calls.append(1)
        if tc.rank() == 1 and len(calls) == 5:
            raise ValueError("rank 1 fails on purpose")
        return original(*args, **kwargs)

    roles.split_variable = fail
    res = {}
    try:
        TensorParallelKeras(cand, world_size=2)
        res["first"] = ""
    except Exception as e:  # noqa: BLE001 - the test reads the message
        res["first"] = f"{type(e).__name__}: {e}"
    finally:
        roles.split_variable = original
    after = [np.asarray(v.value) for v in cand.variables]
    res["unchanged"] = (
        all(
            a.shape == b.shape and np.array_equal(a, b)
            for a, b in zip(after, before)
        )
        and _rel(cand(x), want) == 0.0
    )
    res["again"] = _rel(TensorParallelKeras(cand, world_size=2)(x), want)
    _write(out_dir, "rollback", tc.rank(), res)


def plain(out_dir: str) -> None:
    """A plain `python` process (no launcher): world size 1, nothing
    split; then, with a `TF_CONFIG` but a model built already, wrapping
    names what to do (TensorFlow joins a cluster only before its first
    tensor)."""
    from keras_tensor_parallel import TensorParallelKeras, catalogue

    spec = catalogue.get("seed-mlp")
    model = spec.build()
    x = spec.inputs(batch=2)
    want = np.asarray(model(x))
    tp = TensorParallelKeras(model)
    res = {"engine": tp.engine.name, "devices": tp.device_ids}
    res["forward"] = _rel(tp(x), want)
    res["split"] = sum(  # variables not at their full shape
        tuple(v.value.shape) != e.shape
        for v, e in zip(model.variables, tp.plan.variables)
    )
    workers = ["127.0.0.1:1", "127.0.0.1:2"]  # never reached
    task = {"type": "worker", "index": 0}
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": workers}, "task": task}
    )
    try:
        TensorParallelKeras(spec.build(), world_size=2)
        res["late"] = ""
    except ValueError as e:
        res["late"] = str(e)
    _write(out_dir, "plain", 0, res)


def worker(out_dir: str) -> None:
    """Runs in every rank (KERAS_BACKEND=tensorflow)."""
    import tensorflow as tf
    import test_tf_collectives

    from keras_tensor_parallel.backends import tensorflow_collectives as tc

    # The collectives' own cases, first: one launch serves both files.
    test_tf_collectives.worker(os.path.join(out_dir, "collectives"))
    for name in MODELS:
        parity(name, out_dir)
    clip(out_dir)
    rollback(out_dir)
    if tc.rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    tc.all_reduce(tf.constant(1.0))  # waits for rank 1, which never comes


@pytest.fixture
def run(tf_run):
    """The launch `tf_run` (tests/conftest.py) made of this file's
    `worker`, shared with test_tf_collectives."""
    return tf_run


def _results(run, name: str, ranks=(0, 1)) -> list[dict]:
    proc, out = run
    paths = [out / f"{name}.{r}.json" for r in ranks]
    assert all(p.exists() for p in paths), proc.stderr[-4000:]
    return [json.loads(p.read_text()) for p in paths]


@pytest.mark.torch  # runs subprocesses of another backend, like torch's
@pytest.mark.parametrize("name", list(MODELS))
def test_parity_with_single_process(run, name):
    for res in _results(run, name):
        assert res["forward"] <= 1e-5, res
        assert res["grads"] <= 1e-5, res
        assert res.get("logits", 0.0) <= 1e-5, res
        assert res["n_split"] > 0 and res["shards"] == [], res
        assert res["slots"] == [], res
        assert res["contract"] == [], res
        assert res["counts"] == res["expect"], res
        assert res["retraced"] == 0, res
        assert res["fit_losses"] <= 1e-5, res
        assert res["fit_weights"] <= 1e-4, res
    assert _results(run, name)[0]["loaded"] <= 1e-5


@pytest.mark.torch
def test_clipping_uses_full_norms_and_rank0_prints(run):
    for res in _results(run, "clip"):
        for key in ("clipnorm", "global_clipnorm"):
            assert res[key]["clipped"] > 1e-3, res
            assert res[key]["losses"] <= 1e-5, res
            assert res[key]["weights"] <= 1e-5, res
        assert res["predict"] <= 1e-5 and res["evaluate"] <= 1e-5, res
    stdout = run[0].stdout
    assert stdout.count("Epoch 1/2") == 1, stdout[-2000:]
    assert stdout.count("Epoch 2/2") == 1, stdout[-2000:]


@pytest.mark.torch
def test_a_wrap_failing_on_one_rank_rolls_back_every_rank(run):
    mine, peer = _results(run, "rollback")[1], _results(run, "rollback")[0]
    assert mine["first"] == "ValueError: rank 1 fails on purpose", mine
    assert peer["first"].startswith("ValueError: rank 1 failed"), peer
    for res in (mine, peer):
        assert res["unchanged"] and res["again"] <= 1e-5, res


@pytest.mark.torch
def test_a_failing_rank_ends_the_run_with_its_error(run):
    proc, _ = run
    assert proc.returncode not in (0, 124), proc.stderr[-2000:]
    assert "rank 1 fails on purpose" in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("RuntimeError: rank 1 fails on purpose") <= 2


@pytest.mark.torch
def test_a_plain_process_runs_at_world_size_one(run):
    res = _results(run, "plain", ranks=(0,))[0]
    assert res["engine"] == "tensorflow" and res["devices"] == ["cpu:0"], res
    assert res["split"] == 0 and res["forward"] == 0.0, res
    assert "only before its first tensor" in res["late"], res
    assert "from keras_tensor_parallel import" in res["late"], res


if __name__ == "__main__":
    if sys.argv[1] == "plain":
        plain(sys.argv[2])
    else:
        worker(*sys.argv[1:])
