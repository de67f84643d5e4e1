// The emulated CUDA kernels as a CPU torch extension (the `cuda_emu` backend): the
// kernel and launcher sources of csrc/cuda compiled by g++ against cuda_emu.h.
// Own operator namespace (flashattn_lite_emu): the CPU kernels of flashattn_lite_C
// belong to the `cpu` backend.

#include <ATen/Parallel.h>

#include <string>

#include "../fa_torch.h"
#include "cuda_emu.h"

// emu/emu_kernels.cpp: one instantiation of the launchers per element type
const char* fa_emu_run(bool backward, bool bf16, const fa::AttnParams& p, void* stream);

namespace {

const char* run(bool backward, bool bf16, const fa::AttnParams& p, void* stream) {
  return fa_emu_run(backward, bf16, p, stream);
}

std::tuple<at::Tensor, at::Tensor> fwd_emu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           double scale, int64_t off, int64_t left, int64_t right, double softcap,
                                           const c10::optional<at::Tensor>& alibi) {
  return fa_torch::fwd("cuda_emu", c10::DeviceType::CPU, run, nullptr, q, k, v, scale, off, left, right, softcap,
                       alibi);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_emu(const at::Tensor& dout, const c10::optional<at::Tensor>& dlse,
                                                       const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& out, const at::Tensor& lse, double scale,
                                                       int64_t off, int64_t left, int64_t right, double softcap,
                                                       const c10::optional<at::Tensor>& alibi) {
  return fa_torch::bwd("cuda_emu", c10::DeviceType::CPU, run, nullptr, dout, dlse, q, k, v, out, lse, scale, off,
                       left, right, softcap, alibi);
}

}  // namespace

TORCH_LIBRARY(flashattn_lite_emu, m) {
  m.def(fa_torch::kFwdSchema);
  m.def(fa_torch::kBwdSchema);
}

TORCH_LIBRARY_IMPL(flashattn_lite_emu, CPU, m) {
  m.impl("fwd", &fwd_emu);
  m.impl("bwd", &bwd_emu);
}
