"""Torch collectives for the engine: the process group, Megatron's f and g,
and gathers along a dim with uneven shard sizes.

`f` and `g` are our own autograd functions:
`torch.distributed.nn.functional.all_reduce` all-reduces in backward too
and would double the gradients. Each collective takes an optional `group`
(a `ProcessGroup`; None: the default group, every rank): with data
parallelism the engine passes its model-axis group (`torch_groups.py`).
"""

from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist

from keras_tensor_parallel.backends import base

# Collectives issued by f, g and the vocab gather, for accounting in tests
# and benchmarks: {"forward": all-reduces in forward, "backward": ...}.
COUNTS = {"forward": 0, "backward": 0, "gather": 0}
# Sequence-parallel edges (`torch_sequence.py`): all-gathers and
# reduce-scatters along the sequence, and the all-reduces of replicated
# parameters' partial gradients.
SEQ_COUNTS = {"all_gather": 0, "reduce_scatter": 0, "param_all_reduce": 0}
# Ring bytes sent per rank by the activation collectives above (f, g, the
# vocab gather and the sequence edges): an all-reduce of B bytes sends
# 2(N-1)/N B, an all-gather or reduce-scatter (N-1)/N of the full tensor;
# "params" holds the replicated parameters' gradient all-reduces.
RING = {"all-reduce": 0.0, "all-gather": 0.0, "reduce-scatter": 0.0}
RING["params"] = 0.0


def reset_counts() -> None:
    for counts in (COUNTS, SEQ_COUNTS, RING):
        for key in counts:
            counts[key] = 0


def _seq_count(key: str) -> None:
    if not torch.compiler.is_compiling():  # as `_count`
        SEQ_COUNTS[key] += 1


def _ring(kind: str, full, group, factor: float = 1.0) -> None:
    """Add the ring bytes of one collective on the full tensor `full`."""
    if torch.compiler.is_compiling():
        return
    n = dist.get_world_size(group)
    size = full.numel() * full.element_size()
    RING[kind] += factor * size * (n - 1) / n


def _count(key: str) -> None:
    # Not under torch.compile: dynamo would guard on the counter's value
    # (a recompile every step) and cannot mutate it inside an autograd
    # Function (a graph break). Compiled steps are not counted.
    if not torch.compiler.is_compiling():
        COUNTS[key] += 1


# Process group ---------------------------------------------------------------


def ensure_process_group(timeout_s: float | None = None) -> bool:
    """Initialize the default process group from torchrun's environment.

    Uses gloo on CPU and nccl on GPU; does nothing when already initialized
    or when `WORLD_SIZE` is unset (a plain `python` process: one rank, no
    group). Returns whether a group is initialized.

    Example:

    ```python
    ensure_process_group()  # under `keras-tp launch -n 2 script.py`
    ```
    """
    if dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ:
        return False
    timeout_s = timeout_s or float(os.environ.get("KERAS_TP_TIMEOUT", 120))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(
        backend, timeout=datetime.timedelta(seconds=timeout_s)
    )
    atexit.register(close_process_group)
    return True


def close_process_group() -> None:
    """Destroy the default process group, if one is initialized.

    Registered at exit by `ensure_process_group`: a gloo group left to the
    interpreter's finalization has worker threads still joinable when
    their C++ objects are destroyed, which aborts the process ("terminate
    called without an active exception") after a run that succeeded.
    """
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _symbolic(x) -> bool:
    return x.device.type == "meta"


# f, g and the vocab gather ---------------------------------------------------


class _F(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        _count("backward")
        _ring("all-reduce", grad, ctx.group, 2.0)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _G(torch.autograd.Function):
    """All-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        _count("forward")
        _ring("all-reduce", out, group, 2.0)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLast(torch.autograd.Function):
    """All-gather along the last dim (uneven sizes); backward: local slice."""

    @staticmethod
    def forward(ctx, x, sizes, index, group):
        ctx.start = sum(sizes[:index])
        ctx.stop = ctx.start + sizes[index]
        width = max(sizes)
        pad = width - x.shape[-1]
        padded = torch.nn.functional.pad(x.contiguous(), (0, pad))
        parts = [torch.empty_like(padded) for _ in sizes]
        _count("gather")
        dist.all_gather(parts, padded, group=group)
        out = torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)
        _ring("all-gather", out, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.start : ctx.stop].contiguous(), None, None, None


def f(x, group=None):
    """Megatron's f: enter a parallel region (identity forward)."""
    return x if _symbolic(x) else _F.apply(x, group)


def g(x, group=None):
    """Megatron's g: leave a parallel region (all-reduce forward)."""
    return x if _symbolic(x) else _G.apply(x, group)


def gather_last(x, sizes: list[int], index: int, group=None):
    """All-gather `x` along its last dim; this rank's part is `index`."""
    return _GatherLast.apply(x, list(sizes), index, group)


# Sequence parallelism: the f/g pair along the sequence --------------------


def _gather_seq(x, dim: int, group):
    """All-gather equal chunks of `x` along `dim`, in rank order."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    out = torch.cat(parts, dim=dim)
    _seq_count("all_gather")
    _ring("all-gather", out, group)
    return out


def _scatter_seq(x, dim: int, group):
    """Reduce-scatter `x` along `dim`: this rank's chunk of the sum."""
    n = dist.get_world_size(group)
    parts = [p.contiguous() for p in torch.chunk(x, n, dim=dim)]
    out = torch.empty_like(parts[0])
    _seq_count("reduce_scatter")
    _ring("reduce-scatter", x, group)
    dist.reduce_scatter(out, parts, group=group)
    return out


class _SeqGather(torch.autograd.Function):
    """Sequence-parallel f: all-gather along `dim` forward, reduce-scatter
    of the gradient backward (the sum of every rank's partial input
    gradient, this rank's chunk)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather_seq(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _scatter_seq(grad, ctx.dim, ctx.group), None, None


class _SeqScatter(torch.autograd.Function):
    """Sequence-parallel g: reduce-scatter along `dim` forward (partial
    sums in, this rank's chunk of the sum out), all-gather backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _scatter_seq(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.dim, ctx.group), None, None


class _SeqCollect(torch.autograd.Function):
    """The whole sequence back from its chunks (all-gather forward); every
    rank's gradient of it is the same, so backward takes the local chunk."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.size = dim, x.shape[dim]
        ctx.index = dist.get_rank(group)
        return _gather_seq(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        local = grad.narrow(ctx.dim, ctx.index * ctx.size, ctx.size)
        return local.contiguous(), None, None


def gather_seq(x, dim: int = 1, group=None):
    """Enter a region with the sequence split: all-gather along `dim`
    (backward: reduce-scatter)."""
    return x if _symbolic(x) else _SeqGather.apply(x, dim, group)


def scatter_seq(x, dim: int = 1, group=None):
    """Leave a region with the sequence split: reduce-scatter along `dim`
    (backward: all-gather)."""
    return x if _symbolic(x) else _SeqScatter.apply(x, dim, group)


def collect_seq(x, dim: int = 1, group=None):
    """The whole sequence from its chunks for what needs all of it (the
    model's output, for the loss); backward keeps the local chunk."""
    return x if _symbolic(x) else _SeqCollect.apply(x, dim, group)


def reduce_param_grad(grad, group=None):
    """Sum a replicated parameter's partial gradient over `group` (each
    rank saw only its chunk of the sequence)."""
    grad = grad.contiguous().clone()
    _seq_count("param_all_reduce")
    _ring("params", grad, group, 2.0)
    dist.all_reduce(grad, group=group)
    return grad


# Shard arithmetic ------------------------------------------------------------


def shard_sizes(n: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous chunks of `n` (first ones one larger)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def gather_dim(local, dim: int, sizes: list[int], group=None):
    """All-gather `local` along `dim` from every rank of `group` (uneven
    sizes)."""
    local = torch.as_tensor(local).contiguous()
    width = max(sizes)
    shape = list(local.shape)
    shape[dim] = width
    padded = torch.zeros(shape, dtype=local.dtype, device=local.device)
    padded.narrow(dim, 0, local.shape[dim]).copy_(local)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)


def first_error(error: BaseException | None) -> BaseException | None:
    """The error of the first rank that failed, on every rank (a
    collective): lets a step that failed on one rank fail on all of them,
    in step, instead of leaving the others waiting in a collective.

    Returns None when no rank failed; this rank's own `error` when it
    failed; else an error of the same built-in type (RuntimeError for
    others) whose message names the failing rank and its message.
    """
    if world_size() == 1:
        return error
    mine = None if error is None else (type(error).__name__, str(error))
    every: list = [None] * world_size()
    dist.all_gather_object(every, mine)
    for r, found in enumerate(every):
        if found is not None:
            return error or base.rank_error(*found, rank=r)
    return None
