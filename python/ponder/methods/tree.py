"""The search tree every live search grows: one ``ponder.Forest`` shared by all of them, the
per-node facts, and the stages of one engine step.

A method (``majority.py``, ``best_of_n.py``, ``beam_search.py``, ``dvts.py``, ...) decides
which nodes to expand and which to keep; ``SearchTree`` runs the data path for every live
search at once, one stage per method::

    problems --Policy.start--> prompt tokens --Forest.add_roots--> roots        (add_roots)
    parents --Forest.expand--> children                                       (expand)
    children --Policy.sample_steps--> steps                                   (sample)
      [--Policy.rollout--> lookahead steps]                                   (look_ahead)
      --PRM.score_steps--> step scores                                        (score)
      --Forest.set_steps--> path aggregates; finished paths --> answers       (record)
    completions --Forest.vote--> answer; Forest.nodes --> tree; counters --> Budget (results)

Each search (``Search``) is one problem of the forest (its ``problem`` id). A node is expanded
at most once, so after its children are recorded the policy and the PRM may free it
(``release``); finished and pruned nodes are released too.

A step ends its path when the policy says EOS, when it holds a complete boxed answer, or when
it is empty. A step cut off by ``max_step_tokens`` is *truncated*, not finished: the path goes
on from it. A path that reaches ``max_steps`` without ending stops there unfinished. (With
``compat_search_and_learn`` both count as finished: docs/search_and_learn_differences.md.)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import numpy as np

from .. import grading
from .._core import Forest
from ..protocols import NodePath, SamplingParams, Step
from .config import Budget, Completion, SearchConfig, SearchResult


def _csr(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (int32 [total] flat tokens, int64 [n + 1] offsets), the forest's format."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in lists])
    flat = np.fromiter((t for x in lists for t in x), dtype=np.int64, count=int(offsets[-1]))
    return flat.astype(np.int32), offsets


def _num_parameters(model) -> int:
    """A model's optional ``num_parameters`` (an int, or a method as on HF models); 0 if absent."""
    value = getattr(model, "num_parameters", None)
    if callable(value):
        value = value()
    return int(value) if value else 0


def boxed_answer(text: str) -> str | None:
    """The content of the last complete, non-empty ``\\boxed{}`` in ``text``, else None."""
    if "boxed" not in text and "fbox" not in text:  # cheap pre-check: most steps have no box
        return None
    return grading.extract_answer(text, fallback="none")


class Node:
    """What the tree knows of one node: ``parent`` (-1 for a root), its ``search``, ``depth``,
    ``text`` (the step; "" for roots), ``score`` (the PRM's step score; NaN unscored),
    ``finished``, ``truncated``, ``answer`` (the box of a finished path, else None), ``length``
    (the policy's tokens of its path: prompt + steps; set when the step is sampled)."""

    __slots__ = ("answer", "depth", "finished", "length", "parent", "released", "score", "search", "text", "truncated")

    def __init__(self, parent: int, search: Search, depth: int) -> None:
        self.parent, self.search, self.depth = parent, search, depth
        self.length = 0
        self.text, self.score = "", math.nan
        self.finished = self.truncated = self.released = False
        self.answer: str | None = None


#: methods whose searches read step scores only through finished paths (any agg)
FINAL_SCORE_METHODS = ("best_of_n", "weighted_best_of_n")


class Search:
    """One search of the tree: a problem, its config, the compute it spent so far.

    problem_id: its problem id in the forest (the engine numbers searches 0, 1, ... in
    submission order). scored: the PRM scores its steps (every method but majority, unless
    the engine has no PRM). final_only: scored, and only its finished paths' scores are read
    (see ``SearchTree.deferred``). params / greedy: its sampling parameters (seed resolved) and their
    greedy twin (lookahead). stream: its random stream id (see ``Engine``).
    """

    def __init__(self, problem_id: int, problem: str, config: SearchConfig, scored: bool, stream: int) -> None:
        self.problem_id = problem_id
        self.problem = problem
        self.config = config
        self.scored = scored
        # the method reads only finished paths' scores (best-of-N and weighted best-of-N, any
        # agg, no early stopping or budget): with a PathScorer PRM each path is scored when it ends
        self.final_only = scored and config.method in FINAL_SCORE_METHODS and not any(
            x is not None for x in (config.early_stop, config.budget, config.budget_tokens)
        )
        self.stream = stream
        self.compat = config.compat_search_and_learn
        seed = config.sampling.seed if config.sampling.seed is not None else config.seed
        self.params: SamplingParams = dataclasses.replace(config.sampling, seed=seed)
        self.greedy: SamplingParams = dataclasses.replace(self.params, temperature=0.0)
        self.node_ids: list[int] = []  # every node it created, in creation order
        self.prm_roots: list[int] = []  # deferred scoring: its roots, held by the PRM until dropped
        self.generated = 0
        self.prefilled = 0
        self.prm_scored = 0
        self.t0 = time.perf_counter()
        # preempted with its tree kept (SearchTree.suspend): (policy ids, PRM ids) to restore
        self.suspended: tuple[list[int], list[int]] | None = None


@dataclasses.dataclass
class Batch:
    """The rows of one engine step: for every wanted expansion of every search, one child.

    parents, children: int32 [k]; searches: the search of each row; lookahead: per row, the
    greedy steps to roll out after its step; steps / rollouts / scores: filled by the stages;
    path_ends: the children whose whole path ``score`` scored (deferred searches).
    """

    parents: np.ndarray
    children: np.ndarray
    searches: list[Search]
    lookahead: list[int]
    steps: list[Step] = dataclasses.field(default_factory=list)
    rollouts: list[list[Step]] | None = None
    scores: np.ndarray | None = None
    path_ends: list[int] = dataclasses.field(default_factory=list)
    policy_calls: int = 0
    prm_rows: int = 0


class SearchTree:
    """The forest of every live search and the models that grow it (see the module docstring).

    per_request_streams: sample every search from its own random stream (needs a policy with
    the optional ``sample_steps_seeded``; otherwise each distinct seed gets its own call) --
    else all searches share the policy's stream.
    """

    def __init__(self, policy, prm, per_request_streams: bool = True) -> None:
        self.policy = policy
        self.prm = prm
        self.forest = Forest()
        self.nodes: dict[int, Node] = {}
        self.per_request_streams = per_request_streams
        self.seeded = per_request_streams and callable(getattr(policy, "sample_steps_seeded", None))
        self.path_scorer = prm is not None and callable(getattr(prm, "score_paths", None))
        # the longest path the models may run (their optional ``max_positions``): a path that
        # reaches it ends (finished, truncated) instead of running past the models' positions
        limits = [getattr(m, "max_positions", None) for m in (policy, prm)]
        limits = [x for x in limits if isinstance(x, int) and x > 0]
        self.max_positions = min(limits) if limits else None

    def deferred(self, search: Search) -> bool:
        """The search's paths are scored once each, when they end, by ``PRM.score_paths``
        from their roots (``final_only`` and the PRM is a ``PathScorer``): the PRM holds only
        its roots, until the search is dropped. Until its path is scored a node's score is NaN
        here and a placeholder 0 in the forest; then ``Forest.set_scores`` gives the forest the
        real scores, and every path aggregate (any ``agg``) is what step-by-step scoring gives."""
        return search.final_only and self.path_scorer

    def _prm_held(self, search: Search) -> bool:
        """The PRM keeps per-node state for every node of this search."""
        return search.scored and not self.deferred(search)

    # ------------------------------------------------------------------ building the forest

    def _new_nodes(self, ids: np.ndarray, parents: Sequence[int], searches: Sequence[Search]) -> None:
        for x, p, s in zip(ids.tolist(), parents, searches):
            self.nodes[x] = Node(p, s, 0 if p < 0 else self.nodes[p].depth + 1)
            s.node_ids.append(x)

    def add_roots(self, searches: Sequence[Search], subtrees: Sequence[int]) -> list[np.ndarray]:
        """``subtrees[i]`` roots for search i (DVTS: N/M, else 1), all in one ``start`` call of
        each model (the PRM starts only the scored searches' roots). Returns each search's
        root ids (int32). The ids are known before ``Forest.add_roots`` (a forest hands ids
        out in increasing order), so the models are started first and give the prompts."""
        first = int(self.forest.stats()["ids_given"])
        owners = [s for s, k in zip(searches, subtrees) for _ in range(k)]
        ids = np.arange(first, first + len(owners), dtype=np.int32)
        texts = [s.problem for s in owners]
        prompts = self.policy.start(ids.tolist(), texts)
        if len(prompts) != ids.size:
            raise ValueError(f"policy.start returned {len(prompts)} prompts for {ids.size} roots")
        scored = [i for i, s in enumerate(owners) if s.scored]
        if scored and self.prm is not None:
            self.prm.start([int(ids[i]) for i in scored], [texts[i] for i in scored])
            for i in scored:
                if self.deferred(owners[i]):
                    owners[i].prm_roots.append(int(ids[i]))
        flat, offsets = _csr(prompts)
        problem_of = np.array([s.problem_id for s in owners], dtype=np.int64)
        subtree_of = np.array([j for k in subtrees for j in range(k)], dtype=np.int64)
        got = self.forest.add_roots(problem_of, subtree_of, flat, offsets)
        if not np.array_equal(got, ids):
            raise RuntimeError("forest root ids differ from the ids given to the models")
        self._new_nodes(got, [-1] * got.size, owners)
        out, start = [], 0
        for x, p in zip(got.tolist(), prompts):
            self.nodes[x].length = len(p)
        for s, k in zip(searches, subtrees):
            # A problem's prompt is prefilled once: all its roots and paths share it.
            s.prefilled = len(prompts[start])
            out.append(got[start : start + k])
            start += k
        return out

    # ------------------------------------------------------------------ the stages of a step

    def expand(self, wants: Sequence[tuple[Search, Sequence[int], Sequence[int], int]]) -> Batch:
        """Stage 1: every (search, parents, counts, lookahead) wanted -> children, in one
        ``Forest.expand`` (children of a parent are consecutive, searches in ``wants`` order)."""
        parents, counts, owners, look = [], [], [], []
        for s, ps, cs, la in wants:
            for p, c in zip(ps, cs):
                parents.append(int(p))
                counts.append(int(c))
                owners.extend([s] * int(c))
                look.extend([la] * int(c))
        parents_a = np.asarray(parents, dtype=np.int32)
        counts_a = np.asarray(counts, dtype=np.int32)
        children = self.forest.expand(parents_a, counts_a) if parents else np.zeros(0, np.int32)
        parent_of = np.repeat(parents_a, counts_a)
        self._new_nodes(children, parent_of.tolist(), owners)
        return Batch(parent_of, children, owners, look)

    def _sampling_groups(self, batch: Batch) -> dict:
        """Rows grouped by sampling key (first appearance order): one policy call per group."""
        groups: dict = {}
        for i, s in enumerate(batch.searches):
            key = dataclasses.replace(s.params, seed=None) if self.seeded else s.params
            groups.setdefault(key, []).append(i)
        return groups

    def sample(self, batch: Batch) -> None:
        """Stage 2: one step per row from the policy (one call per distinct sampling setting;
        with per-request streams the seed is not part of the setting), then the finished /
        truncated flags of every child."""
        steps: list[Step | None] = [None] * len(batch.searches)
        parents, children = batch.parents.tolist(), batch.children.tolist()
        for key, rows in self._sampling_groups(batch).items():
            ps, cs = [parents[i] for i in rows], [children[i] for i in rows]
            if self.seeded:
                streams = [(batch.searches[i].stream, batch.searches[i].params.seed) for i in rows]
                got = self.policy.sample_steps_seeded(ps, cs, key, streams)
            else:
                got = self.policy.sample_steps(ps, cs, key)
            batch.policy_calls += 1
            if len(got) != len(rows):
                raise ValueError(f"policy.sample_steps returned {len(got)} steps for {len(rows)} paths")
            for i, st in zip(rows, got):
                steps[i] = st
        batch.steps = steps  # type: ignore[assignment]
        for child, s, st in zip(children, batch.searches, batch.steps):
            node = self.nodes[child]
            node.length = self.nodes[node.parent].length + len(st.tokens)
            ended = bool(st.eos) or len(st.tokens) == 0 or boxed_answer(st.text) is not None
            at_limit = node.depth >= s.config.max_steps
            cut = bool(st.truncated) or (at_limit and not ended)
            if self.max_positions is not None and node.length >= self.max_positions and not ended:
                ended = cut = True  # the models' context is full: the path ends here, cut
            node.text = st.text
            node.finished = ended or (s.compat and cut)
            node.truncated = cut
            s.generated += len(st.tokens)
        self._fit_prm_context(batch)

    def _fit_prm_context(self, batch: Batch) -> None:
        """Where the PRM has a context limit (``ContextFit``): a new step of a scored search
        whose PRM input would not fit is cut to the longest prefix that does, and a path left
        without room for another step ends (finished, truncated), like at the policy's limit.
        The cut text is what the PRM scores and what the path's answer is read from."""
        if not self._fits_context():
            return
        rows = [i for i, s in enumerate(batch.searches) if s.scored]
        if not rows:
            return
        children = batch.children.tolist()
        paths = [[self.nodes[x].text for x in self.path_nodes(children[i])] for i in rows]
        got = self.prm.fit_steps([batch.searches[i].problem for i in rows], paths)
        if len(got) != len(rows):
            raise ValueError(f"prm.fit_steps returned {len(got)} rows for {len(rows)} paths")
        for i, (text, full) in zip(rows, got):
            node, st = self.nodes[children[i]], batch.steps[i]
            if text != st.text:
                batch.steps[i] = dataclasses.replace(st, text=text, truncated=True)
                node.text = text
            if full:
                node.finished = node.truncated = True

    def _fits_context(self) -> bool:
        return getattr(self.prm, "max_positions", None) is not None and callable(getattr(self.prm, "fit_steps", None))

    def look_ahead(self, batch: Batch) -> None:
        """Stage 3: greedy rollouts of the unfinished children of rows with lookahead (one call
        per distinct (lookahead, greedy setting)); the PRM scores the step after them."""
        children = batch.children.tolist()
        groups: dict = {}
        for i, (c, la) in enumerate(zip(children, batch.lookahead)):
            if la > 0 and not self.nodes[c].finished:
                groups.setdefault((la, batch.searches[i].greedy), []).append(i)
        if not groups:
            return
        batch.rollouts = [[] for _ in children]
        for (la, params), rows in groups.items():
            got = self.policy.rollout([children[i] for i in rows], la, params)
            if len(got) != len(rows):
                raise ValueError(f"policy.rollout returned {len(got)} rollouts for {len(rows)} nodes")
            for i, extra in zip(rows, got):
                batch.rollouts[i] = list(extra)
                batch.searches[i].generated += sum(len(x.tokens) for x in extra)
        if self._fits_context():
            # lookahead stops at the PRM's context end: the steps that would not fit are dropped
            for rows in groups.values():
                for i in rows:
                    s, extra = batch.searches[i], batch.rollouts[i]
                    if not s.scored:
                        continue
                    path = [self.nodes[x].text for x in self.path_nodes(children[i])]
                    while extra:
                        ((text, _),) = self.prm.fit_steps([s.problem], [path + [x.text for x in extra]])
                        if text == extra[-1].text:
                            break
                        extra.pop()

    def score(self, batch: Batch) -> None:
        """Stage 4: one ``score_steps`` call for the rows of every scored search whose PRM keeps
        its nodes, and one ``score_paths`` call for the paths of deferred searches that end
        in this step (their other rows stay unscored)."""
        scores = np.zeros(len(batch.searches), dtype=np.float64)  # the forest needs a number
        rows = [i for i, s in enumerate(batch.searches) if s.scored and not self.deferred(s)]
        # shortest steps first: the PRM pads a forward's rows to the longest, and rows of
        # similar length batch with little padding (the scores do not depend on row order)
        rows.sort(key=lambda i: len(batch.steps[i].tokens))
        ended = [i for i, s in enumerate(batch.searches)
                 if s.scored and self.deferred(s) and not self.open(int(batch.children[i]))]
        batch.prm_rows = len(rows) + len(ended)
        if rows and self.prm is not None:
            parents, children = batch.parents.tolist(), batch.children.tolist()
            extra = None
            if batch.rollouts is not None:
                extra = [[x.text for x in batch.rollouts[i]] for i in rows]
            got = self.prm.score_steps(
                [parents[i] for i in rows], [children[i] for i in rows], [batch.steps[i].text for i in rows], extra
            )
            got = np.asarray(got, dtype=np.float64)
            if got.shape != (len(rows),) or not np.all(np.isfinite(got)):
                raise ValueError(f"prm.score_steps must return {len(rows)} finite scores; got {got!r}")
            for j, i in enumerate(rows):
                c, s = children[i], batch.searches[i]
                self.nodes[c].score = float(got[j])
                look = sum(len(x.tokens) for x in batch.rollouts[i]) if batch.rollouts is not None else 0
                s.prm_scored += len(batch.steps[i].tokens) + look
                scores[i] = got[j]
        if ended:
            batch.path_ends = [int(batch.children[i]) for i in ended]
            last = self.score_paths(batch.path_ends, {int(batch.children[i]): len(batch.steps[i].tokens) for i in ended})
            scores[ended] = last
        batch.scores = scores

    def score_paths(self, leaves: Sequence[int], new_tokens: dict[int, int] | None = None) -> list[float]:
        """Score the whole paths to ``leaves`` (nodes of deferred searches) in one
        ``PRM.score_paths`` call: every node of each path gets its step score, each search its
        PRM tokens. ``new_tokens``: the step tokens of leaves not yet in the forest. Returns
        the leaves' scores (float64)."""
        new_tokens = new_tokens or {}
        paths = [self.path_nodes(x) for x in leaves]
        got = self.prm.score_paths([self.nodes[p[0]].parent for p in paths],
                                   [[self.nodes[y].text for y in p] for p in paths])
        if len(got) != len(paths) or any(len(g) != len(p) for g, p in zip(got, paths)):
            raise ValueError(f"prm.score_paths must return one score per step of {len(paths)} paths")
        for p, g in zip(paths, got):
            values = np.asarray(g, dtype=np.float64)
            if not np.all(np.isfinite(values)):
                raise ValueError(f"prm.score_paths must return finite scores; got {g!r}")
            for x, v in zip(p, values.tolist()):
                self.nodes[x].score = v
            old = [x for x in p if x not in new_tokens]
            tokens = int(self.forest.nodes(np.array(old, dtype=np.int32))["num_tokens"].sum()) if old else 0
            self.nodes[p[-1]].search.prm_scored += tokens + sum(new_tokens.get(x, 0) for x in p)
        return [float(g[-1]) for g in got]

    def record(self, batch: Batch) -> None:
        """Stage 5: steps, scores and finished flags into the forest, answers of finished
        paths, then the parents and the finished children are released in the models."""
        children = batch.children.tolist()
        if not children:
            return
        flat, offsets = _csr([s.tokens for s in batch.steps])
        done = np.array([self.nodes[c].finished for c in children], dtype=bool)
        self.forest.set_steps(batch.children, flat, offsets, batch.scores, done)
        self._set_path_scores(batch.path_ends)
        answered, answer_ids = [], []
        for c in children:
            node = self.nodes[c]
            if node.finished:
                node.answer = boxed_answer(self.solution_text(c))
                if node.answer is not None:
                    answered.append(c)
                    answer_ids.append(grading.answer_id(grading.normalize_answer(node.answer)))
        if answered:
            self.forest.set_answers(np.array(answered, dtype=np.int32), np.array(answer_ids, dtype=np.int64))
        self.release(batch.parents.tolist() + [c for c in children if self.nodes[c].finished])

    # ------------------------------------------------------------------ leaving the search

    def prune(self, node_ids) -> None:
        """Nodes leave the search: prune them in the forest, free them in the models."""
        ids = [int(x) for x in node_ids]
        if ids:
            self.forest.prune(np.array(ids, dtype=np.int32))
            self.release(ids)

    def release(self, node_ids) -> None:
        """Tell the policy (and, for scored searches, the PRM) that these nodes are no longer
        extended (once each)."""
        ids = list(dict.fromkeys(int(x) for x in node_ids if not self.nodes[int(x)].released))
        if not ids:
            return
        for x in ids:
            self.nodes[x].released = True
        self.policy.release(ids)
        scored = [x for x in ids if self._prm_held(self.nodes[x].search)]
        if scored and self.prm is not None:
            self.prm.release(scored)

    def drop(self, search: Search, strict: bool = True) -> None:
        """Free everything of a search: its nodes in the models, the forest and here.
        strict=False (after a failure): model errors are swallowed and every node is
        released again, whatever the models may still hold."""
        prm_ids = search.node_ids if self._prm_held(search) else search.prm_roots
        if strict:
            self.release(search.node_ids)
            if search.prm_roots and self.prm is not None:
                self.prm.release(search.prm_roots)
        else:
            for model, ids in ((self.policy, search.node_ids), (self.prm, prm_ids)):
                if model is not None and ids:
                    try:
                        model.release(ids)
                    except Exception:  # noqa: BLE001 - never mask the failure being handled
                        pass
        if search.node_ids:
            self.forest.release_problem(search.problem_id)
        for x in search.node_ids:
            self.nodes.pop(x, None)
        search.node_ids = []
        search.prm_roots = []

    # ------------------------------------------------------------------ preemption

    def resumable(self, search: Search) -> bool:
        """The models can rebuild this search's nodes (``ponder.protocols.Resumable``): the
        policy, and the PRM when it scores the search."""
        models = [self.policy] + ([self.prm] if search.scored and self.prm is not None else [])
        return all(callable(getattr(m, "restore", None)) for m in models)

    def suspend(self, search: Search) -> None:
        """Free every node the models hold for the search (the policy's unreleased nodes; the
        PRM's scored nodes, or a deferred search's roots) but keep its forest nodes and facts;
        ``restore`` makes the models hold the same nodes again. Only for a ``resumable`` search."""
        policy_ids = [x for x in search.node_ids if not self.nodes[x].released]
        prm_ids = list(search.prm_roots) if self.deferred(search) else (
            policy_ids if self._prm_held(search) else [])
        self.release(policy_ids)
        if search.prm_roots and self.prm is not None:
            self.prm.release(search.prm_roots)
        search.prm_roots = []
        search.suspended = (policy_ids, list(prm_ids))

    def node_paths(self, search: Search, node_ids: Sequence[int]) -> list[NodePath]:
        """Each node's ``NodePath``: the search's problem, prompt + step tokens, step texts."""
        ids = [int(x) for x in node_ids]
        if not ids:
            return []
        flat, offsets = self.forest.path_tokens(np.array(ids, dtype=np.int32))
        flat, offsets = flat.tolist(), offsets.tolist()
        return [NodePath(search.problem, tuple(flat[offsets[i] : offsets[i + 1]]),
                         tuple(self.nodes[y].text for y in self.path_nodes(x))) for i, x in enumerate(ids)]

    def suspended_tokens(self, search: Search) -> int:
        """Tokens of the distinct forest nodes on the paths a suspended search will restore
        (an upper bound of what its restore computes, shared prefixes counted once)."""
        if search.suspended is None:
            return 0
        on_paths: set[int] = set()
        for x in search.suspended[0] + search.suspended[1]:
            while x != -1 and x not in on_paths:
                on_paths.add(x)
                x = self.nodes[x].parent
        if not on_paths:
            return 0
        return int(self.forest.nodes(np.array(sorted(on_paths), dtype=np.int32))["num_tokens"].sum())

    def restore(self, search: Search) -> int:
        """Undo ``suspend``: the policy (and the PRM) rebuild the nodes the search held, from
        their paths (``Resumable.restore``). All or nothing: on an error (``KVCacheFull``
        included) the models hold none of them and the search stays suspended. Returns the
        tokens the models ran (``tokens_reprefilled``)."""
        if search.suspended is None:
            return 0
        policy_ids, prm_ids = search.suspended
        ran = 0
        if policy_ids:
            ran += int(self.policy.restore(policy_ids, self.node_paths(search, policy_ids)) or 0)
        if prm_ids and self.prm is not None:
            try:
                ran += int(self.prm.restore(prm_ids, self.node_paths(search, prm_ids)) or 0)
            except BaseException:
                self.policy.release(policy_ids)
                raise
        for x in policy_ids:
            self.nodes[x].released = False
        if self.deferred(search):
            search.prm_roots = list(prm_ids)
        search.suspended = None
        return ran

    # ------------------------------------------------------------------ reading

    def open(self, node: int) -> bool:
        """The path may take another step: unfinished and below its search's ``max_steps``."""
        n = self.nodes[node]
        return not n.finished and n.depth < n.search.config.max_steps

    def path_nodes(self, node: int) -> list[int]:
        """The step nodes from the root's first child down to ``node`` (root excluded)."""
        out = []
        while self.nodes[node].parent != -1:
            out.append(node)
            node = self.nodes[node].parent
        return out[::-1]

    def solution_text(self, node: int) -> str:
        """The steps of the path to ``node`` joined (the prompt is not part of it)."""
        return "".join(self.nodes[x].text for x in self.path_nodes(node))

    def path_scores(self, node_ids: Sequence[int], agg: str) -> list[float]:
        """The paths' step scores aggregated with ``agg`` by the forest (``Forest.path_scores``,
        float64, exactly the PRM's float64 scores combined); NaN for a node without a PRM score
        (a root, or a node of an unscored search). Node ids may repeat."""
        ids = [int(x) for x in node_ids]
        ask = list(dict.fromkeys(x for x in ids if not math.isnan(self.nodes[x].score)))
        got = self.forest.path_scores(np.array(ask, dtype=np.int32), agg).tolist() if ask else []
        value = dict(zip(ask, got))
        return [value.get(x, math.nan) for x in ids]

    def completion(self, node: int, score: float) -> Completion:
        path = self.path_nodes(node)
        n = self.nodes[node]
        return Completion(
            node_id=int(node),
            text="".join(self.nodes[x].text for x in path),
            steps=[self.nodes[x].text for x in path],
            step_scores=[self.nodes[x].score for x in path] if n.search.scored else [],
            score=score,
            answer=n.answer,
            finished=n.finished,
            truncated=n.truncated,
        )

    # ------------------------------------------------------------------ the end

    def _set_path_scores(self, leaves: Sequence[int]) -> None:
        """The scores ``score_paths`` gave the paths to ``leaves`` (recorded in the forest with
        placeholders) into the forest, in one ``Forest.set_scores``: the path aggregates become
        what the scores would have given at ``set_steps`` (steps, tokens and status unchanged)."""
        ids = list(dict.fromkeys(x for leaf in leaves for x in self.path_nodes(leaf)))
        if ids:
            scores = np.array([self.nodes[x].score for x in ids], dtype=np.float64)
            self.forest.set_scores(np.array(ids, dtype=np.int32), scores)

    def _score_open_ends(self, completions: Sequence[int]) -> None:
        """A deferred search stopped early: score the paths of its completions that did not
        end (their steps are in the forest with a placeholder score) and set their scores in
        the forest."""
        leaves = [x for x in dict.fromkeys(int(c) for c in completions)
                  if self.nodes[x].parent != -1 and math.isnan(self.nodes[x].score)]
        if leaves:
            self.score_paths(leaves)
            self._set_path_scores(leaves)

    def results(
        self,
        search: Search,
        completions: list[int],
        votes: dict[str, tuple[str, str]],
        problem_id: int,
        stopped: str | None = None,
        prm_free: tuple[str, ...] = (),
    ) -> dict[str, SearchResult]:
        """Vote over a search's completions (node ids in the method's order, repeats allowed:
        padding; the vote counts each node once, in that order, ties to the answer seen
        first) once per entry of ``votes`` (name -> (how, agg)); one ``SearchResult`` per
        name. Names in ``prm_free`` report a budget without the PRM. Nothing is freed here."""
        if self.deferred(search):
            self._score_open_ends(completions)
        voters = np.array(list(dict.fromkeys(int(x) for x in completions)), dtype=np.int32)
        winners: dict[str, int] = {}
        for name, (how, agg) in votes.items():
            winners[name] = -1
            if voters.size:
                got = self.forest.vote(voters, how, agg)
                if got["node_ids"].size:
                    winners[name] = int(got["node_ids"][0])
        wall = time.perf_counter() - search.t0
        n_policy = _num_parameters(self.policy)
        n_prm = _num_parameters(self.prm) if self.prm is not None and search.scored else 0
        if search.node_ids:
            ids = self.forest.problem_nodes(search.problem_id)
            tree = {"node_id": ids, **self.forest.nodes(ids)}
        else:
            ids = np.zeros(0, dtype=np.int32)
            tree = {"node_id": ids, **{k: v[:0] for k, v in _EMPTY_TREE.items()}}
        scores = self.path_scores(completions, search.config.agg)
        done = [self.completion(x, sc) for x, sc in zip(completions, scores)]
        out: dict[str, SearchResult] = {}
        for name, node in winners.items():
            gen, pre = search.generated, search.prefilled
            scored = search.prm_scored if name not in prm_free else 0
            budget = Budget(
                policy_tokens_generated=gen,
                policy_tokens_prefilled=pre,
                prm_tokens_scored=scored,
                flops_estimate=2.0 * n_policy * (gen + pre) + 2.0 * (n_prm if name not in prm_free else 0) * scored,
                wall_s=wall,
            )
            out[name] = SearchResult(
                problem_id=problem_id,
                problem=search.problem,
                answer=self.nodes[node].answer if node >= 0 else None,
                answer_node=node,
                completions=list(done),
                tree=tree,
                budget=budget,
                stopped=stopped,
            )
        return out


# The field dtypes of ``Forest.nodes`` for a search that never got a node (cancelled in the queue).
_EMPTY_TREE = {
    "parent": np.zeros(0, np.int32),
    "problem": np.zeros(0, np.int64),
    "subtree": np.zeros(0, np.int32),
    "depth": np.zeros(0, np.int32),
    "num_tokens": np.zeros(0, np.int32),
    "has_step": np.zeros(0, bool),
    "score": np.zeros(0, np.float32),
    "status": np.zeros(0, np.int8),
    "answer": np.zeros(0, np.int64),
}
