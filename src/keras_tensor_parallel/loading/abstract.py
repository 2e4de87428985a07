"""Build a model without allocating its weights.

Keras creates a variable that has an initializer but no value when it is
created inside a `StatelessScope`: the variable knows its path, shape and
dtype, which is all the planner reads (it traces the model on symbolic
tensors). Such a model can be planned, then each variable given a sharded
value directly (`loading.place`), so no device ever holds a whole split
variable.
"""

from __future__ import annotations

import contextlib

from keras.src.backend.common import global_state
from keras.src.backend.common.stateless_scope import StatelessScope

_KEY = "uninitialized_variables"


@contextlib.contextmanager
def unallocated():
    """Variables created inside hold no value until `place` gives them one.

    Yields:
        A list, filled on exit with the variables created inside.

    Example:

    ```python
    with unallocated() as created:
        model = make_model()
    plan = plan_model(model, world_size=4)  # no weight was allocated
    ```
    """
    before = list(global_state.get_global_attribute(_KEY) or [])
    known = {id(v) for v in before}
    created: list = []
    try:
        # initialize_variables=False: leaving the scope must not allocate.
        with StatelessScope(initialize_variables=False):
            yield created
    finally:
        now = global_state.get_global_attribute(_KEY) or []
        created.extend(v for v in now if id(v) not in known)
        # Keras initializes every registered variable when the next
        # top-level stateless scope exits (symbolic calls open one): ours
        # must not be in that list, `place` gives them their values.
        global_state.set_global_attribute(_KEY, before)


def is_unallocated(variable) -> bool:
    """Whether `variable` was created unallocated and has no value yet."""
    return getattr(variable, "_value", None) is None and (
        getattr(variable, "_initializer", None) is not None
    )


def build_unallocated(make_model):
    """`make_model()` with every variable unallocated.

    Args:
        make_model: A function returning a built Keras model.

    Returns:
        `(model, created)`: the model, whose variables have shapes, paths
        and dtypes but no values, and the variables created unallocated.

    Raises:
        ValueError: when `make_model` is not callable, does not return a
            Keras model, or the model has no variables (it was not built).
    """
    import keras

    if not callable(make_model):
        raise ValueError(
            "make_model must be a function that returns a built Keras model. "
            f"Received: make_model={make_model!r}"
        )
    with unallocated() as created:
        model = make_model()
    if not isinstance(model, keras.Model):
        raise ValueError(
            "make_model must return a keras.Model. Received: "
            f"{type(model).__name__}"
        )
    return model, created


def unplace(variables) -> None:
    """Drop the values `place` gave (a failed load leaves nothing behind)."""
    for v in variables:
        v._value = None
