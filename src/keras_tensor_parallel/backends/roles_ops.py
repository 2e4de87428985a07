"""Op-level Megatron roles: weights a layer applies itself.

A layer without a rule (a custom layer calling `ops.matmul(x, self.w) +
self.b`, an expert bank calling `ops.einsum("th,ehm->etm", x, self.w)`)
is planned by the op that reads its variable (`plan/projections.py`), so
its role is played at that op, not around the layer's `call`: while such
a variable is installed, the backend's `matmul` and `einsum` see it as an
operand and

- column / heads: pass the other operands through `f` (identity forward,
  all-reduce of their gradient backward, once per tensor through the
  engine's `Region`); the output stays local, a column bias is local too;
- row: run the local contraction, then `g` (all-reduce forward); the
  replicated bias the layer adds next is added once, after it.

Every other op of the layer runs on local values unchanged. The layer's
own code runs as written; only the two ops are wrapped, and only for the
installed variables (matched by identity), so Dense and EinsumDense keep
their rule's style.
"""

from __future__ import annotations

import keras

from keras_tensor_parallel.plan import Role
from keras_tensor_parallel.plan import rules as plan_rules

_OPS = ("matmul", "einsum")
# id(variable) -> (role, shard, comm) of every installed op-level variable.
_ACTIVE: dict[int, tuple] = {}
_ORIGINAL: dict[str, object] = {}


def _backend_numpy():
    return keras.src.backend.numpy


def _wrapped(name: str, original):
    def op(*args, **kwargs):
        found = [
            (i, _ACTIVE[id(a)]) for i, a in enumerate(args) if id(a) in _ACTIVE
        ]
        if not found:
            return original(*args, **kwargs)
        if len(found) > 1:
            raise ValueError(
                f"One {name} reads two split weights; no Megatron role "
                f"covers that. Received: operands {[i for i, _ in found]}"
            )
        index, (role, shard, comm) = found[0]
        if role == Role.ROW:
            shard.region.close()
            return comm.g(original(*args, **kwargs))
        args = [
            a
            if i == index or not comm.is_tensor(a)
            else shard.region.enter(a, comm)
            for i, a in enumerate(args)
        ]
        return original(*args, **kwargs)

    op.__wrapped__ = original
    return op


def _activate(variable, role, shard, comm) -> None:
    if not _ACTIVE:
        module = _backend_numpy()
        for name in _OPS:
            _ORIGINAL[name] = getattr(module, name)
            setattr(module, name, _wrapped(name, _ORIGINAL[name]))
    _ACTIVE[id(variable)] = (role, shard, comm)


def _deactivate(variable) -> None:
    _ACTIVE.pop(id(variable), None)
    if not _ACTIVE and _ORIGINAL:
        module = _backend_numpy()
        for name in _OPS:
            setattr(module, name, _ORIGINAL.pop(name))


def _rule_variables(layer) -> set[int]:
    """ids of the variables `layer`'s own rule applies."""
    if not plan_rules.has_rule(layer):
        return set()
    rule = plan_rules.rule_for(layer)
    if isinstance(rule, plan_rules.LinearRule):
        return {id(v) for v in (rule.kernel, rule.bias) if v is not None}
    if isinstance(rule, plan_rules.EmbeddingRule):
        return {id(v) for v in rule.tables}
    return set()


def op_level(layer, entries) -> bool:
    """Whether `layer`'s split variables are applied by its own ops (no
    rule of the layer applies them).

    Args:
        layer: The layer owning the variables of `entries`.
        entries: Its split `VariablePlan`s.

    Returns:
        True when none of them is its rule's kernel, bias or table.
    """
    covered = _rule_variables(layer)
    paths = {e.path for e in entries if e.is_split}
    own = [v for v in layer._trainable_variables if v.path in paths]
    return bool(own) and not any(id(v) in covered for v in own)


class OpsParallel:
    """The op-level roles of one layer's split variables (a `roles.Style`
    that installs no `call`).

    Args:
        comm: The engine's `roles.Collectives`.
        entries: The layer's split `VariablePlan`s.
    """

    def __init__(self, comm, entries):
        self.comm = comm
        self.entries = {e.path: e for e in entries if e.is_split}

    def install(self, layer, shard, journal) -> None:
        for v in layer._trainable_variables:
            entry = self.entries.get(v.path)
            if entry is None or entry.role == Role.REPLICATED:
                continue
            if entry.role not in (Role.COLUMN, Role.HEADS, Role.ROW):
                raise ValueError(
                    f"No op-level form for {v.path}: only column and row "
                    f"splits are played at the op. Received: role "
                    f"{entry.role.value}"
                )
            _activate(v, entry.role, shard, self.comm)
            journal.add(lambda v=v: _deactivate(v))
        # Row layers see local features: a full-width input spec would
        # reject them.
        journal.setattr(layer, "input_spec", None)


class Dispatch:
    """Installs a layer's style: its rule's (`roles.layer_style`) or, for
    weights its own ops apply, `OpsParallel`.

    Args:
        style: The style `roles.layer_style` chose from the roles.
        entries: The layer's `VariablePlan`s.
    """

    def __init__(self, style, entries):
        self.style, self.entries = style, list(entries)
        self.role, self.comm = style.role, style.comm

    def forward(self, layer, shard):
        return self.style.forward(layer, shard)

    def install(self, layer, shard, journal) -> None:
        if op_level(layer, self.entries):
            style = OpsParallel(self.comm, self.entries)
        else:
            style = self.style
        style.install(layer, shard, journal)
