"""`TensorParallelKeras`: any Keras model, split across devices."""

from __future__ import annotations

import math

import keras
import numpy as np

from keras_tensor_parallel import backends
from keras_tensor_parallel import devices as devices_lib
from keras_tensor_parallel.backends import base
from keras_tensor_parallel.backends import jax_zero as _zero
from keras_tensor_parallel.loading import factory as loading_factory
from keras_tensor_parallel.plan import ShardingPlan, lora, plan_model
from keras_tensor_parallel.plan.planner import check_built


def _zero_module(engine):
    """The engine's ZeRO-1 module (`shard_optimizer_state`)."""
    if engine.name == "torch":
        from keras_tensor_parallel.backends import torch_zero

        return torch_zero
    return _zero


class TensorParallelKeras(keras.Model):
    """A Keras model split Megatron-style across devices.

    The wrapped model's variables are re-sharded in place (each device keeps
    only its shard); `compile`, `fit`, `evaluate`, `predict`, `save` and
    `get_weights` behave as on the original model. Wrapping is all or
    nothing: an error or Ctrl-C while wrapping leaves the model as it was.

    Args:
        model: A built Keras model.
        world_size: Number of devices; defaults to all available (or to
            `len(device_ids)`).
        device_ids: Device ids as `keras.distribution.list_devices()`
            returns them (`"cpu:0"`, `"gpu:1"`).
        distributed_backend: `"auto"` (the Keras backend), `"jax"`,
            `"torch"` (or `"pytorch"`), or `"nccl"` (the Keras backend's
            engine on GPUs).
        overrides: Ordered `{regex: axes or role}` applied on top of the
            automatic plan (see `plan_model`).
        plan: A ready `ShardingPlan` to use instead of planning.
        tensor_parallel_size: Devices each Megatron plan is split over
            (JAX and torch); defaults to `world_size`. A divisor of
            `world_size` gives a `(data=world_size/tensor_parallel_size,
            model=tensor_parallel_size)` mesh: the batch is split over
            the data axis and gradients are reduced over it. `"auto"`
            with `device_memory`: the smallest divisor at which one
            device's parameters, optimizer state and activations fit
            (Adam, `world_size` example rows), measured from XLA's
            compiled train step on JAX (`keras_tensor_parallel.autosize`)
            and computed on torch, the same on every rank, from the
            plan's shards and a measured activation pass
            (`keras_tensor_parallel.autosize_torch`); the choice and its
            figures are printed.
        device_memory: Bytes per device for `tensor_parallel_size="auto"`,
            an int or a string such as `"16GB"` or `"80GiB"`.
        zero_stage: `1` splits optimizer slots over the data axis too
            (ZeRO stage 1, JAX and torch): each device keeps 1/(data x
            model) of a replica's optimizer state; `0` (default)
            replicates them over the data axis.
        sequence_parallel: Split the activations between tensor-parallel
            regions (norms, dropout, residual adds) along the sequence
            (Megatron-SP; JAX and torch): same math and ring traffic, less
            activation memory per device.
        recompute: `"attention"` recomputes the attention core (scores,
            softmax, probabilities x values) in backward instead of
            keeping it (JAX and torch); `None` keeps everything.

    Example:

    ```python
    tp = TensorParallelKeras(model, world_size=2)
    tp.compile(optimizer="adam", loss="mse")
    tp.fit(x, y, epochs=1)
    print(tp.plan)
    # 4 data-parallel replicas of a 2-way tensor-parallel model:
    # TensorParallelKeras(model, world_size=8, tensor_parallel_size=2)
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
        tensor_parallel_size: int | str | None = None,
        device_memory: int | str | None = None,
        zero_stage: int | None = None,
        sequence_parallel: bool = False,
        recompute: str | None = None,
        **kwargs,
    ):
        backend = devices_lib.validate_backend(distributed_backend)
        _check_activations(sequence_parallel, recompute, backend)
        zero_stage = _zero.check_stage(zero_stage, backend)
        check_built(model)
        if getattr(model, "_tp_wrapped", False):
            raise ValueError(
                f"Model {model.name!r} is already tensor-parallel; wrap the "
                "original model once. Received: an already wrapped model"
            )
        _check_overrides(overrides)
        _check_plan(plan)
        ids = devices_lib.resolve_devices(
            world_size=world_size, device_ids=device_ids, backend=backend
        )
        tp_size = devices_lib.tensor_parallel_size(
            tensor_parallel_size, ids, backend, model=model,
            device_memory=device_memory, overrides=overrides)  # fmt: skip
        if plan is None:
            # XLA slices unsplit operands that meet a split dim; the torch
            # engine runs the model's own code per rank and cannot.
            plan = _plan_for(backend, model, tp_size, overrides)
        elif plan.world_size != tp_size:
            raise ValueError(
                f"plan.world_size ({plan.world_size}) must equal the "
                f"tensor-parallel size ({tp_size}). Received: plan for "
                f"world size {plan.world_size}"
            )
        engine = backends.make_engine(backend, plan, ids)
        if sequence_parallel or recompute:
            engine.set_activations(
                sequence_parallel=sequence_parallel, recompute=recompute
            )
        name = kwargs.pop("name", f"tensor_parallel_{model.name}")
        super().__init__(name=name, **kwargs)
        self._tp_wrap(model, engine, plan)
        self._tp_zero_stage = zero_stage
        self.built = True

    def _tp_wrap(self, model, engine: base.Engine, plan: ShardingPlan):
        """The only step that changes `model`: all or nothing, Ctrl-C
        included (held until a point where every step can be undone)."""
        interrupt = base.DeferredInterrupt()
        applied = False
        with interrupt:
            try:
                engine.apply(model, checkpoint=interrupt.checkpoint)
                applied = True
                model._tp_wrapped = True
                self._tp_model = model
                self._tp_plan = plan
                self._tp_engine = engine
                interrupt.release()
            except BaseException:
                model.__dict__.pop("_tp_wrapped", None)
                if applied:
                    engine.unapply(model)
                raise

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
    def engine(self) -> base.Engine:
        """The engine running the plan (see `backends.base.Engine`)."""
        return self._tp_engine

    @property
    def world_size(self) -> int:
        """All devices: data-parallel x tensor-parallel size."""
        return len(self._tp_engine.device_ids)

    @property
    def tensor_parallel_size(self) -> int:
        """Devices each replica's plan is split over (the model axis)."""
        return self._tp_plan.world_size

    @property
    def data_parallel_size(self) -> int:
        """Replicas the batch is split over (the data axis)."""
        return self.world_size // self.tensor_parallel_size

    @property
    def device_ids(self) -> list[str]:
        return list(self._tp_engine.device_ids)

    @property
    def distribution(self):
        """The plan as a `keras.distribution.Distribution` (JAX; None on
        engines without one)."""
        return self._tp_engine.distribution

    @property
    def inputs(self):
        return self._tp_model.inputs

    @property
    def outputs(self):
        return self._tp_model.outputs

    @property
    def input_shape(self):
        return self._tp_model.input_shape

    @property
    def output_shape(self):
        return self._tp_model.output_shape

    def get_layer(self, name=None, index=None):
        """A layer of the wrapped model (`keras.Model.get_layer`)."""
        return self._tp_model.get_layer(name=name, index=index)

    def count_params(self) -> int:
        """Parameters at their real sizes (no vocab padding)."""
        return sum(math.prod(e.shape) for e in self._tp_plan)

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
        engine = self._tp_engine
        with engine.scope():
            engine.prepare_state(self)
            if self._tp_zero_stage:
                _zero_module(engine).shard_optimizer_state(self)
            with engine.guard(self):
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

    # Generation (a wrapped KerasHub CausalLM) --------------------------------

    @property
    def preprocessor(self):
        """The wrapped model's preprocessor (`None` when it has none)."""
        return getattr(self._tp_model, "preprocessor", None)

    @preprocessor.setter
    def preprocessor(self, value):
        self._tp_model.preprocessor = value

    def generate(self, inputs, **kwargs):
        """`CausalLM.generate` on the shards (see `generation.generate`).

        Example:

        ```python
        tp.compile(sampler="greedy")
        tp.generate(["Keras is"], max_length=32)
        ```
        """
        from keras_tensor_parallel import generation

        return generation.generate(self, inputs, **kwargs)

    def compile(self, *args, sampler=None, **kwargs):
        """`keras.Model.compile`; `sampler` as in `CausalLM.compile`."""
        if sampler is not None:
            from keras_tensor_parallel import generation

            generation.set_sampler(self, sampler)
        return super().compile(*args, **kwargs)

    # Weights and saving: full, unsharded, logical shapes --------------------

    def get_weights(self):
        return [self._tp_engine.to_numpy(v) for v in self.weights]

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
        without this library. Written to a temporary file and renamed into
        place, so an existing file is replaced only by a complete one."""
        kwargs.update(zip(("overwrite", "zipped"), args))
        self._tp_engine.save(self._tp_model, filepath, **kwargs)

    def save_weights(self, filepath, *args, **kwargs):
        """Full weights, written atomically (as `save`)."""
        kwargs.update(zip(("overwrite", "max_shard_size"), args))
        self._tp_engine.save(
            self._tp_model, filepath, weights_only=True, **kwargs
        )

    def load_weights(self, filepath, *args, **kwargs):
        return self._tp_model.load_weights(filepath, *args, **kwargs)

    # Built straight into shards; sharded checkpoints (issue 11) -----------

    from_preset = classmethod(loading_factory.from_preset)
    # `TensorParallelKeras.build(make_model, weights=..., ...)` on the
    # class; Keras's own `build(input_shape)` on an instance.
    build = loading_factory.ClassBuild()

    def save_checkpoint(self, directory, *, keep: int | None = 2) -> str:
        """Write weights, optimizer slots, the iteration counter and RNG
        state, each shard where it lives (Orbax), as a new complete step
        of `directory`; see `keras_tensor_parallel.checkpoint.save`."""
        from keras_tensor_parallel import checkpoint

        with self._tp_engine.scope():  # stored (padded) shapes inside
            return checkpoint.save(self, directory, keep=keep)

    def load_checkpoint(self, directory) -> str:
        """Restore the newest complete checkpoint in `directory` into this
        model's shards, at any world size; see
        `keras_tensor_parallel.checkpoint.load`."""
        from keras_tensor_parallel import checkpoint

        with self._tp_engine.scope():  # stored (padded) shapes inside
            return checkpoint.load(self, directory)

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


def _check_overrides(overrides) -> None:
    if overrides is None or not isinstance(overrides, dict):
        return  # plan_model names a non-dict
    bad = [k for k in overrides if not isinstance(k, str)]
    if bad:
        raise ValueError(
            "overrides keys must be regular expressions (strings) matched "
            f"against variable paths. Received: overrides key {bad[0]!r}"
        )


def _plan_for(backend: str, model, size: int, overrides):
    if backend == "torch":  # padded and shared heads, fused experts
        from keras_tensor_parallel.backends.torch_plan import plan_torch

        return plan_torch(model, size, overrides=overrides)
    plan = plan_model(
        model,
        size,
        overrides=overrides,
        slice_operands=backend == "jax",
        op_projections=backend == "jax",
    )
    if backend == "tensorflow":
        lora.refuse_split(model, plan, "TensorFlow")
    return plan


def _check_plan(plan) -> None:
    if plan is not None and not isinstance(plan, ShardingPlan):
        raise ValueError(
            "plan must be a ShardingPlan (from `plan_model` or "
            "`ShardingPlan.from_json`) or None to plan automatically. "
            f"Received: plan={plan!r:.80}"
        )


RECOMPUTE = (None, "attention")


def _check_activations(sequence_parallel, recompute, backend: str) -> None:
    if not isinstance(sequence_parallel, bool):
        raise ValueError(
            "sequence_parallel must be True or False. Received: "
            f"sequence_parallel={sequence_parallel!r:.80}"
        )
    if recompute not in RECOMPUTE:
        raise ValueError(
            f"recompute must be one of {RECOMPUTE}. Received: "
            f"recompute={recompute!r:.80}"
        )
    if (sequence_parallel or recompute) and backend not in ("jax", "torch"):
        raise ValueError(
            "sequence_parallel and recompute run on the JAX and torch "
            "engines only for now: use KERAS_BACKEND=jax or torch, or leave "
            "them off. Received: "
            f"sequence_parallel={sequence_parallel}, recompute={recompute!r}"
            f" on backend {backend!r}"
        )
