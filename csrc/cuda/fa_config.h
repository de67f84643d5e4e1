// Tile sizes of the CUDA kernels: one table, plain C++ (no CUDA headers), so the
// launcher, the emulator build and the compile test (which prints it) share it.
//
// Every warp owns 16 rows of its output tile, so the warp count follows from the
// row block.  The fp32 accumulator of one warp's rows is (head_dim / 8) * 4 registers
// per thread for each output matrix; that, not shared memory, bounds the blocks:
//   fwd   O (D/2 regs) + S (BN/2)             BM 64, BN 64 (32 for D = 256)
//   dkdv  dK + dV (2 * D/2 / WD) + S + dP     BN 64 keys, BM 32 queries; at D = 256
//         the head dim is split over WD = 2 warps per 16 key rows (8 warps)
//   dq    dQ (D/2) + S + dP                   BM 64, BN 64 (32 for D = 256)

#pragma once

namespace fa {

// Compiled head dims; any other head dim in 1..256 runs on the next one up, zero padded.
constexpr int kHeadDims[] = {32, 64, 96, 128, 256};
constexpr int padded_head_dim(int d) {
  return d <= 0 ? -1 : d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : d <= 128 ? 128 : d <= 256 ? 256 : -1;
}

constexpr int kElem = 2;  // fp16 / bf16 bytes

template <int D>
struct FwdCfg {
  static constexpr int BM = 64, BN = D <= 128 ? 64 : 32, WARPS = BM / 16, THREADS = WARPS * 32;
  static constexpr int LD = D + 8;  // +16 bytes per row: ldmatrix rows of 8 lanes hit distinct banks
  // Q, then K and V double buffered
  static constexpr int SMEM = (BM + 4 * BN) * LD * kElem;
};

template <int D>
struct DkdvCfg {
  static constexpr int BN = 64, BM = 32, WD = D == 256 ? 2 : 1, DW = D / WD;
  static constexpr int ROW_WARPS = BN / 16, WARPS = ROW_WARPS * WD, THREADS = WARPS * 32;
  static constexpr int LD = D + 8;
  // K, V; Q, dO; lse (log2 units) and delta of BM query rows
  static constexpr int SMEM = (2 * BN + 2 * BM) * LD * kElem + 2 * BM * 4;
};

template <int D>
struct DqCfg {
  static constexpr int BM = 64, BN = D <= 128 ? 64 : 32, WARPS = BM / 16, THREADS = WARPS * 32;
  static constexpr int LD = D + 8;
  // Q, dO; K, V
  static constexpr int SMEM = (2 * BM + 2 * BN) * LD * kElem;
};

struct PreCfg {
  static constexpr int BM = 128, THREADS = 128;  // one query row per thread
};

}  // namespace fa
