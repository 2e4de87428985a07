"""Multi-process JAX: TensorParallelKeras across processes, as across hosts.

Two Python processes join one JAX job (`keras_tensor_parallel.initialize`
-> `jax.distributed.initialize`, coordinator on 127.0.0.1, CPU collectives
over gloo), each with two CPU devices. The seeds' MLP is wrapped with
world_size=4, so every kernel is split over devices of both processes; each
process compares forward and a 2-step SGD fit with a single-device
reference it computed locally before wrapping.

Run directly, this file is the worker: `python test_jax_multiprocess.py
PORT PROCESS_ID NUM_PROCESSES`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

DEVICES_PER_PROCESS = 2
NUM_PROCESSES = 2
TIMEOUT_S = 120


def _worker(port: int, process_id: int, num_processes: int) -> dict:
    import keras
    import numpy as np

    import keras_tensor_parallel as ktp
    from keras_tensor_parallel import zoo

    # A fault in one process ends both within the timeout (test_faults.py).
    ktp.initialize(
        f"127.0.0.1:{port}", num_processes, process_id, timeout=TIMEOUT_S
    )
    import jax

    world = jax.device_count()
    assert world == num_processes * DEVICES_PER_PROCESS, jax.devices()
    assert jax.local_device_count() == DEVICES_PER_PROCESS

    reference, candidate, _ = zoo.build_pair(zoo.seed_mlp, seed=7)
    rng = np.random.RandomState(0)
    x = rng.randn(8, 64).astype("float32")
    y = rng.randn(8, 32).astype("float32")

    # Single-device reference, computed locally before wrapping.
    ref_out = np.asarray(reference(x))
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    ref_losses = reference.fit(
        x, y, epochs=2, batch_size=8, shuffle=False, verbose=0
    ).history["loss"]

    tp = ktp.TensorParallelKeras(candidate, world_size=world)
    mine = {d.id for d in jax.local_devices()}
    shards = {}
    for v in tp.wrapped_model.variables:
        value = v.value
        local = value.addressable_shards
        shards[v.path] = {
            "global": list(value.shape),
            "local": [list(s.data.shape) for s in local],
            "index": [repr(s.index) for s in local],
            "own_only": all(s.device.id in mine for s in local),
            "n_devices": len(value.sharding.device_set),
            "fully_addressable": bool(value.is_fully_addressable),
        }

    out = tp(x)  # replicated over the model axis: every shard is whole
    tp_out = np.asarray(out.addressable_shards[0].data)
    tp.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    tp_losses = tp.fit(
        x, y, epochs=2, batch_size=8, shuffle=False, verbose=0
    ).history["loss"]

    # Trained weights, gathered from all processes, match the reference.
    weights = tp.get_weights()
    weight_diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(weights, reference.get_weights())
    )
    return {
        "process_id": process_id,
        "world": world,
        "forward_diff": float(np.max(np.abs(tp_out - ref_out))),
        "forward_scale": max(1.0, float(np.max(np.abs(ref_out)))),
        "ref_losses": [float(v) for v in ref_losses],
        "tp_losses": [float(v) for v in tp_losses],
        "weight_diff": weight_diff,
        "shards": shards,
    }


def _data_parallel_worker(port: int, process_id: int, num_processes: int):
    """Issue 15 across processes: 4 devices as data=2 x model=2, each
    process one model-axis group (its own two devices) and one data-axis
    replica, feeding its own half of every global batch."""
    import keras
    import numpy as np

    import keras_tensor_parallel as ktp
    from keras_tensor_parallel import zoo

    ktp.initialize(
        f"127.0.0.1:{port}", num_processes, process_id, timeout=TIMEOUT_S
    )
    import jax

    reference, candidate, _ = zoo.build_pair(zoo.seed_mlp, seed=7)
    rng = np.random.RandomState(0)
    x = rng.randn(8, 64).astype("float32")  # the global batch
    y = rng.randn(8, 32).astype("float32")
    mine = slice(4 * process_id, 4 * (process_id + 1))  # this share
    # The loss of this share alone: what a process that did not join the
    # other's half would report (the comparison below can tell).
    half = float(np.mean((np.asarray(reference(x[mine])) - y[mine]) ** 2))
    reference.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    ref_losses = reference.fit(
        x, y, epochs=3, batch_size=8, shuffle=False, verbose=0
    ).history["loss"]

    world = jax.device_count()
    tp = ktp.TensorParallelKeras(
        candidate, world_size=world, tensor_parallel_size=2
    )
    tp.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    tp_losses = tp.fit(
        x[mine], y[mine], epochs=3, batch_size=4, shuffle=False, verbose=0
    ).history["loss"]
    weights = tp.get_weights()
    local = {d.id for d in jax.local_devices()}
    shards = {
        v.path: {
            "index": sorted(repr(s.index) for s in v.value.addressable_shards),
            "own_only": all(
                s.device.id in local for s in v.value.addressable_shards
            ),
            "split": v.value.addressable_shards[0].data.shape != v.shape,
        }
        for v in tp.wrapped_model.variables
    }
    return {
        "mesh": [tp.data_parallel_size, tp.tensor_parallel_size],
        "ref_losses": [float(v) for v in ref_losses],
        "tp_losses": [float(v) for v in tp_losses],
        "half_loss": half,
        "weight_rel": max(
            float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
            for a, b in zip(weights, reference.get_weights())
        ),
        "shards": shards,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(tmp_path, mode: str) -> list[dict]:
    """Start the workers of `mode`; each one's result."""
    port = _free_port()
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count="
        f"{DEVICES_PER_PROCESS}",
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    )
    procs = []
    for pid in range(NUM_PROCESSES):
        log = open(tmp_path / f"worker{pid}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, str(port), str(pid)]
                + [str(NUM_PROCESSES), mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        )
    results = []
    try:
        for pid, p in enumerate(procs):
            out, _ = p.communicate(timeout=TIMEOUT_S)
            log = (tmp_path / f"worker{pid}.log").read_text()
            assert p.returncode == 0, f"worker {pid} failed:\n{log[-4000:]}"
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.mark.slow
def test_two_processes_match_single_device(tmp_path):
    results = _run_workers(tmp_path, "tp")
    world = NUM_PROCESSES * DEVICES_PER_PROCESS
    for r in results:
        assert r["world"] == world
        assert r["forward_diff"] <= 1e-5 * r["forward_scale"], r
        for a, b in zip(r["tp_losses"], r["ref_losses"]):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), r
        assert r["weight_diff"] <= 1e-5, r
        split = 0
        for path, s in r["shards"].items():
            # Each process holds only its own devices' shards.
            assert s["own_only"], (path, s)
            assert len(s["local"]) == DEVICES_PER_PROCESS, (path, s)
            assert s["n_devices"] == world, (path, s)
            assert not s["fully_addressable"], (path, s)
            if s["local"][0] != s["global"]:
                split += 1
                n = sum(a != b for a, b in zip(s["local"][0], s["global"]))
                assert n == 1, (path, s)
        assert split >= 4, r["shards"]  # every kernel is split
    # Between them, the processes hold every shard of every split variable.
    for path, s in results[0]["shards"].items():
        if s["local"][0] != s["global"]:
            held = set(s["index"]) | set(results[1]["shards"][path]["index"])
            assert len(held) == world, (path, held)
            assert not set(s["index"]) & set(
                results[1]["shards"][path]["index"]
            ), path
    # Both processes computed the same numbers.
    assert results[0]["tp_losses"] == results[1]["tp_losses"]


def test_two_processes_data2_model2_match_one_device(tmp_path):
    results = _run_workers(tmp_path, "dp")
    for r in results:
        assert r["mesh"] == [2, 2]
        # Each process fed 4 of the 8 rows: the losses are the global
        # batch's, as on one device.
        for a, b in zip(r["tp_losses"], r["ref_losses"]):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), r
        assert r["ref_losses"][-1] < r["ref_losses"][0]
        assert abs(r["half_loss"] - r["tp_losses"][0]) > 1e-3, r
        assert r["weight_rel"] <= 1e-4, r
    split = 0
    for path, s in results[0]["shards"].items():
        other = results[1]["shards"][path]
        # The model axis stays inside a process (its own two devices hold
        # the two halves of a split variable); across processes the data
        # axis: both hold the same halves.
        assert s["own_only"] and other["own_only"], path
        assert s["index"] == other["index"], path
        if s["split"]:
            split += 1
            assert len(set(s["index"])) == 2, (path, s)
    assert split >= 4  # every kernel is split over the model axis


if __name__ == "__main__":
    worker = {"tp": _worker, "dp": _data_parallel_worker}[sys.argv[4]]
    result = worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps(result))
