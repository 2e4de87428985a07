"""Expert parallelism on torch (issue 12): each rank holds `E / N` whole
experts of a mixture-of-experts bank.

KerasHub's banks (Mixtral, Qwen3-MoE) compute every expert on every
token, `[experts, tokens, hidden]`, and the block around them weights
that by the router and sums over experts:

```
expert_out = bank(x)                        # [E, t, h]
combined = ops.sum(expert_out * routing[:, :, None], axis=0)
```

Tokens are replicated over the model axis, so a rank holding experts
`lo:hi` (kernels sliced on their experts dim, Adam slots with them)
computes their outputs only; the combine over experts is then partial per
rank and one all-reduce completes it:

- the bank's input passes `f` (identity forward, all-reduce of its
  gradient backward: each rank's is its experts' part);
- the bank's `[E / N, t, h]` output is placed among zeros for the other
  ranks' experts, so the block's own code runs unchanged;
- the sum over experts of that output times the routing weights is
  computed over the local experts only and passes `g` (all-reduce
  forward, identity backward); the routing weights it reads pass `f`,
  as their gradient is each rank's experts' part too.

The planner (`ExpertGrower`, the torch grower's base) grows the same
expert-parallel region as on JAX and `plan/experts.py` picks it or the
split inside each expert by the same costs, so torch and JAX plan the
same model alike; it keeps only the banks this module can play: experts
on dim 0 of every kernel and output, summed over by the block, the
routing weights met only by the product before that sum.
"""

from __future__ import annotations

import dataclasses

import keras

from keras_tensor_parallel.backends import roles
from keras_tensor_parallel.plan import Role
from keras_tensor_parallel.plan import propagate as prop
from keras_tensor_parallel.plan.regions import RegionGrower, dim_of

# Planning -------------------------------------------------------------------


class ExpertGrower(RegionGrower):
    """Region growth allowing the expert-parallel banks torch plays."""

    def _add_batch(self, region, proj, label) -> None:
        _check_dim0(proj, label)
        super()._add_batch(region, proj, label)

    def _ends_with_sum(self, region, node, dims) -> bool:
        if not region.batch or dims[0] != 0:
            return False  # only the sum over a bank's experts
        return super()._ends_with_sum(region, node, dims) and self._combines(
            region, node.inputs[0]
        )

    def _combines(self, region, x) -> bool:
        """Whether `x` is what `combine` recognises: a bank's output, or
        its product with one other tensor, read by nothing else."""
        banks = {
            id(n.outputs[0]) for p, _ in region.batch.values() for n in p.nodes
        }
        if id(x) in banks:
            return True
        node = self.graph.nodes[self.graph.producer[id(x)]]
        bank = [t for t in node.inputs if id(t) in banks]
        return (
            node.type_name == "Multiply"
            and len(node.inputs) == 2
            and len(bank) == 1
            and len(self.graph.consumers.get(id(bank[0]), [])) == 1
        )

    def unsliced(self, region) -> list[tuple]:
        """(op name, tensor) of the unsplit full-size operands meeting the
        split that no rank can slice: all but an expert-parallel bank's
        routing weights (sliced by `combine` at the sum)."""
        if region.batch:
            for proj, label in region.columns.values():
                _check_dim0(proj, label)
        return [
            (name, x)
            for name, x in region.full_operands
            if id(x) not in region.split and not self._routing(region, x)
        ]

    def _routing(self, region, x) -> bool:
        """Whether `x` only meets the split in the product summed over
        the experts (`weighted = expert_out * routing`)."""
        if not region.batch:
            return False
        summed = {id(n.inputs[0]) for n in region.reductions}
        met = [
            self.graph.nodes[i]
            for i, _ in self.graph.consumers.get(id(x), [])
            if i in region.visited
        ]
        return bool(met) and all(
            n.type_name == "Multiply" and id(n.outputs[0]) in summed
            for n in met
        )


def _check_dim0(proj, label) -> None:
    r = proj.rule
    outs = [dim_of(r.output_spec, n.outputs[0], label) for n in proj.nodes]
    if r.kernel_spec.find(label) != 0 or any(d != 0 for d in outs):
        raise prop.Conflict(
            f"{proj.name}: torch splits experts on the first dim of the "
            "kernels and outputs only"
        )


# Running --------------------------------------------------------------------

# The bank output awaiting its sum over experts: (placed, local, state).
_PENDING: list = []
_ORIGINAL: dict[str, object] = {}
_INSTALLED: list = []


class ExpertParallel(roles.Style):
    """`Role.EXPERT`: kernels sliced on their experts dim (the plain
    split, `roles.split_variable`); the bank's `call` and the sum over
    its experts as the module docstring says."""

    role = Role.EXPERT

    def install(self, layer, shard, journal) -> None:
        original, comm = layer.call, self.comm

        def call(inputs, *args, **kwargs):
            if _PENDING:
                raise ValueError(
                    f"{layer.path}: the previous expert-parallel bank's "
                    "output was never summed over its experts. Received: "
                    "a block that uses expert outputs otherwise"
                )
            local = original(comm.f(inputs), *args, **kwargs)
            placed = _place(local, shard)
            _PENDING.append((placed, local, comm, shard))
            return placed

        journal.setattr(layer, "call", call)
        journal.setattr(layer, "input_spec", None)
        _activate()
        journal.add(_deactivate)


def _place(local, shard):
    """The full `[E, ...]` output: this rank's experts, zeros elsewhere."""
    import torch

    per = local.shape[0]
    before = local.new_zeros((shard.rank * per, *local.shape[1:]))
    after = local.new_zeros(
        ((shard.size - shard.rank - 1) * per, *local.shape[1:])
    )
    return torch.cat([before, local, after], dim=0)


def _activate() -> None:
    if not _INSTALLED:
        module = keras.src.backend.numpy
        _ORIGINAL["sum"] = module.sum
        module.sum = _sum
    _INSTALLED.append(True)


def _deactivate() -> None:
    _INSTALLED.pop()
    _PENDING.clear()
    if not _INSTALLED:
        keras.src.backend.numpy.sum = _ORIGINAL.pop("sum")


def _sum(x, axis=None, keepdims=False):
    original = _ORIGINAL["sum"]
    if not _PENDING or not _over_experts(x, axis):
        return original(x, axis=axis, keepdims=keepdims)
    placed, local, comm, shard = _PENDING[0]
    partial = combine(x, placed, local, comm, shard)
    if partial is None:
        if tuple(x.shape) == tuple(placed.shape):
            raise ValueError(
                "An expert-parallel bank's outputs are summed over experts "
                "in a form torch cannot split (it plays `ops.sum(expert_out "
                "* routing, axis=0)`). Received: a sum over experts of "
                f"shape {tuple(x.shape)} computed otherwise; force the split "
                "inside each expert with `overrides`"
            )
        return original(x, axis=axis, keepdims=keepdims)
    _PENDING.clear()
    return comm.g(original(partial, axis=axis, keepdims=keepdims))


def _over_experts(x, axis) -> bool:
    if axis is None or not hasattr(x, "shape") or not len(x.shape):
        return False
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return 0 in prop.normalize_axes(tuple(axes), len(x.shape))


def combine(x, placed, local, comm, shard):
    """The local experts' part of `x` (the placed bank output, or its
    product with the routing weights), or None if `x` is neither.

    Without autograd the placed zeros make the sum itself partial; with
    it, the product is recomputed on the local experts from the routing
    weights autograd saved, which pass `f` (their gradient is partial)."""
    if x is placed:
        return local
    fn = getattr(x, "grad_fn", None)
    if fn is None:
        if placed.grad_fn is None and tuple(x.shape) == tuple(placed.shape):
            return x  # no gradient: zeros elsewhere, partial sum
        return None
    if type(fn).__name__ != "MulBackward0" or placed.grad_fn is None:
        return None
    inputs = [f for f, _ in fn.next_functions]
    if placed.grad_fn not in inputs or len(inputs) != 2:
        return None
    other = inputs.index(placed.grad_fn) ^ 1
    routing = getattr(fn, "_saved_other" if other else "_saved_self")
    routing = comm.f(routing)
    if routing.ndim == placed.ndim and routing.shape[0] == placed.shape[0]:
        per = local.shape[0]
        routing = routing[shard.rank * per : (shard.rank + 1) * per]
    return local * routing


def torch_entry(entry):
    """An expert-parallel plan entry as torch plays it: what the reason
    states, plus where torch all-reduces the routing weights' gradient.
    A fused gate/up kernel stays a plain entry: a rank holds its experts
    whole, every part of them."""
    experts = entry.shape[entry.split_dim]
    reason = (
        f"{entry.reason}; on torch the routing weights' gradient is "
        f"all-reduced where they meet the experts' outputs: {experts} "
        "values per token (one per expert)"
    )
    return dataclasses.replace(entry, reason=reason)
