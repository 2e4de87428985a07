"""`keras-tp launch`: environment, failure reports, timeouts, no survivors.

The ranks here run a plain Python script (this file, below `__main__`)
that imports no backend, so each case takes about a second; the backends'
own faults are in test_faults.py. Every address is 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from keras_tensor_parallel import launch

HERE = os.path.abspath(__file__)
ENV_KEYS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
    "KERAS_TP_TIMEOUT",
    "TF_CONFIG",
)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _launch(tmp_path, *args, timeout=20, backend="none", wait=True):
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.pop("KERAS_TP_TIMEOUT", None)
    cmd = [sys.executable, "-m", "keras_tensor_parallel.launch", "-n", "2"]
    cmd += ["--timeout", str(timeout), HERE, str(tmp_path), *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    start = time.monotonic()
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout + 30
    )
    return proc, time.monotonic() - start


def _pids(tmp_path, prefix="pid", n=2, wait_s=15.0):
    deadline = time.monotonic() + wait_s
    while True:
        files = [tmp_path / f"{prefix}{r}" for r in range(n)]
        if all(f.exists() and f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"ranks did not start: {list(tmp_path.iterdir())}")


def test_ranks_get_torchrun_and_keras_variables(tmp_path):
    proc, _ = _launch(tmp_path, "env", backend="tensorflow")
    assert proc.returncode == 0, proc.stderr
    envs = [json.loads((tmp_path / f"env{r}").read_text()) for r in (0, 1)]
    for rank, env in enumerate(envs):
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["KERAS_DISTRIBUTION_PROCESS_ID"] == str(rank)
        assert env["KERAS_DISTRIBUTION_NUM_PROCESSES"] == "2"
        host = env["KERAS_DISTRIBUTION_JOB_ADDRESSES"].split(":")[0]
        assert host == "127.0.0.1"
        assert float(env["KERAS_TP_TIMEOUT"]) == launch.rank_timeout(20)
        tf = json.loads(env["TF_CONFIG"])
        assert tf["task"] == {"type": "worker", "index": rank}
        assert len(tf["cluster"]["worker"]) == 2
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    assert envs[0]["TF_CONFIG"] != envs[1]["TF_CONFIG"]


def test_raising_rank_ends_the_run_with_its_error_once(tmp_path):
    proc, took = _launch(tmp_path, "raise")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (
        "keras-tp launch: rank 1 of 2 failed: ValueError: rank 1 fails on "
        "purpose"
    ), proc.stderr
    assert proc.stderr.count("Traceback") == 1, proc.stderr
    assert "runpy" not in proc.stderr and "processes.py" not in proc.stderr
    assert "in _fail" in proc.stderr  # the script's own frame
    assert took < 10, took
    assert not any(_alive(p) for p in _pids(tmp_path, wait_s=0))


def test_killed_rank_ends_the_run(tmp_path):
    proc, took = _launch(tmp_path, "kill")
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "keras-tp launch: rank 1 of 2 failed: killed by SIGKILL"
    )
    assert took < 10, took
    assert not any(_alive(p) for p in _pids(tmp_path, wait_s=0))


def test_exit_status_of_a_rank_is_the_launchers(tmp_path):
    proc, _ = _launch(tmp_path, "exit")
    assert proc.returncode == 3, proc.stderr
    assert "rank 1 of 2 failed: SystemExit: exited with status 3" in (
        proc.stderr
    )


def test_hang_times_out_and_leaves_no_process(tmp_path):
    proc, took = _launch(tmp_path, "hang", timeout=3)
    assert proc.returncode == launch.EXIT_TIMEOUT, proc.stderr
    assert "timed out after 3 s with ranks 0, 1 of 2 still running" in (
        proc.stderr
    )
    assert 3 <= took < 10, took
    # The ranks and the processes they started themselves.
    pids = _pids(tmp_path, wait_s=0) + _pids(tmp_path, "child", wait_s=0)
    assert not any(_alive(p) for p in pids), pids


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_no_rank_outlives_its_launcher(tmp_path, sig):
    launcher = _launch(tmp_path, "hang", timeout=60, wait=False)
    try:
        pids = _pids(tmp_path) + _pids(tmp_path, "child")
        launcher.send_signal(sig)
        status = launcher.wait(timeout=10)
        assert status == (-sig if sig == signal.SIGKILL else 130), status
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        # SIGKILL: the kernel kills the ranks (PDEATHSIG); their children
        # are not the launcher's and are left to the rank's session.
        watched = pids[:2] if sig == signal.SIGKILL else pids
        assert not any(_alive(p) for p in watched), pids
    finally:
        launcher.kill()
        launcher.wait()
        for p in _pids(tmp_path, wait_s=0) + _pids(tmp_path, "child", wait_s=0):
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_keras_tp_launch_runs_the_launcher(tmp_path):
    from keras_tensor_parallel import cli

    env = dict(os.environ, KERAS_BACKEND="none")
    cmd = [sys.executable, "-c", "import sys; from keras_tensor_parallel "
           "import cli; sys.exit(cli.main())", "launch", "-n", "2",
           "--timeout", "20", HERE, str(tmp_path), "raise"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("rank 1 of 2 failed: ValueError: rank 1 fails on purpose")
    ), proc.stderr
    assert callable(cli.main)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["-n", "0", HERE], "-n must be at least 1. Received: -n 0"),
        (["-n", "2", "missing.py"], "no such script"),
        (["-n", "2", "--timeout", "-1", HERE], "Received: '-1'"),
    ],
)
def test_bad_arguments_say_what_was_received(argv, expected, capsys):
    assert launch.main(argv) == 2
    assert expected in capsys.readouterr().err


# The rank's side ------------------------------------------------------------


def _fail(rank: int):
    raise ValueError(f"rank {rank} fails on purpose")


def _rank_main(out: str, mode: str) -> None:
    rank = int(os.environ["RANK"])
    with open(os.path.join(out, f"env{rank}"), "w") as fh:
        json.dump({k: os.environ.get(k) for k in ENV_KEYS}, fh)
    with open(os.path.join(out, f"pid{rank}"), "w") as fh:
        fh.write(str(os.getpid()))
    if mode == "env":
        return
    if mode == "hang":  # a process of its own, killed with its rank
        child = subprocess.Popen(["sleep", "600"])
        with open(os.path.join(out, f"child{rank}"), "w") as fh:
            fh.write(str(child.pid))
    elif rank == 1:
        time.sleep(0.3)
        if mode == "raise":
            _fail(rank)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "exit":
            sys.exit(3)
    time.sleep(600)


if __name__ == "__main__":
    _rank_main(*sys.argv[1:3])
