"""onnxprune: structured pruning for ONNX models from any exporter, verified in onnxruntime.

    import onnxprune
    result = onnxprune.prune("model.onnx", policy=onnxprune.Policy(ratio=0.3))
    onnxprune.save(result, "model.pruned.onnx")
    print(result.report()["macs_after"])
"""

from .analysis import analyze
from .errors import OnnxPruneError, VerificationError
from .ir import load
from .pipeline import PruneResult, prune, save
from .plan import Plan, Policy, make_plan

__version__ = "0.1.0"

__all__ = ["analyze", "load", "prune", "save", "Plan", "Policy", "make_plan", "PruneResult", "OnnxPruneError",
           "VerificationError", "__version__"]
