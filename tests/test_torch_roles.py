"""Each Megatron role on torch, alone: partition then undo gives back the
original; the forward of a column, row, vocab and reverse-head layer on a
tiny layer matches the unsplit math (values and gradients).

One launch of 2 ranks on 127.0.0.1 (gloo, hard timeout) runs every case
and writes its measurements; the tests assert on them.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
TIMEOUT = 120


def _entry(path, shape, dim, role, layer):
    from keras_tensor_parallel.plan import VariablePlan

    axes = [None] * len(shape)
    if dim is not None:
        axes[dim] = "model"
    return VariablePlan(path, shape, "float32", axes, role, "test", layer)


def _partition_undo(res, shard):
    """Each style splits this rank's contiguous shard and undoes exactly."""
    import keras

    from keras_tensor_parallel.backends import torch_roles as roles

    rng = np.random.RandomState(0)
    for role, shape, dim in (
        ("column", (6, 5), 1),
        ("heads", (6, 4, 3), 1),
        ("row", (5, 6), 0),
        ("vocab", (7, 4), 0),  # 7 rows on 2 ranks: 4 + 3
    ):
        full = rng.randn(*shape).astype("float32")
        v = keras.Variable(full, name=role)
        cls = type(v)
        style = roles.style_for(role)
        style.partition(v, _entry(v.path, shape, dim, role, "l"), shard)
        local = np.asarray(v.value.detach())
        sizes = [shape[dim] // 2 + shape[dim] % 2, shape[dim] // 2]
        start = sum(sizes[: shard.rank])
        want = np.take(full, range(start, start + sizes[shard.rank]), dim)
        gathered = np.asarray(roles.full_value(v))
        style.undo(v, roles.full_value(v))
        res[f"partition_{role}"] = bool(np.array_equal(local, want))
        res[f"gather_{role}"] = bool(np.array_equal(gathered, full))
        res[f"undo_{role}"] = bool(
            type(v) is cls
            and np.array_equal(np.asarray(v.value.detach()), full)
            and not any(k.startswith("_tp_") for k in vars(v))
        )


def _wrap(layer, entries, shard):
    from keras_tensor_parallel.backends import base
    from keras_tensor_parallel.backends import torch_roles as roles

    journal = base.Journal()
    for v, entry in entries:
        roles.style_for(entry.role).partition(v, entry, shard)
    roles.layer_style([e for _, e in entries]).install(layer, shard, journal)
    return journal


def _mlp_forward(res, shard):
    """Dense column -> Dense row (Megatron MLP): output and grads."""
    import keras
    import torch

    keras.utils.set_random_seed(0)
    up = keras.layers.Dense(6, activation="relu", name="up")
    down = keras.layers.Dense(4, name="down")
    x = np.random.RandomState(1).randn(3, 5).astype("float32")
    up.build((None, 5))
    down.build((None, 6))
    for v in up.weights + down.weights:  # nonzero biases
        v.assign(np.random.RandomState(2).randn(*v.shape).astype("float32"))

    def run():
        xt = torch.tensor(x, requires_grad=True)
        out = down(up(xt))
        torch.sum(out**2).backward()
        return out.detach().numpy(), xt.grad.numpy()

    want_out, want_dx = run()
    want_dk = np.asarray(up.kernel.value.grad)[:, :]
    up.kernel.value.grad = None
    _wrap(
        up,
        [
            (up.kernel, _entry(up.kernel.path, (5, 6), 1, "column", "up")),
            (up.bias, _entry(up.bias.path, (6,), 0, "column", "up")),
        ],
        shard,
    )
    _wrap(
        down,
        [
            (down.kernel, _entry(down.kernel.path, (6, 4), 0, "row", "down")),
            (down.bias, _entry(down.bias.path, (4,), None, "replicated", "")),
        ],
        shard,
    )
    got_out, got_dx = run()
    local_dk = np.asarray(up.kernel.value.grad)
    res["mlp_out"] = float(np.max(np.abs(got_out - want_out)))
    res["mlp_dx"] = float(np.max(np.abs(got_dx - want_dx)))
    res["mlp_dkernel"] = float(
        np.max(np.abs(local_dk - up.kernel.local_slice(want_dk)))
    )
    res["mlp_local_shapes"] = [list(up.kernel.shape), list(down.kernel.shape)]


def _einsum_row(res, shard):
    """An EinsumDense row layer runs from its rule's labels."""
    import keras

    keras.utils.set_random_seed(0)
    layer = keras.layers.EinsumDense("bsh,hd->bsd", (8, 4), bias_axes="d")
    x = np.random.RandomState(3).randn(2, 8, 6).astype("float32")
    layer.build((2, 8, 6))
    layer.bias.assign(np.arange(4, dtype="float32"))
    want = np.asarray(layer(x).detach())
    _wrap(
        layer,
        [(layer.kernel, _entry(layer.kernel.path, (6, 4), 0, "row", "e"))],
        shard,
    )
    local_x = x[..., layer.kernel._tp_start : layer.kernel._tp_stop]
    got = np.asarray(layer(local_x).detach())
    res["einsum_row"] = float(np.max(np.abs(got - want)))


def _vocab(res, shard):
    """Odd vocab (7 rows on 2 ranks): lookup and the tied reverse head."""
    import keras
    from keras_hub.layers import ReversibleEmbedding

    keras.utils.set_random_seed(0)
    layer = ReversibleEmbedding(7, 4, name="tok")
    ids = np.array([[0, 3, 6, 4], [5, 1, 2, 6]], "int32")
    layer.build(ids.shape)
    want = np.asarray(layer(ids).detach())
    h = np.random.RandomState(4).randn(2, 4, 4).astype("float32")
    want_logits = np.asarray(layer(h, reverse=True).detach())
    table = layer.embeddings
    _wrap(
        layer, [(table, _entry(table.path, (7, 4), 0, "vocab", "tok"))], shard
    )
    res["vocab_local_rows"] = int(table.shape[0])
    res["vocab_lookup"] = float(
        np.max(np.abs(np.asarray(layer(ids).detach()) - want))
    )
    got_logits = np.asarray(layer(h, reverse=True).detach())
    res["vocab_logits"] = float(np.max(np.abs(got_logits - want_logits)))


def _no_row_form(res, shard):
    """A conv kernel has window labels: no einsum row form, a ValueError."""
    import keras

    from keras_tensor_parallel.backends import base
    from keras_tensor_parallel.backends import torch_roles as roles

    conv = keras.layers.Conv1D(4, 3)
    conv.build((None, 8, 6))
    try:
        roles.style_for("row").install(conv, shard, base.Journal())
        res["conv_row"] = ""
    except ValueError as e:
        res["conv_row"] = str(e)


def _shared_and_fused(res, shard):
    """A kv head shared by both ranks (copies=2): each holds it whole, the
    gradient is summed over the pair; a fused (2 parts) kernel holds its
    block of each part; gathers, assign and undo give back the original."""
    import keras
    import torch

    from keras_tensor_parallel.backends import torch_roles as roles
    from keras_tensor_parallel.backends.torch_plan import TorchVariablePlan
    from keras_tensor_parallel.plan import Role, ShardingPlan

    rng = np.random.RandomState(5)
    kv = rng.randn(3, 1, 2).astype("float32")
    fused = rng.randn(2, 3, 8).astype("float32")
    entry = _entry("kv", (3, 1, 2), 1, "heads", "l")
    entry = TorchVariablePlan(**{**vars(entry), "copies": 2})
    plan = ShardingPlan(2, (entry,))
    styles = roles.styles_for(None, plan)  # makes the pair's subgroup
    v = keras.Variable(kv, name="kv")
    cls = type(v)
    styles[Role.HEADS].partition(v, entry, shard)
    res["shared_local"] = bool(np.array_equal(np.asarray(v.value.detach()), kv))
    res["shared_gather"] = bool(np.array_equal(np.asarray(v), kv))
    weight = torch.full(kv.shape, float(shard.rank + 1))
    torch.sum(v.value * weight).backward()
    res["shared_grad"] = float(np.max(np.abs(v.value.grad.numpy() - 3.0)))
    styles[Role.HEADS].undo(v, roles.full_value(v))
    res["shared_undo"] = type(v) is cls and not hasattr(v, "_tp_hook")
    e = _entry("fused", (2, 3, 8), 2, "column", "l")
    e = TorchVariablePlan(**{**vars(e), "parts": 2})
    w = keras.Variable(fused, name="fused")
    styles[Role.COLUMN].partition(w, e, shard)
    r = shard.rank
    want = np.concatenate([fused[..., 2 * r : 2 * r + 2],
                           fused[..., 4 + 2 * r : 6 + 2 * r]], -1)  # fmt: skip
    res["fused_local"] = bool(np.array_equal(w.value.detach().numpy(), want))
    res["fused_gather"] = bool(np.array_equal(np.asarray(w), fused))
    w.assign(fused * 2)
    res["fused_assign"] = bool(np.array_equal(np.asarray(w), fused * 2))
    styles[Role.COLUMN].undo(w, roles.full_value(w))
    res["fused_undo"] = bool(
        type(w) is cls
        and np.array_equal(np.asarray(w.value.detach()), fused * 2)
        and not any(k.startswith("_tp_") for k in vars(w))
    )


def worker(out_path: str) -> None:
    import torch.distributed as dist

    from keras_tensor_parallel.backends import torch_collectives as tc
    from keras_tensor_parallel.backends import torch_roles as roles

    tc.ensure_process_group()
    shard = roles.Shard(dist.get_rank(), dist.get_world_size(), roles.Region())
    res = {"rank": shard.rank}
    cases = (_partition_undo, _mlp_forward, _einsum_row, _vocab)
    for case in (*cases, _shared_and_fused):
        case(res, shard)
    _no_row_form(res, shard)
    with open(f"{out_path}.{shard.rank}", "w") as fh:
        json.dump(res, fh)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("roles")
    from ranks import launch

    proc = launch(HERE, str(tmp / "res"), backend="torch", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp / f"res.{r}").read_text()) for r in (0, 1)]


@pytest.mark.torch
@pytest.mark.parametrize("role", ["column", "heads", "row", "vocab"])
def test_partition_then_undo_gives_back_the_original(results, role):
    for res in results:
        assert res[f"partition_{role}"], res
        assert res[f"gather_{role}"], res
        assert res[f"undo_{role}"], res


@pytest.mark.torch
def test_column_then_row_matches_unsplit_math(results):
    for res in results:
        assert res["mlp_out"] <= 1e-5, res
        assert res["mlp_dx"] <= 1e-5, res
        assert res["mlp_dkernel"] <= 1e-5, res
        assert res["mlp_local_shapes"] == [[5, 3], [3, 4]], res


@pytest.mark.torch
def test_einsum_row_layer_runs_from_its_rule(results):
    for res in results:
        assert res["einsum_row"] <= 1e-5, res


@pytest.mark.torch
def test_vocab_lookup_and_reverse_head_on_an_odd_vocab(results):
    assert [r["vocab_local_rows"] for r in results] == [4, 3]
    for res in results:
        assert res["vocab_lookup"] <= 1e-6, res
        assert res["vocab_logits"] <= 1e-5, res


@pytest.mark.torch
def test_a_kernel_without_an_einsum_form_has_no_row_style(results):
    for res in results:
        assert "No row-parallel form" in res["conv_row"], res


@pytest.mark.torch
def test_shared_kv_head_and_fused_kernel_split_gather_and_undo(results):
    for res in results:
        assert res["shared_local"] and res["shared_gather"], res
        assert res["shared_grad"] == 0.0, res  # 1 + 2 summed over the pair
        assert res["shared_undo"], res
        for key in ("local", "gather", "assign", "undo"):
            assert res[f"fused_{key}"], (key, res)


def test_kv_sharing_subgroups_per_model_group_with_a_data_axis(monkeypatch):
    """8 ranks as data 2 x model 4, kv heads shared by 2: every rank makes
    every pair of every model group, in one order, and keeps its own."""
    from keras_tensor_parallel.backends import torch_heads
    from keras_tensor_parallel.plan import ShardingPlan

    made = []
    monkeypatch.setattr(torch_heads.tc, "world_size", lambda: 8)
    monkeypatch.setattr(torch_heads.tc, "rank", lambda: 5)
    monkeypatch.setattr(
        torch_heads.dist, "new_group", lambda ranks: made.append(ranks) or ranks
    )
    entry = _entry("kv", (3, 2, 2), 1, "heads", "l")
    plan = ShardingPlan(4, (type(entry)(**{**vars(entry), "copies": 2}),))
    assert torch_heads.shared_groups(plan, group="model") == {2: [4, 5]}
    assert made == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="model-axis groups"):
        torch_heads.shared_groups(plan, group=None)


if __name__ == "__main__":
    worker(*sys.argv[1:])
