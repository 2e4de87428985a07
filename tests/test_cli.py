"""keras-tp command line: plan, verify, train, and its errors."""

import json
import os
import subprocess
import sys

from keras_tensor_parallel import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERAS_TP = os.path.join(ROOT, ".venv", "bin", "keras-tp")


# What a new user's shell has: none of the variables conftest.py sets.
USER_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("XLA_FLAGS", "KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL")
}


def _run(*args, timeout=600, env=None, cwd=ROOT):
    exe = KERAS_TP if os.path.exists(KERAS_TP) else None
    cmd = [exe] if exe else [sys.executable, "-m", "keras_tensor_parallel.cli"]
    return subprocess.run(
        cmd + list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=USER_ENV if env is None else env,
        cwd=cwd,
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


def test_plan_opt_json_subprocess():
    # The tiny flavour: same layer classes as OPT-125M (its full-size plan
    # is the golden plan in test_golden_plans.py).
    args = ["plan", "opt-125m:tiny", "--world-size", "2", "--format", "json"]
    proc = _run(*args)
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
    # With sequence parallelism (issue 16): every check on the SP model,
    # and the train step's activation memory shown beside the parameters'.
    out = tmp_path / "rep"
    args = ["verify", "seed-attention", "-n", "2", "--steps", "2"]
    args += ["--sequence-parallel"]
    status = cli.main([*args, "--out", str(out), "--tolerance", "0"])
    assert status == 1  # --tolerance 0: no inexact check can pass
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False
    assert report["tolerance"] == 0
    assert report["settings"]["sequence_parallel"] is True
    assert (out / "report.md").read_text().startswith("# keras-tp verify")
    assert (out / "memory.png").exists()
    assert (out / "activations.png").exists()
    rows = {c["name"]: c for c in report["checks"]}
    acts = rows["activations"]  # a figure, not held to --tolerance
    assert acts["passed"] and acts["threshold"] is None
    detail = acts["detail"]
    assert detail["sequence_parallel"] is True
    per_device = detail["per_device_temp_bytes"]
    assert 0 < per_device < 0.8 * detail["single_device_temp_bytes"]
    assert "MiB per device vs" in acts["note"]


def test_verify_nothing_split_is_na_not_fail(tmp_path, capsys):
    # One Dense whose output is the model's output: no Megatron region, so
    # no parameter (and no optimizer slot) is split; the slot check has
    # nothing to check. (seed-attention at N=3, the case first reported,
    # is now split with padded widths: see the next test.)
    import keras

    path = tmp_path / "one_dense.keras"
    keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)]).save(path)
    out = tmp_path / "ok"
    args = ["verify", str(path), "-n", "2", "--steps", "2"]
    status = cli.main([*args, "--out", str(out)])
    shown = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    rows = {c["name"]: c for c in report["checks"]}
    assert rows["optimizer slots"]["skipped"], rows["optimizer slots"]
    assert rows["optimizer slots"]["passed"]
    assert all(c["passed"] for c in report["checks"]), report["checks"]
    assert status == 0, shown[-3000:]
    assert "n/a" in shown and "FAIL" not in shown
    assert "with nothing to check (n/a)" in (out / "report.md").read_text()


def test_verify_widths_that_do_not_divide_are_padded(tmp_path, capsys):
    # seed-attention at N=3: 8 heads and the 256-wide feed-forward are
    # padded to 9 and 258 (zero rows); the row Dense takes the padded width.
    out = tmp_path / "pad"
    args = ["verify", "seed-attention", "-n", "3", "--steps", "2"]
    status = cli.main([*args, "--out", str(out)])
    shown = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert all(c["passed"] for c in report["checks"]), report["checks"]
    assert status == 0, shown[-3000:]


def test_train_progress_checkpoint_then_verify_it(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_bytes(b"def f(x):\n    return x + 1\n" * 400)
    out = tmp_path / "run"
    status = cli.main(
        ["train", "opt-125m", "-n", "2", "--steps", "10", "--seq-len", "16",
         "--batch-size", "2", "--model-size", "tiny", "--data", str(data),
         "--out", str(out), "--val-every", "5"]
    )  # fmt: skip
    assert status == 0
    shown = capsys.readouterr().out
    # One progress bar over the 10 steps, not Keras's epochs of val_every.
    assert "10/10" in shown and "Epoch" not in shown, shown[-2000:]
    summary = json.loads((out / "train.json").read_text())
    assert len(summary["losses"]) == 10 and len(summary["val_losses"]) == 2
    assert (out / "model.keras").exists() and (out / "loss.png").exists()
    # The checkpoint is a causal LM with [batch, seq, vocab] logits: the
    # training check trains it on next-token targets.
    rep = tmp_path / "rep"
    args = ["verify", str(out / "model.keras"), "-n", "2", "--steps", "2"]
    status = cli.main([*args, "--seq-len", "8", "--out", str(rep)])
    report = json.loads((rep / "report.json").read_text())
    assert status == 0, report["checks"]
    assert report["training"]["data"].startswith("the Python standard")
    assert len(report["training"]["losses_tp"]) == 2


def test_comms_of_sequential_models(capsys):
    # Sequential models that were never called have no `.output`.
    for name in ("seed-mlp", "seed-embedding"):
        assert cli.main(["comms", name, "-n", "2"]) == 0
        out = capsys.readouterr().out
        assert "weight all-gathers: 0" in out, out


def test_launch_passes_its_arguments_through(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import os, sys\n"
        "path = os.path.join(sys.argv[2], 'rank' + os.environ['RANK'])\n"
        "open(path, 'w').write(' '.join(sys.argv[1:]))\n"
    )
    proc = _run(
        "launch", "-n", "2", str(script), "--out", str(tmp_path), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == f"--out {tmp_path}"


def test_launched_rank_error_is_shown_as_the_ranks_error(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text(
        "import os\n"
        "if os.environ['RANK'] == '1':\n"
        "    raise ValueError('rank one is unhappy')\n"
    )
    proc = _run("launch", "-n", "2", str(script), timeout=300)
    assert proc.returncode != 0
    assert "ValueError: rank one is unhappy" in proc.stderr, proc.stderr
    # The rank's own error, not a launcher's or the CLI's traceback.
    assert len(proc.stderr.strip().splitlines()) <= 12, proc.stderr
    assert "keras_tensor_parallel" not in proc.stderr, proc.stderr


def test_no_framework_logs_and_no_restart(tmp_path):
    # A new user's shell: no KERAS_BACKEND, no TF_CPP_MIN_LOG_LEVEL.
    for args in (["--help"], ["models"], ["plan", "seed-mlp", "-n", "2"]):
        proc = _run(*args, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stderr == "", (args, proc.stderr[-2000:])
    # The backend is chosen in-process before keras is imported (no
    # re-exec), and listing models imports no framework at all.
    code = (
        "import sys; from keras_tensor_parallel import cli\n"
        "assert cli.main(['models']) == 0\n"
        "assert 'keras' not in sys.modules, 'keras imported'\n"
        "assert cli.main(['plan', 'seed-mlp', '-n', '2']) == 0\n"
        "import keras; assert keras.backend.backend() == 'jax'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        timeout=300, env=USER_ENV, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_verify_and_comms_say_they_need_jax():
    env = dict(USER_ENV, KERAS_BACKEND="torch")
    for command in ("verify", "comms"):
        proc = _run(command, "seed-mlp", "-n", "1", env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "needs the JAX backend" in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # The library says the same, before touching the model.
    code = (
        "from keras_tensor_parallel import catalogue, comms, verify\n"
        "spec = catalogue.get('seed-mlp')\n"
        "x = spec.inputs()\n"
        "calls = [\n"
        "    lambda: verify.compare_forward(spec.build, 1, inputs=x),\n"
        "    lambda: verify.memory_check(spec.build, 1),\n"
        "    lambda: comms.analyze(spec.build(), 1),\n"
        "]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as e:\n"
        "        assert 'needs the JAX backend' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('no ValueError')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_train_rejects_non_lm(capsys):
    assert cli.main(["train", "seed-mlp", "-n", "2", "--steps", "2"]) == 2
    assert "not a causal LM" in capsys.readouterr().err


# --tensor-parallel-size: data x tensor parallel (issue 15) -------------------


def test_comms_splits_collectives_by_mesh_axis():
    # As installed, 4 devices as data 2 x model 2: the model axis against
    # the Megatron minimum of one replica's batch, the data axis against
    # one reduction of a replica's gradients, computed here from the
    # model's own shapes: a split variable's gradient is half of it.
    args = ["comms", "seed-mlp", "-n", "4", "--tensor-parallel-size", "2"]
    proc = _run(*args, "--batch-size", "4", "--format", "json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert (report["tensor_parallel_size"], report["data_parallel_size"]) == (
        2,
        2,
    )
    # seed-mlp: 64 -> 128 -> 256 -> 128 -> 32; Dense 1-2 and 3-4 are two
    # Megatron pairs (column, row): every kernel is split, the column
    # biases too, the row biases (256 -> 128's and the head's) are whole.
    kernels = 64 * 128 + 128 * 256 + 256 * 128 + 128 * 32
    grads = 4 * (kernels // 2 + 128 // 2 + 256 + 128 // 2 + 32)
    data = report["axes"]["data"]
    assert data["minimum_bytes"] == grads
    assert data["ops"] == 1 and grads <= data["bytes"] <= grads + 8
    model = report["axes"]["model"]
    assert 0 < model["bytes"] <= model["minimum_bytes"], model
    assert report["axes"]["mesh"]["ops"] == 0
    assert "sum over trainable variables" in report["data_axis_formula"]


def test_comms_table_shows_both_axes(capsys):
    args = ["comms", "seed-mlp", "-n", "4", "-t", "2", "--batch-size", "4"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "mesh data 2 x model 2: global batch 4, 2 per replica" in out
    assert "model axis: " in out and "Megatron minimum of one replica" in out
    assert "data axis: 1 collective(s)" in out, out[-1500:]


def test_bad_tensor_parallel_size_is_one_line_usage_error(capsys):
    for extra, rule in (
        (["-t", "3"], "--tensor-parallel-size must divide --world-size (4)"),
        (["-t", "2", "--batch-size", "3"], "multiple of the data-parallel"),
        (["-t", "0"], "positive integer"),
    ):
        status = cli.main(["comms", "seed-mlp", "-n", "4", *extra])
        err = capsys.readouterr().err.strip()
        # argparse's own errors (-t 0) follow its usage lines.
        assert status == 2 and rule in err.splitlines()[-1], err
        assert "Traceback" not in err and "usage" not in err or rule[0] == "p"


def test_verify_and_train_data2_model2_match_one_device(tmp_path, capsys):
    # verify: every check against one device on the 2 x 2 mesh.
    rep = tmp_path / "rep"
    args = ["verify", "seed-mlp", "-n", "4", "-t", "2", "--steps", "2"]
    assert cli.main([*args, "--out", str(rep)]) == 0
    report = json.loads((rep / "report.json").read_text())
    assert report["tensor_parallel_size"] == 2 and report["passed"]
    assert "(data 2 x model 2)" in (rep / "report.md").read_text()
    # train: the same steps on one device and on 2 x 2 give the same
    # losses (each replica takes half of every batch of 4 windows).
    data = tmp_path / "text.txt"
    data.write_bytes(b"def f(x):\n    return x + 1\n" * 400)
    losses = {}
    for name, mesh in (("one", ["-n", "1"]), ("dp", ["-n", "4", "-t", "2"])):
        out = tmp_path / name
        status = cli.main(
            ["train", "opt-125m", *mesh, "--steps", "4", "--seq-len", "16",
             "--model-size", "tiny", "--data", str(data), "--out", str(out)]
        )  # fmt: skip
        assert status == 0
        losses[name] = json.loads((out / "train.json").read_text())
    assert "4 devices as data 2 x model 2" in capsys.readouterr().out
    assert losses["dp"]["data_parallel_size"] == 2
    want = losses["one"]["losses"]
    assert want[-1] < want[0]
    assert max(abs(a - b) / abs(b) for a, b in
               zip(losses["dp"]["losses"], want)) <= 1e-5  # fmt: skip
