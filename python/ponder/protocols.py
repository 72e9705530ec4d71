"""What the search needs from a policy and a process reward model.

Paths are named by the ids of the search forest's nodes (``ponder.Forest``): a root is a
problem's prompt, every other node one reasoning step. Because both models see the tree's
structure (which node extends which), an implementation can keep one KV-cache sequence per
live node and compute every shared prefix once (``ponder.HFPolicy`` / ``ponder.HFPRM`` do, on
``ponder.hf.kv.PagedKVCache``); a scripted or remote implementation is free to ignore it.

The data path, stage by stage::

    problems --Policy.start--> prompt tokens --Forest.add_roots--> roots
    roots/leaves --Forest.expand--> children --Policy.sample_steps--> steps
    steps --PRM.score_steps--> step scores --Forest.set_steps--> aggregates
    --Forest.select_beam / select_dvts--> kept leaves ... --> completions --vote--> answer
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """How the policy samples one step.

    A step ends after ``step_delimiter`` (default a blank line), at an end-of-sequence token,
    or after ``max_step_tokens`` tokens (then it is *truncated*). ``seed`` makes a run
    reproducible: the same seed, inputs and call order give the same steps.
    """

    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    max_step_tokens: int = 256
    step_delimiter: str = "\n\n"
    seed: int | None = None


@dataclass
class Step:
    """One generated reasoning step.

    tokens: the policy's token ids of the step (delimiter included when it was produced);
    text: its decoded text; eos: the policy ended the solution (end-of-sequence token);
    truncated: stopped by ``max_step_tokens`` without a delimiter or EOS.
    """

    tokens: list[int]
    text: str
    eos: bool = False
    truncated: bool = False


@runtime_checkable
class Policy(Protocol):
    """The model that writes solutions, one step per call for a batch of paths."""

    def start(self, root_ids: Sequence[int], problems: Sequence[str]) -> list[list[int]]:
        """Register one root per problem; return each root's prompt token ids (the problem
        rendered with the policy's chat template and system prompt)."""
        ...

    def sample_steps(
        self, parent_ids: Sequence[int], child_ids: Sequence[int], params: SamplingParams
    ) -> list[Step]:
        """For each i, sample one step continuing the path of node ``parent_ids[i]``; the
        path extended by that step is node ``child_ids[i]`` from now on. Parents may repeat
        (several samples of the same path); all paths advance in one batch."""
        ...

    def rollout(self, node_ids: Sequence[int], num_steps: int, params: SamplingParams) -> list[list[Step]]:
        """Lookahead: up to ``num_steps`` further steps continuing each node (greedy when
        ``params.temperature == 0``), stopping early at EOS. The steps are not kept: the
        nodes' own paths are unchanged afterwards."""
        ...

    def release(self, node_ids: Sequence[int]) -> None:
        """The search no longer extends these nodes: free what is kept for them."""
        ...


@runtime_checkable
class PRM(Protocol):
    """A process reward model: a score for each step of a partial solution."""

    def start(self, root_ids: Sequence[int], problems: Sequence[str]) -> None:
        """Register one root (an empty solution) per problem."""
        ...

    def score_steps(
        self,
        parent_ids: Sequence[int],
        child_ids: Sequence[int],
        steps: Sequence[str],
        lookahead: Sequence[Sequence[str]] | None = None,
    ) -> list[float]:
        """For each i, the score of the last step of path ``child_ids[i]`` = path of
        ``parent_ids[i]`` + ``steps[i]`` (with ``lookahead[i]`` given: the score after those
        extra steps, which are not kept). Scores are finite floats, usually probabilities."""
        ...

    def release(self, node_ids: Sequence[int]) -> None:
        """Free what is kept for these nodes."""
        ...


@runtime_checkable
class SeededPolicy(Protocol):
    """Optional for a policy: per-request random streams, so that ``ponder.Engine`` can batch
    searches with different seeds in one call and a search's samples do not depend on the
    searches it shares a batch with."""

    def sample_steps_seeded(
        self,
        parent_ids: Sequence[int],
        child_ids: Sequence[int],
        params: SamplingParams,
        streams: Sequence[tuple[int, int | None]],
    ) -> list[Step]:
        """``sample_steps`` where row i draws from the stream ``streams[i] = (stream id, seed)``
        (created from its seed on first use, running on across calls; ``params.seed`` ignored).
        A call that raises leaves every stream where it was."""
        ...

    def close_streams(self, stream_ids: Sequence[int]) -> None:
        """These streams are not used again."""
        ...


@runtime_checkable
class StreamRewind(Protocol):
    """Optional for a ``SeededPolicy`` whose streams keep state: ``ponder.Engine`` saves the
    streams of a step's searches before sampling and rewinds them when a later stage of the
    step (lookahead, scoring) raises ``KVCacheFull``, so the retried step draws the same steps."""

    def stream_states(self, stream_ids: Sequence[int]) -> dict:
        """stream id -> an opaque copy of where the stream is now (None: not created yet)."""
        ...

    def set_stream_states(self, states: dict) -> None:
        """Put streams back where ``stream_states`` found them (None: forget the stream)."""
        ...


@runtime_checkable
class KVCapacity(Protocol):
    """Optional for a policy or a PRM with a KV pool: what ``ponder.Engine`` admits by."""

    kv_block_size: int

    def kv_free_blocks(self) -> int:
        """Blocks a new sequence could take now (free + evictable)."""
        ...


@runtime_checkable
class ContextFit(Protocol):
    """Optional for a PRM with a context limit (``max_positions``): the search tree asks it,
    after every step is sampled, to cut what would not fit, so no input runs past the limit."""

    max_positions: int | None

    def fit_steps(self, questions: Sequence[str], paths: Sequence[Sequence[str]]) -> list[tuple[str, bool]]:
        """For each path (problem, step texts with the new step last): the new step cut to the
        longest prefix whose input fits (unchanged when it fits) and whether the path is full
        (cut, or no room for another step). ValueError when not even an empty step fits."""
        ...


@dataclass(frozen=True)
class NodePath:
    """What a model is told of one node it rebuilds (``Resumable.restore``).

    problem: the root's problem (as given to ``start``); tokens: the policy's token ids of the
    whole path, the root's prompt (what ``Policy.start`` returned) followed by every step's
    tokens; steps: the step texts from the root's first child down to the node (empty for a
    root)."""

    problem: str
    tokens: tuple[int, ...]
    steps: tuple[str, ...]


@runtime_checkable
class Resumable(Protocol):
    """Optional for a policy and a PRM: rebuild released nodes from their paths.

    ``ponder.Engine`` preempts a search when the KV pool runs out by releasing every node the
    models hold for it while keeping its tree; when the search is readmitted it calls
    ``restore`` with the nodes it still needs (its live frontier) and goes on exactly where it
    was. A model without ``restore`` makes a preempted search restart from its root."""

    def restore(self, node_ids: Sequence[int], paths: Sequence[NodePath]) -> int:
        """Hold node ``node_ids[i]`` again, in the state it had when it was created with path
        ``paths[i]`` (for a PRM a root is a started root, any other node a scored path). All or
        nothing: on an error (``KVCacheFull`` included) nothing is held. Returns the tokens run
        through the model (a paged cache's reused prefix blocks excluded; 0 for a model that
        keeps no per-token state). ValueError for unequal lengths or an id already held."""
        ...


def check_restore_args(held, owner: str, node_ids: Sequence[int], paths: Sequence[NodePath]) -> None:
    """The checks every :meth:`Resumable.restore` starts with: ValueError for unequal lengths, a
    repeated id or an id ``held`` already holds; TypeError for a path that is not a NodePath."""
    if len(node_ids) != len(paths):
        raise ValueError(f"node_ids has {len(node_ids)} entries but paths has {len(paths)}")
    bad = [i for i, p in enumerate(paths) if not isinstance(p, NodePath)]
    if bad:
        raise TypeError(f"paths[{bad[0]}] must be a ponder.protocols.NodePath, got {type(paths[bad[0]]).__name__}")
    check_node_ids(held, owner, new=[int(x) for x in node_ids])


@runtime_checkable
class PathScorer(Protocol):
    """Optional for a PRM: every step score of whole continuations of held nodes in one call,
    nothing kept.

    ``ponder.Engine`` uses it for searches that read only finished paths' scores (best-of-N and
    weighted best-of-N with any ``agg``, no early stopping or budget): the PRM holds only their roots,
    and each solution is scored once, when it ends, instead of step by step."""

    def score_paths(self, node_ids: Sequence[int], paths: Sequence[Sequence[str]]) -> list[list[float]]:
        """``out[i][k]``: the score of step ``k`` of ``paths[i]`` (steps in order) continuing
        the path of ``node_ids[i]`` (a node the PRM holds: a started root or a scored node),
        equal to what ``score_steps`` gives that step as the next step of the path of
        ``node_ids[i]`` + steps ``0..k-1``. ``len(out[i]) == len(paths[i])``; ids may repeat.
        No node is created or freed. KeyError for an id not held; ValueError for unequal
        lengths; TypeError for a bare string as a path."""
        ...


def check_score_steps_args(
    parent_ids: Sequence[int],
    child_ids: Sequence[int],
    steps: Sequence[str],
    lookahead: Sequence[Sequence[str]] | None = None,
) -> None:
    """The argument checks every :meth:`PRM.score_steps` implementation starts with: TypeError
    for a bare string as ``steps``, ValueError for unequal lengths."""
    if isinstance(steps, str):
        raise TypeError("steps must be a sequence of strings, not a string")
    if not (len(parent_ids) == len(child_ids) == len(steps)):
        raise ValueError(
            f"parent_ids, child_ids and steps need equal lengths, got {len(parent_ids)}, {len(child_ids)}, {len(steps)}"
        )
    if lookahead is not None and len(lookahead) != len(steps):
        raise ValueError(f"lookahead has {len(lookahead)} entries but steps has {len(steps)}")


def check_sampling_params(params: SamplingParams) -> None:
    """The checks every :meth:`Policy.sample_steps` implementation starts with: ValueError naming
    the field for ``max_step_tokens < 1``, a negative temperature, ``top_p`` outside (0, 1] when
    sampling, a negative ``top_k`` or an empty ``step_delimiter``."""
    if params.max_step_tokens < 1:
        raise ValueError(f"max_step_tokens must be >= 1, got {params.max_step_tokens}")
    if params.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {params.temperature}")
    if params.temperature > 0 and not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {params.top_k}")
    if not params.step_delimiter:
        raise ValueError("step_delimiter must be a non-empty string")


def check_node_ids(held, owner: str, *, live: Sequence[int] = (), new: Sequence[int] = ()) -> None:
    """The node-id checks of a Policy / PRM that keeps per-node state (``held``: its node ids, a
    mapping or set; ``owner``: "policy" / "PRM", named in the messages).

    KeyError when an id of ``live`` is not held (never started / sampled, or released);
    ValueError when ``new`` repeats an id or names one already held. ``live`` is checked first."""
    missing = sorted({i for i in live if i not in held})
    if missing:
        raise KeyError(f"nodes {missing[:8]} are not held by this {owner} (never started/sampled, or released)")
    seen: set[int] = set()
    dup = sorted({i for i in new if i in seen or seen.add(i)})
    if dup:
        raise ValueError(f"node ids repeat: {dup[:8]}")
    taken = sorted(i for i in new if i in held)
    if taken:
        raise ValueError(f"nodes {taken[:8]} are already held by this {owner}")
