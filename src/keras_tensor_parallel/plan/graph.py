"""Extract an op-level dataflow graph from any built Keras model.

The model is called once on symbolic `KerasTensor`s of concrete shape.
Layers the planner has a rule for (Dense, EinsumDense, Embedding, norms, ...)
stay leaves; every other layer, Functional and subclassed alike (KerasHub
transformer blocks, `MultiHeadAttention`), is traced *into*: its `call` runs
on the symbolic tensors, so each `keras.ops` call inside records a node. The
result is the dataflow between leaf layers through every reshape, einsum,
softmax and residual add, without reading layer names.

Layers whose `call` cannot run symbolically are kept whole ("opaque"); the
planner replicates what it cannot see through and says so.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import keras
from keras.src.backend import KerasTensor
from keras.src.ops.operation import Operation

_TRACE_BATCH = 2
# Opaque reason of a layer whose output does not depend on its inputs.
WEIGHTS_ONLY = "output computed from its own weights, not its inputs"
_TRACE_SEQUENCE = 16


@dataclasses.dataclass
class OpNode:
    """One call of an op or leaf layer during the trace."""

    index: int
    op: Operation
    inputs: list[KerasTensor]
    outputs: list[KerasTensor]
    args: tuple
    kwargs: dict
    opaque_reason: str = ""

    @property
    def type_name(self) -> str:
        return type(self.op).__name__

    @property
    def name(self) -> str:
        return getattr(self.op, "path", None) or self.op.name


@dataclasses.dataclass
class ModelGraph:
    """Op-level dataflow of one model call.

    Attributes:
        nodes: Calls in execution (topological) order.
        producer: tensor id -> index of the node that produced it.
        consumers: tensor id -> list of (node index, input position).
        outputs: ids of the model's output tensors.
        inputs: the symbolic model inputs.
    """

    nodes: list[OpNode]
    producer: dict[int, int]
    consumers: dict[int, list[tuple[int, int]]]
    outputs: set[int]
    inputs: list[KerasTensor]

    def layer_nodes(self, layer) -> list[OpNode]:
        return [n for n in self.nodes if n.op is layer]

    def opaque_nodes(self) -> list[OpNode]:
        return [n for n in self.nodes if n.opaque_reason]


def symbolic_inputs(model) -> object:
    """Symbolic inputs of concrete shape matching the model's inputs."""
    spec = getattr(model, "_inputs_struct", None)
    if spec is None:
        try:
            spec = model.inputs if model.inputs else None
        except (AttributeError, ValueError):
            spec = None
    if spec is None:
        shape = getattr(model, "_build_shapes_dict", None) or {}
        if len(shape) == 1:
            only = next(iter(shape.values()))
            spec = KerasTensor(only, dtype="float32")
    if spec is None:
        raise ValueError(
            "Cannot find the input signature of the model: call it once on "
            f"data or build it with `model.build(shape)`. Received: {model}"
        )
    return keras.tree.map_structure(_concrete, spec)


def _concrete(t):
    shape = tuple(
        d if d is not None else (_TRACE_BATCH if i == 0 else _TRACE_SEQUENCE)
        for i, d in enumerate(t.shape)
    )
    return KerasTensor(shape, dtype=t.dtype)


def extract_graph(
    model, is_leaf: Callable[[keras.layers.Layer], bool]
) -> ModelGraph:
    """Trace `model` into a `ModelGraph`.

    Args:
        model: A built Keras model.
        is_leaf: Predicate naming layers to keep whole (those the planner has
            a rule for).

    Returns:
        The graph. The model's own node lists are restored afterwards, so the
        trace leaves no trace on the model.
    """
    inputs = symbolic_inputs(model)
    nodes: list[OpNode] = []
    layers = list(model._flatten_layers(include_self=True))
    saved = {
        id(la): (len(la._inbound_nodes), len(la._outbound_nodes))
        for la in layers
    }
    restore = _recording_symbolic_calls(nodes, is_leaf)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outputs = _call_model(model, inputs)
    finally:
        restore()
        for la in layers:
            n_in, n_out = saved[id(la)]
            del la._inbound_nodes[n_in:]
            del la._outbound_nodes[n_out:]
    return _build_graph(nodes, inputs, outputs)


def _build_graph(nodes, inputs, outputs) -> ModelGraph:
    producer: dict[int, int] = {}
    consumers: dict[int, list[tuple[int, int]]] = {}
    for node in nodes:
        for pos, t in enumerate(node.inputs):
            consumers.setdefault(id(t), []).append((node.index, pos))
        for t in node.outputs:
            producer.setdefault(id(t), node.index)
    out_ids = {
        id(t) for t in keras.tree.flatten(outputs) if isinstance(t, KerasTensor)
    }
    return ModelGraph(
        nodes, producer, consumers, out_ids, keras.tree.flatten(inputs)
    )


def _recording_symbolic_calls(nodes: list, is_leaf) -> Callable[[], None]:
    """Patch Keras' symbolic calls to append an `OpNode` per op and leaf
    layer call to `nodes` (tracing into every other layer); returns the
    function restoring them."""

    def record(op, args, kwargs, outputs, reason=""):
        flat_in = [
            t
            for t in keras.tree.flatten((args, kwargs))
            if isinstance(t, KerasTensor)
        ]
        flat_out = [
            t for t in keras.tree.flatten(outputs) if isinstance(t, KerasTensor)
        ]
        nodes.append(
            OpNode(len(nodes), op, flat_in, flat_out, args, kwargs, reason)
        )

    def op_symbolic_call(self, *args, **kwargs):
        outputs = self.compute_output_spec(*args, **kwargs)
        _densify(args, kwargs, outputs)
        record(self, args, kwargs, outputs)
        return outputs

    def layer_symbolic_call(self, *args, **kwargs):
        if is_leaf(self):
            outputs = _leaf_output_spec(self, args, kwargs)
            record(self, args, kwargs, outputs)
            return outputs
        mark = len(nodes)
        try:
            outputs = self.call(*args, **kwargs)
            if not _concrete_outputs(outputs):
                return outputs
            # Computed from the layer's own weights alone (DeBERTa's
            # relative embedding): its ops ran eagerly and are not in the
            # graph, so the layer stands as one opaque node.
            reason = WEIGHTS_ONLY
        except Exception as e:  # noqa: BLE001 - any failure makes it opaque
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        del nodes[mark:]
        outputs = self.compute_output_spec(*args, **kwargs)
        record(self, args, kwargs, outputs, reason=reason or "opaque")
        return outputs

    orig_op_call = Operation.symbolic_call
    orig_layer_call = keras.layers.Layer.symbolic_call
    Operation.symbolic_call = op_symbolic_call
    keras.layers.Layer.symbolic_call = layer_symbolic_call
    lenient_restore = _lenient_symbolic_calls()

    def restore() -> None:
        Operation.symbolic_call = orig_op_call
        keras.layers.Layer.symbolic_call = orig_layer_call
        lenient_restore()

    return restore


def _lenient_symbolic_calls() -> Callable[[], None]:
    """Let layer code written for concrete tensors run on symbolic ones.

    Keras runs a layer's `call` on backend tensors when it builds a model;
    the trace runs it on `KerasTensor`s, which code may meet in two ways
    Keras itself never does:

    - a nested layer returning `None` beside its tensors (an empty cache,
      GPT-NeoX attention): Keras' node bookkeeping rejects non-tensor
      outputs, so only the tensors are recorded;
    - a backend array combined with a symbolic one (`slopes * mask` in
      Falcon's ALiBi): without `__jax_array__` the array's operator returns
      `NotImplemented` and Python falls back to the `KerasTensor`'s own
      reflected operator, a traced op.

    Returns:
        A function restoring both.
    """
    from keras.src.ops.node import Node

    node_init = Node.__init__
    jax_array = KerasTensor.__dict__.get("__jax_array__")

    def lenient_init(
        self, operation, call_args=None, call_kwargs=None, outputs=None
    ):
        if outputs is not None:
            outputs = [
                t
                for t in keras.tree.flatten(outputs)
                if isinstance(t, KerasTensor)
            ]
        node_init(self, operation, call_args, call_kwargs, outputs)

    Node.__init__ = lenient_init
    if jax_array is not None:
        del KerasTensor.__jax_array__

    def restore() -> None:
        Node.__init__ = node_init
        if jax_array is not None:
            KerasTensor.__jax_array__ = jax_array

    return restore


def _concrete_outputs(outputs) -> bool:
    """Whether a traced call returned arrays instead of symbolic tensors."""
    return any(
        hasattr(t, "shape") and not isinstance(t, KerasTensor)
        for t in keras.tree.flatten(outputs)
    )


def _densify(args, kwargs, outputs) -> None:
    """Keep outputs dense unless an input is sparse.

    Some ops mark their output sparse when an operand is a backend array
    with no `sparse` attribute (e.g. `x * jnp.float32(8)`); the trace does
    not model sparsity, and a spurious sparse flag breaks later shape
    inference.
    """
    if any(
        getattr(t, "sparse", False)
        for t in keras.tree.flatten((args, kwargs))
        if isinstance(t, KerasTensor)
    ):
        return
    for t in keras.tree.flatten(outputs):
        if isinstance(t, KerasTensor):
            t._sparse = False


def _call_model(model, inputs):
    kwargs = {}
    if getattr(model, "_call_has_training_arg", False):
        kwargs["training"] = False
    # `symbolic_call` is patched, so even a Functional model runs its graph
    # through `call` layer by layer.
    return keras.layers.Layer.symbolic_call(model, inputs, **kwargs)


def _leaf_output_spec(layer, args, kwargs):
    """Output spec of a leaf, with concrete shapes where the layer's own
    shape inference leaves dims unknown (EinsumDense does)."""
    spec = layer.compute_output_spec(*args, **kwargs)
    if all(
        None not in t.shape
        for t in keras.tree.flatten(spec)
        if isinstance(t, KerasTensor)
    ):
        return spec
    try:
        return keras.src.backend.compute_output_spec(
            layer.call, *args, **kwargs
        )
    except Exception:  # noqa: BLE001 - keep the layer's own answer
        return spec
