// Tests of csrc/kernels/dispatch.h: the entry points validate, refuse CUDA tensors in a build
// without CUDA, check index values only when asked, and run the CPU kernel for CPU tensors.
#include <doctest/doctest.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/dispatch.h"

namespace kk = ponder::kernels;
using kk::DeviceType;
using kk::ScalarType;
using kk::TensorView;

namespace {

template <typename T>
TensorView view(std::vector<T>& v, ScalarType t, std::initializer_list<int64_t> shape) {
  return TensorView::contiguous(v.data(), t, shape);
}

}  // namespace

TEST_CASE("kv dispatch: write_kv runs the CPU kernel; index checks only when asked") {
  std::vector<float> kc(2 * 2 * 1 * 2, 0.f), vc(kc.size(), 0.f), kn = {1, 2, 3, 4}, vn = {5, 6, 7, 8};
  const TensorView K = view(kc, ScalarType::Float32, {2, 2, 1, 2}), V = view(vc, ScalarType::Float32, {2, 2, 1, 2});
  const TensorView KN = view(kn, ScalarType::Float32, {2, 1, 2}), VN = view(vn, ScalarType::Float32, {2, 1, 2});
  std::vector<int64_t> slots = {3, 0};
  kk::run_write_kv(K, V, KN, VN, view(slots, ScalarType::Int64, {2}), 0, true);
  CHECK(kc == std::vector<float>{3, 4, 0, 0, 0, 0, 1, 2});
  CHECK(vc == std::vector<float>{7, 8, 0, 0, 0, 0, 5, 6});

  std::vector<int64_t> dup = {1, 1};
  CHECK_THROWS_AS(kk::run_write_kv(K, V, KN, VN, view(dup, ScalarType::Int64, {2}), 0, true), std::invalid_argument);
  std::vector<int64_t> out_of_range = {4, -1};  // unchecked: the bad slot is skipped
  kk::run_write_kv(K, V, KN, VN, view(out_of_range, ScalarType::Int64, {2}), 0, false);
  CHECK(kc == std::vector<float>{3, 4, 0, 0, 0, 0, 1, 2});
  CHECK_THROWS_AS(kk::run_write_kv(K, V, KN, VN, view(out_of_range, ScalarType::Int64, {2}), 0, true),
                  std::invalid_argument);
  // metadata is validated even without index checks
  std::vector<int32_t> wrong(3, 0);
  CHECK_THROWS_AS(kk::run_write_kv(K, V, KN, VN, view(wrong, ScalarType::Int32, {3}), 0, false), std::invalid_argument);
}

TEST_CASE("kv dispatch: copy_blocks, gather_kv and decode on the CPU; index checks") {
  std::vector<float> kc = {1, 2, 3, 4}, vc = {5, 6, 7, 8};  // 4 blocks of 1 token, 1 head, dim 1
  std::vector<TensorView> ks = {view(kc, ScalarType::Float32, {4, 1, 1, 1})};
  std::vector<TensorView> vs = {view(vc, ScalarType::Float32, {4, 1, 1, 1})};
  std::vector<int32_t> src = {0}, dst = {3}, both = {0};
  kk::run_copy_blocks(ks, vs, view(src, ScalarType::Int32, {1}), view(dst, ScalarType::Int32, {1}), 0, true);
  CHECK(kc == std::vector<float>{1, 2, 3, 1});
  CHECK(vc == std::vector<float>{5, 6, 7, 5});
  CHECK_THROWS_AS(kk::run_copy_blocks(ks, vs, view(src, ScalarType::Int32, {1}), view(both, ScalarType::Int32, {1}), 0,
                                      true),
                  std::invalid_argument);

  std::vector<int32_t> table = {2, 1};
  std::vector<int64_t> lens = {2};
  std::vector<float> ok(2, -1.f), ov(2, -1.f);
  kk::run_gather_kv(ks[0], vs[0], view(table, ScalarType::Int32, {1, 2}), view(lens, ScalarType::Int64, {1}),
                    view(ok, ScalarType::Float32, {1, 2, 1, 1}), view(ov, ScalarType::Float32, {1, 2, 1, 1}), 0, true);
  CHECK(ok == std::vector<float>{3, 2});
  CHECK(ov == std::vector<float>{7, 6});
  std::vector<int64_t> too_long = {3};
  CHECK_THROWS_AS(kk::run_gather_kv(ks[0], vs[0], view(table, ScalarType::Int32, {1, 2}),
                                    view(too_long, ScalarType::Int64, {1}), view(ok, ScalarType::Float32, {1, 2, 1, 1}),
                                    view(ov, ScalarType::Float32, {1, 2, 1, 1}), 0, true),
                  std::invalid_argument);

  std::vector<float> q = {1.f}, out = {0.f};
  std::vector<int64_t> one = {1};
  kk::run_paged_decode_attention(view(out, ScalarType::Float32, {1, 1, 1}), view(q, ScalarType::Float32, {1, 1, 1}),
                                 ks[0], vs[0], view(table, ScalarType::Int32, {1, 2}),
                                 view(one, ScalarType::Int64, {1}), 1.f, 0, true);
  CHECK(out[0] == doctest::Approx(7.f));  // one token: its value
}

TEST_CASE("kv dispatch: CUDA tensors in a build without CUDA raise runtime_error before any index read") {
  if (PONDER_WITH_CUDA) return;  // a CUDA build would try to launch; covered by the Python CUDA tests
  std::vector<float> kc(4, 0.f), vc(4, 0.f), kn(2, 0.f), vn(2, 0.f);
  std::vector<int64_t> slots = {0};
  auto cuda = [](TensorView v) {
    v.device = DeviceType::CUDA;
    return v;
  };
  const TensorView K = cuda(view(kc, ScalarType::Float32, {2, 2, 1, 1})), V = cuda(view(vc, ScalarType::Float32, {2, 2, 1, 1}));
  const TensorView KN = cuda(view(kn, ScalarType::Float32, {1, 1, 1})), VN = cuda(view(vn, ScalarType::Float32, {1, 1, 1}));
  try {
    kk::run_write_kv(K, V, KN, VN, cuda(view(slots, ScalarType::Int64, {1})), 0, true);
    FAIL("expected std::runtime_error");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()).find("built without CUDA") != std::string::npos);
  }
}
