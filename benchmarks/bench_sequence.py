"""Sequence parallelism and selective recomputation (issue 16, JAX).

    .venv/bin/python benchmarks/bench_sequence.py [--model gemma-kv2]

OPT blocks (hidden 512, sequence 512, 8 heads, FFN 2048, 2 blocks, vocab
1000), batch 4, Adam, MSE on the backbone output. `--model gemma-kv2`:
Gemma blocks of the same size with 8 query and 2 kv heads (head dim 64),
so that at N=4 each kv head is shared by 2 devices. For plain tensor
parallelism, `sequence_parallel=True`, and both with
`recompute="attention"`, at N=2 and N=4:

- temp memory per device of Keras's compiled train step
  (`compiled.memory_analysis().temp_size_in_bytes`), and its ratio to one
  device's (the same model unwrapped);
- ring traffic per device read from the compiled HLO (all-reduce 2(N-1)/N,
  all-gather / reduce-scatter (N-1)/N of the full tensor), for the
  collectives on [batch, ...] activations and for all of them;
- step time: median of `--steps` runs of the compiled step after a
  warm-up, as a ratio to plain tensor parallelism at the same N. The
  devices are simulated on the CPU, so times only compare the variants
  with each other on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

SHAPE = dict(
    hidden_dim=512,
    num_heads=8,
    intermediate_dim=2048,
    max_sequence_length=512,
    num_layers=2,
)
GEMMA_KV2 = dict(
    hidden_dim=512,
    num_query_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_dim=2048,
    num_layers=2,
)
BATCH, SEQ = 4, 512
VARIANTS = (
    ("plain TP", {}),
    ("TP + recompute", {"recompute": "attention"}),
    ("SP", {"sequence_parallel": True}),
    ("SP + recompute", {"sequence_parallel": True, "recompute": "attention"}),
)


def _env() -> None:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=4"
    )


def _batch(model: str = "opt"):
    import numpy as np

    from keras_tensor_parallel import catalogue

    if model == "gemma-kv2":
        spec = catalogue.get("gemma-small:tiny").variant(**GEMMA_KV2)
    else:
        spec = catalogue.get("opt-125m:tiny").variant(**SHAPE)
    x = spec.inputs(batch=BATCH, seq=SEQ)
    y = np.random.RandomState(1).randn(BATCH, SEQ, SHAPE["hidden_dim"])
    return spec, x, y.astype("float32")


def measure(n: int, options: dict, steps: int, model: str = "opt") -> dict:
    """One variant: temp bytes, ring bytes, median step seconds."""
    import keras

    from keras_tensor_parallel import TensorParallelKeras
    from keras_tensor_parallel.backends.jax_recompute import (
        compile_train_step,
    )
    from keras_tensor_parallel.comms import collectives

    spec, x, y = _batch(model)
    keras.utils.set_random_seed(0)
    model = spec.build()
    if n > 1:
        model = TensorParallelKeras(model, world_size=n, **options)
    model.compile(optimizer="adam", loss="mse")
    compiled, state, data = compile_train_step(model, x, y, with_args=True)
    found = collectives(compiled.as_text())
    acts = [c for c in found if all(s and s[0] == BATCH for s in c.shapes)]
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        logs, state = compiled(state, data)
        float(logs["loss"])  # wait for the step
        times.append(time.perf_counter() - start)
    return {
        "temp": compiled.memory_analysis().temp_size_in_bytes,
        "ring_act": sum(c.ring_bytes for c in acts),
        "ring_all": sum(c.ring_bytes for c in found),
        "kinds": sorted({c.kind for c in acts}),
        "step_s": statistics.median(times[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--model", choices=("opt", "gemma-kv2"), default="opt")
    args = parser.parse_args()
    _env()
    one = measure(1, {}, args.steps, args.model)
    mib = 2**20
    print(f"one device: temp {one['temp'] / mib:.1f} MiB")
    print(
        "| N | variant | temp MiB/device | vs one device | ring MiB "
        "(activations) | ring MiB (all) | activation collectives | "
        "step time vs plain TP |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        base = None
        for name, options in VARIANTS:
            r = measure(n, options, args.steps, args.model)
            base = base or r
            print(
                f"| {n} | {name} | {r['temp'] / mib:.1f} | "
                f"{r['temp'] / one['temp']:.3f} | "
                f"{r['ring_act'] / mib:.2f} | {r['ring_all'] / mib:.2f} | "
                f"{', '.join(r['kinds'])} | "
                f"{r['step_s'] / base['step_s']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
