"""`keras-tp`'s mesh flags (issue 15), in-process through `cli.main` (JAX,
4 CPU devices from conftest): `-t auto --device-memory` chooses what
`autosize` measures on the command's own batch, bad combinations are
one-line usage errors before anything is built, and `comms --generate -t 2`
accounts each data replica's decode step."""

from __future__ import annotations

import json

import keras
import pytest

from keras_tensor_parallel import autosize, catalogue, cli
from keras_tensor_parallel.comms import steps
from keras_tensor_parallel.devices import resolve_devices
from keras_tensor_parallel.plan import format_bytes

COMMS = ["comms", "seed-mlp", "-n", "4", "--batch-size", "4"]


def test_auto_comms_takes_the_size_autosize_measures(capsys):
    # The needs of the command's model on its batch (4 rows of seed-mlp),
    # measured here; a budget between T=1's and T=2's.
    keras.utils.set_random_seed(0)
    model = catalogue.resolve("seed-mlp").build()
    batch = (
        steps.example_inputs(model, batch_size=4, seq_len=32),
        steps.example_targets(model, batch_size=4, seq_len=32),
    )
    ids = resolve_devices(world_size=4)
    needs = {t: autosize.measure(model, ids, t, batch=batch) for t in (1, 2)}
    assert needs[1].total > needs[2].total
    budget = (needs[1].total + needs[2].total) // 2
    args = [*COMMS, "-t", "auto", "--device-memory", str(budget)]
    assert cli.main([*args, "--format", "json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # the table went to stderr
    assert report["tensor_parallel_size"] == 2
    assert report["data_parallel_size"] == 2
    shown = captured.err
    assert "tensor_parallel_size='auto': 2" in shown, shown
    (chosen,) = [line for line in shown.splitlines() if "<- chosen" in line]
    assert chosen.startswith("2 x 2") and format_bytes(needs[2].total) in chosen
    assert "1 x 4" not in shown  # stops at the first size that fits


@pytest.mark.parametrize(
    "extra, rule",
    [
        (["-t", "2", "--device-memory", "16GB"], "read only with"),
        (["-t", "auto"], "auto needs --device-memory"),
        (["-t", "auto", "--device-memory", "16XB"], "--device-memory must be"),
        (["-t", "auto", "--device-memory", "1", "--generate"], "fixed"),
        # Batch 1 divides over 1 replica only: T=4 alone is measured.
        (["-t", "auto", "--device-memory", "1", "--batch-size", "1"], "No "),
        (["-t", "two"], "positive integer or 'auto'"),
    ],
)
def test_bad_mesh_flags_are_one_line_usage_errors(extra, rule, capsys):
    assert cli.main([*COMMS, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert rule in err.splitlines()[-1], err
    assert "Traceback" not in err


def test_comms_generate_with_a_data_axis(capsys):
    # gpt2:tiny on 4 devices as data 2 x model 2, a batch of 2 prompts:
    # each replica decodes its one row through the Megatron minimum.
    args = ["comms", "gpt2:tiny", "--generate", "-n", "4", "-t", "2"]
    args += ["--batch-size", "2", "--seq-len", "16", "--prompt-len", "4"]
    assert cli.main([*args, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data_parallel"] == 2 and report["world_size"] == 2
    # The minimum is Megatron's all-reduces at one row per replica: with
    # the batch not split over data, the decode step would carry twice it.
    decode, minimum = report["decode"]["model"], report["minimum"]["model"]
    assert decode == minimum and minimum["bytes"] > 0, report
    assert report["weight_gathers"] == report["cache_gathers"] == 0
    cache = report["cache"]
    assert cache["bytes_per_device"] * 4 == cache["bytes"]  # data x model
