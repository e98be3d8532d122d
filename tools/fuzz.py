"""Fuzz the engine: random graphs, pruned at random ratios, must verify against the masked original.

    python tools/fuzz.py --n 2000 --seed 0 [--out docs/fuzz.json]

Every failure prints its seed; `python tools/fuzz.py --only SEED --save bad.onnx` keeps the model for a
regression test.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from collections import Counter

import numpy as np
import onnx

import onnxprune
from onnxprune.testing.fuzz import random_model


def run_one(seed: int, workdir: str) -> tuple[str, str, dict]:
    model = random_model(seed)
    path = os.path.join(workdir, f"{seed}.onnx")
    onnx.save(model, path)
    r = np.random.default_rng(seed + 10_000)
    ratio = float(r.choice([0.2, 0.3, 0.5, 0.7]))
    carrier = "outer" if r.random() < 0.3 else "largest"
    try:
        res = onnxprune.prune(path, policy=onnxprune.Policy(ratio=ratio, round_to=int(r.choice([1, 1, 2]))),
                              split_carrier=carrier)
        rep = res.report()
        return "ok", "", {"pruned": rep["groups_pruned"], "frozen": rep["groups_frozen"],
                          "params": rep["params_after"] / max(rep["params_before"], 1)}
    except onnxprune.VerificationError as e:
        return "wrong", str(e)[:300], {}
    except Exception as e:  # any crash is a bug too
        return "crash", f"{type(e).__name__}: {str(e)[:200]} @ {traceback.extract_tb(e.__traceback__)[-1].name}", {}
    finally:
        os.unlink(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", type=int, default=None, help="run one seed")
    ap.add_argument("--save", help="with --only: save that model here")
    ap.add_argument("--out", help="write a JSON summary here")
    args = ap.parse_args(argv)
    seeds = [args.only] if args.only is not None else list(range(args.seed, args.seed + args.n))
    if args.only is not None and args.save:
        onnx.save(random_model(args.only), args.save)
    status, fails, params = Counter(), [], []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        for s in seeds:
            st, msg, info = run_one(s, d)
            status[st] += 1
            if st != "ok":
                fails.append({"seed": s, "status": st, "message": msg})
                print(f"seed {s}: {st}: {msg}", flush=True)
            else:
                params.append(info["params"])
    summary = {"graphs": len(seeds), "status": dict(status), "failures": fails,
               "seconds": round(time.time() - t0, 1),
               "mean_params_kept": round(float(np.mean(params)), 3) if params else None}
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0 if not fails else 1


if __name__ == "__main__":
    raise SystemExit(main())
