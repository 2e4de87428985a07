"""Collective accounting: what the compiled steps send, against the
Megatron minimum of the plan. Needs `KERAS_BACKEND=jax` (it reads XLA
programs); says so with a ValueError otherwise."""

from __future__ import annotations

from keras_tensor_parallel.comms.analysis import analyze
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
