"""Pure-PyTorch attention: the oracle of the tests and the last-resort backend.

Materialises the (Sq, Sk) score matrix, so it is O(N^2) in memory.  Computes in
float32 (float64 for float64 input) and casts the result to the input dtype.
"""

import torch

NAME = "reference"
FEATURES = ("forward", "backward", "causal", "window", "gqa", "fp16", "bf16", "fp32", "fp64", "softcap", "alibi")


def visibility_mask(seqlen_q, seqlen_k, diag_offset, window_left, window_right, device):
    """(Sq, Sk) bool: may query i see key j?  Band i+off-left <= j <= i+off+right."""
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    rel = j - i - diag_offset
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_right >= 0:
        mask &= rel <= window_right
    if window_left >= 0:
        mask &= rel >= -window_left
    return mask


def score_transform(scores, softcap, alibi_slopes, diag_offset):
    """Scaled scores -> the scores the softmax sees: softcap (``cap * tanh(s / cap)``,
    Gemma 2) first, then the ALiBi bias ``-slope * |i + offset - j|`` (flash-attn's
    order).  ``scores`` is (B, H, Sq, Sk); slopes (B, H) or None."""
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        sq, sk = scores.shape[-2:]
        i = torch.arange(sq, device=scores.device)[:, None]
        j = torch.arange(sk, device=scores.device)[None, :]
        dist = (i + diag_offset - j).abs().to(scores.dtype)
        scores = scores - alibi_slopes.to(scores.dtype)[:, :, None, None] * dist
    return scores


def attention_math(q, k, v, softmax_scale, diag_offset=0, window_left=-1, window_right=-1, upcast=True,
                   softcap=0.0, alibi_slopes=None):
    """Attention on (B, S, H, D) tensors, differentiable by autograd.

    ``upcast=True`` computes in float32 (float64 stays float64) and returns the
    input dtype; ``upcast=False`` keeps every step in the input dtype, which is
    what a plain same-dtype PyTorch implementation would do (the tests use it
    as the yardstick of achievable accuracy).  Returns ``(out, lse)`` with lse
    of shape (B, H, Sq), float32 (float64 for float64 input); a row that sees no
    key gives 0 and -inf.
    """
    dtype = q.dtype
    if upcast:
        work = torch.float64 if dtype == torch.float64 else torch.float32
        q, k, v = q.to(work), k.to(work), v.to(work)
    hq, hk = q.shape[2], k.shape[2]
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=2)
        v = v.repeat_interleave(hq // hk, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    scores = score_transform(scores, softcap, alibi_slopes, diag_offset)
    mask = visibility_mask(q.shape[1], k.shape[1], diag_offset, window_left, window_right, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True) if scores.shape[-1] else scores.new_full(
        scores.shape[:-1] + (1,), float("-inf"))
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max).detach()
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    empty = denom == 0
    denom_safe = torch.where(empty, torch.ones_like(denom), denom)
    out = torch.einsum("bhqk,bkhd->bqhd", p / denom_safe, v)
    lse = torch.where(empty, torch.full_like(denom, float("-inf")), row_max + torch.log(denom_safe))
    return out.to(dtype), lse.squeeze(-1).to(torch.float64 if dtype == torch.float64 else torch.float32)


def supports(call):
    return None


def available():
    return True, "pure PyTorch, always available"


def fwd(q, k, v, softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes):
    with torch.no_grad():
        return attention_math(q, k, v, softmax_scale, diag_offset, window_left, window_right, softcap=softcap,
                              alibi_slopes=alibi_slopes)


def bwd(dout, dlse, q, k, v, out, lse, softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes,
        deterministic):
    """Explicit softmax-attention gradients (autograd is unavailable inside an operator kernel).

    dV = P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(P * dP) + dlse);  with softcap the
    chain rule through the tanh multiplies dS by (1 - tanh^2);  dQ = s dS K;  dK = s dS^T Q,
    with dK, dV summed over each GQA group.  ALiBi only shifts the scores.
    """
    dtype = q.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v, dout = (t.to(work) for t in (q, k, v, dout))
    batch, seqlen_k, hk, _ = k.shape
    group = q.shape[2] // hk
    kr = k.repeat_interleave(group, dim=2)
    vr = v.repeat_interleave(group, dim=2)
    pre = torch.einsum("bqhd,bkhd->bhqk", q, kr) * softmax_scale
    scores = score_transform(pre, softcap, alibi_slopes, diag_offset)
    mask = visibility_mask(q.shape[1], seqlen_k, diag_offset, window_left, window_right, q.device)
    lse_safe = torch.where(torch.isinf(lse), float("inf"), lse).to(work)  # empty rows: P = 0
    p = torch.exp(scores - lse_safe[..., None]).masked_fill(~mask, 0.0)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, vr)
    shift = (p * dp).sum(-1, keepdim=True)
    if dlse is not None:
        shift = shift - dlse.to(work)[..., None]
    ds = p * (dp - shift)
    if softcap > 0:
        ds = ds * (1 - torch.tanh(pre / softcap) ** 2)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kr) * softmax_scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q) * softmax_scale
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dout)
    if group > 1:
        dk = dk.reshape(batch, seqlen_k, hk, group, -1).sum(3)
        dv = dv.reshape(batch, seqlen_k, hk, group, -1).sum(3)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)
