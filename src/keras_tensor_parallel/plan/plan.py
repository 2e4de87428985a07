"""The sharding plan: pure data describing how every variable is split.

A plan names, for every variable of a model, the mesh axis for each tensor
dim (or none), the Megatron role it plays and a one-line reason. It
round-trips through JSON and renders as a table from the same data; engines
(JAX, torch) only read it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Iterator, Sequence

MODEL_AXIS = "model"
DATA_AXIS = "data"

_DTYPE_BYTES = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "bool": 1,
}


class Role(str, enum.Enum):
    """The Megatron-LM role of a variable."""

    COLUMN = "column"
    ROW = "row"
    HEADS = "heads"
    VOCAB = "vocab"
    EXPERT = "expert"  # experts of a mixture-of-experts split over devices
    REPLICATED = "replicated"

    def __str__(self) -> str:
        return self.value


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name such as `"float32"`."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(
            f"Unknown dtype for byte accounting. Received: dtype={dtype!r}"
        )
    return _DTYPE_BYTES[dtype]


_SUBCLASSES: list[type] = []


@dataclasses.dataclass(frozen=True)
class VariablePlan:
    """How one variable is split.

    Attributes:
        path: The Keras variable path (`variable.path`).
        shape: The logical (user-visible) shape.
        dtype: The variable dtype name.
        axes: Mesh axis name per tensor dim, `None` where not split.
        role: The Megatron role.
        reason: One line saying why.
        layer: Path of the layer that owns the variable.
        padded_shape: Internal storage shape when a split dim does not divide
            by the world size (vocab rows, attention heads padded with
            zeros); `None` otherwise.
        copies: Devices holding each shard. 1 for an ordinary split; a kv
            head read by the query heads of several devices is held by
            each of them (`world_size // copies` blocks, adjacent devices
            share one).
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str | None, ...]
    role: Role
    reason: str
    layer: str = ""
    padded_shape: tuple[int, ...] | None = None
    copies: int = 1

    def __init_subclass__(cls, **kwargs):
        # An engine's entry type with fields of its own (torch's `parts`,
        # `sum_grad`): `from_dict` rebuilds it from those fields.
        super().__init_subclass__(**kwargs)
        _SUBCLASSES.append(cls)

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "axes", tuple(self.axes))
        object.__setattr__(self, "role", Role(self.role))
        if self.padded_shape is not None:
            object.__setattr__(
                self, "padded_shape", tuple(int(d) for d in self.padded_shape)
            )
        assert len(self.axes) == len(self.shape), (self.path, self.axes)

    @property
    def split_dim(self) -> int | None:
        """The tensor dim split over the model axis, or `None`."""
        for dim, axis in enumerate(self.axes):
            if axis is not None:
                return dim
        return None

    @property
    def is_split(self) -> bool:
        return self.split_dim is not None

    @property
    def storage_shape(self) -> tuple[int, ...]:
        """The global shape as stored (padded where the plan pads)."""
        return self.padded_shape or self.shape

    def per_device_shape(self, world_size: int) -> tuple[int, ...]:
        """The shape of one device's shard."""
        shape = list(self.storage_shape)
        dim = self.split_dim
        if dim is not None:
            shape[dim] //= world_size // self.copies
        return tuple(shape)

    def per_device_bytes(self, world_size: int) -> int:
        return math.prod(self.per_device_shape(world_size)) * dtype_bytes(
            self.dtype
        )

    @property
    def total_bytes(self) -> int:
        return math.prod(self.shape) * dtype_bytes(self.dtype)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["role"] = self.role.value
        data["shape"] = list(self.shape)
        data["axes"] = list(self.axes)
        if self.padded_shape is not None:
            data["padded_shape"] = list(self.padded_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> VariablePlan:
        """The entry of `to_dict`; one of a subclass's (imported) when
        `data` holds a field of its own with a value other than its
        default (torch's `parts`, `sum_grad`)."""
        base = {f.name for f in dataclasses.fields(VariablePlan)}
        fields = dict(
            path=data["path"],
            shape=tuple(data["shape"]),
            dtype=data["dtype"],
            axes=tuple(data["axes"]),
            role=Role(data["role"]),
            reason=data["reason"],
            layer=data.get("layer", ""),
            padded_shape=(
                tuple(data["padded_shape"])
                if data.get("padded_shape")
                else None
            ),
            copies=int(data.get("copies", 1)),
        )
        for sub in _SUBCLASSES:
            own = {
                f.name: f.default
                for f in dataclasses.fields(sub)
                if f.name not in base
            }
            if any(k in data and data[k] != d for k, d in own.items()):
                extra = {k: data[k] for k in own if k in data}
                return sub(**fields, **extra)
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """A tensor-parallel plan for one model.

    Attributes:
        world_size: Number of devices on the model axis.
        variables: One `VariablePlan` per model variable, in model order.
        model_name: Name of the planned model.
        mesh_axis: Name of the model-parallel mesh axis.

    Example:

    ```python
    plan = plan_model(model, world_size=2)
    print(plan.table())
    same = ShardingPlan.from_json(plan.to_json())
    ```
    """

    world_size: int
    variables: tuple[VariablePlan, ...]
    model_name: str = ""
    mesh_axis: str = MODEL_AXIS

    def __post_init__(self):
        object.__setattr__(self, "variables", tuple(self.variables))

    def __iter__(self) -> Iterator[VariablePlan]:
        return iter(self.variables)

    def __len__(self) -> int:
        return len(self.variables)

    def __getitem__(self, path: str) -> VariablePlan:
        for entry in self.variables:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def get(self, path: str) -> VariablePlan | None:
        try:
            return self[path]
        except KeyError:
            return None

    def by_role(self, role: Role | str) -> list[VariablePlan]:
        role = Role(role)
        return [v for v in self.variables if v.role == role]

    @property
    def split(self) -> list[VariablePlan]:
        return [v for v in self.variables if v.is_split]

    # Byte accounting ------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Bytes of all parameters on a single device."""
        return sum(v.total_bytes for v in self.variables)

    @property
    def per_device_bytes(self) -> int:
        """Bytes of parameters each device holds under this plan."""
        return sum(v.per_device_bytes(self.world_size) for v in self.variables)

    @property
    def replicated_bytes(self) -> int:
        return sum(v.total_bytes for v in self.variables if not v.is_split)

    @property
    def replicated_fraction(self) -> float:
        total = self.total_bytes
        return self.replicated_bytes / total if total else 0.0

    @property
    def per_device_fraction(self) -> float:
        """Per-device parameter bytes as a fraction of one device's."""
        total = self.total_bytes
        return self.per_device_bytes / total if total else 0.0

    # Serialisation ----------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "model_name": self.model_name,
            "world_size": self.world_size,
            "mesh_axis": self.mesh_axis,
            "variables": [v.to_dict() for v in self.variables],
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> ShardingPlan:
        return cls(
            world_size=int(data["world_size"]),
            variables=tuple(
                VariablePlan.from_dict(v) for v in data["variables"]
            ),
            model_name=data.get("model_name", ""),
            mesh_axis=data.get("mesh_axis", MODEL_AXIS),
        )

    @classmethod
    def from_json(cls, text: str) -> ShardingPlan:
        return cls.from_dict(json.loads(text))

    def with_variables(self, variables: Sequence[VariablePlan]) -> ShardingPlan:
        return dataclasses.replace(self, variables=tuple(variables))

    # Rendering --------------------------------------------------------------

    def rows(self) -> list[tuple[str, ...]]:
        """Table rows: path, shape, role, per-device shape, bytes, reason."""
        rows = []
        for v in self.variables:
            rows.append(
                (
                    v.path,
                    _fmt_shape(v.shape),
                    v.role.value,
                    _fmt_shape(v.per_device_shape(self.world_size)),
                    format_bytes(v.per_device_bytes(self.world_size)),
                    v.reason,
                )
            )
        return rows

    def summary_lines(self) -> list[str]:
        n = self.world_size
        return [
            f"world size: {n}   variables: {len(self.variables)}   "
            f"split: {len(self.split)}",
            f"parameter bytes: single device {format_bytes(self.total_bytes)}"
            f", per device {format_bytes(self.per_device_bytes)} "
            f"({self.per_device_fraction:.4f} of one device)",
            f"left replicated: {format_bytes(self.replicated_bytes)} "
            f"({self.replicated_fraction:.2%} of parameter bytes)",
        ]

    def table(self, *, max_reason: int | None = None) -> str:
        """The plan as a fixed-width text table with totals.

        Args:
            max_reason: Cut reasons longer than this; by default they are
                shown whole.
        """
        header = (
            "path",
            "shape",
            "role",
            "per-device",
            "bytes/device",
            "reason",
        )
        rows = [
            r[:5]
            + (r[5] if max_reason is None else _truncate(r[5], max_reason),)
            for r in self.rows()
        ]
        widths = [
            max(len(header[i]), *(len(r[i]) for r in rows)) if rows else 0
            for i in range(len(header))
        ]
        lines = [_fmt_row(header, widths), _fmt_row(["-" * w for w in widths])]
        lines += [_fmt_row(r, widths) for r in rows]
        lines.append("")
        lines += self.summary_lines()
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _truncate(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _fmt_row(cells, widths=None) -> str:
    widths = widths or [len(c) for c in cells]
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()


def format_bytes(n: float) -> str:
    """Human-readable bytes (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
