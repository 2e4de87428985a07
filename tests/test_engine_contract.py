"""The engine contract: every engine offers the same public surface, and
the pieces the engines share (slot owners, undo journal, held Ctrl-C,
atomic writes) do what they promise."""

import inspect
import os
import signal
import subprocess
import sys

import keras
import pytest

from keras_tensor_parallel import TensorParallelKeras, zoo
from keras_tensor_parallel.backends import base


def _public(cls) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_engines_offer_the_same_public_surface():
    from keras_tensor_parallel.backends.jax import JaxEngine
    from keras_tensor_parallel.backends.torch import TorchEngine

    contract = {
        n
        for n in dir(base.Engine)
        if not n.startswith("_") and n not in dir(object)
    }
    methods = {n for n in contract if callable(getattr(base.Engine, n))}
    assert {"apply", "unapply", "save", "to_numpy"} <= methods
    for cls in (JaxEngine, TorchEngine):
        assert contract <= _public(cls) | {"plan", "device_ids", "rank"}, cls
    # Same public methods, with the same parameters.
    jax_methods = {
        n for n in _public(JaxEngine) if callable(getattr(JaxEngine, n))
    }
    torch_methods = {
        n for n in _public(TorchEngine) if callable(getattr(TorchEngine, n))
    }
    assert jax_methods == torch_methods
    for n in jax_methods:
        assert (
            inspect.signature(getattr(JaxEngine, n)).parameters.keys()
            == inspect.signature(getattr(TorchEngine, n)).parameters.keys()
        ), n


def test_a_wrapped_model_has_an_engine_implementing_the_contract():
    tp = TensorParallelKeras(zoo.seed_mlp(), world_size=2)
    assert isinstance(tp.engine, base.Engine)
    assert tp.engine.is_main and tp.engine.rank == 0
    kernel = tp.wrapped_model.layers[0].kernel
    assert tp.engine.shard_shapes(kernel) == [(64, 64), (64, 64)]
    per_device = tp.engine.per_device_bytes([kernel])
    assert sorted(per_device.values()) == [64 * 64 * 4] * 2


def test_no_import_cycle_between_engine_and_distribution():
    code = (
        "import sys, keras_tensor_parallel.devices; "
        "assert not {'keras_tensor_parallel.backends.torch', "
        "'keras_tensor_parallel.plan.planner'} & set(sys.modules); "
        "import keras_tensor_parallel.distribution as d; "
        "import keras_tensor_parallel.backends.jax as j; "
        "import keras_tensor_parallel as k; "
        "assert d.AutoTPDistribution is k.AutoTPDistribution; "
        "assert 'keras_tensor_parallel.backends.torch' not in sys.modules"
    )
    env = dict(os.environ, KERAS_BACKEND="jax")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def test_slot_owner_takes_the_longest_matching_parameter():
    class Var:
        def __init__(self, path):
            self.path = path

    # Keras names a slot `<param path with / as _>_<name>`: "d/k" and
    # "d_k/v" both prefix the slot of "d_k/v"; the longer one owns it.
    short, long = Var("d/k"), Var("d_k/v")
    params = [short, long]
    assert base.slot_owner(Var("adam/d_k_v_momentum"), params) is long
    assert base.slot_owner(Var("adam/d_k_momentum"), params) is short
    assert base.slot_owner(Var("adam/iteration"), params) is None

    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(2)]
    )
    opt = keras.optimizers.Adam()
    opt.build(model.trainable_variables)
    owners = [
        base.slot_owner(s, model.trainable_variables) for s in opt.variables
    ]
    found = [o for o in owners if o is not None]
    # Two slots (momentum, velocity) per parameter, each found.
    assert len(found) == 2 * len(model.trainable_variables)
    for slot, owner in zip(opt.variables, owners):
        if owner is not None:
            assert tuple(slot.shape) == tuple(owner.shape)


def test_journal_undoes_newest_first_and_restores_absent_attributes():
    class Obj:
        pass

    obj, log = Obj(), []
    journal = base.Journal()
    journal.setattr(obj, "call", 1)
    journal.add(lambda: log.append("second"))
    journal.setattr(obj, "call", 2)
    assert obj.call == 2
    journal.undo()
    assert not hasattr(obj, "call") and log == ["second"]


def test_deferred_interrupt_holds_ctrl_c_until_a_checkpoint():
    with pytest.raises(KeyboardInterrupt):
        with base.DeferredInterrupt() as interrupt:
            os.kill(os.getpid(), signal.SIGINT)
            reached = True  # not interrupted here
            interrupt.checkpoint()
    assert reached
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.keras"
    path.write_text("old")

    def fail(tmp):
        assert tmp.endswith(".keras") and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        base.atomic_write(fail, path)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.keras"]
    base.atomic_write(lambda tmp: open(tmp, "w").write("new"), path)
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["out.keras"]
