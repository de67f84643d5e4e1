// CPU attention kernels: tiled online-softmax forward, recomputation backward.
//
// Every tile product runs through the BLAS torch.mm uses, in float32 (float64 for
// float64 input).  fp16/bf16 inputs are widened to float32 (per tile in the forward,
// once per call in the backward): a low-precision BLAS product is slower than
// widening, O(N d), and then multiplying in float32, O(N^2 d).
//
// Parallelism: forward over (batch, head, query block); backward over
// (batch, kv head, chunk of key blocks), each task summing dK/dV over its GQA
// group in a fixed order and writing its own dQ partial, reduced in a fixed order.
// No atomics: results are reproducible bit for bit; the forward is also
// independent of the thread count (each output row is computed by one task).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace flashattn_lite {
namespace {

// Fortran BLAS entry points.  torch's x86 wheels link MKL into libtorch_cpu and
// export these (they are what torch.mm ends up calling); declared weak so that a
// torch without them still loads, falling back to ATen's exported gemm kernel.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

template <typename T>
inline void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                      const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = int(m), in = int(n), ik = int(k), ilda = int(lda), ildb = int(ldb), ildc = int(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_) return sgemm_(&ca, &cb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {
    if (dgemm_) return dgemm_(&ca, &cb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  }
  // Fallback through ATen (dispatcher overhead per call, same numbers): column-major
  // X (r x c, ld) is the row-major tensor X^T of shape (c, r) with row stride ld.
  auto view = [](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, c10::CppTypeToScalarType<T>::value);
    return trans ? t : t.t();  // column-major op(X) as a row-major (rows x cols) view
  };
  at::Tensor A = view(a, ta ? k : m, ta ? m : k, lda, ta);
  at::Tensor Bm = view(b, tb ? n : k, tb ? k : n, ldb, tb);
  at::Tensor C = at::from_blob(c, {n, m}, {ldc, 1}, c10::CppTypeToScalarType<T>::value).t();
  if (beta == T(0)) C.zero_(); else C.mul_(beta);
  C.add_(at::mm(A, Bm), alpha);
}

// Row-major C[M, N] = alpha * op(A) @ op(B) + beta * C, with BLAS being column-major:
// a row-major matrix is its column-major transpose, so C^T = op(B)^T op(A)^T.
template <typename T>
inline void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                    int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  blas_gemm<T>(trans_b, trans_a, N, M, K, alpha, B, std::max<int64_t>(ldb, 1), A, std::max<int64_t>(lda, 1), beta,
               C, std::max<int64_t>(ldc, 1));
}

// Visibility band: query i sees keys [i + offset - left, i + offset + right]; < 0 = unbounded.
struct Band {
  int64_t offset, left, right, seqlen_q, seqlen_k;

  // Visible keys of query row i, as [lo, hi) (empty: lo == hi).
  inline void keys(int64_t i, int64_t& lo, int64_t& hi) const {
    lo = left < 0 ? 0 : std::max<int64_t>(0, i + offset - left);
    hi = right < 0 ? seqlen_k : std::min<int64_t>(seqlen_k, i + offset + right + 1);
    lo = std::min(lo, seqlen_k);
    if (hi < lo) hi = lo;
  }
  // Queries that see key j, as [lo, hi): the transposed band.
  inline void queries(int64_t j, int64_t& lo, int64_t& hi) const {
    lo = right < 0 ? 0 : std::max<int64_t>(0, j - offset - right);
    hi = left < 0 ? seqlen_q : std::min<int64_t>(seqlen_q, j - offset + left + 1);
    lo = std::min(lo, seqlen_q);
    if (hi < lo) hi = lo;
  }
};

// Tile sizes.  Large key tiles keep BLAS efficient (long inner products for P @ V);
// FLASHATTN_LITE_CPU_FWD_BLOCKS / FLASHATTN_LITE_CPU_BWD_BLOCKS = "BM,BN" override
// them (tuning only).
struct Blocks {
  int64_t m = 64, n = 512;
};

Blocks blocks_from_env(const char* var, int64_t bm, int64_t bn) {
  Blocks b{bm, bn};
  if (const char* env = std::getenv(var)) {
    long m = 0, n = 0;
    if (std::sscanf(env, "%ld,%ld", &m, &n) == 2 && m > 0 && n > 0) b = Blocks{m, n};
  }
  return b;
}

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline T row_max(const T* x, int64_t n) {
  int64_t j = 0;
  T m = -std::numeric_limits<T>::infinity();
  if (n >= Vec<T>::size()) {
    Vec<T> vm(m);
    for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) vm = at::vec::maximum(vm, Vec<T>::loadu(x + j));
    m = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// exp on a vector: float uses ATen's fast polynomial exp (<= 20 ulp, the one torch's own
// CPU flash attention uses); double keeps the accurate Sleef exp.
template <typename T>
inline Vec<T> vexp(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// out[j] = exp(x[j] - shift) (out may alias x); returns the sum.
template <typename T>
inline T exp_shift_sum(const T* x, T* out, int64_t n, T shift) {
  int64_t j = 0;
  T sum = 0;
  if (n >= Vec<T>::size()) {
    Vec<T> vs(shift), acc(T(0));
    for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
      Vec<T> e = vexp<T>(Vec<T>::loadu(x + j) - vs);
      e.store(out + j);
      acc = acc + e;
    }
    sum = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
  }
  for (; j < n; ++j) {
    out[j] = std::exp(x[j] - shift);
    sum += out[j];
  }
  return sum;
}

// exp_shift_sum fused with the max of x (one pass instead of two).
template <typename T>
inline T exp_shift_sum_max(const T* x, T* out, int64_t n, T shift, T& mx) {
  int64_t j = 0;
  T sum = 0;
  mx = -std::numeric_limits<T>::infinity();
  if (n >= Vec<T>::size()) {
    Vec<T> vs(shift), acc(T(0)), vm(mx);
    for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
      const Vec<T> xv = Vec<T>::loadu(x + j);
      vm = at::vec::maximum(vm, xv);
      Vec<T> e = vexp<T>(xv - vs);
      e.store(out + j);
      acc = acc + e;
    }
    sum = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
    mx = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; j < n; ++j) {
    mx = std::max(mx, x[j]);
    out[j] = std::exp(x[j] - shift);
    sum += out[j];
  }
  return sum;
}

// The online softmax may shift a row by any value not far below its scores (the
// result, out = acc / l and lse = shift + log l, does not depend on the shift).
// Keeping the running shift while a tile's scores exceed it by at most this
// much saves a separate max pass over every tile; exp(kLazyShift) ~ 9e6 cannot overflow
// the sums.  Beyond it, the row's shift is raised and the tile recomputed.
constexpr double kLazyShift = 16.0;

template <typename T>
inline void scale_row(T* x, int64_t n, T s) {
  int64_t j = 0;
  Vec<T> vs(s);
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) (Vec<T>::loadu(x + j) * vs).store(x + j);
  for (; j < n; ++j) x[j] *= s;
}

// Score transforms after the scaled product, in flash-attn's order: softcap
// (cap * tanh(s / cap), Gemma 2), then the ALiBi bias -slope * |i + offset - j|.
template <typename T>
struct Transform {
  T softcap;  // 0 = off
  const float* slopes;  // (B, H) with strides (sb, sh), or null
  int64_t sb, sh, offset;

  bool any() const { return softcap > T(0) || slopes != nullptr; }
  T slope(int64_t b, int64_t h) const { return slopes ? T(slopes[b * sb + h * sh]) : T(0); }

  // Row i's scores for keys c0 + [a, e), in place.  With softcap, also writes
  // 1 - tanh^2 (the cap's derivative) into ``dcap`` when it is not null.
  inline void apply(T* x, int64_t a, int64_t e, int64_t i, int64_t c0, T slope_v, T* dcap) const {
    if (softcap > T(0)) {
      const T inv = T(1) / softcap;
      int64_t j = a;
      const Vec<T> vinv(inv), vcap(softcap), one(T(1));
      for (; j + Vec<T>::size() <= e; j += Vec<T>::size()) {
        const Vec<T> t = (Vec<T>::loadu(x + j) * vinv).tanh();
        (t * vcap).store(x + j);
        if (dcap) (one - t * t).store(dcap + j);
      }
      for (; j < e; ++j) {
        const T t = std::tanh(x[j] * inv);
        x[j] = t * softcap;
        if (dcap) dcap[j] = T(1) - t * t;
      }
    }
    if (slopes) {
      for (int64_t j = a; j < e; ++j) x[j] -= slope_v * T(std::llabs(i + offset - (c0 + j)));
    }
  }
};

// ------------------------------------------------------------------------------------------ forward

// Uninitialised scratch (zero-filling a 256 KiB tile per task would cost more than a decode step).
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> p;
  explicit Scratch(int64_t n) : p(new T[std::max<int64_t>(n, 1)]) {}
  T* data() { return p.get(); }
};

// A (rows x D) tile of a strided (seq, D) matrix, in the compute type: a pointer into
// the input itself when the types agree, else a widened copy in ``buf`` (ld = D).
template <typename in_t, typename T>
inline const T* tile(const in_t* src, int64_t ld, int64_t rows, int64_t D, T* buf, int64_t& ld_out) {
  if constexpr (std::is_same_v<in_t, T>) {
    ld_out = ld;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) at::vec::convert(src + r * ld, buf + r * D, D);
    ld_out = D;
    return buf;
  }
}

// in_t: the tensors' dtype; T: the compute type (float, or double for double).
// fp16/bf16 tiles are widened as they are used, so nothing the size of K or V is copied.
template <typename in_t, typename T>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
              T scale, const Band& band, const Transform<T>& tf) {
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hk = k.size(2), group = Hq / Hk;
  // Shorter query sequences use smaller query tiles so every thread gets work.
  const Blocks bs = blocks_from_env("FLASHATTN_LITE_CPU_FWD_BLOCKS", Sq >= 768 ? 256 : 128, 512);
  const int64_t BM = std::min(bs.m, Sq), BN = std::min(bs.n, std::max<int64_t>(k.size(1), 1));
  const int64_t nqb = (Sq + BM - 1) / BM;
  const in_t* qp = q.data_ptr<in_t>();
  const in_t* kp = k.data_ptr<in_t>();
  const in_t* vp = v.data_ptr<in_t>();
  in_t* op = out.data_ptr<in_t>();
  float* lp32 = lse.scalar_type() == at::kFloat ? lse.data_ptr<float>() : nullptr;
  double* lp64 = lse.scalar_type() == at::kDouble ? lse.data_ptr<double>() : nullptr;
  const int64_t sqb = q.stride(0), sqs = q.stride(1), sqh = q.stride(2);
  const int64_t skb = k.stride(0), sks = k.stride(1), skh = k.stride(2);
  const int64_t svb = v.stride(0), svs = v.stride(1), svh = v.stride(2);
  const int64_t sob = out.stride(0), sos = out.stride(1), soh = out.stride(2);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  constexpr bool widen = !std::is_same_v<in_t, T>;

  at::parallel_for(0, B * Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> S(BM * BN), P(BM * BN), acc(BM * D), m(BM), l(BM), orow(D);
    Scratch<T> qbuf(widen ? BM * D : 0), kbuf(widen ? BN * D : 0), vbuf(widen ? BN * D : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (Hq * nqb), h = (task / nqb) % Hq, r0 = (task % nqb) * BM;
      const int64_t rows = std::min(BM, Sq - r0);
      const in_t* kt = kp + b * skb + (h / group) * skh;
      const in_t* vt = vp + b * svb + (h / group) * svh;
      const T slope_h = tf.slope(b, h);
      int64_t ldq;
      const T* qt = tile<in_t, T>(qp + b * sqb + h * sqh + r0 * sqs, sqs, rows, D, qbuf.data(), ldq);
      std::fill(acc.data(), acc.data() + rows * D, T(0));
      std::fill(m.data(), m.data() + rows, neg_inf);
      std::fill(l.data(), l.data() + rows, T(0));
      // band bounds are monotone in the row, so the block's keys are [lo(first), hi(last))
      int64_t klo, khi, unused;
      band.keys(r0, klo, unused);
      band.keys(r0 + rows - 1, unused, khi);
      for (int64_t c0 = klo; c0 < khi; c0 += BN) {
        const int64_t cols = std::min(BN, khi - c0);
        int64_t ldk, ldv;
        const T* ktile = tile<in_t, T>(kt + c0 * sks, sks, cols, D, kbuf.data(), ldk);
        gemm_rm<T>(false, true, rows, cols, D, scale, qt, ldq, ktile, ldk, T(0), S.data(), BN);
        for (int64_t r = 0; r < rows; ++r) {
          T* srow = S.data() + r * BN;
          T* prow = P.data() + r * BN;
          int64_t lo, hi;
          band.keys(r0 + r, lo, hi);
          const int64_t a = std::clamp(lo - c0, int64_t(0), cols), e = std::clamp(hi - c0, int64_t(0), cols);
          std::fill(prow, prow + a, T(0));
          std::fill(prow + std::max(a, e), prow + cols, T(0));
          if (a >= e) continue;  // nothing visible in this tile: P row is 0, state unchanged
          if (tf.any()) tf.apply(srow, a, e, r0 + r, c0, slope_h, nullptr);
          // The row's first visible tile: a provisional shift from its first few scores (a
          // lower bound of the max, so nothing can underflow that would not anyway).
          if (m.data()[r] == neg_inf) m.data()[r] = row_max(srow + a, std::min<int64_t>(e - a, Vec<T>::size()));
          T mx;
          T& mr = m.data()[r];
          T& lr = l.data()[r];
          const T sum = exp_shift_sum_max(srow + a, prow + a, e - a, mr, mx);
          if (mx <= mr + T(kLazyShift)) {
            lr += sum;
          } else {  // rare: scores far above the shift; rescale the row to the new max
            const T alpha = std::exp(mr - mx);
            lr = lr * alpha + exp_shift_sum(srow + a, prow + a, e - a, mx);
            scale_row(acc.data() + r * D, D, alpha);
            mr = mx;
          }
        }
        const T* vtile = tile<in_t, T>(vt + c0 * svs, svs, cols, D, vbuf.data(), ldv);
        gemm_rm<T>(false, false, rows, D, cols, T(1), P.data(), BN, vtile, ldv, T(1), acc.data(), D);
      }
      for (int64_t r = 0; r < rows; ++r) {
        in_t* dst = op + b * sob + h * soh + (r0 + r) * sos;
        const int64_t lidx = (b * Hq + h) * Sq + r0 + r;
        const T lr = l.data()[r];
        T row_lse = neg_inf;
        if (lr == T(0)) {  // the row saw no key
          std::fill(orow.data(), orow.data() + D, T(0));
        } else {
          const T inv = T(1) / lr;
          const T* arow = acc.data() + r * D;
          for (int64_t d = 0; d < D; ++d) orow.data()[d] = arow[d] * inv;
          row_lse = m.data()[r] + std::log(lr);
        }
        if constexpr (widen) {
          at::vec::convert(orow.data(), dst, D);
        } else {
          std::copy(orow.data(), orow.data() + D, dst);
        }
        if (lp32) lp32[lidx] = float(row_lse);
        if (lp64) lp64[lidx] = double(row_lse);
      }
    }
  });
}

// ----------------------------------------------------------------------------------------- backward

template <typename T>
void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              T scale, const Band& band, const Transform<T>& tf) {
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), Hk = k.size(2), group = Hq / Hk;
  const Blocks bs = blocks_from_env("FLASHATTN_LITE_CPU_BWD_BLOCKS", 128, 256);
  const int64_t BM = bs.m, BN = bs.n;
  const int64_t nkb = (Sk + BN - 1) / BN;
  // Enough tasks to fill the threads even for one (batch, kv head); each chunk of key
  // blocks keeps a private dQ partial, summed in chunk order afterwards.
  const int64_t threads = at::get_num_threads();
  // At most 4 chunks: the partials then cost at most 4x dQ in memory (O(N) still).
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>({nkb, int64_t(4), (2 * threads + B * Hk - 1) / (B * Hk)}));
  const int64_t kb_per_chunk = (nkb + chunks - 1) / chunks;
  at::Tensor dq_parts = at::zeros({chunks, B, Hq, Sq, D}, q.options());

  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* dop = dout.data_ptr<T>();
  const T* lp = lse.data_ptr<T>();
  const T* dlp = delta.data_ptr<T>();
  T* dqp = dq_parts.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  const int64_t sqb = q.stride(0), sqs = q.stride(1), sqh = q.stride(2);
  const int64_t skb = k.stride(0), sks = k.stride(1), skh = k.stride(2);
  const int64_t svb = v.stride(0), svs = v.stride(1), svh = v.stride(2);
  const int64_t sdb = dout.stride(0), sds = dout.stride(1), sdh = dout.stride(2);
  const int64_t dkb = dk.stride(0), dks = dk.stride(1), dkh = dk.stride(2);
  const int64_t dvb = dv.stride(0), dvs = dv.stride(1), dvh = dv.stride(2);

  at::parallel_for(0, B * Hk * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> P(BM * BN), dP(BM * BN), dk_acc(BN * D), dv_acc(BN * D);
    std::vector<T> dcap(tf.softcap > T(0) ? BM * BN : 0);  // 1 - tanh^2 of the capped scores
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (Hk * chunks), hk = (task / chunks) % Hk, chunk = task % chunks;
      const int64_t kb_end = std::min(nkb, (chunk + 1) * kb_per_chunk);
      const T* kt = kp + b * skb + hk * skh;
      const T* vt = vp + b * svb + hk * svh;
      for (int64_t kb = chunk * kb_per_chunk; kb < kb_end; ++kb) {
        const int64_t c0 = kb * BN, cols = std::min(BN, Sk - c0);
        std::fill(dk_acc.begin(), dk_acc.begin() + cols * D, T(0));
        std::fill(dv_acc.begin(), dv_acc.begin() + cols * D, T(0));
        int64_t qlo, qhi, unused;
        band.queries(c0, qlo, unused);
        band.queries(c0 + cols - 1, unused, qhi);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = hk * group + g;
          const T* qh = qp + b * sqb + h * sqh;
          const T* doh = dop + b * sdb + h * sdh;
          const T* lh = lp + (b * Hq + h) * Sq;
          const T* delh = dlp + (b * Hq + h) * Sq;
          T* dqh = dqp + (((chunk * B + b) * Hq + h) * Sq) * D;
          const T slope_h = tf.slope(b, h);
          for (int64_t r0 = qlo; r0 < qhi; r0 += BM) {
            const int64_t rows = std::min(BM, qhi - r0);
            gemm_rm<T>(false, true, rows, cols, D, scale, qh + r0 * sqs, sqs, kt + c0 * sks, sks, T(0), P.data(),
                       BN);
            for (int64_t r = 0; r < rows; ++r) {
              T* prow = P.data() + r * BN;
              int64_t lo, hi;
              band.keys(r0 + r, lo, hi);
              const int64_t a = std::clamp(lo - c0, int64_t(0), cols), e = std::clamp(hi - c0, int64_t(0), cols);
              const T row_lse = lh[r0 + r];
              if (a >= e || std::isinf(row_lse)) {
                std::fill(prow, prow + cols, T(0));
                continue;
              }
              std::fill(prow, prow + a, T(0));
              std::fill(prow + e, prow + cols, T(0));
              if (tf.any()) tf.apply(prow, a, e, r0 + r, c0, slope_h, dcap.empty() ? nullptr : dcap.data() + r * BN);
              exp_shift_sum(prow + a, prow + a, e - a, row_lse);
            }
            // dV += P^T dO ; dP = dO V^T
            gemm_rm<T>(true, false, cols, D, rows, T(1), P.data(), BN, doh + r0 * sds, sds, T(1), dv_acc.data(), D);
            gemm_rm<T>(false, true, rows, cols, D, T(1), doh + r0 * sds, sds, vt + c0 * svs, svs, T(0), dP.data(),
                       BN);
            // dS = P * (dP - delta) * scale, into dP
            for (int64_t r = 0; r < rows; ++r) {
              T* prow = P.data() + r * BN;
              T* dprow = dP.data() + r * BN;
              const Vec<T> vdelta(delh[r0 + r]), vscale(scale);
              int64_t j = 0;
              for (; j + Vec<T>::size() <= cols; j += Vec<T>::size())
                (Vec<T>::loadu(prow + j) * (Vec<T>::loadu(dprow + j) - vdelta) * vscale).store(dprow + j);
              for (; j < cols; ++j) dprow[j] = prow[j] * (dprow[j] - delh[r0 + r]) * scale;
              if (!dcap.empty()) {  // chain rule through the cap, where P != 0 (dcap is set there)
                const T* crow = dcap.data() + r * BN;
                for (int64_t jj = 0; jj < cols; ++jj) dprow[jj] = prow[jj] != T(0) ? dprow[jj] * crow[jj] : T(0);
              }
            }
            // dK += dS^T Q ; dQ += dS K
            gemm_rm<T>(true, false, cols, D, rows, T(1), dP.data(), BN, qh + r0 * sqs, sqs, T(1), dk_acc.data(), D);
            gemm_rm<T>(false, false, rows, D, cols, T(1), dP.data(), BN, kt + c0 * sks, sks, T(1), dqh + r0 * D, D);
          }
        }
        for (int64_t c = 0; c < cols; ++c) {
          std::copy(dk_acc.data() + c * D, dk_acc.data() + (c + 1) * D, dkp + b * dkb + hk * dkh + (c0 + c) * dks);
          std::copy(dv_acc.data() + c * D, dv_acc.data() + (c + 1) * D, dvp + b * dvb + hk * dvh + (c0 + c) * dvs);
        }
      }
    }
  });
  // fixed-order reduction of the dQ partials, into dq's own layout
  at::Tensor total = chunks == 1 ? dq_parts[0] : dq_parts.sum(0);
  dq.copy_(total.permute({0, 2, 1, 3}));
}

// ------------------------------------------------------------------------------------------ entry

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "flashattn_lite cpu: q, k, v must be 4-D (B, S, H, D)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "flashattn_lite cpu: tensors must be on the CPU");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "flashattn_lite cpu: q, k, v must share one dtype");
  TORCH_CHECK(k.sizes() == v.sizes(), "flashattn_lite cpu: k and v must have the same shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), "flashattn_lite cpu: batch or head dim differ");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0,
              "flashattn_lite cpu: query heads must be a multiple of kv heads");
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

template <typename T>
Transform<T> make_transform(double softcap, const std::optional<at::Tensor>& slopes, int64_t offset,
                            const at::Tensor& q) {
  Transform<T> tf{T(softcap), nullptr, 0, 0, offset};
  if (slopes.has_value()) {
    const at::Tensor& s = *slopes;
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(0) == q.size(0) && s.size(1) == q.size(2),
                "flashattn_lite cpu: alibi_slopes must be float32 (batch, heads)");
    tf.slopes = s.data_ptr<float>();
    tf.sb = s.stride(0);
    tf.sh = s.stride(1);
  }
  return tf;
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                           double softmax_scale, int64_t diag_offset, int64_t window_left,
                                           int64_t window_right, double softcap,
                                           const std::optional<at::Tensor>& alibi_slopes) {
  check_qkv(q_in, k_in, v_in);
  const at::ScalarType ct = compute_type(q_in.scalar_type());
  at::Tensor q = blas_ready(q_in), k = blas_ready(k_in), v = blas_ready(v_in);
  at::Tensor out = at::empty_like(q);  // q's strides are ones the kernel can write through
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(ct == at::kDouble ? ct : at::kFloat));
  const Band band{diag_offset, window_left, window_right, q.size(1), k.size(1)};
  if (q.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  switch (q.scalar_type()) {
    case at::kFloat: {
      fwd_impl<float, float>(q, k, v, out, lse, float(softmax_scale), band,
                             make_transform<float>(softcap, alibi_slopes, diag_offset, q));
      break;
    }
    case at::kDouble: {
      fwd_impl<double, double>(q, k, v, out, lse, softmax_scale, band,
                               make_transform<double>(softcap, alibi_slopes, diag_offset, q));
      break;
    }
    case at::kBFloat16: {
      fwd_impl<at::BFloat16, float>(q, k, v, out, lse, float(softmax_scale), band,
                                    make_transform<float>(softcap, alibi_slopes, diag_offset, q));
      break;
    }
    case at::kHalf: {
      fwd_impl<at::Half, float>(q, k, v, out, lse, float(softmax_scale), band,
                                make_transform<float>(softcap, alibi_slopes, diag_offset, q));
      break;
    }
    default: TORCH_CHECK(false, "flashattn_lite cpu: unsupported dtype ", q.scalar_type());
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(const at::Tensor& dout_in, const std::optional<at::Tensor>& dlse,
                                                       const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, const at::Tensor& out_in,
                                                       const at::Tensor& lse_in, double softmax_scale,
                                                       int64_t diag_offset, int64_t window_left,
                                                       int64_t window_right, double softcap,
                                                       const std::optional<at::Tensor>& alibi_slopes) {
  check_qkv(q_in, k_in, v_in);
  const at::ScalarType ct = compute_type(q_in.scalar_type());
  at::Tensor q = prepare(q_in, ct), k = prepare(k_in, ct), v = prepare(v_in, ct);
  at::Tensor dout = prepare(dout_in, ct), out = prepare(out_in, ct);
  at::Tensor lse = lse_in.to(ct).contiguous();
  // delta = rowsum(dO * O) - dlse, shape (B, H, Sq)
  at::Tensor delta = (dout * out).sum(-1).transpose(1, 2).contiguous();
  if (dlse.has_value()) delta.sub_(dlse->to(ct));
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  const Band band{diag_offset, window_left, window_right, q.size(1), k.size(1)};
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(ct, "flashattn_lite_cpu_bwd", [&] {
      bwd_impl<scalar_t>(dout, q, k, v, lse, delta, dq, dk, dv, scalar_t(softmax_scale), band,
                         make_transform<scalar_t>(softcap, alibi_slopes, diag_offset, q));
    });
  }
  auto narrow = [](const at::Tensor& wide, const at::ScalarType type) {
    return wide.scalar_type() == type ? wide : wide.to(type);
  };
  return {narrow(dq, q_in.scalar_type()), narrow(dk, k_in.scalar_type()), narrow(dv, v_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(flashattn_lite_C, CPU, m) {
  m.impl("fwd", &fwd_cpu);
  m.impl("bwd", &bwd_cpu);
}

}  // namespace flashattn_lite
