"""Sharded checkpoints on the torch engine (`torch.distributed.checkpoint`).

    directory/
      step_00000012/      one complete checkpoint: DCP's `.metadata` and
        .metadata         each rank's `__R_0.distcp` (the shards it holds;
        __0_0.distcp      replicated values written once), and
        tp_meta.json      our fingerprint, written last
      .step_00000024.tmp-3f2a...   a save in progress (never a checkpoint)

Each split variable (and each optimizer slot of one) is described to DCP
as a `ShardedTensor` whose local shards carry their global offsets
(`pieces_torch.py`: one piece for a plain or uneven split, one per part
for a fused kernel; a kv block shared by several ranks is one piece they
all describe, written once), so every rank writes only its own rows, and
a load at another world size reads, for each rank, exactly the rows its
new shard covers (DCP reshards from the offsets). With a data axis
(`tensor_parallel_size < world_size`) replicas hold the same shards at
the same offsets, DCP writes each once and every replica restores it,
and a load on another `(data, model)` mesh reshards the same way. A save
goes to a temporary directory that rank 0 renames to `step_XXXXXXXX`
only once every rank's shards and the metadata are on disk: a save
killed midway leaves the previous step loadable.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import (
    Shard,
    init_from_local_shards,
)

from keras_tensor_parallel.backends import base, torch_zero
from keras_tensor_parallel.backends import torch_collectives as tc
from keras_tensor_parallel.backends import torch_roles as roles
from keras_tensor_parallel.checkpoint import pieces_torch
from keras_tensor_parallel.checkpoint import state as state_lib

META = "tp_meta.json"
DCP_META = ".metadata"
TORCH_RNG = "rng/torch"
_STEP = re.compile(r"^step_(\d{8})$")


def is_complete(path: str) -> bool:
    """Whether `path` is a complete torch checkpoint step."""
    return _STEP.match(
        os.path.basename(os.path.normpath(path))
    ) is not None and (
        os.path.isfile(os.path.join(path, META))
        and os.path.isfile(os.path.join(path, DCP_META))
    )


def complete_steps(directory) -> list[int]:
    """Steps with a complete torch checkpoint in `directory`, oldest first."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(_STEP.match(name).group(1))
        for name in os.listdir(directory)
        if is_complete(os.path.join(directory, name))
    )


def step_path(directory, step: int) -> str:
    return os.path.join(os.path.abspath(directory), f"step_{step:08d}")


def latest(directory) -> str:
    """The newest complete checkpoint in `directory` (or `directory`
    itself when it is one).

    Raises:
        ValueError: when the path does not exist or holds none.
    """
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        raise ValueError(
            f"Checkpoint directory does not exist. Received: {directory!r}"
        )
    if is_complete(directory):
        return os.path.abspath(directory)
    steps = complete_steps(directory)
    if not steps:
        raise ValueError(
            "No complete checkpoint in the directory (a save that was "
            f"interrupted leaves none). Received: {directory!r}"
        )
    return step_path(directory, steps[-1])


# What each variable is across the ranks ----------------------------------


def _groups(tp) -> dict:
    # No `prepare_state`: on torch it reseeds every rank, and a save must
    # not change the run it checkpoints (resuming would then differ).
    if getattr(tp, "_tp_zero_stage", 0):  # slots built on the pieces
        torch_zero.shard_optimizer_state(tp)
    return state_lib.state_variables(tp, prepare=False)


def _split_of(variable, params):
    """The split parameter whose layout `variable` has (itself, or the
    parameter an optimizer slot was made from), or None if replicated."""
    if roles.is_split(variable):
        return variable
    owner = base.slot_owner(variable, params)
    if owner is not None and roles.is_split(owner):
        if tuple(variable.shape) == tuple(owner.value.shape):
            return owner
    return None


def layouts(tp, groups: dict) -> dict:
    """`{(group, key): layout}` for every value that is a piece of a
    larger one: split over the model axis (a `pieces_torch.Layout`, the
    same on data-axis replicas: they hold the same pieces), or an
    optimizer slot cut over the data axis too by ZeRO-1 (`(full shape,
    offsets, the group whose pieces tile it)`: `torch_zero.slot_place`).

    Raises:
        ValueError: ZeRO-1 slots of shared kv heads or fused kernels."""
    params = [v for v in tp.wrapped_model.variables if roles.is_split(v)]
    out = {}
    for group, variables in groups.items():
        for key, v in variables.items():
            owner = _split_of(v, params)
            zero = torch_zero.slot_place(tp.optimizer, v)
            if zero is not None:
                _check_zero(v, owner or base.slot_owner(v, params))
                out[(group, key)] = zero
            elif owner is not None:
                out[(group, key)] = pieces_torch.layout(owner)
    return out


def _check_zero(slot, owner) -> None:
    odd = {
        "copies": getattr(owner, "_tp_copies", 1),
        "parts": getattr(owner, "_tp_parts", 1),
    }
    if owner is not None and max(odd.values()) > 1:
        raise ValueError(
            "Torch checkpoints of ZeRO-1 optimizer slots cut over the data "
            "axis do not describe kv heads shared by several ranks or fused "
            "expert kernels: checkpoint without zero_stage=1. Received: "
            f"slot {slot.path} of {owner.path} ({odd})"
        )


def _full(layout) -> tuple:
    return layout.full if hasattr(layout, "full") else layout[0]


def fingerprint(tp, groups: dict, split: dict) -> dict:
    """`state.fingerprint` with full (global) shapes, which do not depend
    on the world size."""
    out = state_lib.fingerprint(tp, groups)
    for (group, key), layout in split.items():
        out["variables"][group][key][0] = list(_full(layout))
    return out


@contextlib.contextmanager
def _quiet():
    # DCP warns on every ShardedTensor that DTensor replaces it; DTensor's
    # uneven shards follow torch.chunk (10 rows on 4 ranks: 3, 3, 3, 1),
    # not our split (3, 3, 2, 2), so the shards keep their own offsets.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Please use DTensor", FutureWarning)
        yield


def _sharded(local, full, offsets, group):
    """`local` as this rank's piece (at `offsets`) of a `full`-shaped
    tensor, over the ranks of `group` (a collective there: each describes
    its piece).

    With a data axis every replica describes the same model shards (same
    global offsets); DCP's save planner keeps one writer per `(key,
    offset)` (`dedup_save_plans`), so each shard is written once, and
    every replica reads its shard back on load."""
    meta = ShardMetadata(
        shard_offsets=list(offsets),
        shard_sizes=list(local.shape),
        placement=f"rank:{tc.rank()}/{local.device}",
    )
    with _quiet():
        return init_from_local_shards(
            [Shard(local, meta)], *full, process_group=group
        )


def _state_dict(groups: dict, split: dict, make) -> dict:
    """`{group/key: tensor or ShardedTensor}`, values from `make(v)`."""
    out = {}
    for group, variables in groups.items():
        for key, v in variables.items():
            local = make(v)
            layout = split.get((group, key))
            if layout is not None and tc.world_size() > 1:
                if hasattr(layout, "sharded"):
                    local = layout.sharded(local)
                else:
                    local = _sharded(local, *layout)
            out[f"{group}/{key}"] = local
    return out


def _metadata(tp, groups: dict, split: dict, step: int) -> dict:
    return {
        "fingerprint": fingerprint(tp, groups, split),
        "model_config": state_lib.model_config_json(tp.wrapped_model),
        "step": step,
        "format": "torch.distributed.checkpoint",
    }


def _agree(value):
    """Rank 0's `value` on every rank."""
    if tc.world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _together(step, *args):
    """Run `step` on every rank; if it fails on any, raise on all."""
    error, result = None, None
    try:
        result = step(*args)
    except Exception as e:  # noqa: BLE001 - re-raised on every rank
        error = e
    failed = tc.first_error(error)
    if failed is not None:
        raise failed
    return result


def _write(tmp: str, state: dict, meta: dict) -> None:
    with _quiet():
        dcp.save(state, checkpoint_id=tmp, no_dist=tc.world_size() == 1)
    if tc.rank() == 0:  # DCP wrote `.metadata` last; ours comes after it
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())


def _publish(tmp: str, final: str) -> None:
    """Rename the finished save into place (rank 0); a step saved again
    replaces the old one only once the new one is complete."""
    if os.path.exists(final):
        old = f"{tmp}.old"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def save(tp, directory, *, keep: int | None = 2) -> str:
    """Write `tp`'s state as a new step of `directory` (every rank its own
    shards); keep the last `keep` complete steps. A collective.

    Returns:
        The path of the checkpoint written.

    Example:

    ```python
    save(tp, "ckpt")   # ckpt/step_00000012 after 12 optimizer steps
    ```
    """
    groups = _groups(tp)
    split = layouts(tp, groups)
    step = int(tp.optimizer.iterations.numpy()) if tp.optimizer else 0
    final = step_path(directory, step)
    tmp = os.path.join(
        os.path.abspath(directory),
        f".step_{step:08d}.tmp-{_agree(uuid.uuid4().hex)}",
    )
    state = _state_dict(groups, split, lambda v: v.value.detach())
    state[TORCH_RNG] = torch.get_rng_state()
    meta = _metadata(tp, groups, split, step)
    _together(os.makedirs, tmp, 0o777, True)
    _together(_write, tmp, state, meta)
    if tc.rank() == 0:
        _together(_publish, tmp, final)
        if keep is not None:
            for old in complete_steps(directory)[:-keep]:
                shutil.rmtree(step_path(directory, old), ignore_errors=True)
    else:
        _together(lambda: None)
    return final


def read_metadata(path: str) -> dict:
    try:
        with open(os.path.join(path, META)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"Not a keras-tensor-parallel torch checkpoint ({e}). "
            f"Received: {path!r}"
        ) from e


def load(tp, directory) -> str:
    """Restore `tp`'s state from the newest complete checkpoint, at any
    world size: each rank reads only the rows of its own shards. Nothing
    is assigned until every value is read; a checkpoint of another model
    or optimizer is refused before anything is read. A collective.

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
    path = latest(directory)
    meta = read_metadata(path)
    groups = _groups(tp)
    split = layouts(tp, groups)
    state_lib.compare(meta["fingerprint"], fingerprint(tp, groups, split), path)
    saved = meta["fingerprint"]["variables"]
    groups = {
        g: {k: v for k, v in variables.items() if k in saved.get(g, {})}
        for g, variables in groups.items()
    }
    state = _state_dict(
        groups, split, lambda v: torch.empty_like(v.value.detach())
    )
    state[TORCH_RNG] = torch.empty_like(torch.get_rng_state())
    with _quiet():
        dcp.load(state, checkpoint_id=path, no_dist=tc.world_size() == 1)
    with torch.no_grad():
        for group, variables in groups.items():
            for key, v in variables.items():
                value = state[f"{group}/{key}"]
                if hasattr(value, "local_shards"):
                    layout = split[(group, key)]
                    value = pieces_torch.join(value, getattr(layout, "dim", 0))
                v.assign(value)
    torch.set_rng_state(state[TORCH_RNG])
    return path


def model_values(path: str) -> tuple[dict, dict]:
    """`(metadata, {key: full value as numpy})` of the model variables of
    checkpoint `path`, read whole in this one process (for export: DCP
    joins every rank's rows)."""
    meta = read_metadata(path)
    saved = meta["fingerprint"]["variables"]["model"]
    state = {
        f"model/{key}": torch.empty(shape, dtype=getattr(torch, dtype))
        for key, (shape, dtype, _) in saved.items()
    }
    with _quiet():
        dcp.load(state, checkpoint_id=path, no_dist=True)
    return meta, {key: state[f"model/{key}"].numpy() for key in saved}
