"""Train-step collectives of five architectures against the Megatron minimum.

Each case compiles the real `fit` step of a small 2-layer model and counts
every collective in its HLO (`comms.analyze`). The automatic plan must send
exactly the Megatron minimum (bytes and count, ratio 1.00) and never
all-gather a weight. GPT-2 uses an odd vocabulary (1001) as the real one
does (50257), so the padded vocab-parallel table is covered.
"""

import keras
import numpy as np
import pytest
from test_comms import _grads

from keras_tensor_parallel import TensorParallelKeras, catalogue, comms
from keras_tensor_parallel.verify import build_pair

# Every KerasHub family's tiny config: 2 blocks, hidden 64, vocab 1000
# (GPT-2's odd 1001). Llama: grouped-query attention (8 query heads, 4
# key/value heads), SwiGLU. Gemma: heads lead the q/k/v kernels
# (`btd,ndh->btnh`), GeGLU; 4 key/value heads here, so that they split.
GEMMA = catalogue.get("gemma-small:tiny").variant(num_key_value_heads=4)
SPECS = {
    "opt": catalogue.get("opt-125m:tiny"),
    "gpt2": catalogue.get("gpt2:tiny"),
    "bert": catalogue.get("bert-base:tiny"),
    "roberta": catalogue.get("roberta-base:tiny"),
    "llama": catalogue.get("llama-small:tiny"),
    "gemma": GEMMA,
}
BUILDERS = {name: spec.build for name, spec in SPECS.items()}

CASES = [(name, 2) for name in BUILDERS] + [(name, 4) for name in BUILDERS]


@pytest.mark.parametrize("name, n", CASES, ids=[f"{m}-n{n}" for m, n in CASES])
def test_train_step_is_megatron_minimum(name, n):
    keras.utils.set_random_seed(0)
    report = comms.analyze(BUILDERS[name](), n, batch_size=2, seq_len=16)
    # 2 blocks: forward 2 per block + 1 embedding, backward 2 per block.
    assert report.minimum.train_count == 9, report.table()
    assert report.ratio_count == pytest.approx(1.0), report.table()
    assert report.ratio_bytes == pytest.approx(1.0), report.table()
    assert not report.has_weight_gather, report.table()
    kinds = {c.kind for c in report.train + report.forward}
    assert kinds == {"all-reduce"}, report.table()


@pytest.mark.parametrize("n", [2, 4])
def test_heads_first_kernel_fusion_keeps_gradients(n):
    # Gemma's q/k/v kernels are (heads, hidden, head_dim): the fused
    # backward moves the sharded heads dim first before reducing once.
    reference, candidate, _ = build_pair(GEMMA.variant(num_layers=1).build)
    tp = TensorParallelKeras(candidate, world_size=n)
    fused = [
        m for m in candidate._flatten_layers() if getattr(m, "_tp_fused", 0)
    ]
    assert {m.name for m in fused} >= {"query", "key", "value"}
    x = GEMMA.inputs(2, 16, 0)
    loss0, g0 = _grads(reference, x)
    loss1, g1 = _grads(candidate, x, tp.engine.scope())
    assert abs(float(loss0) - float(loss1)) <= 1e-4 * (1 + abs(float(loss0)))
    for a, b in zip(g0, g1):
        a, b = np.asarray(a), np.asarray(b)[tuple(slice(0, k) for k in a.shape)]
        assert np.max(np.abs(a - b)) <= 1e-5 * (1 + np.max(np.abs(a)))


def test_fewer_kv_heads_than_devices_gathers_no_weight():
    # 2 key/value heads cannot split over 4 devices, so the planner
    # replicates the k/v kernels. Their output gradient is then a partial
    # sum per device; the engine pins it to replicated (one all-reduce of the
    # activation gradient, as Megatron does for replicated kv heads).
    # Without that, XLA reduce-scattered the weight gradient, updated k/v
    # and their Adam slots in shards and all-gathered them: 1.83x the
    # minimum bytes and a weight all-gather every step.
    keras.utils.set_random_seed(0)
    llama = catalogue.get("llama-small:tiny")
    model = llama.variant(num_key_value_heads=2).build()
    report = comms.analyze(model, 4, batch_size=2, seq_len=16)
    assert not report.has_weight_gather, report.table()
    # The extra bytes are the k/v activation-gradient reductions.
    assert report.ratio_bytes <= 1.2, report.table()


# Mixture-of-experts banks (tests/coverage_models.py: hidden 32, 4 experts,
# top 2, 2 blocks). Expert parallel, as the plan states: per token the
# bank's output forward (32 values), its input gradient (32) and the
# routing weights' gradient (2) backward; split inside each expert: the
# [4 experts, tokens, hidden] output forward (128), the input gradient (32)
# backward. With 5 attention/embedding all-reduces of [32 tokens, 32].
# Qwen3 also all-reduces its query/key norm scales' gradients (head_dim 8,
# 2 per block): each device's covers its own heads.
ATTENTION = 5 * 32 * 32 * 4
QK_NORMS = 2 * 2 * 8 * 4
MOE_CASES = [
    ("mixtral-n2", "expert", ATTENTION + 2 * 32 * (32 + 32 + 2) * 4),
    ("mixtral", "expert", ATTENTION + 2 * 32 * (32 + 32 + 2) * 4),
    ("mixtral", "inside", ATTENTION + 2 * 32 * (4 * 32 + 32) * 4),
    (
        "qwen3-moe-n2",
        "expert",
        ATTENTION + 2 * 32 * (32 + 32 + 2) * 4 + QK_NORMS,
    ),
]


@pytest.mark.parametrize(
    "row, split, expected", MOE_CASES, ids=[f"{r}-{s}" for r, s, _ in MOE_CASES]
)
def test_moe_train_step_is_stated_minimum(row, split, expected):
    from coverage_models import ROWS
    from generalization_cases import INSIDE_EXPERTS

    case = ROWS[row]
    keras.utils.set_random_seed(0)
    model = case.build()
    if split == "inside":
        model = TensorParallelKeras(
            model, world_size=case.n, overrides=INSIDE_EXPERTS
        )
        keras.Model.compile(model, optimizer="adam", loss="mse")
    report = comms.analyze(model, case.n, batch_size=2, seq_len=16)
    assert report.minimum.train_bytes == expected, report.table()
    assert report.train_bytes == expected, report.table()
    assert report.ratio_count == pytest.approx(1.0), report.table()
    assert not report.has_weight_gather, report.table()
