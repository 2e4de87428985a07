"""Issue 12 coverage table: device-0 parameter bytes against the Megatron
ideal, and the compiled train step's collectives, per coverage row.

Usage:
    python benchmarks/bench_coverage.py            # plan figures, all rows
    python benchmarks/bench_coverage.py --comms    # + train-step collectives

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*", default=list(ROWS))
    parser.add_argument("--comms", action="store_true")
    args = parser.parse_args(argv)
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
