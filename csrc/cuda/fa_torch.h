// Torch glue shared by the real CUDA binding (attention_cuda.cpp) and the emulated one
// (emu/attention_emu.cpp): validation before launch, output allocation, parameters.
// Needs no CUDA header: the launch itself goes through a function pointer.

#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <tuple>

#include "fa_config.h"
#include "fa_params.h"

namespace fa_torch {

// backward?, bf16?, params, stream -> nullptr or an error message
using RunFn = const char* (*)(bool, bool, const fa::AttnParams&, void*);

// The operator schemas of csrc/ops.cpp (flashattn_lite_C), repeated for the emulator's
// own namespace (flashattn_lite_emu) so both bindings take the very same arguments.
constexpr const char* kFwdSchema =
    "fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
    "int max_seqlen_k, Tensor? bias, float softmax_scale, int diag_offset, int window_left, "
    "int window_right, float softcap, Tensor? alibi_slopes, float dropout_p, int dropout_seed) "
    "-> (Tensor, Tensor)";
constexpr const char* kBwdSchema =
    "bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? bias, "
    "float softmax_scale, int diag_offset, int window_left, int window_right, float softcap, "
    "Tensor? alibi_slopes, float dropout_p, int dropout_seed, bool bias_grad, bool deterministic) "
    "-> (Tensor, Tensor, Tensor, Tensor)";

using OptT = c10::optional<at::Tensor>;

// Features of the schema the CUDA kernels do not implement: refused before launch (the
// Python capability check routes such calls elsewhere first).
inline void check_unsupported(const char* who, const OptT& cu_q, const OptT& cu_k, const OptT& bias,
                              double dropout_p) {
  TORCH_CHECK(!cu_q.has_value() && !cu_k.has_value(), who, ": varlen (cu_seqlens) is not implemented");
  TORCH_CHECK(!bias.has_value(), who, ": attn_mask / bias is not implemented");
  TORCH_CHECK(dropout_p == 0.0, who, ": dropout is not implemented");
}

inline fa::Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// 16-byte cp.async chunks need a 16-byte aligned base and strides that are multiples of 8 elements.
inline bool vec_ok(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
         t.stride(2) % 8 == 0;
}

inline void check_qkv(const char* who, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      c10::DeviceType device, double softcap, const c10::optional<at::Tensor>& alibi) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, who,
              ": q, k, v must be 4-D (batch, seqlen, heads, head_dim)");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, who,
              ": only float16 and bfloat16 are supported, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), who,
              ": q, k, v must have the same dtype");
  TORCH_CHECK(q.device().type() == device && k.device() == q.device() && v.device() == q.device(), who,
              ": q, k, v must be on one ", c10::DeviceTypeName(device), " device");
  TORCH_CHECK(k.sizes() == v.sizes(), who, ": k and v must have the same shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), who, ": q and k differ in batch or head_dim");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, who,
              ": the number of query heads must be a multiple of the number of kv heads");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 256, who, ": head_dim must be in 1..256, got ", q.size(3));
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, who,
              ": q, k, v need a unit stride in the last dimension");
  TORCH_CHECK(q.size(0) <= 65535 && q.size(2) <= 65535, who, ": batch and heads must be at most 65535");
  TORCH_CHECK(softcap == 0.0, who, ": softcap is not implemented by the CUDA C++ kernels");
  TORCH_CHECK(!alibi.has_value(), who, ": ALiBi is not implemented by the CUDA C++ kernels");
}

// A window bound beyond every possible distance is the same as none (keeps int64 sums small).
inline int64_t norm_window(int64_t w, int64_t limit) { return w < 0 || w > limit ? -1 : w; }

inline fa::AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                  int64_t diag_offset, int64_t left, int64_t right) {
  fa::AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_s = strides_of(q);
  p.k_s = strides_of(k);
  p.v_s = strides_of(v);
  p.batch = static_cast<int>(q.size(0));
  p.seqlen_q = q.size(1);
  p.seqlen_k = k.size(1);
  p.heads_q = static_cast<int>(q.size(2));
  p.heads_k = static_cast<int>(k.size(2));
  p.group = p.heads_q / p.heads_k;
  p.head_dim = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  TORCH_CHECK(std::llabs(diag_offset) <= (int64_t(1) << 40), "flashattn_lite: diag_offset out of range");
  const int64_t limit = p.seqlen_q + p.seqlen_k + std::llabs(diag_offset);
  p.diag_offset = diag_offset;
  p.window_left = norm_window(left, limit);
  p.window_right = norm_window(right, limit);
  p.vec = p.head_dim % 8 == 0 && vec_ok(q) && vec_ok(k) && vec_ok(v);
  return p;
}

inline std::tuple<at::Tensor, at::Tensor> fwd(const char* who, c10::DeviceType device, RunFn run, void* stream,
                                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              double scale, int64_t diag_offset, int64_t left, int64_t right,
                                              double softcap, const c10::optional<at::Tensor>& alibi) {
  check_qkv(who, q, k, v, device, softcap, alibi);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  if (device == c10::DeviceType::CPU) {  // emulator: an element the kernels fail to write shows as NaN
    out.fill_(NAN);
    lse.fill_(NAN);
  }
  fa::AttnParams p = make_params(q, k, v, scale, diag_offset, left, right);
  p.out = out.data_ptr();
  p.o_s = strides_of(out);
  p.lse = lse.data_ptr<float>();
  p.vec = p.vec && vec_ok(out);
  const char* err = run(false, q.scalar_type() == at::kBFloat16, p, stream);
  TORCH_CHECK(err == nullptr, who, ": forward launch failed: ", err ? err : "");
  return {out, lse};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const char* who, c10::DeviceType device, RunFn run, void* stream, const at::Tensor& dout,
    const c10::optional<at::Tensor>& dlse_opt, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse_in, double scale, int64_t diag_offset, int64_t left, int64_t right,
    double softcap, const c10::optional<at::Tensor>& alibi) {
  check_qkv(who, q, k, v, device, softcap, alibi);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), who, ": dout and out must have q's shape");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), who,
              ": dout and out must have q's dtype");
  TORCH_CHECK(dout.device() == q.device() && out.device() == q.device() && lse_in.device() == q.device(), who,
              ": dout, out and lse must be on q's device");
  TORCH_CHECK(dout.stride(3) == 1 && out.stride(3) == 1, who, ": dout and out need a unit last stride");
  const std::vector<int64_t> lse_shape{q.size(0), q.size(2), q.size(1)};
  TORCH_CHECK(lse_in.sizes() == lse_shape && lse_in.scalar_type() == at::kFloat, who,
              ": lse must be float32 of shape (batch, heads, seqlen_q)");
  at::Tensor lse = lse_in.contiguous();
  at::Tensor dlse;
  if (dlse_opt.has_value()) {
    TORCH_CHECK(dlse_opt->sizes() == lse_shape && dlse_opt->device() == q.device(), who,
                ": dlse must have lse's shape and device");
    dlse = dlse_opt->to(at::kFloat).contiguous();
  }
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.size(0) == 0 || q.size(2) == 0) return {dq, dk, dv};
  if (q.size(1) == 0) return {dq, dk.zero_(), dv.zero_()};  // no query sees any key
  at::Tensor delta = at::empty(lse_shape, lse.options());
  at::Tensor lse2 = at::empty(lse_shape, lse.options());
  if (device == c10::DeviceType::CPU) {  // emulator: an element the kernels fail to write shows as NaN
    for (at::Tensor* t : {&dq, &dk, &dv, &delta, &lse2}) t->fill_(NAN);
  }
  fa::AttnParams p = make_params(q, k, v, scale, diag_offset, left, right);
  p.out = const_cast<void*>(out.data_ptr());
  p.o_s = strides_of(out);
  p.lse = lse.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.do_s = strides_of(dout);
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_s = strides_of(dq);
  p.dk_s = strides_of(dk);
  p.dv_s = strides_of(dv);
  p.delta = delta.data_ptr<float>();
  p.lse2 = lse2.data_ptr<float>();
  p.vec = p.vec && vec_ok(dout) && vec_ok(out) && vec_ok(dq) && vec_ok(dk) && vec_ok(dv);
  const char* err = run(true, q.scalar_type() == at::kBFloat16, p, stream);
  TORCH_CHECK(err == nullptr, who, ": backward launch failed: ", err ? err : "");
  return {dq, dk, dv};
}

// The operators with the full schema.  B: who (name in errors), device, run (the launch
// entry point), Guard (device guard type, constructed from q's device), stream().
template <class B>
std::tuple<at::Tensor, at::Tensor> fwd_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const OptT& cu_q, const OptT& cu_k, int64_t max_q, int64_t max_k,
                                          const OptT& bias, double scale, int64_t off, int64_t left, int64_t right,
                                          double softcap, const OptT& alibi, double dropout_p, int64_t seed) {
  (void)max_q, (void)max_k, (void)seed;
  check_unsupported(B::who, cu_q, cu_k, bias, dropout_p);
  const typename B::Guard guard(q.device());
  return fwd(B::who, B::device, B::run, B::stream(), q, k, v, scale, off, left, right, softcap, alibi);
}

template <class B>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_op(
    const at::Tensor& dout, const OptT& dlse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OptT& cu_q, const OptT& cu_k, int64_t max_q, int64_t max_k,
    const OptT& bias, double scale, int64_t off, int64_t left, int64_t right, double softcap, const OptT& alibi,
    double dropout_p, int64_t seed, bool bias_grad, bool deterministic) {
  (void)max_q, (void)max_k, (void)seed, (void)deterministic;  // always deterministic: no atomics
  check_unsupported(B::who, cu_q, cu_k, bias, dropout_p);
  TORCH_CHECK(!bias_grad, B::who, ": bias gradients are not implemented");
  const typename B::Guard guard(q.device());
  auto grads = bwd(B::who, B::device, B::run, B::stream(), dout, dlse, q, k, v, out, lse, scale, off, left, right,
                   softcap, alibi);
  return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), at::empty({0}, q.options())};
}

}  // namespace fa_torch
