"""Step time and per-rank bytes of the TensorFlow engine (BENCHMARKS.md),
on the model and batch of `bench_torch.py`.

Run, from the repository root:
`KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/bench_tensorflow.py 1`
and `KERAS_BACKEND=tensorflow .venv/bin/keras-tp launch -n 2
benchmarks/bench_tensorflow.py 2`.
"""

import json
import sys
import time

import keras
import numpy as np

from keras_tensor_parallel import TensorParallelKeras, catalogue
from keras_tensor_parallel.backends import tensorflow_collectives as tc


def build():
    return (
        catalogue.get("opt-125m")
        .variant(
            vocabulary_size=8192,
            num_layers=2,
            num_heads=8,
            hidden_dim=256,
            intermediate_dim=1024,
            max_sequence_length=64,
        )
        .build()
    )


rng = np.random.RandomState(0)
x = {
    "token_ids": rng.randint(0, 8192, (8, 64)).astype("int32"),
    "padding_mask": np.ones((8, 64), "int32"),
}
y = rng.randn(8, 64, 256).astype("float32")
keras.utils.set_random_seed(0)
m = build()
tp = m if sys.argv[1] == "1" else TensorParallelKeras(m, world_size=2)
tp.compile(optimizer="adam", loss="mse")
tp.train_on_batch(x, y)
tp.train_on_batch(x, y)
times = []
for _ in range(10):
    t = time.perf_counter()
    tp.train_on_batch(x, y)
    times.append(time.perf_counter() - t)
uniq = {id(v): v for v in list(m.variables) + list(tp.optimizer.variables)}
nbytes = sum(int(v.value.shape.num_elements()) * 4 for v in uniq.values())
if tc.rank() == 0:
    result = {
        "n": sys.argv[1],
        "step_s_mean": float(np.mean(times)),
        "step_s_median": float(np.median(times)),
        "bytes": nbytes,
    }
    print("RESULT", json.dumps(result))
