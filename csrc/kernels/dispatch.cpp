// validate -> require a CUDA build for CUDA tensors -> check index values -> CPU/CUDA kernel.
#include "kernels/dispatch.h"

#include <stdexcept>
#include <string>

#ifndef PONDER_WITH_CUDA
#define PONDER_WITH_CUDA 0
#endif

namespace ponder::kernels {

HostIndex::HostIndex(const TensorView& v, intptr_t stream) : view_(v) {
  if (v.device == DeviceType::CPU || v.numel() == 0) return;
  const int64_t es = static_cast<int64_t>(element_size(v.dtype));
  int64_t lo = 0, hi = 0;  // element offsets spanned
  for (int i = 0; i < v.ndim; ++i) {
    const int64_t reach = (v.shape[i] - 1) * v.strides[i];
    (reach < 0 ? lo : hi) += reach;
  }
  const size_t bytes = static_cast<size_t>((hi - lo + 1) * es);
  buf_.resize((bytes + 7) / 8);
  copy_device_to_host(buf_.data(), static_cast<const char*>(v.data) + lo * es, bytes, v.device_id, stream);
  view_.data = reinterpret_cast<char*>(buf_.data()) - lo * es;
  view_.device = DeviceType::CPU;
  view_.device_id = 0;
}

namespace {

void require_cuda_build(const TensorView& v, const char* op) {
  if (v.device == DeviceType::CUDA && !PONDER_WITH_CUDA)
    throw std::runtime_error(std::string("ponder was built without CUDA (no CUDA compiler was found, or PONDER_CUDA=OFF): ") +
                             op + " got CUDA tensors; pass CPU tensors, or reinstall ponder with PONDER_CUDA=ON "
                             "on a machine with nvcc");
}

}  // namespace

void run_write_kv(const TensorView& kc, const TensorView& vc, const TensorView& kn, const TensorView& vn,
                  const TensorView& sm, intptr_t stream, bool check_indices) {
  validate_write_kv(kc, vc, kn, vn, sm);
  require_cuda_build(kc, "write_kv");
  if (check_indices) check_slot_indices(kc, HostIndex(sm, stream).view());
  if (kc.device == DeviceType::CUDA)
    write_kv_cuda(kc, vc, kn, vn, sm, stream);
  else
    write_kv(kc, vc, kn, vn, sm);
}

void run_copy_blocks(const std::vector<TensorView>& kcs, const std::vector<TensorView>& vcs, const TensorView& s,
                     const TensorView& d, intptr_t stream, bool check_indices) {
  validate_copy_blocks(kcs, vcs, s, d);
  require_cuda_build(s, "copy_blocks");
  if (check_indices && !kcs.empty())
    check_copy_indices(kcs[0].shape[0], HostIndex(s, stream).view(), HostIndex(d, stream).view());
  if (s.device == DeviceType::CUDA)
    copy_blocks_cuda(kcs, vcs, s, d, stream);
  else
    copy_blocks(kcs, vcs, s, d);
}

void run_gather_kv(const TensorView& kc, const TensorView& vc, const TensorView& bt, const TensorView& ln,
                   const TensorView& ok, const TensorView& ov, intptr_t stream, bool check_indices) {
  validate_gather_kv(kc, vc, bt, ln, ok, ov);
  require_cuda_build(kc, "gather_kv");
  if (check_indices)
    check_block_table_indices(kc, HostIndex(bt, stream).view(), HostIndex(ln, stream).view(), ok.shape[1]);
  if (kc.device == DeviceType::CUDA)
    gather_kv_cuda(kc, vc, bt, ln, ok, ov, stream);
  else
    gather_kv(kc, vc, bt, ln, ok, ov);
}

void run_paged_decode_attention(const TensorView& o, const TensorView& q, const TensorView& kc, const TensorView& vc,
                                const TensorView& bt, const TensorView& ln, float scale, intptr_t stream,
                                bool check_indices) {
  validate_paged_decode_attention(o, q, kc, vc, bt, ln, scale);
  require_cuda_build(kc, "paged_decode_attention");
  if (check_indices) check_block_table_indices(kc, HostIndex(bt, stream).view(), HostIndex(ln, stream).view(), -1);
  if (kc.device == DeviceType::CUDA)
    paged_decode_attention_cuda(o, q, kc, vc, bt, ln, scale, stream);
  else
    paged_decode_attention(o, q, kc, vc, bt, ln, scale);
}

}  // namespace ponder::kernels
