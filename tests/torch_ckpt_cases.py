"""Torch checkpoint cases beyond a plain split, run by
tests/test_checkpoint_torch.py's launch: shared kv heads (copies=2) and
a fused expert gate/up bank (parts=2) at 2 ranks, restored at 2 ranks
bit-identically and at 1 within float rounding; and the torch plan's own
fields through JSON.
"""

from __future__ import annotations

import json
import os

import numpy as np


def _same(a, b) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(a, b))


class _Losses:
    def __new__(cls):
        import keras

        class Losses(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.losses = []

            def on_train_batch_end(self, batch, logs=None):
                self.losses.append(float(logs["loss"]))

        return Losses()


HUB = {
    # 4 query heads, 1 kv head: at 2 ranks the kv head is one block both
    # hold (copies=2; `_shared_plan`, as plan_torch gives 2 kv heads at 4).
    "shared": (
        "Qwen3Backbone",
        dict(num_query_heads=4, num_key_value_heads=1, intermediate_dim=64),
    ),
    # 3 experts (not split on the expert dim at 2): the fused gate/up bank
    # (3, 32, 2 * 16) holds its block of each part (parts=2).
    "fused": (
        "Qwen3MoeBackbone",
        dict(
            num_query_heads=4, num_key_value_heads=2, intermediate_dim=64,
            moe_intermediate_dim=16, num_experts=3, top_k=2,
        ),
    ),
}  # fmt: skip


def _hub_data():
    rng = np.random.RandomState(3)
    x = {
        "token_ids": rng.randint(0, 64, (8, 6)).astype("int32"),
        "padding_mask": np.ones((8, 6), "int32"),
    }
    return x, rng.randn(8, 6, 32).astype("float32")


def _shared_plan(model, n: int):
    """plan_torch's plan with attention split as it splits 2 kv heads at
    4 ranks: query heads split, the kv head shared by both (copies=2),
    the output a row, the query/key norm scales' gradients summed.
    plan_torch now plans 1 kv head at 2 ranks this way itself (31c812a);
    the case keeps the layout explicit so it does not hang on that."""
    import dataclasses

    from keras_tensor_parallel.backends.torch_plan import (
        TorchVariablePlan,
        plan_torch,
    )

    plan = plan_torch(model, n)
    out = []
    for e in plan:
        name = e.path.split("self_attention/")[-1]
        heads = (None, "model", None)
        if name in ("query/kernel", "key/kernel", "value/kernel"):
            e = dataclasses.replace(
                e, axes=heads, role="heads", copies=1 if "query" in name else n
            )
        elif name == "attention_output/kernel":
            e = dataclasses.replace(e, axes=("model", None, None), role="row")
        elif name.endswith("dense_layernorm/scale"):
            fields = {f.name: getattr(e, f.name) for f in dataclasses.fields(e)}
            e = TorchVariablePlan(**{**fields, "sum_grad": True})
        out.append(e)
    return plan.with_variables(out)


def _make_hub(name: str, seed: int):
    import keras
    import keras_hub

    from keras_tensor_parallel import TensorParallelKeras
    from keras_tensor_parallel.backends import torch_collectives as tc

    keras.utils.set_random_seed(seed)
    cls, config = HUB[name]
    model = getattr(keras_hub.models, cls)(
        vocabulary_size=64, num_layers=1, hidden_dim=32, head_dim=8, **config
    )
    n = tc.world_size()
    plan = _shared_plan(model, n) if name == "shared" and n > 1 else None
    tp = TensorParallelKeras(model, world_size=n, plan=plan)
    tp.compile(optimizer="adam", loss="mse")
    return tp


def _hub_fit(tp, part: slice):
    x, y = _hub_data()
    losses = _Losses()
    x = {k: v[part] for k, v in x.items()}
    tp.fit(
        x, y[part], batch_size=2, shuffle=False, verbose=0, callbacks=[losses]
    )
    return losses.losses


def resume(tp, folder: str, make_fresh, fit) -> dict:
    """After `tp` saved its checkpoint to `folder`: `fit(tp)` goes on, and
    a fresh model from `make_fresh()` loads the checkpoint and runs the
    same `fit`; both runs' losses, and whether weights and Adam slots end
    equal."""
    losses = fit(tp)
    weights = tp.get_weights()
    slots = [np.asarray(v) for v in tp.optimizer.variables]
    fresh = make_fresh()
    loaded = fresh.load_checkpoint(folder)
    resumed = fit(fresh)
    return {
        "loaded": loaded,
        "losses": losses,
        "resumed": resumed,
        "weights_equal": _same(weights, fresh.get_weights()),
        "slots_equal": _same(
            slots, [np.asarray(v) for v in fresh.optimizer.variables]
        ),
    }


def hub_case(name: str, folder: str) -> dict:
    """2 steps, checkpoint, 2 more; a fresh model restored trains the same
    2; the gathered weights at the save go to `saved.npz` (rank 0)."""
    import torch.distributed as dist

    tp = _make_hub(name, 1)
    _hub_fit(tp, slice(0, 4))
    path = tp.save_checkpoint(folder)
    saved = tp.get_weights()  # gathered by the engine, not through DCP
    if dist.get_rank() == 0:
        np.savez(os.path.join(folder, "saved.npz"), *saved)
    return {
        "path": path,
        **resume(
            tp,
            folder,
            lambda: _make_hub(name, 7),
            lambda model: _hub_fit(model, slice(4, 8)),
        ),
        "odd": {
            e.path: [e.copies, getattr(e, "parts", 1)]
            for e in tp.plan
            if e.copies > 1 or getattr(e, "parts", 1) > 1
        },
        "local": {
            v.path: list(v.value.shape) for v in tp.wrapped_model.variables
        },
    }


def hub_one_process(folder: str) -> dict:
    """World size 1 restores the 2-rank checkpoints and trains on."""
    out = {}
    for name in HUB:
        tp = _make_hub(name, 9)
        where = os.path.join(folder, name)
        out[name] = {
            "loaded": tp.load_checkpoint(where),
            "losses": _hub_fit(tp, slice(4, 8)),
        }
        np.savez(os.path.join(where, "restored.npz"), *tp.get_weights())
    return out


def plan_round_trip() -> bool:
    from keras_tensor_parallel.backends.torch_plan import TorchVariablePlan
    from keras_tensor_parallel.plan import ShardingPlan, VariablePlan

    plan = ShardingPlan(
        4,
        (
            TorchVariablePlan(
                "e/gate", (3, 32, 64), "float32", (None, None, "model"),
                "column", "fused", parts=2,
            ),
            TorchVariablePlan(
                "n/scale", (8,), "float32", (None,), "replicated", "norm",
                sum_grad=True,
            ),
            VariablePlan(
                "a/key", (32, 2, 8), "float32", (None, "model", None),
                "heads", "kv", copies=2,
            ),
        ),
    )  # fmt: skip
    same = ShardingPlan.from_json(plan.to_json())
    return same == plan and [type(v) for v in same] == [
        TorchVariablePlan,
        TorchVariablePlan,
        VariablePlan,
    ]


def chunks(step: str, suffix: str) -> list:
    """`[offsets]` DCP stored for the model variable whose path ends
    with `suffix` (each chunk written once)."""
    from torch.distributed.checkpoint import FileSystemReader

    with open(os.path.join(step, "tp_meta.json")) as f:
        saved = json.load(f)["fingerprint"]["variables"]["model"]
    key = next(k for k, v in saved.items() if v[2].endswith(suffix))
    meta = FileSystemReader(step).read_metadata().state_dict_metadata
    return sorted(list(c.offsets) for c in meta[f"model/{key}"].chunks)


def write_presets(folder) -> None:
    """`HUB`'s models as presets `qwen3_shared` and `qwen3_moe` (for
    tests/test_loading_torch.py)."""
    import keras
    import keras_hub

    for name, preset in (("shared", "qwen3_shared"), ("fused", "qwen3_moe")):
        keras.utils.set_random_seed(4)
        cls, config = HUB[name]
        backbone = getattr(keras_hub.models, cls)(
            vocabulary_size=64, num_layers=1, hidden_dim=32, head_dim=8,
            **config,
        )  # fmt: skip
        backbone.save_to_preset(str(folder / preset))
