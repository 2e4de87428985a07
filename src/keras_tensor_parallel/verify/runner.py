"""Running the verify checks: progress, the paired runs, the report data.

`report.py` renders what this module returns.
"""

from __future__ import annotations

import dataclasses
import time

from keras_tensor_parallel.verify.report import (
    CheckRow,
    failed_row,
    fmt,
    row_from_result,
)

CHECK_NAMES = ("forward", "gradients", "memory", "training")
_METRICS = {
    "forward": "max |out diff| / max(1, max |out|)",
    "gradients": "worst variable: max |grad diff| / max(1, max |grad|)",
    "memory": "worst device bytes (params + Adam) / one device's",
    "loss_per_step": "max relative loss difference over steps",
    "weights": "max relative weight difference after the last step",
    "optimizer_slots": "Adam slots not sharded like their parameter (0/1)",
}
_ROW_NAMES = {
    "loss_per_step": "training loss",
    "weights": "optimizer steps",
    "optimizer_slots": "optimizer slots",
}


class ConsoleProgress:
    """Live progress on a rich console: a spinner per check, then a line."""

    def __init__(self, console):
        self.console = console
        self._status = None

    def start(self, index: int, total: int, name: str) -> None:
        self._prefix = f"[{index}/{total}]"
        self._status = self.console.status(f"{self._prefix} {name} ...")
        self._status.start()

    def done(self, rows: list[CheckRow]) -> None:
        if self._status is not None:
            self._status.stop()
        for r in rows:
            status = "[green]PASS[/]" if r.passed else "[red]FAIL[/]"
            figure = r.error or f"{fmt(r.value)} <= {fmt(r.threshold)}"
            self.console.print(
                f"{self._prefix} {r.name:<16} {status}  {figure}  "
                f"({r.seconds:.1f} s)"
            )


@dataclasses.dataclass
class VerifyResult:
    rows: list
    training: dict | None
    plan_summary: list


def run_checks(
    spec,
    world_size: int,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    train_model: str = "auto",
    tolerance=None,
    progress=None,
) -> VerifyResult:
    """Forward, gradients, memory and training checks of `spec` (a
    `models.ModelSpec`) at `world_size` against one device."""

    from keras_tensor_parallel.verify import checks

    x = spec.inputs(batch_size, seq_len, seed)
    rows: list[CheckRow] = []
    training_data = None
    plan_summary: list = []
    jobs = [
        ("forward", lambda: checks.compare_forward(
            spec.build, world_size, inputs=x, seed=seed)),
        ("gradients", lambda: checks.compare_gradients(
            spec.build, world_size, inputs=x, seed=seed)),
        ("memory", lambda: checks.memory_check(
            spec.build, world_size, seed=seed)),
    ]  # fmt: skip
    total = len(jobs) + 1
    for i, (name, job) in enumerate(jobs, 1):
        if progress:
            progress.start(i, total, name)
        t0 = time.time()
        try:
            row = row_from_result(
                job(),
                seconds=time.time() - t0,
                metric=_METRICS[name],
                tolerance=tolerance,
            )
        except Exception as e:  # noqa: BLE001 - a failed check, reported
            row = failed_row(name, _one_line(e), seconds=time.time() - t0)
        rows.append(row)
        if progress:
            progress.done([row])
    if progress:
        progress.start(total, total, "training")
    t0 = time.time()
    try:
        train_rows, training_data = _training_rows(
            spec, world_size, steps=steps, batch_size=batch_size,
            seq_len=seq_len, seed=seed, train_model=train_model,
            tolerance=tolerance,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a failed check, reported
        train_rows = [
            failed_row("training", _one_line(e), seconds=time.time() - t0)
        ]
    for r in train_rows:
        r.seconds = round((time.time() - t0) / len(train_rows), 2)
    rows += train_rows
    if progress:
        progress.done(train_rows)
    try:
        plan_summary = _plan_summary(spec, world_size, seed)
    except Exception:  # noqa: BLE001 - the plan is context, not a check
        plan_summary = []
    return VerifyResult(rows, training_data, plan_summary)


def _training_rows(
    spec, world_size, *, steps, batch_size, seq_len, seed, train_model,
    tolerance,
):  # fmt: skip
    import keras
    import numpy as np

    from keras_tensor_parallel import models
    from keras_tensor_parallel.verify import data, training

    if spec.causal_lm:
        build, description = models.pick_builder(spec, train_model)
        text = data.stdlib_corpus(max_bytes=2_000_000)
        x, y = data.lm_batches(
            text, batch_size=batch_size, seq_len=seq_len, steps=steps,
            seed=seed,
        )  # fmt: skip
        result = training.compare_training(
            lambda: training.causal_lm(build()),
            world_size,
            inputs=training.lm_inputs(x),
            targets=y,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            optimizer_fn=lambda: keras.optimizers.Adam(1e-3),
            steps=steps,
            batch_size=batch_size,
            seed=seed,
        )
        source = "the Python standard library's source (bytes)"
        note = f"causal LM on {source}; model: {description}"
    else:
        keras.utils.set_random_seed(seed)
        probe = spec.build()
        x = spec.inputs(steps * batch_size, seq_len, seed)
        out = probe(x)
        if not hasattr(out, "shape"):
            raise ValueError(
                "not a causal LM and several outputs: no training check"
            )
        rng = np.random.RandomState(seed + 1)
        y = rng.randn(*out.shape).astype("float32")
        result = training.compare_training(
            spec.build, world_size, inputs=x, targets=y,
            loss=keras.losses.MeanSquaredError(),
            optimizer_fn=lambda: keras.optimizers.Adam(1e-3),
            steps=steps, batch_size=batch_size, seed=seed,
        )  # fmt: skip
        source = "random regression targets (mse)"
        description = spec.description
        note = f"not a token LM: {source}"
    rows = []
    for check in result.checks:
        row = row_from_result(
            check,
            seconds=0.0,
            metric=_METRICS.get(check.name, ""),
            tolerance=tolerance,
            note=note if check.name == "loss_per_step" else "",
        )
        row.name = _ROW_NAMES.get(check.name, check.name)
        row.detail = {}  # per-variable figures stay out of the table
        rows.append(row)
    training_data = {
        "losses_single": [float(v) for v in result.losses_single],
        "losses_tp": [float(v) for v in result.losses_tp],
        "max_loss_rel_diff": float(result.max_loss_rel_diff),
        "max_weight_rel_diff": float(result.max_weight_rel_diff),
        "model": description,
        "data": source,
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
    }
    return rows, training_data


def _plan_summary(spec, world_size, seed) -> list:
    import keras

    from keras_tensor_parallel.plan import plan_model

    keras.utils.set_random_seed(seed)
    return plan_model(spec.build(), world_size).summary_lines()


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def report_dict(spec, args, device_ids, result, *, started, tolerance):
    """The data behind report.md/json."""

    import keras

    return {
        "model": spec.name,
        "description": spec.description,
        "world_size": args.world_size,
        "backend": keras.backend.backend(),
        "devices": ", ".join(device_ids),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "duration_s": time.time() - started,
        "settings": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "seed": args.seed,
            "train_model": args.train_model,
        },
        "tolerance": tolerance,
        "passed": all(r.passed for r in result.rows),
        "checks": [r.to_dict() for r in result.rows],
        "training": result.training,
        "plan_summary": result.plan_summary,
    }
