"""Argument groups shared by several subcommands, defined once."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from .. import ir
from ..ir import safety
from ..errors import OnnxPruneError
from ..data.images import ImagePath, is_image_path


def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="path to an .onnx model (external data next to it is read too)")


def add_input_shapes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                        help="concrete shape for an input with symbolic dimensions (repeatable), or DIM=N "
                             "for a named symbolic dimension in every input (e.g. past_sequence_length=0: an "
                             "empty KV cache); symbolic dimensions otherwise default to 1")


def add_json(parser: argparse.ArgumentParser, what: str = "results") -> None:
    parser.add_argument("--json", metavar="PATH", help=f"also write the {what} as JSON to PATH")


def add_output(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("-o", "--output", required=required, metavar="OUT",
                        help="where to write the new .onnx" + ("" if required else " (required unless --dry-run)"))


def add_selection(p: argparse.ArgumentParser) -> None:
    """Which weight tensors a weight compression (``sparsify``, ``share``) touches."""
    from ..compress.sparsity import MIN_SIZE

    p.add_argument("--ignore", action="append", default=[], metavar="NAME",
                   help="leave this layer (node name) or weight tensor alone (repeatable)")
    p.add_argument("--min-size", type=int, default=MIN_SIZE, metavar="N",
                   help=f"skip weight tensors with fewer elements (default {MIN_SIZE}; 0 = all)")


def add_fidelity_report(p: argparse.ArgumentParser, what: str) -> None:
    """``--data`` to measure a compressed model against its original on, and where the report goes."""
    p.add_argument("--data", metavar="DATA", help="data to measure fidelity (and accuracy, with labels) on: "
                                                  ".npz, image folder or 'random'")
    add_input_shapes(p)
    add_json(p, what)
    add_images(p)


def add_training(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The fine-tuning options; ``prefix`` (e.g. ``finetune-``) namespaces them inside other commands."""
    from ..train import finetune as ft

    d = ft.FinetuneConfig()
    g = p.add_argument_group("fine-tuning (with --finetune-steps)" if prefix else "training")
    if not prefix:
        g.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    g.add_argument(f"--{prefix}lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    g.add_argument(f"--{prefix}batch", type=int, default=d.batch_size, help=f"batch size (default {d.batch_size})")
    g.add_argument(f"--{prefix}alpha", type=float, default=d.alpha,
                   help=f"weight of distillation against labels, in [0, 1] (default {d.alpha})")
    g.add_argument(f"--{prefix}temperature", type=float, default=d.temperature,
                   help=f"softmax temperature of the distillation loss (default {d.temperature})")
    g.add_argument(f"--{prefix}optimizer", default=d.optimizer, choices=ft.OPTIMIZERS, help="default adam")
    g.add_argument(f"--{prefix}weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay")
    g.add_argument(f"--{prefix}schedule", default=d.schedule, choices=ft.SCHEDULES,
                   help="learning rate schedule (default cosine decay to 0)")
    g.add_argument(f"--{prefix}holdout", type=float, default=d.holdout,
                   help=f"fraction of the data held out to pick the best checkpoint (default {d.holdout})")
    g.add_argument(f"--{prefix}eval-every", type=int, default=d.eval_every,
                   help=f"evaluate the held-out part every N steps (default {d.eval_every})")
    g.add_argument(f"--{prefix}seed", type=int, default=d.seed, help="shuffling seed")


def training_config(args: argparse.Namespace, steps: int, prefix: str = ""):
    """The :class:`~onnxprune.train.finetune.FinetuneConfig` that :func:`add_training`'s options give."""
    from ..train import finetune as ft

    def get(name):
        return getattr(args, (prefix + name).replace("-", "_"))
    cfg = ft.FinetuneConfig(steps=steps, lr=get("lr"), batch_size=get("batch"), alpha=get("alpha"),
                            temperature=get("temperature"), optimizer=get("optimizer"),
                            weight_decay=get("weight-decay"), schedule=get("schedule"), holdout=get("holdout"),
                            eval_every=get("eval-every"), seed=get("seed"))
    cfg.check(prefix)
    return cfg


IMAGE_FLAGS = {"image_size": "--image-size", "resize": "--resize", "mean": "--mean", "std": "--std",
               "channel_order": "--channel-order", "layout": "--layout"}


def add_images(parser: argparse.ArgumentParser) -> None:
    """How an image folder given as data (``--calib DIR``, ``--data DIR``) is decoded."""
    g = parser.add_argument_group("image folders (a folder of PNG/JPEG as DATA; needs onnxprune[images])")
    g.add_argument("--image-size", metavar="N|HxW", help="height and width fed to the model (default: the "
                                                         "model's input size)")
    g.add_argument("--resize", type=int, metavar="N", help="resize the shorter side to N, then center-crop "
                                                           "to --image-size (default: resize straight to it)")
    g.add_argument("--mean", metavar="M[,M,M]|imagenet", help="subtracted from pixels scaled to [0, 1] "
                                                              "(per channel; default 0)")
    g.add_argument("--std", metavar="S[,S,S]|imagenet", help="then divided by (per channel; default 1)")
    g.add_argument("--channel-order", choices=["RGB", "BGR"], help="default RGB")
    g.add_argument("--layout", choices=["NCHW", "NHWC"], help="default: guessed from the input shape")


def image_data(args: argparse.Namespace, *dests: str) -> None:
    """Turn each folder among ``args.<dest>`` into an ``ImagePath`` carrying the image flags.

    Image flags given without any image folder among the data options are an error (they would
    silently do nothing).
    """
    opts = {"size": args.image_size, "resize": args.resize, "mean": args.mean, "std": args.std,
            "channel_order": args.channel_order or "RGB", "layout": args.layout}
    found = False
    for dest in dests:
        value = getattr(args, dest, None)
        if value and value != "random" and is_image_path(value):
            setattr(args, dest, ImagePath(value, **opts))
            found = True
    given = [flag for key, flag in IMAGE_FLAGS.items() if getattr(args, key) is not None]
    if given and not found:
        names = "/".join("--" + d.replace("_", "-") for d in dests)
        raise OnnxPruneError(f"{given[0]} applies to image folders; none of {names} is a folder of images")


def input_shapes(args: argparse.Namespace) -> dict[str, list[int]]:
    return ir.parse_input_shapes(getattr(args, "input_shape", None))


def fraction(name: str, value: str, *, low: float = 0.0, high: float = 1.0, high_open: bool = True) -> float:
    """Parse a number in [low, high) (or [low, high]); bad values become one-line errors."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise OnnxPruneError(f"{name} '{value}': not a number") from None
    if math.isnan(f) or f < low or (f >= high if high_open else f > high):
        rng = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise OnnxPruneError(f"{name} {value}: must be in {rng}")
    return f


MAX_RUNS = 10_000   # timed runs per model: beyond this a benchmark takes hours and measures nothing more


def run_count(name: str, n: int, low: int = 0) -> int:
    """A number of benchmark runs, checked up front: ``low`` to ``MAX_RUNS``."""
    if not low <= n <= MAX_RUNS:
        raise OnnxPruneError(f"{name} {n}: must be from {low} to {MAX_RUNS:,} (runs per model; percentiles settle "
                             "within a few hundred)")
    return n


def name_values(name: str, specs: list[str] | None, **kw) -> dict[str, float]:
    """``["layer=0.5"]`` -> ``{"layer": 0.5}``."""
    out = {}
    for spec in specs or []:
        key, sep, val = spec.rpartition("=")
        if not sep or not key:
            raise OnnxPruneError(f"{name} '{spec}': expected NAME=VALUE")
        out[key] = fraction(name, val, **kw)
    return out


def output_path(args: argparse.Namespace) -> Path:
    """``-o``, checked before the work rather than after it (``ir.save`` checks again)."""
    out = Path(args.output)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise OnnxPruneError(f"-o {out}: is a directory; give a file path such as {out / 'model.onnx'}")
    if not parent.is_dir():
        raise OnnxPruneError(f"-o {out}: folder {parent} does not exist; create it first")
    if out.exists() and Path(args.model).exists() and os.path.samefile(out, args.model):
        raise OnnxPruneError(f"-o {out}: is the input model; choose another output path")
    return out


def json_path(args: argparse.Namespace) -> Path | None:
    """The ``--json`` path, checked before any work is done: its folder must exist and be writable."""
    return writable_file("--json", getattr(args, "json", None))


def writable_file(flag: str, value: str | None) -> Path | None:
    """Check, before any work is done, that a file can be created at ``value`` (None passes).

    The folder must exist and take a new file: a probe file is created and removed, since
    permission bits alone say nothing for root or read-only mounts.
    """
    if not value:
        return None
    p = Path(value)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise OnnxPruneError(f"{flag} {p}: is a directory; give a file path such as {p / 'out'}")
    if not parent.is_dir():
        raise OnnxPruneError(f"{flag} {p}: folder {parent} does not exist; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OnnxPruneError(f"{flag} {p}: folder {parent} is not writable ({e.strerror}); choose another folder") \
            from None
    return p


def add_runtime(parser: argparse.ArgumentParser) -> None:
    """Where models run: onnxruntime's execution providers and session options (every session)."""
    g = parser.add_argument_group("runtime (every session this command opens)")
    g.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime",
                   help="where the model runs as deployed: latency, accuracy and the pruned side of verification "
                        "(default onnxruntime; openvino needs onnxprune[openvino], CPU device, float32); "
                        "calibration, gradients and fine-tuning stay in onnxruntime")
    g.add_argument("--provider", metavar="NAME[,NAME...]",
                   help="onnxruntime execution providers in order of preference, e.g. "
                        "CUDAExecutionProvider,CPUExecutionProvider (default CPUExecutionProvider); "
                        "verification's masked original stays on the CPU")
    g.add_argument("--session-option", action="append", default=[], metavar="KEY=VALUE",
                   help="onnxruntime session option (repeatable): a SessionOptions attribute such as "
                        "intra_op_num_threads=1 or graph_optimization_level=basic, or a dotted config entry")


def target_from(args: argparse.Namespace):
    """The :class:`runtime.Target` the runtime flags ask for, checked (bad names exit 2 with one line)."""
    from .. import runtime

    providers = [p.strip() for p in (args.provider or "").split(",") if p.strip()] or [runtime.CPU]
    opts = {}
    for spec in args.session_option:
        key, sep, val = spec.partition("=")
        if not sep or not key.strip():
            raise OnnxPruneError(f"--session-option '{spec}': expected KEY=VALUE")
        opts[key.strip()] = val.strip()
    return runtime.Target(runtime=getattr(args, "runtime", None) or "onnxruntime", providers=providers,
                          options=opts).check()

# ---------------------------------------------------------------- inputs and outputs never meet

# Which options name files read (``in``; ``model``: an ONNX model, whose external data files are read
# too) and files written (``out``), by destination; an option elsewhere can say so with ``path_role``.
PATH_ROLES = {"model": "model", "reference": "model", "teacher": "model", "calib": "in", "data": "in",
              "finetune_data": "in", "plan": "in", "ratios_from": "in",
              "output": "out", "json": "out", "report": "out", "report_md": "out", "save_plan": "out",
              "plot": "out"}
# Files an output brings along: a model's external data, a Markdown report's plot.
COMPANIONS = {"output": lambda p: [p + ".data"], "report_md": lambda p: [str(Path(p).with_suffix(".channels.png"))]}
EXTERNAL_SCAN_BYTES = 2**28   # models this large are not parsed for external data names before the run


def path_role(action: argparse.Action, role: str) -> argparse.Action:
    """Declare that ``action`` (what ``add_argument`` returned) names a file read (``in``, ``model``)
    or written (``out``), for :func:`check_paths`."""
    action.path_role = role
    return action


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Before any work: every output differs from every input (a model's external data included) and from
    every other output, after resolving symlinks and hard links. ``-`` (standard output) and ``random``
    are not files."""
    inputs: list[tuple[str, str]] = []
    outputs: list[tuple[str, str]] = []
    for action in parser._actions:
        role = getattr(action, "path_role", None) or PATH_ROLES.get(action.dest)
        value = getattr(args, action.dest, None)
        if role is None or not value:
            continue
        label = action.option_strings[0] if action.option_strings else action.dest
        for v in value if isinstance(value, list) else [value]:
            if not isinstance(v, (str, os.PathLike)) or str(v) in ("-", "random"):
                continue
            v = str(v)
            if role == "out":
                outputs.append((label, v))
                outputs += [(f"{label} (its {Path(c).suffix[1:]} file)", c) for c in
                            COMPANIONS.get(action.dest, lambda p: [])(v)]
            else:
                inputs.append((label, v))
                if role == "model":
                    inputs += [(f"{label}'s external data", f) for f in _external_files(v)]
    clash = safety.colliding(inputs, outputs)
    if clash:
        raise OnnxPruneError(clash)


def _external_files(path: str) -> list[str]:
    """The external data files a model names (read from its header; none when unreadable or very large)."""
    try:
        if not os.path.isfile(path) or os.path.getsize(path) >= EXTERNAL_SCAN_BYTES:
            return []
        import onnx
        proto = onnx.load(path, load_external_data=False)
    except Exception:
        return []
    folder = os.path.dirname(path)
    return sorted({os.path.join(folder, loc) for loc in ir.external.locations(proto)})


def add_quantize(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Quantization flags; ``prefix`` for prune's copies (its --calib is shared)."""
    g = p.add_argument_group("quantization" + (" (after pruning, with --quantize int8)" if prefix else ""))
    if prefix:
        g.add_argument("--quantize", choices=["int8"], help="quantize the pruned model to INT8 (static QDQ from "
                                                             "--calib, or --quantize-dynamic); see 'onnxprune quantize'")
    else:
        g.add_argument("--calib", metavar="DATA", help="calibration data for static INT8 (.npz or image folder)")
    g.add_argument(f"--{prefix}dynamic", action="store_true",
                   help="dynamic INT8 (weights only, activations at run time; no data): MatMul-heavy transformers")
    g.add_argument(f"--{prefix}calib-samples", type=int, default=256, metavar="N",
                   help="calibration samples for activation ranges (default 256)")
    g.add_argument(f"--{prefix}per-tensor", action="store_true", help="one weight scale per tensor, not per channel")


def add_ort(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ort", action="store_true",
                   help="also write the ORT format (.ort beside the .onnx, for onnxruntime Mobile and minimal "
                        "builds) with onnxruntime's converter, and check that it loads and matches")
