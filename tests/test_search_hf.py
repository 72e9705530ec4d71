"""Search end to end on real (tiny, random-weight) Hugging Face models, fully offline.

Policies: a Llama and a Qwen2 causal LM built from a config (hidden 64, 2 layers, a ~370-token
byte-level BPE, ``ponder.testing.tiny``) and saved to a temp dir; the PRM: a tiny
math-shepherd model (its tokenizer has the " ки" tag). Everything is loaded back by path.

* every method runs on three problems, returns one result per problem with the documented
  number of completions, and is deterministic for a seed (fresh models, same seed: the same
  answers, texts, scores, trees and budgets);
* the tokens the models compute are exactly the unique tokens of the search tree: the policy
  prefills each problem's prompt once and every step once (the last token of a step whose node
  is never expanded is never fed: HFPolicy's documented rule), the PRM computes each problem's
  question once and each step's PRM-format tokens once; nothing is recomputed;
* ``ponder run`` end to end: results.jsonl, summaries, plot, --resume.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from ponder import SearchConfig, cli, search
from ponder.hf.policy import HFPolicy
from ponder.hf.prm import HFPRM, MATH_SHEPHERD_TAG
from ponder.protocols import SamplingParams
from ponder.testing.tiny import QUESTIONS, save_causal

METHODS = ["majority", "best_of_n", "weighted_best_of_n", "beam_search", "dvts"]
ARCHS = ["llama", "qwen2"]
N, M = 4, 2
# temperature 1.5: the boosted random heads of ``ponder.testing.tiny`` otherwise emit "\n\n" almost
# always (Qwen2), which would make every path the same.
SAMPLING = SamplingParams(temperature=1.5, max_step_tokens=8)


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, 2))
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    mk = tmp_path_factory.mktemp
    return {
        "llama": save_causal(mk("pol_llama"), "llama", "llama", boost=True),
        "qwen2": save_causal(mk("pol_qwen2"), "qwen", "qwen2", boost=True),
        "prm": save_causal(mk("prm_ms"), "ms", "llama"),
    }


class Recorder:
    """Forwards every call to a model and records what the search asked and got back."""

    def __init__(self, inner):
        self.inner = inner
        self.steps = {}  # child id -> (parent id, Step or step text)
        self.rollouts = []  # (node id, [Step])  (policy) / (child id, [texts])  (PRM)
        self.paths = set()  # PRM: (root id, step texts) scored by score_paths

    def __getattr__(self, name):
        return getattr(self.inner, name)


class RecordingPolicy(Recorder):
    def sample_steps(self, parent_ids, child_ids, params):
        out = self.inner.sample_steps(parent_ids, child_ids, params)
        for p, c, s in zip(parent_ids, child_ids, out):
            assert int(c) not in self.steps, "a node was sampled twice"
            self.steps[int(c)] = (int(p), s)
        return out

    def rollout(self, node_ids, num_steps, params):
        out = self.inner.rollout(node_ids, num_steps, params)
        self.rollouts += [(int(n), list(r)) for n, r in zip(node_ids, out)]
        return out


class RecordingPRM(Recorder):
    def score_steps(self, parent_ids, child_ids, steps, lookahead=None):
        out = self.inner.score_steps(parent_ids, child_ids, steps, lookahead)
        for i, (p, c, s) in enumerate(zip(parent_ids, child_ids, steps)):
            assert int(c) not in self.steps, "a node was scored twice"
            self.steps[int(c)] = (int(p), s)
            if lookahead is not None and lookahead[i]:
                self.rollouts.append((int(c), list(lookahead[i])))
        return out

    def score_paths(self, node_ids, paths):
        """Whole paths from held roots (best-of-N): recorded as (root, steps); each path once."""
        out = self.inner.score_paths(node_ids, paths)
        for n, p in zip(node_ids, paths):
            assert (int(n), tuple(p)) not in self.paths, "a path was scored twice"
            self.paths.add((int(n), tuple(p)))
        return out


def config(method, seed=3, **kw):
    base = {"method": method, "n": N, "beam_width": M, "num_iterations": 3, "max_steps": 4, "seed": seed, "sampling": SAMPLING}
    return SearchConfig(**{**base, **kw})


def run_fresh(models, arch, cfg):
    """One search on freshly loaded models; returns (results, recording policy, recording PRM)."""
    policy = RecordingPolicy(HFPolicy(models[arch], kv_budget=4096, block_size=4))
    prm = None if cfg.method == "majority" else RecordingPRM(HFPRM(models["prm"], kv_budget=4096, block_size=4))
    results = search(QUESTIONS, policy, prm, cfg)
    return results, policy, prm


def signature(results):
    """Everything a result holds except the wall time."""
    out = []
    for r in results:
        b = r.budget
        out.append(
            (
                r.problem_id, r.problem, r.answer, r.answer_node,
                [(c.node_id, c.text, tuple(c.steps), tuple(c.step_scores), c.score, c.answer, c.finished, c.truncated)
                 for c in r.completions],
                {k: v.tolist() for k, v in r.tree.items()},
                (b.policy_tokens_generated, b.policy_tokens_prefilled, b.prm_tokens_scored, b.flops_estimate),
            )
        )
    return out


def expected_completions(method):
    return N // M if method == "dvts" else N


@pytest.fixture(scope="module")
def runs(models):
    """(arch, method) -> [(results, policy, prm)] for two runs on fresh models, same seed."""
    cache = {}

    def get(arch, method):
        if (arch, method) not in cache:
            cache[(arch, method)] = [run_fresh(models, arch, config(method)) for _ in range(2)]
        return cache[(arch, method)]

    return get


# ----------------------------------------------------------------------------- 1. every method


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_runs_and_is_deterministic_for_a_seed(runs, arch, method):
    (first, pol, prm), (second, _, _) = runs(arch, method)
    assert [r.problem_id for r in first] == [0, 1, 2]
    assert [r.problem for r in first] == QUESTIONS
    for r in first:
        assert len(r.completions) == expected_completions(method)
        tree = r.tree
        assert np.all(tree["problem"] == r.problem_id)
        steps = tree["node_id"][tree["parent"] >= 0]
        assert len(steps) >= expected_completions(method)
        for c in r.completions:
            assert c.node_id in set(tree["node_id"].tolist())
            assert c.text == "".join(c.steps) and 1 <= len(c.steps) <= 4
            assert c.steps == [pol.steps[x][1].text for x in path_of(pol, c.node_id)]
            if method == "majority":
                assert c.step_scores == [] and np.isnan(c.score)
            else:
                assert len(c.step_scores) == len(c.steps) and all(0.0 < s < 1.0 for s in c.step_scores)
                assert c.score == c.step_scores[-1]  # agg "last"
        assert r.answer is None or r.answer in {c.answer for c in r.completions}
        if r.answer is None:
            assert r.answer_node == -1
    assert pol.stats()["live_nodes"] == 0  # the search released everything
    if prm is not None:
        assert prm.stats()["live_nodes"] == 0
    assert repr(signature(first)) == repr(signature(second))  # repr: NaN scores compare equal
    # Not a constant model: the paths of a problem differ.
    texts = {c.text for r in first for c in r.completions}
    assert len(texts) > 1


def test_a_different_seed_gives_different_paths(models, runs):
    (first, _, _), _ = runs("llama", "beam_search")
    other, _, _ = run_fresh(models, "llama", config("beam_search", seed=4))
    assert [c.text for r in first for c in r.completions] != [c.text for r in other for c in r.completions]


def test_one_policy_reproduces_a_seed_across_searches(models):
    """Evaluations reuse one policy for every method, batch and resumed run: a search with a
    given seed must not depend on what ran on the policy before it."""
    policy = HFPolicy(models["llama"], kv_budget=4096, block_size=4)
    prm = HFPRM(models["prm"], kv_budget=4096, block_size=4)
    cfg = config("beam_search")
    first = search(QUESTIONS, policy, prm, cfg)
    search(QUESTIONS, policy, prm, config("dvts"))  # another search with the same seed in between
    again = search(QUESTIONS, policy, prm, cfg)
    assert [[c.text for c in r.completions] for r in again] == [[c.text for c in r.completions] for r in first]


# ----------------------------------------------------------------------------- 2. budget


def path_of(rec, node):
    """The step nodes from the root's first child down to ``node`` (from the recorded steps)."""
    out = []
    while node in rec.steps:
        out.append(node)
        node = rec.steps[node][0]
    return out[::-1]


def prm_tokens(prm, question, steps):
    """The reference PRM input of a path (math-shepherd: rendered, cut after its last tag)."""
    if not steps:
        return prm.encode_full(question)
    text = prm.render(question, steps)
    return prm.encode_full(text[: text.rfind(MATH_SHEPHERD_TAG) + len(MATH_SHEPHERD_TAG)])


def check_budget(results, pol, prm, lookahead=False):
    """Tokens computed by the policy / PRM == the unique tokens of the search trees (+ the
    lookahead rollouts, which are not kept in the tree)."""
    unique_policy = expected_policy = unique_prm = expected_prm = 0
    generated = 0
    rolled = {n for n, _ in pol.rollouts}
    for r in results:
        tree = r.tree
        ids, parent, ntok = tree["node_id"].tolist(), tree["parent"].tolist(), tree["num_tokens"].tolist()
        roots = [i for i, p in zip(ids, parent) if p < 0]
        step_ids = [i for i, p in zip(ids, parent) if p >= 0]
        tok = dict(zip(ids, ntok))
        # The forest's tree is what the models were asked for: same nodes, parents and tokens.
        assert set(step_ids) == {c for c, (p, _) in pol.steps.items() if p in set(ids)}
        for i, p in zip(ids, parent):
            if p >= 0:
                assert pol.steps[i][0] == p and tok[i] == len(pol.steps[i][1].tokens) >= 1
        assert len({tok[x] for x in roots}) == 1  # DVTS: every subtree starts from the same prompt
        prompt = tok[roots[0]]
        step_tokens = sum(tok[x] for x in step_ids)
        expanded = {p for p in parent if p >= 0}
        never_fed = sum(1 for x in step_ids if x not in expanded and x not in rolled)
        unique_policy += prompt + step_tokens
        expected_policy += prompt + step_tokens - never_fed
        generated += step_tokens
        # The budget counts what the search reports per problem.
        b = r.budget
        assert b.policy_tokens_prefilled == prompt
        if not lookahead:
            assert b.policy_tokens_generated == step_tokens
            assert b.prm_tokens_scored == (step_tokens if prm is not None else 0)
        if prm is not None:
            q = r.problem
            unique_prm += len(prm_tokens(prm, q, []))  # the question part: once per problem
            for x in step_ids:
                if x in prm.steps:  # scored step by step
                    assert prm.steps[x] == (pol.steps[x][0], pol.steps[x][1].text)
                    path = [prm.steps[y][1] for y in path_of(prm, x)]
                else:  # scored with its whole path (score_paths from the root), once
                    nodes = path_of(pol, x)
                    path = [pol.steps[y][1].text for y in nodes]
                    if x not in expanded:
                        assert (pol.steps[nodes[0]][0], tuple(path)) in prm.paths
                unique_prm += len(prm_tokens(prm, q, path)) - len(prm_tokens(prm, q, path[:-1]))
    expected_prm = unique_prm
    for node, steps in pol.rollouts:
        # A rollout feeds its node's pending token, then every rollout token but the last one.
        generated += sum(len(st.tokens) for st in steps)
        expected_policy += sum(len(st.tokens) for st in steps) - 1
    if prm is not None:
        problem_of = {}
        for r in results:
            for i in r.tree["node_id"].tolist():
                problem_of[i] = r.problem
        for child, extra in prm.rollouts:
            path = [prm.steps[y][1] for y in path_of(prm, child)]
            q = problem_of[child]
            expected_prm += len(prm_tokens(prm, q, path + extra)) - len(prm_tokens(prm, q, path))

    st = pol.stats()
    assert st["tokens_generated"] == generated == sum(r.budget.policy_tokens_generated for r in results)
    assert st["tokens_prefilled"] == expected_policy
    if not lookahead:
        assert st["tokens_prefilled"] <= 1.05 * unique_policy
    if prm is not None:
        ps = prm.stats()
        assert ps["full_reencodes"] == 0
        assert ps["tokens_scored"] == expected_prm
        if not lookahead:
            assert ps["tokens_scored"] <= 1.05 * unique_prm
    return unique_policy, unique_prm


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_tokens_computed_are_the_unique_tokens_of_the_tree(runs, arch, method):
    (results, pol, prm), _ = runs(arch, method)
    unique_policy, unique_prm = check_budget(results, pol, prm)
    assert unique_policy > 0 and (prm is None or unique_prm > 0)


@pytest.mark.parametrize("method", ["beam_search", "dvts"])
def test_lookahead_tokens_are_computed_once_too(models, method):
    results, pol, prm = run_fresh(models, "llama", config(method, lookahead=1))
    assert pol.rollouts and prm.rollouts  # the lookahead ran and was scored
    check_budget(results, pol, prm, lookahead=True)


# ----------------------------------------------------------------------------- 3. the CLI


CLI_METHODS = ["greedy", "majority", "beam_search", "dvts"]
CLI_NS = [2, 4]
REQUIRED = {
    "problem_id", "method", "n", "answer", "gold", "correct", "level", "policy_tokens", "policy_tokens_generated",
    "policy_tokens_prefilled", "prm_tokens", "flops", "wall_s", "num_completions", "beam_width", "seed",
}


@pytest.mark.slow
def test_cli_run_end_to_end_and_resume(models, tmp_path, capsys):
    data = tmp_path / "problems.jsonl"
    rows = [
        {"problem": QUESTIONS[0], "answer": "5", "level": "Level 1", "unique_id": "a"},
        {"problem": QUESTIONS[1], "answer": "19", "level": "Level 2", "unique_id": "b"},
        {"problem": QUESTIONS[2], "answer": "5", "level": "Level 1", "unique_id": "c"},
        {"problem": "What is 1 + 1?", "answer": "2", "level": "Level 3", "unique_id": "d"},  # cut by --limit
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    argv = [
        "run", "--policy", str(models["llama"]), "--prm", str(models["prm"]), "--dataset", str(data),
        "--methods", ",".join(CLI_METHODS), "--n", ",".join(map(str, CLI_NS)), "--beam-width", "2",
        "--num-iterations", "2", "--max-steps", "3", "--max-step-tokens", "8", "--temperature", "1.5",
        "--limit", "3", "--batch-size", "2", "--no-progress", "--out", str(out),
    ]
    assert cli.main(argv) == 0
    results = out / "results.jsonl"
    got = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    keys = [(r["problem_id"], r["method"], r["n"]) for r in got]
    want = {(p, "greedy", 1) for p in "abc"} | {(p, m, n) for p in "abc" for m in CLI_METHODS[1:] for n in CLI_NS}
    assert len(keys) == len(set(keys)) == len(want) == 21 and set(keys) == want
    gold = {"a": "5", "b": "19", "c": "5"}
    for r in got:
        assert REQUIRED <= set(r)
        assert r["gold"] == gold[r["problem_id"]] and r["level"] in (1, 2)
        assert r["num_completions"] == (1 if r["method"] == "greedy" else r["n"] // 2 if r["method"] == "dvts" else r["n"])
        assert r["policy_tokens"] == r["policy_tokens_generated"] + r["policy_tokens_prefilled"] > 0
        assert (r["prm_tokens"] > 0) == (r["method"] in ("beam_search", "dvts"))
        assert r["beam_width"] == (2 if r["method"] in ("beam_search", "dvts") else None)
        assert isinstance(r["correct"], bool) and (r["answer"] is not None or not r["correct"])
    for name in ("summary.md", "summary.csv", "scaling.png"):
        assert (out / name).stat().st_size > 0
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        summary = list(csv.DictReader(f))
    assert {(s["method"], int(s["n"])) for s in summary} == {(m, n) for _, m, n in want}
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()

    # Resume a finished run: nothing is recomputed, nothing is appended.
    before = results.read_bytes()
    assert cli.main([*argv, "--resume"]) == 0
    assert results.read_bytes() == before

    # Resume a killed run (10 rows kept, the 11th cut mid-line): the rows kept stay as they
    # were, the rest is completed, no key twice.
    lines = before.decode("utf-8").splitlines(keepends=True)
    results.write_text("".join(lines[:10]) + lines[10][:25], encoding="utf-8")
    assert cli.main([*argv, "--resume"]) == 0
    again = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    again_keys = [(r["problem_id"], r["method"], r["n"]) for r in again]
    assert len(again_keys) == len(set(again_keys)) == 21 and set(again_keys) == want
    assert again[:10] == got[:10]
    # Without --resume an existing run is refused.
    assert cli.main(argv) == 2
    assert "--resume" in capsys.readouterr().err
