"""Unit tests of the KV-cache control plane (BlockPool, PrefixIndex, KVCacheManager), run against
the reference twin (ponder.twins.kv) and the compiled core (ponder._core).

Expected values are worked out by hand from the specification in ``ponder/twins/kv.py``.
Every bad-input test checks the exact exception type and that the failing call changed nothing.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import ponder._core
import ponder.twins
from ponder.testing.forest import assert_same

INT32_MAX = 2**31 - 1

IMPLS = {
    "reference": SimpleNamespace(
        name="reference",
        BlockPool=ponder.twins.BlockPool,
        PrefixIndex=ponder.twins.PrefixIndex,
        KVCacheManager=ponder.twins.KVCacheManager,
        KVCacheFull=ponder.twins.KVCacheFull,
    ),
    "core": SimpleNamespace(
        name="core",
        BlockPool=getattr(ponder._core, "BlockPool", None),
        PrefixIndex=getattr(ponder._core, "PrefixIndex", None),
        KVCacheManager=getattr(ponder._core, "KVCacheManager", None),
        KVCacheFull=getattr(ponder._core, "KVCacheFull", None),
    ),
}


@pytest.fixture(params=list(IMPLS), ids=list(IMPLS))
def kv(request):
    """The implementation under test: a namespace of BlockPool, PrefixIndex, KVCacheManager, KVCacheFull."""
    impl = IMPLS[request.param]
    if impl.KVCacheManager is None:
        pytest.fail("ponder._core has no KV-cache classes (stale build?)")
    return impl


def i32(values):
    return np.array(values, dtype=np.int32)


def i64(values):
    return np.array(values, dtype=np.int64)


# ----------------------------------------------------------------------------- snapshots


def pool_snapshot(pool) -> dict:
    n = pool.num_blocks
    return {"num_free": pool.num_free, "refcounts": pool.refcounts(np.arange(n))}


def index_snapshot(index, ids=range(64)) -> dict:
    present = [b for b in ids if index.contains(b)]
    return {
        "num_nodes": index.num_nodes,
        "num_evictable": index.num_evictable,
        "present": present,
        "locks": index.lock_counts(i64(present)),
    }


def manager_snapshot(mgr, live) -> dict:
    live = list(live)
    table, lengths = mgr.block_table(i64(live))
    return {
        "stats": mgr.stats(),
        "num_sequences": mgr.num_sequences,
        "table": table,
        "lengths": lengths,
        "seq_len": mgr.seq_len(i64(live)),
        "refcounts": mgr.refcounts(np.arange(mgr.num_blocks)),
    }


def raises_unchanged(exc, snap, fn, *args, match=None):
    """fn(*args) must raise exactly ``exc`` and leave ``snap()`` as it was."""
    before = snap()
    with pytest.raises(exc, match=match) as info:
        fn(*args)
    assert type(info.value) is exc, f"raised {type(info.value).__name__}, expected {exc.__name__}"
    assert_same(snap(), before, "state after the failing call")
    return info


# ============================================================================= BlockPool


def test_pool_hands_out_blocks_in_order_and_lifo(kv):
    pool = kv.BlockPool(5, 16)
    assert (pool.num_blocks, pool.block_size, pool.num_free) == (5, 16, 5)
    got = pool.allocate(3)
    assert_same(got, i32([0, 1, 2]))
    assert pool.num_free == 2
    assert_same(pool.refcounts([0, 1, 2, 3, 4]), i32([1, 1, 1, 0, 0]))
    pool.decref(i64([2, 0]))  # pushed 2 then 0: 0 is handed out next
    assert_same(pool.allocate(2), i32([0, 2]))
    assert_same(pool.allocate(0), i32([]))
    assert_same(pool.allocate(2), i32([3, 4]))
    assert pool.num_free == 0


def test_pool_incref_decref_count_repeats(kv):
    pool = kv.BlockPool(3, 2)
    pool.allocate(2)
    pool.incref([0, 0, 1])
    assert_same(pool.refcounts(np.array([0, 1, 2], dtype=np.uint8)), i32([3, 2, 0]))
    pool.decref(np.array([0, 1, 0, 0], dtype=np.int16))  # 0 reaches zero at its third occurrence
    assert_same(pool.refcounts([0, 1]), i32([0, 1]))
    assert pool.num_free == 2
    assert_same(pool.allocate(1), i32([0]))
    pool.incref([])
    pool.decref(np.array([], dtype=np.float64))  # empty arrays of any dtype are accepted


def test_pool_allocate_full_raises_and_changes_nothing(kv):
    pool = kv.BlockPool(3, 4)
    pool.allocate(2)
    snap = lambda: pool_snapshot(pool)  # noqa: E731
    info = raises_unchanged(kv.KVCacheFull, snap, pool.allocate, 2)
    assert isinstance(info.value, RuntimeError)
    assert_same(pool.allocate(1), i32([2]))


@pytest.mark.parametrize(
    "args, exc",
    [
        ((0, 4), ValueError),
        ((-1, 4), ValueError),
        ((2**31, 4), ValueError),
        ((4, 0), ValueError),
        ((4, 2**31), ValueError),
        ((2.0, 4), ValueError),
        (("4", 4), ValueError),
        ((True, 4), ValueError),
    ],
)
def test_constructors_reject_bad_sizes(kv, args, exc):
    for cls in (kv.BlockPool, kv.KVCacheManager):
        with pytest.raises(exc) as info:
            cls(*args)
        assert type(info.value) is exc
    if args[0] == 4:
        with pytest.raises(exc):
            kv.PrefixIndex(args[1])


def test_pool_bad_inputs_change_nothing(kv):
    pool = kv.BlockPool(4, 2)
    pool.allocate(2)
    pool.incref([1])
    snap = lambda: pool_snapshot(pool)  # noqa: E731
    raises_unchanged(ValueError, snap, pool.allocate, -1, match="n")
    raises_unchanged(ValueError, snap, pool.allocate, 2**31, match="n")
    raises_unchanged(ValueError, snap, pool.allocate, 1.5, match="n")
    raises_unchanged(IndexError, snap, pool.incref, [0, 4], match=r"block_ids\[1\]")
    raises_unchanged(IndexError, snap, pool.incref, [-1], match=r"block_ids\[0\]")
    raises_unchanged(ValueError, snap, pool.incref, [2**31], match="block_ids")
    raises_unchanged(ValueError, snap, pool.incref, [0, 2], match=r"block_ids\[1\] = 2")  # free
    raises_unchanged(ValueError, snap, pool.incref, np.array([0.0]), match="block_ids")
    raises_unchanged(ValueError, snap, pool.incref, np.zeros((1, 1), dtype=np.int64), match="block_ids")
    raises_unchanged(ValueError, snap, pool.decref, [0, 3], match="block_ids")  # 3 is free
    # block 0 has count 1: dropping it twice is rejected for the whole batch (1 is not touched)
    raises_unchanged(ValueError, snap, pool.decref, [1, 0, 0], match="block_ids")
    raises_unchanged(ValueError, snap, pool.decref, [1, 1, 1], match="block_ids")
    raises_unchanged(IndexError, snap, pool.refcounts, [7], match="block_ids")
    raises_unchanged(ValueError, snap, pool.refcounts, ["a"], match="block_ids")


# ============================================================================= PrefixIndex


def test_index_insert_and_match_full_blocks(kv):
    idx = kv.PrefixIndex(2)
    assert idx.block_size == 2 and idx.num_nodes == 0
    assert idx.insert([1, 2, 3, 4, 5], [10, 11]) == 2  # the trailing partial block is ignored
    assert idx.num_nodes == 2
    m = idx.match(np.array([1, 2, 3, 4, 9], dtype=np.int64))
    assert m[0] == 4 and isinstance(m[0], int)
    assert_same(m[1], i32([10, 11]))
    assert_same(idx.match([1, 2, 9, 9]), (2, i32([10])))
    assert_same(idx.match([1, 2, 3]), (2, i32([10])))
    assert_same(idx.match([1]), (0, i32([])))
    assert_same(idx.match([]), (0, i32([])))
    assert_same(idx.match([2, 1]), (0, i32([])))
    assert idx.contains(10) and idx.contains(np.int32(11)) and not idx.contains(12) and not idx.contains(-5)
    assert not idx.contains(2**40)


def test_index_insert_keeps_existing_nodes_and_hangs_new_ones_below_them(kv):
    idx = kv.PrefixIndex(2)
    idx.insert([1, 2, 3, 4], [10, 11])
    # blocks 0 and 1 exist (ids 20, 21 are ignored, even though 21 is not in the index)
    assert idx.insert([1, 2, 3, 4, 7, 8], [20, 21, 22]) == 1
    assert not idx.contains(20) and not idx.contains(21) and idx.contains(22)
    assert_same(idx.match([1, 2, 3, 4, 7, 8]), (6, i32([10, 11, 22])))
    # a given id at an existing position may even be an id already in the index
    assert idx.insert([1, 2, 5, 6], [11, 30]) == 1
    assert_same(idx.match([1, 2, 5, 6]), (4, i32([10, 30])))
    assert idx.insert([1, 2], [10]) == 0
    assert idx.insert([], []) == 0
    assert idx.num_nodes == 4


def test_index_insert_errors_change_nothing(kv):
    idx = kv.PrefixIndex(2)
    idx.insert([1, 2, 3, 4], [10, 11])
    snap = lambda: index_snapshot(idx)  # noqa: E731
    raises_unchanged(ValueError, snap, idx.insert, [1, 2, 3, 4], [10], match="block_ids")
    raises_unchanged(ValueError, snap, idx.insert, [1, 2, 3], [10, 11], match="block_ids")
    raises_unchanged(ValueError, snap, idx.insert, [5, 6], [11], match=r"block_ids\[0\] = 11")  # in use
    raises_unchanged(ValueError, snap, idx.insert, [1, 2, 5, 6, 7, 8], [10, 12, 12], match="block_ids")
    raises_unchanged(ValueError, snap, idx.insert, [1, 2, 5, 6], [10, 10], match="block_ids")
    raises_unchanged(ValueError, snap, idx.insert, [1, -2], [12], match="tokens")
    raises_unchanged(ValueError, snap, idx.insert, [1, 2**31], [12], match="tokens")
    raises_unchanged(ValueError, snap, idx.insert, [5, 6], [-1], match="block_ids")
    raises_unchanged(ValueError, snap, idx.match, [1.0, 2.0], match="tokens")
    raises_unchanged(ValueError, snap, idx.match, np.zeros((2, 2), dtype=np.int32), match="tokens")


def test_index_evicts_lru_leaves_and_then_exposed_parents(kv):
    idx = kv.PrefixIndex(1)
    idx.insert([1, 2], [0, 1])  # clock 1: 0, 1
    idx.insert([1, 3], [5, 2])  # clock 2: 0 touched, 2 new below 0
    idx.insert([4], [3])  # clock 3
    assert idx.num_evictable == 4
    assert_same(idx.evict(1), i32([1]))  # leaves: 1 (t1), 2 (t2), 3 (t3)
    assert_same(idx.evict(2), i32([2, 0]))  # 0 (t2) becomes a leaf once 2 is gone
    assert_same(idx.evict(0), i32([]))
    assert_same(idx.evict(5), i32([3]))
    assert idx.num_nodes == 0 and idx.num_evictable == 0
    assert_same(idx.evict(3), i32([]))


def test_index_match_refreshes_lru(kv):
    idx = kv.PrefixIndex(1)
    idx.insert([1], [0])
    idx.insert([2], [1])
    idx.insert([3], [2])
    idx.match([1, 9])  # 0 is now the most recently used
    assert_same(idx.evict(3), i32([1, 2, 0]))


def test_index_locks_protect_subtrees(kv):
    idx = kv.PrefixIndex(1)
    idx.insert([1, 2, 3], [0, 1, 2])  # a chain 0 -> 1 -> 2
    idx.insert([1, 5], [0, 3])  # 3 below 0
    assert idx.num_evictable == 4
    idx.lock([1, 1])
    assert_same(idx.lock_counts([0, 1, 2, 3]), i32([0, 2, 0, 0]))
    assert idx.num_evictable == 2  # 2 and 3; 0 and 1 have a locked subtree
    assert_same(idx.evict(10), i32([2, 3]))  # 1 is locked; 0 still has child 1
    assert idx.num_nodes == 2 and idx.num_evictable == 0
    idx.unlock([1])
    assert idx.num_evictable == 0
    idx.unlock([1])
    assert idx.num_evictable == 2
    assert_same(idx.evict(10), i32([1, 0]))


def test_index_lock_errors_change_nothing(kv):
    idx = kv.PrefixIndex(2)
    idx.insert([1, 2, 3, 4], [10, 11])
    idx.lock([11])
    snap = lambda: index_snapshot(idx)  # noqa: E731
    raises_unchanged(ValueError, snap, idx.lock, [10, 12], match=r"block_ids\[1\] = 12")
    raises_unchanged(ValueError, snap, idx.unlock, [10], match="block_ids")
    raises_unchanged(ValueError, snap, idx.unlock, [11, 11], match="block_ids")
    raises_unchanged(ValueError, snap, idx.unlock, [11, 99], match="block_ids")
    raises_unchanged(ValueError, snap, idx.lock_counts, [99], match="block_ids")
    raises_unchanged(ValueError, snap, idx.evict, -1, match="n")
    raises_unchanged(ValueError, snap, idx.evict, 0.5, match="n")
    raises_unchanged(ValueError, snap, idx.contains, "x", match="block_id")


# ============================================================================= KVCacheManager


def test_manager_append_fork_copy_on_write(kv):
    mgr = kv.KVCacheManager(8, 4)
    assert (mgr.num_blocks, mgr.block_size, mgr.num_sequences) == (8, 4, 0)
    s, cached = mgr.new_sequence(list(range(10)))
    assert (s, cached) == (0, 0) and isinstance(s, int) and isinstance(cached, int)
    slots, src, dst = mgr.append([s], [10], list(range(10)))
    assert_same((slots, src, dst), (i64(range(10)), i32([]), i32([])))
    # blocks 0 and 1 are full and indexed (refcount 2), block 2 holds 2 tokens
    assert_same(mgr.refcounts(range(8)), i32([2, 2, 1, 0, 0, 0, 0, 0]))
    kids = mgr.fork(s, 2)
    assert_same(kids, i32([1, 2]))
    assert_same(mgr.refcounts([0, 1, 2]), i32([4, 4, 3]))
    table, lengths = mgr.block_table([0, 1, 2])
    assert_same(table, i32([[0, 1, 2]] * 3))
    assert_same(lengths, i64([10, 10, 10]))
    # both children write into the shared partial block 2: each gets its own copy
    slots, src, dst = mgr.append(kids, [1, 1], [7, 8])
    assert_same((slots, src, dst), (i64([3 * 4 + 2, 4 * 4 + 2]), i32([2, 2]), i32([3, 4])))
    table, lengths = mgr.block_table(i64([0, 1, 2]))
    assert_same(table, i32([[0, 1, 2], [0, 1, 3], [0, 1, 4]]))
    assert_same(lengths, i64([10, 11, 11]))
    assert_same(mgr.refcounts(range(5)), i32([4, 4, 1, 1, 1]))
    # the parent now owns block 2 alone: it writes in place
    assert_same(mgr.append([0], [3], [10, 11, 12]), (i64([10, 11, 20]), i32([]), i32([])))
    assert_same(mgr.seq_len([0, 1, 2, 0]), i64([13, 11, 11, 13]))
    stats = mgr.stats()
    assert stats == {
        "tokens_requested": 10,
        "tokens_from_cache": 0,
        "tokens_appended": 15,
        "blocks_total": 8,
        "blocks_free": 2,
        "blocks_in_use": 6,
        "blocks_cached": 3,  # blocks 0, 1 and the parent's block 2 ([8, 9, 10, 11])
        "blocks_evictable": 0,
        "cow_copies": 2,
        "evictions": 0,
    }
    assert all(type(v) is int for v in stats.values())


def test_manager_new_sequence_reuses_cached_prefix_but_never_the_last_token(kv):
    mgr = kv.KVCacheManager(8, 4)
    a, _ = mgr.new_sequence(list(range(10)))
    mgr.append([a], [10], list(range(10)))
    b, cached = mgr.new_sequence(list(range(10)) + [5])
    assert (b, cached) == (1, 8)
    assert_same(mgr.block_table([b]), (i32([[0, 1]]), i64([8])))
    assert_same(mgr.refcounts([0, 1]), i32([3, 3]))
    # exactly two cached blocks of prompt: the last token must be computed, so only one is reused
    c, cached = mgr.new_sequence(list(range(8)))
    assert (c, cached) == (2, 4)
    mgr.append([c], [4], [4, 5, 6, 7])  # a duplicate of cached block 1: stays private
    assert_same(mgr.block_table([c]), (i32([[0, 3]]), i64([8])))
    assert_same(mgr.refcounts([3]), i32([1]))
    assert mgr.stats()["blocks_cached"] == 2
    # and its later blocks stay private too, although their tokens are new
    mgr.append([c], [4], [40, 41, 42, 43])
    assert mgr.stats()["blocks_cached"] == 2
    assert_same(mgr.refcounts([4]), i32([1]))
    d, cached = mgr.new_sequence([])
    assert (d, cached) == (3, 0)
    e, cached = mgr.new_sequence([0])
    assert (e, cached) == (4, 0)
    s = mgr.stats()
    assert (s["tokens_requested"], s["tokens_from_cache"]) == (10 + 11 + 8 + 0 + 1, 8 + 4)


def test_manager_free_keeps_prefix_cached_and_ids_are_not_reused(kv):
    mgr = kv.KVCacheManager(6, 2)
    a, _ = mgr.new_sequence([1, 2, 3, 4, 5])
    mgr.append([a], [5], [1, 2, 3, 4, 5])
    mgr.free([a])
    assert mgr.num_sequences == 0
    assert_same(mgr.refcounts(range(3)), i32([1, 1, 0]))  # blocks 0, 1 stay cached; 2 is free
    s = mgr.stats()
    assert (s["blocks_free"], s["blocks_in_use"], s["blocks_cached"], s["blocks_evictable"]) == (4, 0, 2, 2)
    for call, args in [
        (mgr.free, ([a],)),
        (mgr.seq_len, ([a],)),
        (mgr.block_table, ([a],)),
        (mgr.append, ([a], [1], [0])),
        (mgr.fork, (a, 1)),
    ]:
        with pytest.raises(IndexError):
            call(*args)
    b, cached = mgr.new_sequence([1, 2, 3, 4, 5])
    assert (b, cached) == (1, 4)
    assert_same(mgr.append([b], [1], [5]), (i64([2 * 2]), i32([]), i32([])))  # block 2 reused (LIFO)


def test_manager_evicts_lru_when_the_free_list_runs_dry_ties_to_lower_block(kv):
    mgr = kv.KVCacheManager(4, 2)
    s0, _ = mgr.new_sequence([])
    s1, _ = mgr.new_sequence([])
    mgr.append([s0, s1], [2, 2], [1, 1, 2, 2])  # blocks 0 and 1 indexed by the same call
    mgr.free([s0, s1])
    s2, _ = mgr.new_sequence([])
    assert mgr.stats()["blocks_evictable"] == 2
    slots, _, _ = mgr.append([s2], [6], [5, 5, 6, 6, 7, 7])
    # free blocks 2, 3 first; then the LRU leaf, a tie between 0 and 1 -> block 0
    assert_same(slots, i64([4, 5, 6, 7, 0, 1]))
    s = mgr.stats()
    assert (s["evictions"], s["blocks_cached"], s["blocks_free"]) == (1, 4, 0)
    _, cached = mgr.new_sequence([1, 1, 0])
    assert cached == 0  # [1, 1] was evicted
    _, cached = mgr.new_sequence([2, 2, 0])
    assert cached == 2


def test_manager_full_raises_and_changes_nothing(kv):
    mgr = kv.KVCacheManager(4, 2)
    a, _ = mgr.new_sequence([])
    mgr.append([a], [5], [1, 2, 3, 4, 5])  # 3 blocks, 2 indexed
    b, _ = mgr.new_sequence([])
    live = [a, b]
    snap = lambda: manager_snapshot(mgr, live)  # noqa: E731
    raises_unchanged(kv.KVCacheFull, snap, mgr.append, [b], [3], [1, 2, 3])  # needs 2, has 1 free
    # a copy-on-write counts too: fork, then both write into the shared partial block
    (c,) = mgr.fork(a, 1)
    live.append(int(c))
    raises_unchanged(kv.KVCacheFull, snap, mgr.append, [a, int(c), b], [1, 1, 1], [6, 7, 8])
    mgr.append([a, int(c)], [1, 1], [6, 7])  # a copies (uses the last free block), c writes in place
    assert mgr.stats()["blocks_free"] == 0
    # after freeing, cached blocks are evictable and count as capacity
    mgr.free([a, int(c)])
    live = [b]
    assert mgr.stats()["blocks_evictable"] == 4  # [1,2] -> [3,4] -> {[5,6], [5,7]}
    slots, _, _ = mgr.append([b], [8], [9] * 8)
    assert mgr.stats()["evictions"] == 4
    assert sorted(slots.tolist()) == list(range(8))


def test_manager_no_copy_without_tokens_and_in_place_after_parent_frees(kv):
    mgr = kv.KVCacheManager(6, 4)
    a, _ = mgr.new_sequence([])
    mgr.append([a], [2], [1, 2])
    (b,) = mgr.fork(a, 1)
    assert_same(mgr.append([a, int(b)], [0, 0], []), (i64([]), i32([]), i32([])))
    assert mgr.stats()["cow_copies"] == 0
    mgr.free([a])
    assert_same(mgr.append([int(b)], [1], [3]), (i64([2]), i32([]), i32([])))  # b owns block 0 now
    assert_same(mgr.fork(b, 0), i32([]))


def test_manager_block_table_shapes(kv):
    mgr = kv.KVCacheManager(4, 2)
    table, lengths = mgr.block_table([])
    assert_same((table, lengths), (np.zeros((0, 0), dtype=np.int32), i64([])))
    a, _ = mgr.new_sequence([])
    b, _ = mgr.new_sequence([])
    assert_same(mgr.block_table([a, b]), (np.zeros((2, 0), dtype=np.int32), i64([0, 0])))
    mgr.append([b], [3], [1, 2, 3])
    assert_same(mgr.block_table([a, b, a]), (i32([[-1, -1], [0, 1], [-1, -1]]), i64([0, 3, 0])))


def test_manager_explicit_evict(kv):
    mgr = kv.KVCacheManager(4, 1)
    a, _ = mgr.new_sequence([])
    mgr.append([a], [3], [1, 2, 3])
    mgr.free([a])
    assert_same(mgr.evict(2), i32([2, 1]))
    assert_same(mgr.evict(5), i32([0]))
    s = mgr.stats()
    assert (s["evictions"], s["blocks_free"], s["blocks_cached"]) == (3, 4, 0)


def test_manager_bad_inputs_change_nothing(kv):
    mgr = kv.KVCacheManager(6, 2)
    a, _ = mgr.new_sequence([])
    mgr.append([a], [3], [1, 2, 3])
    (b,) = mgr.fork(a, 1)
    b = int(b)
    c, _ = mgr.new_sequence([])
    mgr.free([c])
    live = [a, b]
    snap = lambda: manager_snapshot(mgr, live)  # noqa: E731
    # new_sequence
    raises_unchanged(ValueError, snap, mgr.new_sequence, [1, -1], match="tokens")
    raises_unchanged(ValueError, snap, mgr.new_sequence, [2**31], match="tokens")
    raises_unchanged(ValueError, snap, mgr.new_sequence, [1.0], match="tokens")
    raises_unchanged(ValueError, snap, mgr.new_sequence, [[1, 2]], match="tokens")
    # fork
    raises_unchanged(IndexError, snap, mgr.fork, c, 1, match="seq_id")
    raises_unchanged(IndexError, snap, mgr.fork, -1, 1, match="seq_id")
    raises_unchanged(IndexError, snap, mgr.fork, 2**40, 1, match="seq_id")
    raises_unchanged(ValueError, snap, mgr.fork, a, -1, match="k")
    raises_unchanged(ValueError, snap, mgr.fork, a, 2**31, match="k")
    raises_unchanged(ValueError, snap, mgr.fork, 0.0, 1, match="seq_id")
    raises_unchanged(OverflowError, snap, mgr.fork, a, INT32_MAX)
    # append
    raises_unchanged(ValueError, snap, mgr.append, [a, a], [1, 1], [5, 5], match="seq_ids")
    raises_unchanged(IndexError, snap, mgr.append, [a, c], [1, 1], [5, 5], match=r"seq_ids\[1\]")
    raises_unchanged(IndexError, snap, mgr.append, [a, 99], [1, 1], [5, 5], match="seq_ids")
    raises_unchanged(ValueError, snap, mgr.append, [a, 2**31], [1, 1], [5, 5], match="seq_ids")
    raises_unchanged(ValueError, snap, mgr.append, [a, b], [1], [5], match="n_tokens")
    raises_unchanged(ValueError, snap, mgr.append, [a, b], [2, -1], [5], match="n_tokens")
    raises_unchanged(ValueError, snap, mgr.append, [a, b], [1, 1], [5], match="token_ids")
    raises_unchanged(ValueError, snap, mgr.append, [a, b], [1, 1], [5, 5, 5], match="token_ids")
    raises_unchanged(ValueError, snap, mgr.append, [a, b], [1, 1], [5, -5], match="token_ids")
    raises_unchanged(ValueError, snap, mgr.append, [a, b], [1.0, 1.0], [5, 5], match="n_tokens")
    raises_unchanged(kv.KVCacheFull, snap, mgr.append, [a, b], [4, 4], [5] * 8)
    # an array argument that is not numeric at all is rejected before any id is checked
    raises_unchanged(ValueError, snap, mgr.append, [c], ["x"], [5], match="n_tokens")
    raises_unchanged(ValueError, snap, mgr.append, [c], [1], [2**70], match="token_ids")
    # free / block_table / seq_len / evict / refcounts
    raises_unchanged(ValueError, snap, mgr.free, [a, b, a], match=r"seq_ids\[2\]")
    raises_unchanged(IndexError, snap, mgr.free, [a, c], match=r"seq_ids\[1\]")
    raises_unchanged(IndexError, snap, mgr.block_table, [b, c], match="seq_ids")
    raises_unchanged(IndexError, snap, mgr.seq_len, [c], match="seq_ids")
    raises_unchanged(ValueError, snap, mgr.seq_len, np.array([0.5]), match="seq_ids")
    raises_unchanged(ValueError, snap, mgr.evict, -1, match="n")
    raises_unchanged(IndexError, snap, mgr.refcounts, [6], match="block_ids")


def test_kvcachefull_is_a_runtime_error(kv):
    assert issubclass(kv.KVCacheFull, RuntimeError)
    assert kv.KVCacheFull.__name__ == "KVCacheFull"


def test_manager_full_prompt_round_trip_through_memory(kv):
    """The slots written and the block tables agree: reading a sequence's tokens back from a
    simulated pool (copies applied first) gives exactly the tokens appended to it."""
    bs, nb = 3, 16
    mgr = kv.KVCacheManager(nb, bs)
    memory = np.full(nb * bs, -1, dtype=np.int64)
    expected = {}

    def append(ids, chunks):
        flat = [t for chunk in chunks for t in chunk]
        slots, src, dst = mgr.append(ids, [len(c) for c in chunks], flat)
        for s, d in zip(src.tolist(), dst.tolist()):
            memory[d * bs : (d + 1) * bs] = memory[s * bs : (s + 1) * bs]
        memory[slots] = flat
        for i, chunk in zip(ids, chunks):
            expected[i] = expected[i] + list(chunk)

    def check():
        ids = sorted(expected)
        table, lengths = mgr.block_table(ids)
        for row, i in enumerate(ids):
            got = [memory[table[row, t // bs] * bs + t % bs] for t in range(lengths[row])]
            assert got == expected[i], f"sequence {i}"

    prompt = [1, 2, 3, 4, 5, 6, 7]
    a, cached = mgr.new_sequence(prompt)
    expected[a] = prompt[:cached]
    append([a], [prompt[cached:]])
    kids = [int(k) for k in mgr.fork(a, 3)]
    for k in kids:
        expected[k] = list(expected[a])
    append(kids + [a], [[8], [9, 9, 9, 9], [], [10, 11]])
    b, cached = mgr.new_sequence(prompt + [8, 0])
    assert cached == 6
    expected[b] = (prompt + [8, 0])[:cached]
    append([b], [[7, 8, 0]])
    check()
    mgr.free([kids[1]])
    del expected[kids[1]]
    append([kids[0], b], [[1] * 5, [2] * 4])
    check()
