#!/usr/bin/env python3
"""Prune every zoo and real model at one ratio and tabulate what the engine could do.

Each model goes through the real command line, ``onnxprune prune MODEL -o OUT
--ratio R --round-to N --report R.json``, in its own subprocess with a timeout, so a crash or
a hang costs one row, not the run. The row records the groups found, pruned and
frozen (with the two most common reasons for freezing), the parameters and MACs
kept, whether the result was verified against the masked original, the worst
relative error, and the wall time of the whole command. The saved model is
checked with ``onnx.checker`` and then deleted.

Results go to ``--json`` (merged by model name, so ``--only`` refreshes a few
rows) and the table between the markers of ``--out``::

    python tools/bench_coverage.py --out docs/coverage.md
    python tools/bench_coverage.py --only resnet50 --only pnet

``--transformers`` runs the transformer exports instead (models/tiny, and the bigger material
and dynamic-batch zoo CNNs under ``--material`` when present) and writes the section "Heads, KV
heads and FFN" of docs/transformers.md: per model and exporter, which structures shrank, how much of
the attention and MLP weights is kept, and why anything froze::

    python tools/bench_coverage.py --transformers
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # onnxprune.testing, when the package is not installed
ZOO = Path("/work/zoo")
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"

# Shapes for the real models' symbolic inputs, as their packages feed them (models/real/README.md).
REAL_SHAPES: dict[str, list[str]] = {
    "nmp": ["serving_default_input_2:0=1x43844x1"],
    "ch_PP-OCRv4_det_infer": ["x=1x3x736x736"],
    "ch_PP-OCRv4_rec_infer": ["x=1x3x48x320"],
    "ch_ppocr_mobile_v2.0_cls_infer": ["x=1x3x48x192"],
    "pnet": ["input_1=1x64x64x3"],
    "silero_vad_16k_op15": ["input=1x576", "state=2x1x128"],
}
# Not plain convolutional networks: attention, or a LayerNorm over channels on the residual stream.
NOT_CNN = {"vit_b_16", "swin_t", "maxvit_t", "convnext_tiny", "timm_deit_tiny_patch16_224", "timm_convnext_atto",
           "timm_convnext_nano", "timm_mobilevit_xs", "timm_efficientformer_l1", "timm_levit_128s",
           "timm_poolformer_s12", "nmp", "silero_vad_16k_op15", "ch_PP-OCRv4_rec_infer"}


@dataclass
class Case:
    name: str
    path: Path
    source: str
    shapes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "other" if self.name in NOT_CNN else "cnn"


def _producer(path: Path, provenance: dict[str, dict]) -> str:
    p = provenance.get(path.name, {})
    prod = p.get("producer_name") or ""
    if prod == "PaddlePaddle" or "pd_op" in json.dumps(p.get("outputs", "")) or p.get("package", "").startswith(
            ("rapid", "paddle")):
        return "paddle2onnx"
    return prod or "?"


def discover(zoo: Path, real_dirs: list[Path]) -> list[Case]:
    """Zoo exports in manifest order, then the real models (first folder wins for a file name)."""
    cases: list[Case] = []
    manifest = zoo / "manifest.json"
    names = list(json.loads(manifest.read_text())["models"]) if manifest.exists() else []
    names += sorted(p.stem for p in zoo.glob("*.onnx") if p.stem not in names)
    for n in names:
        if (zoo / f"{n}.onnx").exists():
            cases.append(Case(n, zoo / f"{n}.onnx", "timm" if n.startswith("timm_") else "torchvision"))
    seen: set[str] = set()
    for d in real_dirs:
        prov_file = d / "provenance.json"
        prov = {p["file"]: p for p in json.loads(prov_file.read_text())} if prov_file.exists() else {}
        for path in sorted(d.glob("*.onnx")):
            if path.name not in seen:
                seen.add(path.name)
                cases.append(Case(path.stem, path, _producer(path, prov), REAL_SHAPES.get(path.stem, [])))
    return cases


def short_reason(reason: str) -> str:
    """'LayerNormalization '/blk/ln': normalizes over ...' -> 'LayerNormalization: normalizes over ...'."""
    s = re.sub(r"\s*'[^']*'", "", reason)
    s = re.sub(r"\s+:", ":", s).split(", so ")[0]
    s = re.sub(r"^(\w+): \1 ", r"\1: ", s)
    return s if len(s) <= 80 else s[:79] + "…"


def top_reasons(report: dict, n: int = 2) -> list[tuple[str, int]]:
    """The most common (shortened) first reasons among frozen groups with more than one channel."""
    count: collections.Counter[str] = collections.Counter()
    for fz in report.get("frozen", []):
        for r in {short_reason(x) for x in fz["reasons"][:1]}:
            count[r] += 1
    return count.most_common(n)


def _loadavg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def _check_saved(path: Path) -> str:
    import onnx
    try:
        onnx.checker.check_model(str(path))
        return ""
    except Exception as e:  # noqa: BLE001 - any checker failure is a row, not a crash
        return f"saved model fails onnx.checker: {str(e).splitlines()[0][:200]}"


def run_case(case: Case, ratio: float, timeout: float, workdir: Path, round_to: int = 1) -> dict:
    out, rep_path = workdir / f"{case.name}.pruned.onnx", workdir / f"{case.name}.report.json"
    cmd = [sys.executable, "-m", "onnxprune", "prune", str(case.path), "-o", str(out), "--ratio", str(ratio),
           "--round-to", str(round_to), "--report", str(rep_path)]
    for s in case.shapes:
        cmd += ["--input-shape", s]
    row: dict = {"model": case.name, "source": case.source, "kind": case.kind, "path": str(case.path),
                 "input_shapes": case.shapes, "ratio": ratio, "round_to": round_to, "load_before": _loadavg()}
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, "COLUMNS": "120"})
        row["exit_code"] = proc.returncode
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        row["exit_code"], tail = None, [f"timeout after {timeout:.0f} s"]
    row["seconds"] = round(time.perf_counter() - t, 2)
    if row["exit_code"] == 0 and rep_path.exists():
        row.update(_from_report(json.loads(rep_path.read_text())))
        row["error"] = _check_saved(out)
    else:
        row["error"] = " | ".join(tail)[-400:] or f"exit code {row['exit_code']}"
    for p in workdir.glob(f"{case.name}.*"):
        p.unlink()
    return row


def _from_report(rep: dict) -> dict:
    ver = rep.get("verification") or {}
    outs = ver.get("outputs", [])
    # relative to the largest reference value, over tensors that are not all ~0 (those pass on atol)
    worst = max((o["max_abs"] / o["scale"] for o in outs if o["scale"] >= 1e-2), default=None)
    used = max((o["max_abs"] / o["tolerance"] for o in outs if o["tolerance"]), default=None)
    return {"groups_found": rep["groups_found"], "groups_pruned": rep["groups_pruned"],
            "groups_frozen": rep["groups_frozen"], "params_before": rep["params_before"],
            "params_after": rep["params_after"], "macs_before": rep["macs_before"], "macs_after": rep["macs_after"],
            "params_kept": rep["params_after"] / rep["params_before"] if rep["params_before"] else None,
            "macs_kept": rep["macs_after"] / rep["macs_before"] if rep["macs_before"] else None,
            "verified": bool(rep["verified"]), "worst_rel_error": worst, "tolerance_used": used,
            "compared_tensors": len(outs), "steps": rep.get("seconds", {}),
            "top_frozen": top_reasons(rep), "barriers": collections.Counter(
                f"{b['op']}: {b['reason']}" for b in rep.get("barriers", [])).most_common(3)}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def table(rows: list[dict]) -> str:
    head = ["model", "source", "found", "pruned", "frozen", "top frozen reasons", "params kept", "MACs kept",
            "verified", "worst rel. err", "s"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        if r.get("groups_found") is None:
            lines.append(f"| {r['model']} | {r['source']} | | | | **failed**: {_cell(r['error'])} | | | no | | "
                         f"{r['seconds']:.1f} |")
            continue
        reasons = "; ".join(f"{_cell(t)} ×{c}" for t, c in r["top_frozen"]) or "—"
        flag = " ⚠" if r["kind"] == "cnn" and (r["params_kept"] or 0) > 0.6 else ""
        ok = "yes" if r["verified"] and not r["error"] else f"**no** {_cell(r['error'])}"
        err = "—" if r["worst_rel_error"] is None else f"{r['worst_rel_error']:.1e}"
        lines.append(f"| {r['model']} | {r['source']} | {r['groups_found']} | {r['groups_pruned']} | "
                     f"{r['groups_frozen']} | {reasons} | {_pct(r['params_kept'])}{flag} | {_pct(r['macs_kept'])} | "
                     f"{ok} | {err} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def _cell(s: str) -> str:
    return s.replace("|", "/").replace("\n", " ")


def machine() -> dict:
    import onnx
    import onnxruntime
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}


def summary(result: dict) -> str:
    rows = result["rows"]
    ok = [r for r in rows if r.get("verified") and not r.get("error")]
    cnn = [r for r in ok if r["kind"] == "cnn"]
    m = result["machine"]
    over = [r["model"] for r in cnn if r["params_kept"] > 0.6]
    loads = [r["load_before"] for r in rows if r.get("load_before", -1) >= 0] or [0.0]
    return "\n".join([
        f"Ratio {result['ratio']}, exact (`--round-to {result.get('round_to', 1)}`), default criterion (l2), "
        f"random verification batches. "
        f"{len(ok)}/{len(rows)} models pruned, valid and verified; {len(cnn) - len(over)}/{len(cnn)} CNNs keep "
        f"≤ 60% of their parameters (⚠ marks the others). Machine: {m['cpu']}, {m['cores']} cores, no GPU, "
        f"Python {m['python']}, onnxruntime {m['onnxruntime']}, onnx {m['onnx']}; {m['date']}. The machine was "
        f"shared: the 1-minute load average was {min(loads):.1f}–{max(loads):.1f} when the models started "
        f"(`load_before` in the JSON), so the seconds, wall time of the whole `onnxprune prune` command, are "
        f"several times what an idle machine gives.", ""])


def write_doc(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace what is between the ``begin`` and ``end`` markers of ``path`` (appended if missing)."""
    text = path.read_text() if path.exists() else "# Coverage\n"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < 0:
        text = text.rstrip() + "\n\n" + begin + "\n" + end + "\n"
        i, j = text.find(begin), text.find(end)
    path.write_text(text[:i + len(begin)] + "\n" + section + "\n" + text[j:])


# ---------------------------------------------------------------- transformers (docs/transformers.md)

T_BEGIN, T_END = "<!-- heads:begin -->", "<!-- heads:end -->"
SEQ, PAST = 8, 4


def transformer_shapes(path: Path, image: int = 32) -> list[str]:
    """--input-shape flags with consistent sizes: batch 1, sequence 8, past 4 (masks cover past + sequence)."""
    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    past = any(i.name.startswith("past_key_values") for i in proto.graph.input)
    flags = []
    for vi in proto.graph.input:
        dims = [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
        if vi.name == "pixel_values":
            shape = [1, 3, image, image]
        elif vi.name.startswith("past_key_values"):
            shape = [1, dims[1], PAST, dims[3]]
        elif vi.name == "attention_mask":
            shape = [1, SEQ + PAST if past else SEQ]
        elif vi.name in ("input_ids", "position_ids", "token_type_ids"):
            shape = [1, SEQ]
        else:
            continue
        flags.append(f"{vi.name}={'x'.join(map(str, shape))}")
    return flags


def projections(path: Path, skip: set[str] | None = None) -> dict[str, int]:
    """Size of every attention/MLP weight (``onnxprune.testing.projections``) by node name."""
    import onnx

    from onnxprune.testing import projections as proj
    proto = onnx.load(str(path), load_external_data=False)
    return {k: w[0] * w[1] for k, w in proj.projections(proto, skip).items()}


def head_layers(path: Path) -> set[str]:
    import onnx

    from onnxprune.testing import projections as proj
    return proj.heads(onnx.load(str(path), load_external_data=False))


def transformer_cases(tiny: Path, material: Path) -> list[tuple[str, str, Path, list[str]]]:
    """(name, family, path, extra flags)."""
    cases = []
    manifest = tiny / "manifest.json"
    models = json.loads(manifest.read_text())["models"] if manifest.exists() else {}
    for name, m in models.items():
        path = tiny / f"{name}.onnx"
        if path.exists():
            image = (m.get("config") or {}).get("image_size", 32)
            flags = transformer_shapes(path, image) + (["--kv-cache"] if m.get("kv_cache") else [])
            cases.append((name, "tiny " + m.get("architecture", "?"), path, flags))
    bench = material / "bench" / "manifest.json"   # the sizes: Llama 512 x 6, 8 heads, 2 KV heads
    for name, m in (json.loads(bench.read_text())["models"] if bench.exists() else {}).items():
        path = bench.parent / f"{name}.onnx"
        if path.exists():
            image = (m.get("config") or {}).get("image_size", 224)
            flags = transformer_shapes(path, image) + (["--kv-cache"] if m.get("kv_cache") else [])
            cases.append((f"{name} (bench)", "bench " + m.get("architecture", "?"), path, flags))
    for name in ("minilm_legacy", "minilm_dynamo"):
        path = material / "minilm" / f"{name}.onnx"
        if path.exists():
            cases.append((name, "MiniLM-L6 (22.7M)", path,
                          [f"{i}=1x128" for i in ("input_ids", "attention_mask", "token_type_ids")]))
    for kind in ("static", "dynamic"):
        for path in sorted((material / "zoo" / kind).glob("*.onnx")):
            cases.append((f"{path.stem} ({kind})", "zoo CNN", path, []))
    return cases


def run_transformer(name: str, path: Path, flags: list[str], ratio: float, timeout: float, work: Path) -> dict:
    safe = re.sub(r"[^\w.-]", "_", name)
    out, rep_path = work / f"{safe}.onnx", work / f"{safe}.json"
    cmd = [sys.executable, "-m", "onnxprune", "prune", str(path), "-o", str(out), "--ratio", str(ratio),
           "--round-to", "1", "--report", str(rep_path)]
    for f in flags:
        cmd += ["--kv-cache"] if f == "--kv-cache" else ["--input-shape", f]
    row: dict = {"model": name, "path": str(path), "flags": flags, "load_before": _loadavg()}
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        row["exit_code"], tail = proc.returncode, (proc.stderr or proc.stdout).strip().splitlines()[-2:]
    except subprocess.TimeoutExpired:
        row["exit_code"], tail = None, [f"timeout after {timeout:.0f} s"]
    row["seconds"] = round(time.perf_counter() - t, 1)
    if row["exit_code"] != 0 or not rep_path.exists():
        row["error"] = " | ".join(tail)[-300:]
        return row
    rep = json.loads(rep_path.read_text())
    skip = head_layers(path)
    before, after = projections(path, skip), projections(out, skip)
    row.update({"verified": bool(rep["verified"]), "params_kept": rep["params_after"] / rep["params_before"],
                "attn_mlp_kept": sum(after.get(k, 0) for k in before) / max(1, sum(before.values())),
                "projections": len(before), "shrank": sum(1 for k in before if after.get(k, before[k]) < before[k]),
                "structures": sorted({g.get("structure", "?") for g in rep["groups"] if g["removed_channels"]}),
                "top_frozen": top_reasons(rep), "error": ""})
    for p in (out, rep_path, *work.glob(f"{safe}.onnx*")):
        p.unlink(missing_ok=True)
    return row


def transformer_table(rows: list[dict]) -> str:
    lines = ["| model | family | verified | params kept | attention + MLP kept | projections smaller | "
             "structures pruned | frozen (top reasons) | s |", "| --- | --- | --- | ---: | ---: | ---: | --- | --- | ---: |"]
    for r in rows:
        if r.get("verified") is None:
            lines.append(f"| {r['model']} | {r['family']} | **failed**: {_cell(r.get('error', ''))} | | | | | | "
                         f"{r['seconds']} |")
            continue
        reasons = "; ".join(f"{_cell(t)} ×{c}" for t, c in r["top_frozen"]) or "—"
        cnn = r["family"] == "zoo CNN"
        lines.append(f"| {r['model']}{' (--kv-cache)' if '--kv-cache' in r['flags'] else ''} | {r['family']} | "
                     f"{'yes' if r['verified'] else '**no**'} | {_pct(r['params_kept'])} | "
                     f"{'—' if cnn else _pct(r['attn_mlp_kept'])} | "
                     f"{'—' if cnn else str(r['shrank']) + '/' + str(r['projections'])} | "
                     f"{', '.join(r['structures']) or '—'} | {reasons} | {r['seconds']} |")
    pairs = []
    by = {r["model"]: r for r in rows}
    for name, r in by.items():
        twin = by.get(name.replace("(dynamic)", "(static)"))
        if name.endswith("(dynamic)") and twin and r.get("params_kept") and twin.get("params_kept"):
            pairs.append(f"{name[:-10]} {_pct(twin['params_kept'])} static, {_pct(r['params_kept'])} dynamic "
                         f"({100 * (r['params_kept'] - twin['params_kept']):+.1f} points)")
    if pairs:
        lines += ["", "Dynamic-batch exports against their static twin (weights kept): " + "; ".join(pairs) + "."]
    return "\n".join(lines)


def transformers_main(args) -> None:
    cases = transformer_cases(args.tiny, args.material)
    only = {n for o in args.only for n in o.split(",") if n}
    json_path = args.json or ROOT / "docs" / "transformers.json"
    old = {r["model"]: r for r in json.loads(json_path.read_text()).get("rows", [])} if json_path.exists() else {}
    rows = dict(old) if only or args.render else {}
    order = [c[0] for c in cases]
    result = {"ratio": args.ratio, "machine": machine(), "load_after": _loadavg()}

    def save() -> None:   # after every model, so an interrupted run keeps its rows
        result["rows"] = sorted(rows.values(), key=lambda r: order.index(r["model"]) if r["model"] in order else 999)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    with tempfile.TemporaryDirectory(prefix="onnxprune-heads-") as tmp:
        for name, family, path, flags in ([] if args.render else cases):
            if only and name not in only:
                continue
            print(f"{name} ...", end=" ", file=sys.stderr, flush=True)
            r = run_transformer(name, path, flags, args.ratio, args.timeout, Path(tmp))
            r["family"] = family
            rows[name] = r
            result["load_after"] = _loadavg()
            save()
            print(f"{r['seconds']}s verified {r.get('verified')} attn+mlp {_pct(r.get('attn_mlp_kept'))} "
                  f"{r.get('error', '')[:120]}", file=sys.stderr)
    save()
    m = result["machine"]
    loads = [r["load_before"] for r in result["rows"] if r.get("load_before", -1) >= 0] or [0.0]
    head = (f"`python tools/bench_coverage.py --transformers`: `onnxprune prune --ratio {args.ratio} --round-to 1` "
            f"(default criterion), every model verified against its masked original. Inputs: batch 1, sequence "
            f"{SEQ}, KV cache of {PAST} past positions (`--kv-cache` for the `_kv` exports), MiniLM at 1x128. "
            f"\"Attention + MLP kept\" counts every 2-D MatMul/Gemm weight except the heads (LM head, classifier, "
            f"pooler) and embeddings; \"projections smaller\" how many of those weights lost rows or columns. "
            f"Machine: {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}; {m['date']}; shared "
            f"(1-minute load {min(loads):.1f}–{max(loads):.1f} when models started), so seconds are wall time under load.")
    write_doc(args.transformers_out, head + "\n\n" + transformer_table(result["rows"]), T_BEGIN, T_END)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]",
                   help="run only these models (repeatable, or comma-separated)")
    p.add_argument("--merge", type=Path, action="append", default=[], metavar="JSON",
                   help="take the rows of another run's JSON (e.g. a shard) before running; with no --only "
                        "and --render, run nothing")
    p.add_argument("--render", action="store_true", help="rewrite the table from the JSON without running")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--round-to", type=int, default=1,
                   help="passed to prune (default 1: exact ratios, the same on every machine; the command's own "
                        "default rounds to this CPU's SIMD block)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per model (default 1200)")
    p.add_argument("--zoo", type=Path, default=ZOO)
    p.add_argument("--real", type=Path, action="append", default=None,
                   help="folders of real models (default: models/real and ZOO/real)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "coverage.md")
    p.add_argument("--json", type=Path, default=None, help="default: next to --out, .json")
    p.add_argument("--list", action="store_true", help="list the models and exit")
    p.add_argument("--transformers", action="store_true",
                   help="run the transformer exports and write the 'Heads, KV heads and FFN' section instead")
    p.add_argument("--tiny", type=Path, default=ROOT / "models" / "tiny")
    p.add_argument("--material", type=Path, default=Path("/work/scratch/material"))
    p.add_argument("--transformers-out", type=Path, default=ROOT / "docs" / "transformers.md")
    args = p.parse_args()
    if args.transformers:
        transformers_main(args)
        return
    cases = all_cases = discover(args.zoo, args.real or [ROOT / "models" / "real", args.zoo / "real"])
    only = {n for o in args.only for n in o.split(",") if n}
    if only:
        unknown = only - {c.name for c in cases}
        if unknown:
            sys.exit(f"unknown model(s): {', '.join(sorted(unknown))}; see --list")
        cases = [c for c in cases if c.name in only]
    if args.list:
        for c in cases:
            print(f"{c.name:34s} {c.source:12s} {c.kind:6s} {' '.join(c.shapes)}")
        return
    json_path = args.json or args.out.with_suffix(".json")
    old = json.loads(json_path.read_text()) if json_path.exists() else {}
    same = old.get("ratio") == args.ratio and old.get("round_to", 1) == args.round_to
    rows = {r["model"]: r for r in old.get("rows", [])} if same else {}
    merged = [json.loads(extra.read_text()) for extra in args.merge]
    for m in merged:
        rows.update({r["model"]: r for r in m["rows"]})
    if args.render:
        cases = []
    order = [c.name for c in all_cases]
    meta = next((m for m in [old, *merged] if m.get("machine")), {}) if args.render else {}
    result = {"ratio": args.ratio, "round_to": args.round_to, "machine": meta.get("machine") or machine(),
              "load": meta.get("load") or [_loadavg(), None]}

    def save() -> None:
        result["rows"] = sorted(rows.values(), key=lambda r: order.index(r["model"]) if r["model"] in order
                                else len(order))
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")

    save()
    with tempfile.TemporaryDirectory(prefix="onnxprune-coverage-") as tmp:
        for c in cases:
            print(f"{c.name} ...", end=" ", file=sys.stderr, flush=True)
            r = rows[c.name] = run_case(c, args.ratio, args.timeout, Path(tmp), args.round_to)
            print(f"{r['seconds']:.1f}s params {_pct(r.get('params_kept'))} verified {r.get('verified')} "
                  f"{r['error'][:120]}", file=sys.stderr)
            result["load"][1] = _loadavg()
            save()
    section = summary(result) + "\n" + table(result["rows"])
    write_doc(args.out, section)
    print(section)


if __name__ == "__main__":
    main()
