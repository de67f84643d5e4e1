// Probe kernels for tests/test_cuda_emulator_unit.py: each mode runs a tiny kernel under
// the host emulator (csrc/cuda/emu/cuda_emu.h) and prints what every lane / thread got,
// one line per lane as whitespace-separated numbers.  The Python test holds the
// expectations (PTX ISA formulas, numpy matmuls), written independently of this file
// and of the emulator.
//
// usage: cuda_emu_probe MODE [args]  (inputs, where needed, on stdin)

#include "../csrc/cuda/emu/cuda_emu.h"
#include "../csrc/cuda/fa_common.cuh"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

using fa::dynamic_smem;

static std::vector<uint32_t> g_u32;  // inputs read from stdin
static std::vector<float> g_f32;
static std::vector<uint32_t> g_out;  // outputs, indexed by lane

// ---- mma: stdin has 32 lines of a0..a3 b0 b1 (hex words) c0..c3 (floats)
template <class T>
__global__ void mma_kernel() {
  const int l = threadIdx.x;
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) a[i] = g_u32[l * 6 + i];
  for (int i = 0; i < 2; ++i) b[i] = g_u32[l * 6 + 4 + i];
  for (int i = 0; i < 4; ++i) c[i] = g_f32[l * 4 + i];
  fa::mma_m16n8k16<T>(d, a, b, c);
  for (int i = 0; i < 4; ++i) std::memcpy(&g_out[l * 4 + i], &d[i], 4);
}

// ---- ldmatrix: shared memory holds a 32 x 8 matrix of 16-bit codes (row * 8 + col)
// with rows 24 elements apart; lane l passes the address of row l.
__global__ void ldmatrix_kernel(int nmat, int trans) {
  uint16_t* s = reinterpret_cast<uint16_t*>(dynamic_smem());
  const int l = threadIdx.x;
  for (int c = 0; c < 8; ++c) s[l * 24 + c] = static_cast<uint16_t>(l * 8 + c);
  __syncthreads();
  uint32_t r[4] = {0, 0, 0, 0};
  const void* row = s + l * 24;
  if (nmat == 1) trans ? fa::ldmatrix_x1_trans(r, row) : fa::ldmatrix_x1(r, row);
  if (nmat == 2) trans ? fa::ldmatrix_x2_trans(r, row) : fa::ldmatrix_x2(r, row);
  if (nmat == 4) trans ? fa::ldmatrix_x4_trans(r, row) : fa::ldmatrix_x4(r, row);
  for (int i = 0; i < 4; ++i) g_out[l * 4 + i] = r[i];
}

// ---- the kernels' warp tiles: acc(16 x N) = A(16 x K) B(K x N) with the loaders of
// fa_common.cuh.  stdin: A as [16][K] fp16 bits, B as [K][N] fp16 bits.
// kind 0: B stored [n][k] (warp_gemm_nk); kind 1: A first through an mma with the
// identity (A lands in accumulators), then warp_gemm_acc_kn with B stored [k][n].
template <int K, int N>
__global__ void gemm_kernel(int kind) {
  using T = __half;
  T* sa = reinterpret_cast<T*>(dynamic_smem());
  constexpr int LDA = K + 8, LDB = (K > N ? K : N) + 8;
  T* sb = sa + 16 * LDA;
  const int tid = threadIdx.x, lane = tid % 32;
  for (int i = tid; i < 16 * K; i += 32) sa[(i / K) * LDA + i % K].x = static_cast<uint16_t>(g_u32[i]);
  for (int i = tid; i < K * N; i += 32) {
    const int k = i / N, n = i % N;
    const uint16_t v = static_cast<uint16_t>(g_u32[16 * K + i]);
    if (kind == 0) sb[n * LDB + k].x = v; else sb[k * LDB + n].x = v;
  }
  __syncthreads();
  float acc[N / 8][4] = {};
  if (kind == 0) {
    fa::warp_gemm_nk<T, N / 8, K>(acc, sa, LDA, 0, sb, LDB, lane);
  } else {
    // A into accumulator layout: A = A * I via mma with B = identity (16 x 16 per step)
    T* si = sb + K * LDB;  // identity, [n][k], 16 x 16
    for (int i = tid; i < 256; i += 32) si[(i / 16) * 24 + i % 16] = fa::from_float<T>(i / 16 == i % 16 ? 1.f : 0.f);
    __syncthreads();
    float pa[K / 8][4] = {};
    for (int kk = 0; kk < K / 16; ++kk) {
      float part[2][4] = {};
      uint32_t a[4];
      fa::load_a(a, sa, LDA, 0, kk * 16, lane);
      uint32_t b[2][2];
      fa::load_b2_nk(b, si, 24, 0, 0, lane);
      fa::mma_m16n8k16<T>(part[0], a, b[0], part[0]);
      fa::mma_m16n8k16<T>(part[1], a, b[1], part[1]);
      for (int e = 0; e < 4; ++e) {
        pa[2 * kk][e] = part[0][e];
        pa[2 * kk + 1][e] = part[1][e];
      }
    }
    fa::warp_gemm_acc_kn<T, N / 8, K / 8>(acc, pa, sb, LDB, 0, lane);
  }
  for (int nt = 0; nt < N / 8; ++nt)
    for (int e = 0; e < 4; ++e) std::memcpy(&g_out[lane * (N / 2) + nt * 4 + e], &acc[nt][e], 4);
}

// ---- shuffles: value = 1000 + lane
__global__ void shfl_kernel(int arg) {
  const int l = threadIdx.x;
  const int v = 1000 + l;
  g_out[l * 4 + 0] = static_cast<uint32_t>(__shfl_xor_sync(0xffffffffu, v, arg));
  g_out[l * 4 + 1] = static_cast<uint32_t>(__shfl_sync(0xffffffffu, v, (l * 7 + arg) % 32));
  g_out[l * 4 + 2] = static_cast<uint32_t>(__shfl_up_sync(0xffffffffu, v, arg));
  g_out[l * 4 + 3] = static_cast<uint32_t>(__shfl_down_sync(0xffffffffu, v, arg));
}

// ---- __syncthreads: every thread writes its slot, then reads a slot another warp wrote;
// repeated rounds with a barrier between write and read and between read and rewrite.
__global__ void barrier_kernel(int rounds) {
  int* s = reinterpret_cast<int*>(dynamic_smem());
  const int t = threadIdx.x, n = blockDim.x;
  uint32_t bad = 0;
  for (int r = 0; r < rounds; ++r) {
    s[t] = r * n + t;
    __syncthreads();
    const int src = (t * 37 + 11 + r) % n;
    if (s[src] != r * n + src) ++bad;
    __syncthreads();
  }
  g_out[t] = bad;
}

// ---- cp.async: the copy lands at wait_group, not before.  out: (before wait, after wait).
__global__ void cp_async_kernel() {
  uint32_t* s = reinterpret_cast<uint32_t*>(dynamic_smem());
  const int t = threadIdx.x;
  s[4 * t] = 7;
  fa::cp_async_16(s + 4 * t, &g_u32[4 * t], true);
  fa::cp_async_commit();
  fa::cp_async_16(s + 128 + 4 * t, &g_u32[4 * t], false);  // zero fill
  fa::cp_async_commit();
  const uint32_t before = s[4 * t];
  fa::cp_async_wait<1>();  // the first group only
  const uint32_t mid = s[4 * t], zero_before = s[128 + 4 * t];
  fa::cp_async_wait<0>();
  g_out[t * 4 + 0] = before;
  g_out[t * 4 + 1] = mid;
  g_out[t * 4 + 2] = zero_before;
  g_out[t * 4 + 3] = s[128 + 4 * t];
}

// ---- a cp.async whose destination is read (ldmatrix) before the wait: a race
__global__ void cp_async_race_kernel() {
  uint16_t* s = reinterpret_cast<uint16_t*>(dynamic_smem());
  const int l = threadIdx.x;
  fa::cp_async_16(s + l * 8, &g_u32[4 * l], true);
  fa::cp_async_commit();
  uint32_t r[4];
  fa::ldmatrix_x4(r, s + l * 8);
  fa::cp_async_wait<0>();
}

// ---- misuse the emulator must report
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 32) __syncthreads();
}
__global__ void divergent_shfl_kernel() {
  if (threadIdx.x % 2) (void)__shfl_xor_sync(0xffffffffu, 1, 1);
  else __syncwarp();
}

static void print_out(int lanes, int per) {
  for (int l = 0; l < lanes; ++l) {
    for (int i = 0; i < per; ++i) std::printf("%s%u", i ? " " : "", g_out[l * per + i]);
    std::printf("\n");
  }
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const std::string mode = argv[1];
  try {
    if (mode == "mma_f16" || mode == "mma_bf16") {
      g_u32.resize(32 * 6);
      g_f32.resize(32 * 4);
      for (int l = 0; l < 32; ++l) {
        for (int i = 0; i < 6; ++i) std::cin >> std::hex >> g_u32[l * 6 + i];
        for (int i = 0; i < 4; ++i) std::cin >> std::dec >> g_f32[l * 4 + i];
      }
      g_out.assign(32 * 4, 0);
      if (mode == "mma_f16") cuda_emu::launch(mma_kernel<__half>, dim3(1), dim3(32), 0);
      else cuda_emu::launch(mma_kernel<__nv_bfloat16>, dim3(1), dim3(32), 0);
      print_out(32, 4);
    } else if (mode == "ldmatrix") {
      g_out.assign(32 * 4, 0);
      cuda_emu::launch(ldmatrix_kernel, dim3(1), dim3(32), 32 * 24 * 2, std::atoi(argv[2]), std::atoi(argv[3]));
      print_out(32, 4);
    } else if (mode == "gemm") {
      const int kind = std::atoi(argv[2]);
      constexpr int K = 32, N = 16;
      g_u32.resize(16 * K + K * N);
      for (auto& x : g_u32) std::cin >> std::hex >> x;
      g_out.assign(32 * N / 2, 0);
      cuda_emu::launch(gemm_kernel<K, N>, dim3(1), dim3(32), (16 * (K + 8) + K * (K + 8) + 16 * 24) * 2, kind);
      print_out(32, N / 2);
    } else if (mode == "shfl") {
      g_out.assign(32 * 4, 0);
      cuda_emu::launch(shfl_kernel, dim3(1), dim3(32), 0, std::atoi(argv[2]));
      print_out(32, 4);
    } else if (mode == "barrier") {
      const int n = std::atoi(argv[2]);
      g_out.assign(n, 0);
      cuda_emu::launch(barrier_kernel, dim3(1), dim3(n), n * 4, 50);
      print_out(n, 1);
    } else if (mode == "cp_async") {
      g_u32.resize(32 * 4);
      for (int i = 0; i < 32 * 4; ++i) g_u32[i] = 100 + i;
      g_out.assign(32 * 4, 0);
      cuda_emu::launch(cp_async_kernel, dim3(1), dim3(32), 2 * 32 * 16);
      print_out(32, 4);
    } else if (mode == "cp_async_race") {
      g_u32.assign(32 * 4, 1);
      cuda_emu::launch(cp_async_race_kernel, dim3(1), dim3(32), 32 * 16);
    } else if (mode == "divergent_barrier") {
      cuda_emu::launch(divergent_barrier_kernel, dim3(1), dim3(64), 0);
    } else if (mode == "divergent_shfl") {
      cuda_emu::launch(divergent_shfl_kernel, dim3(1), dim3(32), 0);
    } else {
      return 2;
    }
  } catch (const std::exception& e) {
    std::printf("ERROR %s\n", e.what());
    return 1;
  }
  return 0;
}
