"""`tensor_parallel_size="auto"` on torch: computed, not compiled.

Torch has no compiled program to read, so for each divisor T of the world
size (smallest first) one rank's need is computed:

- parameters: the plan's shard bytes at T (`VariablePlan.per_device_bytes`,
  the figure the torch engine's `per_device_bytes` reports once wrapped;
  where shards are uneven, rank 0's, the largest);
- optimizer: Adam's two slots per trainable shard, plus its scalars;
- gradients: one per trainable shard;
- activations: an estimate from a measured pass. The unwrapped model runs
  forward and its loss in this process on 1 and 2 rows of the batch, and
  autograd's saved-tensor hooks count the bytes it keeps for backward
  (each storage once, parameters left out); the two counts are
  extrapolated linearly to the rows one replica trains on (global batch /
  data). By the innermost layer the plan splits at T around it, a saved
  tensor counts 1/T when it is split there (a column or heads layer's
  own tensors but not its replicated input; a row layer's input, but not
  what it saves after its all-reduce; a layer whose variable-holding
  sublayers are all split, as attention around its q/k/v/o projections,
  is a column layer), and whole elsewhere (norms, residual adds, the
  loss). Activations between split layers that a plain layer computes
  count whole: the estimate errs high there.

The first T whose total fits `device_memory` is the choice, printed with
`autosize`'s table. Everything depends on shapes only (no values, no
timing), so every rank computes the same choice, before any rank builds
its shards.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from keras_tensor_parallel import autosize
from keras_tensor_parallel.plan import Role

SEQ_LEN = 128  # default example rows, as the JAX measurement uses


@dataclasses.dataclass(frozen=True)
class TorchNeed:
    """What one rank needs at one tensor-parallel size (bytes)."""

    tensor_parallel_size: int
    data_parallel_size: int
    params: int
    optimizer: int
    gradients: int
    activations: int

    columns: ClassVar = ("params", "optimizer", "gradients", "activations")
    source: ClassVar = (
        "computed from the plan's shards and autograd's saved tensors"
    )

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations

    def figures(self) -> tuple[int, ...]:
        return (self.params, self.optimizer, self.gradients, self.activations)


def choose(
    model,
    world_size: int,
    device_memory,
    *,
    overrides: dict | None = None,
    batch=None,
    verbose: bool = True,
    sizes: list[int] | None = None,
) -> autosize.Choice:
    """The smallest divisor T of `world_size` at which one rank's need
    fits `device_memory` (see the module docstring).

    Args:
        model: A built Keras model (left as it was).
        world_size: The number of ranks.
        device_memory: Bytes per device (`autosize.parse_memory`).
        overrides: Plan overrides.
        batch: `(inputs, targets)` of one global batch; default
            `world_size` rows of example inputs (sequences of 128) and
            zero targets under MSE.
        verbose: Print the choice and its table.
        sizes: The sizes to try (default: every divisor, smallest first).

    Raises:
        ValueError: when no T fits, naming the smallest need.

    Example:

    ```python
    choice = choose(model, 4, "16GB")  # in each of 4 torch ranks
    ```
    """
    autosize.parse_memory(device_memory)  # a bad value fails before work
    saved = ActivationPass.run(model, batch, world_size)
    return autosize.smallest_fit(
        lambda t: measure(model, world_size, t, saved, overrides=overrides),
        world_size,
        device_memory,
        sizes=sizes,
        verbose=verbose,
    )


def measure(model, world_size: int, t: int, saved, *, overrides=None):
    """`TorchNeed` of `model` on a `(world_size/t, t)` mesh of ranks;
    `saved` is the model's `ActivationPass`."""
    plan = torch_plan(model, t, overrides)
    trainable = {v.path for v in model.trainable_variables}
    params = sum(e.per_device_bytes(t) for e in plan)
    grads = sum(e.per_device_bytes(t) for e in plan if e.path in trainable)
    data = world_size // t
    return TorchNeed(
        tensor_parallel_size=t,
        data_parallel_size=data,
        params=params,
        optimizer=2 * grads + _adam_scalar_bytes(),
        gradients=grads,
        activations=saved.bytes_at(plan, model, math.ceil(saved.rows / data)),
    )


def torch_plan(model, t: int, overrides=None):
    """The plan the torch wrapper makes at size `t` (`model.py`): padded
    and shared heads, fused experts (`backends.torch_plan`)."""
    from keras_tensor_parallel.backends.torch_plan import plan_torch

    return plan_torch(model, t, overrides=overrides)


def _adam_scalar_bytes() -> int:
    """Adam's variables that are not per-parameter slots (its step
    counter and learning rate), from a fresh Adam built on nothing."""
    import keras

    opt = keras.optimizers.Adam()
    opt.build([])
    return sum(_nbytes(v.value) for v in opt.variables)


def _nbytes(tensor) -> int:
    return int(tensor.numel()) * tensor.element_size()


@dataclasses.dataclass(frozen=True)
class Saved:
    """One storage autograd kept: its bytes and the layers around it,
    innermost first, each as `(layer path, is it an input of that
    layer's call, is it the size of one)` (a copy of an input, as an
    einsum makes)."""

    nbytes: int
    stack: tuple[tuple[str, bool, bool], ...]


@dataclasses.dataclass(frozen=True)
class ActivationPass:
    """Saved tensors of a forward + loss pass on 1 and 2 rows."""

    one: tuple[Saved, ...]
    two: tuple[Saved, ...]
    rows: int  # rows of the global batch

    @classmethod
    def run(cls, model, batch, world_size: int) -> ActivationPass:
        from keras_tensor_parallel.comms import steps

        x, y = batch or (
            steps.example_inputs(model, batch_size=2, seq_len=SEQ_LEN),
            steps.example_targets(model, batch_size=2, seq_len=SEQ_LEN),
        )
        rows = _rows(x) if batch else world_size
        one = saved_tensors(model, _head(x, 1), _head(y, 1))
        two = saved_tensors(model, _head(x, 2), _head(y, 2))
        return cls(tuple(one), tuple(two), rows)

    def bytes_at(self, plan, model, rows: int) -> int:
        """Per-rank activation bytes at `plan`'s size for `rows` rows:
        linear in rows through the 1- and 2-row counts."""
        split = split_layers(plan, model)
        t = plan.world_size
        a1 = sum(_share(s, split, t) for s in self.one)
        a2 = sum(_share(s, split, t) for s in self.two)
        return max(0, a1 + (a2 - a1) * (rows - 1))


def _share(saved: Saved, split: dict[str, str], t: int) -> int:
    """Bytes of `saved` on one rank, by the innermost split layer around
    it: a column layer's own tensors are split, its input whole; a row
    layer's input (or a copy of it) is split, and what it saves after its
    all-reduce whole."""
    for path, is_input, input_sized in saved.stack:
        kind = split.get(path)
        if kind == "column":
            whole = is_input
        elif kind == "row":
            whole = not (is_input or input_sized)
        else:
            whole = kind is not None
        if kind is not None:
            return saved.nbytes if whole else -(-saved.nbytes // t)
    return saved.nbytes


def split_layers(plan, model) -> dict[str, str]:
    """Layers whose work the plan splits, by kind: `"row"` (input split,
    output all-reduced), `"column"` (input replicated, output split; also
    a layer without variables of its own whose variable-holding sublayers
    are all split, as attention around its projections) or `"whole"` (a
    vocab-split lookup: ids in, all-reduced rows out). The model itself
    is never one."""
    owned: dict[str, list] = {}
    for e in plan:
        owned.setdefault(e.layer, []).append(e)
    out = {
        path: _kind({e.role for e in entries if e.is_split})
        for path, entries in owned.items()
        if any(e.is_split for e in entries)
    }
    for layer in model._flatten_layers(include_self=False):
        if layer.path in owned:
            continue
        inner = {
            sub.path
            for sub in layer._flatten_layers(include_self=False)
            if sub.path in owned
        }
        if inner and inner <= set(out):
            out[layer.path] = "column"
    return out


def _kind(roles: set) -> str:
    if roles & {Role.COLUMN, Role.HEADS, Role.EXPERT}:
        return "column"
    return "row" if Role.ROW in roles else "whole"


def saved_tensors(model, x, y) -> list[Saved]:
    """What autograd keeps for backward in `loss(y, model(x))` (training
    mode), each storage once, the model's variables left out; the model's
    non-trainable state is restored after."""
    import torch

    from keras_tensor_parallel.backends.base import Journal

    stack: list[tuple] = []  # (path, input storages, input sizes)
    params = {_ptr(v.value) for v in model.variables}
    seen: dict[int, Saved] = {}

    def pack(tensor):
        key = _ptr(tensor)
        if key not in params and key not in seen:
            size = _nbytes(tensor)
            where = tuple(
                (p, key in ins, size in sizes) for p, ins, sizes in stack[::-1]
            )
            seen[key] = Saved(tensor.untyped_storage().nbytes(), where)
        return tensor

    # Training mode moves state (batch-norm statistics, dropout seeds):
    # put it back, so the model is left as it was.
    state = [
        (v, v.value.detach().clone()) for v in model.non_trainable_variables
    ]
    journal = Journal()
    for layer in model._flatten_layers(include_self=False):
        journal.setattr(layer, "call", _tracked(layer, stack))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x, training=True)
            loss = _loss_fn(y)(y, out)
        del out, loss
    finally:
        journal.undo()
        with torch.no_grad():
            for v, old in state:
                v.value.copy_(old)
    return list(seen.values())


def _tracked(layer, stack):
    import torch
    from keras import tree

    call = layer.call

    def tracked(*args, **kwargs):
        ins = [
            a
            for a in tree.flatten((args, kwargs))
            if isinstance(a, torch.Tensor)
        ]
        stack.append(
            (layer.path, {_ptr(a) for a in ins}, {_nbytes(a) for a in ins})
        )
        try:
            return call(*args, **kwargs)
        finally:
            stack.pop()

    return tracked


def _ptr(tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _loss_fn(y):
    import keras

    loss = autosize.train_loss(y)
    return keras.losses.get(loss) if isinstance(loss, str) else loss


def _rows(x) -> int:
    from keras import tree

    return int(tree.flatten(x)[0].shape[0])


def _head(x, rows: int):
    from keras import tree

    return tree.map_structure(lambda a: a[:rows], x)
