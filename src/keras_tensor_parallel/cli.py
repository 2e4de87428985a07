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

from keras_tensor_parallel import cli_mesh, cli_sequence

EXIT_FAIL = 1
EXIT_USAGE = 2
_FLAG = "--xla_force_host_platform_device_count"


# Environment: set before anything imports keras -----------------------------


def _prepare_env(world_size: int | None) -> None:
    """The Keras backend (jax unless set), quiet TensorFlow C++ logs, and
    enough simulated CPU devices for `world_size`. Read by keras and jax
    when they are first imported, which the package import does not do."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    flags = os.environ.get("XLA_FLAGS", "")
    match = re.search(_FLAG + r"=(\d+)", flags)
    have = int(match.group(1)) if match else 1
    if world_size and world_size > have:
        flags = re.sub(_FLAG + r"=\d+", "", flags).strip()
        os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={world_size}".strip()


def _quiet_imports() -> None:
    """Import KerasHub (and the TensorFlow under it) with file descriptor 2
    on /dev/null: TensorFlow's C++ start-up lines (oneDNN, CUDA, CPU
    features) are written before its logging reads any setting, so no
    environment variable hides them. Errors still raise, after fd 2 is
    back."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras_hub  # noqa: F401
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


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
        epilog="MODEL: a built-in name (see `keras-tp models`; NAME:tiny "
        "for its tiny config), a local KerasHub preset directory, or a "
        ".keras file.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks on errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sub.add_parser("models", help="list the built-in models")
    _add_plan(sub.add_parser("plan", help="show the sharding plan of a model"))
    _add_verify(
        sub.add_parser(
            "verify", help="fidelity checks of TP against one device"
        )
    )
    _add_train(
        sub.add_parser("train", help="train a causal LM with TP on text")
    )
    _add_comms(sub.add_parser("comms", help="collectives of one training step"))
    # Parsed by keras_tensor_parallel.launch itself (see `main`); listed
    # here for --help.
    sub.add_parser(
        "launch",
        help="run a script on N processes (any KERAS_BACKEND): "
        "launch -n N [--timeout S] script.py [args]",
        add_help=False,
    )
    e = sub.add_parser(
        "export", help="write a sharded checkpoint as one .keras file"
    )
    e.add_argument("checkpoint", metavar="CHECKPOINT")
    e.add_argument("out", metavar="OUT", help="the .keras file to write")
    return parser


def _add_plan(p) -> None:
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


def _add_verify(v) -> None:
    _common(v)
    cli_sequence.add_mesh_flags(v)
    v.add_argument("--steps", type=_positive, default=8, help="train steps")
    v.add_argument("--batch-size", type=_positive, default=2)
    v.add_argument("--seq-len", type=_positive, default=32)
    v.add_argument("--out", default=None, help="report dir (reports/MODEL)")
    v.add_argument(
        "--train-model",
        choices=("auto", "full", "tiny"),
        default="auto",
        help="model for the training check: the one under test (full), "
        "the tiny config of its family (tiny), or tiny when the model has "
        "over 30M parameters (auto)",
    )
    v.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="replace every check's threshold by this bound (testing; "
        "--tolerance 0 fails any check that is not exact)",
    )


def _add_train(t) -> None:
    _common(t)
    cli_mesh.add_tp_size(t)
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
        "--model-size",
        choices=("auto", "full", "tiny"),
        default="auto",
        help="the model itself (full), its tiny config (tiny), or tiny "
        "when it has over 30M parameters (auto)",
    )


def _add_comms(c) -> None:
    _common(c)
    cli_mesh.add_tp_size(c)
    cli_sequence.add_flags(c)
    c.add_argument("--batch-size", type=_positive, default=2)
    c.add_argument("--seq-len", type=_positive, default=32)
    c.add_argument("--format", choices=("table", "json"), default="table")
    c.add_argument(
        "--generate",
        action="store_true",
        help="the decode step of tp.generate instead (a causal LM): "
        "collectives per generated token against the minimum, and the kv "
        "cache per device; --seq-len is prompt + generated tokens",
    )
    c.add_argument(
        "--prompt-len", type=_positive, default=8, help="with --generate"
    )
    c.add_argument(
        "--sampler", choices=("greedy", "top_k"), default="greedy",
        help="with --generate")  # fmt: skip


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
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = [a for a in argv if a != "--debug"]
    if rest[:1] == ["launch"]:
        # Everything after `launch` is the launcher's (its -n, the script
        # and the script's own flags), untouched.
        return _run_launch(argv[argv.index("launch") + 1 :])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    _prepare_env(getattr(args, "world_size", None))
    try:
        if args.command != "models":
            _quiet_imports()
        return COMMANDS[args.command](args)
    except (ValueError, ImportError, FileNotFoundError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"keras-tp {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


def _run_models(args) -> int:
    from keras_tensor_parallel.catalogue import CATALOGUE

    width = max(len(n) for n in CATALOGUE)
    for name, spec in CATALOGUE.items():
        print(f"{name.ljust(width)}  {spec.description}")
    print("\nNAME:tiny is the same architecture in a tiny config (tests).")
    return 0


def _run_plan(args) -> int:
    import keras

    from keras_tensor_parallel import catalogue, plan_model

    overrides = dict(args.override) or None
    if os.path.isdir(args.model):  # a preset: planned unallocated (issue 11)
        plan = plan_model(args.model, args.world_size, overrides=overrides)
        title = f"{args.model}: preset, planned without allocating weights"
    else:
        spec = catalogue.resolve(args.model)
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

    from keras_tensor_parallel import catalogue
    from keras_tensor_parallel.verify import report as report_lib
    from keras_tensor_parallel.verify import runner
    from keras_tensor_parallel.verify.pairs import require_jax

    require_jax("keras-tp verify")
    spec = catalogue.resolve(args.model)
    ids = _check_devices(args.world_size)
    mesh = cli_mesh.check_mesh(args)
    out = args.out or os.path.join("reports", _slug(spec.name))
    console = Console(stderr=False, highlight=False)
    console.print(
        f"[bold]keras-tp verify[/] {spec.name} on {args.world_size} "
        f"devices ({', '.join(ids)}){mesh} vs one device"
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
        **cli_sequence.tp_options(args),
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
    skipped = sum(r.skipped for r in rows)
    console.print(
        ("[green]all checks passed[/]" if ok else
         f"[red]{sum(not r.passed for r in rows)} check(s) failed[/]")
        + (f" ({skipped} with nothing to check: n/a)" if skipped else "")
    )  # fmt: skip
    return 0 if ok else EXIT_FAIL


def _run_train(args) -> int:
    from keras_tensor_parallel import catalogue
    from keras_tensor_parallel.training import TrainConfig, train_lm

    spec = catalogue.resolve(args.model)
    ids = _check_devices(args.world_size)
    mesh = cli_mesh.check_mesh(args)
    config = TrainConfig(
        steps=args.steps,
        out_dir=args.out or os.path.join("runs", _slug(spec.name)),
        data_path=args.data,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        learning_rate=args.learning_rate,
        val_every=args.val_every,
        size=args.model_size,
        seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    summary = train_lm(spec, args.world_size, config)
    print(
        f"trained {spec.name} on {len(ids)} devices{mesh}: {summary['model']}"
    )
    print(
        f"final training loss {summary['final_loss']:.4f}, validation loss "
        f"{summary['final_val_loss']:.4f} (nats/byte)"
    )
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"loss curve: {summary['plot']}")
    return 0


def _run_comms(args) -> int:
    import keras

    from keras_tensor_parallel import catalogue
    from keras_tensor_parallel.comms import analyze
    from keras_tensor_parallel.verify.pairs import require_jax

    require_jax("keras-tp comms")
    spec = catalogue.resolve(args.model)
    _check_devices(args.world_size)
    cli_mesh.check_mesh(args)
    keras.utils.set_random_seed(args.seed)
    model = cli_sequence.wrap(spec.build(), args)
    if args.generate:
        from keras_tensor_parallel.comms.decode import analyze_model

        result = analyze_model(
            model,
            args.world_size,
            batch_size=args.batch_size,
            max_length=args.seq_len,
            prompt_length=args.prompt_len,
            sampler=args.sampler,
            tensor_parallel_size=args.tensor_parallel_size,
        )
    else:
        result = analyze(
            model,
            args.world_size,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            tensor_parallel_size=args.tensor_parallel_size,
        )
    if args.format == "json":
        import json

        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())
    return 0


def _run_launch(rest: list[str]) -> int:
    from keras_tensor_parallel import launch

    return int(launch.main(rest) or 0)


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
