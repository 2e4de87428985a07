"""`TensorParallelKeras`: any Keras model, split across devices."""

from __future__ import annotations

import keras
import numpy as np

from keras_tensor_parallel import devices as devices_lib
from keras_tensor_parallel.plan import ShardingPlan, plan_model
from keras_tensor_parallel.plan.planner import check_built


def make_engine(backend: str, plan: ShardingPlan, device_ids: list[str]):
    """The engine object for `backend` (`"jax"` or `"torch"`)."""
    if backend == "jax":
        from keras_tensor_parallel.backends.jax import JaxEngine

        return JaxEngine(plan, device_ids)
    from keras_tensor_parallel.backends.torch import TorchEngine

    return TorchEngine(plan, device_ids)


class TensorParallelKeras(keras.Model):
    """A Keras model split Megatron-style across devices.

    The wrapped model's variables are re-sharded in place (each device keeps
    only its shard); `compile`, `fit`, `evaluate`, `predict`, `save` and
    `get_weights` behave as on the original model.

    Args:
        model: A built Keras model.
        world_size: Number of devices; defaults to all available (or to
            `len(device_ids)`).
        device_ids: Device ids as `keras.distribution.list_devices()` returns
            them (`"cpu:0"`, `"gpu:1"`).
        distributed_backend: `"auto"` (the Keras backend), `"jax"` or
            `"torch"`.
        overrides: Ordered `{regex: axes or role}` applied on top of the
            automatic plan (see `plan_model`).
        plan: A ready `ShardingPlan` to use instead of planning.

    Example:

    ```python
    tp = TensorParallelKeras(model, world_size=2)
    tp.compile(optimizer="adam", loss="mse")
    tp.fit(x, y, epochs=1)
    print(tp.plan)
    ```
    """

    def __init__(
        self,
        model,
        world_size: int | None = None,
        *,
        device_ids=None,
        distributed_backend: str = "auto",
        overrides: dict | None = None,
        plan: ShardingPlan | None = None,
        **kwargs,
    ):
        backend = devices_lib.validate_backend(distributed_backend)
        check_built(model)
        if getattr(model, "_tp_wrapped", False):
            raise ValueError(
                f"Model {model.name!r} is already tensor-parallel; wrap the "
                "original model once. Received: an already wrapped model"
            )
        ids = devices_lib.resolve_devices(
            world_size=world_size, device_ids=device_ids
        )
        if plan is None:
            # XLA slices unsplit operands that meet a split dim; the torch
            # engine runs the model's own code per rank and cannot.
            plan = plan_model(
                model,
                len(ids),
                overrides=overrides,
                slice_operands=backend == "jax",
            )
        elif plan.world_size != len(ids):
            raise ValueError(
                f"plan.world_size ({plan.world_size}) must equal the number "
                f"of devices ({len(ids)}). Received: plan for world size "
                f"{plan.world_size}"
            )
        engine = make_engine(backend, plan, ids)
        name = kwargs.pop("name", f"tensor_parallel_{model.name}")
        super().__init__(name=name, **kwargs)
        engine.apply(model)  # the only step that changes `model`
        model._tp_wrapped = True
        self._tp_model = model
        self._tp_plan = plan
        self._tp_engine = engine
        self.built = True

    # Introspection ------------------------------------------------------------

    @property
    def plan(self) -> ShardingPlan:
        """The `ShardingPlan` in force."""
        return self._tp_plan

    @property
    def wrapped_model(self):
        """The original model (its variables are now sharded)."""
        return self._tp_model

    @property
    def engine(self):
        return self._tp_engine

    @property
    def world_size(self) -> int:
        return self._tp_plan.world_size

    @property
    def device_ids(self) -> list[str]:
        return list(self._tp_engine.device_ids)

    @property
    def distribution(self):
        """The plan as a `keras.distribution.Distribution` (JAX)."""
        return getattr(self._tp_engine, "distribution", None)

    # Forward ----------------------------------------------------------------

    def call(self, inputs, training=None, mask=None):
        kwargs = {}
        if training is not None:
            kwargs["training"] = training
        return self._tp_model(inputs, **kwargs)

    def compute_output_spec(self, *args, **kwargs):
        return self._tp_model.compute_output_spec(*args, **kwargs)

    # Training and inference run inside the plan's distribution scope -------

    def _run(self, method, *args, **kwargs):
        with self._tp_engine.scope():
            self._tp_engine.prepare_state(self)
            return method(*args, **kwargs)

    def fit(self, *args, **kwargs):
        return self._run(super().fit, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        return self._run(super().evaluate, *args, **kwargs)

    def predict(self, *args, **kwargs):
        return self._run(super().predict, *args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        return self._run(super().train_on_batch, *args, **kwargs)

    def test_on_batch(self, *args, **kwargs):
        return self._run(super().test_on_batch, *args, **kwargs)

    def predict_on_batch(self, *args, **kwargs):
        return self._run(super().predict_on_batch, *args, **kwargs)

    # Weights and saving: full, unsharded, logical shapes --------------------

    def get_weights(self):
        to_numpy = getattr(self._tp_engine, "to_numpy", np.asarray)
        return [to_numpy(v) for v in self.weights]

    def set_weights(self, weights):
        variables = self.weights
        if len(variables) != len(weights):
            raise ValueError(
                f"set_weights expects {len(variables)} arrays. Received: "
                f"{len(weights)}"
            )
        for v, entry, w in zip(variables, self._plan_entries(), weights):
            if tuple(np.shape(w)) != entry.shape:
                raise ValueError(
                    f"Weight for {v.path} must have shape {entry.shape}. "
                    f"Received: {tuple(np.shape(w))}"
                )
        for v, w in zip(variables, weights):
            v.assign(w)

    def _plan_entries(self):
        by_path = {e.path: e for e in self._tp_plan}
        return [by_path[v.path] for v in self.weights]

    def save(self, filepath, *args, **kwargs):
        """Save the original model (full weights): loads on one device
        without this library."""
        save = getattr(self._tp_engine, "save_model", None)
        if save is not None:  # torch: all ranks gather, rank 0 writes
            return save(self._tp_model, filepath, *args, **kwargs)
        return self._tp_model.save(filepath, *args, **kwargs)

    def save_weights(self, filepath, *args, **kwargs):
        return self._tp_model.save_weights(filepath, *args, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        return self._tp_model.load_weights(filepath, *args, **kwargs)

    def summary(self, *args, **kwargs):
        self._tp_model.summary(*args, **kwargs)
        print_fn = kwargs.get("print_fn") or print
        for line in self._tp_plan.summary_lines():
            print_fn(line)

    def get_config(self):
        raise NotImplementedError(
            "TensorParallelKeras is not serialized itself: `save()` writes "
            "the original model, which loads on one device; wrap it again "
            "after loading."
        )
