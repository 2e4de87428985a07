"""`keras-tp`: plan, verify and train tensor-parallel Keras models.

Thin: parses arguments, calls the library, renders. Exit status 0 on
success, 1 when a verify check fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

EXIT_FAIL = 1
EXIT_USAGE = 2
_FLAG = "--xla_force_host_platform_device_count"


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit status 2."""


# Environment: simulated devices and the Keras backend ------------------------


def _wanted_env(world_size: int | None) -> dict:
    """The environment the command needs (backend, simulated devices)."""
    env = {"KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "jax")}
    env["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")
    flags = os.environ.get("XLA_FLAGS", "")
    match = re.search(_FLAG + r"=(\d+)", flags)
    have = int(match.group(1)) if match else 1
    if world_size and world_size > have:
        flags = re.sub(_FLAG + r"=\d+", "", flags).strip()
        flags = f"{flags} {_FLAG}={world_size}".strip()
    env["XLA_FLAGS"] = flags
    return env


def _jax_started() -> bool:
    """Whether jax has created its devices (XLA_FLAGS is read then)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    except Exception:  # noqa: BLE001 - private API: assume started
        return True


def _prepare_env(world_size, argv, *, reexec: bool) -> None:
    """Set the backend and device count; re-run the command when the
    package import already fixed them otherwise."""
    env = _wanted_env(world_size)
    stale = False
    if "keras" in sys.modules:
        import keras

        stale = keras.backend.backend() != env["KERAS_BACKEND"]
    if os.environ.get("XLA_FLAGS", "") != env["XLA_FLAGS"] and _jax_started():
        stale = True
    if stale and reexec and not os.environ.get("KERAS_TP_REEXEC"):
        new_env = dict(os.environ, **env, KERAS_TP_REEXEC="1")
        cmd = [sys.executable, "-m", "keras_tensor_parallel.cli", *argv]
        sys.stdout.flush()
        os.execve(sys.executable, cmd, new_env)
    os.environ.update(env)


# Argument parsing ---------------------------------------------------------


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer; received {text!r}"
        )
    return n


def _override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(
            f"expected REGEX=ROLE (e.g. '.*dense.*kernel=replicated'); "
            f"received {text!r}"
        )
    regex, value = text.rsplit("=", 1)
    return regex, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-tp",
        description="Automatic Megatron-style tensor parallelism for Keras 3.",
        epilog="MODEL: a built-in name (see `keras-tp models`), a local "
        "KerasHub preset directory, or a .keras file.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks on errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sub.add_parser("models", help="list the built-in models")

    p = sub.add_parser("plan", help="show the sharding plan of a model")
    _common(p)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument(
        "--override",
        action="append",
        type=_override,
        default=[],
        metavar="REGEX=ROLE",
        help="force variables matching REGEX to a role (replicated, "
        "column, row, vocab); repeatable",
    )

    v = sub.add_parser(
        "verify", help="fidelity checks of TP against one device"
    )
    _common(v)
    v.add_argument("--steps", type=_positive, default=8, help="train steps")
    v.add_argument("--batch-size", type=_positive, default=2)
    v.add_argument("--seq-len", type=_positive, default=32)
    v.add_argument("--out", default=None, help="report dir (reports/MODEL)")
    v.add_argument(
        "--train-model",
        choices=("auto", "full", "small"),
        default="auto",
        help="model for the training check: the one under test (full), a "
        "small config of its family (small), or small when the model has "
        "over 30M parameters (auto)",
    )
    v.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="replace every check's threshold by this bound (testing; "
        "--tolerance 0 fails any check that is not exact)",
    )

    t = sub.add_parser("train", help="train a causal LM with TP on text")
    _common(t)
    t.add_argument("--steps", type=_positive, required=True)
    t.add_argument(
        "--data",
        default=None,
        help="text file or directory (default: the Python stdlib sources)",
    )
    t.add_argument("--batch-size", type=_positive, default=4)
    t.add_argument("--seq-len", type=_positive, default=64)
    t.add_argument("--learning-rate", type=float, default=1e-3)
    t.add_argument(
        "--val-every", type=_positive, default=None, help="steps between "
        "validations (default: steps/5)"
    )  # fmt: skip
    t.add_argument("--out", default=None, help="output dir (runs/MODEL)")
    t.add_argument(
        "--model-size", choices=("auto", "full", "small"), default="auto"
    )

    c = sub.add_parser("comms", help="collectives of one training step")
    _common(c)
    c.add_argument("--batch-size", type=_positive, default=2)
    c.add_argument("--seq-len", type=_positive, default=32)
    c.add_argument("--format", choices=("table", "json"), default="table")

    launch = sub.add_parser(
        "launch", help="run a script on N processes (torch backend)"
    )
    launch.add_argument("args", nargs=argparse.REMAINDER)
    e = sub.add_parser(
        "export", help="write a sharded checkpoint as one .keras file"
    )
    e.add_argument("checkpoint", metavar="CHECKPOINT")
    e.add_argument("out", metavar="OUT", help="the .keras file to write")
    return parser


def _common(p) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument(
        "--world-size", "-n", type=_positive, required=True, metavar="N"
    )
    p.add_argument("--seed", type=int, default=0)


# Entry point ---------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run `keras-tp`; returns the exit status.

    Example:

    ```python
    from keras_tensor_parallel import cli
    status = cli.main(["plan", "seed-mlp", "--world-size", "2"])
    ```
    """
    console_run = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.command == "launch":
        return _run_launch(args.args)
    _prepare_env(getattr(args, "world_size", None), argv, reexec=console_run)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, ImportError, FileNotFoundError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"keras-tp {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


def _run_models(args) -> int:
    from keras_tensor_parallel import zoo

    width = max(len(n) for n in zoo.ZOO)
    for name, entry in zoo.ZOO.items():
        print(f"{name.ljust(width)}  {entry.description}")
    return 0


def _run_plan(args) -> int:
    import keras

    from keras_tensor_parallel import models
    from keras_tensor_parallel.plan import plan_model

    overrides = dict(args.override) or None
    if os.path.isdir(args.model):  # a preset: planned unallocated (issue 11)
        plan = plan_model(args.model, args.world_size, overrides=overrides)
        title = f"{args.model}: preset, planned without allocating weights"
    else:
        spec = models.resolve(args.model)
        keras.utils.set_random_seed(args.seed)
        plan = plan_model(spec.build(), args.world_size, overrides=overrides)
        title = f"{spec.name}: {spec.description}"
    if args.format == "json":
        print(plan.to_json())
    else:
        print(title)
        print(plan.table())
    return 0


def _run_export(args) -> int:
    from keras_tensor_parallel import checkpoint

    source = checkpoint.export(args.checkpoint, args.out)
    print(f"wrote {args.out} from {source}")
    return 0


def _check_devices(world_size: int) -> list[str]:
    from keras_tensor_parallel import devices

    return devices.resolve_devices(world_size=world_size)


def _run_verify(args) -> int:
    from rich.console import Console

    from keras_tensor_parallel import models
    from keras_tensor_parallel.verify import report as report_lib
    from keras_tensor_parallel.verify import runner

    spec = models.resolve(args.model)
    ids = _check_devices(args.world_size)
    out = args.out or os.path.join("reports", _slug(spec.name))
    console = Console(stderr=False, highlight=False)
    console.print(
        f"[bold]keras-tp verify[/] {spec.name} on {args.world_size} "
        f"devices ({', '.join(ids)}) vs one device"
    )
    started = time.time()
    result = runner.run_checks(
        spec,
        args.world_size,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        train_model=args.train_model,
        tolerance=args.tolerance,
        progress=runner.ConsoleProgress(console),
    )
    report = runner.report_dict(
        spec, args, ids, result, started=started, tolerance=args.tolerance
    )
    files = report_lib.write_report(out, report)
    rows = result.rows
    console.print(report_lib.rich_table(rows, title="summary"))
    console.print(f"report: {files['report.md']}")
    for path in files.values():
        if path.endswith(".png"):
            console.print(f"plot:   {path}")
    ok = all(r.passed for r in rows)
    console.print(
        "[green]all checks passed[/]"
        if ok
        else f"[red]{sum(not r.passed for r in rows)} check(s) failed[/]"
    )
    return 0 if ok else EXIT_FAIL


def _run_train(args) -> int:
    from keras_tensor_parallel import models

    spec = models.resolve(args.model)
    ids = _check_devices(args.world_size)
    out = args.out or os.path.join("runs", _slug(spec.name))
    summary = models.train_lm(
        spec,
        args.world_size,
        steps=args.steps,
        data_path=args.data,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        learning_rate=args.learning_rate,
        val_every=args.val_every,
        out_dir=out,
        model_size=args.model_size,
        seed=args.seed,
    )
    print(f"trained {spec.name} on {len(ids)} devices: {summary['model']}")
    print(
        f"final training loss {summary['final_loss']:.4f}, validation loss "
        f"{summary['final_val_loss']:.4f} (nats/byte)"
    )
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"loss curve: {summary['plot']}")
    return 0


def _run_comms(args) -> int:
    import keras

    from keras_tensor_parallel import models

    try:
        from keras_tensor_parallel.comms import analyze
    except ImportError as e:
        raise ImportError(
            "keras_tensor_parallel.comms.analyze is not available in this "
            "install yet; use `keras-tp plan` for the sharding plan"
        ) from e
    spec = models.resolve(args.model)
    _check_devices(args.world_size)
    keras.utils.set_random_seed(args.seed)
    model = spec.build()
    result = analyze(
        model,
        args.world_size,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    if args.format == "json":
        import json

        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())
    return 0


def _run_launch(rest: list[str]) -> int:
    try:
        from keras_tensor_parallel.launch import main as launch_main
    except ImportError:
        print(
            "keras-tp launch: error: keras_tensor_parallel.launch is not "
            "available in this install yet",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return int(launch_main(rest) or 0)


def _slug(name: str) -> str:
    base = os.path.basename(os.path.normpath(name))
    base = re.sub(r"\.keras$", "", base)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base) or "model"


COMMANDS = {
    "models": _run_models,
    "plan": _run_plan,
    "export": _run_export,
    "verify": _run_verify,
    "train": _run_train,
    "comms": _run_comms,
}


if __name__ == "__main__":
    sys.exit(main())
