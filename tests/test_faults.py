"""Multi-process faults end promptly, naming the process and its error.

JAX: 2 processes x 2 CPU devices join with `keras_tensor_parallel.initialize
(timeout=20)`, run one collective, then process 1 raises, is killed or
hangs while process 0 waits in the next collective. Without the watchdog
these runs took 301 s, 99 s and forever. Each ends within its bound,
measured from the moment of the fault. The three runs share the machine
(each process mostly waits), so the file takes one start-up, not three.

Torch and JAX under `keras-tp launch`: a raising or killed rank ends the
run in under a second with that rank named (and its traceback once); a
JAX rank that hangs is named by the ranks' watchdog; a hang under
`--timeout 20` leaves no rank alive. The watchdog's progress test and
dead-peer test also run alone, against a key-value store in a dict.

Run directly, this file is the rank: `python test_faults.py BACKEND MODE
OUTDIR [PORT PROCESS_ID]`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.abspath(__file__)
TIMEOUT = 20  # the run's stated timeout, seconds
START_S = 120  # start-up allowance: imports on a loaded 2-core machine
# From the fault to the last process's exit: raise -> the watchdog's next
# poll; kill -> dead_after(20) = 10 s without a heartbeat; hang -> within
# TIMEOUT. SLACK_S: a loaded machine delays the watchdog threads' polls.
SLACK_S = 3.0
JAX_BOUNDS = {
    "raise": SLACK_S,
    "kill": 10.0 + SLACK_S,
    "hang": TIMEOUT + SLACK_S,
}


def _jax_env() -> dict:
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND="jax",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    env.pop("KERAS_TP_TIMEOUT", None)
    return env


def _free_port() -> int:
    from keras_tensor_parallel.launch import free_port

    return free_port()


def _wait_all(procs: dict, limit: float) -> dict:
    """Wait for every process; the time.time() at which each ended."""
    ended, deadline = {}, time.monotonic() + limit
    while len(ended) < len(procs) and time.monotonic() < deadline:
        for key, p in procs.items():
            if key not in ended and p.poll() is not None:
                ended[key] = time.time()
        time.sleep(0.05)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    return ended


def _fault_time(out, rank=1) -> float:
    return float((out / f"fault{rank}").read_text())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_jax_processes_end_within_the_timeout(tmp_path):
    procs, logs = {}, {}
    for mode in JAX_BOUNDS:
        out = tmp_path / mode
        out.mkdir()
        port = str(_free_port())
        for pid in (0, 1):
            logs[mode, pid] = out / f"log{pid}"
            procs[mode, pid] = subprocess.Popen(
                [sys.executable, HERE, "jax", mode, str(out), port, str(pid)],
                env=_jax_env(),
                stdout=subprocess.DEVNULL,
                stderr=open(logs[mode, pid], "w"),
            )
    ended = _wait_all(procs, START_S + 60)
    for mode, bound in JAX_BOUNDS.items():
        out = tmp_path / mode
        log0 = logs[mode, 0].read_text()
        assert (mode, 0) in ended, f"{mode}: process 0 never ended\n{log0}"
        took = max(ended[mode, p] for p in (0, 1)) - _fault_time(out)
        print(f"jax {mode}: all processes ended {took:.1f} s after the fault")
        assert took < bound, (mode, took, log0[-3000:])
        assert procs[mode, 0].returncode == 1, (mode, log0[-3000:])
        last = log0.strip().splitlines()[-1]
        if mode == "raise":
            assert last == (
                "keras-tp: process 0 of 2 stopped: process 1 failed: "
                "ValueError: process 1 fails on purpose"
            ), log0[-3000:]
            log1 = logs[mode, 1].read_text()
            assert log1.count("Traceback") == 1, log1
        elif mode == "kill":
            assert "process 1 stopped responding" in last, log0[-3000:]
        else:  # the hanging process is named first, with where it is
            assert "process 1 failed: TimeoutError: no progress" in last
            first = last.split("timeout: ")[1].split(";")[0]
            assert first.startswith("process 1 idle"), last
            assert first.endswith("in _rank_main"), last


# Under the launcher: the rank that failed, and its error, in one line. Each
# run is started at once and checked after all have ended: start-up (the
# imports) dominates, and the runs mostly wait.
LAUNCHED = {
    # (backend, mode): (exit status, last line's end, seconds after fault)
    ("jax", "raise"): (1, "rank 1 of 2 failed: ValueError: process 1 "
                       "fails on purpose", SLACK_S),
    ("torch", "raise"): (1, "rank 1 of 2 failed: ValueError: process 1 "
                         "fails on purpose", SLACK_S),
    ("torch", "kill"): (137, "rank 1 of 2 failed: killed by SIGKILL", SLACK_S),
    ("jax", "kill"): (137, "rank 1 of 2 failed: killed by SIGKILL", SLACK_S),
}  # fmt: skip


def _launch(backend, mode, out, timeout, **extra_env):
    env = _jax_env() if backend == "jax" else dict(os.environ)
    env.update(KERAS_BACKEND=backend, **extra_env)
    if backend == "torch":
        env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "keras_tensor_parallel.launch", "-n", "2"]
    cmd += ["--timeout", str(timeout), HERE, backend, mode, str(out)]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_launched_faults_end_with_the_failing_rank_named(tmp_path):
    from keras_tensor_parallel import launch

    procs, outs = {}, {}
    for backend, mode in [*LAUNCHED, ("torch", "hang"), ("jax", "ok")]:
        outs[backend, mode] = out = tmp_path / f"{backend}-{mode}"
        out.mkdir()
        timeout = TIMEOUT if mode == "hang" else START_S
        procs[backend, mode] = _launch(backend, mode, out, timeout)
    # The ranks' own timeout (20 s) before the launcher's (START_S): the
    # watchdog names the rank that hangs.
    named = "jax", "hang-named"
    outs[named] = tmp_path / "jax-hang-named"
    outs[named].mkdir()
    procs[named] = _launch(*named, outs[named], START_S, KERAS_TP_TIMEOUT="20")
    start = time.time()
    ended = _wait_all(procs, START_S + 30)
    errs = {key: p.stderr.read() for key, p in procs.items()}
    for key, (status, line, bound) in LAUNCHED.items():
        err = errs[key][-3000:]
        assert procs[key].returncode == status, (key, err)
        assert err.strip().splitlines()[-1].endswith(line), (key, err)
        assert err.count("Traceback") == (key[1] == "raise"), (key, err)
        took = ended[key] - _fault_time(outs[key])
        print(f"{key}: launcher ended {took:.1f} s after the fault")
        assert took < bound, (key, took, err)
        assert (outs[key] / "timeout0").read_text() == (
            f"{launch.rank_timeout(START_S):g}"
        )
    err = errs[named][-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "keras-tp launch: rank 1 of 2 failed: TimeoutError: no progress"
    ), err
    assert err.count("keras-tp") == 1, err  # the ranks print nothing
    took = ended[named] - _fault_time(outs[named])
    print(f"{named}: launcher ended {took:.1f} s after the fault")
    assert took < TIMEOUT + SLACK_S, (took, err)
    # Without a fault, the JAX ranks join, compute and leave: status 0.
    assert procs["jax", "ok"].returncode == 0, errs["jax", "ok"][-3000:]
    # A hang under --timeout 20 (the ranks' start-up takes most of it):
    # ended by then, and no rank left alive.
    key = "torch", "hang"
    took = ended[key] - start
    print(f"{key}: launcher ended after {took:.1f} s: {errs[key][-300:]}")
    assert procs[key].returncode == launch.EXIT_TIMEOUT, errs[key][-3000:]
    # Measured from before the launcher's own start-up (~1-2 s loaded).
    assert took < TIMEOUT + 2 * SLACK_S, took
    for key in (("torch", "hang"), named):
        pids = [int((outs[key] / f"pid{r}").read_text()) for r in (0, 1)]
        assert not any(_alive(p) for p in pids), (key, pids)


@pytest.mark.parametrize(
    "args, kwargs, expected",
    [
        (("127.0.0.1:1", 2, 2), {}, "process_id=2, num_processes=2"),
        (("127.0.0.1:1", 2.0, 0), {}, "Received: num_processes=2.0"),
        (("127.0.0.1:1", 2, True), {}, "Received: process_id=True"),
        ((None, 2, 0), {}, "Received: job_addresses=None"),
        (("127.0.0.1:1", 2, 0), {"timeout": 0}, "Received: timeout=0"),
        (("127.0.0.1:1", 2, 0), {"timeout": "x"}, "Received: timeout='x'"),
    ],
)
def test_initialize_rejects_bad_values(monkeypatch, args, kwargs, expected):
    import keras_tensor_parallel as ktp

    for name in ("JOB_ADDRESSES", "NUM_PROCESSES", "PROCESS_ID"):
        monkeypatch.delenv(f"KERAS_DISTRIBUTION_{name}", raising=False)
    with pytest.raises(ValueError, match=re.escape(expected)):
        ktp.initialize(*args, **kwargs)


def test_initialize_names_a_bad_launcher_variable(monkeypatch):
    import keras_tensor_parallel as ktp

    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="NUM_PROCESSES='two'"):
        ktp.initialize("127.0.0.1:1", None, 0)


# The watchdog alone, with a key-value store in a dict -----------------------


class _Store:
    def __init__(self):
        self.kv = {}

    def key_value_set(self, key, value, allow_overwrite=False):
        if key in self.kv and not allow_overwrite:
            raise RuntimeError(f"ALREADY_EXISTS: {key}")
        self.kv[key] = value

    def key_value_try_get(self, key):
        if key not in self.kv:
            raise RuntimeError(f"NOT_FOUND: {key}")
        return self.kv[key]

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


def _watch(timeout, n=1, me=0):
    from keras_tensor_parallel import watchdog

    class Recorded(watchdog.Watchdog):
        failures = []

        def stop(self, failed):  # record instead of exiting pytest
            self.failures.append(failed)
            self.stopped = True

    watch = Recorded(_Store(), me, n, timeout=timeout)
    watch.start()
    return watch


def _compute(seconds):
    # One C call per iteration at the same instruction, burning CPU: as a
    # cached jitted step looks from Python.
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(200_000))


def test_watchdog_tells_computing_from_standing_still():
    # stall_after(4) = 2 s: computing for 4 s is progress, sleeping is not.
    watch = _watch(4)
    try:
        _compute(4)
        assert watch.failures == []
        time.sleep(3.5)
        (failure,) = watch.failures
        assert failure.startswith("0|TimeoutError: no progress for 2 s")
        assert "process 0 idle 2 s at test_faults.py" in failure
    finally:
        watch.stopped = True


def test_watchdog_names_a_process_whose_heartbeat_stops():
    # A peer (process 1) that beat once and never again: dead after 5 s.
    watch = _watch(10, n=2)
    try:
        watch.client.key_value_set("keras_tp/beat/1", "1|0|x.py:1 in f")
        _compute(6.5)
        assert watch.failures, "no failure after dead_after(10) = 5 s"
        assert watch.failures[0].startswith("1|process 1 stopped responding")
    finally:
        watch.stopped = True


# The ranks -------------------------------------------------------------------


def _fail(me: int):
    raise ValueError(f"process {me} fails on purpose")


def _jax_collective():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    local = np.ones((jax.local_device_count(),), np.float32)
    x = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("x")), local
    )
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
    return lambda: float(total(x).addressable_shards[0].data)


def _torch_collective():
    import datetime

    import torch
    import torch.distributed as dist

    # As the engine joins (test_torch_backend.py runs that path); without
    # importing Keras, which doubles the start-up.
    seconds = float(os.environ["KERAS_TP_TIMEOUT"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=seconds))
    return lambda: dist.all_reduce(torch.ones(1))


def _rank_main(backend, mode, out, port=None, process_id=None):
    me = int(os.environ.get("RANK", process_id))
    with open(os.path.join(out, f"pid{me}"), "w") as fh:
        fh.write(str(os.getpid()))
    import keras_tensor_parallel as ktp

    if backend == "jax" and port is None:
        ktp.initialize()  # the launcher's variables
    elif backend == "jax":
        ktp.initialize(f"127.0.0.1:{port}", 2, int(process_id), timeout=20)
    collective = _jax_collective() if backend == "jax" else _torch_collective()
    with open(os.path.join(out, f"timeout{me}"), "w") as fh:
        fh.write(os.environ.get("KERAS_TP_TIMEOUT", ""))
    collective()  # every process has joined
    if me == 1:
        with open(os.path.join(out, f"fault{me}"), "w") as fh:
            fh.write(repr(time.time()))
        if mode == "raise":
            _fail(me)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode.startswith("hang"):
            time.sleep(600)
    collective()  # process 0 waits here for process 1


if __name__ == "__main__":
    _rank_main(*sys.argv[1:])
