"""The recompute baseline: a policy and a PRM that work the way search-and-learn does.

huggingface/search-and-learn keeps no state between search iterations: every generation call
sends each beam's whole text (prompt + all steps so far) to the engine, which encodes it from
scratch and then decodes the next step; every PRM call renders each beam's whole path and runs
it through the PRM from the first token. Work per iteration therefore grows with the depth of
the path, and a search costs O(depth^2) tokens where ponder's paged, tree-shaped caches cost
each token of the tree once.

``RecomputePolicy`` and ``RecomputePRM`` implement :class:`ponder.protocols.Policy` /
:class:`ponder.protocols.PRM` that way, *wrapping an existing* :class:`ponder.HFPolicy` /
:class:`ponder.HFPRM`: the same model, tokenizer, prompt formatting, PRM input formatting,
stopping rules and sampling loop (``ponder.hf.sampling.sample_step_batch``), and the same seeding rule. The one
difference is caching:

* ``RecomputePolicy.sample_steps``: each row (one per child) re-encodes its parent's full path
  with a fresh ``transformers.DynamicCache`` (rows left-padded into one batch), then decodes
  the step token by token in that cache; rows leave the batch when they stop.
  ``rollout`` does the same for every lookahead step (search-and-learn calls the engine once per
  lookahead step with the whole text).
* ``RecomputePRM.score_steps``: each path (and each path + lookahead) is rendered in full with
  the PRM's format, tokenized with the reference tokenization and scored from scratch, no cache.
* ``RecomputePRM.score_paths`` (search-and-learn's best-of-N PRM): each finished solution is
  rendered in full and run through the plain model once, every step read at its marker
  (implicit-prm: both models run in full, the log-ratios summed from the question part on).

With greedy decoding (temperature 0) both sides produce the same steps and the same scores (up
to float rounding of a different attention code path: unpadded paged vs. padded SDPA); with a
seed they draw from the generator in the same order (all rows of a call decode as one batch,
finished rows leave it, as in ``HFPolicy``).

Counters (``stats()``): the policy's ``tokens_prefilled`` = every token run through the model
(full paths re-encoded + decoded tokens fed back), ``tokens_generated`` = sampled tokens; the
PRM's ``tokens_scored`` = the formatted tokens of every full path run. Pad tokens are not
counted (they are an artefact of batching, not work the method asks for).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..hf.policy import HFPolicy
from ..hf.prm import HFPRM
from ..hf.prm.hf_prm import check_score_paths_args
from ..hf.sampling import SeededStream, sample_step_batch
from ..protocols import NodePath, SamplingParams, Step, check_restore_args, check_sampling_params, check_score_steps_args

__all__ = ["RecomputePRM", "RecomputePolicy"]

def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids int64 [B, L], attention_mask int64 [B, L]), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


class RecomputePolicy:
    """:class:`ponder.protocols.Policy` that recomputes every path from scratch on every call.

    Args:
        policy: the :class:`ponder.HFPolicy` whose model, tokenizer and prompt formatting are
            used (its own KV cache is not touched; the model runs without it, through SDPA).
    """

    def __init__(self, policy: HFPolicy) -> None:
        self.inner = policy
        self.model = policy.model
        self.tokenizer = policy.tokenizer
        self.device = policy.device
        self.eos_ids = set(policy.eos_ids)
        self.num_parameters = policy.num_parameters
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(sorted(self.eos_ids)), 0))
        self._paths: dict[int, list[int]] = {}  # node id -> prompt + step tokens
        self._stream = SeededStream(self.device)
        self._tokens_prefilled = 0
        self._tokens_generated = 0
        self._forward_passes = 0

    # ---------------------------------------------------------------- Policy protocol
    def start(self, root_ids: Sequence[int], problems: Sequence[str]) -> list[list[int]]:
        """Tokenize each prompt (HFPolicy's formatting); nothing is computed until a step is asked."""
        if len(root_ids) != len(problems):
            raise ValueError(f"root_ids has {len(root_ids)} entries but problems has {len(problems)}")
        if not self._paths:
            self._stream.restart()  # a new search, as in HFPolicy.start
        prompts = [self.inner.prompt_tokens(p) for p in problems]
        for r, toks in zip(root_ids, prompts):
            if not toks:
                raise ValueError("a problem renders to an empty prompt; the policy needs at least one token")
            self._paths[int(r)] = list(toks)
        return [list(t) for t in prompts]

    def sample_steps(self, parent_ids: Sequence[int], child_ids: Sequence[int], params: SamplingParams) -> list[Step]:
        """One step per child: re-encode the parent's whole path, then decode the step."""
        check_sampling_params(params)
        if len(parent_ids) != len(child_ids):
            raise ValueError(f"parent_ids has {len(parent_ids)} entries but child_ids has {len(child_ids)}")
        if not child_ids:
            return []
        paths = [self._path(p) for p in parent_ids]
        steps = self._generate_step(paths, params)
        for c, path, step in zip(child_ids, paths, steps):
            self._paths[int(c)] = path + step.tokens
        return steps

    def rollout(self, node_ids: Sequence[int], num_steps: int, params: SamplingParams) -> list[list[Step]]:
        """Lookahead the search-and-learn way: one full re-encode + decode per lookahead step."""
        check_sampling_params(params)
        out: list[list[Step]] = [[] for _ in node_ids]
        if num_steps <= 0 or not node_ids:
            return out
        texts = [self._path(n) for n in node_ids]
        rows = list(range(len(node_ids)))
        for _ in range(num_steps):
            steps = self._generate_step([texts[i] for i in rows], params)
            for i, step in zip(rows, steps):
                out[i].append(step)
                texts[i] = texts[i] + step.tokens
            rows = [i for i, step in zip(rows, steps) if not step.eos]
            if not rows:
                break
        return out

    def release(self, node_ids: Sequence[int]) -> None:
        for n in node_ids:
            self._paths.pop(int(n), None)

    def restore(self, node_ids: Sequence[int], paths: Sequence[NodePath]) -> int:
        """:meth:`ponder.protocols.Resumable.restore`: remember each node's token path (nothing
        is computed until a step is asked; returns 0)."""
        check_restore_args(self._paths, "policy", [int(x) for x in node_ids], paths)
        for x, p in zip(node_ids, paths):
            self._paths[int(x)] = list(p.tokens)
        return 0

    def stats(self) -> dict[str, int]:
        """tokens_prefilled: tokens run through the model (full re-encodes + decoded tokens fed);
        tokens_generated: sampled tokens; forward_passes; live_nodes; num_parameters."""
        return {
            "tokens_prefilled": self._tokens_prefilled,
            "tokens_generated": self._tokens_generated,
            "forward_passes": self._forward_passes,
            "live_nodes": len(self._paths),
            "num_parameters": int(self.num_parameters),
        }

    # ---------------------------------------------------------------- internals
    def _path(self, node: int) -> list[int]:
        try:
            return self._paths[int(node)]
        except KeyError:
            raise KeyError(f"node {node} is not held by this policy (never started/sampled, or released)") from None

    def _rng(self, params: SamplingParams) -> torch.Generator | None:
        return self._stream.generator(params)  # HFPolicy's seeding rule, on a stream of our own

    @torch.inference_mode()
    def _generate_step(self, paths: list[list[int]], params: SamplingParams) -> list[Step]:
        """Encode every path from scratch in a fresh DynamicCache (one left-padded batch), then
        sample one step per row token by token; a row stops at the delimiter, EOS or the limit
        (HFPolicy's rules) and leaves the batch."""
        from transformers import DynamicCache

        gen = self._rng(params)
        cache = DynamicCache()
        ids, mask = _left_pad(paths, self.pad_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        self._forward_passes += 1
        self._tokens_prefilled += sum(len(p) for p in paths)
        logits = out.logits[:, -1]
        next_pos = torch.tensor([len(p) for p in paths], dtype=torch.long, device=self.device)

        state = {"mask": mask, "next_pos": next_pos}

        def advance(rows: list[int], positions: list[int], last: list[int]) -> torch.Tensor:
            mask, next_pos = state["mask"], state["next_pos"]
            if len(positions) < mask.shape[0]:
                sel = torch.tensor(positions, dtype=torch.long, device=self.device)
                cache.batch_select_indices(sel)
                mask, next_pos = mask[sel], next_pos[sel]
            feed = torch.tensor([[t] for t in last], dtype=torch.long, device=self.device)
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=self.device)], dim=1)
            out = self.model(input_ids=feed, attention_mask=mask, position_ids=next_pos[:, None], cache=cache, use_cache=True)
            self._forward_passes += 1
            self._tokens_prefilled += len(rows)
            state["mask"], state["next_pos"] = mask, next_pos + 1
            return out.logits[:, -1]

        steps = sample_step_batch(logits, params, gen, self.tokenizer, self.eos_ids, advance)
        self._tokens_generated += sum(len(s.tokens) for s in steps)
        return steps


class RecomputePRM:
    """:class:`ponder.protocols.PRM` that renders and scores every full path from scratch.

    Args:
        prm: the :class:`ponder.HFPRM` whose model, tokenizer and input format are used (its
            KV cache is not touched; the model runs without it, through SDPA).

    Besides the counters, it records the PRM tokens each *node* adds to its parent's formatted
    input (``unique_tokens`` in ``stats()``: distinct question parts once, then per scored path
    its new tokens): what a cache that computes every formatted token once must compute.
    """

    def __init__(self, prm: HFPRM) -> None:
        self.inner = prm
        self.model = prm.model
        self.tokenizer = prm.tokenizer
        self.device = prm.device
        self.num_parameters = prm.num_parameters
        self._nodes: dict[int, tuple[str, tuple[str, ...], int]] = {}  # id -> (question, steps, formatted length)
        self._questions_seen: set[str] = set()
        self._tokens_scored = 0
        self._steps_scored = 0
        self._forward_passes = 0
        self._unique = 0
        self._starts: dict[str, int] = {}  # question -> its question part's token count

    # ---------------------------------------------------------------- PRM protocol
    def start(self, root_ids: Sequence[int], problems: Sequence[str]) -> None:
        """Remember each root's question; nothing is scored (the question is re-sent with every path)."""
        if len(root_ids) != len(problems):
            raise ValueError(f"root_ids has {len(root_ids)} entries but problems has {len(problems)}")
        for r, q in zip(root_ids, problems):
            n = len(self.inner.encode_full(self.inner._fmt.root_text(q)))
            self._nodes[int(r)] = (q, (), n)
            if q not in self._questions_seen:
                self._questions_seen.add(q)
                self._unique += n

    def score_steps(
        self,
        parent_ids: Sequence[int],
        child_ids: Sequence[int],
        steps: Sequence[str],
        lookahead: Sequence[Sequence[str]] | None = None,
    ) -> list[float]:
        check_score_steps_args(parent_ids, child_ids, steps, lookahead)
        if not child_ids:
            return []
        jobs: list[tuple[str, tuple[str, ...]]] = []  # the full path whose last step is scored
        for i, (p, s) in enumerate(zip(parent_ids, steps)):
            question, path, _ = self._node(p)
            extra = tuple(lookahead[i]) if lookahead is not None else ()
            jobs.append((question, path + (s,) + extra))
        tokens = [self.inner.encode_full(self.inner._node_text(q, path)) for q, path in jobs]
        scores = self._score_full(tokens, [self._answer_start(q) for q, _ in jobs])
        for i, (c, p, s) in enumerate(zip(child_ids, parent_ids, steps)):
            question, path, parent_len = self._node(p)
            child_path = path + (s,)
            extra = len(lookahead[i]) if lookahead is not None else 0
            child_len = len(tokens[i]) if not extra else len(self.inner.encode_full(self.inner._node_text(question, child_path)))
            self._unique += (child_len - parent_len) + (len(tokens[i]) - child_len)
            self._nodes[int(c)] = (question, child_path, child_len)
            self._steps_scored += 1 + extra
        return [float(x) for x in scores]

    def score_paths(self, node_ids: Sequence[int], paths: Sequence[Sequence[str]]) -> list[list[float]]:
        """:meth:`ponder.protocols.PathScorer.score_paths` the search-and-learn way: each whole
        path rendered, tokenized and run through the plain model once (no cache; rows of
        similar length left-padded together, at most the PRM's prefill budget of tokens a
        forward), every step read at its marker. A step whose path tokens are not a prefix of
        the whole path's gets a row of its own."""
        check_score_paths_args(node_ids, paths)
        base = [self._node(n) for n in node_ids]
        out: list[list[float]] = [[math.nan] * len(p) for p in paths]
        rows: list[list[int]] = []
        reads: list[list[tuple[int, int, int]]] = []  # per row: (path, step, token index of its marker)
        inner = self.inner
        for i, ((question, before, start_len), steps) in enumerate(zip(base, paths)):
            steps = [str(x) for x in steps]
            if not steps:
                continue
            full = inner.encode_full(inner._node_text(question, before + tuple(steps)))
            mine = [(i, len(steps) - 1, len(full) - 1)]
            for k in range(1, len(steps)):
                toks = inner.encode_full(inner._node_text(question, before + tuple(steps[:k])))
                if full[: len(toks)] == toks:
                    mine.append((i, k - 1, len(toks) - 1))
                else:
                    rows.append(toks)
                    reads.append([(i, k - 1, len(toks) - 1)])
            rows.append(full)
            reads.append(mine)
            self._unique += len(full) - start_len
            self._steps_scored += len(steps)
        order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
        for a, b in self.inner._batches([rows[r] for r in order]):
            chunk = order[a:b]
            got = self._score_at([rows[r] for r in chunk], [[m for _, _, m in reads[r]] for r in chunk],
                                 [self._answer_start(base[reads[r][0][0]][0]) for r in chunk])
            for r, values in zip(chunk, got):
                for (i, k, _), v in zip(reads[r], values):
                    out[i][k] = float(v)
        return out

    def release(self, node_ids: Sequence[int]) -> None:
        for n in node_ids:
            self._nodes.pop(int(n), None)

    def restore(self, node_ids: Sequence[int], paths: Sequence[NodePath]) -> int:
        """:meth:`ponder.protocols.Resumable.restore`: remember each node's question and steps
        (nothing is scored: every path is re-sent in full anyway; returns 0)."""
        check_restore_args(self._nodes, "PRM", [int(x) for x in node_ids], paths)
        for x, p in zip(node_ids, paths):
            steps = tuple(p.steps)
            text = self.inner._node_text(p.problem, steps) if steps else self.inner._fmt.root_text(p.problem)
            self._nodes[int(x)] = (p.problem, steps, len(self.inner.encode_full(text)))
        return 0

    def stats(self) -> dict[str, int]:
        """tokens_scored: formatted tokens run through the PRM (every full path, every call);
        unique_tokens: the formatted tokens of the tree counted once; steps_scored;
        forward_passes; live_nodes; num_parameters."""
        return {
            "tokens_scored": self._tokens_scored,
            "unique_tokens": self._unique,
            "steps_scored": self._steps_scored,
            "forward_passes": self._forward_passes,
            "live_nodes": len(self._nodes),
            "num_parameters": int(self.num_parameters),
        }

    # ---------------------------------------------------------------- internals
    def _node(self, node: int) -> tuple[str, tuple[str, ...], int]:
        try:
            return self._nodes[int(node)]
        except KeyError:
            raise KeyError(f"node {node} is not held by this PRM (never started/scored, or released)") from None

    def _answer_start(self, question: str) -> int:
        """implicit-prm: the question part's token count (its tokens are not scored)."""
        if question not in self._starts:
            self._starts[question] = len(self.inner.encode_full(self.inner._fmt.root_text(question)))
        return self._starts[question]

    def _score_full(self, rows: list[list[int]], starts: list[int]) -> list[float]:
        """The score of the last step of every full formatted path (one left-padded forward,
        no cache): marker formats read P(correct) at the final marker (+ offset); implicit-prm
        sums the log-ratios of the tokens from ``starts[i]`` on."""
        marker = self.inner._marker_id
        for r in rows:
            if self.inner.ref_model is None and (not r or r[-1] != marker):
                raise ValueError(f"format {self.inner.format!r}: a path does not end with the marker token {marker}")
        return [v[0] for v in self._score_at(rows, [[len(r) - 1] for r in rows], starts)]

    @torch.inference_mode()
    def _score_at(self, rows: list[list[int]], markers: list[list[int]], starts: list[int]) -> list[list[float]]:
        """Run the token rows from scratch (one left-padded batch, no cache) and read the score
        of the prefix of row i ending at each token index of ``markers[i]``: marker formats
        P(correct) at that index + the format's offset; implicit-prm sigmoid(beta * the sum of
        log pi_theta - log pi_ref over tokens ``starts[i]`` .. index), both models run in full."""
        fmt, inner = self.inner._fmt, self.inner
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = _left_pad(rows, int(pad), self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        width = ids.shape[1]
        self._forward_passes += 1
        self._tokens_scored += sum(len(r) for r in rows)
        if inner.ref_model is not None:
            kw = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
            ratio = self.model(**kw).logits.float().log_softmax(-1)
            ratio -= inner.ref_model(**kw).logits.float().log_softmax(-1)
            out = []
            for r, row in enumerate(rows):
                off = width - len(row)  # token t of the row sits at column off + t; column c - 1 predicts it
                nxt = ids[r, off + 1 :, None]
                per_token = ratio[r, off : width - 1].gather(-1, nxt).squeeze(-1).double().cpu()  # tokens 1..len-1
                a = starts[r]
                cum = torch.cumsum(per_token[max(a - 1, 0) :], 0)
                qs = [inner.beta * float(cum[m - a]) if m >= a else 0.0 for m in markers[r]]
                out.append(torch.sigmoid(torch.tensor(qs, dtype=torch.float64)).float().tolist())
            return out
        # with left padding, token p of row i sits at column width - len(row i) + p
        cols = [[width - len(r) + m + fmt.offset for m in ms] for r, ms in zip(rows, markers)]
        keep, where = torch.unique(torch.tensor([c for cs in cols for c in cs], dtype=torch.long), return_inverse=True)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            logits_to_keep=keep.to(self.device)).logits
        row_of = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(cs) for cs in cols]))
        picked = logits[row_of.to(self.device), where.to(self.device)]
        if inner._columns is not None:
            picked = picked[:, inner._columns]
        probs = fmt.probability(picked).cpu().tolist()
        out, at = [], 0
        for cs in cols:
            out.append(probs[at : at + len(cs)])
            at += len(cs)
        return out
