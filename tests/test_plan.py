"""The plan's uniform policy: every layer of a group loses about the ratio (balanced selection)."""

import numpy as np
import onnx
from builders import GraphBuilder
from engine_util import prune_model, weight

import onnxprune
from onnxprune.groups import WEIGHT_OUT, Group, Member
from onnxprune.plan import balanced_removal, structure_classes


def _member(index, node):
    return Member("t_" + node, 0, np.asarray(index, dtype=np.int64), WEIGHT_OUT, node, "Conv", 1)


def test_classes_follow_which_layers_hold_a_channel():
    # channels 0-3 live in both layers, 4-5 only in the first, 6-7 only in the second
    g = Group(0, 8, [_member([0, 1, 2, 3, 4, 5], "a"), _member([0, 1, 2, 3, 6, 7], "b")])
    cls = structure_classes(g)
    assert len(set(cls[:4])) == 1 and len(set(cls[4:6])) == 1 and len(set(cls[6:])) == 1
    assert len(set(cls.tolist())) == 3


def test_balanced_removal_takes_the_ratio_of_every_class():
    g = Group(0, 8, [_member([0, 1, 2, 3, 4, 5], "a"), _member([0, 1, 2, 3, 6, 7], "b")])
    scores = np.array([5, 6, 7, 8, 1, 2, 3, 4], dtype=np.float64)   # the private channels score lowest
    removed = balanced_removal(g, scores, 4)
    # plain ranking would take 4, 5, 6, 7: each layer would lose 2 of 6; balanced takes 2 shared + 1 + 1
    assert removed.tolist() == [0, 1, 4, 6]
    for m in g.members:
        assert np.isin(m.index, removed).sum() == 3


def test_balanced_removal_with_one_class_is_plain_ranking():
    g = Group(0, 6, [_member(np.arange(6), "a"), _member(np.arange(6), "b")])
    scores = np.array([3, 1, 4, 1.5, 9, 2])
    assert balanced_removal(g, scores, 3).tolist() == [1, 3, 5]
    assert balanced_removal(g, scores, 0).tolist() == []


def _dual_path_model():
    """A shared residual stream (6) plus each unit's own dense channels (2), as in DPN."""
    g = GraphBuilder("x", [1, 3, 8, 8])
    s = g.relu(g.conv("x", 6))
    feats, dense = s, []
    for _ in range(2):
        c = g.conv(feats, 8, k=1)
        r, d = g.op("Split", [c, g.const(np.array([6, 2], np.int64))], n_out=2, axis=1)
        s = g.add(s, r)
        dense.append(d)
        feats = g.concat([s] + dense)
    g.output(g.conv(feats, 5, k=1))
    m = g.build()
    # make the dense outputs weak, so ranking alone would remove them first
    for init in m.graph.initializer:
        if list(init.dims)[:2] == [8, 6] or list(init.dims)[:2] == [8, 8]:
            w = onnx.numpy_helper.to_array(init).copy()
            w[6:] *= 1e-3
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    return m


def test_dual_path_group_loses_the_ratio_in_every_layer(tmp_path):
    m = _dual_path_model()
    r = prune_model(tmp_path, m, ratio=0.5)
    convs = [n for n in r.proto.graph.node if n.op_type == "Conv"]
    assert weight(r.proto, convs[0].name).shape[0] == 3          # stream 6 -> 3
    assert weight(r.proto, convs[1].name).shape[0] == 4          # 3 of the stream + 1 of 2 dense
    assert weight(r.proto, convs[2].name).shape[0] == 4


def test_unbalanced_policy_ranks_the_whole_group(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_dual_path_model(), path)
    r = onnxprune.prune(path, policy=onnxprune.Policy(ratio=0.5, balance=False))
    assert r.verification.passed
    convs = [n for n in r.proto.graph.node if n.op_type == "Conv"]
    # the weak dense channels go first: the stream keeps more than half
    assert weight(r.proto, convs[0].name).shape[0] > 3
