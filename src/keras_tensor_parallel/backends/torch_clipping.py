"""clipnorm / global_clipnorm on torch with full norms across ranks: the
backend-neutral `clipping.py` with torch's all-reduce."""

from __future__ import annotations

import torch.distributed as dist

from keras_tensor_parallel.backends import clipping
from keras_tensor_parallel.backends import torch_collectives as tc


def _all_reduce(x, group=None):
    if tc.world_size() == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def install_clipping(optimizer, group=None) -> None:
    """Make clipnorm/global_clipnorm use full (all-reduced) norms; the
    shards' norms are summed over `group` (None: every rank)."""
    clipping.install_clipping(optimizer, lambda x: _all_reduce(x, group))
