"""JAX variables re-sharded in place, with an undo for each.

A vocab table whose row count does not divide by the world size is stored
padded (zero rows, never looked up) while `shape`, `numpy()`, `assign()`
and saving see its logical shape. Inside `storage_shapes()` (the engine's
scope: fit, evaluate, predict, generate, checkpoints) `shape` is the
stored one, which Keras's stateless paths need: `StatelessScope` refuses
a value whose shape differs from `variable.shape`, and an optimizer slot
is created at its parameter's `shape` (it must match the gradient).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from keras_tensor_parallel.backends.jax_distribution import layout

# Padded variables ------------------------------------------------------------


_STORAGE_DEPTH = [0]  # open `storage_shapes()` contexts, all threads


@contextlib.contextmanager
def storage_shapes():
    """While open, padded variables report their stored (padded) `shape`.

    Example:

    ```python
    with storage_shapes():
        assert table.shape == table.value.shape  # (1002, 64), not 1001
    ```
    """
    _STORAGE_DEPTH[0] += 1
    try:
        yield
    finally:
        _STORAGE_DEPTH[0] -= 1


class _PaddedMixin:
    """Variable stored padded on one dim; shape/numpy/assign are logical."""

    _tp_logical_shape: tuple

    @property
    def shape(self):
        if _STORAGE_DEPTH[0]:
            return self._shape
        return self._tp_logical_shape

    def _tp_slices(self):
        return tuple(slice(0, n) for n in self._tp_logical_shape)

    def numpy(self):
        return host_value(self.value)[self._tp_slices()]

    def __array__(self, dtype=None, copy=None):
        out = host_value(self.value)[self._tp_slices()]
        return out.astype(dtype) if dtype is not None else out

    def assign(self, value):
        shape = tuple(getattr(value, "shape", np.shape(value)))
        if shape == tuple(self._tp_logical_shape):
            value = pad_to(value, tuple(self._shape))
        with storage_shapes():  # Keras checks the value against `shape`
            return super().assign(value)


_PADDED_CLASSES: dict[type, type] = {}


def _padded_class(cls: type) -> type:
    if cls not in _PADDED_CLASSES:
        _PADDED_CLASSES[cls] = type(
            f"Padded{cls.__name__}", (_PaddedMixin, cls), {}
        )
    return _PADDED_CLASSES[cls]


def pad_to(value, shape):
    value = jnp.asarray(value)
    widths = [(0, t - s) for s, t in zip(value.shape, shape)]
    return jnp.pad(value, widths)


def host_value(array) -> np.ndarray:
    """The full value as numpy, gathered from every process when the
    array spans devices of other processes (a collective: call it on all
    processes)."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def logical_value(variable) -> np.ndarray:
    """The full, unsharded, unpadded value as numpy."""
    if isinstance(variable, _PaddedMixin):
        return variable.numpy()
    return host_value(variable.value)


# Re-sharding -----------------------------------------------------------------


def reshard(variable, axes, mesh, padded_shape=None) -> Callable[[], None]:
    """Give `variable` the layout `axes` on `mesh`, in place.

    Returns the undo. If resharding itself fails, the variable is restored
    exactly (JAX arrays are immutable: the old value is kept, not copied)
    and the error is raised.
    """
    old = (variable.__class__, variable._shape, variable._layout)
    old_value = variable.value

    def restore():
        variable.__class__, variable._shape, variable._layout = old
        variable.__dict__.pop("_tp_logical_shape", None)
        variable._value = old_value

    try:
        value = old_value
        if padded_shape is not None and tuple(padded_shape) != old[1]:
            variable._tp_logical_shape = tuple(old[1])
            value = pad_to(value, padded_shape)
            variable._shape = tuple(padded_shape)
            variable.__class__ = _padded_class(old[0])
        variable._layout = layout(axes, mesh)
        variable._direct_assign(value)
    except BaseException:
        restore()
        raise
    # From here on the undo gathers (the old full value is not kept alive).
    return lambda: unshard(variable, old)


def lay_out(variable, axes, mesh, padded_shape=None) -> Callable[[], None]:
    """`reshard` for a variable with no value yet (created unallocated,
    `loading.abstract`): only its layout and stored shape change, so the
    train step can be measured from shapes (`autosize`) before a shard
    exists. Returns the undo."""
    old = (variable.__class__, variable._shape, variable._layout)
    if padded_shape is not None and tuple(padded_shape) != old[1]:
        variable._tp_logical_shape = tuple(old[1])
        variable._shape = tuple(padded_shape)
        variable.__class__ = _padded_class(old[0])
    variable._layout = layout(axes, mesh)

    def restore():
        variable.__class__, variable._shape, variable._layout = old
        variable.__dict__.pop("_tp_logical_shape", None)

    return restore


def unshard(variable, old) -> None:
    """Undo `reshard`: the logical value on one device, the old layout."""
    value = logical_value(variable)
    variable.__class__, variable._shape, variable._layout = old
    variable.__dict__.pop("_tp_logical_shape", None)
    variable._value = jnp.asarray(value)
