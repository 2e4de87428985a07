"""How a split dim travels through one op.

Each propagator takes a traced `OpNode` and, per input tensor, the dim that
is split over the model axis (or None), and returns the split dim of each
output. An op that would need the split dim gathered (a norm over it, a
contraction without a row-parallel kernel, an op we know nothing about)
raises `Conflict` with the reason; the planner then replicates the layers it
was trying to split and reports that reason.

Registered by op class name, so ops from any package (keras, keras-hub) are
matched the same way. This module holds the registry and the helpers; the
rules themselves live in `value_ops.py` and `shape_ops.py`, which the
planner imports (importing them registers them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Dims = list  # list[int | None]


class Conflict(Exception):
    """The split cannot pass through this op."""


_PROPAGATORS: dict[str, Callable] = {}


def propagator(*names: str):
    def decorator(fn):
        for name in names:
            _PROPAGATORS[name] = fn
        return fn

    return decorator


# Layers kept whole during tracing because a propagator describes them (their
# `call` may not run on symbolic tensors, e.g. Softmax with a mask).
LAYER_LEAVES = {
    "Softmax",
    "Dropout",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "Identity",
}


def known(node) -> bool:
    return node.type_name in _PROPAGATORS


def rule_name(node) -> str | None:
    """Name of the propagator function `node` is matched to, or None."""
    fn = _PROPAGATORS.get(node.type_name)
    return fn.__name__ if fn is not None else None


def propagate(node, dims: Sequence[int | None]) -> Dims:
    """Split dim of each output of `node`, given the split dim per input."""
    fn = _PROPAGATORS.get(node.type_name)
    if fn is None:
        raise Conflict(f"no sharding rule for op {node.type_name}")
    try:
        return fn(node, list(dims))
    except Conflict:
        raise
    except Exception as e:  # noqa: BLE001 - a call form the rule misreads
        # Planning must never crash: a call the propagator does not
        # understand stops the region, and the plan says which op.
        raise Conflict(
            f"{node.type_name} called in a form its rule does not read "
            f"({type(e).__name__})"
        ) from e


def ndim(t) -> int:
    return len(t.shape)


def normalize_axes(axis, rank: int) -> list[int]:
    if axis is None:
        return list(range(rank))
    if isinstance(axis, int):
        axis = [axis]
    return sorted(a % rank for a in axis)


def split_inputs(dims: Dims) -> list[tuple[int, int]]:
    return [(i, d) for i, d in enumerate(dims) if d is not None]


def call_operands(node, dims: Dims) -> list[tuple[tuple, int | None]]:
    """(shape, split dim) of each positional operand of `node`.

    `node.inputs` (and `dims`) list only the symbolic tensors; an operand
    that is a variable or constant (`ops.matmul(x, self.w)`) is not among
    them, so position-sensitive rules read the call's own arguments.
    """
    split = {id(t): d for t, d in zip(node.inputs, dims)}
    # A Python list operand (`ops.take(x, [0, 1])`) has a shape too.
    return [
        (
            tuple(a.shape if hasattr(a, "shape") else np.shape(a)),
            split.get(id(a)),
        )
        for a in node.args
    ]
