"""`keras-tp launch -n N script.py ...`: one process per device.

A thin wrapper over torch's elastic launcher (`torch.distributed.run`, the
code behind `torchrun`): single node, rendezvous on 127.0.0.1 at a free
port, no restarts, `KERAS_BACKEND=torch`, and a hard wall-clock timeout so
that a rank that hangs can never hang the caller. When one rank dies or
raises, the elastic agent stops the others and the launcher exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_command(nproc: int, script: str, args: list[str], port: int):
    """The `python -m torch.distributed.run ...` command line."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "--max-restarts=0",
        "--monitor-interval=0.2",
        script,
        *args,
    ]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="keras-tp launch",
        description="Run a script once per device (torch backend).",
    )
    parser.add_argument(
        "-n", "--nproc", type=int, required=True, help="processes (devices)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds before every rank is killed (default 600)",
    )
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    if ns.nproc < 1:
        parser.error(f"-n must be at least 1. Received: -n {ns.nproc}")
    return ns


def run(nproc: int, script: str, args=(), *, timeout: float = 600.0) -> int:
    """Run `script` in `nproc` ranks; the exit status (124 on timeout)."""
    env = dict(os.environ)
    env.setdefault("KERAS_BACKEND", "torch")
    env.setdefault("KERAS_TP_TIMEOUT", str(int(max(timeout - 5, 10))))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = build_command(nproc, script, list(args), free_port())
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(
            f"keras-tp launch: ranks still running after {timeout:g} s: "
            "killed (a rank hung or a collective never completed)",
            file=sys.stderr,
        )
        return 124
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        return 130


def main(argv=None) -> int:
    """Entry point of `keras-tp launch -n N script.py args...`."""
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    return run(ns.nproc, ns.script, ns.args, timeout=ns.timeout)


if __name__ == "__main__":
    sys.exit(main())
