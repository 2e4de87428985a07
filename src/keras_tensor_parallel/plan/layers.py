"""Facts about layer classes, kept in one list that everything reads.

The rules (`rules.py`) keep these layers whole with replicated parameters;
the propagators (`propagate.py`) let a split pass through them only along
dims they do not normalize over; engines may read the same list.

Classes are named by module and class name because KerasHub is optional
and spells its norms per model family.
"""

from __future__ import annotations

import importlib

# (module, class name) of every normalization layer the planner knows.
_NORMS = (
    ("keras.layers", "LayerNormalization"),
    ("keras.layers", "BatchNormalization"),
    ("keras.layers", "GroupNormalization"),
    ("keras.layers", "UnitNormalization"),
    ("keras.layers", "RMSNormalization"),
    ("keras_hub.src.models.llama.llama_layernorm", "LlamaLayerNorm"),
    ("keras_hub.src.models.gemma.rms_normalization", "RMSNormalization"),
    (
        "keras_hub.src.models.mistral.mistral_layer_norm",
        "MistralLayerNormalization",
    ),
    ("keras_hub.src.models.qwen.qwen_layernorm", "QwenLayerNorm"),
    ("keras_hub.src.models.gemma3.gemma3_layers", "RMSNormalization"),
    ("keras_hub.src.models.t5.t5_layer_norm", "T5LayerNorm"),
)

# Class names of the norms: propagators match ops by class name.
NORM_CLASS_NAMES: frozenset[str] = frozenset(name for _, name in _NORMS)

# Norms whose statistics are per channel, not over features: a split channel
# axis stays local through them.
PER_CHANNEL_NORM_NAMES: frozenset[str] = frozenset({"BatchNormalization"})


def _resolve() -> tuple[type, ...]:
    found = []
    for module, name in _NORMS:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # optional package or class
            continue
        if cls not in found:
            found.append(cls)
    return tuple(found)


# The norm classes importable here (Keras, and KerasHub when installed).
NORM_CLASSES: tuple[type, ...] = _resolve()


def is_norm(layer) -> bool:
    """Whether `layer` is a normalization layer the planner knows.

    Example:

    ```python
    is_norm(keras.layers.LayerNormalization())  # True
    ```
    """
    return isinstance(layer, NORM_CLASSES)
