// The CPU implementations of flashattn_lite_C::fwd / bwd (schema in csrc/ops.cpp): checks
// of everything that reaches the operators, layout preparation, and the calls into the
// kernels (attention_fwd_cpu.cpp, attention_bwd_cpu.cpp; shared pieces in attention_cpu.h).

#include <torch/library.h>

#include <numeric>

#include "attention_cpu.h"

namespace flashattn_lite {
namespace attention_cpu {
namespace {

// Sequence lengths (and packed totals) must fit int32, as cu_seqlens and seqlens do
// (flash-attn's limit too); the head dim reaches BLAS as an int.  Checked before any
// copy: a 2^31-row key tensor is often a stride-0 expand.  (Strides of any size are
// fine: blas_gemm packs a tile whose row stride does not fit an int.)
void check_lengths(const at::Tensor& q, const at::Tensor& k) {
  const int64_t sq = q.size(-3), sk = k.size(-3), d = q.size(-1);
  TORCH_CHECK_VALUE(sq <= kBlasIntMax && sk <= kBlasIntMax,
                    "flashattn_lite cpu: sequence lengths must be below 2^31 (seqlens and cu_seqlens are int32), "
                    "got seqlen_q = ", sq, ", seqlen_k = ", sk);
  TORCH_CHECK_VALUE(d <= kBlasIntMax, "flashattn_lite cpu: head dim must be below 2^31, got ", d);
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool varlen) {
  if (varlen) {
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
                "flashattn_lite cpu: with cu_seqlens, q, k, v must be 3-D (total_tokens, H, D)");
  } else {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                "flashattn_lite cpu: q, k, v must be 4-D (B, S, H, D), or 3-D with cu_seqlens");
  }
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "flashattn_lite cpu: tensors must be on the CPU");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "flashattn_lite cpu: q, k, v must share one dtype");
  // v may have its own head dim Dv (MLA); every other dim is k's
  TORCH_CHECK(k.sizes().slice(0, k.dim() - 1) == v.sizes().slice(0, v.dim() - 1),
              "flashattn_lite cpu: k and v must have the same shape except the last (head) dim");
  TORCH_CHECK(k.size(-1) == q.size(-1), "flashattn_lite cpu: q and k have different head dims");
  TORCH_CHECK(varlen || k.size(0) == q.size(0), "flashattn_lite cpu: q and k have different batch sizes");
  TORCH_CHECK(k.size(-2) > 0 && q.size(-2) % k.size(-2) == 0,
              "flashattn_lite cpu: query heads must be a multiple of kv heads");
  check_lengths(q, k);
}

at::ScalarType compute_type(at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "flashattn_lite cpu: unsupported dtype ", t);
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Strides the kernels can hand to BLAS: a unit last stride, and a row (sequence)
// stride of at least the head dim, since BLAS rejects a leading dimension below the
// row length (an expanded tensor has row stride 0; a one-row tensor may have any).
// Anything else is copied once, into a fresh contiguous tensor.
at::Tensor blas_ready(const at::Tensor& t) {
  const int64_t D = t.size(-1);
  const bool last_ok = D <= 1 || t.stride(-1) == 1;
  const bool rows_ok = t.stride(1) >= D && t.stride(0) >= 0 && t.stride(2) >= 0;
  return last_ok && rows_ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Widen to the compute type, then make the strides BLAS-ready.
at::Tensor prepare(const at::Tensor& t, at::ScalarType ct) {
  return blas_ready(t.scalar_type() == ct ? t : t.to(ct));
}

// An uninitialised tensor shaped like ``t`` but with last dim ``last``, its other dims in
// the same memory order as ``t``'s (empty_like's strides, for another head dim) and the
// head dim innermost, as the kernels write it.  A head dim of size 1 may carry any stride
// (even the largest), so its place in ``t``'s order says nothing.
at::Tensor like_with_last(const at::Tensor& t, int64_t last) {
  if (last == t.size(-1)) return at::empty_like(t);
  std::vector<int64_t> shape = t.sizes().vec(), order(t.dim());
  shape.back() = last;
  std::iota(order.begin(), order.end(), 0);
  // outermost first: larger stride first; ties keep the logical order (stable)
  std::stable_sort(order.begin(), order.end() - 1, [&](int64_t a, int64_t b) { return t.stride(a) > t.stride(b); });
  std::vector<int64_t> permuted(t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) permuted[i] = shape[order[i]];
  at::Tensor dense = at::empty(permuted, t.options());
  std::vector<int64_t> inverse(t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) inverse[order[i]] = i;
  return dense.permute(inverse);
}

// A packed varlen tensor (total, H, D) as the kernels' 4-D (1, total, H, D).
at::Tensor as_4d(const at::Tensor& t, bool varlen) { return varlen ? t.unsqueeze(0) : t; }

std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, "flashattn_lite cpu: ", name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2, "flashattn_lite cpu: ", name,
              " must be 1-D with batch + 1 >= 2 entries, got shape ", cu.sizes());
  TORCH_CHECK(cu.device().is_cpu(), "flashattn_lite cpu: ", name, " must be on the CPU");
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  std::vector<int64_t> values(p, p + c.numel());
  TORCH_CHECK(values.front() == 0, "flashattn_lite cpu: ", name, "[0] must be 0, got ", values.front());
  for (size_t b = 1; b < values.size(); ++b)
    TORCH_CHECK(values[b] >= values[b - 1], "flashattn_lite cpu: ", name, " must be non-decreasing (entry ", b,
                " is ", values[b], " after ", values[b - 1], ")");
  TORCH_CHECK(values.back() == total, "flashattn_lite cpu: ", name, "[-1] = ", values.back(),
              " must equal the number of packed tokens (", total, ")");
  return values;
}

// The problems of a call: B dense batch entries, or the packed sequences of cu_seqlens.
Problem make_problem(const at::Tensor& q4, const at::Tensor& k4, const std::optional<at::Tensor>& cu_seqlens_q,
                     const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                     int64_t diag_offset, int64_t window_left, int64_t window_right) {
  Problem pr;
  pr.left = window_left;
  pr.right = window_right;
  pr.rows = q4.size(1);
  if (!cu_seqlens_q.has_value()) {
    const int64_t Sq = q4.size(1), Sk = k4.size(1);
    for (int64_t b = 0; b < q4.size(0); ++b) pr.seqs.push_back(Seq{b, b, 0, 0, Sq, Sk, diag_offset});
    pr.max_q = Sq;
    pr.max_k = Sk;
    pr.drop_cols = Sk;
    return pr;
  }
  const std::vector<int64_t> cq = read_cu_seqlens(*cu_seqlens_q, "cu_seqlens_q", q4.size(1));
  const std::vector<int64_t> ck = read_cu_seqlens(*cu_seqlens_k, "cu_seqlens_k", k4.size(1));
  TORCH_CHECK(cq.size() == ck.size(), "flashattn_lite cpu: cu_seqlens_q and cu_seqlens_k must have the same length "
              "(batch + 1), got ", cq.size(), " and ", ck.size());
  for (size_t b = 0; b + 1 < cq.size(); ++b) {
    const int64_t lq = cq[b + 1] - cq[b], lk = ck[b + 1] - ck[b];
    pr.seqs.push_back(Seq{int64_t(b), 0, cq[b], ck[b], lq, lk, diag_offset + lk - lq});
    pr.max_q = std::max(pr.max_q, lq);
    pr.max_k = std::max(pr.max_k, lk);
  }
  TORCH_CHECK(max_seqlen_q >= pr.max_q, "flashattn_lite cpu: max_seqlen_q = ", max_seqlen_q,
              " is smaller than the longest query sequence (", pr.max_q, ")");
  TORCH_CHECK(max_seqlen_k >= pr.max_k, "flashattn_lite cpu: max_seqlen_k = ", max_seqlen_k,
              " is smaller than the longest key sequence (", pr.max_k, ")");
  pr.drop_cols = max_seqlen_k;
  return pr;
}

BiasView make_bias(const std::optional<at::Tensor>& bias, const at::Tensor& q4, const at::Tensor& k4, bool varlen) {
  BiasView view;
  if (!bias.has_value()) return view;
  const at::Tensor& t = *bias;
  TORCH_CHECK(!varlen, "flashattn_lite cpu: bias is not supported with cu_seqlens (varlen)");
  const std::vector<int64_t> full{q4.size(0), q4.size(2), q4.size(1), k4.size(1)};
  TORCH_CHECK(t.dim() == 4 && t.sizes() == at::IntArrayRef(full),
              "flashattn_lite cpu: bias must be a (batch, heads, seqlen_q, seqlen_k) = ", at::IntArrayRef(full),
              " view (broadcast dims with stride 0), got shape ", t.sizes());
  const at::ScalarType d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16,
              "flashattn_lite cpu: bias must be a floating-point tensor, got ", d);
  TORCH_CHECK(t.device().is_cpu(), "flashattn_lite cpu: bias must be on the CPU");
  for (int64_t i = 0; i < 4; ++i) TORCH_CHECK(t.stride(i) >= 0, "flashattn_lite cpu: bias has a negative stride");
  view.data = t.data_ptr();
  view.dtype = d;
  view.sb = t.stride(0);
  view.sh = t.stride(1);
  view.si = t.stride(2);
  view.sj = t.stride(3);
  return view;
}

Dropout make_dropout(double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "flashattn_lite cpu: dropout_p must be in [0, 1), got ", p);
  Dropout d;
  if (p > 0) {
    d.philox = PhiloxDropout(uint64_t(seed), p);
    d.rescale = 1.0 / (1.0 - p);
  }
  return d;
}

// The learnable sink (num_heads_q,) as a checked tensor, or an undefined one.
at::Tensor checked_sink(const std::optional<at::Tensor>& learnable_sink, int64_t heads) {
  if (!learnable_sink.has_value()) return at::Tensor();
  const at::Tensor& s = *learnable_sink;
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == heads, "flashattn_lite cpu: learnable_sink must have shape "
                    "(num_heads_q,) = (", heads, ",), got ", s.sizes());
  TORCH_CHECK_TYPE(s.is_floating_point(), "flashattn_lite cpu: learnable_sink must be a float tensor, got ",
                   s.scalar_type());
  TORCH_CHECK(s.device().is_cpu(), "flashattn_lite cpu: learnable_sink must be on the CPU");
  return s;
}

std::tuple<at::Tensor, at::Tensor> fwd_sink_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& bias, double softmax_scale,
    int64_t diag_offset, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t dropout_seed,
    const std::optional<at::Tensor>& learnable_sink) {
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
              "flashattn_lite cpu: cu_seqlens_q and cu_seqlens_k must be given together");
  const bool varlen = cu_seqlens_q.has_value();
  check_qkv(q_in, k_in, v_in, varlen);
  const at::ScalarType ct = compute_type(q_in.scalar_type());
  at::Tensor q = blas_ready(as_4d(q_in, varlen)), k = blas_ready(as_4d(k_in, varlen)),
             v = blas_ready(as_4d(v_in, varlen));
  Problem pr = make_problem(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, diag_offset, window_left,
                            window_right);
  at::Tensor sink;
  if (learnable_sink.has_value()) {
    sink = checked_sink(learnable_sink, q.size(2)).to(at::kDouble).contiguous();
    pr.sink = sink.data_ptr<double>();
  }
  const BiasView bv = make_bias(bias, q, k, varlen);
  const Dropout drop = make_dropout(dropout_p, dropout_seed);
  // q's layout (strides the kernel can write through) with v's head dim
  at::Tensor out = like_with_last(q, v.size(-1));
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(ct));
  if (q.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
  } else {
    fwd_run(q, k, v, out, lse, softmax_scale, pr, softcap, alibi_slopes, bv, drop, dropout_p > 0);
  }
  if (varlen) return {out.squeeze(0), lse.squeeze(0)};
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, const std::optional<at::Tensor>& bias,
                                           double softmax_scale, int64_t diag_offset, int64_t window_left,
                                           int64_t window_right, double softcap,
                                           const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                                           int64_t dropout_seed) {
  return fwd_sink_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, softmax_scale,
                      diag_offset, window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed,
                      std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_sink_cpu(
    const at::Tensor& dout_in, const std::optional<at::Tensor>& dlse, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& bias, double softmax_scale,
    int64_t diag_offset, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t dropout_seed, bool bias_grad,
    bool deterministic, const std::optional<at::Tensor>& learnable_sink) {
  (void)deterministic;  // every CPU backward is deterministic
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
              "flashattn_lite cpu: cu_seqlens_q and cu_seqlens_k must be given together");
  const bool varlen = cu_seqlens_q.has_value();
  check_qkv(q_in, k_in, v_in, varlen);
  std::vector<int64_t> out_shape = q_in.sizes().vec();
  out_shape.back() = v_in.size(-1);
  TORCH_CHECK(dout_in.sizes() == at::IntArrayRef(out_shape) && out_in.sizes() == at::IntArrayRef(out_shape),
              "flashattn_lite cpu: dout and out must have shape ", at::IntArrayRef(out_shape),
              " (q's, with v's head dim)");
  const std::vector<int64_t> lse_shape =
      varlen ? std::vector<int64_t>{q_in.size(1), q_in.size(0)}
             : std::vector<int64_t>{q_in.size(0), q_in.size(2), q_in.size(1)};
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef(lse_shape), "flashattn_lite cpu: lse must have shape ",
              at::IntArrayRef(lse_shape), ", got ", lse_in.sizes());
  TORCH_CHECK(!dlse.has_value() || dlse->sizes() == at::IntArrayRef(lse_shape),
              "flashattn_lite cpu: dlse must have lse's shape ", at::IntArrayRef(lse_shape));
  TORCH_CHECK(!bias_grad || bias.has_value(), "flashattn_lite cpu: bias_grad needs a bias");
  const at::ScalarType ct = compute_type(q_in.scalar_type());
  // bf16/fp16 products: q, k, v, dout stay bf16/fp16 (the kernel packs them); else all widen to ct
  const bool mat = pair_products(q_in.scalar_type());
  const at::ScalarType it = mat ? q_in.scalar_type() : ct;
  at::Tensor q = prepare(as_4d(q_in, varlen), it), k = prepare(as_4d(k_in, varlen), it),
             v = prepare(as_4d(v_in, varlen), it);
  at::Tensor dout = prepare(as_4d(dout_in, varlen), it), out = prepare(as_4d(out_in, varlen), ct);
  const Problem pr = make_problem(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, diag_offset,
                                  window_left, window_right);
  const BiasView bv = make_bias(bias, q, k, varlen);
  const Dropout drop = make_dropout(dropout_p, dropout_seed);
  at::Tensor lse = lse_in.to(ct).reshape({q.size(0), q.size(2), q.size(1)}).contiguous();
  // delta = rowsum(dO * O) - dlse, shape (B, H, Sq)
  at::Tensor delta = (dout.to(ct) * out).sum(-1).transpose(1, 2).contiguous();
  const at::Tensor sink_in = checked_sink(learnable_sink, q.size(2));
  at::Tensor dsink = at::empty({0}, q.options().dtype(ct));
  if (sink_in.defined()) {
    // flashattn_lite/backends/sinks.py: the probabilities are exp(s - lse') with
    // lse' = logaddexp(lse, sink), and dsink_h = -sum_{b,i} sigmoid(sink_h - lse_i) * delta_i
    // (delta from dO.O alone: a dlse takes the generic path there, not this one)
    TORCH_CHECK(!dlse.has_value(), "flashattn_lite cpu: cpu_bwd_sink takes no dlse");
    const at::Tensor s = sink_in.to(ct).view({1, -1, 1});
    dsink = -(at::nan_to_num(at::sigmoid(s - lse), 0.0) * delta).sum(at::IntArrayRef{0, 2});
    dsink = dsink.to(sink_in.scalar_type());
    lse = at::logaddexp(lse, s).contiguous();
  }
  if (dlse.has_value()) delta.sub_(dlse->to(ct).reshape(delta.sizes()));
  at::Tensor dq = at::empty_like(q, q.options().dtype(ct));
  at::Tensor dk = at::empty_like(k, k.options().dtype(ct));
  at::Tensor dv = at::empty_like(v, v.options().dtype(ct));
  at::Tensor dbias = bias_grad ? at::empty({q.size(0), q.size(2), q.size(1), k.size(1)}, q.options().dtype(ct))
                               : at::empty({0}, q.options().dtype(ct));
  if (q.numel() == 0 || k.numel() == 0) {
    dbias.zero_();
    dq.zero_();
    dk.zero_();
    dv.zero_();
  } else {
    bwd_run(dout, q, k, v, lse, delta, dq, dk, dv, bias_grad ? &dbias : nullptr, softmax_scale, pr, softcap,
            alibi_slopes, bv, drop, dropout_p > 0);
  }
  auto narrow = [varlen](const at::Tensor& wide, const at::ScalarType type) {
    const at::Tensor t = varlen ? wide.squeeze(0) : wide;
    return t.scalar_type() == type ? t : t.to(type);
  };
  if (bias_grad) dbias = dbias.to(bias->scalar_type());
  return {narrow(dq, q_in.scalar_type()), narrow(dk, k_in.scalar_type()), narrow(dv, v_in.scalar_type()), dbias,
          dsink};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& bias, double softmax_scale, int64_t diag_offset, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    int64_t dropout_seed, bool bias_grad, bool deterministic) {
  auto r = bwd_sink_cpu(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias,
                        softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes, dropout_p,
                        dropout_seed, bias_grad, deterministic, std::nullopt);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

}  // namespace

}  // namespace attention_cpu

// fwd with learnable sinks in the kernel's normaliser (CPU only; other backends apply them
// around their kernels, flashattn_lite/backends/sinks.py): fwd's schema plus the sink.
TORCH_LIBRARY_FRAGMENT(flashattn_lite_C, m) {
  m.def("cpu_fwd_sink(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
        "int max_seqlen_k, Tensor? bias, float softmax_scale, int diag_offset, int window_left, "
        "int window_right, float softcap, Tensor? alibi_slopes, float dropout_p, int dropout_seed, "
        "Tensor? learnable_sink) -> (Tensor, Tensor)");
  // bwd with the sink: (dq, dk, dv, dbias, dsink); dlse must be None (sinks.py takes that path)
  m.def("cpu_bwd_sink(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? bias, "
        "float softmax_scale, int diag_offset, int window_left, int window_right, float softcap, "
        "Tensor? alibi_slopes, float dropout_p, int dropout_seed, bool bias_grad, bool deterministic, "
        "Tensor? learnable_sink) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flashattn_lite_C, CPU, m) {
  m.impl("fwd", &attention_cpu::fwd_cpu);
  m.impl("bwd", &attention_cpu::bwd_cpu);
  m.impl("cpu_fwd_sink", &attention_cpu::fwd_sink_cpu);
  m.impl("cpu_bwd_sink", &attention_cpu::bwd_sink_cpu);
}

}  // namespace flashattn_lite
