"""Peak memory while loading: bytes per device, sampled from live arrays,
and the process's resident set size (RSS).

Used by the tests and `benchmarks/bench_load.py` to check that loading
never puts a whole split variable on one device.
"""

from __future__ import annotations

import gc
import os
import threading

import jax

from keras_tensor_parallel.loading import place


def device_bytes() -> dict[str, int]:
    """Bytes held per device by every live JAX array.

    A shard's `data` is itself a live array on one device: buffers are
    counted once each, by address.
    """
    seen: set = set()
    out: dict[str, int] = {}
    for array in jax.live_arrays():
        try:
            shards = array.addressable_shards
            for shard in shards:
                data = shard.data
                key = (str(shard.device), data.unsafe_buffer_pointer())
                if key not in seen:
                    seen.add(key)
                    out[key[0]] = out.get(key[0], 0) + data.nbytes
        except RuntimeError:  # deleted while we iterate
            continue
    return out


def rss_bytes() -> int:
    """The process's resident set size now."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Samples device bytes and RSS in a background thread (and whenever
    `sample()` is called) between `__enter__` and `__exit__`.

    Attributes:
        baseline: Per-device bytes when the block started.
        peak: Per-device peak bytes above the baseline.
        final: Per-device bytes above the baseline when the block ended.
        rss_baseline, rss_peak: RSS at the start and its peak (bytes).

    Example:

    ```python
    with PeakMemory() as mem:
        tp = TensorParallelKeras.from_preset(path, world_size=4)
    print(mem.ratio())   # peak / final bytes of the worst device
    ```
    """

    def __init__(self, *, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.baseline: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.final: dict[str, int] = {}
        self.rss_baseline = 0
        self.rss_peak = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None

    def __enter__(self):
        gc.collect()
        self.baseline = device_bytes()
        self.rss_baseline = self.rss_peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        place.OBSERVERS.append(self.sample)
        return self

    def __exit__(self, *exc):
        place.OBSERVERS.remove(self.sample)
        self.sample()
        self._stop.set()
        self._thread.join()
        gc.collect()
        self.final = self._above_baseline(device_bytes())

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def _above_baseline(self, now: dict) -> dict:
        return {d: n - self.baseline.get(d, 0) for d, n in now.items()}

    def sample(self) -> None:
        """Record the bytes held now."""
        now = self._above_baseline(device_bytes())
        rss = rss_bytes()
        with self._lock:
            for d, n in now.items():
                self.peak[d] = max(self.peak.get(d, 0), n)
            self.rss_peak = max(self.rss_peak, rss)

    def ratio(self) -> float:
        """Worst device's peak bytes over the bytes it finally holds."""
        return max(
            self.peak[d] / self.final[d] for d in self.final if self.final[d]
        )

    @property
    def rss_growth(self) -> int:
        return self.rss_peak - self.rss_baseline
