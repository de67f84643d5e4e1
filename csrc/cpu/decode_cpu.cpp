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
// group (seqlen_q x group rows), so each key and value row it gathers, widened to the
// accumulation type once, serves the whole group.  With more than one split each task
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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace flashattn_lite {
namespace {

constexpr int64_t kDecodeKeyTile = 64;  // cache positions gathered per step
constexpr int64_t kDecodeMaxSplits = 128;
constexpr int64_t kDecodeMinKeysPerSplit = 256;

struct DecodeShape {
  int64_t batch, seqlen_q, heads, heads_k, group, head_dim, page_size, splits;
  int64_t left, right;  // < 0: unbounded
  double scale, softcap;
};

template <typename T>
using Vec = at::vec::Vectorized<T>;

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

// The same two for a float row against an fp16/bf16 cache row, widened in registers
// (no widened copy: used when a single query row reads each cache row).
template <typename scalar_t>
inline float dot_mixed(const float* a, const scalar_t* b, int64_t n) {
  using bVec = Vec<scalar_t>;
  using fVec = Vec<float>;
  fVec acc0(0.f), acc1(0.f);
  int64_t d = 0;
  for (; d + bVec::size() <= n; d += bVec::size()) {
    auto [b0, b1] = at::vec::convert_to_float<scalar_t>(bVec::loadu(b + d));
    acc0 = at::vec::fmadd(fVec::loadu(a + d), b0, acc0);
    acc1 = at::vec::fmadd(fVec::loadu(a + d + fVec::size()), b1, acc1);
  }
  float s = at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, acc0 + acc1);
  for (; d < n; ++d) s += a[d] * float(b[d]);
  return s;
}

template <typename scalar_t>
inline void axpy_mixed(float* y, const scalar_t* x, float w, int64_t n) {
  using bVec = Vec<scalar_t>;
  using fVec = Vec<float>;
  const fVec wv(w);
  int64_t d = 0;
  for (; d + bVec::size() <= n; d += bVec::size()) {
    auto [x0, x1] = at::vec::convert_to_float<scalar_t>(bVec::loadu(x + d));
    at::vec::fmadd(wv, x0, fVec::loadu(y + d)).store(y + d);
    at::vec::fmadd(wv, x1, fVec::loadu(y + d + fVec::size())).store(y + d + fVec::size());
  }
  for (; d < n; ++d) y[d] += w * float(x[d]);
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

template <typename scalar_t, typename acc_t>
void decode_tasks(const DecodeShape& sh, const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                  const at::Tensor& table, const int32_t* ends, const int32_t* starts, const at::Tensor* slopes,
                  at::Tensor& out, at::Tensor& lse, acc_t* part_o, acc_t* part_lse) {
  const int64_t B = sh.batch, Sq = sh.seqlen_q, H = sh.heads, Hk = sh.heads_k, G = sh.group, D = sh.head_dim;
  const int64_t R = Sq * G, S = sh.splits, P = sh.page_size;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = kc.data_ptr<scalar_t>();
  const scalar_t* vp = vc.data_ptr<scalar_t>();
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
  const bool direct = R == 1;  // fp16/bf16 with one query row per task: no widened copies

  at::parallel_for(0, B * Hk * S, 1, [&](int64_t begin, int64_t finish) {
    std::vector<acc_t> qf(R * D), acc(R * D), m(R), l(R), kt(kDecodeKeyTile * D), vt(kDecodeKeyTile * D);
    std::vector<acc_t> sc(kDecodeKeyTile);
    const acc_t* krow[kDecodeKeyTile];
    const acc_t* vrow[kDecodeKeyTile];
    const scalar_t* ksrc[kDecodeKeyTile];
    const scalar_t* vsrc[kDecodeKeyTile];
    for (int64_t task = begin; task < finish; ++task) {
      const int64_t s = task % S, hk = (task / S) % Hk, b = task / (S * Hk);
      const int64_t end = ends[b], start = starts ? starts[b] : 0, offset = end - Sq;
      int64_t lo = start, hi = end;
      if (sh.left >= 0) lo = std::max(lo, offset - sh.left);
      if (sh.right >= 0) hi = std::min(hi, Sq - 1 + offset + sh.right + 1);
      hi = std::max(hi, lo);
      const int64_t per = (hi - lo + S - 1) / S;
      const int64_t split_lo = std::min(lo + s * per, hi), split_hi = std::min(split_lo + per, hi);

      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = r / G, h = hk * G + r % G;
        const scalar_t* src = qp + b * qsb + i * qss + h * qsh;
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = acc_t(src[d]);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), acc_t(0));

      for (int64_t t0 = split_lo; t0 < split_hi; t0 += kDecodeKeyTile) {
        const int64_t n = std::min(kDecodeKeyTile, split_hi - t0);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t p = t0 + j;
          const int64_t blk = tp[b * tsb + (p / P) * tsp], row = p % P;
          const scalar_t* ks = kp + blk * ksb + row * kss + hk * ksh;
          const scalar_t* vs = vp + blk * vsb + row * vss + hk * vsh;
          if (p + kDecodeKeyTile < split_hi) {
            // cache rows sit a whole (kv heads x headdim) apart: hint the next tile's rows
            const int64_t pn = p + kDecodeKeyTile;
            const int64_t bn = tp[b * tsb + (pn / P) * tsp], rn = pn % P;
            const char* kn = reinterpret_cast<const char*>(kp + bn * ksb + rn * kss + hk * ksh);
            const char* vn = reinterpret_cast<const char*>(vp + bn * vsb + rn * vss + hk * vsh);
            for (int64_t off = 0; off < D * int64_t(sizeof(scalar_t)); off += 64) {
              __builtin_prefetch(kn + off);
              __builtin_prefetch(vn + off);
            }
          }
          if constexpr (std::is_same_v<scalar_t, acc_t>) {  // read the cache in place
            krow[j] = ks;
            vrow[j] = vs;
          } else if (direct) {  // one reader: widen in registers
            ksrc[j] = ks;
            vsrc[j] = vs;
          } else {  // widen once; the whole group uses the row
            at::vec::convert(ks, &kt[j * D], D);
            at::vec::convert(vs, &vt[j * D], D);
            krow[j] = &kt[j * D];
            vrow[j] = &vt[j * D];
          }
        }
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = r / G, h = hk * G + r % G, qpos = i + offset;
          int64_t jlo = t0, jhi = t0 + n;
          if (sh.left >= 0) jlo = std::max(jlo, qpos - sh.left);
          if (sh.right >= 0) jhi = std::min(jhi, qpos + sh.right + 1);
          if (jlo >= jhi) continue;
          const acc_t slope = sp ? acc_t(sp[b * ssb + h * ssh]) : acc_t(0);
          acc_t* x = &sc[jlo - t0];
          const int64_t cnt = jhi - jlo;
          acc_t mx = neg_inf;
          for (int64_t j = 0; j < cnt; ++j) {
            const int64_t p = jlo + j;
            acc_t v;
            if constexpr (std::is_same_v<scalar_t, acc_t>) {
              v = dot(&qf[r * D], krow[p - t0], D);
            } else {
              v = direct ? dot_mixed(&qf[r * D], ksrc[p - t0], D) : dot(&qf[r * D], krow[p - t0], D);
            }
            v = cap > 0 ? cap * std::tanh(v * scale / cap) : v * scale;
            if (sp) v -= slope * acc_t(std::abs(qpos - p));
            x[j] = v;
            mx = std::max(mx, v);
          }
          const acc_t m_new = std::max(m[r], mx);
          const acc_t alpha = std::exp(m[r] - m_new);  // 0 while m[r] is -inf
          acc_t* a = &acc[r * D];
          if (alpha != acc_t(1)) {
            for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
          }
          const acc_t sum = exp_shifted_sum(x, cnt, m_new);
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            for (int64_t j = 0; j < cnt; ++j) axpy(a, vrow[jlo + j - t0], x[j], D);
          } else if (direct) {
            for (int64_t j = 0; j < cnt; ++j) axpy_mixed(a, vsrc[jlo + j - t0], x[j], D);
          } else {
            for (int64_t j = 0; j < cnt; ++j) axpy(a, vrow[jlo + j - t0], x[j], D);
          }
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
        }
      }

      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = r / G, h = hk * G + r % G;
        const bool empty = l[r] == acc_t(0);
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[r];
        const acc_t lse_r = empty ? neg_inf : m[r] + std::log(l[r]);
        if (S == 1) {
          scalar_t* dst = op + ((b * Sq + i) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = scalar_t(acc[r * D + d] * inv);
          lp[(b * H + h) * Sq + i] = lse_r;
        } else {
          acc_t* dst = part_o + (((s * B + b) * Sq + i) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = acc[r * D + d] * inv;
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
      scalar_t* dst = op + ((b * Sq + i) * H + h) * D;
      if (mx == neg_inf) {  // no split saw a key
        for (int64_t d = 0; d < D; ++d) dst[d] = scalar_t(0);
        lp[(b * H + h) * Sq + i] = neg_inf;
        continue;
      }
      std::vector<acc_t> o(D, acc_t(0));
      acc_t total = 0;
      for (int64_t s = 0; s < S; ++s) {
        const acc_t w = std::exp(part_lse[((s * B + b) * H + h) * Sq + i] - mx);
        if (w == acc_t(0)) continue;
        total += w;
        const acc_t* src = part_o + (((s * B + b) * Sq + i) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * src[d];
      }
      for (int64_t d = 0; d < D; ++d) dst[d] = scalar_t(o[d] / total);
      lp[(b * H + h) * Sq + i] = mx + std::log(total);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> decode_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                              const at::Tensor& v_cache, const at::Tensor& block_table,
                                              const at::Tensor& seqlens_k, const c10::optional<at::Tensor>& leftpad,
                                              double softmax_scale, int64_t window_left, int64_t window_right,
                                              double softcap, const c10::optional<at::Tensor>& alibi_slopes,
                                              int64_t num_splits) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, "decode: q and caches must be 4-D");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "decode: k_cache and v_cache shapes differ");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "decode: q and caches must share one dtype");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2, "decode: block_table int32 2-D");
  TORCH_CHECK(seqlens_k.scalar_type() == at::kInt, "decode: seqlens_k must be int32");
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3), Hk = k_cache.size(2);
  TORCH_CHECK(Hk > 0 && H % Hk == 0 && k_cache.size(3) == D, "decode: head counts or head dims do not match");
  const auto cont = [](const at::Tensor& t) { return t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t; };
  at::Tensor qc = cont(q), kc = cont(k_cache), vc = cont(v_cache);
  at::Tensor ends = seqlens_k.contiguous();
  at::Tensor starts = leftpad.has_value() ? leftpad->to(at::kInt).contiguous() : at::Tensor();
  at::Tensor slopes = alibi_slopes.has_value() ? alibi_slopes->to(at::kFloat) : at::Tensor();

  const bool wide = q.scalar_type() == at::kDouble;
  at::Tensor out = at::empty({B, Sq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Sq}, q.options().dtype(wide ? at::kDouble : at::kFloat));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }

  const int32_t* ep = ends.data_ptr<int32_t>();
  int64_t splits = num_splits;
  if (splits <= 0) {
    // Enough (batch, kv head, split) tasks to occupy every thread, each keeping at least
    // kDecodeMinKeysPerSplit positions (a smaller share is not worth a partial result).
    const int64_t tasks = B * Hk, threads = at::get_num_threads();
    const int64_t longest = B ? *std::max_element(ep, ep + B) : 0;
    splits = tasks >= threads ? 1
                              : std::min({(threads + tasks - 1) / tasks,
                                          std::max<int64_t>(1, longest / kDecodeMinKeysPerSplit), kDecodeMaxSplits});
  }
  splits = std::max<int64_t>(1, std::min(splits, kDecodeMaxSplits));

  DecodeShape sh{B, Sq, H, Hk, H / Hk, D, k_cache.size(1), splits, window_left, window_right, softmax_scale, softcap};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flashattn_lite_cpu_decode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor part_o, part_lse;
    if (splits > 1) {
      const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
      part_o = at::empty({splits, B, Sq, H, D}, acc_opts);
      part_lse = at::empty({splits, B, H, Sq}, acc_opts);
    }
    decode_tasks<scalar_t, acc_t>(sh, qc, kc, vc, block_table, ep, starts.defined() ? starts.data_ptr<int32_t>() : nullptr,
                                  slopes.defined() ? &slopes : nullptr, out, lse,
                                  splits > 1 ? part_o.data_ptr<acc_t>() : nullptr,
                                  splits > 1 ? part_lse.data_ptr<acc_t>() : nullptr);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(flashattn_lite_C, CPU, m) {
  m.impl("decode", &decode_cpu);
}

}  // namespace flashattn_lite
