"""Loading, generation and checkpoints on torch with a data axis.

4 gloo ranks on 127.0.0.1 (hard timeout) as data=2 x model=2. Loading
straight into shards (`TensorParallelKeras.build`) and `tp.generate` use
the model-axis rank, so they equal one process with the same weights
(checkpoints with a data axis: tests/test_torch_data_parallel.py).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
TIMEOUT = 180
MESH = dict(world_size=4, tensor_parallel_size=2, distributed_backend="torch")


def _np(x) -> np.ndarray:
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)


def _split_count(tp) -> int:
    """Variables this rank holds at a shard shape (not the full one)."""
    full = {e.path: tuple(e.shape) for e in tp.plan}
    return sum(
        tuple(v.value.shape) != full[v.path] for v in tp.wrapped_model.weights
    )


def _load_case(folder: str) -> dict:
    """`build` from a weights file, and from initializers only."""
    import keras
    import torch
    import torch.distributed as dist

    from keras_tensor_parallel import TensorParallelKeras, catalogue

    path = os.path.join(folder, "attention.weights.h5")
    if dist.get_rank() == 0:
        keras.utils.set_random_seed(3)
        catalogue.seed_attention().save_weights(path)
    dist.barrier()
    tp = TensorParallelKeras.build(
        catalogue.seed_attention, weights=path, **MESH
    )
    single = catalogue.seed_attention()
    single.load_weights(path)
    x = catalogue.get("seed-attention").inputs(batch=4, seed=1)
    with torch.no_grad():
        got, want = _np(tp(x)), _np(single(x))
    out = {
        "err": float(np.max(np.abs(got - want))),
        "ref_max": float(np.max(np.abs(want))),
        "model_rank": tp.engine.model_rank,
        "split": _split_count(tp),
    }
    # Initializers only: data-axis partners draw the same shards.
    keras.utils.set_random_seed(11)
    init = TensorParallelKeras.build(catalogue.seed_mlp, **MESH)
    out["init_local"] = [_np(v.value).tolist() for v in init.weights]
    return out


def _generate_case() -> dict:
    """Greedy tokens of a tiny Llama (4 kv heads cached 2 per rank)."""
    from test_generate import _copies, _generate, _lm, _prompts

    from keras_tensor_parallel import TensorParallelKeras

    ref, model = _copies(_lm("llama"), 2)
    x = _prompts(vocab=1000)
    tp = TensorParallelKeras(model, **MESH)
    return {
        "greedy": _generate(tp, "greedy", x).tolist(),
        "greedy_ref": _generate(ref, "greedy", x).tolist(),
    }


def worker(folder: str) -> None:
    """Runs in every rank (KERAS_BACKEND=torch)."""
    import torch.distributed as dist

    from keras_tensor_parallel.backends import torch_collectives as tc

    tc.ensure_process_group()
    rank = dist.get_rank()
    res = {
        "load": _load_case(folder),
        "generate": _generate_case(),
    }
    with open(os.path.join(folder, f"res.{rank}"), "w") as fh:
        json.dump(res, fh)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torch_dp_paths")
    from ranks import launch

    proc = launch(HERE, str(tmp), backend="torch", timeout=TIMEOUT, n=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp / f"res.{r}").read_text()) for r in range(4)]


@pytest.mark.torch
def test_build_into_shards_matches_one_process(results):
    for rank, r in enumerate(results):
        load = r["load"]
        assert load["model_rank"] == rank % 2
        assert load["split"] > 0, load  # really sharded
        assert load["err"] <= 1e-5 * max(1.0, load["ref_max"]), load
    # Data-axis partners (0, 2) and (1, 3) hold the same fresh shards;
    # model-axis partners hold different ones.
    local = [r["load"]["init_local"] for r in results]
    assert local[0] == local[2] and local[1] == local[3]
    assert local[0] != local[1]


@pytest.mark.torch
def test_generate_matches_one_process(results):
    for r in results:
        g = r["generate"]
        assert g["greedy"] == g["greedy_ref"], g


def test_build_on_tensorflow_is_refused():
    from keras_tensor_parallel import TensorParallelKeras, catalogue

    with pytest.raises(ValueError, match="distributed_backend='tensorflow'"):
        TensorParallelKeras.build(
            catalogue.seed_mlp, world_size=2, distributed_backend="tensorflow"
        )


if __name__ == "__main__":
    worker(*sys.argv[1:])
