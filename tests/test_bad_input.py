"""Bad input: a ValueError naming the rule and the received value, and the
user's model left exactly as it was."""

import keras
import numpy as np
import pytest

from keras_tensor_parallel import TensorParallelKeras, plan_model, zoo


def snapshot(model):
    return [
        (v.path, tuple(v.shape), str(v.value.sharding), np.asarray(v).copy())
        for v in model.variables
    ]


def assert_unchanged(model, before):
    after = snapshot(model)
    assert [a[:3] for a in after] == [b[:3] for b in before]
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a[3], b[3])
    assert not getattr(model, "_tp_wrapped", False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"world_size": 0}, "world_size must be >= 1. Received: world_size=0"),
        ({"world_size": -2}, "Received: world_size=-2"),
        ({"world_size": "2"}, "positive integer. Received: world_size='2'"),
        ({"world_size": 2.0}, "Received: world_size=2.0"),
        ({"world_size": 5}, "larger than the 4 devices"),
        ({"device_ids": ["cpu:0", "cpu:9"]}, r"Unknown device ids \['cpu:9'\]"),
        ({"device_ids": ["cpu:1", "cpu:1"]}, r"repeated: \['cpu:1'\]"),
        ({"device_ids": []}, "must not be empty"),
        ({"device_ids": "cpu:0"}, "list of device id strings"),
        (
            {"world_size": 3, "device_ids": ["cpu:0", "cpu:1"]},
            r"must equal len\(device_ids\)",
        ),
        ({"distributed_backend": "mpi"}, "distributed_backend=.mpi."),
        ({"distributed_backend": "torch"}, "does not match the Keras backend"),
        ({"distributed_backend": 2}, "must be a string"),
        # Issue 13: inputs that slipped through.
        (
            {"world_size": 2.0, "device_ids": ["cpu:0", "cpu:1"]},
            "positive integer. Received: world_size=2.0",
        ),
        ({"world_size": True}, "positive integer. Received: world_size=True"),
        (
            {"world_size": True, "device_ids": ["cpu:0"]},
            "Received: world_size=True",
        ),
        (
            {"world_size": "2", "device_ids": ["cpu:0", "cpu:1"]},
            "positive integer. Received: world_size='2'",
        ),
        ({"overrides": {1: "row"}}, "Received: overrides key 1"),
        (
            {"plan": "auto"},
            "plan must be a ShardingPlan.*Received: plan='auto'",
        ),
        ({"plan": {"world_size": 2}}, "Received: plan=\\{'world_size'"),
        (
            {"device_ids": (d for d in ["cpu:0", "cpu:1"])},
            "list of device id strings.*Received: device_ids=<generator",
        ),
        ({"device_ids": ["cpu:0", 1]}, "Received: device_ids=\\['cpu:0', 1\\]"),
    ],
)
def test_bad_arguments_leave_model_unchanged(kwargs, match):
    model = zoo.seed_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        TensorParallelKeras(model, **kwargs)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "name, match",
    [
        # "pytorch" means torch: under JAX that is the backend mismatch.
        ("pytorch", "distributed_backend='torch' does not match"),
        ("PyTorch", "distributed_backend='torch' does not match"),
        # "tf" means tensorflow: under JAX, the backend mismatch too.
        ("tensorflow", "distributed_backend='tensorflow' does not match"),
        ("tf", "distributed_backend='tensorflow' does not match"),
        ("nccl", "'nccl' needs GPUs.*no GPU"),
        ("horovod", "only averages gradients.*tensor_parallel_size"),
        ("fallback", "simulates devices.*not parallelism"),
    ],
)
def test_backend_names_users_write(name, match):
    model = zoo.seed_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match) as err:
        TensorParallelKeras(model, world_size=2, distributed_backend=name)
    assert f"Received: distributed_backend={name!r}" in str(err.value)
    assert_unchanged(model, before)


def test_jax_and_auto_name_the_jax_engine():
    for name in ("jax", "JAX", "auto", None):
        tp = TensorParallelKeras(
            zoo.seed_mlp(), world_size=2, distributed_backend=name
        )
        assert tp.engine.name == "jax"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"overrides": {"nothing/matches": "row"}}, "names no variable"),
        ({"overrides": {".*kernel": ("model",)}}, "one entry per dim"),
        ({"overrides": {"[": "row"}}, "valid regular expressions"),
        ({"overrides": ["not", "a", "dict"]}, "must be a dict"),
    ],
)
def test_bad_overrides_leave_model_unchanged(kwargs, match):
    model = zoo.seed_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        TensorParallelKeras(model, **kwargs)
    assert_unchanged(model, before)


def test_two_overrides_matching_one_variable_name_both():
    model = zoo.seed_mlp()
    path = model.variables[0].path
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        TensorParallelKeras(
            model,
            world_size=2,
            overrides={".*kernel": "replicated", path: "column"},
        )
    assert "'.*kernel'" in str(err.value) and repr(path) in str(err.value)
    assert_unchanged(model, before)


def test_unbuilt_model_is_rejected():
    model = keras.Sequential([keras.layers.Dense(4)])
    with pytest.raises(ValueError, match="must be built"):
        TensorParallelKeras(model, world_size=2)
    with pytest.raises(ValueError, match="must be built"):
        plan_model(model, 2)


def test_not_a_model_is_rejected():
    with pytest.raises(ValueError, match="Expected a Keras model"):
        plan_model("opt", 2)


def test_wrapping_twice_is_rejected():
    model = zoo.seed_mlp()
    TensorParallelKeras(model, world_size=2)
    with pytest.raises(ValueError, match="already tensor-parallel"):
        TensorParallelKeras(model, world_size=2)


def test_nccl_on_gpus_is_the_keras_backends_engine(monkeypatch):
    from keras_tensor_parallel import devices

    # NCCL is what the engines use between GPUs: with GPUs visible, "nccl"
    # names the engine of the Keras backend in use (no GPU here: faked).
    monkeypatch.setattr(
        devices, "available_devices", lambda backend=None: ["gpu:0", "gpu:1"]
    )
    assert devices.validate_backend("nccl") == "jax"
    assert devices.validate_backend("NCCL") == "jax"
