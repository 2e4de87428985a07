"""Issue 11 on the torch engine: presets and builders loaded straight into
shards, each of 2 ranks (gloo, 127.0.0.1) creating every split variable at
its local shape and reading only its own rows of the file.

The pytest process (JAX) writes the presets and weights files; one launch
of this file as a worker in 2 ranks (`KERAS_BACKEND=torch`, bounded by a
timeout) runs every case, and each rank compares with models it builds
independently on one device from the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
TIMEOUT = 240
# RSS a rank's load may add beyond its final bytes and its largest
# variable: the h5py file cache, the plan and the symbolic trace, Python
# objects of the model, gloo buffers.
RSS_OVERHEAD = 64 * 2**20


def _digest(folder) -> dict:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _rel(got, want) -> float:
    got, want = np.asarray(got, "float64"), np.asarray(want, "float64")
    return float(np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))))


# Worker (every rank, KERAS_BACKEND=torch) ---------------------------------


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _memory_case(load) -> tuple:
    from keras_tensor_parallel.loading.memory_torch import PeakLocal

    with PeakLocal() as mem:
        tp = load()
    local = [v.value for v in tp.wrapped_model.variables]
    return tp, {
        "ratio": mem.ratio(),
        "peak": mem.peak,
        "check_peak": mem.check_peak,
        "final": mem.final,
        "rss_growth": mem.rss_growth,
        "held": sum(t.numel() * t.element_size() for t in local),
        "largest": max(t.numel() * t.element_size() for t in local),
    }


def _shapes_ok(tp) -> list:
    """Split variables whose local shape is not this rank's shard."""
    from keras_tensor_parallel.backends.torch_collectives import rank
    from keras_tensor_parallel.backends.torch_roles import shard_sizes

    bad = []
    variables = {v.path: v for v in tp.wrapped_model.variables}
    for entry in tp.plan:
        shape = list(entry.shape)
        if entry.is_split:
            shape[entry.split_dim] = shard_sizes(shape[entry.split_dim], 2)[
                rank()
            ]
        if list(variables[entry.path].value.shape) != shape:
            bad.append(entry.path)
    return bad


def _lm_case(path) -> dict:
    import keras_hub
    import torch

    from keras_tensor_parallel import TensorParallelKeras, catalogue

    tp, out = _memory_case(
        lambda: TensorParallelKeras.from_preset(path, world_size=2)
    )
    single = keras_hub.models.CausalLM.from_preset(path)
    x = catalogue.get("opt-125m").tiny().inputs(batch=2, seq=8)
    with torch.no_grad():
        want, got = _np(single(x)), _np(tp(x))
    prompt = {
        "token_ids": x["token_ids"],
        "padding_mask": np.arange(8)[None, :] < np.array([[3], [5]]),
    }
    single.compile(sampler="greedy")
    tp.compile(sampler="greedy")
    gen = [
        np.asarray(m.generate(prompt, stop_token_ids=None)["token_ids"])
        for m in (single, tp)
    ]
    weights = tp.get_weights()  # gathered: every rank takes part
    out.update(
        split=[e.path for e in tp.plan if e.is_split],
        bad_shapes=_shapes_ok(tp),
        rel=_rel(got, want),
        greedy=gen[1].tolist(),
        greedy_ref=gen[0].tolist(),
        prompt_len=[3, 5],
        same_weights=all(
            np.array_equal(a, np.asarray(b))
            for a, b in zip(weights, single.get_weights())
        ),
    )
    return out


def _wrap_case(path) -> dict:
    """The measurement can fail: building whole on each rank, then
    wrapping, holds every split variable whole first."""
    import keras_hub

    from keras_tensor_parallel import TensorParallelKeras

    _, out = _memory_case(
        lambda: TensorParallelKeras(
            keras_hub.models.CausalLM.from_preset(path), world_size=2
        )
    )
    return out


def _backbone_case(path) -> dict:
    import keras_hub
    import torch

    from keras_tensor_parallel import TensorParallelKeras, catalogue

    tp = TensorParallelKeras.from_preset(path, world_size=2)
    single = keras_hub.models.Backbone.from_preset(path)
    x = catalogue.get("gpt2").tiny().inputs(batch=2, seq=8)
    with torch.no_grad():
        rel = _rel(_np(tp(x)), _np(single(x)))
    vocab = [e for e in tp.plan if e.role.value == "vocab"]
    return {"rel": rel, "vocab": [list(e.shape) for e in vocab]}


def _hf_case(path) -> dict:
    """A Hugging Face directory (safetensors) KerasHub converts; Gemma's
    single kv head cannot split on torch, so attention is replicated."""
    import keras_hub
    import torch

    from keras_tensor_parallel import TensorParallelKeras, catalogue

    tp, out = _memory_case(
        lambda: TensorParallelKeras.from_preset(
            path, world_size=2, overrides={".*attention.*": "replicated"}
        )
    )
    single = keras_hub.models.Backbone.from_preset(path)
    x = catalogue.get("gemma-small").tiny().inputs(batch=2, seq=8)
    with torch.no_grad():
        out["rel"] = _rel(_np(tp(x)), _np(single(x)))
    out["split"] = [e.path for e in tp.plan if e.is_split]
    out["bad_shapes"] = _shapes_ok(tp)
    return out


def _build_case(weights) -> dict:
    import keras
    import torch

    from keras_tensor_parallel import TensorParallelKeras, catalogue

    tp, out = _memory_case(
        lambda: TensorParallelKeras.build(
            catalogue.seed_attention, weights=weights, world_size=2
        )
    )
    single = catalogue.seed_attention()
    if weights.endswith(".keras"):
        single = keras.saving.load_model(weights)
    else:
        single.load_weights(weights)
    x = catalogue.get("seed-attention").inputs(batch=4, seed=1)
    with torch.no_grad():
        out["rel"] = _rel(_np(tp(x)), _np(single(x)))
    out["bad_shapes"] = _shapes_ok(tp)
    return out


def _init_case() -> dict:
    """No weights file: initializers draw each shard at its local shape,
    with the full shape's scale and a seed of its own per rank."""
    import keras
    import torch.distributed as dist

    from keras_tensor_parallel import TensorParallelKeras, catalogue

    keras.utils.set_random_seed(11)
    tp, out = _memory_case(
        lambda: TensorParallelKeras.build(catalogue.seed_mlp, world_size=2)
    )
    entry = next(e for e in tp.plan if e.is_split and len(e.shape) == 2)
    kernel = next(v for v in tp.wrapped_model.variables if v.path == entry.path)
    local = _np(kernel.value)
    shards: list = [None, None]
    dist.all_gather_object(shards, local.tolist())
    full = np.asarray(kernel)  # gathered
    fan_in, fan_out = entry.shape
    out.update(
        path=entry.path,
        shards_differ=not np.array_equal(*map(np.asarray, shards)),
        std=float(full.std()),
        glorot_std=float(np.sqrt(2.0 / (fan_in + fan_out))),
        bias_zero=all(
            not np.any(_np(v.value))
            for v in tp.wrapped_model.variables
            if v.path.endswith("bias")
        ),
    )
    return out


def _odd_case(path, name: str) -> dict:
    """Shared kv heads (copies=2) or a fused gate/up bank (parts=2) read
    straight into shards; forward and one SGD step (the shared block's
    gradient summed over its holders) against one process."""
    import keras
    import keras_hub
    import torch
    import torch_ckpt_cases as cases

    from keras_tensor_parallel import TensorParallelKeras

    single = keras_hub.models.Backbone.from_preset(path)
    plan = cases._shared_plan(single, 2) if name == "shared" else None
    tp, out = _memory_case(
        lambda: TensorParallelKeras.from_preset(path, world_size=2, plan=plan)
    )
    x, y = cases._hub_data()
    with torch.no_grad():
        out["rel"] = _rel(_np(tp(x)), _np(single(x)))
    for model in (tp, single):
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    out["trained"] = max(
        _rel(a, b) for a, b in zip(tp.get_weights(), single.get_weights())
    )
    out["odd"] = {
        e.path: [e.copies, getattr(e, "parts", 1)]
        for e in tp.plan
        if e.copies > 1 or getattr(e, "parts", 1) > 1
    }
    out["local"] = {
        v.path: list(v.value.shape) for v in tp.wrapped_model.variables
    }
    return out


def _bad_case(edited, missing) -> dict:
    from keras_tensor_parallel import TensorParallelKeras

    out = {}
    for key, path in (("edited", edited), ("missing", missing)):
        try:
            TensorParallelKeras.from_preset(path, world_size=2)
            out[key] = "no error"
        except ValueError as e:
            out[key] = str(e)
    return out


def worker(folder: str) -> None:
    import torch.distributed as dist

    from keras_tensor_parallel.backends import torch_collectives as tc

    tc.ensure_process_group()
    join = lambda name: os.path.join(folder, name)  # noqa: E731
    res = {
        "lm": _lm_case(join("opt_lm")),
        "wrap": _wrap_case(join("opt_lm")),
        "backbone": _backbone_case(join("gpt2")),
        "hf": _hf_case(join("hf_gemma")),
        "h5": _build_case(join("attention.weights.h5")),
        "keras": _build_case(join("attention.keras")),
        "init": _init_case(),
        "bad": _bad_case(join("edited"), join("missing")),
        "shared": _odd_case(join("qwen3_shared"), "shared"),
        "fused": _odd_case(join("qwen3_moe"), "fused"),
    }
    with open(join(f"result.{dist.get_rank()}.json"), "w") as f:
        json.dump(res, f)


# Tests (the pytest process, JAX) ------------------------------------------


def _write_inputs(folder) -> None:
    import keras
    import torch_ckpt_cases as cases

    from keras_tensor_parallel import catalogue

    keras.utils.set_random_seed(0)
    lm = catalogue.causal_lm(catalogue.get("opt-125m").tiny().build())
    lm.save_to_preset(str(folder / "opt_lm"))
    keras.utils.set_random_seed(2)  # vocab 1001: split unevenly (501, 500)
    catalogue.get("gpt2").tiny().build().save_to_preset(str(folder / "gpt2"))
    keras.utils.set_random_seed(0)
    gemma = catalogue.get("gemma-small").tiny()
    gemma.build().export_to_transformers(str(folder / "hf_gemma"))
    keras.utils.set_random_seed(5)
    model = catalogue.seed_attention()
    model.save(str(folder / "attention.keras"))
    model.save_weights(str(folder / "attention.weights.h5"))
    cases.write_presets(folder)  # qwen3_shared, qwen3_moe
    # The LM preset with a config whose feed-forward width differs.
    shutil.copytree(folder / "opt_lm", folder / "edited")
    for name in ("config.json", "task.json"):
        file = folder / "edited" / name
        file.write_text(
            file.read_text().replace(
                '"intermediate_dim": 128', '"intermediate_dim": 96'
            )
        )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results, and the digest of the edited preset before and
    after the failed load."""
    from ranks import launch

    folder = tmp_path_factory.mktemp("torch_loading")
    _write_inputs(folder)
    before = _digest(folder / "edited")
    proc = launch(HERE, str(folder), backend="torch", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [
        json.loads((folder / f"result.{r}.json").read_text()) for r in (0, 1)
    ]
    return results, before, _digest(folder / "edited")


@pytest.mark.torch
def test_preset_into_local_shards_matches_one_device(ranks):
    results, _, _ = ranks
    for res in results:
        lm = res["lm"]
        assert lm["split"] and not lm["bad_shapes"], lm
        assert lm["same_weights"], "gathered weights differ from the file"
        assert lm["rel"] <= 1e-5, lm["rel"]
        assert lm["greedy"] == lm["greedy_ref"], lm
        tokens = np.asarray(lm["greedy"])
        assert np.any(tokens[0, 3:]) and np.any(tokens[1, 5:])  # generated


@pytest.mark.torch
def test_peak_bytes_of_a_rank_stay_its_final_bytes(ranks):
    results, _, _ = ranks
    for res in results:
        for case in ("lm", "h5", "keras", "init"):
            mem = res[case]
            # Every byte held at the end was created by the load.
            assert mem["final"] >= mem["held"], (case, mem)
            assert mem["ratio"] <= 1.05, (case, mem)
            bound = mem["final"] + mem["largest"] + RSS_OVERHEAD
            assert mem["rss_growth"] <= bound, (case, mem)


@pytest.mark.torch
def test_peak_memory_sees_a_whole_copy(ranks):
    results, _, _ = ranks
    for res in results:
        assert res["wrap"]["ratio"] > 1.5, res["wrap"]


@pytest.mark.torch
def test_odd_vocab_and_builders_match_one_device(ranks):
    results, _, _ = ranks
    for res in results:
        assert res["backbone"]["vocab"], res["backbone"]
        assert res["backbone"]["rel"] <= 1e-5, res["backbone"]
        for case in ("h5", "keras"):
            assert not res[case]["bad_shapes"], res[case]
            assert res[case]["rel"] <= 1e-5, (case, res[case])


@pytest.mark.torch
def test_hugging_face_directory_loads_into_local_shards(ranks):
    results, _, _ = ranks
    for res in results:
        hf = res["hf"]
        assert "token_embedding/embeddings" in hf["split"], hf
        assert not hf["bad_shapes"], hf
        assert hf["rel"] <= 1e-5, hf
        assert hf["ratio"] <= 1.05, hf


@pytest.mark.torch
def test_initializers_draw_each_shard_with_the_full_scale(ranks):
    results, _, _ = ranks
    init = results[0]["init"]
    assert init["shards_differ"], init
    assert init["bias_zero"], init
    assert abs(init["std"] / init["glorot_std"] - 1) < 0.1, init
    assert results[0]["init"]["std"] == results[1]["init"]["std"]


@pytest.mark.torch
def test_bad_input_names_what_differs_and_leaves_files(ranks):
    results, before, after = ranks
    assert before == after  # the user's files are untouched
    for res in results:
        assert "has shape" in res["bad"]["edited"], res["bad"]
        assert "does not exist" in res["bad"]["missing"], res["bad"]


@pytest.mark.torch
@pytest.mark.parametrize("name", ["shared", "fused"])
def test_shared_kv_and_fused_experts_load_into_shards(ranks, name):
    results, _, _ = ranks
    for res in results:
        case = res[name]
        assert case["rel"] <= 1e-5 and case["trained"] <= 1e-5, case
        assert case["final"] >= case["held"], case
        assert case["ratio"] <= 1.05, case
        odd, local = case["odd"], case["local"]
        if name == "shared":  # key and value: the one kv head, both ranks
            shared = [p for p, v in odd.items() if v == [2, 1]]
            assert len(shared) == 2, odd
            assert all(local[p] == [32, 1, 8] for p in shared), local
        else:  # the (3, 32, 2 x 16) bank: 8 of each part per rank
            gate = [p for p, v in odd.items() if v == [1, 2]]
            assert len(gate) == 1 and local[gate[0]] == [3, 32, 16], local


if __name__ == "__main__":
    worker(*sys.argv[1:])
