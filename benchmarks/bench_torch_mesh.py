"""Data x tensor parallel on torch: the same 4 gloo ranks as (data x
model) = (1x4), (2x2), (4x1), and (2x2), (4x1) with `zero_stage=1`
(issue 15).

    .venv/bin/python benchmarks/bench_torch_mesh.py

starts 4 ranks (`keras-tp launch -n 4`, gloo on 127.0.0.1) that build
the same model (same seed) once per mesh, then time Adam train steps on
the same global batch side by side: `--rounds` rounds, each running
`--steps` steps of every mesh in turn, so all meshes see the same
machine load; a step's time is the slowest rank's, the figure is the
median over rounds, and the ratio to (1x4) the median over rounds of
the round's time over (1x4)'s in that round. Per rank: parameter and
optimizer bytes read from the local tensors. Per step: every
`torch.distributed` collective issued, counted by the group it ran on
(model axis, data axis, all ranks) with its tensor bytes and its ring
bytes sent per rank (all-reduce of B over n ranks: 2(n-1)/n B; an
all-gather or reduce-scatter of a full tensor B: (n-1)/n B).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MESHES = ((1, 4, 0), (2, 2, 0), (4, 1, 0), (2, 2, 1), (4, 1, 1))
CONFIG = dict(
    vocabulary_size=8192,
    num_layers=2,
    num_heads=8,
    hidden_dim=256,
    intermediate_dim=1024,
    max_sequence_length=64,
)
BATCH, SEQ = 8, 64
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_gather_single",
    "reduce_scatter_single",
    "broadcast",
)
LOG: list = []  # (function, group, tensor bytes) while counting


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size()


def _count_collectives():
    """Wrap `torch.distributed`'s collectives to log each call; returns
    the function that unwraps them."""
    import torch.distributed as dist

    originals = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}
    for name, original in originals.items():

        def logged(*args, _f=original, _name=name, **kwargs):
            group = kwargs.get("group")
            tensors = [*args, *kwargs.values()]
            # The full tensor: the output of a gather, the input of a
            # scatter, else the tensor itself.
            big = tensors[1] if "reduce_scatter" in _name else tensors[0]
            LOG.append((_name, group, _nbytes(big)))
            return _f(*args, **kwargs)

        setattr(dist, name, logged)
    return lambda: [setattr(dist, n, f) for n, f in originals.items()]


def _data():
    import numpy as np

    rng = np.random.RandomState(0)
    x = {
        "token_ids": rng.randint(
            0, CONFIG["vocabulary_size"], (BATCH, SEQ)
        ).astype("int32"),
        "padding_mask": np.ones((BATCH, SEQ), "int32"),
    }
    y = rng.randn(BATCH, SEQ, CONFIG["hidden_dim"]).astype("float32")
    return x, y


def _build(data: int, model: int, zero: int):
    import keras

    from keras_tensor_parallel import TensorParallelKeras, catalogue

    keras.utils.set_random_seed(0)
    net = catalogue.get("opt-125m").variant(**CONFIG).build()
    tp = TensorParallelKeras(
        net,
        world_size=data * model,
        tensor_parallel_size=model,
        zero_stage=zero,
        distributed_backend="torch",
    )
    tp.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    return tp


def _axis(group, tp) -> str:
    import torch.distributed as dist

    groups = tp.engine.groups
    if groups is not None and group is groups.model_group:
        return "model"
    if groups is not None and group is groups.data_group:
        return "data"
    if group is None and tp.tensor_parallel_size == dist.get_world_size():
        return "model"  # no data axis: the plan runs on every rank
    return "all"


def _collectives(tp, x, y) -> dict:
    """One counted step: `{axis: [calls, tensor bytes, ring bytes]}`."""
    import torch.distributed as dist

    LOG.clear()
    tp.train_on_batch(x, y)
    out: dict = {}
    for name, group, size in LOG:
        n = dist.get_world_size(group)
        ring = size * (n - 1) / n * (2 if name == "all_reduce" else 1)
        # The one broadcast is the per-call seed (`prepare_state`).
        axis = "all" if name == "broadcast" else _axis(group, tp)
        row = out.setdefault(axis, [0, 0, 0.0])
        row[0] += 1
        row[1] += size
        row[2] += 0 if name == "broadcast" else ring
    LOG.clear()
    return out


def _bytes(variables) -> int:
    return sum(_nbytes(v.value) for v in variables)


def _slowest(seconds: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def worker(out: str, rounds: int, steps: int) -> None:
    import torch.distributed as dist

    from keras_tensor_parallel.backends import torch_collectives as tc

    tc.ensure_process_group()
    x, y = _data()
    models = {m: _build(*m) for m in MESHES}
    res = {}
    for mesh, tp in models.items():
        tp.train_on_batch(x, y)  # builds the optimizer: a warm-up step
        res[mesh] = {
            "param_bytes": _bytes(tp.weights),
            "optimizer_bytes": _bytes(tp.optimizer.variables),
        }
    restore = _count_collectives()
    for mesh, tp in models.items():
        res[mesh]["collectives"] = _collectives(tp, x, y)
    restore()
    times: dict = {m: [] for m in MESHES}
    for _ in range(rounds):
        for mesh, tp in models.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                tp.train_on_batch(x, y)
            times[mesh].append(_slowest(time.perf_counter() - start) / steps)
    for mesh in MESHES:
        res[mesh]["step_s"] = statistics.median(times[mesh])
        res[mesh]["rounds_s"] = times[mesh]
    mine = {
        "x".join(map(str, m[:2])) + ("+zero" * m[2]): r for m, r in res.items()
    }
    with open(f"{out}.{dist.get_rank()}", "w") as f:
        json.dump(mine, f)


def _replica_bytes() -> tuple[int, int]:
    """One replica's parameter and Adam slot bytes (the model unsplit)."""
    from keras_tensor_parallel import catalogue

    net = catalogue.get("opt-125m").variant(**CONFIG).build()
    params = sum(int(v.numpy().nbytes) for v in net.weights)
    return params, 2 * sum(int(v.numpy().nbytes) for v in net.trainable_weights)


def _paired_ratio(rounds: list, base: list) -> float:
    """Median over rounds of the round's time over (1x4)'s in the same
    round: load that drifts between rounds cancels."""
    return statistics.median(a / b for a, b in zip(rounds, base))


def table(out: str) -> str:
    ranks = [json.load(open(f"{out}.{r}")) for r in range(4)]
    params, slots = _replica_bytes()
    first = ranks[0]["1x4"]["rounds_s"]
    lines = [
        f"One replica: {params:,} B of parameters, {slots:,} B of Adam "
        "slots. Bytes per rank: the largest over the 4 ranks.",
        "",
        "| mesh (data x model) | step (ms) | rounds min-max "
        "| paired ratio to 1x4 | params / rank "
        "| optimizer / rank | model axis: calls, ring B/rank "
        "| data axis: calls, ring B/rank | all ranks: calls, ring B/rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in ranks[0].items():
        p = max(rk[name]["param_bytes"] for rk in ranks)
        o = max(rk[name]["optimizer_bytes"] for rk in ranks)
        cells = []
        for axis in ("model", "data", "all"):
            c = r["collectives"].get(axis, [0, 0, 0.0])
            cells.append(f"{c[0]}, {c[2]:,.0f}")
        lines.append(
            f"| {name} | {1e3 * r['step_s']:.1f} "
            f"| {1e3 * min(r['rounds_s']):.0f}-{1e3 * max(r['rounds_s']):.0f} "
            f"| {_paired_ratio(r['rounds_s'], first):.2f} "
            f"| {p:,} | {o:,} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="/tmp/bench_torch_mesh")
    parser.add_argument("--timeout", type=int, default=1200)
    args = parser.parse_args()
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "keras_tensor_parallel.launch", "-n", "4"]
    cmd += ["--timeout", str(args.timeout), os.path.abspath(__file__)]
    cmd += ["--worker", args.out, str(args.rounds), str(args.steps)]
    subprocess.run(cmd, env=env, check=True)
    os.environ["KERAS_BACKEND"] = "torch"
    print(table(args.out))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
