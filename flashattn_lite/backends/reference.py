"""Pure-PyTorch attention: the oracle of the tests and the last-resort backend.

Materialises the (Sq, Sk) score matrix, so it is O(N^2) in memory.  Computes in
float32 (float64 for float64 input) and casts the result to the input dtype.
"""

import torch

from .. import rng
from .base import accum_dtype

NAME = "reference"
FEATURES = ("forward", "backward", "causal", "window", "gqa", "fp16", "bf16", "fp32", "fp64", "dropout", "softcap",
            "alibi", "attn_mask", "varlen", "kv-cache", "kv-quant")


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


def score_transform(scores, softcap, alibi_slopes, diag_offset, bias=None):
    """Scaled scores -> the scores the softmax sees: softcap (``cap * tanh(s / cap)``,
    Gemma 2) first, then the ALiBi bias ``-slope * |i + offset - j|`` (flash-attn's
    order), then the additive ``bias`` (an attention mask).  ``scores`` is (B, H, Sq, Sk);
    slopes (B, H) or None; bias broadcastable to (B, H, Sq, Sk) or None."""
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        sq, sk = scores.shape[-2:]
        i = torch.arange(sq, device=scores.device)[:, None]
        j = torch.arange(sk, device=scores.device)[None, :]
        dist = (i + diag_offset - j).abs().to(scores.dtype)
        scores = scores - alibi_slopes.to(scores.dtype)[:, :, None, None] * dist
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    return scores


def attention_math(q, k, v, softmax_scale, diag_offset=0, window_left=-1, window_right=-1, upcast=True,
                   softcap=0.0, alibi_slopes=None, bias=None, dropout_keep=None, dropout_p=0.0, sink=None):
    """Attention on (B, S, H, D) tensors, differentiable by autograd.

    ``upcast=True`` computes in float32 (float64 stays float64) and returns the
    input dtype; ``upcast=False`` keeps every step in the input dtype, which is
    what a plain same-dtype PyTorch implementation would do (the tests use it
    as the yardstick of achievable accuracy).  Returns ``(out, lse)`` with lse
    of shape (B, H, Sq), float32 (float64 for float64 input); a row that sees no
    key gives 0 and -inf.  ``dropout_keep`` (bool (B, H, Sq, Sk)) applies dropout
    with that mask: kept probabilities are scaled by ``1 / (1 - dropout_p)``.  ``sink``
    ((H,) or None): a learnable attention sink, one more logit per head with a zero value,
    written here as the extra score column it is (transformers' eager formulation); lse
    leaves it out.
    """
    dtype = q.dtype
    if upcast:
        work = accum_dtype(dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
    hq, hk = q.shape[2], k.shape[2]
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=2)
        v = v.repeat_interleave(hq // hk, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    scores = score_transform(scores, softcap, alibi_slopes, diag_offset, bias)
    mask = visibility_mask(q.shape[1], k.shape[1], diag_offset, window_left, window_right, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True) if scores.shape[-1] else scores.new_full(
        scores.shape[:-1] + (1,), float("-inf"))
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max).detach()
    if sink is not None:
        # the sink as one more score column, its probability dropped after the softmax
        column = sink.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:-1], 1)
        shift = torch.maximum(row_max, column).detach()
        shift = torch.where(torch.isinf(shift), torch.zeros_like(shift), shift)
        both = torch.exp(torch.cat([scores, column], dim=-1) - shift)
        total = both.sum(dim=-1, keepdim=True)
        probs = both[..., :-1] / torch.where(total == 0, torch.ones_like(total), total)
        # lse from the scores alone (the sink may take all of a row's mass)
        denom = torch.exp(scores - row_max).sum(dim=-1, keepdim=True)
        empty = denom == 0
        probs = torch.where(empty, torch.zeros_like(probs), probs)
        denom_safe = torch.where(empty, torch.ones_like(denom), denom)
    else:
        p = torch.exp(scores - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        empty = denom == 0
        denom_safe = torch.where(empty, torch.ones_like(denom), denom)
        probs = p / denom_safe
    if dropout_keep is not None:
        probs = probs * dropout_keep.to(probs.dtype) / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    lse = torch.where(empty, torch.full_like(denom, float("-inf")), row_max + torch.log(denom_safe))
    return out.to(dtype), lse.squeeze(-1).to(accum_dtype(dtype))


def dropout_keep_for(params, batch, heads, seqlen_q, seqlen_k, device):
    """The keep mask of a dense call (None without dropout); varlen: (1, H, total_q, max_seqlen_k)."""
    if params.dropout_p <= 0:
        return None
    return rng.dropout_keep(params.dropout_seed, params.dropout_p, batch, heads, seqlen_q, seqlen_k, device)


def _sequences(p, q):
    """Varlen: per sequence ``(rows of q, rows of k, diagonal offset, slopes, keep)``, the last
    two sliced for it (None when unused); ``rows`` are slices of the packed dim."""
    keep = dropout_keep_for(p, 1, q.shape[1], q.shape[0], p.max_seqlen_k, q.device)
    cu_q, cu_k = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        slopes = None if p.alibi_slopes is None else p.alibi_slopes[b:b + 1]
        keep_b = None if keep is None else keep[:, :, qs:qe, :ke - ks]
        yield slice(qs, qe), slice(ks, ke), p.diag_offset + (ke - ks) - (qe - qs), slopes, keep_b




def supports(call):
    return None


def available():
    return True, "pure PyTorch, always available"


def _dense_fwd(q, k, v, p, offset, slopes, keep):
    return attention_math(q, k, v, p.softmax_scale, offset, p.window_left, p.window_right, softcap=p.softcap,
                          alibi_slopes=slopes, bias=p.bias, dropout_keep=keep, dropout_p=p.dropout_p)


def fwd(q, k, v, params):
    p = params
    with torch.no_grad():
        if not p.varlen:
            keep = dropout_keep_for(p, q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.device)
            return _dense_fwd(q, k, v, p, p.diag_offset, p.alibi_slopes, keep)
        out = q.new_zeros(q.shape[:-1] + v.shape[-1:])  # (total_q, H, Dv)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=accum_dtype(q.dtype), device=q.device)
        for rq, rk, offset, slopes, keep in _sequences(p, q):
            o, l = _dense_fwd(q[None, rq], k[None, rk], v[None, rk], p, offset, slopes, keep)
            out[rq] = o[0]
            lse[:, rq] = l[0]
        return out, lse


def bwd(dout, dlse, q, k, v, out, lse, params, bias_grad, deterministic):
    p = params
    if not p.varlen:
        keep = dropout_keep_for(p, q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.device)
        return _dense_bwd(dout, dlse, q, k, v, lse, p, p.diag_offset, p.alibi_slopes, keep, bias_grad)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rq, rk, offset, slopes, keep in _sequences(p, q):
        g = _dense_bwd(dout[None, rq], None if dlse is None else dlse[None, :, rq], q[None, rq], k[None, rk],
                       v[None, rk], lse[None, :, rq], p, offset, slopes, keep, False)
        dq[rq], dk[rk], dv[rk] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv, None


def _dense_bwd(dout, dlse, q, k, v, lse, p, offset, slopes, keep, bias_grad):
    """Explicit softmax-attention gradients (autograd is unavailable inside an operator kernel).

    With Z = keep / (1 - p_drop) (1 without dropout): dV = (P Z)^T dO;  dP = (dO V^T) Z;
    dS = P * (dP - rowsum(P * dP) + dlse) (and rowsum(P * dP) = rowsum(dO * O));  dBias = dS;
    with softcap the chain rule through the tanh multiplies dS by (1 - tanh^2);
    dQ = s dS K;  dK = s dS^T Q, with dK, dV summed over each GQA group.  ALiBi only
    shifts the scores.
    """
    dtype = q.dtype
    work = accum_dtype(dtype)
    q, k, v, dout = (t.to(work) for t in (q, k, v, dout))
    batch, seqlen_k, hk, _ = k.shape
    group = q.shape[2] // hk
    kr = k.repeat_interleave(group, dim=2)
    vr = v.repeat_interleave(group, dim=2)
    pre = torch.einsum("bqhd,bkhd->bhqk", q, kr) * p.softmax_scale
    scores = score_transform(pre, p.softcap, slopes, offset, p.bias)
    mask = visibility_mask(q.shape[1], seqlen_k, offset, p.window_left, p.window_right, q.device)
    lse_safe = torch.where(torch.isinf(lse), float("inf"), lse).to(work)  # empty rows: P = 0
    probs = torch.exp(scores - lse_safe[..., None]).masked_fill(~mask, 0.0)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, vr)
    dropped = probs
    if keep is not None:
        z = keep.to(work) / (1.0 - p.dropout_p)
        dp = dp * z
        dropped = probs * z
    shift = (probs * dp).sum(-1, keepdim=True)
    if dlse is not None:
        shift = shift - dlse.to(work)[..., None]
    ds = probs * (dp - shift)
    dbias = ds.to(p.bias.dtype) if bias_grad else None
    if p.softcap > 0:
        ds = ds * (1 - torch.tanh(pre / p.softcap) ** 2)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kr) * p.softmax_scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q) * p.softmax_scale
    dv = torch.einsum("bhqk,bqhd->bkhd", dropped, dout)
    if group > 1:
        dk = dk.reshape(batch, seqlen_k, hk, group, k.shape[3]).sum(3)
        dv = dv.reshape(batch, seqlen_k, hk, group, v.shape[3]).sum(3)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype), dbias


# ------------------------------------------------------------------ KV-cache decoding


def gather_cache(cache, block_table, b, start, end):
    """Positions [start, end) of sequence b of a paged cache (num_blocks, page_size, Hk, D)."""
    page = cache.shape[1]
    pos = torch.arange(start, end, device=cache.device)
    blocks = block_table[b].long()[pos // page]
    return cache[blocks, pos % page]


def decode(q, k_cache, v_cache, block_table, seqlens_k, leftpad, params, max_seqlen_k, num_splits, k_descale=None,
           v_descale=None):
    """Per batch item: gather its valid keys from the pages (dequantized, for an 8-bit
    cache: codes times descales, in float64), then :func:`attention_math` with the diagonal of
    ``flashattn_lite.ops.DECODE_SCHEMA`` (``num_splits`` has no meaning here)."""
    p = params
    batch, seqlen_q, heads, _ = q.shape
    ends = seqlens_k.tolist()
    starts = leftpad.tolist() if leftpad is not None else [0] * batch
    out = q.new_zeros(q.shape[:-1] + v_cache.shape[-1:])  # (B, Sq, H, Dv)
    lse = torch.full((batch, heads, seqlen_q), float("-inf"), dtype=accum_dtype(q.dtype), device=q.device)
    quantized = k_descale is not None
    if quantized:  # every value in float64 (exact: an 8-bit code times a float32 scale)
        k_cache = k_cache.to(torch.float64) * k_descale.to(torch.float64)[..., None]
        v_cache = v_cache.to(torch.float64) * v_descale.to(torch.float64)[..., None]
    with torch.no_grad():
        for b in range(batch):
            start, end = starts[b], ends[b]
            k = gather_cache(k_cache, block_table, b, start, end)
            v = gather_cache(v_cache, block_table, b, start, end)
            slopes = None if p.alibi_slopes is None else p.alibi_slopes[b:b + 1]
            qb = q[b:b + 1].to(torch.float64) if quantized else q[b:b + 1]
            o, l = attention_math(qb, k[None], v[None], p.softmax_scale, end - seqlen_q - start,
                                  p.window_left, p.window_right, softcap=p.softcap, alibi_slopes=slopes)
            out[b], lse[b] = o[0].to(out.dtype), l[0].to(lse.dtype)
    return out, lse
