"""The stages every search method shares, over one ``ponder.Forest`` for a whole batch.

A method (``majority.py``, ``best_of_n.py``, ``beam_search.py``, ``dvts.py``) only decides
*which* nodes to expand and which to keep; ``Run`` does the data path for all problems of the
batch at once::

    problems --Policy.start--> prompt tokens --Forest.add_roots--> roots        (add_roots)
    parents --Forest.expand--> children --Policy.sample_steps--> steps          (step)
      [--Policy.rollout--> lookahead steps] --PRM.score_steps--> step scores
      --Forest.set_steps--> path aggregates; finished paths --grading--> Forest.set_answers
    unfinished leaves --step, step, ...--> ends (EOS, boxed answer or max_steps) (run_to_end)
    completions --Forest.vote--> answer; Forest.nodes --> tree; counters --> Budget (results)

Every call to the models covers every problem and path that is advancing: one batched
``sample_steps`` (plus one ``rollout`` with lookahead) and one batched ``score_steps`` per
stage. A node is expanded at most once in every method, so after its children are scored
the policy and the PRM may free it (``release``); finished and pruned nodes are released too.

When is a step the end of a path? When the policy says EOS, when the step holds a complete
boxed answer, or when it is empty (the policy produced nothing). A step cut off by
``max_step_tokens`` is *truncated*, not finished: the path goes on from it (search-and-learn
counts it as a finished solution; ``compat_search_and_learn`` does too). A path that reaches
``max_steps`` without ending stops there unfinished (compat: finished).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import numpy as np

from .. import grading
from .._core import Forest
from ..protocols import SamplingParams, Step
from .config import Budget, Completion, SearchConfig, SearchResult, path_score


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


class Run:
    """One batched search: the forest, the models, per-node facts and the compute counters.

    Node ids are dense from 0 (a fresh forest hands them out in order), so per-node facts are
    Python lists indexed by node id: ``parent``, ``problem``, ``depth``, ``text`` (the step;
    "" for roots), ``score`` (the PRM's step score; NaN unscored), ``finished``,
    ``truncated``, ``answer`` (the box content of a finished path, else None).
    """

    def __init__(self, problems: Sequence[str], policy, prm, config: SearchConfig) -> None:
        self.problems = list(problems)
        self.policy = policy
        self.prm = prm  # None: steps are not scored (majority voting)
        self.config = config
        self.compat = config.compat_search_and_learn
        seed = config.sampling.seed if config.sampling.seed is not None else config.seed
        self.params: SamplingParams = dataclasses.replace(config.sampling, seed=seed)
        self.greedy: SamplingParams = dataclasses.replace(self.params, temperature=0.0)
        self.forest = Forest()
        self.parent: list[int] = []
        self.problem: list[int] = []
        self.depth: list[int] = []
        self.text: list[str] = []
        self.score: list[float] = []
        self.finished: list[bool] = []
        self.truncated: list[bool] = []
        self.answer: list[str | None] = []
        self._released: list[bool] = []
        p = len(self.problems)
        self.generated = np.zeros(p, dtype=np.int64)
        self.prefilled = np.zeros(p, dtype=np.int64)
        self.prm_scored = np.zeros(p, dtype=np.int64)
        self.policy_calls = 0  # sample_steps calls (one per stage, whatever the batch)
        self.prm_calls = 0
        self._t0 = time.perf_counter()

    @property
    def num_problems(self) -> int:
        return len(self.problems)

    # ------------------------------------------------------------------ building the forest

    def _append(self, ids: np.ndarray, parent, problem, depth) -> None:
        if ids.size and int(ids[0]) != len(self.parent):
            raise RuntimeError(f"forest gave node id {int(ids[0])}, expected {len(self.parent)}")
        k = int(ids.size)
        self.parent.extend(parent)
        self.problem.extend(problem)
        self.depth.extend(depth)
        self.text.extend([""] * k)
        self.score.extend([math.nan] * k)
        self.finished.extend([False] * k)
        self.truncated.extend([False] * k)
        self.answer.extend([None] * k)
        self._released.extend([False] * k)

    def add_roots(self, subtrees: int = 1) -> np.ndarray:
        """``subtrees`` roots per problem (DVTS: N/M, else 1), problem ``p`` = batch index.

        Returns int32 [problems, subtrees]. The root ids are known before ``add_roots`` (a
        forest hands ids out in increasing order), so the models can be started first and
        return the prompt tokens the roots hold.
        """
        p = self.num_problems
        first = int(self.forest.stats()["ids_given"])
        ids = np.arange(first, first + p * subtrees, dtype=np.int32)
        problem_of = np.repeat(np.arange(p, dtype=np.int64), subtrees)
        texts = [self.problems[i] for i in problem_of.tolist()]
        prompts = self.policy.start(ids.tolist(), texts)
        if len(prompts) != ids.size:
            raise ValueError(f"policy.start returned {len(prompts)} prompts for {ids.size} roots")
        if self.prm is not None:
            self.prm.start(ids.tolist(), texts)
        flat, offsets = _csr(prompts)
        got = self.forest.add_roots(problem_of, np.tile(np.arange(subtrees, dtype=np.int64), p), flat, offsets)
        if not np.array_equal(got, ids):
            raise RuntimeError("forest root ids differ from the ids given to the models")
        self._append(got, [-1] * got.size, problem_of.tolist(), [0] * got.size)
        # A problem's prompt is prefilled once: all its roots and paths share it.
        for i in range(p):
            self.prefilled[i] = len(prompts[i * subtrees])
        return got.reshape(p, subtrees)

    def step(self, parents, counts, lookahead: int = 0) -> np.ndarray:
        """Expand ``parents[i]`` into ``counts[i]`` children and give each child one step.

        parents: int [k] node ids; counts: int [k]. One batched ``sample_steps`` (children of
        a parent are consecutive: the policy sees them as its samples 0, 1, ...), one batched
        ``rollout`` of ``lookahead`` greedy steps for the unfinished children (scored, never
        kept), one batched ``score_steps``; then the forest records steps, scores, finished
        flags and answers. The parents and the finished children are released in the models.
        Returns int32 [sum(counts)]: the children, parent by parent.
        """
        parents = np.asarray(parents, dtype=np.int32)
        counts = np.asarray(counts, dtype=np.int32)
        if parents.size == 0 or int(counts.sum()) == 0:
            return np.zeros(0, dtype=np.int32)
        children = self.forest.expand(parents, counts)
        parent_of = np.repeat(parents, counts)
        parent_list = parent_of.tolist()
        child_list = children.tolist()
        self._append(
            children,
            parent_list,
            [self.problem[x] for x in parent_list],
            [self.depth[x] + 1 for x in parent_list],
        )
        steps: list[Step] = self.policy.sample_steps(parent_list, child_list, self.params)
        self.policy_calls += 1
        if len(steps) != children.size:
            raise ValueError(f"policy.sample_steps returned {len(steps)} steps for {children.size} paths")

        cfg = self.config
        for child, st in zip(child_list, steps):
            ended = bool(st.eos) or len(st.tokens) == 0 or boxed_answer(st.text) is not None
            at_limit = self.depth[child] >= cfg.max_steps
            cut = bool(st.truncated) or (at_limit and not ended)
            self.text[child] = st.text
            self.finished[child] = ended or (self.compat and cut)
            self.truncated[child] = cut
            self.generated[self.problem[child]] += len(st.tokens)

        # Lookahead: greedy rollouts of the paths that go on; the PRM scores the step after them.
        rollouts: list[list[Step]] | None = None
        if lookahead > 0:
            open_ids = [c for c in child_list if not self.finished[c]]
            rollouts = [[] for _ in child_list]
            if open_ids:
                got = self.policy.rollout(open_ids, lookahead, self.greedy)
                if len(got) != len(open_ids):
                    raise ValueError(f"policy.rollout returned {len(got)} rollouts for {len(open_ids)} nodes")
                by_id = dict(zip(open_ids, got))
                rollouts = [list(by_id.get(c, [])) for c in child_list]
                for c, extra in zip(child_list, rollouts):
                    self.generated[self.problem[c]] += sum(len(s.tokens) for s in extra)

        if self.prm is not None:
            extra_texts = None if rollouts is None else [[s.text for s in r] for r in rollouts]
            scores = self.prm.score_steps(parent_list, child_list, [s.text for s in steps], extra_texts)
            self.prm_calls += 1
            scores = np.asarray(scores, dtype=np.float64)
            if scores.shape != (children.size,) or not np.all(np.isfinite(scores)):
                raise ValueError(f"prm.score_steps must return {children.size} finite scores; got {scores!r}")
            for i, (c, st) in enumerate(zip(child_list, steps)):
                self.score[c] = float(scores[i])
                extra = sum(len(s.tokens) for s in rollouts[i]) if rollouts is not None else 0
                self.prm_scored[self.problem[c]] += len(st.tokens) + extra
        else:
            scores = np.zeros(children.size, dtype=np.float64)  # the forest needs a number

        flat, offsets = _csr([s.tokens for s in steps])
        done = np.array([self.finished[c] for c in child_list], dtype=bool)
        self.forest.set_steps(children, flat, offsets, scores, done)

        answered, answer_ids = [], []
        for c in child_list:
            if self.finished[c]:
                ans = boxed_answer(self.solution_text(c))
                self.answer[c] = ans
                if ans is not None:
                    answered.append(c)
                    answer_ids.append(grading.answer_id(grading.normalize_answer(ans)))
        if answered:
            self.forest.set_answers(np.array(answered, dtype=np.int32), np.array(answer_ids, dtype=np.int64))

        self.release(parents.tolist() + [c for c in child_list if self.finished[c]])
        return children

    def run_to_end(self, leaves) -> np.ndarray:
        """Extend every unfinished leaf one step at a time (all of them in one batch per step,
        no lookahead) until it ends or has ``max_steps`` steps: "generate to EOS".

        leaves: int [k]. Returns int32 [k]: the last node of each leaf's path, in input order.
        """
        ends = np.array(leaves, dtype=np.int32)
        limit = self.config.max_steps
        while True:
            open_mask = np.array(
                [not self.finished[x] and self.depth[x] < limit for x in ends.tolist()], dtype=bool
            )
            if not open_mask.any():
                return ends
            ends[open_mask] = self.step(ends[open_mask], np.ones(int(open_mask.sum()), dtype=np.int32))

    def prune(self, node_ids) -> None:
        """Nodes leave the search: prune them in the forest, free them in the models."""
        ids = [int(x) for x in node_ids]
        if ids:
            self.forest.prune(np.array(ids, dtype=np.int32))
            self.release(ids)

    def abort(self) -> None:
        """After a failure mid-search (e.g. ``KVCacheFull``): free every node the models may
        hold for this run, so the same policy / PRM serve the next search from a clean state.
        Errors while cleaning up are swallowed: the original failure is the one to report."""
        ids = list(range(int(self.forest.stats()["ids_given"])))
        for model in (self.policy, self.prm):
            if model is not None:
                try:
                    model.release(ids)
                except Exception:  # noqa: BLE001 - never mask the failure being handled
                    pass

    def release(self, node_ids) -> None:
        """Tell the policy and the PRM that these nodes are no longer extended (once each)."""
        ids = [int(x) for x in node_ids if not self._released[int(x)]]
        ids = list(dict.fromkeys(ids))
        if not ids:
            return
        for x in ids:
            self._released[x] = True
        self.policy.release(ids)
        if self.prm is not None:
            self.prm.release(ids)

    # ------------------------------------------------------------------ reading

    def path_nodes(self, node: int) -> list[int]:
        """The step nodes from the root's first child down to ``node`` (root excluded)."""
        out = []
        while self.parent[node] != -1:
            out.append(node)
            node = self.parent[node]
        return out[::-1]

    def solution_text(self, node: int) -> str:
        """The steps of the path to ``node`` joined (the prompt is not part of it)."""
        return "".join(self.text[x] for x in self.path_nodes(node))

    def path_score(self, node: int) -> float:
        """The path's step scores aggregated with the search's ``agg`` (float64; NaN unscored)."""
        scores = [self.score[x] for x in self.path_nodes(node)]
        return math.nan if self.prm is None else path_score(scores, self.config.agg)

    def completion(self, node: int) -> Completion:
        path = self.path_nodes(node)
        steps = [self.text[x] for x in path]
        scores = [self.score[x] for x in path] if self.prm is not None else []
        return Completion(
            node_id=int(node),
            text="".join(steps),
            steps=steps,
            step_scores=scores,
            score=path_score(scores, self.config.agg),
            answer=self.answer[node],
            finished=self.finished[node],
            truncated=self.truncated[node],
        )

    # ------------------------------------------------------------------ the end

    def results(self, completions: list[list[int]], how: str, agg: str) -> list[SearchResult]:
        """Vote per problem over its completions, build the results, free everything.

        completions: per problem, the node ids of its completions in the order the method
        returns them (repeats allowed: padding). The vote counts each node once, in that
        order (ties go to the answer seen first). how: majority | weighted | best.
        """
        return self.results_by_vote(completions, {how: (how, agg)})[how]

    def results_by_vote(
        self, completions: list[list[int]], votes: dict[str, tuple[str, str]], prm_free: tuple[str, ...] = ()
    ) -> dict[str, list[SearchResult]]:
        """``results`` for several votes over the same completions: ``votes`` maps a name to
        (how, agg); one result list per name, then everything is freed. Names in ``prm_free``
        (a vote that needs no PRM, e.g. majority over PRM-scored samples) report a budget
        without the PRM's tokens and FLOPs."""
        p = self.num_problems
        voters = [list(dict.fromkeys(int(x) for x in nodes)) for nodes in completions]
        flat = np.array([x for nodes in voters for x in nodes], dtype=np.int32)
        winners: dict[str, list[int]] = {}
        for name, (how, agg) in votes.items():
            winner = [-1] * p
            if flat.size:
                result = self.forest.vote(flat, how, agg)
                for problem, node in zip(result["problem_ids"].tolist(), result["node_ids"].tolist()):
                    winner[problem] = int(node)
            winners[name] = winner
        wall = time.perf_counter() - self._t0
        n_policy, n_prm = _num_parameters(self.policy), _num_parameters(self.prm) if self.prm is not None else 0
        trees, done = [], []
        for i in range(p):
            ids = self.forest.problem_nodes(i)
            trees.append({"node_id": ids, **self.forest.nodes(ids)})
            done.append([self.completion(x) for x in completions[i]])
        out: dict[str, list[SearchResult]] = {}
        for name, winner in winners.items():
            scored_by_prm = name not in prm_free
            out[name] = []
            for i in range(p):
                gen, pre = int(self.generated[i]), int(self.prefilled[i])
                scored = int(self.prm_scored[i]) if scored_by_prm else 0
                budget = Budget(
                    policy_tokens_generated=gen,
                    policy_tokens_prefilled=pre,
                    prm_tokens_scored=scored,
                    flops_estimate=2.0 * n_policy * (gen + pre) + 2.0 * n_prm * scored,
                    wall_s=wall,
                )
                node = winner[i]
                out[name].append(
                    SearchResult(
                        problem_id=i,
                        problem=self.problems[i],
                        answer=self.answer[node] if node >= 0 else None,
                        answer_node=node,
                        completions=done[i],
                        tree=trees[i],
                        budget=budget,
                    )
                )
        self.release(range(len(self.parent)))
        for i in range(p):
            self.forest.release_problem(i)
        return out
