"""Turn embeddings and regions into one decision, with a reason, per
variable.

Embedding tables are split on their vocab rows; every projection is tried
as the column of a region (`regions.py`), split labels in order; a
committed region fixes the role of its columns, rows and their biases.
What no region claims is replicated, and the reason says why.
"""

from __future__ import annotations

import keras

from keras_tensor_parallel.plan import experts, lora, rules
from keras_tensor_parallel.plan import graph as graph_lib
from keras_tensor_parallel.plan import propagate as prop
from keras_tensor_parallel.plan.padding import padded_size
from keras_tensor_parallel.plan.plan import MODEL_AXIS, Role, VariablePlan
from keras_tensor_parallel.plan.projections import find_projections
from keras_tensor_parallel.plan.regions import RegionGrower

ROW_BIAS_REASON = (
    "row-parallel bias: replicated, added once after the all-reduce"
)
MIN_VOCAB_ROWS = 128
RNG_REASON = "RNG state: replicated so every device draws the same numbers"


class Planner:
    """Decides every variable of one model.

    Args:
        model: The built model.
        graph: Its traced `ModelGraph`.
        world_size: Devices on the model axis.
        slice_operands: See `plan_model`.
        op_projections: See `plan_model` (None: as `slice_operands`).
    """

    def __init__(
        self,
        model,
        graph,
        world_size,
        *,
        slice_operands=True,
        op_projections=None,
    ):
        self.model = model
        self.graph = graph
        self.n = world_size
        # id(var) -> (axes, role, reason[, padded shape])
        self.decided: dict[int, tuple] = {}
        self.proj_reason: dict[int, str] = {}  # id(projection) -> reason
        self.split_tensors: set[int] = set()  # split by committed regions
        self.pad = 0  # the logical size padded by the region committed now
        self.rules: dict[int, object] = {}
        self.owner: dict[int, keras.layers.Layer] = {}
        for layer in model._flatten_layers(include_self=True):
            for v in (
                layer._trainable_variables + layer._non_trainable_variables
            ):
                self.owner[id(v)] = layer
            if rules.has_rule(layer):
                self.rules[id(layer)] = rules.rule_for(layer)
        self.projections = find_projections(
            graph,
            self.rules,
            self.owner,
            op_level=(
                slice_operands if op_projections is None else op_projections
            ),
        )
        self.proj_of_var = {id(p.kernel): p for p in self.projections.values()}
        self.proj_of_layer = {
            id(p.layer): p
            for p in self.projections.values()
            if id(p.layer) in self.rules
        }
        self.grower = RegionGrower(
            graph,
            world_size,
            self.projections,
            self.rules,
            self.decided,
            self.split_tensors,
            slice_operands=slice_operands,
        )
        self.opaque_ancestor: dict[int, tuple] = {}
        for node in graph.opaque_nodes():
            for inner in node.op._flatten_layers(include_self=True):
                self.opaque_ancestor.setdefault(
                    id(inner), (node.op, node.opaque_reason)
                )

    def run(self) -> list[VariablePlan]:
        """One `VariablePlan` per model variable, in model order."""
        for r in self.rules.values():
            if isinstance(r, rules.EmbeddingRule):
                self._plan_embedding(r)
        for node in self.graph.nodes:
            proj = self.projections.get(node.index)
            if proj is not None and id(proj.kernel) not in self.decided:
                self._try_regions(proj)
        lora.decide(self)  # LoRA adapters follow their kernel's split
        return [self._entry(v) for v in self.model.variables]

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

    # Regions ----------------------------------------------------------------

    def _try_regions(self, proj) -> None:
        labels = proj.rule.column_labels()
        if not labels:
            self.proj_reason[id(proj)] = (
                f"{type(proj.layer).__name__} has no output-only dim to split"
            )
            return
        reasons, found, failed = [], [], []
        for label in labels:
            size = proj.rule.label_size(label)
            pad = size % self.n != 0
            if pad and not self.grower.slice_operands:
                reasons.append(
                    f"output dim {size} not divisible by world size {self.n}"
                )
                continue
            tried = len(reasons)
            region = self._first_region(proj, label, reasons, pad)
            if region is not None:
                found.append((label, region))
            else:
                failed += reasons[tried:]
        if not found:
            self.proj_reason[id(proj)] = "not split: " + _dedupe(reasons)
            return
        self._commit(
            *experts.cheapest(self.graph, self.n, found, _dedupe_list(failed))
        )

    def _first_region(self, proj, label, reasons, pad: bool):
        for recruit in (True, False):
            try:
                return self.grower.grow(proj, label, recruit, pad)
            except prop.Conflict as e:
                size = proj.rule.label_size(label)
                prefix = (
                    f"{size} does not divide by {self.n} and cannot be padded: "
                    if pad
                    else ""
                )
                reasons.append(prefix + str(e))
        return None

    def _commit(self, region, why: str = "") -> None:
        self.split_tensors.update(region.split)
        row_names = ", ".join(sorted(p.name for p, _ in region.rows.values()))
        col_names = ", ".join(
            sorted(p.name for p, _ in region.columns.values())
        )
        if region.batch or region.reductions:
            self._commit_experts(region, why)
            return
        self.pad = region.pad
        for proj, label in region.columns.values():
            copies = region.column_copies.get(id(proj), 1)
            if copies > 1:
                self._commit_shared(proj, label, copies)
                continue
            self._commit_column(proj.rule, label, row_names, why)
        for proj, label in region.rows.values():
            r = proj.rule
            size = r.label_size(label)
            split = (
                f"{size} input features padded to "
                f"{padded_size(size, self.n)} with zero rows"
                if self.pad
                else f"{size} input features split"
            )
            reason = (
                f"row-parallel: {split} (from {col_names}); output "
                f"all-reduced{why}"
            )
            self._decide(r.kernel, r.kernel_spec, label, Role.ROW, reason)
            if r.bias is not None:
                self._replicate(r.bias, ROW_BIAS_REASON)
        self.pad = 0

    def _commit_experts(self, region, reason: str) -> None:
        members = [*region.columns.values(), *region.batch.values()]
        for proj, label in members:
            r = proj.rule
            self._decide(r.kernel, r.kernel_spec, label, Role.EXPERT, reason)
            if r.bias is not None:
                self._replicate(r.bias, "bias over unsplit dims")
        for proj, label in region.rows.values():
            r = proj.rule
            self._decide(r.kernel, r.kernel_spec, label, Role.ROW, reason)

    def _commit_shared(self, proj, label, copies) -> None:
        r, size = proj.rule, proj.rule.label_size(label)
        reason = (
            f"{proj.name}: {size} kv heads for {self.n} devices: each device "
            f"holds the 1 its query heads read, shared with {copies - 1} "
            "other device(s) that sum its gradient"
        )
        self._decide(r.kernel, r.kernel_spec, label, Role.HEADS, reason, copies)
        if r.bias is not None and label in r.bias_spec:
            self._decide(r.bias, r.bias_spec, label, Role.HEADS, reason, copies)
        elif r.bias is not None:
            self._replicate(r.bias, "bias over unsplit dims")

    def _commit_column(self, r, label, row_names, why) -> None:
        size = r.label_size(label)
        out_only = r.column_labels()
        heads = out_only.index(label) < len(out_only) - 1
        role = Role.HEADS if heads else Role.COLUMN
        what = "heads" if heads else "output features"
        if self.pad:
            padded = padded_size(size, self.n)
            split = (
                f"{size} {what} do not divide by {self.n}: padded to "
                f"{padded} with zero {what}, {padded // self.n} per device "
                "(their rows in the row projection are zero, so results "
                "are exact)"
            )
        else:
            split = f"{size} {what} split"
        reason = (
            f"heads: {split}, attention stays per head; row: {row_names}{why}"
            if heads
            else f"column-parallel: {split}; row: {row_names}{why}"
        )
        self._decide(r.kernel, r.kernel_spec, label, role, reason)
        if r.bias is not None:
            if label in r.bias_spec:
                self._decide(r.bias, r.bias_spec, label, role, reason)
            else:
                self._replicate(r.bias, "bias over unsplit dims")

    def _decide(self, var, spec, label, role, reason, copies=1) -> None:
        dim = len(var.shape) - len(spec) + spec.index(label)
        axes = [None] * len(var.shape)
        axes[dim] = MODEL_AXIS
        padded = None
        if self.pad:
            padded = list(var.shape)
            padded[dim] = padded_size(padded[dim], self.n)
            padded = tuple(padded)
        self.decided[id(var)] = (tuple(axes), role, reason, padded, copies)

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
        padded, copies = None, 1
        if decided is not None:
            axes, role, reason, *rest = decided
            padded = rest[0] if rest else None
            copies = rest[1] if len(rest) > 1 else 1
        else:
            axes, role = (None,) * len(v.shape), Role.REPLICATED
            reason = self._replicated_reason(v, layer)
        return VariablePlan(
            path=v.path,
            shape=tuple(v.shape),
            dtype=keras.backend.standardize_dtype(v.dtype),
            axes=axes,
            role=role,
            reason=reason,
            layer=getattr(layer, "path", "") or "",
            padded_shape=padded,
            copies=copies,
        )

    def _replicated_reason(self, v, layer) -> str:
        if layer is None:
            if "seed_generator" in v.path:
                return RNG_REASON
            return "not owned by a layer: replicated"
        if id(layer) in self.opaque_ancestor:
            return _opaque_reason(*self.opaque_ancestor[id(layer)])
        r = self.rules.get(id(layer))
        if isinstance(r, rules.ReplicatedRule):
            return r.reason
        proj = self.proj_of_var.get(id(v))
        if proj is not None and self._read_by_split_heads(proj):
            size = proj.rule.label_size(proj.rule.column_labels()[0])
            return (
                f"{proj.name}: {size} kv head(s) for {self.n} devices: every "
                "device holds them whole, as its query heads read them"
            )
        if proj is not None and id(proj) in self.proj_reason:
            return self.proj_reason[id(proj)]
        if isinstance(r, rules.LinearRule):
            proj = self.proj_of_layer.get(id(layer))
            if proj is None:
                return "layer is never called in the forward pass: replicated"
            if id(proj) in self.proj_reason:
                return self.proj_reason[id(proj)]
            return "not reached by a split region: replicated"
        if not v.trainable:
            return "non-trainable state: replicated"
        return f"{type(layer).__name__} has no split rule: replicated"

    def _read_by_split_heads(self, proj, depth: int = 24) -> bool:
        """Whether `proj` has fewer heads than devices and its output meets
        a split tensor within `depth` ops (kv heads read by split query
        heads)."""
        labels = proj.rule.column_labels()
        if len(labels) < 2 or proj.rule.label_size(labels[0]) >= self.n:
            return False
        frontier = [t for node in proj.nodes for t in node.outputs]
        seen = set()
        for _ in range(depth):
            nxt = []
            for t in frontier:
                for index, _ in self.graph.consumers.get(id(t), []):
                    node = self.graph.nodes[index]
                    if any(id(x) in self.split_tensors for x in node.inputs):
                        return True
                    if index not in seen and index not in self.projections:
                        seen.add(index)
                        nxt += node.outputs
            frontier = nxt
        return False


def _opaque_reason(outer, why) -> str:
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


def _dedupe(reasons: list[str]) -> str:
    return "; ".join(_dedupe_list(reasons)[:2])


def _dedupe_list(reasons: list[str]) -> list[str]:
    seen = []
    for r in reasons:
        if r not in seen:
            seen.append(r)
    return seen
