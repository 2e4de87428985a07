"""Issue 11: plan without allocating, build straight into shards, load
saved values shard by shard (JAX engine, 4 simulated devices)."""

from __future__ import annotations

import hashlib
import json
import os

import keras
import keras_hub
import numpy as np
import pytest
from helpers import rel_tol, split_dim_shards_ok

from keras_tensor_parallel import catalogue, plan_model
from keras_tensor_parallel.loading import memory, plan_source
from keras_tensor_parallel.model import TensorParallelKeras

N = 4
# RSS the load may add beyond the model's bytes and its largest variable:
# h5py and XLA buffers, compiled initializers, Python objects of the model.
RSS_OVERHEAD = 192 * 2**20

OPT = catalogue.get("opt-125m").tiny()


def _opt_lm(seed: int = 0):
    keras.utils.set_random_seed(seed)
    return catalogue.causal_lm(OPT.build())


@pytest.fixture(scope="module")
def lm_preset(tmp_path_factory):
    """A causal LM preset (task.json + model.weights.h5), no tokenizer."""
    path = str(tmp_path_factory.mktemp("opt_lm"))
    _opt_lm().save_to_preset(path)
    return path


def _tokens(batch=2, seq=8, seed=0):
    return OPT.inputs(batch=batch, seq=seq, seed=seed)


def _live_bytes() -> int:
    return sum(memory.device_bytes().values())


def _digest(folder) -> dict:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


# Planning without allocating --------------------------------------------


def test_plan_source_equals_plan_of_built_model(lm_preset):
    before = _live_bytes()
    plan = plan_source(lm_preset, N)
    # Not one weight allocated: the embedding alone is 256 KiB.
    assert _live_bytes() - before < 64 * 2**10
    reference = plan_model(keras_hub.models.CausalLM.from_preset(lm_preset), N)
    assert plan.to_dict() == reference.to_dict()
    assert plan.split  # the plan does split something


def _config_only(tmp_path, **config):
    """A preset directory with a config.json and no weights."""
    small = keras_hub.models.LlamaBackbone(
        vocabulary_size=128,
        num_layers=1,
        num_query_heads=8,
        num_key_value_heads=8,
        hidden_dim=64,
        intermediate_dim=128,
    )
    path = str(tmp_path / "config_only")
    small.save_to_preset(path)
    os.remove(os.path.join(path, "model.weights.h5"))
    with open(os.path.join(path, "config.json")) as f:
        data = json.load(f)
    data["config"].update(config)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(data, f)
    return path


def test_plan_model_accepts_a_builder():
    before = _live_bytes()
    plan = plan_model(catalogue.seed_mlp, N)
    assert _live_bytes() - before < 8 * 2**10  # the 64x128 kernel: 32 KiB
    reference = plan_model(catalogue.seed_mlp(), N)

    def decisions(p):  # paths differ: Keras numbers the second model's layers
        return [(e.shape, e.axes, e.role) for e in p]

    assert plan.split and decisions(plan) == decisions(reference)


@pytest.mark.slow
def test_plan_config_only_preset_far_larger_than_memory(tmp_path):
    # Llama-3 70B widths (4.2 GB embedding alone) with 2 of its 80 layers:
    # planning allocates nothing, so the width costs no memory.
    path = _config_only(
        tmp_path,
        vocabulary_size=128256,
        num_layers=2,
        num_query_heads=64,
        num_key_value_heads=8,
        hidden_dim=8192,
        intermediate_dim=28672,
    )
    rss = memory.rss_bytes()
    before = _live_bytes()
    plan = plan_source(path, N)
    assert _live_bytes() - before < 2**20
    assert memory.rss_bytes() - rss < 256 * 2**20
    assert plan.total_bytes > 10 * 2**30
    embedding = plan["token_embedding/embeddings"]
    assert embedding.per_device_shape(N) == (128256 // N, 8192)


def test_cli_plans_config_only_preset(tmp_path, capsys):
    from keras_tensor_parallel import cli
    from keras_tensor_parallel.plan import ShardingPlan

    path = _config_only(tmp_path, num_layers=2, hidden_dim=4096)
    before = _live_bytes()
    assert cli.main(["plan", path, "-n", str(N), "--format", "json"]) == 0
    assert _live_bytes() - before < 2**20  # the smallest kernel is 8 MiB
    plan = ShardingPlan.from_json(capsys.readouterr().out)
    assert plan.world_size == N and plan.split


# Loading straight into shards -------------------------------------------


def _load(source, **kwargs):
    if callable(source):
        return TensorParallelKeras.build(source, world_size=N, **kwargs)
    return TensorParallelKeras.from_preset(source, world_size=N, **kwargs)


def test_from_preset_into_shards_matches_one_device(lm_preset):
    with memory.PeakMemory() as mem:
        tp = _load(lm_preset)
    assert mem.ratio() <= 1.05, (mem.peak, mem.final)
    assert tp.plan.split and not split_dim_shards_ok(tp, N)
    variables = tp.wrapped_model.variables
    largest = max(v.value.nbytes for v in variables)
    # Simulated devices live in host memory: their bytes count in RSS.
    device_total = sum(mem.final.values())
    assert mem.rss_growth <= device_total + largest + RSS_OVERHEAD
    single = keras_hub.models.CausalLM.from_preset(lm_preset)
    assert type(tp.wrapped_model) is type(single)
    x = _tokens()
    expected = np.asarray(single(x))
    got = np.asarray(tp(x))
    np.testing.assert_allclose(got, expected, rtol=0, atol=rel_tol(expected))
    prompt = {
        "token_ids": x["token_ids"],
        "padding_mask": np.concatenate(
            [np.ones((2, 3), "int32"), np.zeros((2, 5), "int32")], axis=1
        ),
    }
    single.compile(sampler="greedy")
    tp.wrapped_model.compile(sampler="greedy")
    want = single.generate(prompt, max_length=8, stop_token_ids=None)
    have = tp.wrapped_model.generate(prompt, max_length=8, stop_token_ids=None)
    assert not np.array_equal(want["token_ids"][:, 3:], 0)
    np.testing.assert_array_equal(have["token_ids"], want["token_ids"])


def test_peak_memory_sees_a_whole_copy(lm_preset):
    # The measurement can fail: building whole on one device, then
    # wrapping, holds whole split variables on device 0 first.
    with memory.PeakMemory() as mem:
        model = keras_hub.models.CausalLM.from_preset(lm_preset)
        TensorParallelKeras(model, world_size=N)
    assert mem.ratio() > 2


def test_padded_vocab_preset_matches_one_device(tmp_path):
    # Vocab 1001 does not divide by 4: the table is stored padded.
    spec = catalogue.get("gpt2").tiny()
    keras.utils.set_random_seed(2)
    backbone = spec.build()
    backbone.save_to_preset(str(tmp_path))
    with memory.PeakMemory() as mem:
        tp = _load(str(tmp_path))
    # The padded table is read straight into its shards (zero rows past
    # the vocabulary), never placed whole first.
    assert mem.ratio() <= 1.05, (mem.peak, mem.final)
    assert any(e.padded_shape for e in tp.plan)
    x = spec.inputs(batch=2, seq=8)
    expected = np.asarray(backbone(x))
    np.testing.assert_allclose(
        np.asarray(tp(x)), expected, rtol=0, atol=rel_tol(expected)
    )


def test_backbone_preset_and_model_class(tmp_path):
    keras.utils.set_random_seed(3)
    backbone = OPT.build()
    backbone.save_to_preset(str(tmp_path))
    tp = _load(str(tmp_path))
    assert isinstance(tp.wrapped_model, keras_hub.models.Backbone)
    x = _tokens()
    expected = np.asarray(backbone(x))
    np.testing.assert_allclose(
        np.asarray(tp(x)), expected, rtol=0, atol=rel_tol(expected)
    )
    lm = _load(str(tmp_path), model_class=keras_hub.models.CausalLM)
    assert isinstance(lm.wrapped_model, keras_hub.models.CausalLM)


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_build_with_weights_file(tmp_path, suffix):
    def make():
        return catalogue.seed_attention()

    keras.utils.set_random_seed(5)
    source = make()
    path = str(tmp_path / f"model{suffix}")
    if suffix == ".keras":
        source.save(path)
    else:
        source.save_weights(path)
    with memory.PeakMemory() as mem:
        tp = _load(make, weights=path)
    assert mem.ratio() <= 1.05
    x = catalogue.get("seed-attention").inputs(batch=4, seed=1)
    expected = np.asarray(source(x))
    np.testing.assert_allclose(
        np.asarray(tp(x)), expected, rtol=0, atol=rel_tol(expected)
    )


def test_build_without_weights_initializes_into_shards():
    def make():
        keras.utils.set_random_seed(11)
        return catalogue.seed_mlp()

    with memory.PeakMemory() as mem:
        tp = _load(make)
    assert mem.ratio() <= 1.05
    assert tp.plan.split
    eager = make()  # same seeds, built the ordinary way on one device
    for got, want in zip(tp.get_weights(), eager.get_weights()):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_hugging_face_directory_loads_into_shards(tmp_path):
    # A larger vocabulary than the tiny default: about 9 KiB of transient
    # arrays on device 0 (not weights) would be 7% of a 120 KiB shard.
    spec = catalogue.get("gemma-small").tiny(vocabulary_size=8192)
    keras.utils.set_random_seed(0)
    spec.build().export_to_transformers(str(tmp_path))
    # KerasHub's own conversion on one device is the reference.
    single = keras_hub.models.Backbone.from_preset(str(tmp_path))
    with memory.PeakMemory() as mem:
        tp = _load(str(tmp_path))
    assert mem.ratio() <= 1.05
    assert tp.plan.split and not split_dim_shards_ok(tp, N)
    x = spec.inputs(batch=2, seq=8)
    expected = np.asarray(single(x))
    np.testing.assert_allclose(
        np.asarray(tp(x)), expected, rtol=0, atol=rel_tol(expected)
    )


# Bad input --------------------------------------------------------------


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        _load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="config.json"):
        _load(str(tmp_path))
    (tmp_path / "config.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="registered_name"):
        _load(str(tmp_path))
    with pytest.raises(ValueError, match="weights must be"):
        _load(catalogue.seed_mlp, weights=str(tmp_path / "config.json"))


def test_config_only_preset_cannot_be_loaded(tmp_path):
    path = _config_only(tmp_path)
    with pytest.raises(ValueError, match="no model.weights.h5"):
        _load(path)


def test_mismatched_weights_name_what_differs_and_leave_nothing(
    lm_preset, tmp_path
):
    # The same preset with a config whose feed-forward width differs from
    # the saved weights.
    path = tmp_path / "edited"
    os.makedirs(path)
    for name in os.listdir(lm_preset):
        data = open(os.path.join(lm_preset, name), "rb").read()
        if name in ("config.json", "task.json"):
            data = data.replace(
                b'"intermediate_dim": 128', b'"intermediate_dim": 96'
            )
        (path / name).write_bytes(data)
    digest = _digest(path)
    keras.utils.set_random_seed(0)
    before = memory.device_bytes()
    with pytest.raises(ValueError, match=r"has shape .*expects"):
        _load(str(path))
    assert _digest(path) == digest  # the user's files are untouched
    # Nothing half-loaded: no device holds more than before.
    import gc

    gc.collect()
    after = memory.device_bytes()
    assert all(after.get(d, 0) <= n for d, n in before.items())


def test_weights_of_another_model_name_the_variables(tmp_path):
    keras.utils.set_random_seed(0)
    path = str(tmp_path / "mlp.weights.h5")
    catalogue.seed_mlp().save_weights(path)
    with pytest.raises(ValueError, match="do not match the model"):
        _load(catalogue.seed_einsum, weights=path)


def test_auto_size_is_chosen_from_shapes_before_loading(lm_preset, capsys):
    from keras_tensor_parallel import autosize
    from keras_tensor_parallel.devices import resolve_devices
    from keras_tensor_parallel.plan import format_bytes

    ids = resolve_devices(world_size=2)
    # What the constructor's "auto" measures on the built models.
    mlp = [autosize.measure(catalogue.seed_mlp(), ids, t) for t in (1, 2)]
    single = keras_hub.models.CausalLM.from_preset(lm_preset)
    # One device: one size to try (each try compiles a train step).
    lm = autosize.measure(single, ids[:1], 1)
    assert mlp[0].total > mlp[1].total
    budget = (mlp[0].total + mlp[1].total) // 2  # T=1 does not fit
    capsys.readouterr()
    tp = TensorParallelKeras.build(
        catalogue.seed_mlp, world_size=2, tensor_parallel_size="auto",
        device_memory=budget)  # fmt: skip
    # Measured on the unallocated model: the very figures of the built
    # one, printed before a shard existed; then built at T=2.
    shown = capsys.readouterr().out
    assert autosize.Choice(2, budget, tuple(mlp)).table() in shown
    assert tp.tensor_parallel_size == 2 and tp.plan.split
    assert not split_dim_shards_ok(tp, 2)
    del tp
    before = _live_bytes()
    with pytest.raises(ValueError, match="smallest need is") as info:
        TensorParallelKeras.from_preset(
            lm_preset, world_size=1, tensor_parallel_size="auto",
            device_memory=lm.total - 1)  # fmt: skip
    assert format_bytes(lm.total) in str(info.value)
    # Nothing was placed (a few bytes: jit constants of the measurement).
    assert _live_bytes() <= before + 2**16 < before + lm.params
