"""Image folders as --data / --calib: same numbers as the .npz, lazy decoding, class-folder labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from builders import GraphBuilder
from conftest import MODELS

from onnxprune.data import ArrayData, open_data
from onnxprune.errors import OnnxPruneError
from onnxprune.data.images import ImageFolder, ImagePath, folder_labels, list_images

Image = pytest.importorskip("PIL.Image", reason="pillow is part of the test extra")

MEAN, STD = 0.2860, 0.3530          # the Fashion-MNIST normalisation (models/README.md)
NORM = ["--mean", str(MEAN), "--std", str(STD)]


@pytest.fixture(scope="module")
def fmnist_folder(tmp_path_factory):
    """Two test images per class as PNG in class folders, and the same 20 samples as an .npz."""
    root = tmp_path_factory.mktemp("fmnist")
    with np.load(MODELS / "fmnist_test.npz") as z:
        x, y = z["input"], z["labels"]
    idx = np.sort(np.concatenate([np.flatnonzero(y == c)[:2] for c in range(10)]))
    for i in idx:
        px = np.clip(np.rint((x[i, 0] * STD + MEAN) * 255), 0, 255).astype(np.uint8)
        (root / "png" / f"class{y[i]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(px).save(root / "png" / f"class{y[i]}" / f"{i:05d}.png")
    np.savez(root / "same.npz", input=x[idx], labels=y[idx])
    return root


def test_eval_on_a_png_folder_matches_the_npz(cli, fmnist_model, fmnist_folder, tmp_path):
    cli("eval", fmnist_model, "--data", fmnist_folder / "png", *NORM, "--json", tmp_path / "img.json", check=0)
    cli("eval", fmnist_model, "--data", fmnist_folder / "same.npz", "--json", tmp_path / "npz.json", check=0)
    img, npz = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("img", "npz"))
    assert img["samples"] == npz["samples"] == 20
    assert img["accuracy"] == npz["accuracy"] and 0.5 < img["accuracy"]["top1"] < 1.0


def test_folder_decodes_to_the_npz_arrays(fmnist_model, fmnist_folder):
    import onnx
    proto = onnx.load(fmnist_model)
    data = open_data(ImagePath(fmnist_folder / "png", mean=MEAN, std=STD), proto, {})
    with np.load(fmnist_folder / "same.npz") as z:
        want_x, want_y = z["input"], z["labels"]
    # files sort by class folder, then by index: reorder the npz the same way
    order = np.lexsort((np.arange(20), want_y))
    got = np.concatenate([b["input"] for b in data.batches(7)])
    np.testing.assert_allclose(got, want_x[order], atol=2e-6)
    assert data.labels.tolist() == want_y[order].tolist() and data.kind == "images"


def test_prune_with_a_calibration_folder(cli, fmnist_model, fmnist_folder, tmp_path):
    jpg = tmp_path / "calib"
    jpg.mkdir()
    for p in list_images(fmnist_folder / "png")[:12]:
        Image.open(p).save(jpg / (p.stem + ".jpg"), quality=95)
    r = cli("prune", fmnist_model, "-o", tmp_path / "p.onnx", "--criterion", "wanda", "--ratio", "0.3",
            "--calib", jpg, *NORM, "--data", fmnist_folder / "png", "--bench-runs", "0",
            "--report", tmp_path / "r.json", check=0)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["importance_data"] == "images" and rep["verified"], r
    assert rep["macs_after"] < 0.8 * rep["macs_before"]


def test_image_flags_without_a_folder_are_an_error(cli, fmnist_model, tmp_path):
    r = cli("eval", fmnist_model, "--data", MODELS / "fmnist_calib.npz", "--mean", "0.5", check=2)
    assert "--mean applies to image folders" in r.err and "Traceback" not in r.err
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("prune", fmnist_model, "-o", tmp_path / "p.onnx", "--criterion", "wanda", "--calib", empty, check=2)
    assert "no images found" in r.err and len(r.err.strip().splitlines()) == 1


def test_finetune_streams_from_a_folder(cli, fmnist_model, fmnist_folder, tmp_path):
    cli("finetune", fmnist_model, "--teacher", fmnist_model, "--data", fmnist_folder / "png", *NORM,
        "-o", tmp_path / "t.onnx", "--steps", "2", "--batch", "4", "--eval-every", "2",
        "--json", tmp_path / "f.json", check=0)
    rep = json.loads((tmp_path / "f.json").read_text())
    assert rep["train_samples"] + rep["holdout_samples"] == 20 and rep["metric"] == "top1"


def _folder(tmp_path, names: list[str]) -> None:
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), len(n), np.uint8)).save(tmp_path / n)


def test_class_folder_labels(tmp_path):
    _folder(tmp_path / "a", ["dog/1.png", "cat/2.png", "cat/sub/3.png", "emu/4.jpg"])
    (tmp_path / "a" / "bee").mkdir()                         # empty class: keeps its index
    root = tmp_path / "a"
    assert folder_labels(root, list_images(root)).tolist() == [1, 1, 2, 3]   # bee cat dog emu
    _folder(tmp_path / "b", ["top.png", "x/1.png"])          # an image outside a class folder: no labels
    assert folder_labels(tmp_path / "b", list_images(tmp_path / "b")) is None


def test_lazy_views_decode_only_what_is_read(tmp_path):
    _folder(tmp_path, [f"{i}.png" for i in range(4)])
    (tmp_path / "9.png").write_bytes(b"not a png")            # sorts last
    g = GraphBuilder("img", [1, 3, 4, 4], dynamic_batch=True)
    g.output(g.op("Identity", ["img"]))
    data = open_data(str(tmp_path), g.build(), {})
    arr = data.arrays["img"]
    assert isinstance(arr, ImageFolder) and arr.shape == (5, 3, 4, 4) and len(arr) == 5
    fit, held = data.split(4)                                 # no decoding yet
    assert isinstance(fit.arrays["img"], ImageFolder) and held.num_samples == 1
    assert [b["img"].shape[0] for b in fit.batches(3)] == [3, 1]
    assert np.asarray(arr[[2, 0]])[:, 0, 0, 0].tolist() == pytest.approx([5 / 255, 5 / 255])
    with pytest.raises(OnnxPruneError, match="9.png: cannot decode image"):
        list(held.batches(1))
    assert isinstance(data, ArrayData)
