#!/usr/bin/env python3
"""Export transformer models built from configs (random, seeded weights) to ONNX.

Test material for pruning transformers: BERT/MiniLM-style encoder, GPT-2,
Llama with GQA (RoPE, SwiGLU), ViT and the Whisper encoder, each through the
three exporters people use, with the dynamic axes people give them:

  legacy   torch.onnx.export(dynamo=False, dynamic_axes=...)          opset 17
  dynamo   torch.onnx.export(dynamo=True, dynamic_shapes=...)         (torch's default opset)
  optimum  optimum-cli export onnx --task ... on a saved HF folder     (its defaults)

GPT-2 and Llama are also exported with a KV cache (`*_kv.onnx`): inputs
input_ids, attention_mask, past_key_values.{i}.key/value; outputs logits,
present.{i}.key/value (optimum's names; its llama adds position_ids).

    /work/venv-tools/bin/python tools/export_transformers.py --size tiny
    /work/venv-tools/bin/python tools/export_transformers.py --size bench --out /work/scratch/material/bench
    /work/venv-tools/bin/python tools/export_transformers.py --size tiny --only llama --exporters legacy

--size tiny (hidden 32-64, 2 layers, vocab 128-256, each file well under 1 MB)
writes models/tiny/ and its README.md table; --size bench writes the
issue-sized models (Llama hidden 512 x 6 layers, 8 heads / 2 KV heads; GPT-2
768 x 6; ViT-B/16; MiniLM-L6; Whisper-tiny encoder) elsewhere.  Nothing is
downloaded: every model comes from a config and torch.manual_seed(0).

Every file is run once in onnxruntime with batch 2 and a sequence (and past)
length different from the export's, and compared to torch on the same input;
the results go to <out>/manifest.json.  Failures are recorded, not fatal.

The optimum stage runs in a second interpreter (--optimum-python, default
/work/venv-optimum/bin/python: optimum-onnx 0.1 needs transformers < 4.58,
while the rest runs on transformers 5.x).  With transformers 4.5x the legacy
exporter cannot trace the vmap-built causal mask; this script then swaps in
transformers' own `sdpa_mask_older_torch` (transformers 5.x builds the mask
without vmap and needs nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# ----------------------------------------------------------------- configs

CONFIGS = {
    "tiny": {
        "bert": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, type_vocab_size=2),
        "gpt2": dict(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4),
        "llama": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False),
        "vit": dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=10),
        # the encoder takes exactly 2 * max_source_positions frames; optimum's dummy input has 3000
        "whisper": dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                        num_mel_bins=16, max_source_positions=1500, max_target_positions=32,
                        vocab_size=128, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                        decoder_start_token_id=3, begin_suppress_tokens=None, suppress_tokens=None),
    },
    "bench": {
        # all-MiniLM-L6-v2's shape
        "bert": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2),
        "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=6, n_head=12),
        # issue 13's Llama: hidden 512, 6 layers, 8 heads, 2 KV heads
        "llama": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=False),
        # ViT-B/16
        "vit": dict(image_size=224, patch_size=16, num_channels=3, hidden_size=768, num_hidden_layers=12,
                    num_attention_heads=12, intermediate_size=3072, num_labels=1000),
        # whisper-tiny (encoder used)
        "whisper": dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                        decoder_layers=4, decoder_attention_heads=6, decoder_ffn_dim=1536,
                        num_mel_bins=80, max_source_positions=1500, max_target_positions=448,
                        vocab_size=51865),
    },
}

# arch -> (config class, model class, optimum task(s), short description)
ARCHS = {
    "bert": ("BertConfig", "BertModel", "feature-extraction", "BERT/MiniLM encoder"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "text-generation", "GPT-2 decoder, LM head"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", "text-generation", "Llama decoder, GQA, RoPE, SwiGLU"),
    "vit": ("ViTConfig", "ViTForImageClassification", "image-classification", "ViT classifier"),
    "whisper": ("WhisperConfig", "WhisperModel", "automatic-speech-recognition", "Whisper encoder"),
}
DECODERS = ("gpt2", "llama")
EXPORTERS = ("legacy", "dynamo", "optimum")

# export-time and check-time shapes: batch, sequence, past
EXPORT_SHAPE = dict(batch=1, seq=8, past=4)
CHECK_SHAPE = dict(batch=2, seq=5, past=7)


def build(arch, size, seed=0):
    """The torch module of ``arch`` at ``size``, random weights from ``seed``, eval mode."""
    import torch
    import transformers

    cfg_cls, model_cls, _, _ = ARCHS[arch]
    config = getattr(transformers, cfg_cls)(**CONFIGS[size][arch])
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    return model


def legacy_mask_fix():
    """transformers 4.5x: make the legacy (TorchScript) exporter trace the causal mask.

    Its default sdpa_mask expands the mask with torch.vmap, which torch.jit
    tracing rejects; transformers ships the non-vmap variant for older torch.
    Returns what was done (for the manifest).
    """
    import transformers.masking_utils as mu

    older = getattr(mu, "sdpa_mask_older_torch", None)
    if older is None:
        return "not needed (this transformers builds the mask without vmap)"
    mu.sdpa_mask = older
    mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = older
    return "transformers.masking_utils.sdpa_mask = sdpa_mask_older_torch"


# ---------------------------------------------------------- inputs/wrappers


def n_layers(model):
    c = model.config
    return getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer")


def kv_shape(model, batch, past):
    c = model.config
    if hasattr(c, "num_key_value_heads"):
        heads = c.num_key_value_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    else:  # gpt2
        heads, head_dim = c.n_head, c.n_embd // c.n_head
    return (batch, heads, past, head_dim)


def make_feed(arch, model, shape, kv, seed):
    """Named numpy inputs for ``arch`` at ``shape`` (dict batch/seq/past)."""
    rng = np.random.default_rng(seed)
    b, s, p = shape["batch"], shape["seq"], shape["past"]
    c = model.config
    if arch == "vit":
        return {"pixel_values": rng.standard_normal((b, 3, c.image_size, c.image_size)).astype(np.float32)}
    if arch == "whisper":
        frames = 2 * c.max_source_positions  # the encoder accepts only this length
        return {"input_features": rng.standard_normal((b, c.num_mel_bins, frames)).astype(np.float32)}
    feed = {"input_ids": rng.integers(0, c.vocab_size, (b, s), dtype=np.int64)}
    total = s + (p if kv else 0)
    feed["attention_mask"] = np.ones((b, total), dtype=np.int64)
    if arch == "bert":
        feed["token_type_ids"] = np.zeros((b, s), dtype=np.int64)
    if kv:
        for i in range(n_layers(model)):
            for t in ("key", "value"):
                feed[f"past_key_values.{i}.{t}"] = rng.standard_normal(kv_shape(model, b, p)).astype(np.float32)
    return feed


def io_names(arch, model, kv):
    """(input names, output names, legacy dynamic_axes) as people write them."""
    if arch == "vit":
        return ["pixel_values"], ["logits"], {"pixel_values": {0: "batch_size"}, "logits": {0: "batch_size"}}
    if arch == "whisper":
        return (["input_features"], ["last_hidden_state"],
                {"input_features": {0: "batch_size"}, "last_hidden_state": {0: "batch_size"}})
    seq = {0: "batch_size", 1: "sequence_length"}
    if arch == "bert":
        ins = ["input_ids", "attention_mask", "token_type_ids"]
        outs = ["last_hidden_state", "pooler_output"]
        axes = {n: dict(seq) for n in ins}
        axes["last_hidden_state"] = dict(seq)
        axes["pooler_output"] = {0: "batch_size"}
        return ins, outs, axes
    ins, outs = ["input_ids", "attention_mask"], ["logits"]
    axes = {"input_ids": dict(seq), "logits": dict(seq)}
    if not kv:
        axes["attention_mask"] = dict(seq)
        return ins, outs, axes
    axes["attention_mask"] = {0: "batch_size", 1: "total_sequence_length"}
    for i in range(n_layers(model)):
        for t in ("key", "value"):
            ins.append(f"past_key_values.{i}.{t}")
            outs.append(f"present.{i}.{t}")
            axes[ins[-1]] = {0: "batch_size", 2: "past_sequence_length"}
            axes[outs[-1]] = {0: "batch_size", 2: "total_sequence_length"}
    return ins, outs, axes


def wrapper(arch, model, kv):
    """A module whose positional inputs/outputs are flat tensors in io_names order."""
    import torch
    import transformers

    v5 = int(transformers.__version__.split(".")[0]) >= 5

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model.get_encoder() if arch == "whisper" else model

        def forward(self, *args):
            if arch == "vit":
                return self.model(pixel_values=args[0]).logits
            if arch == "whisper":
                return self.model(input_features=args[0]).last_hidden_state
            if arch == "bert":
                out = self.model(input_ids=args[0], attention_mask=args[1], token_type_ids=args[2])
                return out.last_hidden_state, out.pooler_output
            return self.model(input_ids=args[0], attention_mask=args[1], use_cache=False).logits

    class WithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *past):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            cache = transformers.DynamicCache(pairs)
            key = "cache" if v5 else "past_key_values"
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **{key: cache})
            new = out.cache if v5 else out.past_key_values
            flat = []
            for layer in new.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return WithCache().eval() if kv else Plain().eval()


# ---------------------------------------------------------------- exporters


def export_torch(arch, model, kv, path, dynamo, external_data):
    import torch

    ins, outs, axes = io_names(arch, model, kv)
    feed = make_feed(arch, model, EXPORT_SHAPE, kv, seed=1)
    args = tuple(torch.from_numpy(feed[n]) for n in ins)
    module = wrapper(arch, model, kv)
    notes = {}
    if not dynamo:
        notes["mask_fix"] = legacy_mask_fix()
        torch.onnx.export(module, args, path, dynamo=False, opset_version=17, input_names=ins,
                          output_names=outs, dynamic_axes=axes, do_constant_folding=True)
        return notes
    Dim = torch.export.Dim
    dims = {}

    def dim(name):
        if name not in dims:
            dims[name] = Dim.DYNAMIC if name == "total_sequence_length" else Dim(name, min=1, max=4096)
        return dims[name]

    shapes = tuple({ax: dim(nm) for ax, nm in axes[n].items()} for n in ins)
    # forward(*args) -> one entry per positional; WithCache(input_ids, attention_mask, *past)
    if kv:
        shapes = (shapes[0], shapes[1], tuple(shapes[2:]))
    else:
        shapes = (tuple(shapes),)
    prog = torch.onnx.export(module, args, path, dynamo=True, input_names=ins, output_names=outs,
                             dynamic_shapes=shapes, external_data=external_data)
    del prog
    return notes


def export_optimum(arch, size, kv, path, optimum_python, workdir):
    """Run this script's --optimum-stage in the optimum interpreter; copy its model.onnx to ``path``."""
    out = os.path.join(workdir, f"optimum_{arch}_{'kv' if kv else 'plain'}")
    cmd = [optimum_python, os.path.abspath(__file__), "--optimum-stage", arch, "--size", size, "--out", out]
    if kv:
        cmd.append("--kv")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"optimum stage failed: {(proc.stderr or proc.stdout)[-1500:]}")
    src = os.path.join(out, "onnx", "encoder_model.onnx" if arch == "whisper" else "model.onnx")
    copy_onnx(src, path)
    with open(os.path.join(out, "stage.json")) as f:
        stage = json.load(f)
    stage["hf_dir"] = os.path.join(out, "hf")
    return stage


def copy_onnx(src, dst):
    """Copy an ONNX file; external data (if any) is moved inside when small, else copied beside."""
    import onnx

    model = onnx.load(src)  # loads external data too
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size < 1_500_000_000:
        onnx.save(model, dst)
    else:
        onnx.save(model, dst, save_as_external_data=True, location=os.path.basename(dst) + ".data")


def optimum_stage(arch, size, kv, out):
    """(Runs under transformers 4.5x + optimum-onnx.) Save the HF folder, run optimum-cli on it."""
    from importlib.metadata import version

    import transformers

    model = build(arch, size)
    hf = os.path.join(out, "hf")
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(hf)
    task = ARCHS[arch][2] + ("-with-past" if kv else "")
    cli = os.path.join(os.path.dirname(sys.executable), "optimum-cli")
    cmd = [cli, "export", "onnx", "-m", hf, "--task", task, os.path.join(out, "onnx")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    stage = {
        "command": " ".join(["optimum-cli", "export", "onnx", "-m", "HF_DIR", "--task", task, "OUT"]),
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "versions": {"transformers": transformers.__version__,
                     "optimum": f"{version('optimum')} + optimum-onnx {version('optimum-onnx')}"},
        "log_tail": (proc.stderr + proc.stdout)[-1500:],
    }
    with open(os.path.join(out, "stage.json"), "w") as f:
        json.dump(stage, f, indent=1)
    if proc.returncode != 0:
        print(stage["log_tail"], file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------- check


def torch_reference(arch, model, kv, feed):
    import torch

    ins, _, _ = io_names(arch, model, kv)
    with torch.no_grad():
        out = wrapper(arch, model, kv)(*[torch.from_numpy(feed[n]) for n in ins if n in feed])
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def session(path):
    """A quiet onnxruntime CPU session."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def check(path, arch, model, kv):
    """Run ``path`` in onnxruntime at CHECK_SHAPE and compare with torch on the same input."""
    result = {}
    try:
        sess = session(path)
        feed = make_feed(arch, model, CHECK_SHAPE, kv, seed=2)
        names = [i.name for i in sess.get_inputs()]
        if "position_ids" in names:  # optimum's llama
            b, s, p = CHECK_SHAPE["batch"], CHECK_SHAPE["seq"], CHECK_SHAPE["past"] if kv else 0
            feed["position_ids"] = np.tile(np.arange(p, p + s, dtype=np.int64), (b, 1))
        missing = [n for n in names if n not in feed]
        if missing:
            raise RuntimeError(f"inputs this script does not feed: {missing}")
        outs = sess.run(None, {n: feed[n] for n in names})
        result["ort_ok"] = True
        result["check_shape"] = dict(CHECK_SHAPE) if kv else {k: CHECK_SHAPE[k] for k in ("batch", "seq")}
        result["ort_output_shapes"] = {o.name: list(v.shape) for o, v in zip(sess.get_outputs(), outs)}
        ref = torch_reference(arch, model, kv, feed)
        first = outs[0]
        diff = float(np.max(np.abs(first - ref[0])))
        result["max_abs_diff_vs_torch"] = diff
        result["matches_torch"] = bool(diff <= 1e-4 * max(1.0, float(np.max(np.abs(ref[0])))))
    except Exception as exc:  # noqa: BLE001 - recorded
        result["ort_ok"] = False
        result["ort_error"] = f"{type(exc).__name__}: {exc}"[:1500]
    return result


def failure(exc, key="error"):
    """What a manifest records of a caught exception: its message and the end of its traceback."""
    return {key: f"{type(exc).__name__}: {exc}"[:3000], "traceback_tail": traceback.format_exc()[-1500:]}


def brief(entry):
    """A manifest entry without its bulky fields, for the progress line."""
    return {k: v for k, v in entry.items() if k not in ("describe", "traceback_tail", "config")}


def describe(path):
    import onnx

    m = onnx.load(path, load_external_data=False)

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {
        "bytes": os.path.getsize(path),
        "opset": next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None),
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "nodes": len(m.graph.node),
        "inputs": {v.name: dims(v) for v in m.graph.input},
        "outputs": {v.name: dims(v) for v in m.graph.output},
        "external_data": any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer),
    }


# -------------------------------------------------------------------- main


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def readme(out, manifest):
    """models/tiny/README.md: one row per file."""
    rows = []
    for name, e in sorted(manifest["models"].items()):
        if not e.get("export_ok"):
            continue
        d = e["describe"]
        ins = ", ".join(f"{k}[{'x'.join(map(str, v))}]" for k, v in d["inputs"].items() if not k.startswith("past_"))
        npast = sum(1 for k in d["inputs"] if k.startswith("past_"))
        if npast:
            ins += f", {npast} past_key_values.*"
        dyn = sorted({x for v in list(d["inputs"].values()) + list(d["outputs"].values()) for x in v if isinstance(x, str)})
        ok = "yes" if e.get("ort_ok") and e.get("matches_torch") else "NO"
        rows.append(f"| `{name}.onnx` | {e['description']} | {e['exporter']} | {ins} | {', '.join(dyn) or '-'} "
                    f"| {e['params']:,} | {d['bytes']:,} | {ok} |")
    failed = [f"- `{n}`: {e.get('export_error', '')[:300]}" for n, e in sorted(manifest["models"].items())
              if not e.get("export_ok")]
    v = manifest["versions"]
    text = f"""# Tiny transformer exports (CI material)

Made by `tools/export_transformers.py --size tiny` (random weights from configs,
`torch.manual_seed(0)`; nothing downloaded). Versions: torch {v['torch']},
transformers {v['transformers']} (legacy, dynamo), optimum stage: {v.get('optimum', '-')}.
`*_kv.onnx` take a KV cache (`past_key_values.{{i}}.key/value` in,
`present.{{i}}.key/value` out). Every file was run in onnxruntime with batch 2 and
a sequence/past length different from the export's and compared with torch
("ort b2"). Details (opset, producer, output shapes, diffs): `manifest.json`.

Exporter habits visible here: legacy = opset 17, weights deduplicated, dims named by
`dynamic_axes`; dynamo = opset 20, every node carries torch metadata (stack trace,
module path: hence the larger files), the KV attention mask's length gets an
automatic name (`s53`) and outputs get expressions (`past_sequence_length +
sequence_length`); optimum = opset 18, adds `position_ids` to decoders and leaves
ViT's channels/height/width dynamic. Whisper's encoder accepts exactly 3000 frames
(2 x max_source_positions), so only its batch is dynamic.

| file | architecture | exporter | inputs (export shape) | dynamic dims | params | bytes | ort b2 |
| --- | --- | --- | --- | --- | ---: | ---: | --- |
""" + "\n".join(rows) + "\n"
    if failed:
        text += "\nNot exported (reason):\n" + "\n".join(failed) + "\n"
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--out", help="output folder (default: models/tiny for tiny, required for bench)")
    ap.add_argument("--only", nargs="+", choices=sorted(ARCHS), help="architectures to export")
    ap.add_argument("--exporters", nargs="+", choices=EXPORTERS, default=list(EXPORTERS))
    ap.add_argument("--optimum-python", default="/work/venv-optimum/bin/python",
                    help="interpreter with optimum-onnx (transformers < 4.58) for the optimum exporter")
    ap.add_argument("--optimum-stage", choices=sorted(ARCHS), help=argparse.SUPPRESS)
    ap.add_argument("--kv", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.optimum_stage:
        return optimum_stage(args.optimum_stage, args.size, args.kv, args.out)
    out = args.out or (os.path.join(REPO, "models", "tiny") if args.size == "tiny" else None)
    if out is None:
        ap.error("--out is required with --size bench")

    import onnx
    import onnxruntime
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(out, exist_ok=True)
    mpath = os.path.join(out, "manifest.json")
    manifest = {"models": {}}
    if os.path.exists(mpath):
        with open(mpath) as f:
            manifest = json.load(f)
    manifest["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    manifest["export_shape"], manifest["check_shape"] = EXPORT_SHAPE, CHECK_SHAPE
    work = tempfile.mkdtemp(prefix="export_transformers_")
    try:
        for arch in args.only or list(ARCHS):
            model = build(arch, args.size)
            params = sum(p.numel() for p in (model.get_encoder() if arch == "whisper" else model).parameters())
            for kv in (False, True) if arch in DECODERS else (False,):
                for exporter in args.exporters:
                    name = f"{arch}_{exporter}" + ("_kv" if kv else "")
                    path = os.path.join(out, name + ".onnx")
                    entry = {"architecture": arch, "description": ARCHS[arch][3], "exporter": exporter,
                             "kv_cache": kv, "params": params, "config": CONFIGS[args.size][arch]}
                    print(f"{name}: exporting ...", flush=True)
                    t0 = time.perf_counter()
                    for stale in (path, path + ".data"):
                        if os.path.exists(stale):
                            os.remove(stale)
                    ref_model = model
                    try:
                        if exporter == "optimum":
                            stage = export_optimum(arch, args.size, kv, path, args.optimum_python, work)
                            entry["optimum"] = {k: stage[k] for k in ("command", "versions")}
                            manifest["versions"]["optimum"] = (
                                f"optimum {stage['versions']['optimum']}, transformers {stage['versions']['transformers']}")
                            # the reference is the very weights optimum exported (saved under transformers 4.5x)
                            ref_model = getattr(transformers, ARCHS[arch][1]).from_pretrained(stage["hf_dir"]).eval()
                        else:
                            entry.update(export_torch(arch, model, kv, path, exporter == "dynamo",
                                                      external_data=args.size != "tiny"))
                        entry["export_ok"] = True
                    except Exception as exc:  # noqa: BLE001 - recorded
                        entry.update(export_ok=False, **failure(exc, "export_error"))
                        print(f"{name}: EXPORT FAILED {entry['export_error'][:400]}", flush=True)
                    entry["export_s"] = round(time.perf_counter() - t0, 1)
                    if entry["export_ok"]:
                        entry["describe"] = describe(path)
                        entry.update(check(path, arch, ref_model, kv))
                        print(f"{name}: {entry['describe']['bytes']:,} bytes, ort={entry['ort_ok']} "
                              f"torch-match={entry.get('matches_torch')} {entry.get('ort_error', '')[:300]}",
                              flush=True)
                    manifest["models"][name] = entry
                    write_json(mpath, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.size == "tiny":
        readme(out, manifest)
    ok = [n for n, e in manifest["models"].items() if e.get("ort_ok") and e.get("matches_torch")]
    print(f"{len(ok)}/{len(manifest['models'])} exported, run at batch 2 and matched torch; manifest: {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
