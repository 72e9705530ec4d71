"""Loading helpers shared by ``HFPolicy`` and ``HFPRM``: hub arguments, device and dtype
defaults, tokenizers, EOS ids, the ``stats()`` layout and node-id checks."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from ._batching import PREFILL_BATCH_TOKENS  # noqa: F401 - re-exported (its old home)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_kwargs(model_id_or_path: str | os.PathLike, trust_remote_code: bool) -> dict[str, Any]:
    """from_pretrained keyword arguments: local directories and HF_HUB_OFFLINE never touch the
    network (``local_files_only``)."""
    local = os.path.isdir(os.fspath(model_id_or_path))
    return {"local_files_only": local or _offline(), "trust_remote_code": trust_remote_code}


def default_device() -> torch.device:
    """``cuda`` when torch sees a CUDA GPU, else ``cpu`` (the default ``device`` of HFPolicy / HFPRM)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_model_ref(model_id_or_path: str | os.PathLike) -> str:
    """A model reference as ``from_pretrained`` takes it: ``builtin:<name>`` (``policy-small``,
    ``policy-large``, ``prm``) becomes the shipped directory; others are returned unchanged."""
    from ..toy.builtin import resolve_model

    return resolve_model(model_id_or_path)


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``None`` -> float32 on CPU (fast and exact there), bfloat16 on accelerators; strings such as
    ``"bfloat16"`` name a torch dtype."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return value
    return dtype


def load_tokenizer(model_id_or_path: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(model_id_or_path), **_hub_kwargs(model_id_or_path, trust_remote_code))


def _eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a solution: the generation config's eos ids (chat models list several,
    e.g. <|eot_id|> and <|end_of_text|>) plus the tokenizer's eos token."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.update(int(x) for x in (source if isinstance(source, (list, tuple)) else [source]))
    return ids


def _model_stats(own: dict[str, int], live_nodes: int, num_parameters: int, kv: dict[str, int]) -> dict[str, int]:
    """The ``stats()`` dict of an HF model wrapper (HFPolicy, HFPRM): its own counters, then
    ``live_nodes``, ``num_parameters`` and the KV cache's counters prefixed ``kv_``."""
    out = {k: int(v) for k, v in own.items()}
    out.update(live_nodes=int(live_nodes), num_parameters=int(num_parameters))
    out.update({f"kv_{k}": v if isinstance(v, str) else int(v) for k, v in kv.items()})
    out.setdefault("kv_backend", "paged")
    return out


def _check_new_ids(ids: Sequence[int], held, owner: str) -> None:
    """ValueError unless ``ids`` are distinct and none is in ``held`` (the wrapper's nodes)."""
    dup = [i for i, c in Counter(ids).items() if c > 1]
    if dup:
        raise ValueError(f"node ids repeat: {sorted(dup)[:8]}")
    taken = sorted(i for i in ids if i in held)
    if taken:
        raise ValueError(f"nodes {taken[:8]} are already held by this {owner}")


#: config fields that bound a model's positions, in the order they are read
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(model) -> int | None:
    """The most positions ``model`` was built for (its config's ``max_position_embeddings`` or
    an equivalent field, :data:`POSITION_FIELDS`); None when the config names none. Inputs past
    it are refused or their paths ended, never run: rotary models would compute them silently
    (extrapolated), learned position tables would index past their end."""
    cfg = getattr(model, "config", None)
    for name in POSITION_FIELDS:
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None
