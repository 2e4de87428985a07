"""User overrides of a plan, matched like Keras's `LayoutMap`.

Keys are regular expressions matched with `re.fullmatch` against variable
paths, in order; a path matched by two keys is an error, not a guess, and
a key that matches nothing is an error too.
"""

from __future__ import annotations

import re

from keras_tensor_parallel.plan.plan import (
    MODEL_AXIS,
    Role,
    ShardingPlan,
    VariablePlan,
)

# "expert": the leading experts dim of an expert bank (expert parallel).
_ROLE_DIM = {"column": -1, "row": 0, "vocab": 0, "expert": 0}


def apply_overrides(plan: ShardingPlan, overrides: dict) -> ShardingPlan:
    """Apply `{regex: axes or role}` overrides to a plan (ordered).

    Args:
        plan: The plan to change.
        overrides: `{regex: value}`; a value is a tuple of mesh-axis names
            (`"model"` or `None` per dim) or a role name (`"replicated"`,
            `"column"` splits the last dim, `"row"`, `"vocab"` and
            `"expert"` the first: an expert bank split across devices).

    Returns:
        A new plan; `plan` itself is unchanged.

    Example:

    ```python
    plan = apply_overrides(plan, {".*norm.*": "replicated"})
    ```
    """
    if not isinstance(overrides, dict):
        raise ValueError(
            "overrides must be a dict {regex: axes tuple or role name}. "
            f"Received: overrides={overrides!r}"
        )
    used = {pattern: False for pattern in overrides}
    entries = []
    for entry in plan:
        hit = None
        for pattern, value in overrides.items():
            try:
                matched = re.fullmatch(pattern, entry.path)
            except re.error as e:
                raise ValueError(
                    f"Override keys must be valid regular expressions. "
                    f"Received: {pattern!r} ({e})"
                ) from e
            if not matched:
                continue
            if hit is not None:
                raise ValueError(
                    f"Variable {entry.path!r} is matched by two overrides, "
                    f"{hit!r} and {pattern!r}; each variable may match at "
                    "most one."
                )
            hit = pattern
            used[pattern] = True
            entry = _override_entry(entry, pattern, value, plan.world_size)
        entries.append(entry)
    unused = [p for p, u in used.items() if not u]
    if unused:
        sample = ", ".join(e.path for e in list(plan)[:3])
        raise ValueError(
            f"Override {unused[0]!r} names no variable (patterns are matched "
            f"with re.fullmatch against variable paths such as {sample}). "
            f"Received: overrides={list(overrides)}"
        )
    return plan.with_variables(entries)


def _override_entry(entry, pattern, value, n) -> VariablePlan:
    axes, role = _axes_and_role(entry, pattern, value)
    split = [i for i, a in enumerate(axes) if a]
    if split and entry.shape[split[0]] % n:
        raise ValueError(
            f"Override {pattern!r} splits dim {split[0]} of {entry.path!r} "
            f"(size {entry.shape[split[0]]}), which does not divide by world "
            f"size {n}."
        )
    return VariablePlan(
        path=entry.path,
        shape=entry.shape,
        dtype=entry.dtype,
        axes=tuple(axes),
        role=role,
        reason=f"user override {pattern!r}",
        layer=entry.layer,
        padded_shape=None,
    )


def _axes_and_role(entry, pattern, value) -> tuple[list, Role]:
    rank = len(entry.shape)
    if isinstance(value, Role) or (
        isinstance(value, str) and value in {r.value for r in Role}
    ):
        role = Role(value)
        if role == Role.HEADS:
            raise ValueError(
                f"Override {pattern!r}: role 'heads' needs explicit axes "
                "(which dim is the head dim). Received: 'heads'"
            )
        axes = [None] * rank
        if role != Role.REPLICATED and rank:
            axes[_ROLE_DIM[role.value] % rank] = MODEL_AXIS
        return axes, role
    if not isinstance(value, (tuple, list)):
        raise ValueError(
            f"Override values must be an axes tuple or a role name. "
            f"Received: {pattern!r}: {value!r}"
        )
    axes = list(value)
    if len(axes) != rank or any(a not in (None, MODEL_AXIS) for a in axes):
        raise ValueError(
            f"Override {pattern!r} for {entry.path!r} must give one entry "
            f"per dim ({rank}), each {MODEL_AXIS!r} or None. Received: "
            f"{tuple(value)!r}"
        )
    split = [i for i, a in enumerate(axes) if a]
    if len(split) > 1:
        raise ValueError(
            f"Override {pattern!r}: at most one dim may be split. "
            f"Received: {tuple(value)!r}"
        )
    role = Role.REPLICATED if not split else entry.role
    if role == Role.EXPERT and split[0] != 0:
        role = Role.REPLICATED  # an expert bank split inside each expert
    if split and role == Role.REPLICATED:
        role = Role.COLUMN if split[0] == rank - 1 else Role.ROW
    return axes, role
