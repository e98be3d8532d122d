"""Model configs beside the input: the pruned model's folder gets updated copies.

onnxruntime-genai loads a folder (``genai_config.json``, the model, its tokenizer files), and
Hugging Face/optimum exports sit beside a ``config.json``. When such a config is next to the
input model and the output goes to another folder, that folder gets the config with the new
head counts (read from the pruned graph, never guessed) and the folder's other small files
(tokenizer, chat template), so ``onnxruntime_genai.Model(out_dir)`` loads the result. Inputs are
never overwritten; every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx

GENAI = "genai_config.json"
HF = "config.json"
# weights, models and data never ride along: only the folder's small companions (tokenizer, templates)
SKIP_SUFFIXES = (".onnx", ".data", ".onnx_data", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                 ".npz", ".npy", ".gguf", ".tmp", ".ort")
MAX_COMPANION_BYTES = 2**26
ATTENTION = {("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "MultiHeadAttention"),
             ("com.microsoft", "Attention")}
# normalisation op -> input index of its scale: its length is the hidden width
NORM_SCALE = {"SimplifiedLayerNormalization": 1, "LayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2,
              "SkipLayerNormalization": 2}


def heads(proto: onnx.ModelProto) -> dict:
    """Head structure read from the graph: fused attention nodes' attributes, else the KV-cache
    outputs ``present.*`` [batch, kv_heads, length, head_size]. Keys present only when every layer
    agrees; ``mixed`` lists the keys whose layers differ."""
    found: dict[str, set] = {}
    for n in proto.graph.node:
        if (n.domain, n.op_type) not in ATTENTION:
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        found.setdefault("num_attention_heads", set()).add(int(a["num_heads"]))
        found.setdefault("num_key_value_heads", set()).add(int(a.get("kv_num_heads", a["num_heads"])))
    for o in proto.graph.output:
        if o.name.startswith("present"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
            if len(dims) == 4 and dims[1] and dims[3]:
                found.setdefault("kv_from_cache", set()).add(dims[1])
                found.setdefault("head_size", set()).add(dims[3])
    width = hidden_width(proto)
    if width:
        found["hidden_size"] = {width}
    out = {k: next(iter(v)) for k, v in found.items() if len(v) == 1}
    out["mixed"] = sorted(k for k, v in found.items() if len(v) > 1)
    return out


def hidden_width(proto: onnx.ModelProto) -> int | None:
    """Width of the residual stream: the scale of the first normalisation."""
    dims = {t.name: list(t.dims) for t in proto.graph.initializer}
    for n in proto.graph.node:
        i = NORM_SCALE.get(n.op_type)
        if i is not None and i < len(n.input) and len(dims.get(n.input[i], [])) == 1:
            return dims[n.input[i]][0]
    return None


def updates(before: dict, after: dict, config: dict) -> dict:
    """New values for the config keys that pruning changed (names of onnxruntime-genai and HF alike)."""
    new = {}
    for key in ("num_attention_heads", "num_key_value_heads", "hidden_size"):
        if key in after and key in before and after[key] != before[key]:
            new[key] = after[key]
    if after.get("head_size") and before.get("head_size") and after["head_size"] != before["head_size"]:
        new["head_dim" if "head_dim" in config else "head_size"] = after["head_size"]
    # a graph without fused attention: the KV-cache outputs tell the KV heads; query heads follow
    # them when whole KV groups go (GQA) or equal them (multi-head attention)
    if "num_key_value_heads" not in before and "kv_from_cache" in after and "kv_from_cache" in before \
            and after["kv_from_cache"] != before["kv_from_cache"]:
        kv0, kv1 = before["kv_from_cache"], after["kv_from_cache"]
        new["num_key_value_heads"] = kv1
        q0 = config.get("num_attention_heads")
        if isinstance(q0, int) and q0 % kv0 == 0:
            new["num_attention_heads"] = q0 // kv0 * kv1
    return new


def _edit(config: dict, new: dict, genai: bool, model_name: str) -> dict:
    if genai:
        dec = config.setdefault("model", {}).setdefault("decoder", {})
        dec.update(new)
        dec["filename"] = model_name
    else:
        config.update(new)
    return config


def write_beside(original: onnx.ModelProto, pruned: onnx.ModelProto, source: Path | None, out: Path) -> list[str]:
    """Updated ``genai_config.json`` / ``config.json`` and the other companion files from ``source``'s
    folder into ``out``'s; returns one note per thing done or declined (for the report)."""
    if source is None:
        return []
    src_dir, out_dir = Path(source).resolve().parent, Path(out).resolve().parent
    configs = [name for name in (GENAI, HF) if (src_dir / name).is_file()]
    if not configs:
        return []
    if src_dir == out_dir:
        return [f"{', '.join(configs)} not updated: the output is in the input's folder (inputs are never "
                "overwritten); write the pruned model to another folder to get an updated copy"]
    before, after = heads(original), heads(pruned)
    notes = []
    if after["mixed"]:
        notes.append(f"layers differ in {', '.join(after['mixed'])}: a config holds one value, so "
                     f"{', '.join(configs)} was not written (prune with a uniform ratio for a loadable folder)")
        configs = []
    for name in configs:
        try:
            config = json.loads((src_dir / name).read_text())
        except (OSError, ValueError) as e:
            notes.append(f"{name} beside the model is not readable JSON ({e}); not copied")
            continue
        new = updates(before, after, config if name == HF else config.get("model", {}).get("decoder", {}))
        _atomic_write(out_dir / name, (json.dumps(_edit(config, new, name == GENAI, Path(out).name), indent=4)
                                       + "\n").encode())
        said = ", ".join(f"{k} {v}" for k, v in new.items()) or "no head counts changed"
        stale = [k for k in ("intermediate_size",) if k in config]   # not read back from the graph
        notes.append(f"{name} written beside the output ({said})" +
                     (f"; {', '.join(stale)} is the input's (MLP widths are not read back into the config)"
                      if stale else ""))
    copied = _copy_companions(src_dir, out_dir, original, Path(source).name)
    if copied:
        notes.append(f"copied beside the output: {', '.join(copied)}")
    return notes


def _copy_companions(src_dir: Path, out_dir: Path, proto: onnx.ModelProto, model_name: str) -> list[str]:
    external = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    copied = []
    for f in sorted(src_dir.iterdir()):
        if not f.is_file() or f.name in (GENAI, HF, model_name) or f.name in external or f.name.startswith(".") \
                or f.name.lower().endswith(SKIP_SUFFIXES) or f.stat().st_size > MAX_COMPANION_BYTES:
            continue
        target = out_dir / f.name
        if target.exists() and os.path.samefile(target, f):
            continue
        _atomic_write(target, copy_of=f)
        copied.append(f.name)
    return copied


def _atomic_write(path: Path, data: bytes | None = None, *, copy_of: Path | None = None) -> None:
    """``data`` (or a copy of the file ``copy_of``) at ``path``, written to a temporary name and renamed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if copy_of is not None:
            shutil.copyfile(copy_of, tmp)
        else:
            Path(tmp).write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
