"""Megatron roles for the one-process-per-device engines, backend-neutral.

As torch's `ColwiseParallel`/`RowwiseParallel` and BlackSamorez's undoable
shard actions: each role says how it partitions a variable (keep this
rank's contiguous shard), how it undoes that (put the full value back),
and what the layer owning such variables does in forward:

- column / heads: `f(x)` before the matmul (identity forward, all-reduce of
  the input gradient backward); the output stays local.
- row: local matmul, then `g` (all-reduce forward, identity backward); the
  replicated bias is added once after the reduce.
- vocab: masked lookup of the local rows, then `g`; the reverse head
  computes local logits and all-gathers them along the vocab dim.
- replicated: nothing.

The math is written with `keras.ops`; the collectives come from a
`Collectives` object each engine passes in (`torch_roles.py`,
`tensorflow_roles.py`), so torch and TensorFlow run the same roles. What a
layer computes (which variable is the kernel, its einsum labels, which
tables an embedding has) comes from the planner's rules
(`plan.rules.rule_for`), never from class names.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Protocol

import keras
import numpy as np

from keras_tensor_parallel.backends import roles_ops
from keras_tensor_parallel.plan import Role, VariablePlan
from keras_tensor_parallel.plan.rules import EmbeddingRule, LinearRule, rule_for


class Collectives(Protocol):
    """What the roles need from a backend: Megatron's f and g, gathers
    with uneven shard sizes, and a few tensor basics."""

    def f(self, x) -> Any:
        """Identity forward, all-reduce of the gradient backward."""

    def g(self, x) -> Any:
        """All-reduce forward, identity backward."""

    def gather_last(self, x, sizes: list[int], index: int) -> Any:
        """All-gather along the last dim (differentiable: backward takes
        this rank's part, number `index`)."""

    def gather_dim(self, local, dim: int, sizes: list[int]) -> Any:
        """All-gather a value along `dim` (not differentiated)."""

    def is_tensor(self, x) -> bool:
        """Whether `x` is a backend tensor (f applies only to those)."""

    def detach(self, value) -> Any:
        """`value` outside any gradient tape/graph."""

    def take(self, value, dim: int, start: int, stop: int) -> Any:
        """A copy of `value[start:stop]` along `dim`."""

    def to_numpy(self, value) -> np.ndarray:
        """A host copy."""


def shard_sizes(n: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous chunks of `n` (first ones one larger).

    Example:

    ```python
    shard_sizes(7, 2)  # [4, 3]
    ```
    """
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# Split variables -------------------------------------------------------------


class _SplitMixin:
    """A variable holding its local shard; reads and assigns full arrays."""

    _tp_comm: Collectives
    _tp_full_shape: tuple
    _tp_dim: int
    _tp_sizes: list
    _tp_start: int
    _tp_stop: int

    def numpy(self):
        if "_tp_gathered" in self.__dict__:  # gathered for saving
            return self._tp_gathered
        return self._tp_comm.to_numpy(full_value(self))

    def __array__(self, dtype=None, copy=None):
        out = self.numpy()
        return out.astype(dtype) if dtype is not None else out

    def local_slice(self, value):
        """The local part of a full-shape `value`."""
        index = [slice(None)] * len(self._tp_full_shape)
        index[self._tp_dim] = slice(self._tp_start, self._tp_stop)
        return value[tuple(index)]

    def assign(self, value):
        shape = tuple(getattr(value, "shape", np.shape(value)))
        if shape == tuple(self._tp_full_shape):
            value = self.local_slice(value)
        return super().assign(value)


_SPLIT_CLASSES: dict[tuple, type] = {}


def _split_class(cls: type, comm: Collectives) -> type:
    key = (cls, id(comm))
    if key not in _SPLIT_CLASSES:
        _SPLIT_CLASSES[key] = type(
            f"Split{cls.__name__}", (_SplitMixin, cls), {"_tp_comm": comm}
        )
    return _SPLIT_CLASSES[key]


def is_split(variable) -> bool:
    return isinstance(variable, _SplitMixin)


def _set_value(variable, value) -> None:
    # Keras's own (re)initialization: the backend makes a new native
    # variable of the new shape.
    variable._shape = tuple(value.shape)
    variable._value = None
    variable._initialize(value)


_SPLIT_ATTRS = ("full_shape", "dim", "sizes", "start", "stop")


def split_variable(
    variable, dim: int, rank: int, size: int, comm: Collectives
) -> None:
    """Keep only this rank's shard of `variable` along `dim`, in place."""
    full = comm.detach(variable.value)
    sizes = shard_sizes(full.shape[dim], size)
    start = sum(sizes[:rank])
    local = comm.take(full, dim, start, start + sizes[rank])
    variable._tp_full_shape = tuple(full.shape)
    variable._tp_dim = dim
    variable._tp_sizes = sizes
    variable._tp_start = start
    variable._tp_stop = start + sizes[rank]
    variable.__class__ = _split_class(type(variable), comm)
    _set_value(variable, local)


def unsplit_variable(variable, full) -> None:
    """Undo `split_variable` given the full value (also after a partial
    split: whatever was set is reset)."""
    if is_split(variable):
        variable.__class__ = type(variable).__mro__[2]
    for name in _SPLIT_ATTRS:
        variable.__dict__.pop(f"_tp_{name}", None)
    _set_value(variable, full)


def full_value(variable):
    """The full value of a (possibly split) variable, as a backend tensor:
    a collective where split."""
    if not is_split(variable):
        return keras.ops.stop_gradient(variable.value)
    comm = variable._tp_comm
    local = comm.detach(variable.value)
    return comm.gather_dim(local, variable._tp_dim, variable._tp_sizes)


# What forward needs ----------------------------------------------------------


class Region:
    """Where column-parallel regions start: one f per input tensor, so q,
    k and v reading one tensor all-reduce its gradient once, not three
    times. A row layer ends the region and drops the reference."""

    def __init__(self):
        self._input = None
        self._entered = None
        self.on_close: list = []  # called when a row ends the region

    def enter(self, x, comm: Collectives):
        if not comm.is_tensor(x):
            return x
        if self._input is not x:
            self._input, self._entered = x, comm.f(x)
        return self._entered

    def close(self) -> None:
        self._input = self._entered = None
        for hook in self.on_close:
            hook()


@dataclasses.dataclass
class Shard:
    """This rank's place: `rank` of `size`, and the engine's `region`."""

    rank: int
    size: int
    region: Region


# Styles ----------------------------------------------------------------------


class Style:
    """A role: partition / undo one variable; forward of its layer, with
    the collectives `comm` of the engine's backend."""

    role = Role.REPLICATED

    def __init__(self, comm: Collectives):
        self.comm = comm

    def partition(self, variable, entry: VariablePlan, shard: Shard) -> None:
        split_variable(
            variable, entry.split_dim, shard.rank, shard.size, self.comm
        )

    def undo(self, variable, full) -> None:
        unsplit_variable(variable, full)

    def forward(self, layer, shard: Shard):
        """The layer's parallel `call`, or None to keep its own."""
        return None

    def install(self, layer, shard: Shard, journal) -> None:
        call = self.forward(layer, shard)
        if call is not None:
            journal.setattr(layer, "call", call)


class Replicated(Style):
    role = Role.REPLICATED

    def partition(self, variable, entry, shard) -> None:
        return None

    def undo(self, variable, full) -> None:
        return None


class ColumnParallel(Style):
    """Split output features: f on the input, local output."""

    role = Role.COLUMN

    def forward(self, layer, shard):
        original, comm = layer.call, self.comm

        def call(inputs, *args, **kwargs):
            return original(shard.region.enter(inputs, comm), *args, **kwargs)

        return call


class HeadsParallel(ColumnParallel):
    """q/k/v split on their head axis: a column region per head group."""

    role = Role.HEADS


class RowParallel(Style):
    """Split input features: local matmul, g, then bias and activation."""

    role = Role.ROW

    def forward(self, layer, shard):
        rule = rule_for(layer)
        equation = _einsum_form(layer, rule)
        kernel, bias = rule.kernel, rule.bias
        activation = getattr(layer, "activation", None)
        g, features = self.comm.g, len(rule.input_spec)

        def call(inputs, *args, **kwargs):
            shard.region.close()
            x = g(_project(equation, features, inputs, kernel))
            if bias is not None:
                x = keras.ops.add(x, bias)
            if activation is not None:
                x = activation(x)
            return x

        return call

    def install(self, layer, shard, journal) -> None:
        super().install(layer, shard, journal)
        # The layer now sees local features: an input spec of the full
        # width (Dense's) would reject them.
        journal.setattr(layer, "input_spec", None)


def _einsum_form(layer, rule) -> str:
    """The projection as one einsum; only kernels whose every label is an
    input or output label (no conv window) have one."""
    ok = isinstance(rule, LinearRule) and all(
        c in rule.input_spec or c in rule.output_spec for c in rule.kernel_spec
    )
    if not ok:
        raise ValueError(
            f"No row-parallel form for layer {layer.path} "
            f"({type(layer).__name__}): its rule is not an einsum "
            "projection. Received: a kernel split on its input dim"
        )
    # Rules align specs to the right: the leading (batch) dims pass
    # through, flattened into one label by `_project`.
    used = rule.input_spec + rule.kernel_spec + rule.output_spec
    row = next(c for c in string.ascii_letters if c not in used)
    return f"{row}{rule.input_spec},{rule.kernel_spec}->{row}{rule.output_spec}"


def _project(equation: str, features: int, x, kernel):
    """The row projection with x's leading dims flattened into one:
    TensorFlow's einsum gradient for a `...` equation builds the kernel
    gradient per row before summing (a (batch, seq, in, out) tensor: 4 s
    per step for a 2-layer OPT at hidden 256)."""
    shape = keras.ops.shape(x)
    lead, feat = shape[: len(shape) - features], shape[len(shape) - features :]
    out = keras.ops.einsum(equation, keras.ops.reshape(x, (-1, *feat)), kernel)
    return keras.ops.reshape(out, (*lead, *keras.ops.shape(out)[1:]))


class VocabParallel(Style):
    """Rows of a token table: masked local lookup then g; the reverse head
    (tied: the transposed table; untied: its own table split on vocab)
    gives local logits, all-gathered along vocab."""

    role = Role.VOCAB

    def forward(self, layer, shard):
        rule = rule_for(layer)
        if not isinstance(rule, EmbeddingRule):
            raise ValueError(
                f"No vocab-parallel form for layer {layer.path} "
                f"({type(layer).__name__}). Received: a table split on vocab"
            )
        table = rule.tables[0]
        head = rule.tables[1] if len(rule.tables) > 1 else None
        comm = self.comm

        def call(inputs, *args, **kwargs):
            reverse = kwargs.pop("reverse", args[0] if args else False)
            if reverse:
                return _reverse(layer, inputs, table, head, shard, comm)
            out = _local_lookup(table, inputs)
            return keras.ops.cast(comm.g(out), layer.compute_dtype)

        return call


def _local_lookup(table, inputs):
    """Rows of the ids this rank holds; zeros for the others (another
    rank's rows fill them in the all-reduce)."""
    start, stop = table._tp_start, table._tp_stop
    ids = keras.ops.cast(keras.ops.convert_to_tensor(inputs), "int64")
    inside = keras.ops.logical_and(ids >= start, ids < stop)
    local = keras.ops.where(inside, ids - start, keras.ops.zeros_like(ids))
    out = keras.ops.take(table, local, axis=0)
    mask = keras.ops.cast(keras.ops.expand_dims(inside, -1), out.dtype)
    return out * mask


def _reverse(layer, inputs, table, head, shard, comm):
    """Local logits for this rank's vocab rows, gathered along vocab."""
    x = comm.f(inputs)
    kernel = keras.ops.transpose(table) if head is None else head
    sizes = (table if head is None else head)._tp_sizes
    reverse_dtype = getattr(layer, "reverse_dtype", None)
    if reverse_dtype is not None:
        x = keras.ops.cast(x, reverse_dtype)
        kernel = keras.ops.cast(kernel, reverse_dtype)
    logits = comm.gather_last(keras.ops.matmul(x, kernel), sizes, shard.rank)
    cap = getattr(layer, "logit_soft_cap", None)
    if cap is not None:
        logits = keras.ops.multiply(keras.ops.tanh(logits / cap), cap)
    return logits


def make_styles(comm: Collectives) -> dict[Role, Style]:
    """One style object per role, running on the collectives `comm`.

    Example:

    ```python
    styles = make_styles(comm)  # comm: a backend's Collectives
    styles[Role.ROW].install(layer, shard, journal)
    ```
    """
    return {
        Role.COLUMN: ColumnParallel(comm),
        Role.HEADS: HeadsParallel(comm),
        Role.ROW: RowParallel(comm),
        Role.VOCAB: VocabParallel(comm),
        Role.REPLICATED: Replicated(comm),
    }


# A layer owning variables of several roles runs as the strongest one: a
# row kernel's bias is replicated, a vocab table may sit beside others.
_PRECEDENCE = (Role.VOCAB, Role.ROW, Role.HEADS, Role.COLUMN)


def layer_style(entries, styles: dict[Role, Style]) -> Style:
    """The style that runs a layer, from its variables' plan entries."""
    roles = {e.role for e in entries if e.is_split}
    for role in _PRECEDENCE:
        if role in roles:
            # Weights the layer's own ops apply play their role at the op.
            return roles_ops.Dispatch(styles[role], entries)
    return styles[Role.REPLICATED]
