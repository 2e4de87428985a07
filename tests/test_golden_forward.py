"""Golden forward tests: TP output vs an independently built single-device
model with the same weights, plus proof of real sharding and of no weight
all-gather in the compiled forward step."""

import keras
import numpy as np
import pytest
from helpers import (
    forward_hlo,
    max_abs_diff,
    per_device_param_bytes,
    rel_tol,
    split_dim_shards_ok,
    weight_gathers,
)

from keras_tensor_parallel import TensorParallelKeras, zoo

SMALL_BERT = dict(
    vocabulary_size=1000,
    num_layers=2,
    num_heads=4,
    hidden_dim=64,
    intermediate_dim=128,
    max_sequence_length=64,
)

CASES = {
    "seed-mlp": (zoo.seed_mlp, zoo.get("seed-mlp").inputs),
    "seed-attention": (zoo.seed_attention, zoo.get("seed-attention").inputs),
    "seed-einsum": (zoo.seed_einsum, zoo.get("seed-einsum").inputs),
    "seed-embedding": (zoo.seed_embedding, zoo.get("seed-embedding").inputs),
    "bert-small": (
        lambda: zoo.bert(**SMALL_BERT),
        zoo._token_inputs(1000, with_segments=True),
    ),
    "roberta-small": (
        lambda: zoo.roberta(**SMALL_BERT),
        zoo._token_inputs(1000),
    ),
}


def check_tp_forward(build, make_inputs, n, *, seed=0, batch=4, seq=16):
    reference, candidate, _ = zoo.build_pair(build, seed=seed)
    x = make_inputs(batch, seq, seed)
    expected = [np.asarray(t) for t in keras.tree.flatten(reference(x))]
    tp = TensorParallelKeras(candidate, world_size=n)
    got = [np.asarray(t) for t in keras.tree.flatten(tp(x))]
    assert [g.shape for g in got] == [e.shape for e in expected]
    diff = max(max_abs_diff(g, e) for g, e in zip(got, expected))
    bound = min(rel_tol(e) for e in expected)
    assert diff <= bound, f"max abs diff {diff} > {bound}"
    assert all(np.isfinite(g).all() for g in got)

    # Real sharding: every split variable holds 1/N of its split dim.
    assert split_dim_shards_ok(tp, n) == []
    assert tp.plan.split, "the plan split nothing"
    per_device = per_device_param_bytes(tp)
    assert len(per_device) == n
    for device_bytes in per_device.values():
        assert device_bytes == tp.plan.per_device_bytes

    # Megatron-like: the compiled forward gathers no weight.
    hlo = forward_hlo(tp, x)
    assert weight_gathers(tp, hlo) == []
    return tp, diff


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", sorted(CASES))
def test_small_models_forward(name, n):
    build, make_inputs = CASES[name]
    check_tp_forward(build, make_inputs, n)


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_opt_125m_forward(n):
    tp, diff = check_tp_forward(
        zoo.opt, zoo.get("opt-125m").inputs, n, batch=2, seq=16
    )
    assert tp.plan.total_bytes == 125_237_760 * 4


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_gpt2_forward_with_odd_vocab(n):
    tp, _ = check_tp_forward(
        zoo.gpt2, zoo.get("gpt2").inputs, n, batch=2, seq=16
    )
    table = tp.plan["token_embedding/embeddings"]
    assert table.shape == (50257, 768)
    assert table.is_split
    assert table.padded_shape == (-(-50257 // n) * n, 768)
    # User-visible weights keep the logical vocab.
    weights = dict(zip([v.path for v in tp.weights], tp.get_weights()))
    assert weights["token_embedding/embeddings"].shape == (50257, 768)
