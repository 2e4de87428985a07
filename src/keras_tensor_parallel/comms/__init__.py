"""Collective accounting: what the compiled steps send, against the
Megatron minimum of the plan."""

from __future__ import annotations

from keras_tensor_parallel.comms.hlo import KINDS, Collective, collectives
from keras_tensor_parallel.comms.minimum import Minimum, megatron_minimum
from keras_tensor_parallel.comms.report import CommsReport

__all__ = [
    "KINDS",
    "Collective",
    "CommsReport",
    "Minimum",
    "analyze",
    "collectives",
    "megatron_minimum",
]


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

    Example:

    ```python
    report = analyze(zoo.opt(num_layers=2), 2)
    print(report.table())
    assert not report.has_weight_gather
    ```
    """
    from keras_tensor_parallel.backends import jax_fusion
    from keras_tensor_parallel.comms import steps
    from keras_tensor_parallel.comms.hlo import collectives as parse
    from keras_tensor_parallel.model import TensorParallelKeras

    tp = model_or_tp
    if not isinstance(tp, TensorParallelKeras):
        tp = TensorParallelKeras(tp, world_size, overrides=overrides)
    model = tp.wrapped_model
    if not fuse_siblings:
        jax_fusion.uninstall(model)
    x = inputs
    if x is None:
        x = steps.example_inputs(model, batch_size=batch_size, seq_len=seq_len)
    y = targets
    if y is None:
        y = steps.example_targets(model, batch_size=batch_size, seq_len=seq_len)
    if not getattr(tp, "compiled", False):
        tp.compile(optimizer="adam", loss=steps.default_loss(y))
    compiled = steps.compile_steps(tp, x, y)
    if not fuse_siblings:
        jax_fusion.install(model, tp.plan)
    return CommsReport(
        plan=tp.plan,
        train=parse(compiled.train_hlo),
        forward=parse(compiled.forward_hlo),
        minimum=megatron_minimum(
            tp.plan, batch_size=batch_size, seq_len=seq_len
        ),
        batch_size=batch_size,
        seq_len=seq_len,
        compile_s={
            "train": compiled.train_compile_s,
            "forward": compiled.forward_compile_s,
        },
    )
