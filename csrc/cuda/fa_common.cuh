// Small device functions the kernels are written with.  On a GPU they are inline PTX;
// under the host emulator (csrc/cuda/emu/cuda_emu.h, which defines CUDA_EMU) they call
// the emulator's implementation of the same instruction, so every instruction the
// kernels issue has exactly one definition per target.

#pragma once

#include <cstdint>

#ifdef CUDA_EMU
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "fa_config.h"

#define FA_DEV __device__ __forceinline__

namespace fa {

// ---------------------------------------------------------------- element types
template <class T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<__nv_bfloat16> { static constexpr bool value = true; };

FA_DEV float to_float(__half x) { return __half2float(x); }
FA_DEV float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> FA_DEV T from_float(float x);
template <> FA_DEV __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> FA_DEV __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
FA_DEV uint32_t bits(__half x) { return __half_as_ushort(x); }
FA_DEV uint32_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// Two floats rounded to T and packed into one 32-bit register, `lo` in the low half
// (the lower-indexed element of a fragment pair, as the PTX ISA places it).
template <class T> FA_DEV uint32_t pack2(float lo, float hi) {
  return bits(from_float<T>(lo)) | (bits(from_float<T>(hi)) << 16);
}

// ---------------------------------------------------------------- shared memory
FA_DEV char* dynamic_smem() {
#ifdef CUDA_EMU
  return emu_dynamic_smem();
#else
  extern __shared__ __align__(16) char fa_dynamic_smem[];
  return fa_dynamic_smem;
#endif
}

// ---------------------------------------------------------------- instructions
// D = A * B + C, one m16n8k16 tensor-core product (fragment layouts: see cuda_emu.h).
template <class T> FA_DEV void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
#ifdef CUDA_EMU
  cuda_emu::mma_m16n8k16<IsBf16<T>::value>(d, a, b, c);
#else
  if constexpr (IsBf16<T>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
#endif
}

#ifndef CUDA_EMU
FA_DEV uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#endif

// ldmatrix: lanes 8i..8i+7 pass the row addresses of 8x8 matrix i.
FA_DEV void ldmatrix_x1(uint32_t r[1], const void* row) {
#ifdef CUDA_EMU
  cuda_emu::ldmatrix(r, 1, false, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)));
#endif
}
FA_DEV void ldmatrix_x1_trans(uint32_t r[1], const void* row) {
#ifdef CUDA_EMU
  cuda_emu::ldmatrix(r, 1, true, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)));
#endif
}
FA_DEV void ldmatrix_x2(uint32_t r[2], const void* row) {
#ifdef CUDA_EMU
  cuda_emu::ldmatrix(r, 2, false, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
#endif
}
FA_DEV void ldmatrix_x2_trans(uint32_t r[2], const void* row) {
#ifdef CUDA_EMU
  cuda_emu::ldmatrix(r, 2, true, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
#endif
}
FA_DEV void ldmatrix_x4(uint32_t r[4], const void* row) {
#ifdef CUDA_EMU
  cuda_emu::ldmatrix(r, 4, false, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
#endif
}
FA_DEV void ldmatrix_x4_trans(uint32_t r[4], const void* row) {
#ifdef CUDA_EMU
  cuda_emu::ldmatrix(r, 4, true, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
#endif
}

// 16 bytes global -> shared, asynchronously; valid == false writes 16 zero bytes
// (src-size 0: nothing is read from `src`).
FA_DEV void cp_async_16(void* dst, const void* src, bool valid) {
#ifdef CUDA_EMU
  cuda_emu::cp_async(dst, src, valid ? 16 : 0);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
#endif
}
FA_DEV void cp_async_commit() {
#ifdef CUDA_EMU
  cuda_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> FA_DEV void cp_async_wait() {
#ifdef CUDA_EMU
  cuda_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---------------------------------------------------------------- warp tiles
// Operand loaders for one m16n8k16 step from row-major shared-memory tiles with
// leading dimension ld (elements).  See the lane/matrix assignment in each.

// A (16 rows x 16 k) from a [row][k] tile: matrices (r0-7,k0-7) (r8-15,k0-7) (r0-7,k8-15)
// (r8-15,k8-15) are a0a1, a2a3, a4a5, a6a7.
template <class T> FA_DEV void load_a(uint32_t a[4], const T* s, int ld, int r0, int k0, int lane) {
  const int r = r0 + (lane & 7) + ((lane >> 3) & 1) * 8, c = k0 + (lane >> 4) * 8;
  ldmatrix_x4(a, s + r * ld + c);
}

// B of two n8 tiles (n0..n0+15) x k16 from an [n][k] tile (B[k][n] = tile[n][k]),
// e.g. K in Q K^T: matrices (n0-7,k0-7) (n0-7,k8-15) (n8-15,k0-7) (n8-15,k8-15).
template <class T> FA_DEV void load_b2_nk(uint32_t b[2][2], const T* s, int ld, int n0, int k0, int lane) {
  const int n = n0 + (lane & 7) + (lane >> 4) * 8, c = k0 + ((lane >> 3) & 1) * 8;
  uint32_t r[4];
  ldmatrix_x4(r, s + n * ld + c);
  b[0][0] = r[0]; b[0][1] = r[1]; b[1][0] = r[2]; b[1][1] = r[3];
}

// B of two n8 tiles from a [k][n] tile (B[k][n] = tile[k][n]), e.g. V in P V, through
// ldmatrix.trans: matrices (k0-7,n0-7) (k8-15,n0-7) (k0-7,n8-15) (k8-15,n8-15).
template <class T> FA_DEV void load_b2_kn(uint32_t b[2][2], const T* s, int ld, int k0, int n0, int lane) {
  const int k = k0 + (lane & 7) + ((lane >> 3) & 1) * 8, n = n0 + (lane >> 4) * 8;
  uint32_t r[4];
  ldmatrix_x4_trans(r, s + k * ld + n);
  b[0][0] = r[0]; b[0][1] = r[1]; b[1][0] = r[2]; b[1][1] = r[3];
}

// The accumulators of n8 tiles 2j and 2j+1 (16 x 16, fp32) as the A operand of k-step j:
// the C layout (row g / g+8, cols 2t, 2t+1) is the A layout of a0a1 / a2a3 (and of a4a5 /
// a6a7 for the second tile), so P never leaves registers.
template <class T> FA_DEV void acc_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// Warp: acc[16 x 8*NT] += tile_a[r0.., 0..K) * B, where B[k][n] = tile_b[n][k].
template <class T, int NT, int K>
FA_DEV void warp_gemm_nk(float (*acc)[4], const T* sa, int lda, int r0, const T* sb, int ldb, int lane) {
  static_assert(NT % 2 == 0 && K % 16 == 0, "tile shape");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    load_a(a, sa, lda, r0, kk * 16, lane);
#pragma unroll
    for (int nn = 0; nn < NT / 2; ++nn) {
      uint32_t b[2][2];
      load_b2_nk(b, sb, ldb, nn * 16, kk * 16, lane);
      mma_m16n8k16<T>(acc[2 * nn], a, b[0], acc[2 * nn]);
      mma_m16n8k16<T>(acc[2 * nn + 1], a, b[1], acc[2 * nn + 1]);
    }
  }
}

// Warp: acc[16 x 8*NT] += P * tile_b[0..8*KT, n0..), P in registers as accumulators p[KT][4]
// (16 x 8*KT), B[k][n] = tile_b[k][n].
template <class T, int NT, int KT>
FA_DEV void warp_gemm_acc_kn(float (*acc)[4], const float (*p)[4], const T* sb, int ldb, int n0, int lane) {
  static_assert(NT % 2 == 0 && KT % 2 == 0, "tile shape");
#pragma unroll
  for (int kk = 0; kk < KT / 2; ++kk) {
    uint32_t a[4];
    acc_to_a<T>(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int nn = 0; nn < NT / 2; ++nn) {
      uint32_t b[2][2];
      load_b2_kn(b, sb, ldb, kk * 16, n0 + nn * 16, lane);
      mma_m16n8k16<T>(acc[2 * nn], a, b[0], acc[2 * nn]);
      mma_m16n8k16<T>(acc[2 * nn + 1], a, b[1], acc[2 * nn + 1]);
    }
  }
}

// Global rows [row0, row0+ROWS) x [0, D) of a (seqlen, head_dim) matrix with row stride
// `ld_g` into a shared tile [ROWS][LD], zero outside seqlen and head_dim.  `vec` (checked
// on the host): head_dim % 8 == 0, 16-byte aligned base and row stride, so 16-byte
// cp.async chunks apply; otherwise element loads (synchronous).
template <class T, int ROWS, int D, int LD, int THREADS>
FA_DEV void load_tile(T* s, const T* g, int64_t ld_g, int64_t row0, int64_t seqlen, int head_dim, bool vec,
                      int tid) {
  constexpr int CH = D / 8;
#pragma unroll 2
  for (int i = tid; i < ROWS * CH; i += THREADS) {
    const int r = i / CH, c = (i % CH) * 8;
    const int64_t gr = row0 + r;
    const bool inside = gr < seqlen;
    T* dst = s + r * LD + c;
    if (vec) {
      const bool valid = inside && c < head_dim;
      cp_async_16(dst, valid ? static_cast<const void*>(g + gr * ld_g + c) : static_cast<const void*>(g), valid);
    } else {
      const T* src = g + gr * ld_g;
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = (inside && c + e < head_dim) ? src[c + e] : from_float<T>(0.f);
    }
  }
}

}  // namespace fa
