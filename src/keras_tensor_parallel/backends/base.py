"""The engine contract, and what every engine shares.

An engine applies a `ShardingPlan` to a built Keras model on one backend.
Each backend offers the same small surface (as Keras's
`backend/*/distribution_lib.py` do), and the wrapper calls nothing else:

- `apply(model)` / `unapply(model)`: shard in place, all or nothing; undo.
- `scope()`: the context training and inference run in.
- `prepare_state(tp_model)`: optimizer and metric state follow the plan.
- `guard(tp_model)`: a failed fit/evaluate/predict leaves every variable
  with its value (the context those calls run in).
- `place_state(variables)`: lay out optimizer/metric variables created
  outside the wrapper (a verifier's own optimizer) like their parameters.
- `to_numpy(variable)`: the full, logical value (gathered where split).
- `shard_shapes(variable)`: the shapes this process's devices hold.
- `per_device_bytes(variables)`: bytes held per device id, read from the
  actual local shards.
- `save(model, filepath, weights_only=...)`: full weights, written
  atomically by one process.
- `device_ids`, `rank`, `is_main`, `plan`, `mesh`, `distribution`.

`keras_tensor_parallel.backends.make_engine` builds one by backend name and
`backends.available_devices` asks the backend which devices this process
can use; both sit in the package above the engines, so imports point one
way. Importing this module imports no framework.
"""

from __future__ import annotations

import builtins
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from keras_tensor_parallel.plan import ShardingPlan


@runtime_checkable
class Engine(Protocol):
    """What the wrapper may call on an engine (see the module docstring)."""

    name: str
    plan: ShardingPlan
    device_ids: list[str]
    rank: int
    mesh: Any
    distribution: Any

    @property
    def is_main(self) -> bool: ...

    def apply(self, model, *, checkpoint: Callable[[], None] = ...) -> None: ...

    def unapply(self, model) -> None: ...

    def scope(self): ...

    def prepare_state(self, tp_model) -> None: ...

    def place_state(self, variables: Iterable) -> None: ...

    def set_activations(
        self, *, sequence_parallel: bool, recompute
    ) -> None: ...

    def guard(self, tp_model): ...

    def to_numpy(self, variable) -> np.ndarray: ...

    def shard_shapes(self, variable) -> list[tuple]: ...

    def per_device_bytes(self, variables: Iterable) -> dict[str, int]: ...

    def save(
        self, model, filepath, *, weights_only: bool = False, **kwargs
    ) -> None: ...


# Shared by the engines and by verify -----------------------------------------


def refuse_activations(
    engine: str, *, sequence_parallel: bool, recompute
) -> None:
    """`set_activations` of an engine that splits no activations: a
    ValueError for anything but plain tensor parallelism."""
    if sequence_parallel or recompute:
        raise ValueError(
            "sequence_parallel and recompute run on the JAX engine only; "
            f"the {engine} engine runs plain tensor parallelism. Received: "
            f"sequence_parallel={sequence_parallel}, recompute={recompute!r}"
        )


def check_plan_matches(variables: Sequence, plan: ShardingPlan) -> None:
    """Raise ValueError unless `plan` lists exactly these variables."""
    if len(variables) != len(plan.variables):
        raise ValueError(
            "The plan does not belong to this model: it lists "
            f"{len(plan.variables)} variables, the model has "
            f"{len(variables)}. Received: plan for {plan.model_name!r}"
        )
    for v, entry in zip(variables, plan.variables):
        if v.path != entry.path or tuple(v.shape) != entry.shape:
            raise ValueError(
                f"Plan entry {entry.path} {entry.shape} does not match "
                f"variable {v.path} {tuple(v.shape)}. Received: plan for "
                f"{plan.model_name!r}"
            )


def slot_owner(slot, params: Iterable):
    """The model variable an optimizer slot was made from, or None.

    Keras names a slot `<parameter path with / as _>_<slot name>`
    (`add_variable_from_reference`); the longest matching parameter wins,
    so `dense_1/kernel` is not mistaken for `dense/kernel`'s neighbour.

    Example:

    ```python
    owner = slot_owner(optimizer.variables[2], model.trainable_variables)
    ```
    """
    name = slot.path.split("/")[-1]
    best, best_len = None, -1
    for param in params:
        key = param.path.replace("/", "_")
        if name.startswith(key + "_") and len(key) > best_len:
            best, best_len = param, len(key)
    return best


class Journal:
    """Undo log of in-place changes: each step registers its own undo.

    `undo()` runs them newest first, so a half-done `apply` rolls back to
    exactly the state before it (as BlackSamorez's undoable shard actions).
    """

    _MISSING = object()

    def __init__(self):
        self._undos: list[Callable[[], None]] = []

    def add(self, undo: Callable[[], None]) -> None:
        self._undos.append(undo)

    def setattr(self, obj, name: str, value) -> None:
        """`setattr(obj, name, value)`, remembering the instance's own
        attribute (or its absence) to restore."""
        old = obj.__dict__.get(name, self._MISSING)

        def undo():
            if old is self._MISSING:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, old)

        self._undos.append(undo)
        setattr(obj, name, value)

    def undo(self) -> None:
        while self._undos:
            self._undos.pop()()


class DeferredInterrupt:
    """Hold Ctrl-C (SIGINT) during a change that must be all or nothing.

    Inside the block a SIGINT only sets a flag; `checkpoint()` raises
    `KeyboardInterrupt` where the caller can roll back, and leaving the
    block raises it if it is still pending. Outside the main thread
    (where signal handlers cannot be set) it does nothing.

    Example:

    ```python
    with DeferredInterrupt() as interrupt:
        for step in steps:
            interrupt.checkpoint()
            step()
    ```
    """

    def __init__(self):
        self.pending = False
        self._old = None

    def _handler(self, signum, frame):
        self.pending = True

    def checkpoint(self) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def release(self) -> None:
        """Give Ctrl-C back, then raise one that arrived meanwhile: call it
        as the last step that can still be undone."""
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
        self.checkpoint()

    def __exit__(self, exc_type, exc, tb):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
        if exc_type is None:
            self.checkpoint()
        return False


def atomic_write(
    write: Callable[[str], Any], filepath, *, overwrite: bool = True
) -> None:
    """Call `write(tmp)` on a temporary path beside `filepath`, then rename
    it into place: a kill at any moment leaves the old file or the new one.

    The temporary name keeps the extension (Keras picks the format from it)
    and lives in the same directory (so `os.replace` is atomic). With
    `overwrite=False` an existing file is replaced only if the user agrees
    (Keras's own prompt).

    Example:

    ```python
    atomic_write(lambda tmp: model.save(tmp), "model.keras")
    ```
    """
    path = os.fspath(filepath)
    if not overwrite and os.path.exists(path):
        from keras.src.utils import io_utils

        if not io_utils.ask_to_proceed_with_overwrite(path):
            return
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        prefix=f".{name}.", suffix=f".tmp-{name}", dir=directory
    )
    os.close(fd)
    os.unlink(tmp)  # the writer creates it (Keras asks before overwriting)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_file(method: Callable, filepath, **kwargs) -> None:
    """`method(filepath, **kwargs)` (a Keras `save`/`save_weights`),
    atomically through `atomic_write`; with `max_shard_size` Keras writes
    several files, which are written in place."""
    overwrite = kwargs.pop("overwrite", True)
    if kwargs.get("max_shard_size"):
        method(filepath, overwrite=overwrite, **kwargs)
        return
    atomic_write(lambda p: method(p, **kwargs), filepath, overwrite=overwrite)


def rank_error(name: str, message: str, *, rank: int) -> BaseException:
    """The error another rank raised, rebuilt here from its type name and
    message (a builtin type when it is one, else RuntimeError)."""
    cls = getattr(builtins, name, None)
    text = f"rank {rank} failed: {name}: {message}"
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(text)
        except Exception:  # noqa: BLE001 - a type that needs other args
            pass
    return RuntimeError(text)
