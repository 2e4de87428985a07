"""JAX engine: a plan becomes Keras `TensorLayout`s; XLA's SPMD partitioner
inserts the collectives.

Every variable is re-sharded in place, one at a time, so the peak extra
memory is one full copy of one variable. Vocab tables whose row count does
not divide by the world size are stored padded (the padding rows are zero,
never looked up, and sliced off the logits), while `numpy()`, `assign()`,
`get_weights()` and saving see the logical shape.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable

import jax
import keras
import numpy as np
from keras.distribution import TensorLayout
from keras.layers import InputSpec

from keras_tensor_parallel.backends import base
from keras_tensor_parallel.backends.jax_distribution import (
    AutoTPDistribution,
    make_mesh,
    mesh_axes,
)
from keras_tensor_parallel.backends.jax_variables import (
    lay_out,
    logical_value,
    reshard,
    storage_shapes,
    unshard,
)
from keras_tensor_parallel.plan import Role, ShardingPlan
from keras_tensor_parallel.plan.rules import LinearRule, rule_for

BACKEND = "jax"

__all__ = ["JaxEngine", "available_devices", "make_mesh"]


def available_devices() -> list[str]:
    """Device ids, accelerators first when present (`"gpu:0"`, `"cpu:3"`)."""
    return keras.distribution.list_devices()


def replicated(ndim: int, mesh) -> TensorLayout:
    return TensorLayout((None,) * ndim, mesh)


def on_mesh(variable, mesh) -> bool:
    sharding = getattr(variable.value, "sharding", None)
    mesh_devices = set(mesh.backend_mesh.devices.flat)
    return sharding is not None and set(sharding.device_set) == mesh_devices


def apply_plan(model, plan: ShardingPlan, mesh, journal, checkpoint) -> None:
    """Re-shard every model variable per `plan`, one undo per variable.

    A variable with no value yet (built unallocated, as `from_preset` and
    `build` do before choosing `tensor_parallel_size="auto"`) only takes
    its layout: the train step is then measured from shapes."""
    from keras_tensor_parallel.loading.abstract import is_unallocated

    variables = list(model.variables)
    base.check_plan_matches(variables, plan)
    for v, entry in zip(variables, plan.variables):
        checkpoint()
        axes = mesh_axes(entry, mesh)
        move = lay_out if is_unallocated(v) else reshard
        journal.add(move(v, axes, mesh, entry.padded_shape))


def place_state(variables, mesh, params) -> None:
    """Put optimizer/metric variables on the mesh.

    A variable created from a model variable (optimizer slot) of the same
    shape takes that variable's layout; anything else is replicated.
    """
    params = [p for p in params if getattr(p, "_layout", None) is not None]
    for v in variables:
        if on_mesh(v, mesh):
            continue
        owner = base.slot_owner(v, params)
        # Stored shapes: a padded parameter's slot is padded alike.
        if owner is not None and tuple(owner._shape) == tuple(v._shape):
            v._layout = owner._layout
        else:
            v._layout = replicated(len(v.shape), mesh)
        v._direct_assign(v.value)


# Vocab-padded layers ---------------------------------------------------------


def install_vocab_slicing(model, plan: ShardingPlan, journal) -> None:
    """Slice padded vocab logits back to the logical vocab size. (Padded
    heads need no slicing: their zero rows in the row projection drop
    them.)"""
    padded_layers = {
        e.layer
        for e in plan
        if e.padded_shape is not None and e.role == Role.VOCAB
    }
    for layer in model._flatten_layers(include_self=True):
        if layer.path in padded_layers:
            journal.setattr(layer, "call", _reverse_sliced(layer))


def widen_padded_inputs(model, plan: ShardingPlan, journal) -> None:
    """A row layer whose input features are stored padded takes the padded
    width: Keras's `InputSpec` (a Dense checks axis -1 against its kernel)
    would refuse the padded activation its column layer now produces."""
    padded = {
        e.path: e
        for e in plan
        if e.padded_shape is not None and e.role == Role.ROW
    }
    for layer in model._flatten_layers(include_self=False):
        spec = layer._input_spec
        if not isinstance(spec, InputSpec) or not spec.axes:
            continue
        for v in layer.variables:
            entry = padded.get(v.path)
            if entry is None:
                continue
            (was, now) = next(
                (a, b)
                for a, b in zip(entry.shape, entry.padded_shape)
                if a != b
            )
            axes = {k: now if s == was else s for k, s in spec.axes.items()}
            wide = copy.copy(spec)
            wide.axes = axes
            journal.setattr(layer, "_input_spec", wide)
            break


def _reverse_sliced(layer):
    original = layer.call
    vocab = int(layer.input_dim)

    def call(inputs, *args, **kwargs):
        out = original(inputs, *args, **kwargs)
        if out.shape[-1] != vocab and (
            kwargs.get("reverse") or (args and args[0] is True)
        ):
            out = out[..., :vocab]
        return out

    return call


# Replicated projections -------------------------------------------------------


def _replicated_grad(sharding):
    """Identity whose backward makes the incoming gradient replicated."""

    @jax.custom_vjp
    def identity(x):
        return x

    def fwd(x):
        return x, None

    def bwd(_, g):
        return (jax.lax.with_sharding_constraint(g, sharding),)

    identity.defvjp(fwd, bwd)
    return identity


def install_replicated_grads(model, plan: ShardingPlan, mesh, journal) -> int:
    """Reduce the output gradient of replicated projections, not their
    weight gradient.

    A replicated projection whose output meets a split region (k/v heads
    that do not divide by the world size, read by split query heads) gets a
    gradient that is a partial sum per device. Left alone, XLA reduce-
    scatters the weight gradient, updates the weight (and its optimizer
    slots) in shards and all-gathers it back: a weight all-gather every
    step. Pinning the output gradient to replicated makes it one all-reduce
    of the activation gradient, after which every device computes the full
    weight gradient locally, as Megatron does for replicated kv heads.
    Where the gradient is already replicated the constraint is a no-op.
    """
    by_path = {e.path: e for e in plan}
    sharding = jax.sharding.NamedSharding(
        mesh.backend_mesh, jax.sharding.PartitionSpec()
    )
    count = 0
    for layer in model._flatten_layers(include_self=False):
        rule = rule_for(layer)
        if not isinstance(rule, LinearRule):
            continue  # not a projection (the planner's rules say which are)
        entry = by_path.get(rule.kernel.path)
        if entry is None or entry.is_split:
            continue
        identity = _replicated_grad(sharding)
        original = layer.call

        def call(*args, _original=original, _identity=identity, **kwargs):
            return _identity(_original(*args, **kwargs))

        journal.setattr(layer, "call", call)
        count += 1
    return count


# Inspection ------------------------------------------------------------------


def shard_shapes(variable) -> list[tuple]:
    """Per-device shard shapes of a variable's value."""
    return [tuple(s.data.shape) for s in variable.value.addressable_shards]


def per_device_bytes(values) -> dict:
    """Bytes held per device by `values` (variables or jax arrays), read
    from the actual shards."""
    out: dict = {}
    for v in values:
        for shard in getattr(v, "value", v).addressable_shards:
            key = str(shard.device)
            out[key] = out.get(key, 0) + shard.data.nbytes
    return out


# Engine ----------------------------------------------------------------------


def _no_checkpoint() -> None:
    return None


class JaxEngine:
    """Applies a plan on a `(data, model)` mesh; XLA SPMD runs it.

    Implements `backends.base.Engine`.

    Args:
        plan: The sharding plan.
        device_ids: Device ids, `data x plan.world_size` of them (one
            per model-axis position when not data parallel).

    Example:

    ```python
    engine = JaxEngine(plan_model(model, 2), ["cpu:0", "cpu:1"])
    engine.apply(model)
    ```
    """

    name = BACKEND

    def __init__(self, plan: ShardingPlan, device_ids: list[str]):
        self.plan = plan
        self.device_ids = list(device_ids)
        self.distribution = AutoTPDistribution(plan, device_ids=device_ids)
        self.mesh = self.distribution.device_mesh
        self.rank = jax.process_index()
        self._journal = base.Journal()
        self._params: list = []
        self.sequence_parallel = False
        self.recompute: str | None = None

    def set_activations(self, *, sequence_parallel: bool, recompute) -> None:
        """Before `apply`: split the activations between regions along
        the sequence, and/or recompute the attention core in backward
        (see `backends/jax_sequence.py`)."""
        self.sequence_parallel = sequence_parallel
        self.recompute = recompute

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def apply(self, model, *, checkpoint=_no_checkpoint) -> None:
        """Shard `model` in place; on any error (or interrupt raised by
        `checkpoint`) every step is undone before it propagates."""
        journal = self._journal
        try:
            apply_plan(model, self.plan, self.mesh, journal, checkpoint)
            checkpoint()
            install_vocab_slicing(model, self.plan, journal)
            widen_padded_inputs(model, self.plan, journal)
            # Sibling projections (q/k/v, gate/up) reduce their input
            # gradient once, as Megatron does (see backends/jax_fusion.py).
            from keras_tensor_parallel.backends import jax_fusion

            jax_fusion.install(model, self.plan, journal=journal)
            install_replicated_grads(model, self.plan, self.mesh, journal)
            if self.sequence_parallel or self.recompute:
                from keras_tensor_parallel.backends import jax_sequence

                jax_sequence.install_activations(self, model, journal)
            checkpoint()
            self._params = list(model.variables)
            # A model compiled and trained before wrapping already has
            # optimizer slots and metric state: they follow their
            # parameters' layouts.
            self._place_model_state(model, journal)
        except BaseException:
            journal.undo()
            self._params = []
            raise

    def _place_model_state(self, model, journal) -> None:
        state = list(getattr(model, "metrics_variables", []))
        if getattr(model, "optimizer", None) is not None:
            state += list(model.optimizer.variables)
        for v in state:
            if not on_mesh(v, self.mesh):
                old = (v.__class__, v._shape, v._layout)
                journal.add(lambda v=v, old=old: unshard(v, old))
        self.place_state(state)

    def unapply(self, model) -> None:
        """Undo `apply`: every variable whole on one device, calls as
        before."""
        self._journal.undo()
        self._params = []

    @contextlib.contextmanager
    def scope(self):
        """The distribution scope; padded variables report their stored
        shape inside (Keras's stateless paths compare it with the
        arrays), the logical one outside."""
        with self.distribution.scope(), storage_shapes():
            yield

    def to_numpy(self, variable) -> np.ndarray:
        """The variable's full logical value, gathered across processes."""
        return logical_value(variable)

    def shard_shapes(self, variable) -> list[tuple]:
        return shard_shapes(variable)

    def per_device_bytes(self, variables: Iterable) -> dict[str, int]:
        return per_device_bytes(variables)

    def prepare_state(self, tp_model) -> None:
        """Put optimizer and metric variables created so far on the mesh."""
        state = list(getattr(tp_model, "metrics_variables", []))
        if getattr(tp_model, "optimizer", None) is not None:
            state += list(tp_model.optimizer.variables)
        self.place_state(state)

    def place_state(self, variables: Iterable) -> None:
        """Slots take their parameter's layout; the rest is replicated."""
        place_state(variables, self.mesh, self._params)

    @contextlib.contextmanager
    def guard(self, tp_model):
        """A failed fit/evaluate/predict leaves every variable holding a
        value.

        Keras's JAX trainer detaches variable values while it runs
        (`_purge_model_variables`) and reattaches them only when it ends
        normally. On an error, put back the values from before the call,
        or, when a step already consumed them (donated buffers), the state
        after the last completed step.
        """
        variables = _state_variables(tp_model)
        before = [v._value for v in variables]
        try:
            yield
        except BaseException:
            _reattach(tp_model, variables, before)
            raise

    def save(self, model, filepath, *, weights_only=False, **kwargs) -> None:
        """Full weights; every process gathers, process 0 writes
        atomically (a temporary file renamed into place)."""
        method = model.save_weights if weights_only else model.save
        if self.is_main:
            base.write_file(method, filepath, **kwargs)
        else:
            kwargs.pop("overwrite", None)
            with _scratch_path(filepath) as path:
                method(path, **kwargs)


def _state_variables(tp_model) -> list:
    found = list(tp_model.variables) + list(
        getattr(tp_model, "metrics_variables", [])
    )
    if getattr(tp_model, "optimizer", None) is not None:
        found += list(tp_model.optimizer.variables)
    return list({id(v): v for v in found}.values())


def _deleted(value) -> bool:
    return value is None or (
        hasattr(value, "is_deleted") and value.is_deleted()
    )


def _reattach(tp_model, variables, before) -> None:
    if any(_deleted(b) for b, v in zip(before, variables)):
        # A step ran (its input buffers were donated): the trainer keeps
        # the state after the last completed step here.
        tp_model.jax_state_sync()
    for v, value in zip(variables, before):
        if v._value is None and not _deleted(value):
            v._value = value
    tp_model._jax_state = None
    tp_model._jax_state_synced = True


@contextlib.contextmanager
def _scratch_path(filepath):
    """A throwaway path with `filepath`'s name, for processes that take
    part in the gather but do not write."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        yield os.path.join(tmp, os.path.basename(os.fspath(filepath)))
