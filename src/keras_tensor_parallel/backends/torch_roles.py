"""Megatron roles on torch, one small style object each.

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

What a layer computes (which variable is the kernel, its einsum labels,
which tables an embedding has) comes from the planner's rules
(`plan.rules.rule_for`), never from class names.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import torch

from keras_tensor_parallel.backends import torch_collectives as tc
from keras_tensor_parallel.plan import Role, VariablePlan
from keras_tensor_parallel.plan.rules import EmbeddingRule, LinearRule, rule_for

# Split variables -------------------------------------------------------------


class _SplitMixin:
    """A variable holding its local shard; reads and assigns full arrays."""

    _tp_full_shape: tuple
    _tp_dim: int
    _tp_sizes: list
    _tp_start: int
    _tp_stop: int

    def numpy(self):
        if "_tp_gathered" in self.__dict__:  # gathered for saving
            return self._tp_gathered
        full = tc.gather_dim(self.value.detach(), self._tp_dim, self._tp_sizes)
        return full.cpu().numpy()

    def __array__(self, dtype=None):
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


_SPLIT_CLASSES: dict[type, type] = {}


def _split_class(cls: type) -> type:
    if cls not in _SPLIT_CLASSES:
        _SPLIT_CLASSES[cls] = type(
            f"Split{cls.__name__}", (_SplitMixin, cls), {}
        )
    return _SPLIT_CLASSES[cls]


def is_split(variable) -> bool:
    return isinstance(variable, _SplitMixin)


def _set_value(variable, value) -> None:
    variable._shape = tuple(value.shape)
    variable._value = None
    variable._initialize(value)


_SPLIT_ATTRS = ("full_shape", "dim", "sizes", "start", "stop")


def split_variable(variable, dim: int, rank: int, size: int) -> None:
    """Keep only this rank's shard of `variable` along `dim`, in place."""
    full = variable.value.detach()
    sizes = tc.shard_sizes(full.shape[dim], size)
    start = sum(sizes[:rank])
    local = full.narrow(dim, start, sizes[rank]).clone()
    variable._tp_full_shape = tuple(full.shape)
    variable._tp_dim = dim
    variable._tp_sizes = sizes
    variable._tp_start = start
    variable._tp_stop = start + sizes[rank]
    variable.__class__ = _split_class(type(variable))
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
    """The full value of a (possibly split) variable: a collective."""
    if not is_split(variable):
        return variable.value.detach()
    return tc.gather_dim(
        variable.value.detach(), variable._tp_dim, variable._tp_sizes
    )


# What forward needs ----------------------------------------------------------


class Region:
    """Where column-parallel regions start: one f per input tensor, so q,
    k and v reading one tensor all-reduce its gradient once, not three
    times. A row layer ends the region and drops the reference."""

    def __init__(self):
        self._input = None
        self._entered = None

    def enter(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        if self._input is not x:
            self._input, self._entered = x, tc.f(x)
        return self._entered

    def close(self) -> None:
        self._input = self._entered = None


@dataclasses.dataclass
class Shard:
    """This rank's place: `rank` of `size`, and the engine's `region`."""

    rank: int
    size: int
    region: Region


# Styles ----------------------------------------------------------------------


class Style:
    """A role: partition / undo one variable; forward of its layer."""

    role = Role.REPLICATED

    def partition(self, variable, entry: VariablePlan, shard: Shard) -> None:
        split_variable(variable, entry.split_dim, shard.rank, shard.size)

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
        original = layer.call

        def call(inputs, *args, **kwargs):
            return original(shard.region.enter(inputs), *args, **kwargs)

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

        def call(inputs, *args, **kwargs):
            shard.region.close()
            x = tc.g(keras.ops.einsum(equation, inputs, kernel))
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
    # Rules align specs to the right: leading (batch) dims pass through.
    return f"...{rule.input_spec},{rule.kernel_spec}->...{rule.output_spec}"


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
        start, stop = table._tp_start, table._tp_stop

        def call(inputs, *args, **kwargs):
            reverse = kwargs.pop("reverse", args[0] if args else False)
            if reverse:
                return _reverse(layer, inputs, table, head, shard)
            ids = keras.ops.convert_to_tensor(inputs).long()
            inside = (ids >= start) & (ids < stop)
            local = torch.where(inside, ids - start, torch.zeros_like(ids))
            out = keras.ops.take(table, local, axis=0)
            out = out * inside.unsqueeze(-1).to(out.dtype)
            return keras.ops.cast(tc.g(out), layer.compute_dtype)

        return call


def _reverse(layer, inputs, table, head, shard):
    """Local logits for this rank's vocab rows, gathered along vocab."""
    x = tc.f(inputs)
    kernel = keras.ops.transpose(table) if head is None else head
    sizes = (table if head is None else head)._tp_sizes
    reverse_dtype = getattr(layer, "reverse_dtype", None)
    if reverse_dtype is not None:
        x = keras.ops.cast(x, reverse_dtype)
        kernel = keras.ops.cast(kernel, reverse_dtype)
    logits = tc.gather_last(keras.ops.matmul(x, kernel), sizes, shard.rank)
    cap = getattr(layer, "logit_soft_cap", None)
    if cap is not None:
        logits = keras.ops.multiply(keras.ops.tanh(logits / cap), cap)
    return logits


STYLES: dict[Role, Style] = {
    Role.COLUMN: ColumnParallel(),
    Role.HEADS: HeadsParallel(),
    Role.ROW: RowParallel(),
    Role.VOCAB: VocabParallel(),
    Role.REPLICATED: Replicated(),
}

# A layer owning variables of several roles runs as the strongest one: a
# row kernel's bias is replicated, a vocab table may sit beside others.
_PRECEDENCE = (Role.VOCAB, Role.ROW, Role.HEADS, Role.COLUMN)


def style_for(role: Role | str) -> Style:
    """The style object of a role."""
    return STYLES[Role(role)]


def layer_style(entries) -> Style:
    """The style that runs a layer, from its variables' plan entries."""
    roles = {e.role for e in entries if e.is_split}
    for role in _PRECEDENCE:
        if role in roles:
            return STYLES[role]
    return STYLES[Role.REPLICATED]
