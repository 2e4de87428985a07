"""Where a torch rank's shard of a split variable lies in the full tensor,
as `torch.distributed.checkpoint` (DCP) pieces with global offsets.

- A plain split (even or uneven rows, uneven real heads): one piece, at
  the rank's start along the split dim.
- Shared kv heads (`copies > 1`, `torch_heads.split_shared`): rank `r`
  holds block `r // copies`; the `copies` ranks holding a block describe
  the same piece (same offset), and DCP's save planner keeps one writer
  per `(key, offset)` (`dedup_save_plans`): each block is written once,
  and every holder reads it back.
- Fused kernels (`parts > 1`, `torch_heads.split_fused`): a rank's local
  tensor is its block of every part side by side, so it is `parts`
  pieces, piece `p` at `p * part_size + start`.

Each rank builds the tensor's global metadata itself (every piece once,
from the variable's own split attributes), so no collective runs per
value.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import (
    ShardedTensorMetadata,
    TensorProperties,
)

from keras_tensor_parallel.backends import torch_collectives as tc
from keras_tensor_parallel.backends import torch_groups as tg


@dataclasses.dataclass(frozen=True)
class Piece:
    """One piece along the split dim: `[start, start + length)` of the
    full tensor; `local` is its start in this rank's tensor (None when
    this rank does not hold it); `holder` a model-axis rank holding it."""

    start: int
    length: int
    holder: int
    local: int | None


@dataclasses.dataclass(frozen=True)
class Layout:
    """A split value's full shape, split dim and pieces."""

    full: tuple
    dim: int
    pieces: tuple
    ranks: int  # on the model axis

    def sharded(self, local: torch.Tensor) -> ShardedTensor:
        """`local` (this rank's tensor) as its pieces of the full one."""
        mine = [p for p in self.pieces if p.local is not None]
        if len(mine) == 1 and tuple(local.shape)[self.dim] == mine[0].length:
            tensors = [local.contiguous()]
        else:
            tensors = [
                local.narrow(self.dim, p.local, p.length).contiguous()
                for p in mine
            ]
        me, device = tc.rank(), local.device
        shards = [
            Shard(t, self._meta(p, f"rank:{me}/{device}"))
            for t, p in zip(tensors, mine)
        ]
        members = self._members()
        metas = [
            self._meta(p, f"rank:{members[p.holder]}/{device}")
            if p.local is None
            else s.metadata
            for p, s in _with_shards(self.pieces, shards)
        ]
        props = TensorProperties(
            dtype=local.dtype,
            layout=torch.strided,
            requires_grad=False,
            memory_format=torch.contiguous_format,
            pin_memory=False,
        )
        meta = ShardedTensorMetadata(metas, torch.Size(self.full), props)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Please use DTensor")
            return ShardedTensor._init_from_local_shards_and_global_metadata(
                shards, meta
            )

    def _meta(self, piece: Piece, placement: str) -> ShardMetadata:
        offsets = [0] * len(self.full)
        offsets[self.dim] = piece.start
        sizes = list(self.full)
        sizes[self.dim] = piece.length
        return ShardMetadata(offsets, sizes, placement)

    def _members(self) -> list[int]:
        """Global ranks of this rank's model-axis group, in model order."""
        n, (world, me) = self.ranks, (tc.world_size(), tc.rank())
        if n == world:
            return list(range(world))
        groups = tg.mesh_ranks(world, n)["model"]
        return next(g for g in groups if me in g)


def _with_shards(pieces, shards):
    mine = iter(shards)
    for p in pieces:
        yield p, (next(mine) if p.local is not None else None)


def join(value, dim: int) -> torch.Tensor:
    """This rank's tensor back from a loaded `ShardedTensor`'s pieces."""
    tensors = [s.tensor for s in value.local_shards()]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def layout(param) -> Layout:
    """The pieces of split parameter `param` (and of every optimizer slot
    made from it, same local shape)."""
    dim, sizes = param._tp_dim, list(param._tp_sizes)
    full = tuple(param._tp_full_shape)
    parts = getattr(param, "_tp_parts", 1)
    copies = getattr(param, "_tp_copies", 1)
    own = (param._tp_start, param._tp_stop)
    pieces = []
    if parts == 1:
        start = 0
        for i, size in enumerate(sizes):
            mine = (start, start + size) == own
            pieces.append(Piece(start, size, i * copies, 0 if mine else None))
            start += size
        return Layout(full, dim, tuple(pieces), len(sizes) * copies)
    per = [s // parts for s in sizes]
    part = full[dim] // parts
    for p in range(parts):
        start = 0
        for i, size in enumerate(per):
            local = p * size if (start, start + size) == own else None
            pieces.append(Piece(p * part + start, size, i, local))
            start += size
    return Layout(full, dim, tuple(pieces), len(sizes))
