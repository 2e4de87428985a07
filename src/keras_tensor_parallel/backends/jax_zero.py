"""ZeRO stage 1 on the `(data, model)` mesh (JAX): optimizer slots split
over the data axis too.

Keras makes each optimizer slot with its parameter's layout
(`add_variable_from_reference`), so a slot is split over the model axis
like its parameter and replicated over the data axis. Stage 1 (Rajbhandari
et al., "ZeRO", 2020) gives every slot a layout that also splits one more
dim over the data axis: each device keeps `1 / (data x model)` of a
replica's optimizer state. Nothing else changes: the train step is the
same function, and XLA's SPMD partitioner, seeing slots split over data
and parameters replicated over it, updates each slice where it lives and
all-gathers the updated parameters over the data axis (the reduce-scatter
+ all-gather of ZeRO, in place of one all-reduce).
"""

from __future__ import annotations

import math

from keras_tensor_parallel.plan import DATA_AXIS

STAGES = (0, 1)


def check_stage(zero_stage, backend: str) -> int:
    """`zero_stage` validated: 0 (or None) or 1, stage 1 on JAX and torch
    (`torch_zero.py`).

    Raises:
        ValueError: for another value, or stage 1 on another engine.

    Example:

    ```python
    check_stage(1, "jax")  # 1
    ```
    """
    stage = 0 if zero_stage is None else zero_stage
    if type(stage) is not int or stage not in STAGES:
        raise ValueError(
            "zero_stage must be 0 (or None) or 1 (optimizer state split "
            "over the data axis too; stages 2 and 3 are not implemented). "
            f"Received: zero_stage={zero_stage!r}"
        )
    if stage and backend not in ("jax", "torch"):
        raise ValueError(
            "zero_stage=1 runs on the JAX and torch engines. Received: "
            f"zero_stage=1 on the {backend} engine"
        )
    return stage


def _axes(value_layout, ndim: int) -> list:
    """Mesh axes per dim of a Keras `TensorLayout` or a `NamedSharding`."""
    from keras.distribution import TensorLayout

    if isinstance(value_layout, TensorLayout):
        axes = list(value_layout.axes)
    elif value_layout is not None:
        axes = list(value_layout.spec)
    else:
        axes = []
    return axes + [None] * (ndim - len(axes))


def zero_axes(axes, shape, mesh_shape: dict) -> tuple:
    """`axes` with the data axis added, and the model axes too where the
    parameter is replicated over them, so the slot is split over every
    device: on the largest unsplit dim they divide, else joined to a split
    dim whose shard they divide; with the data axis alone when all of them
    divide nothing; unchanged (replicated over data) when nothing fits.

    Example:

    ```python
    zero_axes((None, "model"), (64, 128), {"data": 2, "model": 2})
    # ('data', 'model')
    zero_axes((None,), (128,), {"data": 2, "model": 2})
    # (('data', 'model'),)
    ```
    """
    if mesh_shape.get(DATA_AXIS, 1) == 1:
        return tuple(axes)
    used = {n for a in axes if a for n in (a if isinstance(a, tuple) else (a,))}
    free = [n for n in mesh_shape if n != DATA_AXIS and n not in used]
    for extra in ((DATA_AXIS, *free), (DATA_AXIS,)):
        found = _place(list(axes), shape, mesh_shape, extra)
        if found is not None:
            return found
    return tuple(axes)


def _place(axes, shape, mesh_shape, extra):
    """`axes` with the mesh axes `extra` on one dim they divide, or None."""
    k = math.prod(mesh_shape[n] for n in extra)
    one = extra[0] if len(extra) == 1 else tuple(extra)
    order = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in order:
        if axes[d] is None and shape[d] % k == 0 and shape[d] >= k:
            axes[d] = one
            return tuple(axes)
    for d in order:
        if axes[d] is None:
            continue
        names = axes[d] if isinstance(axes[d], tuple) else (axes[d],)
        split = math.prod(mesh_shape[n] for n in names)
        if (shape[d] // split) % k == 0:
            axes[d] = (*names, *extra)
            return tuple(axes)
    return None


def _constrain_gradients(optimizer, shardings) -> None:
    """Each gradient laid out as its slots before the update, so XLA can
    reduce-scatter it over the data axis (ZeRO) instead of all-reducing
    it and slicing; installed once per optimizer."""
    import jax

    if getattr(optimizer, "_tp_zero_apply", None) is not None:
        optimizer._tp_zero_shardings[:] = shardings
        return
    original = optimizer.apply
    optimizer._tp_zero_shardings = list(shardings)

    def apply(grads, trainable_variables=None):
        grads = [
            g if s is None else jax.lax.with_sharding_constraint(g, s)
            for g, s in zip(grads, optimizer._tp_zero_shardings)
        ]
        return original(grads, trainable_variables)

    optimizer._tp_zero_apply = apply
    optimizer.apply = apply


def shard_optimizer_state(tp_model) -> int:
    """Give every optimizer slot of `tp_model` its ZeRO-1 layout (building
    the optimizer first, inside the distribution scope, if `fit` has not);
    returns how many slots were re-laid out.

    Example:

    ```python
    with tp.engine.scope():
        shard_optimizer_state(tp)
    ```
    """
    from keras_tensor_parallel.backends import base
    from keras_tensor_parallel.backends.jax_distribution import layout

    optimizer = tp_model.optimizer
    engine = tp_model.engine
    if optimizer is None:
        return 0
    if not optimizer.built:
        optimizer.build(tp_model.trainable_variables)
        engine.prepare_state(tp_model)
    mesh = engine.mesh
    mesh_shape = dict(zip(mesh.axis_names, mesh.shape))
    params = list(optimizer._trainable_variables)
    shardings = {}
    moved = 0
    for slot in optimizer.variables:
        owner = base.slot_owner(slot, params)
        if owner is None or tuple(owner.shape) != tuple(slot.shape):
            continue
        shape = tuple(slot.shape)
        want = zero_axes(_axes(owner._layout, len(shape)), shape, mesh_shape)
        if tuple(_axes(slot._layout, len(shape))) != want:
            slot._layout = layout(want, mesh)
            slot._direct_assign(slot.value)  # re-sharded to the new layout
            moved += 1
        shardings[id(owner)] = slot.value.sharding
    _constrain_gradients(optimizer, [shardings.get(id(p)) for p in params])
    return moved
