"""The model catalogue: named models with a full and a tiny config.

One `ModelSpec` per model says how to build it (random weights, nothing
downloaded), feed it and describe it; `spec.tiny()` is its debug flavour.
The CLI (`keras-tp plan opt-125m`, `opt-125m:tiny`), the tests and the
benchmarks all take their models from here. Importing the package imports
no framework.

Example:

```python
from keras_tensor_parallel import catalogue

spec = catalogue.get("llama-small").tiny()
model = spec.build()
outputs = model(spec.inputs(batch=2, seq=8))
```
"""

from keras_tensor_parallel.catalogue.builders import (
    HubBackbone,
    seed_attention,
    seed_einsum,
    seed_embedding,
    seed_mlp,
)
from keras_tensor_parallel.catalogue.entries import CATALOGUE
from keras_tensor_parallel.catalogue.lm import causal_lm, lm_builder, lm_inputs
from keras_tensor_parallel.catalogue.sources import get, resolve
from keras_tensor_parallel.catalogue.spec import ModelSpec

__all__ = [
    "CATALOGUE",
    "LARGE_PARAMS",
    "HubBackbone",
    "ModelSpec",
    "causal_lm",
    "get",
    "lm_builder",
    "lm_inputs",
    "resolve",
    "seed_attention",
    "seed_einsum",
    "seed_embedding",
    "seed_mlp",
    "sized",
]

# Above this many parameters `keras-tp train` and the verify training check
# use the tiny config: a full OPT-125M step takes seconds on CPU.
LARGE_PARAMS = 30_000_000

SIZES = ("auto", "full", "tiny")


def sized(spec: ModelSpec, *, size: str) -> ModelSpec:
    """`spec` itself (`"full"`), its tiny flavour (`"tiny"`), or the tiny
    one when the model has over `LARGE_PARAMS` parameters (`"auto"`).

    Raises:
        ValueError: for an unknown size, or `"tiny"` of a model without a
            tiny config.

    Example:

    ```python
    spec = sized(get("opt-125m"), size="auto")  # the tiny OPT
    ```
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}. Received: {size!r}")
    if size == "tiny" or (
        size == "auto"
        and spec.tiny_config is not None
        and spec.build().count_params() > LARGE_PARAMS
    ):
        return spec.tiny()
    return spec
