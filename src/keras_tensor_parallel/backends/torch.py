"""Torch engine: one process per device, local shards, f/g collectives.

Keras 3.15 has no model-parallel distribution for torch, so this engine
does Megatron-LM by hand. Every rank keeps only its local shard of each
split variable as an ordinary `torch.nn.Parameter` (so Keras's trainer,
optimizers, metrics and callbacks see plain variables, and optimizer slots
are sized from the local shard), and the call of each layer that owns split
variables is replaced by its role's parallel form (`torch_roles.py`: one
style object per Megatron role; `torch_collectives.py`: f, g, gathers).

Every rank must see the same batch: `prepare_state` broadcasts a seed from
rank 0 and seeds Keras with it (same shuffling, same dropout), and only
rank 0 prints progress. With `tensor_parallel_size` below the world size
the ranks form a `(data, model)` mesh (`torch_groups.py`): the plan runs
on each rank's model-axis group, and each replica trains on its rows of
the global batch with gradients averaged over its data-axis group.
Split variables read as full arrays (`numpy()`,
`get_weights()`, saving all-gather them; every rank must take part) and
accept full arrays in `assign()`. At world size 1 (a plain `python`
process) nothing is split and no collective runs.

`compile(..., jit_compile=True)` (torch.compile, inductor) traces f and g
into the compiled graphs (no eager fallback for them; the tied reverse
head's gather is untested there); `COUNTS` only counts eager calls.
Compiling is slow on CPU (tiny OPT: about 140 s on 2 shared cores).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable

import keras
import numpy as np
import torch
import torch.distributed as dist

from keras_tensor_parallel.backends import (
    base,
    torch_attributes,
    torch_recompute,
    torch_sequence,
)
from keras_tensor_parallel.backends import torch_collectives as tc
from keras_tensor_parallel.backends import torch_groups as tg
from keras_tensor_parallel.backends import torch_roles as roles
from keras_tensor_parallel.backends.torch_clipping import install_clipping
from keras_tensor_parallel.backends.torch_collectives import (  # noqa: F401
    COUNTS,
    ensure_process_group,
    reset_counts,
)
from keras_tensor_parallel.plan import ShardingPlan

BACKEND = "torch"


def available_devices() -> list[str]:
    """One device per rank of the process group (`cpu:i` or `cuda:i`);
    one device when no launcher started this process."""
    tc.ensure_process_group()  # from torchrun's environment, if any
    return [f"{tc.device_kind()}:{i}" for i in range(tc.world_size())]


def _no_checkpoint() -> None:
    return None


class TorchEngine:
    """Applies a plan across the ranks of the default process group.

    Implements `backends.base.Engine`.

    Args:
        plan: The sharding plan; `plan.world_size` is the model axis (a
            divisor of the number of ranks; the rest is data parallel).
        device_ids: One id per rank (`available_devices()`).

    Example:

    ```python
    engine = TorchEngine(plan_model(model, 2), ["cpu:0", "cpu:1"])
    engine.apply(model)  # in each of 2 ranks started by keras-tp launch
    ```
    """

    name = BACKEND
    mesh = None  # no device mesh: one process per device
    distribution = None  # no keras.distribution for torch

    def __init__(self, plan: ShardingPlan, device_ids: list[str]):
        tc.ensure_process_group()
        world = len(device_ids)
        if tc.world_size() != world:
            raise ValueError(
                f"The torch engine runs one process per device: start "
                f"{world} processes with `keras-tp launch -n "
                f"{world} script.py`. Received: world_size="
                f"{world} in {tc.world_size()} process(es)"
            )
        self.plan = plan
        self.device_ids = list(device_ids)
        self.rank = tc.rank()
        # (data, model) groups only when there is a data axis: otherwise
        # the plan runs on the default group, as before.
        self.groups = None
        model_rank, group = self.rank, None
        if plan.world_size != world:
            self.groups = tg.new_mesh_groups(plan.world_size)
            model_rank, group = self.groups.model_rank, self.groups.model_group
        self.model_rank = model_rank  # this rank's place in its plan
        self._styles = roles.styles_for(group, plan)  # kv subgroups
        self._shard = roles.Shard(model_rank, plan.world_size, roles.Region())
        self._journal = base.Journal()
        self._split: list = []
        self.sequence_parallel = False
        self.recompute = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def apply(self, model, *, checkpoint=_no_checkpoint) -> None:
        """Split every planned variable and install each role's forward;
        all or nothing, on every rank together. Variables already holding
        their local shard (`adopt_shard`, as loading makes them) are kept."""
        variables = list(model.variables)
        base.check_plan_matches([_Full(v) for v in variables], self.plan)
        if self.plan.world_size == 1:
            return  # nothing to split, nothing to communicate
        sequence = _activations(self, model)  # refused before any change
        saved: list = []
        failed = tc.first_error(
            _attempt(
                self._partition, model, variables, saved, checkpoint, sequence
            )
        )
        if failed is None:
            # Every rank runs the same check on the same shapes; agreeing
            # once more keeps an interrupt on one rank from splitting them.
            failed = tc.first_error(_attempt(_check_runs, model, checkpoint))
        if failed is not None:
            self._journal.undo()
            for v, entry, full in reversed(saved):
                roles.style_for(entry.role, self._styles).undo(v, full)
            _retrack(model)
            raise failed
        self._split = [
            (v, e)
            for v, e in zip(variables, self.plan.variables)
            if roles.is_split(v)
        ]

    def _partition(self, model, variables, saved, checkpoint, sequence):
        for v, entry in zip(variables, self.plan.variables):
            checkpoint()
            if roles.is_split(v):
                _check_adopted(v, entry, self.plan.world_size)
            elif entry.is_split:
                # The full value is kept until the wrap succeeds, so a
                # failure on any rank rolls back without a collective.
                saved.append((v, entry, v.value.detach().clone()))
                style = roles.style_for(entry.role, self._styles)
                style.partition(v, entry, self._shard)
        layers = {
            layer.path: layer
            for layer in model._flatten_layers(include_self=True)
        }
        for path, entries in self._split_layers().items():
            if path not in layers:
                raise ValueError(f"Plan names unknown layer {path!r}.")
            style = roles.layer_style(entries, self._styles)
            style.install(layers[path], self._shard, self._journal)
        roles.sum_partial_grads(model, self.plan, self._styles, self._journal)
        # Gemma's own reshapes read local head counts (torch_attributes).
        torch_attributes.install(self, model, self._journal)
        if sequence[0] is not None:
            torch_sequence.install(self, model, sequence[0], self._journal)
        if sequence[1] is not None:
            torch_recompute.install(sequence[1], self._journal)
        _retrack(model)

    def _split_layers(self) -> dict:
        out: dict = {}
        for entry in self.plan:
            if entry.is_split:
                out.setdefault(entry.layer, []).append(entry)
        return out

    def unapply(self, model) -> None:
        """Undo `apply` (a collective: every rank calls it)."""
        for v, entry in reversed(self._split):
            style = roles.style_for(entry.role, self._styles)
            style.undo(v, roles.full_value(v))
        self._split = []
        self._journal.undo()
        _retrack(model)

    @contextlib.contextmanager
    def scope(self):
        """Only rank 0 prints."""
        if self.is_main:
            yield
            return
        with contextlib.redirect_stdout(io.StringIO()):
            yield

    def prepare_state(self, tp_model) -> None:
        """Same seed on every rank (same batches, same dropout); clipping
        with full norms over the model axis; with a data axis, each
        replica's rows of the batch and the data-axis gradient mean."""
        if len(self.device_ids) == 1:
            return
        seed = torch.randint(0, 2**31 - 1, (1,))
        dist.broadcast(seed, src=0)
        keras.utils.set_random_seed(int(seed))
        groups = self.groups
        optimizer = getattr(tp_model, "optimizer", None)
        if optimizer is not None:
            install_clipping(optimizer, groups and groups.model_group)
        if groups is not None:
            tg.install_data_parallel(tp_model, groups)

    def place_state(self, variables: Iterable) -> None:
        """Nothing to place: slots are made from the local shards."""
        return None

    def set_activations(self, *, sequence_parallel: bool, recompute) -> None:
        """Before `apply`: split the activations between regions along
        the sequence (`torch_sequence.py`), and/or recompute the attention
        core in backward (`torch_recompute.py`)."""
        self.sequence_parallel = sequence_parallel
        self.recompute = recompute

    @contextlib.contextmanager
    def guard(self, tp_model):
        """Nothing to guard: Keras's torch trainer keeps every variable's
        value attached while it runs."""
        yield

    def to_numpy(self, variable) -> np.ndarray:
        """The full value (all-gathered where split: a collective)."""
        return np.asarray(variable)

    def shard_shapes(self, variable) -> list[tuple]:
        """This rank's shape of `variable` (one device per process)."""
        return [tuple(variable.value.shape)]

    def per_device_bytes(self, variables: Iterable) -> dict[str, int]:
        """Bytes this rank holds for `variables`, keyed by its device."""
        total = sum(
            int(v.value.numel()) * v.value.element_size() for v in variables
        )
        return {self.device_ids[self.rank]: total}

    def save(self, model, filepath, *, weights_only=False, **kwargs) -> None:
        """Every rank gathers the split variables; rank 0 writes
        atomically. An error on any rank is raised on every rank."""
        method = model.save_weights if weights_only else model.save
        split = [v for v in model.variables if roles.is_split(v)]
        error = None
        try:
            with _gathered(split):
                if self.is_main:
                    base.write_file(method, filepath, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            error = e
        failed = tc.first_error(error)
        if failed is not None:
            raise error or failed


@contextlib.contextmanager
def _gathered(variables):
    """Gather every split variable first (all ranks, same order), so that
    writing the file runs no collective and cannot leave a rank waiting."""
    try:
        for v in variables:
            v._tp_gathered = roles.full_value(v).cpu().numpy()
        yield
    finally:
        for v in variables:
            v.__dict__.pop("_tp_gathered", None)


def adopt_shard(variable, dim: int, rank: int, size: int, local) -> None:
    """Make an unallocated `variable` a split variable whose local shard is
    `local` (already this rank's rows along `dim`), as `apply` would have
    split it, without ever creating its full value.

    The split is made on a meta-device placeholder of the full shape (no
    memory), then the placeholder shard is replaced by `local`.

    Raises:
        ValueError: when `local` is not this rank's shard shape.

    Example:

    ```python
    adopt_shard(v, 0, rank, 2, rows)  # v: created unallocated
    ```
    """
    full = tuple(variable.shape)
    dtype = keras.backend.standardize_dtype(variable.dtype)
    with keras.device("meta"):
        variable._initialize(
            torch.empty(full, dtype=getattr(torch, dtype), device="meta")
        )
        roles.split_variable(variable, dim, rank, size)
    if tuple(local.shape) != tuple(variable.shape):
        raise ValueError(
            f"Shard of {variable.path} on rank {rank} of {size} must have "
            f"shape {tuple(variable.shape)} (split on dim {dim} of {full}). "
            f"Received: shape {tuple(local.shape)}"
        )
    variable._value = None
    variable._initialize(local)


def _check_adopted(variable, entry, size: int) -> None:
    sizes = getattr(variable, "_tp_sizes", [])
    ranks = len(sizes) * getattr(variable, "_tp_copies", 1)  # shared kv
    if not entry.is_split or (variable._tp_dim, ranks) != (
        entry.split_dim,
        size,
    ):
        raise ValueError(
            f"Variable {variable.path} holds a shard split on dim "
            f"{variable._tp_dim} over {len(sizes)} ranks; the plan says "
            f"{entry.role.value} on dim {entry.split_dim} over {size}. "
            "Received: a model already split for another plan"
        )


class _Full:
    """A variable's path and full shape (a split one reports its local
    shape), to check a plan against already-local shards."""

    def __init__(self, variable):
        self.path = variable.path
        self.shape = getattr(variable, "_tp_full_shape", variable.shape)


def _activations(engine, model) -> tuple:
    """What `set_activations` asked for, checked before anything changes:
    (sequence plan or None, attention layers to recompute or None)."""
    sequence = layers = None
    if engine.recompute == "attention":
        layers = torch_recompute.check(model)
    if engine.sequence_parallel:
        sequence = torch_sequence.plan_sequence(model, engine.plan)
    return sequence, layers


def _attempt(step, *args) -> BaseException | None:
    """Run `step`; return what it raised (to agree on it across ranks)."""
    try:
        step(*args)
    except BaseException as e:  # noqa: BLE001 - the caller re-raises it
        return e
    return None


def _retrack(model) -> None:
    """Re-register torch parameters after their values were replaced."""
    for layer in model._flatten_layers(include_self=True):
        if "_torch_params" in layer.__dict__ or hasattr(layer, "_torch_params"):
            layer._track_variables()


_CHECKING = [0]  # `_check_runs` calls in progress


def checking() -> bool:
    """Whether the wrap's one-batch check forward is running (its
    activations are not weights: memory measurements tell them apart)."""
    return _CHECKING[0] > 0


def _check_runs(model, checkpoint=_no_checkpoint) -> None:
    """One tiny forward pass on the local shards, so that a model whose own
    code cannot run split (say it reshapes a split tensor with the full head
    count, which the plan cannot see) fails here, at wrap time, and is
    rolled back, rather than at its first call. Every rank runs the same
    code on the same shapes, so all ranks fail or pass together."""
    from keras_tensor_parallel.plan.graph import symbolic_inputs

    inputs = keras.tree.map_structure(
        lambda t: np.ones(t.shape, t.dtype), symbolic_inputs(model)
    )
    counts = dict(tc.COUNTS)  # the check is not part of the user's work
    _CHECKING[0] += 1
    try:
        with torch.no_grad():  # forward only: keep no activations for grads
            model(inputs)
    except Exception as e:  # noqa: BLE001 - reported as the user's error
        first = str(e).strip().splitlines()[0][:200] if str(e) else ""
        raise ValueError(
            "The torch engine cannot run this plan on local shards: "
            f"{type(e).__name__}: {first}. The model's own code probably "
            "shapes a split tensor with a full-size count (for example the "
            "number of heads). Replicate that layer with "
            "overrides={'<path regex>': 'replicated'}, or use the JAX "
            f"backend. Received: model={model.name!r}"
        ) from e
    finally:
        _CHECKING[0] -= 1
        tc.COUNTS.update(counts)
    checkpoint()
