"""The attention and MLP projections of a transformer export: every 2-D constant MatMul/Gemm weight
except the heads. Used by the tiny-export tests and ``tools/bench_coverage.py --transformers``."""

from __future__ import annotations

import onnx


def heads(proto: onnx.ModelProto) -> set[str]:
    """MatMul/Gemm nodes whose output reaches a graph output within two more ops (LM head, classifier,
    pooler)."""
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in proto.graph.output}

    def near(t: str, steps: int) -> bool:
        return t in outputs or (steps > 0 and any(near(o, steps - 1) for c in consumers.get(t, []) for o in c.output))
    return {n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and near(n.output[0], 2)}


def projections(proto: onnx.ModelProto, skip: set[str] | None = None) -> dict[str, list[int]]:
    """Node name -> dims of its 2-D constant weight, for MatMul/Gemm nodes not in ``skip`` (default: the
    heads of ``proto``)."""
    skip = heads(proto) if skip is None else skip
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    out = {}
    for n in proto.graph.node:
        if n.op_type in ("MatMul", "Gemm") and n.name not in skip:
            w = next((inits[i] for i in n.input[:2] if i in inits and len(inits[i]) == 2), None)
            if w is not None:
                out[n.name] = w
    return out
