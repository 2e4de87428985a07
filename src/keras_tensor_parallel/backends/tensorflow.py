"""TensorFlow engine: one process per device, local shards, f/g collectives.

Keras 3's TensorFlow distribution has no model parallelism, so this engine
does Megatron-LM by hand, as the torch engine does: every rank keeps only
its local shard of each split variable as an ordinary `tf.Variable`
inside its Keras variable (so Keras's trainer, optimizers, metrics and
callbacks see plain variables, and optimizer slots are sized from the
local shard), and the call of each layer that owns split variables is
replaced by its role's parallel form (`roles.py`, with TensorFlow's f, g
and gathers from `tensorflow_roles.py` / `tensorflow_collectives.py`).

The ranks form a `TF_CONFIG` cluster (gRPC on 127.0.0.1 under
`keras-tp launch`), joined before the model is built (see
`tensorflow_collectives`). Every rank must see the same batch: the first
`prepare_state` agrees on a seed and seeds Keras with it, and only rank 0
prints. Split variables read as full arrays (`numpy()`, `get_weights()`,
saving all-gather them; every rank must take part) and accept full arrays
in `assign()`. At world size 1 (a plain `python` process) nothing is
split and no collective runs. `fit` runs Keras's `tf.function` steps;
XLA (`jit_compile=True`) is refused: the collectives run outside it.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf

from keras_tensor_parallel.backends import base, clipping
from keras_tensor_parallel.backends import tensorflow_collectives as tc
from keras_tensor_parallel.backends import tensorflow_roles as roles
from keras_tensor_parallel.plan import ShardingPlan

BACKEND = "tensorflow"


def available_devices() -> list[str]:
    """One device per rank of the cluster (`cpu:i` or `gpu:i`); one device
    when no launcher started this process."""
    tc.ensure_cluster()
    return [f"{tc.device_kind()}:{i}" for i in range(tc.world_size())]


def _no_checkpoint() -> None:
    return None


def _dense(grad):
    # Embedding gradients are IndexedSlices; clipping scales them whole.
    return tf.convert_to_tensor(grad)


class TensorflowEngine:
    """Applies a plan across the ranks of the `TF_CONFIG` cluster.

    Implements `backends.base.Engine`.

    Args:
        plan: The sharding plan; `plan.world_size` must equal the number of
            ranks.
        device_ids: One id per rank (`available_devices()`).

    Example:

    ```python
    engine = TensorflowEngine(plan_model(model, 2), ["cpu:0", "cpu:1"])
    engine.apply(model)  # in each of 2 ranks started by keras-tp launch
    ```
    """

    name = BACKEND
    mesh = None  # no device mesh: one process per device
    distribution = None  # no keras.distribution for TensorFlow

    def __init__(self, plan: ShardingPlan, device_ids: list[str]):
        tc.ensure_cluster()
        if tc.world_size() != plan.world_size:
            raise ValueError(
                f"The TensorFlow engine runs one process per device: start "
                f"{plan.world_size} processes with `KERAS_BACKEND=tensorflow "
                f"keras-tp launch -n {plan.world_size} script.py`. Received: "
                f"world_size={plan.world_size} in {tc.world_size()} "
                "process(es)"
            )
        self.plan = plan
        self.device_ids = list(device_ids)
        self.rank = tc.rank()
        self._shard = roles.Shard(self.rank, plan.world_size, roles.Region())
        self._journal = base.Journal()
        self._split: list = []
        self._seeded = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def apply(self, model, *, checkpoint=_no_checkpoint) -> None:
        """Split every planned variable and install each role's forward;
        all or nothing, on every rank together."""
        variables = list(model.variables)
        base.check_plan_matches(variables, self.plan)
        if self.plan.world_size == 1:
            return  # nothing to split, nothing to communicate
        saved: list = []
        failed = tc.first_error(
            _attempt(self._partition, model, variables, saved, checkpoint)
        )
        if failed is None:
            # Every rank runs the same check on the same shapes; agreeing
            # once more keeps an interrupt on one rank from splitting them.
            failed = tc.first_error(_attempt(_check_runs, model, checkpoint))
        if failed is not None:
            self._journal.undo()
            for v, entry, full in reversed(saved):
                roles.style_for(entry.role).undo(v, full)
            raise failed
        self._split = [(v, entry) for v, entry, _ in saved]

    def _partition(self, model, variables, saved, checkpoint) -> None:
        for v, entry in zip(variables, self.plan.variables):
            checkpoint()
            if entry.is_split:
                # The full value is kept until the wrap succeeds, so a
                # failure on any rank rolls back without a collective.
                saved.append((v, entry, tf.identity(v.value)))
                roles.style_for(entry.role).partition(v, entry, self._shard)
        layers = {
            layer.path: layer
            for layer in model._flatten_layers(include_self=True)
        }
        for path, entries in self._split_layers().items():
            if path not in layers:
                raise ValueError(f"Plan names unknown layer {path!r}.")
            style = roles.layer_style(entries)
            style.install(layers[path], self._shard, self._journal)

    def _split_layers(self) -> dict:
        out: dict = {}
        for entry in self.plan:
            if entry.is_split:
                out.setdefault(entry.layer, []).append(entry)
        return out

    def unapply(self, model) -> None:
        """Undo `apply` (a collective: every rank calls it)."""
        for v, entry in reversed(self._split):
            roles.style_for(entry.role).undo(v, roles.full_value(v))
        self._split = []
        self._journal.undo()

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
        with full norms; optimizer slots built; no XLA."""
        if self.plan.world_size == 1:
            return
        if getattr(tp_model, "jit_compile", False):
            raise ValueError(
                "The TensorFlow engine runs its collectives outside XLA: "
                "compile with jit_compile=False. Received: jit_compile=True"
            )
        if not self._seeded:
            # Once: setting TensorFlow's seed clears its kernel caches, so
            # every later step would rebuild its graph's kernels (3 s a
            # step for a small OPT). The ranks then run the same program
            # and draw the same numbers.
            keras.utils.set_random_seed(tc.broadcast_seed())
            self._seeded = True
        optimizer = getattr(tp_model, "optimizer", None)
        if optimizer is not None:
            clipping.install_clipping(optimizer, tc.all_reduce, _dense)
            if not optimizer.built:
                # Slots from the local shards, made now: Keras would make
                # them inside the first `tf.function` trace, which
                # TensorFlow then traces twice (collectives included).
                optimizer.build(tp_model.trainable_variables)

    def place_state(self, variables: Iterable) -> None:
        """Nothing to place: slots are made from the local shards."""
        return None

    def set_activations(self, *, sequence_parallel: bool, recompute) -> None:
        """Only plain tensor parallelism here (sequence parallelism and
        recomputation are JAX-only)."""
        base.refuse_activations(
            "TensorFlow",
            sequence_parallel=sequence_parallel,
            recompute=recompute,
        )

    @contextlib.contextmanager
    def guard(self, tp_model):
        """Nothing to guard: TensorFlow variables keep their values."""
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
            int(v.value.shape.num_elements()) * v.value.dtype.size
            for v in variables
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
            v._tp_gathered = roles.COLLECTIVES.to_numpy(roles.full_value(v))
        yield
    finally:
        for v in variables:
            v.__dict__.pop("_tp_gathered", None)


def _attempt(step, *args) -> BaseException | None:
    """Run `step`; return what it raised (to agree on it across ranks)."""
    try:
        step(*args)
    except BaseException as e:  # noqa: BLE001 - the caller re-raises it
        return e
    return None


def _check_runs(model, checkpoint=_no_checkpoint) -> None:
    """One tiny forward pass on the local shards (as the torch engine's
    check): a model whose own code cannot run split fails at wrap time
    and is rolled back. Every rank runs the same code on the same shapes,
    so all ranks fail or pass together."""
    from keras_tensor_parallel.plan.graph import symbolic_inputs

    inputs = keras.tree.map_structure(
        lambda t: np.ones(t.shape, t.dtype), symbolic_inputs(model)
    )
    try:
        model(inputs)
    except Exception as e:  # noqa: BLE001 - reported as the user's error
        first = str(e).strip().splitlines()[0][:200] if str(e) else ""
        raise ValueError(
            "The TensorFlow engine cannot run this plan on local shards: "
            f"{type(e).__name__}: {first}. The model's own code probably "
            "shapes a split tensor with a full-size count (for example the "
            "number of heads). Replicate that layer with "
            "overrides={'<path regex>': 'replicated'}, or use the JAX "
            f"backend. Received: model={model.name!r}"
        ) from e
    checkpoint()
