"""Data parallel x tensor parallel on the same 4 devices (issue 15).

    .venv/bin/python benchmarks/bench_data_parallel.py --model opt-125m:tiny

For each mesh (data x model) = (1x4), (2x2), (4x1): one Adam train step on
the same global batch, timed (median of `--steps` after a warm-up step,
ratio to 1x4), the per-device parameter and optimizer bytes read from the
shards, and the compiled step's collectives split by mesh axis (replica
groups read from the HLO): model-axis all-reduces (Megatron, per replica's
share of the batch) and data-axis all-reduces (the gradient reduction).
The 4 devices are simulated on the CPU, so step times only compare meshes
with each other on this machine.

`--zero` adds the (2x2) and (4x1) meshes with `zero_stage=1` (optimizer
slots split over the data axis too). `--auto 1GB` prints the table behind
`tensor_parallel_size="auto"` for that device memory instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

MESHES = ((1, 4), (2, 2), (4, 1))


def _env() -> None:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=4"
    )


def _axis_bytes(hlo: str, data: int, model: int) -> dict:
    """{axis: [count, bytes]} of the step's collectives by mesh axis."""
    import numpy as np

    from keras_tensor_parallel.comms.hlo import collectives, replica_groups

    ids = np.arange(data * model).reshape(data, model)
    groups = {
        "model": frozenset(frozenset(map(int, r)) for r in ids),
        "data": frozenset(frozenset(map(int, r)) for r in ids.T),
    }
    out = {"model": [0, 0], "data": [0, 0], "other": [0, 0]}
    for c in collectives(hlo):
        found = None
        if c.kind != "collective-permute":  # pairs, not groups
            found = replica_groups(hlo, c.name)
        axis = next((a for a, g in groups.items() if g == found), "other")
        out[axis][0] += 1
        out[axis][1] += c.bytes
    return out


def run(model_name: str, data: int, model: int, args, zero: int = 0) -> dict:
    """One mesh: step time, bytes per device, collectives by axis."""
    import keras
    import numpy as np

    from keras_tensor_parallel import TensorParallelKeras, catalogue
    from keras_tensor_parallel.comms.steps import compile_steps

    spec = catalogue.get(model_name)
    keras.utils.set_random_seed(0)
    lm = catalogue.lm_builder(spec)()
    vocab = spec.tiny_config.get("vocabulary_size", spec.vocab)
    rng = np.random.RandomState(0)
    ids = rng.randint(1, vocab, size=(args.batch, args.seq + 1))
    x = catalogue.lm_inputs(ids[:, :-1])
    y = ids[:, 1:].astype("int32")
    tp = TensorParallelKeras(
        lm, world_size=4, tensor_parallel_size=model, zero_stage=zero
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    tp.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    hlo = compile_steps(tp, x, y).train_hlo
    tp.train_on_batch(x, y)  # compiles
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        tp.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    per_device = tp.engine.per_device_bytes
    return {
        "mesh": f"{data}x{model}" + (" ZeRO-1" if zero else ""),
        "step_s": statistics.median(times),
        "param_bytes": max(per_device(tp.wrapped_model.variables).values()),
        "optimizer_bytes": max(per_device(tp.optimizer.variables).values()),
        "collectives": _axis_bytes(hlo, data, model),
    }


def table(rows: list[dict]) -> str:
    base = rows[0]["step_s"]
    lines = [
        "| mesh (data x model) | step ms | ratio to 1x4 | params / device "
        "| optimizer / device | model-axis collectives | data-axis "
        "collectives | across both axes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["collectives"]
        lines.append(
            f"| {r['mesh']} | {r['step_s'] * 1e3:.1f} "
            f"| {r['step_s'] / base:.2f} | {r['param_bytes']:,} B "
            f"| {r['optimizer_bytes']:,} B "
            f"| {c['model'][0]} / {c['model'][1]:,} B "
            f"| {c['data'][0]} / {c['data'][1]:,} B "
            f"| {c['other'][0]} / {c['other'][1]:,} B |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-125m:tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--zero", action="store_true")
    parser.add_argument("--auto", default=None, metavar="MEMORY")
    args = parser.parse_args()
    _env()
    if args.auto:
        auto_table(args)
        return
    rows = [run(args.model, d, m, args) for d, m in MESHES]
    if args.zero:
        rows += [run(args.model, d, m, args, zero=1) for d, m in MESHES[1:]]
    print(table(rows))


def auto_table(args) -> None:
    """The choice `tensor_parallel_size="auto"` makes, and its figures."""
    import keras
    import numpy as np

    from keras_tensor_parallel import autosize, catalogue
    from keras_tensor_parallel.devices import resolve_devices

    spec = catalogue.get(args.model)
    keras.utils.set_random_seed(0)
    lm = catalogue.lm_builder(spec)()
    vocab = spec.tiny_config.get("vocabulary_size", spec.vocab)
    if ":tiny" not in args.model:
        vocab = spec.vocab
    ids = np.random.RandomState(0).randint(1, vocab, (args.batch, args.seq + 1))
    batch = (catalogue.lm_inputs(ids[:, :-1]), ids[:, 1:].astype("int32"))
    devices = resolve_devices(world_size=4)
    autosize.choose(lm, devices, args.auto, batch=batch)


if __name__ == "__main__":
    main()
