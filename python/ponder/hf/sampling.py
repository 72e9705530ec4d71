"""Sampling a step: ``sample_next`` (one token per row), ``sample_step_batch`` (a batch of
rows decoded to the step delimiter, EOS or the token limit) and ``SeededStream`` (the random
stream a policy samples from)."""

from __future__ import annotations

import torch

from ..protocols import SamplingParams, Step

# Delimiter detection decodes only the last few tokens of a step (the delimiter cannot occur
# earlier: the row would have stopped there). The window covers the delimiter plus tokens that
# decode to partial UTF-8 characters (byte-level BPE splits a character over up to 4 tokens).
_DELIM_WINDOW_EXTRA = 8



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
    row_limits: list[int] | None = None,
) -> list[Step]:
    """Sample one step for each of B rows, token by token, with the stopping rules every
    ponder policy shares: a row stops at an EOS id (``eos``), once its decoded tail holds
    ``params.step_delimiter`` (the delimiter stays in the step), or at ``max_step_tokens``
    (``truncated``); a stopped row leaves the batch at once. ``row_limits[i]`` (>= 1): row i
    also stops (``truncated``) at that many tokens (a policy's context end).

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
    limits = [params.max_step_tokens] * B if row_limits is None else [min(params.max_step_tokens, int(x)) for x in row_limits]
    if len(limits) != B or min(limits, default=1) < 1:
        raise ValueError(f"row_limits must hold {B} limits >= 1")
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
            elif len(tokens[i]) >= limits[i]:
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
