"""`analyze`: compile a model's train and forward steps under its plan
and account every collective against the Megatron minimum."""

from __future__ import annotations

from keras_tensor_parallel.comms.hlo import collectives as parse
from keras_tensor_parallel.comms.minimum import megatron_minimum
from keras_tensor_parallel.comms.report import CommsReport


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
        tp = TensorParallelKeras(tp, world_size, overrides=overrides)
    if not fuse_siblings:
        jax_fusion.uninstall(tp.wrapped_model)
    try:
        compiled = _compile(tp, inputs, targets, batch_size, seq_len)
    finally:
        if not fuse_siblings:
            jax_fusion.install(tp.wrapped_model, tp.plan)
    return _report(tp.plan, compiled, batch_size, seq_len)


def _report(plan, compiled, batch_size: int, seq_len: int) -> CommsReport:
    return CommsReport(
        plan=plan,
        train=parse(compiled.train_hlo),
        forward=parse(compiled.forward_hlo),
        minimum=megatron_minimum(plan, batch_size=batch_size, seq_len=seq_len),
        batch_size=batch_size,
        seq_len=seq_len,
        compile_s={
            "train": compiled.train_compile_s,
            "forward": compiled.forward_compile_s,
        },
    )


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
