"""One all-reduce for the input gradient of sibling projections.

Megatron's `f` operator reduces the input gradient of a column-parallel
region once. When q, k and v are three separate `EinsumDense` layers reading
the same tensor, XLA's SPMD partitioner on CPU reduces each of their partial
input gradients on its own (it has no all-reduce reassociation there): three
all-reduces of `[batch, seq, hidden]` where Megatron needs one.

This module makes the first sibling called compute all siblings' matmuls in
one `jax.custom_vjp` node (the others return its results). Forward math is
unchanged: the same einsum per kernel. The backward computes the kernel
gradients per kernel as before, and the input gradient as *one* contraction
over the concatenated (head-sharded) output dims, so XLA emits one
all-reduce. The sum is reassociated only, so results agree to float
rounding.
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import keras

from keras_tensor_parallel.plan import ShardingPlan


def _parse(equation: str):
    """`(P, C, F, K)` letters for `P+C,K->P+F` equations, else `None`.

    `K` (the kernel) holds the contracted letters `C` and the free output
    letters `F` in any order: Dense is `...c,cf->...f`, Llama's query
    `bqm,muh->bquh`, Gemma's `btd,ndh->btnh` (heads lead the kernel).
    """
    try:
        inputs, out = equation.replace(" ", "").split("->")
        x, k = inputs.split(",")
    except ValueError:
        return None
    if "." in equation:
        return None
    contract = "".join(c for c in x if c not in out)
    prefix = x[: len(x) - len(contract)]
    free = out[len(prefix) :]
    if (
        x != prefix + contract
        or not out.startswith(prefix)
        or sorted(k) != sorted(contract + free)
        or len(set(k)) != len(k)
    ):
        return None
    return prefix, contract, free, k


def _equation(layer, ndim: int = 3) -> str:
    """The layer's projection as an einsum (Dense is `...c,cf->...f`)."""
    if isinstance(layer, keras.layers.EinsumDense):
        return layer.equation
    prefix = "abdeghijk"[: ndim - 1]
    return f"{prefix}c,cf->{prefix}f"


def _eligible(layer, plan: ShardingPlan) -> bool:
    """A Dense/EinsumDense whose kernel is split on its first output dim."""
    if type(layer) not in (keras.layers.Dense, keras.layers.EinsumDense):
        return False
    if getattr(layer, "lora_enabled", False) or getattr(
        layer, "quantization_mode", None
    ):
        return False
    letters = _parse(_equation(layer))
    entry = plan.get(layer.kernel.path)
    if letters is None or entry is None or entry.padded_shape:
        return False
    kernel = letters[3]
    if entry.split_dim is None or entry.split_dim >= len(kernel):
        return False
    size = entry.shape[entry.split_dim]
    # Shared kv heads (copies > 1): `copies` devices hold each head.
    whole = size * entry.copies == plan.world_size
    return kernel[entry.split_dim] in letters[2] and (
        size % plan.world_size == 0 or (entry.copies > 1 and whole)
    )


def _fused_project(
    equations: tuple, splits: tuple, world_size: int, copies: tuple
):
    """(x, kernels) -> outputs, with one reduction for d(x) in backward.

    `splits` gives each kernel's sharded dim (a free output dim); `copies`
    how many devices hold each of its blocks (shared kv heads: every one of
    them computes the same input-gradient part, so each adds 1/copies).
    """

    @jax.custom_vjp
    def project(x, kernels):
        return tuple(jnp.einsum(e, x, k) for e, k in zip(equations, kernels))

    def fwd(x, kernels):
        return project(x, kernels), (x, kernels)

    def bwd(res, grads):
        x, kernels = res
        d_kernels, gs, ks = [], [], []
        for e, split, c, g, k in zip(equations, splits, copies, grads, kernels):
            prefix, contract, free, kernel = _parse(e)
            d_kernels.append(
                jnp.einsum(f"{prefix}{contract},{prefix}{free}->{kernel}", x, g)
            )
            # Sharded dim first among the free dims, then split it into
            # (world, local): the concatenation below is along a local
            # dim, so it moves no data.
            s = kernel[split]
            rest = free.replace(s, "")
            g = jnp.einsum(f"{prefix}{free}->{prefix}{s}{rest}", g)
            k = jnp.einsum(f"{kernel}->{contract}{s}{rest}", k)
            if c > 1:  # one block per device, as the query heads are
                g = jnp.repeat(g, c, axis=len(prefix)) / c
                k = jnp.repeat(k, c, axis=len(contract))
            gs.append(g.reshape(*g.shape[: len(prefix)], world_size, -1))
            ks.append(
                k.reshape(math.prod(k.shape[: len(contract)]), world_size, -1)
            )
        dx = jnp.einsum(
            "...nr,cnr->...c",
            jnp.concatenate(gs, axis=-1),
            jnp.concatenate(ks, axis=-1),
        )
        return dx.reshape(x.shape), tuple(d_kernels)

    project.defvjp(fwd, bwd)
    return project


class _Group:
    """Sibling layers reading one tensor; the first called computes all."""

    def __init__(self, layers, splits, world_size: int, copies=None):
        self.layers = list(layers)
        self.splits = tuple(splits)
        self.copies = tuple(copies or (1,) * len(self.layers))
        self.world_size = world_size
        self._projects: dict = {}
        self._stash: dict = {}

    def project(self, inputs, kernels):
        equations = tuple(_equation(m, len(inputs.shape)) for m in self.layers)
        if equations not in self._projects:
            self._projects[equations] = _fused_project(
                equations, self.splits, self.world_size, self.copies
            )
        return self._projects[equations](inputs, kernels)

    def matmul(self, layer, inputs):
        hit = self._stash.pop(id(layer), None)
        if hit is not None and hit[0] is inputs:
            return hit[1]
        outs = self.project(
            inputs,
            tuple(keras.ops.convert_to_tensor(m.kernel) for m in self.layers),
        )
        for member, out in zip(self.layers, outs):
            if member is not layer:
                self._stash[id(member)] = (inputs, out)
        return outs[self.layers.index(layer)]


def _wrap(layer, group: _Group, journal) -> None:
    def call(inputs, training=None):
        x = group.matmul(layer, inputs)
        if layer.bias is not None:
            x = keras.ops.add(x, layer.bias)
        if layer.activation is not None:
            x = layer.activation(x)
        return x

    if journal is None:
        layer.call = call
        layer._tp_fused = True
    else:
        journal.setattr(layer, "call", call)
        journal.setattr(layer, "_tp_fused", True)


def _trace(model):
    from keras_tensor_parallel.plan import graph as graph_lib
    from keras_tensor_parallel.plan.planner import _is_leaf

    return graph_lib.extract_graph(model, _is_leaf)


def sibling_groups(model, plan: ShardingPlan, graph=None) -> list[list]:
    """Eligible projections grouped by the tensor they read (2+ each)."""
    graph = graph if graph is not None else _trace(model)
    by_input = collections.defaultdict(list)
    for node in graph.nodes:
        layer = node.op
        if node.inputs and _eligible(layer, plan):
            if layer not in by_input[id(node.inputs[0])]:
                by_input[id(node.inputs[0])].append(layer)
    return [g for g in by_input.values() if len(g) > 1]


def install(model, plan: ShardingPlan, *, journal=None) -> int:
    """Fuse sibling projections of `model`; returns how many groups.

    With a `base.Journal`, each change is recorded so it can be undone.
    """
    if plan.world_size < 2:
        return 0
    graph = _trace(model)  # once, for both kinds of siblings
    groups = [
        g
        for g in sibling_groups(model, plan, graph)
        if not any(getattr(m, "_tp_fused", False) for m in g)
    ]
    for layers in groups:
        entries = [plan.get(m.kernel.path) for m in layers]
        splits = [e.split_dim for e in entries]
        copies = [e.copies for e in entries]
        group = _Group(layers, splits, plan.world_size, copies)
        for layer in layers:
            _wrap(layer, group, journal)
    from keras_tensor_parallel.backends import jax_fusion_ops

    ops = jax_fusion_ops.install(model, plan, graph, journal=journal)
    return len(groups) + ops


def uninstall(model) -> int:
    """Undo `install` (to measure the unfused step); returns layers reset."""
    count = 0
    for layer in model._flatten_layers(include_self=True):
        if getattr(layer, "_tp_fused", False):
            del layer.call  # the instance attribute; the class's call returns
            layer._tp_fused = False
            count += 1
    return count
