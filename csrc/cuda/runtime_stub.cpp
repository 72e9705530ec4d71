// CPU-only half of runtime.h: this build has no CUDA kernels.
#include "cuda/runtime.h"

namespace ponder::cuda {

int device_count(std::string* why) {
  if (why) *why = "ponder was built without CUDA (no CUDA compiler was found, or PONDER_CUDA=OFF)";
  return 0;
}

bool runtime_ok(std::string* why) { return device_count(why) > 0; }

}  // namespace ponder::cuda
