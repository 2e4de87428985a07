"""Torch engine: 2 processes on 127.0.0.1 against a single-process run.

The pytest process runs under JAX; each test launches this file as a
worker script in 2 ranks with `KERAS_BACKEND=torch` through
`keras_tensor_parallel.launch` (a hard timeout, so a hang fails the test).
Every rank builds the same reference model from the same seed, so rank 0
compares against a single-process run from the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
TIMEOUT = 150

# (batch, seq) per case; OPT's vocab 1000 splits evenly, GPT-2's 1001 not.
TINY = dict(num_layers=2, num_heads=4, hidden_dim=32, intermediate_dim=64)


def _subclassed():
    import keras

    @keras.saving.register_keras_serializable(package="tp_test")
    class ResidualMLP(keras.Model):
        """A plain subclassed model: Dense layers and a residual."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inp = keras.layers.Dense(64)
            self.up = keras.layers.Dense(128, activation="relu")
            self.down = keras.layers.Dense(64)
            self.head = keras.layers.Dense(32)

        def call(self, x):
            h = self.inp(x)
            h = h + self.down(self.up(h))
            return self.head(h)

    def build():
        model = ResidualMLP()
        model(np.zeros((1, 64), "float32"))
        return model

    return build


def _case(name):
    from keras_tensor_parallel import zoo

    rng = np.random.RandomState(1)
    if name == "subclass":
        x = rng.randn(8, 64).astype("float32")
        return _subclassed(), x, rng.randn(8, 32).astype("float32"), 0
    if name == "mlp":
        x = rng.randn(8, 64).astype("float32")
        return zoo.seed_mlp, x, rng.randn(8, 32).astype("float32"), 0
    if name == "attention":
        x = rng.randn(4, 32, 64).astype("float32")
        return zoo.seed_attention, x, rng.randn(4, 16).astype("float32"), 0
    if name == "llama":
        # Untied output head (reverse_embeddings) over an odd vocab, GQA,
        # gated MLP.
        vocab = 1001

        def build():
            return zoo.llama(
                vocabulary_size=vocab,
                num_layers=TINY["num_layers"],
                num_query_heads=4,
                num_key_value_heads=2,
                hidden_dim=TINY["hidden_dim"],
                intermediate_dim=TINY["intermediate_dim"],
            )
    elif name == "opt":
        vocab = 1000

        def build():
            return zoo.opt(
                vocabulary_size=vocab, max_sequence_length=16, **TINY
            )
    else:
        vocab = 1001

        def build():
            return zoo.gpt2(
                vocabulary_size=vocab, max_sequence_length=16, **TINY
            )

    x = {
        "token_ids": rng.randint(0, vocab, (4, 8)).astype("int32"),
        "padding_mask": np.ones((4, 8), "int32"),
    }
    return build, x, rng.randn(4, 8, 32).astype("float32"), TINY["num_layers"]


def _rel(a, b) -> float:
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _rel_all(xs, refs) -> float:
    """Largest abs difference over all arrays / largest abs reference."""
    diff = max(float(np.max(np.abs(_np(a) - _np(b)))) for a, b in zip(xs, refs))
    return diff / max(float(np.max(np.abs(_np(b)))) for b in refs)


def _np(x):
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else x
    return np.asarray(x, "float64")


def _grads(model, x):
    import torch

    for v in model.trainable_variables:
        v.value.grad = None
    out = model(x)
    torch.mean(out**2).backward()
    # A variable the backbone's forward does not read (an untied output
    # head) gets no gradient: compare it as zeros on both sides.
    return [
        torch.zeros_like(v.value)
        if v.value.grad is None
        else v.value.grad.detach().clone()
        for v in model.trainable_variables
    ]


def worker(name: str, out_path: str, fail: str = "") -> None:
    """Runs in every rank (KERAS_BACKEND=torch)."""
    if name == "all":
        return all_worker(out_path)
    if name == "compile":
        return compile_worker(out_path)
    if name == "clip":
        return clip_worker(out_path)
    if name == "unrunnable":
        return unrunnable_worker(out_path)
    if name == "save_error":
        return save_error_worker(out_path)
    if name == "wrap_error":
        return wrap_error_worker(out_path)
    import keras
    import torch.distributed as dist

    from keras_tensor_parallel import TensorParallelKeras, zoo
    from keras_tensor_parallel.backends import torch as tb

    if fail:
        tb.ensure_process_group()
        if dist.get_rank() == 1:
            raise RuntimeError("rank 1 fails on purpose")
        dist.barrier()  # rank 0 would wait here forever without the agent
        return
    build, x, y, blocks = _case(name)
    ref, cand, _ = zoo.build_pair(build, seed=0)
    res = {"rank": None}
    ref_out = np.asarray(ref(x).detach())
    ref_grads = _grads(ref, x)
    if name in ("opt", "gpt2", "llama"):
        ref_logits = np.asarray(
            ref.token_embedding(ref(x), reverse=True).detach()
        )

    tp = TensorParallelKeras(cand, world_size=2)
    res["rank"] = dist.get_rank()
    res["forward"] = _rel(tp(x).detach(), ref_out)
    res["forward_abs"] = float(np.max(np.abs(tp(x).detach().numpy() - ref_out)))
    grads = _grads(cand, x)
    local_ref = [
        v.local_slice(rg) if hasattr(v, "local_slice") else rg
        for rg, v in zip(ref_grads, cand.trainable_variables)
    ]
    res["grads"] = _rel_all(grads, local_ref)
    if name in ("opt", "gpt2", "llama"):
        logits = cand.token_embedding(cand(x), reverse=True).detach()
        res["logits"] = _rel(logits, ref_logits)
    res["local_shapes"] = {v.path: list(v.value.shape) for v in cand.variables}

    for model in (ref, tp):
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    # Count a step after the first, which also builds optimizer and metric
    # state (for Llama that build runs an extra forward pass). Both sides
    # take the same steps.
    tp.train_on_batch(x, y)
    ref.train_on_batch(x, y)
    tb.reset_counts()
    tp.train_on_batch(x, y)
    res["counts"] = dict(tb.COUNTS)
    # The first projection's f needs no backward all-reduce when its input
    # is the model input (no gradient flows into it).
    res["expect"] = [2 * blocks + 1, 2 * blocks] if blocks else [2, 1]
    ref.train_on_batch(x, y)
    kw = dict(epochs=5, batch_size=len(y), shuffle=False, verbose=0)
    ref_hist = ref.fit(x, y, **kw).history["loss"]
    tp_hist = tp.fit(x, y, **kw).history["loss"]
    res["losses"] = [tp_hist, ref_hist]
    res["fit_losses"] = _rel(tp_hist, ref_hist)
    # Every variable listed once, none of them again as optimizer state.
    ids = [id(v) for v in tp.variables]
    res["variables_once"] = (
        len(ids) == len(set(ids)) == len(ref.variables)
        and not set(ids) & {id(v) for v in tp.optimizer.variables}
        and len(tp.optimizer.variables) == len(ref.optimizer.variables)
    )
    full = tp.get_weights()  # gathered on every rank
    # A key bias gets an exactly-zero gradient (softmax is shift-invariant)
    # that rounding makes +-1e-9; Adam scales that noise to full-size steps
    # in any two runs that round differently, so it is not compared.
    keep = [i for i, v in enumerate(ref.weights) if "key/bias" not in v.path]
    res["fit_weights"] = _rel_all(
        [full[i] for i in keep], [ref.get_weights()[i] for i in keep]
    )
    path = os.path.join(os.path.dirname(out_path), f"{name}.keras")
    tp.save(path)
    if dist.get_rank() == 0:
        loaded = keras.saving.load_model(path)
        res["loaded"] = _rel(loaded(x).detach(), ref(x).detach())
        with open(out_path, "w") as fh:
            json.dump(res, fh)


def unrunnable_worker(out_path: str) -> None:
    """DeBERTa's attention reshapes with the full head count, which local
    shards cannot satisfy: the wrap must fail at once with a ValueError and
    leave the model as it was; Falcon's ALiBi table (full-size, added to
    split heads) must keep its attention whole on torch and run correctly."""
    import keras_hub
    import torch.distributed as dist

    from keras_tensor_parallel import TensorParallelKeras, zoo

    rng = np.random.RandomState(1)
    x = {
        "token_ids": rng.randint(0, 256, (2, 8)).astype("int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    res = {}

    def deberta():
        return keras_hub.models.DebertaV3Backbone(
            vocabulary_size=256, max_sequence_length=16, **TINY
        )

    _, cand, weights = zoo.build_pair(deberta, seed=0)
    before = [np.asarray(v.value.detach()).copy() for v in cand.variables]
    try:
        TensorParallelKeras(cand, world_size=2)
        res["error"] = ""
    except ValueError as e:
        res["error"] = str(e)
    after = [np.asarray(v.value.detach()) for v in cand.variables]
    res["unchanged"] = len(before) == len(after) and all(
        a.shape == b.shape and np.array_equal(a, b)
        for a, b in zip(after, before)
    )

    def falcon():
        return keras_hub.models.FalconBackbone(
            vocabulary_size=256,
            num_layers=1,
            num_attention_heads=4,
            hidden_dim=32,
            intermediate_dim=64,
        )

    ref, cand, _ = zoo.build_pair(falcon, seed=0)
    want = np.asarray(ref(x).detach())
    tp = TensorParallelKeras(cand, world_size=2)
    res["falcon"] = _rel(np.asarray(tp(x).detach()), want)
    res["falcon_attention_split"] = any(
        e.is_split for e in tp.plan if "query_dense" in e.path
    )
    res["falcon_mlp_split"] = any(
        e.is_split for e in tp.plan if "dense_h_to_4h" in e.path
    )
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.barrier()


def compile_worker(out_path: str) -> None:
    """MLP trained under `jit_compile=True` (torch.compile, inductor) on 2
    ranks against an eager single-process run."""
    import keras
    import torch
    import torch.distributed as dist

    from keras_tensor_parallel import TensorParallelKeras, zoo
    from keras_tensor_parallel.backends import torch as tb

    build, x, y, _ = _case("mlp")
    ref, cand, _ = zoo.build_pair(build, seed=0)
    tp = TensorParallelKeras(cand, world_size=2)
    ref.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    tp.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss="mse", jit_compile=True
    )
    tb.reset_counts()
    kw = dict(epochs=3, batch_size=len(y), shuffle=False, verbose=0)
    tp_hist = tp.fit(x, y, **kw).history["loss"]
    ref_hist = ref.fit(x, y, **kw).history["loss"]
    res = {
        "losses": [tp_hist, ref_hist],
        "fit_losses": _rel(tp_hist, ref_hist),
        "fit_weights": _rel_all(tp.get_weights(), ref.get_weights()),
        "jit_compile": bool(tp.jit_compile),
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        # f and g run eagerly (counted) only if dynamo fell back on them.
        "eager_collectives": sum(tb.COUNTS.values()),
    }
    if dist.get_rank() == 0:
        with open(out_path, "w") as fh:
            json.dump(res, fh)


def clip_worker(out_path: str) -> None:
    """clipnorm and global_clipnorm (SGD, so the clip scale reaches the
    update unchanged) on 2 ranks against one process; then a verbose fit
    and a save, whose output the test inspects."""
    import keras
    import torch.distributed as dist

    from keras_tensor_parallel import TensorParallelKeras, zoo

    build, x, y, _ = _case("attention")
    res = {}
    ref, _, _ = zoo.build_pair(build, seed=0)
    ref.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    plain = [float(ref.train_on_batch(x, y)) for _ in range(3)]
    for key, value in (("clipnorm", 0.01), ("global_clipnorm", 0.02)):
        ref, cand, _ = zoo.build_pair(build, seed=0)
        tp = TensorParallelKeras(cand, world_size=2)
        for model in (ref, tp):
            model.compile(
                optimizer=keras.optimizers.SGD(0.1, **{key: value}),
                loss="mse",
            )
        ref_losses = [float(ref.train_on_batch(x, y)) for _ in range(3)]
        tp_losses = [float(tp.train_on_batch(x, y)) for _ in range(3)]
        res[key] = {
            "losses": _rel(tp_losses, ref_losses),
            "weights": _rel_all(tp.get_weights(), ref.get_weights()),
            # The threshold is low enough that clipping changes training.
            "clipped": _rel(ref_losses, plain),
        }
    kw = dict(epochs=2, batch_size=len(y), shuffle=False, verbose=1)
    tp.fit(x, y, **kw)
    tp.save("model.keras")  # relative: the test's working directory
    if dist.get_rank() == 0:
        with open(out_path, "w") as fh:
            json.dump(res, fh)


def save_error_worker(out_path: str) -> None:
    """A save that fails on rank 0 only (its directory does not exist)
    raises on both ranks; a retry then saves on both, still in step."""
    import keras
    import torch.distributed as dist

    from keras_tensor_parallel import TensorParallelKeras, zoo

    build, x, _, _ = _case("mlp")
    _, cand, _ = zoo.build_pair(build, seed=0)
    tp = TensorParallelKeras(cand, world_size=2)
    rank = dist.get_rank()
    here = os.path.dirname(out_path)
    bad = os.path.join(here, "missing" if rank == 0 else "", "m.keras")
    res = {}
    try:
        tp.save(bad)
        res["first"] = ""
    except Exception as e:  # noqa: BLE001 - the test reads the message
        res["first"] = f"{type(e).__name__}: {e}"
    good = os.path.join(here, "m.keras")
    tp.save(good)
    want = np.asarray(tp(x).detach())
    if rank == 0:
        loaded = keras.saving.load_model(good)
        res["loaded"] = _rel(loaded(x).detach(), want)
    with open(f"{out_path}.{rank}", "w") as fh:
        json.dump(res, fh)


def wrap_error_worker(out_path: str) -> None:
    """Splitting fails on rank 1 only (its 5th split variable): both ranks
    raise, both models are as they were, and wrapping again works."""
    import torch.distributed as dist

    from keras_tensor_parallel import TensorParallelKeras, zoo
    from keras_tensor_parallel.backends import roles  # styles split here
    from keras_tensor_parallel.backends import torch_collectives as tc

    build, x, _, _ = _case("gpt2")
    _, cand, _ = zoo.build_pair(build, seed=0)
    tc.ensure_process_group()
    rank = dist.get_rank()
    before = [np.asarray(v.value.detach()).copy() for v in cand.variables]
    want = np.asarray(cand(x).detach())
    original, calls = roles.split_variable, []

    def fail(*args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 5:
            raise ValueError("rank 1 fails on purpose")
        return original(*args, **kwargs)

    roles.split_variable = fail
    res = {}
    try:
        TensorParallelKeras(cand, world_size=2)
        res["first"] = ""
    except Exception as e:  # noqa: BLE001 - the test reads the message
        res["first"] = f"{type(e).__name__}: {e}"
    roles.split_variable = original
    after = [np.asarray(v.value.detach()) for v in cand.variables]
    res["unchanged"] = all(
        a.shape == b.shape and np.array_equal(a, b)
        for a, b in zip(after, before)
    ) and not any(type(v).__name__.startswith("Split") for v in cand.variables)
    res["output"] = _rel(cand(x).detach(), want)
    tp = TensorParallelKeras(cand, world_size=2)
    res["forward"] = _rel(tp(x).detach(), want)
    with open(f"{out_path}.{rank}", "w") as fh:
        json.dump(res, fh)


PARITY = ["mlp", "attention", "opt", "gpt2", "llama", "subclass"]
CASES = [*PARITY, "compile", "clip", "unrunnable", "save_error", "wrap_error"]


def all_worker(folder: str) -> None:
    """Every case of this file in one launch (the imports of torch, Keras
    and KerasHub cost each launch more than most cases), each in its own
    directory, which is also the working directory while it runs. A case
    that raises on every rank records its error for its own test; the
    ranks meet at a barrier before the next."""
    import torch.distributed as dist

    from keras_tensor_parallel.backends import torch_collectives as tc

    tc.ensure_process_group()
    for name in CASES:
        here = os.path.join(folder, name)
        os.makedirs(here, exist_ok=True)
        os.chdir(here)
        try:
            worker(name, os.path.join(here, "result.json"))
        except Exception as e:  # noqa: BLE001 - the case's test reports it
            error = os.path.join(folder, f"{name}.error.{dist.get_rank()}")
            with open(error, "w") as fh:
                fh.write(f"{type(e).__name__}: {e}")
        dist.barrier()


def _launch(tmp_path, *args, timeout=TIMEOUT):
    from ranks import launch

    return launch(HERE, *args, backend="torch", timeout=timeout, cwd=tmp_path)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """The launch of every case; `cases(name)` is that case's directory
    (its test asserts on what the case left there)."""
    folder = tmp_path_factory.mktemp("torch_backend")
    proc = _launch(folder, "all", str(folder), timeout=6 * TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def case(name):
        errors = sorted(folder.glob(f"{name}.error.*"))
        assert not errors, [p.read_text() for p in errors]
        return folder / name

    case.stdout = proc.stdout
    return case


@pytest.mark.torch
@pytest.mark.parametrize("name", PARITY)
def test_parity_with_single_process(cases, name):
    res = json.loads((cases(name) / "result.json").read_text())
    assert res["forward"] <= 1e-5, res
    assert res["grads"] <= 1e-5, res
    assert res.get("logits", 0.0) <= 1e-5, res
    assert res["fit_losses"] <= 1e-5, res
    assert res["fit_weights"] <= 1e-4, res
    assert res["loaded"] <= 1e-5, res
    assert res["variables_once"], res
    # Megatron minimum: 2 all-reduces per block each way, +1 in forward for
    # the vocab-parallel embedding.
    assert [res["counts"]["forward"], res["counts"]["backward"]] == res[
        "expect"
    ], res


@pytest.mark.torch
def test_torch_compile_parity(cases):
    res = json.loads((cases("compile") / "result.json").read_text())
    assert res["jit_compile"] and res["graphs"] > 0, res
    assert res["eager_collectives"] == 0, res
    assert res["fit_losses"] <= 1e-5, res
    assert res["fit_weights"] <= 1e-4, res


@pytest.mark.torch
def test_clipping_and_rank0_output(cases):
    here = cases("clip")
    res = json.loads((here / "result.json").read_text())
    for key in ("clipnorm", "global_clipnorm"):
        assert res[key]["clipped"] > 1e-3, res
        assert res[key]["losses"] <= 1e-5, res
        assert res[key]["weights"] <= 1e-5, res
    # Both ranks write to the launcher's stdout; only rank 0 prints (each
    # epoch's header once, then its progress bar).
    # (No other case fits verbosely.)
    stdout = cases.stdout
    assert stdout.count("Epoch 1/2") == 1, stdout[-2000:]
    assert stdout.count("Epoch 2/2") == 1, stdout[-2000:]
    assert "/step - loss:" in stdout.split("Epoch 2/2")[1]
    assert sorted(p.name for p in here.iterdir()) == [
        "model.keras",
        "result.json",
    ]


@pytest.mark.torch
def test_unrunnable_plans_fail_at_wrap_time(cases):
    res = json.loads((cases("unrunnable") / "result.json").read_text())
    assert "cannot run this plan on local shards" in res["error"], res
    assert res["unchanged"], res
    assert res["falcon"] <= 1e-5, res
    assert not res["falcon_attention_split"] and res["falcon_mlp_split"], res


def test_failing_rank_stops_the_others(tmp_path):
    proc = _launch(tmp_path, "fail", "-", "fail", timeout=90)
    assert proc.returncode not in (0, 124), proc.stderr[-2000:]
    assert "rank 1 fails on purpose" in proc.stderr


if __name__ == "__main__":
    worker(*sys.argv[1:])


@pytest.mark.torch
def test_a_save_failing_on_one_rank_fails_on_every_rank(cases):
    here = cases("save_error")
    res = [json.loads((here / f"result.json.{r}").read_text()) for r in (0, 1)]
    assert "No such file or directory" in res[0]["first"], res
    # The same type on every rank, naming the rank that failed.
    kind = res[0]["first"].split(":")[0]
    assert res[1]["first"].startswith(f"{kind}: rank 0 failed"), res
    assert "No such file or directory" in res[1]["first"], res
    assert res[0]["loaded"] <= 1e-5, res
    assert sorted(p.name for p in here.iterdir()) == [
        "m.keras",
        "result.json.0",
        "result.json.1",
    ]


PLAIN = """
import numpy as np, keras, torch.distributed as dist
from keras_tensor_parallel import TensorParallelKeras, zoo
ref, cand, _ = zoo.build_pair(zoo.seed_mlp, seed=0)
x = np.random.RandomState(0).randn(8, 64).astype("float32")
y = np.random.RandomState(1).randn(8, 32).astype("float32")
tp = TensorParallelKeras(cand, distributed_backend="pytorch")
assert tp.world_size == 1 and tp.engine.name == "torch"
got, want = np.asarray(tp(x).detach()), np.asarray(ref(x).detach())
assert float(np.abs(got - want).max()) == 0
for m in (ref, tp):
    m.compile(optimizer="adam", loss="mse")
kw = dict(epochs=2, batch_size=8, shuffle=False, verbose=0)
assert ref.fit(x, y, **kw).history == tp.fit(x, y, **kw).history
tp.save("m.keras")
assert not dist.is_initialized()  # no process group, no collective
try:
    TensorParallelKeras(zoo.seed_mlp(), world_size=2)
except ValueError as e:
    print("ERROR", str(e))
"""


@pytest.mark.torch
def test_plain_python_process_runs_at_world_size_one(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    for key in ("XLA_FLAGS", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    error = proc.stdout.split("ERROR ", 1)[1].strip()
    assert "keras-tp launch -n 2 script.py" in error, error
    assert "XLA_FLAGS" not in error and "\n" not in error, error
    assert (tmp_path / "m.keras").exists()


@pytest.mark.torch
def test_a_wrap_failing_on_one_rank_rolls_back_every_rank(cases):
    here = cases("wrap_error")
    res = [json.loads((here / f"result.json.{r}").read_text()) for r in (0, 1)]
    assert res[1]["first"] == "ValueError: rank 1 fails on purpose", res
    assert res[0]["first"].startswith("ValueError: rank 1 failed"), res
    for r in res:
        assert r["unchanged"] and r["output"] == 0.0, res
        assert r["forward"] <= 1e-5, res
