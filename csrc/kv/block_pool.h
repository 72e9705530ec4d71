// The block pool of the paged KV cache: reference counts and a LIFO free list of fixed-size
// blocks (block_size tokens each). Only metadata lives here; the K/V tensors are the caller's.
//
// Semantics are defined by the pure-Python twin, python/ponder/twins/kv.py; this class
// returns bit-identical results and throws the same error kinds:
//   std::invalid_argument -> ValueError, std::out_of_range -> IndexError,
//   std::overflow_error -> OverflowError, KVCacheFull -> ponder._core.KVCacheFull (a RuntimeError).
// Every entry point validates all of its inputs before it mutates anything, so a call that
// throws leaves the pool unchanged.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/num_view.h"

namespace ponder::kv {

// Not enough free (or evictable) blocks for a request. Bound as ponder._core.KVCacheFull,
// a subclass of RuntimeError.
class KVCacheFull : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

// `name[i] = v` for error messages.
inline std::string at(const char* name, size_t i, int64_t v) {
  return std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(v);
}

// Each distinct value of `ids` with its number of occurrences, plus the index of its first
// occurrence; ordered by first occurrence. O(n log n).
struct Count {
  int32_t value;
  int64_t count;
  size_t first;
};
std::vector<Count> count_repeats(const std::vector<int32_t>& ids);

}  // namespace detail

class BlockPool {
 public:
  // num_blocks in [1, 2^31 - 1], block_size in [1, 2^31 - 1] (std::invalid_argument otherwise).
  BlockPool(int64_t num_blocks, int64_t block_size);

  // n fresh blocks (reference count 1 each), in the order they leave the free list. Blocks
  // are handed out LIFO; a new pool hands out 0, 1, 2, ... Throws KVCacheFull when
  // n > num_free().
  std::vector<int32_t> allocate(int64_t n);
  // +1 per occurrence. A free block cannot be incref'd (std::invalid_argument).
  void incref(const NumView& block_ids);
  // -1 per occurrence (repeats count); a block reaching 0 is pushed onto the free list, in
  // input order. Dropping any block below 0 is std::invalid_argument (whole batch checked first).
  void decref(const NumView& block_ids);
  std::vector<int32_t> refcounts(const NumView& block_ids) const;

  int32_t num_blocks() const { return static_cast<int32_t>(refs_.size()); }
  int32_t block_size() const { return block_size_; }
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }

  // ---- unchecked primitives for KVCacheManager (the caller has validated everything)
  int32_t refcount(int32_t block) const { return refs_[static_cast<size_t>(block)]; }
  int32_t pop_free() {  // requires num_free() > 0; the block gets reference count 1
    const int32_t b = free_.back();
    free_.pop_back();
    refs_[static_cast<size_t>(b)] = 1;
    return b;
  }
  void inc(int32_t block, int32_t by = 1) { refs_[static_cast<size_t>(block)] += by; }
  // Returns true when the block became free.
  bool dec(int32_t block) {
    if (--refs_[static_cast<size_t>(block)] != 0) return false;
    free_.push_back(block);
    return true;
  }
  // Parses block ids: outside int32 -> std::invalid_argument, outside [0, num_blocks) ->
  // std::out_of_range, both naming `name[i]`.
  std::vector<int32_t> parse_ids(const NumView& block_ids, const char* name) const;
  // The free list, bottom of the stack first (the next block handed out is the last one).
  const std::vector<int32_t>& free_list() const { return free_; }

 private:
  int32_t block_size_;
  std::vector<int32_t> refs_;
  std::vector<int32_t> free_;  // a stack: pop from the end
};

}  // namespace ponder::kv
