"""Projections: the weights the planner can split as Megatron does.

A projection is a kernel applied to an activation by an einsum-shaped
contraction, with the calls that apply it. Layers with a `LinearRule`
(Dense, EinsumDense, Conv) are projections by their rule, a shortcut; the
gate is the operation: a variable that is the weight operand of an
`einsum` or `matmul` anywhere in the traced graph is a projection too,
whichever layer owns it (a custom layer calling `ops.matmul(x, self.w)`,
a bank of expert kernels).
"""

from __future__ import annotations

import dataclasses
import string

import keras

from keras_tensor_parallel.plan import rules


@dataclasses.dataclass(eq=False)
class Projection:
    """A splittable kernel and the calls that apply it.

    Attributes:
        name: Short name used in reasons (the layer's name).
        rule: Input, kernel and output specs as einsum labels.
        nodes: The traced calls applying the kernel; each reads the
            activation as its first symbolic input.
        layer: The layer whose rule this is.
    """

    name: str
    rule: rules.LinearRule
    nodes: list
    layer: object = None

    @property
    def kernel(self):
        return self.rule.kernel


def find_projections(
    graph, layer_rules: dict, owner: dict, *, op_level: bool = True
) -> dict[int, Projection]:
    """{node index: projection} for every call of a projection.

    Args:
        graph: The traced `ModelGraph`.
        layer_rules: {id(layer): rule} of the model's layers.
        owner: {id(variable): layer owning it}.
        op_level: Whether traced `einsum`/`matmul` ops with a variable
            operand are projections too (engines that run the model's own
            code per rank on local shards cannot split those).
    """
    found: dict[int, Projection] = {}
    by_key: dict[int, Projection] = {}
    for node in graph.nodes:
        rule = layer_rules.get(id(node.op))
        if isinstance(rule, rules.LinearRule):
            key, name, layer = id(node.op), node.op.name, node.op
        else:
            rule = op_rule(node) if op_level else None
            if rule is None:
                continue
            rule = _with_bias(graph, node, rule)
            layer = owner.get(id(rule.kernel))
            key, name = id(rule.kernel), _op_name(rule.kernel, layer)
        proj = by_key.get(key)
        if proj is None:
            proj = by_key[key] = Projection(name, rule, [], layer)
        elif proj.rule is not None and _specs(proj.rule) != _specs(rule):
            proj.rule = None  # one kernel read two ways: not a projection
        proj.nodes.append(node)
        found[node.index] = proj
    return {i: p for i, p in found.items() if p.rule is not None}


def _with_bias(graph, node, rule) -> rules.LinearRule:
    """The rule with its bias: a vector variable over the last output dim,
    added to the op's output (`ops.matmul(x, self.w) + self.b`). Split
    with a column, as Megatron does; a replicated bias of a split output
    would get a split gradient, gathered back every step."""
    out = node.outputs[0]
    for index, _ in graph.consumers.get(id(out), []):
        add = graph.nodes[index]
        if add.type_name != "Add" or len(add.args) != 2:
            continue
        other = [a for a in add.args if a is not out]
        if (
            len(other) == 1
            and isinstance(other[0], keras.Variable)
            and tuple(other[0].shape) == (out.shape[-1],)
        ):
            spec = rule.output_spec[-1]
            return dataclasses.replace(rule, bias=other[0], bias_spec=spec)
    return rule


def _specs(rule) -> tuple[str, str, str]:
    return rule.input_spec, rule.kernel_spec, rule.output_spec


def _op_name(var, layer) -> str:
    return f"{layer.name}/{var.name}" if layer is not None else var.path


def op_rule(node) -> rules.LinearRule | None:
    """The `LinearRule` of a traced einsum/matmul applying one variable to
    one activation, or None."""
    if node.type_name not in ("Einsum", "Matmul") or len(node.inputs) != 1:
        return None
    args = list(node.args)
    weights = [i for i, a in enumerate(args) if isinstance(a, keras.Variable)]
    if len(args) != 2 or len(weights) != 1:
        return None
    w = weights[0]
    if args[1 - w] is not node.inputs[0] or not args[w].trainable:
        return None
    if node.type_name == "Einsum":
        specs = _einsum_specs(node.op.subscripts, 1 - w, w)
    else:
        specs = _matmul_specs(len(args[1 - w].shape), len(args[w].shape), w)
    if specs is None:
        return None
    return rules.LinearRule(*specs, args[w])


def _einsum_specs(subscripts: str, x: int, w: int):
    subscripts = subscripts.replace(" ", "")
    if "." in subscripts or "->" not in subscripts:
        return None
    lhs, out = subscripts.split("->")
    specs = lhs.split(",")
    if any(len(set(s)) != len(s) for s in (*specs, out)):
        return None  # a repeated label (a trace) is not a projection
    return specs[x], specs[w], out


def _matmul_specs(x_rank: int, w_rank: int, w: int):
    """Right-aligned specs of `x @ w` (w second) or `w @ x` (w first)."""
    if x_rank < 2 or w_rank < 2 or w_rank > x_rank:
        return None
    batch = string.ascii_lowercase[: w_rank - 2]
    if w == 1:  # (..., t, k) @ (k, n) -> (..., t, n)
        return batch + "tk", batch + "kn", batch + "tn"
    # (n, k) @ (..., k, m) -> (..., n, m)
    return batch + "km", batch + "nk", batch + "nm"
