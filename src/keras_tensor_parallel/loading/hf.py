"""Hugging Face checkpoint directories (safetensors) that KerasHub converts.

KerasHub's converter for each architecture maps every Keras variable to a
safetensors key and a transform (transpose, reshape): it calls
`loader.port_weight(variable, key, hook_fn)`. Here the converter runs
against a loader that only *records* those calls; the values are read
later, one variable at a time. A tensor the converter takes unchanged (no
hook: token tables, most norms) is read slice by slice from the file; one
it transforms is read to the host whole, transformed there, and each
device receives only its slice of it. No device holds a whole split
variable; the host holds at most one transformed tensor at a time.
"""

from __future__ import annotations

import numpy as np
import safetensors
from keras_hub.src.utils.preset_utils import SAFETENSOR_FILE, get_file
from keras_hub.src.utils.transformers.safetensor_utils import (
    SafetensorLoader,
)


class _Recorder(SafetensorLoader):
    """A `SafetensorLoader` whose `port_weight` records, never reads."""

    def __init__(self, preset):
        super().__init__(preset)
        self.ports: dict[int, tuple] = {}

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
        self.ports[id(keras_variable)] = (hf_weight_key, hook_fn)

    def read_slice(self, hf_weight_key, index, shape):
        """Only the rows `index` of a stored tensor (safetensors reads
        slices), or None when it is not stored at `shape` (or cannot be
        sliced, as numpy has no bfloat16): the caller then converts the
        whole tensor. As `get_tensor`, which finds the file the same way."""
        if self.safetensor_config is None:
            fname = self.fname if self.fname is not None else SAFETENSOR_FILE
        else:
            weight_map = self.safetensor_config["weight_map"]
            fname = weight_map[self.get_prefixed_key(hf_weight_key, weight_map)]
        if fname not in self.safetensor_files:
            path = get_file(self.preset, fname)
            self.safetensor_files[fname] = self.enter_context(
                safetensors.safe_open(path, framework="np")
            )
        file = self.safetensor_files[fname]
        part = file.get_slice(self.get_prefixed_key(hf_weight_key, file))
        if tuple(part.get_shape()) != tuple(shape):
            return None
        try:
            return np.asarray(part[tuple(index)])
        except (TypeError, ValueError):
            return None


class HFWeights:
    """Reads converted values of a Hugging Face directory by variable.

    Args:
        path: The directory (config.json + model.safetensors[.index.json]).
        backbone: The KerasHub backbone built from it (unallocated).
        converter: KerasHub's converter module for the architecture.
        config: The directory's config.json as a dict.

    Example:

    ```python
    weights = HFWeights(path, backbone, converter, config)
    names = weights.match(backbone.variables)
    rows = weights.read(names[id(v)], (slice(0, 8), slice(None)))
    ```
    """

    def __init__(self, path, backbone, converter, config):
        self.path = path
        self._loader = _Recorder(path)
        self._loader.__enter__()
        converter.convert_weights(backbone, self._loader, config)
        self._vars = {id(v): v for v in backbone.variables}
        self._current: tuple = (None, None)

    def close(self) -> None:
        self._loader.__exit__(None, None, None)

    def match(self, variables) -> dict[int, int]:
        """`{id(variable): id(variable)}` for every ported variable.

        Raises:
            ValueError: naming variables the converter gives no value.
        """
        ports = self._loader.ports
        missing = [
            v.path
            for v in variables
            if id(v) not in ports and not v.path.endswith("seed_state")
        ]
        if missing:
            raise ValueError(
                f"The Hugging Face checkpoint {self.path!r} gives no value "
                f"for {missing[:5]}. Received: {len(ports)} converted "
                f"tensors for {len(variables)} variables"
            )
        return {id(v): id(v) for v in variables if id(v) in ports}

    def _value(self, name: int) -> np.ndarray:
        # The whole converted tensor of one variable, kept while its
        # shards are read (every device asks for its own slice).
        if self._current[0] != name:
            key, hook = self._loader.ports[name]
            variable = self._vars[name]
            value = self._loader.get_tensor(key)
            if hook is not None:
                value = hook(value, list(variable.shape))
            value = np.asarray(value)
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Tensor {key!r} converts to shape {value.shape}; "
                    f"variable {variable.path} expects {variable.shape}. "
                    f"Received: checkpoint {self.path!r}"
                )
            self._current = (name, value)
        return self._current[1]

    def read(self, name: int, index=()) -> np.ndarray:
        """The rows `index` of a variable's converted value: read as a
        slice of the file when the converter stores it unchanged, else
        converted whole on the host (kept until `done`) and sliced."""
        key, hook = self._loader.ports[name]
        if hook is None and index and self._current[0] != name:
            shape = self._vars[name].shape
            part = self._loader.read_slice(key, index, shape)
            if part is not None:
                return part
        return self._value(name)[index]

    def done(self) -> None:
        """Drop the host copy of the last variable read."""
        self._current = (None, None)
