// CPU attention kernels: tiled online-softmax forward, recomputation backward.
//
// Every tile product runs through the BLAS torch.mm uses, in float32 (float64 for
// float64 input).  fp16/bf16 inputs are widened to float32 (per tile in the forward,
// once per call in the backward): a low-precision BLAS product is slower than
// widening, O(N d), and then multiplying in float32, O(N^2 d).
//
// Problems: a dense batch is B problems of (Sq, Sk); a packed varlen batch is one
// 4-D batch entry whose sequences are row ranges (``Seq``).  Optional features that
// touch every score (the additive bias, dropout) are template switches, so the
// feature-free instantiation carries no per-element test; softcap/ALiBi and the
// varlen bookkeeping are per row or per task.
//
// Parallelism: forward over (sequence, head, query block); backward over
// (sequence, kv head, chunk of key blocks), each task summing dK/dV over its GQA
// group in a fixed order and writing its own dQ partial, reduced in a fixed order.
// Tasks are claimed dynamically, largest first (sequences and causal blocks differ
// in cost).  No atomics on data: every result element is computed by one task in a
// fixed order, and the task split does not depend on the thread count, so results
// are reproducible bit for bit and identical for any number of threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <thread>
#include <type_traits>
#include <vector>

#include "philox.h"

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
// MKL's per-thread thread count (returns the previous one; 0 restores the global setting).
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
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


// ------------------------------------------------------------------------------------ the problem

// One attention problem: a batch entry (dense) or one packed sequence (varlen).
struct Seq {
  int64_t b;             // sequence index: ALiBi row, bias batch
  int64_t pb;            // batch index into the 4-D tensors (0 for varlen)
  int64_t q0, k0;        // first query / key row in the tensors' sequence dim
  int64_t len_q, len_k;  // lengths
  int64_t offset;        // diagonal offset (varlen: diag_offset + len_k - len_q)
};

struct Problem {
  std::vector<Seq> seqs;
  int64_t rows = 0;              // sequence dim of the 4-D tensors (Sq, or total_q); lse is (B, H, rows)
  int64_t max_q = 0, max_k = 0;  // longest sequences (tile sizes)
  int64_t left = -1, right = -1;
  int64_t drop_cols = 0;  // Sk of the dropout counter: Sk, or max_seqlen_k

  Band band(const Seq& s) const { return Band{s.offset, left, right, s.len_q, s.len_k}; }
  // Index of query row i of ``s``, head h, in lse (B, H, rows); also the dropout counter's row.
  int64_t row_id(const Seq& s, int64_t h, int64_t heads, int64_t i) const {
    return (s.pb * heads + h) * rows + s.q0 + i;
  }
};

// x[j] += bias[j * sj] (bias in any float dtype; sj = 0 broadcasts one value along the row).
template <typename T, typename B>
inline void add_bias_row(T* x, const B* row, int64_t sj, int64_t n) {
  if (sj == 0) {
    const T c = T(row[0]);
    for (int64_t j = 0; j < n; ++j) x[j] += c;
  } else if (sj == 1) {
    if constexpr (std::is_same_v<T, B>) {
      for (int64_t j = 0; j < n; ++j) x[j] += row[j];
    } else {
      T buf[64];
      for (int64_t j0 = 0; j0 < n; j0 += 64) {
        const int64_t m = std::min<int64_t>(64, n - j0);
        at::vec::convert(row + j0, buf, m);
        for (int64_t t = 0; t < m; ++t) x[j0 + t] += buf[t];
      }
    }
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] += T(row[j * sj]);
  }
}

// The additive bias (SDPA's attn_mask): a (B, H, Sq, Sk) view, broadcast dims with stride 0.
struct BiasView {
  const void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;

  // x[0, n) += bias[b, h, i, j0 + [0, n)]
  template <typename T>
  void add(T* x, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n) const {
    const int64_t off = b * sb + h * sh + i * si + j0 * sj;
    switch (dtype) {
      case at::kFloat: return add_bias_row(x, static_cast<const float*>(data) + off, sj, n);
      case at::kDouble: return add_bias_row(x, static_cast<const double*>(data) + off, sj, n);
      case at::kHalf: return add_bias_row(x, static_cast<const at::Half*>(data) + off, sj, n);
      case at::kBFloat16: return add_bias_row(x, static_cast<const at::BFloat16*>(data) + off, sj, n);
      default: return;  // rejected by the host checks
    }
  }
};

// Dropout: keep masks from the Philox stream; kept values are scaled by 1 / (1 - p),
// which the kernels fold into a GEMM's alpha or the final normalisation.
struct Dropout {
  PhiloxDropout philox;
  double rescale = 1.0;  // 1 / (1 - p)
};

// x[j] = 0 where mask[j] == 0.
template <typename T>
inline void apply_keep(T* x, const uint32_t* mask, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = mask[j] ? x[j] : T(0);
}

// Uninitialised scratch (zero-filling a 256 KiB tile per task would cost more than a decode
// step), 64-byte aligned: BLAS may pick its kernels (and so its summation order) by the
// operands' alignment, and results must not depend on which worker's buffers a task used.
template <typename T>
struct Scratch {
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<T[], Free> p;
  explicit Scratch(int64_t n)
      : p(static_cast<T*>(::operator new[](sizeof(T) * std::max<int64_t>(n, 1), std::align_val_t(64)))) {}
  T* data() { return p.get(); }
};

// A unit of work of one head: a query block (forward) or a chunk of key blocks (backward)
// of one sequence.  Tasks are (head, unit); units are sorted by decreasing cost and
// claimed dynamically, so long sequences start first and short ones fill the gaps.
struct Unit {
  int64_t seq, begin, end;  // query rows (forward) or key blocks (backward) [begin, end)
  int64_t chunk;            // backward: which dQ partial it writes
  double cost;
};

inline void sort_by_cost(std::vector<Unit>& units) {
  std::stable_sort(units.begin(), units.end(), [](const Unit& a, const Unit& b) { return a.cost > b.cost; });
}

// Runs body(task, worker_state) for every task in [0, n), each exactly once, on
// at::get_num_threads() workers; ``make_state`` builds each worker's scratch.
template <typename MakeState, typename Body>
void run_tasks(int64_t n, MakeState&& make_state, Body&& body) {
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // (a nested call runs this once, serially: it then claims every task itself)
    // Each BLAS call runs on the calling worker alone: a call that MKL split among threads
    // of its own would sum in another order, and results would depend on the thread count.
    const int mkl_prev = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    auto state = make_state();
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n;) body(t, state);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_prev);
  });
}

// ------------------------------------------------------------------------------------------ forward

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
// kBias: add the bias to the scores; kDrop: dropout.
template <typename in_t, typename T, bool kBias, bool kDrop>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
              T scale, const Problem& pr, const Transform<T>& tf, const BiasView& bias, const Dropout& drop) {
  const int64_t Hq = q.size(2), D = q.size(3);
  const int64_t Hk = k.size(2), group = Hq / Hk;
  // Shorter query sequences use smaller query tiles so every thread gets work.
  const Blocks bs = blocks_from_env("FLASHATTN_LITE_CPU_FWD_BLOCKS", pr.max_q >= 768 ? 256 : 128, 512);
  const int64_t BM = std::max<int64_t>(1, std::min(bs.m, pr.max_q));
  const int64_t BN = std::max<int64_t>(1, std::min(bs.n, pr.max_k));
  std::vector<Unit> units;
  for (int64_t s = 0; s < int64_t(pr.seqs.size()); ++s) {
    const Seq& sq = pr.seqs[s];
    const Band band = pr.band(sq);
    for (int64_t r0 = 0; r0 < sq.len_q; r0 += BM) {
      const int64_t r1 = std::min(sq.len_q, r0 + BM);
      int64_t klo, khi, unused;
      band.keys(r0, klo, unused);
      band.keys(r1 - 1, unused, khi);
      units.push_back(Unit{s, r0, r1, 0, double(r1 - r0) * double(std::max<int64_t>(khi - klo, 0) + D)});
    }
  }
  sort_by_cost(units);
  const int64_t nunits = int64_t(units.size());

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
  // dropout's 1 / (1 - p) is applied with the final 1 / l
  const T out_scale = kDrop ? T(drop.rescale) : T(1);

  struct State {
    Scratch<T> S, P, acc, m, l, orow, qbuf, kbuf, vbuf;
    Scratch<uint32_t> keep;
  };
  auto make_state = [&] {
    return State{Scratch<T>(BM * BN), Scratch<T>(BM * BN), Scratch<T>(BM * D), Scratch<T>(BM), Scratch<T>(BM),
                 Scratch<T>(D), Scratch<T>(widen ? BM * D : 0), Scratch<T>(widen ? BN * D : 0),
                 Scratch<T>(widen ? BN * D : 0), Scratch<uint32_t>(kDrop ? BN : 0)};
  };
  run_tasks(Hq * nunits, make_state, [&](int64_t task, State& st) {
    const int64_t h = task / nunits;
    const Unit& u = units[task % nunits];
    const Seq& sq = pr.seqs[u.seq];
    const Band band = pr.band(sq);
    Transform<T> tfs = tf;
    tfs.offset = sq.offset;
    const int64_t r0 = u.begin, rows = u.end - u.begin;
    const in_t* kt = kp + sq.pb * skb + (h / group) * skh + sq.k0 * sks;
    const in_t* vt = vp + sq.pb * svb + (h / group) * svh + sq.k0 * svs;
    const int64_t row0 = pr.row_id(sq, h, Hq, r0);
    const T slope_h = tf.slope(sq.b, h);
    T* acc = st.acc.data();
    T* m = st.m.data();
    T* l = st.l.data();
    int64_t ldq;
    const T* qt = tile<in_t, T>(qp + sq.pb * sqb + h * sqh + (sq.q0 + r0) * sqs, sqs, rows, D, st.qbuf.data(), ldq);
    std::fill(acc, acc + rows * D, T(0));
    std::fill(m, m + rows, neg_inf);
    std::fill(l, l + rows, T(0));
    // band bounds are monotone in the row, so the block's keys are [lo(first), hi(last))
    int64_t klo, khi, unused;
    band.keys(r0, klo, unused);
    band.keys(r0 + rows - 1, unused, khi);
    for (int64_t c0 = klo; c0 < khi; c0 += BN) {
      const int64_t cols = std::min(BN, khi - c0);
      int64_t ldk, ldv;
      const T* ktile = tile<in_t, T>(kt + c0 * sks, sks, cols, D, st.kbuf.data(), ldk);
      gemm_rm<T>(false, true, rows, cols, D, scale, qt, ldq, ktile, ldk, T(0), st.S.data(), BN);
      for (int64_t r = 0; r < rows; ++r) {
        T* srow = st.S.data() + r * BN;
        T* prow = st.P.data() + r * BN;
        int64_t lo, hi;
        band.keys(r0 + r, lo, hi);
        const int64_t a = std::clamp(lo - c0, int64_t(0), cols), e = std::clamp(hi - c0, int64_t(0), cols);
        std::fill(prow, prow + a, T(0));
        std::fill(prow + std::max(a, e), prow + cols, T(0));
        if (a >= e) continue;  // nothing visible in this tile: P row is 0, state unchanged
        if (tfs.any()) tfs.apply(srow, a, e, r0 + r, c0, slope_h, nullptr);
        if constexpr (kBias) bias.add(srow + a, sq.b, h, r0 + r, c0 + a, e - a);
        T& mr = m[r];
        T& lr = l[r];
        // The row's first visible tile: a provisional shift from its first few scores (a
        // lower bound of the max, so nothing can underflow that would not anyway).
        if (mr == neg_inf) {
          mr = row_max(srow + a, std::min<int64_t>(e - a, Vec<T>::size()));
          if constexpr (kBias) {  // -inf bias entries: the shift must be finite
            if (mr == neg_inf) mr = row_max(srow + a, e - a);
            if (mr == neg_inf) {  // every score of this tile is -inf: P row 0, state unchanged
              std::fill(prow + a, prow + e, T(0));
              continue;
            }
          }
        }
        T mx;
        const T sum = exp_shift_sum_max(srow + a, prow + a, e - a, mr, mx);
        if (mx <= mr + T(kLazyShift)) {
          lr += sum;
        } else {  // rare: scores far above the shift; rescale the row to the new max
          const T alpha = std::exp(mr - mx);
          lr = lr * alpha + exp_shift_sum(srow + a, prow + a, e - a, mx);
          scale_row(acc + r * D, D, alpha);
          mr = mx;
        }
        if constexpr (kDrop) {  // l sums the undropped probabilities; only P @ V is dropped
          drop.philox.keep_mask(uint64_t(row0 + r) * uint64_t(pr.drop_cols) + uint64_t(c0 + a), e - a,
                                st.keep.data());
          apply_keep(prow + a, st.keep.data(), e - a);
        }
      }
      const T* vtile = tile<in_t, T>(vt + c0 * svs, svs, cols, D, st.vbuf.data(), ldv);
      gemm_rm<T>(false, false, rows, D, cols, T(1), st.P.data(), BN, vtile, ldv, T(1), acc, D);
    }
    T* orow = st.orow.data();
    for (int64_t r = 0; r < rows; ++r) {
      in_t* dst = op + sq.pb * sob + h * soh + (sq.q0 + r0 + r) * sos;
      const T lr = l[r];
      T row_lse = neg_inf;
      if (lr == T(0)) {  // the row saw no key
        std::fill(orow, orow + D, T(0));
      } else {
        const T inv = out_scale / lr;
        const T* arow = acc + r * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = arow[d] * inv;
        row_lse = m[r] + std::log(lr);
      }
      if constexpr (widen) {
        at::vec::convert(orow, dst, D);
      } else {
        std::copy(orow, orow + D, dst);
      }
      if (lp32) lp32[row0 + r] = float(row_lse);
      if (lp64) lp64[row0 + r] = double(row_lse);
    }
  });
}

// ----------------------------------------------------------------------------------------- backward

// Backward tasks per (sequence, kv head) chunk their key blocks so that even one
// (sequence, kv head) gives two tasks per processor of the machine: the machine's count,
// not torch's thread count, so the dQ summation order (and every bit of the result) is
// the same for any torch.set_num_threads.
int64_t bwd_target_tasks() {
  static const int64_t n = 2 * std::max<int64_t>(1, int64_t(std::thread::hardware_concurrency()));
  return n;
}
// At most this many chunks: the dQ partials then cost at most 4x dQ in memory (O(N) still).
constexpr int64_t kMaxBwdChunks = 4;

// dbias (float/double, contiguous (B, H, Sq, Sk)), where not null, receives
// dS = P * (dP - delta), the gradient w.r.t. the final scores (every element written).
template <typename T, bool kBias, bool kDrop>
void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              T* dbias, T scale, const Problem& pr, const Transform<T>& tf, const BiasView& bias,
              const Dropout& drop) {
  const int64_t Bp = q.size(0), Hq = q.size(2), D = q.size(3);
  const int64_t Skp = k.size(1), Hk = k.size(2), group = Hq / Hk;
  const Blocks bs = blocks_from_env("FLASHATTN_LITE_CPU_BWD_BLOCKS", 128, 256);
  const int64_t BM = bs.m, BN = bs.n;
  int64_t with_keys = 0, max_nkb = 0;
  for (const Seq& s : pr.seqs) {
    if (s.len_k > 0) ++with_keys;
    max_nkb = std::max(max_nkb, (s.len_k + BN - 1) / BN);
  }
  const int64_t per_head = std::max<int64_t>(1, with_keys * Hk);
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>({max_nkb, kMaxBwdChunks, (bwd_target_tasks() + per_head - 1) / per_head}));
  std::vector<Unit> units;
  for (int64_t s = 0; s < int64_t(pr.seqs.size()); ++s) {
    const Seq& sq = pr.seqs[s];
    const Band band = pr.band(sq);
    const int64_t nkb = (sq.len_k + BN - 1) / BN, per_chunk = (nkb + chunks - 1) / chunks;
    for (int64_t c = 0; c < chunks && c * per_chunk < nkb; ++c) {
      Unit u{s, c * per_chunk, std::min(nkb, (c + 1) * per_chunk), c, 0.0};
      for (int64_t kb = u.begin; kb < u.end; ++kb) {
        const int64_t c0 = kb * BN, cols = std::min(BN, sq.len_k - c0);
        int64_t qlo, qhi, unused;
        band.queries(c0, qlo, unused);
        band.queries(c0 + cols - 1, unused, qhi);
        u.cost += double(cols) * double(std::max<int64_t>(qhi - qlo, 0) * group + D);
      }
      units.push_back(u);
    }
  }
  sort_by_cost(units);
  const int64_t nunits = int64_t(units.size());
  at::Tensor dq_parts = at::zeros({chunks, Bp, Hq, pr.rows, D}, q.options());

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
  const bool capped = tf.softcap > T(0);
  // dropout's 1 / (1 - p) rides on the alpha of dV += (P Z)^T dO and dP = dO V^T
  const T rescale = kDrop ? T(drop.rescale) : T(1);

  struct State {
    Scratch<T> P, dP, PZ, dk_acc, dv_acc, dcap;
    Scratch<uint32_t> keep;
  };
  auto make_state = [&] {
    return State{Scratch<T>(BM * BN), Scratch<T>(BM * BN), Scratch<T>(kDrop ? BM * BN : 0), Scratch<T>(BN * D),
                 Scratch<T>(BN * D), Scratch<T>(capped ? BM * BN : 0), Scratch<uint32_t>(kDrop ? BM * BN : 0)};
  };
  run_tasks(Hk * nunits, make_state, [&](int64_t task, State& st) {
    const int64_t hk = task / nunits;
    const Unit& u = units[task % nunits];
    const Seq& sq = pr.seqs[u.seq];
    const Band band = pr.band(sq);
    Transform<T> tfs = tf;
    tfs.offset = sq.offset;
    T* P = st.P.data();
    T* dP = st.dP.data();
    const T* kt = kp + sq.pb * skb + hk * skh + sq.k0 * sks;
    const T* vt = vp + sq.pb * svb + hk * svh + sq.k0 * svs;
    for (int64_t kb = u.begin; kb < u.end; ++kb) {
      const int64_t c0 = kb * BN, cols = std::min(BN, sq.len_k - c0);
      std::fill(st.dk_acc.data(), st.dk_acc.data() + cols * D, T(0));
      std::fill(st.dv_acc.data(), st.dv_acc.data() + cols * D, T(0));
      int64_t qlo, qhi, unused;
      band.queries(c0, qlo, unused);
      band.queries(c0 + cols - 1, unused, qhi);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        const int64_t row0 = pr.row_id(sq, h, Hq, 0);  // lse/delta index (and dropout row) of query 0
        const T* qh = qp + sq.pb * sqb + h * sqh + sq.q0 * sqs;
        const T* doh = dop + sq.pb * sdb + h * sdh + sq.q0 * sds;
        const T* lh = lp + row0;
        const T* delh = dlp + row0;
        T* dqh = dqp + (u.chunk * Bp * Hq * pr.rows + row0) * D;
        const T slope_h = tf.slope(sq.b, h);
        if (kBias && dbias != nullptr) {  // dBias is 0 in the rows that see none of this key block
          auto zero_rows = [&](int64_t from, int64_t to) {
            for (int64_t i = from; i < to; ++i) std::fill_n(dbias + (row0 + i) * Skp + sq.k0 + c0, cols, T(0));
          };
          zero_rows(0, qlo);
          zero_rows(qhi, sq.len_q);
        }
        for (int64_t r0 = qlo; r0 < qhi; r0 += BM) {
          const int64_t rows = std::min(BM, qhi - r0);
          gemm_rm<T>(false, true, rows, cols, D, scale, qh + r0 * sqs, sqs, kt + c0 * sks, sks, T(0), P, BN);
          for (int64_t r = 0; r < rows; ++r) {
            T* prow = P + r * BN;
            int64_t lo, hi;
            band.keys(r0 + r, lo, hi);
            const int64_t a = std::clamp(lo - c0, int64_t(0), cols), e = std::clamp(hi - c0, int64_t(0), cols);
            const T row_lse = lh[r0 + r];
            if (a >= e || std::isinf(row_lse)) {
              std::fill(prow, prow + cols, T(0));
              if constexpr (kDrop) std::fill(st.PZ.data() + r * BN, st.PZ.data() + (r + 1) * BN, T(0));
              continue;
            }
            std::fill(prow, prow + a, T(0));
            std::fill(prow + e, prow + cols, T(0));
            if (tfs.any()) tfs.apply(prow, a, e, r0 + r, c0, slope_h, capped ? st.dcap.data() + r * BN : nullptr);
            if constexpr (kBias) bias.add(prow + a, sq.b, h, r0 + r, c0 + a, e - a);
            exp_shift_sum(prow + a, prow + a, e - a, row_lse);
            if constexpr (kDrop) {  // Z = keep / (1 - p), the 1 / (1 - p) in the GEMMs' alpha
              uint32_t* keep = st.keep.data() + r * BN;
              T* pzrow = st.PZ.data() + r * BN;
              drop.philox.keep_mask(uint64_t(row0 + r0 + r) * uint64_t(pr.drop_cols) + uint64_t(c0 + a), e - a,
                                    keep + a);
              std::fill(keep, keep + a, 0u);
              std::fill(keep + e, keep + cols, 0u);
              for (int64_t j = 0; j < cols; ++j) pzrow[j] = keep[j] ? prow[j] : T(0);
            }
          }
          // dV += (P Z)^T dO ; dP = (dO V^T) Z
          const T* pv = kDrop ? st.PZ.data() : P;
          gemm_rm<T>(true, false, cols, D, rows, rescale, pv, BN, doh + r0 * sds, sds, T(1), st.dv_acc.data(), D);
          gemm_rm<T>(false, true, rows, cols, D, rescale, doh + r0 * sds, sds, vt + c0 * svs, svs, T(0), dP, BN);
          // dS = P * (dP - delta) (= dBias), then * scale (and the cap's derivative) for dQ, dK; into dP
          for (int64_t r = 0; r < rows; ++r) {
            T* prow = P + r * BN;
            T* dprow = dP + r * BN;
            if constexpr (kDrop) apply_keep(dprow, st.keep.data() + r * BN, cols);
            const T dl = delh[r0 + r];
            if constexpr (kBias) {
              if (dbias != nullptr) {
                T* dbrow = dbias + (row0 + r0 + r) * Skp + sq.k0 + c0;
                for (int64_t j = 0; j < cols; ++j) dbrow[j] = prow[j] * (dprow[j] - dl);
                for (int64_t j = 0; j < cols; ++j) dprow[j] = dbrow[j] * scale;
              } else {
                for (int64_t j = 0; j < cols; ++j) dprow[j] = prow[j] * (dprow[j] - dl) * scale;
              }
            } else {
              const Vec<T> vdelta(dl), vscale(scale);
              int64_t j = 0;
              for (; j + Vec<T>::size() <= cols; j += Vec<T>::size())
                (Vec<T>::loadu(prow + j) * (Vec<T>::loadu(dprow + j) - vdelta) * vscale).store(dprow + j);
              for (; j < cols; ++j) dprow[j] = prow[j] * (dprow[j] - dl) * scale;
            }
            if (capped) {  // chain rule through the cap, where P != 0 (dcap is set there)
              const T* crow = st.dcap.data() + r * BN;
              for (int64_t j = 0; j < cols; ++j) dprow[j] = prow[j] != T(0) ? dprow[j] * crow[j] : T(0);
            }
          }
          // dK += dS^T Q ; dQ += dS K
          gemm_rm<T>(true, false, cols, D, rows, T(1), dP, BN, qh + r0 * sqs, sqs, T(1), st.dk_acc.data(), D);
          gemm_rm<T>(false, false, rows, D, cols, T(1), dP, BN, kt + c0 * sks, sks, T(1), dqh + r0 * D, D);
        }
      }
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t key = sq.k0 + c0 + c;
        std::copy(st.dk_acc.data() + c * D, st.dk_acc.data() + (c + 1) * D, dkp + sq.pb * dkb + hk * dkh + key * dks);
        std::copy(st.dv_acc.data() + c * D, st.dv_acc.data() + (c + 1) * D, dvp + sq.pb * dvb + hk * dvh + key * dvs);
      }
    }
  });
  // fixed-order reduction of the dQ partials, into dq's own layout
  at::Tensor total = chunks == 1 ? dq_parts[0] : dq_parts.sum(0);
  dq.copy_(total.permute({0, 2, 1, 3}));
}

// ------------------------------------------------------------------------------------------ entry

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
  TORCH_CHECK(k.sizes() == v.sizes(), "flashattn_lite cpu: k and v must have the same shape");
  TORCH_CHECK(k.size(-1) == q.size(-1), "flashattn_lite cpu: q and k have different head dims");
  TORCH_CHECK(varlen || k.size(0) == q.size(0), "flashattn_lite cpu: q and k have different batch sizes");
  TORCH_CHECK(k.size(-2) > 0 && q.size(-2) % k.size(-2) == 0,
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

template <typename T>
Transform<T> make_transform(double softcap, const std::optional<at::Tensor>& slopes, int64_t batch,
                            int64_t heads) {
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "flashattn_lite cpu: softcap must be >= 0, got ", softcap);
  Transform<T> tf{T(softcap), nullptr, 0, 0, 0};
  if (slopes.has_value()) {
    const at::Tensor& s = *slopes;
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(0) == batch && s.size(1) == heads &&
                    s.device().is_cpu(),
                "flashattn_lite cpu: alibi_slopes must be float32 (batch, heads) = (", batch, ", ", heads,
                ") on the CPU, got ", s.scalar_type(), " ", s.sizes());
    tf.slopes = s.data_ptr<float>();
    tf.sb = s.stride(0);
    tf.sh = s.stride(1);
  }
  return tf;
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

// Calls f(bool_constant<kBias>, bool_constant<kDrop>): the feature switches as compile-time values.
template <typename F>
void with_features(bool has_bias, bool has_drop, F&& f) {
  using yes = std::true_type;
  using no = std::false_type;
  if (has_bias) {
    has_drop ? f(yes{}, yes{}) : f(yes{}, no{});
  } else {
    has_drop ? f(no{}, yes{}) : f(no{}, no{});
  }
}

template <typename in_t, typename T>
void fwd_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
               double scale, const Problem& pr, double softcap, const std::optional<at::Tensor>& slopes,
               const BiasView& bias, const Dropout& drop, bool has_drop) {
  const Transform<T> tf = make_transform<T>(softcap, slopes, int64_t(pr.seqs.size()), q.size(2));
  with_features(bias.data != nullptr, has_drop, [&](auto kb, auto kd) {
    fwd_impl<in_t, T, decltype(kb)::value, decltype(kd)::value>(q, k, v, out, lse, T(scale), pr, tf, bias, drop);
  });
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, const std::optional<at::Tensor>& bias,
                                           double softmax_scale, int64_t diag_offset, int64_t window_left,
                                           int64_t window_right, double softcap,
                                           const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                                           int64_t dropout_seed) {
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
              "flashattn_lite cpu: cu_seqlens_q and cu_seqlens_k must be given together");
  const bool varlen = cu_seqlens_q.has_value();
  check_qkv(q_in, k_in, v_in, varlen);
  const at::ScalarType ct = compute_type(q_in.scalar_type());
  at::Tensor q = blas_ready(as_4d(q_in, varlen)), k = blas_ready(as_4d(k_in, varlen)),
             v = blas_ready(as_4d(v_in, varlen));
  const Problem pr = make_problem(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, diag_offset,
                                  window_left, window_right);
  const BiasView bv = make_bias(bias, q, k, varlen);
  const Dropout drop = make_dropout(dropout_p, dropout_seed);
  at::Tensor out = at::empty_like(q);  // q's strides are ones the kernel can write through
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(ct));
  if (q.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
  } else {
    const bool has_drop = dropout_p > 0;
    switch (q.scalar_type()) {
      case at::kFloat:
        fwd_typed<float, float>(q, k, v, out, lse, softmax_scale, pr, softcap, alibi_slopes, bv, drop, has_drop);
        break;
      case at::kDouble:
        fwd_typed<double, double>(q, k, v, out, lse, softmax_scale, pr, softcap, alibi_slopes, bv, drop, has_drop);
        break;
      case at::kBFloat16:
        fwd_typed<at::BFloat16, float>(q, k, v, out, lse, softmax_scale, pr, softcap, alibi_slopes, bv, drop,
                                       has_drop);
        break;
      case at::kHalf:
        fwd_typed<at::Half, float>(q, k, v, out, lse, softmax_scale, pr, softcap, alibi_slopes, bv, drop, has_drop);
        break;
      default: TORCH_CHECK(false, "flashattn_lite cpu: unsupported dtype ", q.scalar_type());
    }
  }
  if (varlen) return {out.squeeze(0), lse.squeeze(0)};
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout_in, const std::optional<at::Tensor>& dlse, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& bias, double softmax_scale,
    int64_t diag_offset, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t dropout_seed, bool bias_grad,
    bool deterministic) {
  (void)deterministic;  // every CPU backward is deterministic
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
              "flashattn_lite cpu: cu_seqlens_q and cu_seqlens_k must be given together");
  const bool varlen = cu_seqlens_q.has_value();
  check_qkv(q_in, k_in, v_in, varlen);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "flashattn_lite cpu: dout and out must have q's shape ", q_in.sizes());
  const std::vector<int64_t> lse_shape =
      varlen ? std::vector<int64_t>{q_in.size(1), q_in.size(0)}
             : std::vector<int64_t>{q_in.size(0), q_in.size(2), q_in.size(1)};
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef(lse_shape), "flashattn_lite cpu: lse must have shape ",
              at::IntArrayRef(lse_shape), ", got ", lse_in.sizes());
  TORCH_CHECK(!dlse.has_value() || dlse->sizes() == at::IntArrayRef(lse_shape),
              "flashattn_lite cpu: dlse must have lse's shape ", at::IntArrayRef(lse_shape));
  TORCH_CHECK(!bias_grad || bias.has_value(), "flashattn_lite cpu: bias_grad needs a bias");
  const at::ScalarType ct = compute_type(q_in.scalar_type());
  at::Tensor q = prepare(as_4d(q_in, varlen), ct), k = prepare(as_4d(k_in, varlen), ct),
             v = prepare(as_4d(v_in, varlen), ct);
  at::Tensor dout = prepare(as_4d(dout_in, varlen), ct), out = prepare(as_4d(out_in, varlen), ct);
  const Problem pr = make_problem(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, diag_offset,
                                  window_left, window_right);
  const BiasView bv = make_bias(bias, q, k, varlen);
  const Dropout drop = make_dropout(dropout_p, dropout_seed);
  at::Tensor lse = lse_in.to(ct).reshape({q.size(0), q.size(2), q.size(1)}).contiguous();
  // delta = rowsum(dO * O) - dlse, shape (B, H, Sq)
  at::Tensor delta = (dout * out).sum(-1).transpose(1, 2).contiguous();
  if (dlse.has_value()) delta.sub_(dlse->to(ct).reshape(delta.sizes()));
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  at::Tensor dbias = bias_grad ? at::empty({q.size(0), q.size(2), q.size(1), k.size(1)}, q.options())
                               : at::empty({0}, q.options());
  if (q.numel() == 0 || k.numel() == 0) {
    dbias.zero_();
    dq.zero_();
    dk.zero_();
    dv.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(ct, "flashattn_lite_cpu_bwd", [&] {
      const Transform<scalar_t> tf =
          make_transform<scalar_t>(softcap, alibi_slopes, int64_t(pr.seqs.size()), q.size(2));
      scalar_t* dbp = bias_grad ? dbias.data_ptr<scalar_t>() : nullptr;
      with_features(bv.data != nullptr, dropout_p > 0, [&](auto kb, auto kd) {
        bwd_impl<scalar_t, decltype(kb)::value, decltype(kd)::value>(dout, q, k, v, lse, delta, dq, dk, dv, dbp,
                                                                     scalar_t(softmax_scale), pr, tf, bv, drop);
      });
    });
  }
  auto narrow = [varlen](const at::Tensor& wide, const at::ScalarType type) {
    const at::Tensor t = varlen ? wide.squeeze(0) : wide;
    return t.scalar_type() == type ? t : t.to(type);
  };
  if (bias_grad) dbias = dbias.to(bias->scalar_type());
  return {narrow(dq, q_in.scalar_type()), narrow(dk, k_in.scalar_type()), narrow(dv, v_in.scalar_type()), dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(flashattn_lite_C, CPU, m) {
  m.impl("fwd", &fwd_cpu);
  m.impl("bwd", &bwd_cpu);
}

}  // namespace flashattn_lite
