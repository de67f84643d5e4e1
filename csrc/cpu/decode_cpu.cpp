// CPU KV-cache decoding with split-KV: flashattn_lite_C::decode (schema in ops.cpp).
//
// The cache is paged, (num_blocks, page_size, kv_heads, headdim) with any strides and a
// unit last stride: position p of sequence b is row p % page_size of block
// block_table[b, p / page_size] (a contiguous cache arrives as one page per sequence).
// Valid keys of sequence b are positions [leftpad[b], seqlens_k[b]); query row i sits
// at position seqlens_k[b] - seqlen_q + i, and key p is visible to it iff
//   i + offset - window_left <= p <= i + offset + window_right,  offset = seqlens_k[b] - seqlen_q
// (a negative bound is unbounded).  Scores: scale * q.k, or softcap * tanh(scale * q.k /
// softcap), then ALiBi -slope * |i + offset - p|.  A row that sees nothing: out 0, lse -inf.
//
// Parallel over (batch, kv head, split) tasks: a task holds every query row of its GQA
// group (seqlen_q x group rows), so each key and value row it reads serves the whole
// group (fp16/bf16/8-bit rows are widened in registers, once per register block of the group's rows).  With more than one split each task
// writes a normalised partial output and its lse, and a second pass over (batch, row,
// head) merges the splits: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s.
// Every output is computed by one task in a fixed order: the result depends on the split
// count only, never on the scheduling.  (num_splits = 0 derives the split count from the
// thread count; pass a count to get the same bits whatever the threads.)

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "attention_cpu.h"  // attention_cpu::bf16_products(): the process-wide choice

namespace flashattn_lite {
namespace {

constexpr int64_t kDecodeKeyTile = 64;  // cache positions gathered per step
constexpr int64_t kDecodeMaxSplits = 128;
constexpr int64_t kDecodeMinKeysPerSplit = 256;

struct DecodeShape {
  int64_t batch, seqlen_q, heads, heads_k, group, head_dim, head_dim_v, page_size, splits;  // Dv != D: MLA
  int64_t heads_per_task;  // kv heads one task reads (divides heads_k)
  int64_t left, right;  // < 0: unbounded
  double scale, softcap;
};

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Prefetch hint for the next tile's cache rows: __builtin_prefetch locality 2 (prefetcht1,
// into L2).  Measured on 2 cores (16 x 8 heads x 1024 positions, caches cycled through
// memory): without it, bf16 rows of two lines 1 KiB apart stream at 12 GB/s instead of 20;
// locality 3 (into L1) evicts the tile being read (fp32 30% slower); 1 is the same as 2.
constexpr int kDecodePrefetchLocality = 2;

// Walks cache positions p, p + 1, ... of one sequence through its block-table row
// (``table``, entries ``tsp`` apart; pages of P positions) without a division per step.
struct PageWalk {
  const int32_t* table;
  int64_t tsp, P, page, row, blk;
  // at position p; its page is looked up only if ``valid`` (p is in range)
  PageWalk(const int32_t* t, int64_t tsp_, int64_t P_, int64_t p, bool valid)
      : table(t), tsp(tsp_), P(P_), page(valid ? p / P_ : 0), row(valid ? p % P_ : 0), blk(0) {
    if (valid) blk = table[page * tsp];
  }
  // to the next position; its page is looked up only if ``valid`` (it is in range)
  void next(bool valid) {
    if (++row == P && valid) {
      row = 0;
      blk = table[(++page) * tsp];
    }
  }
};

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  Vec<T> acc(T(0));
  int64_t d = 0;
  for (; d + Vec<T>::size() <= n; d += Vec<T>::size()) acc = at::vec::fmadd(Vec<T>::loadu(a + d), Vec<T>::loadu(b + d), acc);
  T s = at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& y) { return x + y; }, acc);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

// y += w * x
template <typename T>
inline void axpy(T* y, const T* x, T w, int64_t n) {
  const Vec<T> wv(w);
  int64_t d = 0;
  for (; d + Vec<T>::size() <= n; d += Vec<T>::size())
    at::vec::fmadd(wv, Vec<T>::loadu(x + d), Vec<T>::loadu(y + d)).store(y + d);
  for (; d < n; ++d) y[d] += w * x[d];
}

// ---- float rows: the scores of a whole block of keys at once, and P @ V in registers.
// One key's dot product leaves a vector of partial sums; sum_lanes reduces W of them
// (W = lanes per vector) into one vector, lane j the sum of a[j], in about 3 instructions
// per key instead of a horizontal reduction each.
using fVec = Vec<float>;
constexpr int64_t W = fVec::size();

__attribute__((always_inline)) inline fVec sum_lanes(const fVec* a) {
#if defined(__AVX512F__) && defined(CPU_CAPABILITY_AVX512)
  // pairs interleaved (32-bit, then 64-bit halves): each 128-bit block k of c[i] holds
  // block k's partial sums of a[4i .. 4i+3]; then the four blocks are summed across.
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // 0x88: blocks (0, 2) of each operand; 0xDD: blocks (1, 3)
  const __m512 f01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 f23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(f01, f23, 0x88), _mm512_shuffle_f32x4(f01, f23, 0xDD));
#elif defined(__AVX2__) && defined(CPU_CAPABILITY_AVX2)
  __m256 b[4], c[2];
  for (int i = 0; i < 4; ++i)
    b[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i) {
    const __m256d x = _mm256_castps_pd(b[2 * i]), y = _mm256_castps_pd(b[2 * i + 1]);
    c[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(c[0], c[1], 0x20), _mm256_permute2f128_ps(c[0], c[1], 0x31));
#else
  float out[W];
  for (int64_t j = 0; j < W; ++j)
    out[j] = at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, a[j]);
  return fVec::loadu(out);
#endif
}

// 8-bit cache codes (flashattn_lite/quant.py): int8, or float8_e4m3fn.  Their values are
// exact in float32; the position's descale multiplies the score / the probability, never
// a widened copy of the cache.
template <typename T>
constexpr bool kIsCode = std::is_same_v<T, int8_t> || std::is_same_v<T, c10::Float8_e4m3fn>;

inline float code_to_float(int8_t c) { return float(c); }
inline float code_to_float(c10::Float8_e4m3fn c) { return float(c); }

// W codes as one float vector
inline fVec widen_codes(const int8_t* p) {
#if defined(__AVX512F__) && defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__) && defined(CPU_CAPABILITY_AVX2)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  float t[W];
  for (int64_t j = 0; j < W; ++j) t[j] = float(p[j]);
  return fVec::loadu(t);
#endif
}

// e4m3fn bits s eeee mmm, 0x7F/0xFF NaN.  (torch's AVX512 capability implies AVX512BW/VL,
// which the first path uses.)
inline fVec widen_codes(const c10::Float8_e4m3fn* p) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(CPU_CAPABILITY_AVX512)
  // e4m3 is float16 with the exponent's top bit and 7 mantissa bits cut off: its bits moved
  // up 7 (the sign to bit 15) are the float16 of its value times 2^-8, subnormals included;
  // the hardware float16 conversion then does the rest (4 operations per 16 codes)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7),
                                     _mm256_set1_epi16(static_cast<short>(0xBF80)));
  const __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.0f));
  const __mmask16 is_nan = _mm_cmpeq_epi8_mask(_mm_and_si128(b, _mm_set1_epi8(0x7F)), _mm_set1_epi8(0x7F));
  return _mm512_mask_blend_ps(is_nan, v, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
#elif defined(__AVX2__) && defined(__F16C__) && defined(CPU_CAPABILITY_AVX2)
  // the same float16 route with F16C (every AVX2 CPU has it): 8 codes per conversion.  A NaN
  // code (0x7F, 0xFF) comes out as +-480, which no finite code gives (the largest is 448),
  // so the float compare finds it without widening a byte mask
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), _mm_set1_epi16(static_cast<short>(0xBF80)));
  const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
  const __m256 is_nan =
      _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), v), _mm256_set1_ps(480.0f), _CMP_EQ_OQ);
  return _mm256_blendv_ps(v, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), is_nan);
#elif defined(__AVX2__) && defined(CPU_CAPABILITY_AVX2)
  // without F16C: a normal code (e > 0) is float32 bits with the exponent rebiased (+120) and the mantissa
  // moved up 20 bits; a subnormal (e = 0) is m * 2^-9.  Built from integers, so it holds with
  // denormals flushed (no float32 subnormal is made).
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i mag = _mm256_and_si256(b, _mm256_set1_epi32(0x7F));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  const __m256 normal = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23)), sign));
  const __m256 sub = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(7))),
                                        _mm256_set1_ps(1.0f / 512.0f))), sign));
  const __m256 is_sub = _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x78)), _mm256_setzero_si256()));
  const __m256 is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7F)));
  return _mm256_blendv_ps(_mm256_blendv_ps(normal, sub, is_sub),
                          _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), is_nan);
#else
  float t[W];
  for (int64_t j = 0; j < W; ++j) t[j] = float(p[j]);
  return fVec::loadu(t);
#endif
}

// 2W elements of a row as two float vectors; load2_part: ``count`` of them (the rest 0).
template <typename src_t>
inline void load2(const src_t* p, fVec& lo, fVec& hi) {
  if constexpr (std::is_same_v<src_t, float>) {
    lo = fVec::loadu(p);
    hi = fVec::loadu(p + W);
  } else if constexpr (kIsCode<src_t>) {
    lo = widen_codes(p);
    hi = widen_codes(p + W);
  } else {
    static_assert(Vec<src_t>::size() == 2 * W, "a half-precision vector widens to two float vectors");
    std::tie(lo, hi) = at::vec::convert_to_float<src_t>(Vec<src_t>::loadu(p));
  }
}

template <typename src_t>
inline void load2_part(const src_t* p, int64_t count, fVec& lo, fVec& hi) {
  if (count >= 2 * W) return load2(p, lo, hi);
  if constexpr (std::is_same_v<src_t, float>) {
    lo = fVec::loadu(p, std::min(count, W));
    hi = count > W ? fVec::loadu(p + W, count - W) : fVec(0.f);
  } else if constexpr (kIsCode<src_t>) {
    float t[2 * W] = {};
    for (int64_t j = 0; j < count; ++j) t[j] = code_to_float(p[j]);
    lo = fVec::loadu(t);
    hi = fVec::loadu(t + W);
  } else {
    std::tie(lo, hi) = at::vec::convert_to_float<src_t>(Vec<src_t>::loadu(p, count));
  }
}

// ---- 8-bit, fp16 and bf16 caches: a GQA group's rows share every widened key and value.
// Widening costs about as much as the multiply-add it feeds, so the group's query rows are
// taken together: each key row is widened once per tile and used by kRowBlock rows
// (scores), each value row once per kRowBlock rows (P @ V), instead of once per row.
constexpr int64_t kRowBlock = W >= 16 ? 4 : 2;  // most rows per register block (scores: rows x W / rows keys)

// Where a code costs many operations to widen and the register blocks are short (e4m3 with
// 8-lane vectors: about 8 operations per 8 codes, and 2-row blocks, so each row would be
// widened twice for the scores and twice for P @ V), a tile's rows are widened once into
// float scratch instead, and the blocks read that.
template <typename code_t>
constexpr bool kWidenTileOnce = std::is_same_v<code_t, c10::Float8_e4m3fn> && W < 16;

// rows[j][0, len) widened into out + j * len, and rows[j] pointed there, for j in [0, n)
template <typename code_t>
void widen_tile(const code_t** rows, int64_t n, int64_t len, float* out, const float** widened) {
  for (int64_t j = 0; j < n; ++j) {
    float* dst = out + j * len;
    int64_t d = 0;
    for (; d + W <= len; d += W) widen_codes(rows[j] + d).store(dst + d);
    for (; d < len; ++d) dst[d] = code_to_float(rows[j][d]);
    widened[j] = dst;
  }
}

// A register block of RB query rows (RB <= kRowBlock) x KeyBlock<RB> keys, W accumulators.
template <int64_t RB>
constexpr int64_t kKeys = W / RB;

// acc[u * kKeys<RB> + jj] += q rows qr[u] times key rows kr[jj], lane-wise over D (sum_lanes
// adds each up); kWhole: D is a multiple of 2W (whole loads, constant trip counts)
template <bool kWhole, int64_t RB, typename code_t>
__attribute__((always_inline)) inline void scores_register_block(const float* const* qr, const code_t* const* kr, int64_t D, fVec* acc) {
  constexpr int64_t KB = kKeys<RB>;
  for (int64_t d = 0; d < D; d += 2 * W) {
    const int64_t c = kWhole ? 2 * W : std::min(2 * W, D - d);
    fVec q0[RB], q1[RB];
#pragma GCC unroll 4
    for (int64_t u = 0; u < RB; ++u) {
      if constexpr (kWhole) {
        load2(qr[u] + d, q0[u], q1[u]);
      } else {
        load2_part(qr[u] + d, c, q0[u], q1[u]);
      }
    }
#pragma GCC unroll 16
    for (int64_t jj = 0; jj < KB; ++jj) {
      fVec k0, k1;
      if constexpr (kWhole) {
        load2(kr[jj] + d, k0, k1);
      } else {
        load2_part(kr[jj] + d, c, k0, k1);
      }
#pragma GCC unroll 4
      for (int64_t u = 0; u < RB; ++u)
        acc[u * KB + jj] = at::vec::fmadd(q1[u], k1, at::vec::fmadd(q0[u], k0, acc[u * KB + jj]));
    }
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(CPU_CAPABILITY_AVX512)
constexpr bool kDpbf16 = true;
// bf16 query rows (as given) against bf16 key rows with vdpbf16ps, 32 elements a step: a
// product of two bf16 numbers is exact in float32 and the pairs are summed in float32
// (round to nearest, as an fma), so the scores match the widened path's to float32
// rounding, without widening the keys.  (It flushes denormals, below 1.2e-38, to 0, inputs
// and results: these bits depend on the host's instructions and on the products choice,
// never on the thread count.)
template <bool kWhole, int64_t RB>
__attribute__((always_inline)) inline void scores_register_block(const at::BFloat16* const* qr,
                                                                 const at::BFloat16* const* kr, int64_t D, fVec* acc) {
  constexpr int64_t KB = kKeys<RB>;
  for (int64_t d = 0; d < D; d += 32) {
    const int64_t c = kWhole ? 32 : std::min<int64_t>(32, D - d);
    const __mmask32 mk = c == 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << c) - 1u);
    __m512i qv[RB];
#pragma GCC unroll 4
    for (int64_t u = 0; u < RB; ++u) qv[u] = _mm512_maskz_loadu_epi16(mk, qr[u] + d);
#pragma GCC unroll 16
    for (int64_t jj = 0; jj < KB; ++jj) {
      const __m512i kv = _mm512_maskz_loadu_epi16(mk, kr[jj] + d);
#pragma GCC unroll 4
      for (int64_t u = 0; u < RB; ++u)
        acc[u * KB + jj] = _mm512_dpbf16_ps(acc[u * KB + jj], (__m512bh)qv[u], (__m512bh)kv);
    }
  }
}
#else
constexpr bool kDpbf16 = false;
#endif

// S[u * ld + j] = q_u . rows[j] for the RB rows of ``q`` (RB x D) and j in [0, n)
template <int64_t RB, typename q_t, typename code_t>
void scores_rows(const q_t* q, int64_t D, const code_t* const* rows, int64_t n, float* S, int64_t ld) {
  constexpr int64_t KB = kKeys<RB>;
  const q_t* qr[RB];
  for (int64_t u = 0; u < RB; ++u) qr[u] = q + u * D;
  for (int64_t j0 = 0; j0 < n; j0 += KB) {
    const int64_t kb = std::min(KB, n - j0);
    const code_t* kr[KB];  // (a short key block repeats its last key)
    for (int64_t jj = 0; jj < KB; ++jj) kr[jj] = rows[j0 + std::min(jj, kb - 1)];
    fVec acc[W];  // lane block u * KB + jj: row u, key j0 + jj (RB * KB <= W of them)
    for (int64_t t = 0; t < W; ++t) acc[t] = fVec(0.f);
    // a head dim that is a multiple of 2W: constant trip counts and no partial loads, so
    // the accumulators stay in registers
    if (D % (2 * W) == 0) {
      scores_register_block<true, RB>(qr, kr, D, acc);
    } else {
      scores_register_block<false, RB>(qr, kr, D, acc);
    }
    if constexpr (RB == 1) {  // lane jj is key j0 + jj: stored in place
      sum_lanes(acc).store(S + j0, kb);
    } else {
      float sums[W];
      sum_lanes(acc).store(sums);
      for (int64_t u = 0; u < RB; ++u)
        for (int64_t jj = 0; jj < kb; ++jj) S[u * ld + j0 + jj] = sums[u * KB + jj];
    }
  }
}

// S[r * ld + j] = q_r . rows[j] for the R rows of ``q`` (R x D, float; or bf16 against bf16
// rows, kDpbf16) and j in [0, n): blocks of kRowBlock rows, and one of the R % kRowBlock
// left (each row count its own register block, so no row is computed twice)
template <typename q_t, typename code_t>
void group_scores(const q_t* q, int64_t R, int64_t D, const code_t* const* rows, int64_t n, float* S, int64_t ld) {
  for (int64_t r0 = 0; r0 < R; r0 += kRowBlock) {
    const q_t* qb = q + r0 * D;
    float* Sb = S + r0 * ld;
    switch (std::min(kRowBlock, R - r0)) {
      case 1: scores_rows<1>(qb, D, rows, n, Sb, ld); break;
      case 2: scores_rows<2>(qb, D, rows, n, Sb, ld); break;
      case 3: if constexpr (kRowBlock >= 3) scores_rows<3>(qb, D, rows, n, Sb, ld); break;
      default: if constexpr (kRowBlock >= 4) scores_rows<4>(qb, D, rows, n, Sb, ld); break;
    }
  }
}

// One register block of group_accumulate: RB rows of a (row stride Dv) and P (row stride
// ld), columns [d, d + len), over the keys [0, n).  kWhole: len = 4W, whole loads and
// constant trip counts, so the accumulators stay in registers (with partial columns the
// compiler keeps them on the stack).  One row alone alternates two sets of accumulators
// (even and odd keys) to hide the fma latency.
template <bool kWhole, int64_t RB, typename code_t>
__attribute__((always_inline)) inline void accumulate_register_block(float* a, int64_t Dv, const code_t* const* rows,
                                                                    int64_t d, int64_t len, const float* P,
                                                                    int64_t ld, int64_t n) {
  constexpr int64_t kSets = RB == 1 ? 2 : 1;
  auto count = [&](int64_t c) { return std::clamp<int64_t>(len - c * W, 0, W); };  // (partial blocks)
  fVec acc[kSets][RB][4];
#pragma GCC unroll 4
  for (int64_t u = 0; u < RB; ++u)
#pragma GCC unroll 4
    for (int64_t c = 0; c < 4; ++c) {
      acc[0][u][c] = kWhole ? fVec::loadu(a + u * Dv + d + c * W) : fVec::loadu(a + u * Dv + d + c * W, count(c));
      if constexpr (kSets == 2) acc[1][u][c] = fVec(0.f);
    }
  // (always inlined: as a call, the accumulators would go through memory every key)
  auto step = [&](fVec (&sum)[RB][4], int64_t j) __attribute__((always_inline)) {
    fVec v[4];
    if constexpr (kWhole) {
      load2(rows[j] + d, v[0], v[1]);
      load2(rows[j] + d + 2 * W, v[2], v[3]);
    } else {
      load2_part(rows[j] + d, len, v[0], v[1]);
      if (len > 2 * W) {
        load2_part(rows[j] + d + 2 * W, len - 2 * W, v[2], v[3]);
      } else {
        v[2] = v[3] = fVec(0.f);
      }
    }
#pragma GCC unroll 4
    for (int64_t u = 0; u < RB; ++u) {
      const fVec w(P[u * ld + j]);
#pragma GCC unroll 4
      for (int64_t c = 0; c < 4; ++c) sum[u][c] = at::vec::fmadd(w, v[c], sum[u][c]);
    }
  };
  int64_t j = 0;
  for (; j + kSets <= n; j += kSets) {
    step(acc[0], j);
    if constexpr (kSets == 2) step(acc[1], j + 1);
  }
  if (j < n) step(acc[0], j);
#pragma GCC unroll 4
  for (int64_t u = 0; u < RB; ++u)
#pragma GCC unroll 4
    for (int64_t c = 0; c < 4; ++c) {
      const fVec r = kSets == 2 ? acc[0][u][c] + acc[kSets - 1][u][c] : acc[0][u][c];
      if constexpr (kWhole) {
        r.store(a + u * Dv + d + c * W);
      } else {
        r.store(a + u * Dv + d + c * W, count(c));  // (a count of 0 stores nothing)
      }
    }
}

template <int64_t RB, typename code_t>
void accumulate_rows_block(float* a, int64_t Dv, const code_t* const* rows, const float* P, int64_t n, int64_t ld) {
  for (int64_t d = 0; d < Dv; d += 4 * W) {
    const int64_t len = std::min(4 * W, Dv - d);
    if (len == 4 * W) {
      accumulate_register_block<true, RB>(a, Dv, rows, d, len, P, ld, n);
    } else {
      accumulate_register_block<false, RB>(a, Dv, rows, d, len, P, ld, n);
    }
  }
}

// a[r * Dv + d] += sum_j P[r * ld + j] rows[j][d] for the R rows, j in [0, n)
template <typename code_t>
void group_accumulate(float* a, int64_t R, int64_t Dv, const code_t* const* rows, const float* P, int64_t n,
                      int64_t ld) {
  for (int64_t r0 = 0; r0 < R; r0 += kRowBlock) {
    float* ab = a + r0 * Dv;
    const float* Pb = P + r0 * ld;
    switch (std::min(kRowBlock, R - r0)) {
      case 1: accumulate_rows_block<1>(ab, Dv, rows, Pb, n, ld); break;
      case 2: accumulate_rows_block<2>(ab, Dv, rows, Pb, n, ld); break;
      case 3: if constexpr (kRowBlock >= 3) accumulate_rows_block<3>(ab, Dv, rows, Pb, n, ld); break;
      default: if constexpr (kRowBlock >= 4) accumulate_rows_block<4>(ab, Dv, rows, Pb, n, ld); break;
    }
  }
}

// x[j] = exp(x[j] - shift) in place; returns the sum
template <typename T>
inline T exp_shifted_sum(T* x, int64_t n, T shift) {
  const Vec<T> sv(shift);
  Vec<T> acc(T(0));
  int64_t j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
    const Vec<T> e = (Vec<T>::loadu(x + j) - sv).exp();
    e.store(x + j);
    acc = acc + e;
  }
  T s = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    s += x[j];
  }
  return s;
}

// Descales of an 8-bit cache: float32 per (block, row, kv head), with strides (0 where broadcast).
struct Descales {
  const float* k = nullptr;
  int64_t k0 = 0, k1 = 0, k2 = 0;
  const float* v = nullptr;
  int64_t v0 = 0, v1 = 0, v2 = 0;
};

// scalar_t: q and out; cache_t: the caches' elements (scalar_t, or an 8-bit code with descales)
template <typename scalar_t, typename cache_t, typename acc_t>
void decode_tasks(const DecodeShape& sh, const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                  const at::Tensor& table, const int32_t* ends, const int32_t* starts, const at::Tensor* slopes,
                  const Descales& dsc, at::Tensor& out, at::Tensor& lse, acc_t* part_o, acc_t* part_lse) {
  constexpr bool kQuant = kIsCode<cache_t>;
  static_assert(!kQuant || std::is_same_v<acc_t, float>, "8-bit caches are read by the float kernels");
  // kGroup: the scores and P @ V of a tile for the whole GQA group at once (group_scores,
  // group_accumulate: register blocks of rows x keys, each cache row widened once per block
  // of rows); 8-bit, fp16 and bf16 caches.  Float32 caches: row by row, each row its own
  // one-row block (nothing to widen); float64: scalar dot and axpy.
  constexpr bool kGroup = kQuant || (std::is_same_v<acc_t, float> && !std::is_same_v<cache_t, acc_t>);
  // bf16 caches with the bf16 products chosen (products_cpu.cpp): the scores by vdpbf16ps
  // from q's bf16 rows as given; otherwise the keys are widened
  const bool dp = kDpbf16 && std::is_same_v<cache_t, at::BFloat16> && attention_cpu::bf16_products();
  const int64_t B = sh.batch, Sq = sh.seqlen_q, H = sh.heads, Hk = sh.heads_k, G = sh.group, D = sh.head_dim,
                Dv = sh.head_dim_v;
  const int64_t R = Sq * G, S = sh.splits, P = sh.page_size;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const cache_t* kp = kc.data_ptr<cache_t>();
  const cache_t* vp = vc.data_ptr<cache_t>();
  const int32_t* tp = table.data_ptr<int32_t>();
  const int64_t qsb = q.stride(0), qss = q.stride(1), qsh = q.stride(2);
  const int64_t ksb = kc.stride(0), kss = kc.stride(1), ksh = kc.stride(2);
  const int64_t vsb = vc.stride(0), vss = vc.stride(1), vsh = vc.stride(2);
  const int64_t tsb = table.stride(0), tsp = table.size(1) > 1 ? table.stride(1) : 0;
  const float* sp = slopes ? slopes->data_ptr<float>() : nullptr;
  const int64_t ssb = slopes ? slopes->stride(0) : 0, ssh = slopes ? slopes->stride(1) : 0;
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  const acc_t scale = acc_t(sh.scale), cap = acc_t(sh.softcap);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  // fp16/bf16 cache rows that are not adjacent: prefetch them (see the gather loop).  Not
  // fp32/fp64 rows: measured on 2 cores, the prefetch gained them at most 3% and cost
  // 10-30% where rows sit 4 KiB or more apart (a page each), in L3 and from memory alike
  // (e.g. 1 x 32 x 8 x 128 fp32, 65536 positions: 43-44 ms with it, 37-38 without)
  // (8-bit rows: prefetched as fp16/bf16 rows are)
  const bool spread = sizeof(cache_t) <= 2 && (kss != D || vss != Dv);
  // positions per tile: with every kv head in a task, the tile's rows of all heads (tile x
  // heads_k x (D + Dv) bytes) about 64 KiB, so they stay in L1/L2 while each head's group
  // reads them (measured on 2 cores, 4 x 32 / 8 heads x d128 int8: 16 positions a tile
  // 1.33-1.53x the bf16 cache, 32 positions 1.60x, 64 1.56-1.63x; noisy within +-10%)
  const int64_t tile = sh.heads_per_task > 1 ? std::clamp<int64_t>(
      65536 / std::max<int64_t>(1, sh.heads_per_task * (D + Dv) * int64_t(sizeof(cache_t))), 4, kDecodeKeyTile)
                                              : kDecodeKeyTile;

  // kv heads per task: one, or all of them (heads_per_task, below), so that a task reads each
  // position's rows of every head together (in the flash layout, one contiguous stretch)
  // instead of a head's 2-line row every heads_k x headdim bytes
  const int64_t HB = sh.heads_per_task, tasks_per_b = Hk / HB;
  at::parallel_for(0, B * tasks_per_b * S, 1, [&](int64_t begin, int64_t finish) {
    std::vector<acc_t> qf(HB * R * D), acc(HB * R * Dv), m(HB * R), l(HB * R);
    std::vector<acc_t> sc(kDecodeKeyTile);
    // kGroup: the tile's scores, then probabilities, of every row of the group (R x tile)
    std::vector<float> gs(kGroup ? R * kDecodeKeyTile : 0);
    std::vector<scalar_t> qb(dp ? HB * R * D : 0);  // (dp: q's rows as given)
    // kWidenTileOnce: the tile's key and value rows of one head, widened
    std::vector<float> wk(kWidenTileOnce<cache_t> ? kDecodeKeyTile * D : 0),
        wv(kWidenTileOnce<cache_t> ? kDecodeKeyTile * Dv : 0);
    const float* wkrow[kDecodeKeyTile];
    const float* wvrow[kDecodeKeyTile];
    const acc_t* krow[kDecodeKeyTile];
    const acc_t* vrow[kDecodeKeyTile];
    const cache_t* ksrc[kDecodeKeyTile];
    const cache_t* vsrc[kDecodeKeyTile];
    float kscale[kDecodeKeyTile], vscale[kDecodeKeyTile];  // 8-bit caches: each position's descales
    int64_t koff[kDecodeKeyTile], voff[kDecodeKeyTile], kdoff[kDecodeKeyTile], vdoff[kDecodeKeyTile];
    for (int64_t task = begin; task < finish; ++task) {
      const int64_t s = task % S, hk0 = (task / S) % tasks_per_b * HB, b = task / (S * tasks_per_b);
      const int64_t end = ends[b], start = starts ? starts[b] : 0, offset = end - Sq;
      int64_t lo = start, hi = end;
      if (sh.left >= 0) lo = std::max(lo, offset - sh.left);
      if (sh.right >= 0) hi = std::min(hi, Sq - 1 + offset + sh.right + 1);
      hi = std::max(hi, lo);
      const int64_t per = (hi - lo + S - 1) / S;
      const int64_t split_lo = std::min(lo + s * per, hi), split_hi = std::min(split_lo + per, hi);

      for (int64_t r = 0; r < HB * R; ++r) {  // row r: head hk0 + r / R's group row r % R
        const int64_t i = (r % R) / G, h = (hk0 + r / R) * G + r % G;
        const scalar_t* src = qp + b * qsb + i * qss + h * qsh;
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = acc_t(src[d]);
        if (dp) std::copy(src, src + D, &qb[r * D]);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), acc_t(0));

      // walk the split's positions (and, kDecodeKeyTile ahead, the prefetched ones)
      PageWalk here(tp + b * tsb, tsp, P, split_lo, split_lo < split_hi);
      PageWalk ahead(tp + b * tsb, tsp, P, split_lo + tile, split_lo + tile < split_hi);
      for (int64_t t0 = split_lo; t0 < split_hi; t0 += tile) {
        const int64_t n = std::min(tile, split_hi - t0);
        // cache rows of positions [t0, t0 + n); where fp16/bf16 rows sit apart (a whole
        // kv-heads x headdim in the flash layout, a stride the hardware prefetchers follow
        // poorly when a row is only a few lines), the next tile's rows are prefetched
        // meanwhile; adjacent rows (one head's cache contiguous) stream without it, faster
        const int64_t pf_end = spread ? std::min(split_hi, t0 + 2 * n) : t0 + n;
        for (int64_t j = 0; j < n; ++j) {
          koff[j] = here.blk * ksb + here.row * kss;
          voff[j] = here.blk * vsb + here.row * vss;
          if constexpr (kQuant) {
            kdoff[j] = here.blk * dsc.k0 + here.row * dsc.k1;
            vdoff[j] = here.blk * dsc.v0 + here.row * dsc.v1;
          }
          here.next(t0 + j + 1 < split_hi);
          if (t0 + n + j < pf_end) {
            for (int64_t hk = hk0; hk < hk0 + HB; ++hk) {
              const char* kn = reinterpret_cast<const char*>(kp + ahead.blk * ksb + ahead.row * kss + hk * ksh);
              const char* vn = reinterpret_cast<const char*>(vp + ahead.blk * vsb + ahead.row * vss + hk * vsh);
              for (int64_t off = 0; off < D * int64_t(sizeof(cache_t)); off += 64)
                __builtin_prefetch(kn + off, 0, kDecodePrefetchLocality);
              for (int64_t off = 0; off < Dv * int64_t(sizeof(cache_t)); off += 64)
                __builtin_prefetch(vn + off, 0, kDecodePrefetchLocality);
            }
            ahead.next(t0 + n + j + 1 < split_hi);
          }
        }
        for (int64_t hk = hk0; hk < hk0 + HB; ++hk) {
          const int64_t hoff = (hk - hk0) * R;  // this head's rows in the task's state
          for (int64_t j = 0; j < n; ++j) {
            const cache_t* ks = kp + koff[j] + hk * ksh;
            const cache_t* vs = vp + voff[j] + hk * vsh;
            if constexpr (kQuant) {
              kscale[j] = dsc.k[kdoff[j] + hk * dsc.k2];
              vscale[j] = dsc.v[vdoff[j] + hk * dsc.v2];
            }
            // the cache is read in place (fp16/bf16 and 8-bit rows widened in registers)
            if constexpr (std::is_same_v<cache_t, acc_t>) {
              krow[j] = ks;
              vrow[j] = vs;
            } else {
              ksrc[j] = ks;
              vsrc[j] = vs;
            }
          }
          if constexpr (kWidenTileOnce<cache_t>) {
            widen_tile(ksrc, n, D, wk.data(), wkrow);
            group_scores(&qf[hoff * D], R, D, wkrow, n, gs.data(), kDecodeKeyTile);
          } else if constexpr (kGroup) {
            if constexpr (kDpbf16 && std::is_same_v<cache_t, at::BFloat16>) {
              if (dp) {
                group_scores(&qb[hoff * D], R, D, ksrc, n, gs.data(), kDecodeKeyTile);
              } else {
                group_scores(&qf[hoff * D], R, D, ksrc, n, gs.data(), kDecodeKeyTile);
              }
            } else {
              group_scores(&qf[hoff * D], R, D, ksrc, n, gs.data(), kDecodeKeyTile);
            }
          }
          for (int64_t r = 0; r < R; ++r) {
            const int64_t i = r / G, h = hk * G + r % G, qpos = i + offset;
            int64_t jlo = t0, jhi = t0 + n;
            if (sh.left >= 0) jlo = std::max(jlo, qpos - sh.left);
            if (sh.right >= 0) jhi = std::min(jhi, qpos + sh.right + 1);
            if constexpr (kGroup) {  // the row's probabilities outside [jlo, jhi) are 0 in the group's P @ V
              float* row = &gs[r * kDecodeKeyTile];
              if (jlo >= jhi) {
                std::fill(row, row + n, 0.f);
              } else {
                std::fill(row, row + (jlo - t0), 0.f);
                std::fill(row + (jhi - t0), row + n, 0.f);
              }
            }
            if (jlo >= jhi) continue;
            const acc_t slope = sp ? acc_t(sp[b * ssb + h * ssh]) : acc_t(0);
            acc_t* x;
            if constexpr (kGroup) {
              x = &gs[r * kDecodeKeyTile + (jlo - t0)];  // the group's scores of this row
            } else {
              x = &sc[jlo - t0];
            }
            const int64_t cnt = jhi - jlo;
            acc_t mx = neg_inf;
            if constexpr (std::is_same_v<acc_t, float> && !kGroup) {  // (kGroup: group_scores above)
              scores_rows<1>(&qf[(hoff + r) * D], D, krow + (jlo - t0), cnt, x, 0);  // float rows: one row's block
            }
            // 8-bit keys: each score times its position's key descale
            const float* kd = kQuant ? kscale + (jlo - t0) : nullptr;
            if (std::is_same_v<acc_t, float> && cap == acc_t(0) && !sp) {  // just the scale: vectorised
              const Vec<acc_t> vs(scale);
              Vec<acc_t> vm(neg_inf);
              int64_t j = 0;
              for (; j + Vec<acc_t>::size() <= cnt; j += Vec<acc_t>::size()) {
                Vec<acc_t> v = Vec<acc_t>::loadu(x + j) * vs;
                if constexpr (kQuant) v = v * Vec<acc_t>::loadu(kd + j);
                v.store(x + j);
                vm = at::vec::maximum(vm, v);
              }
              mx = at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return at::vec::maximum(a, b); }, vm);
              for (; j < cnt; ++j) {
                x[j] *= scale;
                if constexpr (kQuant) x[j] *= kd[j];
                mx = std::max(mx, x[j]);
              }
            } else {
              for (int64_t j = 0; j < cnt; ++j) {
                const int64_t p = jlo + j;
                acc_t v;
                if constexpr (std::is_same_v<acc_t, float>) {
                  v = x[j];
                  if constexpr (kQuant) v *= kd[j];
                } else {
                  v = dot(&qf[(hoff + r) * D], krow[p - t0], D);
                }
                v = cap > 0 ? cap * std::tanh(v * scale / cap) : v * scale;
                if (sp) v -= slope * acc_t(std::abs(qpos - p));
                x[j] = v;
                mx = std::max(mx, v);
              }
            }
            const acc_t m_new = std::max(m[hoff + r], mx);
            const acc_t alpha = std::exp(m[hoff + r] - m_new);  // 0 while m is -inf
            acc_t* a = &acc[(hoff + r) * Dv];
            if (alpha != acc_t(1)) {
              for (int64_t d = 0; d < Dv; ++d) a[d] *= alpha;
            }
            const acc_t sum = exp_shifted_sum(x, cnt, m_new);
            if constexpr (kQuant) {  // 8-bit values: each probability times its value descale
              const float* vd = vscale + (jlo - t0);
              int64_t j = 0;
              for (; j + W <= cnt; j += W) (fVec::loadu(x + j) * fVec::loadu(vd + j)).store(x + j);
              for (; j < cnt; ++j) x[j] *= vd[j];
            }
            if constexpr (kGroup) {
              // (P @ V for the whole group after the rows: group_accumulate below)
            } else if constexpr (!std::is_same_v<acc_t, float>) {
              for (int64_t j = 0; j < cnt; ++j) axpy(a, vrow[jlo + j - t0], x[j], Dv);
            } else {
              accumulate_rows_block<1>(a, Dv, vrow + (jlo - t0), x, cnt, 0);
            }
            l[hoff + r] = l[hoff + r] * alpha + sum;
            m[hoff + r] = m_new;
          }
          if constexpr (kWidenTileOnce<cache_t>) {
            widen_tile(vsrc, n, Dv, wv.data(), wvrow);
            group_accumulate(&acc[hoff * Dv], R, Dv, wvrow, gs.data(), n, kDecodeKeyTile);
          } else if constexpr (kGroup) {
            group_accumulate(&acc[hoff * Dv], R, Dv, vsrc, gs.data(), n, kDecodeKeyTile);
          }
        }  // heads of the task
      }

      for (int64_t r = 0; r < HB * R; ++r) {
        const int64_t i = (r % R) / G, h = (hk0 + r / R) * G + r % G;
        const bool empty = l[r] == acc_t(0);
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[r];
        const acc_t lse_r = empty ? neg_inf : m[r] + std::log(l[r]);
        if (S == 1) {
          scalar_t* dst = op + ((b * Sq + i) * H + h) * Dv;
          for (int64_t d = 0; d < Dv; ++d) dst[d] = scalar_t(acc[r * Dv + d] * inv);
          lp[(b * H + h) * Sq + i] = lse_r;
        } else {
          acc_t* dst = part_o + (((s * B + b) * Sq + i) * H + h) * Dv;
          for (int64_t d = 0; d < Dv; ++d) dst[d] = acc[r * Dv + d] * inv;
          part_lse[((s * B + b) * H + h) * Sq + i] = lse_r;
        }
      }
    }
  });

  if (S == 1) return;
  at::parallel_for(0, B * Sq * H, 16, [&](int64_t begin, int64_t finish) {
    for (int64_t row = begin; row < finish; ++row) {
      const int64_t h = row % H, i = (row / H) % Sq, b = row / (H * Sq);
      acc_t mx = neg_inf;
      for (int64_t s = 0; s < S; ++s) mx = std::max(mx, part_lse[((s * B + b) * H + h) * Sq + i]);
      scalar_t* dst = op + ((b * Sq + i) * H + h) * Dv;
      if (mx == neg_inf) {  // no split saw a key
        for (int64_t d = 0; d < Dv; ++d) dst[d] = scalar_t(0);
        lp[(b * H + h) * Sq + i] = neg_inf;
        continue;
      }
      std::vector<acc_t> o(Dv, acc_t(0));
      acc_t total = 0;
      for (int64_t s = 0; s < S; ++s) {
        const acc_t w = std::exp(part_lse[((s * B + b) * H + h) * Sq + i] - mx);
        if (w == acc_t(0)) continue;
        total += w;
        const acc_t* src = part_o + (((s * B + b) * Sq + i) * H + h) * Dv;
        for (int64_t d = 0; d < Dv; ++d) o[d] += w * src[d];
      }
      for (int64_t d = 0; d < Dv; ++d) dst[d] = scalar_t(o[d] / total);
      lp[(b * H + h) * Sq + i] = mx + std::log(total);
    }
  });
}

// decode_tasks for an 8-bit cache of dtype ``ct`` (float accumulation only: the caller has
// refused float64 queries)
template <typename scalar_t, typename acc_t>
void decode_codes(at::ScalarType ct, const DecodeShape& sh, const at::Tensor& q, const at::Tensor& kc,
                  const at::Tensor& vc, const at::Tensor& table, const int32_t* ends, const int32_t* starts,
                  const at::Tensor* slopes, const Descales& dsc, at::Tensor& out, at::Tensor& lse, acc_t* part_o,
                  acc_t* part_lse) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (ct == at::kChar) {
      decode_tasks<scalar_t, int8_t, float>(sh, q, kc, vc, table, ends, starts, slopes, dsc, out, lse, part_o,
                                            part_lse);
    } else {
      decode_tasks<scalar_t, c10::Float8_e4m3fn, float>(sh, q, kc, vc, table, ends, starts, slopes, dsc, out, lse,
                                                         part_o, part_lse);
    }
  } else {
    TORCH_CHECK(false, "decode: an 8-bit cache takes float16, bfloat16 or float32 queries");
  }
}

std::tuple<at::Tensor, at::Tensor> decode_quant_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
    const at::Tensor& seqlens_k, const c10::optional<at::Tensor>& leftpad, double softmax_scale, int64_t window_left,
    int64_t window_right, double softcap, const c10::optional<at::Tensor>& alibi_slopes, int64_t num_splits,
    const c10::optional<at::Tensor>& k_descale, const c10::optional<at::Tensor>& v_descale) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, "decode: q and caches must be 4-D");
  TORCH_CHECK(k_cache.sizes().slice(0, 3) == v_cache.sizes().slice(0, 3),
              "decode: k_cache and v_cache shapes differ (other than the head dim)");
  const at::ScalarType ct = k_cache.scalar_type();
  const bool quant = ct == at::kChar || ct == at::kFloat8_e4m3fn;
  if (quant) {
    TORCH_CHECK(v_cache.scalar_type() == ct, "decode: k_cache and v_cache must share one dtype");
    TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat,
                "decode: an 8-bit cache takes float16, bfloat16 or float32 queries, got ", q.scalar_type());
    for (const auto* d : {&k_descale, &v_descale}) {
      TORCH_CHECK(d->has_value() && (*d)->scalar_type() == at::kFloat && (*d)->dim() == 3 &&
                      (*d)->sizes() == k_cache.sizes().slice(0, 3) && (*d)->device().is_cpu(),
                  "decode: an 8-bit cache needs float32 descales of shape (num_blocks, page_size, heads_k)");
    }
  } else {
    TORCH_CHECK(q.scalar_type() == ct && q.scalar_type() == v_cache.scalar_type(),
                "decode: q and caches must share one dtype");
    TORCH_CHECK(!k_descale.has_value() && !v_descale.has_value(), "decode: descales belong to 8-bit caches");
  }
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2, "decode: block_table int32 2-D");
  TORCH_CHECK(seqlens_k.scalar_type() == at::kInt, "decode: seqlens_k must be int32");
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3), Dv = v_cache.size(3),
                Hk = k_cache.size(2);
  TORCH_CHECK(Hk > 0 && H % Hk == 0 && k_cache.size(3) == D, "decode: head counts or head dims do not match");
  const auto cont = [](const at::Tensor& t) { return t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t; };
  at::Tensor qc = cont(q), kc = cont(k_cache), vc = cont(v_cache);
  at::Tensor ends = seqlens_k.contiguous();
  at::Tensor starts = leftpad.has_value() ? leftpad->to(at::kInt).contiguous() : at::Tensor();
  at::Tensor slopes = alibi_slopes.has_value() ? alibi_slopes->to(at::kFloat) : at::Tensor();
  Descales dsc;
  if (quant) {
    const at::Tensor& kd = *k_descale;
    const at::Tensor& vd = *v_descale;
    dsc = Descales{kd.data_ptr<float>(), kd.stride(0), kd.stride(1), kd.stride(2),
                   vd.data_ptr<float>(), vd.stride(0), vd.stride(1), vd.stride(2)};
  }

  const bool wide = q.scalar_type() == at::kDouble;
  at::Tensor out = at::empty({B, Sq, H, Dv}, q.options());
  at::Tensor lse = at::empty({B, H, Sq}, q.options().dtype(wide ? at::kDouble : at::kFloat));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }

  const int32_t* ep = ends.data_ptr<int32_t>();
  // 8-bit caches, and fp16/bf16 caches read by two or more query rows per kv head, whose
  // kv heads sit inside a position (the flash layout): a task reads all heads of its
  // positions, a contiguous stretch, instead of one head's rows a position apart
  // (measured on 2 cores, 4 x 32 / 8 heads x d128, 32k positions: int8 1.75x the bf16
  // cache's speed this way, 1.34x a head per task; the bf16 cache 1.1-1.2x.  One row per
  // kv head, 16 x 8 / 8 heads x d64 bf16: 1.5x slower with every head per task, its
  // tiles shorter and each head's work per tile small).  Heads apart (torch's (B, H, S, D)
  // layout): a head per task, whose rows are then adjacent.
  const bool narrow = quant || ((ct == at::kHalf || ct == at::kBFloat16) && q.size(1) * (q.size(2) / Hk) >= 2);
  const int64_t heads_per_task = narrow && kc.stride(2) <= kc.stride(1) && vc.stride(2) <= vc.stride(1) ? Hk : 1;
  int64_t splits = num_splits;
  if (splits <= 0) {
    // Enough (batch, kv head, split) tasks to occupy every thread, each keeping at least
    // kDecodeMinKeysPerSplit positions (a smaller share is not worth a partial result).
    const int64_t tasks = B * Hk / heads_per_task, threads = at::get_num_threads();
    const int64_t longest = B ? *std::max_element(ep, ep + B) : 0;
    splits = tasks >= threads ? 1
                              : std::min({(threads + tasks - 1) / tasks,
                                          std::max<int64_t>(1, longest / kDecodeMinKeysPerSplit), kDecodeMaxSplits});
  }
  splits = std::max<int64_t>(1, std::min(splits, kDecodeMaxSplits));

  DecodeShape sh{B, Sq, H, Hk, H / Hk, D, Dv, k_cache.size(1), splits,
                 heads_per_task, window_left, window_right, softmax_scale, softcap};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flashattn_lite_cpu_decode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor part_o, part_lse;
    if (splits > 1) {
      const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
      part_o = at::empty({splits, B, Sq, H, Dv}, acc_opts);
      part_lse = at::empty({splits, B, H, Sq}, acc_opts);
    }
    const int32_t* sp = starts.defined() ? starts.data_ptr<int32_t>() : nullptr;
    const at::Tensor* slp = slopes.defined() ? &slopes : nullptr;
    acc_t* po = splits > 1 ? part_o.data_ptr<acc_t>() : nullptr;
    acc_t* pl = splits > 1 ? part_lse.data_ptr<acc_t>() : nullptr;
    if (!quant) {
      decode_tasks<scalar_t, scalar_t, acc_t>(sh, qc, kc, vc, block_table, ep, sp, slp, dsc, out, lse, po, pl);
    } else {
      decode_codes<scalar_t, acc_t>(ct, sh, qc, kc, vc, block_table, ep, sp, slp, dsc, out, lse, po, pl);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> decode_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                              const at::Tensor& v_cache, const at::Tensor& block_table,
                                              const at::Tensor& seqlens_k, const c10::optional<at::Tensor>& leftpad,
                                              double softmax_scale, int64_t window_left, int64_t window_right,
                                              double softcap, const c10::optional<at::Tensor>& alibi_slopes,
                                              int64_t num_splits) {
  return decode_quant_cpu(q, k_cache, v_cache, block_table, seqlens_k, leftpad, softmax_scale, window_left,
                          window_right, softcap, alibi_slopes, num_splits, c10::nullopt, c10::nullopt);
}

}  // namespace

// decode from 8-bit caches (CPU only): decode's schema plus the descales, float32
// (num_blocks, page_size, heads_k) views; k_cache/v_cache int8 or float8_e4m3fn.
TORCH_LIBRARY_FRAGMENT(flashattn_lite_C, m) {
  m.def("cpu_decode_quant(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seqlens_k, "
        "Tensor? leftpad, float softmax_scale, int window_left, int window_right, float softcap, "
        "Tensor? alibi_slopes, int num_splits, Tensor? k_descale, Tensor? v_descale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flashattn_lite_C, CPU, m) {
  m.impl("decode", &decode_cpu);
  m.impl("cpu_decode_quant", &decode_quant_cpu);
}

}  // namespace flashattn_lite
