"""Pure-Python paged KV-cache control plane: the readable twins of ``ponder._core.BlockPool``,
``ponder._core.PrefixIndex`` and ``ponder._core.KVCacheManager``.

This module is the specification of the KV-cache bookkeeping. The C++ classes (``csrc/kv/``)
must return exactly what these classes return for every sequence of calls and raise the same
exception types for the same bad inputs; ``tests/test_kv_property.py`` holds them to that.
Only metadata lives here: which KV *block* (``block_size`` token slots of every layer's K/V
pool) holds which tokens. The K/V tensors belong to the caller (``ponder.hf.kv``).

Model
-----
* Blocks have ``int32`` ids ``0 .. num_blocks - 1``; token slot ``block * block_size + offset``
  (``int64``) is where the K/V of one token lives.
* ``BlockPool``: a reference count per block and a LIFO free list (a new pool hands out
  0, 1, 2, ...; a freed block is the next one handed out).
* ``PrefixIndex``: a radix tree at block granularity. A node is one FULL block of token ids,
  named by its block id; its parent is the node of the preceding block. Tokens are compared
  exactly. A logical clock (+1 per ``match``/``insert`` call, never wall time) stamps the nodes
  a call walks; eviction removes least-recently-used leaves whose lock count is 0 (ties: the
  lower block id), repeatedly, so that removing a leaf can expose its parent.
* ``KVCacheManager``: sequences (block tables) over one pool and one index. The reference
  count of a block = the sequences holding it + 1 if it is in the index; the lock count of an
  index node = the sequences holding it. A sequence holds index nodes exactly at table
  positions ``0 .. indexed - 1`` (a path from the root), so an index node with reference
  count 1 has an unused subtree: it is *evictable*. The index clock ticks once per
  successful ``new_sequence`` and ``append`` call: new_sequence stamps the nodes it reuses,
  and the nodes an append inserts carry that call's stamp (eviction ties go to the lower
  block id). Evictions happen only inside ``append`` (when the free list is empty) and
  ``evict``.

Rules every implementation follows
----------------------------------
* Arguments are checked in the order of the parameter list; an id that does not name a live
  object raises ``IndexError`` (block ids of a pool, sequence ids), every other bad argument
  ``ValueError`` naming it (wrong dtype or shape, negative token, duplicate where ids must be
  unique, a block id not in the index, a count that would drop below zero), exhausted int32
  id or count space ``OverflowError``, and too few free + evictable blocks ``KVCacheFull`` (a
  ``RuntimeError``).
* A call that raises changes nothing (the clock included).
* Batched calls process their entries in input order; a block whose count reaches 0 is pushed
  onto the free list at that moment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .forest import INT32_MAX, check_unique, int_array

INT32_MIN = -(2**31)
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class KVCacheFull(RuntimeError):
    """Not enough free or evictable KV blocks for a request (the request changed nothing)."""


def _scalar(value, name: str, lo: int, hi: int) -> int:
    """A Python/numpy integer checked like a one-element array."""
    return int_array([value], name, lo, hi)[0]


def _check_numeric(values, name: str) -> None:
    """Rejects input that is not a numeric array at all (strings, objects, ints beyond 64 bits).

    The compiled core's bindings read every array argument before checking any of them, so a
    call checks this for all its array arguments first."""
    a = np.asarray(values)
    if a.size and a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a numeric array, got dtype {a.dtype}")


def _count(values: list[int]) -> dict[int, tuple[int, int]]:
    """value -> (occurrences, index of the first occurrence), in order of first occurrence."""
    out: dict[int, tuple[int, int]] = {}
    for i, v in enumerate(values):
        n, first = out.get(v, (0, i))
        out[v] = (n + 1, first)
    return out


def _blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


# ----------------------------------------------------------------------------- the block pool


class BlockPool:
    """Reference counts and a LIFO free list of ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(self, num_blocks, block_size) -> None:
        n = _scalar(num_blocks, "num_blocks", 1, INT32_MAX)
        self._block_size = _scalar(block_size, "block_size", 1, INT32_MAX)
        self._refs = [0] * n
        self._free = list(range(n - 1, -1, -1))  # a stack: block 0 is handed out first

    @property
    def num_blocks(self) -> int:
        return len(self._refs)

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    # ---- unchecked primitives (KVCacheManager validates first)
    def _pop(self) -> int:
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def _dec(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def _ids(self, block_ids, name: str) -> list[int]:
        ids = int_array(block_ids, name, INT32_MIN, INT32_MAX)
        for i, b in enumerate(ids):
            if not 0 <= b < len(self._refs):
                raise IndexError(f"{name}[{i}] = {b} is not a block id (this pool has {len(self._refs)} blocks)")
        return ids

    # ---- the API
    def allocate(self, n) -> np.ndarray:
        """int32 [n]: n blocks off the free list, reference count 1 each.

        Raises KVCacheFull (changing nothing) when n > num_free.
        """
        count = _scalar(n, "n", 0, INT32_MAX)
        if count > len(self._free):
            raise KVCacheFull(f"cannot allocate {count} blocks: only {len(self._free)} of {len(self._refs)} are free")
        return np.array([self._pop() for _ in range(count)], dtype=np.int32)

    def incref(self, block_ids) -> None:
        """+1 per occurrence; block_ids: int [n], allocated (not free) blocks."""
        ids = self._ids(block_ids, "block_ids")
        for i, b in enumerate(ids):
            if self._refs[b] == 0:
                raise ValueError(f"block_ids[{i}] = {b} is free; allocate it before incref")
        for b, (n, first) in _count(ids).items():
            if self._refs[b] + n > INT32_MAX:
                raise OverflowError(f"block_ids[{first}] = {b}: the reference count would exceed 2^31 - 1")
        for b in ids:
            self._refs[b] += 1

    def decref(self, block_ids) -> None:
        """-1 per occurrence, in order; a block reaching 0 goes back on the free list.

        The whole batch is checked first: no block may drop below 0 (repeats count).
        """
        ids = self._ids(block_ids, "block_ids")
        for i, b in enumerate(ids):
            if self._refs[b] == 0:
                raise ValueError(f"block_ids[{i}] = {b} is free; cannot decref it")
        for b, (n, first) in _count(ids).items():
            if n > self._refs[b]:
                raise ValueError(
                    f"block_ids[{first}] = {b} appears {n} times but its reference count is {self._refs[b]}"
                )
        for b in ids:
            self._dec(b)

    def refcounts(self, block_ids) -> np.ndarray:
        """int32 [n]: the reference count of each block."""
        return np.array([self._refs[b] for b in self._ids(block_ids, "block_ids")], dtype=np.int32)


# ----------------------------------------------------------------------------- the prefix index


@dataclass(eq=False)
class _Node:
    block: int  # -1 for the root
    tokens: tuple[int, ...]
    parent: _Node | None
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)  # exact token keys
    lock: int = 0
    last_used: int = 0


class PrefixIndex:
    """A radix tree of full blocks of ``block_size`` tokens, named by block id (see the module)."""

    def __init__(self, block_size) -> None:
        self._bs = _scalar(block_size, "block_size", 1, INT32_MAX)
        self._root = _Node(-1, (), None)
        self._nodes: dict[int, _Node] = {}  # block id -> node
        self._clock = 0

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def num_nodes(self) -> int:
        return len(self._nodes)

    @property
    def num_evictable(self) -> int:
        """Nodes whose whole subtree has lock count 0 (all of them can be evicted, leaves first)."""
        pinned: set[int] = set()  # locked nodes and their ancestors
        for node in self._nodes.values():
            if node.lock > 0:
                while node is not self._root and node.block not in pinned:
                    pinned.add(node.block)
                    node = node.parent
        return len(self._nodes) - len(pinned)

    # ---- unchecked primitives (KVCacheManager validates first); parent_block -1 is the root
    def _tick(self) -> None:
        self._clock += 1

    def _key(self, tokens: list[int], i: int) -> tuple[int, ...]:
        return tuple(tokens[i * self._bs : (i + 1) * self._bs])

    def _find_path(self, tokens: list[int], max_blocks: int) -> list[int]:
        """Block ids of the nodes matching the first max_blocks full blocks of tokens."""
        out, node = [], self._root
        for i in range(max_blocks):
            node = node.children.get(self._key(tokens, i))
            if node is None:
                break
            out.append(node.block)
        return out

    def _touch(self, blocks: list[int]) -> None:
        for b in blocks:
            self._nodes[b].last_used = self._clock

    def _parent(self, parent_block: int) -> _Node:
        return self._root if parent_block < 0 else self._nodes[parent_block]

    def _has_child(self, parent_block: int, tokens: tuple[int, ...]) -> bool:
        return tokens in self._parent(parent_block).children

    def _add_child(self, parent_block: int, tokens: tuple[int, ...], block: int) -> None:
        parent = self._parent(parent_block)
        node = _Node(block, tokens, parent, last_used=self._clock)
        parent.children[tokens] = node
        self._nodes[block] = node

    def _lock_of(self, block: int) -> int:
        node = self._nodes.get(block)
        return -1 if node is None else node.lock

    def _evict_one(self) -> int:
        """Removes the LRU leaf with lock count 0 (ties: lower block id); -1 when there is none."""
        leaves = [n for n in self._nodes.values() if not n.children and n.lock == 0]
        if not leaves:
            return -1
        victim = min(leaves, key=lambda n: (n.last_used, n.block))
        del victim.parent.children[victim.tokens]
        del self._nodes[victim.block]
        return victim.block

    def _num_unlocked(self) -> int:
        return sum(1 for n in self._nodes.values() if n.lock == 0)

    def _indexed_ids(self, block_ids) -> list[int]:
        ids = int_array(block_ids, "block_ids", INT32_MIN, INT32_MAX)
        for i, b in enumerate(ids):
            if b not in self._nodes:
                raise ValueError(f"block_ids[{i}] = {b} is not in the prefix index")
        return ids

    # ---- the API
    def match(self, tokens) -> tuple[int, np.ndarray]:
        """(matched tokens, int32 [k] block ids): the longest run of full blocks of ``tokens``
        found from the root (matched tokens = k * block_size). Stamps the matched nodes as
        used now. tokens: int [n], each in [0, 2^31 - 1]."""
        toks = int_array(tokens, "tokens", 0, INT32_MAX)
        self._tick()
        blocks = self._find_path(toks, len(toks) // self._bs)
        self._touch(blocks)
        return len(blocks) * self._bs, np.array(blocks, dtype=np.int32)

    def insert(self, tokens, block_ids) -> int:
        """Insert the full blocks of ``tokens`` (a trailing partial block is ignored) as a path.

        block_ids: int [len(tokens) // block_size], the block holding each full block. Where a
        node for a block already exists it is kept (its given id is ignored) and the deeper
        new nodes hang below the existing node. New block ids must not be in the index yet and
        must be distinct. Stamps the whole path as used now. Returns the number of new nodes.
        """
        toks = int_array(tokens, "tokens", 0, INT32_MAX)
        ids = int_array(block_ids, "block_ids", 0, INT32_MAX)
        nb = len(toks) // self._bs
        if len(ids) != nb:
            raise ValueError(f"block_ids must have length len(tokens) // block_size = {nb}, got {len(ids)}")
        path = self._find_path(toks, nb)
        first_new = len(path)
        for i in range(first_new, nb):
            if ids[i] in self._nodes:
                raise ValueError(f"block_ids[{i}] = {ids[i]} is already in the prefix index")
        for b, (n, first) in _count(ids[first_new:]).items():
            if n > 1:
                raise ValueError(f"block_ids[{first_new + first}] = {b} appears more than once among the new blocks")
        self._tick()
        self._touch(path)
        parent = path[-1] if path else -1
        for i in range(first_new, nb):
            self._add_child(parent, self._key(toks, i), ids[i])
            parent = ids[i]
        return nb - first_new

    def lock(self, block_ids) -> None:
        """Lock count +1 per occurrence; block_ids: int [n], all in the index."""
        ids = self._indexed_ids(block_ids)
        for b, (n, first) in _count(ids).items():
            if self._nodes[b].lock + n > INT32_MAX:
                raise OverflowError(f"block_ids[{first}] = {b}: the lock count would exceed 2^31 - 1")
        for b in ids:
            self._nodes[b].lock += 1

    def unlock(self, block_ids) -> None:
        """Lock count -1 per occurrence; no lock count may drop below 0 (repeats count)."""
        ids = self._indexed_ids(block_ids)
        for b, (n, first) in _count(ids).items():
            if n > self._nodes[b].lock:
                raise ValueError(
                    f"block_ids[{first}] = {b} is unlocked {n} times but its lock count is {self._nodes[b].lock}"
                )
        for b in ids:
            self._nodes[b].lock -= 1

    def lock_counts(self, block_ids) -> np.ndarray:
        """int32 [n]: the lock count of each node (block ids in the index)."""
        return np.array([self._nodes[b].lock for b in self._indexed_ids(block_ids)], dtype=np.int32)

    def evict(self, n) -> np.ndarray:
        """int32 [<= n]: remove up to n LRU leaves with lock count 0, in eviction order."""
        count = _scalar(n, "n", 0, INT64_MAX)
        out = []
        while len(out) < count:
            block = self._evict_one()
            if block < 0:
                break
            out.append(block)
        return np.array(out, dtype=np.int32)

    def contains(self, block_id) -> bool:
        return _scalar(block_id, "block_id", INT64_MIN, INT64_MAX) in self._nodes


# ----------------------------------------------------------------------------- the manager


@dataclass
class _Sequence:
    blocks: list[int]
    length: int
    indexed: int  # blocks[:indexed] are index nodes (locked by this sequence)


STATS_KEYS = (
    "tokens_requested",
    "tokens_from_cache",
    "tokens_appended",
    "blocks_total",
    "blocks_free",
    "blocks_in_use",
    "blocks_cached",
    "blocks_evictable",
    "cow_copies",
    "evictions",
)


class KVCacheManager:
    """Sequences over one block pool and one prefix index (see the module docstring)."""

    def __init__(self, num_blocks, block_size) -> None:
        self._pool = BlockPool(num_blocks, block_size)
        self._bs = self._pool.block_size
        self._index = PrefixIndex(self._bs)
        # The token ids in every block, so that full blocks can be indexed without
        # per-sequence token lists (fork stays O(blocks)).
        self._tokens = np.zeros((self._pool.num_blocks, self._bs), dtype=np.int32)
        self._seqs: dict[int, _Sequence] = {}
        self._next_seq = 0
        self._counters = dict.fromkeys(
            ("tokens_requested", "tokens_from_cache", "tokens_appended", "cow_copies", "evictions"), 0
        )

    @property
    def num_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    # ---- helpers
    def _live_ids(self, seq_ids, name: str, unique: bool) -> list[int]:
        ids = int_array(seq_ids, name, INT32_MIN, INT32_MAX)
        for i, s in enumerate(ids):
            if s not in self._seqs:
                raise IndexError(f"{name}[{i}] = {s} is not a live sequence id")
        if unique:
            check_unique(ids, name)
        return ids

    def _row(self, block: int) -> tuple[int, ...]:
        return tuple(self._tokens[block].tolist())

    def _allocate_block(self) -> int:
        """A free block; when none is free, the LRU evictable index leaf is evicted first."""
        if self._pool.num_free == 0:
            self._pool._dec(self._index._evict_one())  # its only reference was the index's
            self._counters["evictions"] += 1
        return self._pool._pop()

    # ---- sequences
    def new_sequence(self, tokens) -> tuple[int, int]:
        """(seq_id, cached_tokens): a new sequence over the longest cached prefix of ``tokens``.

        tokens: int [n] (each in [0, 2^31 - 1]). At most n - 1 tokens come from the cache, in
        whole blocks (floor((n - 1) / block_size) at most): the caller computes at least the last
        token. The sequence holds those blocks and has length cached_tokens; append the rest
        (tokens[cached_tokens:]). Sequence ids increase from 0 and are never reused.
        """
        toks = int_array(tokens, "tokens", 0, INT32_MAX)
        if self._next_seq > INT32_MAX:
            raise OverflowError("this manager has given out every int32 sequence id; make a new KVCacheManager")
        max_blocks = max(0, (len(toks) - 1) // self._bs)
        blocks = self._index._find_path(toks, max_blocks)
        for b in blocks:
            if self._pool._refs[b] >= INT32_MAX:
                raise OverflowError("a cached block of tokens would be referenced more than 2^31 - 1 times")
        self._index._tick()
        self._index._touch(blocks)
        for b in blocks:
            self._index._nodes[b].lock += 1
            self._pool._refs[b] += 1
        seq_id = self._next_seq
        self._next_seq += 1
        self._seqs[seq_id] = _Sequence(list(blocks), len(blocks) * self._bs, len(blocks))
        self._counters["tokens_requested"] += len(toks)
        self._counters["tokens_from_cache"] += len(blocks) * self._bs
        return seq_id, len(blocks) * self._bs

    def fork(self, seq_id, k) -> np.ndarray:
        """int32 [k]: k new sequences sharing seq_id's blocks (all of them incref'd, a partial
        last block included: it is copied on the first write), with the same length."""
        sid = _scalar(seq_id, "seq_id", INT64_MIN, INT64_MAX)
        count = _scalar(k, "k", 0, INT32_MAX)
        if sid not in self._seqs:
            raise IndexError(f"seq_id = {sid} is not a live sequence id")
        parent = self._seqs[sid]
        if self._next_seq + count > INT32_MAX + 1:
            raise OverflowError("fork would exceed the int32 sequence ids; make a new KVCacheManager")
        for b in parent.blocks:
            if self._pool._refs[b] + count > INT32_MAX:
                raise OverflowError("fork would reference a block more than 2^31 - 1 times")
        out = []
        for _ in range(count):
            out.append(self._next_seq)
            self._seqs[self._next_seq] = _Sequence(list(parent.blocks), parent.length, parent.indexed)
            self._next_seq += 1
        if count:
            for b in parent.blocks:
                self._pool._refs[b] += count
            for b in parent.blocks[: parent.indexed]:
                self._index._nodes[b].lock += count
        return np.array(out, dtype=np.int32)

    def append(self, seq_ids, n_tokens, token_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Write n_tokens[i] tokens to sequence seq_ids[i], in order.

        seq_ids: int [B], live and unique; n_tokens: int [B] (>= 0); token_ids: int
        [sum(n_tokens)] (each in [0, 2^31 - 1]), the tokens of seq_ids[0] first.
        Returns (slot_mapping int64 [sum(n_tokens)], copy_src int32 [m], copy_dst int32 [m]):
        the slot of every token, and the block copies (src -> dst) to perform before writing.

        Per sequence with n > 0: a partial last block shared with another holder is first
        copied to a new block (copy-on-write). Then tokens fill the partial block and new
        blocks. A block that becomes full joins the prefix index when every earlier block of
        the sequence is an index node and no node with its tokens exists under its parent;
        otherwise it stays private, and so do the sequence's later blocks. When the free list
        is empty, the LRU evictable index leaf is evicted. Raises KVCacheFull, changing nothing,
        when the call needs more blocks than are free plus evictable.
        """
        for values, name in ((seq_ids, "seq_ids"), (n_tokens, "n_tokens"), (token_ids, "token_ids")):
            _check_numeric(values, name)
        ids = self._live_ids(seq_ids, "seq_ids", unique=True)
        ns = int_array(n_tokens, "n_tokens", 0, INT32_MAX)
        if len(ns) != len(ids):
            raise ValueError(f"n_tokens must have length len(seq_ids) = {len(ids)}, got {len(ns)}")
        toks = int_array(token_ids, "token_ids", 0, INT32_MAX)
        total = sum(ns)
        if len(toks) != total:
            raise ValueError(f"token_ids must have length sum(n_tokens) = {total}, got {len(toks)}")

        # Capacity first, simulating the copies: a copy made for an earlier sequence of this
        # call leaves one holder fewer on the shared block for later ones.
        need, copied = 0, {}
        for sid, n in zip(ids, ns):
            s = self._seqs[sid]
            if n == 0:
                continue
            if s.length % self._bs:
                last = s.blocks[-1]
                if self._pool._refs[last] - copied.get(last, 0) > 1:
                    need += 1
                    copied[last] = copied.get(last, 0) + 1
            need += _blocks_for(s.length + n, self._bs) - _blocks_for(s.length, self._bs)
        evictable = self._index.num_evictable
        if need > self._pool.num_free + evictable:
            raise KVCacheFull(
                f"append needs {need} new blocks but only {self._pool.num_free} are free and "
                f"{evictable} cached blocks are evictable"
            )

        self._index._tick()
        slots, src, dst = [], [], []
        pos = 0
        for sid, n in zip(ids, ns):
            s = self._seqs[sid]
            if n == 0:
                continue
            if s.length % self._bs and self._pool._refs[s.blocks[-1]] > 1:  # copy-on-write
                old = s.blocks[-1]
                new = self._allocate_block()
                self._tokens[new] = self._tokens[old]
                src.append(old)
                dst.append(new)
                self._pool._dec(old)
                s.blocks[-1] = new
                self._counters["cow_copies"] += 1
            for token in toks[pos : pos + n]:
                offset = s.length % self._bs
                if offset == 0:
                    s.blocks.append(self._allocate_block())
                block = s.blocks[-1]
                self._tokens[block, offset] = token
                slots.append(block * self._bs + offset)
                s.length += 1
                if offset + 1 == self._bs and len(s.blocks) - 1 == s.indexed:
                    parent = s.blocks[-2] if len(s.blocks) > 1 else -1
                    key = self._row(block)
                    if not self._index._has_child(parent, key):
                        self._index._add_child(parent, key, block)
                        self._index._nodes[block].lock += 1
                        self._pool._refs[block] += 1
                        s.indexed += 1
            pos += n
        self._counters["tokens_appended"] += total
        return (
            np.array(slots, dtype=np.int64),
            np.array(src, dtype=np.int32),
            np.array(dst, dtype=np.int32),
        )

    def block_table(self, seq_ids) -> tuple[np.ndarray, np.ndarray]:
        """(int32 [B, max_blocks] padded with -1, lengths int64 [B]); seq_ids: int [B], live
        (repeats allowed). max_blocks = max over the batch of ceil(length / block_size)."""
        ids = self._live_ids(seq_ids, "seq_ids", unique=False)
        width = max((len(self._seqs[s].blocks) for s in ids), default=0)
        table = np.full((len(ids), width), -1, dtype=np.int32)
        for row, s in enumerate(ids):
            blocks = self._seqs[s].blocks
            table[row, : len(blocks)] = blocks
        return table, np.array([self._seqs[s].length for s in ids], dtype=np.int64)

    def free(self, seq_ids) -> None:
        """Drop the sequences (live, unique) and their references, in order, each table first
        block first. Index nodes stay cached (evictable once no sequence holds them)."""
        ids = self._live_ids(seq_ids, "seq_ids", unique=True)
        for sid in ids:
            s = self._seqs.pop(sid)
            for b in s.blocks[: s.indexed]:
                self._index._nodes[b].lock -= 1
            for b in s.blocks:
                self._pool._dec(b)

    def seq_len(self, seq_ids) -> np.ndarray:
        """int64 [n]: the length (tokens) of each live sequence (repeats allowed)."""
        return np.array(
            [self._seqs[s].length for s in self._live_ids(seq_ids, "seq_ids", unique=False)], dtype=np.int64
        )

    def evict(self, n) -> np.ndarray:
        """int32 [<= n]: evict up to n unused cached blocks (LRU leaves first) to the free list."""
        count = _scalar(n, "n", 0, INT64_MAX)
        out = []
        while len(out) < count:
            block = self._index._evict_one()
            if block < 0:
                break
            self._pool._dec(block)
            self._counters["evictions"] += 1
            out.append(block)
        return np.array(out, dtype=np.int32)

    def refcounts(self, block_ids) -> np.ndarray:
        """int32 [n]: pool reference counts (holders + 1 if cached)."""
        return self._pool.refcounts(block_ids)

    def stats(self) -> dict[str, int]:
        total, free = self._pool.num_blocks, self._pool.num_free
        values = dict(self._counters)
        values.update(
            blocks_total=total,
            blocks_free=free,
            # allocated blocks are held by a sequence unless they are unlocked index nodes
            blocks_in_use=total - free - self._index._num_unlocked(),
            blocks_cached=self._index.num_nodes,
            blocks_evictable=self._index.num_evictable,
        )
        return {key: values[key] for key in STATS_KEYS}
