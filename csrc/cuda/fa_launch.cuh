// Host launchers: grid shapes, shared-memory opt-in, head-dim dispatch.  No torch here;
// the same code launches real kernels (nvcc) and emulated ones (g++ + cuda_emu.h).

#pragma once

#include "fa_kernels.cuh"

#ifdef CUDA_EMU
#define FA_LAUNCH(kernel, grid, block, smem, stream, ...) ::cuda_emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#else
#define FA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

namespace fa {

inline unsigned blocks(int64_t n, int per) { return static_cast<unsigned>((n + per - 1) / per); }

template <class K>
inline cudaError_t opt_in_smem(K kernel, int bytes) {
  return bytes > 48 * 1024 ? cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)
                           : cudaSuccess;
}

template <class T, int D>
inline cudaError_t launch_fwd(const AttnParams& p, cudaStream_t stream) {
  using Cfg = FwdCfg<D>;
  auto kernel = fwd_kernel<T, D>;
  cudaError_t e = opt_in_smem(kernel, Cfg::SMEM);
  if (e != cudaSuccess) return e;
  const dim3 grid(blocks(p.seqlen_q, Cfg::BM), p.heads_q, p.batch);
  FA_LAUNCH(kernel, grid, dim3(Cfg::THREADS), Cfg::SMEM, stream, p);
  return cudaGetLastError();
}

template <class T, int D>
inline cudaError_t launch_bwd(const AttnParams& p, cudaStream_t stream) {
  {
    auto kernel = bwd_preprocess_kernel<T>;
    const dim3 grid(blocks(p.seqlen_q, PreCfg::BM), p.heads_q, p.batch);
    FA_LAUNCH(kernel, grid, dim3(PreCfg::THREADS), 0, stream, p);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  if (p.seqlen_k > 0) {
    using Cfg = DkdvCfg<D>;
    auto kernel = bwd_dkdv_kernel<T, D>;
    cudaError_t e = opt_in_smem(kernel, Cfg::SMEM);
    if (e != cudaSuccess) return e;
    const dim3 grid(blocks(p.seqlen_k, Cfg::BN), p.heads_k, p.batch);
    FA_LAUNCH(kernel, grid, dim3(Cfg::THREADS), Cfg::SMEM, stream, p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  {
    using Cfg = DqCfg<D>;
    auto kernel = bwd_dq_kernel<T, D>;
    cudaError_t e = opt_in_smem(kernel, Cfg::SMEM);
    if (e != cudaSuccess) return e;
    const dim3 grid(blocks(p.seqlen_q, Cfg::BM), p.heads_q, p.batch);
    FA_LAUNCH(kernel, grid, dim3(Cfg::THREADS), Cfg::SMEM, stream, p);
    return cudaGetLastError();
  }
}

// Entry points: seqlen_q, batch and heads > 0 (the caller returns early otherwise);
// head_dim in 1..256.  Returns nullptr or an error message.
template <class T>
inline const char* run(bool backward, const AttnParams& p, cudaStream_t stream) {
  cudaError_t e;
  switch (padded_head_dim(p.head_dim)) {
#define FA_CASE(D) \
  case D: e = backward ? launch_bwd<T, D>(p, stream) : launch_fwd<T, D>(p, stream); break;
    FA_CASE(32)
    FA_CASE(64)
    FA_CASE(96)
    FA_CASE(128)
    FA_CASE(256)
#undef FA_CASE
    default: return "head_dim must be in 1..256";
  }
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

inline const char* run_attention(bool backward, bool bf16, const AttnParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return bf16 ? run<__nv_bfloat16>(backward, p, s) : run<__half>(backward, p, s);
}

}  // namespace fa
