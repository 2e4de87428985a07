"""`analyze`: compile a model's train and forward steps under its plan
and account every collective against the Megatron minimum."""

from __future__ import annotations

import dataclasses
import re

from keras_tensor_parallel.comms.hlo import collectives as parse
from keras_tensor_parallel.comms.hlo import replica_groups
from keras_tensor_parallel.comms.minimum import (
    DATA_AXIS_FORMULA,
    data_axis_minimum,
    megatron_minimum,
)
from keras_tensor_parallel.comms.report import CommsReport, _ratio
from keras_tensor_parallel.plan import format_bytes


def analyze(
    model_or_tp,
    world_size: int | None = None,
    *,
    batch_size: int = 2,
    seq_len: int = 16,
    inputs=None,
    targets=None,
    overrides: dict | None = None,
    fuse_siblings: bool = True,
    tensor_parallel_size: int | None = None,
) -> CommsReport:
    """Compile the train and forward steps and account every collective.

    Args:
        model_or_tp: A `TensorParallelKeras`, or a built Keras model (it is
            wrapped, which re-shards its variables in place).
        world_size: Devices, when wrapping a plain model.
        batch_size: Batch of the example step.
        seq_len: Sequence length for `None` input dims.
        inputs: A batch to use instead of generated inputs.
        targets: Targets to use (default: zeros like the output, MSE loss
            when `model_or_tp` is not compiled).
        overrides: Plan overrides, when wrapping a plain model.
        fuse_siblings: Keep the one-reduction q/k/v input gradient
            (`False` measures XLA's default, for comparison).
        tensor_parallel_size: The model axis when wrapping (default
            `world_size`); the rest is data parallel, `batch_size` the
            global batch, and the report a `MeshCommsReport`.

    Example:

    ```python
    report = analyze(catalogue.get("opt-125m:tiny").build(), 2)
    print(report.table())
    assert not report.has_weight_gather
    ```
    """
    from keras_tensor_parallel.verify.pairs import require_jax

    require_jax("Collective accounting (keras-tp comms)")
    from keras_tensor_parallel.backends import jax_fusion
    from keras_tensor_parallel.model import TensorParallelKeras

    tp = model_or_tp
    if not isinstance(tp, TensorParallelKeras):
        kw = {"tensor_parallel_size": tensor_parallel_size}
        tp = TensorParallelKeras(tp, world_size, overrides=overrides, **kw)
    _check_batch(batch_size, tp.data_parallel_size, inputs)
    if not fuse_siblings:
        jax_fusion.uninstall(tp.wrapped_model)
    try:
        compiled = _compile(tp, inputs, targets, batch_size, seq_len)
    finally:
        if not fuse_siblings:
            jax_fusion.install(tp.wrapped_model, tp.plan)
    if tp.data_parallel_size == 1:
        return _report(tp.plan, compiled, batch_size, seq_len)
    return _mesh_report(tp, compiled, batch_size, seq_len)


def _report(plan, compiled, batch_size: int, seq_len: int) -> CommsReport:
    return CommsReport(**_fields(plan, compiled, batch_size, seq_len))


def _fields(plan, compiled, batch_size: int, seq_len: int, data: int = 1):
    replica = batch_size // data
    return dict(
        plan=plan,
        train=parse(compiled.train_hlo),
        forward=parse(compiled.forward_hlo),
        minimum=megatron_minimum(plan, batch_size=replica, seq_len=seq_len),
        batch_size=batch_size,
        seq_len=seq_len,
        compile_s={
            "train": compiled.train_compile_s,
            "forward": compiled.forward_compile_s,
        },
    )


def _check_batch(batch_size: int, data: int, inputs) -> None:
    if inputs is None and batch_size % data:
        raise ValueError(
            f"batch_size must be a multiple of the data-parallel size "
            f"({data} replicas share each global batch). Received: "
            f"batch_size={batch_size}"
        )


def mesh_axis(groups: frozenset, data: int, model: int) -> str:
    """`"model"`, `"data"` or `"mesh"`: the mesh axis a collective's device
    groups lie along (devices fill the `(data, model)` mesh row-major;
    a group inside one model-axis group is `"model"`, even when it is a
    part of one, as with shared kv heads)."""
    rows = [set(range(r * model, (r + 1) * model)) for r in range(data)]
    cols = [set(range(c, data * model, model)) for c in range(model)]
    for name, lines in (("model", rows), ("data", cols)):
        if all(any(g <= line for line in lines) for g in groups):
            return name
    return "mesh"


def _groups(hlo: str, c) -> frozenset:
    """The collective's device groups; a collective-permute (pairs, no
    groups: seen under ZeRO-1 in a vocab-parallel lookup's gradient) as
    one group of every device it names."""
    if c.kind != "collective-permute":
        return replica_groups(hlo, c.name)
    line = re.search(rf"\n\s*(?:ROOT )?%?{re.escape(c.name)} = .*", hlo)[0]
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}?", line)
    ids = re.findall(r"\d+", pairs[1]) if pairs else []
    return frozenset({frozenset(map(int, ids))})


def _mesh_report(tp, compiled, batch_size: int, seq_len: int):
    data, model = tp.data_parallel_size, tp.tensor_parallel_size
    fields = _fields(tp.plan, compiled, batch_size, seq_len, data)
    hlo = compiled.train_hlo
    axes = {
        c.name: mesh_axis(_groups(hlo, c), data, model) for c in fields["train"]
    }
    paths = [v.path for v in tp.trainable_variables]
    return MeshCommsReport(
        **fields,
        data_parallel=data,
        axes=axes,
        data_minimum=data_axis_minimum(tp.plan, paths, data=data),
    )


@dataclasses.dataclass
class MeshCommsReport(CommsReport):
    """A `CommsReport` of a `(data, model)` mesh: each train collective's
    axis, the model axis against the Megatron minimum of one replica's
    batch (`batch_size / data_parallel`), the data axis against one
    reduction of a replica's gradients (`DATA_AXIS_FORMULA`).

    Attributes:
        data_parallel: Replicas (the data axis).
        axes: Train collective name -> `"model"`, `"data"` or `"mesh"`.
        data_minimum: `(variable path, gradient bytes)` per trainable
            variable: the data axis's ideal.
    """

    data_parallel: int = 1
    axes: dict = dataclasses.field(default_factory=dict)
    data_minimum: tuple = ()

    def on_axis(self, axis: str) -> list:
        """Train-step collectives whose groups lie along `axis`."""
        return [c for c in self.train if self.axes.get(c.name) == axis]

    def axis_parts(self) -> dict:
        """Per axis: count, bytes, the minimum's count and bytes, ratio."""
        ideal = {
            "model": (self.minimum.train_count, self.minimum.train_bytes),
            "data": (len(self.data_minimum) and 1,
                     sum(b for _, b in self.data_minimum)),
            "mesh": (0, 0),
        }  # fmt: skip
        parts = {}
        for axis, (count, nbytes) in ideal.items():
            found = self.on_axis(axis)
            got = sum(c.bytes for c in found)
            parts[axis] = {
                "count": sum(len(c.shapes) for c in found),
                "ops": len(found),
                "bytes": got,
                "minimum_count": count,
                "minimum_bytes": nbytes,
                "ratio_bytes": _ratio(got, nbytes),
            }
        return parts

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["tensor_parallel_size"] = self.plan.world_size
        out["data_parallel_size"] = self.data_parallel
        out["axes"] = self.axis_parts()
        out["data_axis_formula"] = DATA_AXIS_FORMULA
        return out

    def table(self) -> str:
        """`CommsReport.table`, then the totals split by mesh axis."""
        parts = self.axis_parts()
        m, d = parts["model"], parts["data"]
        lines = [
            super().table(),
            "",
            f"mesh data {self.data_parallel} x model {self.plan.world_size}"
            f": global batch {self.batch_size}, "
            f"{self.batch_size // self.data_parallel} per replica "
            "(the totals above are all axes together)",
            f"model axis: {m['count']} collectives, "
            f"{format_bytes(m['bytes'])}; Megatron minimum of one replica "
            f"{m['minimum_count']}, {format_bytes(m['minimum_bytes'])} "
            f"(bytes {m['ratio_bytes']:.2f}x)",
            f"data axis: {d['ops']} collective(s), "
            f"{format_bytes(d['bytes'])}; minimum "
            f"{format_bytes(d['minimum_bytes'])} = {DATA_AXIS_FORMULA} "
            f"(bytes {d['ratio_bytes']:.2f}x)",
        ]
        if parts["mesh"]["ops"]:
            lines.append(
                f"across both axes: {parts['mesh']['ops']} collective(s), "
                f"{format_bytes(parts['mesh']['bytes'])} (not expected)"
            )
        return "\n".join(lines)


def _compile(tp, x, y, batch_size: int, seq_len: int):
    """The compiled steps on `(x, y)`, generated when `None`; compiles
    `tp` with Adam and MSE first when the user has not."""
    from keras_tensor_parallel.comms import steps

    model = tp.wrapped_model
    if x is None:
        x = steps.example_inputs(model, batch_size=batch_size, seq_len=seq_len)
    if y is None:
        y = steps.example_targets(model, batch_size=batch_size, seq_len=seq_len)
    if not getattr(tp, "compiled", False):
        tp.compile(optimizer="adam", loss=steps.default_loss(y))
    return steps.compile_steps(tp, x, y)
