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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..protocols import SamplingParams, Step, check_sampling_params
from .kv_fallback import cache_for_model

__all__ = ["HFPolicy", "load_tokenizer", "resolve_dtype", "sample_step_batch"]

# How many tokens a prefill batch may hold: bounds the gathered K/V and the [B, 1, T, L] mask.
_PREFILL_BATCH_TOKENS = 16384
# Delimiter detection decodes only the last few tokens of a step (the delimiter cannot occur
# earlier: the row would have stopped there). The window covers the delimiter plus tokens that
# decode to partial UTF-8 characters (byte-level BPE splits a character over up to 4 tokens).
_DELIM_WINDOW_EXTRA = 8


# ----------------------------------------------------------------------------- loading helpers


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


# ----------------------------------------------------------------------------- sampling


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row. logits: float [B, V] -> int64 [B] (on the logits' device).

    temperature 0 is greedy (argmax, first index on ties); otherwise temperature scaling, then
    the top-k filter (k > 0), then the nucleus (top-p < 1) filter, then one multinomial draw per
    row from ``generator`` (rows in order, so a seed reproduces the batch). ``generator`` may
    also be a list with one generator per row: each row draws from its own (rows sharing a
    generator draw in row order), so a row's token depends only on its generator and logits.
    """
    logits = logits.float()
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    V = logits.shape[-1]
    if 0 < params.top_k < V:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the most
        # likely token always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        ordered = ordered.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    probs = logits.softmax(dim=-1)
    if isinstance(generator, list):
        out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(generator):
            groups.setdefault(id(g), []).append(i)
        for rows in groups.values():
            idx = torch.tensor(rows, device=probs.device)
            out[idx] = torch.multinomial(probs[idx], 1, generator=generator[rows[0]]).squeeze(-1)
        return out
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_step_batch(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    tokenizer,
    eos_ids: set[int],
    advance,
) -> list[Step]:
    """Sample one step for each of B rows, token by token, with the stopping rules every
    ponder policy shares: a row stops at an EOS id (``eos``), once its decoded tail holds
    ``params.step_delimiter`` (the delimiter stays in the step), or at ``max_step_tokens``
    (``truncated``); a stopped row leaves the batch at once.

    logits: float [B, V], the next-token logits of each row. advance(rows, positions, last):
    run the models one token further for the rows still going (``rows``: their indices in
    0..B-1, ``positions``: their positions in the previous live batch, ``last``: each one's
    newly sampled token) and return their next-token logits [len(rows), V]. Step texts are
    decoded without the EOS ids.
    """
    delim = params.step_delimiter
    window = len(delim) + _DELIM_WINDOW_EXTRA
    B = logits.shape[0]
    tokens: list[list[int]] = [[] for _ in range(B)]
    eos = [False] * B
    truncated = [False] * B
    active = list(range(B))
    while active:
        gen = [generator[i] for i in active] if isinstance(generator, list) else generator
        nxt = sample_next(logits, params, gen).tolist()
        for i, t in zip(active, nxt):
            tokens[i].append(int(t))
        tails = tokenizer.batch_decode(
            [tokens[i][-window:] for i in active], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        keep: list[int] = []  # positions in the live batch of the rows that go on
        for j, (i, tail) in enumerate(zip(active, tails)):
            if tokens[i][-1] in eos_ids:
                eos[i] = True
            elif delim in tail:
                pass  # the step ends with its delimiter
            elif len(tokens[i]) >= params.max_step_tokens:
                truncated[i] = True
            else:
                keep.append(j)
        active = [active[j] for j in keep]
        if active:
            logits = advance(active, keep, [tokens[i][-1] for i in active])
    texts = tokenizer.batch_decode(
        [[t for t in toks if t not in eos_ids] for toks in tokens],
        skip_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    return [Step(tokens[i], texts[i], eos[i], truncated[i]) for i in range(B)]


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


class SeededStream:
    """The random stream steps are sampled from. It is (re)seeded from ``params.seed`` when the
    seed changes and after :meth:`restart` (a new search), and otherwise runs on across calls,
    so the same seed and the same calls give the same steps. ``params.seed=None`` seeds from
    the OS. Greedy sampling (temperature 0) needs no generator."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generator: torch.Generator | None = None
        self._seed: int | None = None

    def restart(self) -> None:
        self._generator = None

    def generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.temperature <= 0:
            return None
        if self._generator is None or (params.seed is not None and params.seed != self._seed):
            self._generator = torch.Generator(device=self.device)
            if params.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(int(params.seed))
            self._seed = params.seed
        return self._generator


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
        self.system_prompt = system_prompt
        self.use_chat_template = bool(use_chat_template) and bool(getattr(self.tokenizer, "chat_template", None))
        self.max_steps_per_rollout = int(max_steps_per_rollout)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self._nodes: dict[int, _Node] = {}
        self._stream = SeededStream(self.device)
        self._streams: dict[int, torch.Generator] = {}  # sample_steps_seeded's per-request streams
        self._tokens_generated = 0
        self._forward_passes = 0

    # ---------------------------------------------------------------- prompts
    def format_prompt(self, problem: str) -> str:
        """The prompt text of a problem: the chat template with the system prompt and the
        generation prompt, or the problem itself without a template."""
        if not self.use_chat_template:
            return problem
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": problem})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_tokens(self, problem: str) -> list[int]:
        """Token ids of the prompt. A chat template writes its own special tokens (BOS), so they
        are not added again; a plain prompt gets the tokenizer's (e.g. BOS)."""
        text = self.format_prompt(problem)
        return list(self.tokenizer.encode(text, add_special_tokens=not self.use_chat_template))

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
        prompts = [self.prompt_tokens(p) for p in problems]
        for p, toks in zip(problems, prompts):
            if not toks:
                raise ValueError(f"problem {p!r} renders to an empty prompt; the policy needs at least one token")
        first: dict[tuple[int, ...], int] = {}  # prompt -> index of the root that computes it
        for i, toks in enumerate(prompts):
            first.setdefault(tuple(toks), i)
        owners = sorted(first.values())
        seqs: dict[int, int] = {}
        created: list[int] = []
        try:
            news = []
            for i in owners:
                seq, cached = self.kv.new_sequence(prompts[i])  # cached <= len - 1: the last token is computed
                created.append(seq)
                seqs[i] = seq
                news.append((seq, prompts[i][cached:]))
            logits = self._prefill(news)
            for i, row in zip(owners, logits):
                self._nodes[root_ids[i]] = _Node(seqs[i], None, row)
            for i, toks in enumerate(prompts):
                owner = first[tuple(toks)]
                if owner != i:
                    (seq,) = self.kv.fork(seqs[owner], 1)
                    created.append(int(seq))
                    self._nodes[root_ids[i]] = _Node(int(seq), None, self._nodes[root_ids[owner]].logits)
        except BaseException:
            for r in root_ids:
                self._nodes.pop(r, None)
            self.kv.free(created)
            raise
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
        self._ensure_logits(list(dict.fromkeys(parent_ids)))
        seqs = self._fork_rows([self._nodes[p].seq for p in parent_ids])
        try:
            first = torch.stack([self._nodes[p].logits for p in parent_ids])
            steps = self._decode(seqs, first, params, gens)
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
        self._ensure_logits(list(dict.fromkeys(node_ids)))
        seqs = self._fork_rows([self._nodes[n].seq for n in node_ids])
        try:
            rows = list(range(len(node_ids)))
            logits = torch.stack([self._nodes[n].logits for n in node_ids])
            for k in range(num_steps):
                steps = self._decode([seqs[i] for i in rows], logits, params)
                for i, step in zip(rows, steps):
                    out[i].append(step)
                keep = [j for j, step in enumerate(steps) if not step.eos]
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
        """Prefill (seq, tokens) rows in batches of at most _PREFILL_BATCH_TOKENS tokens."""
        out: list[torch.Tensor] = []
        i = 0
        while i < len(rows):
            j, total = i, 0
            while j < len(rows) and (j == i or total + len(rows[j][1]) <= _PREFILL_BATCH_TOKENS):
                total += len(rows[j][1])
                j += 1
            logits = self._forward([s for s, _ in rows[i:j]], [t for _, t in rows[i:j]])
            out.extend(logits.unbind(0))
            i = j
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

    def _decode(self, seqs: list[int], logits: torch.Tensor, params: SamplingParams, gens: list | None = None) -> list[Step]:
        """Sample one step per row. seqs: the rows' sequences (their whole path is in the cache);
        logits: [B, V] next-token logits of each row. Every sampled token but each row's last is
        appended to its sequence; finished rows leave the batch at once."""

        def advance(rows: list[int], _positions: list[int], last: list[int]) -> torch.Tensor:
            return self._forward([seqs[i] for i in rows], [[t] for t in last])

        rng = self._rng(params) if gens is None or params.temperature <= 0 else gens
        steps = sample_step_batch(logits, params, rng, self.tokenizer, self.eos_ids, advance)
        self._tokens_generated += sum(len(s.tokens) for s in steps)
        return steps


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
