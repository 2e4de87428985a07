"""`CommsReport`: every collective of the compiled steps, beside the
Megatron minimum."""

from __future__ import annotations

import dataclasses
import math
import re

from keras_tensor_parallel.comms.hlo import Collective
from keras_tensor_parallel.comms.minimum import Minimum
from keras_tensor_parallel.plan import ShardingPlan, format_bytes

# `jit(train_step)/transpose(jvp(opt_backbone))/transformer_layer_0/...`
_WRAPPERS = re.compile(r"^(jit|jvp|transpose|vmap|remat|checkpoint)\(")


def layer_of(op_name: str, layer_paths) -> str:
    """The deepest plan layer path named in an HLO `op_name`."""
    parts = [p for p in op_name.split("/") if p and not _WRAPPERS.match(p)]
    text = "/".join(parts)
    best = ""
    for path in layer_paths:
        if path and ("/" + path + "/") in ("/" + text + "/"):
            best = path if len(path) > len(best) else best
    if best:
        return best
    return "/".join(parts[1:-1]) if len(parts) > 2 else text


def is_weight_gather(c: Collective, plan: ShardingPlan) -> bool:
    """An all-gather that rebuilds a variable.

    Either its operand comes straight (through layout-only ops) from an
    argument of the step, or it gathers a shard (over all N devices or a
    subgroup) into a variable's full shape. Replicated variables count too:
    XLA may update one (or its optimizer slots) sharded and gather the
    result, which is not the Megatron pattern either.
    """
    if c.kind != "all-gather":
        return False
    if c.from_parameter:
        return True
    for e in plan:
        full = tuple(e.storage_shape)
        for shape, operand in zip(c.shapes, c.operand_shapes):
            # A shard of 1/N, or of 1/k over a subgroup of k devices.
            if tuple(shape) == full and math.prod(operand) < math.prod(full):
                return True
    return False


@dataclasses.dataclass
class CommsReport:
    """Collectives of the train and forward steps of one plan.

    Attributes:
        plan: The plan measured.
        train: Collectives of the train step (`fit`).
        forward: Collectives of the forward step (`predict`).
        minimum: The Megatron minimum for the train step.
        batch_size, seq_len: The step's input size.
        compile_s: Compile seconds, `{"train": s, "forward": s}`.
    """

    plan: ShardingPlan
    train: list[Collective]
    forward: list[Collective]
    minimum: Minimum
    batch_size: int
    seq_len: int
    compile_s: dict

    @property
    def train_bytes(self) -> int:
        return sum(c.bytes for c in self.train)

    @property
    def forward_bytes(self) -> int:
        return sum(c.bytes for c in self.forward)

    @property
    def train_ring_bytes(self) -> float:
        """Bytes each device sends in the train step on a ring: all-reduce
        2(N-1)/N, all-gather and reduce-scatter (N-1)/N of the full
        tensor (`Collective.ring_bytes`). Plain tensor parallelism and
        sequence parallelism compare on this scale."""
        return sum(c.ring_bytes for c in self.train)

    @property
    def minimum_ring_bytes(self) -> float:
        """The Megatron minimum's all-reduces on the same scale."""
        n = self.plan.world_size
        return self.minimum.train_bytes * 2 * (n - 1) / n

    @property
    def train_count(self) -> int:
        """Collectives counted per array (XLA may combine several in one
        tuple-shaped op; each array is one Megatron reduction)."""
        return sum(len(c.shapes) for c in self.train)

    @property
    def ratio_bytes(self) -> float:
        """Train-step collective bytes / Megatron minimum bytes."""
        return _ratio(self.train_bytes, self.minimum.train_bytes)

    @property
    def ratio_count(self) -> float:
        return _ratio(self.train_count, self.minimum.train_count)

    @property
    def weight_gathers(self) -> list[Collective]:
        return [
            c
            for c in self.train + self.forward
            if is_weight_gather(c, self.plan)
        ]

    @property
    def has_weight_gather(self) -> bool:
        return bool(self.weight_gathers)

    def _rows(self):
        paths = sorted({e.layer for e in self.plan})
        weight = {id(c) for c in self.weight_gathers}
        for step, items in (("train", self.train), ("forward", self.forward)):
            for c in items:
                yield {
                    "step": step,
                    "kind": c.kind,
                    "shape": " + ".join(
                        f"{d}[{','.join(map(str, s))}]"
                        for d, s in zip(c.dtypes, c.shapes)
                    ),
                    "bytes": c.bytes,
                    "ring_bytes": c.ring_bytes,
                    "layer": layer_of(c.op_name, paths),
                    "backward": "transpose(" in c.op_name,
                    "weight_gather": id(c) in weight,
                }

    def to_dict(self) -> dict:
        return {
            "model": self.plan.model_name,
            "world_size": self.plan.world_size,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "collectives": list(self._rows()),
            "train": {
                "count": self.train_count,
                "bytes": self.train_bytes,
                "ring_bytes": self.train_ring_bytes,
            },
            "forward": {
                "count": sum(len(c.shapes) for c in self.forward),
                "bytes": self.forward_bytes,
            },
            "minimum": {
                "count": self.minimum.train_count,
                "bytes": self.minimum.train_bytes,
                "forward_count": self.minimum.forward_count,
                "forward_bytes": self.minimum.forward_bytes,
                "ring_bytes": self.minimum_ring_bytes,
            },
            "ratio_bytes": self.ratio_bytes,
            "ratio_count": self.ratio_count,
            "has_weight_gather": self.has_weight_gather,
            "compile_s": dict(self.compile_s),
        }

    def table(self) -> str:
        """Fixed-width text: one line per collective, then the totals."""
        header = ("step", "kind", "shape", "bytes", "ring", "layer", "")
        rows = [
            (
                r["step"] + (" bwd" if r["backward"] else ""),
                r["kind"],
                r["shape"],
                format_bytes(r["bytes"]),
                format_bytes(r["ring_bytes"]),
                r["layer"],
                "WEIGHT ALL-GATHER" if r["weight_gather"] else "",
            )
            for r in self._rows()
        ]
        widths = [
            max([len(header[i])] + [len(r[i]) for r in rows])
            for i in range(len(header))
        ]
        lines = [_row(header, widths), _row(["-" * w for w in widths], widths)]
        lines += [_row(r, widths) for r in rows]
        m = self.minimum
        lines += [
            "",
            f"world size {self.plan.world_size}, batch {self.batch_size}, "
            f"seq {self.seq_len}",
            f"train step: {self.train_count} collectives, "
            f"{format_bytes(self.train_bytes)}; Megatron minimum "
            f"{m.train_count}, {format_bytes(m.train_bytes)}",
            f"ratio actual/minimum: bytes {self.ratio_bytes:.2f}x, "
            f"count {self.ratio_count:.2f}x",
            f"ring traffic per device: {format_bytes(self.train_ring_bytes)};"
            f" Megatron minimum {format_bytes(self.minimum_ring_bytes)} "
            "(all-reduce 2(N-1)/N, all-gather and reduce-scatter (N-1)/N "
            "of the full tensor)",
            f"weight all-gathers: {len(self.weight_gathers)}"
            + (
                "  (NOT tensor-parallel at those layers)"
                if self.has_weight_gather
                else ""
            ),
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _ratio(a: float, b: float) -> float:
    return a / b if b else (1.0 if a == 0 else float("inf"))


def _row(cells, widths) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
