"""onnxprune: structured pruning for ONNX models from any exporter, verified in onnxruntime.

    import onnxprune
    result = onnxprune.prune("model.onnx", policy=onnxprune.Policy(ratio=0.3))
    onnxprune.save(result, "model.pruned.onnx")
    print(result.report()["macs_after"])
"""

from . import analysis as _analysis, ir as _ir, pipeline as _pipeline, plan as _plan
from .errors import OnnxPruneError, VerificationError, python_api
from .pipeline import PruneResult
from .plan import Plan, Policy

# the public functions: their errors name parameters (calib=...), not command-line flags (--calib)
analyze = python_api(_analysis.analyze)
load = python_api(_ir.load)
prune = python_api(_pipeline.prune)
save = python_api(_pipeline.save)
make_plan = python_api(_plan.make_plan)

__version__ = "0.1.0"

__all__ = ["analyze", "load", "prune", "save", "Plan", "Policy", "make_plan", "PruneResult", "OnnxPruneError",
           "VerificationError", "__version__"]
