"""``HFPolicy``: a Hugging Face causal LM as the search's policy, on ponder's paged KV cache.

The search tree's structure is the KV cache's structure: every live node owns one
:class:`ponder.hf.kv.PagedKVCache` sequence holding its path (prompt + steps). Expanding a node
forks its sequence once per child (blocks are shared, only a partial tail block is copied on
write), and all children of all problems decode together, one batched forward per token.

Token accounting (why the last token of a step is "pending"): when a step stops (delimiter,
EOS, limit) its last token has been *sampled* but not yet *run through the model*; running it
is only useful if the node is expanded (or rolled out) later. So a node's sequence holds its
path minus that pending token, and the first expansion / rollout of the node feeds it once
(batched over all such nodes) and keeps the resulting next-token logits on the node. Every token
of the tree is therefore computed at most once, and never for leaves that are pruned::

    tokens_prefilled == sum(prompt lengths) + sum(len(step) for every step) - (steps never expanded)

(prompts identical to an earlier root are forked, not recomputed; full blocks cached from
earlier sequences are reused by the prefix index and not recomputed either.)

Typical use::

    policy = HFPolicy("meta-llama/Llama-3.2-1B-Instruct", device="cuda", kv_budget=1 << 18)
    prompts = policy.start([0, 1], ["What is 2+2?", "What is 3*3?"])
    steps = policy.sample_steps([0, 0, 1, 1], [2, 3, 4, 5], SamplingParams(seed=0))
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..prompts import prompt_token_ids, render_prompt
from ..protocols import NodePath, SamplingParams, Step, check_restore_args, check_sampling_params
from ._batching import prefill_batch_tokens, prefill_distinct, sorted_token_batches
from ._loading import (
    _check_new_ids,
    _eos_ids,
    _hub_kwargs,
    _model_stats,
    default_device,
    load_tokenizer,
    max_positions,
    resolve_dtype,
    resolve_model_ref,
)
from .kv_fallback import cache_for_model
from .sampling import SeededStream, sample_step_batch

__all__ = ["HFPolicy", "SeededStream", "load_tokenizer", "resolve_dtype", "sample_step_batch"]


# ----------------------------------------------------------------------------- the policy


@dataclass
class _Node:
    """What the policy keeps for one live node.

    seq: its PagedKVCache sequence (the path, minus ``pending``); pending: the path's last token
    when it has not been run through the model yet (None once fed); logits: the next-token logits
    after the whole path (model dtype [V]), set once ``pending`` has been fed.
    """

    seq: int
    pending: int | None = None
    logits: torch.Tensor | None = None


class HFPolicy:
    """A Hugging Face causal LM implementing :class:`ponder.protocols.Policy`.

    Args:
        model_id_or_path: a local directory, a hub id (with ``HF_HUB_OFFLINE=1`` only the local
            cache is read) or ``builtin:<name>`` (the shipped models: ``builtin:policy-small``, ...).
        device, dtype: where and in what precision the model runs (``device=None``: cuda when
            torch sees a GPU, else cpu; ``dtype=None``: float32 on CPU, bfloat16 elsewhere).
        kv_budget: KV pool size in tokens (default: :data:`ponder.hf.kv.DEFAULT_TOKEN_BUDGET`, see
            :meth:`PagedKVCache.for_model`); it must hold every live path's unshared blocks.
        block_size: tokens per KV block (small blocks waste less on the private tail of each branch).
        system_prompt: system message of the chat template (None: no system message).
        use_chat_template: render problems with the tokenizer's chat template (generation prompt
            added) when it has one; otherwise (or when False) the prompt is the problem text
            tokenized with the tokenizer's special tokens (e.g. BOS).
        max_steps_per_rollout: the largest ``num_steps`` :meth:`rollout` accepts (a guard against
            runaway lookahead budgets).

        self_check: prove on a short probe, once per model, that the paged KV path reproduces
            the model's own logits (:func:`ponder.hf.kv.paged_refusal`); False trusts it.

    Models the check accepts run with ``attn_implementation="ponder_paged"`` on the paged,
    prefix-shared pool; the others (and hybrid / recurrent layouts) run exactly on
    transformers' own cache per sequence (:mod:`ponder.hf.kv_fallback`; one warning,
    ``stats()["kv_backend"] == "fallback"`` and ``stats()["kv_reason"]``). docs/kv_compat.md
    lists which families take which path.

    Sampling: one ``torch.Generator`` on the model's device, (re)seeded whenever a call brings a
    ``params.seed`` different from the last one, so a stream runs on across calls: the same seed
    and the same calls give the same steps. Greedy (temperature 0) draws nothing from it.
    Memory: besides its KV blocks, a node that was expanded or rolled out keeps its next-token
    logits (one [vocab] row, model dtype) until released.

    Context: ``max_positions`` (the config's ``max_position_embeddings`` or equivalent; None
    when it names none) bounds every path. A step stops (``truncated``) when its path reaches
    ``max_positions`` tokens, so its last token can still be run; a path at the limit cannot be
    extended (``sample_steps`` / ``rollout`` raise ValueError; the search tree ends such paths).
    Prompts longer than the limit are refused (ValueError).
    """

    def __init__(
        self,
        model_id_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        kv_budget: int | None = None,
        block_size: int = 16,
        system_prompt: str | None = None,
        use_chat_template: bool = True,
        max_steps_per_rollout: int = 32,
        trust_remote_code: bool = False,
        self_check: bool = True,
    ) -> None:
        from transformers import AutoModelForCausalLM

        model_id_or_path = resolve_model_ref(model_id_or_path)
        from ..toy.builtin import is_builtin_model

        # the shipped policies only understand builtin:arith's problems: warn once otherwise
        self._warn_unlike_builtin = is_builtin_model(model_id_or_path)
        self.device = default_device() if device is None else torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(model_id_or_path, trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            os.fspath(model_id_or_path),
            dtype=self.dtype,
            **_hub_kwargs(model_id_or_path, trust_remote_code),
        ).to(self.device).eval()
        # paged when the model passes the self-check, else transformers' own cache (ponder.hf.kv_fallback)
        self.kv = cache_for_model(self.model, block_size=block_size, token_budget=kv_budget, self_check=self_check)
        self._batch_tokens = prefill_batch_tokens(self.device)
        self.system_prompt = system_prompt
        self.use_chat_template = bool(use_chat_template) and bool(getattr(self.tokenizer, "chat_template", None))
        self.max_steps_per_rollout = int(max_steps_per_rollout)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        # the longest path (prompt + steps) the model may run; None: its config names no limit
        self.max_positions = max_positions(self.model)
        self._nodes: dict[int, _Node] = {}
        self._stream = SeededStream(self.device)
        self._streams: dict[int, torch.Generator] = {}  # sample_steps_seeded's per-request streams
        self._tokens_generated = 0
        self._forward_passes = 0

    # ---------------------------------------------------------------- prompts
    def format_prompt(self, problem: str) -> str:
        """The prompt text of a problem (``ponder.prompts.render_prompt``)."""
        return render_prompt(self.tokenizer, problem, self.system_prompt, self.use_chat_template)

    def prompt_tokens(self, problem: str) -> list[int]:
        """The prompt's token ids (``ponder.prompts.prompt_token_ids``)."""
        return prompt_token_ids(self.tokenizer, problem, self.system_prompt, self.use_chat_template)

    # ---------------------------------------------------------------- Policy protocol
    def start(self, root_ids: Sequence[int], problems: Sequence[str]) -> list[list[int]]:
        """Prefill each distinct prompt once (identical prompts fork the first one's sequence);
        returns each root's prompt token ids."""
        root_ids = [int(r) for r in root_ids]
        if len(root_ids) != len(problems):
            raise ValueError(f"root_ids has {len(root_ids)} entries but problems has {len(problems)}")
        self._check_new(root_ids)
        if not self._nodes:
            # A new search: restart the random stream so the same seed reproduces a search
            # whatever ran on this policy before (evaluations reuse one policy across methods,
            # batches and resumed runs).
            self._stream.restart()
        if self._warn_unlike_builtin:
            from ..toy.builtin import unlike_builtin_problems

            odd = unlike_builtin_problems(problems)
            if odd:
                self._warn_unlike_builtin = False
                warnings.warn(f"HFPolicy: the built-in policy only understands problems of the form \"Compute "
                              f"<expression>.\" (builtin:arith); got e.g. {odd[0][:60]!r}, so expect accuracy near 0",
                              UserWarning, stacklevel=2)
        prompts = [self.prompt_tokens(p) for p in problems]
        for p, toks in zip(problems, prompts):
            if not toks:
                raise ValueError(f"problem {p!r} renders to an empty prompt; the policy needs at least one token")
            if self.max_positions is not None and len(toks) > self.max_positions:
                raise ValueError(f"problem {p[:40]!r}... renders to a prompt of {len(toks)} tokens, more than the "
                                 f"policy's {self.max_positions} positions; shorten it")
        seqs, logits = prefill_distinct(self.kv, prompts, lambda seqs, rows: self._prefill(list(zip(seqs, rows))))
        for r, seq, row in zip(root_ids, seqs, logits):
            self._nodes[r] = _Node(seq, None, row)  # identical prompts share the first one's logits row
        return prompts

    def sample_steps(self, parent_ids: Sequence[int], child_ids: Sequence[int], params: SamplingParams) -> list[Step]:
        """One step per child, all rows of all problems decoded together (one forward per token).

        Each parent's sequence is forked once per child; a row stops at the first occurrence of
        ``params.step_delimiter`` in its decoded text (delimiter kept), at an EOS token (kept in
        ``tokens``, dropped from ``text``), or after ``max_step_tokens`` tokens (truncated).
        """
        return self._sample_steps(parent_ids, child_ids, params, None)

    def _sample_steps(self, parent_ids, child_ids, params: SamplingParams, gens: list | None) -> list[Step]:
        check_sampling_params(params)
        parent_ids = [int(p) for p in parent_ids]
        child_ids = [int(c) for c in child_ids]
        if len(parent_ids) != len(child_ids):
            raise ValueError(f"parent_ids has {len(parent_ids)} entries but child_ids has {len(child_ids)}")
        if not child_ids:
            return []
        self._check_live(parent_ids)
        self._check_new(child_ids)
        room = self._room(parent_ids)
        self._ensure_logits(list(dict.fromkeys(parent_ids)))
        seqs = self._fork_rows([self._nodes[p].seq for p in parent_ids])
        try:
            first = torch.stack([self._nodes[p].logits for p in parent_ids])
            steps = self._decode(seqs, first, params, gens, room)
        except BaseException:
            self.kv.free(seqs)
            raise
        for c, seq, step in zip(child_ids, seqs, steps):
            self._nodes[c] = _Node(seq, step.tokens[-1], None)
        return steps

    def sample_steps_seeded(
        self, parent_ids: Sequence[int], child_ids: Sequence[int], params: SamplingParams, streams: Sequence[tuple[int, int | None]]
    ) -> list[Step]:
        """``sample_steps`` where row i draws from random stream ``streams[i] = (stream id, seed)``
        (``params.seed`` is ignored): a stream is created seeded with its seed on first use and
        runs on across calls until :meth:`close_streams`, so a request's samples do not depend on
        the other rows of the batch. On an error (e.g. ``KVCacheFull``) the streams are rewound
        to where they were, so a retried call draws the same tokens."""
        if len(streams) != len(child_ids):
            raise ValueError(f"streams has {len(streams)} entries but child_ids has {len(child_ids)}")
        if params.temperature <= 0:
            return self.sample_steps(parent_ids, child_ids, params)
        gens = []
        for sid, seed in streams:
            g = self._streams.get(int(sid))
            if g is None:
                g = torch.Generator(device=self.device)
                if seed is None:
                    g.seed()
                else:
                    g.manual_seed(int(seed))
                self._streams[int(sid)] = g
            gens.append(g)
        saved = {id(g): (g, g.get_state()) for g in gens}
        try:
            return self._sample_steps(parent_ids, child_ids, params, gens)
        except BaseException:
            for g, state in saved.values():
                g.set_state(state)
            raise

    def stream_states(self, stream_ids: Sequence[int]) -> dict[int, torch.Tensor | None]:
        """:meth:`ponder.protocols.StreamRewind.stream_states`: each stream's generator state
        (None: not created yet)."""
        out: dict[int, torch.Tensor | None] = {}
        for sid in stream_ids:
            g = self._streams.get(int(sid))
            out[int(sid)] = None if g is None else g.get_state()
        return out

    def set_stream_states(self, states: dict[int, torch.Tensor | None]) -> None:
        """:meth:`ponder.protocols.StreamRewind.set_stream_states`: rewind each stream to a state
        of :meth:`stream_states` (None: forget it, it starts again from its seed)."""
        for sid, state in states.items():
            if state is None:
                self._streams.pop(int(sid), None)
            elif int(sid) in self._streams:
                self._streams[int(sid)].set_state(state)

    def restore(self, node_ids: Sequence[int], paths: Sequence[NodePath]) -> int:
        """:meth:`ponder.protocols.Resumable.restore`: one sequence per node over its path's
        token ids (prompt + steps: exact), computing each distinct path once and only past its
        longest prefix still in the pool's prefix index; the node keeps its next-token logits.
        Streams are untouched. Returns the tokens run through the model. All or nothing
        (KVCacheFull when the paths do not fit); ValueError / TypeError as
        :func:`ponder.protocols.check_restore_args`, ValueError for an empty path."""
        node_ids = [int(x) for x in node_ids]
        check_restore_args(self._nodes, "policy", node_ids, paths)
        rows = [list(p.tokens) for p in paths]
        if any(not r for r in rows):
            raise ValueError("a restored path needs at least one token (its prompt)")
        if self.max_positions is not None and max(map(len, rows), default=0) > self.max_positions:
            raise ValueError(f"a restored path has {max(map(len, rows))} tokens, more than the policy's "
                             f"{self.max_positions} positions")
        before = int(self.kv.stats()["tokens_appended"])
        seqs, logits = prefill_distinct(self.kv, rows, lambda seqs, new: self._prefill(list(zip(seqs, new))))
        for x, seq, row in zip(node_ids, seqs, logits):
            self._nodes[x] = _Node(seq, None, row)
        return int(self.kv.stats()["tokens_appended"]) - before

    def close_streams(self, stream_ids: Sequence[int]) -> None:
        """Forget these streams of :meth:`sample_steps_seeded` (unknown ids are ignored)."""
        for sid in stream_ids:
            self._streams.pop(int(sid), None)

    def kv_free_blocks(self) -> int:
        """KV blocks a new sequence may take now: free + evictable (cached, unreferenced)."""
        st = self.kv.stats()
        return int(st["blocks_free"]) + int(st.get("blocks_evictable", 0))

    @property
    def kv_block_size(self) -> int:
        return int(self.kv.block_size)

    def rollout(self, node_ids: Sequence[int], num_steps: int, params: SamplingParams) -> list[list[Step]]:
        """Up to ``num_steps`` steps after each node on temporary forks (freed before returning),
        stopping a row early at EOS; the nodes' own sequences only gain their pending token."""
        check_sampling_params(params)
        node_ids = [int(n) for n in node_ids]
        if num_steps > self.max_steps_per_rollout:
            raise ValueError(f"num_steps = {num_steps} exceeds max_steps_per_rollout = {self.max_steps_per_rollout}")
        out: list[list[Step]] = [[] for _ in node_ids]
        if num_steps <= 0 or not node_ids:
            return out
        self._check_live(node_ids)
        room = self._room(node_ids)
        self._ensure_logits(list(dict.fromkeys(node_ids)))
        seqs = self._fork_rows([self._nodes[n].seq for n in node_ids])
        try:
            rows = list(range(len(node_ids)))
            logits = torch.stack([self._nodes[n].logits for n in node_ids])
            for k in range(num_steps):
                steps = self._decode([seqs[i] for i in rows], logits, params, None,
                                     None if room is None else [room[i] for i in rows])
                for i, step in zip(rows, steps):
                    out[i].append(step)
                    if room is not None:
                        room[i] -= len(step.tokens)
                # a row at its context end stops like one at EOS
                keep = [j for j, step in enumerate(steps) if not step.eos and (room is None or room[rows[j]] > 0)]
                if k + 1 == num_steps or not keep:
                    break
                rows = [rows[j] for j in keep]
                # The next step starts from the logits after each row's pending last token.
                logits = self._forward([seqs[i] for i in rows], [[steps[j].tokens[-1]] for j in keep])
        finally:
            self.kv.free(seqs)
        return out

    def release(self, node_ids: Sequence[int]) -> None:
        """Free the nodes' sequences and logits; ids not held are ignored (release is idempotent)."""
        seqs = []
        for n in node_ids:
            node = self._nodes.pop(int(n), None)
            if node is not None:
                seqs.append(node.seq)
        if seqs:
            self.kv.free(seqs)

    def stats(self) -> dict[str, int]:
        """Counters: tokens_generated (sampled tokens, rollouts included), tokens_prefilled
        (tokens run through the model = the KV cache's tokens_appended: prompts, fed steps,
        rollouts), forward_passes, live_nodes, num_parameters, and the KV cache's own counters
        prefixed ``kv_``."""
        kv = self.kv.stats()
        return _model_stats(
            {
                "tokens_generated": self._tokens_generated,
                "tokens_prefilled": kv["tokens_appended"],
                "forward_passes": self._forward_passes,
            },
            len(self._nodes), self.num_parameters, kv,
        )

    # ---------------------------------------------------------------- internals
    def _check_live(self, ids: Sequence[int]) -> None:
        missing = sorted({i for i in ids if i not in self._nodes})
        if missing:
            raise KeyError(f"nodes {missing[:8]} are not held by this policy (never started/sampled, or released)")

    def _check_new(self, ids: Sequence[int]) -> None:
        _check_new_ids(ids, self._nodes, "policy")

    def _room(self, node_ids: list[int]) -> list[int] | None:
        """Tokens each node's path may still gain (``max_positions`` - its length, pending token
        included); None without a limit. ValueError when a node's path is already full."""
        if self.max_positions is None:
            return None
        nodes = [self._nodes[n] for n in node_ids]
        lens = self.kv.seq_lens([node.seq for node in nodes]).tolist()
        room = [self.max_positions - int(k) - (node.pending is not None) for node, k in zip(nodes, lens)]
        full = [n for n, r in zip(node_ids, room) if r < 1]
        if full:
            raise ValueError(f"nodes {full[:8]}: their paths already have the policy's {self.max_positions} positions "
                             "(max_position_embeddings), so they cannot be extended; end those paths")
        return room

    def _fork_rows(self, parent_seqs: list[int]) -> list[int]:
        """One fork per row, forking each distinct parent once for all its rows (row order kept)."""
        counts = Counter(parent_seqs)
        pools: dict[int, list[int]] = {}
        try:
            for seq, k in counts.items():
                pools[seq] = [int(s) for s in self.kv.fork(seq, k)]
        except BaseException:
            self.kv.free([s for p in pools.values() for s in p])
            raise
        handout = {seq: iter(forks) for seq, forks in pools.items()}
        return [next(handout[seq]) for seq in parent_seqs]

    def _forward(self, seqs: list[int], tokens: list[list[int]]) -> torch.Tensor:
        """Append ``tokens`` to ``seqs``; logits after each row's last token, model dtype [B, V]."""
        self._forward_passes += 1
        return self.kv.forward(self.model, seqs, tokens, logits="last")

    def _prefill(self, rows: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """Prefill (seq, tokens) rows in forwards of at most this device's prefill budget of
        padded tokens, rows of similar length together
        (:func:`ponder.hf._batching.sorted_token_batches`); each row's last logits, [V]."""
        out: list[torch.Tensor | None] = [None] * len(rows)
        for idx in sorted_token_batches([len(t) for _, t in rows], self._batch_tokens, 64):
            logits = self._forward([rows[r][0] for r in idx], [rows[r][1] for r in idx])
            for r, row in zip(idx, logits.unbind(0)):
                out[r] = row
        return out

    def _ensure_logits(self, node_ids: list[int]) -> None:
        """Feed the pending last token of these nodes (one batched decode) and keep their logits."""
        todo = [n for n in node_ids if self._nodes[n].logits is None]
        if not todo:
            return
        logits = self._forward([self._nodes[n].seq for n in todo], [[self._nodes[n].pending] for n in todo])
        for n, row in zip(todo, logits.unbind(0)):
            self._nodes[n].pending, self._nodes[n].logits = None, row

    def _rng(self, params: SamplingParams) -> torch.Generator | None:
        return self._stream.generator(params)

    def _decode(self, seqs: list[int], logits: torch.Tensor, params: SamplingParams, gens: list | None = None,
                room: list[int] | None = None) -> list[Step]:
        """Sample one step per row. seqs: the rows' sequences (their whole path is in the cache);
        logits: [B, V] next-token logits of each row; room: the most tokens each row may take
        (its context end; None: no limit). Every sampled token but each row's last is appended
        to its sequence; finished rows leave the batch at once."""

        def advance(rows: list[int], _positions: list[int], last: list[int]) -> torch.Tensor:
            return self._forward([seqs[i] for i in rows], [[t] for t in last])

        rng = self._rng(params) if gens is None or params.temperature <= 0 else gens
        steps = sample_step_batch(logits, params, rng, self.tokenizer, self.eos_ids, advance, room)
        self._tokens_generated += sum(len(s.tokens) for s in steps)
        return steps
