"""The Hugging Face PRM: input formats (``formats``), token-score heads (``heads``) and
``HFPRM`` (``hf_prm``)."""

from .formats import FORMATS, IMPLICIT_PRM_BETA, MATH_SHEPHERD_TAG, QWEN_PRM_SYSTEM, QWEN_STEP_SEP, detect_format
from .heads import TokenScoreModel
from .hf_prm import HFPRM

__all__ = [
    "FORMATS",
    "HFPRM",
    "IMPLICIT_PRM_BETA",
    "MATH_SHEPHERD_TAG",
    "QWEN_PRM_SYSTEM",
    "QWEN_STEP_SEP",
    "TokenScoreModel",
    "detect_format",
]
