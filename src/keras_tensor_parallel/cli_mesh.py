"""`keras-tp`'s `--tensor-parallel-size`: data x tensor parallel on a
`(data=N/T, model=T)` mesh (issue 15). Parsing and checks only, before
anything heavy is imported or built."""

from __future__ import annotations

import argparse


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


def add_tp_size(p: argparse.ArgumentParser) -> None:
    """Add `--tensor-parallel-size T` (`-t T`) to a subcommand."""
    p.add_argument(
        "--tensor-parallel-size",
        "-t",
        type=_positive,
        default=None,
        metavar="TP",
        help="devices each replica's plan is split over (a divisor of N; "
        "default N): a (data=N/T, model=T) mesh, the batch split over data",
    )


def check_mesh(args: argparse.Namespace) -> str:
    """Validate `--tensor-parallel-size` against `-n` and `--batch-size`.

    Returns:
        The mesh in words (`" as data 2 x model 2"`), `""` without a data
        axis.

    Raises:
        ValueError: when T does not divide N, the batch does not divide
            by the replicas, or the command cannot run data parallel.

    Example:

    ```python
    check_mesh(argparse.Namespace(world_size=4, tensor_parallel_size=2,
                                  batch_size=4))  # ' as data 2 x model 2'
    ```
    """
    t = getattr(args, "tensor_parallel_size", None)
    n = args.world_size
    if t is None or t == n:
        return ""
    if n % t:
        raise ValueError(
            f"--tensor-parallel-size must divide --world-size ({n}). "
            f"Received: --tensor-parallel-size {t}"
        )
    if getattr(args, "generate", False):
        raise ValueError(
            "comms --generate measures one replica's decode step: leave "
            f"out --tensor-parallel-size. Received: --tensor-parallel-size "
            f"{t} with --world-size {n}"
        )
    data = n // t
    if args.batch_size % data:
        raise ValueError(
            f"--batch-size must be a multiple of the data-parallel size "
            f"{data} (--world-size {n} / --tensor-parallel-size {t}). "
            f"Received: --batch-size {args.batch_size}"
        )
    return f" as data {data} x model {t}"
