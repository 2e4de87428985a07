"""Issue 12 coverage table: device-0 parameter bytes against the Megatron
ideal, and the compiled train step's collectives, per coverage row.

Usage:
    python benchmarks/bench_coverage.py            # plan figures, all rows
    python benchmarks/bench_coverage.py --comms    # + train-step collectives
    python benchmarks/bench_coverage.py --float64  # Adam vs a float64 run
    python benchmarks/bench_coverage.py --experts  # EP vs inside each expert

Figures are deterministic: per-device bytes come from the plan (and match
the shards, see tests/test_coverage.py); collectives are read from the
compiled HLO of one Adam train step (batch 2, sequence 16).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tests"))

import keras  # noqa: E402
from coverage_models import ROWS, ideal_fraction  # noqa: E402
from test_coverage import stated_cost  # noqa: E402
from test_generalization import _null_gradients  # noqa: E402

from keras_tensor_parallel import plan_model  # noqa: E402


def plan_row(name: str) -> dict:
    row = ROWS[name]
    keras.utils.set_random_seed(0)
    model = row.build()
    plan = plan_model(model, row.n)
    ideal = ideal_fraction(plan, row.router)
    cost = stated_cost(plan)
    return {
        "row": name,
        "n": row.n,
        "now": plan.per_device_fraction,
        "ideal": ideal,
        "cost": cost,
        "vs": plan.per_device_fraction / (ideal + cost),
        "model": model,
    }


def comms_row(result: dict) -> dict:
    from keras_tensor_parallel import comms

    report = comms.analyze(
        result["model"], result["n"], batch_size=2, seq_len=16
    )
    return {
        "all-reduces": sum(1 for c in report.train if "all-reduce" in c.kind),
        "bytes": report.train_bytes,
        "weight gathers": len(report.weight_gathers),
    }


# Float64: is the Adam weight bound of tests/test_coverage.py float noise?

FIT = {"mixtral": 4, "qwen3-moe": 2, "own-weights": 4, "qwen3-kv2": 4}
FIT.update({"gemma3-kv2": 4, "opt-6-heads": 4})


def _built(row, seed, policy=None):
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy or old)
    try:
        keras.utils.set_random_seed(seed)
        return row.build()
    finally:
        keras.config.set_dtype_policy(old)


def _data(model):
    import numpy as np
    from coverage_models import inputs

    if isinstance(model.input, dict):
        x = inputs(batch=2, seq=8)
    else:
        shape = tuple(model.input.shape[1:])
        x = np.random.RandomState(0).randn(2, *shape).astype("float32")
    out = keras.tree.flatten(model(x))[0]
    y = np.random.RandomState(2).randn(*out.shape).astype("float32")
    return x, y


def float64_row(name: str) -> str:
    """Worst weight difference after 3 Adam steps (lr 1e-3), relative to
    the variable's max|w|, between TP (float32), one device (float32) and
    one device in float64, as test_coverage runs them (variables with an
    exactly-zero gradient left out)."""
    import numpy as np

    from keras_tensor_parallel import TensorParallelKeras

    row, n = ROWS[name], FIT[name]
    ref = _built(row, 0)
    tp_model, exact = _built(row, 1), _built(row, 1, "float64")
    tp_model.set_weights(ref.get_weights())
    exact.set_weights([w.astype("float64") for w in ref.get_weights()])
    x, y = _data(ref)
    # Exactly-zero gradients (OPT's key bias) are left out, as in the test.
    null = _null_gradients(ref, x, y, keras.losses.MeanSquaredError())
    tp = TensorParallelKeras(tp_model, world_size=n)
    x64 = keras.tree.map_structure(
        lambda a: a.astype("float64") if a.dtype == "float32" else a, x
    )
    loss = keras.losses.MeanSquaredError()
    for m in (ref, tp, exact):
        keras.Model.compile(m, optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    for _ in range(3):
        ref.train_on_batch(x, y)
        tp.train_on_batch(x, y)
        exact.train_on_batch(x64, y.astype("float64"))
    worst = {"tp-ref": 0.0, "tp-f64": 0.0, "ref-f64": 0.0}
    trios = zip(
        ref.trainable_variables,
        tp.wrapped_model.trainable_variables,
        exact.trainable_variables,
    )
    for r, t, e in trios:
        if r.path in null:
            continue
        r, t, e = (np.asarray(a, "float64") for a in (r, t, e))
        scale = max(float(np.abs(e).max()), 1e-30)
        for key, d in (
            ("tp-ref", t - r),
            ("tp-f64", t - e),
            ("ref-f64", r - e),
        ):
            worst[key] = max(worst[key], float(np.abs(d).max()) / scale)
    return (
        f"| {name} | {n} | "
        + " | ".join(f"{v:.1e}" for v in worst.values())
        + " |"
    )


# Expert parallel against the split inside each expert (forced) -----------

MOE = ("mixtral-n2", "mixtral", "qwen3-moe-n2", "qwen3-moe")


def experts_row(name: str, split: str) -> str:
    """Per-device bytes (whole model, expert banks), the plan's stated
    values per token for the banks, and the compiled Adam train step."""
    import re

    from generalization_cases import INSIDE_EXPERTS

    from keras_tensor_parallel import TensorParallelKeras, comms

    row = ROWS[name]
    keras.utils.set_random_seed(0)
    model = row.build()
    stated = plan_model(model, row.n)
    reason = next(e.reason for e in stated if "experts/" in e.path)
    pattern = {"expert": r"all-reduces (\d+) values per token",
               "inside": r"against (\d+) splitting inside"}[split]  # fmt: skip
    found = re.search(pattern, reason)
    overrides = INSIDE_EXPERTS if split == "inside" else None
    tp = TensorParallelKeras(model, world_size=row.n, overrides=overrides)
    bank = sum(
        e.per_device_bytes(row.n) for e in tp.plan if "experts/" in e.path
    )
    keras.Model.compile(tp, optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    report = comms.analyze(tp, row.n, batch_size=2, seq_len=16)
    per_token = found.group(1) if found else "refused (fused gate/up), forced"
    return (
        f"| {name} | {row.n} | {split} | {tp.plan.per_device_bytes} | {bank} "
        f"| {per_token} | {report.train_bytes} | "
        f"{len(report.weight_gathers)} |"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*", default=list(ROWS))
    parser.add_argument("--comms", action="store_true")
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--experts", action="store_true")
    args = parser.parse_args(argv)
    if args.experts:
        print("| row | N | split | device-0 bytes | expert banks | stated "
              "values/token (banks) | train bytes | weight gathers |\n"
              "|---|---|---|---|---|---|---|---|")  # fmt: skip
        for name in [r for r in args.rows if r in MOE] or MOE:
            for split in ("expert", "inside"):
                print(experts_row(name, split), flush=True)
        return
    if args.float64:
        import jax

        jax.config.update("jax_enable_x64", True)
        print("| row | N | TP vs one device | TP vs float64 | one device "
              "vs float64 |\n|---|---|---|---|---|")  # fmt: skip
        for name in [r for r in args.rows if r in FIT]:
            print(float64_row(name), flush=True)
        return
    header = (
        "| row | N | device-0 fraction | ideal | stated cost | vs ideal+cost |"
    )
    if args.comms:
        header += " train all-reduces | bytes | weight gathers |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in args.rows:
        r = plan_row(name)
        line = (
            f"| {name} | {r['n']} | {r['now']:.3f} | {r['ideal']:.3f} | "
            f"{r['cost']:.3f} | {r['vs']:.3f} |"
        )
        if args.comms:
            c = comms_row(r)
            line += (
                f" {c['all-reduces']} | {c['bytes']} | {c['weight gathers']} |"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
