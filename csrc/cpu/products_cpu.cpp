// Which way the CPU kernels multiply bf16 and fp16 tiles (attention_cpu.h: "bf16 / fp16
// products"), and the short measurement backends/cpu.py chooses by.  Operators:
//   flashattn_lite_C::cpu_bf16_products(int engine) -> ()   set the process-wide choice:
//       0 widened to float32, 1 this extension's micro-kernel (vdpbf16ps), 2 oneDNN's
//       brgemm, 3 this extension's micro-kernel with pairs widened in registers
//   flashattn_lite_C::cpu_fp16_products(int engine) -> ()   the same for fp16 (0, 1, 2;
//       its micro-kernel widens pairs in registers)
//   flashattn_lite_C::cpu_probe_products() -> float[]
//       [has the bf16 unit, bf16 micro-kernel GFLOP/s, float32 GFLOP/s, oneDNN bf16 brgemm
//        GFLOP/s, fp16 micro-kernel GFLOP/s, oneDNN fp16 brgemm GFLOP/s, bf16 pairs widened
//        GFLOP/s] (0: not available here)
//   flashattn_lite_C::cpu_onednn_shapes(int budget) -> int[]
//       [product shapes admitted to oneDNN so far, the budget]; budget >= 0 sets it first

#include <ATen/Config.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "attention_cpu.h"

#if AT_MKLDNN_ENABLED() && defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(CPUBLAS_BRGEMM_F16F16F32)
#define FLASHATTN_LITE_ONEDNN_BRGEMM 1
#endif

namespace flashattn_lite {
namespace attention_cpu {

namespace {
std::atomic<int> g_engine[2] = {0, 0};  // bf16's, fp16's
thread_local bool t_brgemm_used = false;  // this thread has called brgemm since its last release

// oneDNN generates code for every product shape it meets (sizes, strides, add or not) and
// torch keeps it per thread, with no limit, for the life of the process: measured on an
// AMD EPYC, about 140 KiB per shape and thread, and a forward+backward over 400 distinct
// key lengths met 8000 shapes (3 GiB) without the rounding below.
// So a process admits at most a budget of shapes to oneDNN (FLASHATTN_LITE_ONEDNN_SHAPES,
// default kDefaultShapeBudget); products of other shapes run on the micro-kernel, which
// reads the same operands.  Admission is process-wide and final: a shape, once decided,
// runs on the same engine on every thread for the rest of the process, so results stay
// reproducible and independent of the thread count.
constexpr int64_t kDefaultShapeBudget = 128;

struct ShapeKey {
  int64_t M, N, K2, lda, ldb, ldc;
  bool add, half;
  bool operator==(const ShapeKey& o) const {
    return M == o.M && N == o.N && K2 == o.K2 && lda == o.lda && ldb == o.ldb && ldc == o.ldc && add == o.add &&
           half == o.half;
  }
};
struct ShapeHash {
  size_t operator()(const ShapeKey& k) const {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : {k.M, k.N, k.K2, k.lda, k.ldb, k.ldc, int64_t(k.add) + 2 * int64_t(k.half)})
      h = (h ^ uint64_t(v)) * 1099511628211ull;
    return size_t(h);
  }
};

std::mutex g_shapes_mutex;
std::unordered_set<ShapeKey, ShapeHash> g_admitted;  // (guarded by g_shapes_mutex)
int64_t g_budget = -1;                               // (guarded; -1: not read from the environment yet)
std::atomic<uint64_t> g_budget_epoch{0};             // bumped when the budget is set: threads drop their copies

int64_t budget_locked() {
  if (g_budget < 0) {
    int64_t budget = kDefaultShapeBudget;
    if (const char* env = std::getenv("FLASHATTN_LITE_ONEDNN_SHAPES")) {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      // (a bad value stays unread: every call raises)
      TORCH_CHECK_VALUE(end != env && *end == '\0' && v >= 0,
                        "flashattn_lite cpu: FLASHATTN_LITE_ONEDNN_SHAPES must be an integer >= 0, got '", env, "'");
      budget = v;
    }
    g_budget = budget;
  }
  return g_budget;
}

// Whether oneDNN runs products of this shape (the first call of a new shape decides).
bool admitted(const ShapeKey& key) {
  thread_local std::unordered_map<ShapeKey, bool, ShapeHash> seen;  // this thread's copy of decisions
  thread_local uint64_t epoch = 0;
  if (epoch != g_budget_epoch.load(std::memory_order_acquire)) {  // (a refusal may not hold any more)
    seen.clear();
    epoch = g_budget_epoch.load(std::memory_order_acquire);
  }
  const auto it = seen.find(key);
  if (it != seen.end()) return it->second;
  bool yes;
  {
    std::lock_guard<std::mutex> lock(g_shapes_mutex);
    yes = g_admitted.count(key) > 0;
    if (!yes && int64_t(g_admitted.size()) < budget_locked()) {
      g_admitted.insert(key);
      yes = true;
    }
  }
  if (seen.size() >= 4096) seen.clear();  // (refused shapes are not bounded in number)
  seen.emplace(key, yes);
  return yes;
}

std::vector<int64_t> onednn_shapes(int64_t budget) {
  std::lock_guard<std::mutex> lock(g_shapes_mutex);
  if (budget >= 0) {
    g_budget = budget;
    g_budget_epoch.fetch_add(1, std::memory_order_acq_rel);
  }
  return {int64_t(g_admitted.size()), budget_locked()};
}

// onednn_pair_gemm with the first Kb of the K2 pairs on oneDNN, whatever the shape, and the
// rest (none for the self-check and the probe) added by the micro-kernel before alpha.
template <typename H>
void brgemm_pairs(int64_t M, int64_t N, int64_t K2, int64_t Kb, const uint32_t* A, int64_t lda, const uint32_t* B,
                  int64_t ldb, float* C, int64_t ldc, float alpha, bool accumulate) {
#ifdef FLASHATTN_LITE_ONEDNN_BRGEMM
  if (M <= 0 || N <= 0) return;
  if (K2 <= 0) {  // an empty sum
    for (int64_t m = 0; m < M && !accumulate; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
    return;
  }
  const auto* a = reinterpret_cast<const H*>(A);
  const auto* b = reinterpret_cast<const H*>(B);
  t_brgemm_used = true;
  auto rest = [&](float* T, int64_t ldt) {
    if (Kb < K2) own_pair_gemm<H>(M, N, K2 - Kb, A + Kb, lda, B + Kb * ldb, ldb, T, ldt, 1.0f, true);
  };
  // brgemm has no alpha: C = A B (+ C).  With alpha != 1 the product lands in scratch and
  // C = alpha * product (+ C), the two roundings of bf16_gemm's epilogue.
  if (alpha == 1.0f) {
    at::native::cpublas::brgemm(M, N, 2 * Kb, 2 * lda, ldb, ldc, accumulate, a, b, C, true);
    rest(C, ldc);
    return;
  }
  thread_local std::vector<float> tmp;
  if (tmp.size() < size_t(M * N)) tmp.resize(size_t(M * N));
  at::native::cpublas::brgemm(M, N, 2 * Kb, 2 * lda, ldb, N, false, a, b, tmp.data(), true);
  rest(tmp.data(), N);
  using fVec = at::vec::Vectorized<float>;
  const fVec va(alpha);
  for (int64_t m = 0; m < M; ++m) {
    const float* src = tmp.data() + m * N;
    float* dst = C + m * ldc;
    int64_t n = 0;
    for (; n + fVec::size() <= N; n += fVec::size()) {
      fVec r = fVec::loadu(src + n) * va;
      if (accumulate) r = r + fVec::loadu(dst + n);
      r.store(dst + n);
    }
    for (; n < N; ++n) dst[n] = accumulate ? alpha * src[n] + dst[n] : alpha * src[n];
  }
#else
  TORCH_CHECK(false, "flashattn_lite cpu: this torch was built without oneDNN's brgemm");
#endif
}

template <typename H>
const char* type_name() {
  return std::is_same_v<H, at::Half> ? "fp16" : "bf16";
}

// Whether oneDNN's brgemm for pairs of H runs here and gives the right products: products
// with odd sizes past one AMX tile each way (37 rows, 83 columns, 70 along the reduction),
// each way the kernels call it (alpha != 1 through scratch; alpha 1 added to C in place, C
// wider than the product), checked against float32 (the operands are small integers, so
// every sum is exact either way).  Empty: it does; else why not.
template <typename H>
std::string onednn_problem() {
  const std::string name = std::string("oneDNN's ") + type_name<H>() + " brgemm";
#ifdef FLASHATTN_LITE_ONEDNN_BRGEMM
  constexpr int64_t M = 37, N = 83, K2 = 35, LDC = N + 3;
  std::vector<uint16_t> a(M * 2 * K2), b(K2 * N * 2);
  std::vector<float> af(a.size()), bf(b.size()), c(M * LDC, -1.0f);
  uint32_t state = 12345u;  // small pseudo-random integers in [-3, 3] (a periodic pattern can sum to 0)
  auto draw = [&] {
    state = state * 1103515245u + 12345u;
    return float(int((state >> 16) % 7u) - 3);
  };
  for (size_t i = 0; i < a.size(); ++i) af[i] = draw(), a[i] = half_bits<H>(af[i]);
  for (size_t i = 0; i < b.size(); ++i) bf[i] = draw(), b[i] = half_bits<H>(bf[i]);
  const auto* A = reinterpret_cast<const uint32_t*>(a.data());
  const auto* B = reinterpret_cast<const uint32_t*>(b.data());
  try {
    brgemm_pairs<H>(M, N, K2, K2, A, K2, B, N, c.data(), LDC, 2.0f, false);  // C = 2 AB
    brgemm_pairs<H>(M, N, K2, K2, A, K2, B, N, c.data(), LDC, 1.0f, true);   // C += AB
    release_products();
  } catch (const c10::Error& e) {
    release_products();
    return name + " failed here: " + e.what_without_backtrace();
  } catch (const std::exception& e) {
    release_products();
    return name + " failed here: " + e.what();
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < LDC; ++n) {
      float want = -1.0f;  // (columns past N untouched)
      if (n < N) {
        want = 0;
        for (int64_t k = 0; k < 2 * K2; ++k) want += af[m * 2 * K2 + k] * bf[(k / 2) * N * 2 + n * 2 + k % 2];
        want *= 3.0f;
      }
      if (c[m * LDC + n] != want) return name + " gave wrong products in a self-check here";
    }
  }
  return "";
#else
  return "this torch was built without " + name + " (at::native::cpublas::brgemm)";
#endif
}

template <typename H>
const std::string& onednn_unavailable() {
  static const std::string why = onednn_problem<H>();
  return why;
}

template <typename H>
void set_products(int64_t engine) {
  constexpr bool half = std::is_same_v<H, at::Half>;
  TORCH_CHECK_VALUE(engine >= 0 && engine <= (half ? 2 : 3), "flashattn_lite cpu: cpu_", type_name<H>(),
                    "_products takes ", half ? "0, 1 or 2" : "0, 1, 2 or 3", ", got ", engine);
  if (half || engine == 3) {
    TORCH_CHECK(engine == 0 || kHaveF16Pairs, "flashattn_lite cpu: ", type_name<H>(),
                " products with pairs widened in registers need a CPU with AVX-512 and an extension built for it; "
                "this extension was compiled without it (-march=native on this host)");
  } else {
    TORCH_CHECK(engine == 0 || kHaveBf16Dot,
                "flashattn_lite cpu: bf16 products need a CPU with AVX512-BF16 (vdpbf16ps) and an extension built "
                "for it; this extension was compiled without it (-march=native on this host)");
  }
  TORCH_CHECK(engine != 2 || onednn_unavailable<H>().empty(), "flashattn_lite cpu: ", onednn_unavailable<H>());
  TORCH_CHECK(engine != 2 || at::globalContext().userEnabledMkldnn(),
              "flashattn_lite cpu: oneDNN's brgemm needs torch.backends.mkldnn enabled");
  g_engine[half].store(int(engine), std::memory_order_relaxed);
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
    gemm_rm<float>(false, true, M, N, D, 0.125f, q.data(), D, k.data(), D, 0.0f, s.data(), N);
    gemm_rm<float>(false, false, M, D, N, 1.0f, p.data(), N, v.data(), D, 1.0f, o.data(), D);
  });
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_prev);
  // seconds of the same two products by ``gemm``, on pairs of H (all ones)
  auto pair_seconds = [&](auto h, auto gemm) {
    using H = decltype(h);
    const uint32_t one = uint32_t(half_bits<H>(1.0f)) * 0x10001u;  // a pair of ones
    std::vector<uint32_t> qa(M * D / 2, one), kb(D / 2 * (N + 16), one), pa(M * N / 2, one), vb(N / 2 * D, one);
    return best_seconds([&] {
      gemm(M, N, D / 2, qa.data(), D / 2, kb.data(), N + 16, s.data(), N, 0.125f, false);  // (S: the softmax scale)
      gemm(M, D, N / 2, pa.data(), N / 2, vb.data(), D, o.data(), D, 1.0f, true);
    });
  };
  auto onednn_seconds = [&](auto h) -> double {  // (0: not available here)
    using H = decltype(h);
    if (!onednn_unavailable<H>().empty()) return 0;
    const double t = pair_seconds(h, [](int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda,
                                        const uint32_t* B, int64_t ldb, float* C, int64_t ldc, float alpha,
                                        bool accumulate) {
      brgemm_pairs<H>(M, N, K2, K2, A, lda, B, ldb, C, ldc, alpha, accumulate);
    });
    release_products();
    return t;
  };
  const double t16 = kHaveBf16Dot ? pair_seconds(at::BFloat16(), bf16_gemm) : 0;
  const double tdnn = kHaveBf16Dot ? onednn_seconds(at::BFloat16()) : 0;
  const double th = kHaveF16Pairs ? pair_seconds(at::Half(), widen_gemm<false>) : 0;
  const double thdnn = kHaveF16Pairs ? onednn_seconds(at::Half()) : 0;
  const double tw = kHaveF16Pairs ? pair_seconds(at::BFloat16(), widen_gemm<true>) : 0;  // bf16 pairs widened
  auto rate = [&](double t) { return t > 0 ? flops / t / 1e9 : 0.0; };
  return {kHaveBf16Dot ? 1.0 : 0.0, rate(t16), rate(t32), rate(tdnn), rate(th), rate(thdnn), rate(tw)};
}
}  // namespace

Engine products_engine(bool half) { return Engine(g_engine[half].load(std::memory_order_relaxed)); }

// oneDNN runs the product's main part, its rows and columns rounded down to multiples of
// kQuantM and kQuantN and its pairs to a multiple of kQuantK, if that shape is admitted;
// the micro-kernel runs the rest.  Rounding keeps the shapes few: the tiles of a causal
// staircase, of sequence ends and of windows come in every width.
constexpr int64_t kQuantM = 16, kQuantN = 32, kQuantK = 16;

template <typename H>
void onednn_pair_gemm(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B,
                      int64_t ldb, float* C, int64_t ldc, float alpha, bool accumulate) {
  const int64_t Mm = M / kQuantM * kQuantM, Nm = N / kQuantN * kQuantN, Km = K2 / kQuantK * kQuantK;
  if (Mm == 0 || Nm == 0 || Km == 0 ||
      !admitted(ShapeKey{Mm, Nm, Km, lda, ldb, alpha == 1.0f ? ldc : Nm, alpha == 1.0f && accumulate,
                         std::is_same_v<H, at::Half>})) {
    own_pair_gemm<H>(M, N, K2, A, lda, B, ldb, C, ldc, alpha, accumulate);  // (the engine needs the micro-kernel)
    return;
  }
  brgemm_pairs<H>(Mm, Nm, K2, Km, A, lda, B, ldb, C, ldc, alpha, accumulate);
  if (Nm < N) own_pair_gemm<H>(Mm, N - Nm, K2, A, lda, B + Nm, ldb, C + Nm, ldc, alpha, accumulate);
  if (Mm < M) own_pair_gemm<H>(M - Mm, N, K2, A + Mm * lda, lda, B, ldb, C + Mm * ldc, ldc, alpha, accumulate);
}
template void onednn_pair_gemm<at::BFloat16>(int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint32_t*,
                                             int64_t, float*, int64_t, float, bool);
template void onednn_pair_gemm<at::Half>(int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t,
                                         float*, int64_t, float, bool);

void release_products() {
#ifdef FLASHATTN_LITE_ONEDNN_BRGEMM
  if (t_brgemm_used) {
    at::native::cpublas::brgemm_release(true);
    t_brgemm_used = false;
  }
#endif
}

}  // namespace attention_cpu

TORCH_LIBRARY_FRAGMENT(flashattn_lite_C, m) {
  m.def("cpu_bf16_products(int engine) -> ()", &attention_cpu::set_products<at::BFloat16>);
  m.def("cpu_fp16_products(int engine) -> ()", &attention_cpu::set_products<at::Half>);
  m.def("cpu_probe_products() -> float[]", &attention_cpu::probe_products);
  m.def("cpu_onednn_shapes(int budget=-1) -> int[]", &attention_cpu::onednn_shapes);
}

}  // namespace flashattn_lite
