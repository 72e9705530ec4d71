// The KV-cache manager: the control plane of ponder's paged KV cache. It combines a BlockPool
// and a PrefixIndex and keeps sequences (block tables): new sequences reuse the longest cached
// prefix, fork shares blocks (O(blocks), never O(tokens)), append writes tokens with
// copy-on-write of a shared partial last block, full blocks enter the prefix index, and
// unused cached blocks are evicted LRU when the free list runs dry.
//
// Invariants (check_invariants() verifies them from scratch):
//   * pool refcount of a block = number of sequences holding it + 1 if it is in the index;
//   * index lock count of a node = number of sequences holding it;
//   * sequence s holds index nodes exactly at table positions [0, s.indexed), a root path, so
//     an index node with refcount 1 has an unused subtree;
//   * a sequence of length L holds ceil(L / block_size) distinct blocks.
// The manager stores the token ids of every block (int32 [num_blocks, block_size]) so full
// blocks can be inserted into the index without per-sequence token lists.
// LRU: the index clock ticks once per successful new_sequence / append call; new_sequence
// stamps the nodes it reuses, append stamps the nodes it inserts. A partial last block is
// copied on write only by an append that writes at least one token to that sequence.
//
// Semantics are defined by python/ponder/twins/kv.py (KVCacheManager); errors:
//   std::invalid_argument -> ValueError, std::out_of_range -> IndexError,
//   std::overflow_error -> OverflowError, KVCacheFull -> ponder._core.KVCacheFull.
// Every entry point validates all of its inputs (and the capacity) before it mutates
// anything, so a call that throws leaves the manager unchanged.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/num_view.h"
#include "kv/block_pool.h"
#include "kv/prefix_index.h"

namespace ponder::kv {

struct KVStats {
  int64_t tokens_requested = 0;   // sum of len(tokens) over new_sequence calls
  int64_t tokens_from_cache = 0;  // sum of their cached tokens
  int64_t tokens_appended = 0;
  int64_t blocks_total = 0, blocks_free = 0;
  int64_t blocks_in_use = 0;     // held by at least one sequence
  int64_t blocks_cached = 0;     // in the prefix index
  int64_t blocks_evictable = 0;  // index nodes whose whole subtree no sequence holds
  int64_t cow_copies = 0, evictions = 0;
};

class KVCacheManager {
 public:
  KVCacheManager(int64_t num_blocks, int64_t block_size);

  // A new sequence over the longest cached prefix of `tokens`, at most len(tokens) - 1 tokens
  // (whole blocks). Returns (sequence id, cached tokens); the sequence's length is the cached
  // token count and the caller appends the rest.
  std::pair<int32_t, int64_t> new_sequence(const NumView& tokens);
  // k new sequences sharing seq_id's block table (every block incref'd, the partial last one
  // included), same length. Returns their ids.
  std::vector<int32_t> fork(int64_t seq_id, int64_t k);

  struct Append {
    std::vector<int64_t> slots;               // block * block_size + offset, per token
    std::vector<int32_t> copy_src, copy_dst;  // copy-on-write block copies to perform first
  };
  Append append(const NumView& seq_ids, const NumView& n_tokens, const NumView& token_ids);

  struct Table {
    int64_t rows = 0, cols = 0;
    std::vector<int32_t> blocks;   // rows * cols, row-major, padded with -1
    std::vector<int64_t> lengths;  // rows
  };
  Table block_table(const NumView& seq_ids) const;
  void free(const NumView& seq_ids);
  std::vector<int64_t> seq_len(const NumView& seq_ids) const;
  // Evicts up to n unused cached blocks (LRU leaves first); returns them in eviction order.
  std::vector<int32_t> evict(int64_t n);
  std::vector<int32_t> refcounts(const NumView& block_ids) const { return pool_.refcounts(block_ids); }

  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }
  int32_t num_blocks() const { return pool_.num_blocks(); }
  int32_t block_size() const { return bs_; }
  KVStats stats() const;
  const BlockPool& pool() const { return pool_; }
  const PrefixIndex& index() const { return index_; }

  // Recomputes every invariant from scratch (O(everything)); throws std::logic_error.
  void check_invariants() const;

 private:
  struct Seq {
    std::vector<int32_t> blocks;
    int64_t len = 0;
    int32_t indexed = 0;  // blocks[0 .. indexed) are index nodes (locked by this sequence)
  };

  const Seq& live(int64_t seq_id, const char* name, size_t i, bool scalar) const;
  std::vector<int32_t> live_ids(const NumView& seq_ids, const char* name, bool unique) const;
  int32_t allocate_block();  // evicts when the free list is empty; the caller checked capacity
  int32_t* row(int32_t block) { return &tokens_[static_cast<size_t>(block) * static_cast<size_t>(bs_)]; }

  int32_t bs_;
  BlockPool pool_;
  PrefixIndex index_;
  std::vector<int32_t> tokens_;  // [num_blocks, block_size]
  std::unordered_map<int32_t, Seq> seqs_;
  int64_t next_seq_ = 0;
  KVStats counters_;  // only the cumulative fields are kept here
};

}  // namespace ponder::kv
