"""keras-tp command line: plan, verify, train, and its errors."""

import json
import os
import subprocess
import sys

from keras_tensor_parallel import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERAS_TP = os.path.join(ROOT, ".venv", "bin", "keras-tp")


def _run(*args, timeout=600):
    exe = KERAS_TP if os.path.exists(KERAS_TP) else None
    cmd = [exe] if exe else [sys.executable, "-m", "keras_tensor_parallel.cli"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        cmd + list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_plan_table(capsys):
    assert cli.main(["plan", "seed-mlp", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "column" in out and "row" in out
    assert "left replicated" in out


def test_plan_override_replicates(capsys):
    args = ["plan", "seed-mlp", "-n", "2", "--format", "json"]
    assert cli.main([*args, "--override", ".*=replicated"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {v["role"] for v in plan["variables"]} == {"replicated"}


def test_plan_opt125m_json_subprocess():
    proc = _run("plan", "opt-125m", "--world-size", "2", "--format", "json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    assert plan["world_size"] == 2
    roles = {v["role"] for v in plan["variables"]}
    assert {"vocab", "heads", "column", "row"} <= roles


def test_unknown_model_is_one_line(capsys):
    assert cli.main(["plan", "no-such-model", "--world-size", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "Unknown model 'no-such-model'" in err and "opt-125m" in err
    assert "Traceback" not in err


def test_world_size_too_large_is_one_line(capsys):
    # conftest simulates 4 devices in this process.
    status = cli.main(["verify", "seed-mlp", "--world-size", "8"])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "xla_force_host_platform_device_count" in err


def test_bad_world_size_is_usage_error(capsys):
    assert cli.main(["plan", "seed-mlp", "--world-size", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err


def test_verify_writes_report_and_tolerance_zero_fails(tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["verify", "seed-attention", "-n", "2", "--steps", "2"]
    status = cli.main([*args, "--out", str(out), "--tolerance", "0"])
    assert status == 1  # --tolerance 0: no inexact check can pass
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False
    assert report["tolerance"] == 0
    assert (out / "report.md").read_text().startswith("# keras-tp verify")
    assert (out / "memory.png").exists()


def test_verify_exit_zero_on_tiny_model(tmp_path):
    proc = _run(
        "verify", "seed-attention", "--world-size", "2", "--steps", "2",
        "--out", str(tmp_path / "ok"),
    )  # fmt: skip
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    failed = [c for c in report["checks"] if not c["passed"]]
    assert proc.returncode == (1 if failed else 0), failed
    assert "summary" in proc.stdout


def test_train_small_writes_checkpoint(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_bytes(b"def f(x):\n    return x + 1\n" * 400)
    out = tmp_path / "run"
    status = cli.main(
        ["train", "opt-125m", "-n", "2", "--steps", "4", "--seq-len", "16",
         "--batch-size", "2", "--model-size", "small", "--data", str(data),
         "--out", str(out), "--val-every", "2"]
    )  # fmt: skip
    assert status == 0
    summary = json.loads((out / "train.json").read_text())
    assert len(summary["losses"]) == 4 and len(summary["val_losses"]) == 2
    assert (out / "model.keras").exists() and (out / "loss.png").exists()


def test_train_rejects_non_lm(capsys):
    assert cli.main(["train", "seed-mlp", "-n", "2", "--steps", "2"]) == 2
    assert "not a causal LM" in capsys.readouterr().err
