"""Load a KerasHub OPT preset on the torch engine, one process per rank,
straight into local shards; beside it, `from_preset` on each rank then
wrapping (the route before issue 11).

    .venv/bin/python -m keras_tensor_parallel.launch -n 2 --timeout 1200 \\
        benchmarks/bench_load_torch.py --arch opt-125m --dir /tmp/opt125m

Rank 0 writes the preset once (random float32 weights, as
`bench_load.py`). Per rank: seconds, peak and final bytes of the torch
tensors the load created (`loading.memory_torch.PeakLocal`: live tensors
sampled after every variable placed), and RSS growth (sampled every 2 ms).
On CPU a rank's device memory is its host memory. `--variant wrap` runs
the other route in the same way (run it in its own launch: RSS is per
process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _load(variant: str, path: str):
    import keras_hub  # imported before the measurement starts

    from keras_tensor_parallel import TensorParallelKeras

    if variant == "tp":
        return TensorParallelKeras.from_preset(path)
    model = keras_hub.models.Backbone.from_preset(path)
    return TensorParallelKeras(model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="opt-125m")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--variant", choices=("tp", "wrap"), default="tp")
    parser.add_argument("--json")
    parser.add_argument(
        "--time-only",
        action="store_true",
        help="no sampling (each sample walks every live object: slow)",
    )
    args = parser.parse_args(argv)
    import contextlib

    import keras_hub  # noqa: F401 - its import is not part of the load
    import torch.distributed as dist
    from bench_load import write_preset

    import keras_tensor_parallel.loading.api  # noqa: F401
    from keras_tensor_parallel.backends import torch_collectives as tc
    from keras_tensor_parallel.loading.memory_torch import PeakLocal

    tc.ensure_process_group()
    if tc.rank() == 0:
        write_preset(args.arch, args.dir)
    dist.barrier()
    start = time.perf_counter()
    mem = PeakLocal()
    with contextlib.nullcontext() if args.time_only else mem:
        tp = _load(args.variant, args.dir)
    seconds = time.perf_counter() - start
    values = [v.value for v in tp.wrapped_model.variables]
    row = {
        "arch": args.arch,
        "variant": args.variant,
        "rank": tc.rank(),
        "world_size": tc.world_size(),
        "seconds": round(seconds, 1),
        "peak": mem.peak,
        "final": mem.final,
        "ratio": round(mem.ratio(), 3) if mem.final else None,
        "rss_growth": mem.rss_growth,
        "largest": max(t.numel() * t.element_size() for t in values),
    }
    rows: list = [None] * tc.world_size()
    dist.all_gather_object(rows, row)
    if tc.rank() == 0:
        for r in rows:
            print(json.dumps(r))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
