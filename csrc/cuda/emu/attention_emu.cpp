// The emulated CUDA kernels as a CPU torch extension (the `cuda_emu` backend): the
// kernel and launcher sources of csrc/cuda compiled by g++ against cuda_emu.h.
// Own operator namespace (flashattn_lite_emu, same schema as flashattn_lite_C): the CPU
// implementation of flashattn_lite_C belongs to the `cpu` backend.

#include "../fa_torch.h"

// emu/emu_kernels.cpp: the launchers under the emulator
const char* fa_emu_run(bool backward, bool bf16, const fa::AttnParams& p, void* stream);

namespace {

struct Emu {
  static constexpr const char* who = "cuda_emu";
  static constexpr c10::DeviceType device = c10::DeviceType::CPU;
  static constexpr fa_torch::RunFn run = fa_emu_run;
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };
  static void* stream() { return nullptr; }
};

}  // namespace

TORCH_LIBRARY(flashattn_lite_emu, m) {
  m.def(fa_torch::kFwdSchema);
  m.def(fa_torch::kBwdSchema);
}

TORCH_LIBRARY_IMPL(flashattn_lite_emu, CPU, m) {
  m.impl("fwd", &fa_torch::fwd_op<Emu>);
  m.impl("bwd", &fa_torch::bwd_op<Emu>);
}
