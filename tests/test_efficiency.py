"""Efficiency changes that must not change results: blocked weight norms give the same bits as the
whole-array float64 computation, and large constants are not cached by the scoring context."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.importance import context, weights


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("block", [1, 2**12, 2**18, 2**26])
def test_row_sums_are_bit_identical_to_the_float64_whole_array(axis, block):
    w = np.random.default_rng(axis).standard_normal((150, 130, 3, 3)).astype(np.float32)
    whole = np.moveaxis(np.asarray(w, dtype=np.float64), axis, 0).reshape(w.shape[axis], -1)
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    np.testing.assert_array_equal(weights.row_sums(rows, weights._square, block), (whole * whole).sum(axis=1))
    np.testing.assert_array_equal(weights.row_sums(rows, np.abs, block), np.abs(whole).sum(axis=1))


def test_large_constants_are_decoded_per_call_and_small_ones_cached(monkeypatch):
    import onnx
    from onnx import helper, numpy_helper

    big, small = np.ones((64, 64), np.float32), np.ones(4, np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"])],
                          "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 64])],
                          [numpy_helper.from_array(big, "w"), numpy_helper.from_array(small, "b")])
    monkeypatch.setattr(context, "CACHE_VALUE_BYTES", 1024)
    ctx = context.ScoreContext(helper.make_model(g), analysis=None)
    assert ctx.shape("w") == (64, 64) and "w" not in ctx._values  # shapes without decoding
    assert ctx.value("w") is not ctx.value("w") and ctx.value("b") is ctx.value("b")
    np.testing.assert_array_equal(ctx.value("w"), big)
    assert not ctx.value("w").flags.writeable
