"""Issue 11: sharded checkpoints (Orbax) that resume bit-identically,
reshard across world sizes, survive a killed save, and export to a
single-device .keras file (JAX engine, 4 simulated devices)."""

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

from keras_tensor_parallel import catalogue
from keras_tensor_parallel import checkpoint as ckpt
from keras_tensor_parallel.model import TensorParallelKeras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, K = 6, 3


def _make(dropout: float = 0.3):
    # seed-mlp with a dropout layer: its seed generator is RNG state the
    # checkpoint must carry for a bit-identical resume.
    keras.utils.set_random_seed(1)
    base = catalogue.seed_mlp()
    layers = [keras.Input((64,))] + base.layers[:2]
    layers += [keras.layers.Dropout(dropout)] + base.layers[2:]
    return keras.Sequential(layers)


def _tp(n: int, optimizer: str = "adam"):
    tp = TensorParallelKeras(_make(), world_size=n)
    opt = {
        "adam": lambda: keras.optimizers.Adam(1e-2),
        "sgd": lambda: keras.optimizers.SGD(1e-2, momentum=0.9),
    }[optimizer]()
    tp.compile(optimizer=opt, loss="mse")
    return tp


def _batches():
    rng = np.random.RandomState(0)
    x = rng.randn(STEPS, 8, 64).astype("float32")
    y = rng.randn(STEPS, 8, 32).astype("float32")
    return x, y


def _train(tp, start, stop):
    x, y = _batches()
    return [float(tp.train_on_batch(x[i], y[i])) for i in range(start, stop)]


@pytest.fixture(scope="module")
def uninterrupted():
    tp = _tp(4)
    losses = _train(tp, 0, STEPS)
    return losses, tp.get_weights()


@pytest.fixture(scope="module")
def saved_at_k(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("ckpt"))
    tp = _tp(4)
    _train(tp, 0, K)
    path = tp.save_checkpoint(directory)
    assert os.path.basename(path) == f"step_{K:08d}"
    return directory


def test_resume_at_same_world_size_is_bit_identical(uninterrupted, saved_at_k):
    losses, weights = uninterrupted
    tp = _tp(4)
    tp.load_checkpoint(saved_at_k)
    assert int(tp.optimizer.iterations.numpy()) == K
    assert _train(tp, K, STEPS) == losses[K:]
    for got, want in zip(tp.get_weights(), weights):
        np.testing.assert_array_equal(got, want)


def test_resume_at_another_world_size_matches(uninterrupted, saved_at_k):
    losses, weights = uninterrupted
    tp = _tp(2)
    tp.load_checkpoint(saved_at_k)
    assert tp.plan.split  # really sharded at N=2
    np.testing.assert_allclose(_train(tp, K, STEPS), losses[K:], rtol=1e-5)
    for got, want in zip(tp.get_weights(), weights):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_checkpoint_holds_shards_where_they_live(saved_at_k):
    # Orbax writes one array per variable, each device's shard by its
    # owner; the fingerprint records logical shapes.
    meta = ckpt.store.read_metadata(ckpt.latest(saved_at_k))
    variables = meta["fingerprint"]["variables"]
    assert variables["optimizer"]  # slots and the iteration counter
    assert any("seed_generator" in v[2] for v in variables["model"].values())


def test_fit_callback_saves_and_keeps_the_last(tmp_path):
    tp = _tp(4)
    x, y = _batches()
    callback = ckpt.ShardedCheckpoint(str(tmp_path), save_freq=2, keep=2)
    tp.fit(x.reshape(-1, 64), y.reshape(-1, 32), batch_size=8, epochs=1,
           callbacks=[callback], verbose=0, shuffle=False)  # fmt: skip
    assert ckpt.complete_steps(tmp_path) == [4, 6]


def test_other_model_or_optimizer_is_refused(saved_at_k, tmp_path):
    sgd = _tp(4, optimizer="sgd")
    before = [w.copy() for w in sgd.get_weights()]
    with pytest.raises(ValueError, match="optimizer_class 'Adam'"):
        sgd.load_checkpoint(saved_at_k)
    other = TensorParallelKeras(catalogue.seed_mlp(), world_size=4)
    other.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    with pytest.raises(ValueError, match="does not match the model"):
        other.load_checkpoint(saved_at_k)
    for got, want in zip(sgd.get_weights(), before):
        np.testing.assert_array_equal(got, want)  # nothing half-loaded
    with pytest.raises(ValueError, match="does not exist"):
        sgd.load_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="No complete checkpoint"):
        sgd.load_checkpoint(str(tmp_path))


_KILLED_SAVE = """
import os, sys
sys.path.insert(0, {tests!r})
import numpy as np, keras
from keras_tensor_parallel.checkpoint import save
from keras_tensor_parallel.model import TensorParallelKeras
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((2048,)), keras.layers.Dense(2048),
                          keras.layers.Dense(2048)])
tp = TensorParallelKeras(model, world_size=4)
tp.compile(optimizer="adam", loss="mse")
x = np.ones((4, 2048), "float32")
tp.train_on_batch(x, x)
save(tp, {directory!r})
np.save({record!r}.format(1), tp.get_weights()[0][:4])
print("first saved", flush=True)
for step in range(2, 52):
    tp.train_on_batch(x, x)
    save(tp, {directory!r}, keep=None)
    np.save({record!r}.format(step), tp.get_weights()[0][:4])
"""


def test_killed_save_leaves_previous_checkpoint(tmp_path):
    directory = str(tmp_path / "ckpt")
    record = str(tmp_path / "weights_{}.npy")  # written after each save
    code = _KILLED_SAVE.format(
        tests=os.path.join(ROOT, "tests"), directory=directory, record=record
    )
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline().strip()
        if line != b"first saved":
            proc.wait(timeout=60)
            raise AssertionError(proc.stderr.read().decode()[-3000:])
        deadline = time.time() + 120
        while time.time() < deadline:  # kill while a save is in flight
            names = os.listdir(directory)
            if any("tmp" in n for n in names):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    names = os.listdir(directory)
    assert any("tmp" in n for n in names), names  # killed midway
    steps = ckpt.complete_steps(directory)
    assert steps and all(f"step_{s:08d}" in names for s in steps)
    model = keras.Sequential([keras.Input((2048,)), keras.layers.Dense(2048),
                              keras.layers.Dense(2048)])  # fmt: skip
    tp = TensorParallelKeras(model, world_size=4)
    tp.compile(optimizer="adam", loss="mse")
    path = tp.load_checkpoint(directory)
    assert path.endswith(f"step_{steps[-1]:08d}")
    if os.path.exists(record.format(steps[-1])):  # else killed just after
        want = np.load(record.format(steps[-1]))
        np.testing.assert_array_equal(tp.get_weights()[0][:4], want)


def test_export_loads_without_this_library(saved_at_k, tmp_path):
    from keras_tensor_parallel import cli

    out = str(tmp_path / "model.keras")
    assert cli.main(["export", saved_at_k, out]) == 0
    tp = _tp(4)
    tp.load_checkpoint(saved_at_k)
    x = _batches()[0][0]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", np.asarray(tp.predict(x, verbose=0)))
    code = f"""
import sys, numpy as np, keras
model = keras.saving.load_model({out!r})
got = model.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0)
want = np.load({str(tmp_path / "want.npy")!r})
assert not any(m.startswith("keras_tensor_parallel") for m in sys.modules)
np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env=env, cwd=str(tmp_path), timeout=300,
    )  # fmt: skip
    assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_compiled_task_with_padded_vocab_resumes(tmp_path):
    # GPT-2's tiny vocab (1001) is stored padded at N=4; the KerasHub task
    # is compiled, so its own optimizer sits in the saving walk.
    spec = catalogue.get("gpt2").tiny()
    x = spec.inputs(batch=2, seq=8)

    def make():
        keras.utils.set_random_seed(0)
        lm = catalogue.causal_lm(spec.build())
        tp = TensorParallelKeras(lm, world_size=4)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        tp.compile(optimizer="adam", loss=loss)
        return tp

    reference = make()
    losses = [float(reference.train_on_batch(x, x["token_ids"]))
              for _ in range(4)]  # fmt: skip
    first = make()
    for _ in range(2):
        first.train_on_batch(x, x["token_ids"])
    first.save_checkpoint(str(tmp_path))
    resumed = make()
    resumed.load_checkpoint(str(tmp_path))
    again = [float(resumed.train_on_batch(x, x["token_ids"]))
             for _ in range(2)]  # fmt: skip
    assert again == losses[2:]
