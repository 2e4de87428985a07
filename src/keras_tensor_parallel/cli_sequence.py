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
