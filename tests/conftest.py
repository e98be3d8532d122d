import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("ONNXPRUNE_NO_PROGRESS", "1")


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def __repr__(self):
        return f"<exit {self.code}\nstdout:\n{self.out}\nstderr:\n{self.err}>"


@pytest.fixture
def cli():
    """Run ``onnxprune ARGS`` in a real subprocess, as a user would."""

    def run(*args, check=None):
        proc = subprocess.run([sys.executable, "-m", "onnxprune", *map(str, args)], capture_output=True,
                              text=True, cwd=ROOT, timeout=600)
        res = CliResult(proc)
        if check is not None:
            assert res.code == check, res
        return res

    return run


@pytest.fixture(scope="session")
def fmnist_model():
    p = MODELS / "fmnist_resnet.onnx"
    if not p.exists():
        pytest.fail("models/fmnist_resnet.onnx is missing (regenerate with tools/train_fmnist.py)")
    return p
