"""`keras-tp launch -n N script.py ...`: one process per device.

Starts N ranks of `script.py` on this machine for the backend that
`KERAS_BACKEND` names (torch when unset), with the variables each engine
joins by: torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
`MASTER_PORT` (torch, and the TensorFlow engine with a `TF_CONFIG` too),
and `KERAS_DISTRIBUTION_*` for `keras_tensor_parallel.initialize()` (JAX).
Every address is 127.0.0.1.

The launcher watches its ranks itself (no torch elastic agent in between):
- when a rank fails, it kills the others at once and prints that rank's
  error, its traceback once and a last line naming the rank;
- after `--timeout` seconds it kills every rank (exit status 124);
- each rank runs in its own session, killed as a whole (with any process
  it started), and is killed by the kernel if the launcher dies
  (`PR_SET_PDEATHSIG`), so no rank outlives its launcher.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from keras_tensor_parallel import processes

DEFAULT_TIMEOUT = 300.0
EXIT_TIMEOUT = 124
POLL_S = 0.05
GRACE_S = 0.5  # failures this close together are one fault
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_timeout(timeout: float) -> float:
    """The ranks' own timeout (a collective, a stall): a little shorter than
    the launcher's, so that a rank names the fault before being killed."""
    return max(timeout - 5.0, timeout / 2)


def rank_env(rank: int, nproc: int, ports: dict, base: dict) -> dict:
    """The environment of rank `rank` of `nproc` (ports from `ports`)."""
    env = dict(base)
    addr = "127.0.0.1"
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK="0",
        ROLE_RANK=str(rank),
        ROLE_WORLD_SIZE=str(nproc),
        MASTER_ADDR=addr,
        MASTER_PORT=str(ports["master"]),
        KERAS_DISTRIBUTION_JOB_ADDRESSES=f"{addr}:{ports['jax']}",
        KERAS_DISTRIBUTION_NUM_PROCESSES=str(nproc),
        KERAS_DISTRIBUTION_PROCESS_ID=str(rank),
    )
    if env.get("KERAS_BACKEND") == "tensorflow":
        workers = [f"{addr}:{p}" for p in ports["tf"]]
        env["TF_CONFIG"] = json.dumps(
            {
                "cluster": {"worker": workers},
                "task": {"type": "worker", "index": rank},
            }
        )
    return env


def _base_env(timeout: float) -> dict:
    env = dict(os.environ)
    env.setdefault("KERAS_BACKEND", "torch")
    env.setdefault("OMP_NUM_THREADS", "1")
    if timeout > 0:
        env.setdefault(processes.TIMEOUT_ENV, f"{rank_timeout(timeout):g}")
    return env


def _die_with_launcher():
    # Runs in the child between fork and exec: the kernel kills the rank
    # when the launcher dies, even by SIGKILL.
    parent = os.getpid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):  # not Linux: the session kill only
        return None

    def preexec():
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the launcher died before prctl
            os._exit(1)

    return preexec


class Ranks:
    """The running ranks of one launch."""

    def __init__(self, nproc: int, script: str, args: list[str], *, timeout):
        self.nproc = nproc
        self.timeout = timeout
        self.cmd = [sys.executable, processes.__file__, script, *args]
        self.tmp = tempfile.mkdtemp(prefix="keras-tp-launch-")
        self.procs: list[subprocess.Popen] = []
        self.running: list[int] = []  # ranks still running at a failure

    def error_file(self, rank: int) -> str:
        return os.path.join(self.tmp, f"rank{rank}.json")

    def start(self) -> None:
        base = _base_env(self.timeout)
        ports = {"master": free_port(), "jax": free_port()}
        ports["tf"] = [free_port() for _ in range(self.nproc)]
        preexec = _die_with_launcher()
        for rank in range(self.nproc):
            env = rank_env(rank, self.nproc, ports, base)
            env[processes.ERROR_FILE_ENV] = self.error_file(rank)
            self.procs.append(
                subprocess.Popen(
                    self.cmd,
                    env=env,
                    start_new_session=True,
                    preexec_fn=preexec,
                )
            )

    def wait(self) -> tuple[str, list[int]]:
        """Wait until all succeed, one fails or time runs out.

        Returns ("ok", []), ("failed", ranks that had failed by then) or
        ("timeout", ranks still running).
        """
        deadline = time.monotonic() + self.timeout if self.timeout > 0 else None
        grace = None
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed and grace is None:
                # A rank that dies takes its peers' collectives down with
                # it, and a busy machine may show a peer's exit first:
                # collect what fails together before blaming one.
                grace = time.monotonic() + GRACE_S
            if failed and (time.monotonic() >= grace or None not in codes):
                self.running = [r for r, c in enumerate(codes) if c is None]
                return "failed", failed
            if all(c == 0 for c in codes):
                return "ok", []
            if deadline is not None and time.monotonic() > deadline:
                return "timeout", [r for r, c in enumerate(codes) if c is None]
            time.sleep(POLL_S)

    def kill(self) -> None:
        """Kill every rank's session (the rank and what it started)."""
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # already gone; its group with it
        for p in self.procs:
            p.wait()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def record(self, rank: int) -> dict | None:
        return processes.read_error(self.error_file(rank))


# Reporting -----------------------------------------------------------------


def _blame(ranks: Ranks, failed: list[int]) -> int:
    """Of the ranks that failed together, the one that caused it: one
    killed by a signal (its peers then fail in a collective), else the
    first to record an error of its own, else the first seen."""
    for rank in failed:
        if ranks.procs[rank].returncode < 0 and not ranks.record(rank):
            return rank
    own = [
        (os.stat(ranks.error_file(rank)).st_mtime_ns, rank)
        for rank in failed
        if (rec := ranks.record(rank)) and rec.get("origin") in (None, rank)
    ]
    return min(own)[1] if own else failed[0]


def _describe(ranks: Ranks, rank: int) -> tuple[int, str, str]:
    """(rank to name, one-line error, traceback) for a failed `rank`."""
    code = ranks.procs[rank].returncode
    rec = ranks.record(rank)
    if rec:
        origin = rec.get("origin")
        named = rank if origin is None else int(origin)
        return named, rec.get("error", ""), rec.get("traceback", "")
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return rank, f"killed by {name}", ""
    return rank, f"exited with status {code}", ""


def report_failure(ranks: Ranks, failed: list[int]) -> int:
    """Print the failing rank's error once; the launcher's exit status."""
    rank = _blame(ranks, failed)
    named, error, tb = _describe(ranks, rank)
    if tb:
        sys.stderr.write(tb if tb.endswith("\n") else tb + "\n")
    n = ranks.nproc
    line = f"rank {named} of {n} failed: {error}"
    if named != rank:
        line = f"rank {rank} of {n} stopped: {line}"
    if ranks.running and "timed out" in error.lower():
        # A collective timed out: the rank it waited for may be the one
        # that hangs, and it had not ended.
        still = ", ".join(str(r) for r in ranks.running)
        line += f" (still running then: rank {still})"
    print(f"keras-tp launch: {line}", file=sys.stderr, flush=True)
    code = ranks.procs[rank].returncode
    return 128 - code if code < 0 else code


def report_timeout(ranks: Ranks, running: list[int]) -> int:
    names = ", ".join(str(r) for r in running)
    print(
        f"keras-tp launch: timed out after {ranks.timeout:g} s with ranks "
        f"{names} of {ranks.nproc} still running: killed them (a rank "
        "hung or a collective never completed; see --timeout)",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_TIMEOUT


# Entry points --------------------------------------------------------------


def _on_signal(signum, frame):
    # SIGTERM/SIGHUP end the launcher as Ctrl-C does: through `finally`,
    # which kills the ranks.
    raise KeyboardInterrupt


def run(
    nproc: int,
    script: str,
    args: list[str] | tuple[str, ...] = (),
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> int:
    """Run `script` in `nproc` ranks; the exit status (124 on timeout).

    Args:
        nproc: number of ranks (processes, one per device).
        script: the Python script each rank runs.
        args: the script's arguments.
        timeout: seconds before every rank is killed; 0 for no limit.

    Example:

    ```python
    from keras_tensor_parallel import launch
    status = launch.run(2, "train.py", ["--steps", "10"], timeout=120)
    ```
    """
    ranks = Ranks(nproc, script, list(args), timeout=timeout)
    handlers = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            handlers[sig] = signal.signal(sig, _on_signal)
    except ValueError:
        pass  # not the main thread: Ctrl-C and `finally` still apply
    try:
        ranks.start()
        state, which = ranks.wait()
        if state == "ok":
            return 0
        ranks.kill()
        if state == "timeout":
            return report_timeout(ranks, which)
        return report_failure(ranks, which)
    except KeyboardInterrupt:
        print(
            "keras-tp launch: interrupted: killed every rank", file=sys.stderr
        )
        return 130
    finally:
        ranks.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds >= 0. Received: {text!r}"
        )
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="keras-tp launch",
        description="Run a script once per device, one process each, for "
        "the backend KERAS_BACKEND names (default torch).",
    )
    parser.add_argument(
        "-n", "--nproc", type=int, required=True, help="processes (devices)"
    )
    parser.add_argument(
        "--timeout",
        type=_nonnegative,
        default=DEFAULT_TIMEOUT,
        help="seconds before every rank is killed; the ranks' own timeout "
        "(a collective, a JAX rank standing still) is KERAS_TP_TIMEOUT, "
        "else 5 s less; 0: no limit (default "
        f"{DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("script", help="the Python script each rank runs")
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="the script's arguments"
    )
    ns = parser.parse_args(argv)
    if ns.nproc < 1:
        parser.error(f"-n must be at least 1. Received: -n {ns.nproc}")
    if not os.path.isfile(ns.script):
        parser.error(f"no such script. Received: script={ns.script!r}")
    return ns


def main(argv: list[str] | None = None) -> int:
    """Entry point of `keras-tp launch -n N script.py args...`.

    Example:

    ```python
    from keras_tensor_parallel import launch
    status = launch.main(["-n", "2", "--timeout", "60", "train.py"])
    ```
    """
    try:
        ns = parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:
        return int(e.code or 0)
    return run(ns.nproc, ns.script, ns.args, timeout=ns.timeout)


if __name__ == "__main__":
    sys.exit(main())
