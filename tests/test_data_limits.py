"""Data that is valid but too large: an .npz whose arrays would not fit (a zip bomb) is read up to a
budget, streamed, with a note; a huge image gives one line on stderr instead of Pillow's warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxprune.data.readers import read_npz

ROOT = Path(__file__).resolve().parents[1]


def test_an_npz_bomb_is_read_only_up_to_the_budget(tmp_path, capsys):
    x = np.zeros((200_000, 1, 28, 28), np.float32)   # 627 MB of zeros, about 600 KB compressed
    x[:, 0, 0, 0] = np.arange(len(x))
    np.savez_compressed(tmp_path / "bomb.npz", x=x, labels=np.arange(len(x)) % 10)
    size = os.path.getsize(tmp_path / "bomb.npz")
    del x
    arrays = read_npz(tmp_path / "bomb.npz", budget=2**20)
    per_sample = 28 * 28 * 4 + 8
    assert len(arrays["x"]) == len(arrays["labels"]) == 2**20 // per_sample
    assert arrays["x"][:, 0, 0, 0].tolist() == list(range(len(arrays["x"])))  # the first samples, in order
    assert arrays["labels"][:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"read the first {len(arrays['x'])} of 200000 samples" in err
    assert size < 2**21


def test_a_small_npz_is_read_whole(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.ones((5, 3), np.float32))
    assert read_npz(tmp_path / "d.npz")["x"].shape == (5, 3)
    assert capsys.readouterr().err == ""


def test_a_huge_image_is_one_line_on_stderr(tmp_path, fmnist_model):
    Image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (10_000, 9_000), 128).save(folder / "big.png")   # 90 megapixels: over Pillow's 89.5
    proc = subprocess.run([sys.executable, "-m", "onnxprune", "eval", str(fmnist_model), "--data", str(folder)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc
    notes = [line for line in proc.stderr.splitlines() if "megapixels" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ") and "90 megapixels" in notes[0], proc.stderr
    assert "DecompressionBombWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
