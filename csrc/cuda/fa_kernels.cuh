// FlashAttention-2-style kernels: forward, and backward by recomputation
// (delta preprocessing, dK/dV over query blocks, dQ over key blocks; no atomics).
//
// Templates only on the element type (__half, __nv_bfloat16) and the compiled head
// dim D; causal, window, sequence lengths, GQA group and the true head dim are runtime
// arguments.  Scores are kept in log2 units (scale * log2 e folded in) so exp2 is the
// only transcendental.  Per warp: 16 rows of the output tile; a thread holds rows
// g = lane / 4 and g + 8 of each m16n8 accumulator, columns 2 (lane % 4) and + 1.
//
// These sources compile both with nvcc and, against emu/cuda_emu.h, with g++.

#pragma once

#include "fa_common.cuh"
#include "fa_params.h"

namespace fa {

constexpr float kInf = __builtin_huge_valf();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;

FA_DEV bool visible(const AttnParams& p, int64_t i, int64_t j) {
  if (j >= p.seqlen_k) return false;
  const int64_t rel = j - i - p.diag_offset;
  return (p.window_right < 0 || rel <= p.window_right) && (p.window_left < 0 || rel >= -p.window_left);
}

// Key blocks [begin, end) that rows [first, last] can see.
FA_DEV void key_blocks(const AttnParams& p, int64_t first, int64_t last, int bn, int64_t& begin, int64_t& end) {
  int64_t lo = 0, hi = p.seqlen_k - 1;
  if (p.window_left >= 0) lo = lo > first + p.diag_offset - p.window_left ? lo : first + p.diag_offset - p.window_left;
  if (p.window_right >= 0) hi = hi < last + p.diag_offset + p.window_right ? hi : last + p.diag_offset + p.window_right;
  begin = lo / bn;
  end = lo <= hi ? hi / bn + 1 : begin;
}

// Does the block rows [m0, m0+bm) x keys [n0, n0+bn) need the per-element mask?
FA_DEV bool needs_mask(const AttnParams& p, int64_t m0, int bm, int64_t n0, int bn) {
  return n0 + bn > p.seqlen_k ||
         (p.window_right >= 0 && n0 + bn - 1 > m0 + p.diag_offset + p.window_right) ||
         (p.window_left >= 0 && n0 < m0 + bm - 1 + p.diag_offset - p.window_left);
}

template <class T>
FA_DEV const T* at(const void* base, const Strides& s, int b, int h) {
  return static_cast<const T*>(base) + b * s.batch + h * s.head;
}
template <class T>
FA_DEV T* at(void* base, const Strides& s, int b, int h) {
  return static_cast<T*>(base) + b * s.batch + h * s.head;
}

// Rows r_lo and r_lo + 8 of a warp's accumulator tile (columns col0 + 8 dt + 2 tq (+1))
// times `mul` into global memory, inside seqlen and head_dim.
template <class T, int NT>
FA_DEV void store_rows(T* g, int64_t ld, int64_t r_lo, int64_t seqlen, int col0, int head_dim, const float (*acc)[4],
                       const float mul[2], int tq) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = r_lo + 8 * r;
    if (row >= seqlen) continue;
    T* dst = g + row * ld;
#pragma unroll
    for (int dt = 0; dt < NT; ++dt) {
      const int col = col0 + dt * 8 + 2 * tq;
      if (col < head_dim) dst[col] = from_float<T>(acc[dt][2 * r] * mul[r]);
      if (col + 1 < head_dim) dst[col + 1] = from_float<T>(acc[dt][2 * r + 1] * mul[r]);
    }
  }
}

// ------------------------------------------------------------------------ forward
template <class T, int D>
__global__ void __launch_bounds__(FwdCfg<D>::THREADS, 1) fwd_kernel(const AttnParams p) {
  using Cfg = FwdCfg<D>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, LD = Cfg::LD, THREADS = Cfg::THREADS;
  constexpr int NT_S = BN / 8, NT_O = D / 8;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, tq = lane & 3;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int h = blockIdx.y, b = blockIdx.z, hk = h / p.group;

  T* sQ = reinterpret_cast<T*>(dynamic_smem());
  T* sK = sQ + BM * LD;  // [2][BN][LD]
  T* sV = sK + 2 * BN * LD;
  const T* q = at<T>(p.q, p.q_s, b, h);
  const T* k = at<T>(p.k, p.k_s, b, hk);
  const T* v = at<T>(p.v, p.v_s, b, hk);

  const int64_t last_row = (m0 + BM < p.seqlen_q ? m0 + BM : p.seqlen_q) - 1;
  int64_t nb_begin, nb_end;
  key_blocks(p, m0, last_row, BN, nb_begin, nb_end);

  load_tile<T, BM, D, LD, THREADS>(sQ, q, p.q_s.row, m0, p.seqlen_q, p.head_dim, p.vec, tid);
  if (nb_begin < nb_end) {
    load_tile<T, BN, D, LD, THREADS>(sK, k, p.k_s.row, nb_begin * BN, p.seqlen_k, p.head_dim, p.vec, tid);
    load_tile<T, BN, D, LD, THREADS>(sV, v, p.v_s.row, nb_begin * BN, p.seqlen_k, p.head_dim, p.vec, tid);
  }
  cp_async_commit();

  float o[NT_O][4];
#pragma unroll
  for (int dt = 0; dt < NT_O; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float row_max[2] = {-kInf, -kInf}, row_sum[2] = {0.f, 0.f};  // row_sum: this thread's columns only
  const int64_t r_lo = m0 + warp * 16 + g;

  for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
    const int buf = static_cast<int>((nb - nb_begin) & 1);
    if (nb + 1 < nb_end) {  // prefetch the next K/V tile into the other buffer, then wait for this one
      load_tile<T, BN, D, LD, THREADS>(sK + (buf ^ 1) * BN * LD, k, p.k_s.row, (nb + 1) * BN, p.seqlen_k, p.head_dim,
                                       p.vec, tid);
      load_tile<T, BN, D, LD, THREADS>(sV + (buf ^ 1) * BN * LD, v, p.v_s.row, (nb + 1) * BN, p.seqlen_k, p.head_dim,
                                       p.vec, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* kt = sK + buf * BN * LD;
    const T* vt = sV + buf * BN * LD;

    float s[NT_S][4];
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    warp_gemm_nk<T, NT_S, D>(s, sQ, LD, warp * 16, kt, LD, lane);

    const int64_t n0 = nb * BN;
    const bool mask = needs_mask(p, m0, BM, n0, BN);
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * p.scale_log2;
        if (mask && !visible(p, r_lo + 8 * (e >> 1), n0 + nt * 8 + 2 * tq + (e & 1))) x = -kInf;
        s[nt][e] = x;
      }

    // Online softmax: new running max per row (a row's 8*NT_S columns sit on the 4
    // lanes of a quad), rescale what was accumulated, exponentiate in place.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -kInf;
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 2));
      const float m_new = fmaxf(row_max[r], mx);
      const float shift = m_new == -kInf ? 0.f : m_new;  // a row with nothing visible yet stays at 0
      const float alpha = exp2f(row_max[r] - shift);
      row_max[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float pv = exp2f(s[nt][2 * r + j] - shift);
          s[nt][2 * r + j] = pv;
          sum += pv;
        }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < NT_O; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }
    warp_gemm_acc_kn<T, NT_O, NT_S>(o, s, vt, LD, 0, lane);
    __syncthreads();  // the buffer just read is the next prefetch target
  }
  cp_async_wait<0>();

  float mul[2];
  float* lse = p.lse + (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = row_sum[r];
    total += __shfl_xor_sync(kFull, total, 1);
    total += __shfl_xor_sync(kFull, total, 2);
    mul[r] = total > 0.f ? 1.f / total : 0.f;  // a row that sees no key: out 0, lse -inf
    const int64_t row = r_lo + 8 * r;
    if (tq == 0 && row < p.seqlen_q) lse[row] = total > 0.f ? row_max[r] * kLn2 + logf(total) : -kInf;
  }
  store_rows<T, NT_O>(at<T>(p.out, p.o_s, b, h), p.o_s.row, r_lo, p.seqlen_q, 0, p.head_dim, o, mul, tq);
}

// ------------------------------------------------------------------------ backward
// delta = rowsum(dO * O) - dlse (dlse: the gradient reaching lse, if any), and lse in
// log2 units with +inf for rows that see nothing, so exp2(s - lse2) is 0 there.
template <class T>
__global__ void __launch_bounds__(PreCfg::THREADS) bwd_preprocess_kernel(const AttnParams p) {
  const int h = blockIdx.y, b = blockIdx.z;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * PreCfg::BM + threadIdx.x;
  if (threadIdx.x >= PreCfg::BM || row >= p.seqlen_q) return;
  const T* o = at<T>(p.out, p.o_s, b, h) + row * p.o_s.row;
  const T* dout = at<T>(p.dout, p.do_s, b, h) + row * p.do_s.row;
  float acc = 0.f;
  for (int d = 0; d < p.head_dim; ++d) acc += to_float(o[d]) * to_float(dout[d]);
  const int64_t idx = (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + row;
  if (p.dlse) acc -= p.dlse[idx];
  p.delta[idx] = acc;
  const float l = p.lse[idx];
  p.lse2[idx] = l == -kInf ? kInf : l * kLog2e;
}

// One block per (key block, kv head, batch); loops over the query heads of the GQA
// group and the query blocks that can see these keys, so dK/dV are summed in registers.
// Warps: ROW_WARPS groups of 16 key rows, times WD slices of the head dim (the S^T and
// dP^T tiles are then computed by each slice's warp alike; only dK/dV are split).
template <class T, int D>
__global__ void __launch_bounds__(DkdvCfg<D>::THREADS, 1) bwd_dkdv_kernel(const AttnParams p) {
  using Cfg = DkdvCfg<D>;
  constexpr int BN = Cfg::BN, BM = Cfg::BM, LD = Cfg::LD, DW = Cfg::DW, THREADS = Cfg::THREADS;
  constexpr int NT_S = BM / 8, NT_D = DW / 8;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, tq = lane & 3;
  const int rg = warp % Cfg::ROW_WARPS, dc = warp / Cfg::ROW_WARPS;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int hk = blockIdx.y, b = blockIdx.z;

  T* sK = reinterpret_cast<T*>(dynamic_smem());
  T* sV = sK + BN * LD;
  T* sQ = sV + BN * LD;
  T* sdO = sQ + BM * LD;
  float* sLse = reinterpret_cast<float*>(sdO + BM * LD);
  float* sDelta = sLse + BM;

  load_tile<T, BN, D, LD, THREADS>(sK, at<T>(p.k, p.k_s, b, hk), p.k_s.row, n0, p.seqlen_k, p.head_dim, p.vec, tid);
  load_tile<T, BN, D, LD, THREADS>(sV, at<T>(p.v, p.v_s, b, hk), p.v_s.row, n0, p.seqlen_k, p.head_dim, p.vec, tid);
  cp_async_commit();

  float dk[NT_D][4], dv[NT_D][4];
#pragma unroll
  for (int dt = 0; dt < NT_D; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;

  // Queries that see any of keys [n0, last_key]: j - off - right <= i <= j - off + left.
  const int64_t last_key = (n0 + BN < p.seqlen_k ? n0 + BN : p.seqlen_k) - 1;
  int64_t q_lo = 0, q_hi = p.seqlen_q - 1;
  if (p.window_right >= 0 && n0 - p.diag_offset - p.window_right > q_lo) q_lo = n0 - p.diag_offset - p.window_right;
  if (p.window_left >= 0 && last_key - p.diag_offset + p.window_left < q_hi) q_hi = last_key - p.diag_offset + p.window_left;
  const int64_t key_lo = n0 + rg * 16 + g;

  for (int gi = 0; gi < p.group && q_lo <= q_hi; ++gi) {
    const int h = hk * p.group + gi;
    const T* q = at<T>(p.q, p.q_s, b, h);
    const T* dout = at<T>(p.dout, p.do_s, b, h);
    const int64_t rows = (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q;
    for (int64_t mb = q_lo / BM; mb <= q_hi / BM; ++mb) {
      const int64_t m0 = mb * BM;
      __syncthreads();  // all warps are done with the previous Q / dO tile
      load_tile<T, BM, D, LD, THREADS>(sQ, q, p.q_s.row, m0, p.seqlen_q, p.head_dim, p.vec, tid);
      load_tile<T, BM, D, LD, THREADS>(sdO, dout, p.do_s.row, m0, p.seqlen_q, p.head_dim, p.vec, tid);
      cp_async_commit();
      for (int i = tid; i < BM; i += THREADS) {
        const bool in = m0 + i < p.seqlen_q;
        sLse[i] = in ? p.lse2[rows + m0 + i] : kInf;  // rows past the end: P = 0
        sDelta[i] = in ? p.delta[rows + m0 + i] : 0.f;
      }
      cp_async_wait<0>();
      __syncthreads();

      // S^T = K Q^T for this warp's 16 keys x BM queries, then P^T = exp2(S^T - lse2[query]).
      float s[NT_S][4];
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      warp_gemm_nk<T, NT_S, D>(s, sK, LD, rg * 16, sQ, LD, lane);
      const bool mask = needs_mask(p, m0, BM, n0, BN);
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = nt * 8 + 2 * tq + (e & 1);
          float pv = exp2f(s[nt][e] * p.scale_log2 - sLse[c]);
          if (mask && !visible(p, m0 + c, key_lo + 8 * (e >> 1))) pv = 0.f;
          s[nt][e] = pv;
        }
      // dP^T = V dO^T
      float dp[NT_S][4];
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt) dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
      warp_gemm_nk<T, NT_S, D>(dp, sV, LD, rg * 16, sdO, LD, lane);
      // dV += P^T dO (this warp's slice of the head dim)
      warp_gemm_acc_kn<T, NT_D, NT_S>(dv, s, sdO, LD, dc * DW, lane);
      // dS^T = P^T (dP^T - delta[query]);  dK += dS^T Q
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[nt][e] = s[nt][e] * (dp[nt][e] - sDelta[nt * 8 + 2 * tq + (e & 1)]);
      warp_gemm_acc_kn<T, NT_D, NT_S>(dk, dp, sQ, LD, dc * DW, lane);
    }
  }
  cp_async_wait<0>();

  const float mul_k[2] = {p.scale, p.scale}, one[2] = {1.f, 1.f};
  store_rows<T, NT_D>(at<T>(p.dk, p.dk_s, b, hk), p.dk_s.row, key_lo, p.seqlen_k, dc * DW, p.head_dim, dk, mul_k, tq);
  store_rows<T, NT_D>(at<T>(p.dv, p.dv_s, b, hk), p.dv_s.row, key_lo, p.seqlen_k, dc * DW, p.head_dim, dv, one, tq);
}

// One block per (query block, head, batch); loops over the key blocks its rows see.
template <class T, int D>
__global__ void __launch_bounds__(DqCfg<D>::THREADS, 1) bwd_dq_kernel(const AttnParams p) {
  using Cfg = DqCfg<D>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, LD = Cfg::LD, THREADS = Cfg::THREADS;
  constexpr int NT_S = BN / 8, NT_D = D / 8;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, tq = lane & 3;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int h = blockIdx.y, b = blockIdx.z, hk = h / p.group;

  T* sQ = reinterpret_cast<T*>(dynamic_smem());
  T* sdO = sQ + BM * LD;
  T* sK = sdO + BM * LD;
  T* sV = sK + BN * LD;
  const T* k = at<T>(p.k, p.k_s, b, hk);
  const T* v = at<T>(p.v, p.v_s, b, hk);
  load_tile<T, BM, D, LD, THREADS>(sQ, at<T>(p.q, p.q_s, b, h), p.q_s.row, m0, p.seqlen_q, p.head_dim, p.vec, tid);
  load_tile<T, BM, D, LD, THREADS>(sdO, at<T>(p.dout, p.do_s, b, h), p.do_s.row, m0, p.seqlen_q, p.head_dim, p.vec,
                                   tid);
  cp_async_commit();

  const int64_t r_lo = m0 + warp * 16 + g;
  const int64_t rows = (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q;
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = r_lo + 8 * r < p.seqlen_q;
    lse2[r] = in ? p.lse2[rows + r_lo + 8 * r] : kInf;
    delta[r] = in ? p.delta[rows + r_lo + 8 * r] : 0.f;
  }

  const int64_t last_row = (m0 + BM < p.seqlen_q ? m0 + BM : p.seqlen_q) - 1;
  int64_t nb_begin, nb_end;
  key_blocks(p, m0, last_row, BN, nb_begin, nb_end);

  float dq[NT_D][4];
#pragma unroll
  for (int dt = 0; dt < NT_D; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;

  for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
    const int64_t n0 = nb * BN;
    __syncthreads();  // all warps are done with the previous K / V tile
    load_tile<T, BN, D, LD, THREADS>(sK, k, p.k_s.row, n0, p.seqlen_k, p.head_dim, p.vec, tid);
    load_tile<T, BN, D, LD, THREADS>(sV, v, p.v_s.row, n0, p.seqlen_k, p.head_dim, p.vec, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    float s[NT_S][4], dp[NT_S][4];
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
    warp_gemm_nk<T, NT_S, D>(s, sQ, LD, warp * 16, sK, LD, lane);
    const bool mask = needs_mask(p, m0, BM, n0, BN);
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pv = exp2f(s[nt][e] * p.scale_log2 - lse2[e >> 1]);
        if (mask && !visible(p, r_lo + 8 * (e >> 1), n0 + nt * 8 + 2 * tq + (e & 1))) pv = 0.f;
        s[nt][e] = pv;
      }
    warp_gemm_nk<T, NT_S, D>(dp, sdO, LD, warp * 16, sV, LD, lane);  // dP = dO V^T
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[nt][e] = s[nt][e] * (dp[nt][e] - delta[e >> 1]);
    warp_gemm_acc_kn<T, NT_D, NT_S>(dq, dp, sK, LD, 0, lane);  // dQ += dS K
  }
  cp_async_wait<0>();
  const float mul[2] = {p.scale, p.scale};
  store_rows<T, NT_D>(at<T>(p.dq, p.dq_s, b, h), p.dq_s.row, r_lo, p.seqlen_q, 0, p.head_dim, dq, mul, tq);
}

}  // namespace fa
