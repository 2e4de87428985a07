"""Plan Megatron-style tensor parallelism for any Keras model: the API.

The planner finds Megatron *regions*: a column-parallel projection whose
split output flows, through ops that keep the split dim local (activations,
reshapes, per-head attention, gating products), into projections that
contract it (row-parallel). The activation between them stays split, so the
region needs one all-reduce forward (after the rows) and one backward (before
the columns). Projections that join a region through a shared op (k and v
meeting q in attention, the gate meeting the up-projection in a gated MLP)
are recruited into it.

Nothing is decided by layer names or width ratios; a projection whose split
output would reach a norm over the split dim, the model output, or an op with
no rule is replicated, and the plan records why.

Where things live: `graph.py` traces the model, `rules.py` and
`layers.py` describe layer classes, `propagate.py` (with `value_ops.py`
and `shape_ops.py`) says how a split travels through one op,
`regions.py` grows a region, `decisions.py` turns regions into per-variable
decisions, `overrides.py` applies user overrides, `validation.py` checks
arguments.
"""

from __future__ import annotations

import os

import keras

# Importing the op modules registers their propagators.
from keras_tensor_parallel.plan import graph as graph_lib
from keras_tensor_parallel.plan import propagate as prop
from keras_tensor_parallel.plan import rules, shape_ops, value_ops  # noqa: F401
from keras_tensor_parallel.plan.decisions import Planner
from keras_tensor_parallel.plan.overrides import apply_overrides
from keras_tensor_parallel.plan.plan import ShardingPlan
from keras_tensor_parallel.plan.validation import (
    check_built,
    validate_world_size,
)

__all__ = [
    "apply_overrides",
    "check_built",
    "is_leaf",
    "plan_model",
    "validate_world_size",
]


def plan_model(
    model: keras.Model,
    world_size: int,
    *,
    overrides: dict | None = None,
    slice_operands: bool = True,
    op_projections: bool | None = None,
) -> ShardingPlan:
    """Plan Megatron-style tensor parallelism for a built Keras model.

    Args:
        model: A built Keras model (Sequential, Functional, subclassed or
            KerasHub), a function that builds one, or a KerasHub preset
            directory; the last two are built with unallocated variables,
            so a model larger than memory can be planned.
        world_size: Number of devices on the model axis.
        overrides: Optional ordered mapping `{regex: axes or role}`. A regex is
            matched against variable paths with `re.fullmatch`; the value is a
            tuple of mesh-axis names (`"model"` or `None` per dim) or a role
            name (`"replicated"`, `"column"` splits the last dim, `"row"` and
            `"vocab"` the first).
        slice_operands: Whether the engine partitions the traced program
            (JAX, XLA SPMD): then full-size operands may meet a split (XLA
            slices them), traced einsum/matmul weights and expert banks
            are split, heads not dividing N are padded and kv heads fewer
            than N shared. Engines running each rank's model code (torch)
            pass False: such regions are replicated, with the reason.
        op_projections: Whether a layer's own einsum/matmul weights are
            split (None: as `slice_operands`; torch: True, at the op).

    Returns:
        The `ShardingPlan`.

    Example:

    ```python
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128),
                              keras.layers.Dense(32)])
    plan = plan_model(model, world_size=2)
    print(plan.table())
    ```
    """
    if is_source(model):
        # Building a source needs a backend; plan/ imports no framework.
        raise ValueError(
            "plan.plan_model plans a built model; for a builder function "
            "or a preset directory use keras_tensor_parallel.plan_model, "
            f"which builds it without allocating. Received: {model!r}"
        )
    validate_world_size(world_size)
    check_built(model)
    graph = graph_lib.extract_graph(model, is_leaf=is_leaf)
    entries = Planner(
        model, graph, world_size, slice_operands=slice_operands,
        op_projections=op_projections,
    ).run()  # fmt: skip
    plan = ShardingPlan(world_size, tuple(entries), model_name=model.name)
    if overrides:
        plan = apply_overrides(plan, overrides)
    return plan


def is_source(model) -> bool:
    """Whether `model` is a builder function or a preset directory rather
    than a built model."""
    if isinstance(model, (str, os.PathLike)):
        return os.path.isdir(model)
    return callable(model) and not isinstance(model, keras.layers.Layer)


def is_leaf(layer) -> bool:
    """Whether the trace keeps `layer` whole: it has a rule or a
    propagator. Every other layer is traced into.

    Example:

    ```python
    graph = graph_lib.extract_graph(model, is_leaf=is_leaf)
    ```
    """
    return rules.has_rule(layer) or type(layer).__name__ in prop.LAYER_LEAVES


# The engines' sibling-projection fusion imports the old private name.
_is_leaf = is_leaf
