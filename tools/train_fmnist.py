#!/usr/bin/env python3
"""Train the shipped sample model (a small residual CNN) on Fashion-MNIST.

Reads the real Fashion-MNIST idx files (as shipped by Debian's package
``dataset-fashion-mnist``), trains ``FmnistResNet`` from ``fmnist_model.py``
on CPU, exports it to ONNX and writes, into ``--out-dir``:

* ``fmnist_resnet.onnx``  exported model (input ``input`` [batch,1,28,28]
  float32, output ``logits`` [batch,10] float32), checked with
  ``onnx.checker.check_model(full_check=True)`` and evaluated in onnxruntime;
* ``fmnist_resnet.pt``    the PyTorch state_dict;
* ``fmnist_calib.npz``    512 normalised TRAIN images (``input``) + ``labels``;
* ``fmnist_test.npz``     normalised TEST images (``input``) + ``labels``.

The accuracy printed at the end is measured by onnxruntime on the ONNX file
over the images stored in ``fmnist_test.npz``.

Needs torch, numpy, onnx and onnxruntime (no torchvision, no downloads).
Getting the data without a root install::

    cd /tmp && apt-get download dataset-fashion-mnist \
        && dpkg -x dataset-fashion-mnist_*.deb /tmp/fmnist
    python tools/train_fmnist.py --data-dir /tmp/fmnist/usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fmnist_model import FmnistResNet  # noqa: E402

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"

# Normalisation constants: mean and std of the TRAIN split pixels scaled to
# [0, 1], rounded to 4 decimals (the script recomputes and prints the exact
# values as a check). Applied in the data pipeline, not inside the model.
MEAN = 0.2860
STD = 0.3530

CALIB_SIZE = 512
TEST_NPZ_MAX_BYTES = 8 * 1024 * 1024
TEST_FALLBACK_SIZE = 5000

# idx type codes -> numpy dtypes (all multi-byte types are big-endian)
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx type code 0x{type_code:02x}")
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(_IDX_DTYPES[type_code])
    count = int(np.prod(dims)) if ndim else 1
    offset = 4 + 4 * ndim
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: size mismatch, header says {tuple(dims)}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(tuple(int(d) for d in dims)).astype(dtype.newbyteorder("="))


def find_idx(data_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        p = data_dir / name
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"{stem}[.gz] not found in {data_dir}; install Debian's package "
        "dataset-fashion-mnist or point --data-dir at its files"
    )


def load_split(data_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    img_path = find_idx(data_dir, f"{prefix}-images-idx3-ubyte")
    lbl_path = find_idx(data_dir, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
        raise ValueError(f"unexpected shapes {images.shape} / {labels.shape} for {prefix}")
    return images, labels.astype(np.int64), [img_path, lbl_path]


def normalise(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,1,28,28], (x/255 - MEAN) / STD."""
    x = images_u8.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    return ((x - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop with `pad` pixels of padding plus random horizontal flip.

    Padding uses the normalised background value (a black pixel), so padded
    borders look like the dataset's own background.
    """
    n, _, h, w = x.shape
    bg = (0.0 - MEAN) / STD
    xp = F.pad(x, (pad, pad, pad, pad), value=bg)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [n,h,1]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # [n,1,w]
    flip = torch.rand(n, generator=gen) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    out = xp[torch.arange(n)[:, None, None], 0, rows, cols]  # [n,h,w]
    return out[:, None, :, :].contiguous()


@torch.no_grad()
def torch_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, bs: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), bs):
        xb = torch.from_numpy(x[i : i + bs]).contiguous(memory_format=torch.channels_last)
        correct += int((model(xb).argmax(1).numpy() == y[i : i + bs]).sum())
    return correct / len(x)


def onnx_accuracy(sess, x: np.ndarray, y: np.ndarray, bs: int = 500) -> tuple[float, np.ndarray]:
    preds = []
    for i in range(0, len(x), bs):
        (logits,) = sess.run(["logits"], {"input": x[i : i + bs]})
        preds.append(logits.argmax(1))
    pred = np.concatenate(preds)
    return float((pred == y).mean()), pred


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                    help="folder with the Fashion-MNIST idx files (default: %(default)s, "
                         "where Debian's dataset-fashion-mnist installs them)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs (default: %(default)s)")
    ap.add_argument("--out-dir", default="models/", help="output folder (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed for weights init, shuffling, augmentation and the "
                         "calibration subset (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (one-cycle)")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    ap.add_argument("--train-limit", type=int, default=0,
                    help="use only the first N training images (0 = all; for smoke tests)")
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    data_dir = Path(args.data_dir)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- data ---------------------------------------------------------------
    train_u8, train_y, train_files = load_split(data_dir, "train")
    test_u8, test_y, test_files = load_split(data_dir, "t10k")
    print(f"data: {data_dir}  train {train_u8.shape}  test {test_u8.shape}", flush=True)
    for p in train_files + test_files:
        print(f"  sha256 {sha256(p)}  {p.name}")
    px = train_u8.astype(np.float64) / 255.0
    print(f"train pixel mean {px.mean():.6f} std {px.std():.6f} "
          f"(using rounded MEAN={MEAN} STD={STD})", flush=True)
    del px

    train_x = normalise(train_u8)
    test_x = normalise(test_u8)

    # Calibration subset: fixed seeded random subset of the TRAIN split,
    # drawn from its own generator so it does not depend on training settings.
    calib_idx = np.random.default_rng(args.seed).choice(len(train_x), CALIB_SIZE, replace=False)
    calib_path = out_dir / "fmnist_calib.npz"
    np.savez_compressed(calib_path, input=train_x[calib_idx], labels=train_y[calib_idx])
    print(f"wrote {calib_path} ({calib_path.stat().st_size} bytes), first indices "
          f"{calib_idx[:5].tolist()}", flush=True)

    if args.train_limit:
        train_x, train_y = train_x[: args.train_limit], train_y[: args.train_limit]

    # ---- training -------------------------------------------------------------
    model = FmnistResNet().to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: FmnistResNet, {n_params} parameters", flush=True)
    steps_per_epoch = (len(train_x) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
    gen = torch.Generator().manual_seed(args.seed)
    xt_all = torch.from_numpy(train_x)
    yt_all = torch.from_numpy(train_y)

    t_start = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        t_ep = time.time()
        perm = torch.randperm(len(xt_all), generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
            xb = augment(xt_all[idx], gen).contiguous(memory_format=torch.channels_last)
            yb = yt_all[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            if (step + 1) % 100 == 0:
                print(f"  epoch {epoch} step {step + 1}/{steps_per_epoch} "
                      f"loss {loss_sum / seen:.4f} acc {correct / seen:.4f} "
                      f"lr {sched.get_last_lr()[0]:.4f} {time.time() - t_ep:.0f}s", flush=True)
        test_acc = torch_accuracy(model, test_x, test_y)
        print(f"epoch {epoch}/{args.epochs}: train loss {loss_sum / seen:.4f} "
              f"train acc {correct / seen:.4f} test acc (torch) {test_acc:.4f} "
              f"epoch {time.time() - t_ep:.0f}s total {time.time() - t_start:.0f}s", flush=True)
    train_seconds = time.time() - t_start
    print(f"training wall time: {train_seconds:.0f}s ({train_seconds / 60:.1f} min) "
          f"on {args.threads} threads", flush=True)

    # ---- save + export --------------------------------------------------------
    model = model.to(memory_format=torch.contiguous_format).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    pt_path = out_dir / "fmnist_resnet.pt"
    torch.save(state, pt_path)

    onnx_path = out_dir / "fmnist_resnet.onnx"
    x_example = torch.from_numpy(test_x[:1].copy())
    torch.onnx.export(model, (x_example,), str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(str(onnx_path), full_check=True)
    m = onnx.load(str(onnx_path))
    ops = collections.Counter(n.op_type for n in m.graph.node)
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes), opset "
          f"{[(o.domain or 'ai.onnx', o.version) for o in m.opset_import]}, "
          f"{len(m.graph.node)} nodes", flush=True)
    print("  op types: " + ", ".join(f"{k}={v}" for k, v in sorted(ops.items())))
    for vi in list(m.graph.input) + list(m.graph.output):
        dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        print(f"  {vi.name}: {onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)} {dims}")
    print(f"wrote {pt_path} ({pt_path.stat().st_size} bytes)")

    # ---- test set file ----------------------------------------------------------
    test_path = out_dir / "fmnist_test.npz"
    np.savez_compressed(test_path, input=test_x, labels=test_y)
    if test_path.stat().st_size > TEST_NPZ_MAX_BYTES:
        print(f"{test_path} with all {len(test_x)} images is {test_path.stat().st_size} bytes "
              f"> {TEST_NPZ_MAX_BYTES}; keeping the first {TEST_FALLBACK_SIZE}")
        np.savez_compressed(test_path, input=test_x[:TEST_FALLBACK_SIZE],
                            labels=test_y[:TEST_FALLBACK_SIZE])
    print(f"wrote {test_path} ({test_path.stat().st_size} bytes)", flush=True)

    # ---- verify in onnxruntime on the files as written ------------------------
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with np.load(test_path) as z:
        tx, ty = z["input"], z["labels"]
    ort_acc, _ = onnx_accuracy(sess, tx, ty)
    with torch.no_grad():
        ref = model(torch.from_numpy(tx[:256])).numpy()
    (got,) = sess.run(["logits"], {"input": tx[:256]})
    print(f"onnxruntime vs torch logits max abs diff on 256 test images: "
          f"{np.abs(ref - got).max():.2e}")
    with np.load(calib_path) as z:
        calib_acc, _ = onnx_accuracy(sess, z["input"], z["labels"])
    print(f"onnxruntime accuracy on {calib_path.name} ({CALIB_SIZE} train images): {calib_acc:.4f}")
    print(f"onnxruntime TEST accuracy on {test_path.name} ({len(ty)} images): {ort_acc:.4f}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
