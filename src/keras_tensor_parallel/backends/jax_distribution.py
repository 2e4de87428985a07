"""A `ShardingPlan` as a `keras.distribution.Distribution` (JAX).

Variables created under `dist.scope()` get the plan's layout by path, so a
model built after the distribution is created is sharded from its first
allocation; inputs are replicated across the model axis.
"""

from __future__ import annotations

from keras.distribution import DeviceMesh, TensorLayout
from keras.src.distribution.distribution_lib import Distribution

from keras_tensor_parallel.plan import DATA_AXIS, MODEL_AXIS, ShardingPlan


def make_mesh(devices: list[str]) -> DeviceMesh:
    """A `(data=1, model=N)` mesh over the given device ids."""
    return DeviceMesh(
        shape=(1, len(devices)),
        axis_names=(DATA_AXIS, MODEL_AXIS),
        devices=devices,
    )


class AutoTPDistribution(Distribution):
    """Distribution that lays variables out as a `ShardingPlan` says.

    Args:
        plan: The plan (for example from `plan_model` on a same-architecture
            model, or `ShardingPlan.from_json`).
        device_ids: Device ids such as `"cpu:0"`; defaults to the first
            `plan.world_size` devices.

    Example:

    ```python
    plan = plan_model(make_model(), world_size=2)
    dist = AutoTPDistribution(plan)
    with dist.scope():
        model = make_model()   # variables are sharded as they are created
    ```
    """

    def __init__(self, plan: ShardingPlan, *, device_ids=None):
        from keras_tensor_parallel import devices as devices_lib

        if not isinstance(plan, ShardingPlan):
            raise ValueError(
                f"AutoTPDistribution needs a ShardingPlan. Received: {plan!r}"
            )
        ids = devices_lib.resolve_devices(
            world_size=plan.world_size, device_ids=device_ids, backend="jax"
        )
        # The data axis has size 1: every process feeds the same full batch
        # (replicated over the model axis), so there is nothing to shard.
        super().__init__(
            make_mesh(ids), batch_dim_name=DATA_AXIS, auto_shard_dataset=False
        )
        self._plan = plan
        self._by_path = {e.path: e for e in plan}

    @property
    def plan(self) -> ShardingPlan:
        return self._plan

    @property
    def num_model_replicas(self) -> int:
        return 1

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
        return TensorLayout(entry.axes, self.device_mesh)

    def get_tensor_layout(self, path):
        return None

    def distribute_dataset(self, dataset):
        return dataset

    def __repr__(self):
        return (
            f"<AutoTPDistribution world_size={self._plan.world_size} "
            f"mesh={self.device_mesh.shape}>"
        )
