"""`tp.generate` on the JAX engine: one jit of the model's own
`generate_step` on the sharded variables, the cache pinned to its head
split, top-k sampling over the split vocab (see `generation`)."""

from __future__ import annotations

import contextlib
import itertools

import keras
from keras import ops

from keras_tensor_parallel.generation import (
    HEADS_DIM,
    generating,
    sampler_variables,
    splits_heads,
)
from keras_tensor_parallel.plan import (
    DATA_AXIS,
    MODEL_AXIS,
    Role,
    ShardingPlan,
)


class JaxGenerator:
    """The jitted generate function of one wrapped `CausalLM`.

    Args:
        model: The wrapped (sharded) `CausalLM`.
        engine: The `JaxEngine` that sharded it.

    Attributes:
        cache_shape: Global `(shape, dtype)` of the cache as the model
            builds it, recorded when the generate function is last traced
            (`None` before).
    """

    def __init__(self, model, engine):
        import jax

        self.model = model
        self.engine = engine
        self.sampler = model.sampler
        self.cache_shape = None
        self.tracing = False
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
        mesh = self.engine.mesh.backend_mesh
        spec = [None] * len(shape)
        spec[0] = batch_axis(mesh, int(shape[0]))
        spec[HEADS_DIM] = MODEL_AXIS
        return NamedSharding(mesh, PartitionSpec(*spec))

    def _generate(self, inputs, state, stop_token_ids=None):
        self.tracing = True  # runs only while jax traces
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
            [
                jax.device_put(v.value, replicated)
                for v in sampler_variables(model)
            ],
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        )

    def __call__(self, inputs, stop_token_ids=None):
        if isinstance(stop_token_ids, list):
            stop_token_ids = tuple(stop_token_ids)
        inputs = keras.tree.map_structure(ops.convert_to_tensor, inputs)
        with self.engine.scope(), generating(self.model):
            outputs, sampler_values = self._jitted(
                inputs, self.state(), stop_token_ids=stop_token_ids
            )
        for variable, value in zip(
            sampler_variables(self.model), sampler_values
        ):
            variable.assign(value)
        return outputs

    def compile(self, inputs, stop_token_ids=None):
        """The compiled generate function for `inputs` (nothing runs).

        `inputs` may be arrays or `jax.ShapeDtypeStruct`s.
        """
        if isinstance(stop_token_ids, list):
            stop_token_ids = tuple(stop_token_ids)
        with self.engine.scope(), generating(self.model):
            lowered = self._jitted.lower(
                inputs, self.state(), stop_token_ids=stop_token_ids
            )
            return lowered.compile()


def batch_axis(mesh, batch: int):
    """`DATA_AXIS` where a `(data, model)` mesh splits the batch (as the
    distribution lays out generate's inputs), else `None`."""
    size = dict(mesh.shape).get(DATA_AXIS, 1)
    return DATA_AXIS if size > 1 and batch % size == 0 else None


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
    rows = batch_axis(mesh, int(probabilities.shape[0]))

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
        in_specs=PartitionSpec(rows, MODEL_AXIS),
        out_specs=(PartitionSpec(rows), PartitionSpec(rows)),
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
        shard_rows = -(-probabilities.shape[-1] // mesh.shape[MODEL_AXIS])
        if sampler.k > shard_rows:  # fewer than k candidates per device
            return type(sampler).get_next_token(sampler, probabilities)
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
        if generator.tracing:  # the first cache of a trace: as built
            generator.cache_shape = (tuple(cache.shape), str(cache.dtype))
            generator.tracing = False
        stored = stored_heads(generator.engine.plan, cache.shape[HEADS_DIM])
        if stored != cache.shape[HEADS_DIM]:
            # The model built its cache (zeros) with its own head count;
            # the plan pads those heads with zero heads to split them.
            widths = [(0, 0)] * cache.ndim
            widths[HEADS_DIM] = (0, stored - cache.shape[HEADS_DIM])
            cache = jax.numpy.pad(cache, widths)
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


def stored_heads(plan: ShardingPlan, num_heads: int) -> int:
    """How many heads the plan stores for a projection of `num_heads`
    heads (more where it pads them to split evenly)."""
    for e in plan:
        if e.role == Role.HEADS and e.is_split and e.padded_shape:
            if e.shape[e.split_dim] == num_heads:
                return e.padded_shape[e.split_dim]
    return int(num_heads)


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
