"""Running the verify checks: progress, the paired runs, the report data.

`report.py` renders what this module returns.
"""

from __future__ import annotations

import dataclasses
import functools
import time

from keras_tensor_parallel.verify.report import (
    STATUS_COLORS,
    CheckRow,
    failed_row,
    fmt,
    row_from_result,
)

_METRICS = {
    "forward": "max |out diff| / max(1, max |out|)",
    "gradients": "worst variable: max |grad diff| / max(1, max |grad|)",
    "memory": "worst device bytes (params + Adam) / one device's",
    "loss_per_step": "max relative loss difference over steps",
    "weights": "max relative weight difference after the last step",
    "optimizer_slots": "Adam slots not sharded like their parameter (0/1)",
    "activations": "worst device's train-step temp memory / one device's",
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
            status = f"[{STATUS_COLORS[r.status]}]{r.status}[/]"
            figure = r.error or f"{fmt(r.value)} <= {fmt(r.threshold)}"
            if r.skipped:
                figure = r.note
            elif r.info:
                figure = f"{fmt(r.value)}: {r.note}"
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
    tensor_parallel_size: int | None = None,
    sequence_parallel: bool = False,
    recompute: str | None = None,
) -> VerifyResult:
    """Forward, gradients, memory, activations and training checks of
    `spec` (a `catalogue.ModelSpec`) at `world_size` against one device
    (mesh and options as `TensorParallelKeras` takes them); a check that
    raises is an ERROR row.

    Example:

    ```python
    result = run_checks(catalogue.get("seed-mlp"), 2, steps=2,
                        batch_size=2, seq_len=8)  # result.rows
    ```
    """
    from keras_tensor_parallel.verify import checks
    from keras_tensor_parallel.verify.pairs import require_jax

    require_jax("keras-tp verify")
    x = spec.inputs(batch_size, seq_len, seed)
    kw = {"seed": seed, "tensor_parallel_size": tensor_parallel_size}
    act = {"sequence_parallel": sequence_parallel, "recompute": recompute}

    case = functools.cache(lambda: _case(  # the training model and data
        spec, steps=steps, batch_size=batch_size, seq_len=seq_len,
        seed=seed, train_model=train_model))  # fmt: skip

    jobs = [
        ("forward", lambda: [checks.compare_forward(
            spec.build, world_size, inputs=x, **kw, **act)]),
        ("gradients", lambda: [checks.compare_gradients(
            spec.build, world_size, inputs=x, **kw, **act)]),
        ("memory", lambda: [checks.memory_check(
            spec.build, world_size, **kw)]),
        ("activations", lambda: [_activations(
            case(), world_size, batch_size, **kw, **act)]),
    ]  # fmt: skip
    training: dict = {}

    def train_job():
        result, training["data"] = _training(
            case(), world_size, steps=steps, batch_size=batch_size,
            seq_len=seq_len, **kw, **act,
        )  # fmt: skip
        return result.checks

    jobs.append(("training", train_job))
    return _run_all(jobs, tolerance, progress, training, spec, kw, world_size)


def _run_all(jobs, tolerance, progress, training, spec, kw, world_size):
    rows: list[CheckRow] = []
    for i, (name, job) in enumerate(jobs, 1):
        if progress:
            progress.start(i, len(jobs), name)
        new = _run_job(name, job, tolerance, training)
        rows += new
        if progress:
            progress.done(new)
    tp_size = kw["tensor_parallel_size"] or world_size
    summary = _plan_summary(spec, tp_size, kw["seed"])
    return VerifyResult(rows, training.get("data"), summary)


def _run_job(name, job, tolerance, training) -> list[CheckRow]:
    """The rows of one job (several for training), or one ERROR row."""
    from keras_tensor_parallel.verify import activations

    t0 = time.time()
    try:
        results = job()
    except Exception as e:  # noqa: BLE001 - a failed check, reported
        return [failed_row(name, _one_line(e), seconds=time.time() - t0)]
    seconds = (time.time() - t0) / len(results)
    rows = []
    for result in results:
        note = ""
        if result.name == "loss_per_step":
            note = training["data"]["note"]
        if result.name == "activations":
            note = activations.note(result.detail)
        row = row_from_result(
            result,
            seconds=seconds,
            metric=_METRICS.get(result.name, ""),
            tolerance=tolerance,
            note=note,
        )
        row.name = _ROW_NAMES.get(result.name, result.name)
        if name == "training":
            row.detail = {}  # per-variable figures stay out of the table
        rows.append(row)
    return rows


def _case(spec, *, steps, batch_size, seq_len, seed, train_model) -> dict:
    """The training check's model and data: a causal LM on real text when
    `spec` is one, else regression to random targets."""
    import keras

    if spec.causal_lm:
        trained, build, x, y = _lm_case(
            spec, train_model, steps=steps, batch_size=batch_size,
            seq_len=seq_len, seed=seed,
        )  # fmt: skip
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        source = "the Python standard library's source (bytes)"
        note = f"causal LM on {source}; model: {trained.description}"
    else:
        trained, build = spec, spec.build
        x, y = _regression_case(spec, steps * batch_size, seq_len, seed)
        loss = keras.losses.MeanSquaredError()
        source = "random regression targets (mse)"
        note = f"not a token LM: {source}"
    return {"trained": trained, "build": build, "x": x, "y": y,
            "loss": loss, "source": source, "note": note}  # fmt: skip


def _activations(case, world_size, batch_size, **kw):
    """The activation-memory check on the training model's first batch."""
    from keras_tensor_parallel.verify import activations, training

    rows = slice(0, batch_size)
    return activations.activation_check(
        case["build"], world_size, inputs=training._take(case["x"], rows),
        targets=case["y"][rows], loss=case["loss"],
        config=case["trained"].config, **kw,
    )  # fmt: skip


def _training(case, world_size, *, steps, batch_size, seq_len, seed, **kw):
    """The paired training run on `case` (see `_case`): `(comparison,
    report data)`."""
    import keras

    from keras_tensor_parallel.verify import training

    result = training.compare_training(
        case["build"], world_size, inputs=case["x"], targets=case["y"],
        loss=case["loss"],
        optimizer_fn=lambda: keras.optimizers.Adam(1e-3),
        steps=steps, batch_size=batch_size, seed=seed, **kw,
    )  # fmt: skip
    return result, {
        "losses_single": [float(v) for v in result.losses_single],
        "losses_tp": [float(v) for v in result.losses_tp],
        "max_loss_rel_diff": float(result.max_loss_rel_diff),
        "max_weight_rel_diff": float(result.max_weight_rel_diff),
        "model": case["trained"].description,
        "data": case["source"],
        "note": case["note"],
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
    }


def _lm_case(spec, size, *, steps, batch_size, seq_len, seed):
    """`(spec trained, builder of a logits model, inputs, next-token
    targets)`: byte windows of the standard library's sources."""
    from keras_tensor_parallel import catalogue
    from keras_tensor_parallel.verify import data

    trained = catalogue.sized(spec, size=size)
    text = data.stdlib_corpus(max_bytes=2_000_000)
    x, y = data.lm_batches(
        text, batch_size=batch_size, seq_len=seq_len, steps=steps, seed=seed
    )
    if trained.vocab < 256:  # bytes are token ids: fold into the vocab
        x, y = x % trained.vocab, y % trained.vocab
    build = catalogue.lm_builder(trained)
    return trained, build, catalogue.lm_inputs(x), y


def _regression_case(spec, rows: int, seq_len: int, seed: int):
    """Inputs and random float targets shaped like the model's output."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(seed)
    x = spec.inputs(rows, seq_len, seed)
    out = spec.build()(x)
    if not hasattr(out, "shape"):
        raise ValueError(
            "not a causal LM and several outputs: no training check"
        )
    rng = np.random.RandomState(seed + 1)
    return x, rng.randn(*out.shape).astype("float32")


def _plan_summary(spec, world_size, seed) -> list:
    """The plan's summary lines (context for the report, not a check)."""
    import keras

    from keras_tensor_parallel.plan import plan_model

    keras.utils.set_random_seed(seed)
    try:
        return plan_model(spec.build(), world_size).summary_lines()
    except Exception:  # noqa: BLE001 - the checks already report errors
        return []


def _tp_size(args) -> int:
    """The model axis of the run (the world size unless set)."""
    return getattr(args, "tensor_parallel_size", None) or args.world_size


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
        "tensor_parallel_size": _tp_size(args),
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
            "sequence_parallel": getattr(args, "sequence_parallel", False),
            "recompute": getattr(args, "recompute", None),
        },
        "tolerance": tolerance,
        "passed": all(r.passed for r in result.rows),
        "checks": [r.to_dict() for r in result.rows],
        "training": result.training,
        "plan_summary": result.plan_summary,
    }
