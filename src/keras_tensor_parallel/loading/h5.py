"""Read a Keras `.weights.h5` file (alone, in a `.keras` archive or in a
KerasHub preset) one slice at a time.

Keras writes a layer's variables under `<object path>/vars/<i>`, where the
object path comes from walking the model's attributes. Rather than
re-derive that walk, `locate` runs Keras's own save walk with a store that
records which dataset each variable would be written to, then opens those
datasets lazily: `read(variable, index)` reads only the rows of one shard.
"""

from __future__ import annotations

import zipfile

import h5py
import ml_dtypes
import numpy as np
from keras.src.saving import saving_lib


class _PathRecorder(saving_lib.H5IOStore):
    """A weights store that records `{id(variable): dataset path}`.

    It never touches values: `Layer.save_own_variables` hands it the
    variable objects themselves.
    """

    def __init__(self):  # no file: H5IOStore.__init__ would open one
        self.paths: dict[int, str] = {}
        self.foreign: list[str] = []
        self._prefix = ""

    def __bool__(self) -> bool:  # H5IOStore defines __len__
        return True

    def make(self, path, metadata=None):
        self._prefix = f"{path}/vars" if path else "vars"
        return self

    def __setitem__(self, key, value):
        name = f"{self._prefix}/{key}"
        if hasattr(value, "path") and hasattr(value, "assign"):
            self.paths[id(value)] = name
        else:  # a computed value (LoRA merge, quantization): not a variable
            self.foreign.append(name)


def dataset_paths(model, skip=()) -> dict[int, str]:
    """`{id(variable): h5 dataset path}` as `model.save_weights` writes
    (`skip`: objects saved elsewhere, as `objects_to_skip` in Keras).

    Raises:
        ValueError: when a layer saves computed values instead of its
            variables (LoRA-merged or re-quantized kernels).
    """
    recorder = _PathRecorder()
    skipped = {id(obj) for obj in skip}
    # Only the model's own weights: a compiled model's optimizer state is
    # saved beside them but is not what loading or checkpoint keys need.
    skipped.add(id(getattr(model, "optimizer", None)))
    saving_lib._save_state(
        model,
        weights_store=recorder,
        assets_store=None,
        inner_path="",
        visited_saveables=skipped,
    )
    if recorder.foreign:
        raise ValueError(
            "Cannot load shard by shard: these entries are computed when "
            "saved, not stored variables (LoRA or quantized layers): "
            f"{recorder.foreign[:3]}. Received: a model with such layers"
        )
    return recorder.paths


class H5Weights:
    """Lazy, sliceable access to the datasets of a `.weights.h5` file.

    Args:
        path: A `.weights.h5` file, or a `.keras` archive (its
            `model.weights.h5` member is read in place).

    Example:

    ```python
    with H5Weights("model.weights.h5") as weights:
        names = weights.match(model.variables)
        rows = weights.read(names[0], (slice(0, 8), slice(None)))
    ```
    """

    def __init__(self, path: str):
        self.path = str(path)
        self._zip = None
        if zipfile.is_zipfile(self.path):
            self._zip = zipfile.ZipFile(self.path, "r")
            member = self._zip.open("model.weights.h5")
            self._file = h5py.File(member, "r")
        else:
            self._file = h5py.File(self.path, "r")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._file.close()
        if self._zip is not None:
            self._zip.close()

    def names(self) -> set[str]:
        """Every dataset path in the file."""
        out: set[str] = set()
        self._file.visititems(
            lambda name, obj: (
                out.add(name) if isinstance(obj, h5py.Dataset) else None
            )
        )
        return out

    def shape(self, name: str) -> tuple:
        return tuple(self._file[name].shape)

    def read(self, name: str, index=()) -> np.ndarray:
        """The slice `index` of dataset `name` (only those bytes are read)."""
        dataset = self._file[name]
        value = dataset[index] if dataset.shape else dataset[()]
        if dataset.attrs.get("dtype") == "bfloat16":
            value = np.asarray(value).astype(ml_dtypes.bfloat16)
        return np.asarray(value)

    def match(self, variables, paths) -> dict[int, str]:
        """`{id(variable): dataset}` for `variables`, checked against the
        file before anything is read.

        Args:
            variables: The variables this file should hold.
            paths: `dataset_paths(...)` of the object that saved the file.

        Raises:
            ValueError: naming the variables the file lacks, the datasets
                the model lacks, or the first shape that differs.
        """
        stored = self.names()
        wanted = {id(v): paths.get(id(v)) for v in variables}
        missing = [
            v.path
            for v in variables
            if wanted[id(v)] not in stored and not _is_seed_state(v)
        ]
        # A compiled model's save_weights also writes its optimizer state.
        extra = sorted(
            n
            for n in stored - set(paths.values())
            if not n.startswith("optimizer/")
        )
        if missing or extra:
            raise ValueError(
                f"The weights in {self.path!r} do not match the model: "
                f"variables without saved values {missing[:5]}, saved "
                f"values no variable takes {extra[:5]}. Received: "
                f"{len(stored)} saved arrays for {len(variables)} variables"
            )
        for v in variables:
            name = wanted[id(v)]
            if name in stored and self.shape(name) != tuple(v.shape):
                raise ValueError(
                    f"Saved value {name!r} for variable {v.path} has shape "
                    f"{self.shape(name)}; the model expects "
                    f"{tuple(v.shape)}. Received: weights file {self.path!r}"
                )
        return {k: n for k, n in wanted.items() if n in stored}


def _is_seed_state(variable) -> bool:
    # Seed generator states are not saved by `save_weights`; they keep
    # their initial value, as on `load_weights`.
    return variable.path.endswith("seed_generator_state")
