"""Pick between a projection's candidate regions; for an expert bank,
expert parallelism or Megatron inside each expert, by what each costs.

KerasHub's mixture-of-experts layers (Mixtral, Qwen3-MoE) compute every
expert on every token (`th,ehm->etm`, then `eti,eih->eth`) and sum the
outputs weighted by the router. Two splits are exact:

- expert parallel (the expert dim split, `E % N == 0`): each device holds
  `E / N` whole experts and sums its experts' weighted outputs, so the
  sum over experts is the region's reduction: forward one all-reduce of
  `[tokens, hidden]`; backward one of the experts' input gradient plus
  the routing weights' gradient (it contracts the split expert dim, so it
  is partial on each device until reduced where that is smallest);
- inside each expert (the ffn dim split, column in gate/up, row in down):
  the row's output `[experts, tokens, hidden]` is all-reduced before the
  weighted sum, and the input gradient of gate/up once backward.

Both hold the same kernel bytes per device. The choice: fewer bytes per
device first, then no padding, then fewer all-reduced values per training
step (forward plus backward, counted as `comms/minimum.py` counts a
region: the output of what ends it, the input gradient of what starts
it, plus the routing weights' gradient); ties keep label order (the major
dim first, so expert parallel). Mixtral (hidden 32, 4 experts, top 2):
66 values per token expert parallel, 4 x 32 + 32 = 160 inside each
expert.
"""

from __future__ import annotations

import math
import re

from keras_tensor_parallel.plan.regions import (
    collective_elements,
    lining_up_dim,
    split_elements,
)

# How far back the routing weights' gradient is followed.
_MAX_DEPTH = 16


def is_expert_parallel(region) -> bool:
    """Whether `region` splits experts across devices."""
    return bool(region.batch or region.reductions)


def routing_elements(graph, region) -> int:
    """Values all-reduced in backward for the gradients of the unsplit
    operands meeting an expert-parallel split (the routing weights): each
    is partial on every device (its own experts' part) and is reduced
    where it is smallest on the way back."""
    if not is_expert_parallel(region):
        return 0
    return sum(
        _gradient_elements(graph, x, dim, 0)
        for x, dim in region.full_dims
        if id(x) not in region.split  # not recruited as a column later
    )


def _gradient_elements(graph, t, dim, depth) -> int:
    """Fewest values to all-reduce so `t`, whose gradient arrives split on
    `dim`, and what it is computed from get their whole gradients."""
    if not _differentiable(t) or id(t) not in graph.producer:
        return 0  # no gradient needed (integers, model inputs)
    here = math.prod(t.shape)
    node = graph.nodes[graph.producer[id(t)]]
    if depth >= _MAX_DEPTH or node.opaque_reason or len(node.outputs) != 1:
        return here
    if len(graph.consumers.get(id(t), [])) != 1:
        return here  # other gradients join here: reduce before they add
    behind = 0
    for i, x in enumerate(node.inputs):
        c = lining_up_dim(node, i, lambda out: out == [dim])
        if c is None:
            # The split dim is contracted: this input's gradient is partial.
            behind += math.prod(x.shape) if _differentiable(x) else 0
        else:
            behind += _gradient_elements(graph, x, c, depth + 1)
        if behind >= here:
            return here
    return behind


def _differentiable(t) -> bool:
    return "float" in str(getattr(t, "dtype", "float32"))


def train_elements(graph, region) -> tuple[int, int]:
    """(forward, backward) values all-reduced per training step by
    `region` at the trace's batch and sequence sizes."""
    total = collective_elements(region)
    inputs = {
        id(n.inputs[0]): n.inputs[0]
        for p, _ in region.columns.values()
        for n in p.nodes
    }
    backward = sum(math.prod(t.shape) for t in inputs.values())
    return total - backward, backward + routing_elements(graph, region)


def cheapest(graph, n, found: list[tuple], reasons=()) -> tuple:
    """(region, why) of the candidate with the fewest bytes per device,
    then no padding, then the fewest all-reduced values per training
    step; ties keep label order (major first). `why` is empty unless
    the choice beat another candidate or an expert bank could be split
    one way only (then `reasons` says why not the other)."""

    def cost(region):
        total = sum(train_elements(graph, region))
        return (-split_elements(region), region.pad > 0, total)

    best = min(range(len(found)), key=lambda i: (cost(found[i][1]), i))
    region = found[best][1]
    beaten = [r for _, r in found if cost(r) > cost(region)]
    other = min(beaten, key=cost) if beaten else None
    if is_expert_parallel(region):
        return region, expert_reason(graph, n, region, other, reasons)
    if other is None:
        experts = _inside_experts(region)
        if experts and experts % n:
            return region, (
                f" (split inside each expert: expert parallel needs the "
                f"{experts} experts to divide by {n} devices)"
            )
        if experts and reasons:
            return region, (
                f" (split inside each expert, not expert parallel: "
                f"{reasons[0]})"
            )
        return region, ""
    return region, (
        f" (fewer values to all-reduce: {sum(train_elements(graph, region))} "
        f"per step at the trace size, against "
        f"{sum(train_elements(graph, other))})"
    )


def expert_reason(graph, n, region, other, reasons=()) -> str:
    """One sentence on an expert-parallel choice, with what it sends."""
    proj, label = next(iter(region.columns.values()))
    experts = proj.rule.label_size(label)
    tokens = _tokens(region)
    forward, backward = train_elements(graph, region)
    routing = routing_elements(graph, region)
    text = (
        f"experts: {experts} experts split over {n} devices (expert "
        f"parallel): each device holds {experts // n} whole expert"
        f"{'s' if experts // n > 1 else ''} and all-reduces "
        f"{_per_token(forward + backward, tokens)} per step "
        f"({_per_token(forward, tokens, False)} forward, "
        f"{_per_token(backward, tokens, False)} backward"
        + (
            f" with {_per_token(routing, tokens, False)} for the routing "
            "weights)"
            if routing
            else ")"
        )
    )
    if other is not None:
        f_in, b_in = train_elements(graph, other)
        return (
            f"{text}, against {_per_token(f_in + b_in, tokens, False)} "
            f"splitting inside each expert ({_memory(region, other)}), "
            f"whose [{experts} experts, tokens, hidden] output is "
            "all-reduced before the experts are summed"
        )
    if reasons:
        return (
            f"{text}; splitting inside each expert is not exact here: "
            f"{reasons[0]}"
        )
    return text


# What `expert_reason` states, read back by `comms/minimum.py`.
_STATED = re.compile(
    r"all-reduces (\d+) values per token per step \((\d+) forward, "
    r"(\d+) backward(?: with (\d+) for the routing weights)?\)"
)


def stated_values(reason: str) -> tuple[int, int, int] | None:
    """(forward, backward input gradient, routing weights' gradient)
    values per token that an expert-parallel plan entry's `reason`
    states (`expert_reason`), or None if it states none.

    Example:

    ```python
    stated_values(entry.reason)  # (32, 32, 2) for Mixtral hidden 32
    ```
    """
    m = _STATED.search(reason)
    if m is None:
        return None
    forward, backward, routing = (int(g or 0) for g in m.groups()[1:])
    return forward, backward - routing, routing


def inside_values(shape, split_dim: int) -> tuple[int, int] | None:
    """(forward, backward) values per token of a bank split inside each
    expert, from its row kernel `(experts, ffn, hidden)` split on ffn:
    the `[experts, tokens, hidden]` output forward, the `[tokens,
    hidden]` input gradient of gate/up backward; None for another
    kernel."""
    if len(shape) != 3 or split_dim != 1:
        return None
    return shape[0] * shape[2], shape[2]


def _inside_experts(region) -> int:
    """The experts of a bank `region` splits inside each expert (a row
    label of its input, kernel and output), or 0."""
    for proj, _ in region.rows.values():
        r = proj.rule
        for c in r.kernel_spec:
            if c in r.input_spec and c in r.output_spec:
                return r.label_size(c)
    return 0


def _memory(region, other) -> str:
    more = split_elements(region) - split_elements(other)
    if more == 0:
        return "the same bytes per device"
    return f"{more} more kernel values split"


def _tokens(region) -> int:
    """Tokens at the trace size: the columns' input without its last dim."""
    proj, _ = next(iter(region.columns.values()))
    x = proj.nodes[0].inputs[0]
    return math.prod(x.shape[:-1])


def _per_token(values, tokens, unit=True) -> str:
    if tokens and values % tokens == 0:
        return (
            f"{values // tokens} values per token"
            if unit
            else (f"{values // tokens}")
        )
    return f"{values} values at the trace size" if unit else str(values)
