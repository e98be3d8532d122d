"""File safety through the real CLI: outputs never collide with inputs or each other, temporary files
cannot be hijacked by a planted symlink, and outputs get ordinary permissions.

Each refused case exits 2 with one line before any work, leaves every input byte-for-byte unchanged
and writes nothing.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import GraphBuilder

ROOT = Path(__file__).resolve().parents[1]


def tiny_net() -> onnx.ModelProto:
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 16))
    y = g.relu(g.conv(y, 16))
    g.output(g.gemm(g.flatten(g.gap(y)), 4))
    return g.build()


@pytest.fixture
def work(tmp_path) -> Path:
    """A folder with m.onnx (weights inside), e.onnx + e.onnx.weights (external data), data.npz and a plan."""
    onnx.save(tiny_net(), tmp_path / "m.onnx")
    onnx.save(tiny_net(), tmp_path / "e.onnx", save_as_external_data=True, location="e.onnx.weights",
              size_threshold=0)
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32))
    (tmp_path / "plan.json").write_text('{"groups": {}}')
    (tmp_path / "victim.txt").write_text("precious\n")
    return tmp_path


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.is_symlink()}


# arguments with {w} = the work folder; the words the one-line error must contain
COLLISIONS = {
    "prune --report is the input": ("prune {w}/m.onnx -o {w}/o.onnx --report {w}/m.onnx", "is the input model"),
    "prune --report-md is the input": ("prune {w}/m.onnx -o {w}/o.onnx --report-md {w}/m.onnx", "is the input"),
    "prune --save-plan is the input": ("prune {w}/m.onnx -o {w}/o.onnx --save-plan {w}/m.onnx", "is the input"),
    "prune --save-plan is the --plan": ("prune {w}/m.onnx -o {w}/o.onnx --plan {w}/plan.json "
                                        "--save-plan {w}/plan.json", "is the input --plan"),
    "prune --report is -o": ("prune {w}/m.onnx -o {w}/o.onnx --report {w}/o.onnx", "the same file as -o"),
    "prune --report is the --calib data": ("prune {w}/m.onnx -o {w}/o.onnx --calib {w}/data.npz "
                                           "--report {w}/data.npz", "is the input --calib"),
    "prune -o is the input's external data": ("prune {w}/e.onnx -o {w}/e.onnx.weights", "external data"),
    "prune --report is the input's external data": ("prune {w}/e.onnx -o {w}/o.onnx --report {w}/e.onnx.weights",
                                                    "external data"),
    "prune --report is -o's data file": ("prune {w}/m.onnx -o {w}/o.onnx --report {w}/o.onnx.data",
                                         "the same file as -o"),
    "prune --save-plan is --report-md's plot": ("prune {w}/m.onnx -o {w}/o.onnx --report-md {w}/r.md "
                                                "--save-plan {w}/r.channels.png", "the same file as --report-md"),
    "prune -o through a symlink to the input": ("prune {w}/m.onnx -o {w}/link.onnx", "is the input model"),
    "prune -o a hard link of the input": ("prune {w}/m.onnx -o {w}/hard.onnx", "is the input model"),
    "eval --json is the input": ("eval {w}/m.onnx --data random --json {w}/m.onnx", "is the input model"),
    "eval --json is the reference": ("eval {w}/m.onnx --data random --reference {w}/e.onnx --json {w}/e.onnx",
                                     "is the input --reference"),
    "eval --json is the data": ("eval {w}/m.onnx --data {w}/data.npz --json {w}/data.npz", "is the input --data"),
    "sparsify --json is the input": ("sparsify {w}/m.onnx -o {w}/o.onnx --sparsity 0.5 --json {w}/m.onnx",
                                     "is the input model"),
    "sparsify --json is -o": ("sparsify {w}/m.onnx -o {w}/o.onnx --sparsity 0.5 --json {w}/o.onnx",
                              "the same file as -o"),
    "share --json is the input": ("share {w}/m.onnx -o {w}/o.onnx --json {w}/m.onnx", "is the input model"),
    "inspect --json is the input": ("inspect {w}/m.onnx --json {w}/m.onnx", "is the input model"),
    "bench --json is the reference": ("bench {w}/m.onnx --reference {w}/e.onnx --json {w}/e.onnx", "is the input"),
    "sensitivity --json is the data": ("sensitivity {w}/m.onnx --data {w}/data.npz --json {w}/data.npz",
                                       "is the input --data"),
    "sensitivity --plot is --json": ("sensitivity {w}/m.onnx --data {w}/data.npz --json {w}/s.json "
                                     "--plot {w}/s.json", "the same file as"),
    "finetune -o is the teacher": ("finetune {w}/m.onnx --teacher {w}/e.onnx --data {w}/data.npz -o {w}/e.onnx",
                                   "is the input --teacher"),
    "finetune --json is -o": ("finetune {w}/m.onnx --data {w}/data.npz -o {w}/o.onnx --json {w}/o.onnx",
                              "the same file as -o"),
}


def run(*args, umask: int | None = None) -> subprocess.CompletedProcess:
    def pre():
        if umask is not None:
            os.umask(umask)
    return subprocess.run([sys.executable, "-m", "onnxprune", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, preexec_fn=pre, env={**os.environ, "ONNXPRUNE_NO_PROGRESS": "1"})


@pytest.mark.parametrize("case", list(COLLISIONS))
def test_colliding_paths_are_refused_before_any_work(work, case):
    os.symlink(work / "m.onnx", work / "link.onnx")
    os.link(work / "m.onnx", work / "hard.onnx")
    spec, words = COLLISIONS[case]
    before = digests(work)
    names = set(os.listdir(work))
    res = run(*spec.format(w=work).split())
    assert res.returncode == 2, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and words in lines[0], res
    assert "Traceback" not in res.stderr and res.stdout == "", res
    assert digests(work) == before
    assert set(os.listdir(work)) == names, "a file was written"


def test_json_dash_goes_to_standard_output(work):
    res = run("inspect", work / "m.onnx", "--json", "-")
    assert res.returncode == 0, res
    import json
    start = res.stdout.index("{\n")
    assert json.loads(res.stdout[start:])["params"] > 0
    assert not (ROOT / "-").exists()


def test_planted_symlinks_are_never_written_through(work):
    """The old fixed temp name ``.OUT.data.tmp`` and the final ``OUT.data`` both planted as links to a file
    outside: the run writes neither victim, and the saved .data is a real file."""
    out = work / "out"
    out.mkdir()
    outside = work / "victim.txt"
    os.symlink(outside, out / ".p.onnx.data.tmp")
    os.symlink(outside, out / "p.onnx.data")
    res = run("prune", work / "e.onnx", "-o", out / "p.onnx", "--ratio", "0.5", "--round-to", "1")
    assert res.returncode == 0, res
    assert outside.read_text() == "precious\n"
    assert not (out / "p.onnx").is_symlink() and not (out / "p.onnx.data").is_symlink()
    assert (out / ".p.onnx.data.tmp").is_symlink()  # left alone, not followed
    m = onnx.load(str(out / "p.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    assert sorted(os.listdir(out)) == [".p.onnx.data.tmp", "p.onnx", "p.onnx.data"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_permissions_open_would_give(work, umask):
    out = work / "out"
    out.mkdir()
    res = run("prune", work / "e.onnx", "-o", out / "p.onnx", "--round-to", "1", "--report", out / "r.json",
              "--report-md", out / "r.md", "--save-plan", out / "plan.json", umask=umask)
    assert res.returncode == 0, res
    res = run("prune", work / "m.onnx", "-o", out / "q.onnx", "--round-to", "1", umask=umask)
    assert res.returncode == 0, res
    res = run("eval", out / "q.onnx", "--data", "random", "--json", out / "e.json", umask=umask)
    assert res.returncode == 0, res
    written = [p for p in out.iterdir()]
    assert {p.name for p in written} >= {"p.onnx", "p.onnx.data", "r.json", "r.md", "plan.json", "q.onnx",
                                         "e.json"}
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, (p.name, oct(p.stat().st_mode))


def test_replacing_a_file_keeps_its_mode(work):
    out = work / "r.json"
    out.write_text("{}")
    out.chmod(0o640)
    res = run("inspect", work / "m.onnx", "--json", out, umask=0o077)
    assert res.returncode == 0, res
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and out.read_text().startswith("{\n")


# ---------------------------------------------------------------- external data outside the model's folder

def _external_model(folder: Path, location: str) -> Path:
    """A MatMul whose 4x4 weight lives at ``location``, plus an unused 256 MiB tensor in a sparse file
    inside the folder, so the model's external data reaches ``limits.LAZY_BYTES`` and ``prune`` loads it
    lazily (weights read from disk when used)."""
    from onnx import TensorProto, helper

    def ext(name, dims, loc, length):
        t = helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)  # noqa: F841 (shape only)
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims,
                             data_location=TensorProto.EXTERNAL)
        for k, v in (("location", loc), ("offset", "0"), ("length", str(length))):
            e = tensor.external_data.add()
            e.key, e.value = k, v
        return tensor
    big = 2**28
    with open(folder / "big.bin", "wb") as fh:
        fh.truncate(big)  # sparse: no disk space used
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [ext("w", [4, 4], location, 64), ext("big", [big // 4], "big.bin", big),
         onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w2")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = folder / "model.onnx"
    path.write_bytes(m.SerializeToString())
    return path


ESCAPES = {
    "../ outside the folder": "../outside/w.bin",
    "absolute path": "{outside}/w.bin",
    "symlink to a file outside": "link.bin",
    "file under a symlinked folder leading outside": "sub/w.bin",
}


@pytest.mark.parametrize("command", ["prune", "prune --no-verify", "inspect", "sparsify"])
@pytest.mark.parametrize("case", list(ESCAPES))
def test_external_data_outside_the_folder_is_refused_unread(tmp_path, case, command):
    """The outside 'file' is a FIFO: reading it would block (and time out the test), so the run provably
    opens nothing outside. The lazy path (>= 256 MiB of external data) is the one that used to read it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "w.bin")
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(outside / "w.bin", folder / "link.bin")
    os.symlink(outside, folder / "sub")
    model = _external_model(folder, ESCAPES[case].format(outside=outside))
    out = tmp_path / "out"
    out.mkdir()
    cmd, *flags = command.split()
    args = [cmd, model, *flags] + ([] if cmd == "inspect" else ["-o", out / "p.onnx"]) + \
        (["--sparsity", "0.5"] if cmd == "sparsify" else [])
    proc = subprocess.run([sys.executable, "-m", "onnxprune", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc
    assert "external data" in lines[0] and ("outside the model's folder" in lines[0] or "absolute" in lines[0]
                                            or "symbolic link" in lines[0]), lines[0]
    assert list(out.iterdir()) == []


def test_a_lazily_read_tensor_is_held_to_the_same_rules(tmp_path):
    """``tensor_to_array`` on weights left on disk checks the location itself too (not only ``load``)."""
    from onnxprune import ir
    from onnxprune.errors import OnnxPruneError
    (tmp_path / "outside.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    folder = tmp_path / "m"
    folder.mkdir()
    model = onnx.load(str(_external_model(folder, "../outside.bin")), load_external_data=False)
    ir.external.mark_lazy(model, folder)
    w = next(t for t in model.graph.initializer if t.name == "w")
    with pytest.raises(OnnxPruneError, match="leads outside the model's folder"):
        ir.tensor_to_array(w)
    inside = next(t for t in model.graph.initializer if t.name == "big")
    inside.dims[:] = [4]
    inside.external_data[2].value = "16"
    assert ir.tensor_to_array(inside).tolist() == [0.0] * 4
