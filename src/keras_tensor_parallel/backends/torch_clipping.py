"""clipnorm / global_clipnorm on torch with full norms across ranks.

A split variable's gradient is a shard: its squared norm is all-reduced;
a replicated variable's is counted once (every rank holds all of it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from keras_tensor_parallel.backends import torch_collectives as tc
from keras_tensor_parallel.backends.torch_roles import is_split


def _sq_norm(grads, variables, split: bool):
    total = torch.zeros((), dtype=torch.float32)
    for gr, v in zip(grads, variables):
        if gr is not None and is_split(v) == split:
            total = total + torch.sum(gr.float() ** 2).cpu()
    return total


def _all_reduce(x):
    if tc.world_size() > 1:
        dist.all_reduce(x)
    return x


def install_clipping(optimizer) -> None:
    """Make clipnorm/global_clipnorm use full (all-reduced) norms."""
    if getattr(optimizer, "_tp_clipping", False):
        return
    apply = optimizer._backend_apply_gradients
    clip = optimizer._clip_gradients
    # The variables of the current update live in this closure, NOT in an
    # optimizer attribute: Keras tracks a list of variables assigned to a
    # tracked object, so the model's variables would be listed again in
    # `optimizer.variables` (and saved with the optimizer state).
    current: dict = {"variables": None}

    def tp_apply(grads, trainable_variables):
        # Called after empty gradients were filtered: the lists align.
        current["variables"] = list(trainable_variables)
        try:
            return apply(grads, trainable_variables)
        finally:
            current["variables"] = None

    def tp_clip(grads):
        variables = current["variables"]
        if not variables or len(variables) != len(grads):
            return clip(grads)
        if optimizer.clipnorm and optimizer.clipnorm > 0:
            return [
                _clip_one(gr, v, optimizer.clipnorm)
                for gr, v in zip(grads, variables)
            ]
        if optimizer.global_clipnorm and optimizer.global_clipnorm > 0:
            return _clip_global(grads, variables, optimizer.global_clipnorm)
        return clip(grads)

    optimizer._backend_apply_gradients = tp_apply
    optimizer._clip_gradients = tp_clip
    optimizer._tp_clipping = True


def _clip_global(grads, variables, clipnorm):
    split = _all_reduce(_sq_norm(grads, variables, True))
    norm = torch.sqrt(split + _sq_norm(grads, variables, False))
    scale = clipnorm / torch.clamp(norm, min=clipnorm)
    return [
        None if gr is None else gr * scale.to(gr.device, gr.dtype)
        for gr in grads
    ]


def _clip_one(grad, variable, clipnorm):
    if grad is None:
        return None
    sq = torch.sum(grad.float() ** 2).cpu()
    if is_split(variable):
        _all_reduce(sq)
    norm = torch.sqrt(sq)
    scale = clipnorm / torch.clamp(norm, min=clipnorm)
    return grad * scale.to(grad.device, grad.dtype)
