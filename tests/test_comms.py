"""Collective accounting and the one-reduction q/k/v input gradient."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from keras_tensor_parallel import TensorParallelKeras, catalogue, comms
from keras_tensor_parallel.backends import jax_fusion
from keras_tensor_parallel.verify import build_pair

OPT = catalogue.get("opt-125m:tiny")  # 2 blocks, hidden 64, vocab 1000


def _opt(num_layers=2):
    return OPT.variant(num_layers=num_layers).build()


def test_parser_reads_tuple_all_reduce_and_metadata():
    text = (
        "%all-reduce.7 = (f32[2,16,64]{2,1,0}, f32[2,16,64]{2,1,0}) "
        "all-reduce(f32[2,16,64]{2,1,0} %a, f32[2,16,64]{2,1,0} %b), "
        "channel_id=3, replica_groups={{0,1}}, to_apply=%add, "
        'metadata={op_name="jit(train_step)/transpose(jvp(m))/l0/q/dot"}'
    )
    [c] = comms.collectives(text)
    assert c.kind == "all-reduce"
    assert c.shapes == ((2, 16, 64), (2, 16, 64))
    assert c.bytes == 2 * 2 * 16 * 64 * 4
    assert "l0/q" in c.op_name


def test_opt_train_step_is_megatron_minimum_before_after_fusion():
    keras.utils.set_random_seed(0)
    before = comms.analyze(_opt(), 2, fuse_siblings=False)
    keras.utils.set_random_seed(0)
    after = comms.analyze(_opt(), 2)
    # 2 blocks: fwd 2*2 + embedding 1, bwd 2*2 -> 9 x [2, 16, 64] f32.
    assert after.minimum.train_count == 9
    assert after.minimum.train_bytes == 9 * 2 * 16 * 64 * 4
    assert before.ratio_bytes == pytest.approx(13 / 9)
    assert after.ratio_bytes == pytest.approx(1.0)
    assert after.ratio_count == pytest.approx(1.0)
    assert not after.has_weight_gather
    assert "ratio actual/minimum: bytes 1.00x" in after.table()
    assert after.to_dict()["minimum"]["count"] == 9


def test_bad_layout_is_flagged_as_weight_gather():
    keras.utils.set_random_seed(0)
    report = comms.analyze(
        _opt(1), 2, overrides={".*feedforward_layer_norm/gamma": ("model",)}
    )
    assert report.has_weight_gather
    assert "WEIGHT ALL-GATHER" in report.table()


def _grads(model, x, scope=None):
    def loss(trainable):
        out, _ = model.stateless_call(
            trainable, [v.value for v in model.non_trainable_variables], x
        )
        w = jnp.arange(out.size, dtype=out.dtype).reshape(out.shape)
        return jnp.sum(out * w / out.size)

    values = [v.value for v in model.trainable_variables]
    if scope is None:
        return jax.jit(jax.value_and_grad(loss))(values)
    with scope:
        return jax.jit(jax.value_and_grad(loss))(values)


def test_fusion_keeps_forward_and_gradients():
    reference, candidate, _ = build_pair(lambda: _opt(1))
    tp = TensorParallelKeras(candidate, world_size=2)
    assert any(
        getattr(layer, "_tp_fused", False)
        for layer in candidate._flatten_layers()
    )
    x = OPT.inputs(2, 16, 0)
    loss0, g0 = _grads(reference, x)
    loss1, g1 = _grads(candidate, x, tp.engine.scope())
    assert abs(float(loss0) - float(loss1)) <= 1e-4
    for a, b in zip(g0, g1):
        a, b = np.asarray(a), np.asarray(b)[tuple(slice(0, n) for n in a.shape)]
        assert np.max(np.abs(a - b)) <= 1e-5 * (1 + np.max(np.abs(a)))
    assert jax_fusion.uninstall(candidate) == 3
