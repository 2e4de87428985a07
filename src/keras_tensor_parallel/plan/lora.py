"""LoRA adapters follow their base kernel's split.

Keras's `Dense`/`EinsumDense` with LoRA compute `kernel + scale *
matmul(lora_kernel_a, lora_kernel_b)`, with `lora_kernel_a` of shape
`kernel.shape[:-1] + (rank,)` and `lora_kernel_b` of shape
`(rank, kernel.shape[-1])`. So a kernel split on its last dim (column)
splits `lora_kernel_b` on dim 1 and keeps `lora_kernel_a` whole; split on
any other dim (row, heads, experts) it splits `lora_kernel_a` on that dim
and keeps `lora_kernel_b` whole. The product is then split like the
kernel, computed locally, with no collective.
"""

from __future__ import annotations

from keras_tensor_parallel.plan.plan import MODEL_AXIS, Role


def kernel_variable(layer):
    """The stored kernel: with LoRA on, `layer.kernel` is the merged
    array, `layer._kernel` the variable."""
    if getattr(layer, "lora_enabled", False):
        return layer._kernel
    return layer.kernel


def decide(planner) -> None:
    """Add the LoRA matrices of every planned projection to
    `planner.decided` (id(var) -> (axes, role, reason[, padded, copies]))."""
    for layer in planner.model._flatten_layers(include_self=True):
        if not getattr(layer, "lora_enabled", False):
            continue
        decided = planner.decided.get(id(kernel_variable(layer)))
        if decided is not None:
            for var, value in _adapters(layer, decided):
                planner.decided[id(var)] = value


def _adapters(layer, decided):
    axes, role, reason, *rest = decided
    a, b = layer.lora_kernel_a, layer.lora_kernel_b
    if MODEL_AXIS not in axes:
        why = "LoRA adapter of a replicated kernel: replicated"
        return [(a, _whole(a, why)), (b, _whole(b, why))]
    if rest and rest[0] is not None:
        raise ValueError(
            "LoRA on a projection whose split dim is padded (its size does "
            "not divide by the world size) is not supported: LoRA adapters "
            "are not stored padded. Use a world size that divides the "
            "layer's split dim, or merge the adapters before "
            f"wrapping. Received: {layer.path!r} kernel padded to {rest[0]}"
        )
    copies = rest[1] if len(rest) > 1 else 1
    dim = list(axes).index(MODEL_AXIS)
    why = f"LoRA adapter, split with its kernel ({reason})"
    keep = "LoRA adapter over the kernel's unsplit dims: replicated"
    if dim == len(axes) - 1:
        split = (None, MODEL_AXIS)
        return [(a, _whole(a, keep)), (b, (split, role, why, None, copies))]
    split = tuple(axes[:-1]) + (None,)
    return [(a, (split, role, why, None, copies)), (b, _whole(b, keep))]


def _whole(var, reason):
    return ((None,) * len(var.shape), Role.REPLICATED, reason)


def refuse_split(model, entries, engine: str) -> None:
    """A ValueError where a LoRA-enabled layer has a split weight, for the
    engines that run each rank's own code on its shards (torch, TensorFlow):
    there the layer ran 0.33 off one process (torch, measured), a
    replicated adapter's gradient is each rank's part, and Keras would save
    each rank's part of the merged kernel."""
    split = {e.path for e in entries if e.is_split}
    lora = [
        layer.name
        for layer in model._flatten_layers(include_self=False)
        if getattr(layer, "lora_enabled", False)
        and any(v.path in split for v in layer.weights)
    ]
    if lora:
        raise ValueError(
            f"The {engine} engine does not split LoRA-enabled layers. "
            "Replicate them with overrides (for example "
            f"{{'.*{lora[0]}/.*': 'replicated'}}), merge the adapters into "
            "the kernel first, or use the JAX backend. "
            f"Received: LoRA layers with split weights {lora}"
        )
