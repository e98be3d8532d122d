"""The committed tiny transformer exports (models/tiny, random weights, dynamic batch and sequence):
each prunes, verifies against its masked original, and its attention and MLP projections shrink."""

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune import runtime
from onnxprune.testing.projections import heads, projections

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny"
SEQ, PAST = 4, 3


def _shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    """Consistent sizes for the symbolic dims: batch 1, sequence 4, past 3 (masks cover past + sequence)."""
    past = any(i.name.startswith("past_key_values") for i in proto.graph.input)
    out = {}
    for vi in proto.graph.input:
        dims = [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
        if vi.name == "pixel_values":
            out[vi.name] = [1, 3, 32, 32]
        elif vi.name.startswith("past_key_values"):
            out[vi.name] = [1, dims[1], PAST, dims[3]]
        elif vi.name == "attention_mask":
            out[vi.name] = [1, SEQ + PAST if past else SEQ]
        elif vi.name in ("input_ids", "position_ids", "token_type_ids"):
            out[vi.name] = [1, SEQ]
    return out


CASES = ["llama_legacy", "llama_dynamo_kv", "llama_optimum", "gpt2_dynamo", "bert_legacy", "vit_optimum",
         "whisper_dynamo"]


@pytest.mark.parametrize("name", CASES)
def test_tiny_transformer_prunes_heads_and_mlp(tmp_path, name):
    path = TINY / f"{name}.onnx"
    original = onnx.load(path)
    r = onnxprune.prune(path, policy=onnxprune.Policy(ratio=0.3), input_shapes=_shapes(original),
                        kv_cache=name.endswith("_kv"))
    assert r.verification.passed
    skip = heads(original)
    before, after = projections(original, skip), projections(r.proto, skip)
    assert set(before) == set(after) and len(before) >= 8
    kept = sum(np.prod(a) for a in after.values()) / sum(np.prod(b) for b in before.values())
    assert kept <= 0.75, kept      # 30% of 4-8 dims per head rounds down to 25% at this tiny size
    shrank = {k: int(np.prod(after[k])) < int(np.prod(before[k])) for k in before}
    assert all(shrank.values()), shrank       # every q, k, v, o and MLP weight is smaller
    structures = {g["structure"] for g in r.report()["groups"]}
    assert "ffn" in structures and ("head_dim" in structures or "head" in structures), structures
    if name.endswith("_kv"):   # the caches shrink with the heads they carry, at any past length
        io = {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
              for vi in list(r.proto.graph.input) + list(r.proto.graph.output)}
        assert io["past_key_values.0.key"][3] < original.graph.input[2].type.tensor_type.shape.dim[3].dim_value
        feed = {k: np.ones(v, np.int64) if k in ("input_ids", "attention_mask", "position_ids") else None
                for k, v in _shapes(original).items()}
        for k in feed:
            if feed[k] is None:
                dims = io[k]
                feed[k] = np.zeros([1, dims[1], 5, dims[3]], np.float32)
        feed["attention_mask"] = np.ones((1, SEQ + 5), np.int64)
        out = runtime.run(runtime.session(r.proto), feed)
        assert out["present.0.key"].shape[2] == SEQ + 5


def test_dynamo_bert_attention_runs_after_pruning(tmp_path):
    """Regression (issue 13): the dynamo export's attention reshapes read the head count and size at
    run time; the pruned model used to fail in onnxruntime ("cannot be reshaped", a broadcast at the
    attention mask Add) instead of matching its masked original."""
    path = TINY / "bert_dynamo.onnx"
    shapes = _shapes(onnx.load(path))
    r = onnxprune.prune(path, policy=onnxprune.Policy(ratio=0.3), input_shapes=shapes)
    assert r.verification.passed
    feed = {k: np.ones((2, 9), np.int64) for k in shapes}
    out = runtime.run(runtime.session(r.proto), feed)
    assert out["last_hidden_state"].shape == (2, 9, 32)
