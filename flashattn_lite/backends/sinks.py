"""Learnable attention sinks, the same for every backend.

A sink is one extra logit ``sink[h]`` per query head whose value vector is 0:

    out_i = sum_j e^{s_ij} v_j / (e^{sink_h} + sum_j e^{s_ij}),   lse_i = log sum_j e^{s_ij}

(lse leaves the sink out, so partial results still merge through it).  Because the
sink only adds to each row's normaliser, it needs no kernel of its own: with
``lse' = logaddexp(lse, sink)``,

* forward: ``out = out0 * exp(lse - lse') = out0 * sigmoid(lse - sink)``, where
  ``(out0, lse)`` is attention without the sink (any backend, any feature);
* backward: the probabilities are ``P_ij = exp(s_ij - lse')``, so the backend's own
  backward, given ``lse'`` instead of ``lse``, computes dQ, dK, dV (and dBias) of the
  sink attention exactly; a gradient ``dlse`` (of the sink-free lse, whose derivative is
  ``exp(s_ij - lse)``) enters as ``dlse * exp(lse' - lse)``;
* the sink's own gradient: ``dsink_h = -sum_{b,i} sigmoid(sink_h - lse_i) * D_i`` with
  ``D_i = dout_i . out_i`` (the sink's probability times the row's dO.O);
* a gradient ``dlse`` of the (sink-free) lse is the sink-free attention's: its part of the
  gradients is a second backward call with ``dout = 0`` and the plain lse (gradients are
  linear in (dout, dlse)), exact however large the sink.

A row that sees no key gives out 0 (its out0 is 0) and lse -inf.  Everything here is
computed in float32 (float64 for float64 input).
"""

import torch

from .base import accum_dtype


def _by_row(sink, lse, varlen):
    """The sink of each lse entry: lse is (B, H, Sq), or varlen's (H, total_q)."""
    s = sink.to(lse.dtype)
    return s[:, None] if varlen else s[None, :, None]


def _rows_to_out(w, varlen):
    """A per-row factor in lse's layout -> broadcastable against out (B, Sq, H, Dv) / (T, H, Dv)."""
    return w.t()[..., None] if varlen else w.transpose(1, 2)[..., None]


def apply_to_out(out, lse, sink, varlen):
    """out0 (no sink) -> out with the sink in each row's normaliser."""
    w = torch.nan_to_num(torch.sigmoid(lse - _by_row(sink, lse, varlen)), nan=0.0)  # empty row, sink -inf: out0 = 0
    # in place (out is the backend's fresh result); fp16/bf16 multiply in w's float32 and
    # round once, through a float32 copy: torch's mixed-dtype in-place product is about 3x
    # slower than widening, multiplying and narrowing back
    if out.dtype == w.dtype:
        return out.mul_(_rows_to_out(w, varlen))
    return out.copy_(out.to(w.dtype).mul_(_rows_to_out(w, varlen)))


def backward_inputs(dout, out, lse, sink, varlen):
    """(lse', dsink) for a sink call's backward of ``dout``; see the module doc."""
    s = _by_row(sink, lse, varlen)
    lse_full = torch.logaddexp(lse, s)
    work = lse.dtype
    d = (dout.to(work) * out.to(work)).sum(-1)  # (B, Sq, H) or (T, H): D_i = dO_i . O_i
    d = d.t() if varlen else d.transpose(1, 2)
    p_sink = torch.nan_to_num(torch.sigmoid(s - lse), nan=0.0)
    dsink = -(p_sink * d).sum(dim=1 if varlen else (0, 2))
    return lse_full.contiguous(), dsink.to(sink.dtype)
