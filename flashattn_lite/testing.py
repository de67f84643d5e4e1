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

import contextlib
import math
from dataclasses import dataclass

import torch

from . import rng
from .backends import accum_dtype
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


def max_abs(t):
    """max |t| as a Python float; 0 for an empty tensor."""
    return t.abs().max().item() if t.numel() else 0.0


def _finite_diff(a, b):
    """max |a - b| where both are finite; positions where exactly one is inf/nan count as inf."""
    a, b = a.double(), b.double()
    same_inf = (a == b) & torch.isinf(a)
    bad = (~torch.isfinite(a) | ~torch.isfinite(b)) & ~same_inf
    if bad.any():
        return float("inf")
    diff = torch.where(same_inf, torch.zeros_like(a), a - b)
    return max_abs(diff)


def compare(name, ours, ref, baseline, dtype, factor, scale, lse_mag=0.0):
    """One tolerance check; ``ref`` float64, ``baseline`` the same math computed in ``dtype``,
    or, for float64 (where that is the oracle itself), in float32 with its error scaled by
    the ratio of the two epsilons: the error the problem's conditioning (e.g. logits of
    hundreds of nats) gives float64 arithmetic; an overflowing float32 baseline adds nothing.

    ``lse_mag`` (gradients of float64 input): max |lse|.  A backward recomputes P from the
    forward's lse (flash-attn's interface), and lse's rounding, about eps * |lse|, moves
    every probability by that relative amount; the naive float32 baseline normalises by its
    row maximum instead and has no such term, so ``factor * eps64 * lse_mag * scale`` is
    added for it."""
    accum = accum_dtype(dtype)
    eps = torch.finfo(dtype).eps + ACCUM_ULPS * torch.finfo(accum).eps
    rounding = eps * max(1.0, scale)
    base_err = _finite_diff(baseline, ref)
    if ours.dtype == torch.float64 and baseline.dtype == torch.float32:
        ratio = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
        base_err = base_err * ratio if math.isfinite(base_err) else 0.0
        rounding += factor * torch.finfo(torch.float64).eps * lse_mag * max(1.0, scale)
    bound = factor * base_err + rounding
    return Comparison(name, _finite_diff(ours, ref), bound)


def reference_results(q, k, v, dout, softmax_scale, diag_offset=0, window_left=-1, window_right=-1, softcap=0.0,
                      alibi_slopes=None, bias=None, dropout_keep=None, dropout_p=0.0, learnable_sink=None):
    """float64 oracle and same-dtype baseline: {'out','lse','dq','dk','dv'} each (+ 'dbias'
    when ``bias`` requires grad, + 'dsink' when ``learnable_sink`` requires grad).

    Inputs in (B, S, H, D) layout, any dtype; ``dout=None`` skips gradients.  ``bias``
    broadcastable to (B, H, Sq, Sk); ``dropout_keep`` the bool mask dropout applied.
    """
    results = {}
    bias_grad = bias is not None and bias.requires_grad
    sink_grad = learnable_sink is not None and learnable_sink.requires_grad
    # the baseline: the same math in q's dtype, or in float32 for float64 input (see compare)
    base_cast = torch.float32 if q.dtype == torch.float64 else None
    for key, upcast, cast in (("ref", True, torch.float64), ("baseline", False, base_cast)):
        leaves = [(t.detach().to(cast) if cast else t.detach()).requires_grad_(dout is not None) for t in (q, k, v)]
        b = None
        if bias is not None:
            b = (bias.detach().to(cast) if cast else bias.detach()).requires_grad_(bias_grad and dout is not None)
        sink = None
        if learnable_sink is not None:
            sink = learnable_sink.detach().to(torch.float64 if upcast else cast or q.dtype)
            sink.requires_grad_(sink_grad and dout is not None)
        with torch.enable_grad():
            slopes = None
            if alibi_slopes is not None:
                slopes = alibi_slopes.expand(q.shape[0], q.shape[2]).to(torch.float64 if upcast else cast or q.dtype)
            out, lse = attention_math(*leaves, softmax_scale, diag_offset, window_left, window_right, upcast=upcast,
                                      softcap=softcap, alibi_slopes=slopes, bias=b, dropout_keep=dropout_keep,
                                      dropout_p=dropout_p, sink=sink)
            res = {"out": out.detach(), "lse": lse.detach()}
            if dout is not None:
                inputs = leaves + ([b] if bias_grad else []) + ([sink] if sink_grad else [])
                grads = list(torch.autograd.grad(out, inputs, dout.to(out.dtype)))
                res.update(dq=grads[0], dk=grads[1], dv=grads[2])
                if bias_grad:
                    res["dbias"] = grads[3]
                if sink_grad:
                    res["dsink"] = grads[-1]
        results[key] = res
    return results["ref"], results["baseline"]


def reference_results_varlen(q, k, v, dout, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_keep=None, dropout_p=0.0,
                             learnable_sink=None):
    """:func:`reference_results` per sequence of a packed varlen batch, concatenated back:
    lse (H, total_q); ``dropout_keep`` as recorded for varlen, (1, H, total_q, max_seqlen_k)."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    parts = []
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        left, right = window_size
        right = 0 if causal else right
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[None] if alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
        keep = None if dropout_keep is None else dropout_keep[:, :, qs:qe, :ke - ks]
        parts.append(reference_results(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke],
                                       None if dout is None else dout[None, qs:qe], softmax_scale, (ke - ks) - (qe - qs),
                                       left, right, softcap, slopes, dropout_keep=keep, dropout_p=dropout_p,
                                       learnable_sink=learnable_sink))
    results = []
    for which in (0, 1):
        res = {}
        for key in parts[0][which]:
            pieces = [p[which][key] for p in parts]
            if key == "dsink":  # one sink per head, shared by every sequence
                res[key] = torch.stack(pieces).sum(0)
            else:
                res[key] = torch.cat([x[0] for x in pieces], dim=1 if key == "lse" else 0)
        results.append(res)
    return results[0], results[1]


def check_against_reference(ours, ref, baseline, dtype):
    """List of :class:`Comparison` for every key present in ``ours``."""
    def scale(keys):
        return max((max_abs(ref[k][torch.isfinite(ref[k])]) for k in keys if k in ref), default=0.0)

    fwd_scale, bwd_scale = scale(("out",)), scale(("dq", "dk", "dv"))
    lse_mag = scale(("lse",)) if dtype == torch.float64 else 0.0
    checks = []
    for key, value in ours.items():
        if value is None:
            continue
        forward = key in ("out", "lse")
        checks.append(compare(key, value, ref[key], baseline[key], accum_dtype(dtype) if key == "lse" else dtype,
                              FWD_FACTOR if forward else GRAD_FACTOR,
                              scale((key,)) if key in ("lse", "dsink") else (fwd_scale if forward else bwd_scale),
                              lse_mag=0.0 if forward else lse_mag))
    return checks


@contextlib.contextmanager
def record_dropout():
    """The dropout testing hook: records every dropout call made inside the block.

    Yields a list that fills with one :class:`flashattn_lite.rng.DropoutCall` per call;
    ``call.keep()`` is the exact keep mask that call applied (bool, (B, H, Sq, Sk)), so a
    test can run the reference with the same mask::

        with record_dropout() as calls:
            out = flash_attn_func(q, k, v, dropout_p=0.1)
        keep = calls[0].keep()
    """
    with rng.recording() as calls:
        yield calls
