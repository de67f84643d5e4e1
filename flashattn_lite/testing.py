"""Correctness yardstick shared by the tests and ``flashattn-lite check``.

Tolerance, as in flash-attn's own tests: an implementation in dtype ``t`` passes
when ``max|ours - ref| <= factor * max|baseline - ref| + rounding``, where ``ref``
is float64 attention (the reference backend on float64 inputs), ``baseline`` is
the same math run naively in dtype ``t`` (what plain PyTorch would give), factor
is 2 for outputs and 3 for gradients, and ``rounding`` is one unit of ``t``'s
rounding plus a floor of ``ACCUM_ULPS`` units of the accumulation dtype (float32,
or float64 for float64 input: every implementation accumulates in its own order), both at the scale of the pass: the
largest reference magnitude among ``out`` (forward) or ``dq, dk, dv`` (backward).
The floor matters only for float32, where a naive baseline can be exact by
structure (one key: the softmax gradient is exactly 0) while a fused kernel
differs in the last bits.
"""

import math
from dataclasses import dataclass

import torch

from .backends.reference import attention_math

FWD_FACTOR = 2.0
GRAD_FACTOR = 3.0
ACCUM_ULPS = 16


@dataclass
class Comparison:
    name: str
    error: float
    bound: float

    @property
    def ok(self):
        # a non-finite error (NaN/inf where the reference is finite) never passes, even
        # when an overflowing same-dtype baseline makes the bound infinite
        return math.isfinite(self.error) and self.error <= self.bound

    def __str__(self):
        return f"{self.name}: max error {self.error:.3g} (bound {self.bound:.3g})"


def _max_abs(t):
    return t.abs().max().item() if t.numel() else 0.0


def _finite_diff(a, b):
    """max |a - b| where both are finite; positions where exactly one is inf/nan count as inf."""
    a, b = a.double(), b.double()
    same_inf = (a == b) & torch.isinf(a)
    bad = (~torch.isfinite(a) | ~torch.isfinite(b)) & ~same_inf
    if bad.any():
        return float("inf")
    diff = torch.where(same_inf, torch.zeros_like(a), a - b)
    return _max_abs(diff)


def compare(name, ours, ref, baseline, dtype, factor, scale):
    """One tolerance check; ``ref`` float64, ``baseline`` computed in ``dtype``."""
    accum = torch.float64 if dtype == torch.float64 else torch.float32
    eps = torch.finfo(dtype).eps + ACCUM_ULPS * torch.finfo(accum).eps
    rounding = eps * max(1.0, scale)
    bound = factor * _finite_diff(baseline, ref) + rounding
    return Comparison(name, _finite_diff(ours, ref), bound)


def reference_results(q, k, v, dout, softmax_scale, diag_offset=0, window_left=-1, window_right=-1, softcap=0.0,
                      alibi_slopes=None):
    """float64 oracle and same-dtype baseline: {'out','lse','dq','dk','dv'} each.

    Inputs in (B, S, H, D) layout, any dtype; ``dout=None`` skips gradients.
    """
    results = {}
    for key, upcast, cast in (("ref", True, torch.float64), ("baseline", False, None)):
        leaves = [(t.detach().to(cast) if cast else t.detach()).requires_grad_(dout is not None) for t in (q, k, v)]
        with torch.enable_grad():
            slopes = None
            if alibi_slopes is not None:
                slopes = alibi_slopes.expand(q.shape[0], q.shape[2]).to(torch.float64 if upcast else q.dtype)
            out, lse = attention_math(*leaves, softmax_scale, diag_offset, window_left, window_right, upcast=upcast,
                                      softcap=softcap, alibi_slopes=slopes)
            res = {"out": out.detach(), "lse": lse.detach()}
            if dout is not None:
                grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
                res.update(dq=grads[0], dk=grads[1], dv=grads[2])
        results[key] = res
    return results["ref"], results["baseline"]


def check_against_reference(ours, ref, baseline, dtype):
    """List of :class:`Comparison` for every key present in ``ours``."""
    def scale(keys):
        return max((_max_abs(ref[k][torch.isfinite(ref[k])]) for k in keys if k in ref), default=0.0)

    fwd_scale, bwd_scale = scale(("out",)), scale(("dq", "dk", "dv"))
    checks = []
    for key, value in ours.items():
        if value is None:
            continue
        forward = key in ("out", "lse")
        lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        checks.append(compare(key, value, ref[key], baseline[key], lse_dtype if key == "lse" else dtype,
                              FWD_FACTOR if forward else GRAD_FACTOR,
                              scale((key,)) if key == "lse" else (fwd_scale if forward else bwd_scale)))
    return checks
