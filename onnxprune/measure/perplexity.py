"""Perplexity of a causal language model on pre-tokenized text.

    data = token_data("heldout.npz", proto)          # input_ids [N, T] (+ attention_mask [N, T])
    perplexity(model, data)  -> {"perplexity": 21.1, "nll": 3.05, "tokens": 8128, "sequences": 64}

The model takes ``input_ids`` (``[batch, seq]`` integers) and returns logits ``[batch, seq, vocab]``
(its first output, unless named). Token ``t + 1`` is scored by the logits at position ``t``; positions
whose ``attention_mask`` is 0 (padding) are neither scored nor predicted from. Other inputs the model
takes are made here: ``attention_mask`` (ones when the file has none) and ``position_ids`` (the
running count of real tokens); any other input is an error. Tokenization stays outside the package:
the ``.npz`` holds token ids already.

Memory is one batch of logits: the log-sum-exp runs sequence by sequence in float32 and only the
running sum of negative log-likelihoods and the token count are kept.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import onnx

from .. import ir, runtime
from ..data import ArrayData, fit_empty
from ..errors import OnnxPruneError

IDS, MASK, POSITIONS = "input_ids", "attention_mask", "position_ids"


def is_causal_lm(proto: onnx.ModelProto) -> bool:
    """The model has an ``input_ids`` input (what perplexity needs to feed it)."""
    return any(vi.name == IDS for vi in ir.graph_inputs(proto))


def token_data(spec: str | Path | ArrayData, proto: onnx.ModelProto,
               shapes: dict[str, list[int]] | None = None) -> ArrayData:
    """Token ids from an ``.npz`` (``input_ids``, optional ``attention_mask``) as feeds for ``proto``.

    The arrays are completed to every input the model takes (see the module docstring). A KV-cache
    input is fed empty when ``shapes`` (``--input-shape``: its shape, or named dimensions such as
    ``past_sequence_length=0``) gives it a zero-length dimension: the prompt step of a decoder with a cache.
    """
    if isinstance(spec, ArrayData):
        arrays = dict(spec.arrays)
        source = spec.source
    else:
        p = Path(spec)
        if not p.is_file():
            raise OnnxPruneError(f"{p}: no such data file (perplexity needs an .npz with 'input_ids')")
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k in (IDS, MASK)}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise OnnxPruneError(f"{p}: not a readable .npz file ({e.__class__.__name__})") from None
        source = str(p)
    names = [vi.name for vi in ir.graph_inputs(proto)]
    if IDS not in names:
        raise OnnxPruneError(f"perplexity needs a model with an '{IDS}' input (inputs: {', '.join(names)})")
    ids = arrays.get(IDS)
    if ids is None or ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[1] < 2:
        raise OnnxPruneError(f"{source}: perplexity needs '{IDS}', an integer array [sequences, tokens >= 2]")
    mask = arrays.get(MASK)
    if mask is not None and mask.shape != ids.shape:
        raise OnnxPruneError(f"{source}: '{MASK}' has shape {list(mask.shape)}, '{IDS}' {list(ids.shape)}")
    mask = np.ones(ids.shape, dtype=np.int64) if mask is None else mask.astype(np.int64)
    types = {vi.name: ir.input_dtype(vi) for vi in ir.graph_inputs(proto)}
    others = [n for n in names if n not in (IDS, MASK, POSITIONS)]
    sizes = ir.resolve_input_shapes(proto, {k: v for k, v in (shapes or {}).items() if k not in (IDS, MASK,
                                                                                                    POSITIONS)}) \
        if others else {}
    out = {}
    for name in names:
        if name == IDS:
            out[name] = ids.astype(types[name])
        elif name == MASK:
            out[name] = mask.astype(types[name])
        elif name == POSITIONS:
            out[name] = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(types[name])
        elif 0 in sizes[name][1:]:   # an empty KV cache: no memory, whatever the sample count
            out[name] = np.zeros([len(ids)] + sizes[name][1:], dtype=types[name])
        else:
            raise OnnxPruneError(f"perplexity feeds '{IDS}', '{MASK}' and '{POSITIONS}', and KV caches empty; "
                                 f"the model also takes '{name}': give its cache length 0 with --input-shape "
                                 "(e.g. past_sequence_length=0 and its head size), or export it without a KV cache")
    return ArrayData(out, None, kind="tokens", source=source, meta={"mask": mask})


class NLL:
    """Running negative log-likelihood of next tokens, in float64."""

    def __init__(self):
        self.nll = 0.0
        self.tokens = 0
        self.sequences = 0

    def update(self, logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> None:
        if logits.ndim != 3 or logits.shape[:2] != ids.shape:
            raise OnnxPruneError(f"perplexity needs logits [batch, seq, vocab] for input_ids {list(ids.shape)}; "
                                 f"the model returns {list(logits.shape)}")
        vocab = logits.shape[2]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise OnnxPruneError(f"token ids range over [{ids.min()}, {ids.max()}] but the logits have {vocab} "
                                 "entries")
        for row, tok, m in zip(logits, ids, mask):
            scored = (m[:-1] != 0) & (m[1:] != 0)
            if not scored.any():
                continue
            x = row[:-1][scored].astype(np.float32, copy=False)
            top = x.max(axis=1, keepdims=True)
            lse = np.log(np.exp(x - top).sum(axis=1, dtype=np.float64)) + top[:, 0]
            target = x[np.arange(len(x)), tok[1:][scored]]
            self.nll += float((lse - target).sum())
            self.tokens += int(scored.sum())
        self.sequences += len(ids)

    def result(self) -> dict:
        mean = self.nll / self.tokens if self.tokens else math.nan
        return {"perplexity": math.exp(mean) if self.tokens and mean < 700 else (math.inf if self.tokens else None),
                "nll": mean if self.tokens else None, "tokens": self.tokens, "sequences": self.sequences}


def perplexity(model: onnx.ModelProto | ir.Model, data: ArrayData, *, batch_size: int = 8,
               output: str | None = None, limit: int | None = None) -> dict:
    """``{"perplexity", "nll", "tokens", "sequences"}`` of ``model`` on ``data`` (from :func:`token_data`)."""
    return perplexities([model], data, batch_size=batch_size, output=output, limit=limit)[0]


def perplexities(models: list, data: ArrayData, *, batch_size: int = 8, output: str | None = None,
                 limit: int | None = None) -> list[dict]:
    """Perplexity of each model, all fed the same batches (one pass over the data)."""
    if batch_size < 1:
        raise OnnxPruneError(f"batch size {batch_size}: must be at least 1")
    if data.kind != "tokens":
        raise OnnxPruneError("perplexity needs token data (an .npz with 'input_ids')")
    sessions = []
    for m in models:
        proto = m.proto if isinstance(m, ir.Model) else m
        sess = runtime.session(proto, role="deployed")
        outs = [o.name for o in sess.outputs]
        name = output or outs[0]
        if name not in outs:
            raise OnnxPruneError(f"the model has no output '{name}' (outputs: {', '.join(outs)})")
        sessions.append((sess, {i.name: i.shape for i in sess.inputs}, name))
    meters = [NLL() for _ in models]
    mask_all = data.meta.get("mask")
    n = data.num_samples if limit is None else min(limit, data.num_samples)
    for start, feed in zip(range(0, n, batch_size), data.batches(batch_size, limit)):
        ids = feed[IDS].astype(np.int64)
        mask = mask_all[start:start + len(ids)] if mask_all is not None else np.ones_like(ids)
        for (sess, inputs, name), meter in zip(sessions, meters):
            try:
                logits = sess.run([name], {k: fit_empty(feed[k], inputs[k]) for k in inputs})[0]
            except Exception as e:
                first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
                raise OnnxPruneError(f"onnxruntime cannot run the model on these tokens: {first}") from None
            meter.update(logits, ids, mask)
            del logits
    return [m.result() for m in meters]

