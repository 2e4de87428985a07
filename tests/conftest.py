"""Launches shared by several test files (session-scoped: one each)."""

import os
import subprocess
import sys

import pytest

TF_ENGINE = os.path.join(os.path.dirname(__file__), "test_tensorflow_engine.py")
TF_TIMEOUT = 420


@pytest.fixture(scope="session")
def tf_run(tmp_path_factory):
    """test_tensorflow_engine's worker in 2 TensorFlow ranks (its first
    case is test_tf_collectives's worker), beside a plain one-process run
    of the same file: the launch's completed process and its folder."""
    from ranks import launch

    out = tmp_path_factory.mktemp("tf_engine")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", OMP_NUM_THREADS="1")
    env.pop("XLA_FLAGS", None)
    env.pop("TF_CONFIG", None)
    alone = subprocess.Popen(
        [sys.executable, TF_ENGINE, "plain", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        proc = launch(
            TF_ENGINE, str(out), backend="tensorflow", timeout=TF_TIMEOUT
        )
        _, alone_err = alone.communicate(timeout=TF_TIMEOUT)
    finally:
        alone.kill()
    assert alone.returncode == 0, alone_err[-4000:]
    return proc, out
