"""Shared test utilities: tolerances, per-device shards, HLO inspection.

Models come from `keras_tensor_parallel.catalogue`; paired single-device
references from `keras_tensor_parallel.verify.build_pair`."""

from __future__ import annotations

import re

import jax
import keras
import numpy as np


def rel_tol(reference, tol: float = 1e-5) -> float:
    """The issue's bound: tol x max(1, max|reference|)."""
    return tol * max(1.0, float(np.max(np.abs(reference))))


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def to_numpy(outputs):
    return keras.tree.map_structure(np.asarray, outputs)


def split_dim_shards_ok(tp, n: int) -> list[str]:
    """Problems with per-device shards of split variables (empty if none)."""
    problems = []
    by_path = {e.path: e for e in tp.plan}
    for v in tp.wrapped_model.variables:
        entry = by_path[v.path]
        shards = v.value.addressable_shards
        if len(shards) != n:
            problems.append(f"{v.path}: {len(shards)} shards, expected {n}")
        expected = entry.per_device_shape(n)
        for shard in shards:
            if tuple(shard.data.shape) != expected:
                problems.append(
                    f"{v.path}: shard {tuple(shard.data.shape)} != {expected}"
                )
                break
    return problems


def per_device_param_bytes(tp) -> dict:
    return tp.engine.per_device_bytes(tp.wrapped_model.variables)


def forward_hlo(tp, inputs) -> str:
    """Compiled HLO text of the TP model's forward step."""
    model = tp.wrapped_model
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    replicated = jax.sharding.NamedSharding(
        tp.engine.mesh.backend_mesh, jax.sharding.PartitionSpec()
    )
    inputs = keras.tree.map_structure(
        lambda a: jax.device_put(a, replicated), inputs
    )

    def forward(trainable, non_trainable, x):
        out, _ = model.stateless_call(trainable, non_trainable, x)
        return out

    with tp.engine.scope():
        lowered = jax.jit(forward).lower(trainable, non_trainable, inputs)
    return lowered.compile().as_text()


def all_gather_shapes(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of every all-gather result in compiled HLO text."""
    out = []
    for line in hlo.splitlines():
        if "all-gather" not in line or "all-gather-done" in line:
            continue
        m = re.search(r"=\s*\(?(\w+)\[([\d,]*)\]", line)
        if m and re.search(r"\ball-gather(-start)?\(", line):
            dims = tuple(int(d) for d in m.group(2).split(",") if d)
            out.append((m.group(1), dims))
    return out


def weight_gathers(tp, hlo: str) -> list[str]:
    """Split variables whose full (storage) shape some all-gather yields."""
    gathered = {shape for _, shape in all_gather_shapes(hlo)}
    return [
        e.path
        for e in tp.plan
        if e.is_split and tuple(e.storage_shape) in gathered
    ]
