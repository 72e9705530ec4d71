"""Property tests of the KV-cache control plane.

1. ``ManagerTwins``: a hypothesis state machine drives the same random sequence of operations
   (new_sequence with prompts that share prefixes over a tiny alphabet, fork, append, free,
   evict, block_table, seq_len; valid and occasionally invalid) into
   ``ponder.twins.KVCacheManager`` and ``ponder._core.KVCacheManager`` and requires identical
   results, identical exception types and identical state after every step. It also keeps a
   simulated KV pool (one token id per slot; copy-on-write copies applied before the writes)
   and checks invariants on it:
   * reading every live sequence back through its block table gives exactly its tokens (so no
     write ever lands in a slot another live sequence uses, and a cached prefix handed out by
     new_sequence, even after evictions, holds the right tokens);
   * every slot written by append lies in a block held by that sequence alone;
   * reference counts are never negative and equal holders + cached; free blocks have count 0;
   * no leaks: freeing every sequence and evicting everything returns every block.
2. ``IndexTwins``: the same for a standalone PrefixIndex (insert, match, lock, unlock, evict);
   an evicted block is never returned by match until it is inserted again, and evicting
   everything removes exactly ``num_evictable`` nodes.
3. A random op sequence test of BlockPool against its twin.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import ponder._core as core
import ponder.twins as ref
from ponder.testing.forest import assert_same, int_input

TOKENS = st.integers(0, 2)  # a tiny alphabet, so that prompts and blocks repeat
ERRORS = (ValueError, IndexError, OverflowError, ref.KVCacheFull, core.KVCacheFull)
RAISED = object()  # what ``both`` returns for a call that raised (in both implementations)


def kind(exc: BaseException) -> str:
    """KVCacheFull of either implementation counts as the same kind."""
    return "KVCacheFull" if isinstance(exc, (ref.KVCacheFull, core.KVCacheFull)) else type(exc).__name__


def call_both(pair, method, *args, record=True):
    """Calls method on both objects; both must succeed with equal results or raise the same kind.

    Returns ("ok", result) or ("raised", kind). record: note a hypothesis event (inside @given)."""
    outcomes = []
    for obj in pair:
        try:
            outcomes.append(("ok", getattr(obj, method)(*args)))
        except ERRORS as exc:
            outcomes.append(("raised", kind(exc)))
    (rk, rv), (ck, cv) = outcomes
    assert rk == ck and (rk == "ok" or rv == cv), f"{method}{args!r}: reference {outcomes[0]} vs core {outcomes[1]}"
    if record:
        event(f"{method}: {'ok' if rk == 'ok' else rv}")
    if rk == "ok":
        assert_same(cv, rv, f"{method}{args!r}")
    return rk, rv


# ============================================================================= the manager


class ManagerTwins(RuleBasedStateMachine):
    @initialize(data=st.data())
    def start(self, data):
        self.bs = data.draw(st.sampled_from([2, 3, 4, 1]), label="block_size")
        self.nb = data.draw(st.integers(4, 24), label="num_blocks")
        self.pair = (ref.KVCacheManager(self.nb, self.bs), core.KVCacheManager(self.nb, self.bs))
        self.memory = np.full(self.nb * self.bs, -1, dtype=np.int64)  # token id per slot
        self.tokens: dict[int, list[int]] = {}  # live sequence -> its tokens
        self.next_id = 0
        self.prefixes = [data.draw(st.lists(TOKENS, max_size=3 * self.bs + 2), label="prefix") for _ in range(3)]
        # start from a few sequences (one forked), so that short runs reach shared blocks too
        for _ in range(data.draw(st.integers(1, 3), label="seed sequences")):
            self.new_sequence(data)
        if self.tokens:
            self.fork(data)

    # ---- helpers
    def live(self) -> list[int]:
        return sorted(self.tokens)

    def snapshot(self):
        live = self.live()
        r = self.pair[0]
        return (r.stats(), r.num_sequences, r.block_table(live), r.refcounts(np.arange(self.nb)))

    def both(self, method, *args):
        before = self.snapshot()
        kind_, value = call_both(self.pair, method, *args)
        if kind_ == "raised":
            assert_same(self.snapshot(), before, f"reference changed by failing {method}")
            for obj in self.pair:
                assert_same(obj.stats(), before[0], f"stats changed by failing {method}")
            return RAISED
        return value

    def holders(self) -> Counter:
        table, _ = self.pair[0].block_table(self.live())
        return Counter(b for b in table.ravel().tolist() if b >= 0)

    def pick(self, data, min_size=0, max_size=4):
        live = self.live()
        if not live:
            return []
        return data.draw(
            st.lists(st.sampled_from(live), min_size=min_size, max_size=max_size, unique=True), label="ids"
        )

    def corrupt(self, data, ids):
        """Now and then slip a bad id (dead, never given, duplicate, negative) into ids."""
        if data.draw(st.integers(0, 11), label="corrupt?") != 0:
            return ids, False
        options = [-1, self.next_id, self.next_id + 5] + ([ids[0]] if ids else [])
        dead = sorted(set(range(self.next_id)) - set(self.tokens))
        if dead:
            options.append(dead[-1])
        bad = data.draw(st.sampled_from(options), label="bad id")
        at = data.draw(st.integers(0, len(ids)), label="at")
        return ids[:at] + [bad] + ids[at:], True

    def do_append(self, data, ids, chunks, corrupt=False):
        flat = [t for c in chunks for t in c]
        counts = [len(c) for c in chunks]
        if corrupt:
            what = data.draw(st.sampled_from(["counts", "token", "length"]), label="bad append")
            if what == "counts" and counts:
                counts = counts[:-1]
            elif what == "token":
                flat = flat + [-1]
                counts = counts[:-1] + [counts[-1] + 1] if counts else counts
            else:
                flat = flat + [0]
        out = self.both("append", int_input(data, ids), int_input(data, counts), int_input(data, flat))
        if out is RAISED:
            return
        assert not corrupt, "a corrupted append succeeded"
        slots, src, dst = out
        assert slots.dtype == np.int64 and src.dtype == np.int32 and dst.dtype == np.int32
        assert len(slots) == len(flat) and len(src) == len(dst)
        assert len(set(slots.tolist())) == len(slots), "one append wrote a slot twice"
        assert len(set(dst.tolist())) == len(dst) and not set(src.tolist()) & set(dst.tolist())
        bs = self.bs
        for s, d in zip(src.tolist(), dst.tolist()):
            self.memory[d * bs : (d + 1) * bs] = self.memory[s * bs : (s + 1) * bs]
        self.memory[slots] = flat
        for i, chunk in zip(ids, chunks):
            self.tokens[i] = self.tokens[i] + list(chunk)
        # every written slot lies in a block that only its own sequence holds
        held = self.holders()
        for slot in slots.tolist():
            assert held[slot // bs] == 1, f"slot {slot} is shared by {held[slot // bs]} live sequences"

    # ---- rules
    @rule(data=st.data())
    def new_sequence(self, data):
        base = data.draw(st.sampled_from(self.prefixes), label="base")
        cut = data.draw(st.just(len(base)) | st.integers(0, len(base)), label="cut")
        prompt = base[:cut] + data.draw(st.lists(TOKENS, max_size=2 * self.bs + 1), label="suffix")
        bad = data.draw(st.integers(0, 15), label="bad prompt?") == 0
        out = self.both("new_sequence", int_input(data, prompt + [-1] if bad else prompt))
        if out is RAISED:
            assert bad
            return
        seq, cached = out
        assert type(seq) is int and type(cached) is int
        assert seq == self.next_id
        self.next_id += 1
        assert cached % self.bs == 0 and 0 <= cached <= max(0, len(prompt) - 1)
        self.tokens[seq] = prompt[:cached]
        if data.draw(st.integers(0, 4), label="prefill?"):
            self.do_append(data, [seq], [prompt[cached:]])

    @rule(data=st.data())
    def fork(self, data):
        live = self.live()
        if not live or data.draw(st.integers(0, 15), label="bad fork?") == 0:
            seq = data.draw(st.sampled_from([-1, self.next_id, *(live[:1])]), label="seq")
            k = -1 if seq in live else 1
            assert self.both("fork", seq, k) is RAISED
            return
        seq = data.draw(st.sampled_from(live), label="seq")
        k = data.draw(st.integers(0, 3), label="k")
        kids = self.both("fork", seq, k)
        assert kids.dtype == np.int32
        assert kids.tolist() == list(range(self.next_id, self.next_id + k))
        self.next_id += k
        for kid in kids.tolist():
            self.tokens[kid] = list(self.tokens[seq])
        if data.draw(st.booleans(), label="write after fork?"):  # exercise copy-on-write
            ids = data.draw(st.permutations([seq, *kids.tolist()]), label="order")
            chunks = [data.draw(st.lists(TOKENS, min_size=1, max_size=3), label="chunk") for _ in ids]
            self.do_append(data, ids, chunks)

    @rule(data=st.data())
    def append(self, data):
        ids = self.pick(data, min_size=1)
        chunks = [data.draw(st.lists(TOKENS, max_size=5), label="chunk") for _ in ids]
        bad_ids, corrupted = self.corrupt(data, ids)
        if corrupted:
            assert self.both("append", bad_ids, [1] * len(bad_ids), [0] * len(bad_ids)) is RAISED
            return
        corrupt = data.draw(st.integers(0, 15), label="bad tokens?") == 0
        self.do_append(data, ids, chunks, corrupt=corrupt)

    @rule(data=st.data())
    def free(self, data):
        ids = self.pick(data)
        bad_ids, corrupted = self.corrupt(data, ids)
        if self.both("free", int_input(data, bad_ids)) is RAISED:
            return
        assert not corrupted, "free accepted a bad id"
        for i in ids:
            del self.tokens[i]

    @rule(data=st.data())
    def evict(self, data):
        n = data.draw(st.sampled_from([0, 1, 2, 5, -1]), label="n")
        before = self.pair[0].stats()["blocks_evictable"]
        out = self.both("evict", n)
        if out is not RAISED:
            assert len(out) == min(n, before)

    @rule(data=st.data())
    def read(self, data):
        live = self.live()
        ids = data.draw(st.lists(st.sampled_from(live), max_size=4), label="ids") if live else []
        ids, _ = self.corrupt(data, ids)
        method = data.draw(st.sampled_from(["block_table", "seq_len"]), label="read")
        self.both(method, int_input(data, ids))

    @rule()
    def drain(self):
        """Free everything and evict everything: every block must be free again."""
        self.both("free", self.live())
        self.tokens.clear()
        self.both("evict", 10**9)
        for mgr in self.pair:
            s = mgr.stats()
            drained = (s["blocks_free"], s["blocks_cached"], s["blocks_in_use"], s["blocks_evictable"])
            assert drained == (self.nb, 0, 0, 0)
            assert not mgr.refcounts(np.arange(self.nb)).any()

    # ---- invariants
    @invariant()
    def twins_agree_and_memory_reads_back(self):
        r, c = self.pair
        live = self.live()
        stats = r.stats()
        assert_same(c.stats(), stats, "stats")
        assert r.num_sequences == c.num_sequences == len(live)
        table, lengths = r.block_table(live)
        assert_same(c.block_table(live), (table, lengths), "block_table")
        refs = r.refcounts(np.arange(self.nb))
        assert_same(c.refcounts(np.arange(self.nb)), refs, "refcounts")
        bs = self.bs
        for row, seq in enumerate(live):
            n = int(lengths[row])
            assert n == len(self.tokens[seq])
            assert (table[row] >= 0).sum() == -(-n // bs)
            got = [int(self.memory[table[row, t // bs] * bs + t % bs]) for t in range(n)]
            assert got == self.tokens[seq], f"sequence {seq} reads back {got}, expected {self.tokens[seq]}"
        held = Counter(b for b in table.ravel().tolist() if b >= 0)
        cached = [int(refs[b]) - held[b] for b in range(self.nb)]
        assert (refs >= 0).all()
        assert all(x in (0, 1) for x in cached), "refcount != holders + cached"
        assert sum(cached) == stats["blocks_cached"]
        assert int((refs == 0).sum()) == stats["blocks_free"]
        assert len(held) == stats["blocks_in_use"]
        assert stats["blocks_evictable"] <= stats["blocks_cached"]

    def teardown(self):
        if not hasattr(self, "pair"):
            return
        stats = self.pair[0].stats()
        for key in ("tokens_from_cache", "cow_copies", "evictions"):
            event(f"{key} > 0" if stats[key] else f"{key} == 0")
        self.drain()


ManagerTwins.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=35,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestManagerTwins = ManagerTwins.TestCase


# ============================================================================= the prefix index

IDS = st.integers(0, 11)


class IndexTwins(RuleBasedStateMachine):
    @initialize(data=st.data())
    def start(self, data):
        self.bs = data.draw(st.sampled_from([1, 2, 3]), label="block_size")
        self.pair = (ref.PrefixIndex(self.bs), core.PrefixIndex(self.bs))
        self.evicted: set[int] = set()
        self.prefixes = [data.draw(st.lists(TOKENS, max_size=4 * self.bs), label="prefix") for _ in range(3)]

    def tokens(self, data):
        base = data.draw(st.sampled_from(self.prefixes), label="base")
        cut = data.draw(st.integers(0, len(base)), label="cut")
        return base[:cut] + data.draw(st.lists(TOKENS, max_size=2 * self.bs + 1), label="suffix")

    def present(self) -> list[int]:
        return [b for b in range(12) if self.pair[0].contains(b)]

    def both(self, method, *args):
        r = self.pair[0]
        before = (r.num_nodes, r.num_evictable, self.present(), r.lock_counts(self.present()))
        kind_, value = call_both(self.pair, method, *args)
        if kind_ == "raised":
            after = (r.num_nodes, r.num_evictable, self.present(), r.lock_counts(self.present()))
            assert_same(after, before, f"index changed by failing {method}")
            return RAISED
        return value

    @rule(data=st.data())
    def insert(self, data):
        toks = self.tokens(data)
        nb = len(toks) // self.bs
        fresh = [b for b in range(12) if b not in self.present()]
        if fresh and data.draw(st.integers(0, 3), label="fresh ids?"):
            ids = (
                data.draw(st.lists(st.sampled_from(fresh), min_size=nb, max_size=nb, unique=True), label="ids")
                if len(fresh) >= nb
                else data.draw(st.lists(IDS, min_size=nb, max_size=nb), label="ids")
            )
        else:
            ids = data.draw(st.lists(IDS, min_size=nb, max_size=nb), label="ids")
        if data.draw(st.integers(0, 15), label="bad length?") == 0:
            ids = ids + [0]
        out = self.both("insert", int_input(data, toks), int_input(data, ids))
        if out is not RAISED:
            self.evicted -= set(self.present())

    @rule(data=st.data())
    def match(self, data):
        toks = self.tokens(data)
        out = self.both("match", int_input(data, toks))
        if out is RAISED:
            return
        matched, blocks = out
        assert matched == len(blocks) * self.bs
        assert not set(blocks.tolist()) & self.evicted, "match returned an evicted block"

    @rule(data=st.data(), unlock=st.booleans())
    def lock(self, data, unlock):
        present = self.present()
        ids = data.draw(st.lists(st.sampled_from(present), max_size=3), label="ids") if present else []
        if data.draw(st.integers(0, 7), label="bad lock?") == 0:
            ids = ids + [data.draw(IDS, label="maybe absent")]
        self.both("unlock" if unlock else "lock", int_input(data, ids))

    @rule(n=st.sampled_from([0, 1, 2, 3, -1]))
    def evict(self, n):
        before = self.pair[0].num_evictable
        out = self.both("evict", n)
        if out is not RAISED:
            assert len(out) == min(n, before)
            self.evicted |= set(out.tolist())

    @rule()
    def evict_all(self):
        before = self.pair[0].num_evictable
        out = self.both("evict", 10**9)
        assert len(out) == before
        self.evicted |= set(out.tolist())
        assert self.pair[0].num_evictable == 0

    @invariant()
    def twins_agree(self):
        r, c = self.pair
        assert (r.num_nodes, r.num_evictable) == (c.num_nodes, c.num_evictable)
        present = self.present()
        assert present == [b for b in range(12) if c.contains(b)]
        assert r.num_nodes == len(present)
        assert_same(c.lock_counts(present), r.lock_counts(present))
        assert not set(present) & self.evicted


IndexTwins.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestIndexTwins = IndexTwins.TestCase


# ============================================================================= the block pool

POOL_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("allocate"), st.integers(-1, 4)),
        st.tuples(st.just("incref"), st.lists(st.integers(0, 2) | st.integers(-1, 6), max_size=4)),
        st.tuples(st.just("decref"), st.lists(st.integers(0, 2) | st.integers(-1, 6), max_size=4)),
        st.tuples(st.just("refcounts"), st.lists(st.integers(0, 5), max_size=4)),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(1, 6), ops=POOL_OPS)
def test_block_pool_twins(num_blocks, ops):
    pair = (ref.BlockPool(num_blocks, 4), core.BlockPool(num_blocks, 4))
    for method, arg in ops:
        before = pair[0].refcounts(np.arange(num_blocks))
        kind_, _ = call_both(pair, method, arg)
        refs = [p.refcounts(np.arange(num_blocks)) for p in pair]
        assert_same(refs[1], refs[0])
        assert (refs[0] >= 0).all()
        assert pair[0].num_free == pair[1].num_free == int((refs[0] == 0).sum())
        if kind_ == "raised":
            assert_same(refs[0], before)
    # no leaks: dropping every reference frees every block
    for p in pair:
        counts = p.refcounts(np.arange(num_blocks))
        p.decref(np.repeat(np.arange(num_blocks), counts))
        assert p.num_free == num_blocks
    assert_same(pair[1].allocate(num_blocks), pair[0].allocate(num_blocks))


# ============================================================================= a search-like workload


def _read_back(mgr, memory, tokens, bs):
    live = sorted(tokens)
    table, lengths = mgr.block_table(live)
    for row, seq in enumerate(live):
        n = int(lengths[row])
        cols = np.arange(n)
        got = memory[table[row, cols // bs].astype(np.int64) * bs + cols % bs].tolist()
        assert got == tokens[seq], f"sequence {seq}"
    return table


@pytest.mark.parametrize("seed", range(6))
def test_search_workload_twins(seed):
    """Seeded tree-search traffic (prompts sharing prefixes, beams forking, steps of random length,
    pruning, a pool small enough to evict and to fill up) into both implementations: identical
    outputs and errors, tokens read back through the block tables, no leaks at the end."""
    rng = np.random.default_rng(seed)
    bs = int(rng.choice([2, 3, 4]))
    nb = int(rng.integers(12, 40))
    pair = (ref.KVCacheManager(nb, bs), core.KVCacheManager(nb, bs))
    memory = np.full(nb * bs, -1, dtype=np.int64)
    tokens: dict[int, list[int]] = {}
    bases = [rng.integers(0, 3, size=int(rng.integers(0, 4 * bs))).tolist() for _ in range(3)]
    full = 0
    for step in range(600):
        op = rng.choice(["new", "fork", "append", "append", "free"], p=[0.15, 0.2, 0.35, 0.15, 0.15])
        live = sorted(tokens)
        if op == "new" or not live:
            base = bases[int(rng.integers(0, 3))]
            prompt = (
                base[: int(rng.integers(0, len(base) + 1))] + rng.integers(0, 3, size=int(rng.integers(1, 4))).tolist()
            )
            kind_, out = call_both(pair, "new_sequence", prompt, record=False)
            seq, cached = out
            tokens[seq] = prompt[:cached]
            ids, chunks = [seq], [prompt[cached:]]
        elif op == "fork":
            parent = int(rng.choice(live))
            kind_, kids = call_both(pair, "fork", parent, int(rng.integers(1, 4)), record=False)
            for kid in kids.tolist():
                tokens[kid] = list(tokens[parent])
            ids = [parent, *kids.tolist()]
            chunks = [rng.integers(0, 3, size=int(rng.integers(1, 2 * bs))).tolist() for _ in ids]
        elif op == "append":
            ids = rng.choice(live, size=int(rng.integers(1, min(4, len(live)) + 1)), replace=False).tolist()
            chunks = [rng.integers(0, 3, size=int(rng.integers(0, 2 * bs + 1))).tolist() for _ in ids]
        else:
            ids = rng.choice(live, size=int(rng.integers(1, min(3, len(live)) + 1)), replace=False).tolist()
            call_both(pair, "free", ids, record=False)
            for i in ids:
                del tokens[i]
            ids, chunks = [], []
        if ids:
            flat = [t for c in chunks for t in c]
            kind_, out = call_both(pair, "append", ids, [len(c) for c in chunks], flat, record=False)
            if kind_ == "raised":
                assert out == "KVCacheFull"
                full += 1
                # make room: drop the oldest half of the sequences
                drop = sorted(tokens)[: max(1, len(tokens) // 2)]
                call_both(pair, "free", drop, record=False)
                for i in drop:
                    del tokens[i]
            else:
                slots, src, dst = out
                for s, d in zip(src.tolist(), dst.tolist()):
                    memory[d * bs : (d + 1) * bs] = memory[s * bs : (s + 1) * bs]
                memory[slots] = flat
                for i, c in zip(ids, chunks):
                    tokens[i] = tokens[i] + c
        table = _read_back(pair[0], memory, tokens, bs)
        assert_same(pair[1].block_table(sorted(tokens)), pair[0].block_table(sorted(tokens)))
        stats = pair[0].stats()
        assert_same(pair[1].stats(), stats)
        refs = pair[0].refcounts(np.arange(nb))
        held = Counter(b for b in table.ravel().tolist() if b >= 0)
        assert all(int(refs[b]) - held[b] in (0, 1) for b in range(nb))
    stats = pair[0].stats()
    assert stats["cow_copies"] > 0 and stats["tokens_from_cache"] > 0 and stats["evictions"] > 0 and full > 0
    call_both(pair, "free", sorted(tokens), record=False)
    call_both(pair, "evict", 10**9, record=False)
    for mgr in pair:
        s = mgr.stats()
        assert (s["blocks_free"], s["blocks_cached"]) == (nb, 0)
