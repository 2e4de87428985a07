"""Collectives read from compiled HLO text.

XLA's SPMD partitioner decides where the communication goes; the only
faithful account is the compiled module itself. This module parses its text
(no XLA internals) into `Collective` records.
"""

from __future__ import annotations

import dataclasses
import math
import re

KINDS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}

# `%name = <result type> <opcode>(<operands>), attrs..., metadata={...}`
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+"
    r"(?P<op>[a-z][\w\-]*)\((?P<args>[^)]*)\)(?P<rest>.*)$"
)
_ARRAY = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')
_OPERAND = re.compile(r"%([\w.\-]+)")
_GROUPS = re.compile(r"replica_groups=(\{[^=]*?\}\}|\[[^\]]*\][^,\s]*)")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective in a compiled module.

    Attributes:
        kind: One of `KINDS` (async `-start`/`-done` pairs count once).
        shapes: Array shapes of the payload (several when XLA combined
            collectives into one tuple-shaped op).
        dtypes: Dtype per payload array (HLO names: `f32`, `bf16`).
        bytes: Payload bytes: the full (reduced or gathered) tensor size.
        op_name: The JAX op name from the HLO metadata.
        operand_shapes: Shapes of the operands (all-gather: the shard).
        name: The HLO instruction name.
        from_parameter: Whether the operand traces back, through layout-only
            ops, to an argument of the compiled step (a variable).
        group_size: Devices in each of its replica groups (0: not read).
    """

    kind: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    bytes: int
    op_name: str
    operand_shapes: tuple[tuple[int, ...], ...] = ()
    name: str = ""
    from_parameter: bool = False
    group_size: int = 0

    @property
    def ring_bytes(self) -> float:
        """Bytes each device sends for this collective on a ring of
        `group_size` devices: an all-reduce 2(n-1)/n of the full tensor,
        an all-gather, reduce-scatter or all-to-all (n-1)/n, a
        collective-permute its payload. One scale for plain tensor
        parallelism (all-reduces) and sequence parallelism (a
        reduce-scatter and an all-gather per all-reduce).

        Example:

        ```python
        sum(c.ring_bytes for c in collectives(text))
        ```
        """
        n = self.group_size
        if self.kind == "collective-permute" or n == 0:
            return float(self.bytes)
        share = 2 * (n - 1) / n if self.kind == "all-reduce" else (n - 1) / n
        return self.bytes * share


@dataclasses.dataclass
class _Instr:
    name: str
    op: str
    type: str
    args: list
    op_name: str
    line: str


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for m in _ARRAY.finditer(text):
        if m.group("dtype") not in _DTYPE_BYTES:
            continue
        dims = m.group("dims")
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
        out.append((m.group("dtype"), shape))
    return out


def _nbytes(arrays) -> int:
    return sum(math.prod(s) * _DTYPE_BYTES[d] for d, s in arrays)


def _parse(text: str) -> dict[str, _Instr]:
    instrs = {}
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        op_name = _OP_NAME.search(m.group("rest"))
        instrs[m.group("name")] = _Instr(
            name=m.group("name"),
            op=m.group("op"),
            type=m.group("type"),
            args=_OPERAND.findall(m.group("args")),
            op_name=op_name.group("op_name") if op_name else "",
            line=line,
        )
    return instrs


# Ops that move or relabel data without computing: a weight seen through
# them is still the weight.
_PASS_THROUGH = {
    "copy",
    "bitcast",
    "reshape",
    "transpose",
    "convert",
    "get-tuple-element",
    "slice",
    "dynamic-slice",
    "copy-start",
    "copy-done",
}


def _traces_to_parameter(instrs, name: str, depth: int = 0) -> bool:
    instr = instrs.get(name)
    if instr is None or depth > 16:
        return False
    if instr.op == "parameter":
        return True
    if instr.op in _PASS_THROUGH or (
        instr.op == "fusion" and len(instr.args) == 1
    ):
        return any(
            _traces_to_parameter(instrs, a, depth + 1) for a in instr.args
        )
    return False


def _kind(op: str) -> str | None:
    base = op.removesuffix("-start")
    return base if base in KINDS else None


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled HLO module, in text order.

    Only the entry computation's callees matter for counting, but XLA's CPU
    modules keep collectives at top level of their computations, so every
    instruction line is scanned. Async forms count once, at `-start`.

    Example:

    ```python
    text = jax.jit(f).lower(x).compile().as_text()
    for c in collectives(text):
        print(c.kind, c.shapes, c.bytes)
    ```
    """
    instrs = _parse(hlo_text)
    out = []
    for instr in instrs.values():
        kind = _kind(instr.op)
        if kind is None:
            continue
        operands = [instrs[a] for a in instr.args if a in instrs]
        operand_arrays = [arr for o in operands for arr in _arrays(o.type)]
        result_arrays = _arrays(instr.type)
        if instr.op.endswith("-start") and kind != "all-reduce":
            # Async start returns (operands..., results...): keep results.
            result_arrays = result_arrays[len(operand_arrays) :] or (
                result_arrays
            )
        payload = operand_arrays if kind == "reduce-scatter" else result_arrays
        out.append(
            Collective(
                kind=kind,
                shapes=tuple(s for _, s in result_arrays),
                dtypes=tuple(d for d, _ in result_arrays),
                bytes=_nbytes(payload),
                op_name=instr.op_name,
                operand_shapes=tuple(s for _, s in operand_arrays),
                name=instr.name,
                from_parameter=any(
                    _traces_to_parameter(instrs, a) for a in instr.args
                ),
                group_size=_group_size(instr),
            )
        )
    return out


def _group_size(instr: _Instr) -> int:
    """Devices per replica group, 0 where the spelling is not one
    `replica_groups` reads (a collective-permute has pairs instead)."""
    if "replica_groups=" not in instr.line or "replica_groups={}" in (
        instr.line
    ):
        return 0
    groups = replica_groups("\n" + instr.line, instr.name)
    return max(len(g) for g in groups)


def replica_groups(hlo_text: str, name: str) -> frozenset:
    """The device groups of collective `name` (a `Collective.name`), as a
    set of sets of device ids, in any of XLA's spellings: explicit
    `{{0,1},{2,3}}`, iota `[2,2]<=[2,2]T(1,0)`, or
    `mesh['axis_0'=2,'axis_1'=2] {'axis_0'}` (groups along the named axes
    of the mesh, devices numbered row-major unless a
    `device_ids=([2,2]T(1,0))` follows the mesh).

    Tells which mesh axis a collective runs over (data or model).

    Example:

    ```python
    c = collectives(text)[0]
    replica_groups(text, c.name)  # frozenset({frozenset({0, 1}), ...})
    ```
    """
    import numpy as np

    line = re.search(rf"\n\s*(?:ROOT )?%?{re.escape(name)} = .*", hlo_text)[0]
    if m := re.search(r"replica_groups=\{(\{[\d,{}]*\})\}", line):
        groups = re.findall(r"\{([\d,]*)\}", m[1])
        return frozenset(frozenset(map(int, g.split(","))) for g in groups)
    mesh = r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(([^)]*\)?)\))?"
    if m := re.search(mesh + r" \{([^}]*)\}", line):
        sizes = [int(n) for n in re.findall(r"=(\d+)", m[1])]
        kept = [int(i) for i in re.findall(r"axis_(\d+)", m[3])]
        rest = [i for i in range(len(sizes)) if i not in kept]
        ids = _iota(m[2]) if m[2] else np.arange(math.prod(sizes))
        rows = (
            ids.reshape(sizes)
            .transpose(rest + kept)
            .reshape(-1, math.prod(sizes[i] for i in kept))
        )
    else:
        m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=(\[[\d,]+\]"
                      r"(?:T\([\d,]+\))?)", line)  # fmt: skip
        rows = _iota(m[3]).reshape(int(m[1]), int(m[2]))
    return frozenset(frozenset(map(int, r)) for r in rows)


def _iota(text: str):
    """Device ids of XLA's iota spelling `[2,2]T(1,0)`, flattened."""
    import numpy as np

    m = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    dims = [int(d) for d in m[1].split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m[2]:
        ids = ids.transpose([int(p) for p in m[2].split(",")])
    return ids.reshape(-1)
