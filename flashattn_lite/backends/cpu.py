"""The C++ CPU backend (csrc/cpu), built just in time on first use.

Serves CPU tensors in fp16, bf16, fp32 and fp64.  Where the extension cannot be
built (no C++ compiler, say), it reports itself unavailable with the tail of the
compiler error; ``auto`` then falls back to ``reference`` with a one-time warning.
"""

import warnings

import torch

from .. import _build
from .base import missing_features

NAME = "cpu"
FEATURES = ("forward", "backward", "causal", "window", "gqa", "fp16", "bf16", "fp32", "fp64", "softcap", "alibi",
            "varlen", "attn_mask", "dropout", "kv-cache")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_warned = []


def _ensure_built():
    _build.build_cpu()
    return torch.ops.flashattn_lite_C


def available():
    try:
        path = _build.build_cpu()
    except RuntimeError as exc:
        return False, str(exc)
    return True, f"C++ extension {path}"


def supports(call):
    if call.device.type != "cpu":
        return f"tensors on {call.device.type}; the cpu backend needs CPU tensors"
    if call.dtype not in _DTYPES:
        return f"dtype {call.dtype} is not supported by the cpu backend"
    missing = missing_features(call, FEATURES)
    if missing:
        return f"the cpu backend {missing}"
    ok, why = available()
    return None if ok else why


def warn_fallback_once(reason, built):
    """auto handed a CPU call to the slow O(N^2) reference backend: say so once per reason.
    ``built``: the extension is there but declined the call (rather than failed to build)."""
    if reason not in _warned:
        _warned.append(reason)
        what = "the C++ CPU backend cannot serve this call" if built else "the C++ CPU backend is unavailable"
        warnings.warn(f"flashattn_lite: {what}, falling back to the slow 'reference' backend. {reason}",
                      RuntimeWarning, stacklevel=4)


def fwd(q, k, v, p):
    return _ensure_built().fwd(q, k, v, *p.op_args())


def bwd(dout, dlse, q, k, v, out, lse, p, bias_grad, deterministic):
    dq, dk, dv, dbias = _ensure_built().bwd(dout, dlse, q, k, v, out, lse, *p.op_args(), bool(bias_grad),
                                            bool(deterministic))
    return dq, dk, dv, (dbias if bias_grad else None)


# ------------------------------------------------------------------ KV-cache decoding


def decode(q, k_cache, v_cache, block_table, seqlens_k, leftpad, p, max_seqlen_k, num_splits):
    """csrc/cpu/decode_cpu.cpp: split-KV over (batch, kv head, split) tasks; ``num_splits=0``
    picks enough splits to occupy every thread (keeping >= 256 positions per split)."""
    return _ensure_built().decode(q, k_cache, v_cache, block_table, seqlens_k, leftpad, p.softmax_scale,
                                  p.window_left, p.window_right, p.softcap, p.alibi_slopes, num_splits)
