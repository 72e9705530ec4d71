// The prefix index of the paged KV cache: a radix tree at block granularity.
//
// Each node is one FULL block of block_size token ids, named by the id of the KV block that
// holds it; its parent is the node of the preceding block (the root's children are first
// blocks). Tokens are compared exactly; a hash of (parent, tokens) only finds candidates.
//
// LRU: a logical clock (int64, +1 per match / insert call, never wall time) stamps every node
// a call walks. Eviction removes least-recently-used LEAVES with lock count 0 (ties: lower
// block id), repeatedly, so a removed leaf can expose its parent; the evictable leaves are kept
// in an ordered set, so evicting costs O(log n), never a scan.
//
// Speed (the per-request path is match + insert of ~30-40 blocks): the children of all nodes
// live in one open-addressing hash table keyed by hash(parent slot, tokens); the hash reads
// the tokens as 64-bit words with independent multiplies; int32 token arrays are read in place
// (never copied); and the last walked root path is kept (walk_) so that the next walk (insert
// after match, or the next request sharing the prefix) only compares tokens along it instead of
// hashing and probing again.
//
// Lock counts are per node (KVCacheManager locks every node a sequence holds, i.e. whole root
// paths). A node is "evictable" when its whole subtree has lock count 0; the count of such
// nodes is kept incrementally: each node counts its children whose subtree holds a lock.
//
// Semantics are defined by python/ponder/twins/kv.py (PrefixIndex); errors:
//   std::invalid_argument -> ValueError, std::overflow_error -> OverflowError.
// Every entry point validates all of its inputs before it mutates anything.
#pragma once

#include <cstdint>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/num_view.h"

namespace ponder::kv {

class PrefixIndex {
 public:
  // block_size in [1, 2^31 - 1]. dense_block_ids > 0 promises that every block id is in
  // [0, dense_block_ids) and maps ids to nodes with an array instead of a hash map
  // (KVCacheManager passes its num_blocks).
  explicit PrefixIndex(int64_t block_size, int64_t dense_block_ids = 0);

  struct Match {
    int64_t tokens = 0;           // matched tokens = blocks.size() * block_size
    std::vector<int32_t> blocks;  // block ids of the matched nodes, root first
  };

  // ---- the Python API
  // Walks the full blocks of `tokens` from the root; stamps the matched nodes with the clock.
  Match match(const NumView& tokens);
  // Inserts the full blocks of `tokens` (a trailing partial block is ignored) along the path;
  // len(block_ids) == len(tokens) / block_size. Existing nodes are kept (their given ids are
  // ignored); deeper new nodes hang below the existing ones. Returns the number of new nodes.
  int64_t insert(const NumView& tokens, const NumView& block_ids);
  void lock(const NumView& block_ids);
  void unlock(const NumView& block_ids);
  std::vector<int32_t> lock_counts(const NumView& block_ids) const;
  // Up to n evicted block ids, in eviction order.
  std::vector<int32_t> evict(int64_t n);
  bool contains(int64_t block_id) const;
  int64_t num_nodes() const { return num_nodes_; }
  int64_t num_evictable() const { return num_nodes_ - num_pinned_; }
  int32_t block_size() const { return bs_; }
  int64_t clock() const { return clock_; }

  // ---- unchecked primitives for KVCacheManager (the caller has validated everything;
  // parent_block -1 is the root)
  int64_t tick() { return ++clock_; }
  // The block ids of the nodes matching the first max_blocks full blocks of tokens (no stamp).
  std::vector<int32_t> find_path(const int32_t* tokens, int64_t max_blocks) const;
  // Stamps these nodes with the current clock.
  void touch(const std::vector<int32_t>& blocks);
  bool has_child(int32_t parent_block, const int32_t* tokens) const;
  // A new leaf stamped with the current clock, lock count 0.
  void add_child(int32_t parent_block, const int32_t* tokens, int32_t block);
  void add_lock(int32_t block, int32_t delta);
  int32_t lock_of(int32_t block) const;  // -1 when the block is not in the index
  int32_t evict_one();                   // -1 when nothing is evictable
  int64_t num_unlocked() const { return num_nodes_ - num_locked_; }  // nodes with lock count 0
  const int32_t* tokens_of(int32_t block) const;

  // Recomputes every derived structure from scratch; throws std::logic_error on a mismatch.
  void check_invariants() const;

 private:
  struct Node {
    int32_t block = -1;
    int32_t parent = -1;  // slot of the parent node; -1 for the root
    int32_t children = 0;
    int32_t lock = 0;
    int32_t locked_children = 0;  // children whose subtree holds a lock
    int64_t last_used = 0;
    uint64_t hash = 0;            // hash of (parent, tokens): the key in table_
  };
  // One bucket of the children table (open addressing, linear probing, no tombstones:
  // erase shifts the following entries back). The full hash is kept so that a probe rejects
  // other keys without touching their node.
  struct Bucket {
    uint64_t hash = 0;
    int32_t slot = -1;  // -1: empty
  };
  using LeafKey = std::pair<int64_t, int32_t>;  // (last_used, block)

  static bool pinned(const Node& n) { return n.lock > 0 || n.locked_children > 0; }
  static bool evictable_leaf(const Node& n) { return n.children == 0 && n.lock == 0; }
  uint64_t hash(int32_t parent_slot, const int32_t* tokens) const;
  int32_t find_child(int32_t parent_slot, const int32_t* tokens) const;  // slot or -1
  void table_insert(uint64_t h, int32_t slot);
  void table_erase(uint64_t h, int32_t slot);
  int32_t slot_of(int32_t block) const;                                  // slot or -1
  void map_block(int32_t block, int32_t slot);
  void unmap_block(int32_t block);
  void leaf_add(int64_t last_used, int32_t block);
  void leaf_remove(int64_t last_used, int32_t block);
  void touch_slot(int32_t slot);
  int32_t new_node(int32_t parent_slot, const int32_t* tokens, int32_t block);
  void remove_leaf(int32_t slot);
  void set_lock(int32_t slot, int32_t lock);
  // Sets walk_ to the slots of the nodes matching the first max_blocks full blocks of tokens.
  void walk(const int32_t* tokens, int64_t max_blocks);
  std::vector<int32_t> indexed_ids(const NumView& block_ids, std::vector<int32_t>* slots) const;

  int32_t bs_;
  bool dense_;
  std::vector<Node> nodes_;       // by slot; slots of removed nodes are reused
  std::vector<int32_t> tokens_;   // slot * bs_ .. : the node's tokens
  std::vector<int32_t> spare_slots_;
  std::vector<int32_t> dense_slot_;                  // block -> slot (dense mode)
  std::unordered_map<int32_t, int32_t> sparse_slot_;  // block -> slot (otherwise)
  std::vector<Bucket> table_;                        // hash(parent, tokens) -> slot; size 2^k
  std::set<LeafKey> leaves_;                         // evictable leaves, LRU first
  std::set<LeafKey>::node_type spare_leaf_;          // a freed set node, reused by leaf_add
  // The last walked path: slots of a chain from the root (walk_[i + 1] is a child of
  // walk_[i]). Adding nodes keeps such a chain valid; removing one may break it, so it is
  // trusted only while walk_removals_ == removals_.
  std::vector<int32_t> walk_;
  uint64_t removals_ = 0;
  uint64_t walk_removals_ = 0;
  std::vector<int32_t> token_buf_, id_buf_;  // converted inputs that are not int32 arrays
  int64_t clock_ = 0;
  int64_t num_nodes_ = 0;
  int64_t num_pinned_ = 0;  // nodes whose subtree holds a lock
  int64_t num_locked_ = 0;  // nodes with lock > 0
};

}  // namespace ponder::kv
