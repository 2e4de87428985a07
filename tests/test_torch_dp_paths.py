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

MESH = dict(world_size=4, tensor_parallel_size=2, distributed_backend="torch")
AUTO = dict(MESH, tensor_parallel_size="auto")


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


def _nbytes(variables) -> int:
    return sum(int(v.value.numel()) * v.value.element_size() for v in variables)


def _auto_case() -> dict:
    """`tensor_parallel_size="auto"`: the needs at T = 1, 2, 4 computed
    here, a budget between T=1's and T=2's; the wrapped ranks' parameter,
    Adam and saved-activation bytes against T=2's figures."""
    import contextlib
    import io

    import keras

    from keras_tensor_parallel import (
        TensorParallelKeras,
        autosize_torch,
        catalogue,
    )
    from keras_tensor_parallel.comms import steps

    keras.utils.set_random_seed(0)
    model = catalogue.seed_mlp()
    act = autosize_torch.ActivationPass.run(model, None, 4)
    needs = {t: autosize_torch.measure(model, 4, t, act) for t in (1, 2, 4)}
    out = {"totals": {t: n.total for t, n in needs.items()}}
    try:  # nothing fits: the same error on every rank, nothing wrapped
        TensorParallelKeras(model, device_memory=needs[4].total - 1, **AUTO)
    except ValueError as e:
        out["error"] = str(e)
    out["unwrapped"] = not getattr(model, "_tp_wrapped", False)
    printed = io.StringIO()
    budget = (needs[1].total + needs[2].total) // 2
    with contextlib.redirect_stdout(printed):
        tp = TensorParallelKeras(model, device_memory=budget, **AUTO)
    out["printed"] = printed.getvalue()
    out["mesh"] = [tp.data_parallel_size, tp.tensor_parallel_size]
    out["params"] = [_nbytes(tp.wrapped_model.variables), needs[2].params]
    x = steps.example_inputs(model, batch_size=4, seq_len=128)
    y = steps.example_targets(model, batch_size=4, seq_len=128)
    tp.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    tp.fit(x, y, batch_size=4, epochs=1, verbose=0)
    out["optimizer"] = [_nbytes(tp.optimizer.variables), needs[2].optimizer]
    # A replica trains on 2 of the 4 rows: what autograd keeps there.
    saved = autosize_torch.saved_tensors(tp.wrapped_model, x[:2], y[:2])
    out["activations"] = [sum(s.nbytes for s in saved), needs[2].activations]
    # The pass runs in training mode: batch-norm statistics are put back.
    inp = keras.Input((8,))
    h = keras.layers.BatchNormalization()(keras.layers.Dense(16)(inp))
    norm = keras.Model(inp, keras.layers.Dense(4)(h))
    before = [_np(v.value).copy() for v in norm.non_trainable_variables]
    autosize_torch.ActivationPass.run(norm, None, 4)
    after = [_np(v.value) for v in norm.non_trainable_variables]
    out["state_kept"] = all(map(np.array_equal, before, after))
    return out


def worker(folder: str) -> None:
    """Runs in every rank (KERAS_BACKEND=torch)."""
    import torch.distributed as dist

    from keras_tensor_parallel.backends import torch_collectives as tc

    tc.ensure_process_group()
    rank = dist.get_rank()
    res = {
        "load": _load_case(folder),
        "generate": _generate_case(),
        "auto": _auto_case(),
    }
    with open(os.path.join(folder, f"res.{rank}"), "w") as fh:
        json.dump(res, fh)


@pytest.fixture(scope="module")
def results(four_ranks):
    """Every rank's results: `worker` runs in the shared 4-rank launch
    (tests/four_ranks.py)."""
    tmp = four_ranks("dp_paths")
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


@pytest.mark.torch
def test_auto_size_is_computed_alike_on_every_rank(results):
    autos = [r["auto"] for r in results]
    first = autos[0]
    for a in autos:
        assert a["totals"] == first["totals"], autos  # same on every rank
        assert a["mesh"] == [2, 2], a
        assert a["unwrapped"] and "smallest need is" in a["error"], a
        assert a["error"] == first["error"]
        # The figures behind the choice are what each rank then holds.
        assert a["params"][0] == a["params"][1], a
        assert a["optimizer"][0] == a["optimizer"][1], a
        assert a["activations"][0] == a["activations"][1], a
        assert a["state_kept"], a
    totals = {int(t): v for t, v in first["totals"].items()}
    assert totals[1] > totals[2] > totals[4]
    # Rank 0 prints the table autosize prints on JAX; the others nothing.
    shown = first["printed"]
    assert "tensor_parallel_size='auto': 2" in shown, shown
    assert "2 x 2" in shown and "<- chosen" in shown and "activations" in shown
    assert "1 x 4" not in shown  # stopped at the first size that fits
    assert all(not a["printed"] for a in autos[1:])


def test_build_on_tensorflow_is_refused():
    from keras_tensor_parallel import TensorParallelKeras, catalogue

    with pytest.raises(ValueError, match="distributed_backend='tensorflow'"):
        TensorParallelKeras.build(
            catalogue.seed_mlp, world_size=2, distributed_backend="tensorflow"
        )


if __name__ == "__main__":
    worker(*sys.argv[1:])
