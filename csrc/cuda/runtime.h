// Whether CUDA kernels of this build can run now. Compiled from runtime.cu when the build has
// CUDA, from runtime_stub.cpp otherwise, so callers never need #ifdefs.
#pragma once

#include <string>

namespace ponder::cuda {

// Number of visible CUDA devices, or 0 (with the reason in *why) when none can be used.
int device_count(std::string* why);

// Launches a one-thread probe kernel on device 0 and checks its result; false (with the
// reason in *why) when the build has no CUDA, there is no device, or the launch fails.
bool runtime_ok(std::string* why);

}  // namespace ponder::cuda
