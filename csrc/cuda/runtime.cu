// CUDA half of runtime.h: a device probe that really launches a kernel.
#include <cuda_runtime.h>

#include "cuda/runtime.h"

namespace ponder::cuda {
namespace {

__global__ void probe_kernel(int* out) { *out = 42; }

bool failed(cudaError_t err, std::string* why) {
  if (err == cudaSuccess) return false;
  if (why) *why = cudaGetErrorString(err);
  cudaGetLastError();  // clear the sticky error so later calls start clean
  return true;
}

}  // namespace

int device_count(std::string* why) {
  int n = 0;
  if (failed(cudaGetDeviceCount(&n), why)) return 0;
  if (n == 0 && why) *why = "no CUDA device is visible";
  return n;
}

bool runtime_ok(std::string* why) {
  if (device_count(why) == 0) return false;
  int* d = nullptr;
  if (failed(cudaMalloc(&d, sizeof(int)), why)) return false;
  probe_kernel<<<1, 1>>>(d);
  int h = 0;
  const bool ok = !failed(cudaGetLastError(), why) &&
                  !failed(cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost), why);
  cudaFree(d);
  if (ok && h != 42) {
    if (why) *why = "probe kernel ran but wrote a wrong value";
    return false;
  }
  return ok;
}

}  // namespace ponder::cuda
