// The dropout random stream of flashattn_lite/rng.py, in C++.
//
// Element (b, h, i, j) of the attention matrix is kept iff the first output word of
// Philox4x32-10 at the 64-bit counter ((b*H + h)*Sq + i)*Sk + j (counter words
// (lo, hi, 0, 0)), keyed by the 64-bit seed (key words (lo, hi)), is >= threshold(p).
// rng.py is the definition; this must agree with it bit for bit (tests/test_cpu.py
// compares the applied mask with the one rng.py computes).

#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace flashattn_lite {

struct PhiloxDropout {
  static constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  static constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  static constexpr int kRounds = 10;

  uint32_t key0[kRounds], key1[kRounds];  // the key of each round (bumped after every round)
  uint32_t threshold = 0;

  PhiloxDropout() = default;
  PhiloxDropout(uint64_t seed, double p) : threshold(threshold_for(p)) {
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int r = 0; r < kRounds; ++r) {
      key0[r] = k0;
      key1[r] = k1;
      k0 += kKeyA;
      k1 += kKeyB;
    }
  }

  // round(p * 2^32) with ties to even (Python's round), capped at 2^32 - 1.
  static uint32_t threshold_for(double p) {
    const double t = std::nearbyint(p * 4294967296.0);
    return t >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(t);
  }

  uint32_t first_word(uint64_t counter) const {
    uint32_t c0 = uint32_t(counter), c1 = uint32_t(counter >> 32), c2 = 0, c3 = 0;
    for (int r = 0; r < kRounds; ++r) {
      const uint64_t pb = uint64_t(kRoundB) * c2, pa = uint64_t(kRoundA) * c0;
      const uint32_t n0 = uint32_t(pb >> 32) ^ c1 ^ key0[r];
      const uint32_t n2 = uint32_t(pa >> 32) ^ c3 ^ key1[r];
      c1 = uint32_t(pb);
      c3 = uint32_t(pa);
      c0 = n0;
      c2 = n2;
    }
    return c0;
  }

  // mask[j] = ~0 where the element at counter0 + j is kept, 0 where it is dropped.
  void keep_mask(uint64_t counter0, int64_t n, uint32_t* mask) const {
    int64_t j = 0;
#if defined(__AVX512F__)
    {
      const __m512i mul_a = _mm512_set1_epi32(int(kRoundA)), mul_b = _mm512_set1_epi32(int(kRoundB));
      const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512i thr = _mm512_set1_epi32(int(threshold)), ones = _mm512_set1_epi32(-1);
      for (; j + 16 <= n; j += 16) {
        const uint64_t c = counter0 + uint64_t(j);
        if (uint32_t(c) > 0xFFFFFFF0u) break;  // the low word wraps inside these 16: narrower paths
        __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(c))), lanes);
        __m512i c1 = _mm512_set1_epi32(int(uint32_t(c >> 32)));
        __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
        for (int r = 0; r < kRounds; ++r) {
          __m512i hi_b, hi_a;
          const __m512i lo_b = mulhilo512(c2, mul_b, hi_b);
          const __m512i lo_a = mulhilo512(c0, mul_a, hi_a);
          c0 = _mm512_xor_si512(_mm512_xor_si512(hi_b, c1), _mm512_set1_epi32(int(key0[r])));
          c2 = _mm512_xor_si512(_mm512_xor_si512(hi_a, c3), _mm512_set1_epi32(int(key1[r])));
          c1 = lo_b;
          c3 = lo_a;
        }
        const __mmask16 keep = _mm512_cmpge_epu32_mask(c0, thr);
        _mm512_storeu_si512(mask + j, _mm512_maskz_mov_epi32(keep, ones));
      }
    }
#endif
#if defined(__AVX2__)
    const __m256i mul_a = _mm256_set1_epi32(int(kRoundA)), mul_b = _mm256_set1_epi32(int(kRoundB));
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i thr = _mm256_set1_epi32(int(threshold));
    for (; j + 8 <= n; j += 8) {
      const uint64_t c = counter0 + uint64_t(j);
      if (uint32_t(c) > 0xFFFFFFF8u) break;  // the low word wraps inside these 8: scalar (rare)
      __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(c))), lanes);
      __m256i c1 = _mm256_set1_epi32(int(uint32_t(c >> 32)));
      __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
      for (int r = 0; r < kRounds; ++r) {
        __m256i hi_b, hi_a;
        const __m256i lo_b = mulhilo(c2, mul_b, hi_b);
        const __m256i lo_a = mulhilo(c0, mul_a, hi_a);
        c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(int(key0[r])));
        c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(int(key1[r])));
        c1 = lo_b;
        c3 = lo_a;
      }
      // unsigned c0 >= thr  <=>  max(c0, thr) == c0
      const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(c0, thr), c0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(mask + j), keep);
    }
#endif
    for (; j < n; ++j) mask[j] = first_word(counter0 + uint64_t(j)) >= threshold ? ~0u : 0u;
  }

 private:
#if defined(__AVX512F__)
  static inline __m512i mulhilo512(__m512i a, __m512i m, __m512i& hi) {
    const __m512i even = _mm512_mul_epu32(a, m);
    const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    return _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  }
#endif
#if defined(__AVX2__)
  // 32 x 32 -> 64-bit products of 8 lanes: returns the low words, ``hi`` the high words.
  static inline __m256i mulhilo(__m256i a, __m256i m, __m256i& hi) {
    const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    return _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  }
#endif
};

}  // namespace flashattn_lite
