"""`tp.generate` on tensor-parallel KerasHub causal LMs (issue 14).

Every check compares against a single-device model built independently
with the same weights: greedy tokens and top-k samples (same seed) must be
identical. The decode step and the cache are read from the compiled
generate function. The torch case runs this file as a worker in 2 ranks
(`keras_tensor_parallel.launch`), as tests/test_torch_backend.py does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
TIMEOUT = 240


def _lm(name: str):
    """A builder of a tiny KerasHub CausalLM (no preprocessor) from the
    catalogue's tiny configs: vocabularies above the planner's 128-row
    floor (vocab-parallel embedding and head), GPT-2's odd (padded)."""
    import keras_hub

    from keras_tensor_parallel import catalogue
    from keras_tensor_parallel.generation import as_causal_lm

    specs = {
        "gpt2": catalogue.get("gpt2:tiny"),
        "opt": catalogue.get("opt-125m:tiny"),
        "llama": catalogue.get("llama-small:tiny"),  # 8 q / 4 kv heads
        # The catalogue's tiny Gemma has one kv head (MQA): a cache that
        # cannot split. Four kv heads cover Gemma's (heads, hidden, dim)
        # kernels in the cache split.
        "gemma": catalogue.get("gemma-small:tiny").variant(
            num_key_value_heads=4
        ),
    }
    specs["llama-kv2"] = specs["llama"].variant(num_key_value_heads=2)
    # 6 heads do not divide by 4: the plan pads them to 8 (zero heads).
    specs["gpt2-6heads"] = specs["gpt2"].variant(num_heads=6, hidden_dim=48)
    if name == "mistral":  # not in the catalogue: Llama's tiny config
        config = dict(specs["llama"].config, sliding_window=32)
        return lambda: keras_hub.models.MistralCausalLM(
            keras_hub.models.MistralBackbone(**config), preprocessor=None
        )
    return lambda: as_causal_lm(specs[name].build())


def _prompts(vocab=1000, batch=2, length=12, seed=1):
    """Prompts of different lengths (3 and 5 tokens), padded to length."""
    rng = np.random.RandomState(seed)
    ids = np.zeros((batch, length), "int32")
    mask = np.zeros((batch, length), bool)
    for row, n in enumerate([3, 5][:batch]):
        ids[row, :n] = rng.randint(1, vocab, n)
        mask[row, :n] = True
    return {"token_ids": ids, "padding_mask": mask}


def _copies(build, n: int, seed: int = 0):
    """`n` independently built models with the weights of the first."""
    import keras

    keras.utils.set_random_seed(seed)
    models = [build()]
    weights = models[0].get_weights()
    for _ in range(n - 1):
        models.append(build())
        models[-1].set_weights(weights)
    return models


def _generate(model, sampler, x):
    model.compile(sampler=sampler)
    return np.asarray(model.generate(dict(x), stop_token_ids=None)["token_ids"])


# JAX ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wrapped():
    """`wrapped(name, n)` -> (single-device reference, TP model on n
    devices), built once per module with the same weights: generation
    changes no weight, and every test sets its own sampler."""
    from keras_tensor_parallel import TensorParallelKeras

    refs, tps = {}, {}

    def get(name, n):
        if name not in refs:
            (refs[name],) = _copies(_lm(name), 1)
        if (name, n) not in tps:
            (model,) = _copies(_lm(name), 1)
            model.set_weights(refs[name].get_weights())
            tps[name, n] = TensorParallelKeras(model, world_size=n)
        return refs[name], tps[name, n]

    return get


# One world size per model keeps the file short (GPT-2 at N=4 is compiled
# by the decode test); benchmarks/bench_generate.py compares every model's
# tokens at N=2 and N=4.
@pytest.mark.parametrize(
    "name,n",
    [("gpt2", 2), ("opt", 4), ("llama", 2), ("gemma", 4), ("mistral", 2),
     ("gpt2-6heads", 4)],
)  # fmt: skip
def test_greedy_tokens_match_one_device(wrapped, name, n):
    ref, tp = wrapped(name, n)
    x = _prompts()
    expected = _generate(ref, "greedy", x)
    got = _generate(tp, "greedy", x)
    np.testing.assert_array_equal(got, expected)
    # The prompts are kept and something was generated.
    np.testing.assert_array_equal(got[x["padding_mask"]], x["token_ids"][
        x["padding_mask"]])  # fmt: skip
    assert not np.array_equal(got, x["token_ids"])


def test_top_k_samples_match_one_device_with_same_seed(wrapped):
    import keras_hub

    from keras_tensor_parallel.comms.decode import analyze_decode

    ref, tp = wrapped("gpt2", 2)
    x = _prompts(vocab=1001)
    sampler = lambda: keras_hub.samplers.TopKSampler(k=5, seed=7)  # noqa
    expected = _generate(ref, sampler(), x)
    np.testing.assert_array_equal(_generate(tp, sampler(), x), expected)
    # The seed state moved on as on one device: the next call matches too.
    ref_next = ref.generate(dict(x), stop_token_ids=None)["token_ids"]
    tp_next = tp.generate(dict(x), stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(tp_next, ref_next)
    assert not np.array_equal(ref_next, expected)
    # Sampling, not greedy: a different sequence from the greedy one.
    assert not np.array_equal(expected, _generate(ref, "greedy", x))
    # Each device sends only its k best per row, not the distribution.
    report = analyze_decode(tp, batch_size=2, max_length=16, prompt_length=4)
    assert report.sampler == "TopKSampler"
    assert report.sampling_bytes == sum(b for _, b in report.sampling_minimum)
    gathers = [c for c in report.sampling_collectives if c.kind != "all-reduce"]
    assert [c.shapes for c in gathers] == [((2, 2 * 5),)] * 2, report


# (model, N, kv heads each device holds): llama-kv2 has 2 kv heads for 4
# devices, each head held by 2 devices (the plan's kv-head copies);
# gpt2-6heads' 6 heads are padded to 8 for 4 devices.
@pytest.mark.parametrize(
    "name,n,local_heads",
    [("llama", 2, 2), ("gpt2", 4, 1), ("gemma", 4, 1), ("llama-kv2", 4, 1),
     ("gpt2-6heads", 4, 2)],
)  # fmt: skip
def test_decode_step_at_minimum_cache_split_by_heads(
    wrapped, name, n, local_heads
):
    from keras_tensor_parallel.comms.decode import analyze_decode

    tp = wrapped(name, n)[1]
    tp.compile(sampler="greedy")
    report = analyze_decode(tp, batch_size=2, max_length=16, prompt_length=4)
    hidden = tp.wrapped_model.backbone.hidden_dim
    # Per token: the vocab-parallel lookup and 2 row outputs per layer,
    # each an all-reduce of [batch, 1, hidden]; nothing else in the model.
    model_part = report.model_collectives
    assert [c.kind for c in model_part] == ["all-reduce"] * 5, report
    assert all(c.shapes == ((2, 1, hidden),) for c in model_part), report
    assert len(report.minimum.forward) == 5
    assert report.model_bytes == sum(b for _, b in report.minimum.forward)
    # Greedy over the split vocab: softmax max and sum of [batch], each
    # device's best value and index: [batch, N] each.
    assert report.sampling_bytes == sum(b for _, b in report.sampling_minimum)
    assert all(c.bytes <= 2 * n * 4 for c in report.sampling_collectives)
    assert not report.weight_gathers and not report.cache_gathers, report
    # The loop carries only this device's kv heads of the cache: 1/N of it
    # where the kv heads divide by N, one head where N is larger.
    heads = report.cache_shape[-2]
    assert report.cache_shape[:4] == (2, 2, 2, 16), report
    assert report.cache_device_shape[-2] == local_heads, report
    assert report.cache_bytes_per_device * heads == (
        report.cache_bytes * local_heads
    )


def test_data_and_tensor_parallel(wrapped):
    """world_size 4 as 2 data replicas x 2-way tensor parallel: each replica
    generates its rows of the batch; the cache splits on both."""
    from keras_tensor_parallel import TensorParallelKeras
    from keras_tensor_parallel.comms.decode import analyze_decode

    ref, _ = wrapped("gpt2", 2)
    (model,) = _copies(_lm("gpt2"), 1)
    model.set_weights(ref.get_weights())
    tp = TensorParallelKeras(model, world_size=4, tensor_parallel_size=2)
    x = _prompts(vocab=1001)
    expected = _generate(ref, "greedy", x)
    np.testing.assert_array_equal(_generate(tp, "greedy", x), expected)
    report = analyze_decode(tp, batch_size=2, max_length=16, prompt_length=4)
    assert report.data_parallel == 2
    # Per replica: its one row of the batch through the Megatron minimum.
    assert all(c.shapes == ((1, 1, 64),) for c in report.model_collectives)
    assert report.model_bytes == sum(b for _, b in report.minimum.forward)
    assert not report.weight_gathers and not report.cache_gathers, report
    assert report.cache_bytes_per_device * 4 == report.cache_bytes


def test_strings_with_preprocessor():
    import keras_hub

    from keras_tensor_parallel import TensorParallelKeras, catalogue

    vocab = {"<|endoftext|>": 0, "Ġ": 1, "a": 2, "b": 3, "Ġa": 4, "Ġb": 5}
    vocab.update({f"t{i}": 6 + i for i in range(250)})
    merges = ["Ġ a", "Ġ b"]

    def build():
        tokenizer = keras_hub.models.GPT2Tokenizer(
            vocabulary=vocab, merges=merges
        )
        pre = keras_hub.models.GPT2CausalLMPreprocessor(
            tokenizer, sequence_length=10
        )
        spec = catalogue.get("gpt2:tiny").variant(vocabulary_size=len(vocab))
        backbone = spec.build()
        return keras_hub.models.GPT2CausalLM(backbone, preprocessor=pre)

    ref, model = _copies(build, 2)
    tp = TensorParallelKeras(model, world_size=2)
    assert tp.preprocessor is model.preprocessor
    ref.compile(sampler="greedy")
    tp.compile(sampler="greedy")
    prompts = ["a b", "b a a"]
    expected = ref.generate(prompts, max_length=10, stop_token_ids=None)
    got = tp.generate(prompts, max_length=10, stop_token_ids=None)
    assert got == expected and all(isinstance(s, str) for s in got)
    assert all(len(g) > len(p) for g, p in zip(got, prompts)), got


def test_generate_needs_a_causal_lm():
    import keras

    from keras_tensor_parallel import TensorParallelKeras, catalogue

    tp = TensorParallelKeras(catalogue.get("seed-mlp").build(), world_size=2)
    with pytest.raises(ValueError, match="CausalLM.*Received"):
        tp.generate(np.zeros((1, 64), "float32"))
    with pytest.raises(ValueError, match="CausalLM.*Received"):
        tp.compile(optimizer="adam", loss="mse", sampler="greedy")
    assert not tp.compiled  # the failed compile changed nothing
    assert isinstance(tp.wrapped_model, keras.Model)


def test_cli_comms_generate(capsys):
    from keras_tensor_parallel import cli

    argv = ["comms", "gpt2:tiny", "-n", "2", "--generate", "--format", "json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decode"]["model"] == out["minimum"]["model"], out
    assert out["decode"]["sampling"] == out["minimum"]["sampling"], out
    assert out["weight_gathers"] == out["cache_gathers"] == 0
    assert out["cache"]["fraction"] == 0.5
    assert cli.main(["comms", "seed-mlp", "-n", "2", "--generate"]) == 2
    assert "CausalLM" in capsys.readouterr().err


# torch: 2 ranks ---------------------------------------------------------


def worker(out_path: str) -> None:
    """Runs in every rank (KERAS_BACKEND=torch): greedy and top-k on the
    shards against a single-process model with the same weights."""
    import keras_hub
    import torch.distributed as dist

    from keras_tensor_parallel import TensorParallelKeras
    from keras_tensor_parallel.backends import torch_collectives as tc

    res = {}
    # Llama: GQA (4 of 8 heads cached) and an untied vocab-parallel head.
    for name, vocab in (("llama", 1000),):
        ref, model = _copies(_lm(name), 2)
        caches = []
        original = model.call_with_cache

        def record(token_ids, cache, index, _original=original, _seen=caches):
            _seen.append(tuple(cache.shape))
            print("tp-decode-step")  # only rank 0's should reach stdout
            return _original(token_ids, cache, index)

        model.call_with_cache = record
        x = _prompts(vocab=vocab)
        tp = TensorParallelKeras(model, world_size=2)
        sampler = lambda: keras_hub.samplers.TopKSampler(k=5, seed=7)  # noqa
        tc.reset_counts()
        greedy = _generate(tp, "greedy", x).tolist()
        res[name] = {
            "counts": dict(tc.COUNTS),
            "greedy_calls": len(caches),
            "greedy": greedy,
            "greedy_ref": _generate(ref, "greedy", x).tolist(),
            "top_k": _generate(tp, sampler(), x).tolist(),
            "top_k_ref": _generate(ref, sampler(), x).tolist(),
            "cache": caches[-1],
            "calls": len(caches),
        }
    res["rank"] = dist.get_rank()
    with open(f"{out_path}.{dist.get_rank()}", "w") as fh:
        json.dump(res, fh)


@pytest.mark.torch
def test_torch_two_ranks_match_one_process(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "keras_tensor_parallel.launch", "-n", "2",
           "--timeout", str(TIMEOUT), HERE, str(out)]  # fmt: skip
    proc = subprocess.run(
        cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=TIMEOUT + 30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"result.json.{r}").read_text())
             for r in (0, 1)]  # fmt: skip
    for name in ("llama",):
        for res in ranks:  # every rank returns the tokens
            case = res[name]
            assert case["greedy"] == case["greedy_ref"], (name, case)
            assert case["top_k"] == case["top_k_ref"], (name, case)
            assert case["top_k"] != case["greedy"], (name, case)
            # [batch, layers, 2, length, kv heads / 2, head dim]
            assert case["cache"][4] == 2, (name, case)
            # Per call (prefill, then one per token): the vocab-parallel
            # lookup and 2 row outputs per layer (2 layers), and the LM
            # head's logits gathered over the vocab for the sampler.
            calls = case["greedy_calls"]
            assert case["counts"] == {
                "forward": 5 * calls, "backward": 0, "gather": calls
            }, case  # fmt: skip
    assert ranks[0]["llama"] == ranks[1]["llama"]
    # Both ranks write to the launcher's stdout; only rank 0 prints.
    assert proc.stdout.count("tp-decode-step") == ranks[0]["llama"]["calls"]


if __name__ == "__main__":
    worker(*sys.argv[1:])
