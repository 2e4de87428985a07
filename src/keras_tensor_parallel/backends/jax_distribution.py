"""A `ShardingPlan` as a `keras.distribution.Distribution` (JAX).

Variables created under `dist.scope()` get the plan's layout by path, so a
model built after the distribution is created is sharded from its first
allocation; inputs are replicated across the model axis.
"""

from __future__ import annotations

import jax
from keras.distribution import DeviceMesh, TensorLayout, list_devices
from keras.src.distribution.distribution_lib import Distribution

from keras_tensor_parallel.backends.device_ids import select_devices
from keras_tensor_parallel.plan import DATA_AXIS, MODEL_AXIS, ShardingPlan

# Minor mesh axis of a plan whose kv heads are shared by `copies` adjacent
# devices: the model axis is (model, model_copies); a shared variable is
# split over `model` only (each block held by the devices of one group),
# every other split variable over both.
COPIES_AXIS = "model_copies"


def make_mesh(
    devices: list[str], copies: int = 1, *, data: int = 1
) -> DeviceMesh:
    """A `(data, model=N/data)` mesh over the given device ids, or
    `(data, model=N/data/copies, model_copies=copies)` when kv heads are
    shared by `copies` devices.

    Devices fill the mesh row-major, so each model-axis group is `N/data`
    adjacent ids: tensor parallelism stays among neighbours (the fast
    links), data parallelism spans the groups.
    """
    model = len(devices) // data
    if copies == 1:
        return DeviceMesh(
            shape=(data, model),
            axis_names=(DATA_AXIS, MODEL_AXIS),
            devices=devices,
        )
    return DeviceMesh(
        shape=(data, model // copies, copies),
        axis_names=(DATA_AXIS, MODEL_AXIS, COPIES_AXIS),
        devices=devices,
    )


def mesh_copies(plan: ShardingPlan) -> int:
    """Devices sharing each shared block in `plan` (1 when none)."""
    found = {e.copies for e in plan if e.copies > 1}
    if len(found) > 1:
        raise ValueError(
            "A plan may share kv heads over one number of devices only. "
            f"Received: copies={sorted(found)}"
        )
    return found.pop() if found else 1


def mesh_axes(entry, mesh: DeviceMesh) -> tuple:
    """The entry's axes on `mesh`: on a mesh with `model_copies`, an
    ordinary split spans (model, model_copies)."""
    if COPIES_AXIS not in mesh.axis_names or entry.copies > 1:
        return tuple(entry.axes)
    both = (MODEL_AXIS, COPIES_AXIS)
    return tuple(both if a == MODEL_AXIS else a for a in entry.axes)


def layout(axes, mesh: DeviceMesh):
    """A Keras `TensorLayout`, or a `NamedSharding` where a dim spans two
    mesh axes (Keras layouts name one axis per dim)."""
    if any(isinstance(a, tuple) for a in axes):
        spec = jax.sharding.PartitionSpec(*axes)
        return jax.sharding.NamedSharding(mesh.backend_mesh, spec)
    return TensorLayout(tuple(axes), mesh)


def data_size(num_devices: int, tensor_parallel_size: int) -> int:
    """Data-parallel replicas when `num_devices` run a plan over
    `tensor_parallel_size` devices (ValueError unless it divides)."""
    if num_devices % tensor_parallel_size:
        raise ValueError(
            "The number of devices must be a multiple of the plan's world "
            f"size (the tensor-parallel size {tensor_parallel_size}). "
            f"Received: {num_devices} devices"
        )
    return num_devices // tensor_parallel_size


class AutoTPDistribution(Distribution):
    """Distribution that lays variables out as a `ShardingPlan` says.

    Args:
        plan: The plan (for example from `plan_model` on a same-architecture
            model, or `ShardingPlan.from_json`).
        device_ids: Device ids such as `"cpu:0"`; defaults to the first
            `plan.world_size` devices. A multiple of `plan.world_size`
            gives `len(device_ids) / plan.world_size` data-parallel
            replicas, each running the plan on its model-axis group.

    Example:

    ```python
    plan = plan_model(make_model(), world_size=2)
    dist = AutoTPDistribution(plan)
    with dist.scope():
        model = make_model()   # variables are sharded as they are created
    ```
    """

    def __init__(self, plan: ShardingPlan, *, device_ids=None):
        if not isinstance(plan, ShardingPlan):
            raise ValueError(
                f"AutoTPDistribution needs a ShardingPlan. Received: {plan!r}"
            )
        ids = select_devices(
            world_size=plan.world_size if device_ids is None else None,
            device_ids=device_ids,
            available=list_devices(),
            backend="jax",
        )
        data = data_size(len(ids), plan.world_size)
        # The batch is split over the data axis (`get_data_layout`) and
        # replicated over the model axis; parameters are replicated over
        # the data axis, so XLA reduces their gradients over it. Each
        # process feeds its own share of the global batch (Keras's
        # `make_array_from_process_local_data`): nothing to shard here.
        super().__init__(
            make_mesh(ids, mesh_copies(plan), data=data),
            batch_dim_name=DATA_AXIS,
            auto_shard_dataset=False,
        )
        self._data = data
        self._plan = plan
        self._by_path = {e.path: e for e in plan}

    @property
    def plan(self) -> ShardingPlan:
        return self._plan

    @property
    def num_model_replicas(self) -> int:
        return self._data

    def get_data_layout(self, data_shape):
        axes = [None] * len(data_shape)
        if axes:
            axes[0] = DATA_AXIS
        return TensorLayout(axes, self.device_mesh)

    def get_variable_layout(self, variable):
        if getattr(variable, "_layout", None) is not None:
            return variable._layout
        entry = self._by_path.get(variable.path)
        shape = tuple(variable.shape)
        if entry is None or entry.shape != shape or entry.padded_shape:
            # Unknown (optimizer/metric state without a reference) or padded
            # (padding happens when TensorParallelKeras wraps the model).
            return TensorLayout((None,) * len(shape), self.device_mesh)
        return layout(mesh_axes(entry, self.device_mesh), self.device_mesh)

    def get_tensor_layout(self, path):
        return None

    def distribute_dataset(self, dataset):
        return dataset

    def __repr__(self):
        return (
            f"<AutoTPDistribution world_size={self._plan.world_size} "
            f"data={self._data} "
            f"mesh={self.device_mesh.shape}>"
        )
