"""Where sequence parallelism splits and gathers, for the engines that
run the whole model per rank (`torch_sequence.py`): decided from the
planner's region edges (`jax_sequence.region_edges`: the plan's kernel
splits) and the traced graph, checked before anything changes.

A row projection's output and the token lookup's are split along the
sequence; what reads a split tensor outside a region keeps it split when
the planner's propagator for that op keeps a sequence split in place
(norms, elementwise ops, dropout); a column edge, and a replicated
projection beside one (kv heads beside split query heads), gathers it.
"""

from __future__ import annotations

import dataclasses

import keras

from keras_tensor_parallel.backends.jax_sequence import (
    COLUMN,
    ROW,
    VOCAB,
    region_edges,
)
from keras_tensor_parallel.plan import propagate
from keras_tensor_parallel.plan.rules import LinearRule, has_rule, rule_for

SEQ = 1  # the sequence dim of [batch, seq, ...] activations


@dataclasses.dataclass
class SequencePlan:
    """What the installer changes, decided before anything changes."""

    edges: dict  # id(layer) -> (layer, side), the region edges
    groups: list  # layers reading a split tensor, that gather it
    partial: list  # replicated variables with partial gradients
    positions: list  # PositionEmbedding layers reading split tensors
    dropouts: list  # Dropout layers (rate > 0) reading split tensors
    # Replicated projections ending a replicated region (attention the
    # plan keeps whole): their output is cut back to the local chunk.
    slicers: list


def refuse(why: str, received: str) -> None:
    raise ValueError(
        f"sequence_parallel=True on the torch engine: {why}. Use "
        f"sequence_parallel=False for this model. Received: {received}"
    )


def _check_plan(plan, edges: dict) -> None:
    """Refuse what the edges cannot express: split variables outside a
    region edge (op-level or expert weights), no region at all. Kv heads
    shared by several ranks run: their column edge opens the repeat's
    window (`torch_sequence._shared_window`)."""
    if not any(side == ROW for _, side in edges.values()):
        refuse("the plan has no region (no row-parallel layer)", "no rows")
    paths = {layer.path for layer, _ in edges.values()}
    other = sorted({e.layer for e in plan if e.is_split} - paths)
    if other:
        refuse(
            "only Dense/EinsumDense projections and token embeddings can "
            "be region edges; these layers' weights are split otherwise",
            f"layers {other[:3]}",
        )


def _check_edge(layer, side: str, node) -> None:
    if getattr(layer, "lora_enabled", False):
        refuse("LoRA-enabled projections are not supported", layer.path)
    if side == VOCAB:
        if getattr(layer, "mask_zero", False):
            refuse(
                "embeddings with mask_zero=True are not supported", layer.path
            )
        ndim = len(node.inputs[0].shape) if node.inputs else 0
        if not is_reverse(node.args[1:], node.kwargs) and ndim < 2:
            refuse(
                "token ids need a sequence dim", f"{layer.path} ids {ndim}-D"
            )
        return
    if type(layer) not in (keras.layers.Dense, keras.layers.EinsumDense):
        refuse(
            "only Dense and EinsumDense projections are supported", layer.path
        )
    shape = node.inputs[0].shape if side == COLUMN else node.outputs[0].shape
    if len(shape) < 3:
        refuse(
            "region edges need [batch, sequence, ...] activations",
            f"{layer.path} with shape {tuple(shape)} (no sequence dim)",
        )


def is_reverse(args, kwargs) -> bool:
    """Whether an embedding call is the tied logits projection."""
    return bool(kwargs.get("reverse") or (args and args[0] is True))


def _replicated_projection(layer, plan) -> bool:
    if not has_rule(layer):
        return False
    rule = rule_for(layer)
    if not isinstance(rule, LinearRule):
        return False
    entry = plan.get(rule.kernel.path)
    return entry is not None and not entry.is_split


def _partial(layer, plan) -> list:
    """`layer`'s replicated trainable variables (but those the engine
    already sums, applied to split heads: `sum_grad`)."""
    out = []
    for v in layer.trainable_variables:
        entry = plan.get(v.path)
        summed = getattr(entry, "sum_grad", False)
        if entry is not None and not entry.is_split and not summed:
            out.append(v)
    return out


class _Walk:
    """The split and whole tensors so far, and the plan being made."""

    def __init__(self, plan, edges: dict):
        self.plan, self.split, self.whole = plan, set(), set()
        self.sp = SequencePlan(edges, [], [], [], [], [])
        self.groups: dict = {}
        self.partial: dict = {}

    def mark(self, tensors, into: set) -> None:
        into.update(id(t) for t in tensors)

    def replicated(self, layer, node=None) -> None:
        """`layer`'s replicated weights see one chunk's (or a zero-padded)
        gradient: partial, all-reduced; so do the variables an op node
        reads itself (Qwen3's norm scales, applied by `ops.multiply`)."""
        if isinstance(layer, keras.layers.Layer):
            for v in _partial(layer, self.plan):
                self.partial[id(v)] = v
        if node is None:
            return
        for v in keras.tree.flatten((node.args, node.kwargs)):
            if isinstance(v, keras.Variable) and v.trainable:
                entry = self.plan.get(v.path)
                if entry is not None and not entry.is_split:
                    if not getattr(entry, "sum_grad", False):
                        self.partial[id(v)] = v

    def gather(self, node, side) -> None:
        if not (node.inputs and id(node.inputs[0]) in self.split):
            refuse(
                "the sequence is split at the token embedding; this region "
                "reads a tensor that is not split (a model input read "
                "directly)",
                node.op.path,
            )
        members = self.groups.setdefault(id(node.inputs[0]), [])
        members += [] if node.op in members else [node.op]
        if side is None:  # a replicated projection: its region is whole
            self.replicated(node.op)
            self.mark(node.outputs, self.whole)

    def read(self, node) -> None:
        """A node outside the regions reading a split tensor."""
        _check_reader(node, self.split, self.plan)
        self.mark(node.outputs, self.split)
        self.replicated(node.op, node)
        if type(node.op).__name__ == "PositionEmbedding":
            self.sp.positions.append(node.op)
        if _is_dropout(node.op) and node.op not in self.sp.dropouts:
            self.sp.dropouts.append(node.op)

    def done(self) -> SequencePlan:
        self.sp.groups = list(self.groups.values())
        self.sp.partial = list(self.partial.values())
        return self.sp


def _walk(graph, plan, edges: dict) -> SequencePlan:
    """Follow the sequence split through the traced graph: a row output
    and a token lookup are split; what reads a split tensor outside a
    region keeps it split (norms, dropout, adds); a column edge, and a
    replicated projection (kv heads beside split query heads, or a
    region the plan replicates), gathers it. A replicated region's
    tensors are whole; the replicated projection that reads one cuts its
    output back to the chunk."""
    w = _Walk(plan, edges)
    for node in graph.nodes:
        layer, side = edges.get(id(node.op), (None, None))
        if side is not None and node.inputs:
            _check_edge(layer, side, node)
        reads = node.inputs and id(node.inputs[0]) in w.split
        replicated = side is None and _replicated_projection(node.op, plan)
        if replicated and any(id(t) in w.whole for t in node.inputs):
            _check_edge(node.op, ROW, node)
            if node.op not in w.sp.slicers:
                w.sp.slicers.append(node.op)
            w.replicated(node.op)
            w.mark(node.outputs, w.split)
        elif side == COLUMN or (reads and replicated):
            w.gather(node, side)
        elif side == ROW:
            w.mark(node.outputs, w.split)
            bias = rule_for(layer).bias
            if bias is not None and not plan.get(bias.path).is_split:
                w.partial[id(bias)] = bias
        elif side == VOCAB and not is_reverse(node.args[1:], node.kwargs):
            w.mark(node.outputs, w.split)
        elif side is None and any(id(t) in w.split for t in node.inputs):
            w.read(node)
        elif side is None and any(id(t) in w.whole for t in node.inputs):
            w.mark(node.outputs, w.whole)
            w.replicated(node.op)
    return w.done()


def _is_dropout(layer) -> bool:
    return isinstance(layer, keras.layers.Dropout) and layer.rate > 0


def _check_reader(node, split: set, plan) -> None:
    """A node outside the regions reading a split tensor must work per
    token: the planner's propagator for it keeps a split on the sequence
    dim in place (norms, elementwise ops, dropout); anything that needs
    the whole sequence (attention, pooling, a reshape across it) is
    refused. Dropout draws the whole sequence's mask and keeps its chunk
    (`torch_sequence._install_dropouts`): a noise shape is refused."""
    name = node.type_name
    if name == "PositionEmbedding":
        return  # told its chunk's offset (`_install_positions`)
    dims = [SEQ if id(t) in split else None for t in node.inputs]
    try:
        out = propagate.propagate(node, dims)
    except propagate.Conflict as e:
        out, why = None, str(e)
    if out is None or any(d != SEQ for d in out):
        refuse(
            f"{name} reads activations split along the sequence but needs "
            "the whole sequence (it does not keep the split in place)",
            f"{name} {getattr(node.op, 'path', '')}".strip()
            + (f": {why}" if out is None else ""),
        )
    if _is_dropout(node.op) and node.op.noise_shape is not None:
        refuse(
            "dropout with a noise_shape between regions is not supported",
            f"{getattr(node.op, 'path', None) or node.op.name} "
            f"noise_shape={node.op.noise_shape}",
        )


def plan_sequence(model, plan) -> SequencePlan:
    """Check that `model` can run sequence-parallel under `plan` and say
    what changes; changes nothing (ValueError otherwise).

    Example:

    ```python
    sp = plan_sequence(model, engine.plan)  # before engine.apply
    ```
    """
    from keras_tensor_parallel.plan import graph as graph_lib
    from keras_tensor_parallel.plan.planner import is_leaf

    edges = region_edges(model, plan)
    _check_plan(plan, edges)
    graph = graph_lib.extract_graph(model, is_leaf)
    return _walk(graph, plan, edges)
