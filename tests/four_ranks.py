"""One 4-rank torch launch for every test file that needs 4 ranks.

Each launch pays the imports of torch, Keras and KerasHub in 4 processes
on the machine's cores (~40 s on 2 cores): the files below share one.
`python four_ranks.py FOLDER` (under `keras-tp launch -n 4`) runs each
file's `worker` in turn with the argument that file's own launch would
pass, in `FOLDER/<name>` as the working directory and after
`keras.backend.clear_session()` (layer names as in a fresh process); a
worker that raises on every rank leaves `FOLDER/<name>.error.<rank>`
for that file's tests and the next one runs. The session fixture
`four_ranks` (conftest.py) starts it.
"""

from __future__ import annotations

import importlib
import os
import sys

# name: (test module, the worker's argument inside FOLDER/<name>)
FILES = {
    "groups": ("test_torch_groups", "res"),
    "dp_paths": ("test_torch_dp_paths", "."),
    "data_parallel": ("test_torch_data_parallel", "res"),
    "experts": ("test_torch_experts", "."),
}
# Seconds for the whole launch: the files' own launches' timeouts summed.
TIMEOUT = 180 + 180 + 240 + 120


def main(folder: str) -> None:
    import keras
    import torch.distributed as dist

    from keras_tensor_parallel.backends import torch_collectives as tc

    tc.ensure_process_group()
    for name, (module, arg) in FILES.items():
        here = os.path.join(folder, name)
        os.makedirs(here, exist_ok=True)
        os.chdir(here)
        keras.backend.clear_session()  # layer names as in a fresh process
        try:
            importlib.import_module(module).worker(os.path.join(here, arg))
        except Exception as e:  # noqa: BLE001 - that file's tests report it
            error = os.path.join(folder, f"{name}.error.{dist.get_rank()}")
            with open(error, "w") as fh:
                fh.write(f"{type(e).__name__}: {e}")
        dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
