"""Show what a model is made of: inputs and outputs, every weight layer with its params and MACs, totals.

MACs are exact multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul
(including MatMuls between two activations, shown with weight "-"), computed
from concrete shapes: symbolic input dimensions are 1 unless --input-shape
gives them. Params count every floating-point constant tensor once.

Example:  onnxprune inspect model.onnx --input-shape input=8x3x224x224 --json stats.json
"""

from __future__ import annotations

import argparse

from rich.markup import escape

from .. import ir
from ..measure import counts
from . import fmt, options


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="params, MACs and layers of a model", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p)
    options.add_input_shapes(p)
    options.add_json(p, "summary")
    options.add_runtime(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = options.input_shapes(args)
    json_path = options.json_path(args)
    model = ir.load(args.model)
    shapes = ir.resolve_input_shapes(model.proto, overrides)
    report = counts.describe(model, shapes)
    show(report)
    hint_defaulted_dims(report["inputs"], overrides)
    if json_path:
        fmt.write_json(json_path, report)
    return 0


def hint_defaulted_dims(inputs: list[dict], overrides: dict[str, list[int]]) -> None:
    """Symbolic sizes other than the batch were taken as 1: MACs then mean little, so say so on stderr."""
    for i in inputs:
        if i["name"] not in overrides and any((not isinstance(d, int) or d <= 0) and d not in overrides
                                              for d in i["shape"][1:]):   # a named dimension given is bound
            spec = "x".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in i["shape"])
            fmt.err.print(f"note: {i['name']} has symbolic sizes, analysed as 1; "
                          f"pass --input-shape {i['name']}={spec} with real sizes for meaningful MACs",
                          markup=False, soft_wrap=True)


def _dims(dims: list) -> str:
    return "x".join("?" if d is None else str(d) for d in dims) if dims else "scalar"


def show(r: dict) -> None:
    out = fmt.out
    out.print(f"[bold]{escape(r['file'])}[/bold]  {fmt.human_bytes(r['file_bytes'])}  opset {r['opset']}  "
              f"IR v{r['ir_version']}  producer {r['producer'] or 'unknown'}", markup=True, soft_wrap=True)
    for i in r["inputs"]:
        given = "" if i["shape"] == i["analysed_shape"] else f" (analysed as {_dims(i['analysed_shape'])})"
        out.print(f"input   {i['name']}: {i['dtype']} {_dims(i['shape'])}{given}", markup=False)
    for o in r["outputs"]:
        out.print(f"output  {o['name']}: {o['dtype']} {_dims(o['shape'])}", markup=False)
    rows = [(lay["name"], lay["op"], _dims(lay["weight_shape"]) if lay["weight"] else "-",
             f"{lay['params']:,}", f"{lay['macs']:,}", _dims(lay["output_shape"])) for lay in r["layers"]]
    fmt.table(None, ["layer", "op", "weight", "params", "MACs", "output"], rows, right=(3, 4))
    out.print(f"params {_count(r['params'])}   MACs {_count(r['macs'])}   "
              f"file {r['file_bytes']:,} bytes ({fmt.human_bytes(r['file_bytes'])})", markup=False)


def _count(n: int) -> str:
    """``12,345 (12.35K)``: exact first, the short form only where it is shorter."""
    return f"{n:,} ({fmt.human_count(n)})" if n >= 1000 else f"{n:,}"
