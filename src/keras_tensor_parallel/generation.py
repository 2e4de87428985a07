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

The cache split follows the key projection: KerasHub caches are
`[batch, layers, 2, length, kv_heads, head_dim]`, and the kv-heads dim is
split when the plan splits a heads kernel of that many heads (kv heads
that do not divide by the world size stay replicated, like their
projection).
"""

from __future__ import annotations

import contextlib
import itertools

import keras
from keras import ops

from keras_tensor_parallel.plan import MODEL_AXIS, Role, ShardingPlan

# KerasHub caches put the (kv) heads second to last:
# [batch, layers, 2, length, heads, head_dim].
HEADS_DIM = -2


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
def _generating(model):
    """Mark `model` as generating on its shards: the cache hooks below act
    only then (a model unwrapped later runs its own code untouched)."""
    model._tp_generating = True
    try:
        yield
    finally:
        model._tp_generating = False


# JAX --------------------------------------------------------------------


class JaxGenerator:
    """The jitted generate function of one wrapped `CausalLM`.

    Args:
        model: The wrapped (sharded) `CausalLM`.
        engine: The `JaxEngine` that sharded it.

    Attributes:
        cache_shape: Global `(shape, dtype)` of the cache, recorded when the
            generate function is traced (`None` before).
    """

    def __init__(self, model, engine):
        import jax

        self.model = model
        self.engine = engine
        self.sampler = model.sampler
        self.cache_shape = None
        self._jitted = jax.jit(
            self._generate, static_argnames=("stop_token_ids",)
        )
        _constrain_cache(model, self)

    def cache_sharding(self, shape):
        """`NamedSharding` of a cache of `shape`: kv heads split when the
        plan splits their projection, else `None` (left to XLA)."""
        from jax.sharding import NamedSharding, PartitionSpec

        if not splits_heads(self.engine.plan, int(shape[HEADS_DIM])):
            return None
        spec = [None] * len(shape)
        spec[HEADS_DIM] = MODEL_AXIS
        mesh = self.engine.mesh.backend_mesh
        return NamedSharding(mesh, PartitionSpec(*spec))

    def _generate(self, inputs, state, stop_token_ids=None):
        model = self.model
        sampler_values, trainable, non_trainable = state
        mapping = itertools.chain(
            zip(model.sampler.variables, sampler_values),
            zip(model.trainable_variables, trainable),
            zip(model.non_trainable_variables, non_trainable),
        )
        with (
            keras.StatelessScope(state_mapping=mapping) as scope,
            _split_top_k(model.sampler, self.engine),
        ):
            outputs = model.generate_step(inputs, stop_token_ids)
        sampler_values = [_current(scope, v) for v in model.sampler.variables]
        return outputs, sampler_values

    def state(self):
        """(sampler, trainable, non-trainable) values, as they are sharded.

        The sampler's seed state may have been created outside the plan's
        scope (on one device): it is replicated onto the mesh.
        """
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        mesh = self.engine.mesh.backend_mesh
        replicated = NamedSharding(mesh, PartitionSpec())
        model = self.model
        return (
            [jax.device_put(v.value, replicated) for v in _sampler_vars(model)],
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        )

    def __call__(self, inputs, stop_token_ids=None):
        if isinstance(stop_token_ids, list):
            stop_token_ids = tuple(stop_token_ids)
        inputs = keras.tree.map_structure(ops.convert_to_tensor, inputs)
        with self.engine.scope(), _generating(self.model):
            outputs, sampler_values = self._jitted(
                inputs, self.state(), stop_token_ids=stop_token_ids
            )
        for variable, value in zip(_sampler_vars(self.model), sampler_values):
            variable.assign(value)
        return outputs

    def compile(self, inputs, stop_token_ids=None):
        """The compiled generate function for `inputs` (nothing runs).

        `inputs` may be arrays or `jax.ShapeDtypeStruct`s.
        """
        if isinstance(stop_token_ids, list):
            stop_token_ids = tuple(stop_token_ids)
        with self.engine.scope(), _generating(self.model):
            lowered = self._jitted.lower(
                inputs, self.state(), stop_token_ids=stop_token_ids
            )
            return lowered.compile()


def _vocab_split(plan: ShardingPlan) -> bool:
    return any(e.role == Role.VOCAB and e.is_split for e in plan)


def top_k_over_shards(probabilities, k: int, mesh):
    """`jax.lax.top_k` of `[batch, vocab]` split on the model axis,
    exchanging only each device's `k` best (values and indices).

    Same values, indices and order as on one device: candidates are
    gathered in device order, so ties still go to the lower index.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    n = mesh.shape[MODEL_AXIS]
    vocab = probabilities.shape[-1]
    # An odd vocab was padded to split; probabilities are >= 0, so -1
    # rows are never picked.
    pad = (-vocab) % n
    probabilities = jnp.pad(
        probabilities, ((0, 0), (0, pad)), constant_values=-1.0
    )
    local = (vocab + pad) // n

    def best(shard):
        values, index = jax.lax.top_k(shard, k)
        index = index + jax.lax.axis_index(MODEL_AXIS) * local
        values = jax.lax.all_gather(values, MODEL_AXIS, axis=1, tiled=True)
        index = jax.lax.all_gather(index, MODEL_AXIS, axis=1, tiled=True)
        values, pick = jax.lax.top_k(values, k)
        return values, jnp.take_along_axis(index, pick, axis=1)

    return jax.shard_map(
        best,
        mesh=mesh,
        in_specs=PartitionSpec(None, MODEL_AXIS),
        out_specs=(PartitionSpec(), PartitionSpec()),
        check_vma=False,
    )(probabilities)


@contextlib.contextmanager
def _split_top_k(sampler, engine):
    """While tracing, a `TopKSampler` picks its `k` candidates per device.

    Left to XLA, `top_k` over the split vocab all-gathers the whole
    `[batch, vocab]` distribution every token (for OPT-125M at batch 8,
    1.6 MB, 3x the model's own all-reduces); Megatron's minimum is each
    device's `k` best. The rest of `TopKSampler.get_next_token` is
    unchanged (same seed use, same draw).
    """
    if type(sampler).__name__ != "TopKSampler" or not _vocab_split(engine.plan):
        yield
        return
    mesh = engine.mesh.backend_mesh

    def get_next_token(probabilities):
        values, index = top_k_over_shards(probabilities, sampler.k, mesh)
        sample = keras.random.categorical(
            ops.cast(ops.log(values), "float32"),
            1,
            seed=sampler.seed_generator,
            dtype="int32",
        )
        return ops.squeeze(ops.take_along_axis(index, sample, axis=-1), -1)

    sampler.get_next_token = get_next_token
    try:
        yield
    finally:
        del sampler.get_next_token


def _sampler_vars(model):
    sampler = getattr(model, "sampler", None)
    return list(sampler.variables) if sampler is not None else []


def _current(scope, variable):
    value = scope.get_current_value(variable)
    return value if value is not None else variable.value


def _constrain_cache(model, generator) -> None:
    """Pin the cache to its head split at every `call_with_cache`."""
    import jax

    original = getattr(model, "_tp_original_call_with_cache", None)
    if original is None:
        original = model.call_with_cache
        model._tp_original_call_with_cache = original

    def pin(cache):
        if not getattr(model, "_tp_generating", False):
            return cache
        generator.cache_shape = (tuple(cache.shape), str(cache.dtype))
        sharding = generator.cache_sharding(cache.shape)
        if sharding is None:
            return cache
        return jax.lax.with_sharding_constraint(cache, sharding)

    def call_with_cache(token_ids, cache, cache_update_index, *a, **kw):
        logits, hidden, cache = original(
            token_ids, pin(cache), cache_update_index, *a, **kw
        )
        return logits, hidden, pin(cache)

    model.call_with_cache = call_with_cache


def jax_generator(tp) -> JaxGenerator:
    """The `JaxGenerator` of a wrapped model (made once per sampler, then
    reused, so its jit cache survives between calls)."""
    model = tp.wrapped_model
    generator = getattr(model, "_tp_generator", None)
    # A new sampler (compile(sampler=...)) needs a new trace, as KerasHub
    # drops its generate function on compile.
    if (
        generator is None
        or generator.engine is not tp.engine
        or generator.sampler is not model.sampler
    ):
        generator = JaxGenerator(model, tp.engine)
        model._tp_generator = generator
    return generator


# torch --------------------------------------------------------------------


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
    plan, rank = engine.plan, engine.rank

    def call_with_cache(token_ids, cache, cache_update_index, *a, **kw):
        heads = int(cache.shape[HEADS_DIM])
        if getattr(model, "_tp_generating", False) and splits_heads(
            plan, heads
        ):
            local = heads // plan.world_size
            cache = cache.narrow(cache.ndim - 2, rank * local, local)
            cache = cache.contiguous()
        return original(token_ids, cache, cache_update_index, *a, **kw)

    model.call_with_cache = call_with_cache
    model._tp_cache_localized = True


def _same_seed_state(model) -> None:
    """Rank 0's sampler seed state on every rank: same samples, so the
    ranks feed the same tokens to their next step."""
    import torch.distributed as dist

    for variable in _sampler_vars(model):
        value = variable.value.detach().clone().contiguous()
        dist.broadcast(value, src=0)
        variable.assign(value)


def torch_generate_function(tp):
    """The model's own (eager, `no_grad`) generate function, with the cache
    kept local and the seed shared."""
    model = tp.wrapped_model
    _localize_cache(model, tp.engine)
    model.generate_function = None
    base = model.make_generate_function()

    def generate_function(inputs, stop_token_ids=None):
        _same_seed_state(model)
        with _generating(model):
            return base(inputs, stop_token_ids=stop_token_ids)

    return generate_function


# Entry point --------------------------------------------------------------


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
    if getattr(model, "sampler", None) is None:
        set_sampler(tp, "top_k")  # KerasHub's default
    if tp.engine.name == "jax":
        model.generate_function = jax_generator(tp)
    else:
        model.generate_function = torch_generate_function(tp)
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
