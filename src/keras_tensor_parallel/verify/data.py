"""Real text on disk for training checks: the Python standard library's
own source files, read as bytes (byte-level vocabulary of 256)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np


def stdlib_corpus(max_bytes: int | None = None) -> bytes:
    """The stdlib's top-level `.py` files, concatenated in sorted order.

    Args:
        max_bytes: Stop after this many bytes (None: all files).

    Returns:
        The corpus as bytes; identical on every call in one environment.

    Example:

    ```python
    text = stdlib_corpus(max_bytes=100_000)
    ```
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive. Received: {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        chunk = path.read_bytes()
        chunks.append(chunk)
        total += len(chunk)
        if max_bytes is not None and total >= max_bytes:
            break
    data = b"".join(chunks)
    if not data:
        raise ValueError(f"No .py files found under {root}")
    return data if max_bytes is None else data[:max_bytes]


def lm_batches(
    data: bytes, *, batch_size: int, seq_len: int, steps: int, seed: int = 0
):
    """Random windows of `data` for next-byte prediction.

    Returns:
        `(x, y)`, int32 arrays of shape `(steps * batch_size, seq_len)`;
        `y` is `x` shifted left by one byte. Rows are in step order.

    Example:

    ```python
    x, y = lm_batches(stdlib_corpus(10_000), batch_size=4, seq_len=32,
                      steps=10)
    ```
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    if len(arr) < seq_len + 2:
        raise ValueError(
            f"data needs more than seq_len + 1 = {seq_len + 1} bytes. "
            f"Received: {len(arr)} bytes"
        )
    rng = np.random.RandomState(seed)
    starts = rng.randint(0, len(arr) - seq_len - 1, steps * batch_size)
    idx = starts[:, None] + np.arange(seq_len)[None, :]
    x = arr[idx].astype("int32")
    y = arr[idx + 1].astype("int32")
    return x, y
