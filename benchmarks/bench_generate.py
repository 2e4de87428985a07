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

from keras_tensor_parallel import TensorParallelKeras  # noqa: E402
from keras_tensor_parallel.comms.decode import (  # noqa: E402
    analyze_decode,
    example_prompts,
)

_TINY = dict(num_layers=2, hidden_dim=64, intermediate_dim=96)
_GQA = dict(num_query_heads=8, num_key_value_heads=4)

# name: (backbone class, task class, config). Tiny configs for parity and
# speed; the full-size ones only compile.
TINY = {
    "gpt2": ("GPT2Backbone", "GPT2CausalLM",
             dict(_TINY, vocabulary_size=1001, num_heads=4,
                  max_sequence_length=64)),
    "opt": ("OPTBackbone", "OPTCausalLM",
            dict(_TINY, vocabulary_size=1000, num_heads=4,
                 max_sequence_length=64)),
    "llama": ("LlamaBackbone", "LlamaCausalLM",
              dict(_TINY, vocabulary_size=1000, **_GQA)),
    "gemma": ("GemmaBackbone", "GemmaCausalLM",
              dict(_TINY, vocabulary_size=1000, num_query_heads=4,
                   num_key_value_heads=4, head_dim=16)),
    "mistral": ("MistralBackbone", "MistralCausalLM",
                dict(_TINY, vocabulary_size=1000, sliding_window=32, **_GQA)),
}  # fmt: skip
LARGE = {
    "opt-125m": ("OPTBackbone", "OPTCausalLM",
                 dict(vocabulary_size=50272, num_layers=12, num_heads=12,
                      hidden_dim=768, intermediate_dim=3072,
                      max_sequence_length=2048)),
    "llama-small": ("LlamaBackbone", "LlamaCausalLM",
                    dict(vocabulary_size=32000, num_layers=4,
                         hidden_dim=512, intermediate_dim=1376, **_GQA)),
    "gemma-small-mqa": ("GemmaBackbone", "GemmaCausalLM",
                          dict(vocabulary_size=32000, num_layers=4,
                               num_query_heads=8, num_key_value_heads=1,
                               hidden_dim=512, intermediate_dim=2048,
                               head_dim=64)),
}  # fmt: skip
SPEED = ("LlamaBackbone", "LlamaCausalLM",
         dict(vocabulary_size=4000, num_layers=4, hidden_dim=256,
              intermediate_dim=512, **_GQA))  # fmt: skip


def build(entry, seed: int = 0):
    backbone_cls, task_cls, config = entry
    keras.utils.set_random_seed(seed)
    backbone = getattr(keras_hub.models, backbone_cls)(**config)
    return getattr(keras_hub.models, task_cls)(backbone, preprocessor=None)


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
