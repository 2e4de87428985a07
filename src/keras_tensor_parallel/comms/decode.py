"""What one generated token costs: the decode step of `tp.generate`.

The generate function `tp.generate` runs (see `generation.py`) is compiled
for a batch of prompts and read back: the sampler's `while_loop` body is
the decode step (one token), everything before it is the prefill. From the
compiled module come the decode step's collectives, split into the model's
(row outputs, vocab-parallel lookup) and the sampler's (reductions over the
split vocab), and the key/value cache the loop carries per device.

The minimum per token: Megatron's forward all-reduces at one token per row
(`megatron_minimum(plan, batch_size=b, seq_len=1)`), and for the sampler
two reductions of `[b]` for the softmax (max and sum) plus an exchange of
each device's best candidates (`k` values and indices per row; `k=1` for
greedy). No weight and no cache is ever gathered.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import numpy as np

from keras_tensor_parallel.comms.hlo import Collective, collectives
from keras_tensor_parallel.comms.minimum import Minimum, megatron_minimum
from keras_tensor_parallel.comms.report import is_weight_gather, layer_of
from keras_tensor_parallel.plan import DATA_AXIS, ShardingPlan, format_bytes
from keras_tensor_parallel.plan.plan import dtype_bytes

_LOOP = "/while/body/"
_ARRAY = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass
class DecodeReport:
    """Collectives and cache of one compiled `tp.generate`.

    Attributes:
        plan: The plan measured.
        batch_size, max_length, prompt_length: The generate call's shape.
        sampler: The sampler's class name.
        top_k: Candidates per row the sampler keeps (1 for greedy; 0 when
            the sampler needs the whole distribution).
        decode: Collectives of the decode step (one generated token).
        prefill: Collectives of the prefill (the prompt, once).
        minimum: Megatron's forward all-reduces at one token per row.
        cache_shape: Global cache shape `[b, layers, 2, len, heads, dim]`.
        cache_dtype: Cache dtype name.
        cache_device_shape: Per-device shape of the cache the decode loop
            carries, read from the compiled module.
        compile_s: Seconds to compile.
        data_parallel: Replicas the batch is split over (a `(data, model)`
            mesh); collectives and minima are per replica's rows.
    """

    plan: ShardingPlan
    batch_size: int
    max_length: int
    prompt_length: int
    sampler: str
    top_k: int
    decode: list[Collective]
    prefill: list[Collective]
    minimum: Minimum
    cache_shape: tuple[int, ...]
    cache_dtype: str
    cache_device_shape: tuple[int, ...]
    compile_s: float
    data_parallel: int = 1

    # Split of the decode step ---------------------------------------------

    def _is_model(self, c: Collective) -> bool:
        return layer_of(c.op_name, self._layers) in self._layers

    @property
    def _layers(self) -> set:
        return {e.layer for e in self.plan}

    @property
    def model_collectives(self) -> list[Collective]:
        """Decode collectives of the model's layers (row outputs, lookup)."""
        return [c for c in self.decode if self._is_model(c)]

    @property
    def sampling_collectives(self) -> list[Collective]:
        """Decode collectives of the sampler (reductions over the vocab)."""
        return [c for c in self.decode if not self._is_model(c)]

    @property
    def model_bytes(self) -> int:
        return sum(c.bytes for c in self.model_collectives)

    @property
    def sampling_bytes(self) -> int:
        return sum(c.bytes for c in self.sampling_collectives)

    @property
    def decode_bytes(self) -> int:
        return sum(c.bytes for c in self.decode)

    @property
    def sampling_minimum(self) -> tuple[tuple[str, int], ...]:
        """The sampler's minimum: softmax max and sum over the split vocab
        (`[b]` each), then each device's `k` best (values and indices).
        Samplers that need the whole distribution: its gather."""
        if not self._vocab_split:
            return ()
        b = self.batch_size // self.data_parallel
        n = self.plan.world_size
        out = [("softmax max", b * 4), ("softmax sum", b * 4)]
        if self.top_k:
            size = b * n * self.top_k * 4
            out += [("candidate values", size), ("candidate indices", size)]
        else:
            out += [("distribution", b * self._vocab * 4)]
        return tuple(out)

    @property
    def _vocab_split(self) -> bool:
        return any(e.role == "vocab" and e.is_split for e in self.plan)

    @property
    def _vocab(self) -> int:
        sizes = [
            e.storage_shape[e.split_dim]
            for e in self.plan
            if e.role == "vocab" and e.is_split
        ]
        return max(sizes, default=0)

    # Gathers ----------------------------------------------------------------

    @property
    def weight_gathers(self) -> list[Collective]:
        return [c for c in self.decode if is_weight_gather(c, self.plan)]

    @property
    def cache_gathers(self) -> list[Collective]:
        """Collectives that move cache-shaped data (a length dim and a
        head dim), in the decode step or the prefill."""
        length, head_dim = self.cache_shape[3], self.cache_shape[-1]
        return [
            c
            for c in self.decode + self.prefill
            if c.kind != "all-reduce"
            and any(
                len(s) >= 3 and length in s and s[-1] == head_dim
                for s in c.shapes
            )
        ]

    # Cache -----------------------------------------------------------------

    @property
    def cache_bytes(self) -> int:
        """Bytes of the whole cache (what one device holds unsplit)."""
        return math.prod(self.cache_shape) * dtype_bytes(self.cache_dtype)

    @property
    def cache_bytes_per_device(self) -> int:
        nbytes = dtype_bytes(self.cache_dtype)
        return math.prod(self.cache_device_shape) * nbytes

    @property
    def cache_fraction(self) -> float:
        return self.cache_bytes_per_device / self.cache_bytes

    # Output ------------------------------------------------------------------

    def to_dict(self) -> dict:
        minimum = self.minimum.forward
        return {
            "model": self.plan.model_name,
            "world_size": self.plan.world_size,
            "batch_size": self.batch_size,
            "data_parallel": self.data_parallel,
            "max_length": self.max_length,
            "prompt_length": self.prompt_length,
            "sampler": self.sampler,
            "decode": {
                "model": _totals(self.model_collectives),
                "sampling": _totals(self.sampling_collectives),
                "collectives": [_row(c) for c in self.decode],
            },
            "minimum": {
                "model": {
                    "count": len(minimum),
                    "bytes": sum(b for _, b in minimum),
                },
                "sampling": {
                    "count": len(self.sampling_minimum),
                    "bytes": sum(b for _, b in self.sampling_minimum),
                },
            },
            "prefill": _totals(self.prefill),
            "weight_gathers": len(self.weight_gathers),
            "cache_gathers": len(self.cache_gathers),
            "cache": {
                "shape": list(self.cache_shape),
                "device_shape": list(self.cache_device_shape),
                "bytes": self.cache_bytes,
                "bytes_per_device": self.cache_bytes_per_device,
                "fraction": self.cache_fraction,
            },
            "compile_s": self.compile_s,
        }

    def table(self) -> str:
        """Fixed-width text: the decode step's collectives, then totals."""
        layers = self._layers
        lines = [f"decode step (one token), {self.sampler}:"]
        for c in self.decode:
            where = layer_of(c.op_name, layers)
            where = where if where in layers else "sampler (vocab reduction)"
            lines.append(
                f"  {c.kind:<11} {_shape(c):<22} {format_bytes(c.bytes):>10}"
                f"  {where}"
            )
        m_count = len(self.minimum.forward)
        m_bytes = sum(b for _, b in self.minimum.forward)
        s_min = self.sampling_minimum
        lines += [
            "",
            f"world size {self.plan.world_size}, batch {self.batch_size} "
            f"({self.data_parallel} data replica(s)), "
            f"prompt {self.prompt_length}, max length {self.max_length}",
            f"model:    {len(self.model_collectives)} collectives, "
            f"{format_bytes(self.model_bytes)} per token; minimum "
            f"{m_count}, {format_bytes(m_bytes)}",
            f"sampling: {len(self.sampling_collectives)} collectives, "
            f"{format_bytes(self.sampling_bytes)} per token; minimum "
            f"{len(s_min)}, {format_bytes(sum(b for _, b in s_min))}",
            f"prefill:  {len(self.prefill)} collectives, "
            f"{format_bytes(sum(c.bytes for c in self.prefill))} once",
            f"weight all-gathers: {len(self.weight_gathers)}, cache "
            f"gathers: {len(self.cache_gathers)}",
            f"kv cache {list(self.cache_shape)} {self.cache_dtype}: "
            f"{format_bytes(self.cache_bytes_per_device)} per device of "
            f"{format_bytes(self.cache_bytes)} ({self.cache_fraction:.4f})",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _shape(c: Collective) -> str:
    return " + ".join(
        f"{d}[{','.join(map(str, s))}]" for d, s in zip(c.dtypes, c.shapes)
    )


def _row(c: Collective) -> dict:
    return {"kind": c.kind, "shape": _shape(c), "bytes": c.bytes}


def _totals(items) -> dict:
    return {"count": len(items), "bytes": sum(c.bytes for c in items)}


def loop_cache_shape(hlo_text: str, global_shape) -> tuple[int, ...]:
    """Per-device shape of the cache a compiled `while` loop carries.

    The compiled module is already partitioned: its loop state has
    per-device shapes. The cache is the carried array of the cache's rank
    whose dims equal the global ones except where a split divides them.
    """
    global_shape = tuple(int(d) for d in global_shape)
    for line in hlo_text.splitlines():
        if " while(" not in line:
            continue
        carried = line.split(" while(")[0]
        for _, dims in _ARRAY.findall(carried):
            shape = tuple(int(d) for d in dims.split(",") if d)
            if len(shape) == len(global_shape) and all(
                g == s or (s and g % s == 0 and s < g)
                for g, s in zip(global_shape, shape)
            ):
                return shape
    raise ValueError(
        "No while loop carrying the cache in the compiled module. "
        f"Received: cache shape {global_shape}"
    )


def _top_k(sampler) -> int:
    name = type(sampler).__name__
    if name == "GreedySampler":
        return 1
    return int(getattr(sampler, "k", 0)) if name == "TopKSampler" else 0


def example_prompts(
    vocab: int,
    *,
    batch_size: int,
    max_length: int,
    prompt_length: int,
    seed: int = 0,
) -> dict:
    """Seeded prompts padded to `max_length` (what `generate` runs on)."""
    rng = np.random.RandomState(seed)
    ids = np.zeros((batch_size, max_length), "int32")
    ids[:, :prompt_length] = rng.randint(1, vocab, (batch_size, prompt_length))
    mask = np.zeros((batch_size, max_length), bool)
    mask[:, :prompt_length] = True
    return {"token_ids": ids, "padding_mask": mask}  # fmt: skip


def _check_lengths(prompt_length: int, max_length: int) -> None:
    if not 0 < prompt_length < max_length:
        raise ValueError(
            "prompt_length must be in [1, max_length). Received: "
            f"prompt_length={prompt_length}, max_length={max_length}"
        )


def analyze_decode(
    tp,
    *,
    batch_size: int = 2,
    max_length: int = 32,
    prompt_length: int = 8,
) -> DecodeReport:
    """Compile `tp.generate` for a batch and account its decode step.

    Nothing runs: the generate function is compiled for prompts of the
    given shape with the model's sharded variables.

    Args:
        tp: A JAX `TensorParallelKeras` wrapping a KerasHub `CausalLM`.
        batch_size: Prompts per batch.
        max_length: Prompt + generated tokens (the cache's length).
        prompt_length: Tokens of each prompt.

    Example:

    ```python
    report = analyze_decode(tp, batch_size=8, max_length=1024)
    print(report.table())
    assert not report.weight_gathers and not report.cache_gathers
    ```
    """
    model = tp.wrapped_model
    _check_lengths(prompt_length, max_length)
    text, seconds, (shape, dtype) = _compile_generate(
        tp, batch_size, max_length, prompt_length
    )
    # On a (data, model) mesh each replica runs its rows of the batch.
    data = dict(tp.engine.mesh.backend_mesh.shape).get(DATA_AXIS, 1)
    rows = batch_size // data if batch_size % data == 0 else batch_size
    found = collectives(text)
    return DecodeReport(
        plan=tp.plan,
        batch_size=batch_size,
        max_length=max_length,
        prompt_length=prompt_length,
        sampler=type(model.sampler).__name__,
        top_k=_top_k(model.sampler),
        decode=[c for c in found if _LOOP in c.op_name],
        prefill=[c for c in found if _LOOP not in c.op_name],
        minimum=megatron_minimum(tp.plan, batch_size=rows, seq_len=1),
        cache_shape=tuple(shape),
        cache_dtype=dtype,
        cache_device_shape=loop_cache_shape(text, shape),
        compile_s=seconds,
        data_parallel=batch_size // rows,
    )


def _compile_generate(tp, batch_size, max_length, prompt_length):
    """The compiled generate function's HLO text, its compile seconds and
    the (shape, dtype) of one layer's cache."""
    from keras_tensor_parallel import generation
    from keras_tensor_parallel.generation.jax import jax_generator

    model = tp.wrapped_model
    generation.check_causal_lm(model)
    if getattr(model, "sampler", None) is None:
        generation.set_sampler(tp, "top_k")
    generator = jax_generator(tp)
    inputs = example_prompts(
        int(model.backbone.vocabulary_size),
        batch_size=batch_size,
        max_length=max_length,
        prompt_length=prompt_length,
    )
    start = time.perf_counter()
    text = generator.compile(inputs).as_text()
    return text, time.perf_counter() - start, generator.cache_shape


def analyze_model(
    model,
    world_size: int,
    *,
    batch_size: int = 2,
    max_length: int = 32,
    prompt_length: int = 8,
    sampler="greedy",
    tensor_parallel_size: int | None = None,
) -> DecodeReport:
    """Wrap `model` and account its decode step (`keras-tp comms
    --generate`).

    Args:
        model: A KerasHub `CausalLM`, or a backbone that has one (it is
            wrapped in its task without a preprocessor). Its variables are
            re-sharded in place.
        world_size: Devices.
        batch_size, max_length, prompt_length: As for `analyze_decode`.
        sampler: The sampler to compile with (`"greedy"`, `"top_k"`, or a
            `keras_hub.samplers.Sampler`).
        tensor_parallel_size: The model axis (default `world_size`); the
            rest is data parallel, each replica decoding its rows.

    Example:

    ```python
    report = analyze_model(keras_hub.models.OPTBackbone(**config), 2)
    print(report.table())
    ```
    """
    from keras_tensor_parallel import generation
    from keras_tensor_parallel.model import TensorParallelKeras

    tp = TensorParallelKeras(
        generation.as_causal_lm(model),
        world_size,
        tensor_parallel_size=tensor_parallel_size,
    )
    generation.set_sampler(tp, sampler)
    return analyze_decode(
        tp,
        batch_size=batch_size,
        max_length=max_length,
        prompt_length=prompt_length,
    )
