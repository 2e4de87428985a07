"""Activation memory per device: XLA's memory analysis of Keras's compiled
train step, one device against N, beside the Megatron estimate.

The temp memory of a compiled step (`memory_analysis().
temp_size_in_bytes`, per device) is what the step allocates besides its
arguments and outputs: the activations kept for backward, the gradients
and the workspace. Korthikanti et al. 2022 ("Reducing activation
recomputation in large transformer models") give the activations per
transformer layer, in bytes of 16-bit training, as

- one device: `sbh(34 + 5as/h)`,
- tensor parallelism over t devices: `sbh(10 + 24/t + 5as/(ht))`,
- with sequence parallelism: `sbh(34 + 5as/h)/t`,

and without the `5as/h` terms when the attention core is recomputed
(s sequence, b batch, h hidden, a heads). Their ratio to one device is the
estimate the report shows beside the measured ratio.
"""

from __future__ import annotations

import keras

from keras_tensor_parallel.verify.checks import Check

_FORMULAS = {
    (False, False): "sbh(10+24/t+5as/(ht))",
    (False, True): "sbh(10+24/t)",
    (True, False): "sbh(34+5as/h)/t",
    (True, True): "34sbh/t",
}


def transformer_shape(config) -> dict | None:
    """`{"h", "a", "layers"}` from a KerasHub-style config (hidden_dim,
    num_heads or num_query_heads, num_layers); None when it has none."""
    config = dict(config or {})
    heads = config.get("num_heads", config.get("num_query_heads"))
    keys = ("hidden_dim", "num_layers")
    if heads is None or any(config.get(k) is None for k in keys):
        return None
    return {
        "h": int(config["hidden_dim"]),
        "a": int(heads),
        "layers": int(config["num_layers"]),
    }


def megatron_estimate(
    shape: dict,
    *,
    batch: int,
    seq: int,
    tensor_parallel_size: int,
    data: int = 1,
    sequence_parallel: bool = False,
    recompute: str | None = None,
) -> dict:
    """The Megatron activation bytes per device (16-bit training, all
    layers) and their fraction of one device's (no recomputation there).

    Example:

    ```python
    est = megatron_estimate({"h": 512, "a": 8, "layers": 2}, batch=4,
                            seq=512, tensor_parallel_size=4)
    round(est["fraction"], 2)  # 0.35
    ```
    """
    s, b, h, a = seq, batch / data, shape["h"], shape["a"]
    t = tensor_parallel_size
    attention = 5 * a * s / h
    rc = recompute == "attention"
    if sequence_parallel:
        per = (34 + (0 if rc else attention)) / t
    else:
        per = 10 + 24 / t + (0 if rc else attention / t)
    one = s * batch * h * (34 + attention)
    bytes_ = s * b * h * per * shape["layers"]
    return {
        "formula": _FORMULAS[(bool(sequence_parallel), rc)],
        "per_device_bytes": bytes_,
        "single_device_bytes": one * shape["layers"],
        "fraction": bytes_ / (one * shape["layers"]),
        "shape": {"s": s, "b": batch, "h": h, "a": a, "t": t, "d": data,
                  "layers": shape["layers"]},
    }  # fmt: skip


def train_step_temp(model, x, y) -> int:
    """Temp bytes per device of `model`'s compiled train step on (x, y)."""
    from keras_tensor_parallel.backends.jax_recompute import (
        compile_train_step,
    )

    compiled = compile_train_step(model, x, y)
    return int(compiled.memory_analysis().temp_size_in_bytes)


def activation_check(
    model_fn, world_size: int, *, inputs, targets, loss, seed: int = 0,
    tensor_parallel_size: int | None = None, sequence_parallel=False,
    recompute: str | None = None, config=None,
) -> Check:  # fmt: skip
    """Temp memory per device of the train step (Adam, `loss` on one
    batch) under tensor parallelism as a fraction of one device's (one
    compile each), with the Megatron estimate for `config` (KerasHub
    style) in `detail["estimate"]`. A figure, not a pass/fail check
    (`threshold` None): at small shapes gradients and collective buffers
    are much of the temp memory, and no bound holds for every model.

    Example:

    ```python
    check = activation_check(spec.build, 2, inputs=x, targets=y,
                             loss="mse", config=spec.config)
    ```
    """
    from keras_tensor_parallel.model import TensorParallelKeras

    keras.utils.set_random_seed(seed)
    single = model_fn()
    keras.Model.compile(single, optimizer="adam", loss=loss)
    one = train_step_temp(single, inputs, targets)
    keras.utils.set_random_seed(seed)
    tp = TensorParallelKeras(
        model_fn(), world_size=world_size,
        tensor_parallel_size=tensor_parallel_size,
        sequence_parallel=sequence_parallel, recompute=recompute,
    )  # fmt: skip
    tp.compile(optimizer="adam", loss=loss)
    per_device = train_step_temp(tp, inputs, targets)
    t = tensor_parallel_size or world_size
    shape, (batch, seq) = transformer_shape(config), _batch_seq(inputs)
    estimate = None
    if shape is not None and seq is not None:
        estimate = megatron_estimate(
            shape, batch=batch, seq=seq, tensor_parallel_size=t,
            data=world_size // t, sequence_parallel=sequence_parallel,
            recompute=recompute,
        )  # fmt: skip
    fraction = per_device / max(one, 1)
    detail = {
        "per_device_temp_bytes": per_device,
        "single_device_temp_bytes": one,
        "measured_fraction": fraction,
        "estimate": estimate,
        "sequence_parallel": bool(sequence_parallel),
        "recompute": recompute,
        "world_size": world_size,
        "batch": batch,
        "seq_len": seq,
    }
    return Check("activations", True, fraction, None, detail)


def _batch_seq(inputs) -> tuple[int, int | None]:
    """Rows and (for [batch, seq, ...] inputs) the sequence length."""
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    shape = tuple(first.shape)
    return int(shape[0]), (int(shape[1]) if len(shape) > 1 else None)


def note(detail: dict) -> str:
    """One line for the report: measured bytes and the estimate."""
    mib = 2**20
    text = (
        f"train-step temp memory {detail['per_device_temp_bytes'] / mib:.2f}"
        f" MiB per device vs {detail['single_device_temp_bytes'] / mib:.2f}"
        " MiB on one device (the training check's model, batch "
        f"{detail.get('batch')} x {detail.get('seq_len')})"
    )
    options = [
        name
        for name, on in (
            ("sequence parallel", detail.get("sequence_parallel")),
            ("recompute attention", detail.get("recompute")),
        )
        if on
    ]
    if options:
        text += f", {' and '.join(options)}"
    est = detail.get("estimate")
    if est:
        text += (
            f"; Megatron estimate {est['fraction']:.3f} of one device "
            f"({est['formula']} per layer)"
        )
    return text
