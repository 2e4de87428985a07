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


def _padded(variable, entries: dict, distribution):
    """`(stored shape, layout)` of a variable its plan stores padded (a
    vocab table or heads that do not divide by the devices), else None."""
    entry = entries.get(variable.path)
    if entry is None or not entry.padded_shape:
        return None
    if tuple(entry.padded_shape) == tuple(entry.shape):
        return None
    from keras_tensor_parallel.backends.jax_distribution import (
        layout,
        mesh_axes,
    )

    mesh = distribution.device_mesh
    return tuple(entry.padded_shape), layout(mesh_axes(entry, mesh), mesh)


def padded_reader(read, logical, stored, dtype):
    """`read` over the `stored` (padded) shape: rows past the `logical`
    extent of each dim are zeros, the rest read from the file."""

    def read_padded(index):
        bounds = [s.indices(n) for s, n in zip(index, stored)]
        out = np.zeros([b - a for a, b, _ in bounds], dtype)
        inside = tuple(
            slice(min(a, n), min(b, n)) for (a, b, _), n in zip(bounds, logical)
        )
        if all(s.stop > s.start for s in inside):
            rows = tuple(slice(0, s.stop - s.start) for s in inside)
            out[rows] = read(inside)
        return out

    return read_padded


def _padded_initializer(initializer, logical, stored):
    def make(shape, dtype=None):
        widths = [(0, t - s) for s, t in zip(logical, stored)]
        return jnp.pad(initializer(tuple(logical), dtype=dtype), widths)

    return make


def place(variables, distribution, *, weights=None, names=None) -> None:
    """Set each unallocated variable's value, sharded by its layout.

    A variable its plan stores padded gets its padded value straight into
    its shards (zeros past its rows); wrapping then finds it padded
    already (`jax_variables.reshard` pads by nothing) and only marks it.

    Args:
        variables: Variables created under `abstract.unallocated()`.
        distribution: An `AutoTPDistribution` (layouts by variable path).
        weights: An `H5Weights`-like reader (`read(name, index)`), or None.
        names: `{id(variable): dataset name}` for variables read from
            `weights`; the others are initialized.
    """
    names = names or {}
    entries = {e.path: e for e in distribution.plan}
    for v in variables:
        layout, shape = sharding_of(v, distribution), tuple(v.shape)
        init = v._initializer
        padded = _padded(v, entries, distribution)
        if padded is not None:
            shape, layout = padded
            init = _padded_initializer(init, v.shape, shape)
        sharding = layout.backend_layout
        dtype = jnp.dtype(v.dtype)
        name = names.get(id(v))
        if weights is not None and name is not None:
            read = lambda index, _n=name: weights.read(_n, index)  # noqa: E731
            if padded is not None:
                read = padded_reader(read, v.shape, shape, dtype)
            value = read_sharded(shape, dtype, sharding, read)
        else:
            value = initialize_sharded(init, shape, v.dtype, sharding)
        v._layout = layout
        v._value = value
        v._initializer = None
        if hasattr(weights, "done"):
            weights.done()  # frees the host copy of this variable
        for observe in OBSERVERS:
            observe()


unplace = abstract.unplace  # jax-free, beside `unallocated`
