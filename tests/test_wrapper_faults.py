"""Faults around the wrapper: wrapping is all or nothing (engine errors on
any step, Ctrl-C at any moment), a failed fit/evaluate/predict leaves the
model usable and as it was, saving replaces a file only by a whole one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from keras_tensor_parallel import TensorParallelKeras, catalogue
from keras_tensor_parallel.backends import jax as jax_engine
from keras_tensor_parallel.backends import jax_fusion

GPT2 = catalogue.get("gpt2").tiny()  # vocab 1001: a padded embedding at N=2


def snapshot(model) -> dict:
    """Everything wrapping may change: variables (class, shape, layout,
    placement, value) and layer attributes the engine patches."""
    return {
        "variables": [
            (
                v.path,
                type(v).__name__,
                tuple(v.shape),
                v._layout,
                str(v.value.sharding),
                np.asarray(v.value).copy(),
            )
            for v in model.variables
        ],
        "layers": [
            (
                layer.path,
                "call" in layer.__dict__,
                layer.__dict__.get("input_spec"),
                sorted(k for k in layer.__dict__ if k.startswith("_tp_")),
            )
            for layer in model._flatten_layers(include_self=True)
        ],
        "wrapped": getattr(model, "_tp_wrapped", False),
    }


def assert_same(after: dict, before: dict) -> None:
    assert after["layers"] == before["layers"]
    assert after["wrapped"] == before["wrapped"]
    assert len(after["variables"]) == len(before["variables"])
    for a, b in zip(after["variables"], before["variables"]):
        assert a[:5] == b[:5], a[0]
        np.testing.assert_array_equal(a[5], b[5])


def _logits(model, x):
    return np.asarray(model.token_embedding(model(x), reverse=True))


# Engine errors -------------------------------------------------------------


def _failing_on(k: int, original):
    calls = {"n": 0}

    def fail(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k + 1:
            raise RuntimeError(f"engine fails on purpose at step {k}")
        return original(*args, **kwargs)

    return fail


@pytest.mark.parametrize("k", [0, 1, "embedding", "last"])
def test_engine_error_on_any_variable_rolls_everything_back(monkeypatch, k):
    model = GPT2.build()
    x = GPT2.inputs(2, 8, 0)
    want = _logits(model, x)
    paths = [v.path for v in model.variables]
    k = {
        "embedding": next(i for i, p in enumerate(paths) if "token_emb" in p)
        + 1,  # the step after the padded table
        "last": len(paths) - 1,
    }.get(k, k)
    before = snapshot(model)
    monkeypatch.setattr(
        jax_engine, "reshard", _failing_on(k, jax_engine.reshard)
    )
    with pytest.raises(RuntimeError, match=f"at step {k}"):
        TensorParallelKeras(model, world_size=2)
    assert_same(snapshot(model), before)
    assert _logits(model, x).shape == want.shape == (2, 8, 1001)
    np.testing.assert_array_equal(_logits(model, x), want)


@pytest.mark.parametrize(
    "module, name",
    [
        (jax_engine, "install_vocab_slicing"),
        (jax_fusion, "install"),
        (jax_engine, "install_replicated_grads"),
        (jax_engine, "place_state"),
    ],
)
def test_engine_error_after_resharding_rolls_everything_back(
    monkeypatch, module, name
):
    model = GPT2.build()
    model.compile(optimizer="adam", loss="mse")  # optimizer state to place
    model.optimizer.build(model.trainable_variables)
    x = GPT2.inputs(2, 8, 0)
    want = _logits(model, x)
    before = snapshot(model)
    monkeypatch.setattr(module, name, _failing_on(0, getattr(module, name)))
    with pytest.raises(RuntimeError, match="on purpose"):
        TensorParallelKeras(model, world_size=2)
    assert_same(snapshot(model), before)
    np.testing.assert_array_equal(_logits(model, x), want)
    tp = TensorParallelKeras(model, world_size=2)  # and it still wraps
    np.testing.assert_allclose(_logits(model, x), want, rtol=1e-5, atol=1e-5)
    assert tp.world_size == 2


CTRL_C = textwrap.dedent(
    """
    import os, random, signal, sys, threading, time
    sys.path.insert(0, {tests!r})
    import numpy as np
    from test_wrapper_faults import GPT2, snapshot, assert_same, _logits
    from keras_tensor_parallel import TensorParallelKeras
    from keras_tensor_parallel.backends import jax as jax_engine

    started = {{"apply": False, "at": 0.0}}
    original = jax_engine.JaxEngine.apply

    def apply(self, model, **kw):
        started["apply"] = True
        started["at"] = time.perf_counter()
        return original(self, model, **kw)

    jax_engine.JaxEngine.apply = apply
    x = GPT2.inputs(2, 8, 0)
    for _ in range(2):  # the second wrap is warm: time that one
        model = GPT2.build()
        t = time.perf_counter()
        TensorParallelKeras(model, world_size=2)
        full = time.perf_counter() - t
        reach = started["at"] - t  # when the resharding starts
    rng = random.Random(0)
    counts = {{"interrupted": 0, "in_apply": 0, "completed": 0}}
    model = GPT2.build()
    want = _logits(model, x)
    # Until enough interrupts landed (a loaded machine changes how long a
    # wrap takes, so the delays follow the quickest wrap seen, and stretch
    # when an interrupt meant for the resharding came before it), bounded.
    runs = 0
    while runs < {runs} or (
        runs < 4 * {runs}
        and (counts["interrupted"] < 3 or counts["in_apply"] < 1)
    ):
        runs += 1
        before = snapshot(model)
        started["apply"] = False
        # Every other delay lands after the resharding began, as measured.
        delay = rng.uniform(0.0 if runs % 2 else reach, full)
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        wrapped = False
        t = time.perf_counter()
        try:
            TensorParallelKeras(model, world_size=2)
            wrapped = True
            full = min(full, time.perf_counter() - t)
            timer.cancel()
            timer.join()
            time.sleep(0.05)  # a signal sent after the wrap lands here
        except KeyboardInterrupt:
            if not wrapped:
                counts["interrupted"] += 1
                counts["in_apply"] += started["apply"]
                assert_same(snapshot(model), before)
                np.testing.assert_array_equal(_logits(model, x), want)
                if delay >= reach and not started["apply"]:
                    reach, full = 1.5 * reach, 1.5 * full  # slower now
        if wrapped:
            counts["completed"] += 1
            model = GPT2.build()
            want = _logits(model, x)
    TensorParallelKeras(model, world_size=2)  # an interrupted model wraps
    np.testing.assert_allclose(_logits(model, x), want, rtol=1e-5, atol=1e-5)
    print("COUNTS", counts)
    """
)


def test_ctrl_c_at_random_moments_leaves_the_model_unchanged():
    here = os.path.dirname(os.path.abspath(__file__))
    script = CTRL_C.format(tests=here, runs=12)
    env = dict(os.environ, KERAS_BACKEND="jax")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=here,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = eval(proc.stdout.split("COUNTS", 1)[1].strip())
    assert counts["interrupted"] >= 3, counts
    assert counts["in_apply"] >= 1, counts  # some landed mid-resharding


# A failed fit / evaluate / predict -----------------------------------------


def _trained_mlp():
    model = catalogue.seed_mlp()
    x, y = (
        np.random.RandomState(0).randn(32, 64).astype("float32"),
        np.random.RandomState(1).randn(32, 32).astype("float32"),
    )
    tp = TensorParallelKeras(model, world_size=2)
    tp.compile(optimizer="adam", loss="mse")
    tp.fit(x, y, batch_size=8, verbose=0)
    return tp, x, y


def _state(tp):
    return [np.asarray(v).copy() for v in tp.variables] + [
        np.asarray(v).copy() for v in tp.optimizer.variables
    ]


@pytest.mark.parametrize("method", ["fit", "evaluate", "predict"])
def test_a_failed_call_leaves_the_model_as_it_was(method):
    tp, x, y = _trained_mlp()
    before = _state(tp)
    expected = tp.predict(x, verbose=0)
    args = (x.astype(str),) if method == "predict" else (x.astype(str), y)
    with pytest.raises(ValueError):
        getattr(tp, method)(*args, verbose=0)
    for a, b in zip(_state(tp), before):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(tp.predict(x, verbose=0), expected)
    assert np.isfinite(tp.fit(x, y, verbose=0).history["loss"][0])


def test_a_fit_failing_after_some_steps_leaves_the_model_usable():
    tp, x, y = _trained_mlp()

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                raise RuntimeError("callback fails on purpose")

    with pytest.raises(RuntimeError, match="on purpose"):
        tp.fit(x, y, batch_size=8, verbose=0, callbacks=[Stop()])
    assert all(v._value is not None for v in tp.variables)
    kernel = tp.wrapped_model.layers[0].kernel
    assert [s.data.shape for s in kernel.value.addressable_shards] == [
        (64, 64),
        (64, 64),
    ]
    assert np.isfinite(tp.predict(x, verbose=0)).all()
    assert np.isfinite(tp.evaluate(x, y, verbose=0))


# Atomic saves --------------------------------------------------------------


def test_save_replaces_the_file_and_leaves_no_temporary(tmp_path):
    tp, x, _ = _trained_mlp()
    path = tmp_path / "m.keras"
    path.write_text("an old file")
    tp.save(path)
    tp.save_weights(tmp_path / "m.weights.h5")
    assert sorted(os.listdir(tmp_path)) == ["m.keras", "m.weights.h5"]
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), tp.predict(x, verbose=0), atol=1e-5
    )


def test_save_without_overwrite_asks_first(tmp_path, monkeypatch):
    from keras.src.utils import io_utils

    tp, x, _ = _trained_mlp()
    path = tmp_path / "m.keras"
    path.write_text("an old file")
    answers = iter([False, True])
    monkeypatch.setattr(
        io_utils, "ask_to_proceed_with_overwrite", lambda p: next(answers)
    )
    tp.save(path, overwrite=False)  # the user says no
    assert path.read_text() == "an old file"
    tp.save(path, False)  # yes (positional, as keras.Model.save takes it)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), tp.predict(x, verbose=0), atol=1e-5
    )


SAVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from keras_tensor_parallel import TensorParallelKeras, catalogue
    model = catalogue.seed_mlp()
    tp = TensorParallelKeras(model, world_size=2)
    i = 0
    while True:  # each save writes weights scaled differently
        i += 1
        tp.set_weights([w * 0 + i for w in tp.get_weights()])
        tp.save(sys.argv[1])
        print("SAVED", i, flush=True)
    """
)


def test_sigkill_while_saving_leaves_a_whole_file(tmp_path):
    path = tmp_path / "m.keras"
    env = dict(os.environ, KERAS_BACKEND="jax")
    rng = np.random.RandomState(0)
    seen = set()
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert proc.stdout.readline().startswith("SAVED")  # one whole
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        model = keras.saving.load_model(path)
        values = {float(np.unique(w)[0]) for w in model.get_weights()}
        assert len(values) == 1, values  # one save's weights, not a mix
        seen |= values
        # A kill can leave only the hidden temporary it was writing.
        others = [p for p in os.listdir(tmp_path) if p != "m.keras"]
        assert all(p.startswith(".m.keras.") for p in others), others
    assert seen
