"""Sequence parallelism on the torch engine (issue 16), one process per
rank.

    .venv/bin/python -m keras_tensor_parallel.launch -n 2 --timeout 1800 \\
        benchmarks/bench_torch_sequence.py

OPT blocks (hidden 512, sequence 512, 8 heads, FFN 2048, 2 blocks, vocab
1000; the shape of `bench_sequence.py`), batch 4, Adam, MSE on the
backbone output. For one process (the model unwrapped, on rank 0's
process), plain tensor parallelism and `sequence_parallel=True`:

- activation bytes per rank: the bytes the forward of a train step keeps for
  backward
  (`torch.autograd.graph.saved_tensors_hooks`, each storage once,
  parameters excluded), deterministic, and the ratio to one process;
- ring bytes per rank per step, counted by the collectives themselves
  (`torch_collectives.RING`: all-reduce 2(N-1)/N, all-gather and
  reduce-scatter (N-1)/N of the full tensor), activations and replicated
  parameters' gradients apart;
- step time: median of `--steps` train steps after a warm-up, as a ratio
  to plain tensor parallelism (ranks share this machine's cores: compare
  the variants with each other only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SHAPE = dict(
    hidden_dim=512,
    num_heads=8,
    intermediate_dim=2048,
    max_sequence_length=512,
    num_layers=2,
)
BATCH = 4
VARIANTS = (
    ("plain TP", {}),
    ("TP + recompute", {"recompute": "attention"}),
    ("SP", {"sequence_parallel": True}),
    ("SP + recompute", {"sequence_parallel": True, "recompute": "attention"}),
)


def _saved_bytes(model, x, y) -> int:
    import torch

    params = {v.value.untyped_storage().data_ptr() for v in model.variables}
    seen: dict = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    # The forward of a train step and its loss (backward would add the
    # tensors a recomputation saves while it runs, and frees them).
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, training=True)
        torch.mean(torch.square(out - torch.as_tensor(y, device=out.device)))
    return sum(seen.values())


def _measure(model, x, y, steps: int) -> dict:
    import keras

    from keras_tensor_parallel.backends import torch_collectives as tc

    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.train_on_batch(x, y)  # warm-up: optimizer slots, metrics
    tc.reset_counts()
    model.train_on_batch(x, y)
    out = {"ring": dict(tc.RING), "saved": _saved_bytes(model, x, y)}
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    out["step_s"] = statistics.median(times)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from keras_tensor_parallel import TensorParallelKeras, catalogue
    from keras_tensor_parallel.backends import torch_collectives as tc

    tc.ensure_process_group()
    n = tc.world_size()
    spec = catalogue.get("opt-125m:tiny").variant(**SHAPE)
    x = spec.inputs(batch=BATCH, seq=args.seq)
    y = np.random.RandomState(1).randn(BATCH, args.seq, SHAPE["hidden_dim"])
    y = y.astype("float32")
    rows = {}
    keras.utils.set_random_seed(0)
    rows["one process"] = _measure(spec.build(), x, y, args.steps)
    for label, options in VARIANTS:
        keras.utils.set_random_seed(0)
        tp = TensorParallelKeras(
            spec.build(), world_size=n, distributed_backend="torch", **options
        )
        rows[label] = _measure(tp, x, y, args.steps)
    if tc.rank() == 0:
        _report(rows, n, args.seq)
    return 0


def _report(rows: dict, n: int, seq: int) -> None:
    one, plain = rows["one process"], rows["plain TP"]
    print(f"N={n}, batch {BATCH}, sequence {seq}, OPT blocks {SHAPE}")
    print(
        "| variant | activation bytes/rank | vs one process | ring act. B "
        "| ring param-grad B | step vs plain TP |"
    )
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        ring = r["ring"]
        act = ring["all-reduce"] + ring["all-gather"] + ring["reduce-scatter"]
        print(
            f"| {label} | {r['saved']:,} | {r['saved'] / one['saved']:.3f} "
            f"| {act:,.0f} | {ring['params']:,.0f} "
            f"| {r['step_s'] / plain['step_s']:.2f} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    raise SystemExit(main())
