"""Train-step collectives of five architectures against the Megatron minimum.

Each case compiles the real `fit` step of a small 2-layer model and counts
every collective in its HLO (`comms.analyze`). The automatic plan must send
exactly the Megatron minimum (bytes and count, ratio 1.00) and never
all-gather a weight. GPT-2 uses an odd vocabulary (1001) as the real one
does (50257), so the padded vocab-parallel table is covered.
"""

import keras
import pytest

from keras_tensor_parallel import comms, zoo

_SMALL = dict(
    num_layers=2,
    num_heads=4,
    hidden_dim=64,
    intermediate_dim=128,
    max_sequence_length=32,
)

BUILDERS = {
    "opt": lambda: zoo.opt(vocabulary_size=1000, **_SMALL),
    "gpt2": lambda: zoo.gpt2(vocabulary_size=1001, **_SMALL),
    "bert": lambda: zoo.bert(vocabulary_size=1000, **_SMALL),
    "roberta": lambda: zoo.roberta(vocabulary_size=1000, **_SMALL),
    # Grouped-query attention (8 query heads, 4 key/value heads), SwiGLU.
    "llama": lambda: zoo.llama(
        vocabulary_size=1000,
        num_layers=2,
        num_query_heads=8,
        num_key_value_heads=4,
        hidden_dim=64,
        intermediate_dim=128,
    ),
}

CASES = [(name, 2) for name in BUILDERS] + [
    (name, 4) for name in ("opt", "gpt2", "bert", "roberta", "llama")
]


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
