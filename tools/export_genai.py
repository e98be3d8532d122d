"""Build onnxruntime-genai model folders (test material; never needed at run time).

    # a genai folder from a local Hugging Face folder (offline), fp32 and int4:
    python tools/export_genai.py --hf /path/to/SmolLM2-hf --out OUT --precision fp32 int4
    # the tiny committed folders: a 2-layer Llama (hidden 64, 4 heads, 2 KV heads, random weights,
    # a 320-token byte-level BPE tokenizer trained here on a few sentences):
    python tools/export_genai.py --tiny --out models/tiny/genai

Each precision lands in OUT/<precision>/ (model.onnx [+ .data], genai_config.json, tokenizer files),
made by ``python -m onnxruntime_genai.models.builder -m HF -i HF -o OUT -p P -e cpu`` with the hub
offline. Needs torch, transformers 5.x, onnxruntime-genai, onnx-ir and onnxscript (/work/venv-tools).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Structured pruning removes whole channels, heads and filters from a network.",
    "onnxruntime runs the pruned model; the cache holds keys and values of earlier tokens.",
    "A small model for tests: two layers, four heads, two key-value heads, random weights.",
    "Once upon a time there was a little model that wanted to be smaller and faster.",
]


def tiny_hf(out: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with random weights and a small trained tokenizer, saved as an HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                      pad_token_id=fast.pad_token_id, tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def build(hf: Path, out: Path, precision: str) -> Path:
    """Run onnxruntime-genai's builder offline; returns the folder it wrote."""
    dest = out / precision
    dest.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as cache:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-i", str(hf),
               "-o", str(dest), "-p", precision, "-e", "cpu", "-c", cache]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", type=Path, help="a local Hugging Face model folder")
    src.add_argument("--tiny", action="store_true", help="make the tiny random Llama first")
    ap.add_argument("--out", type=Path, required=True, help="folder for <precision>/ subfolders")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "fp16", "int4"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hf = args.hf if args.hf else tiny_hf(Path(tmp) / "hf")
        for p in args.precision:
            print(build(hf.resolve(), args.out.resolve(), p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
