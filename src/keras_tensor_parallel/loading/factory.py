"""`TensorParallelKeras.from_preset` / `.build`: the class-level entry
points, kept here so the wrapper's module only delegates."""

from __future__ import annotations

import types


def from_preset(cls, preset, *, model_class=None, **kwargs):
    """A preset built straight into shards, wrapped in `cls`.

    Args:
        cls: `TensorParallelKeras` (or a subclass).
        preset: A KerasHub preset directory (`save_to_preset`) or a
            Hugging Face checkpoint directory KerasHub converts.
        model_class: The KerasHub class to build; default: the task saved
            in the preset, else its backbone.
        **kwargs: As for `TensorParallelKeras(...)` (`world_size`,
            `device_ids`, `distributed_backend`, `overrides`, `plan`).

    Returns:
        The wrapped model; no device ever held a whole split variable.

    Example:

    ```python
    tp = TensorParallelKeras.from_preset("opt_preset/", world_size=4)
    ```
    """
    from keras_tensor_parallel.loading.api import load

    return load(preset, wrapper=cls, model_class=model_class, **kwargs)


def build(cls, make_model, *, weights=None, **kwargs):
    """`make_model()` built straight into shards, wrapped in `cls`.

    Args:
        cls: `TensorParallelKeras` (or a subclass).
        make_model: A function returning a built Keras model; it runs with
            variables unallocated, so it must not read weight values.
        weights: Optional `.keras` or `.weights.h5` file with the values;
            without it the initializers run directly into the shards.
        **kwargs: As for `TensorParallelKeras(...)`.

    Returns:
        The wrapped model.

    Example:

    ```python
    tp = TensorParallelKeras.build(make_model, weights="m.weights.h5",
                                   world_size=4)
    ```
    """
    from keras_tensor_parallel.loading.api import load

    return load(make_model, wrapper=cls, weights=weights, **kwargs)


class ClassBuild:
    """`build` that is `build(make_model, ...)` on the class and Keras's
    own `Layer.build(input_shape)` on an instance (Keras wraps and calls
    the instance's `build`, so that one must stay Keras's)."""

    def __get__(self, obj, objtype=None):
        if obj is None:  # a bound method keeps `build`'s docstring
            return types.MethodType(build, objtype)
        import keras

        return keras.Model.build.__get__(obj, objtype)
