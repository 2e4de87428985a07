"""`tp.generate` on the torch engine: the model's own eager generate on
every rank, the cache cut to this rank's kv heads, one seed for all ranks
(see `generation`)."""

from __future__ import annotations

from keras_tensor_parallel.backends.torch_heads import local_heads
from keras_tensor_parallel.generation import (
    HEADS_DIM,
    generating,
    sampler_variables,
)


def _localize_cache(model, engine) -> None:
    """Keep only this rank's kv heads of a cache the model built full.

    KerasHub's `_build_cache` shapes the cache with the model's full
    kv-head count; the split key/value projections write local heads.
    The full cache only exists as the zeros of the prefill: it is cut to
    this rank's heads before anything is written into it.
    """
    if getattr(model, "_tp_cache_localized", False):
        return
    original = model.call_with_cache
    # The model-axis rank: with a data axis, replicas cache the same heads.
    plan, rank = engine.plan, engine.model_rank

    def call_with_cache(token_ids, cache, cache_update_index, *a, **kw):
        heads = int(cache.shape[HEADS_DIM])
        # Shared kv heads and uneven (padded) heads too (torch_heads).
        span = local_heads(plan, rank, heads)
        if getattr(model, "_tp_generating", False) and span is not None:
            start, stop = span
            cache = cache.narrow(cache.ndim - 2, start, stop - start)
            cache = cache.contiguous()
        return original(token_ids, cache, cache_update_index, *a, **kw)

    model.call_with_cache = call_with_cache
    model._tp_cache_localized = True


def _same_seed_state(model) -> None:
    """Rank 0's sampler seed state on every rank: same samples, so the
    ranks feed the same tokens to their next step."""
    import torch.distributed as dist

    for variable in sampler_variables(model):
        value = variable.value.detach().clone().contiguous()
        dist.broadcast(value, src=0)
        variable.assign(value)


def generate_function(tp):
    """The model's own (eager, `no_grad`) generate function, with the cache
    kept local and the seed shared."""
    model = tp.wrapped_model
    _localize_cache(model, tp.engine)
    model.generate_function = None
    base = model.make_generate_function()

    def generate_function(inputs, stop_token_ids=None):
        _same_seed_state(model)
        with generating(model):
            return base(inputs, stop_token_ids=stop_token_ids)

    return generate_function
