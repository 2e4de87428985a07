"""Generation on a tensor-parallel KerasHub `CausalLM`.

KerasHub's `CausalLM.generate` preprocesses, runs a generate function on
dense token ids and postprocesses. The generate function is where the
weights and the key/value cache live, so that is the one part replaced:

- JAX: one `jax.jit` of the model's own `generate_step` (prefill, then the
  sampler's `while_loop` of decode steps), called with the variables'
  sharded values as state, exactly as KerasHub jits it, inside the plan's
  distribution. Nothing is gathered: XLA runs every projection on its
  shard. The cache is pinned to the attention's head split at every
  `call_with_cache` (in and out), so the loop carries 1/N of it per
  device whatever the partitioner would have picked.
- torch (one process per rank): the model's own eager `generate_step` runs
  on every rank with the local shards; the key/value projections give
  local heads, so the cache keeps this rank's heads only. Every rank
  samples from the same full logits with the same seed and returns the
  same tokens.

`generation.jax` and `generation.torch` hold the two engines' parts.

The cache split follows the key projection: KerasHub caches are
`[batch, layers, 2, length, kv_heads, head_dim]`, and the kv-heads dim is
split when the plan splits a heads kernel of that many heads (kv heads
that do not divide by the world size stay replicated, like their
projection).
"""

from __future__ import annotations

import contextlib

from keras_tensor_parallel.plan import Role, ShardingPlan

# KerasHub caches put the (kv) heads second to last:
# [batch, layers, 2, length, heads, head_dim].
HEADS_DIM = -2
ENGINES = ("jax", "torch")


def is_causal_lm(model) -> bool:
    """Whether `model` generates as a KerasHub `CausalLM` does."""
    return all(
        callable(getattr(model, name, None))
        for name in ("generate", "generate_step", "call_with_cache")
    )


def check_causal_lm(model) -> None:
    """Raise when `model` cannot generate (names the rule and the model)."""
    if not is_causal_lm(model):
        raise ValueError(
            "generate() needs a wrapped KerasHub CausalLM (a model with "
            "generate, generate_step and call_with_cache). Received: "
            f"model={type(model).__name__} {getattr(model, 'name', '')!r}"
        )


def as_causal_lm(model):
    """`model` if it generates, else its KerasHub `CausalLM` task (no
    preprocessor) around it when `model` is a backbone that has one.

    Example:

    ```python
    lm = as_causal_lm(keras_hub.models.OPTBackbone(**config))
    ```
    """
    if is_causal_lm(model):
        return model
    import keras_hub

    for name in sorted(dir(keras_hub.models)):
        task = getattr(keras_hub.models, name)
        if (
            name.endswith("CausalLM")
            and isinstance(task, type)
            and getattr(task, "backbone_cls", None) is type(model)
        ):
            return task(backbone=model, preprocessor=None)
    raise ValueError(
        "Generation needs a KerasHub CausalLM or a backbone that has one. "
        f"Received: model={type(model).__name__}"
    )


def splits_heads(plan: ShardingPlan, num_heads: int) -> bool:
    """Whether the plan splits some heads kernel with `num_heads` heads
    (so a cache of that many heads is split like its projection)."""
    if num_heads % plan.world_size:
        return False
    # The heads dim is wherever the model puts it: (hidden, heads, dim) in
    # GPT-2/Llama, (heads, hidden, dim) in Gemma.
    return any(
        e.role == Role.HEADS
        and e.is_split
        and e.storage_shape[e.split_dim] == num_heads
        for e in plan
    )


@contextlib.contextmanager
def generating(model):
    """Mark `model` as generating on its shards: the cache hooks act
    only then (a model unwrapped later runs its own code untouched)."""
    model._tp_generating = True
    try:
        yield
    finally:
        model._tp_generating = False


def sampler_variables(model) -> list:
    """The seed state of `model`'s sampler (empty without one)."""
    sampler = getattr(model, "sampler", None)
    return list(sampler.variables) if sampler is not None else []


def generate(tp, inputs, **kwargs):
    """`tp.wrapped_model.generate(inputs, **kwargs)` on the shards.

    Args:
        tp: A `TensorParallelKeras` wrapping a KerasHub `CausalLM`.
        inputs: Token ids (`{"token_ids", "padding_mask"}`) or, with a
            preprocessor, strings.
        **kwargs: `max_length`, `stop_token_ids`, `strip_prompt`, as for
            `CausalLM.generate`.

    Returns:
        What `CausalLM.generate` returns (every torch rank returns it).

    Example:

    ```python
    tp = TensorParallelKeras(causal_lm, world_size=2)
    tp.compile(sampler="greedy")
    out = tp.generate(
        {"token_ids": ids, "padding_mask": mask}, stop_token_ids=None
    )
    ```
    """
    model = tp.wrapped_model
    check_causal_lm(model)
    if tp.engine.name not in ENGINES:
        raise ValueError(
            f"generate() runs on the {' and '.join(ENGINES)} engines. "
            f"Received: engine={tp.engine.name!r}"
        )
    if getattr(model, "sampler", None) is None:
        set_sampler(tp, "top_k")  # KerasHub's default
    if tp.engine.name == "jax":
        from keras_tensor_parallel.generation.jax import jax_generator

        model.generate_function = jax_generator(tp)
    else:
        from keras_tensor_parallel.generation.torch import generate_function

        model.generate_function = generate_function(tp)
    with tp.engine.scope():
        return model.generate(inputs, **kwargs)


def set_sampler(tp, sampler) -> None:
    """Use `sampler` (a name or a `keras_hub.samplers.Sampler`) in
    `tp.generate`, as `CausalLM.compile(sampler=...)` does."""
    from keras_hub.samplers import get as get_sampler

    model = tp.wrapped_model
    check_causal_lm(model)
    model.sampler = get_sampler(sampler)
    model.generate_function = None
