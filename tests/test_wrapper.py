"""TensorParallelKeras behaves like the model it wraps."""

import os
import subprocess
import sys
import textwrap

import jax
import keras
import numpy as np
import pytest
from helpers import (
    all_gather_shapes,
    forward_hlo,
    max_abs_diff,
    rel_tol,
    weight_gathers,
)

from keras_tensor_parallel import (
    AutoTPDistribution,
    TensorParallelKeras,
    plan_model,
    zoo,
)

SMALL_GPT2 = dict(
    vocabulary_size=1001,
    num_layers=2,
    num_heads=4,
    hidden_dim=64,
    intermediate_dim=128,
    max_sequence_length=32,
)


def mlp_data(n=64, seed=0):
    rng = np.random.RandomState(seed)
    return (
        rng.randn(n, 64).astype("float32"),
        rng.randn(n, 32).astype("float32"),
    )


def test_fit_evaluate_predict_match_single_device():
    reference, candidate, _ = zoo.build_pair(zoo.seed_mlp)
    x, y = mlp_data()
    tp = TensorParallelKeras(candidate, world_size=2)
    for m in (reference, tp):
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    h_ref = reference.fit(
        x, y, batch_size=16, epochs=2, shuffle=False, verbose=0
    )
    h_tp = tp.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    np.testing.assert_allclose(
        h_tp.history["loss"], h_ref.history["loss"], rtol=1e-5
    )
    np.testing.assert_allclose(
        tp.evaluate(x, y, verbose=0),
        reference.evaluate(x, y, verbose=0),
        rtol=1e-5,
    )
    expected = reference.predict(x, verbose=0)
    assert max_abs_diff(tp.predict(x, verbose=0), expected) <= rel_tol(expected)
    for got, want in zip(tp.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # Adam moments live on the mesh with their parameter's sharding.
    kernel = tp.wrapped_model.layers[0].kernel
    moments = [v for v in tp.optimizer.variables if tuple(v.shape) == (64, 128)]
    assert moments
    for m in moments:
        assert m.value.sharding.is_equivalent_to(kernel.value.sharding, 2)
        assert [s.data.shape for s in m.value.addressable_shards] == [
            (64, 64),
            (64, 64),
        ]
    loss = tp.train_on_batch(x[:16], y[:16])
    assert np.isfinite(loss)


def test_wrapping_a_trained_model_reshards_its_optimizer_state():
    model = zoo.seed_mlp()
    x, y = mlp_data()
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, verbose=0)
    tp = TensorParallelKeras(model, world_size=2)
    slots = [
        v for v in model.optimizer.variables if tuple(v.shape) == (64, 128)
    ]
    assert slots
    for v in slots:
        assert [s.data.shape for s in v.value.addressable_shards] == [
            (64, 64),
            (64, 64),
        ]
    tp.compile(optimizer="adam", loss="mse")
    tp.fit(x, y, epochs=1, verbose=0)


def test_set_weights_and_summary(capsys):
    reference, candidate, weights = zoo.build_pair(zoo.seed_embedding)
    tp = TensorParallelKeras(candidate, world_size=4)
    new = [w * 0.5 for w in weights]
    tp.set_weights(new)
    for got, want in zip(tp.get_weights(), new):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="must have shape"):
        tp.set_weights([w[:1] for w in new])
    tp.summary()
    out = capsys.readouterr().out
    assert "per device" in out and "left replicated" in out


def test_device_ids_pick_devices():
    _, candidate, _ = zoo.build_pair(zoo.seed_mlp)
    tp = TensorParallelKeras(candidate, device_ids=["cpu:2", "cpu:3"])
    assert tp.world_size == 2
    kernel = candidate.layers[0].kernel
    devices = {d.id for d in kernel.value.sharding.device_set}
    assert devices == {2, 3}


def test_default_world_size_is_all_devices():
    _, candidate, _ = zoo.build_pair(zoo.seed_mlp)
    tp = TensorParallelKeras(candidate)
    assert tp.world_size == len(jax.devices()) == 4


def test_save_loads_on_one_device_without_this_library(tmp_path):
    reference, candidate, _ = zoo.build_pair(lambda: zoo.gpt2(**SMALL_GPT2))
    tp = TensorParallelKeras(candidate, world_size=2)
    x = zoo._token_inputs(1001)(2, 16, 0)
    expected = np.asarray(tp(x))
    path = tmp_path / "gpt2_tp.keras"
    tp.save(path)
    np.save(tmp_path / "expected.npy", expected)
    np.savez(tmp_path / "x.npz", **x)
    script = textwrap.dedent(
        f"""
        import sys, numpy as np, keras
        import keras_hub  # registers the GPT2Backbone class
        model = keras.saving.load_model({str(path)!r})
        emb = model.get_layer("token_embedding").embeddings
        assert tuple(emb.shape) == (1001, 64), emb.shape
        x = dict(np.load({str(tmp_path / "x.npz")!r}))
        got = np.asarray(model(x))
        want = np.load({str(tmp_path / "expected.npy")!r})
        diff = float(np.abs(got - want).max())
        assert diff <= 1e-5 * max(1, np.abs(want).max()), diff
        assert "keras_tensor_parallel" not in sys.modules
        print("OK", diff)
        """
    )
    env = dict(os.environ, XLA_FLAGS="", KERAS_BACKEND="jax")
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout


def test_distribution_scope_shards_at_creation():
    # Plans are matched by variable path: build both in a fresh name scope
    # so auto-generated layer names agree (KerasHub models name layers).
    keras.backend.clear_session()
    keras.utils.set_random_seed(3)
    reference = zoo.seed_attention()
    plan = plan_model(reference, 2)
    dist = AutoTPDistribution(plan)
    keras.backend.clear_session()
    with dist.scope():
        model = zoo.seed_attention()
    for v, entry in zip(model.variables, plan):
        assert v.path == entry.path
        want = entry.per_device_shape(2)
        assert [tuple(s.data.shape) for s in v.value.addressable_shards] == [
            want,
            want,
        ], v.path
    model.set_weights(reference.get_weights())
    x = zoo.get("seed-attention").inputs(4, 0, 0)
    with dist.scope():
        got = np.asarray(model(x))
    expected = np.asarray(reference(x))
    assert max_abs_diff(got, expected) <= rel_tol(expected)


def test_weight_gather_detector_flags_a_forced_gather():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    _, candidate, _ = zoo.build_pair(zoo.seed_mlp)
    tp = TensorParallelKeras(candidate, world_size=2)
    kernel = candidate.layers[0].kernel
    mesh = tp.engine.mesh.backend_mesh

    def gathers_weight(w, x):
        w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))
        return x @ w

    x = jax.device_put(np.ones((4, 64), "float32"), NamedSharding(mesh, P()))
    hlo = jax.jit(gathers_weight).lower(kernel.value, x).compile().as_text()
    assert ("f32", (64, 128)) in all_gather_shapes(hlo)
    assert weight_gathers(tp, hlo) == [kernel.path]


def test_model_attributes_are_the_wrapped_models():
    model = zoo.seed_mlp()
    tp = TensorParallelKeras(model, world_size=2)
    assert tp.inputs == model.inputs and tp.outputs == model.outputs
    assert tp.input_shape == model.input_shape == (None, 64)
    assert tp.output_shape == model.output_shape
    first = model.layers[0]
    assert tp.get_layer(first.name) is first
    assert tp.get_layer(index=1) is model.layers[1]


def test_odd_vocab_counts_real_parameters():
    from keras_tensor_parallel import catalogue

    model = catalogue.get("gpt2").tiny().build()
    want = model.count_params()
    tp = TensorParallelKeras(model, world_size=2)
    table = tp.get_layer("token_embedding").embeddings
    assert tp.plan[table.path].padded_shape == (1002, 64)  # stored padded
    assert tp.count_params() == want
    assert np.asarray(table).shape == (1001, 64)
    assert tuple(table.shape) == (1001, 64)  # the logical shape
    with tp.engine.scope():  # Keras's stateless paths see the stored one
        assert tuple(table.shape) == tuple(table.value.shape) == (1002, 64)


@pytest.mark.parametrize("world_size", [2, 4])
def test_odd_vocab_reports_logical_shape_and_runs_as_one_device(
    world_size, tmp_path
):
    # Vocab 1001 is stored padded (1002 at N=2, 1004 at N=4) while every
    # view a user has shows 1001, and training, inference, generation and
    # saving still match one device.
    from keras_tensor_parallel import catalogue

    spec = catalogue.get("gpt2").tiny()
    x = spec.inputs(batch=2, seq=8)
    reference, candidate, _ = zoo.build_pair(
        lambda: catalogue.causal_lm(spec.build())
    )
    tp = TensorParallelKeras(candidate, world_size=world_size)
    table = tp.get_layer("token_embedding").embeddings
    assert tuple(table.value.shape)[0] == -(-1001 // world_size) * world_size
    stored = next(v for v in tp.weights if v.path == table.path)
    for shape in (table.shape, stored.shape, table.numpy().shape):
        assert tuple(shape) == (1001, 64)
    assert np.array(table).shape == (1001, 64)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for m in (reference, tp):
        m.compile(optimizer="adam", loss=loss, sampler="greedy")
    y = x["token_ids"]
    want = reference.fit(x, y, epochs=2, verbose=0).history["loss"]
    got = tp.fit(x, y, epochs=2, verbose=0).history["loss"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert tuple(table.shape) == (1001, 64)  # still, after training
    for r, t in zip(reference.get_weights(), tp.get_weights()):
        assert r.shape == t.shape and max_abs_diff(r, t) <= rel_tol(r)
    ref_loss = reference.evaluate(x, y, verbose=0)
    ref_loss = ref_loss[0] if isinstance(ref_loss, list) else ref_loss
    np.testing.assert_allclose(tp.evaluate(x, y, verbose=0), ref_loss, 1e-5)
    expected = reference.predict(x, verbose=0)
    out = tp.predict(x, verbose=0)
    assert out.shape == expected.shape == (2, 8, 1001)
    assert max_abs_diff(out, expected) <= rel_tol(expected)
    prompt = dict(x, padding_mask=np.arange(8)[None, :].repeat(2, 0) < 4)
    tokens = [
        np.asarray(
            m.generate(prompt, max_length=8, stop_token_ids=None)["token_ids"]
        )
        for m in (reference, tp)
    ]
    np.testing.assert_array_equal(tokens[1], tokens[0])
    tp.save(tmp_path / "lm.keras")
    loaded = keras.saving.load_model(tmp_path / "lm.keras")
    emb = loaded.get_layer("token_embedding").embeddings
    assert tuple(emb.shape) == (1001, 64)
    assert max_abs_diff(loaded.predict(x, verbose=0), out) <= rel_tol(out)


# LoRA ---------------------------------------------------------------------


def lora_model():
    """Heads (EinsumDense), their row projection and an MLP, LoRA on all
    four; lora_kernel_b set non-zero so the adapters change the output."""
    keras.utils.set_random_seed(3)
    x = keras.Input((4, 8))
    q = keras.layers.EinsumDense("btd,dnh->btnh", (4, 4, 2), name="q")(x)
    o = keras.layers.EinsumDense("btnh,nhd->btd", (4, 8), name="o")(q)
    h = keras.layers.Dense(16, activation="relu", name="up")(o)
    model = keras.Model(x, keras.layers.Dense(8, name="down")(h))
    for name in ("q", "o", "up", "down"):
        layer = model.get_layer(name)
        layer.enable_lora(rank=2)
        b = layer.lora_kernel_b
        b.assign(np.random.RandomState(1).randn(*b.shape) * 0.3)
    return model


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_lora_splits_with_its_kernel_and_trains_like_one_device(
    sequence_parallel,
):
    reference, candidate = lora_model(), lora_model()
    tp = TensorParallelKeras(
        candidate, world_size=2, sequence_parallel=sequence_parallel
    )
    shapes = {v.path: tp.engine.shard_shapes(v)[0] for v in candidate.variables}
    assert shapes["q/kernel"] == (8, 2, 2)  # heads
    assert shapes["q/lora_kernel_a"] == (8, 2, 2)  # (d, n/2, r)
    assert shapes["q/lora_kernel_b"] == (2, 2)  # replicated (r, h)
    assert shapes["o/lora_kernel_a"] == (2, 2, 2)  # row: (n/2, h, r)
    assert shapes["up/lora_kernel_a"] == (8, 2)  # column: a whole
    assert shapes["up/lora_kernel_b"] == (2, 8)  # b split
    assert shapes["down/kernel"] == (8, 8)
    assert shapes["down/lora_kernel_a"] == (8, 2)  # row: a split
    assert shapes["down/lora_kernel_b"] == (2, 8)
    rng = np.random.RandomState(0)
    x = rng.randn(16, 4, 8).astype("float32")
    y = rng.randn(16, 4, 8).astype("float32")
    want = reference.predict(x, verbose=0)
    got = tp.predict(x, verbose=0)
    assert max_abs_diff(got, want) <= rel_tol(want, 1e-5)
    # Sequence parallel: the row edges reduce-scatter over the sequence.
    scattered = "reduce-scatter" in forward_hlo(tp, x)
    assert scattered == sequence_parallel
    for m in (reference, tp):
        m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for r, c in zip(reference.variables, candidate.variables):
        np.testing.assert_allclose(
            tp.engine.to_numpy(c), r.numpy(), rtol=1e-4, atol=1e-5
        )
    moved = reference.get_layer("up").lora_kernel_b.numpy()
    assert np.abs(moved - lora_model().get_layer("up").lora_kernel_b).max()


def test_lora_on_a_padded_split_is_refused():
    x = keras.Input((4, 8))
    q = keras.layers.EinsumDense("btd,dnh->btnh", (4, 3, 3), name="q")(x)
    o = keras.layers.EinsumDense("btnh,nhd->btd", (4, 8), name="o")(q)
    model = keras.Model(x, o)
    model.get_layer("q").enable_lora(rank=2)
    with pytest.raises(ValueError, match="LoRA .* padded"):
        plan_model(model, 2)  # 3 heads on 2 devices: padded to 4
