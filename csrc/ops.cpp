// The kernel operators' schemas, written once.  Device implementations register
// against them with TORCH_LIBRARY_IMPL (cpu/attention_cpu.cpp today, CUDA later).
//
// Tensors are logical (batch, seqlen, heads, headdim) with any strides and a unit
// last stride.  Key j is visible to query i iff
//   i + diag_offset - window_left <= j <= i + diag_offset + window_right
// where a negative window bound means unbounded.  lse is float32 (float64 for
// float64 input), shape (batch, heads, seqlen_q), natural log.  softcap > 0 maps
// the scaled scores s to softcap * tanh(s / softcap); alibi_slopes (float32,
// (batch, heads), any strides) then add -slope * |i + diag_offset - j|.

#include <torch/library.h>

TORCH_LIBRARY(flashattn_lite_C, m) {
  m.def("fwd(Tensor q, Tensor k, Tensor v, float softmax_scale, int diag_offset, int window_left, "
        "int window_right, float softcap, Tensor? alibi_slopes) -> (Tensor, Tensor)");
  m.def("bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float softmax_scale, int diag_offset, int window_left, int window_right, float softcap, "
        "Tensor? alibi_slopes) -> (Tensor, Tensor, Tensor)");
}
