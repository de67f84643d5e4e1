// The backward kernel: recomputation over (sequence, kv head, chunk of key blocks) tasks.
// Shared pieces and the design notes: attention_cpu.h.

#include <thread>

#include "attention_cpu.h"

namespace flashattn_lite {
namespace attention_cpu {
namespace {

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

// The bf16 products' operands packed for the call (attention_cpu.h): K both ways, V's
// head-dim pairs, Q's and dO's row pairs.
struct BwdPacks {
  PairPack k_dim, k_rows, v_dim, q_rows, do_rows;
};

// dbias (float/double, contiguous (B, H, Sq, Sk)), where not null, receives
// dS = P * (dP - delta), the gradient w.r.t. the final scores (every element written).
// kMat: q, k, v, dout are H (bf16 or fp16) and the five products run in H (``pk``); P
// and dS are rounded to H as their operands, the products accumulate in float32.
template <typename T, bool kBias, bool kDrop, bool kMat = false, typename H = at::BFloat16>
void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              T* dbias, T scale, const Problem& pr, const Transform<T>& tf, const BiasView& bias,
              const Dropout& drop, const BwdPacks* pk = nullptr) {
  using in_t = std::conditional_t<kMat, H, T>;
  const int64_t Bp = q.size(0), Hq = q.size(2), D = q.size(3), Dv = v.size(3);  // Dv != D: MLA
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
        u.cost += double(cols) * double(std::max<int64_t>(qhi - qlo, 0) * group + D + Dv);
      }
      units.push_back(u);
    }
  }
  sort_by_cost(units);
  const int64_t nunits = int64_t(units.size());
  at::Tensor dq_parts = at::zeros({chunks, Bp, Hq, pr.rows, D}, q.options().dtype(c10::CppTypeToScalarType<T>::value));

  const in_t* qp = q.data_ptr<in_t>();
  const in_t* kp = k.data_ptr<in_t>();
  const in_t* vp = v.data_ptr<in_t>();
  const in_t* dop = dout.data_ptr<in_t>();
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

  const int64_t D2 = (D + 1) / 2, Dv2 = (Dv + 1) / 2;
  const int64_t ldt = (BM + 3) / 2;  // a column of P^T or dS^T in row pairs, one half to spare each end
  const int64_t lds = (BN + 3) / 2;  // a row of dS in key pairs, likewise
  struct State {
    Scratch<T> P, dP, PZ, dk_acc, dv_acc, dcap;
    Scratch<uint32_t> keep, qpairs, dopairs, tpairs, spairs;
  };
  auto make_state = [&] {
    return State{Scratch<T>(BM * BN), Scratch<T>(BM * BN), Scratch<T>(kDrop ? BM * BN : 0), Scratch<T>(BN * D),
                 Scratch<T>(BN * Dv), Scratch<T>(capped ? BM * BN : 0), Scratch<uint32_t>(kDrop ? BM * BN : 0),
                 Scratch<uint32_t>(kMat ? BM * D2 : 0), Scratch<uint32_t>(kMat ? BM * Dv2 : 0),
                 Scratch<uint32_t>(kMat ? BN * ldt : 0), Scratch<uint32_t>(kMat ? BM * lds : 0)};
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
    const in_t* kt = kp + sq.pb * skb + hk * skh + sq.k0 * sks;
    const in_t* vt = vp + sq.pb * svb + hk * svh + sq.k0 * svs;
    const int64_t ldk = dim_pack_ld(sq.len_k);  // k_dim's and v_dim's row length
    const uint32_t* k_dim = kMat ? pk->k_dim.at(u.seq, hk) : nullptr;
    const uint32_t* k_rows = kMat ? pk->k_rows.at(u.seq, hk) : nullptr;
    const uint32_t* v_dim = kMat ? pk->v_dim.at(u.seq, hk) : nullptr;
    for (int64_t kb = u.begin; kb < u.end; ++kb) {
      const int64_t c0 = kb * BN, cols = std::min(BN, sq.len_k - c0);
      std::fill(st.dk_acc.data(), st.dk_acc.data() + cols * D, T(0));
      std::fill(st.dv_acc.data(), st.dv_acc.data() + cols * Dv, T(0));
      int64_t qlo, qhi, unused;
      band.queries(c0, qlo, unused);
      band.queries(c0 + cols - 1, unused, qhi);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        const int64_t row0 = pr.row_id(sq, h, Hq, 0);  // lse/delta index (and dropout row) of query 0
        const in_t* qh = qp + sq.pb * sqb + h * sqh + sq.q0 * sqs;
        const in_t* doh = dop + sq.pb * sdb + h * sdh + sq.q0 * sds;
        const uint32_t* q_rows = kMat ? pk->q_rows.at(u.seq, h) : nullptr;
        const uint32_t* do_rows = kMat ? pk->do_rows.at(u.seq, h) : nullptr;
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
          // a tile the band cuts runs its five products on row slabs over the columns
          // each sees (attention_fwd_cpu.cpp); outside them P is 0 and dP is zeroed below
          const bool cut = band_cuts(band, r0, rows, c0, cols);
          const int64_t slab = cut ? (rows + kStairSlabs - 1) / kStairSlabs : rows;
          auto slabs = [&](auto&& fn) { for_slabs(band, r0, rows, c0, cols, slab, fn); };
          const int64_t rshift = r0 & 1;  // row pairs of q_rows / do_rows start at even rows
          if constexpr (kMat) {
            row_pairs(qh + r0 * sqs, sqs, rows, D, st.qpairs.data());
            row_pairs(doh + r0 * sds, sds, rows, Dv, st.dopairs.data());
          }
          slabs([&](int64_t s0, int64_t s1, int64_t ca, int64_t ce) {
            if constexpr (kMat) {
              pair_gemm<H>(s1 - s0, ce - ca, D2, st.qpairs.data() + s0 * D2, D2, k_dim + c0 + ca, ldk,
                           P + s0 * BN + ca, BN, float(scale), false);
            } else {
              gemm_rm<T>(false, true, s1 - s0, ce - ca, D, scale, qh + (r0 + s0) * sqs, sqs, kt + (c0 + ca) * sks,
                         sks, T(0), P + s0 * BN + ca, BN);
            }
          });
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
            exp_shift_sum<T, kBias>(prow + a, prow + a, e - a, row_lse);
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
          slabs([&](int64_t s0, int64_t s1, int64_t ca, int64_t ce) {
            if constexpr (kMat) {
              const int64_t pa = (rshift + s0) / 2, pe = (rshift + s1 + 1) / 2;
              float_cols_pairs<H>(pv, BN, s0, s1, ca, ce, rshift, st.tpairs.data(), ldt);
              pair_gemm<H>(ce - ca, Dv, pe - pa, st.tpairs.data(), ldt,
                           do_rows + ((r0 - rshift) / 2 + pa) * pk->do_rows.ld,
                           pk->do_rows.ld, st.dv_acc.data() + ca * Dv, Dv, float(rescale), true);
              pair_gemm<H>(s1 - s0, ce - ca, Dv2, st.dopairs.data() + s0 * Dv2, Dv2, v_dim + c0 + ca, ldk,
                           dP + s0 * BN + ca, BN, float(rescale), false);
            } else {
              const T* dos = doh + (r0 + s0) * sds;
              gemm_rm<T>(true, false, ce - ca, Dv, s1 - s0, rescale, pv + s0 * BN + ca, BN, dos, sds, T(1),
                         st.dv_acc.data() + ca * Dv, Dv);
              gemm_rm<T>(false, true, s1 - s0, ce - ca, Dv, rescale, dos, sds, vt + (c0 + ca) * svs, svs, T(0),
                         dP + s0 * BN + ca, BN);
            }
          });
          // dS = P * (dP - delta) (= dBias), then * scale (and the cap's derivative) for dQ, dK; into dP
          for (int64_t r = 0; r < rows; ++r) {
            T* prow = P + r * BN;
            T* dprow = dP + r * BN;
            if (cut) {  // dP was computed only where the row's slab sees keys (even a one-row slab)
              int64_t lo, hi;
              band.keys(r0 + r, lo, hi);
              const int64_t a = std::clamp(lo - c0, int64_t(0), cols), e = std::clamp(hi - c0, int64_t(0), cols);
              std::fill(dprow, dprow + a, T(0));
              std::fill(dprow + std::max(a, e), dprow + cols, T(0));
            }
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
          // (fp16 products: dS is rounded to fp16 times a power of two that puts the tile's
          // largest |dS| in [2^14, 2^15), undone exactly by the two products' alpha, so small
          // gradients keep fp16's precision instead of underflowing)
          float ds_mul = 1.0f;
          if constexpr (kMat && std::is_same_v<H, at::Half>) {
            float mx = 0.0f;
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t j = 0; j < cols; ++j) mx = std::max(mx, std::abs(float(dP[r * BN + j])));
            if (mx > 0.0f && std::isfinite(mx)) {
              int e = 0;
              std::frexp(mx, &e);  // mx in [2^(e-1), 2^e)
              ds_mul = std::ldexp(1.0f, std::clamp(15 - e, -100, 100));
            }
          }
          if constexpr (kMat) {  // dS's rows in key pairs, for dQ
            for (int64_t r = 0; r < rows; ++r)
              float_row_pairs<H>(dP + r * BN, cols, c0 & 1, st.spairs.data() + r * lds, ds_mul);
          }
          slabs([&](int64_t s0, int64_t s1, int64_t ca, int64_t ce) {
            if constexpr (kMat) {
              const int64_t pa = (rshift + s0) / 2, pe = (rshift + s1 + 1) / 2;
              float_cols_pairs<H>(dP, BN, s0, s1, ca, ce, rshift, st.tpairs.data(), ldt, ds_mul);
              pair_gemm<H>(ce - ca, D, pe - pa, st.tpairs.data(), ldt,
                           q_rows + ((r0 - rshift) / 2 + pa) * pk->q_rows.ld,
                           pk->q_rows.ld, st.dk_acc.data() + ca * D, D, 1.0f / ds_mul, true);
              const int64_t kshift = c0 & 1, ka = (kshift + ca) / 2, ke = (kshift + ce + 1) / 2;
              pair_gemm<H>(s1 - s0, D, ke - ka, st.spairs.data() + s0 * lds + ka, lds,
                           k_rows + ((c0 - kshift) / 2 + ka) * pk->k_rows.ld, pk->k_rows.ld, dqh + (r0 + s0) * D,
                           D, 1.0f / ds_mul, true);
            } else {
              const T* dss = dP + s0 * BN + ca;
              gemm_rm<T>(true, false, ce - ca, D, s1 - s0, T(1), dss, BN, qh + (r0 + s0) * sqs, sqs, T(1),
                         st.dk_acc.data() + ca * D, D);
              gemm_rm<T>(false, false, s1 - s0, D, ce - ca, T(1), dss, BN, kt + (c0 + ca) * sks, sks, T(1),
                         dqh + (r0 + s0) * D, D);
            }
          });
        }
      }
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t key = sq.k0 + c0 + c;
        std::copy(st.dk_acc.data() + c * D, st.dk_acc.data() + (c + 1) * D, dkp + sq.pb * dkb + hk * dkh + key * dks);
        std::copy(st.dv_acc.data() + c * Dv, st.dv_acc.data() + (c + 1) * Dv, dvp + sq.pb * dvb + hk * dvh + key * dvs);
      }
    }
  });
  // fixed-order reduction of the dQ partials, into dq's own layout
  at::Tensor total = chunks == 1 ? dq_parts[0] : dq_parts.sum(0);
  dq.copy_(total.permute({0, 2, 1, 3}));
}

}  // namespace

void bwd_run(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
             at::Tensor* dbias, double scale, const Problem& pr, double softcap,
             const std::optional<at::Tensor>& slopes, const BiasView& bias, const Dropout& drop, bool has_drop) {
  auto pairs = [&](auto h) {  // bf16/fp16 products (bwd_cpu checked the choice)
    using H = decltype(h);
    if constexpr (kPairType<H>) {
      const Transform<float> tf = make_transform<float>(softcap, slopes, int64_t(pr.seqs.size()), q.size(2));
      float* dbp = dbias != nullptr ? dbias->data_ptr<float>() : nullptr;
      const BwdPacks pk{pack_pairs<H>(k, pr, false, Pairs::kHeadDim), pack_pairs<H>(k, pr, false, Pairs::kRows),
                        pack_pairs<H>(v, pr, false, Pairs::kHeadDim), pack_pairs<H>(q, pr, true, Pairs::kRows),
                        pack_pairs<H>(dout, pr, true, Pairs::kRows)};
      with_features(bias.data != nullptr, has_drop, [&](auto kb, auto kd) {
        bwd_impl<float, decltype(kb)::value, decltype(kd)::value, true, H>(dout, q, k, v, lse, delta, dq, dk, dv, dbp,
                                                                           float(scale), pr, tf, bias, drop, &pk);
      });
      return;
    }
    TORCH_CHECK(false, "flashattn_lite cpu: ", q.scalar_type(), " products are not compiled into this extension");
  };
  if (q.scalar_type() == at::kBFloat16) return pairs(at::BFloat16());
  if (q.scalar_type() == at::kHalf) return pairs(at::Half());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "flashattn_lite_cpu_bwd", [&] {
    const Transform<scalar_t> tf = make_transform<scalar_t>(softcap, slopes, int64_t(pr.seqs.size()), q.size(2));
    scalar_t* dbp = dbias != nullptr ? dbias->data_ptr<scalar_t>() : nullptr;
    with_features(bias.data != nullptr, has_drop, [&](auto kb, auto kd) {
      bwd_impl<scalar_t, decltype(kb)::value, decltype(kd)::value>(dout, q, k, v, lse, delta, dq, dk, dv, dbp,
                                                                   scalar_t(scale), pr, tf, bias, drop);
    });
  });
}

}  // namespace attention_cpu
}  // namespace flashattn_lite
