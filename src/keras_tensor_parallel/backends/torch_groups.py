"""Model-axis and data-axis process groups for torch (issue 15), and the
data-parallel gradient reduction over the data group, bucketed as DDP does.

Ranks fill a `(data, model)` mesh row-major, as the JAX mesh does: rank
`r` is model position `r % T` of replica `r // T`, so each model-axis group
is `T` adjacent ranks (the fast links) and each data-axis group takes one
rank from every replica. Every rank creates every group, in the same
order (`torch.distributed.new_group` requires it).

The torch engine (`backends/torch.py`) creates them when
`tensor_parallel_size` is below the world size, runs its Megatron
collectives on the model group, and calls `install_data_parallel` on the
wrapper: every rank is fed the same global batch (same seed, same
shuffle) and each train/test step keeps its replica's rows, the loss is
the global batch's (one scalar all-reduce over the data group), and the
gradients are averaged over the data group before the optimizer applies
them. `COUNTS` counts the data-axis all-reduces.
"""

from __future__ import annotations

import dataclasses

DEFAULT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb=25

# Data-axis all-reduces made (eager): gradient buckets and their bytes,
# and the loss scalars (one per train/test step).
COUNTS = {"gradient": 0, "gradient_bytes": 0, "loss": 0}


def reset_counts() -> None:
    for key in COUNTS:
        COUNTS[key] = 0


@dataclasses.dataclass(frozen=True)
class MeshGroups:
    """This rank's groups on a `(data, model)` mesh of processes.

    Attributes:
        data, model: Mesh sizes (replicas, ranks per replica).
        model_group, data_group: The `ProcessGroup`s this rank belongs to.
        model_ranks, data_ranks: Global ranks in each.
        model_rank, data_rank: This rank's position in each.
    """

    data: int
    model: int
    model_group: object
    data_group: object
    model_ranks: tuple[int, ...]
    data_ranks: tuple[int, ...]
    model_rank: int
    data_rank: int


def mesh_ranks(world_size: int, tensor_parallel_size: int) -> dict:
    """`{"model": [[ranks], ...], "data": [[ranks], ...]}`: every group of
    each axis (ranks fill the mesh row-major).

    Raises:
        ValueError: unless `tensor_parallel_size` is a positive divisor of
            `world_size`.

    Example:

    ```python
    mesh_ranks(4, 2)  # {'model': [[0, 1], [2, 3]], 'data': [[0, 2], [1, 3]]}
    ```
    """
    t = tensor_parallel_size
    if isinstance(t, bool) or not isinstance(t, int) or t < 1 or world_size % t:
        raise ValueError(
            "tensor_parallel_size must be a positive divisor of the world "
            f"size ({world_size}). Received: tensor_parallel_size={t!r}"
        )
    data = world_size // t
    model = [list(range(r * t, (r + 1) * t)) for r in range(data)]
    return {"model": model, "data": [list(c) for c in zip(*model)]}


def new_mesh_groups(tensor_parallel_size: int, *, timeout=None) -> MeshGroups:
    """Create the model-axis and data-axis groups of the default process
    group's ranks; call on every rank, after it is initialized.

    Example:

    ```python
    groups = new_mesh_groups(2)  # 4 ranks: data 2 x model 2
    ```
    """
    import datetime

    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    ranks = mesh_ranks(world, tensor_parallel_size)
    kw = {}
    if timeout is not None:
        kw["timeout"] = datetime.timedelta(seconds=timeout)
    mine = {}
    for axis in ("model", "data"):  # every rank, every group, one order
        for members in ranks[axis]:
            group = dist.new_group(members, **kw)
            if rank in members:
                mine[axis] = (group, tuple(members))
    (model_group, model_ranks), (data_group, data_ranks) = (
        mine["model"],
        mine["data"],
    )
    return MeshGroups(
        data=world // tensor_parallel_size,
        model=tensor_parallel_size,
        model_group=model_group,
        data_group=data_group,
        model_ranks=model_ranks,
        data_ranks=data_ranks,
        model_rank=model_ranks.index(rank),
        data_rank=data_ranks.index(rank),
    )


def buckets(tensors, bucket_bytes: int) -> list[list[int]]:
    """Indices of `tensors` grouped in order into buckets of at most
    `bucket_bytes` (a tensor larger than that is a bucket of its own), as
    DDP fills its buckets; one bucket per dtype run."""
    out: list[list[int]] = []
    size, dtype = 0, None
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if not out or t.dtype != dtype or size + nbytes > bucket_bytes:
            out.append([])
            size, dtype = 0, t.dtype
        out[-1].append(i)
        size += nbytes
    return out


def reduce_gradients(
    grads, group, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> int:
    """Average `grads` (torch tensors, in place) over `group`: each bucket
    is flattened into one tensor and all-reduced once, then divided by the
    group's size. Returns the number of all-reduces (buckets).

    Example:

    ```python
    n = reduce_gradients([p.grad for p in params], groups.data_group)
    ```
    """
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    present = [g for g in grads if g is not None]
    size = dist.get_world_size(group)
    calls = 0
    for bucket in buckets(present, bucket_bytes):
        parts = [present[i] for i in bucket]
        flat = _flatten_dense_tensors(parts)
        dist.all_reduce(flat, group=group)
        COUNTS["gradient"] += 1
        COUNTS["gradient_bytes"] += flat.numel() * flat.element_size()
        flat /= size
        for part, reduced in zip(parts, _unflatten_dense_tensors(flat, parts)):
            part.copy_(reduced)
        calls += 1
    return calls


def install_gradient_reduction(
    optimizer, group, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> None:
    """Reduce every gradient over `group` before `optimizer` applies it.

    Keras's torch trainer computes the gradients of this rank's share of
    the batch and calls `optimizer.apply(grads, variables)`; with this,
    each replica applies the data-axis mean, as DDP's hook would. The
    torch engine calls it on `tp.optimizer` with its data group (through
    `install_data_parallel`). `optimizer.tp_reductions` counts the
    all-reduces made.

    Example:

    ```python
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    install_gradient_reduction(model.optimizer, groups.data_group)
    ```
    """
    original = optimizer.apply
    optimizer.tp_reductions = 0
    # Kept for ZeRO-1 (`torch_zero`), which replaces this all-reduce.
    optimizer.__dict__["_tp_unreduced_apply"] = original

    def apply(grads, trainable_variables=None):
        optimizer.tp_reductions += reduce_gradients(
            list(grads), group, bucket_bytes=bucket_bytes
        )
        return original(grads, trainable_variables)

    optimizer.apply = apply


def replica_rows(batch: int, data: int, data_rank: int) -> tuple[int, int]:
    """`(start, stop)`: replica `data_rank`'s rows of a global batch of
    `batch` rows split over `data` replicas (the first ones one larger).

    Raises:
        ValueError: when the batch has fewer rows than replicas.

    Example:

    ```python
    replica_rows(12, 2, 1)  # (6, 12)
    ```
    """
    if batch < data:
        raise ValueError(
            f"A batch must have at least one row per data-parallel replica "
            f"({data}). Received: a batch of {batch} row(s)"
        )
    sizes = [
        batch // data + (1 if i < batch % data else 0) for i in range(data)
    ]
    start = sum(sizes[:data_rank])
    return start, start + sizes[data_rank]


def install_data_parallel(
    model, groups: MeshGroups, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> None:
    """Make `model`'s train and test steps data parallel over
    `groups.data_group`: each keeps its replica's rows of the global batch
    it is fed, the loss it reports (and differentiates) is the global
    batch's, and gradients are averaged over the data group before its
    optimizer applies them (`install_gradient_reduction`, once per
    optimizer). Predict steps run the whole batch on every replica.
    Other compiled metrics are the replica's own.

    Example:

    ```python
    install_data_parallel(tp, groups)  # tp compiled; on every rank
    ```
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not hasattr(optimizer, "tp_reductions"):
        install_gradient_reduction(
            optimizer, groups.data_group, bucket_bytes=bucket_bytes
        )
    if model.__dict__.get("_tp_data_groups") is groups:
        return
    share = {"scale": 1.0}
    train, test, loss = model.train_step, model.test_step, model._compute_loss

    def keep_rows(data):
        import keras

        first = next(t for t in keras.tree.flatten(data) if t is not None)
        batch = int(first.shape[0])
        start, stop = replica_rows(batch, groups.data, groups.data_rank)
        share["scale"] = (stop - start) * groups.data / batch
        return keras.tree.map_structure(
            lambda t: None if t is None else t[start:stop], data
        )

    def compute_loss(*args, **kwargs):
        return _data_mean(loss(*args, **kwargs) * share["scale"], groups)

    model.__dict__["train_step"] = lambda data: train(keep_rows(data))
    model.__dict__["test_step"] = lambda data: test(keep_rows(data))
    model.__dict__["_compute_loss"] = compute_loss
    model.__dict__["_tp_data_groups"] = groups


def _data_mean(local, groups: MeshGroups):
    """The data group's mean of `local` (a scalar) in forward, `local`'s
    own gradient in backward (the gradients are averaged afterwards)."""
    import torch.distributed as dist

    total = local.detach().clone()
    dist.all_reduce(total, group=groups.data_group)
    COUNTS["loss"] += 1
    total /= groups.data
    return local + (total - local.detach())
