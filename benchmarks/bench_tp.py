"""Train-step time, compile time, collective bytes and per-device memory:
one device vs the automatic plan vs KerasHub's hand-written layout maps.

    .venv/bin/python benchmarks/bench_tp.py --steps 10 --json out.json

Everything runs in one process on one simulated mesh of 4 CPU devices
(`--xla_force_host_platform_device_count=4`, set before jax is imported).
Per model, every variant starts from the same weights and trains on the
same batch with Adam and a causal-LM loss:

- `single`: the model on one device, no distribution;
- `auto N=2/4`: `TensorParallelKeras` (the automatic plan);
- `keras-hub N=2/4`: the backbone's `get_layout_map` under
  `keras.distribution.ModelParallel` on a `(batch=1, model=N)` mesh, the
  model built inside the distribution scope (what a Keras user writes).

Each variant's train step is the trainer's own `train_step`, jitted as
`fit` jits it; it is compiled once (compile seconds), its HLO collectives
are summed (`comms.collectives`), and per-device parameter + optimizer
bytes are read from the arrays' addressable shards. Steps are timed round
robin (one step of each variant per round) so load from other processes
hits every variant alike; the median is reported as a ratio to `single`.

A last table reads OPT-125M's per-device parameter + Adam bytes under the
automatic plan against the Megatron ideal, without training steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras.src.backend.jax.trainer import _distribute_data  # noqa: E402

from keras_tensor_parallel import TensorParallelKeras, catalogue, comms  # noqa: E402
from keras_tensor_parallel.backends.jax import per_device_bytes  # noqa: E402
from keras_tensor_parallel.verify import causal_lm  # noqa: E402

CONFIGS = {
    "llama": dict(
        # llama-small (8 query heads, 4 key/value heads) at 2 layers.
        build=catalogue.get("llama-small")
        .variant(
            vocabulary_size=8000,
            num_layers=2,
            hidden_dim=256,
            intermediate_dim=688,
        )
        .build,
        backbone="LlamaBackbone",
    ),
    "gemma": dict(
        build=catalogue.get("gemma-small")
        .variant(
            vocabulary_size=8000,
            num_layers=2,
            num_query_heads=4,
            # KerasHub's Gemma map splits the key/value head axis: it must
            # divide by N=4 (Gemma-2B's single kv head would not).
            num_key_value_heads=4,
            hidden_dim=256,
            intermediate_dim=1024,
        )
        .build,
        backbone="GemmaBackbone",
    ),
}


class Variant:
    """One compiled train step with its state, ready to be stepped."""

    def __init__(self, name, model, scope, prepare=None):
        self.name = name
        self.model = model
        self.scope = scope
        self.prepare = prepare or (lambda: None)
        self.times: list[float] = []

    def compile(self, x, y):
        model = self.model
        with self.scope():
            # In scope: ModelParallel places the optimizer's own variables.
            model.compile(
                optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True
                ),
            )
            self.prepare()
            model._symbolic_build(data_batch=(x, y, None))
            model.optimizer.build(model.trainable_variables)
            self.prepare()
            self.state = model._get_jax_state(
                trainable_variables=True,
                non_trainable_variables=True,
                optimizer_variables=True,
                metrics_variables=True,
            )
            self.data = _distribute_data((x, y, None))
            step = jax.jit(
                model.train_step,
                donate_argnums=0,
                out_shardings=(None, model._get_state_sharding_spec()),
            )
            start = time.perf_counter()
            self.step = step.lower(self.state, self.data).compile()
            self.compile_s = time.perf_counter() - start
        self.collectives = comms.collectives(self.step.as_text())
        self.device_bytes = _max_device_bytes(self.state[:3])
        self.variable_shapes = {
            tuple(a.shape) for arrays in self.state for a in arrays
        }

    def run_one(self) -> float:
        start = time.perf_counter()
        logs, self.state = self.step(self.state, self.data)
        jax.block_until_ready((logs, self.state))
        self.loss = float(logs["loss"])
        return time.perf_counter() - start

    def summary(self, base) -> dict:
        kinds: dict = {}
        for c in self.collectives:
            kinds[c.kind] = kinds.get(c.kind, 0) + len(c.shapes)
        median = statistics.median(self.times)
        return {
            "variant": self.name,
            "step_ms": 1e3 * median,
            "step_vs_single": median / statistics.median(base.times),
            "compile_s": self.compile_s,
            "collective_bytes": sum(c.bytes for c in self.collectives),
            "collectives": kinds,
            # All-gathers that rebuild a whole variable (a weight, its
            # gradient or an Adam slot): the step is not tensor-parallel
            # there.
            "weight_gathers": sum(
                c.kind == "all-gather"
                and (c.from_parameter or set(c.shapes) <= self.variable_shapes)
                for c in self.collectives
            ),
            "device_bytes": self.device_bytes,
            "device_fraction": self.device_bytes / base.device_bytes,
            "loss": self.loss,
        }


def _max_device_bytes(state) -> int:
    """Largest per-device total over the arrays' addressable shards."""
    arrays = [a for group in state for a in group]
    return max(per_device_bytes(arrays).values())


def _hub_variant(cfg, n, weights):
    import keras_hub

    backbone_cls = getattr(keras_hub.models, cfg["backbone"])
    devices = keras.distribution.list_devices()[:n]
    mesh = keras.distribution.DeviceMesh(
        shape=(1, n), axis_names=("batch", "model"), devices=devices
    )
    layout_map = backbone_cls.get_layout_map(
        mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"
    )
    dist = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with dist.scope():
        model = causal_lm(cfg["build"]())
        model.set_weights(weights)
    return Variant(f"keras-hub N={n}", model, dist.scope)


def _auto_variant(cfg, n, weights):
    model = causal_lm(cfg["build"]())
    model.set_weights(weights)
    tp = TensorParallelKeras(model, world_size=n)
    return Variant(
        f"auto N={n}",
        tp,
        tp.engine.scope,
        prepare=lambda: tp.engine.prepare_state(tp),
    )


def bench_model(name, cfg, *, batch, seq, steps, warmup, sizes):
    keras.utils.set_random_seed(0)
    reference = causal_lm(cfg["build"]())
    weights = reference.get_weights()
    variants = [Variant("single", reference, contextlib.nullcontext)]
    for n in sizes:
        variants.append(_auto_variant(cfg, n, weights))
        variants.append(_hub_variant(cfg, n, weights))
    rng = np.random.RandomState(0)
    vocab = int(reference.get_layer("token_embedding").input_dim)
    ids = rng.randint(0, vocab, (batch, seq + 1)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    y = ids[:, 1:]
    for v in variants:
        v.compile(x, y)
        print(f"  {name} {v.name}: compiled in {v.compile_s:.1f}s", flush=True)
    for r in range(warmup + steps):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            t = v.run_one()
            if r >= warmup:
                v.times.append(t)
    base = variants[0]
    return [dict(model=name, **v.summary(base)) for v in variants]


def opt125m_memory(sizes) -> list[dict]:
    from keras_tensor_parallel.verify.checks import memory_check

    out = []
    for n in sizes:
        check = memory_check(catalogue.get("opt-125m").build, n)
        out.append(
            {
                "model": "opt-125m",
                "world_size": n,
                "measured_fraction": check.detail["measured_fraction"],
                "ideal_fraction": check.detail["ideal_fraction"],
            }
        )
    return out


def _mib(b) -> str:
    return f"{b / 2**20:.2f}"


def render(rows, memory) -> str:
    head = (
        "| model | variant | step ms (median) | step vs single | compile s "
        "| collective MiB/step | collectives | variable all-gathers "
        "| param+opt MiB/device | vs single |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        kinds = ", ".join(
            f"{k} {v}" for k, v in sorted(r["collectives"].items())
        )
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['step_ms']:.1f} "
            f"| {r['step_vs_single']:.2f}x | {r['compile_s']:.1f} "
            f"| {_mib(r['collective_bytes'])} | {kinds or '-'} "
            f"| {r['weight_gathers']} | {_mib(r['device_bytes'])} "
            f"| {r['device_fraction']:.3f} |"
        )
    if memory:
        lines += [
            "",
            "| model | N | param+Adam bytes per device / single device "
            "| Megatron ideal |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {m['model']} | {m['world_size']} "
            f"| {m['measured_fraction']:.4f} | {m['ideal_fraction']:.4f} |"
            for m in memory
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama,gemma")
    p.add_argument("--sizes", default="2,4")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-opt125m", action="store_true")
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    start = time.perf_counter()
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        rows += bench_model(
            name,
            CONFIGS[name],
            batch=args.batch_size,
            seq=args.seq_len,
            steps=args.steps,
            warmup=args.warmup,
            sizes=sizes,
        )
    memory = [] if args.no_opt125m else opt125m_memory(sizes)
    print(render(rows, memory))
    print(f"\ntotal {time.perf_counter() - start:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "opt125m": memory}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
