"""``HFPRM``: a Hugging Face process reward model scored incrementally on a paged KV cache.

Every live node keeps one :class:`ponder.hf.kv.PagedKVCache` sequence holding the PRM's input
for its path (``formats``); scoring a child runs only the new step's tokens on a fork of its
parent's sequence. A path's tokens are always the tokenization of its whole text, so scores are
those of the full path whatever the tokenizer merges across a step boundary: a child whose
tokens do not extend its parent's (a merged boundary, a template that is not prefix-stable)
starts a new sequence over the cached blocks of its longest equal prefix
(``stats()["full_reencodes"]``). Marker formats take logits only at scored positions
(``logits_to_keep``); implicit-prm takes every new position's log-probabilities under both
models. ``score_paths`` scores whole continuations of held nodes in one call (one row per
path, every step read), keeping nothing. Design notes and measurements: docs/prm.md.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ...protocols import NodePath, check_restore_args, check_score_steps_args
from .._batching import forward_overhead_tokens, prefill_batch_tokens, prefill_distinct, sorted_token_batches, token_batches
from .._loading import (
    _check_new_ids,
    _hub_kwargs,
    _model_stats,
    default_device,
    load_tokenizer,
    max_positions,
    resolve_dtype,
    resolve_model_ref,
)
from ..kv_fallback import cache_for_model, with_companion
from .formats import _FORMAT_CLASSES, FORMATS, IMPLICIT_PRM_BETA, _common_prefix, _Format, _ids, _leading_special, detect_format
from .heads import _load_token_head_model

__all__ = ["HFPRM", "check_score_paths_args"]

# Bounds the [tokens, vocab] float32 log-probability rows one implicit-PRM batch materialises
# per model (1 GiB): a 150k vocabulary gets ~1.7k new tokens a batch, the toy one the default.
_LOGRATIO_ELEMENTS = 1 << 28



def check_score_paths_args(node_ids: Sequence[int], paths: Sequence[Sequence[str]]) -> None:
    """The argument checks of :meth:`ponder.protocols.PathScorer.score_paths`: TypeError for a
    bare string as ``paths`` or one path; ValueError for unequal lengths."""
    if isinstance(paths, str):
        raise TypeError("paths must be a sequence of paths (lists of step strings), not a string")
    if len(node_ids) != len(paths):
        raise ValueError(f"node_ids has {len(node_ids)} entries but paths has {len(paths)}")
    for i, p in enumerate(paths):
        if isinstance(p, str):
            raise TypeError(f"paths[{i}] must be a sequence of step strings, not a string")


@dataclass
class _Path:
    """What the PRM keeps for one node: its path and the PRM input it has been turned into.

    text: the rendered input up to and including the last step's marker (a root: the question
    part); tokens: ``encode_full(text)``; seq: its KV sequence (None for an empty root).
    """

    question: str
    steps: tuple[str, ...]
    text: str
    tokens: list[int]
    seq: int | None
    # implicit-prm: tokens before answer_start are the question part (not scored); q is the
    # path's beta-scaled log-ratio sum, tail the log-ratio row [V] of its last position (it
    # scores a child's first token).
    answer_start: int = 0
    q: float = 0.0
    tail: torch.Tensor | None = field(default=None, repr=False)
    # implicit-prm: float64 [len(tokens) - answer_start] (CPU), cum[i] = the unscaled log-ratio
    # sum of tokens answer_start .. answer_start + i (None: empty); a child that cannot fork
    # takes its sums up to the prefix it shares with this path
    cum: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class _Plan:
    """How to build one new path: ``tokens`` in full; fork ``base`` (holding the first
    ``base_len`` tokens) and append the rest, or (base None) start a new sequence."""

    path: _Path
    base: int | None
    base_len: int
    pos: int  # absolute index of the scored position in tokens
    parent: _Path | None = None


class HFPRM:
    """A Hugging Face PRM implementing :class:`ponder.protocols.PRM`, scoring incrementally.

    Args:
        model_id_or_path: local directory, hub id (``HF_HUB_OFFLINE=1``: local cache only) or
            ``builtin:prm`` (the shipped PRM).
        format: ``"auto"`` (see :func:`detect_format`), ``"math-shepherd"``, ``"rlhflow"``,
            ``"qwen-prm"`` or ``"implicit-prm"`` (see the module docstring for what each one
            writes and reads).
        device, dtype: as :class:`ponder.hf.policy.HFPolicy` (device None: cuda when torch sees a
            GPU, else cpu; dtype None: float32 on CPU, bf16 else).
        kv_budget, block_size: the PRM's own KV pool (tokens; default
            :data:`ponder.hf.kv.DEFAULT_TOKEN_BUDGET`) and its block size.
        system_prompt: the system message of qwen-prm (None: Qwen's default; "" for none) and of
            implicit-prm (None or "": none, as EurusPRM's usage; the chat template may add its own).
        trust_remote_code: load a checkpoint's own model class (qwen-prm only).
        self_check: as :class:`ponder.hf.policy.HFPolicy` (paged KV cache when exact, else
            transformers' own cache; ``stats()["kv_backend"]`` says which).
        reference: implicit-prm only: the reference causal LM (directory or hub id; None: the
            checkpoint's ``implicit_prm.reference``). It must share the PRM's vocabulary.
        beta: implicit-prm only: the log-ratio coefficient (None: the checkpoint's
            ``implicit_prm.beta``, else :data:`IMPLICIT_PRM_BETA`).
    """

    def __init__(
        self,
        model_id_or_path: str | os.PathLike,
        *,
        format: str = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        kv_budget: int | None = None,
        block_size: int = 16,
        system_prompt: str | None = None,
        trust_remote_code: bool = False,
        reference: str | os.PathLike | None = None,
        beta: float | None = None,
        self_check: bool = True,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        if format not in ("auto",) + FORMATS:
            raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
        path = resolve_model_ref(model_id_or_path)
        hub = _hub_kwargs(path, trust_remote_code)
        self.device = default_device() if device is None else torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        config = AutoConfig.from_pretrained(path, **hub)
        if format == "auto":
            format = detect_format(self.tokenizer, config, path)
        self.format = format
        self._fmt: _Format = _FORMAT_CLASSES[format](self.tokenizer, system_prompt)
        if format == "qwen-prm":
            self.model = _load_token_head_model(path, config, self.dtype, self.device, hub)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, **hub).to(self.device).eval()
        self._batch_tokens = prefill_batch_tokens(self.device)
        self._overhead = forward_overhead_tokens(self.device)
        # paged when the model passes the self-check, else transformers' own cache (ponder.hf.kv_fallback)
        self.kv = cache_for_model(self.model, block_size=block_size, token_budget=kv_budget, self_check=self_check)
        self.ref_model = None
        self.beta = None
        if format == "implicit-prm":
            self.ref_model, self.beta = self._load_reference(path, config, reference, beta, trust_remote_code)
            # one set of block tables: every fork / new sequence / free of self.kv holds for both
            self.kv, self.ref_kv = with_companion(self.kv, self.model, self.ref_model, self_check=self_check)
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._logratio_batch_tokens = min(self._batch_tokens, max(1, _LOGRATIO_ELEMENTS // vocab))
        elif reference is not None or beta is not None:
            raise ValueError(f"reference= and beta= apply to format 'implicit-prm' only (this PRM is {format!r})")
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        # the longest input the PRM (and an implicit PRM's reference) may run; None: no limit named
        limits = [x for x in (max_positions(self.model), max_positions(self.ref_model)) if x is not None]
        self.max_positions = min(limits) if limits else None
        if self.ref_model is not None:  # both run for every token
            self.num_parameters += sum(p.numel() for p in self.ref_model.parameters())
        self._lead = _leading_special(self.tokenizer) if self._fmt.add_special_tokens else []
        self._step_cost: int | None = None  # see _reserve
        # HFPRM checks its inputs against max_positions itself (fit_steps tokenizes texts longer
        # than the limit on purpose, to cut them): the tokenizer's own length warning would mislead
        warned = getattr(self.tokenizer, "deprecation_warnings", None)
        if isinstance(warned, dict):
            warned["sequence-length-is-longer-than-the-specified-maximum"] = True
        self._marker_id = self._fmt.marker_id()
        self._columns = None if self._fmt.columns is None else torch.tensor(self._fmt.columns, device=self.device)
        self._nodes: dict[int, _Path] = {}
        self._warned: set[str] = set()
        self._steps_scored = 0
        self._reencodes = 0

    def _load_reference(self, path: str, config, reference, beta, trust_remote_code: bool):
        from transformers import AutoModelForCausalLM

        spec = getattr(config, "implicit_prm", None) or {}
        ref = reference if reference is not None else spec.get("reference")
        if ref is None:
            raise ValueError(
                "format 'implicit-prm' needs its reference model: pass reference= (the model the PRM "
                "was trained against, e.g. Qwen/Qwen2.5-Math-7B-Instruct for PRIME-RL/EurusPRM-Stage2)"
            )
        ref = resolve_model_ref(ref)
        if reference is None and not os.path.isabs(ref) and os.path.isdir(path):
            # the checkpoint names its reference relative to its own directory
            ref = os.path.normpath(os.path.join(path, ref))
        beta = float(beta if beta is not None else spec.get("beta", IMPLICIT_PRM_BETA))
        if not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"beta must be a finite number > 0, got {beta}")
        model = AutoModelForCausalLM.from_pretrained(
            ref, dtype=self.dtype, **_hub_kwargs(ref, trust_remote_code)
        ).to(self.device).eval()
        ours, theirs = self.model.get_output_embeddings(), model.get_output_embeddings()
        if ours is None or theirs is None or ours.weight.shape[0] != theirs.weight.shape[0]:
            raise ValueError(
                f"the implicit PRM's reference {ref!r} does not share the PRM's vocabulary "
                f"(output rows {None if theirs is None else theirs.weight.shape[0]} vs "
                f"{None if ours is None else ours.weight.shape[0]}): pass the model the PRM was trained against"
            )
        return model, beta

    # ---------------------------------------------------------------- text and tokens
    def render(self, question: str, steps: Sequence[str]) -> str:
        """The full reference input text of a path (what the published usage feeds the model)."""
        return self._fmt.render(question, list(steps))

    def encode_full(self, text: str) -> list[int]:
        """The reference tokenization of a whole input text (leading special tokens included
        where the format's reference adds them)."""
        return self._lead + _ids(self.tokenizer, text)

    def _node_text(self, question: str, steps: Sequence[str]) -> str:
        full = self._fmt.render(question, list(steps))
        return full[: self._fmt.node_end(question, steps, full)]

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        """``encode_full`` of each text (one batched call for a fast tokenizer)."""
        if len(texts) > 1 and getattr(self.tokenizer, "is_fast", False):
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        else:
            encoded = [_ids(self.tokenizer, t) for t in texts]
        return [self._lead + list(ids) for ids in encoded]

    def _note(self, reason: str) -> None:
        """Warn once per cause that some paths cannot extend their parent's tokens."""
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"HFPRM ({self.format}): {reason}; such paths are recomputed from their longest cached "
                "prefix instead of extending their parent's sequence (scores stay exact)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _plans(self, parents: Sequence[_Path], new_steps: Sequence[Sequence[str]]) -> list[_Plan]:
        """One plan per (parent, steps appended to its path). The tokens of a path are the
        tokenization of its whole text, so incremental scores equal full-path scores at every
        position; the plan forks the parent only where the parent's tokens are a prefix of them."""
        texts = [self._node_text(p.question, p.steps + tuple(s)) for p, s in zip(parents, new_steps)]
        plans = []
        for parent, steps, text, tokens in zip(parents, new_steps, texts, self._encode_many(texts)):
            n = len(parent.tokens)
            # implicit-prm: an empty step may add no token (its path then scores as its parent's;
            # pos < n below makes it a recompute, which handles that)
            if self.ref_model is None and (not tokens or tokens[-1] != self._marker_id):
                raise ValueError(
                    f"format {self.format!r}: the marker {self._fmt.marker!r} did not end up as token "
                    f"{self._marker_id} at the end of the step (it merged with neighbouring text?)"
                )
            pos = len(tokens) - 1 + self._fmt.offset
            extends = tokens[:n] == parent.tokens
            if not text.startswith(parent.text):
                self._note("the chat template is not prefix-stable (rendering k+1 steps does not extend k)")
            elif not extends:
                self._note("a step boundary is not a token boundary of this tokenizer (the text around it "
                           "tokenizes differently as a whole)")
            base = parent.seq if (parent.seq is not None and extends and pos >= n) else None
            if base is None:
                self._reencodes += 1
            path = _Path(parent.question, parent.steps + tuple(steps), text, tokens, None, answer_start=parent.answer_start)
            plans.append(_Plan(path, base, n if base is not None else 0, pos, parent))
        return plans

    # ---------------------------------------------------------------- model
    def _batches(self, new_tokens: list[list[int]], limit: int | None = None):
        """(i, j) row ranges of at most ``limit`` padded new tokens (default: this device's
        prefill budget), split where padding costs more than another forward
        (:func:`ponder.hf._batching.token_batches`)."""
        return token_batches([len(r) for r in new_tokens], self._batch_tokens if limit is None else limit, self._overhead)

    def _sorted_batches(self, new_tokens: list[list[int]], limit: int | None = None) -> list[list[int]]:
        """Row indices per forward, rows sorted by their new tokens so that each forward pads
        little (:func:`ponder.hf._batching.sorted_token_batches`); a row's results do not
        depend on its batch beyond float rounding."""
        return sorted_token_batches([len(r) for r in new_tokens], self._batch_tokens if limit is None else limit,
                                    self._overhead)

    @torch.inference_mode()
    def _logratios(self, seqs: list[int], new_tokens: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """implicit-prm: append ``new_tokens[i]`` to ``seqs[i]`` in both models. Returns, per
        row, float32 [m-1] (CPU): log pi_theta - log pi_ref of new token t+1 at new position t,
        and float32 [V] (model device): the log-ratio row of the last new position."""
        gathered: list[torch.Tensor | None] = [None] * len(seqs)
        tails: list[torch.Tensor | None] = [None] * len(seqs)
        for rows in self._sorted_batches(new_tokens, self._logratio_batch_tokens):
            batch = self.kv.prepare([seqs[r] for r in rows], [new_tokens[r] for r in rows])
            ratio = batch.run(self.model).logits.float().log_softmax(-1)
            ratio -= batch.on(self.ref_kv).run(self.ref_model).logits.float().log_softmax(-1)
            for b, r in enumerate(rows):
                toks = new_tokens[r]
                m = len(toks)
                nxt = torch.tensor(toks[1:], dtype=torch.long, device=ratio.device)
                gathered[r] = ratio[b, : m - 1].gather(-1, nxt[:, None]).squeeze(-1).cpu()
                tails[r] = ratio[b, m - 1].clone()
        return gathered, tails

    def _implicit_scores(self, plans: list[_Plan], seqs: list[int], rows: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Run the rows through both models and set each plan's q and tail; sigmoid(q) float32 [B]."""
        gathered, tails = self._logratios(seqs, rows)
        qs = []
        for plan, g, tail, start, row in zip(plans, gathered, tails, starts, rows):
            g, a = g.double(), plan.path.answer_start
            parent_cum = plan.parent.cum if plan.parent.cum is not None else torch.zeros(0, dtype=torch.float64)
            if plan.base is not None:  # the parent's tail scores the first new token
                prefix = parent_cum
                new = torch.cat([torch.tensor([float(plan.parent.tail[row[0]])], dtype=torch.float64), g])
            elif start >= a:  # tokens a..start are the parent's (token start is in the shared prefix)
                prefix, new = parent_cum[: start - a + 1], g
            else:  # recomputed from the question part: count the tokens from answer_start on
                prefix, new = parent_cum[:0], g[a - start - 1 :]
            offset = float(prefix[-1]) if len(prefix) else 0.0
            cum = torch.cat([prefix, offset + torch.cumsum(new, 0)])
            q = self.beta * (float(cum[-1]) if len(cum) else 0.0)
            plan.path.q, plan.path.tail, plan.path.cum = q, tail, cum
            qs.append(q)
        return torch.sigmoid(torch.tensor(qs, dtype=torch.float64)).float()

    @torch.inference_mode()
    def _scores_at(self, seqs: list[int], new_tokens: list[list[int]], positions: list[list[int]]) -> list[torch.Tensor]:
        """Append ``new_tokens[i]`` to ``seqs[i]``; P(correct) read at each index of
        ``positions[i]`` (indices into row i's new tokens). Returns per row float32
        [len(positions[i])] (CPU). Rows go in batches of bounded size."""
        out: list[torch.Tensor | None] = [None] * len(seqs)
        for idx in self._sorted_batches(new_tokens):
            batch = self.kv.prepare([seqs[r] for r in idx], [new_tokens[r] for r in idx])
            counts = [len(positions[r]) for r in idx]
            flat = torch.tensor([x for r in idx for x in positions[r]], dtype=torch.long)
            keep, where = torch.unique(flat, return_inverse=True)
            # Only the scored positions get logits (a vocabulary-sized row per new token would
            # dominate memory for large vocabularies).
            logits = batch.run(self.model, logits_to_keep=keep.to(self.device)).logits  # [b, len(keep), V]
            row_of = torch.repeat_interleave(torch.arange(len(idx)), torch.tensor(counts))
            rows = logits[row_of.to(self.device), where.to(self.device)]  # [sum(counts), V or 2]
            if self._columns is not None:
                rows = rows[:, self._columns]
            for r, got in zip(idx, self._fmt.probability(rows).cpu().split(counts)):
                out[r] = got
        return out

    def _check_positions(self, lengths: Sequence[int]) -> None:
        """ValueError when an input of ``lengths`` tokens would run past ``max_positions``
        (scores there would be silently wrong)."""
        longest = max(lengths, default=0)
        if self.max_positions is not None and longest > self.max_positions:
            raise ValueError(f"HFPRM: a path's input has {longest} tokens, more than the PRM's {self.max_positions} "
                             "positions (max_position_embeddings); end paths earlier (SearchConfig.max_steps, "
                             "SamplingParams.max_step_tokens) or use a PRM with a longer context")

    def _reserve(self) -> int:
        """Tokens a path's input must have left for one more (one-character) step: the format's
        per-step tokens (separator, marker, template tail) measured once, plus 2 for merges."""
        if self._step_cost is None:
            q, a = "1 + 1?", ["1 + 1 = 2."]
            one = self._encode_many([self._node_text(q, a), self._node_text(q, a + ["x"])])
            self._step_cost = max(1, len(one[1]) - len(one[0])) + 2
        return self._step_cost

    def fit_steps(self, questions: Sequence[str], paths: Sequence[Sequence[str]]) -> list[tuple[str, bool]]:
        """:meth:`ponder.protocols.ContextFit.fit_steps`: for each path (its problem and step
        texts, the last one new), the last step cut to its longest prefix whose input fits
        ``max_positions`` (unchanged when it fits) and whether the path is *full*: cut, or
        fewer tokens left than another step needs. ValueError when not even an empty last step
        fits (its parent was full). Without ``max_positions`` every step fits."""
        if len(questions) != len(paths):
            raise ValueError(f"fit_steps: {len(questions)} questions for {len(paths)} paths")
        if any(not p for p in paths):
            raise ValueError("fit_steps: every path needs at least its new step")
        if self.max_positions is None:
            return [(str(p[-1]), False) for p in paths]
        limit, reserve = self.max_positions, self._reserve()
        texts = [self._node_text(str(q), [str(x) for x in p]) for q, p in zip(questions, paths)]
        out = []
        for q, p, toks in zip(questions, paths, self._encode_many(texts)):
            step = str(p[-1])
            if len(toks) <= limit:
                out.append((step, limit - len(toks) < reserve))
                continue
            head = [str(x) for x in p[:-1]]

            def fits(k: int) -> bool:
                return len(self.encode_full(self._node_text(str(q), head + [step[:k]]))) <= limit

            if not fits(0):
                raise ValueError(f"HFPRM: the path already fills the PRM's {limit} positions: not even an empty "
                                 "step fits after it; end such paths earlier")
            lo, hi = 0, len(step)  # fits(lo), not fits(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            out.append((step[:lo], True))
        return out

    def _realize(self, plans: list[_Plan], also: list[list[int]] | None = None) -> tuple[list[int], list[list[float]]]:
        """Create one sequence per plan (fork of its base, or a new sequence over the cached
        prefix) and run its new tokens. Returns (sequences, scores): ``scores[i]`` holds the
        score at each absolute token index of ``also[i]`` (prefixes of the plan's path ending
        there; none: ``also`` None) followed by the score at the plan's own position."""
        also = [[] for _ in plans] if also is None else also
        self._check_positions([len(plan.path.tokens) for plan in plans])
        seqs: list[int] = []
        rows: list[list[int]] = []
        positions: list[list[int]] = []
        starts: list[int] = []
        try:
            for plan, extra in zip(plans, also):
                toks = plan.path.tokens
                if plan.base is not None:
                    (seq,) = self.kv.fork(plan.base, 1)
                    start = plan.base_len
                elif self.ref_model is not None:
                    # Every token from answer_start on is scored: the cache may give the question
                    # part, or the prefix shared with the parent (whose sums cover it), minus its
                    # last token (whose log-ratio row scores the next).
                    shared = _common_prefix(toks, plan.parent.tokens)
                    seq, start = self.kv.new_sequence(toks[: max(plan.path.answer_start, shared)])
                else:
                    # At most the first scored position's tokens come from the cache: every
                    # scored position is computed.
                    seq, start = self.kv.new_sequence(toks[: min([plan.pos, *extra]) + 1])
                seqs.append(int(seq))
                rows.append(toks[start:])
                positions.append([p - start for p in (*extra, plan.pos)])
                starts.append(start)
            if self.ref_model is not None:
                finals = self._implicit_scores(plans, seqs, rows, starts).tolist()
                scores = [[self._prefix_implicit(plan.path, p) for p in extra] + [q]
                          for plan, extra, q in zip(plans, also, finals)]
            else:
                scores = [t.tolist() for t in self._scores_at(seqs, rows, positions)]
        except BaseException:
            self.kv.free(seqs)
            raise
        return seqs, scores

    def _prefix_implicit(self, path: _Path, end: int) -> float:
        """implicit-prm: the score of the prefix of ``path`` whose last token is index ``end``
        (float32-rounded, as ``_implicit_scores`` returns it)."""
        k = end - path.answer_start
        q = self.beta * float(path.cum[k]) if path.cum is not None and k >= 0 else 0.0
        return float(torch.sigmoid(torch.tensor([q], dtype=torch.float64)).float())

    # ---------------------------------------------------------------- PRM protocol
    def start(self, root_ids: Sequence[int], problems: Sequence[str]) -> None:
        """Prefill each distinct question part once (identical ones fork the first)."""
        root_ids = [int(r) for r in root_ids]
        if len(root_ids) != len(problems):
            raise ValueError(f"root_ids has {len(root_ids)} entries but problems has {len(problems)}")
        self._check_new(root_ids)
        for r, p in zip(root_ids, self._root_paths(problems)):
            self._nodes[r] = p

    def _root_paths(self, problems: Sequence[str]) -> list[_Path]:
        """One root path per problem, its question part prefilled (each distinct one once; on
        an error nothing is kept)."""
        paths = []
        for q in problems:
            text = self._fmt.root_text(q)
            tokens = self.encode_full(text)
            if self.ref_model is not None and not tokens:
                raise ValueError(f"format {self.format!r}: the question part of the input is empty, so no "
                                 "token can score the first step (a chat template renders at least the user turn)")
            paths.append(_Path(q, (), text, tokens, None, answer_start=len(tokens)))
        self._check_positions([len(p.tokens) for p in paths])
        held = [i for i, p in enumerate(paths) if p.tokens]  # an empty question part has no sequence
        if self.ref_model is not None:  # the last position's log-ratio row scores the first step's first token
            def run(seqs, rows):
                return self._logratios(seqs, rows)[1]
        else:
            def run(seqs, rows):
                return self._scores_at(seqs, rows, [[len(r) - 1] for r in rows])
        seqs, tails = prefill_distinct(self.kv, [paths[i].tokens for i in held], run)
        for i, seq, tail in zip(held, seqs, tails):
            paths[i].seq = seq
            if self.ref_model is not None:
                paths[i].tail = tail
        return paths

    def restore(self, node_ids: Sequence[int], paths: Sequence[NodePath]) -> int:
        """:meth:`ponder.protocols.Resumable.restore`: a root is started again; any other node
        re-renders its question and steps and runs the tokens its path's cached prefix lacks
        (what ``score_steps`` would have kept for it: same text, tokens and, for implicit-prm,
        sums). Returns the tokens run through the PRM. All or nothing (KVCacheFull when they
        do not fit); ValueError / TypeError as :func:`ponder.protocols.check_restore_args`."""
        node_ids = [int(x) for x in node_ids]
        check_restore_args(self._nodes, "PRM", node_ids, paths)
        if not node_ids:
            return 0
        before = int(self.kv.stats()["tokens_appended"])
        roots = self._root_paths([p.problem for p in paths])
        deep = [i for i, p in enumerate(paths) if p.steps]
        try:
            plans = self._plans([roots[i] for i in deep], [list(paths[i].steps) for i in deep])
            seqs, _ = self._realize(plans)
        except BaseException:
            self.kv.free([r.seq for r in roots if r.seq is not None])
            raise
        self.kv.free([roots[i].seq for i in deep if roots[i].seq is not None])
        for i, plan, seq in zip(deep, plans, seqs):
            plan.path.seq = seq
            roots[i] = plan.path
        for x, p in zip(node_ids, roots):
            self._nodes[x] = p
        return int(self.kv.stats()["tokens_appended"]) - before

    def score_steps(
        self,
        parent_ids: Sequence[int],
        child_ids: Sequence[int],
        steps: Sequence[str],
        lookahead: Sequence[Sequence[str]] | None = None,
    ) -> list[float]:
        """Score ``steps[i]`` as the next step of ``parent_ids[i]``'s path and keep the extended
        path as node ``child_ids[i]``; with ``lookahead[i]`` non-empty the score is that of the
        last lookahead step, computed on a temporary fork of the child (freed at once)."""
        check_score_steps_args(parent_ids, child_ids, steps, lookahead)
        parent_ids = [int(p) for p in parent_ids]
        child_ids = [int(c) for c in child_ids]
        if not child_ids:
            return []
        missing = sorted({p for p in parent_ids if p not in self._nodes})
        if missing:
            raise KeyError(f"nodes {missing[:8]} are not held by this PRM (never started/scored, or released)")
        self._check_new(child_ids)

        plans = self._plans([self._nodes[p] for p in parent_ids], [[s] for s in steps])
        seqs, scores = self._realize(plans)
        for c, plan, seq in zip(child_ids, plans, seqs):
            plan.path.seq = seq
            self._nodes[c] = plan.path
        result = [row[-1] for row in scores]
        self._steps_scored += len(child_ids)

        ahead = [i for i in range(len(child_ids)) if lookahead is not None and len(lookahead[i]) > 0]
        if ahead:
            temp = self._plans([plans[i].path for i in ahead], [list(lookahead[i]) for i in ahead])
            tseqs, tscores = self._realize(temp)
            self.kv.free(tseqs)
            for i, row in zip(ahead, tscores):
                result[i] = row[-1]
            self._steps_scored += sum(len(lookahead[i]) for i in ahead)
        return [float(s) for s in result]

    def score_paths(self, node_ids: Sequence[int], paths: Sequence[Sequence[str]]) -> list[list[float]]:
        """:meth:`ponder.protocols.PathScorer.score_paths`: every step score of each
        continuation, one forward row per path (on a fork of its node's sequence). A step whose
        path tokens are not a prefix of the whole path's (a merged step boundary) gets a row of
        its own, so every score equals :meth:`score_steps`' for that step. Nothing is kept:
        every sequence made is freed before returning (full blocks stay in the prefix cache).
        KeyError / ValueError / TypeError as :func:`check_score_paths_args` and for ids not
        held; KVCacheFull when one row alone does not fit the blocks free."""
        check_score_paths_args(node_ids, paths)
        node_ids = [int(n) for n in node_ids]
        missing = sorted({n for n in node_ids if n not in self._nodes})
        if missing:
            raise KeyError(f"nodes {missing[:8]} are not held by this PRM (never started/scored, or released)")
        paths = [[str(x) for x in p] for p in paths]
        out: list[list[float]] = [[math.nan] * len(p) for p in paths]
        todo = [i for i, p in enumerate(paths) if p]
        if not todo:
            return out
        base = [self._nodes[node_ids[i]] for i in todo]
        plans = self._plans(base, [paths[i] for i in todo])
        # where each earlier step ends in the whole path's tokens (or a row of its own)
        prefix_texts = [self._node_text(b.question, b.steps + tuple(paths[i][:k]))
                        for i, b in zip(todo, base) for k in range(1, len(paths[i]))]
        prefix_tokens = iter(self._encode_many(prefix_texts) if prefix_texts else [])
        jobs: list[tuple[_Plan, list[int], list[int]]] = []  # (plan, extra positions read, steps they score)
        owners: list[tuple[int, int]] = []  # (path, step of the plan's own position)
        lone: list[tuple[int, int]] = []  # (path, k): steps 0..k-1 scored on a row of its own
        for i, plan in zip(todo, plans):
            full = plan.path.tokens
            pos, steps = [], []
            for k in range(1, len(paths[i])):
                toks = next(prefix_tokens)
                at = len(toks) - 1 + self._fmt.offset
                # marker formats read a position of this row: after the parent's tokens
                ok = self.ref_model is not None or (bool(toks) and toks[-1] == self._marker_id and at >= len(plan.parent.tokens))
                if ok and full[: len(toks)] == toks:
                    pos.append(at)
                    steps.append(k - 1)
                else:
                    lone.append((i, k))
            jobs.append((plan, pos, steps))
            owners.append((i, len(paths[i]) - 1))
        if lone:
            extra = self._plans([self._nodes[node_ids[i]] for i, _ in lone], [paths[i][:k] for i, k in lone])
            jobs += [(plan, [], []) for plan in extra]
            owners += [(i, k - 1) for i, k in lone]
        order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][0].path.tokens) - jobs[j][0].base_len)
        # chunks of bounded new tokens that fit the blocks free now (a row takes at most its new
        # tokens' blocks + its fork's copied tail): each chunk's sequences are freed before the
        # next, so a search's whole solutions never need the pool at once, only its longest row
        sizes = [[0] * max(1, len(jobs[j][0].path.tokens) - jobs[j][0].base_len) for j in order]
        bs = int(self.kv.block_size)
        need = [-(-len(x) // bs) + 1 for x in sizes]
        for a, b in self._batches(sizes):
            x = a
            while x < b:
                free, y, used = self.kv_free_blocks(), x, 0
                while y < b and (y == x or used + need[y] <= free):
                    used += need[y]
                    y += 1
                chunk = [order[z] for z in range(x, y)]
                x = y
                seqs, scores = self._realize([jobs[j][0] for j in chunk], [jobs[j][1] for j in chunk])
                self.kv.free(seqs)
                for j, row in zip(chunk, scores):
                    i, last = owners[j]
                    for k, v in zip(jobs[j][2], row[:-1]):
                        out[i][k] = float(v)
                    out[i][last] = float(row[-1])
        self._steps_scored += sum(len(p) for p in paths)
        return out

    def release(self, node_ids: Sequence[int]) -> None:
        """Free the nodes' sequences; ids not held are ignored."""
        seqs = []
        for n in node_ids:
            p = self._nodes.pop(int(n), None)
            if p is not None and p.seq is not None:
                seqs.append(p.seq)
        if seqs:
            self.kv.free(seqs)

    def kv_free_blocks(self) -> int:
        """KV blocks a new sequence may take now: free + evictable (cached, unreferenced)."""
        st = self.kv.stats()
        return int(st["blocks_free"]) + int(st.get("blocks_evictable", 0))

    @property
    def kv_block_size(self) -> int:
        return int(self.kv.block_size)

    def stats(self) -> dict[str, int]:
        """Counters: tokens_scored (tokens run through the PRM = the KV cache's tokens_appended),
        steps_scored (lookahead steps included), full_reencodes (paths that could not extend their
        parent's sequence: a step boundary merged tokens, the template is not prefix-stable, or an
        implicit-prm step added no token; computed from their longest cached prefix), live_nodes, num_parameters (an implicit PRM: its reference's
        too), and the cache's counters as ``kv_*``."""
        kv = self.kv.stats()
        return _model_stats(
            {
                "tokens_scored": kv["tokens_appended"],
                "steps_scored": self._steps_scored,
                "full_reencodes": self._reencodes,
            },
            len(self._nodes), self.num_parameters, kv,
        )

    def _check_new(self, ids: Sequence[int]) -> None:
        _check_new_ids(ids, self._nodes, "PRM")
