"""MODEL given as a saved .keras file or a local KerasHub preset directory."""

import json

from keras_tensor_parallel import catalogue, cli


def plan_json(capsys, source):
    assert cli.main(["plan", source, "-n", "2", "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_from_keras_file(tmp_path, capsys):
    model = catalogue.seed_attention()
    path = tmp_path / "attention.keras"
    model.save(path)
    plan = plan_json(capsys, str(path))
    roles = {v["role"] for v in plan["variables"]}
    assert {"heads", "row", "column"} <= roles
    assert len(plan["variables"]) == len(model.variables)


def test_plan_from_preset_directory(tmp_path, capsys):
    backbone = catalogue.get("opt-125m:tiny").variant(num_layers=1).build()
    preset = tmp_path / "tiny_opt"
    backbone.save_to_preset(str(preset))
    plan = plan_json(capsys, str(preset))
    by_path = {v["path"]: v for v in plan["variables"]}
    table = by_path["embeddings/token_embedding/embeddings"]
    assert table["role"] == "vocab" and table["shape"] == [1000, 64]
    assert len(plan["variables"]) == len(backbone.variables)


def test_unknown_source_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nothing_here"
    assert cli.main(["plan", str(missing), "-n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1
