"""Projections: the weights the planner can split as Megatron does.

A projection is a kernel applied to an activation by an einsum-shaped
contraction, with the calls that apply it. Layers with a `LinearRule`
(Dense, EinsumDense, Conv) are projections by their rule.
"""

from __future__ import annotations

import dataclasses

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


def find_projections(graph, layer_rules: dict) -> dict[int, Projection]:
    """{node index: projection} for every call of a projection layer.

    Args:
        graph: The traced `ModelGraph`.
        layer_rules: {id(layer): rule} of the model's layers.
    """
    found: dict[int, Projection] = {}
    by_layer: dict[int, Projection] = {}
    for node in graph.nodes:
        rule = layer_rules.get(id(node.op))
        if not isinstance(rule, rules.LinearRule):
            continue
        proj = by_layer.get(id(node.op))
        if proj is None:
            proj = Projection(node.op.name, rule, [], node.op)
            by_layer[id(node.op)] = proj
        proj.nodes.append(node)
        found[node.index] = proj
    return found
