// The kernel operators' schemas, written once.  Device implementations register
// against them with TORCH_LIBRARY_IMPL (cpu/attention_cpu.cpp today, CUDA later).
//
// Tensors are logical (batch, seqlen, heads, headdim) with any strides and a unit
// last stride.  Key j is visible to query i iff
//   i + diag_offset - window_left <= j <= i + diag_offset + window_right
// where a negative window bound means unbounded.  lse is float32 (float64 for
// float64 input), shape (batch, heads, seqlen_q), natural log.  softcap > 0 maps
// the scaled scores s to softcap * tanh(s / softcap); alibi_slopes (float32,
// (batch, heads), any strides) then add -slope * |i + diag_offset - j|; bias (dense
// only; a (batch, heads, seqlen_q, seqlen_k) view, broadcast dims with stride 0) is
// added last.  Varlen (cu_seqlens_q/k given, int32 (batch + 1,)): q (total_q, heads,
// headdim), k/v (total_k, kv_heads, headdim), lse (heads, total_q), sequence b's
// diagonal offset diag_offset + len_k(b) - len_q(b).  Dropout (dropout_p > 0) keeps
// the elements flashattn_lite/rng.py's Philox stream keeps for dropout_seed.

#include <torch/library.h>

TORCH_LIBRARY(flashattn_lite_C, m) {
  // The arguments after the tensors are flashattn_lite.backends.Params' fields, in the
  // order of ops.py's _PARAM_ARGS.
  m.def("fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
        "int max_seqlen_k, Tensor? bias, float softmax_scale, int diag_offset, int window_left, "
        "int window_right, float softcap, Tensor? alibi_slopes, float dropout_p, int dropout_seed) "
        "-> (Tensor, Tensor)");
  // Returns (dq, dk, dv, dbias): dbias (B, H, Sq, Sk) in the bias dtype when bias_grad,
  // else an empty tensor.  deterministic=False permits a non-deterministic reduction.
  m.def("bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? bias, "
        "float softmax_scale, int diag_offset, int window_left, int window_right, float softcap, "
        "Tensor? alibi_slopes, float dropout_p, int dropout_seed, bool bias_grad, bool deterministic) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seqlens_k, Tensor? leftpad, float softmax_scale, int window_left, int window_right, float softcap, Tensor? alibi_slopes, int num_splits) -> (Tensor, Tensor)");  // KV-cache decoding: cpu/decode_cpu.cpp
}
