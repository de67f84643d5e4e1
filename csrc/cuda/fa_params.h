// Arguments of the CUDA kernels: plain data, filled and validated on the host.
//
// Tensors are logical (batch, seqlen, heads, head_dim) with element strides
// (batch, row, head) and a unit last stride.  Key j is visible to query i iff
//   i + diag_offset - window_left <= j <= i + diag_offset + window_right
// with a negative bound meaning unbounded (see csrc/ops.cpp).

#pragma once

#include <cstdint>

namespace fa {

struct Strides {
  int64_t batch, row, head;
};

struct AttnParams {
  // forward inputs / outputs
  const void *q, *k, *v;
  void* out;
  float* lse;  // (batch, heads_q, seqlen_q) contiguous, natural log
  Strides q_s, k_s, v_s, o_s;
  // backward
  const void* dout;
  const float* dlse;  // (batch, heads_q, seqlen_q) contiguous, or null
  void *dq, *dk, *dv;
  Strides do_s, dq_s, dk_s, dv_s;
  float* delta;  // scratch (batch, heads_q, seqlen_q): rowsum(dO * O) - dlse
  float* lse2;   // scratch (batch, heads_q, seqlen_q): lse in log2 units, +inf for empty rows

  int batch, heads_q, heads_k, group, head_dim;
  int64_t seqlen_q, seqlen_k;
  float scale, scale_log2;  // softmax_scale and softmax_scale * log2(e)
  int64_t diag_offset, window_left, window_right;
  bool vec;  // every tensor allows 16-byte loads (see load_tile)
};

}  // namespace fa
