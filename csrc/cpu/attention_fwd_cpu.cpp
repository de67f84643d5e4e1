// The forward kernel: tiled online softmax over (sequence, head, query block) tasks.
// Shared pieces and the design notes: attention_cpu.h.

#include "attention_cpu.h"

namespace flashattn_lite {
namespace attention_cpu {
namespace {

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

// in_t: q's and out's dtype; kv_t: k's and v's (in_t, or T when fwd_typed widened them);
// T: the compute type (float, or double for double).  Tiles not in T are widened as
// they are used.  kBias: add the bias to the scores; kDrop: dropout.  kMat: bf16/fp16 q
// with K and V in ``pk`` (bf16/fp16 products, attention_cpu.h); P is rounded to in_t for
// P V.
template <typename in_t, typename kv_t, typename T, bool kBias, bool kDrop, bool kMat = false>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
              T scale, const Problem& pr, const Transform<T>& tf, const BiasView& bias, const Dropout& drop,
              const PairPack* kpack = nullptr, const PairPack* vpack = nullptr) {
  const int64_t Hq = q.size(2), D = q.size(3), Dv = v.size(3);  // Dv != D: MLA
  const int64_t Hk = k.size(2), group = Hq / Hk;
  // Shorter query sequences use smaller query tiles so every thread gets work.
  const Blocks bs = blocks_from_env("FLASHATTN_LITE_CPU_FWD_BLOCKS", pr.max_q >= 768 ? 256 : 128, 512);
  const int64_t BM = std::max<int64_t>(1, std::min(bs.m, pr.max_q));
  // (bf16/fp16 products: a multiple of 32, so that the tile strides, which oneDNN's code
  // is generated for, do not follow every key length below bs.n)
  const int64_t BN = std::max<int64_t>(1, std::min(bs.n, kMat ? (pr.max_k + 31) / 32 * 32 : pr.max_k));
  std::vector<Unit> units;
  for (int64_t s = 0; s < int64_t(pr.seqs.size()); ++s) {
    const Seq& sq = pr.seqs[s];
    const Band band = pr.band(sq);
    for (int64_t r0 = 0; r0 < sq.len_q; r0 += BM) {
      const int64_t r1 = std::min(sq.len_q, r0 + BM);
      int64_t klo, khi, unused;
      band.keys(r0, klo, unused);
      band.keys(r1 - 1, unused, khi);
      units.push_back(Unit{s, r0, r1, 0, double(r1 - r0) * double(std::max<int64_t>(khi - klo, 0) + D + Dv)});
    }
  }
  sort_by_cost(units);
  const int64_t nunits = int64_t(units.size());

  const in_t* qp = q.data_ptr<in_t>();
  const kv_t* kp = k.data_ptr<kv_t>();
  const kv_t* vp = v.data_ptr<kv_t>();
  in_t* op = out.data_ptr<in_t>();
  float* lp32 = lse.scalar_type() == at::kFloat ? lse.data_ptr<float>() : nullptr;
  double* lp64 = lse.scalar_type() == at::kDouble ? lse.data_ptr<double>() : nullptr;
  const int64_t sqb = q.stride(0), sqs = q.stride(1), sqh = q.stride(2);
  const int64_t skb = k.stride(0), sks = k.stride(1), skh = k.stride(2);
  const int64_t svb = v.stride(0), svs = v.stride(1), svh = v.stride(2);
  const int64_t sob = out.stride(0), sos = out.stride(1), soh = out.stride(2);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  constexpr bool widen = !std::is_same_v<in_t, T>;
  constexpr bool widen_kv = !std::is_same_v<kv_t, T> && !kMat;
  const int64_t D2 = (D + 1) / 2;
  const int64_t pld = (BN + 3) / 2;  // a row of P's pairs: one leading and one trailing half to spare
  // dropout's 1 / (1 - p) is applied with the final 1 / l
  const T out_scale = kDrop ? T(drop.rescale) : T(1);
  // (fp16 products round P to fp16, whose largest value is 65504: a tile's P then stays
  // at most 2^15, and a row whose exp-sum would pass it is rescaled to the tile's max)
  const T kLazy = kMat && std::is_same_v<in_t, at::Half> ? T(32768) : T(std::exp(kLazyShift));

  struct State {
    Scratch<T> S, P, acc, m, l, orow, qbuf, kbuf, vbuf;
    Scratch<uint32_t> keep, qpairs, ppairs;
  };
  auto make_state = [&] {
    return State{Scratch<T>(BM * BN), Scratch<T>(BM * BN), Scratch<T>(BM * Dv), Scratch<T>(BM), Scratch<T>(BM),
                 Scratch<T>(Dv), Scratch<T>(widen && !kMat ? BM * D : 0), Scratch<T>(widen_kv ? BN * D : 0),
                 Scratch<T>(widen_kv ? BN * Dv : 0), Scratch<uint32_t>(kDrop ? BN : 0),
                 Scratch<uint32_t>(kMat ? BM * D2 : 0), Scratch<uint32_t>(kMat ? BM * pld : 0)};
  };
  run_tasks(Hq * nunits, make_state, [&](int64_t task, State& st) {
    const int64_t h = task / nunits;
    const Unit& u = units[task % nunits];
    const Seq& sq = pr.seqs[u.seq];
    const Band band = pr.band(sq);
    Transform<T> tfs = tf;
    tfs.offset = sq.offset;
    const int64_t r0 = u.begin, rows = u.end - u.begin;
    const kv_t* kt = kp + sq.pb * skb + (h / group) * skh + sq.k0 * sks;
    const kv_t* vt = vp + sq.pb * svb + (h / group) * svh + sq.k0 * svs;
    const int64_t row0 = pr.row_id(sq, h, Hq, r0);
    const T slope_h = tf.slope(sq.b, h);
    T* acc = st.acc.data();
    T* m = st.m.data();
    T* l = st.l.data();
    int64_t ldq = 0;
    const T* qt = nullptr;
    const uint32_t *kpk = nullptr, *vpk = nullptr;
    if constexpr (kMat) {
      row_pairs(qp + sq.pb * sqb + h * sqh + (sq.q0 + r0) * sqs, sqs, rows, D, st.qpairs.data());
      kpk = kpack->at(u.seq, h / group);
      vpk = vpack->at(u.seq, h / group);
    } else {
      qt = tile<in_t, T>(qp + sq.pb * sqb + h * sqh + (sq.q0 + r0) * sqs, sqs, rows, D, st.qbuf.data(), ldq);
    }
    std::fill(acc, acc + rows * Dv, T(0));
    std::fill(m, m + rows, neg_inf);
    std::fill(l, l + rows, T(0));
    // band bounds are monotone in the row, so the block's keys are [lo(first), hi(last))
    int64_t klo, khi, unused;
    band.keys(r0, klo, unused);
    band.keys(r0 + rows - 1, unused, khi);
    for (int64_t c0 = klo; c0 < khi; c0 += BN) {
      const int64_t cols = std::min(BN, khi - c0);
      int64_t ldk = 0, ldv = 0;
      const T* ktile = kMat ? nullptr : tile<kv_t, T>(kt + c0 * sks, sks, cols, D, st.kbuf.data(), ldk);
      // A tile the band cuts (causal diagonal, window edges) runs its products on row
      // slabs, each over just the columns its rows can see (a staircase), instead of the
      // whole rectangle; a slab's rows read and write only inside its column range.
      const int64_t slab = band_cuts(band, r0, rows, c0, cols) ? (rows + kStairSlabs - 1) / kStairSlabs : rows;
      for_slabs(band, r0, rows, c0, cols, slab, [&](int64_t s0, int64_t s1, int64_t ca, int64_t ce) {
        if constexpr (kMat) {
          pair_gemm<in_t>(s1 - s0, ce - ca, D2, st.qpairs.data() + s0 * D2, D2, kpk + c0 + ca,
                          dim_pack_ld(sq.len_k), st.S.data() + s0 * BN + ca, BN, float(scale), false);
        } else {
          gemm_rm<T>(false, true, s1 - s0, ce - ca, D, scale, qt + s0 * ldq, ldq, ktile + ca * ldk, ldk, T(0),
                     st.S.data() + s0 * BN + ca, BN);
        }
      });
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
        const T sum = exp_shift_sum<T, kBias>(srow + a, prow + a, e - a, mr);
        if (sum <= T(kLazy)) {
          lr += sum;
        } else {  // rare: scores far above the shift; rescale the row to the tile's max
          const T mx = std::max(mr, row_max(srow + a, e - a));  // (NaN scores keep the sum NaN)
          const T alpha = std::exp(mr - mx);
          lr = lr * alpha + exp_shift_sum<T, kBias>(srow + a, prow + a, e - a, mx);
          scale_row(acc + r * Dv, Dv, alpha);
          mr = mx;
        }
        if constexpr (kDrop) {  // l sums the undropped probabilities; only P @ V is dropped
          drop.philox.keep_mask(uint64_t(row0 + r) * uint64_t(pr.drop_cols) + uint64_t(c0 + a), e - a,
                                st.keep.data());
          apply_keep(prow + a, st.keep.data(), e - a);
        }
      }
      if constexpr (kMat) {
        // P's rows in in_t, shifted by c0's parity so that pairs are V's key pairs (even
        // key first); the spare halves are 0
        const int64_t shift = c0 & 1;
        for (int64_t r = 0; r < rows; ++r)
          float_row_pairs<in_t>(st.P.data() + r * BN, cols, shift, st.ppairs.data() + r * pld);
        for_slabs(band, r0, rows, c0, cols, slab, [&](int64_t s0, int64_t s1, int64_t ca, int64_t ce) {
          const int64_t pa = (shift + ca) / 2, pe = (shift + ce + 1) / 2;
          pair_gemm<in_t>(s1 - s0, Dv, pe - pa, st.ppairs.data() + s0 * pld + pa, pld,
                          vpk + (c0 / 2 + pa) * vpack->ld, vpack->ld, acc + s0 * Dv, Dv, 1.0f, true);
        });
      } else {
        const T* vtile = tile<kv_t, T>(vt + c0 * svs, svs, cols, Dv, st.vbuf.data(), ldv);
        for_slabs(band, r0, rows, c0, cols, slab, [&](int64_t s0, int64_t s1, int64_t ca, int64_t ce) {
          gemm_rm<T>(false, false, s1 - s0, Dv, ce - ca, T(1), st.P.data() + s0 * BN + ca, BN, vtile + ca * ldv,
                     ldv, T(1), acc + s0 * Dv, Dv);
        });
      }
    }
    T* orow = st.orow.data();
    for (int64_t r = 0; r < rows; ++r) {
      in_t* dst = op + sq.pb * sob + h * soh + (sq.q0 + r0 + r) * sos;
      const T lr = l[r];
      T row_lse = neg_inf;
      if (lr == T(0)) {  // the row saw no key
        std::fill(orow, orow + Dv, T(0));
      } else {
        // a sink adds e^(sink - m) to the normaliser (lse leaves it out)
        const T denom = pr.sink ? lr + std::exp(T(pr.sink[h]) - m[r]) : lr;
        const T inv = out_scale / denom;
        const T* arow = acc + r * Dv;
        for (int64_t d = 0; d < Dv; ++d) orow[d] = arow[d] * inv;
        row_lse = m[r] + std::log(lr);
      }
      if constexpr (widen) {
        at::vec::convert(orow, dst, Dv);
      } else {
        std::copy(orow, orow + Dv, dst);
      }
      if (lp32) lp32[row0 + r] = float(row_lse);
      if (lp64) lp64[row0 + r] = double(row_lse);
    }
  });
}

template <typename in_t, typename T>
void fwd_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
               double scale, const Problem& pr, double softcap, const std::optional<at::Tensor>& slopes,
               const BiasView& bias, const Dropout& drop, bool has_drop) {
  const Transform<T> tf = make_transform<T>(softcap, slopes, int64_t(pr.seqs.size()), q.size(2));
  // fp16/bf16 K and V: where two or more query blocks read each key tile (longer
  // query sequences), widen them once for the call (O(N d) memory, like the backward)
  // instead of once per tile and query block; else per tile, copying nothing K-sized.
  const bool widen_once = !std::is_same_v<in_t, T> && pr.max_q > 128;
  // bf16/fp16 products: K and V packed once for the call (about as many bytes as they have)
  const bool mat = kPairType<in_t> && pair_products(q.scalar_type()) && pr.max_q > 64;
  with_features(bias.data != nullptr, has_drop, [&](auto kb, auto kd) {
    constexpr bool b = decltype(kb)::value, d = decltype(kd)::value;
    if constexpr (kPairType<in_t>) {
      if (mat) {
        const PairPack kpack = pack_pairs<in_t>(k, pr, false, Pairs::kHeadDim),
                       vpack = pack_pairs<in_t>(v, pr, false, Pairs::kRows);
        return fwd_impl<in_t, in_t, T, b, d, true>(q, k, v, out, lse, T(scale), pr, tf, bias, drop, &kpack, &vpack);
      }
    }
    if (widen_once) {
      const auto wide = c10::CppTypeToScalarType<T>::value;
      fwd_impl<in_t, T, T, b, d>(q, k.to(wide), v.to(wide), out, lse, T(scale), pr, tf, bias, drop);
    } else {
      fwd_impl<in_t, in_t, T, b, d>(q, k, v, out, lse, T(scale), pr, tf, bias, drop);
    }
  });
}

}  // namespace

void fwd_run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
             double scale, const Problem& pr, double softcap, const std::optional<at::Tensor>& slopes,
             const BiasView& bias, const Dropout& drop, bool has_drop) {
  switch (q.scalar_type()) {
    case at::kFloat:
      return fwd_typed<float, float>(q, k, v, out, lse, scale, pr, softcap, slopes, bias, drop, has_drop);
    case at::kDouble:
      return fwd_typed<double, double>(q, k, v, out, lse, scale, pr, softcap, slopes, bias, drop, has_drop);
    case at::kBFloat16:
      return fwd_typed<at::BFloat16, float>(q, k, v, out, lse, scale, pr, softcap, slopes, bias, drop, has_drop);
    case at::kHalf:
      return fwd_typed<at::Half, float>(q, k, v, out, lse, scale, pr, softcap, slopes, bias, drop, has_drop);
    default: TORCH_CHECK(false, "flashattn_lite cpu: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace attention_cpu
}  // namespace flashattn_lite
