"""`keras-tp`'s `--tensor-parallel-size`: data x tensor parallel on a
`(data=N/T, model=T)` mesh (issue 15). Parsing and checks before anything
heavy is imported or built; `-t auto --device-memory 16GB` then measures
the command's model on its own batch (`autosize`) and sets `T`."""

from __future__ import annotations

import argparse
import contextlib
import sys


def _size(text: str) -> int | str:
    """A positive integer, or `auto`."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer or 'auto'; received {text!r}"
        )
    return n


def add_tp_size(p: argparse.ArgumentParser) -> None:
    """Add `--tensor-parallel-size T` (`-t T`, or `-t auto`) and
    `--device-memory` to a subcommand."""
    p.add_argument(
        "--tensor-parallel-size",
        "-t",
        type=_size,
        default=None,
        metavar="TP",
        help="devices each replica's plan is split over (a divisor of N; "
        "default N): a (data=N/T, model=T) mesh, the batch split over "
        "data; 'auto' with --device-memory: the smallest T at which one "
        "device's train step on this command's batch fits",
    )
    p.add_argument(
        "--device-memory",
        default=None,
        metavar="BYTES",
        help="memory per device for -t auto: bytes or a size such as 16GB, "
        "80GiB",
    )


def check_mesh(args: argparse.Namespace) -> str:
    """Validate `--tensor-parallel-size` against `-n` and `--batch-size`.

    Returns:
        The mesh in words (`" as data 2 x model 2"`), `""` without a data
        axis.

    `-t auto` is replaced by the size `resolve_auto` chooses (it prints
    the table behind the choice).

    Raises:
        ValueError: when T does not divide N, the batch does not divide
            by the replicas, `--device-memory` comes without `-t auto` (or
            `-t auto` without it, or with `--generate`), or no size fits.

    Example:

    ```python
    check_mesh(argparse.Namespace(world_size=4, tensor_parallel_size=2,
                                  batch_size=4))  # ' as data 2 x model 2'
    ```
    """
    _check_auto(args)
    if getattr(args, "tensor_parallel_size", None) == "auto":
        args.tensor_parallel_size = resolve_auto(args)
    t = args.tensor_parallel_size
    n = args.world_size
    if t is None or t == n:
        return ""
    if n % t:
        raise ValueError(
            f"--tensor-parallel-size must divide --world-size ({n}). "
            f"Received: --tensor-parallel-size {t}"
        )
    data = n // t
    if args.batch_size % data:
        raise ValueError(
            f"--batch-size must be a multiple of the data-parallel size "
            f"{data} (--world-size {n} / --tensor-parallel-size {t}). "
            f"Received: --batch-size {args.batch_size}"
        )
    return f" as data {data} x model {t}"


def _check_auto(args: argparse.Namespace) -> None:
    """`-t auto` and `--device-memory` come together; checked before
    anything is built."""
    t = getattr(args, "tensor_parallel_size", None)
    memory = getattr(args, "device_memory", None)
    if memory is not None and t != "auto":
        raise ValueError(
            "--device-memory is read only with --tensor-parallel-size auto. "
            f"Received: --device-memory {memory} with --tensor-parallel-size "
            f"{t}"
        )
    if t != "auto":
        return
    if memory is None:
        raise ValueError(
            "--tensor-parallel-size auto needs --device-memory (bytes per "
            "device, or a size such as 16GB). Received: -t auto without "
            "--device-memory"
        )
    if getattr(args, "generate", False):
        raise ValueError(
            "-t auto measures the train step; comms --generate takes a "
            "fixed --tensor-parallel-size. Received: --generate with -t auto"
        )
    from keras_tensor_parallel import autosize

    try:
        autosize.parse_memory(memory)
    except ValueError as e:
        msg = str(e).replace("device_memory=", "--device-memory ")
        raise ValueError(
            msg.replace("device_memory", "--device-memory")
        ) from None


def resolve_auto(args: argparse.Namespace) -> int:
    """The size `-t auto` chooses for the command's model on its batch
    (`--batch-size` x `--seq-len`; train: its LM's token windows), among
    the divisors T of N whose replicas the batch divides over. Prints the
    table behind the choice on stderr.

    Raises:
        ValueError: when no size fits `--device-memory`.
    """
    import keras
    import numpy as np

    from keras_tensor_parallel import autosize, catalogue, devices

    n, b = args.world_size, args.batch_size
    sizes = [t for t in autosize.divisors(n) if b % (n // t) == 0]
    spec = catalogue.resolve(args.model)
    keras.utils.set_random_seed(args.seed)
    if hasattr(args, "model_size"):  # train: the LM it trains
        lm = catalogue.sized(spec, size=args.model_size)
        model = catalogue.lm_builder(lm)()
        x = catalogue.lm_inputs(np.ones((b, args.seq_len), "int32"))
        batch = x, np.zeros((b, args.seq_len), "int32")
    else:
        model = spec.build()
        batch = _example_batch(model, b, args.seq_len)
    backend = devices.validate_backend("auto")
    ids = devices.resolve_devices(world_size=n, backend=backend)
    # The table goes to stderr: `--format json` output stays JSON.
    with contextlib.redirect_stdout(sys.stderr):
        return devices.tensor_parallel_size(
            "auto",
            ids,
            backend,
            model=model,
            device_memory=args.device_memory,
            batch=batch,
            sizes=sizes,
        )


def _example_batch(model, rows: int, seq_len: int):
    from keras_tensor_parallel.comms import steps

    return (
        steps.example_inputs(model, batch_size=rows, seq_len=seq_len),
        steps.example_targets(model, batch_size=rows, seq_len=seq_len),
    )
