"""The committed tiny transformer exports (models/tiny/) load and run as their README says.

They are CI material for the transformer work: each must run in onnxruntime at
a batch and sequence length other than the export's (the dynamic axes work),
and every file listed in the manifest must be present and small.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny"
MANIFEST = json.loads((TINY / "manifest.json").read_text())
NAMES = sorted(n for n, e in MANIFEST["models"].items() if e.get("export_ok"))


def feed_for(sess, config, batch=2, seq=5, past=3):
    """Random inputs for every graph input; symbolic dims are bound from their names."""
    rng = np.random.default_rng(0)
    image = {"num_channels": config.get("num_channels"), "height": config.get("image_size"),
             "width": config.get("image_size")}
    feed = {}
    for i in sess.get_inputs():
        dims = []
        for d in i.shape:
            if isinstance(d, int):
                dims.append(d)
            elif d in image:  # optimum leaves ViT's image dims symbolic
                dims.append(image[d])
            elif "batch" in d:
                dims.append(batch)
            elif d.startswith("past") and "+" not in d:
                dims.append(past)
            elif d == "sequence_length":
                dims.append(seq)
            else:  # total length (attention mask with a cache), or an automatic name like s53
                dims.append(seq + (past if any(n.name.startswith("past_") for n in sess.get_inputs()) else 0))
        if i.type == "tensor(int64)":
            if i.name == "position_ids":
                start = past if any(n.name.startswith("past_") for n in sess.get_inputs()) else 0
                feed[i.name] = np.tile(np.arange(start, start + seq, dtype=np.int64), (batch, 1))
            elif i.name == "input_ids":
                feed[i.name] = rng.integers(0, 100, dims, dtype=np.int64)
            elif i.name == "attention_mask":
                feed[i.name] = np.ones(dims, dtype=np.int64)
            else:
                feed[i.name] = np.zeros(dims, dtype=np.int64)
        else:
            feed[i.name] = rng.standard_normal(dims).astype(np.float32)
    return feed


def test_manifest_lists_every_file_and_files_are_small():
    files = sorted(p.stem for p in TINY.glob("*.onnx"))
    assert files == NAMES
    assert len(NAMES) >= 20
    for name in NAMES:
        assert (TINY / f"{name}.onnx").stat().st_size < 1_000_000, name


@pytest.mark.parametrize("name", NAMES)
def test_tiny_model_runs_at_batch_2(name):
    entry = MANIFEST["models"][name]
    sess = ort.InferenceSession(str(TINY / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(entry["describe"]["inputs"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed_for(sess, entry["config"]))))
    first = next(iter(outs.values()))
    assert first.shape[0] == 2 and np.all(np.isfinite(first))
    presents = [v for k, v in outs.items() if k.startswith("present.")]
    assert bool(presents) == entry["kv_cache"]
    # present.* hold past 3 + the 5 new positions
    assert all(v.shape[0] == 2 and v.shape[2] == 8 for v in presents)


@pytest.mark.parametrize("name", [n for n in NAMES if MANIFEST["models"][n]["kv_cache"]])
def test_kv_model_takes_an_empty_cache(name):
    """The prompt step: past length 0 (a zero-length axis) runs, and present.* hold just the prompt."""
    entry = MANIFEST["models"][name]
    sess = ort.InferenceSession(str(TINY / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed_for(sess, entry["config"], past=0))))
    presents = [v for k, v in outs.items() if k.startswith("present.")]
    assert presents and all(v.shape[2] == 5 for v in presents)
