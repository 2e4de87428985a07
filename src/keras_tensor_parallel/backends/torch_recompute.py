"""Selective recomputation of the attention core on the torch engine
(`recompute="attention"`, Korthikanti et al. 2022).

The core (scores, mask, softmax, probabilities x values) keeps
[batch, heads, seq, seq] tensors for backward. Recomputed, it keeps only
its inputs (q, k, v, the mask), and backward runs it again. The core is
local to each rank (its heads, the whole sequence), so no collective runs
twice. The layers are the ones the JAX engine recomputes
(`jax_recompute.attention_layers`: those defining `_compute_attention`),
with the same refusal of attention dropout (a mask drawn again).

A custom autograd function, not `torch.utils.checkpoint`: its inputs are
saved with `save_for_backward`, so `saved_tensors_hooks` (how the tests
and benchmarks measure activation bytes) see what it keeps.
"""

from __future__ import annotations

import keras
import torch

from keras_tensor_parallel.backends.jax_recompute import checked_layers


def _copies(tensors) -> list:
    """Float inputs copied: a core may scale its query in place (Gemma's
    `q *= ...`), which must touch neither the saved inputs nor the
    leaves backward differentiates against."""
    return [t.clone() if t.is_floating_point() else t for t in tensors]


class _Recompute(torch.autograd.Function):
    """`run(*tensors)` without its intermediates: forward without a graph,
    backward runs it again with one and takes its vector-Jacobian
    product."""

    @staticmethod
    def forward(ctx, run, *tensors):
        ctx.run = run
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return tuple(run(*_copies(tensors)))

    @staticmethod
    def backward(ctx, *grads):
        tensors = [
            t.detach().requires_grad_(t.requires_grad)
            for t in ctx.saved_tensors
        ]
        with torch.enable_grad():
            outs = ctx.run(*_copies(tensors))
        pairs = [
            (o, g)
            for o, g in zip(outs, grads)
            if g is not None and torch.is_tensor(o) and o.requires_grad
        ]
        wanted = [t for t in tensors if t.requires_grad]
        found = torch.autograd.grad(
            [o for o, _ in pairs],
            wanted,
            [g for _, g in pairs],
            allow_unused=True,
        )
        by_id = dict(zip(map(id, wanted), found))
        return (None, *(by_id.get(id(t)) for t in tensors))


def _recomputed(original):
    """`original(*args, **kwargs)` with its tensors recomputed; everything
    else (flags, None, Python numbers) passes as a constant."""

    def call(*args, **kwargs):
        leaves = keras.tree.flatten((args, kwargs))
        where = [i for i, x in enumerate(leaves) if torch.is_tensor(x)]
        if not where or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        shape: list = []

        def run(*tensors):
            full = list(leaves)
            for i, t in zip(where, tensors):
                full[i] = t
            a, k = keras.tree.pack_sequence_as((args, kwargs), full)
            out = original(*a, **k)
            shape[:] = [out]
            return keras.tree.flatten(out)

        outs = _Recompute.apply(run, *[leaves[i] for i in where])
        return keras.tree.pack_sequence_as(shape[0], list(outs))

    return call


def check(model) -> list:
    """The attention layers to recompute; ValueError when there is none
    or one has attention dropout. Changes nothing.

    Example:

    ```python
    layers = check(model)  # before engine.apply
    ```
    """
    return checked_layers(model)


def install(layers, journal) -> None:
    """Recompute each of `layers`' attention core in backward; each change
    goes to `journal`."""
    for layer in layers:
        call = _recomputed(layer._compute_attention)
        journal.setattr(layer, "_compute_attention", call)
