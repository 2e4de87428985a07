"""ZeRO stage 1 on the torch engine: optimizer slots split over the data
axis too (Rajbhandari et al., "ZeRO", 2020).

Without it each replica's optimizer keeps slots for its whole model shard
and the data-axis step is one all-reduce of the gradients
(`torch_groups.install_gradient_reduction`). With `zero_stage=1` every
parameter's model shard is cut once more, along its largest dim, into
`data` pieces (the first ones one row larger, as the batch is cut), and
data rank `d` keeps piece `d` as a *slice variable* of its own, with the
parameter's path (a parameter replicated over the model axis is cut
over every rank, `data x model` pieces: model-axis partners compute the
same gradient). The optimizer is built on the slice variables, so each
slot holds `1 / (data x model)` of a replica's. Each step

1. reduce-scatters the gradients over the data group (every rank for
   the replicated ones; DDP-sized buckets: one `reduce_scatter_single`
   each, summed then divided by the group's size), so each rank
   receives the data-axis mean of its pieces only;
2. copies each parameter's piece into its slice variable (so weights set
   since, by `set_weights` or a checkpoint, are what the step updates)
   and runs the optimizer's own `apply` on the slices;
3. all-gathers the updated pieces over the same groups (one
   `all_gather_single` per bucket) back into the parameters.

A ring reduce-scatter plus all-gather sends the bytes of one all-reduce.
Only elementwise optimizers are exact on pieces (`ELEMENTWISE`); clipping
by norm and EMA are refused. A parameter with no dim of `data` rows keeps
its whole slots (its gradient is all-reduced as without ZeRO).
"""

from __future__ import annotations

import dataclasses

from keras_tensor_parallel.backends import torch_groups as tg

ELEMENTWISE = frozenset(
    {"Adadelta", "Adagrad", "Adam", "Adamax", "AdamW", "Lion", "Nadam"}
    | {"RMSprop", "SGD"}
)

# Data-axis collectives of the ZeRO step (eager): calls, and bytes of the
# full (all ranks') flat tensor of each.
COUNTS = {
    "reduce_scatter": 0,
    "reduce_scatter_bytes": 0,
    "all_gather": 0,
    "all_gather_bytes": 0,
}


def reset_counts() -> None:
    for key in COUNTS:
        COUNTS[key] = 0


def zero_dim(shape, data: int) -> int | None:
    """The dim a shard of `shape` is cut along over `data` replicas: the
    largest (the first of equal ones) with at least `data` rows, or None.

    Example:

    ```python
    zero_dim((64, 128), 2)  # 1
    ```
    """
    best = None
    for d, n in enumerate(shape):
        if n >= data and (best is None or n > shape[best]):
            best = d
    return best


@dataclasses.dataclass(frozen=True)
class _Axis:
    """Ranks a parameter's pieces are spread over: `group` (None: every
    rank), its size and this rank's index in it."""

    group: object
    size: int
    index: int


@dataclasses.dataclass
class _Entry:
    """One parameter: its slice variable (the parameter itself when it is
    not cut), the dim it is cut along, over which ranks, and each one's
    rows."""

    param: object
    slice: object
    dim: int | None
    axis: _Axis | None
    rows: list  # [(start, stop)] per index of `axis`
    full: tuple  # the parameter's global shape
    offsets: list  # this rank's slice's global offset per dim


def _global_place(param) -> tuple[tuple, list]:
    """`(global shape, offsets)` of this rank's model shard of `param`."""
    from keras_tensor_parallel.backends import torch_roles as roles

    shape = tuple(param.value.shape)
    if not roles.is_split(param):
        return shape, [0] * len(shape)
    offsets = [0] * len(shape)
    offsets[param._tp_dim] = param._tp_start
    return tuple(param._tp_full_shape), offsets


def _axes_for(param, groups) -> list[_Axis]:
    """Where `param`'s pieces may go, best first: a split parameter's
    model shard over the data group; a replicated one over every rank
    (model-axis partners compute the same gradient), else the data group."""
    import torch.distributed as dist

    data = _Axis(groups.data_group, groups.data, groups.data_rank)
    world = _Axis(None, dist.get_world_size(), dist.get_rank())
    split = tuple(_global_place(param)[0]) != tuple(param.value.shape)
    return [data] if split or groups.model == 1 else [world, data]


def _entry(param, groups) -> _Entry:
    import keras

    shape = tuple(param.value.shape)
    full, offsets = _global_place(param)
    for axis in _axes_for(param, groups):
        d = zero_dim(shape, axis.size)
        if d is not None:
            break
    else:
        return _Entry(param, param, None, None, [], full, offsets)
    rows = [tg.replica_rows(shape[d], axis.size, r) for r in range(axis.size)]
    start, stop = rows[axis.index]
    local = param.value.detach().narrow(d, start, stop - start).clone()
    piece = keras.Variable(local, dtype=param.dtype, name=param.name)
    piece._path = param.path  # its slots are named after the parameter
    offsets[d] += start
    return _Entry(param, piece, d, axis, rows, full, offsets)


class ZeroState:
    """The slice variables of one optimizer, and its ZeRO step."""

    def __init__(self, groups, bucket_bytes: int):
        self.groups = groups
        self.bucket_bytes = bucket_bytes
        self.entries: dict[int, _Entry] = {}
        self.params: list = []  # the parameters of the last step

    def slices(self, params) -> list:
        for p in params:
            if id(p) not in self.entries:
                self.entries[id(p)] = _entry(p, self.groups)
        return [self.entries[id(p)].slice for p in params]

    def slot_place(self, slot) -> tuple | None:
        """`(global shape, offsets, group)` of a slot made from a cut
        piece: the group whose pieces tile the whole parameter."""
        from keras_tensor_parallel.backends import base

        cut = [e for e in self.entries.values() if e.dim is not None]
        owner = base.slot_owner(slot, [e.slice for e in cut])
        for e in cut:
            if e.slice is owner and tuple(slot.shape) == tuple(owner.shape):
                split = tuple(e.full) != tuple(e.param.value.shape)
                group = None if split else e.axis.group
                return e.full, list(e.offsets), group
        return None

    def step(self, apply, grads, params) -> None:
        """Reduce-scatter, `apply` on the slices, all-gather."""
        import torch

        entries = [self.entries[id(p)] for p in params]
        grads = list(grads)
        whole = [i for i, e in enumerate(entries) if e.dim is None]
        tg.reduce_gradients(
            [grads[i] for i in whole],
            self.groups.data_group,
            bucket_bytes=self.bucket_bytes,
        )
        buckets = []
        # In the parameters' order: the same collectives, in the same
        # order, on every rank (a set's order would differ).
        axes = [e.axis for e in entries if e.axis is not None]
        for axis in dict.fromkeys(axes):
            cut = [
                i
                for i, e in enumerate(entries)
                if e.axis == axis and grads[i] is not None
            ]
            sizes = tg.buckets([grads[i] for i in cut], self.bucket_bytes)
            buckets += [(axis, [cut[j] for j in b]) for b in sizes]
        for axis, bucket in buckets:
            got = self._reduce_scatter(entries, grads, axis, bucket)
            for i, g in zip(bucket, got):
                grads[i] = g
        with torch.no_grad():
            for e in entries:
                if e.dim is not None:
                    start, stop = e.rows[e.axis.index]
                    piece = e.param.value.narrow(e.dim, start, stop - start)
                    e.slice.value.copy_(piece)
        apply(grads, [e.slice for e in entries])
        with torch.no_grad():
            for axis, bucket in buckets:
                self._all_gather(entries, axis, bucket)

    @staticmethod
    def _segments(entries, axis, bucket, tensor_of):
        """Each rank's pieces of the bucket's tensors, flattened."""
        out = []
        for r in range(axis.size):
            parts = []
            for i in bucket:
                e = entries[i]
                start, stop = e.rows[r]
                t = tensor_of(i).narrow(e.dim, start, stop - start)
                parts.append(t.reshape(-1))
            out.append(parts)
        return out

    def _reduce_scatter(self, entries, grads, axis, bucket) -> list:
        import torch
        import torch.distributed as dist

        segs = self._segments(entries, axis, bucket, lambda i: grads[i])
        width = max(sum(p.numel() for p in s) for s in segs)
        flat = grads[bucket[0]].new_zeros(axis.size * width)
        for r, parts in enumerate(segs):
            joined = torch.cat(parts)
            flat[r * width : r * width + joined.numel()] = joined
        mine = flat.new_empty(width)
        # torch 2.13 renamed reduce_scatter_tensor (now deprecated).
        scatter = getattr(dist, "reduce_scatter_single", None)
        (scatter or dist.reduce_scatter_tensor)(mine, flat, group=axis.group)
        COUNTS["reduce_scatter"] += 1
        COUNTS["reduce_scatter_bytes"] += flat.numel() * flat.element_size()
        # Over every rank each gradient is summed `model` times: the mean
        # over all of them is still the data-axis mean.
        mine /= axis.size
        out, at = [], 0
        for i, part in zip(bucket, segs[axis.index]):
            shape = entries[i].slice.value.shape
            out.append(mine[at : at + part.numel()].reshape(shape))
            at += part.numel()
        return out

    def _all_gather(self, entries, axis, bucket) -> None:
        import torch
        import torch.distributed as dist

        mine = torch.cat([entries[i].slice.value.reshape(-1) for i in bucket])
        segs = self._segments(
            entries, axis, bucket, lambda i: entries[i].param.value
        )
        width = max(sum(p.numel() for p in s) for s in segs)
        padded = mine.new_zeros(width)
        padded[: mine.numel()] = mine
        flat = mine.new_empty(axis.size * width)
        gather = getattr(dist, "all_gather_single", None)
        (gather or dist.all_gather_into_tensor)(flat, padded, group=axis.group)
        COUNTS["all_gather"] += 1
        COUNTS["all_gather_bytes"] += flat.numel() * flat.element_size()
        at = [r * width for r in range(axis.size)]
        for i in bucket:
            e = entries[i]
            pieces = []
            for r, part in enumerate(segs):
                n = part[bucket.index(i)].numel()
                shape = list(e.param.value.shape)
                shape[e.dim] = e.rows[r][1] - e.rows[r][0]
                pieces.append(flat[at[r] : at[r] + n].reshape(shape))
                at[r] += n
            e.param.value.copy_(torch.cat(pieces, dim=e.dim))


def check_optimizer(optimizer) -> None:
    """Refuse what pieces of a parameter cannot update exactly.

    Raises:
        ValueError: for a non-elementwise optimizer, clipnorm or
            global_clipnorm, EMA, or an optimizer already built.
    """
    name = type(optimizer).__name__
    if name not in ELEMENTWISE:
        raise ValueError(
            "zero_stage=1 on torch needs an elementwise optimizer "
            f"({', '.join(sorted(ELEMENTWISE))}). Received: {name}"
        )
    for option in ("clipnorm", "global_clipnorm", "use_ema"):
        if getattr(optimizer, option, None):
            raise ValueError(
                f"zero_stage=1 on torch does not support {option} (norms "
                "and averages over pieces of a parameter). Received: "
                f"{option}={getattr(optimizer, option)!r}"
            )
    if optimizer.built:
        raise ValueError(
            "zero_stage=1 on torch builds the optimizer on the data-axis "
            "pieces; compile with a fresh optimizer. Received: an optimizer "
            "already built"
        )


def shard_optimizer_state(tp_model) -> ZeroState | None:
    """Install ZeRO-1 on `tp_model`'s optimizer before it is built (once;
    a no-op without a data axis); on every rank. Returns its state.

    Example:

    ```python
    tp = TensorParallelKeras(model, world_size=4, tensor_parallel_size=2,
                             distributed_backend="torch", zero_stage=1)
    tp.compile(optimizer="adam", loss="mse")
    shard_optimizer_state(tp)  # fit does it
    ```
    """
    optimizer = getattr(tp_model, "optimizer", None)
    groups = tp_model.engine.groups
    if optimizer is None or groups is None:
        return None
    state = optimizer.__dict__.get("_tp_zero")
    if state is not None:
        return state
    check_optimizer(optimizer)
    state = ZeroState(groups, tg.DEFAULT_BUCKET_BYTES)
    build = optimizer.build
    # The optimizer's own apply, under the data-axis all-reduce if
    # `install_data_parallel` already put one on it.
    apply = optimizer.__dict__.get("_tp_unreduced_apply", optimizer.apply)

    def zero_build(variables):
        return build(state.slices(list(variables)))

    def zero_apply(grads, trainable_variables=None):
        if trainable_variables is None:
            trainable_variables = state.params
        params = state.params = list(trainable_variables)
        if not optimizer.built:
            zero_build(params)
        state.step(apply, grads, params)

    # Through __dict__: Keras tracks what is assigned to an optimizer.
    optimizer.__dict__.update(
        _tp_zero=state, build=zero_build, apply=zero_apply, tp_reductions=0
    )
    return state


def slot_place(optimizer, slot) -> tuple | None:
    """`(global shape, offsets, process group)` of `slot` if ZeRO cut
    it, else None."""
    state = optimizer.__dict__.get("_tp_zero") if optimizer else None
    return None if state is None else state.slot_place(slot)
