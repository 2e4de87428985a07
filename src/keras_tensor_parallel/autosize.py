"""`tensor_parallel_size="auto"`: the smallest model axis that fits.

For each divisor T of the world size, smallest first, the model is wrapped
on a `(data=N/T, model=T)` mesh, the train step (`fit`'s own, Adam, one
global batch) is compiled, and XLA's memory analysis of the compiled
per-device program says what one device needs: its arguments (parameter
shards, Adam's slots, its share of the batch) plus outputs not aliased to
them plus temporaries (activations kept for backward, gradients). The
first T whose need fits `device_memory` is the choice; the rest of the
devices are data parallel. Optimizer slots are never allocated here (they
are shapes with layouts), and the model is unwrapped after each try.

The table (`Choice`), the size loop (`smallest_fit`) and its error are
shared with the torch engine, where the need is computed instead
(`autosize_torch`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import ClassVar

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(value) -> int:
    """Bytes from `device_memory`: an int (bytes) or a string such as
    `"16GB"` (10^9 bytes each) or `"16GiB"` (2^30).

    Raises:
        ValueError: for anything else, or a size that is not positive.

    Example:

    ```python
    parse_memory("16GB")  # 16000000000
    ```
    """
    received = f"Received: device_memory={value!r}"
    if isinstance(value, int) and not isinstance(value, bool):
        nbytes = value
    elif isinstance(value, str) and (
        m := re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", value)
    ):
        unit = _UNITS.get(m[2].lower())
        try:
            number = float(m[1])
        except ValueError:
            unit = None
        if unit is None:
            raise ValueError(
                "device_memory must be bytes (an int) or a string like "
                f"'16GB', '512MiB' (units {sorted(set(_UNITS) - {''})}). "
                f"{received}"
            )
        nbytes = int(number * unit)
    else:
        raise ValueError(
            "device_memory must be bytes (an int) or a string like '16GB'. "
            f"{received}"
        )
    if nbytes <= 0:
        raise ValueError(f"device_memory must be positive. {received}")
    return nbytes


@dataclasses.dataclass(frozen=True)
class Need:
    """What one device needs at one tensor-parallel size (bytes).

    `params` and `optimizer` are read from the per-device shard shapes;
    `arguments`, `outputs`, `aliased` and `temp` are XLA's compiled memory
    analysis; `total = arguments + outputs - aliased + temp`.
    """

    tensor_parallel_size: int
    data_parallel_size: int
    params: int
    optimizer: int
    arguments: int
    outputs: int
    aliased: int
    temp: int

    columns: ClassVar = ("params", "optimizer", "XLA args", "temp")
    source: ClassVar = "from XLA's compiled train step"

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temp

    def figures(self) -> tuple[int, ...]:
        """The table's figures, in `columns` order."""
        return (self.params, self.optimizer, self.arguments, self.temp)


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chosen size and the figures behind it."""

    tensor_parallel_size: int
    device_memory: int
    needs: tuple[Need, ...]

    def table(self) -> str:
        """A small fixed-width table, one row per size tried (the columns
        of the engine's `Need`)."""
        from keras_tensor_parallel.plan import format_bytes

        kind = type(self.needs[0])
        head = ("mesh", *kind.columns, "need")
        rows = [
            (
                f"{n.data_parallel_size} x {n.tensor_parallel_size}",
                *map(format_bytes, n.figures()),
                format_bytes(n.total)
                + (
                    "  <- chosen"
                    if n.tensor_parallel_size == self.tensor_parallel_size
                    else ""
                ),
            )
            for n in self.needs
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(6)]
        lines = [
            f"tensor_parallel_size='auto': {self.tensor_parallel_size} "
            f"(device_memory {format_bytes(self.device_memory)}; per device, "
            f"Adam, {kind.source}; mesh = data x model)"
        ]
        for r in [head, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        return "\n".join(line.rstrip() for line in lines)


def divisors(n: int) -> list[int]:
    """The tensor-parallel sizes `auto` tries on `n` devices."""
    return [t for t in range(1, n + 1) if n % t == 0]


def smallest_fit(
    measure_at: Callable[[int], object],
    world_size: int,
    device_memory,
    *,
    sizes: list[int] | None = None,
    verbose: bool = True,
) -> Choice:
    """The first of `sizes` (default: the divisors of `world_size`,
    smallest first) whose `measure_at(t).total` fits `device_memory`;
    shared by the JAX and torch engines, so both print the same table and
    raise the same error.

    Raises:
        ValueError: when none fits, naming the smallest need.
    """
    limit = parse_memory(device_memory)
    needs = []
    for t in sizes or divisors(world_size):
        needs.append(measure_at(t))
        if needs[-1].total <= limit:
            choice = Choice(t, limit, tuple(needs))
            if verbose:
                print(choice.table())
            return choice
    from keras_tensor_parallel.plan import format_bytes

    best = min(needs, key=lambda x: x.total)
    raise ValueError(
        f"No tensor-parallel size fits device_memory: the smallest need is "
        f"{format_bytes(best.total)} per device at tensor_parallel_size="
        f"{best.tensor_parallel_size} (of {world_size} devices). Received: "
        f"device_memory={device_memory!r} ({format_bytes(limit)})"
    )


def choose(
    model,
    ids: list[str],
    device_memory,
    *,
    overrides: dict | None = None,
    batch=None,
    verbose: bool = True,
    sizes: list[int] | None = None,
) -> Choice:
    """The smallest divisor T of `len(ids)` at which one device's train
    step fits `device_memory` (see the module docstring).

    Args:
        model: A built Keras model (left as it was).
        ids: The device ids (JAX).
        device_memory: Bytes per device (`parse_memory`).
        overrides: Plan overrides.
        batch: `(inputs, targets)` of one global batch; default
            `len(ids)` rows of example inputs (sequences of 128) and zero
            targets under MSE.
        verbose: Print the choice and its table.
        sizes: The sizes to try, smallest first (default: every divisor
            of `len(ids)`; the CLI keeps those its batch divides over).

    Raises:
        ValueError: when no T fits, naming the smallest need.

    Example:

    ```python
    choice = choose(model, ["cpu:0", "cpu:1"], "16GB")
    print(choice.table())
    ```
    """
    return smallest_fit(
        lambda t: measure(model, ids, t, overrides=overrides, batch=batch),
        len(ids),
        device_memory,
        sizes=sizes,
        verbose=verbose,
    )


def measure(model, ids, t: int, *, overrides=None, batch=None) -> Need:
    """`Need` of `model`'s train step on a `(len(ids)/t, t)` mesh; the
    model is wrapped for the measurement and unwrapped after."""
    from keras_tensor_parallel import backends
    from keras_tensor_parallel.plan import plan_model

    plan = plan_model(model, t, overrides=overrides, slice_operands=True)
    engine = backends.make_engine("jax", plan, list(ids))
    engine.apply(model)
    try:
        return _measure(model, engine, t, batch)
    finally:
        engine.unapply(model)


def _measure(model, engine, t: int, batch) -> Need:
    import jax
    import keras

    from keras_tensor_parallel.comms import steps
    from keras_tensor_parallel.loading.abstract import unallocated

    n = len(engine.device_ids)
    x, y = batch or (
        steps.example_inputs(model, batch_size=n, seq_len=128),
        steps.example_targets(model, batch_size=n, seq_len=128),
    )
    probe = _probe_class()(model)
    probe.compile(optimizer=keras.optimizers.Adam(), loss=train_loss(y))
    with engine.scope():
        with unallocated():  # slots as shapes with layouts: no memory
            probe.optimizer.build(probe.trainable_variables)
        probe._symbolic_build(data_batch=(x, y, None))
        mesh = engine.mesh.backend_mesh
        state = tuple(
            [_abstract(v, mesh) for v in group]
            for group in (
                probe.trainable_variables,
                probe.non_trainable_variables,
                probe.optimizer.variables,
                probe.metrics_variables,
            )
        )
        data = jax.tree.map(lambda a: _batch_spec(a, mesh), (x, y, None))
        shardings = jax.tree.map(lambda s: s.sharding, state)
        step = jax.jit(
            probe.train_step, donate_argnums=0, out_shardings=(None, shardings)
        )
        stats = step.lower(state, data).compile().memory_analysis()
    return Need(
        tensor_parallel_size=t,
        data_parallel_size=n // t,
        params=_shard_bytes(state[0] + state[1]),
        optimizer=_shard_bytes(state[2]),
        arguments=int(stats.argument_size_in_bytes),
        outputs=int(stats.output_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes),
        temp=int(stats.temp_size_in_bytes),
    )


def _probe_class():
    import keras

    class Probe(keras.Model):
        """The model under `fit`'s own trainer, as `TensorParallelKeras`
        runs it (that class is built on the chosen size after this)."""

        def __init__(self, inner):
            super().__init__(name="tp_memory_probe")
            self.inner = inner

        def call(self, inputs, training=None):
            return self.inner(inputs, training=training)

    return Probe


def train_loss(y):
    """MSE for float targets shaped like the output; sparse cross-entropy
    on logits for integer targets (a token LM)."""
    import keras
    import numpy as np

    if np.issubdtype(np.asarray(y).dtype, np.integer):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return "mse"


def _abstract(variable, mesh):
    """A variable as shape, dtype and sharding: its value's where it is
    on the mesh, else its layout's (replicated without one: state such
    as Adam's step counter, made on one device before wrapping)."""
    import jax
    from keras.distribution import TensorLayout

    value = getattr(variable, "_value", None)
    devices = set(mesh.devices.flat)
    sharding = getattr(value, "sharding", None)
    if sharding is not None and sharding.device_set == devices:
        return jax.ShapeDtypeStruct(
            value.shape, value.dtype, sharding=value.sharding
        )
    layout = getattr(variable, "_layout", None)
    if isinstance(layout, TensorLayout):
        layout = layout.backend_layout
    if layout is None:
        spec = jax.sharding.PartitionSpec()
        layout = jax.sharding.NamedSharding(mesh, spec)
    shape = tuple(variable.shape)
    return jax.ShapeDtypeStruct(shape, variable.dtype, sharding=layout)


def _batch_spec(array, mesh):
    import jax
    import numpy as np

    from keras_tensor_parallel.plan import DATA_AXIS

    array = np.asarray(array)
    spec = jax.sharding.PartitionSpec(DATA_AXIS) if array.ndim else None
    sharding = jax.sharding.NamedSharding(
        mesh, spec or jax.sharding.PartitionSpec()
    )
    return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=sharding)


def _shard_bytes(specs) -> int:
    """Bytes one device holds of `specs` (the largest shard of each)."""
    import math

    import numpy as np

    return sum(
        math.prod(s.sharding.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
        for s in specs
    )
