"""Where a torch rank's shard lies in the full tensor, without ranks:
the DCP pieces of plain, uneven, shared-kv and fused splits
(`checkpoint/pieces_torch.py`), and a fused kernel's block of every part
read one slice per part (`loading/adopt_torch.py`, for readers that take
no index arrays), against numpy's own indexing of the full array.
"""

from __future__ import annotations

import types

import numpy as np
import pytest


def _param(sizes, start, stop, full, dim=1, **extra):
    return types.SimpleNamespace(
        _tp_dim=dim, _tp_sizes=sizes, _tp_start=start, _tp_stop=stop,
        _tp_full_shape=full, **{f"_tp_{k}": v for k, v in extra.items()},
    )  # fmt: skip


@pytest.mark.torch
def test_pieces_of_plain_shared_and_fused_splits():
    from keras_tensor_parallel.checkpoint import pieces_torch

    def spans(param):
        layout = pieces_torch.layout(param)
        return layout.ranks, [
            (p.start, p.length, p.holder, p.local) for p in layout.pieces
        ]

    # 1001 rows over 2 ranks (uneven), rank 1's.
    got = spans(_param([501, 500], 501, 1001, (32, 1001)))
    assert got == (2, [(0, 501, 0, None), (501, 500, 1, 0)])
    # 2 kv heads over 4 ranks (copies=2): rank 2 holds block 1.
    got = spans(_param([1, 1], 1, 2, (32, 2, 8), copies=2))
    assert got == (4, [(0, 1, 0, None), (1, 1, 2, 0)])
    # A fused (3, 32, 2 x 16) bank over 2 ranks: rank 1 holds [8, 16) and
    # [24, 32), side by side in its (3, 32, 16) tensor.
    got = spans(_param([16, 16], 8, 16, (3, 32, 32), dim=2, parts=2))
    assert got == (
        2,
        [(0, 8, 0, None), (8, 8, 1, 0), (16, 8, 0, None), (24, 8, 1, 8)],
    )


@pytest.mark.torch
def test_fused_block_read_one_slice_per_part():
    import torch

    from keras_tensor_parallel.backends.torch_plan import TorchVariablePlan
    from keras_tensor_parallel.loading import adopt_torch, place_torch

    full = np.arange(3 * 4 * 12, dtype="float32").reshape(3, 4, 12)

    class SlicesOnly:  # as safetensors: slices, never index arrays
        def read(self, name, index):
            assert not any(isinstance(i, np.ndarray) for i in index), index
            return full[index]

    entry = TorchVariablePlan(
        "e/gate", full.shape, "float32", (None, None, "model"), "column",
        "fused", parts=2,
    )  # fmt: skip
    for rank, cols in ((0, [0, 1, 2, 6, 7, 8]), (1, [3, 4, 5, 9, 10, 11])):
        index, shape, _ = adopt_torch.local_index(entry, rank, 2)
        assert shape == (3, 4, 6)
        np.testing.assert_array_equal(index[2], cols)
        got = adopt_torch.read(
            SlicesOnly(), "e/gate", index, shape, place_torch.to_torch
        )
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(got.numpy(), full[:, :, cols])
