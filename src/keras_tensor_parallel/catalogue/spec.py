"""`ModelSpec`: one model the tests, the CLI and the benchmarks can build,
feed and describe, and the input makers it uses.

Importing this module imports no framework (`keras-tp models` stays fast).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

# What a spec's model returns, when it is a causal LM: hidden states of a
# token backbone (a head tying the token embedding gives the logits) or the
# logits themselves (a KerasHub CausalLM task, a saved LM).
LM_KINDS = ("", "backbone", "logits")


@dataclasses.dataclass(frozen=True)
class TokenInputs:
    """KerasHub backbone inputs: random token ids, no padding."""

    segments: bool = False

    def __call__(self, batch: int, seq: int, seed: int, vocab: int):
        rng = np.random.RandomState(seed)
        x = {
            "token_ids": rng.randint(0, vocab, (batch, seq)).astype("int32"),
            "padding_mask": np.ones((batch, seq), "int32"),
        }
        if self.segments:
            x["segment_ids"] = np.zeros((batch, seq), "int32")
        return x


@dataclasses.dataclass(frozen=True)
class DenseInputs:
    """Standard normal float32 features of a fixed per-example shape."""

    shape: tuple

    def __call__(self, batch: int, seq: int, seed: int, vocab: int):
        rng = np.random.RandomState(seed)
        return rng.randn(batch, *self.shape).astype("float32")


@dataclasses.dataclass(frozen=True)
class IdInputs:
    """Random integer ids below the vocabulary, a fixed length per row."""

    length: int

    def __call__(self, batch: int, seq: int, seed: int, vocab: int):
        rng = np.random.RandomState(seed)
        return rng.randint(0, vocab, (batch, self.length)).astype("int32")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model by name: how to build it, feed it and describe it.

    Catalogue entries build from `family(**config)` with random weights;
    `tiny()` gives the entry's debug flavour (same layer classes, a few
    thousand parameters per layer), which the tests reuse. A `.keras` file
    or a preset directory is a spec too (`source` says which), whose
    `family` loads it and which has no tiny flavour.

    Attributes:
        name: What the user types (`opt-125m`, `opt-125m:tiny`, a path).
        family: Builds the model from keyword config (random weights,
            seeded by the caller) or loads it.
        input_maker: `(batch, seq, seed, vocab)` -> a batch of inputs.
        description: One line for `keras-tp models` and reports.
        config: Keyword arguments `build()` passes to `family`.
        tiny_config: Overrides of `config` that make the tiny flavour;
            `None` when there is none.
        lm: `""` (not a causal LM), `"backbone"` (token ids in, hidden
            states out) or `"logits"` (token ids in, logits out).
        vocab: Vocabulary size (0 when the model takes no token ids).
        source: `"catalogue"`, `"preset"` or `"file"`.

    Example:

    ```python
    from keras_tensor_parallel import catalogue

    spec = catalogue.get("opt-125m").tiny()
    model = spec.build()
    hidden = model(spec.inputs(batch=2, seq=8))
    ```
    """

    name: str
    family: Callable
    input_maker: Callable
    description: str = ""
    config: Mapping = dataclasses.field(default_factory=dict)
    tiny_config: Mapping | None = None
    lm: str = ""
    vocab: int = 0
    source: str = "catalogue"

    def __post_init__(self):
        assert self.lm in LM_KINDS, self.lm

    @property
    def causal_lm(self) -> bool:
        """Whether the model can be trained as a causal LM."""
        return bool(self.lm)

    def build(self):
        """The model (random weights from the caller's seed, or loaded)."""
        return self.family(**self.config)

    def inputs(self, batch: int = 2, seq: int = 16, seed: int = 0):
        """A batch of `batch` random inputs the model accepts."""
        return self.input_maker(batch, seq, seed, self.vocab)

    def variant(self, *, name: str | None = None, **overrides) -> ModelSpec:
        """This spec with some config fields replaced (vocabulary too).

        Example:

        ```python
        spec = catalogue.get("gemma-small").tiny()
        mha = spec.variant(num_key_value_heads=4)
        ```
        """
        if overrides and self.source != "catalogue":
            raise ValueError(
                f"{self.name!r} is loaded from disk; its config cannot be "
                f"changed. Received: {sorted(overrides)}"
            )
        config = {**self.config, **overrides}
        return dataclasses.replace(
            self,
            name=name or self.name,
            config=config,
            vocab=int(config.get("vocabulary_size", self.vocab)),
        )

    def tiny(self, **overrides) -> ModelSpec:
        """The debug flavour: same layer classes, a small config.

        Raises:
            ValueError: when the spec has no tiny flavour (a file).
        """
        if self.tiny_config is None:
            raise ValueError(
                f"{self.name!r} has no tiny config: only catalogue models "
                f"have one. Received: {self.name!r}"
            )
        if self.name.endswith(":tiny"):
            return self.variant(**overrides)
        fields = {**self.tiny_config, **overrides}
        return self.variant(name=f"{self.name}:tiny", **fields).described(
            f"tiny {self.name} config ("
            + ", ".join(f"{k}={v}" for k, v in fields.items())
            + ")"
            if fields
            else self.description
        )

    def described(self, description: str) -> ModelSpec:
        """This spec with another description."""
        return dataclasses.replace(self, description=description)
