"""Pure-Python search forest: the readable twin of ``ponder._core.Forest``.

This module is the specification of the search-tree control plane. ``ponder._core.Forest``
(C++, ``csrc/tree/``) must return exactly what this class returns for every sequence of calls,
and raise the same exception types for the same bad inputs; the property tests in
``tests/test_forest_property.py`` hold the two to that. It is also the baseline that
``benchmarks/bench_core.py`` measures the C++ core against.

Model
-----
A forest holds the search trees of many problems at once. Every node has an ``int32`` id,
given out in increasing order and never reused by the same forest. A *root* holds a problem's
prompt tokens; every other node holds one reasoning *step*: its token ids, the PRM's score
for it, and running aggregates of the scores on its path (so that every aggregation is O(1)
per node). A node is ``ACTIVE`` (may be expanded), ``FINISHED`` (a completion) or ``PRUNED``.

Rules every implementation follows
----------------------------------
* Node ids that were never given out, or whose problem was released, raise ``IndexError``;
  values that are not int32 at all raise ``ValueError`` like any other malformed input.
* Any other bad argument (wrong dtype or shape, negative token id, NaN score, unknown
  ``how``, a duplicate id where ids must be unique, an operation a node's state forbids)
  raises ``ValueError``. The message names the argument.
* A call that raises changes nothing.
* Groups in outputs ("per problem", "per (problem, subtree)") appear in the order in which
  their first member appears in the input.
* Score comparisons use the float64 aggregate (NaN ranks lowest); ties go to the lower node id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# The option names and the unset answer id (-(2**63)) are the C++ core's: one list for both.
from .._core import AGGREGATIONS, NO_ANSWER, VOTES

ACTIVE, FINISHED, PRUNED = 0, 1, 2

INT32_MAX = 2**31 - 1


@dataclass
class Node:
    parent: int  # -1 for a root
    problem: int
    subtree: int
    depth: int  # 0 for a root
    tokens: list[int] = field(default_factory=list)  # prompt (root) or step tokens
    has_step: bool = False
    score: float = math.nan  # the step's PRM score
    # Running aggregates over the scored steps from the root to this node.
    min_score: float = math.inf
    prod_score: float = 1.0
    sum_score: float = 0.0
    num_scored: int = 0
    status: int = ACTIVE
    answer: int = NO_ANSWER
    scored_children: int = 0  # children whose step was set: this node's step is then fixed


# ----------------------------------------------------------------------------- input checks


def _as_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
    return a


def int_array(x, name: str, lo: int, hi: int) -> list[int]:
    """1-D integer input -> list of Python ints, each in [lo, hi]."""
    a = _as_1d(x, name)
    if a.size == 0:
        return []
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {a.dtype}")
    values = a.tolist()
    for i, v in enumerate(values):
        if v < lo or v > hi:
            raise ValueError(f"{name}[{i}] = {v} is out of range [{lo}, {hi}]")
    return values


def float_array(x, name: str) -> list[float]:
    """1-D real input -> list of finite Python floats."""
    a = _as_1d(x, name)
    if a.size == 0:
        return []
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a real-valued array, got dtype {a.dtype}")
    values = a.astype(np.float64).tolist()
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(f"{name}[{i}] = {v} is not finite")
    return values


def bool_array(x, name: str) -> list[bool]:
    a = _as_1d(x, name)
    if a.size == 0:
        return []
    if a.dtype.kind == "b":
        return [bool(v) for v in a.tolist()]
    if a.dtype.kind in "iu":
        values = a.tolist()
        for i, v in enumerate(values):
            if v not in (0, 1):
                raise ValueError(f"{name}[{i}] = {v} is not a boolean (0 or 1)")
        return [bool(v) for v in values]
    raise ValueError(f"{name} must be a boolean array, got dtype {a.dtype}")


def ragged(flat, offsets, n: int, flat_name: str, offsets_name: str) -> list[list[int]]:
    """CSR input (flat token ids + int offsets of length n+1) -> n lists of token ids."""
    tokens = int_array(flat, flat_name, 0, INT32_MAX)
    offs = int_array(offsets, offsets_name, 0, 2**63 - 1)
    if len(offs) != n + 1:
        raise ValueError(f"{offsets_name} must have length {n + 1} (n + 1), got {len(offs)}")
    if offs[0] != 0:
        raise ValueError(f"{offsets_name}[0] must be 0, got {offs[0]}")
    for i in range(n):
        if offs[i + 1] < offs[i]:
            raise ValueError(f"{offsets_name} must be non-decreasing (index {i + 1})")
    if offs[n] != len(tokens):
        raise ValueError(
            f"{offsets_name}[-1] = {offs[n]} must equal len({flat_name}) = {len(tokens)}"
        )
    return [tokens[offs[i] : offs[i + 1]] for i in range(n)]


def check_same_length(n: int, **arrays) -> None:
    for name, values in arrays.items():
        if len(values) != n:
            raise ValueError(f"{name} must have length {n}, got {len(values)}")


def check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_unique(ids: list[int], name: str) -> None:
    seen = set()
    for i, v in enumerate(ids):
        if v in seen:
            raise ValueError(f"{name}[{i}] = {v} appears more than once")
        seen.add(v)


def _csr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = [0]
    for tokens in lists:
        offsets.append(offsets[-1] + len(tokens))
    flat = [t for tokens in lists for t in tokens]
    return np.array(flat, dtype=np.int32), np.array(offsets, dtype=np.int64)


# ----------------------------------------------------------------------------- the forest


class Forest:
    """Search trees of many problems, in plain Python. See the module docstring."""

    def __init__(self) -> None:
        self._nodes: list[Node | None] = []  # index = node id; None once released
        self._problem_nodes: dict[int, list[int]] = {}  # problem id -> its node ids

    # ---- lookups
    def _node(self, node_id: int, name: str, i: int) -> Node:
        node = self._nodes[node_id] if 0 <= node_id < len(self._nodes) else None
        if node is None:
            raise IndexError(f"{name}[{i}] = {node_id} is not a live node id")
        return node

    def _nodes_of(self, ids, name: str) -> tuple[list[int], list[Node]]:
        values = int_array(ids, name, -(2**31), INT32_MAX)
        return values, [self._node(v, name, i) for i, v in enumerate(values)]

    def _scored(self, ids, name: str, allow_pruned: bool = True):
        values, nodes = self._nodes_of(ids, name)
        for i, node in enumerate(nodes):
            if not node.has_step:
                raise ValueError(f"{name}[{i}] = {values[i]} has no scored step")
            if not allow_pruned and node.status == PRUNED:
                raise ValueError(f"{name}[{i}] = {values[i]} is pruned")
        return values, nodes

    @staticmethod
    def _rank(value: float) -> float:
        """Comparison key of a score: NaN (e.g. inf * 0 in a product) ranks below everything."""
        return -math.inf if math.isnan(value) else value

    @staticmethod
    def _value(node: Node, how: str) -> float:
        if how == "last":
            return node.score
        if how == "min":
            return node.min_score
        if how == "prod":
            return node.prod_score
        return node.sum_score / node.num_scored  # mean

    def _new_node(self, node: Node) -> int:
        if len(self._nodes) > INT32_MAX:
            raise OverflowError("this forest has given out every int32 node id; make a new Forest")
        self._nodes.append(node)
        node_id = len(self._nodes) - 1
        self._problem_nodes[node.problem].append(node_id)
        return node_id

    # ---- building trees
    def add_roots(self, problem_ids, subtree_ids, prompt_tokens_flat, prompt_offsets) -> np.ndarray:
        """Add one root per entry.

        problem_ids: int [n] (>= 0); subtree_ids: int [n] (>= 0, the DVTS subtree of the root);
        prompt_tokens_flat: int [total] token ids; prompt_offsets: int [n + 1] CSR offsets.
        Returns int32 [n]: the new root ids.
        """
        problems = int_array(problem_ids, "problem_ids", 0, 2**63 - 1)
        n = len(problems)
        subtrees = int_array(subtree_ids, "subtree_ids", 0, INT32_MAX)
        check_same_length(n, subtree_ids=subtrees)
        prompts = ragged(prompt_tokens_flat, prompt_offsets, n, "prompt_tokens_flat", "prompt_offsets")
        if len(self._nodes) + n > INT32_MAX + 1:
            raise OverflowError("this forest has given out every int32 node id; make a new Forest")
        ids = []
        for problem, subtree, prompt in zip(problems, subtrees, prompts):
            self._problem_nodes.setdefault(problem, [])
            ids.append(self._new_node(Node(-1, problem, subtree, 0, list(prompt))))
        return np.array(ids, dtype=np.int32)

    def expand(self, parent_ids, counts) -> np.ndarray:
        """Give parent ``parent_ids[i]`` ``counts[i]`` new children (no step yet).

        parent_ids: int [n]; counts: int [n] (>= 0). A parent must be a root or have a step,
        and be neither finished nor pruned. Returns int32 [sum(counts)]: the children of
        parent 0 first, then those of parent 1, and so on.
        """
        parents, nodes = self._nodes_of(parent_ids, "parent_ids")
        n = len(parents)
        sizes = int_array(counts, "counts", 0, INT32_MAX)
        check_same_length(n, counts=sizes)
        for i, node in enumerate(nodes):
            if node.parent != -1 and not node.has_step:
                raise ValueError(f"parent_ids[{i}] = {parents[i]} has no step yet; set its step before expanding it")
            if node.status != ACTIVE:
                state = "finished" if node.status == FINISHED else "pruned"
                raise ValueError(f"parent_ids[{i}] = {parents[i]} is {state} and cannot be expanded")
        if len(self._nodes) + sum(sizes) > INT32_MAX + 1:
            raise OverflowError("this forest has given out every int32 node id; make a new Forest")
        children = []
        for parent_id, node, count in zip(parents, nodes, sizes):
            for _ in range(count):
                child = Node(parent_id, node.problem, node.subtree, node.depth + 1)
                children.append(self._new_node(child))
        return np.array(children, dtype=np.int32)

    def set_steps(self, node_ids, tokens_flat, offsets, step_scores, finished) -> None:
        """Set the step (tokens, PRM score, finished flag) of each node and its path aggregates.

        node_ids: int [n], unique, not roots, not pruned; tokens_flat: int [total];
        offsets: int [n + 1]; step_scores: float [n], finite; finished: bool [n].
        A node's step can be set again until one of its children has a step. Its parent must
        be a root, already have a step, or come earlier in ``node_ids`` (a parent listed after
        its child is rejected).
        """
        ids, nodes = self._nodes_of(node_ids, "node_ids")
        n = len(ids)
        steps = ragged(tokens_flat, offsets, n, "tokens_flat", "offsets")
        scores = float_array(step_scores, "step_scores")
        done = bool_array(finished, "finished")
        check_same_length(n, step_scores=scores, finished=done)
        check_unique(ids, "node_ids")
        position = {node_id: i for i, node_id in enumerate(ids)}
        for i, node in enumerate(nodes):
            if node.parent == -1:
                raise ValueError(f"node_ids[{i}] = {ids[i]} is a root; roots hold the prompt, not a step")
            if node.status == PRUNED:
                raise ValueError(f"node_ids[{i}] = {ids[i]} is pruned")
            if node.scored_children > 0:
                raise ValueError(f"node_ids[{i}] = {ids[i]} has children with steps; its step is fixed")
            parent = self._nodes[node.parent]
            j = position.get(node.parent)
            if j is not None and j > i:
                # Applying in order would compute this node's aggregates from the parent's old step.
                raise ValueError(
                    f"node_ids[{i}] = {ids[i]}: its parent {node.parent} comes later in node_ids; "
                    "list parents before their children"
                )
            if parent.parent != -1 and not parent.has_step and j is None:
                raise ValueError(
                    f"node_ids[{i}] = {ids[i]}: its parent {node.parent} has no step; "
                    "set the parent first (earlier in node_ids or in an earlier call)"
                )
        for node, step, score, is_done in zip(nodes, steps, scores, done):
            parent = self._nodes[node.parent]
            if not node.has_step:
                parent.scored_children += 1
            node.tokens = list(step)
            node.has_step = True
            node.score = score
            node.min_score = min(parent.min_score, score)
            node.prod_score = parent.prod_score * score
            node.sum_score = parent.sum_score + score
            node.num_scored = parent.num_scored + 1
            node.status = FINISHED if is_done else ACTIVE

    def set_scores(self, node_ids, step_scores) -> None:
        """Replace the PRM score of steps already set and recompute the path aggregates of those
        nodes and of every node below them, exactly (bit for bit) as if ``set_steps`` had been
        given these scores; tokens, status and answers stay. (Best-of-N records its steps with
        a placeholder score and sets the real ones when their path has been scored.)

        node_ids: int [n], unique, each with a step (pruned nodes and nodes with children are
        fine); step_scores: float [n], finite. Ids are checked first (``IndexError``), then
        step_scores, the lengths, duplicates and steps (``ValueError``).
        """
        ids, nodes = self._nodes_of(node_ids, "node_ids")
        scores = float_array(step_scores, "step_scores")
        check_same_length(len(ids), step_scores=scores)
        check_unique(ids, "node_ids")
        for i, node in enumerate(nodes):
            if not node.has_step:
                raise ValueError(f"node_ids[{i}] = {ids[i]} has no step; set_steps gives a node its step and score")
        for node, score in zip(nodes, scores):
            node.score = score
        # Ids grow from parent to child, so one ascending pass over each problem's nodes from
        # its lowest given id reaches every descendant after its parent.
        changed = set(ids)
        first: dict[int, int] = {}
        for node_id, node in zip(ids, nodes):
            first[node.problem] = min(first.get(node.problem, node_id), node_id)
        for problem, start in first.items():
            for node_id in self._problem_nodes[problem]:
                node = self._nodes[node_id]
                if node_id < start or not node.has_step or (node_id not in changed and node.parent not in changed):
                    continue
                changed.add(node_id)
                parent = self._nodes[node.parent]
                node.min_score = min(parent.min_score, node.score)
                node.prod_score = parent.prod_score * node.score
                node.sum_score = parent.sum_score + node.score

    def set_answers(self, node_ids, answer_ids) -> None:
        """Record the int64 id of each node's normalized final answer (computed in Python).

        node_ids: int [n]; answer_ids: int [n], any int64 except ``NO_ANSWER``. Later entries win.
        """
        ids, nodes = self._nodes_of(node_ids, "node_ids")
        answers = int_array(answer_ids, "answer_ids", NO_ANSWER + 1, 2**63 - 1)
        check_same_length(len(ids), answer_ids=answers)
        for node, answer in zip(nodes, answers):
            node.answer = answer

    def prune(self, node_ids) -> None:
        """Mark nodes pruned: they can no longer be expanded, stepped or selected."""
        _, nodes = self._nodes_of(node_ids, "node_ids")
        for node in nodes:
            node.status = PRUNED

    def release_problem(self, problem_id) -> None:
        """Forget every node of a problem; their ids are rejected from now on."""
        pid = int_array([problem_id], "problem_id", 0, 2**63 - 1)[0]
        if pid not in self._problem_nodes:
            raise ValueError(f"problem_id {pid} is not in the forest")
        for node_id in self._problem_nodes.pop(pid):
            self._nodes[node_id] = None

    # ---- reading
    def path_scores(self, node_ids, how: str) -> np.ndarray:
        """The step scores of each node's path aggregated: float64 [n], computed in float64
        step by step from the root (last: the node's score; min; prod: 1.0 * s1 * s2 ...;
        mean: (0.0 + s1 + s2 ...) / steps). how: last | min | prod | mean. Every node must be
        live and have a step (roots and unset children raise ValueError); pruned nodes are fine."""
        check_choice(how, "how", AGGREGATIONS)
        _, nodes = self._scored(node_ids, "node_ids")
        return np.array([self._value(node, how) for node in nodes], dtype=np.float64)

    def aggregate(self, node_ids, how: str) -> np.ndarray:
        """``path_scores`` rounded to float32 [n] (the dtype of node scores and vote weights)."""
        return self.path_scores(node_ids, how).astype(np.float32)

    def path_tokens(self, node_ids) -> tuple[np.ndarray, np.ndarray]:
        """Prompt + step tokens from the root to each node: (int32 [total], int64 [n + 1])."""
        _, nodes = self._nodes_of(node_ids, "node_ids")
        paths = []
        for node in nodes:
            parts = []
            while node is not None:
                parts.append(node.tokens)
                node = self._nodes[node.parent] if node.parent != -1 else None
            paths.append([t for part in reversed(parts) for t in part])
        return _csr(paths)

    def step_tokens(self, node_ids) -> tuple[np.ndarray, np.ndarray]:
        """Each node's own tokens (the prompt for a root): (int32 [total], int64 [n + 1])."""
        _, nodes = self._nodes_of(node_ids, "node_ids")
        return _csr([node.tokens for node in nodes])

    def nodes(self, node_ids) -> dict[str, np.ndarray]:
        """Per-node fields, each an array of length n: parent int32 (-1 for roots), problem
        int64, subtree int32, depth int32, num_tokens int32, has_step bool, score float32
        (NaN without a step), status int8 (ACTIVE/FINISHED/PRUNED), answer int64."""
        _, nodes = self._nodes_of(node_ids, "node_ids")
        return {
            "parent": np.array([x.parent for x in nodes], dtype=np.int32),
            "problem": np.array([x.problem for x in nodes], dtype=np.int64),
            "subtree": np.array([x.subtree for x in nodes], dtype=np.int32),
            "depth": np.array([x.depth for x in nodes], dtype=np.int32),
            "num_tokens": np.array([len(x.tokens) for x in nodes], dtype=np.int32),
            "has_step": np.array([x.has_step for x in nodes], dtype=bool),
            "score": np.array([x.score for x in nodes], dtype=np.float32),
            "status": np.array([x.status for x in nodes], dtype=np.int8),
            "answer": np.array([x.answer for x in nodes], dtype=np.int64),
        }

    def problem_nodes(self, problem_id) -> np.ndarray:
        """int32 ids of every node of a problem, ascending."""
        pid = int_array([problem_id], "problem_id", 0, 2**63 - 1)[0]
        if pid not in self._problem_nodes:
            raise ValueError(f"problem_id {pid} is not in the forest")
        return np.array(self._problem_nodes[pid], dtype=np.int32)

    def problems(self) -> np.ndarray:
        """int64 ids of the problems in the forest, ascending."""
        return np.array(sorted(self._problem_nodes), dtype=np.int64)

    @property
    def num_nodes(self) -> int:
        """Number of live (not released) nodes."""
        return sum(len(ids) for ids in self._problem_nodes.values())

    def __len__(self) -> int:
        return self.num_nodes

    # ---- selection and voting
    def select_beam(self, candidate_ids, keep_per_problem: int, how: str, dedupe: bool = False) -> np.ndarray:
        """Per problem, the ``keep_per_problem`` best candidates by aggregated score.

        candidate_ids: int [n], unique, scored, not pruned. dedupe: candidates with the same
        parent and identical step tokens count once (the best of them stays).
        Returns int32 [<= keep * problems]: per problem (first-appearance order) the kept ids,
        best first; ties go to the lower id.
        """
        check_choice(how, "how", AGGREGATIONS)
        keep = int_array([keep_per_problem], "keep_per_problem", 0, INT32_MAX)[0]
        ids, nodes = self._scored(candidate_ids, "candidate_ids", allow_pruned=False)
        check_unique(ids, "candidate_ids")
        groups: dict[int, list[tuple[float, int, Node]]] = {}
        for node_id, node in zip(ids, nodes):
            rank = self._rank(self._value(node, how))
            groups.setdefault(node.problem, []).append((-rank, node_id, node))
        kept = []
        for members in groups.values():
            members.sort(key=lambda m: (m[0], m[1]))
            if dedupe:
                seen, unique = set(), []
                for m in members:
                    key = (m[2].parent, tuple(m[2].tokens))
                    if key not in seen:
                        seen.add(key)
                        unique.append(m)
                members = unique
            kept.extend(m[1] for m in members[:keep])
        return np.array(kept, dtype=np.int32)

    def select_dvts(self, candidate_ids, how: str) -> np.ndarray:
        """Per (problem, subtree) the best candidate by aggregated score (ties: lower id).

        candidate_ids: int [n], unique, scored, not pruned. Returns int32 [groups]."""
        check_choice(how, "how", AGGREGATIONS)
        ids, nodes = self._scored(candidate_ids, "candidate_ids", allow_pruned=False)
        check_unique(ids, "candidate_ids")
        best: dict[tuple[int, int], tuple[float, int]] = {}
        for node_id, node in zip(ids, nodes):
            key = (node.problem, node.subtree)
            cand = (-self._rank(self._value(node, how)), node_id)
            if key not in best or cand < best[key]:
                best[key] = cand
        return np.array([c[1] for c in best.values()], dtype=np.int32)

    def vote(self, node_ids, how: str, agg: str = "last") -> dict[str, np.ndarray]:
        """Per problem, the winning answer among ``node_ids`` (nodes without an answer abstain).

        how: ``majority`` (most frequent answer; weight = count; node = its first node),
        ``weighted`` (largest sum of ``agg`` scores; node = best-scored node of that answer),
        ``best`` (answer of the best-scored node). Ties go to the answer seen first
        (``best``: the lower node id). A problem with no answered node gets answer
        ``NO_ANSWER``, node -1, weight 0.
        Returns dict of problem_ids int64 [p], answer_ids int64 [p], node_ids int32 [p],
        weights float32 [p].
        """
        check_choice(how, "how", VOTES)
        check_choice(agg, "agg", AGGREGATIONS)
        ids, nodes = self._nodes_of(node_ids, "node_ids")
        check_unique(ids, "node_ids")
        if how != "majority":
            for i, node in enumerate(nodes):
                if node.answer != NO_ANSWER and not node.has_step:
                    raise ValueError(f"node_ids[{i}] = {ids[i]} has an answer but no scored step")
        problems: dict[int, list[tuple[int, Node]]] = {}
        for node_id, node in zip(ids, nodes):
            problems.setdefault(node.problem, []).append((node_id, node))
        out_p, out_a, out_n, out_w = [], [], [], []
        for problem, members in problems.items():
            answered = [(i, x) for i, x in members if x.answer != NO_ANSWER]
            answer, winner, weight = NO_ANSWER, -1, 0.0
            if how == "best":
                best_key = None
                for node_id, node in answered:
                    s = self._value(node, agg)
                    key = (-self._rank(s), node_id)
                    if best_key is None or key < best_key:
                        answer, winner, weight, best_key = node.answer, node_id, s, key
            elif answered:
                totals: dict[int, float] = {}  # insertion order = first seen
                for _, node in answered:
                    add = 1.0 if how == "majority" else self._value(node, agg)
                    totals[node.answer] = totals.get(node.answer, 0.0) + add
                for a, total in totals.items():
                    if answer == NO_ANSWER or self._rank(total) > self._rank(weight):
                        answer, weight = a, total
                group = [(i, x) for i, x in answered if x.answer == answer]
                if how == "majority":
                    winner = group[0][0]
                else:
                    winner = min(group, key=lambda m: (-self._rank(self._value(m[1], agg)), m[0]))[0]
            out_p.append(problem)
            out_a.append(answer)
            out_n.append(winner)
            out_w.append(weight)
        return {
            "problem_ids": np.array(out_p, dtype=np.int64),
            "answer_ids": np.array(out_a, dtype=np.int64),
            "node_ids": np.array(out_n, dtype=np.int32),
            "weights": np.array(out_w, dtype=np.float32),
        }

    def children_counts(self, candidate_ids, total_per_problem, how: str, mode: str = "proportional",
                         temperature: float = 1.0, seed: int = 0, weights: str = "softmax",
                         multiplicity=None) -> np.ndarray:
        """Per problem, how many of ``total_per_problem`` children (or resampled copies) each
        candidate gets; the selection step of REBASE and particle filtering.

        candidate_ids: int [n], unique, scored, not pruned. how: the aggregation whose float64
        value scores a path (NaN ranks as -inf). Weights: softmax(score / temperature) per problem
        (temperature > 0), or the raw score (temperature 0; a negative score is a ValueError);
        with ``weights="logit"``, softmax(logit(score) / temperature): the odds r / (1 - r) at
        temperature 1, r clamped to [1e-7, 1 - 1e-7] first (temperature must be > 0, every
        non-NaN score in [0, 1], else ValueError). multiplicity: int [n] >= 1 or None (1 each):
        a candidate standing for m identical particles weighs m times its weight (all-zero
        weights: each weighs its multiplicity); see ``count_weights``. mode: ``proportional`` (each gets floor(total * w / sum), the rest
        one each to the largest remainders, ties to the lower id; seed unused), ``ceil`` (REBASE's
        released code: heaviest first, ties to the lower id, each gets ceil(left * w / weight
        left) of what the heavier ones left, at most all of it; seed unused), ``multinomial``
        (``total`` independent draws) or ``systematic`` (points (u + j) / total of one draw u).
        Every problem's draws come from ``SplitMix64(seed)`` restarted for that problem (a caller
        that wants independent streams per problem passes different calls or seeds).
        Returns int32 [n]: counts in input order, summing to ``total_per_problem`` per problem.
        """
        check_choice(how, "how", AGGREGATIONS)
        check_choice(mode, "mode", COUNT_MODES)
        check_choice(weights, "weights", WEIGHT_MODES)
        total = int_array([total_per_problem], "total_per_problem", 0, INT32_MAX)[0]
        temp = float_array([temperature], "temperature")[0]
        if temp < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temp}")
        seed_value = int_array([seed], "seed", -(2**63), 2**63 - 1)[0]
        if weights == "logit" and temp == 0:
            raise ValueError("temperature must be > 0 with weights='logit', got 0")
        ids, nodes = self._scored(candidate_ids, "candidate_ids", allow_pruned=False)
        check_unique(ids, "candidate_ids")
        mult = [1] * len(ids)
        if multiplicity is not None:
            mult = int_array(multiplicity, "multiplicity", 1, INT32_MAX)
            if len(mult) != len(ids):
                raise ValueError(f"multiplicity must have length {len(ids)}, got {len(mult)}")
        ranks = [self._rank(self._value(node, how)) for node in nodes]
        for i, r in enumerate(ranks):
            if weights == "logit" and r != -math.inf and not 0 <= r <= 1:
                raise ValueError(
                    f"candidate_ids[{i}] = {ids[i]} has an aggregate outside [0, 1]; weights='logit' needs scores in [0, 1]"
                )
            if temp == 0 and r < 0 and r != -math.inf:
                raise ValueError(
                    f"candidate_ids[{i}] = {ids[i]} has a negative aggregate; temperature 0 (raw weights) needs scores >= 0"
                )
        groups: dict[int, list[int]] = {}
        for i, node in enumerate(nodes):
            groups.setdefault(node.problem, []).append(i)
        out = [0] * len(ids)
        for members in groups.values():
            w = count_weights([ranks[i] for i in members], temp, weights, [mult[i] for i in members])
            counts = counts_from_weights(w, [ids[i] for i in members], total, mode, seed_value)
            for i, c in zip(members, counts):
                out[i] = c
        return np.array(out, dtype=np.int32)

    def stats(self) -> dict[str, int]:
        """Counts: live_nodes, ids_given (node ids handed out so far), problems."""
        return {
            "live_nodes": self.num_nodes,
            "ids_given": len(self._nodes),
            "problems": len(self._problem_nodes),
        }


# ----------------------------------------------------------------------------- children counts

COUNT_MODES = ("proportional", "ceil", "multinomial", "systematic")
WEIGHT_MODES = ("softmax", "logit")
LOGIT_EPS = 1e-7  # its_hub's clip of the PRM reward before its logit
_MASK64 = 2**64 - 1


class SplitMix64:
    """splitmix64 (Steele et al. 2014), the generator of ``Forest.children_counts``: the state
    starts at the seed (mod 2**64); each draw adds the golden gamma and mixes; ``uniform`` is
    the top 53 bits times 2**-53, in [0, 1)."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def uniform(self) -> float:
        return (self.next() >> 11) * 2.0**-53


def logit(r: float) -> float:
    """log(c / (1 - c)) of r clamped to [LOGIT_EPS, 1 - LOGIT_EPS] (-inf stays -inf)."""
    if r == -math.inf:
        return r
    c = min(max(r, LOGIT_EPS), 1.0 - LOGIT_EPS)
    return math.log(c / (1.0 - c))


def count_weights(ranks: list[float], temperature: float, weights: str = "softmax",
                  multiplicity: list[int] | None = None) -> list[float]:
    """Unnormalized weights of one problem's candidates from their ranks (aggregate; NaN ->
    -inf): exp((r - max) / temperature), or r itself when temperature is 0; with
    ``weights="logit"`` the rank is ``logit(r)`` first (so temperature 1 gives the odds
    r / (1 - r) over the best one's). -inf weighs 0; when some rank is +inf, exactly the +inf
    ones weigh 1. Each weight is then multiplied by its multiplicity (None: 1 each); when all
    weigh 0, each weighs its multiplicity."""
    if weights == "logit":
        ranks = [logit(r) for r in ranks]
    mult = [1] * len(ranks) if multiplicity is None else multiplicity
    top = max(ranks)
    w = []
    for r in ranks:
        if top == math.inf:
            w.append(1.0 if r == math.inf else 0.0)
        elif r == -math.inf:
            w.append(0.0)
        elif temperature == 0:
            w.append(r)
        else:
            w.append(math.exp((r - top) / temperature))
    total = 0.0
    for k in range(len(w)):
        w[k] *= float(mult[k])
        total += w[k]
    return w if total > 0 else [float(m) for m in mult]


def _pick(cum: list[float], w: list[float], target: float) -> int:
    """First index whose cumulative weight exceeds ``target`` (the last positive-weight index
    when rounding puts ``target`` at or past the total)."""
    for i, c in enumerate(cum):
        if c > target:
            return i
    i = len(w) - 1
    while i > 0 and not w[i] > 0:
        i -= 1
    return i


def counts_from_weights(w: list[float], ids: list[int], total: int, mode: str, seed: int) -> list[int]:
    """One problem's counts (see ``Forest.children_counts``) from its weights ``w``."""
    n = len(w)
    s = 0.0
    cum = []
    for x in w:
        s += x
        cum.append(s)
    counts = [0] * n
    if mode == "proportional":
        rest = []
        for k in range(n):
            q = float(total) * w[k] / s
            f = math.floor(q)
            counts[k] = int(f)
            rest.append((-(q - f), ids[k], k))
        rest.sort()
        for j in range(total - sum(counts)):
            counts[rest[j % n][2]] += 1
        return counts
    if mode == "ceil":  # heaviest first (ties: lower id), each ceil(left * w / weight left)
        order = sorted(range(n), key=lambda k: (-w[k], ids[k]))
        left, left_w = total, s
        for k in order:
            c = 0
            if left > 0 and left_w > 0:
                x = float(left) * w[k] / left_w
                c = left if x >= float(left) else (math.ceil(x) if x > 0 else 0)
            counts[k] = c
            left -= c
            left_w -= w[k]
        if n > 0:
            counts[order[0]] += left  # rounding left some: to the heaviest
        return counts
    rng = SplitMix64(seed)
    if mode == "multinomial":
        for _ in range(total):
            counts[_pick(cum, w, rng.uniform() * s)] += 1
    else:  # systematic: one uniform, then evenly spaced points
        u = rng.uniform() if total > 0 else 0.0
        for j in range(total):
            counts[_pick(cum, w, (u + j) / total * s)] += 1
    return counts
