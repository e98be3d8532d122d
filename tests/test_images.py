"""Image-folder reader: pixels land where the model expects them, decoded one batch at a time."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from onnx import TensorProto

from onnxprune.errors import OnnxPruneError
from onnxprune.data.images import open_images

Image = pytest.importorskip("PIL.Image", reason="pillow is part of the test extra")


def model(shape=(1, 3, 4, 4), dtype=TensorProto.FLOAT, inputs=1) -> onnx.ModelProto:
    g = GraphBuilder(None)
    names = [g.input(f"img{i}", list(shape), dtype=dtype, dynamic_batch=True) for i in range(inputs)]
    outs = [g.op("Identity", [n]) for n in names]
    for o in outs:
        g.output(o, dtype=dtype)
    return g.build()


def save(folder, name, pixels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(folder / name)


def solid(h, w, rgb) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


def test_solid_colours_are_scaled_normalised_and_laid_out(tmp_path):
    save(tmp_path, "a.png", solid(4, 4, (255, 0, 51)))
    save(tmp_path / "sub", "b.png", solid(4, 4, (0, 102, 255)))
    imgs = open_images(tmp_path, model(), mean=[0.5, 0.5, 0.5], std=[0.5, 0.25, 0.5])
    assert imgs.num_samples == 2 and imgs.kind == "images" and imgs.labels is None
    (feed,) = list(imgs.batches(8))
    x = feed["img0"]
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [(1 - .5) / .5, (0 - .5) / .25, (.2 - .5) / .5], rtol=1e-6)
    np.testing.assert_allclose(x[1, :, 2, 3], [(0 - .5) / .5, (.4 - .5) / .25, (1 - .5) / .5], rtol=1e-6)

    bgr = open_images(tmp_path, model((1, 4, 4, 3)), channel_order="BGR")
    assert bgr.meta["layout"] == "NHWC"
    y = next(bgr.batches(1))["img0"]
    assert y.shape == (1, 4, 4, 3)
    np.testing.assert_allclose(y[0, 1, 1], [0.2, 0.0, 1.0], rtol=1e-6)


def test_imagenet_preset_and_integer_inputs_get_raw_pixels(tmp_path):
    save(tmp_path, "a.png", solid(4, 4, (10, 20, 30)))
    x = next(open_images(tmp_path, model(), mean="imagenet", std="imagenet").batches(1))["img0"]
    np.testing.assert_allclose(x[0, :, 0, 0], (np.array([10, 20, 30]) / 255 - [0.485, 0.456, 0.406])
                               / [0.229, 0.224, 0.225], rtol=1e-5)
    raw = next(open_images(tmp_path, model(dtype=TensorProto.UINT8)).batches(1))["img0"]
    assert raw.dtype == np.uint8 and raw[0, :, 0, 0].tolist() == [10, 20, 30]


def test_resize_then_center_crop(tmp_path):
    px = np.zeros((8, 32, 3), dtype=np.uint8)
    px[:, :12] = (255, 0, 0)           # outer left: cropped away
    px[:, 12:16] = (0, 255, 0)
    px[:, 16:20] = (0, 0, 255)
    px[:, 20:] = (255, 255, 255)       # outer right: cropped away
    save(tmp_path, "wide.png", px)
    x = next(open_images(tmp_path, model((1, 3, 4, 4)), resize=4).batches(1))["img0"][0]
    # shorter side 8 -> 4: the image becomes 4x16 and the centre 4x4 is green | blue
    assert x.argmax(axis=0).tolist() == [[1, 1, 2, 2]] * 4
    assert x[1, :, 0].min() > 0.6 and x[2, :, 3].min() > 0.6
    squashed = next(open_images(tmp_path, model((1, 3, 4, 4))).batches(1))["img0"][0]
    np.testing.assert_allclose(squashed[:, 0, 0], [1, 0, 0], atol=0.02)    # no crop: red survives


def test_batches_stream_in_sorted_order_with_limit_and_grayscale(tmp_path):
    for i in range(5):
        save(tmp_path, f"{i}.png", solid(3, 3, (i * 50,) * 3))
    Image.fromarray(np.full((3, 3), 7, np.uint8)).save(tmp_path / "gray.jpg", quality=100)
    imgs = open_images(tmp_path, model((1, 1, 3, 3)))
    assert imgs.meta["channels"] == 1
    sizes = [len(b["img0"]) for b in imgs.batches(2)]
    assert sizes == [2, 2, 2]
    assert [len(b["img0"]) for b in imgs.batches(2, limit=3)] == [2, 1]
    first = np.concatenate([b["img0"] for b in imgs.batches(4)])[:, 0, 0, 0]
    np.testing.assert_allclose(first[:5], np.arange(5) * 50 / 255, rtol=1e-6)
    assert abs(first[5] - 7 / 255) < 2 / 255                           # JPEG, decoded approximately


def test_size_option_for_symbolic_inputs(tmp_path):
    save(tmp_path, "a.png", solid(10, 10, (0, 0, 0)))
    g = GraphBuilder(None)
    vi = onnx.helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, "H", "W"])
    g.inputs.append(vi)
    g.output(g.op("Identity", ["img"]))
    m = g.build()
    with pytest.raises(OnnxPruneError, match="symbolic height/width.*--image-size"):
        open_images(tmp_path, m)
    assert next(open_images(tmp_path, m, size=6).batches(1))["img"].shape == (1, 3, 6, 6)
    assert next(open_images(tmp_path, m, input_shapes={"img": [1, 3, 5, 7]}).batches(1))["img"].shape == \
        (1, 3, 5, 7)


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(OnnxPruneError, match="no such image folder"):
        open_images(tmp_path / "nope", model())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(OnnxPruneError, match="no images found"):
        open_images(tmp_path / "empty", model())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    imgs = open_images(tmp_path / "bad", model())
    with pytest.raises(OnnxPruneError, match="broken.png: cannot decode image"):
        next(imgs.batches(1))
    save(tmp_path / "ok", "a.png", solid(4, 4, (0, 0, 0)))
    with pytest.raises(OnnxPruneError, match="one input; this model has 2"):
        open_images(tmp_path / "ok", model(inputs=2))
    with pytest.raises(OnnxPruneError, match="2 values given, the model's input has 3 channels"):
        open_images(tmp_path / "ok", model(), mean=[0.1, 0.2])
    with pytest.raises(OnnxPruneError, match="expected RGB or BGR"):
        open_images(tmp_path / "ok", model(), channel_order="RBG")
    with pytest.raises(OnnxPruneError, match="rank-4 image input"):
        open_images(tmp_path / "ok", model((1, 3, 4)))


def test_missing_pillow_names_the_extra(tmp_path):
    save(tmp_path, "a.png", solid(4, 4, (0, 0, 0)))
    onnx.save(model(), tmp_path / "m.onnx")
    code = ("import sys, onnx; sys.modules['PIL'] = None\n"
            "from onnxprune.data.images import open_images\n"
            "from onnxprune.errors import OnnxPruneError\n"
            f"try:\n    open_images({str(tmp_path)!r}, onnx.load({str(tmp_path / 'm.onnx')!r}))\n"
            "except OnnxPruneError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install onnxprune[images]" in out.stdout, out


def test_image_folder_feeds_the_calibration_statistics(tmp_path):
    from onnxprune.importance.stats import Needs, collect
    rng = np.random.default_rng(0)
    for i in range(5):
        save(tmp_path, f"{i}.png", rng.integers(0, 256, (6, 6, 3)))
    g = GraphBuilder("img", [1, 3, 6, 6], dynamic_batch=True)
    h = g.conv("img", 4, k=3)
    g.output(g.relu(h))
    m = g.build()
    imgs = open_images(tmp_path, m)
    st = collect(m, Needs(moments={(h, 1)}), imgs, batch_size=2)
    assert st.source == "images" and st.samples == 5
    assert st.tensor(h, 1).count[0] == 5 * 36


def test_image_size_text_and_bad_values(tmp_path):
    save(tmp_path, "a.png", solid(10, 10, (0, 0, 0)))
    assert next(open_images(tmp_path, model(), size="5x7").batches(1))["img0"].shape == (1, 3, 5, 7)
    assert next(open_images(tmp_path, model((1, 4, 4, 3)), size="6").batches(1))["img0"].shape == (1, 6, 6, 3)
    with pytest.raises(OnnxPruneError, match="--image-size 'big': expected N or HxW"):
        open_images(tmp_path, model(), size="big")
    with pytest.raises(OnnxPruneError, match="--resize 0: must be a positive"):
        open_images(tmp_path, model(), resize=0)
    with pytest.raises(OnnxPruneError, match="--layout 'NWHC'"):
        open_images(tmp_path, model(), layout="NWHC")
