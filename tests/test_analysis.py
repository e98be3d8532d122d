"""The analysis stage alone: which channel groups a graph has, what each group touches, what is frozen
and why. No scoring, rewriting or verification runs here, so a failure points at the analysis."""

from __future__ import annotations

import numpy as np
from builders import GraphBuilder

from onnxprune import analyze
from onnxprune.groups import ACTIVATION, PARAM, WEIGHT_IN, WEIGHT_OUT


def _members(group) -> set[tuple[str, int, str, str]]:
    return {(m.tensor, m.axis, m.kind, m.node) for m in group.members}


def test_a_chain_has_one_group_per_layer_and_the_last_is_frozen_by_the_output():
    g = GraphBuilder("x", [1, 3, 8, 8])
    a = g.relu(g.conv("x", 6))
    g.output(g.conv(a, 4, k=1))
    model = g.build()
    conv1, relu, conv2 = model.graph.node
    an = analyze(model)

    assert [(gr.size, gr.frozen) for gr in an.groups] == [(6, False), (4, True)]
    first, last = an.groups
    assert first.layers == [conv1.name] and first.consumers == [conv2.name]
    assert _members(first) == {
        (conv1.input[1], 0, WEIGHT_OUT, conv1.name),   # the filters
        (conv1.input[2], 0, PARAM, conv1.name),        # their bias
        (conv1.output[0], 1, ACTIVATION, conv1.name),  # the conv output ...
        (relu.output[0], 1, ACTIVATION, relu.name),    # ... through the Relu
        (conv2.input[1], 1, WEIGHT_IN, conv2.name),    # the next layer's input channels
    }
    for m in first.members:   # every position of every member is one channel of the group
        assert m.index.tolist() == list(range(6))
    assert last.reasons == [f"graph output '{conv2.output[0]}' keeps its shape"]
    assert an.barriers == [] and [gr.id for gr in an.prunable] == [first.id]
    assert an.input_shapes == {"x": [1, 3, 8, 8]} and an.shapes[relu.output[0]] == [1, 6, 8, 8]


def test_a_residual_add_couples_both_producers_into_one_group():
    g = GraphBuilder("x", [1, 4, 8, 8])
    stem = g.conv("x", 4, k=1)
    branch = g.conv(g.relu(stem), 4)
    head = g.conv(g.add(stem, branch), 6, k=1)
    g.output(g.gemm(g.flatten(g.gap(head)), 3))
    model = g.build()
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    an = analyze(model)

    residual = an.groups[0]
    assert residual.size == 4 and not residual.frozen
    assert residual.layers == convs[:2]                   # both writers of the sum lose the same channels
    assert residual.consumers == convs[1:]                # the branch conv and the head read them
    assert [gr.layers for gr in an.groups[1:]] == [[convs[2]], [model.graph.node[-1].name]]


def test_an_op_without_a_rule_is_a_barrier_that_freezes_only_what_reaches_it():
    g = GraphBuilder("x", [1, 3, 8, 8])
    a = g.relu(g.conv("x", 8))
    b = g.relu(g.conv(a, 8))
    y = g.op("DepthToSpace", [b], blocksize=2)           # channels fold into space: no rule
    g.output(g.conv(y, 4, k=1))
    model = g.build()
    d2s = next(n for n in model.graph.node if n.op_type == "DepthToSpace")
    an = analyze(model)

    assert [(b.node, b.op, b.reason) for b in an.barriers] == [(d2s.name, "DepthToSpace", "no rule for this op")]
    before, into, _ = an.groups
    assert not before.frozen                               # upstream of the barrier: still prunable
    assert into.frozen and into.reasons == [f"DepthToSpace '{d2s.name}': no rule for this op"]


def test_input_shapes_fix_symbolic_dims_for_the_analysis():
    g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=True)
    relu = g.relu(g.conv("x", 6))
    g.output(g.conv(relu, 4, k=1))
    model = g.build()
    assert analyze(model).input_shapes == {"x": [1, 3, 8, 8]}          # symbolic batch: 1
    an = analyze(model, {"x": [5, 3, 8, 8]})
    assert an.input_shapes == {"x": [5, 3, 8, 8]} and an.shapes[relu] == [5, 6, 8, 8]
    assert np.array_equal(an.groups[0].members[0].index, np.arange(6))
