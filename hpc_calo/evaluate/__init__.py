"""CaloChallenge-compatible evaluation of generated showers against a reference file, in bounded memory."""

from hpc_calo.evaluate.config import METRICS, EvaluateRequest
from hpc_calo.evaluate.pipeline import evaluate

__all__ = ["METRICS", "EvaluateRequest", "evaluate"]
