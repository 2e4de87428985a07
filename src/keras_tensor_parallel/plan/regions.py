"""Grow one Megatron region through the traced dataflow.

A region starts at a column-parallel projection: its output is split on
one label. The split travels forward through ops that keep it local
(`propagate.py`) until projections contract it (row-parallel). Other
projections that meet the split through a shared op (k and v meeting q in
attention, the gate meeting the up-projection) are recruited as columns.
Anything that would need the split gathered raises `Conflict`, and the
caller tries the next option or replicates, with that reason.
"""

from __future__ import annotations

import collections
import math

from keras_tensor_parallel.plan import padding
from keras_tensor_parallel.plan import propagate as prop

# How far back a recruit is searched from the op where it meets the split.
_MAX_RECRUIT_DEPTH = 32


def lining_up_dim(node, i, accept) -> int | None:
    """The first dim of input `i` that, split alone, gives outputs
    `accept` approves (an op that ignores the operand, like an attention
    mask, never does)."""
    x = node.inputs[i]
    for c in range(len(x.shape)):
        if x.shape[c] in (None, 1):
            continue
        trial = [None] * len(node.inputs)
        trial[i] = c
        try:
            if accept(prop.propagate(node, trial)):
                return c
        except prop.Conflict:
            continue
    return None


class Region:
    """A candidate region: its columns, rows and split tensors."""

    def __init__(self):
        # id(projection) -> (projection, label split)
        self.columns: dict[int, tuple] = {}
        self.rows: dict[int, tuple] = {}
        # Expert banks the split passes through on a label the input, the
        # kernel and the output share (the expert dim of `eti,eih->eth`).
        self.batch: dict[int, tuple] = {}
        # Sums over the split dim: they end the region like a row does
        # (one all-reduce of their output), as experts' outputs are summed.
        self.reductions: list = []
        self.split: dict[int, int] = {}  # id(tensor) -> split dim
        self.queue: collections.deque = collections.deque()
        # (op name, tensor): unsplit full-size operands meeting the split,
        # and (tensor, dim) of each: the dim the split lines up with.
        self.full_operands: list[tuple] = []
        self.full_dims: list[tuple] = []
        # Logical size of a split dim stored padded to a multiple of N
        # (0: not padded), and the tensors zero on its padded entries.
        self.pad = 0
        self.zero: set[int] = set()
        self.visited: dict[int, object] = {}  # node index -> node
        # Devices sharing each block of a split smaller than N (kv heads
        # read by the query heads of several devices): id -> copies.
        self.copies: dict[int, int] = {}
        self.column_copies: dict[int, int] = {}  # id(projection) -> copies


class RegionGrower:
    """Grows regions over one traced graph.

    Args:
        graph: The `ModelGraph`.
        world_size: Devices on the model axis.
        projections: {node index: Projection}.
        layer_rules: {id(layer): rule} (non-projection rules stop a split).
        decided: {id(variable): ...} of variables already planned.
        split_tensors: ids of tensors split by committed regions.
        slice_operands: Whether the engine partitions the traced program
            itself (XLA): then an unsplit full-size tensor may meet the
            split (the engine slices it), expert banks may be split on the
            expert dim and a sum over the split dim may end a region.
    """

    def __init__(
        self,
        graph,
        world_size,
        projections,
        layer_rules,
        decided,
        split_tensors,
        *,
        slice_operands=True,
    ):
        self.graph = graph
        self.n = world_size
        self.proj_at = projections
        self.rules = layer_rules
        self.decided = decided
        self.split_tensors = split_tensors
        self.slice_operands = slice_operands

    def grow(self, proj, label, recruit: bool, pad: bool = False) -> Region:
        """The region started by splitting `proj`'s output on `label`
        (stored padded to a multiple of N when `pad`)."""
        region = Region()
        region.pad = proj.rule.label_size(label) if pad else 0
        self._add_column(region, proj, label)
        while region.queue:
            t = region.queue.popleft()
            if id(t) in self.graph.outputs:
                raise prop.Conflict("split activation reaches the model output")
            for node_index, _ in self.graph.consumers.get(id(t), []):
                self._visit(region, self.graph.nodes[node_index], recruit)
        self._check_complete(region)
        return region

    def _is_decided(self, proj) -> bool:
        return id(proj.kernel) in self.decided

    def _fits(self, region, size) -> bool:
        """Whether a split dim of `size` can be split in `region`."""
        if region.pad:
            return size == region.pad
        return size is not None and size % self.n == 0

    def _add_column(self, region, proj, label, copies: int = 1) -> None:
        if not proj.nodes:
            raise prop.Conflict(f"{proj.name} is never called")
        if self._is_decided(proj):
            raise prop.Conflict(f"{proj.name} is already planned")
        region.columns[id(proj)] = (proj, label)
        for node in proj.nodes:
            if any(id(x) in region.split for x in node.inputs):
                raise prop.Conflict(f"{proj.name} input is already split")
            out = node.outputs[0]
            dim = dim_of(proj.rule.output_spec, out, label)
            self._set_split(region, out, dim, copies)
            if padding.zero_output(proj):  # zero kernel columns and bias
                region.zero.add(id(out))
        if proj.rule.bias is not None:  # padded with zeros as well
            region.zero.add(id(proj.rule.bias))

    def _set_split(self, region, t, dim: int, copies: int = 1) -> None:
        if id(t) in region.split:
            if region.split[id(t)] != dim:
                raise prop.Conflict("a tensor would be split on two dims")
            if region.copies.get(id(t), 1) != copies:
                raise prop.Conflict("a tensor would be shared two ways")
            return
        size = t.shape[dim]
        if copies > 1:
            if size is None or size * copies != self.n:
                raise prop.Conflict("shared heads do not fill the devices")
            region.copies[id(t)] = copies
        elif not self._fits(region, size):
            raise prop.Conflict(
                f"split dim of size {size} not divisible by {self.n}"
            )
        region.split[id(t)] = dim
        region.queue.append(t)

    def _visit(self, region, node, recruit: bool) -> None:
        region.visited[node.index] = node
        if any(id(x) in self.split_tensors for x in node.inputs):
            raise prop.Conflict(f"{node.name} is inside another split region")
        dims = [region.split.get(id(x)) for x in node.inputs]
        proj = self.proj_at.get(node.index)
        if proj is not None:
            self._visit_projection(region, node, proj, dims)
            return
        if self._ends_with_sum(region, node, dims):
            region.reductions.append(node)
            return
        if node.opaque_reason:
            raise prop.Conflict(f"flows into untraceable {node.name}")
        if self.rules.get(id(node.op)) is not None and not prop.known(node):
            raise prop.Conflict(
                f"flows into {type(node.op).__name__} {node.name}, which "
                "cannot take a split input"
            )
        if region.pad and not padding.pad_safe(node):
            raise prop.Conflict(
                f"{node.type_name} {node.name} would see the padding"
            )
        outs = prop.propagate(node, dims)
        full = self._full_operands(node, dims, outs, region)
        region.full_operands += [(node.name, x) for x, _ in full]
        region.full_dims += full
        if recruit:
            for x, c in full:
                self._recruit_producer(region, x, c, depth=0)
        copies = self._copies_in(region, node)
        for t, d in zip(node.outputs, outs):
            if d is not None:
                shared = 1
                if copies or self._groups_heads(region, node, t, d):
                    shared = self._copies_out(t, d)
                self._set_split(region, t, d, shared)

    def _groups_heads(self, region, node, t, d) -> bool:
        """A reshape of split query heads into (kv heads, group) with
        fewer kv heads than devices (Gemma's `btkgh` attention): the kv
        dim's blocks are shared by the devices that split the group dim
        after it, each reading its own kv head, so the split stays local
        (XLA lays it out over the model axes; no engine that runs the
        model's own code per rank could)."""
        size = t.shape[d]
        return (
            self.slice_operands
            and not region.pad
            and node.type_name == "Reshape"
            and size is not None
            and size < self.n
            and self.n % size == 0
            and d + 1 < len(t.shape)
            and (t.shape[d + 1] or 1) % (self.n // size) == 0
        )

    def _copies_in(self, region, node) -> int:
        """Copies of the split inputs of `node` (0 if none is shared)."""
        split = [
            region.copies.get(id(x), 1)
            for x in node.inputs
            if id(x) in region.split
        ]
        if not any(c > 1 for c in split):
            return 0
        if len(set(split)) > 1:
            raise prop.Conflict(f"{node.name} mixes shared and split heads")
        return split[0]

    def _copies_out(self, t, d) -> int:
        """Copies of an output split on `d`: a repeat widens shared heads
        (k repeated to meet q) until every device holds its own."""
        size = t.shape[d]
        if size % self.n == 0:
            return 1
        if self.n % size:
            raise prop.Conflict("shared heads change size unevenly")
        return self.n // size

    def _visit_projection(self, region, node, proj, dims) -> None:
        if any(id(x) in region.copies for x in node.inputs):
            raise prop.Conflict(
                f"{proj.name} would contract heads shared by devices"
            )
        if any(d is not None for d in dims[1:]):
            raise prop.Conflict(f"{node.name}: split tensor as extra input")
        r = proj.rule
        x, d = node.inputs[0], dims[0]
        label = label_at(r.input_spec, x, d)
        if label in r.contracted_labels():
            self._add_row(region, proj, label)
            return
        if label is None or (
            label in r.output_spec and label not in r.kernel_spec
        ):
            out = node.outputs[0]
            dim = (
                len(out.shape) - len(x.shape) + d
                if label is None
                else dim_of(r.output_spec, out, label)
            )
            self._set_split(region, out, dim)
            return
        if self.slice_operands and label in r.output_spec and not region.pad:
            # A label of input, kernel and output: split all three.
            self._add_batch(region, proj, label)
            out = node.outputs[0]
            self._set_split(region, out, dim_of(r.output_spec, out, label))
            return
        raise prop.Conflict(f"{proj.name} kernel would need the split dim")

    def _add_batch(self, region, proj, label) -> None:
        if self._is_decided(proj):
            raise prop.Conflict(f"{proj.name} is already planned")
        if id(proj) in region.columns or id(proj) in region.rows:
            raise prop.Conflict(f"{proj.name} split two ways")
        if proj.rule.label_size(label) % self.n:
            raise prop.Conflict(f"{proj.name} batch dim indivisible")
        region.batch[id(proj)] = (proj, label)

    def _ends_with_sum(self, region, node, dims) -> bool:
        if not self.slice_operands or node.type_name != "Sum" or region.pad:
            return False
        if any(id(x) in region.copies for x in node.inputs):
            return False
        if len(node.inputs) != 1 or dims[0] is None:
            return False
        rank = len(node.inputs[0].shape)
        return dims[0] in prop.normalize_axes(node.op.axis, rank)

    def _add_row(self, region, proj, label) -> None:
        if self._is_decided(proj):
            raise prop.Conflict(f"{proj.name} is already planned")
        if id(proj) in region.columns:
            raise prop.Conflict(f"{proj.name} would be column and row")
        if not self._fits(region, proj.rule.label_size(label)):
            raise prop.Conflict(f"{proj.name} contracted dim indivisible")
        prev = region.rows.get(id(proj))
        if prev is not None and prev[1] != label:
            raise prop.Conflict(f"{proj.name} split two ways")
        region.rows[id(proj)] = (proj, label)

    def _full_operands(self, node, dims, outs, region) -> list[tuple]:
        """(tensor, dim) of unsplit operands whose full-size dim lines up
        with the split output: each device needs only its slice of them."""
        if len(node.inputs) < 2 or all(d is None for d in outs):
            return []
        found = []
        for i, x in enumerate(node.inputs):
            if dims[i] is not None or id(x) in region.split:
                continue
            c = lining_up_dim(node, i, lambda out: out == outs)
            if c is not None:
                found.append((x, c))
        return found

    def _recruit_producer(self, region, t, dim, depth) -> None:
        """Walk back from `t` (needed split on `dim`) to column candidates."""
        if depth > _MAX_RECRUIT_DEPTH or id(t) not in self.graph.producer:
            return
        node = self.graph.nodes[self.graph.producer[id(t)]]
        proj = self.proj_at.get(node.index)
        if proj is not None:
            self._recruit(region, proj, t, dim)
            return
        if node.opaque_reason:
            return
        # A layer with a rule is walked through only if a split passes it
        # (a norm over another dim: Gemma's key norm over head_dim).
        if self.rules.get(id(node.op)) is not None and not prop.known(node):
            return
        for i, src in enumerate(node.inputs):
            if id(src) in region.split:
                continue
            c = lining_up_dim(node, i, lambda out: out[0] == dim)
            if c is not None:
                self._recruit_producer(region, src, c, depth + 1)

    def _recruit(self, region, proj, t, dim) -> None:
        if id(proj) in region.columns or id(proj) in region.rows:
            return
        if self._is_decided(proj):
            return
        r = proj.rule
        label = label_at(r.output_spec, t, dim)
        if label not in r.column_labels():
            return
        size = r.label_size(label)
        copies = 1
        if not self._fits(region, size):
            # Fewer kv heads than devices: each device holds the one its
            # query heads read (vLLM's duplication), if that is exact.
            if region.pad or not self.slice_operands or self.n % size:
                return
            copies = self.n // size
        # Every call of the recruit splits its output (a layer called
        # twice, like DeBERTa's key on hidden and position states), so
        # none of its calls may read a tensor the region splits.
        if any(id(x) in region.split for c in proj.nodes for x in c.inputs):
            return
        region.column_copies[id(proj)] = copies
        self._add_column(region, proj, label, copies)

    def _check_complete(self, region) -> None:
        if not region.rows and not region.reductions:
            raise prop.Conflict("no row-parallel consumer")
        if not self.slice_operands or region.pad:
            for name, x in region.full_operands:
                if id(x) not in region.split:
                    raise prop.Conflict(
                        f"{name}: an unsplit full-size tensor meets the "
                        "split dim (this engine cannot slice it, or it "
                        "cannot be padded)"
                    )
        if region.pad:
            self._track_zero(region)
            for proj, _ in region.rows.values():
                if any(id(n.inputs[0]) not in region.zero for n in proj.nodes):
                    raise prop.Conflict(
                        f"{proj.name} would read nonzero padded features"
                    )
        for proj, _ in (*region.rows.values(), *region.batch.values()):
            for node in proj.nodes:
                if id(node.inputs[0]) not in region.split:
                    raise prop.Conflict(
                        f"{proj.name} is also called on an unsplit input"
                    )

    def _track_zero(self, region) -> None:
        """Mark, in dataflow order, the tensors zero on the padding."""
        for index in sorted(region.visited):
            node = region.visited[index]
            proj = self.proj_at.get(index)
            if proj is None:
                zero = padding.keeps_zero(node, region.zero)
            else:  # a pass-through projection without a bias
                zero = (
                    id(proj) not in region.rows
                    and proj.rule.bias is None
                    and padding.zero_output(proj)
                    and id(node.inputs[0]) in region.zero
                )
            if zero:
                region.zero.update(id(t) for t in node.outputs)


def collective_elements(region) -> int:
    """Elements all-reduced per step by `region`: forward, the outputs of
    its rows and sums; backward, the gradient of each distinct input its
    columns read (at the trace's batch and sequence sizes)."""
    ends = [n for p, _ in region.rows.values() for n in p.nodes]
    ends += region.reductions
    forward = sum(math.prod(n.outputs[0].shape) for n in ends)
    inputs = {
        id(n.inputs[0]): n.inputs[0]
        for p, _ in region.columns.values()
        for n in p.nodes
    }
    return forward + sum(math.prod(t.shape) for t in inputs.values())


def split_elements(region) -> int:
    """Kernel elements the region splits."""
    members = (*region.columns.values(), *region.rows.values())
    members += tuple(region.batch.values())
    return sum(math.prod(p.kernel.shape) for p, _ in members)


def dim_of(spec: str, t, label: str) -> int:
    """Tensor dim of `label` in right-aligned `spec` for tensor `t`."""
    return len(t.shape) - len(spec) + spec.index(label)


def label_at(spec: str, t, dim: int) -> str | None:
    """Label at tensor dim `dim` (None for leading pass-through dims)."""
    offset = len(t.shape) - len(spec)
    return spec[dim - offset] if dim >= offset else None
