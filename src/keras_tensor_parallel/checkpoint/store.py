"""Sharded checkpoints on disk (JAX engine, Orbax).

    directory/
      step_00000012/   one complete checkpoint (Orbax: each shard written
      step_00000024/   by the process that holds it, replicated arrays once)
      step_00000036.orbax-checkpoint-tmp-...   a save in progress

Orbax writes a checkpoint into a temporary directory and renames it when
every shard is on disk, so a save killed midway leaves only a `-tmp-`
directory, which is never taken for a checkpoint; the previous step stays
loadable. Loading reads, for each variable, only the slices its current
layout puts on each device, so a checkpoint saved at one world size loads
at another.
"""

from __future__ import annotations

import os
import re
import shutil

import jax
from orbax.checkpoint import v1 as ocp

from keras_tensor_parallel.checkpoint import state as state_lib

_STEP = re.compile(r"^step_(\d{8})$")


def _check_engine(tp) -> None:
    if tp.engine.name != "jax":
        raise ValueError(
            "Sharded checkpoints are implemented for the JAX engine (Orbax) "
            "and the torch engine (torch.distributed.checkpoint). Received: "
            f"engine {tp.engine.name!r}"
        )


def _torch_store(tp):
    """`store_torch` when `tp` runs on the torch engine, else None."""
    if tp.engine.name != "torch":
        return None
    from keras_tensor_parallel.checkpoint import store_torch

    return store_torch


def complete_steps(directory) -> list[int]:
    """Steps with a complete checkpoint in `directory`, oldest first.

    Example:

    ```python
    complete_steps("ckpt")  # [12, 24]; a killed save's -tmp- dir is not one
    ```
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        match = _STEP.match(name)
        path = os.path.join(directory, name)
        if match and ocp.is_orbax_checkpoint(path):
            steps.append(int(match.group(1)))
    return sorted(steps)


def step_path(directory, step: int) -> str:
    # Absolute: Orbax refuses a relative path ("ckpt" as a user writes it).
    return os.path.join(os.path.abspath(directory), f"step_{step:08d}")


def _tree(groups: dict) -> dict:
    # The stored value of a padded (vocab) variable is its padded storage;
    # the fingerprint keeps the logical shape.
    return {
        group: {path: v.value for path, v in variables.items()}
        for group, variables in groups.items()
        if variables
    }


def save(tp, directory, *, keep: int | None = 2) -> str:
    """Write `tp`'s state as a new step of `directory`; keep the last `keep`.

    Args:
        tp: A `TensorParallelKeras` (JAX engine).
        directory: Where the `step_XXXXXXXX` checkpoints go.
        keep: How many complete checkpoints to keep (`None`: all).

    Returns:
        The path of the checkpoint written.

    Example:

    ```python
    save(tp, "ckpt")   # ckpt/step_00000012 after 12 optimizer steps
    ```
    """
    if _torch_store(tp) is not None:  # torch.distributed.checkpoint
        return _torch_store(tp).save(tp, directory, keep=keep)
    _check_engine(tp)
    groups = state_lib.state_variables(tp)
    step = int(tp.optimizer.iterations.numpy()) if tp.optimizer else 0
    path = step_path(directory, step)
    os.makedirs(os.fspath(directory), exist_ok=True)
    metadata = {
        "fingerprint": state_lib.fingerprint(tp, groups),
        "storage": {
            g: {p: list(v.shape) for p, v in variables.items()}
            for g, variables in groups.items()
        },
        "model_config": state_lib.model_config_json(tp.wrapped_model),
        "step": step,
    }
    ocp.save(path, _tree(groups), overwrite=True, custom_metadata=metadata)
    if keep is not None and jax.process_index() == 0:  # one pruner
        for old in complete_steps(directory)[:-keep]:
            shutil.rmtree(step_path(directory, old), ignore_errors=True)
    return path


def latest(directory) -> str:
    """The newest complete checkpoint in `directory` (or `directory` itself
    when it is one).

    Raises:
        ValueError: when there is none.
    """
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        raise ValueError(
            f"Checkpoint directory does not exist. Received: {directory!r}"
        )
    if _STEP.match(os.path.basename(directory.rstrip("/"))) and (
        ocp.is_orbax_checkpoint(directory)
    ):
        return os.path.abspath(directory)
    steps = complete_steps(directory)
    if not steps:
        raise ValueError(
            "No complete checkpoint in the directory (a save that was "
            f"interrupted leaves none). Received: {directory!r}"
        )
    return step_path(directory, steps[-1])


def read_metadata(path: str) -> dict:
    meta = ocp.metadata(path).custom_metadata or {}
    if "fingerprint" not in meta:
        raise ValueError(
            "Not a keras-tensor-parallel checkpoint (no fingerprint). "
            f"Received: {path!r}"
        )
    return meta


def load(tp, directory) -> str:
    """Restore `tp`'s state from the newest complete checkpoint.

    Every value is read straight into the variable's current sharding (at
    any world size); nothing is assigned until all of them are read and
    checked. Compile `tp` with the same optimizer first.

    Returns:
        The path of the checkpoint loaded.

    Raises:
        ValueError: no complete checkpoint, or one of another model or
            optimizer (the first difference is named).

    Example:

    ```python
    tp.compile(optimizer="adam", loss="mse")
    load(tp, "ckpt")
    ```
    """
    if _torch_store(tp) is not None:  # torch.distributed.checkpoint
        return _torch_store(tp).load(tp, directory)
    _check_engine(tp)
    path = latest(directory)
    meta = read_metadata(path)
    groups = state_lib.state_variables(tp)
    current = state_lib.fingerprint(tp, groups)
    state_lib.compare(meta["fingerprint"], current, path)
    saved = meta["fingerprint"]["variables"]
    groups = {
        g: {p: v for p, v in variables.items() if p in saved.get(g, {})}
        for g, variables in groups.items()
    }
    abstract = {
        group: {
            p: jax.ShapeDtypeStruct(
                _stored_shape(v, meta["storage"][group][p]),
                v.value.dtype,
                sharding=v.value.sharding,
            )
            for p, v in variables.items()
        }
        for group, variables in groups.items()
        if variables
    }
    values = load_partial(path, abstract)
    for group, variables in groups.items():
        for p, v in variables.items():
            v.assign(values[group][p])
    return path


def load_partial(path: str, abstract: dict) -> dict:
    """Read only the arrays `abstract` names (metric state, for example,
    may exist on one side only), each into its given sharding."""
    loading = ocp.options.PyTreeOptions.Loading(partial_load=True)
    options = ocp.options.PyTreeOptions(loading=loading)
    with ocp.Context(pytree_options=options):
        return ocp.load(path, abstract)


def _stored_shape(variable, stored) -> tuple:
    # Shapes differ only for a vocab table padded differently at another
    # world size (the logical shapes were compared already).
    if tuple(variable.shape) != tuple(stored):
        raise ValueError(
            f"Variable {variable.path} was saved padded to {tuple(stored)} "
            f"and is padded to {tuple(variable.shape)} here (vocab-parallel "
            "tables padded for another world size); restoring across that "
            "is not supported yet. Received: another world size"
        )
    return tuple(variable.shape)
