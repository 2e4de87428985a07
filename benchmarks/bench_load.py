"""Load a KerasHub OPT preset at N=4 straight into shards, beside plain
`from_preset` on one device: time, peak bytes per device, peak RSS.

    .venv/bin/python benchmarks/bench_load.py --arch opt-1.3b --json out.json

The preset (random weights, float32) is written once to `--dir`. Each
variant then runs in a fresh process, so its peak RSS is its own:

- `tp N=4`: `TensorParallelKeras.from_preset(dir, world_size=4)`: built
  unallocated, planned, each value read from `model.weights.h5` slice by
  slice onto its device;
- `single`: `keras_hub.models.Backbone.from_preset(dir)` on one device;
- `wrap N=4` (`--wrap`): `from_preset` on one device, then
  `TensorParallelKeras(model, world_size=4)` (what users did before).

Per-device bytes are sampled from `jax.live_arrays()` in a background
thread and after every variable placed (`loading.memory.PeakMemory`); RSS
is read from `/proc/self/statm` the same way. The 4 devices are simulated
on the CPU (`--xla_force_host_platform_device_count=4`), so their bytes are
host memory too: RSS includes every device's shards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ARCHS = {
    # KerasHub OPTBackbone configs of the OPT family (vocab 50272, 2048
    # positions); parameters in float32.
    "opt-125m": dict(num_layers=12, num_heads=12, hidden_dim=768,
                     intermediate_dim=3072),
    "opt-350m": dict(num_layers=24, num_heads=16, hidden_dim=1024,
                     intermediate_dim=4096),
    "opt-1.3b": dict(num_layers=24, num_heads=32, hidden_dim=2048,
                     intermediate_dim=8192),
}  # fmt: skip
VARIANTS = ("tp", "single", "wrap", "write")


def _env() -> None:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=4"
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def write_preset(arch: str, path: str) -> None:
    """A preset of `arch` with random weights (skipped if present)."""
    if os.path.isfile(os.path.join(path, "model.weights.h5")):
        return
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.OPTBackbone(
        vocabulary_size=50272,
        max_sequence_length=2048,
        dropout=0.0,
        **ARCHS[arch],
    )
    backbone.save_to_preset(path)


def measure(variant: str, path: str, world_size: int) -> dict:
    """Load `path` as `variant` in this process; the figures as a dict."""
    import keras_hub

    from keras_tensor_parallel.loading import memory
    from keras_tensor_parallel.model import TensorParallelKeras

    start = time.perf_counter()
    with memory.PeakMemory(interval_s=0.005) as mem:
        if variant == "tp":
            model = TensorParallelKeras.from_preset(path, world_size=world_size)
        else:
            model = keras_hub.models.Backbone.from_preset(path)
            if variant == "wrap":
                model = TensorParallelKeras(model, world_size=world_size)
    seconds = time.perf_counter() - start
    variables = getattr(model, "wrapped_model", model).variables
    largest = max(v.value.nbytes for v in variables)
    return {
        "variant": variant,
        "seconds": round(seconds, 2),
        "model_bytes": int(sum(v.value.nbytes for v in variables)),
        "largest_variable_bytes": int(largest),
        "peak_device_bytes": max(mem.peak.values()),
        "final_device_bytes": max(mem.final.values()),
        "peak_over_final": round(mem.ratio(), 4),
        "rss_before_bytes": mem.rss_baseline,
        "rss_peak_bytes": mem.rss_peak,
        "rss_growth_bytes": mem.rss_growth,
    }


def _run_child(variant: str, path: str, world_size: int, arch: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--dir", path,
         "--world-size", str(world_size), "--arch", arch],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def table(arch: str, rows: list[dict]) -> str:
    lines = [
        f"{arch}: model {_gib(rows[0]['model_bytes'])} float32, largest "
        f"variable {_gib(rows[0]['largest_variable_bytes'])}",
        "",
        "| variant | seconds | peak bytes, worst device | final bytes, "
        "worst device | peak / final | peak RSS growth |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seconds']} | "
            f"{_gib(r['peak_device_bytes'])} | "
            f"{_gib(r['final_device_bytes'])} | {r['peak_over_final']} | "
            f"{_gib(r['rss_growth_bytes'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="opt-125m")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--wrap", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _env()
    path = args.dir or f"/tmp/keras_tp_bench_{args.arch}"
    if args.child == "write":
        write_preset(args.arch, path)
        print("{}")
        return
    if args.child:
        print(json.dumps(measure(args.child, path, args.world_size)))
        return
    # Every step in its own process: the writer's memory is gone before
    # the loads start, and each load's peak RSS is its own.
    _run_child("write", path, args.world_size, args.arch)
    variants = ["tp", "single"] + (["wrap"] if args.wrap else [])
    rows = [_run_child(v, path, args.world_size, args.arch) for v in variants]
    print(table(args.arch, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
