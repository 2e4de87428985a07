"""Run a test file as N ranks under `keras-tp launch` (127.0.0.1, with a
timeout): the torch and TensorFlow tests start their ranks this way."""

import os
import subprocess
import sys


def launch(script, *args, backend: str, timeout: int, n: int = 2, cwd=None):
    """`python -m keras_tensor_parallel.launch -n N --timeout T script args`
    with `KERAS_BACKEND=backend`; the completed process."""
    env = dict(os.environ, KERAS_BACKEND=backend, OMP_NUM_THREADS="1")
    env.pop("XLA_FLAGS", None)  # the ranks are one device each
    cmd = [sys.executable, "-m", "keras_tensor_parallel.launch"]
    cmd += ["-n", str(n), "--timeout", str(timeout), script, *args]
    return subprocess.run(
        cmd,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout + 30,
    )
