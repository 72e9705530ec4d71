// The block pool. See block_pool.h; the semantics are python/ponder/twins/kv.py.
#include "kv/block_pool.h"

#include <algorithm>
#include <limits>

namespace ponder::kv {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
constexpr int64_t kInt32Min = std::numeric_limits<int32_t>::min();

}  // namespace

namespace detail {

std::vector<Count> count_repeats(const std::vector<int32_t>& ids) {
  std::vector<std::pair<int32_t, size_t>> sorted(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) sorted[i] = {ids[i], i};
  std::sort(sorted.begin(), sorted.end());
  std::vector<Count> out;
  for (size_t i = 0; i < sorted.size();) {
    size_t j = i;
    while (j < sorted.size() && sorted[j].first == sorted[i].first) ++j;
    out.push_back({sorted[i].first, static_cast<int64_t>(j - i), sorted[i].second});
    i = j;
  }
  std::sort(out.begin(), out.end(), [](const Count& a, const Count& b) { return a.first < b.first; });
  return out;
}

}  // namespace detail

BlockPool::BlockPool(int64_t num_blocks, int64_t block_size) {
  if (num_blocks < 1 || num_blocks > kInt32Max)
    throw std::invalid_argument("num_blocks = " + std::to_string(num_blocks) + " is out of range [1, " +
                                std::to_string(kInt32Max) + "]");
  if (block_size < 1 || block_size > kInt32Max)
    throw std::invalid_argument("block_size = " + std::to_string(block_size) + " is out of range [1, " +
                                std::to_string(kInt32Max) + "]");
  block_size_ = static_cast<int32_t>(block_size);
  refs_.assign(static_cast<size_t>(num_blocks), 0);
  free_.resize(static_cast<size_t>(num_blocks));
  for (int64_t i = 0; i < num_blocks; ++i) free_[static_cast<size_t>(i)] = static_cast<int32_t>(num_blocks - 1 - i);
}

std::vector<int32_t> BlockPool::parse_ids(const NumView& block_ids, const char* name) const {
  std::vector<int32_t> ids = to_ints_as<int32_t>(block_ids, name, kInt32Min, kInt32Max);
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= num_blocks())
      throw std::out_of_range(detail::at(name, i, ids[i]) + " is not a block id (this pool has " +
                              std::to_string(num_blocks()) + " blocks)");
  return ids;
}

std::vector<int32_t> BlockPool::allocate(int64_t n) {
  if (n < 0 || n > kInt32Max)
    throw std::invalid_argument("n = " + std::to_string(n) + " is out of range [0, " + std::to_string(kInt32Max) + "]");
  if (n > num_free())
    throw KVCacheFull("cannot allocate " + std::to_string(n) + " blocks: only " + std::to_string(num_free()) +
                      " of " + std::to_string(num_blocks()) + " are free");
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (auto& b : out) b = pop_free();
  return out;
}

void BlockPool::incref(const NumView& block_ids) {
  const std::vector<int32_t> ids = parse_ids(block_ids, "block_ids");
  for (size_t i = 0; i < ids.size(); ++i)
    if (refcount(ids[i]) == 0)
      throw std::invalid_argument(detail::at("block_ids", i, ids[i]) + " is free; allocate it before incref");
  for (const detail::Count& c : detail::count_repeats(ids))
    if (refcount(c.value) + c.count > kInt32Max)
      throw std::overflow_error(detail::at("block_ids", c.first, c.value) +
                                ": the reference count would exceed 2^31 - 1");
  for (int32_t b : ids) inc(b);
}

void BlockPool::decref(const NumView& block_ids) {
  const std::vector<int32_t> ids = parse_ids(block_ids, "block_ids");
  for (size_t i = 0; i < ids.size(); ++i)
    if (refcount(ids[i]) == 0) throw std::invalid_argument(detail::at("block_ids", i, ids[i]) + " is free; cannot decref it");
  for (const detail::Count& c : detail::count_repeats(ids))
    if (c.count > refcount(c.value))
      throw std::invalid_argument(detail::at("block_ids", c.first, c.value) + " appears " + std::to_string(c.count) +
                                  " times but its reference count is " + std::to_string(refcount(c.value)));
  for (int32_t b : ids) dec(b);
}

std::vector<int32_t> BlockPool::refcounts(const NumView& block_ids) const {
  std::vector<int32_t> ids = parse_ids(block_ids, "block_ids");
  for (auto& b : ids) b = refcount(b);
  return ids;
}

}  // namespace ponder::kv
