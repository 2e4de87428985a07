"""The model catalogue: one spec per model, a tiny flavour of each that the
tests, the CLI and the benchmarks share."""

import numpy as np
import pytest

from keras_tensor_parallel import catalogue


@pytest.mark.parametrize("name", list(catalogue.CATALOGUE))
def test_tiny_flavour_builds_and_takes_its_inputs(name):
    spec = catalogue.get(name)
    tiny = spec.tiny()
    assert tiny.name == f"{name}:tiny"
    assert catalogue.get(f"{name}:tiny") == tiny
    model = tiny.build()
    # Same architecture, tiny: at most a few hundred thousand parameters.
    assert tiny.family == spec.family and tiny.input_maker == spec.input_maker
    assert model.count_params() < 400_000, model.count_params()
    out = model(tiny.inputs(batch=2, seq=8, seed=0))
    leaves = out.values() if isinstance(out, dict) else [out]
    assert all(np.all(np.isfinite(np.asarray(t))) for t in leaves)
    if tiny.vocab:
        assert tiny.vocab == tiny.config.get("vocabulary_size", tiny.vocab)


def test_variant_replaces_fields_and_vocabulary():
    gpt2 = catalogue.get("gpt2:tiny")
    assert gpt2.vocab == 1001  # odd, as GPT-2's 50257
    wide = gpt2.variant(vocabulary_size=256, num_layers=1)
    assert wide.vocab == 256 and wide.config["num_layers"] == 1
    assert wide.config["hidden_dim"] == gpt2.config["hidden_dim"]
    ids = wide.inputs(batch=4, seq=8)["token_ids"]
    assert ids.shape == (4, 8) and ids.max() < 256


def test_sized_picks_tiny_only_for_large_models():
    mlp = catalogue.sized(catalogue.get("seed-mlp"), size="auto")
    assert mlp.name == "seed-mlp"  # 74k parameters: itself
    gpt2 = catalogue.sized(catalogue.get("gpt2"), size="tiny")
    assert gpt2.name == "gpt2:tiny"
    with pytest.raises(ValueError, match="Received: 'small'"):
        catalogue.sized(catalogue.get("gpt2"), size="small")


def test_unknown_names_and_files_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="Built-in models"):
        catalogue.get("opt-125m:huge")
    with pytest.raises(ValueError, match="No such .keras file"):
        catalogue.resolve(str(tmp_path / "missing.keras"))
    path = tmp_path / "mlp.keras"
    catalogue.seed_mlp().save(path)
    spec = catalogue.resolve(str(path))
    assert spec.source == "file" and not spec.causal_lm
    with pytest.raises(ValueError, match="no tiny config"):
        spec.tiny()
    with pytest.raises(ValueError, match="cannot be changed"):
        spec.variant(num_layers=1)


def test_saved_causal_lm_is_a_logits_lm(tmp_path):
    lm = catalogue.causal_lm(catalogue.get("opt-125m:tiny").build())
    path = tmp_path / "lm.keras"
    lm.save(path)
    spec = catalogue.resolve(str(path))
    assert spec.lm == "logits" and spec.vocab == 1000
    logits = spec.build()(spec.inputs(batch=2, seq=8))
    assert tuple(logits.shape) == (2, 8, 1000)


def test_importing_the_catalogue_imports_no_framework():
    import subprocess
    import sys

    code = (
        "import sys; from keras_tensor_parallel import catalogue\n"
        "assert len(catalogue.CATALOGUE) == 10\n"
        "bad = {'keras', 'jax', 'torch', 'tensorflow'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
