"""Issue 15 (torch): data parallel x tensor parallel on 4 ranks.

`TensorParallelKeras(model, world_size=4, tensor_parallel_size=2,
distributed_backend="torch")` under one launch of 4 gloo ranks on
127.0.0.1 (hard timeout): the Megatron plan runs on each rank's model-axis
group (ranks {0, 1} and {2, 3}), each replica trains on its half of the
global batch, and gradients are averaged over the data-axis group ({0, 2},
{1, 3}). A third case runs the MLP as data=4 x model=1 on a batch of 6
rows (shares 2, 2, 1, 1: the loss and gradients weighted by share); both
again with `zero_stage=1`; sharded checkpoints with a data axis. Every
rank also trains a one-process copy of the same weights on
the whole batch and compares.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pytest

STEPS = 3
# `_zero`: the same with ZeRO-1 (optimizer slots cut over the data axis).
CASES = ("mlp", "opt", "mlp_dp4", "mlp_zero", "mlp_dp4_zero")
MESH = {  # per case, for ranks 0..3: (model group, data group)
    "mlp": [([0, 1], [0, 2]), ([0, 1], [1, 3]), ([2, 3], [0, 2])]
    + [([2, 3], [1, 3])],
    "mlp_dp4": [([r], [0, 1, 2, 3]) for r in range(4)],
}
MESH["opt"] = MESH["mlp_zero"] = MESH["mlp"]
MESH["mlp_dp4_zero"] = MESH["mlp_dp4"]
TINY = dict(num_layers=2, num_heads=4, hidden_dim=32, intermediate_dim=64)


def _case(name):
    from keras_tensor_parallel import zoo

    rng = np.random.RandomState(1)
    if name.startswith("mlp"):
        rows = 6 if "dp4" in name else 8
        x = rng.randn(rows, 64).astype("float32")
        return zoo.seed_mlp, x, rng.randn(rows, 32).astype("float32"), 0

    def build():
        return zoo.opt(vocabulary_size=1000, max_sequence_length=16, **TINY)

    x = {
        "token_ids": rng.randint(0, 1000, (4, 8)).astype("int32"),
        "padding_mask": np.ones((4, 8), "int32"),
    }
    return build, x, rng.randn(4, 8, 32).astype("float32"), 2


def _nbytes(variables) -> int:
    return sum(int(np.prod(v.value.shape)) * 4 for v in variables)


def _ideal_param_bytes(plan, model_rank: int, t: int) -> int:
    """One replica's parameter bytes on this rank: split variables at
    their shard along the split dim, the rest whole."""
    total = 0
    for e in plan.variables:
        shape = list(e.shape)
        if e.is_split:
            n = shape[e.split_dim]
            sizes = [n // t + (1 if i < n % t else 0) for i in range(t)]
            shape[e.split_dim] = sizes[model_rank]
        total += int(np.prod(shape)) * 4
    return total


def _run_case(name: str) -> dict:
    import keras

    from keras_tensor_parallel import TensorParallelKeras, zoo
    from keras_tensor_parallel.backends import torch_collectives as tc
    from keras_tensor_parallel.backends import torch_groups as tg
    from keras_tensor_parallel.backends import torch_zero as tz

    build, x, y, blocks = _case(name)
    ref, cand, _ = zoo.build_pair(build, seed=0)
    t = 1 if "dp4" in name else 2
    zero = int(name.endswith("_zero"))
    tp = TensorParallelKeras(
        cand, world_size=4, tensor_parallel_size=t, zero_stage=zero,
        distributed_backend="torch")  # fmt: skip
    groups = tp.engine.groups
    res = {"model_ranks": groups.model_ranks, "data_ranks": groups.data_ranks}
    res["local_shapes"] = {v.path: list(v.value.shape) for v in cand.weights}
    for model in (ref, tp):
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    kw = dict(epochs=STEPS, batch_size=len(y), shuffle=False, verbose=0)
    before = [np.array(w) for w in ref.get_weights()]
    res["losses"] = [
        tp.fit(x, y, **kw).history["loss"],
        ref.fit(x, y, **kw).history["loss"],
    ]
    # Evaluate keeps the replica's rows and reports the global loss;
    # predict runs the whole batch on every replica.
    res["evaluate"] = [
        float(m.evaluate(x, y, batch_size=len(y), verbose=0)) for m in (tp, ref)
    ]
    res["predict"] = float(
        np.max(np.abs(tp.predict(x, verbose=0) - ref.predict(x, verbose=0)))
    )
    full, want = tp.get_weights(), ref.get_weights()
    # A key bias's exactly-zero gradient is rounding noise Adam scales up.
    keep = [i for i, v in enumerate(ref.weights) if "key/bias" not in v.path]
    res["weights"] = max(
        float(np.max(np.abs(full[i] - want[i]))) for i in keep
    ) / max(1.0, max(float(np.max(np.abs(w))) for w in want))
    res["moved"] = max(
        float(np.max(np.abs(a - b))) for a, b in zip(want, before)
    )
    res["param_bytes"] = _nbytes(tp.weights)
    res["ideal_param_bytes"] = _ideal_param_bytes(tp.plan, groups.model_rank, t)
    res["optimizer_bytes"] = _nbytes(tp.optimizer.variables)
    extra = _nbytes(ref.optimizer.variables) - 2 * _nbytes(
        ref.trainable_weights
    )
    res["ideal_optimizer_bytes"] = 2 * _nbytes(tp.trainable_weights) + extra
    if zero:  # one replica's slots over data x model = 4 ranks
        slots = 2 * _nbytes(ref.trainable_weights)
        res["ideal_optimizer_bytes"] = slots // 4 + extra
    # One more step, counted: the replica's plain-TP collectives on the
    # model axis, one bucketed mean of its gradients and the loss scalar
    # on the data axis.
    tc.reset_counts()
    tg.reset_counts()
    tz.reset_counts()
    tp.train_on_batch(x, y)
    res["counts"] = dict(tc.COUNTS)
    res["data_counts"] = dict(tg.COUNTS)
    res["zero_counts"] = dict(tz.COUNTS)
    res["zero"] = zero
    res["expect"] = [2 * blocks + 1, 2 * blocks] if blocks else [2, 1]
    if t == 1:
        res["expect"] = [0, 0]  # no model axis: nothing split
    res["grad_bytes"] = _nbytes(tp.trainable_weights)
    return res


# Checkpoints with a data axis ---------------------------------------------


def _ckpt_model(t: int, seed: int, optimizer=None, zero: int = 0):
    import keras

    from keras_tensor_parallel import TensorParallelKeras, catalogue

    keras.utils.set_random_seed(seed)
    tp = TensorParallelKeras(
        catalogue.seed_mlp(),
        world_size=4,
        tensor_parallel_size=t,
        distributed_backend="torch",
        zero_stage=zero,
    )
    tp.compile(optimizer=optimizer or keras.optimizers.Adam(1e-3), loss="mse")
    return tp


def _ckpt_fit(tp) -> list:
    rng = np.random.RandomState(5)
    x, y = rng.randn(8, 64).astype("float32"), rng.randn(8, 32)
    kw = dict(batch_size=8, epochs=2, shuffle=False, verbose=0)
    return tp.fit(x, y.astype("float32"), **kw).history["loss"]


def _local(tp) -> list:
    return [np.asarray(v.value.detach()) for v in tp.optimizer.variables]


def _files(path: str) -> dict:
    """`{file: bytes}` of a checkpoint step, and DCP's chunks per key."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(path).read_metadata().state_dict_metadata
    digest = {}
    for f in sorted(os.listdir(path)):
        with open(os.path.join(path, f), "rb") as fh:
            digest[f] = hashlib.sha256(fh.read()).hexdigest()
    return {
        "digest": digest,
        "sizes": {
            f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
        },
        "chunks": {
            k: [list(c.offsets) for c in m.chunks]
            for k, m in meta.items()
            if hasattr(m, "chunks")
        },
    }


def _checkpoint_case(folder: str) -> dict:
    """Save at data=2 x model=2 after 2 steps and train 2 more; fresh
    models (other weights) restore at 2x2, 1x4, 4x1 and 2x2 with ZeRO-1
    (whose own checkpoint a 1x4 model restores) and train the
    same 2; an SGD model's load is refused and changes nothing."""
    import keras

    tp = _ckpt_model(2, 1)
    _ckpt_fit(tp)
    path = tp.save_checkpoint(folder)
    full_bytes = 3 * sum(int(np.asarray(w).nbytes) for w in tp.get_weights())
    res = {"path": path, "files": _files(path), "full_bytes": full_bytes}
    res["losses"] = _ckpt_fit(tp)
    weights, slots = tp.get_weights(), _local(tp)
    meshes = (("2x2", 2, 0), ("1x4", 4, 0), ("4x1", 1, 0), ("zero", 2, 1))
    for name, t, zero in meshes:
        fresh = _ckpt_model(t, 7, zero=zero)
        loaded = fresh.load_checkpoint(folder)
        losses = _ckpt_fit(fresh)
        res[name] = {
            "loaded": loaded,
            "losses": losses,
            "weights": max(
                float(np.max(np.abs(a - b)))
                for a, b in zip(weights, fresh.get_weights())
            ),
            "slots_equal": t == 2
            and all(np.array_equal(a, b) for a, b in zip(slots, _local(fresh))),
        }
    # ZeRO-1 pieces saved, restored at 1x4 without ZeRO: same weights,
    # and the same next steps (the Adam slots were restored too).
    res["zero_path"] = fresh.save_checkpoint(folder + "_zero")
    plain = _ckpt_model(4, 8)
    plain.load_checkpoint(folder + "_zero")
    res["zero_restored"] = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(fresh.get_weights(), plain.get_weights())
    )
    res["zero_next"] = [_ckpt_fit(fresh), _ckpt_fit(plain)]
    sgd = _ckpt_model(2, 1, keras.optimizers.SGD(0.1))
    before = sgd.get_weights()
    try:
        sgd.load_checkpoint(folder)
        res["bad"] = "no error"
    except ValueError as e:
        res["bad"] = str(e)
    after = sgd.get_weights()
    res["bad_unchanged"] = all(
        np.array_equal(a, b) for a, b in zip(before, after)
    )
    res["bad_files"] = _files(path)
    return res


def worker(out_path: str) -> None:
    """Runs in every rank (KERAS_BACKEND=torch)."""
    import torch.distributed as dist

    from keras_tensor_parallel.backends import torch_collectives as tc

    tc.ensure_process_group()
    res = {name: _run_case(name) for name in CASES}
    ckpt = os.path.join(os.path.dirname(out_path), "ckpt")
    res["checkpoint"] = _checkpoint_case(ckpt)
    with open(f"{out_path}.{dist.get_rank()}", "w") as fh:
        json.dump(res, fh)


@pytest.fixture(scope="module")
def results(four_ranks):
    """Every rank's results: `worker` runs in the shared 4-rank launch
    (tests/four_ranks.py)."""
    tmp = four_ranks("data_parallel")
    return [json.loads((tmp / f"res.{r}").read_text()) for r in range(4)]


@pytest.mark.torch
@pytest.mark.parametrize("name", CASES)
def test_fit_matches_one_process_on_the_global_batch(results, name):
    for rank, every in enumerate(results):
        r = every[name]
        assert (r["model_ranks"], r["data_ranks"]) == MESH[name][rank], r
        got, want = (np.asarray(h) for h in r["losses"])
        assert len(got) == STEPS and want[-1] < want[0], r
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert r["moved"] > 1e-4, r  # it trained: the comparison can fail
        assert r["weights"] <= 1e-4, r
        np.testing.assert_allclose(*r["evaluate"], rtol=1e-5)
        assert r["predict"] <= 1e-4, r


@pytest.mark.torch
@pytest.mark.parametrize("name", CASES)
def test_bytes_per_rank_at_the_ideal(results, name):
    for every in results:
        r = every[name]
        assert r["param_bytes"] == r["ideal_param_bytes"], r
        assert r["optimizer_bytes"] == r["ideal_optimizer_bytes"], r
    # Data-axis partners hold the same shards.
    shapes = [every[name]["local_shapes"] for every in results]
    for a, b in [(0, 2), (1, 3)] if name != "mlp_dp4" else [(0, 1), (0, 3)]:
        assert shapes[a] == shapes[b]


@pytest.mark.torch
@pytest.mark.parametrize("name", CASES)
def test_collectives_per_step(results, name):
    for every in results:
        r = every[name]
        # Model axis: plain TP's Megatron minimum on the replica's batch.
        assert [r["counts"]["forward"], r["counts"]["backward"]] == r[
            "expect"
        ], r
        # Data axis: the replica's gradient bytes in one bucket (under
        # 25 MiB), and the loss scalar; with ZeRO-1 the same bytes
        # reduce-scattered and all-gathered instead (2x2: the split
        # parameters' over the data group, the replicated ones' over all
        # 4 ranks), no all-reduce.
        calls = r["zero"] * (2 if name == "mlp_zero" else 1)
        assert r["data_counts"] == {
            "gradient": 1 - r["zero"],
            "gradient_bytes": r["grad_bytes"] * (1 - r["zero"]),
            "loss": 1,
        }, r
        assert r["zero_counts"] == {
            "reduce_scatter": calls,
            "reduce_scatter_bytes": r["grad_bytes"] * r["zero"],
            "all_gather": calls,
            "all_gather_bytes": r["grad_bytes"] * r["zero"],
        }, r


@pytest.mark.torch
def test_checkpoint_with_a_data_axis_writes_each_shard_once(results):
    r = results[0]["checkpoint"]
    assert all(e["checkpoint"]["path"] == r["path"] for e in results)
    files = r["files"]
    # Each split value (kernels, biases, their Adam slots) is 2 chunks,
    # one per model-axis shard, however many replicas hold it.
    split = [k for k, c in files["chunks"].items() if len(c) > 1]
    assert len(split) >= 3 * 4, files["chunks"]
    for key, chunks in files["chunks"].items():
        assert len(chunks) <= 2, (key, chunks)
        assert len({tuple(c) for c in chunks}) == len(chunks), (key, chunks)
    # Written once: one replica's weights and slots, not two.
    written = sum(n for f, n in files["sizes"].items() if f.endswith(".distcp"))
    assert r["full_bytes"] <= written <= 1.1 * r["full_bytes"] + 2**16, r
    assert r["bad_files"] == files  # the refused load changed no file


@pytest.mark.torch
@pytest.mark.parametrize("mesh", ["2x2", "1x4", "4x1", "zero"])
def test_checkpoint_restores_on_every_mesh(results, mesh):
    for every in results:
        r = every["checkpoint"]
        got = r[mesh]
        assert got["loaded"] == r["path"], got
        assert len(got["losses"]) == 2, got
        if mesh == "2x2":  # the same mesh: bit-identical
            assert got["losses"] == r["losses"], got
            assert got["weights"] == 0.0 and got["slots_equal"], got
        else:  # resharded: float rounding
            np.testing.assert_allclose(got["losses"], r["losses"], rtol=1e-5)
            assert got["weights"] <= 1e-5, got


@pytest.mark.torch
def test_zero_checkpoint_restores_without_zero(results):
    for every in results:
        r = every["checkpoint"]
        assert r["zero_restored"] == 0.0, r
        np.testing.assert_allclose(*r["zero_next"], rtol=1e-5)


@pytest.mark.torch
def test_checkpoint_of_another_optimizer_is_refused(results):
    for every in results:
        r = every["checkpoint"]
        assert "optimizer_class" in r["bad"] and "SGD" in r["bad"], r["bad"]
        assert r["bad_unchanged"], r


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda k: k.optimizers.Adafactor(), "elementwise optimizer"),
        (lambda k: k.optimizers.Adam(clipnorm=1.0), "clipnorm=1.0"),
        (lambda k: k.optimizers.SGD(global_clipnorm=2.0), "global_clipnorm"),
        (lambda k: k.optimizers.Adam(use_ema=True), "use_ema"),
    ],
)
def test_zero_refuses_what_pieces_cannot_update(make, match):
    import keras

    from keras_tensor_parallel.backends import torch_zero

    with pytest.raises(ValueError, match=match) as info:
        torch_zero.check_optimizer(make(keras))
    assert "Received" in str(info.value)


def test_zero_refuses_a_built_optimizer_and_other_engines():
    import keras

    from keras_tensor_parallel.backends import jax_zero, torch_zero

    opt = keras.optimizers.Adam()
    opt.build([keras.Variable(np.zeros((2, 2), "float32"))])
    with pytest.raises(ValueError, match="already built"):
        torch_zero.check_optimizer(opt)
    assert jax_zero.check_stage(1, "torch") == 1
    with pytest.raises(ValueError, match="on the tensorflow engine"):
        jax_zero.check_stage(1, "tensorflow")
    assert torch_zero.zero_dim((64, 128), 2) == 1
    assert torch_zero.zero_dim((3, 1), 4) is None


if __name__ == "__main__":
    worker(*sys.argv[1:])
