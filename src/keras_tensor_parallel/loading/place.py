"""Give unallocated variables their values, already sharded (JAX).

Each device receives only the slice its layout assigns it: a saved value is
read slice by slice (`jax.make_array_from_callback` asks for one index per
device), a fresh value is computed by the initializer under `jax.jit` with
the layout as its output sharding, for every size (Keras 3.15 does this
only above 250 MB and otherwise builds the whole value on one device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from keras_tensor_parallel.loading import abstract
from keras_tensor_parallel.loading.observers import OBSERVERS


def sharding_of(variable, distribution):
    """The variable's `TensorLayout` under `distribution` (by path)."""
    return distribution.get_variable_layout(variable)


def read_sharded(shape, dtype, sharding, read) -> jax.Array:
    """An array laid out as `sharding` whose shards come from `read(index)`.

    Replicated dims ask for the same index on several devices: each distinct
    index is read once.
    """
    cache: dict = {}

    def shard(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in cache:
            cache[key] = np.asarray(read(index), dtype=dtype)
        return cache[key]

    return jax.make_array_from_callback(tuple(shape), sharding, shard)


def initialize_sharded(initializer, shape, dtype, sharding) -> jax.Array:
    """`initializer(shape, dtype)` computed directly into `sharding`."""

    def make():
        return initializer(tuple(shape), dtype=dtype)

    return jax.jit(make, out_shardings=sharding)()


def place(variables, distribution, *, weights=None, names=None) -> None:
    """Set each unallocated variable's value, sharded by its layout.

    Args:
        variables: Variables created under `abstract.unallocated()`.
        distribution: An `AutoTPDistribution` (layouts by variable path).
        weights: An `H5Weights`-like reader (`read(name, index)`), or None.
        names: `{id(variable): dataset name}` for variables read from
            `weights`; the others are initialized.
    """
    names = names or {}
    for v in variables:
        layout = sharding_of(v, distribution)
        sharding = layout.backend_layout
        dtype = jnp.dtype(v.dtype)
        name = names.get(id(v))
        if weights is not None and name is not None:
            value = read_sharded(
                v.shape,
                dtype,
                sharding,
                lambda index, _n=name: weights.read(_n, index),
            )
        else:
            value = initialize_sharded(
                v._initializer, v.shape, v.dtype, sharding
            )
        v._layout = layout
        v._value = value
        v._initializer = None
        if hasattr(weights, "done"):
            weights.done()  # frees the host copy of this variable
        for observe in OBSERVERS:
            observe()


unplace = abstract.unplace  # jax-free, beside `unallocated`
