"""torch data x model process groups (issue 15): `backends/torch_groups`.

One launch of 4 ranks on 127.0.0.1 (gloo, hard timeout) as data 2 x model
2: each rank checks which ranks share its groups by an all-reduce over
each, then trains a small Keras model data parallel, feeding its
replica's share of the batch with gradients averaged over the data group
in buckets (as DDP does), against a one-device reference it trains on
the whole batch itself. The torch engine does not use the groups yet.
"""

from __future__ import annotations

import json
import sys

import pytest

BUCKET = 300  # bytes: the model's 4 gradients make 3 buckets
STEPS = 3


def worker(out_path: str) -> None:
    import keras
    import numpy as np
    import torch
    import torch.distributed as dist

    from keras_tensor_parallel.backends import torch_collectives as tc
    from keras_tensor_parallel.backends import torch_groups as tg

    tc.ensure_process_group()
    rank = dist.get_rank()
    groups = tg.new_mesh_groups(2)
    res = {"rank": rank, "model_ranks": groups.model_ranks}
    res["data_ranks"] = groups.data_ranks
    for axis in ("model", "data"):
        t = torch.tensor([float(2**rank)])
        dist.all_reduce(t, group=getattr(groups, f"{axis}_group"))
        res[f"{axis}_sum"] = float(t)  # which ranks were summed, as bits

    def build():
        return keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
             keras.layers.Dense(4)]
        )  # fmt: skip

    keras.utils.set_random_seed(0)
    reference, replica = build(), build()
    replica.set_weights(reference.get_weights())
    rng = np.random.RandomState(0)
    x = rng.randn(8, 8).astype("float32")
    y = rng.randn(8, 4).astype("float32")
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    reference.fit(x, y, batch_size=8, epochs=STEPS, shuffle=False, verbose=0)
    replica.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    tg.install_gradient_reduction(
        replica.optimizer, groups.data_group, bucket_bytes=BUCKET
    )
    share = slice(4 * groups.data_rank, 4 * (groups.data_rank + 1))
    replica.fit(
        x[share], y[share], batch_size=4, epochs=STEPS, shuffle=False,
        verbose=0,
    )  # fmt: skip
    res["weight_diff"] = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(replica.get_weights(), reference.get_weights())
    )
    res["weight_scale"] = max(
        float(np.max(np.abs(w))) for w in reference.get_weights()
    )
    res["moved"] = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(reference.get_weights(), build().get_weights())
    )
    res["reductions"] = replica.optimizer.tp_reductions
    res["grad_bytes"] = [int(np.prod(w.shape)) * 4 for w in replica.weights]
    with open(f"{out_path}.{rank}", "w") as fh:
        json.dump(res, fh)


@pytest.fixture(scope="module")
def results(four_ranks):
    """Every rank's results: `worker` runs in the shared 4-rank launch
    (tests/four_ranks.py)."""
    tmp = four_ranks("groups")
    return [json.loads((tmp / f"res.{r}").read_text()) for r in range(4)]


def test_mesh_ranks_and_bad_size():
    from keras_tensor_parallel.backends.torch_groups import buckets, mesh_ranks

    assert mesh_ranks(4, 2) == {
        "model": [[0, 1], [2, 3]],
        "data": [[0, 2], [1, 3]],
    }
    assert mesh_ranks(4, 4)["data"] == [[0], [1], [2], [3]]
    for bad in (3, 0, True, "2"):
        with pytest.raises(ValueError, match="positive divisor"):
            mesh_ranks(4, bad)
    import torch

    sizes = [torch.zeros(n) for n in (128, 16, 64, 4)]  # float32
    assert buckets(sizes, BUCKET) == [[0], [1], [2, 3]]  # 512, 64, 256+16 B


@pytest.mark.torch
def test_groups_hold_the_mesh_ranks(results):
    for r in results:
        model = [[0, 1], [2, 3]][r["rank"] // 2]
        data = [[0, 2], [1, 3]][r["rank"] % 2]
        assert r["model_ranks"] == model and r["data_ranks"] == data
        assert r["model_sum"] == sum(2**i for i in model)
        assert r["data_sum"] == sum(2**i for i in data)


@pytest.mark.torch
def test_data_parallel_fit_matches_one_device(results):
    from keras_tensor_parallel.backends.torch_groups import buckets

    for r in results:
        assert r["moved"] > 1e-3  # it trained: the comparison can fail
        assert r["weight_diff"] <= 1e-5 * max(1.0, r["weight_scale"]), r
        # Bucketed as DDP: one all-reduce per bucket per step, counted.
        import torch

        grads = [torch.zeros(n // 4) for n in r["grad_bytes"]]
        assert r["reductions"] == STEPS * len(buckets(grads, BUCKET)) == 9


if __name__ == "__main__":
    worker(*sys.argv[1:])
