"""What a checkpoint holds, and how a model is checked against it.

The state of a `TensorParallelKeras` is four groups of variables, each
`{key: variable}` (keys are stable across model instances): `model`
(weights, and the seed generators that are the layers' RNG state),
`optimizer` (slots and the iteration counter), `metrics`, and `rng`
(Keras's global seed generator, when one exists). A checkpoint stores
each variable's logical shape and dtype beside the values, so one of
another model or optimizer is refused with the first difference named,
before any value is read.
"""

from __future__ import annotations

import keras
from keras.src.backend.common import global_state

GROUPS = ("model", "optimizer", "metrics", "rng")


def logical_shape(variable) -> tuple:
    """The variable's shape as the user sees it (vocab padding removed)."""
    return tuple(getattr(variable, "_tp_logical_shape", variable.shape))


def model_keys(model) -> dict:
    """`{key: variable}` keyed as `save_weights` names the values
    (`layers/dense/vars/0`): stable across instances, unlike variable
    paths, which carry auto-generated names (`dense_3`). Variables the
    weights file does not hold (seed generator states) are keyed by
    position."""
    from keras_tensor_parallel.loading.h5 import dataset_paths

    names = dataset_paths(model)
    out = {}
    for i, v in enumerate(model.variables):
        out[names.get(id(v), f"variables/{i:05d}")] = v
    return out


def _positional(variables) -> dict:
    # Optimizer and metric variables come in a fixed order for a given
    # model and optimizer; their paths carry auto-generated names.
    return {f"{i:05d}": v for i, v in enumerate(variables)}


def ensure_optimizer_built(tp, *, prepare: bool = True) -> None:
    """Build a compiled model's optimizer (and metrics) so its slots exist
    and follow the plan; a fresh model has none before its first step.
    `prepare=False` skips the engine's `prepare_state` (on torch it
    reseeds every rank, which a save must not do to the run it saves)."""
    optimizer = getattr(tp, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        with tp.engine.scope():
            optimizer.build(tp.wrapped_model.trainable_variables)
    if prepare:
        tp.engine.prepare_state(tp)


def state_variables(tp, *, prepare: bool = True) -> dict[str, dict]:
    """`{group: {key: variable}}` for a `TensorParallelKeras`
    (`prepare`: as for `ensure_optimizer_built`)."""
    ensure_optimizer_built(tp, prepare=prepare)
    optimizer = getattr(tp, "optimizer", None)
    groups = {
        "model": model_keys(tp.wrapped_model),
        "optimizer": _positional(optimizer.variables if optimizer else []),
        "metrics": _positional(getattr(tp, "metrics_variables", [])),
        "rng": {},
    }
    seed = global_state.get_global_attribute("global_seed_generator")
    if seed is not None:
        groups["rng"]["global_seed_generator"] = seed.state
    return groups


def fingerprint(tp, groups: dict) -> dict:
    """JSON-able description checked on load: shapes, dtypes, optimizer."""
    optimizer = getattr(tp, "optimizer", None)
    return {
        "model_class": type(tp.wrapped_model).__name__,
        "optimizer_class": type(optimizer).__name__ if optimizer else None,
        "world_size": tp.world_size,
        "variables": {
            group: {
                key: [list(logical_shape(v)), str(v.dtype), v.path]
                for key, v in variables.items()
            }
            for group, variables in groups.items()
        },
    }


def compare(saved: dict, current: dict, where: str) -> None:
    """Raise a ValueError naming the first way `current` differs from the
    fingerprint `saved` in checkpoint `where`."""
    for key in ("model_class", "optimizer_class"):
        if saved.get(key) != current.get(key):
            raise ValueError(
                f"Checkpoint {where!r} was saved with {key} "
                f"{saved.get(key)!r}; this model has {current.get(key)!r} "
                "(compile with the same optimizer before loading). "
                f"Received: {key}={current.get(key)!r}"
            )
    for group in ("model", "optimizer"):
        try:
            _compare_group(saved["variables"][group], current, group, where)
        except ValueError as e:
            if saved.get("world_size") == current.get("world_size"):
                raise
            # Slots of a vocab table padded for another world size differ
            # in shape by the padding rows only.
            raise ValueError(
                f"{e} (saved at world size {saved.get('world_size')}, "
                f"loading at {current.get('world_size')}: vocab tables "
                "padded for another world size cannot be restored yet)"
            ) from None


def _compare_group(saved: dict, current_fp: dict, group: str, where: str):
    current = current_fp["variables"][group]
    missing = [saved[k][2] for k in sorted(set(saved) - set(current))]
    extra = [current[k][2] for k in sorted(set(current) - set(saved))]
    if missing or extra:
        raise ValueError(
            f"Checkpoint {where!r} does not match the {group} variables: "
            f"saved but not in the model {missing[:5]}, in the model but "
            f"not saved {extra[:5]}. Received: {len(current)} {group} "
            f"variables, checkpoint has {len(saved)}"
        )
    for key, (shape, dtype, name) in saved.items():
        here = current[key]
        if [list(here[0]), here[1]] != [list(shape), dtype]:
            raise ValueError(
                f"Checkpoint {where!r}: {group} variable {here[2]!r} ({key}) "
                f"was saved as {tuple(shape)} {dtype} ({name!r}); the model "
                f"has {tuple(here[0])} {here[1]}. Received: a checkpoint of "
                "another model or optimizer"
            )


def model_config_json(model) -> str | None:
    """The model's Keras config as JSON (for export), if serializable."""
    try:
        return keras.src.saving.saving_lib._serialize_model_as_json(model)[0]
    except Exception:  # noqa: BLE001 - a subclassed model without config
        return None
