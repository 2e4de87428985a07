"""Where a model comes from: a KerasHub preset directory or a builder
function with an optional weights file. Each source builds its model with
variables unallocated and says which file holds which variable's value.
"""

from __future__ import annotations

import dataclasses
import json
import os

from keras_tensor_parallel.loading import abstract
from keras_tensor_parallel.loading.h5 import H5Weights, dataset_paths

CONFIG = "config.json"
TASK_CONFIG = "task.json"
BACKBONE_WEIGHTS = "model.weights.h5"
TASK_WEIGHTS = "task.weights.h5"
SHARDED_INDEX = "model.weights.json"
TOKENIZER_CONFIG = "tokenizer.json"


@dataclasses.dataclass
class Part:
    """Saved values for the variables of one object: `root`'s save walk
    (minus `skip`, objects saved elsewhere) names the datasets in `file`."""

    file: str
    root: object
    skip: tuple = ()
    converter: object = None  # Hugging Face: KerasHub's converter module
    hf_config: dict | None = None


@dataclasses.dataclass
class Source:
    """A model built unallocated, and the files its values come from."""

    model: object
    created: list
    parts: list
    compile_task: bool = False


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"Could not read {path!r} as JSON ({e}). Received: preset "
            f"directory {os.path.dirname(path)!r}"
        ) from e


def check_preset(path) -> dict:
    """The preset's `config.json`, after checking `path` is a preset.

    Raises:
        ValueError: for a missing path, a file, or a directory without a
            KerasHub or Hugging Face `config.json`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"Preset path does not exist. Received: {path!r}")
    if not os.path.isdir(path) or not os.path.isfile(
        os.path.join(path, CONFIG)
    ):
        raise ValueError(
            "A preset is a directory with a config.json (written by "
            "`save_to_preset`, or a Hugging Face checkpoint). Received: "
            f"{path!r}"
        )
    config = _read_json(os.path.join(path, CONFIG))
    if "registered_name" not in config and "model_type" not in config:
        raise ValueError(
            f"{path!r}/config.json is neither a KerasHub config (no "
            "'registered_name') nor a Hugging Face config (no 'model_type'). "
            f"Received: keys {sorted(config)[:8]}"
        )
    return config


def task_class(path: str, model_class=None):
    """The class to build: `model_class`, else the task saved in the
    preset, else its backbone class."""
    if model_class is not None:
        return model_class
    from keras_hub.src.utils.preset_utils import check_config_class

    task_file = os.path.join(path, TASK_CONFIG)
    if os.path.isfile(task_file):
        return check_config_class(_read_json(task_file))
    return None


def _check_weights_file(file: str) -> None:
    # Checked when loading only: a config-only preset can still be planned.
    folder = os.path.dirname(file)
    if os.path.basename(file) == BACKBONE_WEIGHTS and os.path.isfile(
        os.path.join(folder, SHARDED_INDEX)
    ):
        raise ValueError(
            "Presets whose weights are split over several .weights.h5 files "
            f"are not supported yet. Received: {folder!r} with "
            f"{SHARDED_INDEX}"
        )
    if not os.path.isfile(file):
        raise ValueError(
            f"The preset has no {os.path.basename(file)}: nothing to load "
            f"(a config-only preset can be planned, not loaded). Received: "
            f"{folder!r}"
        )


def keras_preset(path: str, model_class=None) -> Source:
    """A KerasHub-format preset: backbone (or task) built unallocated, its
    values in `model.weights.h5` (and `task.weights.h5` for task heads)."""
    import keras_hub

    cls = task_class(path, model_class)
    model, created, is_task = _task_or_model(
        path, cls, keras_hub.models.Backbone
    )
    backbone = getattr(model, "backbone", model)
    parts = [Part(os.path.join(path, BACKBONE_WEIGHTS), backbone)]
    task_weights = os.path.join(path, TASK_WEIGHTS)
    if is_task and os.path.isfile(task_weights) and model.has_task_weights():
        skip = tuple(backbone._flatten_layers())
        parts.append(Part(task_weights, model, skip))
    return Source(model, created, parts, compile_task=is_task)


def _task_or_model(path: str, cls, default):
    """`cls` (or `default`) from the preset, built unallocated."""
    import keras_hub

    is_task = cls is not None and issubclass(cls, keras_hub.models.Task)
    with abstract.unallocated() as created:
        if is_task:
            extra = {}
            if not os.path.isfile(os.path.join(path, TOKENIZER_CONFIG)):
                extra["preprocessor"] = None  # a weights-only preset
            # compile=False: the default compile would create optimizer
            # state, and a stateless scope allows no concrete variable.
            model = cls.from_preset(
                path, load_weights=False, compile=False, **extra
            )
        else:
            model = (cls or default).from_preset(path, load_weights=False)
    return model, created, is_task


def hf_preset(path: str, model_class=None) -> Source:
    """A Hugging Face directory: built unallocated from the converted
    config; values converted by KerasHub's converter, variable by variable.
    """
    import keras_hub
    from keras_hub.src.utils.preset_utils import get_preset_loader

    loader = get_preset_loader(path)
    model, created, is_task = _task_or_model(
        path, model_class, keras_hub.models.Backbone
    )
    backbone = getattr(model, "backbone", model)
    part = Part(path, backbone, (), loader.converter, loader.config)
    return Source(model, created, [part], compile_task=is_task)


def preset(path, model_class=None) -> Source:
    """The `Source` for a KerasHub or Hugging Face preset directory."""
    path = os.fspath(path)
    config = check_preset(path)
    if "registered_name" in config:
        return keras_preset(path, model_class)
    return hf_preset(path, model_class)


def builder(make_model, weights=None) -> Source:
    """`make_model()` built unallocated; values from `weights` if given."""
    if weights is not None:
        weights = os.fspath(weights)
        if not os.path.isfile(weights) or not (
            weights.endswith(".keras") or weights.endswith(".weights.h5")
        ):
            raise ValueError(
                "weights must be an existing .keras or .weights.h5 file. "
                f"Received: weights={weights!r}"
            )
    model, created = abstract.build_unallocated(make_model)
    parts = [Part(weights, model)] if weights is not None else []
    return Source(model, created, parts)


def open_parts(source: Source, variables) -> list:
    """`[(reader, {id(variable): dataset})]` for every part, all checked
    against the model before any value is read.

    Raises:
        ValueError: when a file's names or shapes differ from the model's.
    """
    opened = []
    try:
        for part in source.parts:
            owned = _owned(part, variables)
            if part.converter is not None:
                from keras_tensor_parallel.loading.hf import HFWeights

                reader = HFWeights(
                    part.file, part.root, part.converter, part.hf_config
                )
                opened.append((reader, {}))
                opened[-1] = (reader, reader.match(owned))
                continue
            _check_weights_file(part.file)
            reader = H5Weights(part.file)
            opened.append((reader, {}))
            paths = dataset_paths(part.root, skip=part.skip)
            opened[-1] = (reader, reader.match(owned, paths=paths))
    except Exception:
        for reader, _ in opened:
            reader.close()
        raise
    return opened


def _owned(part: Part, variables) -> list:
    skipped = {id(v) for obj in part.skip for v in obj.variables}
    mine = {id(v) for v in part.root.variables} - skipped
    return [v for v in variables if id(v) in mine]
