"""Issue 15 (JAX): data parallel x tensor parallel on a (data, model) mesh.

`TensorParallelKeras(model, world_size=4, tensor_parallel_size=2)` runs the
Megatron plan over the model axis (2 devices) and splits the batch over the
data axis (2 replicas). Every check compares with an independently trained
single-device copy of the same weights, or reads what the devices hold.
"""

import functools
import re

import keras
import numpy as np
import pytest

from keras_tensor_parallel import TensorParallelKeras, catalogue
from keras_tensor_parallel.comms.hlo import collectives, replica_groups
from keras_tensor_parallel.comms.minimum import megatron_minimum
from keras_tensor_parallel.comms.steps import compile_steps
from keras_tensor_parallel.verify.training import null_gradient_variables

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
GLOBAL_BATCH = 12  # per device 12 / data: 12, 6, 3 (no clash with weights)
STEPS = 3


def mlp_case():
    rng = np.random.RandomState(1)
    x = rng.randn(GLOBAL_BATCH, 64).astype("float32")
    y = rng.randn(GLOBAL_BATCH, 32).astype("float32")
    return catalogue.seed_mlp, x, y, "mse"


def lm_case(name):
    spec = catalogue.get(name).variant(dropout=0.0)
    vocab = spec.tiny_config.get("vocabulary_size", spec.vocab)
    rng = np.random.RandomState(2)
    ids = rng.randint(1, vocab, size=(GLOBAL_BATCH, 9)).astype("int32")
    x = catalogue.lm_inputs(ids[:, :-1])
    return catalogue.lm_builder(spec), x, ids[:, 1:], XENT


def twins(build):
    """The same weights in two independently built models."""
    keras.utils.set_random_seed(0)
    single = build()
    parallel = build()
    parallel.set_weights(single.get_weights())
    return single, parallel


def fit(model, x, y, loss):
    # One step per epoch on the same global batch: history has every step.
    # Adam(1e-3) as test_training: lr scales how far rounding noise moves
    # weights whose gradient is near zero.
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    history = model.fit(
        x, y, batch_size=GLOBAL_BATCH, epochs=STEPS, shuffle=False, verbose=0
    )
    return np.asarray(history.history["loss"])


def assert_fit_matches(build, x, y, loss, tp_size, **kwargs):
    single, parallel = twins(build)
    tp = TensorParallelKeras(
        parallel, world_size=4, tensor_parallel_size=tp_size, **kwargs
    )
    # Adam turns an exactly-zero gradient's rounding noise (attention key
    # biases) into full steps of random sign: those weights are left out,
    # as `verify.compare_training` does.
    null = null_gradient_variables(single, x, y, loss)
    want = fit(single, x, y, loss)
    got = fit(tp, x, y, loss)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert want[-1] < want[0]  # it trained: the comparison can fail
    # Per variable max|w_tp - w_ref| / max|w_ref|, as verify measures it.
    pairs = zip(single.weights, single.get_weights(), tp.get_weights())
    for v, w_single, w_tp in pairs:
        if v.path not in null:
            diff = np.max(np.abs(w_tp - w_single))
            assert diff <= 1e-4 * np.max(np.abs(w_single)), v.path
    return tp


# fit equals one device -------------------------------------------------------


@pytest.mark.parametrize("tp_size", [4, 2, 1])
def test_mlp_fit_matches_one_device_on_each_mesh(tp_size):
    build, x, y, loss = mlp_case()
    tp = assert_fit_matches(build, x, y, loss, tp_size)
    mesh = tp.distribution.device_mesh
    assert dict(zip(mesh.axis_names, mesh.shape)) == {
        "data": 4 // tp_size,
        "model": tp_size,
    }
    assert (tp.data_parallel_size, tp.tensor_parallel_size) == (
        4 // tp_size,
        tp_size,
    )
    assert tp.world_size == 4 and tp.plan.world_size == tp_size


@pytest.mark.parametrize(
    "name",
    # GPT-2's odd vocab (1001, padded to 1002): ~40 s more on CPU.
    ["opt-125m:tiny", pytest.param("gpt2:tiny", marks=pytest.mark.slow)],
)
def test_lm_fit_matches_one_device_data2_model2(name):
    build, x, y, loss = lm_case(name)
    tp = assert_fit_matches(build, x, y, loss, 2)
    # The plan really splits over 2 devices inside each replica.
    assert tp.plan.world_size == 2 and any(e.is_split for e in tp.plan)
    # The minimum counts the backbone; a vocab-parallel LM head adds the
    # all-reduce of its input gradient (tokens x hidden) and Megatron's
    # vocab-parallel cross-entropy reductions (max, sum of exp, target
    # logit, one float per token each; one more for the loss).
    seq_len = x["token_ids"].shape[1]
    tokens = GLOBAL_BATCH // 2 * seq_len
    head = tokens * 64 * 4 + 4 * tokens * 4  # hidden 64, float32
    # The data-axis gradient all-reduce (one op) carries one replica's
    # gradients with two differences from its parameter bytes, both XLA's
    # choice: the position table only for the rows looked up (seq_len of
    # 128: less), and the tied token table's shard twice, once per use
    # (lookup and logits), summed after the reduction: one shard more
    # than the ideal (a follow-up: sum the two before reducing).
    by_name = {e.path.split("/")[-2]: e for e in tp.plan}
    tokens_e, positions_e = (
        by_name["token_embedding"],
        by_name["position_embedding"],
    )
    table = np.prod(tokens_e.padded_shape or tokens_e.shape) * 4 // 2
    unused = (positions_e.shape[0] - seq_len) * positions_e.shape[1] * 4
    grad_bytes = entry_param_bytes(tp) + table - unused
    hlo = compile_steps(tp, x, y).train_hlo
    assert_collectives(tp, hlo, seq_len, head=head, grad_bytes=grad_bytes)


# What each device holds and computes -----------------------------------------


def entry_param_bytes(tp) -> int:
    """Ideal parameter bytes per device: split variables 1/model."""
    total = 0
    for v, e in zip(tp.wrapped_model.variables, tp.plan.variables):
        shape = e.padded_shape or e.shape
        full = int(np.prod(shape)) * np.dtype(v.dtype).itemsize
        total += full // tp.tensor_parallel_size if e.is_split else full
    return total


def data_parameter_shapes(hlo: str) -> list:
    """Per-device shapes of the compiled step's last two arguments: the
    step takes `(state, (x, y))`, so they are x and y."""
    entry = hlo[hlo.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    found = re.findall(r"f32\[([\d,]+)\][^\n]* parameter\((\d+)\)", entry)
    shapes = sorted((int(i), s) for s, i in found)
    return [tuple(int(d) for d in s.split(",")) for _, s in shapes[-2:]]


@functools.cache
def compiled_mlp(tp_size):
    """A compiled MLP wrapper on the (4/tp_size, tp_size) mesh and its
    compiled train step, shared by the tests that only read them."""
    build, x, y, _ = mlp_case()
    keras.utils.set_random_seed(0)
    tp = TensorParallelKeras(
        build(), world_size=4, tensor_parallel_size=tp_size
    )
    tp.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return tp, compile_steps(tp, x, y)


@pytest.mark.parametrize("tp_size", [4, 2, 1])
def test_per_device_batch_and_bytes_at_ideal(tp_size):
    tp, steps = compiled_mlp(tp_size)
    # The compiled step takes the per-device share of the global batch.
    per_device = GLOBAL_BATCH // (4 // tp_size)
    assert data_parameter_shapes(steps.train_hlo) == [
        (per_device, 64),
        (per_device, 32),
    ]
    ideal = entry_param_bytes(tp)
    params = tp.engine.per_device_bytes(tp.wrapped_model.variables)
    assert len(params) == 4  # every device holds its share
    assert set(params.values()) == {ideal}
    # Adam: two slots per parameter, laid out as their parameter, plus
    # the replicated scalars (iterations, learning rate).
    optimizer = tp.optimizer.variables
    scalars = sum(
        np.dtype(v.dtype).itemsize for v in optimizer if len(v.shape) == 0
    )
    slots = tp.engine.per_device_bytes(optimizer)
    assert set(slots.values()) == {2 * ideal + scalars}


def as_groups(rows) -> frozenset:
    return frozenset(frozenset(map(int, r)) for r in rows)


def mesh_groups(data: int, model: int) -> dict:
    """Device groups of each mesh axis (devices fill it row-major)."""
    ids = np.arange(data * model).reshape(data, model)
    return {"model": as_groups(ids), "data": as_groups(ids.T)}


def assert_collectives(tp, hlo, seq_len=1, head=0, grad_bytes=None):
    """Per step: the Megatron all-reduces of one replica's share of the
    batch on model-axis groups (between the minimum's forward part and its
    total), plus one all-reduce of each replica's gradients (= its
    per-device parameter bytes) on data-axis groups; scalars (the loss)
    may ride along. Nothing else."""
    data, model = tp.data_parallel_size, tp.tensor_parallel_size
    groups = mesh_groups(data, model)
    on = {"model": [], "data": []}
    for c in collectives(hlo):
        found = replica_groups(hlo, c.name)
        axis = [a for a, g in groups.items() if g == found]
        assert c.kind == "all-reduce" and axis, (c.kind, c.name)
        on[axis[0]].append(c)  # the two axes' groups differ on 4 devices
    minimum = megatron_minimum(
        tp.plan, batch_size=GLOBAL_BATCH // data, seq_len=seq_len
    )
    model_bytes = sum(c.bytes for c in on["model"])
    if model == 1:
        assert not on["model"]
    else:
        low, high = minimum.forward_bytes, minimum.train_bytes + head
        assert low <= model_bytes <= high, (model_bytes, minimum)
    grads = [
        sum(np.prod(s) * 4 for s in c.shapes if s)
        for c in on["data"]
        if any(c.shapes)
    ]
    grad_bytes = grad_bytes or entry_param_bytes(tp)
    assert grads == ([grad_bytes] if data > 1 else [])


@pytest.mark.parametrize("tp_size", [4, 2, 1])
def test_collectives_minimum_on_model_plus_one_gradient_reduction(tp_size):
    tp, steps = compiled_mlp(tp_size)
    assert_collectives(tp, steps.train_hlo)


# Bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, rule",
    [
        (3, "must divide world_size"),
        (8, "must divide world_size"),
        (0, "positive integer"),
        (-2, "positive integer"),
        (2.0, "positive integer"),
        ("2", "positive integer"),
        (True, "positive integer"),
    ],
)
def test_bad_tensor_parallel_size(value, rule):
    model = catalogue.seed_mlp()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=rule) as info:
        TensorParallelKeras(model, world_size=4, tensor_parallel_size=value)
    assert f"Received: tensor_parallel_size={value!r}" in str(info.value)
    # The failed call left the model as it was.
    assert not getattr(model, "_tp_wrapped", False)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert all(len(v.value.sharding.device_set) == 1 for v in model.variables)


def test_plan_for_other_size_is_refused():
    from keras_tensor_parallel.plan import plan_model

    model = catalogue.seed_mlp()
    plan = plan_model(model, 4)
    with pytest.raises(ValueError, match="tensor-parallel size"):
        TensorParallelKeras(
            model, world_size=4, tensor_parallel_size=2, plan=plan
        )


# tensor_parallel_size="auto" -------------------------------------------------


@functools.cache
def mlp_needs():
    """What one device needs at T = 1, 2, 4 (XLA's compiled train step on
    the default example batch), measured once."""
    from keras_tensor_parallel import autosize
    from keras_tensor_parallel.devices import resolve_devices

    keras.utils.set_random_seed(0)
    model = catalogue.seed_mlp()
    ids = resolve_devices(world_size=4)
    return {t: autosize.measure(model, ids, t) for t in (1, 2, 4)}


def test_auto_picks_the_smallest_size_that_fits(capsys):
    needs = mlp_needs()
    # Splitting over more devices needs less on each.
    assert needs[1].total > needs[2].total > needs[4].total
    # A budget between T=2's need and T=1's: T=2, the rest data parallel.
    budget = (needs[1].total + needs[2].total) // 2
    build, x, y, loss = mlp_case()
    single, parallel = twins(build)
    tp = TensorParallelKeras(
        parallel,
        world_size=4,
        tensor_parallel_size="auto",
        device_memory=budget,
    )
    shown = capsys.readouterr().out
    assert (tp.tensor_parallel_size, tp.data_parallel_size) == (2, 2)
    assert "tensor_parallel_size='auto': 2" in shown
    assert "2 x 2" in shown and "<- chosen" in shown and "4 x 4" not in shown
    # The figures behind it are what the devices hold: parameter bytes
    # from the wrapped model's shards; Adam's two slots each as large.
    held = tp.engine.per_device_bytes(tp.wrapped_model.variables)
    assert set(held.values()) == {needs[2].params}
    assert needs[2].optimizer == 2 * needs[2].params + 8  # + step, lr
    # XLA's arguments: those plus this device's share of the batch.
    rows = 4 // 2  # example batch: world_size rows over 2 replicas
    assert needs[2].arguments >= needs[2].params + needs[2].optimizer
    assert needs[2].arguments - needs[2].params - needs[2].optimizer <= (
        rows * (64 + 32) * 4 + 64
    )
    # And it trains as one device does.
    want = fit(single, x, y, loss)
    np.testing.assert_allclose(fit(tp, x, y, loss), want, rtol=1e-5)


def test_auto_string_sizes_and_nothing_fits():
    from keras_tensor_parallel import autosize

    assert autosize.parse_memory("16GB") == 16 * 10**9
    assert autosize.parse_memory("1.5 GiB") == 3 * 2**29
    assert autosize.parse_memory(4096) == 4096
    needs = mlp_needs()
    model = catalogue.seed_mlp()
    before = [w.copy() for w in model.get_weights()]
    smallest = needs[4].total
    with pytest.raises(ValueError, match="smallest need is") as info:
        TensorParallelKeras(
            model,
            world_size=4,
            tensor_parallel_size="auto",
            device_memory=smallest - 1,
        )
    from keras_tensor_parallel.plan import format_bytes

    assert format_bytes(smallest) in str(info.value)
    assert f"device_memory={smallest - 1}" in str(info.value)
    # The measurements wrapped and unwrapped the model: left as it was.
    assert not getattr(model, "_tp_wrapped", False)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert all(len(v.value.sharding.device_set) == 1 for v in model.variables)


@pytest.mark.parametrize(
    "size, memory, rule",
    [
        ("auto", None, "needs device_memory"),
        ("auto", "16XB", "device_memory must be bytes"),
        ("auto", "GB", "device_memory must be bytes"),
        ("auto", 0, "must be positive"),
        ("auto", True, "device_memory must be bytes"),
        (2, "16GB", "read only with tensor_parallel_size='auto'"),
        ("Auto", None, "positive integer, 'auto' or None"),
    ],
)
def test_bad_auto_arguments(size, memory, rule):
    model = catalogue.seed_mlp()
    with pytest.raises(ValueError, match=re.escape(rule)) as info:
        TensorParallelKeras(
            model,
            world_size=4,
            tensor_parallel_size=size,
            device_memory=memory,
        )
    assert "Received: " in str(info.value)
    assert not getattr(model, "_tp_wrapped", False)


def test_auto_is_refused_on_tensorflow_before_any_work():
    from keras_tensor_parallel import devices

    with pytest.raises(ValueError, match="on the tensorflow engine") as info:
        devices.tensor_parallel_size(
            "auto", ["cpu:0", "cpu:1"], "tensorflow", device_memory="16GB"
        )
    assert "computes it on the torch engine" in str(info.value)


# ZeRO stage 1: optimizer slots split over the data axis too -----------------


def test_zero1_fit_matches_one_device_and_slots_are_split_over_all():
    build, x, y, loss = mlp_case()
    tp = assert_fit_matches(build, x, y, loss, 2, zero_stage=1)
    # One replica's Adam state: two slots the size of every parameter,
    # counted from the one-device model; each device holds 1/(2 x 2) of
    # it (every seed-mlp variable divides by 4), plus the two scalars.
    replica = sum(int(np.prod(w.shape)) * 4 for w in build().get_weights())
    held = tp.engine.per_device_bytes(tp.optimizer.variables)
    assert set(held.values()) == {2 * replica // 4 + 8}, held
    # Read from the shards: a slot's shard is a quarter of it.
    for v in tp.optimizer.variables:
        if v.shape:
            (shape,) = set(tp.engine.shard_shapes(v))
            assert np.prod(shape) * 4 == np.prod(v.shape), (v.path, shape)
    # Parameters are as without ZeRO: split over the model axis only.
    params = tp.engine.per_device_bytes(tp.wrapped_model.variables)
    assert set(params.values()) == {entry_param_bytes(tp)}
    # The step: Megatron's all-reduces on the model axis; over the data
    # axis the gradients are reduced and every device gathers its
    # replica's updated parameters back (ZeRO's all-gather).
    hlo = compile_steps(tp, x, y).train_hlo
    gathered = 0
    for c in collectives(hlo):
        assert c.kind in ("all-reduce", "reduce-scatter", "all-gather"), c
        gathered += c.bytes if c.kind == "all-gather" else 0
    assert gathered == entry_param_bytes(tp)


@pytest.mark.parametrize("value", [2, 3, -1, "1", True, 1.0])
def test_bad_zero_stage(value):
    model = catalogue.seed_mlp()
    with pytest.raises(ValueError, match="zero_stage must be 0") as info:
        TensorParallelKeras(
            model, world_size=4, tensor_parallel_size=2, zero_stage=value
        )
    assert f"Received: zero_stage={value!r}" in str(info.value)
    assert not getattr(model, "_tp_wrapped", False)
