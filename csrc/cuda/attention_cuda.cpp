// Registers the CUDA kernels (fa_cuda.cu) as the CUDA implementation of the
// flashattn_lite_C operators (schema in csrc/ops.cpp).  Built only where torch has
// CUDA and nvcc is present; launched on the current stream of q's device.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "fa_torch.h"

const char* fa_cuda_run(bool backward, bool bf16, const fa::AttnParams& p, void* stream);

namespace {

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            double scale, int64_t off, int64_t left, int64_t right, double softcap,
                                            const c10::optional<at::Tensor>& alibi) {
  TORCH_CHECK(q.is_cuda(), "flashattn_lite cuda: q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  return fa_torch::fwd("flashattn_lite cuda", c10::DeviceType::CUDA, fa_cuda_run,
                       at::cuda::getCurrentCUDAStream().stream(), q, k, v, scale, off, left, right, softcap, alibi);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& dout, const c10::optional<at::Tensor>& dlse,
                                                        const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse, double scale,
                                                        int64_t off, int64_t left, int64_t right, double softcap,
                                                        const c10::optional<at::Tensor>& alibi) {
  TORCH_CHECK(q.is_cuda(), "flashattn_lite cuda: q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  return fa_torch::bwd("flashattn_lite cuda", c10::DeviceType::CUDA, fa_cuda_run,
                       at::cuda::getCurrentCUDAStream().stream(), dout, dlse, q, k, v, out, lse, scale, off, left,
                       right, softcap, alibi);
}

}  // namespace

TORCH_LIBRARY_IMPL(flashattn_lite_C, CUDA, m) {
  m.impl("fwd", &fwd_cuda);
  m.impl("bwd", &bwd_cuda);
}
