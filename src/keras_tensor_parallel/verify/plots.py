"""PNG plots for the verify report and `keras-tp train` (matplotlib, Agg).

Each function takes plain numbers (lists, dicts), writes one PNG and
returns its path, so the plots can be redrawn from `report.json` alone.
"""

from __future__ import annotations

import math
import os
import textwrap

MIB = 1024 * 1024
_SINGLE = "#4c72b0"
_TP = "#dd8452"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(
    path: str,
    losses_single,
    losses_tp,
    *,
    world_size: int,
    title: str = "Training loss: single device vs tensor parallel",
    subtitle: str = "",
) -> str:
    """Overlaid loss curves, and below them the per-step |difference|.

    Example:

    ```python
    loss_curves("loss.png", [2.1, 1.9], [2.1, 1.9], world_size=2)
    ```
    """
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(8, 6),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1.4]},
    )
    steps = list(range(1, len(losses_single) + 1))
    top.plot(
        steps, losses_single, "-", color=_SINGLE, lw=2.5, label="single device"
    )
    top.plot(
        steps[: len(losses_tp)],
        losses_tp,
        "--o",
        color=_TP,
        lw=1.5,
        ms=3,
        label=f"tensor parallel ({world_size} devices)",
    )
    top.set_ylabel("loss (cross-entropy, nats/token)")
    top.legend(loc="upper right")
    top.grid(alpha=0.3)
    wrapped = textwrap.fill(subtitle, 90) if subtitle else ""
    top.set_title(title + (f"\n{wrapped}" if wrapped else ""), fontsize=10)
    diffs = [abs(a - b) for a, b in zip(losses_single, losses_tp)]
    shown = [max(d, 1e-12) for d in diffs]
    bottom.semilogy(steps[: len(shown)], shown, "-o", color="#55a868", ms=3)
    bottom.set_ylabel("|single − TP|")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3, which="both")
    if diffs and min(diffs) == 0:
        bottom.text(
            0.01, 0.05, "exact 0 drawn at 1e-12", transform=bottom.transAxes
        )
    fig.tight_layout()
    return _save(fig, path)


def train_curve(
    path: str,
    train_losses,
    val_steps,
    val_losses,
    *,
    title: str,
) -> str:
    """Training loss per step and validation loss where measured."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = list(range(1, len(train_losses) + 1))
    ax.plot(steps, train_losses, "-", color=_SINGLE, label="training (batch)")
    if val_losses:
        ax.plot(
            val_steps,
            val_losses,
            "o-",
            color=_TP,
            label="validation (held out)",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def memory_bars(
    path: str,
    single: dict,
    per_device: dict,
    *,
    title: str = "Memory per device: parameters + optimizer state",
) -> str:
    """Stacked bars (parameters, optimizer state) in MiB: one device alone,
    then each device under tensor parallelism.

    Args:
        single: `{"params": bytes, "optimizer": bytes}` on one device.
        per_device: `{device: {"params": bytes, "optimizer": bytes}}`.
    """
    plt = _pyplot()
    labels = ["single\ndevice"] + [f"TP\n{d}" for d in per_device]
    params = [single.get("params", 0)] + [
        v.get("params", 0) for v in per_device.values()
    ]
    opt = [single.get("optimizer", 0)] + [
        v.get("optimizer", 0) for v in per_device.values()
    ]
    params = [p / MIB for p in params]
    opt = [o / MIB for o in opt]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(labels) + 2), 4.8))
    xs = range(len(labels))
    ax.bar(xs, params, color=_SINGLE, label="parameters")
    ax.bar(xs, opt, bottom=params, color=_TP, label="optimizer state")
    total0 = params[0] + opt[0]
    for x, (p, o) in enumerate(zip(params, opt)):
        frac = (p + o) / total0 if total0 else 0
        ax.text(
            x,
            p + o,
            f"{p + o:.3g} MiB\n({frac:.0%})",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    if len(labels) > 1:
        ideal = total0 / (len(labels) - 1)
        ax.axhline(ideal, color="grey", ls=":", label="single / N (ideal)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_ylim(0, total0 * 1.25 if total0 else 1)
    ax.set_title(title, fontsize=11)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def activation_bars(
    path: str,
    single: int,
    per_device: int,
    *,
    world_size: int,
    estimate: float | None = None,
    formula: str = "",
    variant: str = "TP",
    title: str = "Train-step activation (temp) memory per device",
) -> str:
    """Two bars in MiB: the compiled train step's temp memory on one
    device and on each of `world_size` devices (one SPMD program: every
    device's is the same), with the Megatron estimate (a fraction of one
    device's) as a dashed line."""
    plt = _pyplot()
    values = [single / MIB, per_device / MIB]
    labels = ["single\ndevice", f"{variant}, each of\n{world_size} devices"]
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    ax.bar([0, 1], values, color=[_SINGLE, _TP])
    for x, v in enumerate(values):
        frac = v / values[0] if values[0] else 0
        ax.text(x, v, f"{v:.3g} MiB\n({frac:.0%})", ha="center",
                va="bottom", fontsize=8)  # fmt: skip
    if estimate is not None:
        ax.axhline(
            estimate * values[0],
            color="grey",
            ls=":",
            label=f"Megatron estimate {estimate:.2f} ({formula})",
        )
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks([0, 1])
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_ylim(0, max(values) * 1.3 if max(values) else 1)
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def variant(settings: dict) -> str:
    """`TP`, `TP + SP`, `TP + recompute`, `TP + SP + recompute`."""
    words = ["TP"]
    if settings.get("sequence_parallel"):
        words.append("SP")
    if settings.get("recompute"):
        words.append("recompute")
    return " + ".join(words)


def activation_report_bars(
    path: str, detail: dict, *, model: str, world_size: int
) -> str:
    """`activation_bars` from an activation check's detail."""
    est = detail.get("estimate") or {}
    return activation_bars(
        path,
        detail["single_device_temp_bytes"],
        detail["per_device_temp_bytes"],
        world_size=world_size,
        estimate=est.get("fraction"),
        formula=est.get("formula", ""),
        variant=variant(detail),
        title=f"{model}: train-step temp memory per device",
    )


def grad_diff_hist(
    path: str,
    diffs: dict,
    *,
    threshold: float | None = None,
    title: str = "Per-variable gradient difference, TP vs single device",
) -> str:
    """Histogram of log10(max |g_TP − g_single|) over variables."""
    plt = _pyplot()
    floor = 1e-12
    values = [max(float(d), floor) for d in diffs.values()]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if values:
        logs = [math.log10(v) for v in values]
        lo = min(logs + [math.log10(threshold)] if threshold else logs)
        hi = max(logs + [math.log10(threshold)] if threshold else logs)
        lo, hi = math.floor(lo), math.ceil(hi) + (1 if lo == hi else 0)
        bins = [lo + i * 0.25 for i in range(int((hi - lo) / 0.25) + 1)]
        ax.hist(logs, bins=bins, color=_SINGLE, edgecolor="white")
    if threshold:
        ax.axvline(
            math.log10(threshold),
            color="#c44e52",
            ls="--",
            label=f"threshold {threshold:.0e}",
        )
        ax.legend()
    ax.set_xlabel("log10 of max |gradient difference| per variable")
    ax.set_ylabel("number of variables")
    n_zero = sum(1 for d in diffs.values() if float(d) == 0)
    note = f"{len(values)} variables"
    if n_zero:
        note += f"; {n_zero} exactly equal (drawn at 1e-12)"
    ax.set_title(f"{title}\n{note}", fontsize=11)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
