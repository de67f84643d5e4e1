"""Launches the Triton kernels of ``flashattn_lite.triton_kernels``.

Serves CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` (Triton's
interpreter; that is how the kernels are tested without a GPU).  Kernel modules
are imported on first use only, so importing flashattn_lite never initialises
Triton's GPU driver.
"""

import contextlib
import functools
import importlib.util
import os

import torch

from .base import missing_features

NAME = "triton"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FEATURES = ("forward", "backward", "causal", "window", "gqa", "fp16", "bf16", "fp32", "softcap", "alibi")


def interpreter_enabled():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available():
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, "triton on CUDA"
    if interpreter_enabled():
        return True, "triton interpreter on CPU tensors (TRITON_INTERPRET=1)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"


def supports(call):
    """None if this backend can serve ``call``, else the reason it cannot."""
    ok, why = available()
    if not ok:
        return why
    if not (call.device.type == "cuda" or (call.device.type == "cpu" and interpreter_enabled())):
        return f"tensors on {call.device.type}; triton needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"
    if call.dtype not in _DTYPES:
        return f"dtype {call.dtype} is not supported by triton (fp16, bf16, fp32)"
    missing = missing_features(call, FEATURES)
    return f"triton {missing}" if missing else None


def patch_interpreter_bf16_dot():
    """Work around Triton's CPU interpreter multiplying bf16 ``tl.dot`` operands as raw
    uint16 bits: widen bf16 operands to fp32 (exact) first, as tensor cores do.

    Touches only the interpreter (never GPU code generation) and is idempotent; it
    is applied whenever the kernels are first used under TRITON_INTERPRET=1.
    """
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_flashattn_lite_bf16_patch", False):
        return
    original = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar == interpreter.tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, interpreter.tl.float32)
        return handle

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, widen(a), widen(b), d, *args, **kwargs)

    builder.create_dot = create_dot
    builder._flashattn_lite_bf16_patch = True


@functools.lru_cache(maxsize=None)
def _kernels():
    if interpreter_enabled():
        patch_interpreter_bf16_dot()
    from flashattn_lite.triton_kernels import attention, configs
    return attention, configs


def _capability(device):
    return None if device.type == "cpu" else torch.cuda.get_device_capability(device)


def _dot_precision(dtype):
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _common(q, k, softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes, cfg, configs):
    head_dim = q.shape[3]
    block_d = configs.padded_head_dim(head_dim)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    # bounds past both sequences act as unbounded; clamping keeps the kernels' int32 sums in range
    reach = seqlen_q + seqlen_k + abs(diag_offset)
    args = dict(seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim, group=q.shape[2] // k.shape[2],
                offset=diag_offset, left=min(max(window_left, 0), reach), right=min(max(window_right, 0), reach),
                qk_scale=softmax_scale * 1.4426950408889634,
                softcap_pre=softmax_scale / softcap if softcap > 0 else 0.0,
                softcap_post=softcap * 1.4426950408889634,
                ALIBI=alibi_slopes if alibi_slopes is not None else q,  # a dummy pointer when unused
                stride_ab=alibi_slopes.stride(0) if alibi_slopes is not None else 0,
                stride_ah=alibi_slopes.stride(1) if alibi_slopes is not None else 0)
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                EVEN_M=seqlen_q % cfg.block_m == 0, EVEN_N=seqlen_k % cfg.block_n == 0,
                PAD_D=head_dim != block_d, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
                HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
                DOT_PRECISION=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return args, meta


_GRID_YZ_LIMIT = 65535  # CUDA grid dims y and z carry heads and batch


def _check_grid(batch, heads):
    if batch > _GRID_YZ_LIMIT or heads > _GRID_YZ_LIMIT:
        raise ValueError(f"triton backend: batch ({batch}) and heads ({heads}) must each be <= {_GRID_YZ_LIMIT}")


def _on_device(t):
    """Launch on the tensors' GPU, not on whichever one is current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _s(t):
    """(batch, seq, head) strides of a (B, S, H, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def fwd(q, k, v, p):
    softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes = (
        p.softmax_scale, p.diag_offset, p.window_left, p.window_right, p.softcap, p.alibi_slopes)
    attention, configs = _kernels()
    batch, seqlen_q, heads, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    _check_grid(batch, heads)
    mods = softcap > 0 or alibi_slopes is not None
    cfg = configs.fwd_config(q.shape[3], q.dtype, _capability(q.device), mods)
    args, meta = _common(q, k, softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes, cfg,
                         configs)
    grid = (triton_cdiv(seqlen_q, cfg.block_m), heads, batch)
    with _on_device(q):
        attention.fwd_kernel[grid](q, k, v, out, lse, *_s(q), *_s(k), *_s(v), *_s(out), lse.stride(0),
                                   lse.stride(1), **args, **meta)
    return out, lse


def triton_cdiv(a, b):
    return (a + b - 1) // b


def bwd(dout, dlse, q, k, v, out, lse, p, bias_grad, deterministic):
    softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes = (
        p.softmax_scale, p.diag_offset, p.window_left, p.window_right, p.softcap, p.alibi_slopes)
    attention, configs = _kernels()
    batch, seqlen_q, heads, head_dim = q.shape
    heads_k = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), None
    _check_grid(batch, heads)
    capability = _capability(q.device)
    window = (softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes)
    mods = softcap > 0 or alibi_slopes is not None
    dq_cfg = configs.bwd_dq_config(head_dim, q.dtype, capability, mods)
    dkdv_cfg = configs.bwd_dkdv_config(head_dim, q.dtype, capability, mods)
    dq_args, dq_meta = _common(q, k, *window, dq_cfg, configs)
    dkdv_args, dkdv_meta = _common(q, k, *window, dkdv_cfg, configs)
    delta = torch.empty_like(lse)
    lse2 = torch.empty_like(lse)
    num_m = triton_cdiv(seqlen_q, dq_cfg.block_m)
    with _on_device(q):
        attention.bwd_preprocess_kernel[(num_m, heads, batch)](
            out, dout, lse, lse if dlse is None else dlse, delta, lse2, *_s(out), *_s(dout), lse.stride(0),
            lse.stride(1), seqlen_q, head_dim, BLOCK_M=dq_cfg.block_m, BLOCK_D=dq_meta["BLOCK_D"],
            EVEN_M=dq_meta["EVEN_M"], PAD_D=dq_meta["PAD_D"], HAS_DLSE=dlse is not None, num_warps=dq_cfg.num_warps)
        attention.bwd_dkdv_kernel[(triton_cdiv(k.shape[1], dkdv_cfg.block_n), heads_k, batch)](
            q, k, v, dout, lse2, delta, dk, dv, *_s(q), *_s(k), *_s(v), *_s(dout), *_s(dk), *_s(dv),
            lse.stride(0), lse.stride(1), **dkdv_args, sm_scale=softmax_scale, **dkdv_meta)
        attention.bwd_dq_kernel[(num_m, heads, batch)](
            q, k, v, dout, lse2, delta, dq, *_s(q), *_s(k), *_s(v), *_s(dout), *_s(dq),
            lse.stride(0), lse.stride(1), **dq_args, sm_scale=softmax_scale, **dq_meta)
    return dq, dk, dv, None
