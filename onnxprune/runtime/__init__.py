"""The one place models are run: a small runner interface, onnxruntime (any execution providers,
any session options) and OpenVINO behind it. No module outside this package imports a runtime.

    with runtime.use(runtime.Target(providers=["CPUExecutionProvider"],
                                    options={"intra_op_num_threads": 1})):
        result = onnxprune.prune("model.onnx")     # every session it opens gets these

A :class:`Target` says where models run; :func:`use` makes it current for a block, so the
sessions that calibration, scoring, reconstruction, verification, fine-tuning and measurement
open deep inside the pipeline all get it without passing it down. Each session opened is
counted under its role and the providers and options it really got (read back from it):
``Target.to_json()`` is the report's ``runtime`` entry.

Roles: ``compute`` sessions compute (calibration taps, gradients, constant folding) and run in
onnxruntime with the target's providers; ``deployed`` sessions run the model as it will be
deployed (latency, accuracy, verification's check of the pruned model's outputs on the target)
on the target's runtime; ``reference`` sessions are verification's exact check (the pruned model
with its taps and the masked original), always onnxruntime on the CPU, so an accelerator's
different numerics are measured against a fixed reference.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from .. import ir
from ..errors import OnnxPruneError
from . import ort as _ort
from .base import Port, Runner

RUNTIMES = ("onnxruntime", "openvino")
CPU = "CPUExecutionProvider"
ROLES = ("compute", "deployed", "reference")


@dataclass
class Target:
    """Where models run: a runtime, onnxruntime's execution providers and session options, and the
    OpenVINO device. ``opened`` counts the sessions opened under it (see :meth:`to_json`)."""

    runtime: str = "onnxruntime"
    providers: Sequence[str] = (CPU,)
    options: Mapping[str, object] = field(default_factory=dict)
    device: str = "CPU"
    opened: Counter = field(default_factory=Counter, repr=False, compare=False)
    outer: "Target | None" = field(default=None, repr=False, compare=False)  # also counts what this one opens

    def __post_init__(self):
        self.providers = tuple(self.providers or (CPU,))
        self.options = dict(self.options or {})

    def check(self) -> "Target":
        """Raise :class:`OnnxPruneError` (one line, listing what is available) for a bad setting."""
        if self.runtime not in RUNTIMES:
            raise OnnxPruneError(f"--runtime {self.runtime}: expected one of {', '.join(RUNTIMES)}")
        _ort.check_providers(self.providers)
        _ort.check_options(self.options)
        if self.runtime == "openvino":
            from . import openvino as _ov
            _ov.check(self.device)
        return self

    @property
    def cpu_only(self) -> bool:
        return self.runtime == "onnxruntime" and self.providers == (CPU,)

    def record(self, role: str, runner: Runner) -> None:
        if isinstance(runner, _ort.OrtRunner):
            seen = runner.observed(list(self.options))
            key = (role, "onnxruntime", tuple(runner.providers), tuple(sorted((k, str(v)) for k, v in seen.items())))
        else:
            key = (role, runner.runtime, (runner.device,), (("threads", str(runner.threads)),))
        t = self
        while t is not None:
            t.opened[key] += 1
            t = t.outer

    def to_json(self) -> dict:
        """The settings asked for and, per role, the sessions opened with what each really got."""
        return {"runtime": self.runtime, "providers": list(self.providers),
                "session_options": {k: str(v) for k, v in self.options.items()},
                "device": self.device if self.runtime == "openvino" else None,
                "sessions": [{"role": role, "runtime": rt, "providers": list(prov), "options": dict(opts),
                              "count": n} for (role, rt, prov, opts), n in sorted(self.opened.items())]}


_current: contextvars.ContextVar[Target] = contextvars.ContextVar("onnxprune_target", default=Target())


def current() -> Target:
    return _current.get()


@contextlib.contextmanager
def use(target: Target | None = None, **settings) -> Iterator[Target]:
    """Make ``target`` (or ``Target(**settings)``) the current one inside the block; checked first."""
    t = (target or Target(**settings)).check()
    token = _current.set(t)
    try:
        yield t
    finally:
        _current.reset(token)


def session(proto: onnx.ModelProto | bytes | str, *, role: str = "compute", threads: int | None = None,
            optimize: bool = True, sequential: bool = True, weights: onnx.ModelProto | None = None,
            spinning: bool = True, layout: bool = True, external_dir: str | None = None) -> Runner:
    """A runner for ``proto`` (a model, one serialized, or a path) on the current target, in ``role``.

    ``optimize=False`` keeps every tensor name intact. ``external_dir``: where a serialized model's
    external data files are. ``layout=False`` skips onnxruntime's layout transforms (NCHWc), which
    can drop a tensor exposed as an extra graph output (onnxruntime 1.32) and then fail to load it.
    ``spinning=False`` stops idle worker threads from busy-waiting, so two sessions timed in turn
    (interleaved benchmarks) do not steal each other's cores. ``weights``: a model whose
    initializers fill in those ``proto`` reads but lacks (a weight-free variant of a large model
    shares the original's weights, never a copy); models over 2 GB, and those, go through a
    temporary file with external data.
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r}")
    t = current()
    if role == "deployed" and t.runtime == "openvino":
        from . import openvino as _ov
        runner = _ov.load(proto, t.device, threads=threads, weights=weights, external_dir=external_dir)
    else:
        providers = (CPU,) if role == "reference" else t.providers
        runner = _ort.load(proto, providers, t.options, threads=threads, optimize=optimize, sequential=sequential,
                           weights=weights, spinning=spinning, layout=layout, external_dir=external_dir)
    t.record(role, runner)
    return runner


def tapped(proto: onnx.ModelProto, names: Iterable[str], types: dict[str, onnx.TypeProto] | None = None,
           ) -> Runner:
    """A compute runner for ``proto`` with ``names`` as extra outputs, graph optimisations off so they survive."""
    return session(with_outputs(proto, names, types), optimize=False)


def quantize(proto: onnx.ModelProto, feeds, *, dynamic: bool = False, per_channel: bool = True):
    """INT8 through onnxruntime's quantizer (see :mod:`onnxprune.runtime.quantize`), calibrating on the
    current target's providers."""
    from .quantize import quantize as _quantize

    return _quantize(proto, feeds, dynamic=dynamic, per_channel=per_channel, providers=list(current().providers))


def version() -> str:
    """onnxruntime's version."""
    return _ort.ort.__version__


def available_providers() -> list[str]:
    return _ort.available_providers()


def tensor_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Type of every tensor ONNX shape inference can type."""
    types = {}
    for name, (_, elem) in ir.infer(proto).items():
        t = onnx.TypeProto()
        t.tensor_type.elem_type = elem
        types[name] = t
    return types


def with_outputs(proto: onnx.ModelProto, names: Iterable[str], types: dict[str, onnx.TypeProto] | None = None
                 ) -> onnx.ModelProto:
    """A copy of ``proto`` that also outputs the named intermediate tensors."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    types = types if types is not None else tensor_types(proto)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n in have:
            continue
        vi = m.graph.output.add()
        vi.name = n
        if n in types:
            vi.type.tensor_type.elem_type = types[n].tensor_type.elem_type
        have.add(n)
    return m


def run(runner: Runner, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    names = outputs or [o.name for o in runner.outputs]
    return dict(zip(names, runner.run(names, feed)))


def run_batches(runner: Runner, batches: Iterable[dict[str, np.ndarray]],
                outputs: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    for feed in batches:
        yield run(runner, feed, outputs)


__all__ = ["Target", "Runner", "Port", "use", "current", "session", "tapped", "run", "run_batches",
           "with_outputs", "tensor_types", "available_providers", "RUNTIMES"]
