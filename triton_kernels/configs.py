"""Block sizes, warps and pipeline stages for the attention kernels.

One plain table per kernel, keyed by (head-dim bucket, dtype class, GPU arch).  With a
value head dim Dv different from the query/key head dim D (MLA), the bucket is the
larger of the two padded dims: the tiles of the smaller one only shrink, so the
config of the larger pair is the conservative one (the static report compiles the
MLA pairs it serves, 192/128 among them, with that config).
Read it, or override it with :func:`override` (tests and tuning do).  Every
config shipped here is compiled for sm_80 and sm_90 by
``benches/static_gpu_report.py``; the test suite asserts that none of them
spills registers and that sm_90 uses warp-group tensor-core instructions.
"""

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Head dims are padded to a power of two (min 16, the smallest tl.dot tile).
HEAD_DIM_BUCKETS = (16, 32, 64, 128, 256, 512)

# (arch, dtype class, padded head dim) -> config.  "lowp" = fp16/bf16; "fp32" uses
# the FMA path (or tf32 when torch allows it), which holds fewer registers per element.
# "interp" is the CPU interpreter: tiny tiles so small test shapes still span
# several blocks and exercise every masked/unmasked code path.
_FWD = {
    ("sm80", "lowp", 16): KernelConfig(128, 64, 4, 3),
    ("sm80", "lowp", 32): KernelConfig(128, 64, 8, 3),
    ("sm80", "lowp", 64): KernelConfig(128, 64, 4, 3),
    ("sm80", "lowp", 128): KernelConfig(128, 32, 8, 2),
    ("sm80", "lowp", 256): KernelConfig(64, 32, 8, 2),
    ("sm90", "lowp", 16): KernelConfig(128, 64, 4, 3),
    ("sm90", "lowp", 32): KernelConfig(128, 64, 4, 3),
    ("sm90", "lowp", 64): KernelConfig(128, 64, 4, 3),
    ("sm90", "lowp", 128): KernelConfig(128, 64, 8, 2),
    ("sm90", "lowp", 256): KernelConfig(64, 64, 8, 2),
    ("sm80", "fp32", 16): KernelConfig(64, 32, 4, 2),
    ("sm80", "fp32", 32): KernelConfig(64, 32, 4, 2),
    ("sm80", "fp32", 64): KernelConfig(64, 32, 8, 2),
    ("sm80", "fp32", 128): KernelConfig(32, 32, 8, 2),
    ("sm80", "fp32", 256): KernelConfig(32, 16, 8, 1),
    ("sm90", "fp32", 16): KernelConfig(64, 32, 4, 2),
    ("sm90", "fp32", 32): KernelConfig(64, 32, 8, 2),
    ("sm90", "fp32", 64): KernelConfig(64, 32, 8, 2),
    ("sm90", "fp32", 128): KernelConfig(32, 16, 4, 2),
    ("sm90", "fp32", 256): KernelConfig(32, 16, 8, 1),
}

# The dK/dV kernel holds two (BLOCK_N, head dim) fp32 accumulators plus the K, V
# tiles; the dQ kernel one (BLOCK_M, head dim) accumulator plus Q and dO.  Each has
# its own table so each can use the block shape that suits it (on sm_90 the
# warp-group MMA wants 64 rows in the dimension a kernel keeps resident).
_BWD_DKDV = {
    ("sm80", "lowp", 16): KernelConfig(64, 64, 8, 2),
    ("sm80", "lowp", 32): KernelConfig(64, 64, 8, 2),
    ("sm80", "lowp", 64): KernelConfig(64, 32, 8, 2),
    ("sm80", "lowp", 128): KernelConfig(64, 64, 8, 1),
    ("sm80", "lowp", 256): KernelConfig(32, 32, 8, 1),
    ("sm90", "lowp", 16): KernelConfig(64, 64, 4, 2),
    ("sm90", "lowp", 32): KernelConfig(64, 64, 8, 2),
    ("sm90", "lowp", 64): KernelConfig(64, 64, 8, 1),
    ("sm90", "lowp", 128): KernelConfig(16, 64, 8, 1),
    ("sm90", "lowp", 256): KernelConfig(32, 32, 8, 1),
    ("sm80", "fp32", 16): KernelConfig(32, 64, 8, 1),
    ("sm80", "fp32", 32): KernelConfig(32, 32, 8, 1),
    ("sm80", "fp32", 64): KernelConfig(32, 64, 8, 1),
    ("sm80", "fp32", 128): KernelConfig(32, 32, 8, 1),
    ("sm80", "fp32", 256): KernelConfig(16, 16, 8, 1),
    ("sm90", "fp32", 16): KernelConfig(32, 32, 4, 1),
    ("sm90", "fp32", 32): KernelConfig(32, 32, 4, 1),
    ("sm90", "fp32", 64): KernelConfig(32, 32, 8, 2),
    ("sm90", "fp32", 128): KernelConfig(16, 16, 4, 1),
    ("sm90", "fp32", 256): KernelConfig(16, 16, 8, 1),
}

_BWD_DQ = {
    ("sm80", "lowp", 16): KernelConfig(64, 64, 8, 2),
    ("sm80", "lowp", 32): KernelConfig(64, 64, 4, 2),
    ("sm80", "lowp", 64): KernelConfig(64, 32, 8, 2),
    ("sm80", "lowp", 128): KernelConfig(64, 64, 8, 1),
    ("sm80", "lowp", 256): KernelConfig(32, 32, 8, 1),
    ("sm90", "lowp", 16): KernelConfig(64, 64, 4, 2),
    ("sm90", "lowp", 32): KernelConfig(64, 64, 4, 2),
    ("sm90", "lowp", 64): KernelConfig(64, 64, 8, 2),
    ("sm90", "lowp", 128): KernelConfig(64, 64, 8, 2),
    ("sm90", "lowp", 256): KernelConfig(64, 32, 8, 2),
    ("sm80", "fp32", 16): KernelConfig(64, 64, 8, 2),
    ("sm80", "fp32", 32): KernelConfig(32, 32, 4, 1),
    ("sm80", "fp32", 64): KernelConfig(32, 32, 4, 1),
    ("sm80", "fp32", 128): KernelConfig(32, 32, 8, 2),
    ("sm80", "fp32", 256): KernelConfig(16, 16, 8, 1),
    ("sm90", "fp32", 16): KernelConfig(32, 32, 4, 1),
    ("sm90", "fp32", 32): KernelConfig(32, 32, 4, 1),
    ("sm90", "fp32", 64): KernelConfig(32, 32, 8, 2),
    ("sm90", "fp32", 128): KernelConfig(16, 16, 4, 1),
    ("sm90", "fp32", 256): KernelConfig(16, 16, 8, 1),
}

# Head dim 512 (MLA's 512/512; any pair whose larger padded dim is 512).  An MMA operand
# whose reduction dim is the head dim is held whole by every warp (a 16 x 512 fp16 tile:
# 128 registers a thread), so the tiles are small and sm_90 uses mma.sync (64-row
# warp-group tiles spilled: see SM90_MMA_SYNC); dK/dV run as two passes over 64-wide
# head-dim slices (dkdv_passes, dkdv_chunks).  fp32 has no 512 backward: its dK/dV
# kernel needs 228 KiB of shared memory even at 16 x 16 tiles, above both architectures'
# limit (FP32_BWD_MAX_HEAD_DIM; the backend declines such calls with the reason).
FP32_BWD_MAX_HEAD_DIM = 256
for _arch in ("sm80", "sm90"):
    _FWD[(_arch, "lowp", 512)] = KernelConfig(64, 16, 8, 1) if _arch == "sm80" else KernelConfig(32, 16, 8, 1)
    _FWD[(_arch, "fp32", 512)] = KernelConfig(16, 16, 8, 1)
    _BWD_DKDV[(_arch, "lowp", 512)] = KernelConfig(16, 16, 8, 1)
    _BWD_DQ[(_arch, "lowp", 512)] = KernelConfig(32, 16, 8, 1) if _arch == "sm80" else KernelConfig(16, 16, 8, 1)

# Configs for calls with softcap, ALiBi or an additive bias (attention mask), where
# they differ from the tables above: the extra per-score work (tanh, its derivative
# kept for the backward, the ALiBi distance, the bias tile and its gradient's store)
# costs registers, and the base configs spill with it.  Each entry is the first
# spill-free config of a short candidate list, compiled with all of them on.  Keys: (kernel, arch,
# dtype class, padded head dim).  Filled in below the tables.
_WITH_SCORE_MODS = {}

_WITH_SCORE_MODS.update({
    ("bwd_dkdv", "sm80", "fp32", 16): KernelConfig(64, 64, 8, 1),
    ("bwd_dkdv", "sm80", "fp32", 64): KernelConfig(16, 32, 8, 1),
    ("bwd_dkdv", "sm80", "fp32", 128): KernelConfig(16, 32, 8, 1),
    ("bwd_dkdv", "sm80", "lowp", 16): KernelConfig(32, 64, 8, 1),
    ("bwd_dkdv", "sm80", "lowp", 32): KernelConfig(32, 64, 8, 1),
    ("bwd_dkdv", "sm80", "lowp", 128): KernelConfig(16, 64, 8, 1),
    ("bwd_dkdv", "sm80", "lowp", 256): KernelConfig(16, 32, 8, 1),
    ("bwd_dkdv", "sm90", "fp32", 64): KernelConfig(16, 32, 8, 1),
    ("bwd_dkdv", "sm90", "fp32", 128): KernelConfig(16, 32, 4, 1),
    ("bwd_dkdv", "sm90", "lowp", 16): KernelConfig(32, 64, 8, 1),
    ("bwd_dkdv", "sm90", "lowp", 32): KernelConfig(64, 64, 8, 1),
    ("bwd_dkdv", "sm90", "lowp", 64): KernelConfig(32, 64, 8, 1),
    ("bwd_dkdv", "sm90", "lowp", 128): KernelConfig(32, 32, 8, 1),
    ("bwd_dkdv", "sm90", "lowp", 256): KernelConfig(16, 16, 8, 1),
    ("bwd_dq", "sm80", "fp32", 16): KernelConfig(32, 16, 8, 1),
    ("bwd_dq", "sm80", "fp32", 64): KernelConfig(32, 32, 8, 1),
    ("bwd_dq", "sm80", "lowp", 32): KernelConfig(64, 32, 8, 1),
    ("bwd_dq", "sm90", "lowp", 128): KernelConfig(64, 32, 8, 1),
    ("bwd_dq", "sm90", "lowp", 256): KernelConfig(32, 16, 8, 1),
    ("fwd", "sm80", "lowp", 16): KernelConfig(64, 32, 8, 2),
    ("fwd", "sm80", "lowp", 32): KernelConfig(64, 32, 8, 2),
    ("fwd", "sm80", "lowp", 64): KernelConfig(64, 32, 8, 2),
    ("fwd", "sm90", "fp32", 32): KernelConfig(32, 32, 8, 1),
    ("fwd", "sm90", "fp32", 64): KernelConfig(32, 32, 8, 1),
    ("fwd", "sm90", "lowp", 16): KernelConfig(64, 32, 8, 2),
    ("fwd", "sm90", "lowp", 32): KernelConfig(64, 32, 8, 2),
    ("fwd", "sm90", "lowp", 64): KernelConfig(64, 32, 8, 2),
    ("fwd", "sm90", "lowp", 128): KernelConfig(64, 32, 8, 2),
    ("fwd", "sm90", "lowp", 256): KernelConfig(64, 16, 8, 1),
    ("fwd", "sm80", "lowp", 512): KernelConfig(32, 16, 8, 1),
})

# Calls with dropout: the Philox stream is generated per score in registers (four
# 32-bit words through ten rounds), so tiles hold few scores per thread and pipelines
# are shallow.  Keys as in _WITH_SCORE_MODS; every attention-kernel key has an entry,
# each the first spill-free one of a short candidate list (largest first; on sm_90
# fp16/bf16 the first that also keeps warp-group MMA), compiled with every score
# modifier on (dropout, softcap, ALiBi, a bias and its gradient).
DROPOUT = "dropout"
_WITH_DROPOUT = {
    ("bwd_dkdv", "sm80", "fp32", 16): KernelConfig(16, 32, 8, 1),
    ("bwd_dkdv", "sm80", "fp32", 32): KernelConfig(16, 32, 8, 1),
    ("bwd_dkdv", "sm80", "fp32", 64): KernelConfig(16, 32, 8, 1),
    ("bwd_dkdv", "sm80", "fp32", 128): KernelConfig(16, 16, 8, 1),
    ("bwd_dkdv", "sm80", "fp32", 256): KernelConfig(16, 16, 8, 1),
    ("bwd_dkdv", "sm80", "lowp", 16): KernelConfig(32, 64, 8, 1),
    ("bwd_dkdv", "sm80", "lowp", 32): KernelConfig(16, 64, 8, 1),
    ("bwd_dkdv", "sm80", "lowp", 64): KernelConfig(32, 32, 8, 1),
    ("bwd_dkdv", "sm80", "lowp", 128): KernelConfig(32, 32, 8, 1),
    ("bwd_dkdv", "sm80", "lowp", 256): KernelConfig(16, 16, 8, 1),
    ("bwd_dkdv", "sm90", "fp32", 16): KernelConfig(16, 32, 8, 1),
    ("bwd_dkdv", "sm90", "fp32", 32): KernelConfig(16, 32, 8, 1),
    ("bwd_dkdv", "sm90", "fp32", 64): KernelConfig(16, 16, 8, 1),
    ("bwd_dkdv", "sm90", "fp32", 128): KernelConfig(16, 16, 8, 1),
    ("bwd_dkdv", "sm90", "fp32", 256): KernelConfig(16, 16, 8, 1),
    ("bwd_dkdv", "sm90", "lowp", 16): KernelConfig(32, 64, 8, 1),
    ("bwd_dkdv", "sm90", "lowp", 32): KernelConfig(32, 64, 8, 1),
    ("bwd_dkdv", "sm90", "lowp", 64): KernelConfig(32, 32, 8, 1),
    ("bwd_dkdv", "sm90", "lowp", 128): KernelConfig(32, 32, 8, 1),
    ("bwd_dkdv", "sm90", "lowp", 256): KernelConfig(16, 16, 8, 1),
    ("bwd_dq", "sm80", "fp32", 16): KernelConfig(32, 32, 8, 1),
    ("bwd_dq", "sm80", "fp32", 32): KernelConfig(32, 32, 8, 1),
    ("bwd_dq", "sm80", "fp32", 64): KernelConfig(32, 32, 8, 1),
    ("bwd_dq", "sm80", "fp32", 128): KernelConfig(32, 16, 8, 1),
    ("bwd_dq", "sm80", "fp32", 256): KernelConfig(32, 16, 8, 1),
    ("bwd_dq", "sm80", "lowp", 16): KernelConfig(64, 32, 8, 1),
    ("bwd_dq", "sm80", "lowp", 32): KernelConfig(64, 32, 8, 1),
    ("bwd_dq", "sm80", "lowp", 64): KernelConfig(64, 32, 8, 1),
    ("bwd_dq", "sm80", "lowp", 128): KernelConfig(64, 32, 8, 1),
    ("bwd_dq", "sm80", "lowp", 256): KernelConfig(64, 16, 8, 1),
    ("bwd_dq", "sm90", "fp32", 16): KernelConfig(32, 32, 8, 1),
    ("bwd_dq", "sm90", "fp32", 32): KernelConfig(32, 32, 8, 1),
    ("bwd_dq", "sm90", "fp32", 64): KernelConfig(32, 32, 8, 1),
    ("bwd_dq", "sm90", "fp32", 128): KernelConfig(32, 16, 8, 1),
    ("bwd_dq", "sm90", "fp32", 256): KernelConfig(32, 16, 8, 1),
    ("bwd_dq", "sm90", "lowp", 16): KernelConfig(64, 32, 8, 1),
    ("bwd_dq", "sm90", "lowp", 32): KernelConfig(64, 32, 8, 1),
    ("bwd_dq", "sm90", "lowp", 64): KernelConfig(64, 32, 8, 1),
    ("bwd_dq", "sm90", "lowp", 128): KernelConfig(64, 16, 8, 1),
    ("bwd_dq", "sm90", "lowp", 256): KernelConfig(32, 16, 8, 1),
    ("fwd", "sm80", "fp32", 16): KernelConfig(32, 32, 8, 1),
    ("fwd", "sm80", "fp32", 32): KernelConfig(32, 32, 8, 1),
    ("fwd", "sm80", "fp32", 64): KernelConfig(32, 32, 8, 1),
    ("fwd", "sm80", "fp32", 128): KernelConfig(32, 32, 8, 1),
    ("fwd", "sm80", "fp32", 256): KernelConfig(32, 16, 8, 1),
    ("fwd", "sm80", "lowp", 16): KernelConfig(64, 32, 8, 2),
    ("fwd", "sm80", "lowp", 32): KernelConfig(64, 32, 8, 2),
    ("fwd", "sm80", "lowp", 64): KernelConfig(64, 32, 8, 2),
    ("fwd", "sm80", "lowp", 128): KernelConfig(64, 32, 8, 1),
    ("fwd", "sm80", "lowp", 256): KernelConfig(64, 32, 8, 1),
    ("fwd", "sm90", "fp32", 16): KernelConfig(32, 32, 8, 1),
    ("fwd", "sm90", "fp32", 32): KernelConfig(32, 32, 4, 1),
    ("fwd", "sm90", "fp32", 64): KernelConfig(32, 32, 8, 1),
    ("fwd", "sm90", "fp32", 128): KernelConfig(32, 16, 8, 1),
    ("fwd", "sm90", "fp32", 256): KernelConfig(32, 16, 8, 1),
    ("fwd", "sm90", "lowp", 16): KernelConfig(64, 32, 8, 2),
    ("fwd", "sm90", "lowp", 32): KernelConfig(64, 32, 8, 2),
    ("fwd", "sm90", "lowp", 64): KernelConfig(64, 32, 8, 2),
    ("fwd", "sm90", "lowp", 128): KernelConfig(64, 32, 8, 2),
    ("fwd", "sm90", "lowp", 256): KernelConfig(32, 16, 8, 1),
}
for _arch in ("sm80", "sm90"):  # head dim 512: the smallest tiles of each table above serve dropout too
    _WITH_DROPOUT.update({
        ("fwd", _arch, "lowp", 512): KernelConfig(32, 16, 8, 1),
        ("fwd", _arch, "fp32", 512): KernelConfig(16, 16, 8, 1),
        ("bwd_dkdv", _arch, "lowp", 512): KernelConfig(16, 16, 8, 1),
        ("bwd_dq", _arch, "lowp", 512): KernelConfig(32, 16, 8, 1) if _arch == "sm80" else KernelConfig(16, 16, 8, 1),
    })

# Shipped sm_90 configs that use warp-level mma.sync (HMMA) instead of warp-group
# wgmma (HGMMA), and why; ``True`` in the key marks the softcap/ALiBi table.  The
# static GPU test accepts HMMA only for these.
SM90_MMA_SYNC = {
    ("bwd_dkdv", "lowp", 256, False): "two 64 x 256 fp32 accumulators (dK, dV) plus a 64-row wgmma tile spill "
                                      "registers at every warp count tried (4, 8, 16 warps); 32 x 32 mma.sync "
                                      "tiles do not",
    ("bwd_dkdv", "lowp", 256, True): "as without softcap/ALiBi",
    ("bwd_dkdv", "lowp", 128, True): "with the softcap derivative kept per score, every 64-row wgmma tile tried "
                                     "(16 x 64 at 8 and 16 warps) spills; 32 x 32 mma.sync tiles do not",
    ("bwd_dq", "lowp", 256, True): "with the bias tile and its gradient's store per score, 64 x 16 and 64 x 32 "
                                   "wgmma tiles spill at 8 warps; 32 x 16 mma.sync tiles do not",
}

_DROPOUT_MMA_SYNC = ("with the Philox stream per score, every 64-row warp-group tile tried spilled registers; "
                     "smaller mma.sync tiles do not")
SM90_MMA_SYNC.update({
    ("bwd_dkdv", "lowp", 64, DROPOUT): _DROPOUT_MMA_SYNC,
    ("bwd_dkdv", "lowp", 128, DROPOUT): _DROPOUT_MMA_SYNC,
    ("bwd_dkdv", "lowp", 256, DROPOUT): _DROPOUT_MMA_SYNC,
    ("bwd_dq", "lowp", 256, DROPOUT): _DROPOUT_MMA_SYNC,
    ("fwd", "lowp", 256, DROPOUT): _DROPOUT_MMA_SYNC,
})
_HD512_MMA_SYNC = ("head dim 512: a 64-row warp-group tile spills (fwd 64 x 16: 1760 bytes with dropout; dQ "
                   "64 x 16: 4588; dK/dV 16 x 64: 15728); 16- and 32-row mma.sync tiles do not")
for _kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
    for _mods in (False, True, DROPOUT):
        SM90_MMA_SYNC[(_kernel, "lowp", 512, _mods)] = _HD512_MMA_SYNC

_INTERPRETER = KernelConfig(16, 16, 4, 1)

_overrides = {}


def padded_head_dim(head_dim: int) -> int:
    for bucket in HEAD_DIM_BUCKETS:
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"head dim {head_dim} > {HEAD_DIM_BUCKETS[-1]} is not supported")


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "lowp"


def arch_name(capability) -> str:
    """(major, minor) -> table key; anything newer than Hopper uses the sm90 rows."""
    if capability is None:
        return "interp"
    major = capability[0]
    return "sm90" if major >= 9 else "sm80"


def bucket(head_dim: int, head_dim_v=None) -> int:
    """Table key of a (D, Dv) pair: the larger padded dim (Dv None: Dv = D)."""
    return max(padded_head_dim(head_dim), padded_head_dim(head_dim if head_dim_v is None else head_dim_v))


# Recompiled after the exact softcap tanh (a Taylor branch near 0) added registers to
# every score-modifier specialisation: the first spill-free config of a short candidate
# list (same tile with fewer warps, then smaller tiles), per specialisation.
_BWD_DKDV[("sm90", "fp32", 64)] = KernelConfig(64, 16, 8, 2)
_WITH_SCORE_MODS.update({
    ("fwd", "sm90", "fp32", 64): KernelConfig(32, 32, 4, 1),
    ("fwd", "sm90", "fp32", 512): KernelConfig(16, 16, 16, 1),
    ("bwd_dkdv", "sm90", "fp32", 32): KernelConfig(64, 16, 8, 1),
    ("bwd_dq", "sm90", "lowp", 16): KernelConfig(64, 64, 8, 2),
    ("bwd_dq", "sm90", "lowp", 128): KernelConfig(64, 32, 4, 1),
})
_WITH_DROPOUT.update({
    ("bwd_dkdv", "sm80", "lowp", 16): KernelConfig(32, 32, 8, 1),
    ("bwd_dkdv", "sm90", "fp32", 32): KernelConfig(32, 16, 8, 1),
    ("bwd_dq", "sm80", "fp32", 256): KernelConfig(16, 32, 8, 1),
    ("bwd_dq", "sm90", "fp32", 32): KernelConfig(32, 32, 4, 1),
    ("fwd", "sm90", "fp32", 16): KernelConfig(32, 32, 4, 1),
    ("fwd", "sm90", "fp32", 64): KernelConfig(64, 16, 8, 1),
})
# D != Dv with a padded dim (192/128) where the bucket's config spills: (kernel, arch,
# dtype class, bucket, score_mods) -> config.  16 warps hold the two accumulators.
_PADDED_PAIR = {
    ("bwd_dkdv", "sm90", "fp32", 256, True): KernelConfig(16, 16, 16, 1),
    ("bwd_dkdv", "sm90", "fp32", 256, DROPOUT): KernelConfig(16, 16, 16, 1),
}

# Shipped configs that still spill, with the largest spill (stores + loads, bytes) the
# static report may show and why no candidate avoided it.  Keys: (kernel, arch, dtype
# class, bucket, score_mods).  tests/test_static_gpu.py holds every other config to 0.
KNOWN_SPILLS = {
    ("bwd_dkdv", "sm90", "lowp", 512, DROPOUT): (
        44, "head dim 512 dK/dV with every score modifier and dropout on sm_90: 16 x 16 tiles over 32-wide "
            "head-dim slices spill 44 bytes at 8 warps, 196 at 4 and 1216 at 16; 16-wide slices 52"),
}


# Configs an older Triton's compiler cannot build (its ptxas crashes) or spills registers
# with, replaced for that Triton only, keyed by its (major, minor) and then as KNOWN_SPILLS:
# each the first spill-free config of a short search (fewer stages, more or fewer warps,
# halved tiles; on sm_90 fp16/bf16 keeping warp-group MMA where the shipped config has it)
# run with the static report under every Triton from 3.4 to 3.8
# (docs/gpu-verification.md, benches/results/static_gpu_versions.json).  Among them: 64 x 32
# at 8 warps crashes Triton 3.7's ptxas (SIGSEGV) at head dim 16 with dropout, and 3.8's at
# head dim 64; 4 warps, resp. one stage, compile there.
_BY_TRITON = {
    (3, 4): {
        ("bwd_dkdv", "sm80", "fp32", 16, True): KernelConfig(64, 32, 8, 1),
        ("bwd_dkdv", "sm80", "fp32", 64, False): KernelConfig(32, 64, 16, 1),
        ("bwd_dkdv", "sm80", "fp32", 64, True): KernelConfig(16, 32, 16, 1),
        ("bwd_dkdv", "sm80", "lowp", 128, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 128, False): KernelConfig(64, 32, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 128, True): KernelConfig(16, 32, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 16, DROPOUT): KernelConfig(16, 16, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 16, False): KernelConfig(64, 64, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 256, False): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 256, True): KernelConfig(16, 16, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 32, False): KernelConfig(32, 64, 8, 2),
        ("bwd_dkdv", "sm80", "lowp", 32, True): KernelConfig(16, 64, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 64, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 64, True): KernelConfig(64, 32, 8, 1),
        ("bwd_dkdv", "sm90", "fp32", 32, True): KernelConfig(64, 16, 16, 1),
        ("bwd_dkdv", "sm90", "fp32", 64, False): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 128, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 16, False): KernelConfig(64, 64, 4, 1),
        ("bwd_dkdv", "sm90", "lowp", 32, False): KernelConfig(64, 64, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 64, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 64, False): KernelConfig(32, 64, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 64, True): KernelConfig(16, 64, 8, 1),
        ("bwd_dq", "sm80", "lowp", 128, DROPOUT): KernelConfig(64, 16, 8, 1),
        ("bwd_dq", "sm80", "lowp", 128, True): KernelConfig(64, 32, 8, 1),
        ("bwd_dq", "sm80", "lowp", 16, True): KernelConfig(64, 32, 8, 2),
        ("bwd_dq", "sm80", "lowp", 256, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dq", "sm80", "lowp", 512, DROPOUT): KernelConfig(16, 16, 8, 1),
        ("bwd_dq", "sm80", "lowp", 512, False): KernelConfig(16, 16, 8, 1),
        ("bwd_dq", "sm80", "lowp", 512, True): KernelConfig(16, 16, 8, 1),
        ("bwd_dq", "sm80", "lowp", 64, True): KernelConfig(64, 32, 8, 1),
        ("bwd_dq", "sm90", "fp32", 256, DROPOUT): KernelConfig(32, 16, 16, 1),
        ("bwd_dq", "sm90", "fp32", 32, DROPOUT): KernelConfig(32, 32, 8, 1),
        ("bwd_dq", "sm90", "lowp", 256, False): KernelConfig(64, 16, 8, 2),
        ("bwd_dq", "sm90", "lowp", 32, True): KernelConfig(64, 64, 8, 2),
        ("bwd_dq", "sm90", "lowp", 64, True): KernelConfig(64, 64, 8, 1),
        ("fwd", "sm80", "fp32", 256, DROPOUT): KernelConfig(32, 16, 16, 1),
        ("fwd", "sm80", "lowp", 128, True): KernelConfig(128, 16, 8, 2),
        ("fwd", "sm80", "lowp", 256, DROPOUT): KernelConfig(64, 16, 8, 1),
        ("fwd", "sm80", "lowp", 512, False): KernelConfig(32, 16, 8, 1),
        ("fwd", "sm90", "fp32", 256, DROPOUT): KernelConfig(32, 16, 16, 1),
        ("fwd", "sm90", "fp32", 256, False): KernelConfig(32, 16, 16, 1),
        ("fwd", "sm90", "fp32", 256, True): KernelConfig(32, 16, 16, 1),
    },
    (3, 5): {
        ("bwd_dkdv", "sm80", "fp32", 16, True): KernelConfig(32, 64, 8, 1),
        ("bwd_dkdv", "sm80", "fp32", 256, False): KernelConfig(16, 16, 16, 1),
        ("bwd_dkdv", "sm80", "fp32", 32, False): KernelConfig(32, 32, 16, 1),
        ("bwd_dkdv", "sm80", "fp32", 64, False): KernelConfig(32, 64, 16, 1),
        ("bwd_dkdv", "sm80", "fp32", 64, True): KernelConfig(16, 32, 16, 1),
        ("bwd_dkdv", "sm80", "lowp", 128, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 128, True): KernelConfig(16, 32, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 16, False): KernelConfig(64, 64, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 256, True): KernelConfig(16, 16, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 32, False): KernelConfig(32, 64, 8, 2),
        ("bwd_dkdv", "sm80", "lowp", 32, True): KernelConfig(16, 64, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 64, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm90", "fp32", 128, True): KernelConfig(16, 32, 8, 1),
        ("bwd_dkdv", "sm90", "fp32", 64, False): KernelConfig(64, 16, 16, 1),
        ("bwd_dkdv", "sm90", "lowp", 128, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 16, False): KernelConfig(64, 64, 4, 1),
        ("bwd_dkdv", "sm90", "lowp", 32, False): KernelConfig(64, 64, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 32, True): KernelConfig(32, 64, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 64, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 64, False): KernelConfig(32, 64, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 64, True): KernelConfig(16, 64, 8, 1),
        ("bwd_dq", "sm80", "fp32", 256, False): KernelConfig(16, 16, 16, 1),
        ("bwd_dq", "sm80", "lowp", 16, True): KernelConfig(64, 32, 8, 2),
        ("bwd_dq", "sm80", "lowp", 256, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dq", "sm90", "fp32", 32, True): KernelConfig(32, 32, 8, 1),
        ("bwd_dq", "sm90", "fp32", 64, False): KernelConfig(32, 32, 8, 1),
        ("bwd_dq", "sm90", "fp32", 64, True): KernelConfig(32, 32, 4, 2),
        ("bwd_dq", "sm90", "lowp", 32, True): KernelConfig(64, 64, 8, 2),
        ("bwd_dq", "sm90", "lowp", 64, True): KernelConfig(64, 64, 8, 1),
        ("fwd", "sm80", "fp32", 512, False): KernelConfig(16, 16, 16, 1),
        ("fwd", "sm90", "fp32", 128, DROPOUT): KernelConfig(32, 16, 16, 1),
    },
    (3, 6): {
        ("bwd_dkdv", "sm80", "fp32", 16, True): KernelConfig(32, 64, 8, 1),
        ("bwd_dkdv", "sm80", "fp32", 32, False): KernelConfig(32, 32, 4, 1),
        ("bwd_dkdv", "sm80", "fp32", 64, False): KernelConfig(32, 64, 16, 1),
        ("bwd_dkdv", "sm80", "fp32", 64, True): KernelConfig(16, 32, 16, 1),
        ("bwd_dkdv", "sm80", "lowp", 128, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 16, False): KernelConfig(64, 64, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 32, False): KernelConfig(32, 64, 8, 2),
        ("bwd_dkdv", "sm80", "lowp", 32, True): KernelConfig(16, 64, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 64, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm90", "fp32", 128, True): KernelConfig(16, 32, 8, 1),
        ("bwd_dkdv", "sm90", "fp32", 64, False): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 128, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 16, False): KernelConfig(64, 64, 4, 1),
        ("bwd_dkdv", "sm90", "lowp", 32, False): KernelConfig(64, 64, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 64, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 64, False): KernelConfig(32, 64, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 64, True): KernelConfig(16, 64, 8, 1),
        ("bwd_dq", "sm80", "fp32", 64, DROPOUT): KernelConfig(32, 32, 16, 1),
        ("bwd_dq", "sm80", "fp32", 64, False): KernelConfig(32, 16, 4, 1),
        ("bwd_dq", "sm80", "lowp", 256, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dq", "sm90", "lowp", 256, False): KernelConfig(64, 16, 8, 2),
        ("bwd_dq", "sm90", "lowp", 32, True): KernelConfig(64, 64, 8, 2),
        ("fwd", "sm80", "fp32", 512, False): KernelConfig(16, 16, 16, 1),
    },
    (3, 7): {
        ("bwd_dkdv", "sm80", "fp32", 16, True): KernelConfig(64, 32, 8, 1),
        ("bwd_dkdv", "sm80", "fp32", 64, True): KernelConfig(16, 32, 16, 1),
        ("bwd_dkdv", "sm80", "lowp", 128, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm80", "lowp", 32, True): KernelConfig(16, 64, 8, 1),
        ("bwd_dkdv", "sm90", "fp32", 128, False): KernelConfig(16, 16, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 128, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 32, True): KernelConfig(32, 64, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 64, False): KernelConfig(32, 64, 8, 1),
        ("bwd_dq", "sm80", "fp32", 256, True): KernelConfig(16, 16, 16, 1),
        ("bwd_dq", "sm80", "lowp", 256, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dq", "sm90", "fp32", 32, False): KernelConfig(32, 32, 8, 1),
        ("bwd_dq", "sm90", "lowp", 256, False): KernelConfig(64, 16, 8, 2),
        ("bwd_dq", "sm90", "lowp", 32, True): KernelConfig(64, 64, 8, 2),
        ("bwd_dq", "sm90", "lowp", 64, DROPOUT): KernelConfig(64, 32, 4, 1),
        ("fwd", "sm80", "lowp", 128, True): KernelConfig(128, 32, 8, 1),
        ("fwd", "sm80", "lowp", 256, DROPOUT): KernelConfig(64, 16, 8, 1),
        ("fwd", "sm90", "fp32", 256, True): KernelConfig(32, 16, 16, 1),
        ("fwd", "sm90", "lowp", 16, DROPOUT): KernelConfig(64, 32, 4, 2),
    },
    (3, 8): {
        ("bwd_dkdv", "sm80", "lowp", 512, False): KernelConfig(16, 16, 16, 1),
        ("bwd_dkdv", "sm90", "fp32", 128, False): KernelConfig(16, 16, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 128, DROPOUT): KernelConfig(32, 16, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 16, DROPOUT): KernelConfig(16, 64, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 32, DROPOUT): KernelConfig(16, 64, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 32, True): KernelConfig(32, 64, 8, 1),
        ("bwd_dkdv", "sm90", "lowp", 64, False): KernelConfig(32, 64, 8, 1),
        ("bwd_dq", "sm90", "lowp", 256, False): KernelConfig(64, 16, 8, 2),
        ("bwd_dq", "sm90", "lowp", 32, True): KernelConfig(64, 64, 8, 2),
        ("fwd", "sm90", "lowp", 64, DROPOUT): KernelConfig(64, 32, 8, 1),
    },
}


# Configs that still spill under an older Triton (no candidate of the search avoided it),
# keyed as _BY_TRITON, with the most bytes the static report may show there.
_NO_CANDIDATE = "no candidate of the version's config search (tiles halved, stages, warps) avoided it"
_KNOWN_SPILLS_BY_TRITON = {
    (3, 4): {
        ("bwd_dkdv", "sm80", "lowp", 256, DROPOUT): (60, _NO_CANDIDATE),
        ("bwd_dkdv", "sm80", "lowp", 32, DROPOUT): (540, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "fp32", 256, DROPOUT): (72, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 16, DROPOUT): (1220, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 256, DROPOUT): (36, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 32, DROPOUT): (1432, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 32, True): (1928, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 512, DROPOUT): (52, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 512, True): (12, _NO_CANDIDATE),
        ("decode_split", "sm90", "fp32", 256, False): (652, _NO_CANDIDATE),
        ("decode_split", "sm90", "fp32", 256, True): (668, _NO_CANDIDATE),
        ("decode_split", "sm90", "fp32", 512, False): (40, _NO_CANDIDATE),
        ("decode_split", "sm90", "fp32", 64, False): (264, _NO_CANDIDATE),
        ("decode_split", "sm90", "fp32", 64, True): (264, _NO_CANDIDATE),
        ("decode_split", "sm80", "lowp", 512, "fp8"): (28, _NO_CANDIDATE),
    },
    (3, 5): {
        ("bwd_dkdv", "sm80", "lowp", 16, DROPOUT): (232, _NO_CANDIDATE),
        ("bwd_dkdv", "sm80", "lowp", 256, DROPOUT): (20, _NO_CANDIDATE),
        ("bwd_dkdv", "sm80", "lowp", 32, DROPOUT): (416, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "fp32", 256, DROPOUT): (12, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 16, DROPOUT): (280, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 32, DROPOUT): (468, _NO_CANDIDATE),
        ("decode_split", "sm80", "fp32", 512, False): (96, _NO_CANDIDATE),
    },
    (3, 6): {
        ("bwd_dkdv", "sm80", "lowp", 16, DROPOUT): (1316, _NO_CANDIDATE),
        ("bwd_dkdv", "sm80", "lowp", 256, DROPOUT): (28, _NO_CANDIDATE),
        ("bwd_dkdv", "sm80", "lowp", 32, DROPOUT): (432, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "fp32", 256, DROPOUT): (28, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 16, DROPOUT): (1584, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 32, DROPOUT): (1792, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 32, True): (1724, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 512, DROPOUT): (24, _NO_CANDIDATE),
        ("fwd", "sm90", "fp32", 256, True): (12, _NO_CANDIDATE),
    },
    (3, 7): {
        ("bwd_dkdv", "sm80", "lowp", 16, DROPOUT): (968, _NO_CANDIDATE),
        ("bwd_dkdv", "sm80", "lowp", 32, DROPOUT): (292, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "fp32", 256, DROPOUT): (52, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 16, DROPOUT): (924, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 32, DROPOUT): (1228, _NO_CANDIDATE),
        ("bwd_dkdv", "sm90", "lowp", 512, True): (36, _NO_CANDIDATE),
        ("decode_split", "sm80", "fp32", 64, False): (16, _NO_CANDIDATE),
        ("decode_split", "sm80", "fp32", 64, True): (16, _NO_CANDIDATE),
    },
    (3, 8): {
        ("bwd_dkdv", "sm90", "fp32", 256, DROPOUT): (12, _NO_CANDIDATE),
        ("fwd", "sm90", "fp32", 256, DROPOUT): (12, _NO_CANDIDATE),
    },
}


def known_spills():
    """KNOWN_SPILLS with the running Triton's own (tests/test_static_gpu.py holds every other
    config to 0 spill bytes)."""
    return {**KNOWN_SPILLS, **_KNOWN_SPILLS_BY_TRITON.get(triton_minor(), {})}


@functools.lru_cache(maxsize=None)
def triton_minor():
    """(major, minor) of the running Triton, or None without one."""
    try:
        import triton
    except ImportError:
        return None
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return major, minor


def _for_this_triton(kernel, arch, dclass, hd, score_mods, cfg):
    mods = DROPOUT if score_mods == DROPOUT else bool(score_mods)
    return _BY_TRITON.get(triton_minor(), {}).get((kernel, arch, dclass, hd, mods), cfg)


def _lookup(table, kernel, head_dim, dtype, capability, score_mods=False, head_dim_v=None):
    if kernel in _overrides:
        return _overrides[kernel]
    arch = arch_name(capability)
    if arch == "interp":
        return _INTERPRETER
    key = (arch, dtype_class(dtype), bucket(head_dim, head_dim_v))
    if score_mods == DROPOUT and (kernel, *key) in _WITH_DROPOUT:
        cfg = _WITH_DROPOUT[(kernel, *key)]
    elif score_mods and (kernel, *key) in _WITH_SCORE_MODS:
        cfg = _WITH_SCORE_MODS[(kernel, *key)]
    else:
        cfg = table[key]
    cfg = _for_this_triton(kernel, *key, score_mods, cfg)
    pair_key = (kernel, *key, DROPOUT if score_mods == DROPOUT else bool(score_mods))
    if _padded_pair(head_dim, head_dim_v) and pair_key in _PADDED_PAIR:
        return _PADDED_PAIR[pair_key]
    if _padded_pair(head_dim, head_dim_v) and cfg.num_stages > 1:
        # D != Dv with a padded dim (DeepSeek's 192/128): the 256 configs pipelined over two
        # stages spill on sm_80 (fwd 64 x 32: 1420 bytes, ptxas settles at 128 registers);
        # one stage does not (157 registers)
        cfg = dataclasses.replace(cfg, num_stages=1)
    return cfg


def _padded_pair(head_dim, head_dim_v):
    return (head_dim_v is not None and head_dim_v != head_dim
            and (padded_head_dim(head_dim) != head_dim or padded_head_dim(head_dim_v) != head_dim_v))


def fwd_config(head_dim: int, dtype: torch.dtype, capability=None, score_mods=False,
              head_dim_v=None) -> KernelConfig:
    """Config of ``fwd_kernel``; ``capability`` None means the CPU interpreter;
    ``score_mods``: the call uses softcap or ALiBi."""
    return _lookup(_FWD, "fwd", head_dim, dtype, capability, score_mods, head_dim_v)


def bwd_dkdv_config(head_dim: int, dtype: torch.dtype, capability=None, score_mods=False,
                   head_dim_v=None) -> KernelConfig:
    """Config of ``bwd_dkdv_kernel``."""
    return _lookup(_BWD_DKDV, "bwd_dkdv", head_dim, dtype, capability, score_mods, head_dim_v)


def dkdv_passes(head_dim: int, head_dim_v=None):
    """(WRITE_DK, WRITE_DV) of each launch of ``bwd_dkdv_kernel``: one pass for both, or,
    from a padded dim of 512, a dK pass and a dV pass (two (BLOCK_N, 512) fp32
    accumulators beside the K, V, Q and dO tiles spill even at 16 x 16 tiles)."""
    if bucket(head_dim, head_dim_v) >= 512:
        return ((True, False), (False, True))
    return ((True, True),)


# Head-dim slice width of the two-pass dK/dV kernel, where 64 spills: (arch, score_mods).
# Measured at 512: 64-wide slices spill 92-128 bytes with softcap/ALiBi/bias and 144 with
# dropout on sm_90; 32-wide slices spill 40-160 bytes without modifiers and 36 with
# dropout on sm_80, 0 with softcap/ALiBi/bias, 44 with dropout on sm_90 (KNOWN_SPILLS).
_DKDV_CHUNK = {("sm80", True): 32, ("sm90", True): 32, ("sm90", DROPOUT): 32}


def dkdv_chunks(head_dim: int, head_dim_v=None, score_mods=False, capability=None):
    """(CHUNK_D, CHUNK_DV) of ``bwd_dkdv_kernel``: 0 (K and V tiles kept in registers), or
    with two passes head-dim slices 64 wide (32 where ``_DKDV_CHUNK`` says; at most the padded dim)."""
    if len(dkdv_passes(head_dim, head_dim_v)) == 1:
        return 0, 0
    arch = arch_name(capability)
    width = _DKDV_CHUNK.get((arch, DROPOUT if score_mods == DROPOUT else bool(score_mods)), 64)
    return (min(width, padded_head_dim(head_dim)),
            min(width, padded_head_dim(head_dim if head_dim_v is None else head_dim_v)))


def bwd_dq_config(head_dim: int, dtype: torch.dtype, capability=None, score_mods=False,
                 head_dim_v=None) -> KernelConfig:
    """Config of ``bwd_dq_kernel`` (and of the preprocess kernel, which shares its BLOCK_M)."""
    return _lookup(_BWD_DQ, "bwd_dq", head_dim, dtype, capability, score_mods, head_dim_v)


KERNELS = {"fwd": "fwd_kernel", "bwd_dkdv": "bwd_dkdv_kernel", "bwd_dq": "bwd_dq_kernel"}


def shipped_configs(score_mods=False):
    """Every (table, arch, dtype class, padded head dim, config) a call can use; with
    ``score_mods`` True, the configs of calls with softcap, ALiBi or a bias; with
    ``score_mods == DROPOUT``, those of calls with dropout (attention kernels only)."""
    if score_mods == DROPOUT:
        for (name, arch, dclass, hd), cfg in sorted(_WITH_DROPOUT.items()):
            yield name, arch, dclass, hd, _for_this_triton(name, arch, dclass, hd, DROPOUT, cfg)
        return
    for name, table in (("fwd", _FWD), ("bwd_dkdv", _BWD_DKDV), ("bwd_dq", _BWD_DQ), *_DECODE_TABLES):
        for (arch, dclass, hd), cfg in sorted(table.items()):
            if score_mods:
                cfg = _WITH_SCORE_MODS.get((name, arch, dclass, hd), cfg)
            yield name, arch, dclass, hd, _for_this_triton(name, arch, dclass, hd, score_mods, cfg)


@contextlib.contextmanager
def override(kernel: str, config: KernelConfig):
    """Temporarily force the config of ``kernel`` ("fwd", "bwd_dkdv" or "bwd_dq")."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    previous = _overrides.get(kernel)
    _overrides[kernel] = config
    try:
        yield
    finally:
        if previous is None:
            _overrides.pop(kernel, None)
        else:
            _overrides[kernel] = previous


# ------------------------------------------------------------------ KV-cache decoding
# decode_split_kernel (triton_kernels/decode.py): block_m rows = the query rows of one GQA
# group (group x seqlen_q, usually a handful), so 16, the smallest tl.dot tile; block_n
# cache positions per step, as many as fit: decoding streams the cache once and is bound
# by memory, not by the products.  combine_kernel: block_n = splits merged per step
# (block_m unused).  16-row tiles are below sm_90's 64-row warp-group MMA, so the split
# kernel uses mma.sync there (listed in SM90_MMA_SYNC below).
_DECODE_SPLIT = {}
for _arch in ("sm80", "sm90"):
    _DECODE_SPLIT.update({
        (_arch, "lowp", 16): KernelConfig(16, 128, 4, 3),
        (_arch, "lowp", 32): KernelConfig(16, 128, 4, 3),
        (_arch, "lowp", 64): KernelConfig(16, 128, 4, 3),
        (_arch, "lowp", 128): KernelConfig(16, 64, 4, 3),
        (_arch, "lowp", 256): KernelConfig(16, 64, 8, 2),
        (_arch, "fp32", 16): KernelConfig(16, 128, 4, 2),
        (_arch, "fp32", 32): KernelConfig(16, 64, 4, 2),
        (_arch, "fp32", 64): KernelConfig(16, 64, 4, 2),
        (_arch, "fp32", 128): KernelConfig(16, 32, 4, 2),
        (_arch, "fp32", 256): KernelConfig(16, 32, 8, 2),
        (_arch, "lowp", 512): KernelConfig(16, 32, 8, 1),
        (_arch, "fp32", 512): KernelConfig(16, 16, 8, 1),
        # absorbed MLA (query/key 576 = 512 + 64-wide tail, values 512)
        (_arch, "lowp", 576): KernelConfig(16, 32, 8, 1),
        (_arch, "fp32", 576): KernelConfig(16, 16, 8, 1),
    })
# head dim 512 (not absorbed MLA's 576, which reads it as 512 + 64): 16 x 32 spills
# (12-40 bytes), so 16-key tiles, and 16 warps for sm_90 fp32
for _arch in ("sm80", "sm90"):
    _DECODE_SPLIT[(_arch, "lowp", 512)] = KernelConfig(16, 16, 8, 1)
_DECODE_SPLIT[("sm90", "fp32", 512)] = KernelConfig(16, 16, 16, 1)
# sm_90 fp32: the sm_80 configs spill there (1120 and 56 bytes); these do not
_DECODE_SPLIT[("sm90", "fp32", 128)] = KernelConfig(16, 32, 8, 2)
_DECODE_SPLIT[("sm90", "fp32", 256)] = KernelConfig(16, 32, 8, 1)
_COMBINE = {(arch, dclass, hd): KernelConfig(1, 16, 4 if hd <= 128 else 8, 1)
            for arch in ("sm80", "sm90") for dclass in ("lowp", "fp32") for hd in HEAD_DIM_BUCKETS}
_DECODE_TABLES = (("decode_split", _DECODE_SPLIT), ("combine", _COMBINE))
KERNELS.update(decode_split="decode_split_kernel", combine="combine_kernel")
# kernels without a matrix product (no tensor-core instructions to expect)
ELEMENTWISE_KERNELS = ("combine",)
for _hd in (*HEAD_DIM_BUCKETS, 576):
    for _mods in (False, True, "int8", "fp8"):  # (and reading 8-bit caches: the static report's variants)
        SM90_MMA_SYNC[("decode_split", "lowp", _hd, _mods)] = (
            "16-row tiles (the query rows of one GQA group while decoding) are below the 64 rows of a warp-group "
            "MMA; padding them to 64 would multiply the product work by 4 for no gain in a memory-bound kernel")

# The interpreter: 16-key tiles and 2 splits merged per combine step, so tiny test
# shapes cross tiles, pages and combine steps.
_INTERPRETER_COMBINE = KernelConfig(1, 2, 4, 1)


# Decoding reads a query/key head dim above 512 (absorbed MLA: 576 = 512 latent + 64 rope
# dims) as a 512-wide tile plus a 64-wide tail, so its table key is 576.
DECODE_TAIL = 64
MAX_DECODE_HEAD_DIM = HEAD_DIM_BUCKETS[-1] + DECODE_TAIL


def decode_qk_tiles(head_dim: int):
    """(BLOCK_D, BLOCK_DT) of ``decode_split_kernel``: one padded tile, or 512 plus a 64 tail."""
    if head_dim <= HEAD_DIM_BUCKETS[-1]:
        return padded_head_dim(head_dim), 0
    if head_dim > MAX_DECODE_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} > {MAX_DECODE_HEAD_DIM} is not supported when decoding")
    return HEAD_DIM_BUCKETS[-1], DECODE_TAIL


# The (kernel table, D, Dv) pairs ``static_report --mla`` compiles: DeepSeek's 192/128 and
# 512/512 attention, absorbed-MLA decoding 576/512 (and its combine, 512 wide).
MLA_HEAD_DIMS = (("fwd", 192, 128), ("bwd_dkdv", 192, 128), ("bwd_dq", 192, 128),
                 ("fwd", 512, 512), ("bwd_dkdv", 512, 512), ("bwd_dq", 512, 512),
                 ("decode_split", 576, 512), ("combine", 576, 512))


# Decoding from 8-bit caches (decode_split_kernel's QUANT > 0): the codes widened to q's
# dtype take registers beside the tile, and where the float cache's config then spills
# (Triton 3.9, int8 or e4m3: fp32 queries at 64-256 by 500-8800 bytes; bf16/fp16 at 16 on
# sm_80, 64 on sm_90, 512/576 on sm_80) these replace it: the first config without spills,
# for both code types, among one stage, twice the warps and half or a quarter of the keys
# (compiled by flashattn_lite.static_report, its "int8"/"fp8" rows).
_DECODE_SPLIT_QUANT = {
    ("sm80", "fp32", 64): KernelConfig(16, 64, 4, 1),
    ("sm80", "fp32", 128): KernelConfig(16, 32, 8, 1),
    ("sm80", "fp32", 256): KernelConfig(16, 32, 16, 1),
    ("sm80", "fp32", 512): KernelConfig(16, 16, 16, 1),
    ("sm80", "lowp", 16): KernelConfig(16, 128, 4, 1),
    ("sm80", "lowp", 512): KernelConfig(16, 16, 16, 1),
    ("sm80", "lowp", MAX_DECODE_HEAD_DIM): KernelConfig(16, 16, 8, 1),
    ("sm90", "fp32", 64): KernelConfig(16, 64, 4, 1),
    ("sm90", "fp32", 128): KernelConfig(16, 32, 8, 1),
    ("sm90", "lowp", 64): KernelConfig(16, 128, 4, 1),
}


# The same for an older Triton, whose compiler spills where these do not: per (major, minor),
# the first spill-free config for both code types of the same search, run with that
# Triton (benches/results/static_gpu_versions.json); where none was found, the candidate
# with the fewest spill bytes (or the config above) is used and its bytes are in
# _KNOWN_SPILLS_BY_TRITON (mods "int8" / "fp8").
_DECODE_SPLIT_QUANT_BY_TRITON = {
    (3, 4): {
        ("sm80", "fp32", 64): KernelConfig(16, 64, 8, 1),
        ("sm80", "fp32", 512): KernelConfig(16, 16, 8, 1),
        ("sm80", "lowp", 128): KernelConfig(16, 64, 8, 3),
        ("sm80", "lowp", 512): KernelConfig(16, 16, 8, 1),
        ("sm90", "fp32", 256): KernelConfig(16, 32, 16, 1),
        ("sm90", "fp32", MAX_DECODE_HEAD_DIM): KernelConfig(16, 16, 16, 1),
        ("sm90", "lowp", MAX_DECODE_HEAD_DIM): KernelConfig(16, 16, 8, 1),
    },
    (3, 5): {
        ("sm80", "fp32", 128): KernelConfig(16, 32, 16, 1),
        ("sm90", "lowp", 64): KernelConfig(16, 128, 8, 1),
        ("sm90", "lowp", 256): KernelConfig(16, 64, 8, 1),
    },
    (3, 6): {
        ("sm80", "lowp", 256): KernelConfig(16, 64, 8, 1),
        ("sm90", "fp32", 128): KernelConfig(16, 32, 16, 1),
    },
    (3, 7): {
        ("sm80", "fp32", 128): KernelConfig(16, 32, 16, 1),
        ("sm80", "lowp", 256): KernelConfig(16, 64, 8, 1),
        ("sm90", "fp32", 128): KernelConfig(16, 32, 16, 1),
        ("sm90", "lowp", 256): KernelConfig(16, 64, 8, 1),
    },
    (3, 8): {
        ("sm80", "lowp", 16): KernelConfig(16, 64, 4, 1),
    },
}


def _quant_decode(arch, dclass, hd, cfg):
    """The decode config reading an 8-bit cache: the running Triton's own, else
    _DECODE_SPLIT_QUANT's, else the float cache's ``cfg``."""
    own = _DECODE_SPLIT_QUANT_BY_TRITON.get(triton_minor(), {}).get((arch, dclass, hd))
    return own or _DECODE_SPLIT_QUANT.get((arch, dclass, hd), cfg)


def decode_split_config(head_dim: int, dtype: torch.dtype, capability=None, score_mods=False,
                        head_dim_v=None, quant=False) -> KernelConfig:
    """Config of ``decode_split_kernel``; ``quant``: reading an 8-bit cache."""
    if head_dim > HEAD_DIM_BUCKETS[-1]:
        decode_qk_tiles(head_dim)  # range check
        if "decode_split" in _overrides:
            return _overrides["decode_split"]
        if arch_name(capability) == "interp":
            return _INTERPRETER
        key = (arch_name(capability), dtype_class(dtype), MAX_DECODE_HEAD_DIM)
        return _quant_decode(*key, _DECODE_SPLIT[key]) if quant else _DECODE_SPLIT[key]
    cfg = _lookup(_DECODE_SPLIT, "decode_split", head_dim, dtype, capability, score_mods, head_dim_v)
    if quant and "decode_split" not in _overrides and arch_name(capability) != "interp":
        cfg = _quant_decode(arch_name(capability), dtype_class(dtype), bucket(head_dim, head_dim_v), cfg)
    return cfg


def quant_decode_configs():
    """(arch, dtype class, head dim, config) of every decode config an 8-bit cache can use."""
    for (arch, dclass, hd), cfg in sorted(_DECODE_SPLIT.items()):
        yield arch, dclass, hd, _quant_decode(arch, dclass, hd, cfg)


def combine_config(head_dim: int, dtype: torch.dtype, capability=None) -> KernelConfig:
    """Config of ``combine_kernel`` (block_n = splits merged per step)."""
    if "combine" not in _overrides and arch_name(capability) == "interp":
        return _INTERPRETER_COMBINE
    return _lookup(_COMBINE, "combine", head_dim, dtype, capability)
