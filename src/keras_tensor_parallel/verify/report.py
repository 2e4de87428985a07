"""The verify report: check rows, a summary table, report.md/json + plots.

Everything here works on plain data (the check results reduced to numbers
and dicts), so `report.json` alone is enough to redraw the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from keras_tensor_parallel.verify import plots


@dataclasses.dataclass
class CheckRow:
    """One check's outcome, as reported.

    Attributes:
        name: Check name (`forward`, `gradients`, ...).
        passed: Whether `value` met `threshold`.
        value: The measured figure.
        threshold: The bound it is held to (pass when `value <= threshold`).
        metric: What `value` measures, in words.
        seconds: Wall-clock time of the check.
        detail: Extra data (per-variable diffs, bytes per device...).
        note: A line for the report (e.g. the model actually used).
        error: Set when the check could not run.
        skipped: Nothing to check (e.g. nothing split at this world size):
            shown as "n/a", counts as passed.
    """

    name: str
    passed: bool
    value: float | None
    threshold: float | None
    metric: str = ""
    seconds: float = 0.0
    detail: dict = dataclasses.field(default_factory=dict)
    note: str = ""
    error: str = ""
    skipped: bool = False

    @property
    def info(self) -> bool:
        """A measured figure with no threshold: shown, never failed."""
        return self.threshold is None and self.value is not None

    @property
    def status(self) -> str:
        """`PASS`, `FAIL`, `ERROR` (could not run), `n/a`, or `info` (a
        figure shown without a threshold, e.g. activation memory)."""
        if self.skipped:
            return "n/a"
        if self.info:
            return "info"
        if self.passed:
            return "PASS"
        return "ERROR" if self.error else "FAIL"

    def to_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


def row_from_result(
    result, *, seconds: float, metric: str = "", tolerance=None, note=""
) -> CheckRow:
    """A `CheckRow` from a check result (`.name .passed .value .threshold
    .detail`). With `tolerance`, the threshold is replaced by it and the
    pass/fail re-judged as `value <= tolerance` (`--tolerance` in the CLI).
    """
    value = _float(getattr(result, "value", None))
    threshold = _float(getattr(result, "threshold", None))
    passed = bool(getattr(result, "passed", False))
    skipped = bool(getattr(result, "skipped", False))
    detail = dict(getattr(result, "detail", {}) or {})
    if skipped:
        return CheckRow(
            name=str(getattr(result, "name", "check")),
            passed=True,
            value=None,
            threshold=None,
            metric=metric,
            seconds=round(seconds, 2),
            detail=detail,
            note=str(detail.get("reason", "nothing to check")),
            skipped=True,
        )
    if tolerance is not None and value is not None and threshold is not None:
        threshold = float(tolerance)
        passed = value <= threshold
    return CheckRow(
        name=str(getattr(result, "name", "check")),
        passed=passed,
        value=value,
        threshold=threshold,
        metric=metric,
        seconds=round(seconds, 2),
        detail=detail,
        note=note,
    )


def failed_row(name: str, error: str, *, seconds: float = 0.0) -> CheckRow:
    """A row for a check that raised or could not be run."""
    return CheckRow(
        name, False, None, None, seconds=round(seconds, 2), error=error
    )


def fmt(x) -> str:
    """A number for tables: scientific when small or large."""
    if x is None:
        return "-"
    x = float(x)
    if x == 0:
        return "0"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if 1e-2 <= abs(x) < 1e4:
        return f"{x:.4f}"
    return f"{x:.2e}"


def summary_rows(rows: list[CheckRow]) -> list[tuple[str, ...]]:
    """(check, status, measured, threshold, metric, seconds) per row."""
    out = []
    for r in rows:
        out.append(
            (
                r.name,
                r.status,
                fmt(r.value),
                ("<= " + fmt(r.threshold)) if r.threshold is not None else "-",
                r.error or (r.note if r.skipped else r.metric),
                f"{r.seconds:.1f}",
            )
        )
    return out


SUMMARY_HEADER = ("check", "result", "measured", "threshold", "what", "s")
STATUS_COLORS = {
    "PASS": "green",
    "FAIL": "red",
    "ERROR": "red",
    "n/a": "dim",
    "info": "cyan",
}


def rich_table(rows: list[CheckRow], *, title: str = ""):
    """The summary as a `rich.table.Table`."""
    from rich.table import Table

    table = Table(title=title or None)
    for h in ("check", "result", "measured", "threshold", "s", "note"):
        table.add_column(
            h, justify="right" if h in ("measured", "s") else "left"
        )
    for r, cells in zip(rows, summary_rows(rows)):
        color = STATUS_COLORS[cells[1]]
        table.add_row(
            cells[0],
            f"[{color}]{cells[1]}[/]",
            *cells[2:4],
            cells[5],
            r.error or (r.note if r.skipped or r.info else ""),
        )
    return table


def markdown_table(header, rows) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for r in rows:
        cells = [str(c).replace("|", "\\|") for c in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out_dir: str, report: dict) -> dict:
    """Write report.json, the PNG plots and report.md under `out_dir`.

    Args:
        report: `{"model", "world_size", "checks": [CheckRow dicts],
            "training": {...} or None, "plan_summary": [...], ...}`.

    Returns:
        `{name: path}` of the files written.
    """
    os.makedirs(out_dir, exist_ok=True)
    files = draw_plots(out_dir, report)
    report = dict(
        report, plots={k: os.path.basename(v) for k, v in files.items()}
    )
    json_path = os.path.join(out_dir, "report.json")
    with open(json_path, "w") as f:
        json.dump(_jsonable(report), f, indent=2)
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as f:
        f.write(render_markdown(report))
    return {"report.md": md_path, "report.json": json_path, **files}


def _check(report: dict, name: str) -> dict | None:
    for c in report.get("checks", []):
        if c["name"] == name and not c.get("error"):
            return c
    return None


def draw_plots(out_dir: str, report: dict) -> dict:
    """The PNGs the report's data allows; `{name: path}`."""
    files = {}
    n = report["world_size"]
    training = report.get("training")
    if training and training.get("losses_single"):
        files["loss_curves"] = plots.loss_curves(
            os.path.join(out_dir, "loss_curves.png"),
            training["losses_single"],
            training["losses_tp"],
            world_size=n,
            subtitle=training.get("model", ""),
        )
    memory = _check(report, "memory")
    if memory:
        single, per_device = memory_breakdown(memory["detail"])
        if per_device:
            files["memory"] = plots.memory_bars(
                os.path.join(out_dir, "memory.png"),
                single,
                per_device,
                title=f"{report['model']}: bytes per device, world size {n}",
            )
    acts = _check(report, "activations")
    if acts and "per_device_temp_bytes" in acts.get("detail", {}):
        files["activations"] = plots.activation_report_bars(
            os.path.join(out_dir, "activations.png"),
            acts["detail"],
            model=report["model"],
            world_size=n,
        )
    grads = _check(report, "gradients")
    if grads:
        diffs = grad_diffs(grads["detail"])
        if diffs:
            files["grad_diffs"] = plots.grad_diff_hist(
                os.path.join(out_dir, "grad_diffs.png"),
                diffs,
                threshold=grads.get("threshold"),
            )
    return files


def grad_diffs(detail: dict) -> dict:
    """`{variable: max abs diff}` from a gradient check's detail."""
    for key in ("per_variable", "max_abs_diffs", "diffs", "per_variable_max"):
        value = detail.get(key)
        if isinstance(value, dict) and value:
            return {k: float(v) for k, v in value.items()}
    return {}


def memory_breakdown(detail: dict) -> tuple[dict, dict]:
    """`(single, per_device)` as `{"params", "optimizer"}` bytes dicts."""
    single = detail.get("single") or detail.get("single_device") or {}
    if not isinstance(single, dict):
        single = {"params": single, "optimizer": 0}
    per_device = detail.get("per_device") or {}
    if isinstance(per_device, list):
        per_device = {f"device {i}": v for i, v in enumerate(per_device)}
    if not per_device and "per_device_params_bytes" in detail:
        params = detail["per_device_params_bytes"]
        opt = detail.get("per_device_optimizer_bytes", {})
        per_device = {
            d: {"params": params[d], "optimizer": opt.get(d, 0)} for d in params
        }
        single = {
            "params": detail.get("single_device_params_bytes", 0),
            "optimizer": detail.get("single_device_optimizer_bytes", 0),
        }
    return single, per_device


def render_markdown(report: dict) -> str:
    """The report as Markdown (the PNGs linked by relative path)."""
    checks = [CheckRow(**c) for c in report["checks"]]
    lines = _markdown_head(report, checks)
    for c in checks:
        if c.note:
            lines.append(f"- **{c.name}**: {c.note}")
    lines.append("")
    lines += _markdown_plots(report)
    if report.get("plan_summary"):
        lines += ["## Sharding plan", "", "```"]
        lines += report["plan_summary"]
        tp_size = report.get("tensor_parallel_size") or report["world_size"]
        lines += ["```", "", "Full plan: `keras-tp plan "
                  f"{report['model']} --world-size {tp_size}`.",
                  ""]  # fmt: skip
    return "\n".join(lines)


def _mesh_words(report: dict) -> str:
    """` (data D x model T)` when part of the world is data parallel."""
    n, t = report["world_size"], report.get("tensor_parallel_size") or 0
    return f" (data {n // t} x model {t})" if t and t != n else ""


def _markdown_head(report: dict, checks: list[CheckRow]) -> list[str]:
    ok = all(c.passed for c in checks)
    skipped = sum(c.skipped for c in checks)
    info = sum(c.info for c in checks)
    passed = sum(c.passed and not c.skipped and not c.info for c in checks)
    counted = f"{passed}/{len(checks) - skipped - info} checks passed"
    if skipped:
        counted += f", {skipped} with nothing to check (n/a)"
    if info:
        counted += f", {info} measured without a threshold (info)"
    lines = [
        f"# keras-tp verify: {report['model']}, world size "
        f"{report['world_size']}{_mesh_words(report)}",
        "",
        f"**Result: {'all checks passed' if ok else 'FAILED'}** ({counted}).",
        "",
        f"- model: {report.get('description', report['model'])}",
        f"- backend: {report.get('backend', 'jax')} on "
        f"{report.get('devices', '?')}",
        "- reference: the same model on one device, same initial weights",
        f"- run: {report.get('started', '')}, "
        f"{report.get('duration_s', 0):.0f} s in all",
    ]
    variant = plots.variant(report.get("settings") or {})
    if variant != "TP":
        lines.append(f"- tensor parallelism: {variant} (sequence parallel, "
                     "attention recomputation as asked)")  # fmt: skip
    if report.get("tolerance") is not None:
        lines.append(
            f"- **every threshold was replaced by --tolerance "
            f"{report['tolerance']}**"
        )
    return lines + [
        "",
        "## Checks",
        "",
        markdown_table(SUMMARY_HEADER, summary_rows(checks)),
        "",
        "A check passes when the measured figure is at or below its threshold.",
        "",
    ]


_PLOT_SECTIONS = (
    ("memory", "Memory per device", "memory per device",
     "Parameters and optimizer state actually held by each device "
     "(from the shards), against the whole model on one device."),
    ("activations", "Activation memory per device", "activation memory",
     "Temp memory of the compiled train step (XLA's memory analysis: "
     "activations kept for backward, gradients, workspace) on one device "
     "and on each device under tensor parallelism, for the training "
     "check's model and one batch; the dotted line is the Megatron "
     "estimate of the activations (Korthikanti et al. 2022)."),
    ("grad_diffs", "Gradient differences", "gradient differences",
     "Largest absolute difference between the TP gradient and the "
     "single-device gradient, one count per variable."),
)  # fmt: skip


def _markdown_plots(report: dict) -> list[str]:
    plots_ = report.get("plots", {})
    lines = []
    if "loss_curves" in plots_:
        lines += [
            "## Training on real text",
            "",
            _training_text(report.get("training") or {}),
            "",
            f"![loss curves]({plots_['loss_curves']})",
            "",
        ]
    for key, title, alt, text in _PLOT_SECTIONS:
        if key in plots_:
            lines += [f"## {title}", "", text, "", f"![{alt}]({plots_[key]})"]
            lines.append("")
    return lines


def _training_text(training: dict) -> str:
    parts = [
        f"{training.get('steps', '?')} optimizer steps of a causal LM on "
        f"{training.get('data', 'text')}, batch {training.get('batch_size')}"
        f" × {training.get('seq_len')} tokens, same batches and initial "
        "weights on both sides."
    ]
    if training.get("model"):
        parts.append(f"Model: {training['model']}.")
    return " ".join(parts)


def _float(x):
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _jsonable(x):
    """Numbers, strings, lists and dicts only (numpy scalars converted)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, bool, int)) or x is None:
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)
