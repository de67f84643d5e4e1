// Registers the CUDA kernels (fa_cuda.cu) as the CUDA implementation of the
// flashattn_lite_C operators (schema in csrc/ops.cpp).  Built only where torch has
// CUDA and nvcc is present; runs on q's device, on its current stream.

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "fa_torch.h"

// fa_cuda.cu
const char* fa_cuda_run(bool backward, bool bf16, const fa::AttnParams& p, void* stream);

namespace {

struct Cuda {
  static constexpr const char* who = "flashattn_lite cuda";
  static constexpr c10::DeviceType device = c10::DeviceType::CUDA;
  static constexpr fa_torch::RunFn run = fa_cuda_run;
  using Guard = c10::cuda::CUDAGuard;
  static void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
};

}  // namespace

TORCH_LIBRARY_IMPL(flashattn_lite_C, CUDA, m) {
  m.impl("fwd", &fa_torch::fwd_op<Cuda>);
  m.impl("bwd", &fa_torch::bwd_op<Cuda>);
}
