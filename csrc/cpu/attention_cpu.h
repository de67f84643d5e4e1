#pragma once

// CPU attention kernels: tiled online-softmax forward, recomputation backward.
//
// This header holds what the forward (attention_fwd_cpu.cpp), the backward
// (attention_bwd_cpu.cpp) and the operator entry points (attention_cpu.cpp) share;
// the kernels live in their own translation units so they compile in parallel.
//
// Every tile product runs through the BLAS torch.mm uses, in float32 (float64 for
// float64 input).  fp16/bf16 inputs are widened to float32 (K and V once per call,
// except in a forward of at most 128 queries, which widens the tiles it reads): a
// low-precision BLAS product is slower than widening, O(N d), and then multiplying in
// float32, O(N^2 d).
//
// Problems: a dense batch is B problems of (Sq, Sk); a packed varlen batch is one
// 4-D batch entry whose sequences are row ranges (``Seq``).  Optional features that
// touch every score (the additive bias, dropout) are template switches, so the
// feature-free instantiation carries no per-element test; softcap/ALiBi and the
// varlen bookkeeping are per row or per task.
//
// Parallelism: forward over (sequence, head, query block); backward over
// (sequence, kv head, chunk of key blocks), each task summing dK/dV over its GQA
// group in a fixed order and writing its own dQ partial, reduced in a fixed order.
// Tasks are claimed dynamically, largest first (sequences and causal blocks differ
// in cost).  No atomics on data: every result element is computed by one task in a
// fixed order, and the task split does not depend on the thread count, so results
// are reproducible bit for bit and identical for any number of threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <type_traits>
#include <vector>

#include "bf16_gemm.h"
#if defined(__F16C__)
#include <immintrin.h>
#endif
#include "philox.h"

namespace flashattn_lite {
namespace attention_cpu {

// Fortran BLAS entry points.  torch's x86 wheels link MKL into libtorch_cpu and
// export these (they are what torch.mm ends up calling); declared weak so that a
// torch without them still loads, falling back to ATen's exported gemm kernel.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
// MKL's per-thread thread count (returns the previous one; 0 restores the global setting).
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

// Every dimension and leading dimension reaches the Fortran BLAS as a 32-bit int.
constexpr int64_t kBlasIntMax = std::numeric_limits<int>::max();

template <typename T>
inline void blas_gemm_int32(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                            const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = int(m), in = int(n), ik = int(k), ilda = int(lda), ildb = int(ldb), ildc = int(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_) return sgemm_(&ca, &cb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {
    if (dgemm_) return dgemm_(&ca, &cb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  }
  // Fallback through ATen (dispatcher overhead per call, same numbers): column-major
  // X (r x c, ld) is the row-major tensor X^T of shape (c, r) with row stride ld.
  auto view = [](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, c10::CppTypeToScalarType<T>::value);
    return trans ? t : t.t();  // column-major op(X) as a row-major (rows x cols) view
  };
  at::Tensor A = view(a, ta ? k : m, ta ? m : k, lda, ta);
  at::Tensor Bm = view(b, tb ? n : k, tb ? k : n, ldb, tb);
  at::Tensor C = at::from_blob(c, {n, m}, {ldc, 1}, c10::CppTypeToScalarType<T>::value).t();
  if (beta == T(0)) C.zero_(); else C.mul_(beta);
  C.add_(at::mm(A, Bm), alpha);
}

// Columns [0, cols) of a column-major matrix (rows each, ``src_ld`` apart) to ``dst``
// (``dst_ld`` apart).
template <typename T>
inline void copy_columns(const T* src, int64_t src_ld, T* dst, int64_t dst_ld, int64_t rows, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) std::memcpy(dst + j * dst_ld, src + j * src_ld, sizeof(T) * size_t(rows));
}

// The rare call with a leading dimension of 2^31 elements or more (a row stride that
// large, e.g. an as_strided view over a big buffer; or one row, whose stride BLAS never
// uses but still checks): each such operand is packed into scratch with the shortest
// leading dimension, and C is copied back.  The tiles are small (a kernel's block), the
// products are the same.
template <typename T>
void blas_gemm_packed(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                      const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

template <typename T>
inline void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                      const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (C10_UNLIKELY(lda > kBlasIntMax || ldb > kBlasIntMax || ldc > kBlasIntMax)) {
    return blas_gemm_packed<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  blas_gemm_int32<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C[M, N] = alpha * op(A) @ op(B) + beta * C, with BLAS being column-major:
// a row-major matrix is its column-major transpose, so C^T = op(B)^T op(A)^T.
template <typename T>
inline void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                    int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  blas_gemm<T>(trans_b, trans_a, N, M, K, alpha, B, std::max<int64_t>(ldb, 1), A, std::max<int64_t>(lda, 1), beta,
               C, std::max<int64_t>(ldc, 1));
}

// Visibility band: query i sees keys [i + offset - left, i + offset + right]; < 0 = unbounded.
struct Band {
  int64_t offset, left, right, seqlen_q, seqlen_k;

  // Visible keys of query row i, as [lo, hi) (empty: lo == hi).
  inline void keys(int64_t i, int64_t& lo, int64_t& hi) const {
    lo = left < 0 ? 0 : std::max<int64_t>(0, i + offset - left);
    hi = right < 0 ? seqlen_k : std::min<int64_t>(seqlen_k, i + offset + right + 1);
    lo = std::min(lo, seqlen_k);
    if (hi < lo) hi = lo;
  }
  // Queries that see key j, as [lo, hi): the transposed band.
  inline void queries(int64_t j, int64_t& lo, int64_t& hi) const {
    lo = right < 0 ? 0 : std::max<int64_t>(0, j - offset - right);
    hi = left < 0 ? seqlen_q : std::min<int64_t>(seqlen_q, j - offset + left + 1);
    lo = std::min(lo, seqlen_q);
    if (hi < lo) hi = lo;
  }
};

// Tile sizes.  Large key tiles keep BLAS efficient (long inner products for P @ V);
// FLASHATTN_LITE_CPU_FWD_BLOCKS / FLASHATTN_LITE_CPU_BWD_BLOCKS = "BM,BN" override
// them (tuning only).
struct Blocks {
  int64_t m = 64, n = 512;
};

// Slabs per tile the band cuts (see for_slabs): 64 rows of the 256-row tiles.
constexpr int64_t kStairSlabs = 4;

// Whether the band hides part of the rows x cols tile at (r0, c0) from some of its rows.
inline bool band_cuts(const Band& band, int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
  int64_t lo_first, hi_first, lo_last, hi_last;
  band.keys(r0, lo_first, hi_first);
  band.keys(r0 + rows - 1, lo_last, hi_last);
  return hi_first < c0 + cols || lo_last > c0;
}

// fn(s0, s1, ca, ce) for the row slabs [s0, s1) of the tile, slab rows each, with the
// tile columns [ca, ce) any of the slab's rows sees (slabs that see none are skipped).
// Band bounds are monotone in the row, so the slab's range is its first row's lo to its
// last row's hi.
template <typename F>
inline void for_slabs(const Band& band, int64_t r0, int64_t rows, int64_t c0, int64_t cols, int64_t slab, F&& fn) {
  for (int64_t s0 = 0; s0 < rows; s0 += slab) {
    const int64_t s1 = std::min(rows, s0 + slab);
    int64_t lo, hi, unused;
    band.keys(r0 + s0, lo, unused);
    band.keys(r0 + s1 - 1, unused, hi);
    const int64_t ca = std::clamp(lo - c0, int64_t(0), cols), ce = std::clamp(hi - c0, int64_t(0), cols);
    if (ca < ce) fn(s0, s1, ca, ce);
  }
}

inline Blocks blocks_from_env(const char* var, int64_t bm, int64_t bn) {
  Blocks b{bm, bn};
  if (const char* env = std::getenv(var)) {
    long m = 0, n = 0;
    if (std::sscanf(env, "%ld,%ld", &m, &n) == 2 && m > 0 && n > 0) b = Blocks{m, n};
  }
  return b;
}

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline T row_max(const T* x, int64_t n) {
  int64_t j = 0;
  T m = -std::numeric_limits<T>::infinity();
  if (n >= Vec<T>::size()) {
    Vec<T> vm(m);
    for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) vm = at::vec::maximum(vm, Vec<T>::loadu(x + j));
    m = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// 2^f for f in [0, 1), highest degree first (Horner), shared by the AVX-512 and AVX2 paths.
constexpr int kExp2Degree = 5;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kExp2Poly[kExp2Degree + 1] = {1.8775765784084797e-3f, 8.989340625703335e-3f, 5.582631751894951e-2f,
                                              2.4015361070632935e-1f, 6.931530833244324e-1f, 9.999999403953552e-1f};
// 2^f for f in [-0.5, 0.5] (the AVX2 path rounds to nearest): the same kind of fit, <= 2.02
// ulp in float32 fma arithmetic (checked on 2e6 points against float64).
constexpr float kExp2PolyHalf[kExp2Degree + 1] = {1.3264727313071489e-3f, 9.6715129911899567e-3f,
                                                  5.5507335811853409e-2f, 2.4022242426872253e-1f,
                                                  6.9314700365066528e-1f, 1.0f};

// exp(x - shift) on a vector.  float with AVX-512: 2^t with t = (x - shift) log2(e),
// subtracting first so that t is exact to an ulp of the difference, not of the shift
// (the backward's shift is the lse, and its P is not normalised again).  2^t =
// 2^floor(t) 2^f with f in [0, 1) from vreduceps; 2^f by a degree-5 polynomial (a
// relative-error fit of our own, <= 2.5 ulp in float32 fma arithmetic) and the power
// of two by vscalefps, which gives 0 below the denormals and inf above the range
// without compares.  10 instructions where ATen's exp_u20 (<= 20 ulp) takes about 20;
// this pass over the scores is the forward's largest cost after the tile products.
// kNegInf: scores may be -inf (an additive mask), so t is clamped at -200 (2^-200
// scales to exactly 0) instead of giving NaN; vmaxps returns its second operand,
// which keeps NaN.  AVX2 (no vreduceps/vscalefps) below; other types and ISAs:
// ATen's exp_u20 for float, Sleef's exp for double.
template <typename T, bool kNegInf>
struct ExpShift {
  Vec<T> shift;
  explicit ExpShift(T s) : shift(s) {}

  inline Vec<T> operator()(const Vec<T>& x) const {
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      __m512 t = _mm512_mul_ps(_mm512_sub_ps(x, shift), _mm512_set1_ps(kLog2e));
      if constexpr (kNegInf) t = _mm512_max_ps(_mm512_set1_ps(-200.f), t);
      // f = t - floor(t) in [0, 1) in one vreduceps; vscalefps multiplies by 2^floor(t) itself
      const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      __m512 p = _mm512_set1_ps(kExp2Poly[0]);
      for (int i = 1; i < kExp2Degree + 1; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
      return _mm512_scalef_ps(p, t);
    }
#elif defined(__AVX2__) && defined(__FMA__) && defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      // n = round(t) without a rounding instruction: j = t + M with M = 1.5 * 2^23 + 127 is
      // an integer-valued float whose low mantissa bits hold 127 + n, so j << 23 is the bit
      // pattern of 2^n, and j - M is n exactly; f = t - n is in [-0.5, 0.5].  t is clamped
      // to [-127, 128] first: n = -127 gives +0 (so -inf and anything below 2^-126.5 give
      // exactly 0), 128 gives inf; vmaxps/vminps return their second operand for NaN,
      // which keeps it.  The adds run on ports the fmas leave free: 14 instructions where
      // floor and convert took 16 micro-ops on the fma ports.
      __m256 t = _mm256_mul_ps(_mm256_sub_ps(x, shift), _mm256_set1_ps(kLog2e));
      t = _mm256_min_ps(_mm256_set1_ps(128.f), _mm256_max_ps(_mm256_set1_ps(-127.f), t));
      const __m256 magic = _mm256_set1_ps(12582912.f + 127.f);
      const __m256 j = _mm256_add_ps(t, magic);
      const __m256 f = _mm256_sub_ps(t, _mm256_sub_ps(j, magic));
      __m256 p = _mm256_set1_ps(kExp2PolyHalf[0]);
      for (int i = 1; i < kExp2Degree + 1; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2PolyHalf[i]));
      return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(j), 23)));
    }
#endif
    if constexpr (std::is_same_v<T, float>) {
      return (x - shift).exp_u20();
    } else {
      return (x - shift).exp();
    }
  }
};

// out[j] = exp(x[j] - shift) (out may alias x); returns the sum.  kNegInf: x may hold -inf.
// A row's last partial vector runs through the same vector exp (its lanes past n are
// loaded as 0 and zeroed after the exp), not a scalar loop: causal and window rows end
// anywhere, so most rows of a tile the band cuts have such a tail.
template <typename T, bool kNegInf>
inline T exp_shift_sum(const T* x, T* out, int64_t n, T shift) {
  constexpr int64_t W = Vec<T>::size();
  const ExpShift<T, kNegInf> vexp(shift);
  Vec<T> acc(T(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    Vec<T> e = vexp(Vec<T>::loadu(x + j));
    e.store(out + j);
    acc = acc + e;
  }
  if (j < n) {
    const int64_t rest = n - j;
    const Vec<T> e = Vec<T>::set(Vec<T>(T(0)), vexp(Vec<T>::loadu(x + j, rest)), rest);
    e.store(out + j, rest);
    acc = acc + e;
  }
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
}

// The online softmax may shift a row by any value not far below its scores: the
// result, out = acc / l and lse = shift + log l, does not depend on the shift, and
// float sums lose nothing to a larger scale.  So the forward keeps a row's shift
// while a tile's exp-sum under it stays at most exp(kLazyShift) ~ 4.9e8 (then no
// probability exceeds that, far from overflowing the sums), and needs no max of the
// scores at all; a larger (or inf/NaN) sum makes it take the tile's max and recompute.
constexpr double kLazyShift = 20.0;

template <typename T>
inline void scale_row(T* x, int64_t n, T s) {
  int64_t j = 0;
  Vec<T> vs(s);
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) (Vec<T>::loadu(x + j) * vs).store(x + j);
  for (; j < n; ++j) x[j] *= s;
}

// Score transforms after the scaled product, in flash-attn's order: softcap
// (cap * tanh(s / cap), Gemma 2), then the ALiBi bias -slope * |i + offset - j|.
template <typename T>
struct Transform {
  T softcap;  // 0 = off
  const float* slopes;  // (B, H) with strides (sb, sh), or null
  int64_t sb, sh, offset;

  bool any() const { return softcap > T(0) || slopes != nullptr; }
  T slope(int64_t b, int64_t h) const { return slopes ? T(slopes[b * sb + h * sh]) : T(0); }

  // Row i's scores for keys c0 + [a, e), in place.  With softcap, also writes
  // 1 - tanh^2 (the cap's derivative) into ``dcap`` when it is not null.
  inline void apply(T* x, int64_t a, int64_t e, int64_t i, int64_t c0, T slope_v, T* dcap) const {
    if (softcap > T(0)) {
      const T inv = T(1) / softcap;
      int64_t j = a;
      const Vec<T> vinv(inv), vcap(softcap), one(T(1));
      for (; j + Vec<T>::size() <= e; j += Vec<T>::size()) {
        const Vec<T> t = (Vec<T>::loadu(x + j) * vinv).tanh();
        (t * vcap).store(x + j);
        if (dcap) (one - t * t).store(dcap + j);
      }
      for (; j < e; ++j) {
        const T t = std::tanh(x[j] * inv);
        x[j] = t * softcap;
        if (dcap) dcap[j] = T(1) - t * t;
      }
    }
    if (slopes) {
      for (int64_t j = a; j < e; ++j) x[j] -= slope_v * T(std::llabs(i + offset - (c0 + j)));
    }
  }
};


// ------------------------------------------------------------------------------------ the problem

// One attention problem: a batch entry (dense) or one packed sequence (varlen).
struct Seq {
  int64_t b;             // sequence index: ALiBi row, bias batch
  int64_t pb;            // batch index into the 4-D tensors (0 for varlen)
  int64_t q0, k0;        // first query / key row in the tensors' sequence dim
  int64_t len_q, len_k;  // lengths
  int64_t offset;        // diagonal offset (varlen: diag_offset + len_k - len_q)
};

struct Problem {
  std::vector<Seq> seqs;
  int64_t rows = 0;              // sequence dim of the 4-D tensors (Sq, or total_q); lse is (B, H, rows)
  int64_t max_q = 0, max_k = 0;  // longest sequences (tile sizes)
  int64_t left = -1, right = -1;
  int64_t drop_cols = 0;  // Sk of the dropout counter: Sk, or max_seqlen_k
  // Learnable sinks (forward only): one logit per query head joining each row's normaliser
  // with a zero value (flashattn_lite/backends/sinks.py), or null.
  const double* sink = nullptr;

  Band band(const Seq& s) const { return Band{s.offset, left, right, s.len_q, s.len_k}; }
  // Index of query row i of ``s``, head h, in lse (B, H, rows); also the dropout counter's row.
  int64_t row_id(const Seq& s, int64_t h, int64_t heads, int64_t i) const {
    return (s.pb * heads + h) * rows + s.q0 + i;
  }
};

// x[j] += bias[j * sj] (bias in any float dtype; sj = 0 broadcasts one value along the row).
template <typename T, typename B>
inline void add_bias_row(T* x, const B* row, int64_t sj, int64_t n) {
  if (sj == 0) {
    const T c = T(row[0]);
    for (int64_t j = 0; j < n; ++j) x[j] += c;
  } else if (sj == 1) {
    if constexpr (std::is_same_v<T, B>) {
      for (int64_t j = 0; j < n; ++j) x[j] += row[j];
    } else {
      T buf[64];
      for (int64_t j0 = 0; j0 < n; j0 += 64) {
        const int64_t m = std::min<int64_t>(64, n - j0);
        at::vec::convert(row + j0, buf, m);
        for (int64_t t = 0; t < m; ++t) x[j0 + t] += buf[t];
      }
    }
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] += T(row[j * sj]);
  }
}

// The additive bias (SDPA's attn_mask): a (B, H, Sq, Sk) view, broadcast dims with stride 0.
struct BiasView {
  const void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;

  // x[0, n) += bias[b, h, i, j0 + [0, n)]
  template <typename T>
  void add(T* x, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n) const {
    const int64_t off = b * sb + h * sh + i * si + j0 * sj;
    switch (dtype) {
      case at::kFloat: return add_bias_row(x, static_cast<const float*>(data) + off, sj, n);
      case at::kDouble: return add_bias_row(x, static_cast<const double*>(data) + off, sj, n);
      case at::kHalf: return add_bias_row(x, static_cast<const at::Half*>(data) + off, sj, n);
      case at::kBFloat16: return add_bias_row(x, static_cast<const at::BFloat16*>(data) + off, sj, n);
      default: return;  // rejected by the host checks
    }
  }
};

// Dropout: keep masks from the Philox stream; kept values are scaled by 1 / (1 - p),
// which the kernels fold into a GEMM's alpha or the final normalisation.
struct Dropout {
  PhiloxDropout philox;
  double rescale = 1.0;  // 1 / (1 - p)
};

// x[j] = 0 where mask[j] == 0.
template <typename T>
inline void apply_keep(T* x, const uint32_t* mask, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = mask[j] ? x[j] : T(0);
}

// Uninitialised scratch (zero-filling a 256 KiB tile per task would cost more than a decode
// step), 64-byte aligned: BLAS may pick its kernels (and so its summation order) by the
// operands' alignment, and results must not depend on which worker's buffers a task used.
// Tests set FLASHATTN_LITE_CPU_POISON=1 to fill it with NaN bytes (0xFF), so a read of
// anything never written shows up in the results (run_tasks then also gives every task
// fresh scratch, not the previous task's finite leftovers).
inline bool poison_scratch() { return std::getenv("FLASHATTN_LITE_CPU_POISON") != nullptr; }

template <typename T>
struct Scratch {
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<T[], Free> p;
  explicit Scratch(int64_t n)
      : p(static_cast<T*>(::operator new[](sizeof(T) * std::max<int64_t>(n, 1), std::align_val_t(64)))) {
    if (poison_scratch()) std::memset(p.get(), 0xFF, sizeof(T) * std::max<int64_t>(n, 1));
  }
  T* data() { return p.get(); }
};

template <typename T>
void blas_gemm_packed(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                      const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  // (m, n, k are a kernel's tile sizes, and the host checks bound the head dim)
  TORCH_CHECK(std::max({m, n, k}) <= kBlasIntMax, "flashattn_lite cpu: a tile product of ", m, " x ", n, " x ", k,
              " exceeds BLAS's 32-bit dimensions");
  const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
  std::optional<Scratch<T>> pa, pb, pc;
  if (lda > kBlasIntMax) {
    pa.emplace(a_rows * a_cols);
    copy_columns(a, lda, pa->data(), a_rows, a_rows, a_cols);
    a = pa->data();
    lda = std::max<int64_t>(a_rows, 1);
  }
  if (ldb > kBlasIntMax) {
    pb.emplace(b_rows * b_cols);
    copy_columns(b, ldb, pb->data(), b_rows, b_rows, b_cols);
    b = pb->data();
    ldb = std::max<int64_t>(b_rows, 1);
  }
  T* const c_out = c;
  const int64_t ldc_out = ldc;
  if (ldc > kBlasIntMax) {
    pc.emplace(m * n);
    if (beta != T(0)) copy_columns<T>(c, ldc, pc->data(), m, m, n);  // (beta 0: C is not read)
    c = pc->data();
    ldc = std::max<int64_t>(m, 1);
  }
  blas_gemm_int32<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  if (pc) copy_columns<T>(c, ldc, c_out, ldc_out, m, n);
}

// A unit of work of one head: a query block (forward) or a chunk of key blocks (backward)
// of one sequence.  Tasks are (head, unit); units are sorted by decreasing cost and
// claimed dynamically, so long sequences start first and short ones fill the gaps.
struct Unit {
  int64_t seq, begin, end;  // query rows (forward) or key blocks (backward) [begin, end)
  int64_t chunk;            // backward: which dQ partial it writes
  double cost;
};

inline void sort_by_cost(std::vector<Unit>& units) {
  std::stable_sort(units.begin(), units.end(), [](const Unit& a, const Unit& b) { return a.cost > b.cost; });
}

// After a worker's last product: oneDNN's brgemm holds the calling thread's AMX tile
// configuration until released (products_cpu.cpp; nothing to do for the other engines).
void release_products();

// Runs body(task, worker_state) for every task in [0, n), each exactly once, on
// at::get_num_threads() workers; ``make_state`` builds each worker's scratch.
template <typename MakeState, typename Body>
void run_tasks(int64_t n, MakeState&& make_state, Body&& body) {
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // (a nested call runs this once, serially: it then claims every task itself)
    // Each BLAS call runs on the calling worker alone: a call that MKL split among threads
    // of its own would sum in another order, and results would depend on the thread count.
    // (restored, and brgemm's tile state released, also when a task throws)
    struct Restore {
      int mkl_prev;
      ~Restore() {
        if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_prev);
        release_products();
      }
    } restore{MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0};
    const bool fresh = poison_scratch();
    auto state = make_state();
    for (int64_t t, done = 0; (t = next.fetch_add(1, std::memory_order_relaxed)) < n; ++done) {
      if (fresh && done > 0) state = make_state();
      body(t, state);
    }
  });
}

// ------------------------------------------------------------------ bf16 / fp16 products
// With bf16 (or fp16) inputs the tile products can run in that type with float32
// accumulation instead of widening to float32: whether they do is a process-wide choice
// per type (backends/cpu.py makes it, by measurement or FLASHATTN_LITE_CPU_MATMUL /
// FLASHATTN_LITE_CPU_MATMUL_FP16).  What is rounded where (as flash-attn on GPUs): Q, K
// and V are used as given; S = Q K^T accumulates in float32; the softmax runs in float32;
// P is rounded to the input type for P V, which accumulates in float32; the row sums are
// of the float32 P.
//
// The engines run these products on the same packed operands: this extension's own
// micro-kernels (bf16_gemm.h: vdpbf16ps for bf16 on CPUs with AVX512-BF16; pairs widened
// in registers and multiplied by float32 FMAs on AVX-512, for fp16, and for bf16 where its
// unit is missing or slow), or oneDNN's brgemm micro-kernel through torch's
// at::native::cpublas::brgemm (the pair layouts below are its VNNI layout of B), which
// uses AMX tiles on CPUs that have them (AMX-FP16 for fp16).  The measurement picks one,
// or float32, for each type.
//   kOwn: vdpbf16ps (bf16), widened pairs (fp16); kWiden: widened pairs (bf16 only).
enum class Engine : int { kOff = 0, kOwn = 1, kOneDnn = 2, kWiden = 3 };
Engine products_engine(bool half);  // half: fp16's choice, else bf16's

// The 16-bit types with products of their own (H = at::BFloat16 or at::Half).
template <typename H>
constexpr bool kPairType = (std::is_same_v<H, at::BFloat16> && (kHaveBf16Dot || kHaveF16Pairs)) ||
                           (std::is_same_v<H, at::Half> && kHaveF16Pairs);

// bf16 products on the bf16 unit (vdpbf16ps, or oneDNN's brgemm): the decoding kernel's
// bf16 scores use the unit too then.
inline bool bf16_products() {
  const Engine e = products_engine(false);
  return kHaveBf16Dot && (e == Engine::kOwn || e == Engine::kOneDnn);
}

// Whether tiles of this input type are multiplied in it (else widened).
inline bool pair_products(at::ScalarType t) {
  if (t == at::kBFloat16) return bf16_products() || (kHaveF16Pairs && products_engine(false) == Engine::kWiden);
  return t == at::kHalf && kHaveF16Pairs && products_engine(true) != Engine::kOff;
}

// C (M x N, row stride ldc) = alpha * A B (+ C with accumulate), A and B as bf16_gemm.h's
// pairs of H, through oneDNN's brgemm (products_cpu.cpp)
template <typename H>
void onednn_pair_gemm(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B,
                      int64_t ldb, float* C, int64_t ldc, float alpha, bool accumulate);

// This extension's micro-kernel for pairs of H.
template <typename H>
inline void own_pair_gemm(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B,
                          int64_t ldb, float* C, int64_t ldc, float alpha, bool accumulate) {
  if constexpr (std::is_same_v<H, at::Half>) {
    widen_gemm<false>(M, N, K2, A, lda, B, ldb, C, ldc, alpha, accumulate);
  } else {
    bf16_gemm(M, N, K2, A, lda, B, ldb, C, ldc, alpha, accumulate);
  }
}

// The tile products of H's path, on the chosen engine.
// (torch.backends.mkldnn switched off after the choice: oneDNN's brgemm would refuse, so
// the micro-kernel runs the same operands instead)
template <typename H>
inline void pair_gemm(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B,
                      int64_t ldb, float* C, int64_t ldc, float alpha, bool accumulate) {
  const Engine e = products_engine(std::is_same_v<H, at::Half>);
  if (e == Engine::kOneDnn && at::globalContext().userEnabledMkldnn()) {
    onednn_pair_gemm<H>(M, N, K2, A, lda, B, ldb, C, ldc, alpha, accumulate);
  } else if (std::is_same_v<H, at::BFloat16> && e == Engine::kWiden) {
    widen_gemm<true>(M, N, K2, A, lda, B, ldb, C, ldc, alpha, accumulate);
  } else {
    own_pair_gemm<H>(M, N, K2, A, lda, B, ldb, C, ldc, alpha, accumulate);
  }
}

// Round-to-nearest-even float -> H's bits.
template <typename H>
inline uint16_t half_bits(float x) {
  if constexpr (std::is_same_v<H, at::Half>) {
#ifdef __F16C__
    return uint16_t(_cvtss_sh(x, 0));  // (0: round to nearest even)
#else
    return at::Half(x).x;
#endif
  } else {
    return bf16_bits(x);
  }
}

// The row length of a kHeadDim pack (below) of a sequence of ``len`` rows: len rounded up
// to one of 8 values per octave (at most 1/8 more), plus 16 (so a vector read from any row
// stays inside, and the row stride is not a power of two, which would put a column's
// rows in one cache set).  The row length is the key stride of the products that read
// the pack, and oneDNN generates and keeps code for each stride it meets
// (products_cpu.cpp), so nearby key lengths share one.
inline int64_t dim_pack_ld(int64_t len) {
  int64_t step = 1;
  while (step * 16 < len) step *= 2;
  const int64_t ld = (len + step - 1) / step * step + 16;
  return (ld & (ld - 1)) == 0 ? ld + 16 : ld;
}

// A bf16/fp16 tensor's rows of every (sequence, head) as bf16_gemm.h's B operand, packed once
// per call (about as many bytes as the tensor has).  ``kHeadDimPairs``: pairs of the head
// dim W (ceil(W / 2) rows) x the sequence's rows, row length dim_pack_ld(len): K for
// S = Q K^T, V for dP = dO V^T.  ``kRowPairs``: pairs of
// sequence rows (ceil(len / 2) rows, the even row first) x W, row length ``ld``
// (W rounded up to 16): V for P V; K, Q and dO for the backward's dQ, dK, dV.  Padding is 0.
enum class Pairs { kHeadDim, kRows };

struct PairPack {
  at::Tensor buf;                // int32 storage of the uint32 pairs
  std::vector<int64_t> off;      // per (sequence * heads + head), in pairs
  int64_t heads = 0, ld = 0;     // ld: kRows' row length
  const uint32_t* at(int64_t s, int64_t h) const {
    return reinterpret_cast<const uint32_t*>(buf.data_ptr<int32_t>()) + off[s * heads + h];
  }
};

template <typename H>
inline uint32_t pair_bits(const H* lo, const H* hi) {
  return uint32_t(lo->x) | (hi ? uint32_t(hi->x) << 16 : 0u);
}

// t: logical 4-D (.., S, heads, W) of H (varlen: a batch of one); ``queries``: the rows
// of each sequence are its query rows (q0, len_q), else its key rows (k0, len_k).
template <typename H>
inline PairPack pack_pairs(const at::Tensor& t, const Problem& pr, bool queries, Pairs how) {
  const int64_t heads = t.size(2), W = t.size(3), W2 = (W + 1) / 2, nseq = int64_t(pr.seqs.size());
  auto rows_of = [&](const Seq& s) { return queries ? s.len_q : s.len_k; };
  PairPack pk;
  pk.heads = heads;
  pk.ld = (W + 15) / 16 * 16;
  int64_t total = 0;
  for (int64_t s = 0; s < nseq; ++s) {
    const int64_t len = rows_of(pr.seqs[s]);
    for (int64_t h = 0; h < heads; ++h) {
      pk.off.push_back(total);
      total += how == Pairs::kHeadDim ? W2 * dim_pack_ld(len) : (len + 1) / 2 * pk.ld;
    }
  }
  pk.buf = at::zeros({std::max<int64_t>(total, 1)}, t.options().dtype(at::kInt));
  uint32_t* out = reinterpret_cast<uint32_t*>(pk.buf.data_ptr<int32_t>());
  const auto* tp = t.data_ptr<H>();
  const int64_t rs = t.stride(1);
  at::parallel_for(0, nseq * heads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const Seq& sq = pr.seqs[task / heads];
      const int64_t h = task % heads, len = rows_of(sq);
      const H* src = tp + sq.pb * t.stride(0) + h * t.stride(2) + (queries ? sq.q0 : sq.k0) * rs;
      uint32_t* dst = out + pk.off[task];
      if (how == Pairs::kHeadDim) {
        const int64_t ld = dim_pack_ld(len);
        for (int64_t j = 0; j < len; ++j) {
          const H* row = src + j * rs;
          for (int64_t p = 0; p < W2; ++p)
            dst[p * ld + j] = pair_bits(row + 2 * p, 2 * p + 1 < W ? row + 2 * p + 1 : nullptr);
        }
      } else {
        for (int64_t p = 0; p < (len + 1) / 2; ++p) {
          const H* r0 = src + 2 * p * rs;
          const H* r1 = 2 * p + 1 < len ? r0 + rs : nullptr;
          for (int64_t c = 0; c < W; ++c) dst[p * pk.ld + c] = pair_bits(r0 + c, r1 ? r1 + c : nullptr);
        }
      }
    }
  });
  return pk;
}

// Rows [0, rows) of an H matrix (row stride ld, W long) as pairs, ceil(W / 2) a row.
template <typename H>
inline void row_pairs(const H* src, int64_t ld, int64_t rows, int64_t W, uint32_t* dst) {
  const int64_t W2 = (W + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * W2, src + r * ld, sizeof(H) * size_t(W));
    if (W % 2) reinterpret_cast<uint16_t*>(dst + r * W2)[W] = 0;
  }
}

// Row r of a float matrix (``cols`` long, times ``mul``) in H, its halves shifted by
// ``shift`` (0 or 1) so that pairs line up with a kRows pack's (the even row first); the
// spare halves are 0.  ``dst`` holds (shift + cols + 1) / 2 pairs.
template <typename H>
inline void float_row_pairs(const float* src, int64_t cols, int64_t shift, uint32_t* dst, float mul = 1.0f) {
  auto* h = reinterpret_cast<H*>(dst);
  h[0] = H(0.0f);
  if (mul == 1.0f) {
    at::vec::convert(src, h + shift, cols);
  } else {
    thread_local std::vector<float> scaled;
    if (scaled.size() < size_t(cols)) scaled.resize(size_t(cols));
    using fVec = at::vec::Vectorized<float>;
    at::vec::map([mul](fVec x) { return x * fVec(mul); }, scaled.data(), src, cols);
    at::vec::convert(scaled.data(), h + shift, cols);
  }
  if ((shift + cols) % 2) h[shift + cols] = H(0.0f);
}

// The transpose of rows [s0, s1) x columns [ca, ce) of a float matrix (row stride ld) in
// H pairs of rows: pair p of column j holds rows (2p - shift, 2p + 1 - shift) (relative
// to s0's pair), 0 outside [s0, s1).  Column j - ca at dst + (j - ca) * ldt.
template <typename H>
inline void float_cols_pairs(const float* src, int64_t ld, int64_t s0, int64_t s1, int64_t ca, int64_t ce,
                             int64_t shift, uint32_t* dst, int64_t ldt, float mul = 1.0f) {
  const int64_t pa = (shift + s0) / 2, pe = (shift + s1 + 1) / 2;
  for (int64_t p = pa; p < pe; ++p) {
    const int64_t lo = 2 * p - shift, hi = lo + 1;
    const float* rlo = lo >= s0 && lo < s1 ? src + lo * ld : nullptr;
    const float* rhi = hi >= s0 && hi < s1 ? src + hi * ld : nullptr;
    for (int64_t j = ca; j < ce; ++j) {
      const uint32_t a = rlo ? uint32_t(half_bits<H>(rlo[j] * mul)) : 0u;
      const uint32_t b = rhi ? uint32_t(half_bits<H>(rhi[j] * mul)) : 0u;
      dst[(j - ca) * ldt + (p - pa)] = a | (b << 16);
    }
  }
}

template <typename T>
Transform<T> make_transform(double softcap, const std::optional<at::Tensor>& slopes, int64_t batch,
                            int64_t heads) {
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "flashattn_lite cpu: softcap must be >= 0, got ", softcap);
  Transform<T> tf{T(softcap), nullptr, 0, 0, 0};
  if (slopes.has_value()) {
    const at::Tensor& s = *slopes;
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(0) == batch && s.size(1) == heads &&
                    s.device().is_cpu(),
                "flashattn_lite cpu: alibi_slopes must be float32 (batch, heads) = (", batch, ", ", heads,
                ") on the CPU, got ", s.scalar_type(), " ", s.sizes());
    tf.slopes = s.data_ptr<float>();
    tf.sb = s.stride(0);
    tf.sh = s.stride(1);
  }
  return tf;
}

// Calls f(bool_constant<kBias>, bool_constant<kDrop>): the feature switches as compile-time values.
template <typename F>
void with_features(bool has_bias, bool has_drop, F&& f) {
  using yes = std::true_type;
  using no = std::false_type;
  if (has_bias) {
    has_drop ? f(yes{}, yes{}) : f(yes{}, no{});
  } else {
    has_drop ? f(no{}, yes{}) : f(no{}, no{});
  }
}

// attention_fwd_cpu.cpp: out and lse (4-D tensors, prepared by the entry point).
void fwd_run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
             double scale, const Problem& pr, double softcap, const std::optional<at::Tensor>& slopes,
             const BiasView& bias, const Dropout& drop, bool has_drop);

// attention_bwd_cpu.cpp: dq, dk, dv (and dbias where not null) from compute-type tensors.
void bwd_run(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
             at::Tensor* dbias, double scale, const Problem& pr, double softcap,
             const std::optional<at::Tensor>& slopes, const BiasView& bias, const Dropout& drop, bool has_drop);

}  // namespace attention_cpu
}  // namespace flashattn_lite
