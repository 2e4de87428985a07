"""Local head counts in attention layers that shape tensors with their own
attributes (issue 12: Gemma and Gemma 3 on torch).

KerasHub's Gemma attention reshapes its queries with its own full counts,
`ops.reshape(q, (..., self.num_key_value_heads, self.num_query_heads //
self.num_key_value_heads, h))`, and its output with `self.num_query_heads`.
JAX runs the global program, so global counts are right there; a torch
rank runs the model's code on its local heads, so while the engine holds
the model these attributes hold the rank's LOCAL counts, read from the
local shapes of the layer's split query / key kernels (so uneven real
heads and shared kv blocks come out right on every rank):

- `num_query_heads`: the query heads this rank holds;
- `num_key_value_heads`: the kv heads it holds (a kv block shared by
  `copies` ranks counts once; replicated kv heads, as multi-query
  attention keeps them, stay the full count);
- `num_key_value_groups`: `num_query_heads // num_key_value_heads`, local;
- `hidden_dim`, only where the query scale reads `hidden_dim //
  num_query_heads` (`query_head_dim_normalize=False`): set so that the
  quotient stays the GLOBAL one.

Which classes: a documented list (`KNOWN`), not every layer with such
attribute names, because other classes use the same names differently
(Llama widens kv heads with `ops.repeat(key, self.num_key_value_groups)`,
which `torch_heads.py` already cuts). Every change goes through the
engine's undo journal: `unapply` or a failed wrap restores the values.
"""

from __future__ import annotations

from keras_tensor_parallel.backends import roles, torch_heads

# class name -> (query sub-layer, key sub-layer) attribute names.
KNOWN = {
    "CachedGemmaAttention": ("query_dense", "key_dense"),
    "CachedGemma3Attention": ("query_dense", "key_dense"),
}


def _heads(dense, entries) -> int | None:
    """This rank's count along the split dim of `dense`'s kernel, or
    None when the plan does not split it."""
    kernel = getattr(dense, "kernel", None)
    if kernel is None:
        return None
    entry = entries.get(kernel.path)
    if entry is None or not entry.is_split:
        return None
    if entry.split_dim != 0:  # "ndh" / "kdh": heads first
        raise ValueError(
            f"{kernel.path}: the torch engine sets local head counts only "
            "for a split of the heads dim (0). Received: a split on dim "
            f"{entry.split_dim} ({entry.role.value}); replicate the layer "
            "with overrides={'<path regex>': 'replicated'} or use JAX"
        )
    return int(kernel.value.shape[0])


def _check_value(layer, entries) -> None:
    """Gemma's output reshape takes the head dim from the queries, so a
    value split on its head dim (the plan's choice when the query heads
    cannot split, say 6 heads at N=4) cannot run on a rank."""
    kernel = getattr(getattr(layer, "value_dense", None), "kernel", None)
    entry = entries.get(getattr(kernel, "path", None))
    if entry is None or not entry.is_split or entry.split_dim == 0:
        return
    raise ValueError(
        f"The torch engine cannot split {layer.path} ({type(layer).__name__}"
        f"): the plan splits its value kernel on dim {entry.split_dim} "
        "(the head dim; its query heads do not divide by the world size "
        "and cannot be padded on torch), and the layer's reshapes read the "
        "head dim from the queries. Replicate the attention with "
        "overrides={'.*attention/(query|key|value|attention_output)/"
        "kernel': 'replicated'}, pick a world size that divides the query "
        f"heads, or use JAX. Received: value kernel {kernel.path} of shape "
        f"{tuple(entry.shape)} split on dim {entry.split_dim}"
    )


def local_counts(layer, entries) -> dict | None:
    """`{attribute: local value}` for a known attention `layer` whose
    query heads the plan splits (None: nothing to change)."""
    names = KNOWN.get(type(layer).__name__)
    if names is None:
        return None
    _check_value(layer, entries)
    query = _heads(getattr(layer, names[0], None), entries)
    if query is None:
        return None
    kv = _heads(getattr(layer, names[1], None), entries)
    kv = layer.num_key_value_heads if kv is None else kv
    if query % kv:
        raise ValueError(
            f"{layer.path}: this rank holds {query} query heads for {kv} "
            "kv heads, which the layer's reshape into (kv, group) cannot "
            "take. Received: a plan whose query and kv splits do not line "
            "up; replicate the attention with overrides or use JAX"
        )
    out = {
        "num_query_heads": query,
        "num_key_value_heads": kv,
        "num_key_value_groups": query // kv,
    }
    if not getattr(layer, "query_head_dim_normalize", True):
        out["hidden_dim"] = layer.hidden_dim // layer.num_query_heads * query
    return out


def install(engine, model, journal) -> list[str]:
    """Set the local counts on every known attention layer of `model`
    whose query heads the engine's plan splits, and play its replicated
    kv heads beside them; returns the layers' paths."""
    entries = {e.path: e for e in engine.plan}
    done = []
    for layer in model._flatten_layers(include_self=False):
        counts = local_counts(layer, entries)
        if not counts:
            continue
        for name, value in counts.items():
            journal.setattr(layer, name, value)
        if not engine.sequence_parallel:  # SP gathers and sums them itself
            _replicated_kv(engine, layer, entries, journal)
        done.append(layer.path)
    return done


def _replicated_kv(engine, layer, entries, journal) -> None:
    """Multi-query kv heads held whole beside split query heads (plain
    tensor parallelism): the key/value projections join the query's
    region (one f on their shared input: its gradient is summed over the
    model axis), and every replicated weight of the layer (kv kernels,
    a key norm) gets its rank's partial gradient, from its query heads
    only, summed over the model axis."""
    styles = engine._styles
    heads = styles[roles.Role.HEADS]
    shard = engine._shard
    for sub in ("key_dense", "value_dense"):
        dense = getattr(layer, sub, None)
        kernel = getattr(dense, "kernel", None)
        if kernel is None or entries[kernel.path].is_split:
            continue
        column = roles.ColumnParallel(heads.comm)
        journal.setattr(dense, "call", column.forward(dense, shard))
    partial = [
        v
        for v in layer.trainable_variables
        if not roles.is_split(v)
        and not getattr(entries.get(v.path), "sum_grad", False)
    ]
    torch_heads.sum_grads(partial, heads.comm.group, journal)
