"""The Megatron minimum communication of a plan, counted from the plan.

Without sequence parallelism each row-parallel layer (attention output,
feed-forward output) closes a region: one all-reduce of its output in
forward and one of the region's input gradient in backward (Megatron's g
and f). A vocab-parallel embedding looked up adds one forward all-reduce of
its output. A mixture-of-experts bank counts what the planner states
for its layout (`plan/experts.py`): expert parallel, the all-reduces its
reason gives per token (the bank's output forward; its input gradient
and the routing weights' gradient backward); split inside each expert,
its `[experts, tokens, hidden]` output forward and its input gradient
backward. A replicated weight applied per head inside a block that splits
heads (Qwen3's query/key norms: shape `(head_dim,)`, a sibling of the
heads kernels) gets a partial gradient on each device (its own heads):
one backward all-reduce of its size. Nothing is keyed on model names.
"""

from __future__ import annotations

import dataclasses
import math

from keras_tensor_parallel.plan import Role, ShardingPlan
from keras_tensor_parallel.plan.experts import inside_values, stated_values
from keras_tensor_parallel.plan.plan import dtype_bytes


@dataclasses.dataclass(frozen=True)
class Minimum:
    """Megatron-minimum all-reduces for one step.

    Attributes:
        forward: `(what, bytes)` per forward all-reduce.
        backward: `(what, bytes)` per backward all-reduce.
    """

    forward: tuple[tuple[str, int], ...]
    backward: tuple[tuple[str, int], ...]

    @property
    def train_count(self) -> int:
        return len(self.forward) + len(self.backward)

    @property
    def train_bytes(self) -> int:
        return sum(b for _, b in self.forward + self.backward)

    @property
    def forward_count(self) -> int:
        return len(self.forward)

    @property
    def forward_bytes(self) -> int:
        return sum(b for _, b in self.forward)


def _kernel_out_features(entry) -> int:
    """Output features of a row kernel: the dims after the split ones."""
    dim = entry.split_dim
    # Row kernels split their input (contracted) dims; for a heads-shaped
    # output kernel (heads, head_dim, hidden) the contracted dims lead.
    rest = entry.shape[dim + 1 :]
    if len(entry.shape) == 3 and dim == 0:
        rest = entry.shape[2:]
    return math.prod(rest)


def megatron_minimum(
    plan: ShardingPlan, *, batch_size: int, seq_len: int, lookups: int = 1
) -> Minimum:
    """The minimum all-reduces for one training step of `plan`.

    Args:
        plan: The sharding plan.
        batch_size: Batch size of the step.
        seq_len: Tokens per example (1 for models without a sequence).
        lookups: Times each vocab-parallel embedding is looked up.

    Example:

    ```python
    m = megatron_minimum(plan, batch_size=2, seq_len=16)
    print(m.train_count, m.train_bytes)
    ```
    """
    tokens = batch_size * seq_len
    forward, backward = [], []
    banks = set()
    for e in plan:
        if e.role not in (Role.ROW, Role.VOCAB, Role.EXPERT):
            continue  # a row kernel whichever layer owns it
        nbytes = dtype_bytes(e.dtype)
        stated = stated_values(e.reason) if e.role != Role.VOCAB else None
        if stated is not None:
            if e.layer not in banks:  # one bank: its kernels share a layer
                banks.add(e.layer)
                _expert_parallel(
                    e.layer, stated, tokens * nbytes, forward, backward
                )
        elif e.role == Role.ROW:
            out = _kernel_out_features(e)
            inside = inside_values(e.shape, e.split_dim)
            fwd, bwd = inside if inside else (out, out)
            forward.append((f"{e.layer} output", tokens * fwd * nbytes))
            backward.append(
                (f"{e.layer} region input grad", tokens * bwd * nbytes)
            )
        elif e.role == Role.VOCAB and e.split_dim == 0:
            size = tokens * math.prod(e.shape[1:]) * nbytes
            forward += [(f"{e.layer} lookup", size)] * lookups
    backward += [
        (f"{e.path} grad", math.prod(e.shape) * dtype_bytes(e.dtype))
        for e in _per_head_replicated(plan)
    ]
    return Minimum(tuple(forward), tuple(backward))


def _per_head_replicated(plan: ShardingPlan) -> list:
    """Replicated variables shaped as one head `(head_dim,)` in a layer
    that sits beside split heads kernels (same parent layer) and holds no
    split kernel itself: applied to every head, each device's gradient
    covers its own heads only."""
    parent = {}
    for e in plan:
        if e.role == Role.HEADS and len(e.shape) == 3:
            parent.setdefault(e.layer.rpartition("/")[0], set()).add(
                e.shape[-1:]
            )
    split_layers = {e.layer for e in plan if e.is_split}
    return [
        e
        for e in plan
        if e.role == Role.REPLICATED
        and e.layer not in split_layers
        and tuple(e.shape) in parent.get(e.layer.rpartition("/")[0], ())
    ]


def _expert_parallel(layer, stated, scale, forward, backward) -> None:
    """An expert-parallel bank's all-reduces, `stated` per token."""
    fwd, bwd, routing = stated
    forward.append((f"{layer} output", fwd * scale))
    backward.append((f"{layer} input grad", bwd * scale))
    if routing:
        backward.append((f"{layer} routing weights grad", routing * scale))


# The data axis ---------------------------------------------------------------

DATA_AXIS_FORMULA = (
    "one all-reduce of a replica's gradients per step: sum over trainable "
    "variables of bytes(v) / model if v is split else bytes(v) "
    "(padded shapes)"
)


def data_axis_minimum(
    plan: ShardingPlan, trainable_paths, *, data: int
) -> tuple[tuple[str, int], ...]:
    """`(variable path, bytes)` the data axis must reduce per step: each
    trainable variable's gradient shard once (`DATA_AXIS_FORMULA`);
    nothing when `data` is 1.

    Example:

    ```python
    paths = [v.path for v in tp.trainable_variables]
    sum(b for _, b in data_axis_minimum(tp.plan, paths, data=2))
    ```
    """
    if data <= 1:
        return ()
    wanted = set(trainable_paths)
    return tuple(
        (e.path, e.per_device_bytes(plan.world_size))
        for e in plan
        if e.path in wanted
    )
