"""Plan and load models larger than one device.

    source ──build unallocated──▶ plan ──place each value as shards──▶ wrap

`TensorParallelKeras.from_preset` and `TensorParallelKeras.build` call
`load`; `keras_tensor_parallel.plan_model` (`plan_model` here) accepts the
same sources through `plan_source`.
"""

from __future__ import annotations

from keras_tensor_parallel import devices as devices_lib
from keras_tensor_parallel.loading import abstract, sources
from keras_tensor_parallel.plan import planner


def resolve(source, *, model_class=None, weights=None) -> sources.Source:
    """The model of `source`, built with unallocated variables, and the
    files its values come from.

    Args:
        source: A KerasHub or Hugging Face preset directory, or a function
            that builds a Keras model.
        model_class: Presets only: the KerasHub class to build (default:
            the task saved in the preset, else its backbone).
        weights: Builders only: a `.keras` or `.weights.h5` file.

    Raises:
        ValueError: for a path that is not a preset, or an argument that
            does not apply to this kind of source.

    Example:

    ```python
    src = resolve("opt_preset/")
    print(len(src.created), "variables, none allocated")
    ```
    """
    if callable(source) and not isinstance(source, (str, bytes)):
        if model_class is not None:
            raise ValueError(
                "model_class applies to presets only. Received: "
                f"model_class={model_class!r} with a builder function"
            )
        return sources.builder(source, weights)
    if weights is not None:
        raise ValueError(
            "weights applies to builder functions; a preset carries its own. "
            f"Received: weights={weights!r}"
        )
    return sources.preset(source, model_class)


def plan_source(
    source,
    world_size: int,
    *,
    model_class=None,
    overrides: dict | None = None,
    slice_operands: bool = True,
):
    """Plan a preset or builder without allocating a single weight.

    Args:
        source: A preset directory or a function that builds the model.
        world_size: Number of devices to plan for.
        model_class: For presets: the KerasHub class to build (default: the
            task saved in the preset, else its backbone).
        overrides: As for `plan_model`.
        slice_operands: As for `plan_model`.

    Returns:
        The `ShardingPlan`.

    Example:

    ```python
    plan = plan_source("llama3_70b_config_only/", 8)
    print(plan.table())
    ```
    """
    from keras_tensor_parallel.plan import plan_model

    model = resolve(source, model_class=model_class).model
    return plan_model(
        model, world_size, overrides=overrides, slice_operands=slice_operands
    )


def plan_model(
    model,
    world_size: int,
    *,
    overrides: dict | None = None,
    slice_operands: bool = True,
    model_class=None,
):
    """`keras_tensor_parallel.plan_model`: plan a built model, a function
    that builds one, or a preset directory (the last two without
    allocating a weight).

    Args:
        model: A built Keras model, a builder function or a KerasHub /
            Hugging Face preset directory.
        world_size: Number of devices on the model axis.
        overrides: As for `plan.plan_model`.
        slice_operands: As for `plan.plan_model`.
        model_class: Presets only: the KerasHub class to build.

    Returns:
        The `ShardingPlan`.

    Example:

    ```python
    plan = plan_model("llama3_70b_config_only/", 8)
    ```
    """
    if planner.is_source(model):
        return plan_source(
            model,
            world_size,
            model_class=model_class,
            overrides=overrides,
            slice_operands=slice_operands,
        )
    return planner.plan_model(
        model, world_size, overrides=overrides, slice_operands=slice_operands
    )


def load(
    source,
    *,
    wrapper,
    model_class=None,
    weights=None,
    world_size: int | None = None,
    device_ids=None,
    distributed_backend: str = "auto",
    overrides: dict | None = None,
    plan=None,
    **kwargs,
):
    """Build `source` straight into shards and wrap it in `wrapper`.

    Every variable is created with its plan's layout (torch: its local
    shard) and its saved value read shard by shard. Files are checked
    before anything is read; on error every placed value is dropped.

    Args:
        source: A preset directory or a function that builds the model.
        wrapper: The class to wrap with (`TensorParallelKeras`).
        model_class, weights: See `resolve`.
        world_size, device_ids, distributed_backend, overrides, plan,
            **kwargs: As for `TensorParallelKeras(...)`.

    Returns: A `wrapper` instance.

    Example:

    ```python
    tp = load("opt_preset/", wrapper=TensorParallelKeras, world_size=4)
    ```
    """
    backend = _loading_backend(distributed_backend)
    ids = devices_lib.resolve_devices(
        world_size=world_size, device_ids=device_ids, backend=backend
    )
    src = resolve(source, model_class=model_class, weights=weights)
    _choose_size(src.model, ids, backend, overrides, kwargs)
    if plan is None:
        size = kwargs.get("tensor_parallel_size")
        plan = _plan(src.model, size, ids, overrides, backend)
    place_all = _place_all_torch if backend == "torch" else _place_all
    try:
        place_all(src, plan, ids)
        tp = wrapper(
            src.model,
            len(ids),
            device_ids=ids,
            distributed_backend=backend,
            plan=plan,
            **kwargs,
        )
    except BaseException:  # Ctrl-C too: nothing half-loaded stays
        abstract.unplace(src.created)
        raise
    if src.compile_task:
        src.model.compile()  # KerasHub tasks come compiled by default
    return tp


def _loading_backend(distributed_backend) -> str:
    backend = devices_lib.validate_backend(distributed_backend)
    if backend not in ("jax", "torch"):
        raise ValueError(
            "Loading straight into shards runs on the jax and torch "
            f"engines; received distributed_backend={backend!r}"
        )
    return backend


def _choose_size(model, ids, backend: str, overrides, kwargs) -> None:
    """`tensor_parallel_size="auto"` is chosen here, from the unallocated
    model's shapes (`autosize.measure` lays out, allocates nothing),
    before any shard exists; the wrapper gets the size it chose."""
    _check_auto(kwargs.get("tensor_parallel_size"), backend)
    if "device_memory" in kwargs or kwargs.get("tensor_parallel_size"):
        kwargs["tensor_parallel_size"] = devices_lib.tensor_parallel_size(
            kwargs.get("tensor_parallel_size"), ids, backend, model=model,
            device_memory=kwargs.pop("device_memory", None),
            overrides=overrides)  # fmt: skip


def _check_auto(size, backend: str) -> None:
    if size == "auto" and backend == "torch":
        # The torch estimate runs a measured forward pass: it needs values,
        # which a model built straight into shards has only after loading.
        raise ValueError(
            "tensor_parallel_size='auto' with from_preset/build is chosen "
            "from shapes on the JAX engine; on torch pass an integer "
            "tensor_parallel_size (or wrap a built model with "
            "TensorParallelKeras(model, tensor_parallel_size='auto', ...)). "
            "Received: tensor_parallel_size='auto' on the torch engine"
        )


def _plan(model, size, ids, overrides, backend: str):
    size = devices_lib.tensor_parallel_size(size, ids, backend)
    if backend == "torch":  # padded and shared heads, fused experts
        from keras_tensor_parallel.backends.torch_plan import plan_torch

        return plan_torch(model, size, overrides=overrides)
    # As `TensorParallelKeras(...)`: the torch engine runs the model's own
    # code per rank and cannot slice unsplit operands.
    return planner.plan_model(
        model,
        size,
        overrides=overrides,
        slice_operands=backend == "jax",
        op_projections=backend in ("jax", "torch"),
    )


def _place_all(src: sources.Source, plan, ids) -> None:
    """Give every unallocated variable of `src` its sharded value."""
    from keras_tensor_parallel.distribution import AutoTPDistribution
    from keras_tensor_parallel.loading import place as place_lib

    distribution = AutoTPDistribution(plan, device_ids=ids)
    opened = sources.open_parts(src, src.created)  # checks before reading
    try:
        for reader, names in opened:
            chosen = [v for v in src.created if id(v) in names]
            place_lib.place(chosen, distribution, weights=reader, names=names)
        rest = [v for v in src.created if v._value is None]
        place_lib.place(rest, distribution)  # initializers, into shards
    finally:
        for reader, _ in opened:
            reader.close()


def _place_all_torch(src: sources.Source, plan, ids) -> None:
    """Each rank creates every split variable at its local shard shape and
    reads only its own rows; the ranks agree that every one succeeded (a
    rank failing alone must not leave the others waiting in `apply`)."""
    from keras_tensor_parallel.backends import torch_collectives as tc
    from keras_tensor_parallel.loading import place_torch

    error = None
    try:
        opened = sources.open_parts(src, src.created)  # checks first
        try:
            for reader, names in opened:
                chosen = [v for v in src.created if id(v) in names]
                place_torch.place_local(
                    chosen, plan, weights=reader, names=names
                )
            rest = [v for v in src.created if v._value is None]
            place_torch.place_local(rest, plan)  # initializers, local
        finally:
            for reader, _ in opened:
                reader.close()
    except Exception as e:  # noqa: BLE001 - re-raised on every rank
        error = e
    failed = tc.first_error(error)
    if failed is not None:
        raise failed
