"""ponder: test-time compute scaling for LLM reasoning (search over steps with a process reward model).

The compiled core is ``ponder._core`` (C++, optional CUDA); ``ponder.twins`` holds its
pure-Python twin, the readable specification of every operation.
"""

from __future__ import annotations

from ._version import __version__

try:
    from . import _core
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "ponder's compiled core (ponder._core) is missing or does not load: "
        f"{exc}. Reinstall ponder with `pip install .` from a source checkout "
        "(it needs a C++17 compiler and CMake >= 3.18)."
    ) from exc

from ._core import ACTIVE, FINISHED, NO_ANSWER, PRUNED, Forest, KVCacheFull, build_info
from .batch import search
from .engine import AsyncEngine, Engine, Event, Handle
from .methods import Budget, Completion, SearchConfig, SearchResult
from .protocols import PRM, Policy, SamplingParams, Step

# The Hugging Face implementations import torch/transformers: load them on first use so that
# `import ponder` stays light (the control plane needs neither).
_LAZY = {"HFPolicy": ("hf.policy", "HFPolicy"), "HFPRM": ("hf.prm", "HFPRM")}
# OpenAIPolicy imports the optional `openai` client (pip install "ponder[remote]") only when used.
_LAZY["OpenAIPolicy"] = ("openai_policy", "OpenAIPolicy")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'ponder' has no attribute {name!r}")


def cuda_available() -> bool:
    """True when this build has CUDA kernels *and* a CUDA device can run them now."""
    return bool(build_info()["cuda"]) and bool(_core.cuda_runtime_ok())


__all__ = [
    "ACTIVE",
    "AsyncEngine",
    "Engine",
    "Event",
    "Handle",
    "Budget",
    "Completion",
    "FINISHED",
    "HFPRM",
    "HFPolicy",
    "OpenAIPolicy",
    "NO_ANSWER",
    "PRM",
    "PRUNED",
    "Forest",
    "Policy",
    "SamplingParams",
    "SearchConfig",
    "SearchResult",
    "Step",
    "KVCacheFull",
    "__version__",
    "build_info",
    "cuda_available",
    "search",
]
