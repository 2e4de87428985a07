"""Plans for the torch engine: the planner's regions that a rank running
the model's own code on its local shards can play (issue 12).

`plan_model(..., slice_operands=False)` keeps everything XLA alone could
run: no unsplit full-size operand may meet a split, no expert bank split
on its expert dim, no sum ending a region. This planner keeps those rules
but also lets torch

- pad heads (or features) that do not divide N: on torch a shard is its
  rank's `ceil(n / N)` real heads (`roles.shard_sizes`; the last ranks
  hold fewer), which is the plan's padded per-device shape on rank 0 and
  less elsewhere; no zero head is stored or computed, so the result is
  exact without one;
- share kv heads fewer than N (vLLM's duplication): each rank holds the kv
  head its query heads read (`torch_heads.py` plays it), also one kv
  head held whole by all N (multi-query Llama / Qwen3: the walk back
  from their `ops.repeat` follows the size-1 head dim);
- split an expert bank whose output is cut into equal parts along the
  split dim (Qwen3-MoE's fused gate/up, `ops.split(gate_up, 2, -1)`):
  each rank holds its block of every part (`FUSED`, `torch_heads.py`).
- split an expert bank over its experts where `plan/experts.py` picks
  that, as on JAX (`torch_experts.py` plays it).

It reuses the planner's region growth (`plan/regions.py`) with the XLA-only
steps switched off, so every other decision is the plain torch plan's.
"""

from __future__ import annotations

import dataclasses

import keras

from keras_tensor_parallel.backends import torch_experts
from keras_tensor_parallel.backends.roles import shard_sizes
from keras_tensor_parallel.plan import ShardingPlan, lora
from keras_tensor_parallel.plan import graph as graph_lib
from keras_tensor_parallel.plan import propagate as prop
from keras_tensor_parallel.plan.decisions import Planner
from keras_tensor_parallel.plan.overrides import apply_overrides
from keras_tensor_parallel.plan.plan import VariablePlan
from keras_tensor_parallel.plan.planner import is_leaf
from keras_tensor_parallel.plan.regions import RegionGrower, dim_of
from keras_tensor_parallel.plan.validation import (
    check_built,
    validate_world_size,
)


@dataclasses.dataclass(frozen=True)
class TorchVariablePlan(VariablePlan):
    """A `VariablePlan` with what torch needs beyond it.

    Attributes:
        parts: A column split of a kernel whose split dim holds `parts`
            equal parts (fused gate/up): each rank holds its block of every
            part, side by side (`per_device_shape` is the plain split's).
        sum_grad: A replicated variable applied to split tensors (Qwen3's
            per-head query/key norm scale): each rank's gradient covers its
            heads only and is summed over the model axis.
    """

    parts: int = 1
    sum_grad: bool = False


def plan_torch(model, world_size: int, *, overrides=None) -> ShardingPlan:
    """`plan_model` for the torch engine (see the module docstring).

    Args:
        model: A built Keras model.
        world_size: Ranks on the model axis.
        overrides: As for `plan_model`.

    Returns:
        The `ShardingPlan` (fused kernels as `TorchVariablePlan`).

    Example:

    ```python
    plan = plan_torch(model, 4)  # 2 kv heads: copies=2 on key/value
    ```
    """
    validate_world_size(world_size)
    check_built(model)
    graph = graph_lib.extract_graph(model, is_leaf=is_leaf)
    planner = Planner(
        model, graph, world_size, slice_operands=False, op_projections=True
    )
    grower = TorchGrower(planner.grower)
    planner.grower = grower
    entries = planner.run()
    partial = _partial_paths(graph, planner)
    fused = dict(grower.fused)
    if overrides:
        # Overridden entries become torch entries too: a forced column of
        # a fused bank keeps its parts, a replicated norm its gradient sum.
        auto = {e.path: e for e in entries}
        forced = apply_overrides(ShardingPlan(world_size, entries), overrides)
        entries = tuple(forced)
        changed = [e for e in entries if e != auto[e.path]]
        fused.update(_fused_by_graph(graph, changed, world_size))
    lora.refuse_split(model, entries, "torch")
    entries = [_torch_entry(e, fused, partial, world_size) for e in entries]
    return ShardingPlan(world_size, tuple(entries), model_name=model.name)


def _fused_by_graph(graph, entries, n: int) -> dict[str, int]:
    """`{path: parts}` of the `entries` splitting a kernel's last dim whose
    output is cut into equal parts along it (a fused gate/up bank), as
    `TorchGrower._fused_split` finds them in the automatic plan; a
    ValueError where a part does not divide by `n`."""
    found = {}
    for e in entries:
        last = len(e.shape) - 1
        if not e.is_split or e.role == torch_experts.Role.EXPERT:
            continue
        if e.split_dim % len(e.shape) != last:
            continue
        for cut, parts in _last_dim_cuts(graph, e.path):
            if e.shape[last] % (parts * n):
                raise ValueError(
                    f"{e.path} is cut into {parts} fused parts by "
                    f"{cut}: splitting its last dim over {n} ranks needs "
                    f"each part ({e.shape[last] // parts}) to divide by "
                    f"{n}. Received overrides that split it so"
                )
            found[e.path] = parts
    return found


def _last_dim_cuts(graph, path: str):
    """(op name, sections) of every equal `ops.split` along the last dim
    of an output of an op reading the variable at `path`."""
    for node in graph.nodes:
        own = getattr(node.op, "_kernel", getattr(node.op, "kernel", None))
        read = [a for a in node.args if isinstance(a, keras.Variable)]
        if own is not None and isinstance(own, keras.Variable):
            read.append(own)
        if not any(v.path == path for v in read):
            continue
        for out in node.outputs:
            for index, _ in graph.consumers.get(id(out), []):
                cut = graph.nodes[index]
                if cut.type_name not in ("Split", "ArraySplit"):
                    continue
                parts = cut.op.indices_or_sections
                axis = cut.op.axis % len(out.shape)
                if isinstance(parts, int) and axis == len(out.shape) - 1:
                    yield cut.name, parts


def _partial_paths(graph, planner) -> set[str]:
    """Paths of replicated trainable variables an op applies to a split
    tensor: a per-head norm's scale, a column's bias over unsplit dims
    (not a row's bias: added after g; split ones are skipped later)."""
    found = set()
    for node in graph.nodes:
        proj = planner.projections.get(node.index)
        if proj is not None:
            # A column's bias over unsplit dims, added to its split output.
            bias = proj.rule.bias
            if (
                bias is not None
                and id(node.outputs[0]) in planner.split_tensors
            ):
                found.add(bias.path)
            continue
        if not any(id(x) in planner.split_tensors for x in node.inputs):
            continue
        read = [
            a
            for a in keras.tree.flatten((node.args, node.kwargs))
            if isinstance(a, keras.Variable)
        ]
        if isinstance(node.op, keras.layers.Layer):
            read += node.op.trainable_variables
        found.update(v.path for v in read if v.trainable)
    return found


def _torch_entry(entry, fused: dict, partial: set, n: int) -> VariablePlan:
    """The entry as torch stores it: padded dims as uneven shards, fused
    kernels and partial gradients as `TorchVariablePlan`."""
    if entry.role == torch_experts.Role.EXPERT:
        return torch_experts.torch_entry(entry)
    if entry.path in partial and not entry.is_split:
        data = {
            f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)
        }
        reason = (
            f"{entry.reason}; applied to split heads: its gradient is "
            "summed over the model axis"
        )
        return TorchVariablePlan(**{**data, "reason": reason, "sum_grad": True})
    if entry.padded_shape is not None and entry.is_split:
        size = entry.shape[entry.split_dim]
        sizes = ", ".join(map(str, shard_sizes(size, n)))
        reason = (
            f"{entry.reason}; on torch the ranks hold {sizes} of the "
            f"{size} (no zeros stored)"
        )
        return dataclasses.replace(entry, reason=reason)
    parts = fused.get(entry.path, 1)
    if parts == 1 or not entry.is_split:
        return entry
    size = entry.shape[entry.split_dim] // parts
    reason = (
        f"column-parallel inside each expert: fused {parts} x {size} "
        f"features, each rank holds its {size // n}-feature block of every "
        "part; " + entry.reason.split("; ", 1)[-1]
    )
    data = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)}
    return TorchVariablePlan(**{**data, "reason": reason, "parts": parts})


class TorchGrower(torch_experts.ExpertGrower):
    """The planner's region growth with padding and shared kv heads on,
    and every step that needs XLA to slice or reshard off.

    Args:
        base: The planner's own grower (same graph and state).
    """

    def __init__(self, base: RegionGrower):
        super().__init__(
            base.graph, base.n, base.proj_at, base.rules, base.decided,
            base.split_tensors, slice_operands=True,
        )  # fmt: skip
        self.fused: dict[str, int] = {}  # kernel path -> parts
        self._pending: dict[int, tuple] = {}  # id(projection) -> parts

    def grow(self, proj, label, recruit, pad=False):
        self._pending = {}
        region = super().grow(proj, label, recruit, pad)
        for p, parts in self._pending.values():
            if id(p) in region.columns:
                self.fused[p.kernel.path] = parts
        return region

    def _groups_heads(self, region, node, t, d) -> bool:
        # Gemma's reshape of split query heads into (kv heads, group) with
        # kv heads shared: each rank's reshape reads its local counts
        # (`torch_attributes.py`; a model whose code cannot fails the
        # wrap's check run with a ValueError, rolled back).
        return super()._groups_heads(region, node, t, d)

    def _recruit_producer(self, region, t, dim, depth) -> None:
        node = self._producer(t)
        if (
            node is not None
            and node.type_name == "Repeat"
            and node.op.axis is not None
            and node.op.axis % len(t.shape) == dim
            and node.inputs[0].shape[dim] == 1
            and depth <= 32
        ):
            # Multi-query attention (Llama's `ops.repeat(key, q // 1)`):
            # the one kv head's dim has size 1, which the base walk never
            # splits; walk it back to the kv projection, shared by all N
            # ranks (copies N: each holds the head whole, the repeat
            # count made local by `torch_heads.py`).
            self._recruit_one_head(region, node.inputs[0], dim, depth + 1)
            return
        super()._recruit_producer(region, t, dim, depth)

    def _producer(self, t):
        index = self.graph.producer.get(id(t))
        return None if index is None else self.graph.nodes[index]

    def _recruit_one_head(self, region, t, dim, depth) -> None:
        """`_recruit_producer` for a one-head dim `dim` of `t`."""
        node = self._producer(t)
        if node is None or depth > 32 or id(t) in region.split:
            return
        proj = self.proj_at.get(node.index)
        if proj is not None:
            self._recruit(region, proj, t, dim)
            return
        if node.opaque_reason:
            return
        if self.rules.get(id(node.op)) is not None and not prop.known(node):
            return
        for i, src in enumerate(node.inputs):
            for c in range(len(src.shape)):
                if src.shape[c] != 1 or id(src) in region.split:
                    continue
                trial = [None] * len(node.inputs)
                trial[i] = c
                try:
                    if prop.propagate(node, trial)[0] != dim:
                        continue
                except prop.Conflict:
                    continue
                self._recruit_one_head(region, src, c, depth + 1)
                break

    def _visit(self, region, node, recruit: bool) -> None:
        if self._fused_split(region, node):
            return
        if self._one_head_reshape(region, node):
            return
        shared = any(id(x) in region.copies for x in node.inputs)
        super()._visit(region, node, recruit)
        widened = [
            t
            for t in node.outputs
            if id(t) in region.split and id(t) not in region.copies
        ]
        if shared and widened and node.type_name not in ("Repeat", "Reshape"):
            # A rank's code widens its one kv head to its query heads only
            # through `ops.repeat` (`torch_heads.py` cuts its count) or by
            # merging (kv, group) back into heads (Gemma's output reshape,
            # its local counts set by `torch_attributes.py`).
            raise prop.Conflict(
                f"{node.name} widens shared kv heads without a repeat"
            )

    def _one_head_reshape(self, region, node) -> bool:
        """A reshape keeping the dims up to a shared one-head dim (RoPE's
        `reshape(stack((-x2, x1), -2), shape(x))` on a 1-kv-head key):
        the head dim stays put; the shape rule alone cannot tell where a
        size-1 dim goes."""
        if node.type_name != "Reshape" or len(node.inputs) != 1:
            return False
        x, out = node.inputs[0], node.outputs[0]
        d = region.split.get(id(x))
        if d is None or x.shape[d] != 1 or region.copies.get(id(x), 1) == 1:
            return False
        if tuple(x.shape[: d + 1]) != tuple(out.shape[: d + 1]):
            return False
        if any(id(t) in self.split_tensors for t in node.inputs):
            raise prop.Conflict(f"{node.name} is inside another split region")
        region.visited[node.index] = node
        self._set_split(region, out, d, region.copies[id(x)])
        return True

    def _fused_split(self, region, node) -> bool:
        """A column output cut into equal parts along its split dim: each
        part is split, each rank holding its block of every part."""
        if node.type_name not in ("Split", "ArraySplit") or region.pad:
            return False
        x = node.inputs[0]
        d = region.split.get(id(x))
        if d is None or node.op.axis % len(x.shape) != d:
            return False
        sections = node.op.indices_or_sections
        producer = self.graph.producer.get(id(x))
        proj = self.proj_at.get(producer) if producer is not None else None
        if not isinstance(sections, int) or proj is None:
            return False
        if id(proj) not in region.columns or len(proj.nodes) != 1:
            return False
        _, label = region.columns[id(proj)]
        if dim_of(proj.rule.output_spec, x, label) != d:
            return False
        if x.shape[d] % (sections * self.n):
            raise prop.Conflict(
                f"{proj.name}: {sections} fused parts of "
                f"{x.shape[d] // sections} do not divide by {self.n}"
            )
        region.visited[node.index] = node
        self._pending[id(proj)] = (proj, sections)
        for t in node.outputs:
            self._set_split(region, t, d)
        return True

    def _check_complete(self, region) -> None:
        for name, x in self.unsliced(region):  # torch_experts.py
            if id(x) not in region.split:
                raise prop.Conflict(
                    f"{name}: an unsplit full-size tensor meets the split "
                    "dim (a torch rank cannot slice it)"
                )
        super()._check_complete(region)
