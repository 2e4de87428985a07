"""Golden plans for OPT-125M and GPT-2 (N=2): a plan change is a reviewed
diff. Regenerate with `python tests/test_golden_plans.py` and review."""

import json
import pathlib
import sys

import pytest

from keras_tensor_parallel import plan_model, zoo

GOLDEN = pathlib.Path(__file__).parent / "golden"
MODELS = {"opt-125m": zoo.opt, "gpt2": zoo.gpt2}
KEYS = ("shape", "axes", "role", "padded_shape")


def current(name, n=2):
    plan = plan_model(MODELS[name](), n)
    return {
        e.path: {k: v for k, v in e.to_dict().items() if k in KEYS}
        for e in plan
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_plan_matches_golden(name):
    golden = json.loads((GOLDEN / f"{name}_n2.json").read_text())
    got = current(name)
    assert sorted(got) == sorted(golden), "variable sets differ"
    diffs = [
        f"{path}: {golden[path]} -> {got[path]}"
        for path in golden
        if got[path] != golden[path]
    ]
    assert diffs == []


if __name__ == "__main__":
    for name in sys.argv[1:] or MODELS:
        (GOLDEN / f"{name}_n2.json").write_text(
            json.dumps(current(name), indent=1) + "\n"
        )
