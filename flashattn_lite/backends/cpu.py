"""The C++ CPU backend (csrc/cpu), built just in time on first use.

Serves CPU tensors in fp16, bf16, fp32 and fp64.  Where the extension cannot be
built (no C++ compiler, say), it reports itself unavailable with the tail of the
compiler error; ``auto`` then falls back to ``reference`` with a one-time warning.
"""

import warnings

import torch

from .. import _build

NAME = "cpu"
FEATURES = ("forward", "backward", "causal", "window", "gqa", "fp16", "bf16", "fp32", "fp64", "softcap", "alibi")
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
    ok, why = available()
    return None if ok else why


def warn_fallback_once(reason):
    """auto could not use the C++ backend: say so once per process."""
    if not _warned:
        _warned.append(True)
        warnings.warn(f"flashattn_lite: the C++ CPU backend is unavailable, falling back to the slow 'reference' "
                      f"backend. {reason}", RuntimeWarning, stacklevel=4)


def fwd(q, k, v, softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes):
    return _ensure_built().fwd(q, k, v, softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes)


def bwd(dout, dlse, q, k, v, out, lse, softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes,
        deterministic):
    return _ensure_built().bwd(dout, dlse, q, k, v, out, lse, softmax_scale, diag_offset, window_left, window_right,
                               softcap, alibi_slopes)
