"""Sequence parallelism (Megatron-SP, Korthikanti et al. 2022) on the
torch engine.

Plain tensor parallelism keeps every activation between two regions
(norms, dropout, residual adds) whole on every rank. With
`sequence_parallel=True` each rank keeps its chunk of the sequence there,
and the region edges change collective (`torch_collectives.py`):

- a row projection and the vocab-parallel lookup reduce-scatter their
  partial sums along the sequence instead of all-reducing them (g;
  backward: an all-gather of the output gradient);
- a column group (q/k/v, gate/up: projections reading one tensor)
  all-gathers its input once (f; backward: one reduce-scatter of the
  summed input gradient), and so does the tied or untied vocab head.

A reduce-scatter plus an all-gather sends the ring bytes of one all-reduce.
The edges are the planner's (`jax_sequence.region_edges`, from the plan's
kernel splits), and their forwards are `roles.py`'s column, row and vocab
styles run on sequence collectives: the math is the layers' own.

Each rank runs the whole Keras model on its local tensors, so what reads
the sequence from a split tensor is told about the split while a split
forward runs: KerasHub's `compute_causal_mask` (the blocks build their
mask from their split input: they get the whole sequence's mask),
`PositionEmbedding` (its chunk starts at rank x chunk), `Dropout` (it
draws the whole sequence's mask, as one process, and keeps its chunk),
and the model's outputs (all-gathered for the loss; backward keeps the
local chunk).
Replicated parameters read by split activations (norms, also those
applied by ops, row biases, the position table, kv heads replicated
beside split query heads) get partial gradients: each is all-reduced over
the model axis once per backward. Kv blocks shared by several ranks
(`torch_heads.py`) open the repeat's window after their gathered call, as
in plain tensor parallelism.

The split happens only inside a call of the wrapped model whose token
sequence divides by the model-axis size; other calls (a decode step of
`generate`, a prompt that does not divide, shape inference) run as plain
tensor parallelism. A training step on an indivisible sequence is refused.
"""

from __future__ import annotations

import sys
import types

import keras
import torch

from keras_tensor_parallel.backends import roles, torch_heads
from keras_tensor_parallel.backends import torch_collectives as tc
from keras_tensor_parallel.backends.sequence_plan import (
    COLUMN,
    ROW,
    SEQ,
    VOCAB,
    SequencePlan,
    is_reverse,
    plan_sequence,
)
from keras_tensor_parallel.backends.torch_roles import TorchCollectives

__all__ = ["install", "plan_sequence", "SequenceCollectives"]


class SequenceCollectives(TorchCollectives):
    """`roles.Collectives` whose f and g work along the sequence: the
    roles' column, row and vocab forwards become sequence-parallel."""

    def f(self, x):
        return tc.gather_seq(x, SEQ, self.group)

    def g(self, x):
        return tc.scatter_seq(x, SEQ, self.group)


class _State:
    """One split forward: the whole and the local sequence length, set by
    the token lookup inside a call of the wrapped model."""

    def __init__(self, size: int):
        self.size = size
        self.active = self.training = False
        self.full = self.local = None

    def split(self, x) -> bool:
        """Whether `x` holds this rank's chunk of a split forward."""
        return self.local is not None and x.shape[SEQ] == self.local


# Install --------------------------------------------------------------------


def _sequence_forward(style, layer, shard):
    """`style`'s forward of `layer` around the layer's own call (not the
    plain tensor-parallel one installed on the instance)."""
    own = layer.__dict__.pop("call", None)
    try:
        return style.forward(layer, shard)
    finally:
        if own is not None:
            layer.__dict__["call"] = own


def _either(plain, parallel, use):
    def call(inputs, *args, **kwargs):
        chosen = parallel if use(inputs, args, kwargs) else plain
        return chosen(inputs, *args, **kwargs)

    return call


def _lookup_splits(state: _State):
    """The token lookup starts the split when the ids' sequence divides
    by the model-axis size (inside a call of the wrapped model)."""

    def use(ids, args, kwargs) -> bool:
        if is_reverse(args, kwargs):
            return state.split(ids)
        if not state.active or len(ids.shape) < 2:
            return False
        full = int(ids.shape[SEQ])
        if full % state.size:
            if state.training:
                raise ValueError(
                    "sequence_parallel=True splits the sequence over the "
                    f"{state.size} ranks of the model axis: a training "
                    "sequence length must divide by it. Received: "
                    f"sequence length {full}"
                )
            return False
        state.full, state.local = full, full // state.size
        return True

    return use


def _install_edges(sp: SequencePlan, comm, shard, state, journal) -> None:
    styles = {
        COLUMN: roles.ColumnParallel(comm),
        ROW: roles.RowParallel(comm),
        VOCAB: roles.VocabParallel(comm),
    }
    uses = {
        COLUMN: lambda x, a, k: state.split(x),
        ROW: lambda x, a, k: state.local is not None,
        VOCAB: _lookup_splits(state),
    }
    gathering = [(layer, COLUMN) for group in sp.groups for layer in group]
    rest = [(layer, s) for layer, s in sp.edges.values() if s != COLUMN]
    for layer, side in gathering + rest:
        parallel = _sequence_forward(styles[side], layer, shard)
        if side == COLUMN:
            parallel = _shared_window(layer, parallel)
        call = _either(layer.call, parallel, uses[side])
        journal.setattr(layer, "call", call)


def _shared_window(layer, parallel):
    """A kv projection whose block `copies` ranks share: after it, the
    model's repeat of its heads is cut to the local query heads until the
    region's row closes (as `torch_roles.TorchHeads` does in plain TP;
    the plain install registered the close)."""
    copies = max(
        [getattr(v, "_tp_copies", 1) for v in layer._trainable_variables] or [1]
    )
    if copies == 1:
        return parallel

    def call(*args, **kwargs):
        out = parallel(*args, **kwargs)
        torch_heads.open_window(copies)
        return out

    return call


def _install_positions(sp: SequencePlan, shard, state, journal) -> None:
    """A position table read by a split tensor: this rank's chunk starts at
    rank x chunk."""
    for layer in sp.positions:

        def call(inputs, *args, _own=layer.call, **kwargs):
            if state.split(inputs) and inputs.shape[-2] == state.local:
                start = kwargs.pop("start_index", 0)
                kwargs["start_index"] = start + shard.rank * state.local
            return _own(inputs, *args, **kwargs)

        journal.setattr(layer, "call", call)


def _install_dropouts(sp: SequencePlan, shard, state, journal) -> None:
    """Dropout on a split tensor draws the whole sequence's mask, as one
    process would (same seed generator, same shape), and keeps this
    rank's chunk of it: the same masks as one process, not one mask
    repeated per chunk."""
    for layer in sp.dropouts:

        def call(inputs, *args, _own=layer.call, _keep=1 - layer.rate, **kw):
            if not state.split(inputs):
                return _own(inputs, *args, **kw)
            shape = list(inputs.shape)
            shape[SEQ] = state.full
            ones = torch.ones(shape, dtype=inputs.dtype, device=inputs.device)
            kept = _own(ones, *args, **kw)
            if kept is ones:  # not training: nothing dropped
                return inputs
            kept = kept.narrow(SEQ, shard.rank * state.local, state.local)
            zeros = torch.zeros_like(inputs)
            return torch.where(kept != 0, inputs / _keep, zeros)

        journal.setattr(layer, "call", call)


def _install_slicers(sp: SequencePlan, shard, state, journal) -> None:
    """The end of a region the plan replicates (each rank computed it
    whole): keep this rank's chunk. Backward pads the chunk's gradient
    with zeros; the gathered input's reduce-scatter sums the ranks'
    parts, and the region's weights are in `sp.partial`."""
    for layer in sp.slicers:

        def call(inputs, *args, _own=layer.call, **kwargs):
            out = _own(inputs, *args, **kwargs)
            if state.local is None or out.shape[SEQ] != state.full:
                return out
            start = shard.rank * state.local
            return out.narrow(SEQ, start, state.local).contiguous()

        journal.setattr(layer, "call", call)


def _install_masks(state: _State, journal) -> int:
    """KerasHub's blocks build their causal mask from their (split) input:
    while a split forward runs, a mask asked for the local length without
    a cache is the whole sequence's (its queries and keys are gathered)."""
    name = "compute_causal_mask"
    utils = sys.modules.get(
        "keras_hub.src.layers.modeling.transformer_layer_utils"
    )
    original = getattr(utils, name, None)
    if original is None:
        return 0

    def mask(batch_size, input_length, output_length, cache_index=0):
        local = state.local
        if (
            local is not None
            and input_length == output_length == local
            and isinstance(cache_index, int)
            and cache_index == 0
        ):
            input_length = output_length = state.full
        return original(batch_size, input_length, output_length, cache_index)

    users = [
        m
        for m in list(sys.modules.values())
        if isinstance(m, types.ModuleType)
        and getattr(m, name, None) is original
    ]
    for module in users:
        journal.setattr(module, name, mask)
    return len(users)


def _collect(state: _State, group):
    def one(x):
        if isinstance(x, torch.Tensor) and x.ndim > SEQ and state.split(x):
            return tc.collect_seq(x, SEQ, group)
        return x

    return one


def _is_meta(args) -> bool:
    leaves = keras.tree.flatten(args)
    return any(isinstance(t, torch.Tensor) and t.is_meta for t in leaves)


class _Hooks:
    """Once per split forward that keeps a graph: each replicated partial
    gradient is all-reduced over the model axis (one-shot hooks, so a
    later forward that does not split is left alone)."""

    def __init__(self, variables, group):
        self.variables, self.group = list(variables), group
        self.handles: list = []

    def clear(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def arm(self) -> None:
        self.clear()
        for v in self.variables:
            param = v.value
            if isinstance(param, torch.Tensor) and param.requires_grad:
                self.handles.append(param.register_hook(self._once()))

    def _once(self):
        fired = []

        def reduce(grad):
            if fired:
                return grad
            fired.append(True)
            return tc.reduce_param_grad(grad, self.group)

        return reduce


def _install_model(model, state, hooks: _Hooks, group, journal) -> None:
    """The wrapped model's call: where a split forward starts and ends."""
    original = model.call

    def call(*args, **kwargs):
        if state.active or _is_meta((args, kwargs)):
            return original(*args, **kwargs)
        state.active, state.training = True, bool(kwargs.get("training"))
        try:
            out = original(*args, **kwargs)
            if state.local is not None:
                out = keras.tree.map_structure(_collect(state, group), out)
                if torch.is_grad_enabled():
                    hooks.arm()
            return out
        finally:
            state.active = False
            state.full = state.local = None

    journal.setattr(model, "call", call)
    journal.add(hooks.clear)


def install(engine, model, sp: SequencePlan, journal) -> None:
    """Run `model` sequence-parallel as `sp` says, on the engine's
    model-axis group (after its plain roles are installed); each change
    goes to `journal`.

    Example:

    ```python
    sp = plan_sequence(model, engine.plan)
    install(engine, model, sp, journal)  # inside engine.apply
    ```
    """
    groups = engine.groups
    group = groups.model_group if groups is not None else None
    state = _State(engine.plan.world_size)
    shard = roles.Shard(engine.model_rank, state.size, roles.Region())
    comm = SequenceCollectives(group)
    _install_edges(sp, comm, shard, state, journal)
    _install_positions(sp, shard, state, journal)
    _install_dropouts(sp, shard, state, journal)
    _install_slicers(sp, shard, state, journal)
    _install_masks(state, journal)
    _install_model(model, state, _Hooks(sp.partial, group), group, journal)
