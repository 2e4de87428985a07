"""Each `@propagator` on one tiny traced op: where a split dim lands, and
the ops that must refuse it (raise `Conflict`)."""

from __future__ import annotations

import keras
import pytest
from keras import ops

from keras_tensor_parallel.plan import graph as graph_lib
from keras_tensor_parallel.plan import layers, rules
from keras_tensor_parallel.plan import propagate as prop
from keras_tensor_parallel.plan.planner import is_leaf


def trace(fn, *shapes, type_name):
    """The traced node of `type_name` in `fn` applied to inputs of
    `shapes` (batch dim included)."""
    inputs = [keras.Input(s[1:], batch_size=s[0]) for s in shapes]
    out = fn(*inputs)
    model = keras.Model(inputs, out)
    graph = graph_lib.extract_graph(model, is_leaf=is_leaf)
    found = [n for n in graph.nodes if n.type_name == type_name]
    assert found, [n.type_name for n in graph.nodes]
    return found[-1]


B, S, H = 2, 4, 8
X3 = (B, S, H)

# (op class name, fn, input shapes, split dim per input, expected output
# dims or None when the split must be refused)
CASES = [
    ("Add", lambda a, b: a + b, [X3, (B, S, H)], [2, 2], [2]),
    ("Add", lambda a, b: a + b, [X3, (B, S, H)], [2, 1], None),
    ("Multiply", lambda a, b: a * b, [X3, (B, 1, H)], [None, 2], [2]),
    ("Relu", ops.relu, [X3], [2], [2]),
    ("Softmax", lambda x: ops.softmax(x, axis=-1), [X3], [1], [1]),
    ("Softmax", lambda x: ops.softmax(x, axis=-1), [X3], [2], None),
    ("LayerNormalization", keras.layers.LayerNormalization(), [X3], [1], [1]),
    ("LayerNormalization", keras.layers.LayerNormalization(), [X3], [2], None),
    ("BatchNormalization", keras.layers.BatchNormalization(), [X3], [2], [2]),
    ("Sum", lambda x: ops.sum(x, axis=1), [X3], [2], [1]),
    ("Sum", lambda x: ops.sum(x, axis=2), [X3], [2], None),
    ("Cumsum", lambda x: ops.cumsum(x, axis=1), [X3], [2], [2]),
    ("Cumsum", lambda x: ops.cumsum(x, axis=1), [X3], [1], None),
    ("Einsum", lambda a: ops.einsum("bsh,bth->bst", a, a), [X3], [1], None),
    (
        "Einsum",
        lambda a, b: ops.einsum("bsnd,btnd->bnst", a, b),
        [(B, S, 4, 2), (B, S, 4, 2)],
        [2, 2],
        [1],
    ),
    ("Matmul", lambda a, b: ops.matmul(a, b), [X3, (B, H, 6)], [1, None], [1]),
    ("Matmul", lambda a, b: ops.matmul(a, b), [X3, (B, H, 6)], [2, 1], None),
    ("Matmul", lambda a, b: ops.matmul(a, b), [X3, (B, H, 6)], [None, 2], [2]),
    (
        "MaxPool",
        keras.layers.MaxPooling1D(2),
        [X3],
        [2],
        [2],
    ),
    ("MaxPool", keras.layers.MaxPooling1D(2), [X3], [1], None),
    ("Reshape", lambda x: ops.reshape(x, (B, S, 4, 2)), [X3], [2], [2]),
    ("Reshape", lambda x: ops.reshape(x, (B, S * H)), [X3], [1], [1]),
    ("Reshape", lambda x: ops.reshape(x, (B, H, S)), [X3], [2], None),
    ("Transpose", lambda x: ops.transpose(x, (0, 2, 1)), [X3], [2], [1]),
    ("ExpandDims", lambda x: ops.expand_dims(x, 1), [X3], [2], [3]),
    ("Squeeze", lambda x: ops.squeeze(x, 1), [(B, 1, H)], [2], [1]),
    ("Moveaxis", lambda x: ops.moveaxis(x, 2, 0), [X3], [2], [0]),
    ("Repeat", lambda x: ops.repeat(x, 2, axis=2), [X3], [2], [2]),
    ("Tile", lambda x: ops.tile(x, (1, 2, 1)), [X3], [2], [2]),
    ("Tile", lambda x: ops.tile(x, (1, 1, 2)), [X3], [2], None),
    (
        "Concatenate",
        lambda a, b: ops.concatenate([a, b], 1),
        [X3, X3],
        [2, 2],
        [2],
    ),
    (
        "Concatenate",
        lambda a, b: ops.concatenate([a, b], 2),
        [X3, X3],
        [2, 2],
        None,
    ),
    ("Stack", lambda a, b: ops.stack([a, b], axis=0), [X3, X3], [2, 2], [3]),
    ("Split", lambda x: ops.split(x, 2, axis=1), [X3], [2], [2, 2]),
    ("Split", lambda x: ops.split(x, 2, axis=2), [X3], [2], None),
    (
        "TakeAlongAxis",
        lambda x, i: ops.take_along_axis(x, ops.cast(i, "int32"), axis=1),
        [X3, (B, S, 1)],
        [2, None],
        [2],
    ),
    ("Take", lambda x: ops.take(x, [0, 1], axis=1), [X3], [2], [2]),
    ("Take", lambda x: ops.take(x, [0, 1], axis=2), [X3], [2], None),
    ("Pad", lambda x: ops.pad(x, ((0, 0), (1, 1), (0, 0))), [X3], [2], [2]),
    ("Pad", lambda x: ops.pad(x, ((0, 0), (0, 0), (1, 1))), [X3], [2], None),
    ("GetItem", lambda x: x[:, 0], [X3], [2], [1]),
    ("GetItem", lambda x: x[..., :4], [X3], [2], None),
]


def _case_id(case):
    return f"{case[0]}-{case[3]}-{'refused' if case[4] is None else 'ok'}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_propagator(case):
    type_name, fn, shapes, dims, expected = case
    node = trace(fn, *shapes, type_name=type_name)
    assert prop.known(node), type_name
    if expected is None:
        with pytest.raises(prop.Conflict):
            prop.propagate(node, dims)
    else:
        assert prop.propagate(node, dims) == expected


def test_unknown_op_is_a_conflict_naming_it():
    node = trace(lambda x: ops.fft2((x, x))[0], X3, type_name="FFT2")
    with pytest.raises(prop.Conflict, match="no sharding rule for op FFT2"):
        prop.propagate(node, [2])


def test_every_registered_propagator_is_exercised():
    registered = {fn.__name__ for fn in prop._PROPAGATORS.values()}
    names = {c[0] for c in CASES}
    covered = {prop._PROPAGATORS[n].__name__ for n in names}
    # Attention by the dot-product op is covered by the planner tests.
    assert registered - covered <= {"_dot_product_attention"}


def test_one_norm_list_drives_rules_and_propagators():
    for cls in layers.NORM_CLASSES:
        assert cls.__name__ in layers.NORM_CLASS_NAMES
    norm = keras.layers.LayerNormalization()
    norm.build((None, 4))
    assert layers.is_norm(norm)
    assert isinstance(rules.rule_for(norm), rules.ReplicatedRule)
    assert not rules.is_projection(norm)
    dense = keras.layers.Dense(4)
    dense.build((None, 4))
    assert rules.is_projection(dense)
    for name in layers.NORM_CLASS_NAMES:
        assert name in prop._PROPAGATORS
