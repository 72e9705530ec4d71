"""What a search is asked to do (``SearchConfig``) and what it gives back (``SearchResult``).

A ``SearchResult`` per problem holds the completions the method produced (``Completion``),
the answer its final vote chose, the problem's whole search tree as arrays, and the compute
it spent (``Budget``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .._core import AGGREGATIONS, VOTES  # the names the forest accepts: its list is the one list
from ..protocols import SamplingParams
from .stopping import EarlyStop

METHODS = ("majority", "best_of_n", "weighted_best_of_n", "beam_search", "dvts", "particle_filtering", "rebase", "auto")

PF_WEIGHTS = ("logit", "softmax", "raw")  # particle filtering's weightings (SearchConfig.pf_weights)
PF_FINISHED = ("resample", "keep")  # what particle filtering does with finished particles
REBASE_ALLOCATIONS = ("ceil", "proportional")  # how REBASE rounds its children counts

# The vote each non-tree method implies (beam search and DVTS take ``SearchConfig.vote``).
IMPLIED_VOTE = {"majority": "majority", "best_of_n": "best", "weighted_best_of_n": "weighted"}


@dataclass
class SearchConfig:
    """How to turn test-time compute into an answer.

    method: one of ``METHODS``: ``majority`` | ``best_of_n`` | ``weighted_best_of_n`` |
    ``beam_search`` | ``dvts`` | ``particle_filtering`` | ``rebase`` | ``auto`` (per-problem
    choice from a strategy table within ``budget``; see the fields below).
    n: completions per problem (the budget N). beam_width: M; beam search keeps N/M beams and
    expands each into M; DVTS runs N/M subtrees of M candidates each (N % M must be 0).
    num_iterations: search iterations of beam search / DVTS; the last one generates every
    remaining path to its end (EOS, a boxed answer, or ``max_steps`` steps).
    max_steps: the most steps a path may have, in every method (majority / best-of-N sample
    at most this many steps per solution). Must be >= num_iterations for beam search / DVTS.
    lookahead: extra greedy steps rolled out after each sampled step (beam search, DVTS); the
    PRM scores the step *after* them, the search keeps only the step. 0 in the last iteration.
    agg: how step scores make a path score (``AGGREGATIONS``): ``last`` | ``min`` | ``prod`` |
    ``mean``, computed by the forest in float64.
    vote: final vote of beam search / DVTS / particle_filtering / rebase over their
    completions: ``weighted`` (default), ``majority`` or ``best`` (``VOTES``). The other
    methods imply theirs (``IMPLIED_VOTE``) and reject a different value.
    filter_duplicates: beam search drops candidates whose step repeats a sibling's step.
    sort_completed: beam search returns its completions best first (else in the order they
    finished, and stops a problem once N have finished).
    sampling: how the policy samples a step. seed: given to the policy as
    ``SamplingParams.seed`` unless ``sampling.seed`` is set.
    compat_search_and_learn: reproduce huggingface/search-and-learn where ponder deliberately
    differs (the items marked "Compat" in docs/search_and_learn_differences.md): a step cut off
    by ``max_step_tokens`` (or a path by ``max_steps``) counts as finished; the final vote
    aggregates with ``last``; DVTS returns the M candidates of each subtree's last expansion.
    max_wall_s, max_policy_tokens: limits of one search (None: none). They are checked between
    engine stages: a search past one ends at the next stage boundary with what it has
    (``SearchResult.stopped`` = ``"timeout"`` / ``"budget"``), so it may overshoot by one stage.
    """

    method: str = "beam_search"
    n: int = 4
    beam_width: int = 4
    num_iterations: int = 40
    lookahead: int = 0
    agg: str = "last"
    vote: str | None = None
    filter_duplicates: bool = True
    sort_completed: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    compat_search_and_learn: bool = False
    max_steps: int = 64
    max_wall_s: float | None = None
    max_policy_tokens: int | None = None
    # dynamic compute (ponder.methods.adaptive; docs/adaptive.md): early_stop: None (off), a
    # threshold in (0.5, 1] or a ponder.methods.stopping.EarlyStop, for majority / best_of_n /
    # weighted_best_of_n. method="auto": budget (an n-equivalent, default n) or budget_tokens
    # (mean policy tokens per problem), strategy: a strategy.json path (None: the built-in one).
    early_stop: float | EarlyStop | None = None
    budget: float | None = None
    budget_tokens: float | None = None
    strategy: str | None = None
    # particle_filtering (ponder.methods.particle_filtering; defaults: its_hub's ParticleFiltering,
    # docs/methods_pf_rebase.md): weights softmax(logit(agg) / pf_temperature), i.e. the odds
    # r / (1 - r) at T=1 (pf_weights="logit"), softmax(agg / pf_temperature) ("softmax") or the
    # raw aggregate ("raw", scores >= 0); resample with pf_resampling ("multinomial" |
    # "systematic") at every step (pf_ess_threshold 1.0) or when ESS < pf_ess_threshold *
    # particles (0: never); pf_finished: "resample" (finished particles are resampled with the
    # others and hold their copies' share of the N particles) or "keep" (kept as completions,
    # never resampled). Its final vote is `vote`, default "best" (its_hub's argmax particle).
    # rebase (ponder.methods.rebase; defaults: Wu et al.'s released code, docs/methods_pf_rebase.md):
    # children per node from softmax(agg / rebase_temperature), rounded by rebase_allocation:
    # "ceil" (best first, each the ceiling of its share of what is left) or "proportional"
    # (largest remainder).
    pf_temperature: float = 1.0
    pf_weights: str = "logit"
    pf_resampling: str = "multinomial"
    pf_ess_threshold: float = 1.0
    pf_finished: str = "resample"
    rebase_temperature: float = 0.2
    rebase_allocation: str = "ceil"

    def validate(self) -> SearchConfig:
        """Raise ValueError naming the first bad field; return self when all are good."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"agg must be one of {', '.join(AGGREGATIONS)}; got {self.agg!r}")
        for name in ("n", "beam_width", "num_iterations", "max_steps"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if not isinstance(self.lookahead, (int, np.integer)) or isinstance(self.lookahead, bool) or self.lookahead < 0:
            raise ValueError(f"lookahead must be an integer >= 0; got {self.lookahead!r}")
        if self.vote is not None and self.vote not in VOTES:
            raise ValueError(f"vote must be None or one of {', '.join(VOTES)}; got {self.vote!r}")
        if self.method in IMPLIED_VOTE:
            implied = IMPLIED_VOTE[self.method]
            if self.vote is not None and self.vote != implied:
                raise ValueError(
                    f"method {self.method!r} always votes {implied!r}; got vote={self.vote!r} "
                    "(vote applies to beam_search and dvts)"
                )
        elif self.method != "auto":
            if self.method in ("beam_search", "dvts") and self.n % self.beam_width != 0:
                raise ValueError(
                    f"{self.method} needs n divisible by beam_width; got n={self.n}, "
                    f"beam_width={self.beam_width}"
                )
            if self.max_steps < self.num_iterations:
                raise ValueError(
                    f"max_steps ({self.max_steps}) must be >= num_iterations ({self.num_iterations}) "
                    f"for {self.method}: every iteration adds a step to a path"
                )
        for name in ("pf_temperature", "rebase_temperature"):
            t = getattr(self, name)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise ValueError(f"{name} must be a finite number > 0; got {t!r}")
        if self.pf_weights not in PF_WEIGHTS:
            raise ValueError(f"pf_weights must be one of {', '.join(PF_WEIGHTS)}; got {self.pf_weights!r}")
        if self.rebase_allocation not in REBASE_ALLOCATIONS:
            raise ValueError(
                f"rebase_allocation must be one of {', '.join(REBASE_ALLOCATIONS)}; got {self.rebase_allocation!r}"
            )
        if self.pf_finished not in PF_FINISHED:
            raise ValueError(f"pf_finished must be one of {', '.join(PF_FINISHED)}; got {self.pf_finished!r}")
        if self.pf_resampling not in ("multinomial", "systematic"):
            raise ValueError(f"pf_resampling must be one of multinomial, systematic; got {self.pf_resampling!r}")
        e = self.pf_ess_threshold
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 <= e <= 1:
            raise ValueError(f"pf_ess_threshold must be a number in [0, 1]; got {e!r}")
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError(f"sampling must be a ponder.SamplingParams; got {type(self.sampling).__name__}")  # noqa: TRY004 (every bad field: ValueError)
        if self.sampling.max_step_tokens < 1:
            raise ValueError(f"sampling.max_step_tokens must be >= 1; got {self.sampling.max_step_tokens}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")  # noqa: TRY004
        if self.max_wall_s is not None and not (isinstance(self.max_wall_s, (int, float)) and self.max_wall_s > 0):
            raise ValueError(f"max_wall_s must be None or a number > 0; got {self.max_wall_s!r}")
        mpt = self.max_policy_tokens
        if mpt is not None and (not isinstance(mpt, (int, np.integer)) or isinstance(mpt, bool) or mpt < 1):
            raise ValueError(f"max_policy_tokens must be None or an integer >= 1; got {mpt!r}")
        if self.method == "auto" or any(x is not None for x in (self.early_stop, self.budget, self.budget_tokens)):
            from .adaptive import validate_adaptive

            validate_adaptive(self)
        return self

    @property
    def final_vote(self) -> str:
        """The vote that picks the answer: the method's own, or ``vote`` (default weighted)."""
        return IMPLIED_VOTE.get(self.method) or self.vote or "weighted"

    @property
    def vote_agg(self) -> str:
        """The aggregation of the final vote: ``agg``, or ``last`` in compat mode."""
        return "last" if self.compat_search_and_learn else self.agg


@dataclass
class Completion:
    """One path a method returned for a problem.

    node_id: its last node in the search forest. text: the solution (the steps joined, no
    prompt). steps: the step texts, root first. step_scores: the PRM score stored for each
    step (with lookahead: the score after the lookahead steps); empty when no PRM scored it
    (majority voting). score: ``step_scores`` aggregated with the search's ``agg`` by the forest (float64,
    NaN without scores). answer: the content of the last complete ``\\boxed{}`` of a
    finished path, else None. finished: it ended with EOS, a boxed answer or an empty step
    (compat mode: also when cut off). truncated: its last step was cut off by
    ``max_step_tokens`` (it may still hold a boxed answer, then it is finished), or the path
    reached ``max_steps`` without ending.
    """

    node_id: int
    text: str
    steps: list[str]
    step_scores: list[float]
    score: float
    answer: str | None
    finished: bool
    truncated: bool


@dataclass
class Budget:
    """Compute one problem's search spent.

    policy_tokens_generated: step tokens the policy sampled, lookahead rollouts included.
    policy_tokens_prefilled: prompt tokens, counted once per problem (every path of a problem
    continues the same prompt, which a prefix-sharing policy computes once; paths then
    continue from their cached steps).
    prm_tokens_scored: tokens of the steps (and lookahead steps) the PRM was asked to score,
    counted in policy tokens (the PRM's own rendering of the question is not included).
    flops_estimate: 2 x parameters x tokens, for the policy (prefilled + generated) and the
    PRM (scored), with parameters from each model's optional ``num_parameters`` (an int or a
    method); a model without it adds 0.
    wall_s: wall-clock seconds of the whole batched search (shared by its problems).
    """

    policy_tokens_generated: int = 0
    policy_tokens_prefilled: int = 0
    prm_tokens_scored: int = 0
    flops_estimate: float = 0.0
    wall_s: float = 0.0


@dataclass
class SearchResult:
    """The outcome of one problem.

    problem_id: the problem's index in the batch passed to ``search``. answer: the winning
    answer of the final vote (as written in the box of ``answer_node``), None when no
    completion has one. answer_node: the node that represents the winner (-1 when none).
    completions: the method's completions (beam search: N, best first when sorted, padded by
    repetition; DVTS: one final path per subtree, N/M, or N in compat mode; majority and
    best-of-N: N in sampling order). tree: the problem's whole search tree from
    ``Forest.nodes``: ``node_id`` int32 [k] plus parent int32, problem int64, subtree int32,
    depth int32, num_tokens int32, has_step bool, score float32, status int8, answer int64.
    budget: see ``Budget``. stopped: why the search ended early, with what it had then:
    ``"timeout"`` (``max_wall_s``), ``"budget"`` (``max_policy_tokens``), ``"cancelled"``
    (``Handle.cancel``); None when the method ran to its end.
    """

    problem_id: int
    problem: str
    answer: str | None
    answer_node: int
    completions: list[Completion]
    tree: dict[str, np.ndarray]
    budget: Budget
    stopped: str | None = None
    # dynamic compute (early_stop, method="auto"): the difficulty estimated online from the
    # first round / probe (strategy.difficulty, in [0, 1]) and what was chosen (method, n, ...)
    difficulty: float | None = None
    chosen: dict | None = None
