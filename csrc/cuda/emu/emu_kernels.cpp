// The kernels of csrc/cuda, unchanged, compiled as host C++ against cuda_emu.h.
// Blocks of a grid are spread over torch's intra-op threads; the threads of a block
// are fibers on one OS thread.

#include <ATen/Parallel.h>

#include <string>

#include "cuda_emu.h"
#include "../fa_launch.cuh"

const char* fa_emu_run(bool backward, bool bf16, const fa::AttnParams& p, void* stream) {
  static thread_local std::string error;
  static const bool init = [] {  // once, thread-safe
    cuda_emu::parallel_for() = [](int64_t n, const std::function<void(int64_t, int64_t)>& f) {
      at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) { f(lo, hi); });
    };
    return true;
  }();
  (void)init;
  try {
    return fa::run_attention(backward, bf16, p, stream);
  } catch (const std::exception& e) {
    error = e.what();
    return error.c_str();
  }
}
