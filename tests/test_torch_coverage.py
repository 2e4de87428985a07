"""Issue 12 on torch: weights split at the op that reads them, 2 ranks.

Layers owning their weights (`ops.matmul(x, self.w) + self.b`) and
mixture-of-experts banks (`ops.einsum("th,ehm->etm", x, self.w)`) have no
layer rule; the planner splits them by the traced op, and the torch engine
plays column / row at that op (`backends/roles_ops.py`). Each rank builds
the same reference from the same seed; rank 0 compares the 2-rank forward
and 3 Adam steps against one process, and every rank reports its local
parameter shapes and bytes against the plan's per-device shapes.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(HERE))
TIMEOUT = 150


def _model(name):
    import coverage_models as cm

    if name == "own-weights":
        return cm.own_weights_mlp, cm.np.random.RandomState(0).randn(2, 8, 32)
    return cm.ROWS[name].build, cm.inputs()


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0))


def _first(model, x):
    import keras
    import numpy as np

    out = keras.tree.flatten(model(x))[0]
    return np.asarray(out.detach().cpu().numpy(), "float64")


def worker(name: str, out_dir: str) -> None:
    """Runs in every rank (KERAS_BACKEND=torch)."""
    import keras
    import numpy as np
    import torch.distributed as dist

    from keras_tensor_parallel import TensorParallelKeras

    build, x = _model(name)
    keras.utils.set_random_seed(0)
    ref = build()
    keras.utils.set_random_seed(1)
    cand = build()
    cand.set_weights(ref.get_weights())
    expected = _first(ref, x)
    tp = TensorParallelKeras(cand, world_size=2)
    rank = dist.get_rank()
    plan = tp.plan
    res = {"forward": _rel(_first(tp, x), expected)}
    res["roles"] = {e.path: e.role.value for e in plan}
    res["local"] = {v.path: list(v.value.shape) for v in cand.variables}
    res["planned"] = {
        e.path: list(_rank_shape(e, rank, plan.world_size)) for e in plan
    }
    res["bytes"] = sum(
        math.prod(v.value.shape) * v.value.element_size()
        for v in cand.variables
    )
    res["planned_bytes"] = sum(
        math.prod(_rank_shape(e, rank, plan.world_size)) * 4 for e in plan
    )
    ref_grads = _grads(ref, x)
    grads = _grads(cand, x)
    local_ref = [
        v.local_slice(r) if hasattr(v, "local_slice") else r
        for r, v in zip(ref_grads, cand.trainable_variables)
    ]
    res["grads"] = _rel_all(grads, local_ref)
    rng = np.random.RandomState(2)
    y = rng.randn(*expected.shape).astype("float32")
    for model in (ref, tp):
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    kw = dict(epochs=3, batch_size=len(y), shuffle=False, verbose=0)
    tp_hist = tp.fit(x, y, **kw).history["loss"]
    ref_hist = ref.fit(x, y, **kw).history["loss"]
    res["losses"] = [tp_hist, ref_hist]
    full = tp.get_weights()  # gathered on every rank
    diffs = [_rel(a, b) for a, b in zip(full, ref.get_weights())]
    res["weights"] = max(diffs)
    res["worst"] = ref.weights[diffs.index(max(diffs))].path
    res["after"] = _rel(_first(tp, x), _first(ref, x))
    with open(os.path.join(out_dir, f"{name}.{rank}.json"), "w") as fh:
        json.dump(res, fh)


def _grads(model, x):
    """Gradients of mean(out**2) (zeros where the output reads none)."""
    import keras
    import numpy as np
    import torch

    for v in model.trainable_variables:
        v.value.grad = None
    out = keras.tree.flatten(model(x))[0]
    torch.mean(out**2).backward()
    return [
        np.zeros(v.value.shape)
        if v.value.grad is None
        else v.value.grad.detach().cpu().numpy()
        for v in model.trainable_variables
    ]


def _rel_all(xs, refs) -> float:
    """Largest abs difference over all arrays / largest abs reference."""
    import numpy as np

    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(xs, refs))
    return diff / max(float(np.max(np.abs(b))) for b in refs)


def _rank_shape(entry, rank, n):
    from keras_tensor_parallel.backends.roles import shard_sizes

    shape = list(entry.storage_shape)
    dim = entry.split_dim
    if dim is not None:
        shape[dim] = shard_sizes(shape[dim], n)[rank]
    return tuple(shape)


CASES = {
    # name: (variables whose role is checked, roles expected in order)
    "own-weights": ("own_dense", ["column", "row"] * 2),
    "mixtral-n2": ("experts/", ["column", "column", "row"] * 2),
}


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(CASES))
def test_op_level_weights_split_and_train_as_one_process(tmp_path, name):
    from ranks import launch

    proc = launch(
        HERE, name, str(tmp_path), backend="torch", timeout=TIMEOUT,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [
        json.loads((tmp_path / f"{name}.{r}.json").read_text())
        for r in range(2)
    ]
    part, expected_roles = CASES[name]
    for res in results:
        roles = [
            role
            for path, role in res["roles"].items()
            if part in path and len(res["local"][path]) > 1
        ]
        assert roles == expected_roles, res["roles"]
        # Each rank holds its shard only: the plan's per-device shapes.
        assert res["local"] == res["planned"], res
        assert res["bytes"] == res["planned_bytes"], res
        assert res["forward"] <= 1e-5, res
        tp_hist, ref_hist = res["losses"]
        assert _rel(tp_hist, ref_hist) <= 1e-5, res
        assert res["grads"] <= 1e-5, res
        assert res["weights"] <= 1e-5, (res["worst"], res["weights"])
        assert res["after"] <= 1e-5, res
    full = sum(
        math.prod(s) * 4
        for p, s in results[0]["local"].items()
        if results[0]["roles"][p] == "replicated"
    )
    assert results[0]["bytes"] > full  # something is split


if __name__ == "__main__":
    worker(*sys.argv[1:])
