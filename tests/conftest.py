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


@pytest.fixture(scope="session")
def four_ranks(tmp_path_factory):
    """tests/four_ranks.py in 4 torch ranks: `four_ranks(name)` is the
    folder that file's worker wrote (asserting that it did not raise)."""
    import four_ranks as runner
    from ranks import launch

    folder = tmp_path_factory.mktemp("four_ranks")
    script = os.path.join(os.path.dirname(__file__), "four_ranks.py")
    proc = launch(
        script, str(folder), backend="torch", n=4, timeout=runner.TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    def case(name):
        errors = sorted(folder.glob(f"{name}.error.*"))
        assert not errors, [p.read_text() for p in errors]
        return folder / name

    return case
