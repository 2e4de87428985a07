"""Peak memory of one torch rank while it loads: bytes of the torch
tensors it holds (a CPU rank's device memory), sampled from the live
tensors, and the process's resident set size (RSS).

Torch keeps no registry of live CPU tensors, so a sample walks the objects
the garbage collector tracks. To keep that cheap, everything alive before
the block is frozen (`gc.freeze`) and left out: a sample sees only what
the load created, which is also the "above the start" we report.
"""

from __future__ import annotations

import gc
import math
import os
import threading

import torch

from keras_tensor_parallel.loading import observers

# Keras's torch variables hold `Parameter`s; reads and slices are plain
# tensors. Exact types: `isinstance` on every tracked object is slower and
# trips deprecation shims.
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def rss_bytes() -> int:
    """The process's resident set size now."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def new_tensor_bytes() -> int:
    """Bytes of the live torch tensors not frozen by `gc.freeze` (each
    storage counted once; meta tensors hold none)."""
    seen: set = set()
    total = 0
    for obj in gc.get_objects():
        if type(obj) not in _TENSOR_TYPES or obj.is_meta:
            continue
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


class PeakLocal:
    """Samples this rank's new tensor bytes and RSS at every variable
    placed and in a background thread (so a whole copy made outside the
    placing, say by building then wrapping, is seen too), between
    `__enter__` and `__exit__`.

    Attributes:
        peak, final: Tensor bytes created by the block (peak while it ran,
            still alive when it ended).
        check_peak: Peak tensor bytes from the wrap's check forward on
            (`TorchEngine` runs the model once on a 2 x 16 batch) until
            the block ends and garbage is collected: the weights plus that
            pass's activations, kept apart from `peak` because they do not
            grow with the model.
        rss_baseline, rss_peak: RSS at the start and its peak (bytes).

    Example:

    ```python
    with PeakLocal() as mem:
        tp = TensorParallelKeras.from_preset(path, world_size=2)
    print(mem.ratio())   # peak / final bytes of this rank
    ```
    """

    def __init__(self, *, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak = self.final = self.check_peak = 0
        self.rss_baseline = self.rss_peak = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._checked = False
        self._thread = None

    def __enter__(self):
        gc.collect()
        gc.freeze()
        self.rss_baseline = self.rss_peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        observers.OBSERVERS.append(self.sample)
        return self

    def __exit__(self, *exc):
        observers.OBSERVERS.remove(self.sample)
        self._stop.set()
        self._thread.join()
        # The wrap's check forward leaves activations to collect: they are
        # not held, and not part of the load.
        gc.collect()
        self.sample(after_check=False)
        self.final = new_tensor_bytes()
        gc.unfreeze()

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self, *, after_check: bool | None = None) -> None:
        """Record the tensor bytes and RSS now. From the wrap's check
        forward on, samples go to `check_peak` (its activations stay
        until collected) unless `after_check=False`."""
        from keras_tensor_parallel.backends.torch import checking

        self._checked = self._checked or checking()
        held, rss = new_tensor_bytes(), rss_bytes()
        self._checked = self._checked or checking()
        with self._lock:
            if self._checked if after_check is None else after_check:
                self.check_peak = max(self.check_peak, held)
            else:
                self.peak = max(self.peak, held)
            self.rss_peak = max(self.rss_peak, rss)

    def ratio(self) -> float:
        """Peak tensor bytes over the bytes finally held."""
        return self.peak / self.final if self.final else math.inf

    @property
    def rss_growth(self) -> int:
        return self.rss_peak - self.rss_baseline
