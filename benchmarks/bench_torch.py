"""Step time and per-rank bytes of the torch engine (BENCHMARKS.md).

Run, from the repository root:
`KERAS_BACKEND=torch .venv/bin/python benchmarks/bench_torch.py 1` and
`.venv/bin/keras-tp launch -n 2 benchmarks/bench_torch.py 2`.
"""

import json
import sys
import time

import keras
import numpy as np
import torch.distributed as dist

from keras_tensor_parallel import TensorParallelKeras, catalogue
from keras_tensor_parallel.backends import torch as tb


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
tb.ensure_process_group()
keras.utils.set_random_seed(0)
m = build()
tp = m if sys.argv[1] == "1" else TensorParallelKeras(m, world_size=2)
tp.compile(optimizer="adam", loss="mse")
tp.train_on_batch(x, y)
tp.train_on_batch(x, y)
t = time.perf_counter()
for _ in range(10):
    tp.train_on_batch(x, y)
dt = (time.perf_counter() - t) / 10
uniq = {id(v): v for v in list(m.variables) + list(tp.optimizer.variables)}
nbytes = sum(int(v.value.numel()) * 4 for v in uniq.values())
if not dist.is_initialized() or dist.get_rank() == 0:
    print(
        "RESULT", json.dumps({"n": sys.argv[1], "step_s": dt, "bytes": nbytes})
    )
