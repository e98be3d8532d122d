"""onnxruntime-genai folders (models/tiny/genai, made by tools/export_genai.py): pruned with their KV cache,
verified, and loaded back by onnxruntime-genai from the output folder with an updated genai_config.json."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

import onnxprune
from onnxprune.cli import main

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny" / "genai"
EMPTY_CACHE = ["--input-shape", "past_sequence_length=0", "--input-shape", "sequence_length=8",
               "--input-shape", "total_sequence_length=8", "--input-shape", "kv_cache_dim=16"]
SHAPES = {"past_sequence_length": [0], "sequence_length": [8], "total_sequence_length": [8], "kv_cache_dim": [16]}


def _attrs(model, op):
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in model.graph.node
            if n.op_type == op]


def _logits(path, kv):
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.arange(8, dtype=np.int64).reshape(1, 8), "attention_mask": np.ones((1, 8), np.int64)}
    for i in sess.get_inputs()[2:]:
        feed[i.name] = np.zeros((1, kv, 0, 16), np.float32)
    return sess.run(["logits"], feed)[0]


def test_genai_folder_prunes_heads_kv_cache_and_mlp_and_loads_in_onnxruntime_genai(tmp_path, capsys):
    import onnxruntime_genai as og   # the test extra installs it
    src = tmp_path / "in"
    shutil.copytree(TINY / "fp32", src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "out"
    out.mkdir()
    code = main(["prune", str(src / "model.onnx"), "-o", str(out / "model.onnx"), "--ratio", "0.5", "--round-to", "1",
                 "--kv-cache", *EMPTY_CACHE, "--report", str(tmp_path / "r.json")])
    assert code == 0
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before, "inputs never change"
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verified"] and rep["input_shapes"]["past_key_values.0.key"] == [1, 2, 0, 16]
    assert any("onnxruntime's own load" in n for n in rep["validity"])
    pruned = onnx.load(out / "model.onnx")
    assert [(a["num_heads"], a["kv_num_heads"]) for a in _attrs(pruned, "GroupQueryAttention")] == [(2, 1)] * 2
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in pruned.graph.input}
    assert dims["past_key_values.1.value"][1] == 1
    ffn = [t for t in pruned.graph.initializer if "gate_proj" in t.name]
    assert ffn and all(list(t.dims) == [64, 64] for t in ffn)   # 128 MLP channels -> 64
    config = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]) == (2, 1, 16)
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert np.abs(_logits(out / "model.onnx", 1) - _logits(src / "model.onnx", 2)).max() > 1e-3
    # onnxruntime-genai loads the output folder and generates with its (smaller) KV cache
    model = og.Model(str(out))
    tok = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=20, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(tok.encode("The quick brown"))
    while not gen.is_done():
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) == 20


def test_int4_folder_prunes_matmul_nbits_in_whole_blocks(tmp_path):
    r = onnxprune.prune(TINY / "int4" / "model.onnx", policy=onnxprune.Policy(ratio=0.5, round_to=1),
                        input_shapes=SHAPES, kv_cache=True)
    assert r.verification.passed
    q4 = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in r.proto.graph.node
          if n.op_type == "MatMulNBits"}
    gate = next(a for k, a in q4.items() if "layers.0/mlp/gate_proj" in k)
    down = next(a for k, a in q4.items() if "layers.0/mlp/down_proj" in k)
    qkv = next(a for k, a in q4.items() if "layers.0/attn/qkv_proj" in k)
    assert (gate["N"], down["K"]) == (64, 64)      # 4 blocks of 32 MLP channels -> 2
    assert qkv["N"] == (2 + 2 * 1) * 16             # heads 4 -> 2, KV heads 2 -> 1
    assert any("accuracy_level 0" in n for n in r.report()["validity"])   # int8 activations: compared at float


def test_configs_never_overwrite_the_input_folder(tmp_path):
    src = tmp_path / "in"
    shutil.copytree(TINY / "fp32", src)
    config = (src / "genai_config.json").read_bytes()
    r = onnxprune.prune(src / "model.onnx", policy=onnxprune.Policy(ratio=0.5, round_to=1), input_shapes=SHAPES,
                        kv_cache=True)
    onnxprune.save(r, src / "pruned.onnx")
    assert (src / "genai_config.json").read_bytes() == config
    assert any("input's folder" in n for n in r.report()["configs"])


def test_hugging_face_config_beside_a_torch_export_is_copied_with_what_the_graph_says(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir(), out.mkdir()
    shutil.copy(TINY.parent / "llama_optimum_kv.onnx", src / "model.onnx")
    config = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer_config.json").write_text("{}")
    r = onnxprune.prune(src / "model.onnx", policy=onnxprune.Policy(ratio=0.5, round_to=1), kv_cache=True,
                        input_shapes={"past_sequence_length": [0]})
    onnxprune.save(r, out / "model.onnx")
    written = json.loads((out / "config.json").read_text())
    kv = {o.name: o.type.tensor_type.shape.dim[1].dim_value for o in r.proto.graph.output if "present" in o.name}
    assert written["num_key_value_heads"] == set(kv.values()).pop()   # what the pruned cache outputs declare
    assert (out / "tokenizer_config.json").exists() and json.loads((src / "config.json").read_text()) == config
    assert any("intermediate_size is the input's" in n for n in r.report()["configs"])


def test_inspect_binds_named_dimensions(capsys):
    assert main(["inspect", str(TINY / "fp32" / "model.onnx"), *EMPTY_CACHE]) == 0
    out, err = capsys.readouterr()
    assert "analysed as 1" not in err and "753,664" in out   # MACs of 8 tokens over an empty cache
    assert main(["inspect", str(TINY / "fp32" / "model.onnx"), "--input-shape", "past_sequence_length=0x1"]) == 2
    assert "one size" in capsys.readouterr().err
