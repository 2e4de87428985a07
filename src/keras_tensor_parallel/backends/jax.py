"""JAX engine: a plan becomes Keras `TensorLayout`s; XLA's SPMD partitioner
inserts the collectives.

Every variable is re-sharded in place, one at a time, so the peak extra
memory is one full copy of one variable. Vocab tables whose row count does
not divide by the world size are stored padded (the padding rows are zero,
never looked up, and sliced off the logits), while `numpy()`, `assign()`,
`get_weights()` and saving see the logical shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np
from keras.distribution import DeviceMesh, TensorLayout

from keras_tensor_parallel.plan import DATA_AXIS, MODEL_AXIS, ShardingPlan

BACKEND = "jax"


def list_devices() -> list[str]:
    """Device ids, accelerators first when present (`"gpu:0"`, `"cpu:3"`)."""
    return keras.distribution.list_devices()


def make_mesh(devices: list[str]) -> DeviceMesh:
    """A `(data=1, model=N)` mesh over the given device ids."""
    return DeviceMesh(
        shape=(1, len(devices)),
        axis_names=(DATA_AXIS, MODEL_AXIS),
        devices=devices,
    )


def layout(axes, mesh: DeviceMesh) -> TensorLayout:
    return TensorLayout(tuple(axes), mesh)


def replicated(ndim: int, mesh: DeviceMesh) -> TensorLayout:
    return TensorLayout((None,) * ndim, mesh)


# Padded variables ------------------------------------------------------------


class _PaddedMixin:
    """Variable stored padded on one dim; numpy/assign use logical shape."""

    _tp_logical_shape: tuple

    def _tp_slices(self):
        return tuple(slice(0, n) for n in self._tp_logical_shape)

    def numpy(self):
        return host_value(self.value)[self._tp_slices()]

    def __array__(self, dtype=None):
        out = host_value(self.value)[self._tp_slices()]
        return out.astype(dtype) if dtype is not None else out

    def assign(self, value):
        shape = tuple(getattr(value, "shape", np.shape(value)))
        if shape == tuple(self._tp_logical_shape):
            value = pad_to(value, tuple(self.shape))
        return super().assign(value)


_PADDED_CLASSES: dict[type, type] = {}


def _padded_class(cls: type) -> type:
    if cls not in _PADDED_CLASSES:
        _PADDED_CLASSES[cls] = type(
            f"Padded{cls.__name__}", (_PaddedMixin, cls), {}
        )
    return _PADDED_CLASSES[cls]


def pad_to(value, shape):
    value = jnp.asarray(value)
    widths = [(0, t - s) for s, t in zip(value.shape, shape)]
    return jnp.pad(value, widths)


def logical_shape(variable) -> tuple:
    return tuple(getattr(variable, "_tp_logical_shape", variable.shape))


def host_value(array) -> np.ndarray:
    """The full value as numpy, gathered from every process when the
    array spans devices of other processes (a collective: call it on all
    processes)."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def logical_value(variable) -> np.ndarray:
    """The full, unsharded, unpadded value as numpy."""
    if isinstance(variable, _PaddedMixin):
        return variable.numpy()
    return host_value(variable.value)


# Re-sharding -----------------------------------------------------------------


def reshard(variable, axes, mesh, padded_shape=None) -> None:
    """Give `variable` the layout `axes` on `mesh`, in place."""
    value = variable.value
    if padded_shape is not None and tuple(padded_shape) != tuple(
        variable.shape
    ):
        variable._tp_logical_shape = tuple(variable.shape)
        value = pad_to(value, padded_shape)
        variable._shape = tuple(padded_shape)
        variable.__class__ = _padded_class(type(variable))
    variable._layout = layout(axes, mesh)
    variable._direct_assign(value)


def unshard(variable) -> None:
    """Undo `reshard`: one device, logical shape (used to roll back)."""
    value = logical_value(variable)
    if isinstance(variable, _PaddedMixin):
        variable.__class__ = type(variable).__mro__[2]
        variable._shape = tuple(value.shape)
        del variable._tp_logical_shape
    variable._layout = None
    variable._direct_assign(jnp.asarray(value))


def on_mesh(variable, mesh) -> bool:
    sharding = getattr(variable.value, "sharding", None)
    mesh_devices = set(mesh.backend_mesh.devices.flat)
    return sharding is not None and set(sharding.device_set) == mesh_devices


def apply_plan(model, plan: ShardingPlan, mesh) -> list:
    """Re-shard every model variable per `plan`; roll back on failure.

    Returns:
        The variables that were re-sharded.
    """
    variables = list(model.variables)
    if len(variables) != len(plan.variables):
        raise ValueError(
            "The plan does not belong to this model: it lists "
            f"{len(plan.variables)} variables, the model has "
            f"{len(variables)}."
        )
    done = []
    try:
        for v, entry in zip(variables, plan.variables):
            if v.path != entry.path or tuple(v.shape) != entry.shape:
                raise ValueError(
                    f"Plan entry {entry.path} {entry.shape} does not match "
                    f"variable {v.path} {tuple(v.shape)}."
                )
            reshard(v, entry.axes, mesh, entry.padded_shape)
            done.append(v)
    except Exception:
        for v in done:
            unshard(v)
        raise
    _install_vocab_slicing(model, plan)
    return done


def place_state(variables, mesh, reference_layouts: dict) -> None:
    """Put optimizer/metric variables on the mesh.

    A variable created from a model variable (optimizer slot) takes that
    variable's layout; anything else is replicated.
    """
    for v in variables:
        if on_mesh(v, mesh):
            continue
        ref = reference_layouts.get(_slot_reference_key(v, reference_layouts))
        if ref is not None and tuple(ref[1]) == tuple(v.shape):
            v._layout = ref[0]
        else:
            v._layout = replicated(len(v.shape), mesh)
        v._direct_assign(v.value)


def _slot_reference_key(v, reference_layouts):
    name = v.path.split("/")[-1]
    for key in reference_layouts:
        if name.startswith(key + "_"):
            return key
    return None


def reference_layouts(model) -> dict:
    """{mangled model variable path: (layout, shape)} for slot matching."""
    return {
        v.path.replace("/", "_"): (v._layout, tuple(v.shape))
        for v in model.variables
        if getattr(v, "_layout", None) is not None
    }


# Vocab-padded layers ---------------------------------------------------------


def _install_vocab_slicing(model, plan: ShardingPlan) -> None:
    """Slice padded vocab logits back to the logical vocab size."""
    padded_layers = {e.layer for e in plan if e.padded_shape is not None}
    if not padded_layers:
        return
    for layer in model._flatten_layers(include_self=True):
        if layer.path in padded_layers and not getattr(
            layer, "_tp_sliced", False
        ):
            _wrap_reverse_call(layer)


def _wrap_reverse_call(layer) -> None:
    original = layer.call
    vocab = int(layer.input_dim)

    def call(inputs, *args, **kwargs):
        out = original(inputs, *args, **kwargs)
        if out.shape[-1] != vocab and (
            kwargs.get("reverse") or (args and args[0] is True)
        ):
            out = out[..., :vocab]
        return out

    layer.call = call
    layer._tp_sliced = True


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


def install_replicated_grads(model, plan: ShardingPlan, mesh) -> int:
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
    replicated = jax.sharding.NamedSharding(
        mesh.backend_mesh, jax.sharding.PartitionSpec()
    )
    count = 0
    for layer in model._flatten_layers(include_self=False):
        kernel = getattr(layer, "kernel", None)
        if (
            not isinstance(
                layer, (keras.layers.Dense, keras.layers.EinsumDense)
            )
            or kernel is None
            or getattr(layer, "_tp_replicated_grad", False)
        ):
            continue
        entry = by_path.get(kernel.path)
        if entry is None or entry.is_split:
            continue
        identity = _replicated_grad(replicated)
        original = layer.call

        def call(*args, _original=original, _identity=identity, **kwargs):
            return _identity(_original(*args, **kwargs))

        layer.call = call
        layer._tp_replicated_grad = True
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


class JaxEngine:
    """Applies a plan on a `(data, model)` mesh; XLA SPMD runs it.

    Args:
        plan: The sharding plan.
        device_ids: Device ids, one per model-axis position.
    """

    name = BACKEND

    def __init__(self, plan: ShardingPlan, device_ids: list[str]):
        from keras_tensor_parallel.distribution import AutoTPDistribution

        self.plan = plan
        self.device_ids = list(device_ids)
        self.distribution = AutoTPDistribution(plan, device_ids=device_ids)
        self.mesh = self.distribution.device_mesh
        self._references: dict = {}

    def apply(self, model) -> None:
        apply_plan(model, self.plan, self.mesh)
        # Sibling projections (q/k/v, gate/up) reduce their input gradient
        # once, as Megatron does (see backends/jax_fusion.py).
        from keras_tensor_parallel.backends import jax_fusion

        jax_fusion.install(model, self.plan)
        install_replicated_grads(model, self.plan, self.mesh)
        self._references = reference_layouts(model)
        # A model compiled and trained before wrapping already has optimizer
        # slots and metric state: they follow their parameters' layouts.
        self.prepare_state(model)

    def scope(self):
        return self.distribution.scope()

    def to_numpy(self, variable) -> np.ndarray:
        """The variable's full logical value, gathered across processes."""
        return logical_value(variable)

    def prepare_state(self, tp_model) -> None:
        """Put optimizer and metric variables created so far on the mesh."""
        state = list(getattr(tp_model, "metrics_variables", []))
        if getattr(tp_model, "optimizer", None) is not None:
            state += list(tp_model.optimizer.variables)
        place_state(state, self.mesh, self._references)
