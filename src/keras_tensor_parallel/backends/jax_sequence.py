"""Sequence parallelism (Megatron-SP, Korthikanti et al. 2022) and
selective recomputation of the attention core, on the JAX engine.

Between two tensor-parallel regions (norms, dropout, residual adds) plain
tensor parallelism keeps every activation whole on every device. With
sequence parallelism they are split along the sequence over the model
axis, and the region edges change collective:

- a row projection (and a vocab-parallel lookup) reduce-scatters its
  partial sums over the sequence instead of all-reducing them (backward:
  an all-gather of the output gradient);
- a column projection (and the vocab-parallel logits) all-gathers its
  sequence-split input (backward: a reduce-scatter of the input gradient,
  once for sibling projections such as q/k/v reading one tensor).

A reduce-scatter plus an all-gather is the ring traffic of one all-reduce,
and the activations in between are 1/N per device. The edges are written
with `jax.shard_map` and `jax.lax.psum_scatter` / `all_gather`, so the
collectives are explicit: XLA's SPMD partitioner, given only sharding
constraints, all-reduces and then slices on CPU (no reduce-scatter pass
there). The einsums are the layers' own, per shard: the math is unchanged
up to the order of the sums.

Kv heads shared by several devices (world size above the kv head count,
a `(model, model_copies)` mesh) split the sequence over both axes; each
shared kv block is computed by the devices of its copy group.

A call whose sequence length does not divide by N (a decode step of
`generate`) and Keras's shape inference run the layers as plain tensor
parallelism: same results, no split.
"""

from __future__ import annotations

import jax
import keras
from jax.sharding import PartitionSpec
from keras.src.backend.common.symbolic_scope import in_symbolic_scope

from keras_tensor_parallel.plan import DATA_AXIS, MODEL_AXIS, Role
from keras_tensor_parallel.plan.lora import kernel_variable
from keras_tensor_parallel.plan.rules import (
    EmbeddingRule,
    LinearRule,
    rule_for,
)

COLUMN, ROW, VOCAB = "column", "row", "vocab"
_PREFIX = "ABCDEFGH"  # labels of leading dims (the rules use lowercase)


def linear_side(rule, plan) -> str | None:
    """`"column"` or `"row"` for a split projection, from the label its
    kernel is split on (an output label or a contracted one)."""
    entry = plan.get(rule.kernel.path)
    if entry is None or not entry.is_split:
        return None
    label = rule.kernel_spec[entry.split_dim]
    if label in rule.contracted_labels():
        return ROW
    if label in rule.column_labels():
        return COLUMN
    return None  # split on a label the input carries too (experts)


def region_edges(model, plan) -> dict:
    """{id(layer): (layer, side)} for every layer where a region starts
    (column) or ends (row), and every vocab-parallel embedding."""
    edges = {}
    for layer in model._flatten_layers(include_self=False):
        rule = rule_for(layer)
        side = None
        if isinstance(rule, LinearRule):
            side = linear_side(rule, plan)
        elif isinstance(rule, EmbeddingRule):
            entry = plan.get(rule.tables[0].path)
            if entry is not None and entry.role == Role.VOCAB:
                side = VOCAB
        if side is not None:
            edges[id(layer)] = (layer, side)
    return edges


class Edges:
    """The mesh and the plan's kernel layouts, for the shard_maps."""

    def __init__(self, plan, mesh):
        from keras_tensor_parallel.backends import jax_distribution as dist

        self.mesh = mesh.backend_mesh
        self.n = plan.world_size
        self.axes = {e.path: dist.mesh_axes(e, mesh) for e in plan}
        # With kv heads shared by several devices the model axis is
        # (model, model_copies): the sequence is split over both, a shared
        # kv block over `model` only (each copy group holds one).
        self.shared = dist.COPIES_AXIS in mesh.axis_names
        self.model = (
            (MODEL_AXIS, dist.COPIES_AXIS) if self.shared else MODEL_AXIS
        )
        # The batch is split over the data axis only when it has several
        # devices: over a 1-device axis, shard_map would add a no-op
        # all-reduce of every weight gradient.
        self.data = DATA_AXIS if self.mesh.shape[DATA_AXIS] > 1 else None

    def spec(self, variable) -> PartitionSpec:
        return PartitionSpec(*self.axes[variable.path])

    def divides(self, x, dim: int) -> bool:
        return not in_symbolic_scope() and x.shape[dim] % self.n == 0

    def dims(self, labels: str, seq=None, kernel="", kspec=()):
        """Per label of an activation: the batch (first) on the data
        axis, `seq` on the model axis, a kernel label as the kernel is
        split, anything else whole."""
        out = [self.data]
        for c in labels[1:]:
            if c == seq:
                out.append(self.model)
            elif c in kernel:
                out.append(kspec[kernel.index(c)])
            else:
                out.append(None)
        return PartitionSpec(*out)

    def smap(self, fn, in_specs, out_specs, check_vma=True):
        return jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            check_vma=check_vma,
        )


def _letters(rule, ndim: int) -> tuple[str, str, str]:
    """Input, kernel and output labels of a projection on an input of
    `ndim` dims (rule specs are right-aligned: leading dims pass)."""
    lead = _PREFIX[: ndim - len(rule.input_spec)]
    return lead + rule.input_spec, rule.kernel_spec, lead + rule.output_spec


def _finish(layer, x):
    """A projection's bias and activation, as Dense/EinsumDense add them."""
    if layer.bias is not None:
        x = keras.ops.add(x, layer.bias)
    if layer.activation is not None:
        x = layer.activation(x)
    return x


def _row_call(layer, original, edges: Edges):
    """Partial sums reduce-scattered over the sequence (not all-reduced)."""
    rule = rule_for(layer)

    def call(inputs, *args, **kwargs):
        x_l, k_l, o_l = _letters(rule, len(inputs.shape))
        seq = o_l.index(o_l[1])
        if not edges.divides(inputs, x_l.index(o_l[1])):
            return original(inputs, *args, **kwargs)
        eq = f"{x_l},{k_l}->{o_l}"
        kspec = edges.spec(kernel_variable(layer))

        def local(x, k):
            y = jax.numpy.einsum(eq, x, k)
            return jax.lax.psum_scatter(
                y, edges.model, scatter_dimension=seq, tiled=True
            )

        x_spec = edges.dims(x_l, None, k_l, kspec)
        o_spec = edges.dims(o_l, o_l[1], k_l, kspec)
        kernel = keras.ops.convert_to_tensor(layer.kernel)
        y = edges.smap(local, (x_spec, kspec), o_spec)(inputs, kernel)
        return _finish(layer, y)

    return call


class _ColumnGroup:
    """Column projections reading one tensor (q/k/v, gate/up): the first
    called gathers the input once and computes all of them, so their
    input gradients meet before the one reduce-scatter."""

    def __init__(self, layers, edges: Edges):
        self.layers = list(layers)
        self.edges = edges
        self._stash: dict = {}

    def compute(self, inputs):
        rules = [rule_for(m) for m in self.layers]
        labels = [_letters(r, len(inputs.shape)) for r in rules]
        x_l = labels[0][0]
        kspecs = [self.edges.spec(kernel_variable(m)) for m in self.layers]
        eqs = [f"{x},{k}->{o}" for x, k, o in labels]
        seq = x_l.index(x_l[1])

        def local(x, *kernels):
            x = jax.lax.all_gather(x, self.edges.model, axis=seq, tiled=True)
            return tuple(
                jax.numpy.einsum(e, x, k) for e, k in zip(eqs, kernels)
            )

        x_spec = self.edges.dims(x_l, x_l[1])
        o_specs = tuple(
            self.edges.dims(o, None, k, s)
            for (_, k, o), s in zip(labels, kspecs)
        )
        kernels = [keras.ops.convert_to_tensor(m.kernel) for m in self.layers]
        # A shared kv block's output is the same on the devices of its
        # copy group, which the type check cannot see (the gathered input
        # varies over them). Unchecked, shard_map's transpose divides that
        # output's gradient by the copies and sums the block's kernel
        # gradient over them: exact, each block counted once.
        fn = self.edges.smap(
            local, (x_spec, *kspecs), o_specs, check_vma=not self.edges.shared
        )
        return fn(inputs, *kernels)

    def call(self, layer, original, inputs, *args, **kwargs):
        hit = self._stash.pop(id(layer), None)
        if hit is not None and hit[0] is inputs:
            return _finish(layer, hit[1])
        if len(inputs.shape) < 3 or not self.edges.divides(inputs, 1):
            return original(inputs, *args, **kwargs)
        outs = self.compute(inputs)
        for member, out in zip(self.layers, outs):
            if member is not layer:
                self._stash[id(member)] = (inputs, out)
        return _finish(layer, outs[self.layers.index(layer)])


def _column_call(layer, original, group: _ColumnGroup):
    def call(inputs, *args, **kwargs):
        return group.call(layer, original, inputs, *args, **kwargs)

    return call


def _is_reverse(args, kwargs) -> bool:
    """Whether an embedding call is the tied logits projection."""
    return bool(kwargs.get("reverse") or (args and args[0] is True))


def _lookup(edges: Edges, ids, table):
    """Vocab-parallel lookup: each device reads its rows, zeros elsewhere,
    and the sum is reduce-scattered over the sequence."""

    def local(ids, table):
        rows = table.shape[0]
        ids = ids - jax.lax.axis_index(edges.model) * rows
        hit = (ids >= 0) & (ids < rows)
        out = jax.numpy.take(table, jax.numpy.where(hit, ids, 0), axis=0)
        out = jax.numpy.where(hit[..., None], out, 0)
        return jax.lax.psum_scatter(
            out, edges.model, scatter_dimension=1, tiled=True
        )

    rest = (None,) * (len(ids.shape) - 1)
    ids_spec = PartitionSpec(edges.data, *rest)
    o_spec = PartitionSpec(edges.data, edges.model, *rest[1:], None)
    fn = edges.smap(local, (ids_spec, PartitionSpec(edges.model)), o_spec)
    return fn(ids, table)


def _logits(layer, edges: Edges, x):
    """The (tied or untied) vocab projection on the gathered sequence,
    as `ReversibleEmbedding.call(reverse=True)` computes it."""
    tied = getattr(layer, "tie_weights", True)
    kernel = layer.embeddings if tied else layer.reverse_embeddings
    lead = _PREFIX[: len(x.shape) - 1]
    k_l = "vh" if tied else "hv"
    eq = f"{lead}h,{k_l}->{lead}v"
    kspec = edges.spec(kernel)
    kernel = keras.ops.convert_to_tensor(kernel)
    dtype = getattr(layer, "reverse_dtype", None)
    if dtype is not None:
        x, kernel = keras.ops.cast(x, dtype), keras.ops.cast(kernel, dtype)

    def local(x, k):
        x = jax.lax.all_gather(x, edges.model, axis=1, tiled=True)
        return jax.numpy.einsum(eq, x, k)

    x_spec = edges.dims(lead + "h", lead[1])
    o_spec = edges.dims(lead + "v", None, k_l, kspec)
    logits = edges.smap(local, (x_spec, kspec), o_spec)(x, kernel)
    cap = getattr(layer, "logit_soft_cap", None)
    if cap is not None:
        logits = keras.ops.multiply(keras.ops.tanh(logits / cap), cap)
    return logits[..., : int(layer.input_dim)]  # padded vocab rows


def _vocab_call(layer, original, edges: Edges):
    def call(inputs, *args, **kwargs):
        if len(inputs.shape) < 2 or not edges.divides(inputs, 1):
            return original(inputs, *args, **kwargs)
        if _is_reverse(args, kwargs):
            return _logits(layer, edges, inputs)
        ids = inputs
        if ids.dtype not in ("int32", "int64"):
            ids = keras.ops.cast(ids, "int32")
        table = keras.ops.convert_to_tensor(layer.embeddings)
        out = _lookup(edges, ids, table)
        return keras.ops.cast(out, layer.compute_dtype)

    return call


# Install --------------------------------------------------------------------


def _refuse(layer, why: str) -> None:
    raise ValueError(
        "sequence_parallel=True rewrites the projections at the edges of "
        f"tensor-parallel regions; {why}. Use sequence_parallel=False for "
        f"this model. Received: {type(layer).__name__} {layer.path!r}"
    )


def _check_layer(layer, side: str, ndim: int) -> None:
    """ValueError unless `layer` is a supported edge with a sequence dim
    (a dim besides the batch and the features, as in [batch, seq, h])."""
    if side == VOCAB:
        # mask_zero: Keras computes the mask from the ids (compute_mask),
        # not in `call`; it stays whole along the sequence, as in plain TP.
        if ndim < 2:
            _refuse(layer, f"its input has {ndim} dims, no sequence")
        return
    if type(layer) not in (keras.layers.Dense, keras.layers.EinsumDense):
        _refuse(layer, "only Dense and EinsumDense projections are supported")
    x_l, k_l, o_l = _letters(rule_for(layer), ndim)
    seq = x_l[1:2] if side == COLUMN else o_l[1:2]
    ok = (
        len(x_l) >= 2
        and x_l[0] == o_l[0]
        and seq
        and seq in x_l
        and seq in o_l
        and seq not in k_l
    )
    if not ok:
        _refuse(
            layer,
            f"its input labels {x_l!r} -> {o_l!r} have no sequence dim "
            "after the batch",
        )


def _column_groups(model, edges: dict, journal, shards: Edges) -> int:
    """Check every region edge, and wrap the column layers whose input is
    sequence-split (downstream of a row projection or a vocab lookup; a
    model input read directly stays whole, with nothing to gather).
    Column layers reading one tensor share a group. Traced on symbolic
    inputs, so a bad model fails when wrapped."""
    from keras_tensor_parallel.plan import graph as graph_lib
    from keras_tensor_parallel.plan.planner import is_leaf

    graph = graph_lib.extract_graph(model, is_leaf)
    groups: dict = {}
    split: set = set()  # ids of sequence-split tensors
    for node in graph.nodes:
        layer, side = edges.get(id(node.op), (None, None))
        reads_split = any(id(t) in split for t in node.inputs)
        if side is not None and node.inputs:
            _check_layer(layer, side, len(node.inputs[0].shape))
        if side == COLUMN:  # its output is whole along the sequence
            if id(node.inputs[0]) in split:
                members = groups.setdefault(id(node.inputs[0]), [])
                members += [] if layer in members else [layer]
        elif (
            reads_split
            or side == ROW
            or (side == VOCAB and not _is_reverse(node.args[1:], node.kwargs))
        ):
            split.update(id(t) for t in node.outputs)
    for layers in groups.values():
        group = _ColumnGroup(layers, shards)
        for layer in layers:
            journal.setattr(
                layer, "call", _column_call(layer, layer.call, group)
            )
    return len(groups)


def install(model, plan, mesh, journal) -> int:
    """Split the activations between regions along the sequence; returns
    how many layers were rewritten. Each change goes to `journal`.

    Example:

    ```python
    install(model, engine.plan, engine.mesh, base.Journal())
    ```
    """
    edges = region_edges(model, plan)
    if not any(side == ROW for _, side in edges.values()):
        raise ValueError(
            "sequence_parallel=True splits the activations between "
            "tensor-parallel regions, but the plan has no region (no "
            "row-parallel projection). Use sequence_parallel=False. "
            "Received: a plan without row-parallel layers"
        )
    shards = Edges(plan, mesh)
    _column_groups(model, edges, journal, shards)
    calls = {ROW: _row_call, VOCAB: _vocab_call}
    for layer, side in edges.values():
        if side in calls:
            call = calls[side](layer, layer.call, shards)
            journal.setattr(layer, "call", call)
    return len(edges)


def install_activations(engine, model, journal) -> None:
    """What `engine.set_activations` asked for, each change journaled.

    Example:

    ```python
    engine.set_activations(sequence_parallel=True, recompute=None)
    install_activations(engine, model, base.Journal())
    ```
    """
    if engine.sequence_parallel:
        install(model, engine.plan, engine.mesh, journal)
    if engine.recompute == "attention":
        from keras_tensor_parallel.backends import jax_recompute

        jax_recompute.install(model, journal)
