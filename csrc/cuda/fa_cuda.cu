// The CUDA translation unit: every kernel instantiation (fp16/bf16 x head dims 32, 64,
// 96, 128, 256) and the launchers.  Depends on CUDA headers only, so the compile test
// builds it with nvcc on machines whose torch has no CUDA.

#include "fa_launch.cuh"

// Entry point of the torch binding (attention_cuda.cpp).  Returns nullptr or an error.
const char* fa_cuda_run(bool backward, bool bf16, const fa::AttnParams& p, void* stream) {
  return fa::run_attention(backward, bf16, p, stream);
}
