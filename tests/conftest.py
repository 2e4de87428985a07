"""Launches shared by several test files (session-scoped: one each), and
how `make test` spreads the files over pytest-xdist's two workers."""

import gc
import os
import subprocess
import sys

import pytest

SHARED_LAUNCHES = ("tf_run", "four_ranks")
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


@pytest.fixture(autouse=True, scope="module")
def _release_after_each_file():
    """Compiled programs are dropped after each file: an xdist worker runs
    hundreds of tests, and two of them share the machine's memory."""
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()


def _shares_a_launch(item) -> bool:
    """Whether `item` reads a fixture set up once per module (a launch)."""
    defs = item._fixtureinfo.name2fixturedefs
    return any(
        d.scope in ("module", "package", "class")
        for name in item.fixturenames
        if name != "_release_after_each_file"
        for d in defs.get(name, ())
    )


def pytest_collection_modifyitems(config, items):
    """pytest-xdist groups (`make test`: `-n 2 --dist loadgroup`): one for
    all the tests that read a session launch (it runs once), one per file
    for the tests that read a module launch (it runs once per file); every
    other test goes to whichever worker is free. Grouped tests go first, so
    that the long groups do not end the run alone."""
    files = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        for name in SHARED_LAUNCHES:
            if name in item.fixturenames:
                files[path] = name
    grouped = []
    for item in items:
        path = item.nodeid.split("::")[0]
        if path in files and _shares_a_launch_or_session(item):
            group = files[path]
        elif _shares_a_launch(item):
            group = path
        else:
            continue
        item.add_marker(pytest.mark.xdist_group(group))
        grouped.append(item)
    first = set(map(id, grouped))
    items[:] = grouped + [i for i in items if id(i) not in first]


def _shares_a_launch_or_session(item) -> bool:
    return _shares_a_launch(item) or any(
        n in item.fixturenames for n in SHARED_LAUNCHES
    )
