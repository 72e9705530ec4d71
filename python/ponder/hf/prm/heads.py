"""Token-score heads: ``TokenScoreModel`` (a decoder plus a per-token score head, e.g. Qwen's
2-logit PRM head) and loading such a head from a checkpoint's safetensors without remote code."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import torch

from ..kv import ATTN_IMPLEMENTATION

__all__ = ["TokenScoreModel"]



class TokenScoreModel(torch.nn.Module):
    """A decoder (``base``, returns ``last_hidden_state`` [B, T, H]) plus a per-token head
    (``head``: [.., H] -> [.., C]) called like a causal LM: ``model(..., logits_to_keep=idx)``
    returns ``.logits`` [B, len(idx), C] -- the head runs only at the kept positions."""

    def __init__(self, base: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.base = base
        self.head = head
        self.config = base.config

    def set_attn_implementation(self, implementation: str) -> None:
        self.base.set_attn_implementation(implementation)

    def forward(self, *, logits_to_keep: int | torch.Tensor = 0, **kwargs):
        hidden = self.base(**kwargs).last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return SimpleNamespace(logits=self.head(hidden))


def _checkpoint_tensors(path: str, prefix: str, hub: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors whose names start with ``prefix`` from a (possibly sharded) safetensors checkpoint."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def fetch(filename: str) -> str | None:
        try:
            return cached_file(path, filename, local_files_only=hub["local_files_only"])
        except OSError:
            return None

    index = fetch("model.safetensors.index.json")
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({v for k, v in weight_map.items() if k.startswith(prefix)})
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        local = fetch(name)
        if local is None:
            continue
        with safe_open(local, framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key[len(prefix) :]] = f.get_tensor(key)
    return out


def _head_from_checkpoint(path: str, hub: dict[str, Any]) -> torch.nn.Module:
    """The ``score`` head of a Qwen2ForProcessRewardModel-style checkpoint: ``score.weight`` (one
    Linear) or ``score.<i>.weight`` Linear layers with ReLU between them (``score.0`` / ``score.2``)."""
    tensors = _checkpoint_tensors(path, "score.", hub)
    if not tensors:
        raise ValueError(
            f"{path}: no 'score.*' head weights in the checkpoint; qwen-prm needs a 2-logit token head "
            "(a *ForTokenClassification model with num_labels=2, a Qwen2ForProcessRewardModel checkpoint, "
            "or trust_remote_code=True)"
        )
    if "weight" in tensors:
        layers = [("", tensors)]
    else:
        idx = sorted({int(k.split(".")[0]) for k in tensors})
        layers = [(str(i), {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".")[0] == str(i)}) for i in idx]
    modules: list[torch.nn.Module] = []
    for j, (_, params) in enumerate(layers):
        w = params["weight"]
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias="bias" in params)
        lin.load_state_dict(params)
        modules.append(lin)
        if j + 1 < len(layers):
            modules.append(torch.nn.ReLU())
    return modules[0] if len(modules) == 1 else torch.nn.Sequential(*modules)


def _load_token_head_model(path: str, config, dtype, device, hub: dict[str, Any]) -> TokenScoreModel:
    from transformers import AutoModel, AutoModelForTokenClassification

    archs = list(getattr(config, "architectures", None) or [])
    common = dict(dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, **hub)
    if any(a.endswith("ForTokenClassification") for a in archs):
        model = AutoModelForTokenClassification.from_pretrained(path, **common)
        base = getattr(model, model.base_model_prefix)
        head = model.score if hasattr(model, "score") else model.classifier
    elif hub.get("trust_remote_code"):
        model = AutoModel.from_pretrained(path, **common)
        base, head = model.model, model.score
    else:
        # The decoder is the native class of config.model_type (checkpoint keys "model.*" are
        # mapped onto it by transformers); the head weights are read from the files directly.
        base = AutoModel.from_pretrained(path, **common)
        head = _head_from_checkpoint(path, hub).to(dtype)
    wrapped = TokenScoreModel(base, head).to(device).eval()
    out = getattr(head[-1] if isinstance(head, torch.nn.Sequential) else head, "out_features", None)
    if out != 2:
        raise ValueError(f"{path}: qwen-prm needs a head with 2 logits per token, this one has {out}")
    return wrapped
