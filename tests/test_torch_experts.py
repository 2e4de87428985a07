"""Expert parallelism on torch (issue 12): `backends/torch_experts.py`.

Tiny Mixtral (4 experts, hidden 32, 2 layers) in the shared 4-rank launch
(tests/four_ranks.py): at N=4 each rank holds 1 whole expert of every
bank and the 4-rank forward, gradients and 3 Adam steps equal one process
from the same weights; at N=2 (data 2 x model 2, ranks 0-1 one model
group) each holds 2 experts and the forward equals one process. The
train step's all-reduces are counted; the plan picks expert parallel as
on JAX, and overrides force either split on torch.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
EXPERTS, HIDDEN, FFN, LAYERS = 4, 32, 64, 2
BANK = "experts/expert_feedforward_"
# Per train step at N=4, 2 layers: forward g after the vocab-parallel
# embedding, each attention output and each sum over experts (1 + 2 + 2);
# backward f's all-reduce at each attention input, each bank input and
# each bank's routing weights (2 + 2 + 2).
# Megatron inside each expert, forced: ffn split in gate/up and down.
INSIDE = {
    f".*{BANK}(gate|intermediate)_dense": (None, None, "model"),
    f".*{BANK}output_dense": (None, "model", None),
}
MINIMUM = {"forward": 1 + LAYERS * 2, "backward": LAYERS * 3}


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0))


def _out(model, x):
    import keras
    import numpy as np

    out = keras.tree.flatten(model(x))[0]
    return np.asarray(out.detach().cpu().numpy(), "float64")


def worker(out_dir: str) -> None:
    """Runs in each of the 4 ranks: both cases, one json per rank each."""
    import torch.distributed as dist

    os.makedirs(out_dir, exist_ok=True)
    rank = dist.get_rank()
    for name, tp_size in (("n4", 4), ("n2", 2)):
        res = _case(tp_size, train=tp_size == 4)
        with open(os.path.join(out_dir, f"{name}.{rank}.json"), "w") as fh:
            json.dump(res, fh)


def _case(tp_size: int, train: bool) -> dict:
    import coverage_models as cm
    import keras
    import numpy as np
    import torch

    from keras_tensor_parallel import TensorParallelKeras
    from keras_tensor_parallel.backends import torch_collectives as tc

    x = cm.inputs()
    keras.utils.set_random_seed(0)
    ref = cm.mixtral()
    keras.utils.set_random_seed(1)
    cand = cm.mixtral()
    cand.set_weights(ref.get_weights())
    expected = _out(ref, x)
    tp = TensorParallelKeras(
        cand, world_size=4, tensor_parallel_size=tp_size,
        distributed_backend="torch")  # fmt: skip
    plan = tp.plan
    res = {"forward": _rel(_out(tp, x), expected)}
    with torch.no_grad():  # predict's path: the placed zeros sum partially
        res["no_grad"] = _rel(_out(tp, x), expected)
    res["roles"] = {e.path: e.role.value for e in plan if BANK in e.path}
    res["reasons"] = {e.path: e.reason for e in plan if BANK in e.path}
    res["local"] = {v.path: list(v.value.shape) for v in cand.weights}
    held = sum(math.prod(v.value.shape) for v in cand.weights)
    res["fraction"] = held / sum(math.prod(e.shape) for e in plan)
    res["ideal"] = cm.ideal_fraction(plan, cm.ROWS["mixtral"].router)
    if not train:
        return res
    res["grads"] = _grads(ref, cand, x)
    y = np.random.RandomState(2).randn(*expected.shape).astype("float32")
    for model in (ref, tp):
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    kw = dict(epochs=3, batch_size=len(y), shuffle=False, verbose=0)
    tc.reset_counts()
    steps = []  # the counters after each train step
    snap = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda *_, **__: steps.append(dict(tc.COUNTS))
    )
    tp_hist = tp.fit(x, y, callbacks=[snap], **kw).history["loss"]
    res["counts"] = {k: steps[-1][k] - steps[-2][k] for k in tc.COUNTS}
    res["total"] = dict(tc.COUNTS)
    res["ring"] = dict(tc.RING)
    res["losses"] = [tp_hist, ref.fit(x, y, **kw).history["loss"]]
    res["adam"] = {
        v.path: list(v.value.shape)
        for v in tp.optimizer.variables
        if "expert_feedforward" in v.path
    }
    full = tp.get_weights()
    res["weights"] = max(_rel(a, b) for a, b in zip(full, ref.get_weights()))
    res["after"] = _rel(_out(tp, x), _out(ref, x))
    return res


def _grads(ref, cand, x) -> float:
    """Largest difference of this rank's gradients of mean(out**2) from
    the one-process ones (sliced to the rank's shard), over the largest."""
    import keras
    import numpy as np
    import torch

    found = []
    for model in (ref, cand):
        for v in model.trainable_variables:
            v.value.grad = None
        torch.mean(keras.tree.flatten(model(x))[0] ** 2).backward()
        found.append(
            [
                np.zeros(v.value.shape)
                if v.value.grad is None
                else v.value.grad.detach().cpu().numpy()
                for v in model.trainable_variables
            ]
        )
    want = [
        v.local_slice(r) if hasattr(v, "local_slice") else r
        for r, v in zip(found[0], cand.trainable_variables)
    ]
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(found[1], want))
    return diff / max(float(np.max(np.abs(b))) for b in want)


@pytest.fixture(scope="module")
def results(four_ranks):
    tmp = four_ranks("experts")
    return {
        name: [json.loads((tmp / f"{name}.{r}.json").read_text())
               for r in range(4)]
        for name in ("n4", "n2")
    }  # fmt: skip


def _bank_shapes(res) -> list:
    return [s for p, s in res["local"].items() if BANK in p]


@pytest.mark.torch
@pytest.mark.parametrize("name, n", [("n4", 4), ("n2", 2)])
def test_each_rank_holds_its_experts_whole(results, name, n):
    for res in results[name]:
        assert set(res["roles"].values()) == {"expert"}, res["roles"]
        shapes = _bank_shapes(res)
        assert len(shapes) == 3 * LAYERS
        for shape in shapes:  # (experts, hidden, ffn) or (experts, ffn, h)
            assert shape[0] == EXPERTS // n and sorted(shape[1:]) == [
                HIDDEN,
                FFN,
            ], shape
        assert res["fraction"] == pytest.approx(res["ideal"], abs=1e-9)
        assert res["forward"] <= 1e-5, res["forward"]
        assert res["no_grad"] <= 1e-5, res["no_grad"]
        reason = next(iter(res["reasons"].values()))
        assert f"{EXPERTS // n} whole expert" in reason, reason
        assert "66 values per token" in reason, reason
        assert "on torch the routing weights' gradient" in reason, reason


@pytest.mark.torch
def test_expert_parallel_trains_as_one_process(results):
    for res in results["n4"]:
        assert res["grads"] <= 1e-5, res["grads"]
        tp_hist, ref_hist = res["losses"]
        assert _rel(tp_hist, ref_hist) <= 1e-5, res["losses"]
        assert res["weights"] <= 1e-4, res["weights"]
        assert res["after"] <= 1e-5, res["after"]
        # Adam's slots hold the rank's one expert, as its kernels do.
        adam = res["adam"]
        assert adam and all(s[0] == 1 for s in adam.values()), adam


@pytest.mark.torch
def test_expert_parallel_collectives_at_the_minimum(results):
    for res in results["n4"]:
        counts = res["counts"]
        assert counts["forward"] == MINIMUM["forward"], res
        assert counts["backward"] == MINIMUM["backward"], res
        assert counts["gather"] == 0, counts


def test_torch_plans_experts_as_jax_and_overrides_force_either():
    """Planning only (no ranks): the torch planner picks what the JAX
    planner picks, and `overrides` force either split on torch."""
    import coverage_models as cm

    from keras_tensor_parallel.backends.torch_plan import plan_torch
    from keras_tensor_parallel.plan import plan_model
    from keras_tensor_parallel.plan.overrides import apply_overrides

    model = cm.mixtral()
    layout_plan = plan_torch(model, 4)
    layout = [
        {e.path: (e.role.value, e.split_dim) for e in p}
        for p in (plan_model(model, 4), layout_plan)
    ]
    assert layout[0] == layout[1]
    assert {layout[1][p][0] for p in layout[1] if BANK in p} == {"expert"}
    forced = apply_overrides(layout_plan, INSIDE)  # as plan_torch does
    roles = [(e.role.value, e.split_dim) for e in forced if BANK in e.path]
    assert roles == [("column", 2), ("column", 2), ("row", 1)] * LAYERS


def test_forced_inside_split_of_a_fused_bank_keeps_its_parts():
    """Qwen3-MoE's gate/up bank `(experts, hidden, 2 * ffn)` is cut by
    `ops.split` into gate and up: a column split forced with `overrides`
    must give each rank its block of both parts (a plain column split
    would give rank 0 only gate), and a norm forced replicated keeps the
    gradient sum its split heads need."""
    import coverage_models as cm

    from keras_tensor_parallel.backends.torch_plan import plan_torch

    model = cm.qwen3_moe()
    forced = {
        ".*experts/expert_feedforward_gate_dense": (None, None, "model"),
        ".*experts/expert_feedforward_output_dense": (None, "model", None),
        ".*query_dense_layernorm.*": "replicated",
    }
    plan = plan_torch(model, 4, overrides=forced)
    banks = [e for e in plan if "expert_feedforward_gate_dense" in e.path]
    assert banks and all(getattr(e, "parts", 1) == 2 for e in banks), banks
    norms = [e for e in plan if "query_dense_layernorm" in e.path]
    assert norms and all(getattr(e, "sum_grad", False) for e in norms)


def test_lora_layers_are_refused_unless_replicated():
    """Planning only: the torch and TensorFlow engines do not split
    LoRA-enabled layers (a ValueError naming them), and run them
    replicated if told to."""
    import keras

    from keras_tensor_parallel import zoo
    from keras_tensor_parallel.backends.torch_plan import plan_torch
    from keras_tensor_parallel.model import _plan_for

    model = zoo.seed_mlp()
    dense = [x for x in model.layers if isinstance(x, keras.layers.Dense)]
    dense[0].enable_lora(4)
    with pytest.raises(ValueError, match="torch engine does not split LoRA"):
        plan_torch(model, 2)
    with pytest.raises(ValueError, match="TensorFlow engine does not split"):
        _plan_for("tensorflow", model, 2, None)
    plan = plan_torch(
        model, 2, overrides={f".*{dense[0].name}/.*": "replicated"}
    )
    assert not any(e.is_split for e in plan if dense[0].name + "/" in e.path)


def _bank_model(squash: bool):
    """A tiny MoE block of its own weights: experts `(4, 16, 32)` and
    `(4, 32, 16)`, a router, and the combine `sum(out * routing, 0)`
    (`squash`: of `tanh(out) * routing`, which torch cannot split)."""
    import keras
    from keras import ops

    class Bank(keras.layers.Layer):
        def build(self, shape):
            self.w1 = self.add_weight(shape=(4, 16, 32), name="w1")
            self.w2 = self.add_weight(shape=(4, 32, 16), name="w2")

        def call(self, x):
            h = ops.relu(ops.einsum("th,ehm->etm", x, self.w1))
            return ops.einsum("eti,eih->eth", h, self.w2)

    class Block(keras.layers.Layer):
        def build(self, shape):
            self.router = keras.layers.Dense(4, use_bias=False)
            self.router.build((None, 16))
            self.bank = Bank()
            self.bank.build((None, 16))

        def call(self, x):
            flat = ops.reshape(x, (-1, 16))
            routing = ops.transpose(ops.softmax(self.router(flat)), (1, 0))
            out = self.bank(flat)
            out = ops.tanh(out) if squash else out
            return ops.reshape(
                ops.sum(out * routing[:, :, None], 0), (-1, 8, 16)
            )

    inp = keras.Input((8, 16))
    return keras.Model(inp, Block()(inp) + inp)


@pytest.mark.parametrize("squash", [False, True])
def test_torch_plans_expert_parallel_only_where_it_plays_it(squash):
    """The JAX planner splits both blocks' experts over devices; torch
    only the combine it plays (`torch_experts.combine`), else inside each
    expert, saying why."""
    from keras_tensor_parallel.backends.torch_plan import plan_torch
    from keras_tensor_parallel.plan import plan_model

    model = _bank_model(squash)
    roles = [
        [e.role.value for e in p if e.path.endswith(("w1", "w2"))]
        for p in (plan_model(model, 2), plan_torch(model, 2))
    ]
    assert roles[0] == ["expert", "expert"]
    assert roles[1] == (["column", "row"] if squash else ["expert", "expert"])
