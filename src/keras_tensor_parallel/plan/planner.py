"""Build a `ShardingPlan` for any Keras model from its own dataflow.

The planner finds Megatron *regions*: a column-parallel projection whose
split output flows, through ops that keep the split dim local (activations,
reshapes, per-head attention, gating products), into projections that
contract it (row-parallel). The activation between them stays split, so the
region needs one all-reduce forward (after the rows) and one backward (before
the columns). Projections that join a region through a shared op (k and v
meeting q in attention, the gate meeting the up-projection in a gated MLP)
are recruited into it.

Nothing is decided by layer names or width ratios; a projection whose split
output would reach a norm over the split dim, the model output, or an op with
no rule is replicated, and the plan records why.
"""

from __future__ import annotations

import collections
import re

import keras

from keras_tensor_parallel.plan import graph as graph_lib
from keras_tensor_parallel.plan import propagate as prop
from keras_tensor_parallel.plan import rules
from keras_tensor_parallel.plan.plan import (
    MODEL_AXIS,
    Role,
    ShardingPlan,
    VariablePlan,
)

ROW_BIAS_REASON = (
    "row-parallel bias: replicated, added once after the all-reduce"
)
MIN_VOCAB_ROWS = 128
RNG_REASON = "RNG state: replicated so every device draws the same numbers"


def plan_model(
    model: keras.Model,
    world_size: int,
    *,
    overrides: dict | None = None,
    slice_operands: bool = True,
) -> ShardingPlan:
    """Plan Megatron-style tensor parallelism for a built Keras model.

    Args:
        model: A built Keras model (Sequential, Functional, subclassed or
            KerasHub).
        world_size: Number of devices on the model axis.
        overrides: Optional ordered mapping `{regex: axes or role}`. A regex is
            matched against variable paths with `re.fullmatch`; the value is a
            tuple of mesh-axis names (`"model"` or `None` per dim) or a role
            name (`"replicated"`, `"column"` splits the last dim, `"row"` and
            `"vocab"` the first).
        slice_operands: Whether an unsplit full-size tensor may meet a split
            dim (an ALiBi table or position bias added to split heads, kv
            heads that do not divide, read by split query heads). The JAX
            engine slices such tensors inside XLA. Engines that run each
            rank's own copy of the model code (torch) cannot, so they pass
            False and such a region is replicated, with the reason.

    Returns:
        The `ShardingPlan`.

    Example:

    ```python
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128),
                              keras.layers.Dense(32)])
    plan = plan_model(model, world_size=2)
    print(plan.table())
    ```
    """
    validate_world_size(world_size)
    check_built(model)
    graph = graph_lib.extract_graph(model, is_leaf=_is_leaf)
    entries = _Planner(
        model, graph, world_size, slice_operands=slice_operands
    ).run()
    plan = ShardingPlan(world_size, tuple(entries), model_name=model.name)
    if overrides:
        plan = apply_overrides(plan, overrides)
    return plan


def _is_leaf(layer) -> bool:
    """Keep whole the layers with a rule or a propagator; trace the rest."""
    return rules.has_rule(layer) or type(layer).__name__ in prop.LAYER_LEAVES


def validate_world_size(world_size) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise ValueError(
            f"world_size must be a positive integer. Received: "
            f"world_size={world_size!r}"
        )
    if world_size <= 0:
        raise ValueError(
            f"world_size must be >= 1. Received: world_size={world_size}"
        )


def check_built(model) -> None:
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            f"Expected a Keras model. Received: model of type {type(model)}"
        )
    if not model.built or not model.variables:
        raise ValueError(
            "The model must be built (with variables) before it is planned: "
            "call it on data, or `model.build(input_shape)`. Received: "
            f"model={model.name!r} (built={model.built}, "
            f"variables={len(model.variables)})"
        )


class _Region:
    def __init__(self):
        self.columns: dict[int, tuple] = {}  # id(layer) -> (layer, rule, lbl)
        self.rows: dict[int, tuple] = {}  # id(layer) -> (layer, rule, lbl)
        self.split: dict[int, int] = {}  # id(tensor) -> dim
        self.queue: collections.deque = collections.deque()
        # (op name, tensor): unsplit full-size operands meeting the split.
        self.full_operands: list[tuple] = []


class _Planner:
    def __init__(self, model, graph, world_size, *, slice_operands=True):
        self.model = model
        self.slice_operands = slice_operands
        self.graph = graph
        self.n = world_size
        self.decided: dict[int, tuple] = {}  # id(var) -> (axes, role, reason)
        self.layer_reason: dict[int, str] = {}
        self.split_tensors: set[int] = set()  # split by committed regions
        self.rules: dict[int, object] = {}
        self.owner: dict[int, keras.layers.Layer] = {}
        for layer in model._flatten_layers(include_self=True):
            for v in (
                layer._trainable_variables + layer._non_trainable_variables
            ):
                self.owner[id(v)] = layer
            if rules.has_rule(layer):
                self.rules[id(layer)] = rules.rule_for(layer)
        self.opaque = {id(n.op): n.opaque_reason for n in graph.opaque_nodes()}
        self.opaque_ancestor: dict[int, tuple] = {}
        for node in graph.opaque_nodes():
            for inner in node.op._flatten_layers(include_self=True):
                self.opaque_ancestor.setdefault(
                    id(inner), (node.op, node.opaque_reason)
                )

    # Entry point ------------------------------------------------------------

    def run(self) -> list[VariablePlan]:
        for r in self.rules.values():
            if isinstance(r, rules.EmbeddingRule):
                self._plan_embedding(r)
        for node in self.graph.nodes:
            r = self.rules.get(id(node.op))
            if isinstance(r, rules.LinearRule) and not self._is_decided(r):
                self._try_regions(node.op, r)
        return [self._entry(v) for v in self.model.variables]

    def _is_decided(self, r) -> bool:
        return id(r.kernel) in self.decided

    # Embeddings -------------------------------------------------------------

    def _plan_embedding(self, r: rules.EmbeddingRule) -> None:
        vocab = r.vocab_size
        if vocab < max(MIN_VOCAB_ROWS, self.n):
            for table in r.tables:
                self._replicate(
                    table,
                    f"table of {vocab} rows is too small to split (< "
                    f"{max(MIN_VOCAB_ROWS, self.n)}): replicated",
                )
            return
        for table, dim in zip(r.tables, r.vocab_dims):
            axes = [None] * len(table.shape)
            axes[dim] = MODEL_AXIS
            reason = f"vocab-parallel: {vocab} rows split, masked local lookup"
            padded = None
            if vocab % self.n:
                size = -(-vocab // self.n) * self.n
                padded = list(table.shape)
                padded[dim] = size
                padded = tuple(padded)
                reason = (
                    f"vocab {vocab} not divisible by {self.n}: padded to "
                    f"{size} internally, padding masked"
                )
            self.decided[id(table)] = (tuple(axes), Role.VOCAB, reason, padded)

    # Regions ------------------------------------------------------------------

    def _try_regions(self, layer, r: rules.LinearRule) -> None:
        labels = r.column_labels()
        if not labels:
            self.layer_reason[id(layer)] = (
                f"{type(layer).__name__} has no output-only dim to split"
            )
            return
        reasons = []
        for label in labels:
            size = r.label_size(label)
            if size % self.n:
                reasons.append(
                    f"output dim {size} not divisible by world size {self.n}"
                )
                continue
            for recruit in (True, False):
                try:
                    region = self._grow(layer, r, label, recruit)
                except prop.Conflict as e:
                    reasons.append(str(e))
                    continue
                self._commit(region)
                return
        self.layer_reason[id(layer)] = "not split: " + _dedupe(reasons)

    def _grow(self, layer, r, label, recruit: bool) -> _Region:
        region = _Region()
        self._add_column(region, layer, r, label)
        while region.queue:
            t = region.queue.popleft()
            if id(t) in self.graph.outputs:
                raise prop.Conflict("split activation reaches the model output")
            for node_index, _ in self.graph.consumers.get(id(t), []):
                self._visit(region, self.graph.nodes[node_index], recruit)
        self._check_complete(region)
        return region

    def _add_column(self, region, layer, r, label) -> None:
        nodes = self.graph.layer_nodes(layer)
        if not nodes:
            raise prop.Conflict(f"{layer.name} is never called")
        if self._is_decided(r):
            raise prop.Conflict(f"{layer.name} is already planned")
        region.columns[id(layer)] = (layer, r, label)
        for node in nodes:
            if any(id(x) in region.split for x in node.inputs):
                raise prop.Conflict(f"{layer.name} input is already split")
            out = node.outputs[0]
            self._set_split(region, out, _dim_of(r.output_spec, out, label))

    def _set_split(self, region, t, dim: int) -> None:
        if id(t) in region.split:
            if region.split[id(t)] != dim:
                raise prop.Conflict("a tensor would be split on two dims")
            return
        size = t.shape[dim]
        if size is None or size % self.n:
            raise prop.Conflict(
                f"split dim of size {size} not divisible by {self.n}"
            )
        region.split[id(t)] = dim
        region.queue.append(t)

    def _visit(self, region, node, recruit: bool) -> None:
        if any(id(x) in self.split_tensors for x in node.inputs):
            raise prop.Conflict(f"{node.name} is inside another split region")
        dims = [region.split.get(id(x)) for x in node.inputs]
        r = self.rules.get(id(node.op))
        if isinstance(r, rules.LinearRule):
            self._visit_linear(region, node, r, dims)
            return
        if node.opaque_reason:
            raise prop.Conflict(f"flows into untraceable {node.name}")
        if r is not None and not prop.known(node):
            raise prop.Conflict(
                f"flows into {type(node.op).__name__} {node.name}, which "
                "cannot take a split input"
            )
        outs = prop.propagate(node, dims)
        full = self._full_operands(node, dims, outs, region)
        region.full_operands += [(node.name, x) for x, _ in full]
        if recruit:
            for x, c in full:
                self._recruit_producer(region, x, c, depth=0)
        for t, d in zip(node.outputs, outs):
            if d is not None:
                self._set_split(region, t, d)

    def _visit_linear(self, region, node, r, dims) -> None:
        if any(d is not None for d in dims[1:]):
            raise prop.Conflict(f"{node.name}: split tensor as extra input")
        x, d = node.inputs[0], dims[0]
        label = _label_at(r.input_spec, x, d)
        layer = node.op
        if label in r.contracted_labels():
            if self._is_decided(r):
                raise prop.Conflict(f"{layer.name} is already planned")
            if id(layer) in region.columns:
                raise prop.Conflict(f"{layer.name} would be column and row")
            if r.label_size(label) % self.n:
                raise prop.Conflict(f"{layer.name} contracted dim indivisible")
            prev = region.rows.get(id(layer))
            if prev is not None and prev[2] != label:
                raise prop.Conflict(f"{layer.name} split two ways")
            region.rows[id(layer)] = (layer, r, label)
            return
        if label is None or (
            label in r.output_spec and label not in r.kernel_spec
        ):
            out = node.outputs[0]
            dim = (
                len(out.shape) - len(x.shape) + d
                if label is None
                else _dim_of(r.output_spec, out, label)
            )
            self._set_split(region, out, dim)
            return
        raise prop.Conflict(f"{layer.name} kernel would need the split dim")

    def _full_operands(self, node, dims, outs, region) -> list[tuple]:
        """(tensor, dim) of unsplit operands whose full-size dim lines up
        with the split output: each device needs only its slice of them."""
        if len(node.inputs) < 2 or all(d is None for d in outs):
            return []
        found = []
        for i, x in enumerate(node.inputs):
            if dims[i] is not None or id(x) in region.split:
                continue
            for c in range(len(x.shape)):
                if x.shape[c] in (None, 1):
                    continue
                # Split this operand alone: it lines up when that alone
                # splits the output the same way (an op that ignores the
                # operand, like an attention mask, never does).
                trial = [None] * len(dims)
                trial[i] = c
                try:
                    if prop.propagate(node, trial) != outs:
                        continue
                except prop.Conflict:
                    continue
                found.append((x, c))
                break
        return found

    def _recruit_producer(self, region, t, dim, depth) -> None:
        """Walk back from `t` (needed split on `dim`) to column candidates."""
        if depth > 32 or id(t) not in self.graph.producer:
            return
        node = self.graph.nodes[self.graph.producer[id(t)]]
        r = self.rules.get(id(node.op))
        if isinstance(r, rules.LinearRule):
            if id(node.op) in region.columns or id(node.op) in region.rows:
                return
            if self._is_decided(r):
                return
            label = _label_at(r.output_spec, t, dim)
            if label not in r.column_labels() or r.label_size(label) % self.n:
                return
            # Every call of the recruit splits its output (a layer called
            # twice, like DeBERTa's key on hidden and position states), so
            # none of its calls may read a tensor the region splits.
            calls = self.graph.layer_nodes(node.op)
            if any(id(x) in region.split for c in calls for x in c.inputs):
                return
            self._add_column(region, node.op, r, label)
            return
        if r is not None or node.opaque_reason:
            return
        for i, src in enumerate(node.inputs):
            if id(src) in region.split:
                continue
            for c in range(len(src.shape)):
                if src.shape[c] in (None, 1):
                    continue
                trial = [None] * len(node.inputs)
                trial[i] = c
                try:
                    if prop.propagate(node, trial)[0] == dim:
                        self._recruit_producer(region, src, c, depth + 1)
                        break
                except prop.Conflict:
                    continue

    def _check_complete(self, region) -> None:
        if not region.rows:
            raise prop.Conflict("no row-parallel consumer")
        if not self.slice_operands:
            for name, x in region.full_operands:
                if id(x) not in region.split:
                    raise prop.Conflict(
                        f"{name}: an unsplit full-size tensor meets the "
                        "split dim (this engine cannot slice it)"
                    )
        for layer, _, _ in list(region.columns.values()) + list(
            region.rows.values()
        ):
            for node in self.graph.layer_nodes(layer):
                if id(layer) in region.rows and (
                    id(node.inputs[0]) not in region.split
                ):
                    raise prop.Conflict(
                        f"{layer.name} is also called on an unsplit input"
                    )

    def _commit(self, region) -> None:
        self.split_tensors.update(region.split)
        row_names = ", ".join(
            sorted(la.name for la, _, _ in region.rows.values())
        )
        col_names = ", ".join(
            sorted(la.name for la, _, _ in region.columns.values())
        )
        for _, r, label in region.columns.values():
            size = r.label_size(label)
            out_only = r.column_labels()
            heads = out_only.index(label) < len(out_only) - 1
            role = Role.HEADS if heads else Role.COLUMN
            reason = (
                f"heads: {size} heads split, attention stays per head; "
                f"row: {row_names}"
                if heads
                else f"column-parallel: {size} output features split; "
                f"row: {row_names}"
            )
            self._decide(r.kernel, r.kernel_spec, label, role, reason)
            if r.bias is not None:
                if label in r.bias_spec:
                    self._decide(r.bias, r.bias_spec, label, role, reason)
                else:
                    self._replicate(r.bias, "bias over unsplit dims")
        for _, r, label in region.rows.values():
            reason = (
                f"row-parallel: {r.label_size(label)} input features split "
                f"(from {col_names}); output all-reduced"
            )
            self._decide(r.kernel, r.kernel_spec, label, Role.ROW, reason)
            if r.bias is not None:
                self._replicate(r.bias, ROW_BIAS_REASON)

    def _decide(self, var, spec, label, role, reason) -> None:
        axes = [None] * len(var.shape)
        axes[spec.index(label)] = MODEL_AXIS
        self.decided[id(var)] = (tuple(axes), role, reason)

    def _replicate(self, var, reason) -> None:
        self.decided[id(var)] = (
            (None,) * len(var.shape),
            Role.REPLICATED,
            reason,
        )

    # Entries ----------------------------------------------------------------

    def _entry(self, v) -> VariablePlan:
        layer = self.owner.get(id(v))
        decided = self.decided.get(id(v))
        if decided is not None:
            axes, role, reason = decided[:3]
            padded = decided[3] if len(decided) > 3 else None
        else:
            axes, role = (None,) * len(v.shape), Role.REPLICATED
            reason, padded = self._replicated_reason(v, layer), None
        return VariablePlan(
            path=v.path,
            shape=tuple(v.shape),
            dtype=keras.backend.standardize_dtype(v.dtype),
            axes=axes,
            role=role,
            reason=reason,
            layer=getattr(layer, "path", "") or "",
            padded_shape=padded,
        )

    def _replicated_reason(self, v, layer) -> str:
        if layer is None:
            if "seed_generator" in v.path:
                return RNG_REASON
            return "not owned by a layer: replicated"
        if id(layer) in self.opaque_ancestor:
            outer, why = self.opaque_ancestor[id(layer)]
            if why == graph_lib.WEIGHTS_ONLY:
                return (
                    f"inside {type(outer).__name__} {outer.name!r}, whose "
                    "output is computed from its own weights alone (no "
                    "input to split along): replicated"
                )
            return (
                f"inside {type(outer).__name__} {outer.name!r}, which could "
                f"not be traced ({why}): replicated"
            )
        r = self.rules.get(id(layer))
        if isinstance(r, rules.ReplicatedRule):
            return r.reason
        if isinstance(r, rules.LinearRule):
            if id(layer) in self.layer_reason:
                return self.layer_reason[id(layer)]
            if not self.graph.layer_nodes(layer):
                return "layer is never called in the forward pass: replicated"
            return "not reached by a split region: replicated"
        if not v.trainable:
            return "non-trainable state: replicated"
        return f"{type(layer).__name__} has no split rule: replicated"


def _dim_of(spec: str, t, label: str) -> int:
    """Tensor dim of `label` in right-aligned `spec` for tensor `t`."""
    return len(t.shape) - len(spec) + spec.index(label)


def _label_at(spec: str, t, dim: int) -> str | None:
    """Label at tensor dim `dim` (None for leading pass-through dims)."""
    offset = len(t.shape) - len(spec)
    return spec[dim - offset] if dim >= offset else None


def _dedupe(reasons: list[str]) -> str:
    seen = []
    for r in reasons:
        if r not in seen:
            seen.append(r)
    return "; ".join(seen[:2])


# Overrides ------------------------------------------------------------------

_ROLE_DIM = {"column": -1, "row": 0, "vocab": 0}


def apply_overrides(plan: ShardingPlan, overrides: dict) -> ShardingPlan:
    """Apply `{regex: axes or role}` overrides to a plan (ordered)."""
    if not isinstance(overrides, dict):
        raise ValueError(
            "overrides must be a dict {regex: axes tuple or role name}. "
            f"Received: overrides={overrides!r}"
        )
    matches: dict[str, str] = {}
    used = {pattern: False for pattern in overrides}
    entries = []
    for entry in plan:
        hit = None
        for pattern, value in overrides.items():
            try:
                matched = re.fullmatch(pattern, entry.path)
            except re.error as e:
                raise ValueError(
                    f"Override keys must be valid regular expressions. "
                    f"Received: {pattern!r} ({e})"
                ) from e
            if not matched:
                continue
            if hit is not None:
                raise ValueError(
                    f"Variable {entry.path!r} is matched by two overrides, "
                    f"{hit!r} and {pattern!r}; each variable may match at "
                    "most one."
                )
            hit = pattern
            used[pattern] = True
            entry = _override_entry(entry, pattern, value, plan.world_size)
        matches[entry.path] = hit
        entries.append(entry)
    unused = [p for p, u in used.items() if not u]
    if unused:
        sample = ", ".join(e.path for e in list(plan)[:3])
        raise ValueError(
            f"Override {unused[0]!r} names no variable (patterns are matched "
            f"with re.fullmatch against variable paths such as {sample}). "
            f"Received: overrides={list(overrides)}"
        )
    return plan.with_variables(entries)


def _override_entry(entry, pattern, value, n) -> VariablePlan:
    rank = len(entry.shape)
    if isinstance(value, Role) or (
        isinstance(value, str) and value in {r.value for r in Role}
    ):
        role = Role(value)
        if role == Role.HEADS:
            raise ValueError(
                f"Override {pattern!r}: role 'heads' needs explicit axes "
                "(which dim is the head dim). Received: 'heads'"
            )
        axes = [None] * rank
        if role != Role.REPLICATED and rank:
            axes[_ROLE_DIM[role.value] % rank] = MODEL_AXIS
    elif isinstance(value, (tuple, list)):
        axes = list(value)
        if len(axes) != rank or any(a not in (None, MODEL_AXIS) for a in axes):
            raise ValueError(
                f"Override {pattern!r} for {entry.path!r} must give one entry "
                f"per dim ({rank}), each {MODEL_AXIS!r} or None. Received: "
                f"{tuple(value)!r}"
            )
        split = [i for i, a in enumerate(axes) if a]
        if len(split) > 1:
            raise ValueError(
                f"Override {pattern!r}: at most one dim may be split. "
                f"Received: {tuple(value)!r}"
            )
        role = Role.REPLICATED if not split else entry.role
        if split and role == Role.REPLICATED:
            role = Role.COLUMN if split[0] == rank - 1 else Role.ROW
    else:
        raise ValueError(
            f"Override values must be an axes tuple or a role name. "
            f"Received: {pattern!r}: {value!r}"
        )
    split = [i for i, a in enumerate(axes) if a]
    if split and entry.shape[split[0]] % n:
        raise ValueError(
            f"Override {pattern!r} splits dim {split[0]} of {entry.path!r} "
            f"(size {entry.shape[split[0]]}), which does not divide by world "
            f"size {n}."
        )
    return VariablePlan(
        path=entry.path,
        shape=entry.shape,
        dtype=entry.dtype,
        axes=tuple(axes),
        role=role,
        reason=f"user override {pattern!r}",
        layer=entry.layer,
        padded_shape=None,
    )
