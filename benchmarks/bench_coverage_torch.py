"""Issue 12 coverage table on the torch engine: device-0 (rank-0)
parameter bytes measured on the local shards against the Megatron ideal
plus the stated cost of padding / duplication / kv heads held whole
(multi-query kv kernels beside split query heads), and one Adam train step's
collectives, for every coverage row of one world size.

Usage (one launch per world size; rank 0 prints a markdown table):
    keras-tp launch -n 2 benchmarks/bench_coverage_torch.py
    keras-tp launch -n 4 benchmarks/bench_coverage_torch.py
    keras-tp launch -n 8 benchmarks/bench_coverage_torch.py

Bytes are deterministic (the shards each rank holds: `numel * itemsize`
of every variable's local value); collectives are the eager counts of one
train step after a first one (batch 2, sequence 8): g all-reduces
forward, f all-reduces backward, vocab logit gathers, subgroup sums of
shared kv gradients and
model-axis sums of partial gradients ("norm sums": per-head norm scales,
and the kv kernels and key norm multi-query attention holds whole beside
split query heads), and all-gathers of
any value (a weight gathered would show there).
"""

from __future__ import annotations

import math
import os
import pathlib
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402
from coverage_models import ROWS, ideal_fraction, inputs  # noqa: E402
from coverage_models import own_weights_mlp as _own  # noqa: E402

from keras_tensor_parallel import TensorParallelKeras  # noqa: E402
from keras_tensor_parallel.backends import torch_collectives as tc  # noqa: E402
from keras_tensor_parallel.backends import torch_heads  # noqa: E402

# The plan's reason for a kv projection whose heads cannot split (fewer kv
# heads than devices, as multi-query attention has): every device holds it
# whole beside its split query heads (plan/decisions.py).
HELD_WHOLE = "every device holds them whole, as its query heads read them"


def stated_cost(plan) -> float:
    """Extra device-0 fraction that padding (rank 0 holds ceil(n / N)
    heads), duplication (a kv head held by `copies` ranks) and kv heads
    held whole beside split query heads (the ideal counts 1/N of them,
    every device holds all) must cost."""
    n = plan.world_size
    total = sum(math.prod(e.shape) for e in plan)
    extra = 0.0
    for e in plan:
        size = math.prod(e.shape)
        if e.is_split and e.padded_shape is not None:
            extra += (math.prod(e.padded_shape) - size) / n
        elif e.copies > 1:
            extra += size * (e.copies - 1) / n
        elif not e.is_split and len(e.shape) > 1 and HELD_WHOLE in e.reason:
            extra += size * (1 - 1 / n)
    return extra / total


def _step_counts(tp, x, y) -> dict:
    gathers = {"weight": 0}
    original = tc.gather_dim

    def counting(*args, **kwargs):
        gathers["weight"] += 1
        return original(*args, **kwargs)

    kw = dict(epochs=1, batch_size=len(y), shuffle=False, verbose=0)
    tp.fit(x, y, **kw)  # the first step also builds the metrics
    tc.gather_dim = counting
    tc.reset_counts()
    torch_heads.COUNTS.update(shared=0, partial=0)
    try:
        tp.fit(x, y, **kw)
    finally:
        tc.gather_dim = original
    return {**tc.COUNTS, **torch_heads.COUNTS, **gathers}


def row(name: str) -> dict:
    spec = ROWS[name]
    keras.utils.set_random_seed(0)
    model = spec.build()
    x = (
        np.random.RandomState(0).randn(2, 8, 32)
        if spec.build is _own
        else inputs()
    )
    full = sum(math.prod(v.shape) * 4 for v in model.variables)
    tp = TensorParallelKeras(model, world_size=spec.n)
    held = sum(
        v.value.numel() * v.value.element_size() for v in model.variables
    )
    out = keras.tree.flatten(tp(x))[0]
    y = np.zeros(tuple(out.shape), "float32")
    tp.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    ideal = ideal_fraction(tp.plan, spec.router)
    return {
        "name": name,
        "n": spec.n,
        "measured": held / full,
        "ideal": ideal,
        "cost": stated_cost(tp.plan),
        "counts": _step_counts(tp, x, y),
        "keep": tp,
    }


def _row_or_refusal(name: str) -> dict:
    try:
        return row(name)
    except ValueError as e:  # raised on every rank together
        return {"name": name, "refused": str(e).splitlines()[0][:160]}


def main() -> None:
    tc.ensure_process_group()
    world = dist.get_world_size()
    rows = [_row_or_refusal(n) for n in sorted(ROWS) if ROWS[n].n == world]
    if dist.get_rank() != 0:
        return
    print(
        "| model | N | rank-0 bytes | ideal | + stated cost | ratio | "
        "step collectives |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        if "refused" in r:
            print(f"| {r['name']} | {world} | refused: {r['refused']} |")
            continue
        target = r["ideal"] + r["cost"]
        c = r["counts"]
        comms = (
            f"fwd {c['forward']}, bwd {c['backward']}, logit gathers "
            f"{c['gather']}, kv sums {c['shared']}, norm sums "
            f"{c['partial']}, weight gathers {c['weight']}"
        )
        print(
            f"| {r['name']} | {r['n']} | {r['measured']:.3f} | "
            f"{r['ideal']:.3f} | {target:.3f} | "
            f"{r['measured'] / target:.3f} | {comms} |"
        )


if __name__ == "__main__":
    main()
