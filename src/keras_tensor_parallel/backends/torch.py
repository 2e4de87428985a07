"""Torch engine: one process per device, local shards, f/g collectives.

Keras 3.15 has no model-parallel distribution for torch, so this engine
does Megatron-LM by hand. Every rank keeps only its local shard of each
split variable as an ordinary `torch.nn.Parameter` (so Keras's trainer,
optimizers, metrics and callbacks see plain variables, and optimizer slots
are sized from the local shard), and the call of each layer that owns split
variables is replaced by its parallel form:

- column / heads: `f(x)` before the matmul (identity forward, all-reduce of
  the input gradient backward); the output stays local.
- row: local matmul, then `g` (all-reduce forward, identity backward); the
  replicated bias is added once after the reduce.
- vocab: masked lookup of the local rows, then `g`; the tied reverse head
  computes local logits and all-gathers them along the vocab dim.

`f` and `g` are our own autograd functions:
`torch.distributed.nn.functional.all_reduce` all-reduces in backward too
and would double the gradients.

Every rank must see the same batch: `prepare_state` broadcasts a seed from
rank 0 and seeds Keras with it (same shuffling, same dropout), and only
rank 0 prints progress. Split variables read as full arrays (`numpy()`,
`get_weights()`, saving all-gather them; every rank must take part) and
accept full arrays in `assign()`.

`compile(..., jit_compile=True)` (torch.compile, inductor) traces f and g
into the compiled graphs (no eager fallback for them; the tied reverse
head's gather is untested there); `COUNTS` only counts eager calls.
Compiling is slow on CPU (tiny OPT: about 140 s on 2 shared cores).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import sys
import tempfile

import keras
import numpy as np
import torch
import torch.distributed as dist

from keras_tensor_parallel.plan import Role, ShardingPlan

BACKEND = "torch"

# Collectives issued by f, g and the vocab gather, for accounting in tests
# and benchmarks: {"forward": all-reduces in forward, "backward": ...}.
COUNTS = {"forward": 0, "backward": 0, "gather": 0}


def reset_counts() -> None:
    for key in COUNTS:
        COUNTS[key] = 0


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
    or when `WORLD_SIZE` is unset. Returns whether a group is initialized.
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
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _symbolic(x) -> bool:
    return x.device.type == "meta"


# f, g and the vocab gather ---------------------------------------------------


class _F(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        _count("backward")
        dist.all_reduce(grad)
        return grad


class _G(torch.autograd.Function):
    """All-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        out = x.contiguous().clone()
        _count("forward")
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GatherLast(torch.autograd.Function):
    """All-gather along the last dim (uneven sizes); backward: local slice."""

    @staticmethod
    def forward(ctx, x, sizes, index):
        ctx.start = sum(sizes[:index])
        ctx.stop = ctx.start + sizes[index]
        width = max(sizes)
        pad = width - x.shape[-1]
        padded = torch.nn.functional.pad(x.contiguous(), (0, pad))
        parts = [torch.empty_like(padded) for _ in sizes]
        _count("gather")
        dist.all_gather(parts, padded)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.start : ctx.stop].contiguous(), None, None


def f(x):
    return x if _symbolic(x) else _F.apply(x)


def g(x):
    return x if _symbolic(x) else _G.apply(x)


# Shard arithmetic ------------------------------------------------------------


def shard_sizes(n: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous chunks of `n` (first ones one larger)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def gather_dim(local, dim: int, sizes: list[int]):
    """All-gather `local` along `dim` from every rank (uneven sizes)."""
    local = torch.as_tensor(local).contiguous()
    width = max(sizes)
    shape = list(local.shape)
    shape[dim] = width
    padded = torch.zeros(shape, dtype=local.dtype, device=local.device)
    padded.narrow(dim, 0, local.shape[dim]).copy_(local)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)


# Split variables -------------------------------------------------------------


class _SplitMixin:
    """A variable holding its local shard; reads and assigns full arrays."""

    _tp_full_shape: tuple
    _tp_dim: int
    _tp_sizes: list
    _tp_start: int
    _tp_stop: int

    def numpy(self):
        full = gather_dim(self.value.detach(), self._tp_dim, self._tp_sizes)
        return full.cpu().numpy()

    def __array__(self, dtype=None):
        out = self.numpy()
        return out.astype(dtype) if dtype is not None else out

    def local_slice(self, value):
        """The local part of a full-shape `value`."""
        index = [slice(None)] * len(self._tp_full_shape)
        index[self._tp_dim] = slice(self._tp_start, self._tp_stop)
        return value[tuple(index)]

    def assign(self, value):
        shape = tuple(getattr(value, "shape", np.shape(value)))
        if shape == tuple(self._tp_full_shape):
            value = self.local_slice(value)
        return super().assign(value)


_SPLIT_CLASSES: dict[type, type] = {}


def _split_class(cls: type) -> type:
    if cls not in _SPLIT_CLASSES:
        _SPLIT_CLASSES[cls] = type(
            f"Split{cls.__name__}", (_SplitMixin, cls), {}
        )
    return _SPLIT_CLASSES[cls]


def _set_value(variable, value) -> None:
    variable._shape = tuple(value.shape)
    variable._value = None
    variable._initialize(value)


def split_variable(variable, dim: int, rank_: int, size: int) -> None:
    """Keep only this rank's shard of `variable` along `dim`, in place."""
    full = variable.value.detach()
    sizes = shard_sizes(full.shape[dim], size)
    start = sum(sizes[:rank_])
    local = full.narrow(dim, start, sizes[rank_]).clone()
    variable._tp_full_shape = tuple(full.shape)
    variable._tp_dim = dim
    variable._tp_sizes = sizes
    variable._tp_start = start
    variable._tp_stop = start + sizes[rank_]
    variable.__class__ = _split_class(type(variable))
    _set_value(variable, local)


def unsplit_variable(variable, full) -> None:
    """Undo `split_variable` given the saved full value (roll back)."""
    variable.__class__ = type(variable).__mro__[2]
    for name in ("full_shape", "dim", "sizes", "start", "stop"):
        variable.__dict__.pop(f"_tp_{name}", None)
    _set_value(variable, full)


# Parallel layer calls --------------------------------------------------------


class _FCache:
    """One f per input tensor: q, k and v of one attention share it, so
    the backward all-reduce happens once per block, not three times."""

    def __init__(self):
        self.key = None
        self.value = None

    def __call__(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        if self.key is not x:
            self.key, self.value = x, f(x)
        return self.value

    def clear(self):
        self.key = self.value = None


def _column_call(layer, cache: _FCache):
    original = layer.call

    def call(inputs, *args, **kwargs):
        return original(cache(inputs), *args, **kwargs)

    return call


def _row_call(layer, cache: _FCache):
    """Local matmul, g, then the replicated bias once, then activation."""
    cls = type(layer).__name__
    if cls not in ("Dense", "EinsumDense"):
        raise ValueError(
            f"No row-parallel form for layer class {cls} ({layer.path}). "
            "Received: a split kernel on its input dim"
        )

    def call(inputs, *args, **kwargs):
        cache.clear()
        kernel = layer.kernel
        if cls == "Dense":
            x = keras.ops.matmul(inputs, kernel)
        else:
            x = keras.ops.einsum(layer.equation, inputs, kernel)
        x = g(x)
        if layer.bias is not None:
            x = keras.ops.add(x, layer.bias)
        if layer.activation is not None:
            x = layer.activation(x)
        return x

    return call


def _vocab_call(layer, rank_: int, size: int):
    """Masked lookup of local rows then g; reverse: local logits, gather."""
    table = layer.embeddings
    sizes = table._tp_sizes
    start, stop = table._tp_start, table._tp_stop

    def call(inputs, *args, **kwargs):
        reverse = kwargs.pop("reverse", args[0] if args else False)
        if reverse:
            return _reverse(layer, inputs, sizes, rank_)
        ids = keras.ops.convert_to_tensor(inputs).long()
        inside = (ids >= start) & (ids < stop)
        local = torch.where(inside, ids - start, torch.zeros_like(ids))
        out = keras.ops.take(layer.embeddings, local, axis=0)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return keras.ops.cast(g(out), layer.compute_dtype)

    return call


def _reverse(layer, inputs, sizes, rank_):
    """Local logits for this rank's vocab rows, then gathered along vocab.

    Tied: the transposed local table. Untied: `reverse_embeddings`
    (hidden, vocab), split on its vocab dim with its own shard sizes.
    """
    x = f(inputs)
    if getattr(layer, "tie_weights", True):
        kernel = keras.ops.transpose(layer.embeddings)
    else:
        kernel = layer.reverse_embeddings
        sizes = kernel._tp_sizes
    reverse_dtype = getattr(layer, "reverse_dtype", None)
    if reverse_dtype is not None:
        x = keras.ops.cast(x, reverse_dtype)
        kernel = keras.ops.cast(kernel, reverse_dtype)
    logits = keras.ops.matmul(x, kernel)
    logits = _GatherLast.apply(logits, list(sizes), rank_)
    cap = getattr(layer, "logit_soft_cap", None)
    if cap is not None:
        logits = keras.ops.multiply(keras.ops.tanh(logits / cap), cap)
    return logits


def _layer_kind(entries) -> str:
    roles = {e.role for e in entries if e.is_split}
    if Role.VOCAB in roles:
        return "vocab"
    if Role.ROW in roles:
        return "row"
    return "column"


# Clipping ------------------------------------------------------------------


def _is_split(v) -> bool:
    return isinstance(v, _SplitMixin)


def _sq_norm(grads, variables, split: bool):
    total = torch.zeros((), dtype=torch.float32)
    for gr, v in zip(grads, variables):
        if gr is not None and _is_split(v) == split:
            total = total + torch.sum(gr.float() ** 2).cpu()
    return total


def install_clipping(optimizer) -> None:
    """Make clipnorm/global_clipnorm use full (all-reduced) norms."""
    if getattr(optimizer, "_tp_clipping", False):
        return
    apply = optimizer._backend_apply_gradients
    clip = optimizer._clip_gradients
    # The variables of the current update live in this closure, NOT in an
    # optimizer attribute: Keras tracks a list of variables assigned to a
    # tracked object, so the model's variables would be listed again in
    # `optimizer.variables` (and saved with the optimizer state).
    current: dict = {"variables": None}

    def tp_apply(grads, trainable_variables):
        # Called after empty gradients were filtered: the lists align.
        current["variables"] = list(trainable_variables)
        try:
            return apply(grads, trainable_variables)
        finally:
            current["variables"] = None

    def tp_clip(grads):
        variables = current["variables"]
        if not variables or len(variables) != len(grads):
            return clip(grads)
        if optimizer.clipnorm and optimizer.clipnorm > 0:
            return [
                _clip_one(gr, v, optimizer.clipnorm)
                for gr, v in zip(grads, variables)
            ]
        if optimizer.global_clipnorm and optimizer.global_clipnorm > 0:
            split = _sq_norm(grads, variables, True)
            dist.all_reduce(split)
            norm = torch.sqrt(split + _sq_norm(grads, variables, False))
            scale = optimizer.global_clipnorm / torch.clamp(
                norm, min=optimizer.global_clipnorm
            )
            return [
                None if gr is None else gr * scale.to(gr.device, gr.dtype)
                for gr in grads
            ]
        return clip(grads)

    optimizer._backend_apply_gradients = tp_apply
    optimizer._clip_gradients = tp_clip
    optimizer._tp_clipping = True


def _clip_one(grad, variable, clipnorm):
    if grad is None:
        return None
    sq = torch.sum(grad.float() ** 2).cpu()
    if _is_split(variable):
        dist.all_reduce(sq)
    norm = torch.sqrt(sq)
    scale = clipnorm / torch.clamp(norm, min=clipnorm)
    return grad * scale.to(grad.device, grad.dtype)


# Engine ----------------------------------------------------------------------


class TorchEngine:
    """Applies a plan across the ranks of the default process group.

    Args:
        plan: The sharding plan; `plan.world_size` must equal the number of
            ranks.
        device_ids: One id per rank (`devices.available_devices()`).
    """

    name = BACKEND

    def __init__(self, plan: ShardingPlan, device_ids: list[str]):
        ensure_process_group()
        if world_size() != plan.world_size:
            raise ValueError(
                f"The torch engine runs one process per device: start "
                f"{plan.world_size} processes (`keras-tp launch -n "
                f"{plan.world_size} script.py` or torchrun). Received: "
                f"{world_size()} process(es)"
            )
        self.plan = plan
        self.device_ids = list(device_ids)
        self.rank = rank()
        self._cache = _FCache()

    def apply(self, model) -> None:
        """Split every planned variable and swap in parallel layer calls;
        roll back on failure."""
        variables = list(model.variables)
        if len(variables) != len(self.plan.variables):
            raise ValueError(
                "The plan does not belong to this model: it lists "
                f"{len(self.plan.variables)} variables, the model has "
                f"{len(variables)}."
            )
        layers = {
            layer.path: layer
            for layer in model._flatten_layers(include_self=True)
        }
        saved, calls = [], []
        try:
            for v, entry in zip(variables, self.plan.variables):
                if v.path != entry.path or tuple(v.shape) != entry.shape:
                    raise ValueError(
                        f"Plan entry {entry.path} {entry.shape} does not "
                        f"match variable {v.path} {tuple(v.shape)}."
                    )
                if entry.is_split:
                    saved.append((v, v.value.detach().clone()))
                    split_variable(
                        v, entry.split_dim, self.rank, self.plan.world_size
                    )
            for path, entries in self._split_layers().items():
                layer = layers.get(path)
                if layer is None:
                    raise ValueError(f"Plan names unknown layer {path!r}.")
                calls.append(
                    (layer, layer.__dict__.get("call"), layer.input_spec)
                )
                layer.call = self._parallel_call(layer, entries)
                # Row layers see local features: Dense's input spec (full
                # width) would reject them.
                if _layer_kind(entries) == "row":
                    layer.input_spec = None
            _retrack(model)
            _check_runs(model)
        except Exception:
            for layer, call, spec in calls:
                layer.input_spec = spec
                if call is None:
                    layer.__dict__.pop("call", None)
                else:
                    layer.call = call
            for v, full in saved:
                unsplit_variable(v, full)
            _retrack(model)
            raise

    def _split_layers(self) -> dict:
        out: dict = {}
        for entry in self.plan:
            if entry.is_split:
                out.setdefault(entry.layer, []).append(entry)
        return out

    def _parallel_call(self, layer, entries):
        kind = _layer_kind(entries)
        if kind == "vocab":
            return _vocab_call(layer, self.rank, self.plan.world_size)
        if kind == "row":
            return _row_call(layer, self._cache)
        return _column_call(layer, self._cache)

    @contextlib.contextmanager
    def scope(self):
        """Only rank 0 prints."""
        if self.rank == 0:
            yield
            return
        with contextlib.redirect_stdout(io.StringIO()):
            yield

    def prepare_state(self, tp_model) -> None:
        """Same seed on every rank (same batches, same dropout); clipping
        with full norms."""
        seed = torch.randint(0, 2**31 - 1, (1,))
        dist.broadcast(seed, src=0)
        keras.utils.set_random_seed(int(seed))
        optimizer = getattr(tp_model, "optimizer", None)
        if optimizer is not None:
            install_clipping(optimizer)

    def save_model(self, model, filepath, *args, **kwargs):
        """Every rank gathers; only rank 0 writes `filepath`."""
        if self.rank == 0:
            model.save(filepath, *args, **kwargs)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                name = os.path.basename(str(filepath)) or "model.keras"
                model.save(os.path.join(tmp, name), *args, **kwargs)
        dist.barrier()

    def local_bytes(self, variables) -> int:
        """Bytes this rank holds for `variables`."""
        return sum(
            int(v.value.numel()) * v.value.element_size() for v in variables
        )


def _retrack(model) -> None:
    """Re-register torch parameters after their values were replaced."""
    for layer in model._flatten_layers(include_self=True):
        if "_torch_params" in layer.__dict__ or hasattr(layer, "_torch_params"):
            layer._track_variables()


def is_main_process() -> bool:
    return rank() == 0


def log(*args) -> None:
    if is_main_process():
        print(*args, file=sys.stderr)


def _check_runs(model) -> None:
    """One tiny forward pass on the local shards, so that a model whose own
    code cannot run split (say it reshapes a split tensor with the full head
    count, which the plan cannot see) fails here, at wrap time, and is
    rolled back, rather than at its first call. Every rank runs the same
    code on the same shapes, so all ranks fail or pass together."""
    from keras_tensor_parallel.plan.graph import symbolic_inputs

    inputs = keras.tree.map_structure(
        lambda t: np.ones(t.shape, t.dtype), symbolic_inputs(model)
    )
    counts = dict(COUNTS)  # the check is not part of the user's work
    try:
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
        COUNTS.update(counts)
