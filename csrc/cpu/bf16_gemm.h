// bf16 matrix products with float32 accumulation on the CPU's bf16 dot-product unit
// (AVX512-BF16: vdpbf16ps, on AMD Zen 4/5 and Intel Cooper Lake / Sapphire Rapids and
// later), for the forward and backward kernels' bf16 path (attention_cpu.h: "Products").
//
// Operands are pairs of bf16 along the reduction dim, each pair one uint32 (low half the
// even element):
//   A (M x K2 pairs), row m at A + m * lda: a row-major bf16 matrix with an even row
//     length (or zero-padded to one) read as uint32;
//   B (K2 x N), "VNNI" packed: element (p, n) holds B[2p][n] and B[2p + 1][n];
//     row p at B + p * ldb.  Rows must be readable 16 * kNV elements past any n < N
//     (pad the allocation), the products only keep columns < N.
// C[m][n] = alpha * sum_p A[m][p] . B[p][n] (+ C[m][n] with accumulate), m < M, n < N.
// Each product of two bf16 numbers is exact in float32; vdpbf16ps adds the two of a pair
// and the accumulator with float32 rounding (denormal inputs and outputs flush to zero).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FLASHATTN_LITE_BF16_DOT 1
#endif

namespace flashattn_lite {
namespace attention_cpu {

#if defined(__AVX512F__)
// The blocking both micro-kernels below share: C in blocks of 16 * NV columns (the last
// block's last vector masked by ``last``), rows in groups of MR, then one by one.
// tile(rows, nv, A, B, C, last) runs one register tile of ``rows`` (an integral_constant)
// rows and nv 16-column vectors.  An empty sum sets C to 0 (or leaves it, accumulating).
template <int MR, int NV, typename Tile>
inline void tiled_pair_gemm(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B,
                            float* C, int64_t ldc, bool accumulate, Tile&& tile) {
  if (M <= 0 || N <= 0) return;
  if (K2 <= 0) {  // an empty sum
    for (int64_t m = 0; m < M; ++m)
      if (!accumulate) std::memset(C + m * ldc, 0, sizeof(float) * size_t(N));
    return;
  }
  for (int64_t n0 = 0; n0 < N; n0 += 16 * NV) {
    const int64_t cols = N - n0 < 16 * NV ? N - n0 : 16 * NV;
    const int64_t nv = (cols + 15) / 16;
    const int64_t tail = cols - 16 * (nv - 1);
    const __mmask16 last = __mmask16((1u << tail) - 1u);
    int64_t m = 0;
    for (; m + MR <= M; m += MR)
      tile(std::integral_constant<int, MR>{}, nv, A + m * lda, B + n0, C + m * ldc + n0, last);
    for (; m < M; ++m) tile(std::integral_constant<int, 1>{}, nv, A + m * lda, B + n0, C + m * ldc + n0, last);
  }
}
#endif

#ifdef FLASHATTN_LITE_BF16_DOT
constexpr bool kHaveBf16Dot = true;

constexpr int kMR = 4;  // rows of C per register tile
constexpr int kNV = 4;  // 16-column vectors of C per register tile: 16 accumulators

template <int MR, int NV>
inline void bf16_tile(int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B, int64_t ldb, float* C,
                      int64_t ldc, float alpha, bool accumulate, __mmask16 last) {
  __m512 c[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) c[m][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < K2; ++p) {
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(B + p * ldb + 16 * v);
    for (int m = 0; m < MR; ++m) {
      const __m512i a = _mm512_set1_epi32(int(A[m * lda + p]));
      for (int v = 0; v < NV; ++v) c[m][v] = _mm512_dpbf16_ps(c[m][v], (__m512bh)a, (__m512bh)b[v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV; ++v) {
      const __mmask16 k = v == NV - 1 ? last : __mmask16(0xFFFF);
      float* dst = C + m * ldc + 16 * v;
      __m512 r = _mm512_mul_ps(c[m][v], va);
      if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(k, dst));
      _mm512_mask_storeu_ps(dst, k, r);
    }
  }
}

template <int MR>
inline void bf16_rows(int64_t nv, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B, int64_t ldb, float* C,
                      int64_t ldc, float alpha, bool accumulate, __mmask16 last) {
  switch (nv) {
    case 1: return bf16_tile<MR, 1>(K2, A, lda, B, ldb, C, ldc, alpha, accumulate, last);
    case 2: return bf16_tile<MR, 2>(K2, A, lda, B, ldb, C, ldc, alpha, accumulate, last);
    case 3: return bf16_tile<MR, 3>(K2, A, lda, B, ldb, C, ldc, alpha, accumulate, last);
    default: return bf16_tile<MR, kNV>(K2, A, lda, B, ldb, C, ldc, alpha, accumulate, last);
  }
}

inline void bf16_gemm(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B,
                      int64_t ldb, float* C, int64_t ldc, float alpha, bool accumulate) {
  tiled_pair_gemm<kMR, kNV>(M, N, K2, A, lda, B, C, ldc, accumulate,
                            [&](auto rows, int64_t nv, const uint32_t* a, const uint32_t* b, float* c, __mmask16 last) {
                              bf16_rows<decltype(rows)::value>(nv, K2, a, lda, b, ldb, c, ldc, alpha, accumulate, last);
                            });
}

#else
constexpr bool kHaveBf16Dot = false;

inline void bf16_gemm(int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t, float*, int64_t,
                      float, bool) {}
#endif

// ------------------------------------------------------------------ pairs widened in registers
// The same operands, multiplied by float32 FMAs: each 16-bit half is widened to float32
// in registers (fp16: vcvtph2ps; bf16: a shift), and a product of two fp16 or two bf16
// numbers is exact in float32.  The even and the odd element of the pairs accumulate in
// separate lanes, added at the end.  For fp16 on any CPU with AVX-512 (and the parts of a
// product oneDNN does not run), and for bf16 on CPUs whose bf16 dot-product unit is
// missing or slow.
#if defined(__AVX512F__)
constexpr bool kHaveF16Pairs = true;  // (and bf16 pairs widened)

constexpr int kMR16 = 4;  // rows of C per register tile
constexpr int kNV16 = 2;  // 16-column vectors of C per register tile: 16 accumulators

// 16 halves (fp16, or bf16 with kBf16) as 16 floats
template <bool kBf16>
inline __m512 widen16(__m256i x) {
  if constexpr (kBf16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
  } else {
    return _mm512_cvtph_ps(x);
  }
}

template <bool kBf16, int MR, int NV>
inline void widen_tile(int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B, int64_t ldb, float* C,
                     int64_t ldc, float alpha, bool accumulate, __mmask16 last) {
  __m512 lo[MR][NV], hi[MR][NV];  // lanes (2j, 2j + 1): column j's even and odd products
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) lo[m][v] = hi[m][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < K2; ++p) {
    __m512 blo[NV], bhi[NV];
    for (int v = 0; v < NV; ++v) {
      const __m512i b = _mm512_loadu_si512(B + p * ldb + 16 * v);
      blo[v] = widen16<kBf16>(_mm512_castsi512_si256(b));        // columns 0-7 of the vector
      bhi[v] = widen16<kBf16>(_mm512_extracti64x4_epi64(b, 1));  // columns 8-15
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 a = widen16<kBf16>(_mm256_set1_epi32(int(A[m * lda + p])));  // (a0, a1) repeated
      for (int v = 0; v < NV; ++v) {
        lo[m][v] = _mm512_fmadd_ps(a, blo[v], lo[m][v]);
        hi[m][v] = _mm512_fmadd_ps(a, bhi[v], hi[m][v]);
      }
    }
  }
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512 va = _mm512_set1_ps(alpha);
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV; ++v) {
      const __mmask16 k = v == NV - 1 ? last : __mmask16(0xFFFF);
      float* dst = C + m * ldc + 16 * v;
      const __m512 sum = _mm512_add_ps(_mm512_permutex2var_ps(lo[m][v], even, hi[m][v]),
                                       _mm512_permutex2var_ps(lo[m][v], odd, hi[m][v]));
      __m512 r = _mm512_mul_ps(sum, va);
      if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(k, dst));
      _mm512_mask_storeu_ps(dst, k, r);
    }
  }
}

template <bool kBf16, int MR>
inline void widen_rows(int64_t nv, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B, int64_t ldb,
                       float* C, int64_t ldc, float alpha, bool accumulate, __mmask16 last) {
  if (nv == 1) return widen_tile<kBf16, MR, 1>(K2, A, lda, B, ldb, C, ldc, alpha, accumulate, last);
  return widen_tile<kBf16, MR, kNV16>(K2, A, lda, B, ldb, C, ldc, alpha, accumulate, last);
}

// bf16_gemm's contract, with fp16 pairs (or bf16 pairs with kBf16), widened in registers.
template <bool kBf16>
inline void widen_gemm(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B,
                       int64_t ldb, float* C, int64_t ldc, float alpha, bool accumulate) {
  tiled_pair_gemm<kMR16, kNV16>(M, N, K2, A, lda, B, C, ldc, accumulate,
                                [&](auto rows, int64_t nv, const uint32_t* a, const uint32_t* b, float* c,
                                    __mmask16 last) {
                                  widen_rows<kBf16, decltype(rows)::value>(nv, K2, a, lda, b, ldb, c, ldc, alpha,
                                                                           accumulate, last);
                                });
}
#else
constexpr bool kHaveF16Pairs = false;

template <bool kBf16>
inline void widen_gemm(int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t, float*,
                       int64_t, float, bool) {}
#endif

// Round-to-nearest-even float -> bf16 bits (NaN stays NaN).
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace attention_cpu
}  // namespace flashattn_lite
