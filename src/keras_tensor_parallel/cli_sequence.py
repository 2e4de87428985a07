"""`keras-tp comms|verify --sequence-parallel [--recompute attention]`
(issue 16): the flags, and the wrap they ask for. Parsing only until
`wrap` runs."""

from __future__ import annotations

import argparse


def add_flags(p: argparse.ArgumentParser) -> None:
    """Add `--sequence-parallel` and `--recompute` to a subcommand."""
    p.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="split the activations between tensor-parallel regions along "
        "the sequence (Megatron-SP, JAX)",
    )
    p.add_argument(
        "--recompute",
        choices=("attention",),
        default=None,
        help="recompute the attention core in backward (JAX)",
    )


def add_mesh_flags(p: argparse.ArgumentParser) -> None:
    """`-t TP` (cli_mesh) and the flags above (`verify`)."""
    from keras_tensor_parallel import cli_mesh

    cli_mesh.add_tp_size(p)
    add_flags(p)


def tp_options(args: argparse.Namespace) -> dict:
    """`tensor_parallel_size`, `sequence_parallel` and `recompute` as the
    parsed flags give them, for `TensorParallelKeras` or `run_checks`."""
    return {
        "tensor_parallel_size": getattr(args, "tensor_parallel_size", None),
        "sequence_parallel": getattr(args, "sequence_parallel", False),
        "recompute": getattr(args, "recompute", None),
    }


def wrap(model, args: argparse.Namespace):
    """`model` wrapped as the flags ask, or as it is without them (the
    command wraps it as before).

    Example:

    ```python
    model = wrap(spec.build(), args)
    ```
    """
    sp = getattr(args, "sequence_parallel", False)
    recompute = getattr(args, "recompute", None)
    if not (sp or recompute):
        return model
    from keras_tensor_parallel.model import TensorParallelKeras

    return TensorParallelKeras(
        model,
        args.world_size,
        tensor_parallel_size=getattr(args, "tensor_parallel_size", None),
        sequence_parallel=sp,
        recompute=recompute,
    )
