"""PNG plots in reports: written when matplotlib is installed, a clean note when it is not."""

import os
import struct
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])   # IHDR width, height


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("plots")
    g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=True, seed=5)
    y = g.relu(g.conv("x", 16))
    y = g.relu(g.conv(y, 24))
    g.output(g.gemm(g.flatten(g.gap(y)), 4, bias=False))
    p = d / "m.onnx"
    onnx.save(g.build(), p)
    data = d / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal([16, 3, 8, 8]).astype(np.float32))
    return p, data


def test_report_md_embeds_channels_kept_plot(cli, tmp_path, model_and_data):
    pytest.importorskip("matplotlib")
    model, _ = model_and_data
    md = tmp_path / "report.md"
    cli("prune", model, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--round-to", "1", "--report-md", md, check=0)
    png = tmp_path / "report.channels.png"
    assert "![channels kept per group](report.channels.png)" in md.read_text()
    assert "channel counts in multiples of 1," in md.read_text()
    width, height = png_size(png)
    assert width == 7 * 120 and abs(height - (1.2 + 0.22 * 2) * 120) <= 1   # one bar per pruned group (2)


def test_sensitivity_plot(cli, tmp_path, model_and_data):
    pytest.importorskip("matplotlib")
    model, data = model_and_data
    png = tmp_path / "curves.png"
    res = cli("sensitivity", model, "--data", data, "--ratios", "0.25,0.5", "--plot", png, check=0)
    assert png_size(png) == (7 * 120, 540) and "matplotlib" not in res.err


def test_without_matplotlib_reports_still_written(tmp_path, model_and_data):
    """A matplotlib that cannot be imported: Markdown and exit 0, no PNG, one note on stderr."""
    model, data = model_and_data
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(ROOT)])}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "onnxprune", *map(str, args)], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=300)
    md = tmp_path / "report.md"
    res = run("prune", model, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--report-md", md)
    assert res.returncode == 0, res.stderr
    assert "## Pruned groups" in md.read_text() and "channels.png" not in md.read_text()
    assert not (tmp_path / "report.channels.png").exists()
    assert "pip install onnxprune[plots]" in res.stderr
    png = tmp_path / "curves.png"
    res = run("sensitivity", model, "--data", data, "--ratios", "0.5", "--plot", png)
    assert res.returncode == 0 and not png.exists() and "onnxprune[plots]" in res.stderr
