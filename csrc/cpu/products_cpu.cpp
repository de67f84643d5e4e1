// Which way the CPU kernels multiply bf16 tiles (attention_cpu.h: "bf16 products"), and
// the short measurement backends/cpu.py chooses by.  Operators:
//   flashattn_lite_C::cpu_bf16_products(int on) -> ()   set the process-wide choice
//   flashattn_lite_C::cpu_probe_products() -> float[]   [has the unit, bf16 GFLOP/s, float32 GFLOP/s]

#include <torch/library.h>

#include <chrono>

#include "attention_cpu.h"

namespace flashattn_lite {
namespace attention_cpu {

namespace {
std::atomic<int> g_bf16_products{0};

void set_bf16_products(int64_t on) {
  TORCH_CHECK_VALUE(on == 0 || on == 1, "flashattn_lite cpu: cpu_bf16_products takes 0 or 1, got ", on);
  TORCH_CHECK(on == 0 || kHaveBf16Dot,
              "flashattn_lite cpu: bf16 products need a CPU with AVX512-BF16 (vdpbf16ps) and an extension built "
              "for it; this extension was compiled without it (-march=native on this host)");
  g_bf16_products.store(int(on), std::memory_order_relaxed);
}

// Seconds per call of f, the best of a few timed batches after a warm-up.
template <typename F>
double best_seconds(F&& f) {
  f();
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 8; ++i) f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 8);
  }
  return best;
}

// The forward's two tile products at a typical shape (a 128-row query block against a
// 512-key tile, head dim 64), each way, on the calling thread.
std::vector<double> probe_products() {
  constexpr int64_t M = 128, N = 512, D = 64;
  const double flops = 2.0 * 2.0 * M * N * D;  // S = Q K^T and P V
  std::vector<float> q(M * D, 0.25f), k(N * D, 0.5f), p(M * N, 0.125f), v(N * D, 0.75f), s(M * N), o(M * D);
  const int mkl_prev = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
  const double t32 = best_seconds([&] {
    gemm_rm<float>(false, true, M, N, D, 1.0f, q.data(), D, k.data(), D, 0.0f, s.data(), N);
    gemm_rm<float>(false, false, M, D, N, 1.0f, p.data(), N, v.data(), D, 1.0f, o.data(), D);
  });
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_prev);
  double t16 = 0;
  if (kHaveBf16Dot) {
    const uint32_t one = 0x3f803f80u;  // a pair of bf16 ones
    std::vector<uint32_t> qa(M * D / 2, one), kb(D / 2 * (N + 16), one), pa(M * N / 2, one), vb(N / 2 * D, one);
    t16 = best_seconds([&] {
      bf16_gemm(M, N, D / 2, qa.data(), D / 2, kb.data(), N + 16, s.data(), N, 1.0f, false);
      bf16_gemm(M, D, N / 2, pa.data(), N / 2, vb.data(), D, o.data(), D, 1.0f, true);
    });
  }
  return {kHaveBf16Dot ? 1.0 : 0.0, t16 > 0 ? flops / t16 / 1e9 : 0.0, flops / t32 / 1e9};
}
}  // namespace

bool bf16_products() { return g_bf16_products.load(std::memory_order_relaxed) != 0; }

}  // namespace attention_cpu

TORCH_LIBRARY_FRAGMENT(flashattn_lite_C, m) {
  m.def("cpu_bf16_products(int on) -> ()", &attention_cpu::set_bf16_products);
  m.def("cpu_probe_products() -> float[]", &attention_cpu::probe_products);
}

}  // namespace flashattn_lite
