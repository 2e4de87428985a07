"""Checks on what a user hands the planner, with errors naming the rule
and the received value."""

from __future__ import annotations

import keras


def validate_world_size(world_size) -> None:
    """Raise ValueError unless `world_size` is a positive int.

    Example:

    ```python
    validate_world_size(4)  # passes
    ```
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise ValueError(
            f"world_size must be a positive integer. Received: "
            f"world_size={world_size!r}"
        )
    if world_size <= 0:
        raise ValueError(
            f"world_size must be >= 1. Received: world_size={world_size}"
        )


def check_built(model) -> None:
    """Raise ValueError unless `model` is a Keras layer with variables.

    Example:

    ```python
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    check_built(model)  # passes
    ```
    """
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            f"Expected a Keras model. Received: model of type {type(model)}"
        )
    if not model.built or not model.variables:
        raise ValueError(
            "The model must be built (with variables) before it is planned: "
            "call it on data, or `model.build(input_shape)`. Received: "
            f"model={model.name!r} (built={model.built}, "
            f"variables={len(model.variables)})"
        )
