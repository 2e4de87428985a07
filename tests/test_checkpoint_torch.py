"""Sharded checkpoints on the torch engine (torch.distributed.checkpoint):
each rank writes its own shards, a resumed run is bit-identical at the
same world size and equal within float rounding at another, a save killed
midway leaves the previous step loadable, bad checkpoints are refused.

One launch of this file as a worker in 2 ranks (gloo, 127.0.0.1), then
one plain process (world size 1) that restores the 2-rank checkpoint and
kills a save of its own; both bounded by timeouts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch_ckpt_cases as cases
from torch_ckpt_cases import _Losses, _same

HERE = os.path.abspath(__file__)
TIMEOUT = 200
VOCAB = 1001  # split unevenly over 2 ranks: 501 and 500 rows


def _digest(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.join(root, name)] = hashlib.sha256(
                    f.read()
                ).hexdigest()
    return out


# Worker (KERAS_BACKEND=torch) ---------------------------------------------


def _data():
    rng = np.random.RandomState(0)
    x = rng.randint(0, VOCAB, (24, 6)).astype("int32")
    return x, rng.randn(24, 8).astype("float32")


def _make(seed: int, dropout: float, optimizer: str = "adam"):
    """A vocab-parallel table, a column and a row layer, a dropout."""
    import keras

    from keras_tensor_parallel import TensorParallelKeras
    from keras_tensor_parallel.backends import torch_collectives as tc

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(VOCAB, 32),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(dropout, seed=3),
            keras.layers.Dense(32),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(8),
        ]
    )
    tp = TensorParallelKeras(model, world_size=tc.world_size())
    opt = keras.optimizers.get({"class_name": optimizer})
    tp.compile(optimizer=opt, loss="mse")
    return tp


def _fit(tp, part: slice, callbacks=()):
    x, y = _data()
    losses = _Losses()
    tp.fit(
        x[part],
        y[part],
        batch_size=4,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[losses, *callbacks],
    )
    return losses.losses


def _resume_case(folder: str, dropout: float) -> dict:
    """Train 3 steps, checkpoint, train 3 more; a fresh model restored
    from the checkpoint trains the same 3."""
    tp = _make(1, dropout)
    _fit(tp, slice(0, 12))
    path = tp.save_checkpoint(folder)
    return {
        "path": path,
        **cases.resume(
            tp,
            folder,
            lambda: _make(7, dropout),  # other initial weights
            lambda model: _fit(model, slice(12, 24)),
        ),
        "roles": sorted({e.role.value for e in tp.plan if e.is_split}),
    }


def _bad_case(folder: str) -> dict:
    """Loads that must fail: another optimizer, another model, no path."""
    import keras

    from keras_tensor_parallel import TensorParallelKeras
    from keras_tensor_parallel.backends import torch_collectives as tc

    sgd = _make(1, 0.0, optimizer="sgd")
    before = sgd.get_weights()
    small = keras.Sequential(
        [keras.Input((6,), dtype="int32"), keras.layers.Embedding(VOCAB, 16)]
    )
    small = TensorParallelKeras(small, world_size=tc.world_size())
    small.compile(optimizer="adam", loss="mse")
    digest = _digest(folder)
    out = {}
    cases = {
        "optimizer": lambda: sgd.load_checkpoint(folder),
        "missing": lambda: sgd.load_checkpoint(folder + "_missing"),
        "model": lambda: small.load_checkpoint(folder),
    }
    for key, call in cases.items():
        try:
            call()
            out[key] = "no error"
        except ValueError as e:
            out[key] = str(e)
    out["unchanged"] = _same(before, sgd.get_weights())
    out["files_unchanged"] = digest == _digest(folder)
    return out


def _callback_case(folder: str) -> list:
    from keras_tensor_parallel.checkpoint import ShardedCheckpoint, store_torch

    tp = _make(2, 0.0)
    _fit(tp, slice(0, 24), [ShardedCheckpoint(folder, save_freq=2, keep=2)])
    return store_torch.complete_steps(folder)


def worker(folder: str) -> None:
    import torch.distributed as dist

    from keras_tensor_parallel.backends import torch_collectives as tc

    tc.ensure_process_group()
    join = lambda name: os.path.join(folder, name)  # noqa: E731
    res = {
        "dropout": _resume_case(join("same"), 0.3),
        "cross": _resume_case(join("cross"), 0.0),
        "bad": _bad_case(join("same")),
        "callback": _callback_case(join("callback")),
        **{name: cases.hub_case(name, join(name)) for name in cases.HUB},
    }
    with open(join(f"result.{dist.get_rank()}.json"), "w") as f:
        json.dump(res, f)


def one_process(folder: str) -> None:
    """World size 1: restore the 2-rank checkpoint; then a save of its own
    killed (SIGKILL, in a forked child) before it is published."""
    import signal

    from keras_tensor_parallel.checkpoint import store_torch

    join = lambda name: os.path.join(folder, name)  # noqa: E731
    tp = _make(7, 0.0)
    loaded = tp.load_checkpoint(join("cross"))
    np.savez(join("restored.npz"), *tp.get_weights())
    losses = _fit(tp, slice(12, 24))
    first = tp.save_checkpoint(join("killed"))
    weights = tp.get_weights()
    pid = os.fork()
    if pid == 0:  # the child dies between writing and renaming
        store_torch._publish = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        _fit(tp, slice(0, 12))
        tp.save_checkpoint(join("killed"))
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    fresh = _make(9, 0.0)
    res = {
        "loaded": loaded,
        "losses": losses,
        "killed": os.WIFSIGNALED(status),
        "left": sorted(os.listdir(join("killed"))),
        "first": first,
        "latest": fresh.load_checkpoint(join("killed")),
    }
    res["restored"] = _same(weights, fresh.get_weights())
    res["hub"] = cases.hub_one_process(folder)
    with open(join("result.single.json"), "w") as f:
        json.dump(res, f)


def four_ranks(folder: str) -> None:
    """4 ranks restore the 2-rank checkpoints (1001 rows: 251, 250, 250,
    250 each; the kv head of `shared` on all 4, the fused bank's parts in
    4 blocks) and train on."""
    import torch.distributed as dist

    from keras_tensor_parallel.backends import torch_collectives as tc

    tc.ensure_process_group()
    tp = _make(7, 0.0)
    res = {
        "loaded": tp.load_checkpoint(os.path.join(folder, "cross")),
        "rows": int(tp.wrapped_model.layers[0].embeddings.value.shape[0]),
        "losses": _fit(tp, slice(12, 24)),
        "hub": {},  # shared kv (copies=4 here) and fused parts, from 2 ranks
    }
    for name in cases.HUB:
        hub = cases._make_hub(name, 9)
        res["hub"][name] = {
            "loaded": hub.load_checkpoint(os.path.join(folder, name)),
            "losses": cases._hub_fit(hub, slice(4, 8)),
        }
    with open(os.path.join(folder, f"result.four.{dist.get_rank()}"), "w") as f:
        json.dump(res, f)


# Tests (the pytest process, JAX) ------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from ranks import launch

    folder = tmp_path_factory.mktemp("torch_ckpt")
    proc = launch(HERE, str(folder), backend="torch", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    env.pop("XLA_FLAGS", None)
    single = subprocess.run(
        [sys.executable, HERE, str(folder), "single"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    ranks = [
        json.loads((folder / f"result.{r}.json").read_text()) for r in (0, 1)
    ]
    one = json.loads((folder / "result.single.json").read_text())
    return folder, ranks, one


@pytest.mark.torch
def test_resume_at_the_same_world_size_is_bit_identical(runs):
    _, ranks, _ = runs
    for res in ranks:
        for case in ("dropout", "cross"):
            run = res[case]
            assert {"vocab", "column", "row"} <= set(run["roles"]), run
            assert run["loaded"] == run["path"]
            assert len(run["losses"]) == 3, run
            assert run["resumed"] == run["losses"], (case, run)
            assert run["weights_equal"] and run["slots_equal"], (case, run)


@pytest.mark.torch
def test_each_rank_writes_its_own_shards(runs):
    _, ranks, _ = runs
    step = ranks[0]["cross"]["path"]
    files = sorted(os.listdir(step))
    assert files == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "tp_meta.json",
    ]
    sizes = [
        os.path.getsize(os.path.join(step, f"__{r}_0.distcp")) for r in (0, 1)
    ]
    # The embedding (1001 x 32), its two Adam slots and the split Dense
    # layers are in both files, half each: no rank wrote the whole.
    table = VOCAB * 32 * 4 * 3
    assert all(s > table / 2 * 0.9 for s in sizes), sizes
    assert sum(sizes) < table * 1.6, sizes


@pytest.mark.torch
def test_restore_at_another_world_size(runs):
    _, ranks, one = runs
    assert one["loaded"] == ranks[0]["cross"]["path"]
    assert len(one["losses"]) == 3, one
    np.testing.assert_allclose(
        one["losses"], ranks[0]["cross"]["losses"], rtol=1e-5, atol=0
    )


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.skipif(
    os.environ.get("KTP_TORCH_FOUR_RANKS") != "1",
    reason="4 processes (about 90 s on 2 cores); KTP_TORCH_FOUR_RANKS=1",
)
def test_restore_at_four_ranks(runs):
    from ranks import launch

    folder, ranks, _ = runs
    proc = launch(HERE, str(folder), "four", backend="torch", n=4, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in range(4):
        res = json.loads((folder / f"result.four.{r}").read_text())
        assert res["loaded"] == ranks[0]["cross"]["path"]
        assert res["rows"] == (251 if r == 0 else 250), res
        np.testing.assert_allclose(
            res["losses"], ranks[0]["cross"]["losses"], rtol=1e-5, atol=0
        )
        for name, hub in res["hub"].items():
            assert hub["loaded"] == ranks[0][name]["path"]
            np.testing.assert_allclose(
                hub["losses"], ranks[0][name]["losses"], rtol=1e-5, atol=0
            )


@pytest.mark.torch
def test_a_killed_save_leaves_the_previous_step(runs):
    _, _, one = runs
    assert one["killed"], one
    assert [n for n in one["left"] if n.startswith("step_")] == [
        os.path.basename(one["first"])
    ], one
    assert any(".tmp-" in n for n in one["left"]), one  # the killed save
    assert one["latest"] == one["first"] and one["restored"], one


@pytest.mark.torch
def test_export_writes_one_keras_file(runs, tmp_path):
    # Here under JAX: the file loads without this library or torch's ranks.
    import keras

    from keras_tensor_parallel import checkpoint

    folder, ranks, _ = runs
    out = str(tmp_path / "model.keras")
    assert checkpoint.export(folder / "cross", out) == ranks[0]["cross"]["path"]
    model = keras.saving.load_model(out)
    with np.load(folder / "restored.npz") as restored:
        want = [restored[f"arr_{i}"] for i in range(len(restored.files))]
    got = model.get_weights()
    assert len(got) == len(want) and _same(got, want)


@pytest.mark.torch
def test_callback_keeps_the_last_steps(runs):
    _, ranks, _ = runs
    assert ranks[0]["callback"] == [4, 6], ranks[0]["callback"]


@pytest.mark.torch
def test_bad_checkpoints_are_refused_and_change_nothing(runs):
    _, ranks, _ = runs
    for res in ranks:
        bad = res["bad"]
        assert (
            "optimizer_class" in bad["optimizer"] and "SGD" in bad["optimizer"]
        )
        assert "does not exist" in bad["missing"], bad
        assert "does not match" in bad["model"] or "saved as" in bad["model"]
        assert bad["unchanged"] and bad["files_unchanged"], bad


@pytest.mark.torch
@pytest.mark.parametrize("name", ["shared", "fused"])
def test_shared_kv_and_fused_experts_checkpoint(runs, name):
    from keras_tensor_parallel.checkpoint import store_torch

    folder, ranks, one = runs
    runs_ = [res[name] for res in ranks]
    for run in runs_:
        assert run["loaded"] == run["path"] and len(run["losses"]) == 2
        assert run["resumed"] == run["losses"], run  # bit-identical
        assert run["weights_equal"] and run["slots_equal"], run
    odd, local = runs_[0]["odd"], runs_[0]["local"]
    if name == "shared":  # key/value: the one kv head held by both
        shared = [p for p, v in odd.items() if v == [2, 1]]
        assert len(shared) == 2, odd
        assert all(local[p] == [32, 1, 8] for p in shared), local
        assert cases.chunks(runs_[0]["path"], "key/kernel") == [[0, 0, 0]]
    else:  # each rank's block of both parts: 2 pieces per rank
        gate = next(p for p, v in odd.items() if v == [1, 2])
        assert local[gate] == [3, 32, 16], local
        assert cases.chunks(runs_[0]["path"], "gate_dense") == [
            [0, 0, off] for off in (0, 8, 16, 24)
        ]
    # DCP read whole (export's reader) is the engine's gathered weights.
    _, values = store_torch.model_values(runs_[0]["path"])
    with np.load(folder / name / "saved.npz") as saved:
        want = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    assert len(values) == len(want)
    assert _same(list(values.values()), want)
    # World size 1 restores it and trains on within float rounding.
    hub = one["hub"][name]
    assert hub["loaded"] == runs_[0]["path"]
    np.testing.assert_allclose(
        hub["losses"], runs_[0]["losses"], rtol=1e-5, atol=0
    )


@pytest.mark.torch
def test_torch_plan_fields_survive_json():
    assert cases.plan_round_trip()


if __name__ == "__main__":
    if sys.argv[2:] == ["single"]:
        one_process(sys.argv[1])
    elif sys.argv[2:] == ["four"]:
        four_ranks(sys.argv[1])
    else:
        worker(*sys.argv[1:])
