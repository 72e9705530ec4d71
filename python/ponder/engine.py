"""The search engine: independent searches that join and leave one running batch.

    engine = ponder.Engine(policy, prm)
    h = engine.submit("What is 2 + 3?", ponder.SearchConfig(method="dvts", n=16))
    engine.run_until_done()          # or h.result(), which steps the engine until h is done
    print(h.result().answer)

Every submitted problem is a *search* with its own ``SearchConfig`` (method, n, beam width,
sampling, seed, limits). The engine owns one forest (``ponder.methods.tree.SearchTree``) and
advances every live search by one stage per ``step()``: the searches' state machines
(``ponder.methods.method.Method``) say what they want expanded, the tree expands all of it in
one ``Forest.expand``, samples it with one policy call per distinct sampling setting (the
seed is not part of the setting when the policy has per-request streams), rolls out lookahead,
scores every row with one PRM call, records, and hands each search its scored children.

Determinism: with ``per_request_streams`` (the default) and a policy that implements
``sample_steps_seeded`` (``HFPolicy`` does), a search's samples come from its own random
stream seeded by its seed, so they do not depend on which other searches share its batches
(up to the floating-point effect of batch composition on the model's logits).

Memory: the engine schedules the policy's and the PRM's KV blocks (their optional
``kv_free_blocks()``). A queued search is admitted (FIFO, nothing overtakes the head) when its
*projected peak* fits what is left after every live search's *reserve* and a watermark of 1 %
of the pool. The projected peak is the largest of its prompt blocks plus one step, its own
recorded peak (a preempted search) and n x the per-path peak of the last finished searches of
its method (90th percentile, learned per model); a live search's reserve is what it may still
grow to (that projection less what it holds, at least its next step). Before each step,
while the live searches' estimated next step does not fit, one search is preempted: of those
whose preemption frees enough, the one that loses the least work (the newest on a tie), never
the oldest. When a step still hits ``KVCacheFull`` (a step outgrew its estimate: the estimate's
margin grows x1.5, decaying back as steps succeed), it is undone and retried after the same
preemption. A preempted search is requeued in arrival order. When the policy and the PRM
implement ``ponder.protocols.Resumable`` it keeps its tree, its method's state and its random
stream: the models free its nodes, and on readmission they rebuild the nodes it still needs
(its live frontier) from their paths, the paged cache reusing every prefix block that survived
(``stats()["tokens_reprefilled"]`` counts what they ran). Otherwise it restarts from its root
(recompute preemption). Either way, with per-request streams its result is the same as
without preemption. ``KVCacheFull`` reaches the caller only when a search alone does not fit
(then that search fails with it).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._core import KVCacheFull
from .methods.adaptive import Auto, method_class, prm_gated
from .methods.beam_search import BeamSearch
from .methods.best_of_n import BestOfN, WeightedBestOfN
from .methods.config import SearchConfig, SearchResult
from .methods.dvts import DVTS
from .methods.majority import Majority
from .methods.method import Method
from .methods.particle_filtering import ParticleFiltering
from .methods.rebase import Rebase
from .methods.tree import Search, SearchTree

#: a step's tokens assumed before any step was sampled
BLOCK_GUESS = 16
#: a chat template's tokens around the problem assumed before any prompt was seen
TEMPLATE_GUESS = 64
#: the most the step-growth estimate is scaled up after KVCacheFull
MAX_MARGIN = 4.0
#: finished searches per (model, method) whose peaks set the projection of new ones
PER_PATH_WINDOW = 32

#: method name (``ponder.methods.config.METHODS``) -> its state machine class
METHOD_CLASSES: dict[str, type[Method]] = {
    "majority": Majority,
    "best_of_n": BestOfN,
    "weighted_best_of_n": WeightedBestOfN,
    "beam_search": BeamSearch,
    "dvts": DVTS,
    "particle_filtering": ParticleFiltering,
    "rebase": Rebase,
    "auto": Auto,  # with early_stop, method_class picks ponder.methods.adaptive's machines
}


@dataclass
class Event:
    """Something that happened to one search, for streaming.

    kind: ``"step"`` (its children of one engine step were scored: ``node_ids``, ``texts``
    the steps, ``scores`` their PRM scores, NaN unscored), ``"completion"`` (a path finished:
    ``node_ids`` = [its last node], ``texts`` = [its solution], ``answer``), ``"end"`` (the
    search ended: ``result``, or ``error`` when it failed). request_id: ``Handle.id``.
    """

    kind: str
    request_id: int
    node_ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    answer: str | None = None
    result: SearchResult | None = None
    error: BaseException | None = None


class Handle:
    """One submitted search. Thread-safe.

    ``done()``: it ended (result or error). ``result(timeout=None)``: its ``SearchResult``
    (re-raises the error it failed with); without a background loop (``AsyncEngine``) it steps
    the engine itself until this search is done. ``cancel()``: end it now with what it has
    (``stopped="cancelled"``); its nodes and KV sequences are freed at once when the engine is
    idle, else at the end of the running step. ``events``: a ``queue.SimpleQueue`` of ``Event``.
    """

    def __init__(self, engine: Engine, request_id: int, problem: str, config: SearchConfig) -> None:
        self.id = request_id
        self.problem = problem
        self.config = config
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._engine = engine
        self._done = threading.Event()
        self._results: dict[str, SearchResult] = {}
        self._error: BaseException | None = None
        self._listeners: list[Callable[[Event], None]] = []
        self._cancel_requested = False

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> SearchResult:
        return self._result("main", timeout)

    def _result(self, name: str, timeout: float | None) -> SearchResult:
        if not self._done.is_set() and not self._engine._background:
            while not self._done.is_set():
                self._engine.step()
        if not self._done.wait(timeout):
            raise TimeoutError(f"search {self.id} is not done after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._results[name]

    def cancel(self) -> None:
        self._engine._cancel(self)

    def _emit(self, event: Event) -> None:
        self.events.put(event)
        for fn in self._listeners:
            fn(event)


class _Request:
    def __init__(self, handle: Handle, search: Search, votes: dict | None, prm_free: tuple[str, ...]) -> None:
        self.handle = handle
        self.search = search
        self.votes = votes  # name -> (how, agg); None: the method's own vote as "main"
        self.prm_free = prm_free
        self.method: Method | None = None
        self.cancelled = False
        self.preemptions = 0
        self.rows = search.config.n  # children its last step expanded (its first: n)
        self.peak: dict[str, int] = {}  # model -> the most KV blocks it was estimated to hold (step included)


class Engine:
    """Continuous batching of searches over one policy and one PRM (see the module docstring).

    policy: a ``ponder.Policy``; prm: a ``ponder.PRM`` (None: only majority searches).
    per_request_streams: each search samples from its own random stream (default); False:
    all share the policy's stream (what ``ponder.search`` uses).
    max_live: the most searches live at once (None: as many as memory admits).
    """

    def __init__(self, policy, prm=None, *, per_request_streams: bool = True, max_live: int | None = None) -> None:
        self.policy = policy
        self.prm = prm
        self.tree = SearchTree(policy, prm, per_request_streams)
        self.max_live = max_live
        self._ids = itertools.count()
        self._lock = threading.Lock()  # queue, cancellations
        self._step_lock = threading.RLock()  # one step at a time
        self._queue: list[_Request] = []
        self._live: list[_Request] = []  # admission order
        self._cancels: list[_Request] = []
        self._background = False
        self._admit_limit: int | None = None  # after a start hit KVCacheFull: admit at most this many
        # memory scheduling (see "Memory" in the module docstring)
        self._step_tokens = float(BLOCK_GUESS)  # running mean of a sampled step's tokens
        self._template = float(TEMPLATE_GUESS)  # running mean of a prompt's tokens beyond its problem's characters
        self._margin = 1.0  # step-growth safety factor: x1.5 on each KVCacheFull, back to 1 as steps succeed
        self._per_path: dict[tuple[str, str], deque] = {}  # (model, method) -> peak blocks / n of finished searches
        self._capacity: dict[str, int] = {}  # model -> the most free blocks seen with nothing live
        self._counters = dict(
            steps=0, policy_calls=0, policy_rows=0, prm_calls=0, prm_rows=0,
            preemptions=0, resumed=0, tokens_reprefilled=0, kv_full_caught=0, kv_full_errors=0, submitted=0, finished=0,
            cancelled=0, timeout=0, budget=0,
        )

    # ------------------------------------------------------------------ submitting

    def submit(self, problem: Any, config: SearchConfig | None = None, **kw) -> Handle:
        """Queue one search of ``problem`` (a str, or an object / mapping with ``problem``)
        with ``config`` (validated now: ValueError). Returns its ``Handle``. Thread-safe."""
        return self._submit(problem, config, None, (), **kw)

    def _submit(self, problem, config, votes, prm_free, on_event: Callable[[Event], None] | None = None) -> Handle:
        from .batch import problem_text

        config = SearchConfig() if config is None else config
        config.validate()
        text = problem_text(problem)
        gated = prm_gated(config)  # the futility gate reads PRM scores
        scored = config.method != "majority" or votes is not None or gated
        if gated and self.prm is None:
            raise ValueError("early_stop.futility_score reads the completions' PRM scores: pass a PRM, "
                             "or drop futility_score")
        if scored and self.prm is None and (config.method != "majority" or len(votes or {}) > 1):
            raise ValueError(f"method {config.method!r} needs a PRM; only 'majority' runs without one")
        scored = scored and self.prm is not None
        with self._lock:
            rid = next(self._ids)
            handle = Handle(self, rid, text, config)
            if on_event is not None:
                handle._listeners.append(on_event)
            self._queue.append(_Request(handle, Search(rid, text, config, scored, rid), votes, prm_free))
            self._counters["submitted"] += 1
        return handle

    def _cancel(self, handle: Handle) -> None:
        handle._cancel_requested = True  # seen by the next step even if it is being admitted now
        with self._lock:
            for i, r in enumerate(self._queue):
                if r.handle is handle:
                    del self._queue[i]
                    queued = r
                    break
            else:
                queued = None
                for r in self._live:
                    if r.handle is handle:
                        r.cancelled = True
                        self._cancels.append(r)
        if queued is not None:
            queued.cancelled = True
            with self._step_lock:
                self._finish(queued, "cancelled")
            return
        if self._step_lock.acquire(blocking=False):  # idle: free it now
            try:
                self._apply_cancels()
            finally:
                self._step_lock.release()

    # ------------------------------------------------------------------ stepping

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._queue or self._live)

    def run_until_done(self) -> None:
        """Step until no search is live or queued."""
        while self.has_work():
            self.step()

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the engine between two steps: ``step()`` waits until the block ends. For work that
        shares the policy's model and KV pool with the engine (``ponder serve``'s raw
        continuations); keep the block short, every live search waits on it. Reentrant."""
        with self._step_lock:
            yield

    @property
    def steps_taken(self) -> int:
        """Engine steps completed so far (monotonic)."""
        return self._counters["steps"]

    def step(self) -> bool:
        """Advance every live search by one stage (admitting queued ones that fit first);
        returns whether work remains. A model error fails the searches of that step (their
        handles re-raise it) and is raised here too."""
        with self._step_lock:
            self._apply_cancels()
            self._admit()
            self._apply_limits()
            self._make_room()
            while True:
                try:
                    self._advance()
                    break
                except KVCacheFull:
                    self._counters["kv_full_caught"] += 1
                    self._margin = min(MAX_MARGIN, self._margin * 1.5)  # the step outgrew its estimate
                    if not self._preempt_for_retry():
                        raise
            self._margin = max(1.0, self._margin * 0.9)
            self._counters["steps"] += 1
        return self.has_work()

    def _apply_cancels(self) -> None:
        with self._lock:
            todo, self._cancels = self._cancels, []
        for r in todo:
            if r in self._live:
                self._finish(r, "cancelled")

    def _admit(self) -> None:
        new: list[_Request] = []
        room = self._room()
        with self._lock:
            while self._queue and (self.max_live is None or len(self._live) + len(new) < self.max_live):
                if self._admit_limit is not None and len(new) >= self._admit_limit:
                    break
                r = self._queue[0]  # FIFO: nothing overtakes the head (no starvation)
                need = {key: self._projected(r, key, block) for key, _, block in self._kv_models()}
                if (self._live or new) and any(need[key] > room[key] for key in room):
                    break
                for key in room:
                    room[key] -= need[key]
                new.append(self._queue.pop(0))
        if not new:
            return
        new = self._resume(new)
        new = [r for r in new if r.method is None]
        if not new:
            return
        for r in new:
            r.method = method_class(r.search.config, METHOD_CLASSES)(self.tree, r.search)
            r.search.generated = r.search.prm_scored = 0
        try:
            roots = self.tree.add_roots([r.search for r in new], [r.method.subtrees for r in new])
        except KVCacheFull as exc:
            # The prompts do not fit now: the new searches wait at the head of the queue (a
            # search alone fails). The models freed what the failed start made; the policy
            # may hold the roots when the PRM's start failed.
            self._counters["kv_full_caught"] += 1
            first = int(self.tree.forest.stats()["ids_given"])
            self._release_quietly(self.policy, range(first, first + sum(r.method.subtrees for r in new)))
            if not self._live and len(new) == 1:
                self._counters["kv_full_errors"] += 1
                self._fail(new[0], exc)
                return
            for r in new:
                r.method = None
            self._admit_limit = max(1, len(new) // 2)  # next time admit fewer at once
            with self._lock:
                self._queue[:0] = new
            return
        except BaseException as exc:
            for r in new:
                self._fail(r, exc)
            raise
        self._admit_limit = None
        for r, rs in zip(new, roots):
            r.method.start(rs)
            extra = max(0, self.tree.nodes[int(rs[0])].length - len(r.search.problem))
            self._template = 0.7 * self._template + 0.3 * extra
        with self._lock:
            self._live.extend(new)

    def _resume(self, new: list[_Request]) -> list[_Request]:
        """Readmit the suspended searches of ``new`` (preempted with their tree: the models
        rebuild their nodes) and make them live. When one does not fit, it and every later
        request go back to the head of the queue (a suspended search alone fails). Returns the
        requests of ``new`` still to start (not suspended, not requeued)."""
        for k, r in enumerate(new):
            if r.search.suspended is None:
                continue
            try:
                ran = self.tree.restore(r.search)
            except KVCacheFull as exc:
                self._counters["kv_full_caught"] += 1
                rest = new[k:]
                if not self._live and k == 0 and len(rest) == 1:
                    self._counters["kv_full_errors"] += 1
                    self._fail(r, exc)
                    return []
                self._admit_limit = max(1, k)
                with self._lock:
                    self._queue[:0] = rest
                return new[:k]
            except BaseException as exc:
                self._fail(r, exc)
                with self._lock:  # the others wait: fresh ones of new[:k] were not started yet
                    self._queue[:0] = [x for x in new[:k] if x.method is None] + new[k + 1 :]
                raise
            self._counters["resumed"] += 1
            self._counters["tokens_reprefilled"] += ran
            with self._lock:
                self._live.append(r)
        return new

    # ------------------------------------------------------------------ memory scheduling

    def _kv_models(self) -> list[tuple[str, Any, int]]:
        """(name, model, block size) of the models that report ``kv_free_blocks()``."""
        out = []
        for key, model in (("policy", self.policy), ("prm", self.prm)):
            if model is not None and callable(getattr(model, "kv_free_blocks", None)):
                out.append((key, model, int(getattr(model, "kv_block_size", 16) or 16)))
        return out

    def _held(self, search: Search, key: str) -> list[int]:
        """The nodes a model holds for a live search: the policy its unreleased nodes; the PRM
        the same for a search it scores step by step, a deferred search's roots, else none."""
        tree = self.tree
        if search.suspended is not None:
            return []
        if key == "prm":
            if not search.scored:
                return []
            if tree.deferred(search):
                return list(search.prm_roots)
        return [x for x in search.node_ids if not tree.nodes[x].released]

    def _blocks(self, search: Search, key: str, block: int) -> int:
        """KV blocks a live search holds in a model, estimated from the policy's tokens of its
        held nodes' paths: distinct tokens (shared prefixes once) in blocks, plus one partly
        filled block per held node."""
        nodes, seen, tokens = self.tree.nodes, set(), 0
        held = self._held(search, key)
        for x in held:
            while x != -1 and x not in seen:
                seen.add(x)
                node = nodes[x]
                tokens += node.length - (nodes[node.parent].length if node.parent != -1 else 0)
                x = node.parent
        return -(-tokens // block) + len(held)

    def _step_need(self, r: _Request, key: str, block: int) -> int:
        """KV blocks a search's next step adds in a model (expected): per child a copied
        partial block and its step's tokens (``_step_tokens`` x ``_margin`` / block size), and
        as much again per lookahead step (temporary forks). 0 in a PRM that holds no per-node
        state for it (majority; a deferred search's paths are scored in pieces that fit)."""
        s = r.search
        if key == "prm" and (not s.scored or self.tree.deferred(s)):
            return 0
        per_row = 1.0 + self._step_tokens * self._margin / block
        look = int(getattr(s.config, "lookahead", 0) or 0) if s.config.method in ("beam_search", "dvts") else 0
        return math.ceil(r.rows * per_row * (1 + look))

    def _projected(self, r: _Request, key: str, block: int) -> int:
        """The most KV blocks a queued search is expected to hold in a model at once: the
        largest of its roots and first step, its own recorded peak (a preempted
        search), its restore plus one step (a suspended one), and n x the per-path peak of
        the last finished searches of its method (90th percentile)."""
        s, cfg = r.search, r.search.config
        step = self._step_need(r, key, block)
        if s.suspended is not None:
            held = len(s.suspended[1 if key == "prm" else 0])
            first = -(-self.tree.suspended_tokens(s) // block) + held + step
        else:
            first = (_prompt_blocks(block, s, self._template) if key == "policy" or s.scored else 0) + step
        hist = self._per_path.get((key, cfg.method))
        learned = math.ceil(cfg.n * float(np.quantile(hist, 0.9))) if hist else 0
        return max(first, learned, r.peak.get(key, 0))

    def _room(self) -> dict[str, int]:
        """Per model: the free blocks left for new searches after every live search's reserve
        (what it may still grow to: its projected peak, at least its next step, less what it
        holds) and a watermark of 1 % of the pool."""
        room = {}
        for key, model, block in self._kv_models():
            free = int(model.kv_free_blocks())
            if not self._live:
                self._capacity[key] = max(self._capacity.get(key, 0), free)
            reserve = 0
            for r in self._live:
                if r.method is None:
                    continue
                held = self._blocks(r.search, key, block)
                grow = self._step_need(r, key, block)
                hist = self._per_path.get((key, r.search.config.method))
                if hist:
                    grow = max(grow, math.ceil(r.search.config.n * float(np.quantile(hist, 0.9))) - held)
                reserve += grow
            watermark = -(-self._capacity.get(key, free) // 100)
            room[key] = free - reserve - watermark
        return room

    def _make_room(self) -> int:
        """Before a step: while the live searches' next step does not fit a model's free
        blocks (estimated, ``_step_need``), preempt one (``_victim``); the oldest live search
        is never preempted. Records each search's peak. Returns the searches preempted."""
        done = 0
        while True:
            deficit: dict[str, int] = {}
            usage: dict[int, dict[str, tuple[int, int]]] = {}
            for key, model, block in self._kv_models():
                need = 0
                for r in self._live:
                    u = (self._blocks(r.search, key, block), self._step_need(r, key, block))
                    usage.setdefault(id(r), {})[key] = u
                    r.peak[key] = max(r.peak.get(key, 0), u[0] + u[1])
                    need += u[1]
                short = need - int(model.kv_free_blocks())
                if short > 0:
                    deficit[key] = short
            if not deficit or len(self._live) <= 1:
                return done
            self._preempt(self._victim(deficit, usage))
            done += 1

    def _victim(self, deficit: dict[str, int], usage: dict[int, dict[str, tuple[int, int]]]) -> _Request:
        """The live search to preempt for ``deficit`` blocks per model: of those whose
        preemption frees enough (its blocks and its next step's), the one losing the least work
        (resumable: the blocks a resume re-prefills at most; else the tokens it computed), the
        newest on a tie; when none frees enough, the newest. Never the oldest (lowest id)."""
        oldest = min(self._live, key=lambda r: r.handle.id)
        cands = [r for r in self._live if r is not oldest]

        def frees_enough(r: _Request) -> bool:
            return all(sum(usage[id(r)].get(k, (0, 0))) >= d for k, d in deficit.items())

        def lost(r: _Request) -> int:
            if self.tree.resumable(r.search):
                return sum(b for b, _ in usage[id(r)].values())
            return r.search.generated + r.search.prm_scored

        enough = [r for r in cands if frees_enough(r)]
        if enough:
            return min(enough, key=lambda r: (lost(r), -r.handle.id))
        return max(cands, key=lambda r: r.handle.id)

    def _record_step(self, batch) -> None:
        """After a recorded step: the running mean of a step's policy tokens (``_step_tokens``)."""
        nodes = self.tree.nodes
        ids = batch.children.tolist()
        if ids:
            mean = sum(nodes[x].length - nodes[nodes[x].parent].length for x in ids) / len(ids)
            self._step_tokens = 0.7 * self._step_tokens + 0.3 * mean

    def _apply_limits(self) -> None:
        now = time.perf_counter()
        for r in list(self._live):
            cfg = r.search.config
            if r.handle._cancel_requested:
                self._finish(r, "cancelled")
            elif cfg.max_wall_s is not None and now - r.search.t0 >= cfg.max_wall_s:
                self._finish(r, "timeout")
            elif cfg.max_policy_tokens is not None and r.search.generated >= cfg.max_policy_tokens:
                self._finish(r, "budget")

    def _advance(self) -> None:
        wants, owners = [], []
        for r in list(self._live):
            parents, counts, look = r.method.wants()
            if not parents:
                self._finish(r, None)
                continue
            wants.append((r.search, parents, counts, look))
            owners.append((r, int(sum(counts))))
        if not wants:
            return
        tree = self.tree
        spent = [(r.search, r.search.generated, r.search.prm_scored) for r, _ in owners]
        batch = tree.expand(wants)
        stage = "sample"
        save = getattr(self.policy, "stream_states", None)
        streams = save(list(dict.fromkeys(r.search.stream for r, _ in owners))) if tree.seeded and callable(save) else None
        try:
            tree.sample(batch)
            tree.look_ahead(batch)
            stage = "score"
            tree.score(batch)
        except KVCacheFull:
            # Nothing was recorded: undo the expansion (the models freed what they made).
            tree.forest.prune(batch.children)
            for x in batch.children.tolist():
                node = tree.nodes.pop(x)
                node.search.node_ids.remove(x)
            self._release_quietly(self.policy, batch.children.tolist())
            if stage == "score":
                self._release_quietly(self.prm, batch.children.tolist())
            for search, gen, scored in spent:
                search.generated, search.prm_scored = gen, scored
            if streams is not None:  # the retried step samples the same steps
                self.policy.set_stream_states(streams)
            raise
        except BaseException as exc:
            for r, _ in owners:
                self._fail(r, exc)
            raise
        tree.record(batch)
        self._record_step(batch)
        self._counters["policy_calls"] += batch.policy_calls
        self._counters["policy_rows"] += int(batch.children.size)
        if batch.prm_rows:
            self._counters["prm_calls"] += 1
            self._counters["prm_rows"] += batch.prm_rows
        start = 0
        for r, k in owners:
            children = batch.children[start : start + k]
            rows = range(start, start + k)
            start += k
            r.rows = k
            self._events_of_step(r, children, [batch.steps[i].text for i in rows])
            try:
                r.method.scored(children)
            except BaseException as exc:
                self._fail(r, exc)
                raise
            if r.method.done:
                self._finish(r, None)

    @staticmethod
    def _release_quietly(model, ids) -> None:
        """After ``KVCacheFull``: free what a model may hold of these ids (children of calls
        that succeeded before the failing one), one by one, ignoring ids it never held."""
        for x in ids:
            try:
                model.release([int(x)])
            except Exception:  # noqa: BLE001 - ids a failed call never created
                pass

    def _preempt_for_retry(self) -> bool:
        """After a step raised ``KVCacheFull``: preempt what ``_make_room`` finds short (at
        least one search, ``_victim``) so the step can be retried. A search live alone fails
        with it (it does not fit alone). False when nothing is live."""
        if len(self._live) <= 1:
            if self._live:
                r = self._live[0]
                self._counters["kv_full_errors"] += 1
                self._fail(r, KVCacheFull(f"search {r.handle.id} alone does not fit the KV cache"))
                return True  # retry: nothing is live now
            return False
        if not self._make_room():
            usage = {id(r): {key: (self._blocks(r.search, key, block), self._step_need(r, key, block))
                             for key, _, block in self._kv_models()} for r in self._live}
            self._preempt(self._victim({}, usage))
        return True

    def _preempt(self, r: _Request) -> None:
        """Free a live search's KV state and requeue it in arrival order: suspended with its
        tree when the models are ``Resumable``, else reset to restart from its root."""
        with self._lock:
            self._live.remove(r)
        if self.tree.resumable(r.search):
            self.tree.suspend(r.search)
        else:
            self.tree.drop(r.search)
            self._close_stream(r)
            r.method = None
            r.search.generated = r.search.prm_scored = 0
        r.preemptions += 1
        self._counters["preemptions"] += 1
        with self._lock:
            bisect.insort(self._queue, r, key=lambda q: q.handle.id)

    # ------------------------------------------------------------------ events and the end

    def _events_of_step(self, r: _Request, children: np.ndarray, texts: list[str]) -> None:
        h, tree = r.handle, self.tree
        ids = children.tolist()
        h._emit(Event("step", h.id, ids, texts, [tree.nodes[x].score for x in ids]))
        for x in ids:
            node = tree.nodes[x]
            if node.finished:
                h._emit(Event("completion", h.id, [x], [tree.solution_text(x)], answer=node.answer))

    def _finish(self, r: _Request, stopped: str | None) -> None:
        with self._lock:
            if r in self._live:
                self._live.remove(r)
        cfg = r.search.config
        if r.search.suspended is not None and self.tree.deferred(r.search):
            # preempted with its tree: its open paths are scored from the PRM's roots
            try:
                self._counters["tokens_reprefilled"] += self.tree.restore(r.search)
            except KVCacheFull:
                self.tree.drop(r.search)  # no room now: it ends as if never admitted
                r.method = None
        if r.method is None:  # never admitted
            pool, how, agg = [], cfg.final_vote, cfg.vote_agg
        elif stopped is None:
            pool, how, agg = r.method.final()
        else:
            pool, _, _ = r.method.final() if r.method.done else (r.method.partial(), None, None)
            how, agg = _vote_of(cfg)
        votes = r.votes if r.votes is not None else {"main": (how, agg)}
        try:
            results = self.tree.results(r.search, pool, votes, r.search.problem_id, stopped, r.prm_free)
            report = getattr(r.method, "report", None)  # dynamic compute: difficulty, chosen
            if callable(report):
                info = report()
                for res in results.values():
                    res.difficulty, res.chosen = info["difficulty"], info["chosen"]
        except BaseException as exc:
            self._fail(r, exc)
            raise
        if stopped is None and r.method is not None:
            n = max(1, cfg.n)
            for key, peak in r.peak.items():
                self._per_path.setdefault((key, cfg.method), deque(maxlen=PER_PATH_WINDOW)).append(peak / n)
        self.tree.drop(r.search)
        self._close_stream(r)
        r.handle._results = results
        self._counters["finished"] += 1
        if stopped is not None:
            self._counters[stopped] += 1
        r.handle._done.set()
        r.handle._emit(Event("end", r.handle.id, result=next(iter(results.values()))))

    def _fail(self, r: _Request, exc: BaseException) -> None:
        with self._lock:
            if r in self._live:
                self._live.remove(r)
        self.tree.drop(r.search, strict=False)
        self._close_stream(r)
        r.handle._error = exc
        r.handle._done.set()
        r.handle._emit(Event("end", r.handle.id, error=exc))

    def _close_stream(self, r: _Request) -> None:
        close = getattr(self.policy, "close_streams", None)
        if self.tree.seeded and callable(close):
            close([r.search.stream])

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, float]:
        """Counters: live / queued searches, preempted (queued searches that were preempted),
        preemptions, resumed (preempted searches readmitted with their tree), tokens_reprefilled
        (tokens the models ran to rebuild them), kv_full_caught (handled by preemption), kv_full_errors (searches failed
        with it: one alone did not fit), steps, policy_calls, prm_calls, mean_policy_batch and
        mean_prm_batch (rows per call), submitted, finished (of which ended early: cancelled,
        timeout, budget), and {policy,prm}_kv_blocks_in_use when the models' ``stats()`` report it."""
        with self._lock:
            c = dict(self._counters)
            out: dict[str, float] = {
                "live": len(self._live),
                "queued": len(self._queue),
                "preempted": sum(1 for r in self._queue if r.preemptions),
            }
        out.update(c)
        out["mean_policy_batch"] = c["policy_rows"] / c["policy_calls"] if c["policy_calls"] else 0.0
        out["mean_prm_batch"] = c["prm_rows"] / c["prm_calls"] if c["prm_calls"] else 0.0
        for name, model in (("policy", self.policy), ("prm", self.prm)):
            st = getattr(model, "stats", None)
            if model is not None and callable(st):
                s = st()
                if "kv_blocks_in_use" in s:
                    out[f"{name}_kv_blocks_in_use"] = s["kv_blocks_in_use"]
        return out


def _vote_of(cfg: SearchConfig) -> tuple[str, str]:
    from .methods.config import IMPLIED_VOTE

    how = IMPLIED_VOTE.get(cfg.method) or cfg.vote or "weighted"
    agg = cfg.agg if cfg.method == "majority" else cfg.vote_agg
    return how, agg


def _prompt_blocks(block: int, search: Search, template: float) -> int:
    """KV blocks a search's roots take: its prompt (estimated as one token per character of
    the problem plus ``template`` tokens: the engine has no tokenizer) once per root (DVTS:
    n / beam_width)."""
    cfg = search.config
    roots = cfg.n // cfg.beam_width if cfg.method == "dvts" else 1
    return -(-(len(search.problem) + math.ceil(template)) // block) * roots


class AsyncEngine:
    """An ``Engine`` stepped by one background thread, for asyncio callers (a web server).

        engine = ponder.AsyncEngine(policy, prm)
        result = await engine.search("What is 2 + 3?", SearchConfig(method="dvts", n=8))
        async for event in engine.stream(problem, config): ...   # Event, "end" last

    ``search`` / ``stream`` may be called from any number of tasks (and ``submit`` from any
    thread); a task cancelled while waiting cancels its search. ``close()`` stops the thread
    (searches still live are cancelled). Keyword arguments go to ``Engine``.
    """

    def __init__(self, policy, prm=None, **engine_kw) -> None:
        self.engine = Engine(policy, prm, **engine_kw)
        self.engine._background = True
        self._wake = threading.Event()
        self._stop = False
        self.errors: list[BaseException] = []  # step errors (each also failed its searches)
        self._thread = threading.Thread(target=self._loop, name="ponder-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            if self.engine.has_work():
                try:
                    self.engine.step()
                except Exception as exc:  # noqa: BLE001 - delivered to the failed searches' handles
                    self.errors.append(exc)
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    def submit(self, problem, config: SearchConfig | None = None, on_event: Callable[[Event], None] | None = None) -> Handle:
        """``Engine.submit`` (thread-safe); wakes the loop."""
        h = self.engine._submit(problem, config, None, (), on_event)
        self._wake.set()
        return h

    async def search(self, problem, config: SearchConfig | None = None) -> SearchResult:
        """Submit and wait without blocking the event loop; the search's ``SearchResult``."""
        import asyncio

        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def on_event(ev: Event) -> None:
            if ev.kind == "end":
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

        h = self.submit(problem, config, on_event)
        try:
            await fut
        except asyncio.CancelledError:
            h.cancel()
            raise
        return h.result()

    async def stream(self, problem, config: SearchConfig | None = None):
        """Submit and yield the search's ``Event``s as they happen, ``"end"`` last. Leaving the
        loop early cancels the search."""
        import asyncio

        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()
        h = self.submit(problem, config, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        try:
            while True:
                ev = await q.get()
                yield ev
                if ev.kind == "end":
                    return
        finally:
            if not h.done():
                h.cancel()

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def close(self) -> None:
        """Stop the loop thread after its current step; live and queued searches are cancelled."""
        self._stop = True
        self._wake.set()
        self._thread.join()
        with self.engine._lock:
            pending = list(self.engine._queue) + list(self.engine._live)
        for r in pending:
            r.handle.cancel()
        self.engine._apply_cancels()

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
