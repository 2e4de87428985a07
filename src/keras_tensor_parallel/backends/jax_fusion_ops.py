"""One all-reduce for the input gradient of sibling einsums in a layer's
own code.

`jax_fusion` fuses sibling Dense/EinsumDense layers by replacing their
calls. A layer that applies its own weights with `ops.einsum` (Mixtral's
experts: `th,ehm->etm` for the gate and for the up projection, both on
the same tokens) has no call per projection to replace, and XLA's SPMD
partitioner on CPU all-reduces each einsum's partial input gradient on its
own (it does not reassociate `add(all-reduce(a), all-reduce(b))`): two
`[tokens, hidden]` reductions where Megatron needs one.

While such a layer runs, the einsums that apply one of its sibling kernels
to the shared input are computed together in one `jax.custom_vjp` node:
the same einsum per kernel forward; backward, each kernel's gradient as
before and the input gradient as *one* contraction over the kernels
concatenated along an unsplit dim (so the concatenation moves no data),
hence one all-reduce. The sum is only reassociated: results agree to
float rounding. Every other einsum is left to Keras.
"""

from __future__ import annotations

import collections
import contextlib

import jax
import jax.numpy as jnp
import keras
from keras.src.backend.jax import numpy as jax_numpy

from keras_tensor_parallel.plan import ShardingPlan


def _concat_letter(rule, entry) -> str | None:
    """An unsplit label of the kernel and the output, contracted in the
    input gradient (the ffn dim of experts split by expert)."""
    split = rule.kernel_spec[entry.split_dim - _offset(rule, entry)]
    if split not in rule.output_spec:
        return None  # a row: its input is split, its input gradient local
    for c in rule.kernel_spec:
        if c in rule.output_spec and c not in rule.input_spec and c != split:
            return c
    return None


def _offset(rule, entry) -> int:
    return len(entry.shape) - len(rule.kernel_spec)


def _candidates(graph, plan: ShardingPlan) -> dict:
    """{(id(input), equation, letter): [kernels]} of op-level projections
    whose kernel the plan splits, from the traced `graph`."""
    from keras_tensor_parallel.plan import projections

    found = collections.defaultdict(list)
    for node in graph.nodes:
        rule = projections.op_rule(node)
        if rule is None or node.type_name != "Einsum":
            continue
        entry = plan.get(rule.kernel.path)
        if entry is None or not entry.is_split or entry.padded_shape:
            continue
        if entry.copies != 1 or entry.split_dim < _offset(rule, entry):
            continue
        letter = _concat_letter(rule, entry)
        equation = node.op.subscripts.replace(" ", "")
        if letter is None or equation.split(",")[0] != rule.input_spec:
            continue  # the kernel must be the second operand
        key = (id(node.inputs[0]), equation, letter)
        if all(k is not rule.kernel for k in found[key]):
            found[key].append(rule.kernel)
    return found


def _owner(model, kernels):
    """The one layer owning every kernel directly, or None."""
    ids = {id(k) for k in kernels}
    for layer in model._flatten_layers(include_self=False):
        own = {id(v) for v in layer._trainable_variables}
        if ids <= own:
            return layer
    return None


def _fused_einsums(equation: str, letter: str):
    """(x, kernels) -> one output per kernel, with one contraction for
    d(x) in backward."""
    lhs, out = equation.split("->")
    xs, ks = lhs.split(",")

    @jax.custom_vjp
    def project(x, kernels):
        return tuple(jnp.einsum(equation, x, k) for k in kernels)

    def fwd(x, kernels):
        return project(x, kernels), (x, kernels)

    def bwd(res, grads):
        x, kernels = res
        d_kernels = tuple(jnp.einsum(f"{xs},{out}->{ks}", x, g) for g in grads)
        g = jnp.concatenate(grads, axis=out.index(letter))
        k = jnp.concatenate(kernels, axis=ks.index(letter))
        dx = jnp.einsum(f"{out},{ks}->{xs}", g, k).astype(x.dtype)
        return dx, d_kernels

    project.defvjp(fwd, bwd)
    return project


class _Siblings:
    """Sibling kernels of one layer; the first einsum computes all."""

    def __init__(self, equation: str, letter: str, kernels):
        self.equation = equation
        self.kernels = list(kernels)
        self.project = _fused_einsums(equation, letter)
        self._stash: dict = {}

    def einsum(self, subscripts, operands):
        """The output for `operands`, or None when not one of ours."""
        if len(operands) != 2 or subscripts.replace(" ", "") != self.equation:
            return None
        x, kernel = operands
        index = next(
            (i for i, k in enumerate(self.kernels) if k is kernel), None
        )
        if index is None:
            return None
        hit = self._stash.pop((id(x), index), None)
        if hit is not None and hit[0] is x:
            return hit[1]
        values = tuple(keras.ops.convert_to_tensor(k) for k in self.kernels)
        outs = self.project(keras.ops.convert_to_tensor(x), values)
        for i, o in enumerate(outs):
            if i != index:
                self._stash[(id(x), i)] = (x, o)
        return outs[index]


@contextlib.contextmanager
def _routed(groups):
    """While open, einsums applying a sibling kernel go through its
    group; every other einsum is Keras's own."""
    original = jax_numpy.einsum

    def einsum(subscripts, *operands, **kwargs):
        for group in groups:
            out = group.einsum(subscripts, operands)
            if out is not None:
                return out
        return original(subscripts, *operands, **kwargs)

    jax_numpy.einsum = einsum
    try:
        yield
    finally:
        jax_numpy.einsum = original


def install(model, plan: ShardingPlan, graph, *, journal=None) -> int:
    """Fuse sibling einsums inside the layers of `model` (traced as
    `graph`); returns how many groups."""
    by_layer = collections.defaultdict(list)
    for (_, equation, letter), kernels in _candidates(graph, plan).items():
        layer = _owner(model, kernels) if len(kernels) > 1 else None
        if layer is not None and not getattr(layer, "_tp_fused", False):
            by_layer[id(layer)].append(
                (layer, _Siblings(equation, letter, kernels))
            )
    for pairs in by_layer.values():
        layer, groups = pairs[0][0], [g for _, g in pairs]
        original = layer.call

        def call(*args, _original=original, _groups=groups, **kwargs):
            with _routed(_groups):
                return _original(*args, **kwargs)

        if journal is None:
            layer.call = call
            layer._tp_fused = True
        else:
            journal.setattr(layer, "call", call)
            journal.setattr(layer, "_tp_fused", True)
    return sum(len(p) for p in by_layer.values())
