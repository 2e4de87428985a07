"""Generation on tensor-parallel causal LMs: parity, tokens/s, the kv cache
per device and the decode step's collectives.

    .venv/bin/python benchmarks/bench_generate.py --json gen.json

One process, one simulated mesh of 4 CPU devices. Three parts:

- parity: greedy tokens of `tp.generate` against the same weights on one
  device, for tiny GPT-2 (odd vocab), OPT, Llama (GQA), Gemma and Mistral
  at N=2 and N=4 (the sweep the tests only sample);
- speed: tokens/s of `generate` at N=1 (the plain model, KerasHub's own
  jit), 2 and 4 on one model, timed round robin after compiling (one call
  of each per round, so load from other processes hits all alike);
- cache and decode step at batch 8 x 1024 tokens, compiled only (nothing
  of that size runs): per-device bytes of the cache the decode loop
  carries, read from the compiled module, and the decode step's
  collective bytes against the minimum (`comms.decode`). `--sampler
  top_k` compiles with KerasHub's default sampler (k=50) instead of
  greedy; `--models` / `--sizes` pick the full-size models and N.
"""

from __future__ import annotations

import argparse
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

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

from keras_tensor_parallel import TensorParallelKeras, catalogue  # noqa: E402
from keras_tensor_parallel.comms.decode import (  # noqa: E402
    analyze_decode,
    example_prompts,
)
from keras_tensor_parallel.generation import as_causal_lm  # noqa: E402


def _catalogue_lm(name: str, **overrides):
    spec = catalogue.get(name)
    spec = spec.variant(**overrides) if overrides else spec
    return lambda: as_causal_lm(spec.build())


def _mistral():
    # Not in the catalogue: Llama's tiny config with a sliding window.
    config = dict(catalogue.get("llama-small:tiny").config, sliding_window=32)
    return keras_hub.models.MistralCausalLM(
        keras_hub.models.MistralBackbone(**config), preprocessor=None
    )


# Builders of KerasHub CausalLMs from the catalogue: tiny ones for parity,
# full-size ones that only compile, one mid-size for speed.
TINY = {
    "gpt2": _catalogue_lm("gpt2:tiny"),  # vocab 1001: odd, padded
    "opt": _catalogue_lm("opt-125m:tiny"),
    "llama": _catalogue_lm("llama-small:tiny"),  # 8 q / 4 kv heads
    "gemma": _catalogue_lm("gemma-small:tiny", num_key_value_heads=4),
    "mistral": _mistral,
}
LARGE = {
    "opt-125m": _catalogue_lm("opt-125m"),
    "llama-small": _catalogue_lm("llama-small"),  # 8 q / 4 kv heads
    "gemma-small-mqa": _catalogue_lm("gemma-small"),  # 1 kv head
    # 2 kv heads: on 4 devices each is held by 2 (the plan's copies).
    "llama-small-kv2": _catalogue_lm("llama-small", num_key_value_heads=2),
}
SPEED = _catalogue_lm(
    "llama-small", vocabulary_size=4000, hidden_dim=256, intermediate_dim=512
)


def build(builder, seed: int = 0):
    keras.utils.set_random_seed(seed)
    return builder()


def greedy(model, x):
    model.compile(sampler="greedy")
    out = model.generate(dict(x), stop_token_ids=None)
    return np.asarray(out["token_ids"])


def parity() -> list[dict]:
    rows = []
    x = example_prompts(1000, batch_size=2, max_length=16, prompt_length=4)
    for name, entry in TINY.items():
        expected = greedy(build(entry), x)
        for n in (2, 4):
            tp = TensorParallelKeras(build(entry), world_size=n)
            same = bool(np.array_equal(greedy(tp, x), expected))
            rows.append({"model": name, "N": n, "identical": same})
            print(f"parity {name} N={n}: {'identical' if same else 'DIFF'}")
    return rows


def speed(*, rounds: int, batch: int, new_tokens: int) -> list[dict]:
    prompt = 16
    x = example_prompts(
        4000, batch_size=batch, max_length=prompt + new_tokens,
        prompt_length=prompt)  # fmt: skip
    models = {1: build(SPEED)}
    for n in (2, 4):
        models[n] = TensorParallelKeras(build(SPEED), world_size=n)
    tokens = {n: greedy(m, x) for n, m in models.items()}  # compiles
    times = {n: [] for n in models}
    for _ in range(rounds):
        for n, model in models.items():
            start = time.perf_counter()
            model.generate(dict(x), stop_token_ids=None)
            times[n].append(time.perf_counter() - start)
    base = statistics.median(times[1])
    rows = []
    for n, ts in times.items():
        median = statistics.median(ts)
        rows.append({
            "N": n,
            "tokens_per_s": batch * new_tokens / median,
            "time_ratio_to_N1": median / base,
            "identical_to_N1": bool(np.array_equal(tokens[n], tokens[1])),
        })  # fmt: skip
        print(f"speed N={n}: {rows[-1]}")
    return rows


def sampler_named(name: str):
    if name == "top_k":  # KerasHub's default sampler, k=50
        return keras_hub.samplers.TopKSampler(k=50, seed=0)
    return name


def cache_and_comms(
    *, batch: int, length: int, sampler: str, models, sizes
) -> list[dict]:
    rows = []
    for name in models:
        entry = LARGE[name]
        for n in sizes:
            tp = TensorParallelKeras(build(entry), world_size=n)
            tp.compile(sampler=sampler_named(sampler))
            report = analyze_decode(
                tp, batch_size=batch, max_length=length, prompt_length=16
            )
            d = report.to_dict()
            rows.append({**d, "model": name, "N": n, "sampler": sampler})
            print(f"{name} N={n}\n{report.table()}\n")
            del tp
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cache-length", type=int, default=1024)
    parser.add_argument(
        "--skip", nargs="*", default=(), choices=("parity", "speed", "cache")
    )
    parser.add_argument("--sampler", default="greedy", help="greedy, top_k")
    parser.add_argument("--models", nargs="*", default=list(LARGE))
    parser.add_argument("--sizes", nargs="*", type=int, default=[2, 4])
    args = parser.parse_args()
    out = {}
    if "parity" not in args.skip:
        out["parity"] = parity()
    if "speed" not in args.skip:
        out["speed"] = speed(
            rounds=args.rounds, batch=args.batch, new_tokens=args.new_tokens
        )
    if "cache" not in args.skip:
        out["cache"] = cache_and_comms(
            batch=args.batch,
            length=args.cache_length,
            sampler=args.sampler,
            models=args.models,
            sizes=args.sizes,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
