"""The README is a tested document: its examples cannot drift.

Each ```python block runs in a fresh interpreter (its own environment
variables, no conftest), each `keras-tp` line of a ```bash block runs as a
command, and the README's command list is the one `keras-tp --help` shows.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
KERAS_TP = os.path.join(os.path.dirname(sys.executable), "keras-tp")
# A new user's shell: none of the variables conftest.py sets.
USER_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("XLA_FLAGS", "KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL")
}


def blocks(language: str) -> list[str]:
    text = open(README).read()
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def commands() -> list[str]:
    return [
        line.strip()
        for block in blocks("bash")
        for line in block.splitlines()
        if line.startswith("keras-tp ")
    ]


def _tail(proc) -> str:
    return (proc.stdout[-2000:] + "\n" + proc.stderr[-3000:]).strip()


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index, tmp_path):
    code = blocks("python")[index]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env=USER_ENV,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, _tail(proc)


@pytest.mark.parametrize("command", commands())
def test_shell_command_runs(command, tmp_path):
    args = command.split()[1:]
    proc = subprocess.run(
        [KERAS_TP, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=USER_ENV,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, _tail(proc)
    assert proc.stdout.strip(), "no output"
    assert proc.stderr == "", proc.stderr[-2000:]  # no framework logs


def test_readme_has_runnable_examples():
    assert len(blocks("python")) >= 2
    assert {c.split()[1] for c in commands()} >= {"models", "plan", "comms"}


def test_command_list_matches_help():
    proc = subprocess.run(
        [KERAS_TP, "--help"], capture_output=True, text=True, timeout=60
    )
    helped = re.findall(r"^    ([a-z]+) ", proc.stdout, re.M)
    assert helped, proc.stdout
    synopsis = [
        line.split()[1]
        for block in blocks("text")
        for line in block.splitlines()
        if line.startswith("keras-tp ")
    ]
    assert synopsis == helped, (synopsis, helped)
