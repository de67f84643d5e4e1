"""Triton kernels for exact attention: tiled online-softmax forward and
recomputation-based backward (FlashAttention-2 style).

Conventions shared by every kernel here:

* Tensors are addressed through strides in the logical layout
  (batch, seqlen, heads, headdim) with a contiguous last dimension, so both the
  flash layout (B, S, H, D) and torch's (B, H, S, D) are read without copies.
* Visibility of key ``j`` to query ``i`` is one band around a diagonal:
  ``i + offset - left <= j <= i + offset + right``.  ``offset`` is ``Sk - Sq``
  for bottom-right causal (flash-attn) and ``0`` for top-left (torch);
  causal is ``right == 0``; a missing side (``HAS_LEFT``/``HAS_RIGHT`` false)
  is unbounded.
* Scores are carried in base 2: ``s2 = (q . k) * scale * log2(e)`` so the
  softmax uses ``exp2``; ``lse`` is stored as the natural log.
* A query row that sees no key yields ``out = 0`` and ``lse = -inf``.  The
  backward replaces that ``-inf`` with ``+inf`` so every probability of the row
  is ``exp2(-inf) = 0`` and its gradients vanish without a NaN.
* Head dims: Q, K and dQ, dK are ``head_dim`` wide (tiles BLOCK_D, masked past it when
  ``PAD_D``); V, O, dO and dV ``head_dim_v`` (BLOCK_DV, ``PAD_DV``).  They differ for MLA
  (DeepSeek: 192 and 128); S = Q K^T reduces over the first, O = P V and dP = dO V^T over
  the second, so the two never meet in one tile.
* Varlen (``IS_VARLEN``): the batch index picks a sequence through the int32
  ``CU_Q``/``CU_K`` prefix sums; batch strides are 0 and the sequence start is a
  row offset; the diagonal offset gains ``len_k - len_q`` per sequence.  lse is
  then (heads, total_q) and addressed as ``head * stride_lh + q_start + row``.
* An additive bias (``HAS_BIAS``, an attention mask) is read through four strides
  (0 on broadcast dims) and added after softcap and ALiBi; it may hold -inf.
* Dropout (``HAS_DROPOUT``) keeps element (i, j) iff the first Philox4x32-10 word at
  ``counter = (ctr_row0 + i) * ctr_sk + j`` (split into lo/hi words; key = seed) is
  ``>= drop_thresh`` (flashattn_lite.rng defines the stream); the mask is regenerated,
  never stored.

Kernels know nothing of autograd or of torch; the launcher lives in
``flashattn_lite.backends.triton``.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _rows_at(base, start, stride):
    """``base + start * stride`` in 64-bit: row offsets of long sequences overflow int32.

    Offsets inside a tile (``arange * stride``) stay small and 32-bit.
    """
    return base + (tl.zeros([], dtype=tl.int64) + start) * stride


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, head_dim,
               CHECK_ROWS: tl.constexpr, CHECK_D: tl.constexpr):
    """Load a (rows, headdim) tile; masks are compiled in only when needed."""
    if CHECK_ROWS:
        if CHECK_D:
            t = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < head_dim), other=0.0)
        else:
            t = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if CHECK_D:
            t = tl.load(ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def _store_tile(ptrs, val, rows, n_rows, offs_d, head_dim,
                CHECK_ROWS: tl.constexpr, CHECK_D: tl.constexpr):
    if CHECK_ROWS:
        if CHECK_D:
            tl.store(ptrs, val, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < head_dim))
        else:
            tl.store(ptrs, val, mask=rows[:, None] < n_rows)
    else:
        if CHECK_D:
            tl.store(ptrs, val, mask=offs_d[None, :] < head_dim)
        else:
            tl.store(ptrs, val)


@triton.jit
def _visible(rows, cols, seqlen_k, offset, left, right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Boolean tile: may query ``rows`` see key ``cols``?  (broadcast shapes)"""
    rel = cols - rows - offset
    ok = cols < seqlen_k
    if HAS_RIGHT:
        ok = ok & (rel <= right)
    if HAS_LEFT:
        ok = ok & (rel >= -left)
    return ok


@triton.jit
def _block_ranges(start, n_cols, offset, left, right,
                  BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, EVEN_COLS: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Column-block ranges for the row block [start, start + BLOCK_ROWS).

    Rows see columns in ``row + offset - left .. row + offset + right``.
    Returns ``lo <= full_lo <= full_hi <= hi``: blocks in ``[lo, full_lo)`` and
    ``[full_hi, hi)`` are partly visible (need a mask), blocks in
    ``[full_lo, full_hi)`` are visible to every row and in bounds, and blocks
    outside ``[lo, hi)`` are invisible to every row and never touched.  The
    same function serves the transposed question (which query rows see a key
    block) with ``offset -> -offset`` and ``left <-> right``.
    """
    last = start + BLOCK_ROWS - 1
    lo = 0
    hi = n_cols
    if HAS_LEFT:
        lo = tl.maximum(start + offset - left, 0)
        lo = (lo // BLOCK_COLS) * BLOCK_COLS
    if HAS_RIGHT:
        hi = tl.minimum(last + offset + right + 1, n_cols)
        hi = tl.maximum(hi, lo)
    full_lo = lo
    if HAS_LEFT:
        first_full = tl.maximum(last + offset - left, 0)
        full_lo = tl.maximum(lo, ((first_full + BLOCK_COLS - 1) // BLOCK_COLS) * BLOCK_COLS)
    if EVEN_COLS:
        end_full = n_cols
    else:
        end_full = (n_cols // BLOCK_COLS) * BLOCK_COLS
    if HAS_RIGHT:
        end_full = tl.minimum(end_full, tl.maximum(start + offset + right + 1, 0))
    full_hi = (end_full // BLOCK_COLS) * BLOCK_COLS
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _alibi_slope2(ALIBI, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI: tl.constexpr):
    """This head's ALiBi slope in base-2 units (0 without ALiBi)."""
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + off_b * stride_ab + off_h * stride_ah) * 1.4426950408889634
    else:
        slope2 = 0.0
    return slope2


@triton.jit
def tanh(x):
    # 1 - 2 / (e^{2x} + 1) has the exact limits +-1 (exp2 saturates to inf or 0) but loses
    # relative precision near 0, where it subtracts from 1 (a large softcap makes every
    # argument small); there the odd Taylor series to x^11 holds to 2e-10 (|x| < 1/4).
    x2 = x * x
    series = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197)))))
    return tl.where(tl.abs(x) < 0.25, series, 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0))


@triton.jit
def _scores(qk, rows, cols, qk_scale, softcap_pre, softcap_post, slope2, offset,
            HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Raw q.k -> the scores the softmax sees, in base-2 units; also tanh's value for
    the softcap gradient.  Order as flash-attn: scale, softcap, then the ALiBi bias
    -slope * |i + offset - j|.  ``rows``/``cols`` are broadcastable index tiles."""
    if HAS_SOFTCAP:
        t = tanh(qk * softcap_pre)  # softcap_pre = scale / cap
        s = t * softcap_post  # softcap_post = cap * log2(e)
    else:
        s = qk * qk_scale
        t = s
    if HAS_ALIBI:
        dist = rows + offset - cols
        dist = tl.where(dist < 0, -dist, dist)
        s = s - slope2 * dist.to(tl.float32)
    return s, t


@triton.jit
def _seq_bounds(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, offset, IS_VARLEN: tl.constexpr):
    """(q_start, k_start, seqlen_q, seqlen_k, offset) of batch entry ``off_b``."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + off_b)
        k_start = tl.load(CU_K + off_b)
        seqlen_q = tl.load(CU_Q + off_b + 1) - q_start
        seqlen_k = tl.load(CU_K + off_b + 1) - k_start
        offset = offset + seqlen_k - seqlen_q
    else:
        q_start = 0
        k_start = 0
    return q_start, k_start, seqlen_q, seqlen_k, offset


@triton.jit
def _bias2(bias_base, rows, cols, stride_bm, stride_bn, seqlen_q, seqlen_k,
           CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Bias tile in base-2 units; ``rows``/``cols`` broadcastable index tiles."""
    # rows in 64-bit; cols * stride_bn stays 32-bit (the launcher refuses a layout where it could overflow)
    ptrs = bias_base + rows.to(tl.int64) * stride_bm + cols * stride_bn
    if CHECK_ROWS:
        if CHECK_COLS:
            b = tl.load(ptrs, mask=(rows < seqlen_q) & (cols < seqlen_k), other=0.0)
        else:
            b = tl.load(ptrs, mask=rows < seqlen_q, other=0.0)
    else:
        if CHECK_COLS:
            b = tl.load(ptrs, mask=cols < seqlen_k, other=0.0)
        else:
            b = tl.load(ptrs)
    return b.to(tl.float32) * 1.4426950408889634


@triton.jit
def _keep(seed, drop_thresh, ctr_row0, rows, cols, ctr_sk):
    """Dropout's keep mask for a tile (rows/cols broadcastable): Philox at each element's counter."""
    counter = (ctr_row0 + rows.to(tl.int64)) * ctr_sk + cols.to(tl.int64)
    # Philox4x32 with the counter split into (lo, hi) words, spelled out: what tl.randint does
    # with a 64-bit offset since Triton 3.4; older releases ran Philox4x64 there instead.
    lo = counter.to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    zero = lo * 0
    word, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
    return word.to(tl.int64) >= drop_thresh


# --------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs,
               offs_m, offs_n, offs_d, offs_dv, lo, hi,
               seqlen_q, seqlen_k, head_dim, head_dim_v, offset, left, right, qk_scale, softcap_pre, softcap_post, slope2,
               bias_base, stride_bm, stride_bn, seed, drop_thresh, ctr_row0, ctr_sk,
               MASKED: tl.constexpr, EVEN_M: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt_ptrs = _rows_at(k_base, start_n, stride_ks) + offs_n[None, :] * stride_ks + offs_d[:, None]
        if MASKED:
            if PAD_D:
                kt = tl.load(kt_ptrs, mask=(cols[None, :] < seqlen_k) & (offs_d[:, None] < head_dim), other=0.0)
            else:
                kt = tl.load(kt_ptrs, mask=cols[None, :] < seqlen_k, other=0.0)
        else:
            if PAD_D:
                kt = tl.load(kt_ptrs, mask=offs_d[:, None] < head_dim, other=0.0)
            else:
                kt = tl.load(kt_ptrs)
        s, _ = _scores(tl.dot(q, kt, input_precision=DOT_PRECISION), offs_m[:, None], cols[None, :], qk_scale,
                       softcap_pre, softcap_post, slope2, offset, HAS_SOFTCAP, HAS_ALIBI)
        if HAS_BIAS:
            s += _bias2(bias_base, offs_m[:, None], cols[None, :], stride_bm, stride_bn, seqlen_q, seqlen_k,
                        not EVEN_M, MASKED)
        if MASKED:
            vis = _visible(offs_m[:, None], cols[None, :], seqlen_k, offset, left, right, HAS_LEFT, HAS_RIGHT)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or HAS_BIAS:
            # a row with nothing visible so far keeps m = -inf; subtract 0 instead
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            # l_i sums the undropped probabilities; only the product with V is dropped
            p = tl.where(_keep(seed, drop_thresh, ctr_row0, offs_m[:, None], cols[None, :], ctr_sk), p, 0.0)
        v = _load_tile(_rows_at(v_base, start_n, stride_vs) + offs_n[:, None] * stride_vs + offs_dv[None, :], cols,
                       seqlen_k, offs_dv, head_dim_v, MASKED, PAD_DV)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def fwd_kernel(Q, K, V, O, LSE, BIAS, CU_Q, CU_K, ALIBI,
               stride_qb, stride_qs, stride_qh,
               stride_kb, stride_ks, stride_kh,
               stride_vb, stride_vs, stride_vh,
               stride_ob, stride_os, stride_oh,
               stride_lb, stride_lh, stride_ab, stride_ah,
               stride_bb, stride_bh, stride_bm, stride_bn,
               seqlen_q, seqlen_k, head_dim, head_dim_v, group, offset, left, right, qk_scale, softcap_pre,
               softcap_post, seed, drop_thresh, drop_scale, ctr_sb, ctr_sh, ctr_sk,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One program per (query block, query head, batch entry or sequence).  Q and K have
    ``head_dim`` (tiles BLOCK_D), V and O ``head_dim_v`` (tiles BLOCK_DV; MLA has Dv != D)."""
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    off_hk = (off_h // group).to(tl.int64)
    off_h = off_h.to(tl.int64)
    q_start, k_start, seqlen_q, seqlen_k, offset = _seq_bounds(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, offset,
                                                               IS_VARLEN)
    if IS_VARLEN:
        if start_m >= seqlen_q:
            return  # past the end of a shorter sequence

    rel_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + rel_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_base = _rows_at(Q + off_b * stride_qb + off_h * stride_qh, q_start, stride_qs)
    k_base = _rows_at(K + off_b * stride_kb + off_hk * stride_kh, k_start, stride_ks)
    v_base = _rows_at(V + off_b * stride_vb + off_hk * stride_vh, k_start, stride_vs)
    bias_base = BIAS + off_b * stride_bb + off_h * stride_bh
    ctr_row0 = off_b * ctr_sb + off_h * ctr_sh + q_start

    q = _load_tile(_rows_at(q_base, start_m, stride_qs) + rel_m[:, None] * stride_qs + offs_d[None, :], offs_m,
                   seqlen_q, offs_d, head_dim, not EVEN_M, PAD_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    slope2 = _alibi_slope2(ALIBI, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI)

    lo, full_lo, full_hi, hi = _block_ranges(start_m, seqlen_k, offset, left, right,
                                             BLOCK_M, BLOCK_N, EVEN_N, HAS_LEFT, HAS_RIGHT)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs,
                               offs_m, offs_n, offs_d, offs_dv, lo, full_lo,
                               seqlen_q, seqlen_k, head_dim, head_dim_v, offset, left, right, qk_scale, softcap_pre,
                               softcap_post, slope2, bias_base, stride_bm, stride_bn, seed, drop_thresh, ctr_row0,
                               ctr_sk, True, EVEN_M, PAD_D, PAD_DV, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                               HAS_DROPOUT, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs,
                               offs_m, offs_n, offs_d, offs_dv, full_lo, full_hi,
                               seqlen_q, seqlen_k, head_dim, head_dim_v, offset, left, right, qk_scale, softcap_pre,
                               softcap_post, slope2, bias_base, stride_bm, stride_bn, seed, drop_thresh, ctr_row0,
                               ctr_sk, False, EVEN_M, PAD_D, PAD_DV, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                               HAS_DROPOUT, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs,
                               offs_m, offs_n, offs_d, offs_dv, full_hi, hi,
                               seqlen_q, seqlen_k, head_dim, head_dim_v, offset, left, right, qk_scale, softcap_pre,
                               softcap_post, slope2, bias_base, stride_bm, stride_bn, seed, drop_thresh, ctr_row0,
                               ctr_sk, True, EVEN_M, PAD_D, PAD_DV, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                               HAS_DROPOUT, BLOCK_N, DOT_PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if HAS_DROPOUT:
        acc = acc * (drop_scale / l_safe)[:, None]
    else:
        acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)

    o_base = _rows_at(O + off_b * stride_ob + off_h * stride_oh, q_start, stride_os)
    _store_tile(_rows_at(o_base, start_m, stride_os) + rel_m[:, None] * stride_os + offs_dv[None, :],
                acc.to(O.dtype.element_ty),
                offs_m, seqlen_q, offs_dv, head_dim_v, not EVEN_M, PAD_DV)
    lse_ptrs = LSE + off_b * stride_lb + off_h * stride_lh + q_start + offs_m
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)


# --------------------------------------------------------------------------- backward


@triton.jit
def bwd_preprocess_kernel(O, DO, LSE, DLSE, DELTA, LSE2, CU_Q,
                          stride_ob, stride_os, stride_oh,
                          stride_dob, stride_dos, stride_doh,
                          stride_lb, stride_lh,
                          seqlen_q, head_dim,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                          EVEN_M: tl.constexpr, PAD_D: tl.constexpr, HAS_DLSE: tl.constexpr,
                          IS_VARLEN: tl.constexpr):
    """delta = rowsum(dO * O) - dlse; lse2 = lse * log2(e), with -inf rows turned into +inf.

    dS = P * (dP - delta): the rowsum term is the softmax Jacobian; a gradient
    flowing into lse adds P * dlse (d lse / d s = P), folded into delta here.  With
    dropout, O is the dropped output, and rowsum(dO * O) = rowsum(P * dP_dropped) still.
    """
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    q_start, _, seqlen_q, _, _ = _seq_bounds(CU_Q, CU_Q, off_b, seqlen_q, 0, 0, IS_VARLEN)
    if IS_VARLEN:
        if start_m >= seqlen_q:
            return  # past the end of a shorter sequence
    rel_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + rel_m
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(_rows_at(O + off_b * stride_ob + off_h * stride_oh, q_start + start_m, stride_os)
                   + rel_m[:, None] * stride_os + offs_d[None, :],
                   offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, PAD_D)
    do = _load_tile(_rows_at(DO + off_b * stride_dob + off_h * stride_doh, q_start + start_m, stride_dos)
                    + rel_m[:, None] * stride_dos + offs_d[None, :],
                    offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, PAD_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = off_b * stride_lb + off_h * stride_lh + q_start + offs_m
    if EVEN_M:
        lse = tl.load(LSE + row)
    else:
        lse = tl.load(LSE + row, mask=offs_m < seqlen_q, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    if HAS_DLSE:
        if EVEN_M:
            delta -= tl.load(DLSE + row)
        else:
            delta -= tl.load(DLSE + row, mask=offs_m < seqlen_q, other=0.0)
    if EVEN_M:
        tl.store(DELTA + row, delta)
        tl.store(LSE2 + row, lse2)
    else:
        tl.store(DELTA + row, delta, mask=offs_m < seqlen_q)
        tl.store(LSE2 + row, lse2, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse2_base, delta_base,
                    stride_qs, stride_dos, offs_n, offs_m, offs_d, offs_dv, lo, hi,
                    seqlen_q, seqlen_k, head_dim, head_dim_v, offset, left, right, qk_scale, softcap_pre, softcap_post, slope2,
                    bias_base, stride_bm, stride_bn, seed, drop_thresh, drop_scale, ctr_row0, ctr_sk,
                    MASKED: tl.constexpr, EVEN_N: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    WRITE_DK: tl.constexpr, WRITE_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                    CHUNK_D: tl.constexpr, CHUNK_DV: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [lo, hi).

    Works on transposed tiles (keys x queries) so both products reduce over
    the query axis: dV += (P Z)^T dO, dK += dS^T Q, with Z the dropout scale-or-zero.
    ``WRITE_DK``/``WRITE_DV`` false: skip that gradient (see ``bwd_dkdv_kernel``).
    ``CHUNK_D`` > 0: ``k``/``v`` are the (BLOCK_N, 1) row pointers of the key block, not
    tiles, and K Q^T and V dO^T reduce over the head dim in CHUNK_D/CHUNK_DV-wide slices
    reloaded each step (see ``bwd_dkdv_kernel``).
    """
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(_rows_at(q_base, start_m, stride_qs) + offs_m[:, None] * stride_qs + offs_d[None, :], rows,
                       seqlen_q, offs_d, head_dim, MASKED, PAD_D)
        do = _load_tile(_rows_at(do_base, start_m, stride_dos) + offs_m[:, None] * stride_dos + offs_dv[None, :],
                        rows, seqlen_q, offs_dv, head_dim_v, MASKED, PAD_DV)
        if MASKED:
            # rows past the end get lse2 = +inf, hence P = 0
            lse2 = tl.load(lse2_base + rows, mask=rows < seqlen_q, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=rows < seqlen_q, other=0.0)
        else:
            lse2 = tl.load(lse2_base + rows)
            delta = tl.load(delta_base + rows)
        if CHUNK_D > 0:
            q_rows = _rows_at(q_base, start_m, stride_qs) + offs_m[:, None] * stride_qs
            kqt = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for c in tl.static_range(0, offs_d.shape[0], CHUNK_D):
                offs_c = c + tl.arange(0, CHUNK_D)
                k_c = _load_tile(k + offs_c[None, :], offs_n, seqlen_k, offs_c, head_dim, not EVEN_N, PAD_D)
                q_c = _load_tile(q_rows + offs_c[None, :], rows, seqlen_q, offs_c, head_dim, MASKED, PAD_D)
                kqt = tl.dot(k_c, tl.trans(q_c), kqt, input_precision=DOT_PRECISION)
        else:
            kqt = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        st, tt = _scores(kqt, rows[None, :], offs_n[:, None],
                         qk_scale, softcap_pre, softcap_post, slope2, offset, HAS_SOFTCAP, HAS_ALIBI)
        if HAS_BIAS:
            st += _bias2(bias_base, rows[None, :], offs_n[:, None], stride_bm, stride_bn, seqlen_q, seqlen_k,
                         MASKED, not EVEN_N)
        pt = tl.exp2(st - lse2[None, :])
        if MASKED:
            vis = _visible(rows[None, :], offs_n[:, None], seqlen_k, offset, left, right, HAS_LEFT, HAS_RIGHT)
            pt = tl.where(vis, pt, 0.0)
        if HAS_DROPOUT:
            keep = _keep(seed, drop_thresh, ctr_row0, rows[None, :], offs_n[:, None], ctr_sk)
        if WRITE_DV:
            if HAS_DROPOUT:
                dv = tl.dot(tl.where(keep, pt * drop_scale, 0.0).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            else:
                dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if WRITE_DK:
            if CHUNK_DV > 0:
                do_rows = _rows_at(do_base, start_m, stride_dos) + offs_m[:, None] * stride_dos
                dpt = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for c in tl.static_range(0, offs_dv.shape[0], CHUNK_DV):
                    offs_c = c + tl.arange(0, CHUNK_DV)
                    v_c = _load_tile(v + offs_c[None, :], offs_n, seqlen_k, offs_c, head_dim_v, not EVEN_N, PAD_DV)
                    do_c = _load_tile(do_rows + offs_c[None, :], rows, seqlen_q, offs_c, head_dim_v, MASKED, PAD_DV)
                    dpt = tl.dot(v_c, tl.trans(do_c), dpt, input_precision=DOT_PRECISION)
            else:
                dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                dpt = tl.where(keep, dpt * drop_scale, 0.0)
            dst = pt * (dpt - delta[None, :])
            if HAS_SOFTCAP:
                dst = dst * (1.0 - tt * tt)  # d(cap * tanh(x / cap)) / dx
            dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def bwd_dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, BIAS, CU_Q, CU_K, ALIBI,
                    stride_qb, stride_qs, stride_qh,
                    stride_kb, stride_ks, stride_kh,
                    stride_vb, stride_vs, stride_vh,
                    stride_dob, stride_dos, stride_doh,
                    stride_dkb, stride_dks, stride_dkh,
                    stride_dvb, stride_dvs, stride_dvh,
                    stride_lb, stride_lh, stride_ab, stride_ah,
                    stride_bb, stride_bh, stride_bm, stride_bn,
                    seqlen_q, seqlen_k, head_dim, head_dim_v, group, offset, left, right, qk_scale, softcap_pre,
                    softcap_post, sm_scale, seed, drop_thresh, drop_scale, ctr_sb, ctr_sh, ctr_sk,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    WRITE_DK: tl.constexpr = True, WRITE_DV: tl.constexpr = True,
                    CHUNK_D: tl.constexpr = 0, CHUNK_DV: tl.constexpr = 0):
    """One program per (key block, kv head, batch entry or sequence).

    The program loops over every query head of its GQA group, so dK/dV are
    summed over the group in registers: no atomics, a fixed summation order.
    With head dims of 512 the two (BLOCK_N, 512) fp32 accumulators do not fit the
    registers beside the tiles even at 16 x 16: the launcher then runs the kernel
    twice, once for dK (``WRITE_DV`` false) and once for dV (``WRITE_DK`` false),
    recomputing P in each (the dV pass needs neither V nor dP).  There also the K and V
    tiles are not kept in registers (as an MMA's reduction operand a 16 x 512 tile is held
    whole by every warp: 128 registers a thread): with ``CHUNK_D`` > 0 K Q^T and V dO^T are
    summed over head-dim slices of CHUNK_D (CHUNK_DV) reloaded from cache each step.
    """
    start_n = tl.program_id(0) * BLOCK_N
    off_hk = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    q_start, k_start, seqlen_q, seqlen_k, offset = _seq_bounds(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, offset,
                                                               IS_VARLEN)
    if IS_VARLEN:
        if start_n >= seqlen_k:
            return  # past the end of a shorter sequence

    rel_n = tl.arange(0, BLOCK_N)
    offs_n = start_n + rel_n
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    k_rows = _rows_at(K + off_b * stride_kb + off_hk * stride_kh, k_start + start_n, stride_ks) \
        + rel_n[:, None] * stride_ks
    v_rows = _rows_at(V + off_b * stride_vb + off_hk * stride_vh, k_start + start_n, stride_vs) \
        + rel_n[:, None] * stride_vs
    if CHUNK_D > 0:
        k = k_rows  # tiles read in slices inside the loop
        v = v_rows
    else:
        k = _load_tile(k_rows + offs_d[None, :], offs_n, seqlen_k, offs_d, head_dim, not EVEN_N, PAD_D)
        if WRITE_DK:
            v = _load_tile(v_rows + offs_dv[None, :], offs_n, seqlen_k, offs_dv, head_dim_v, not EVEN_N, PAD_DV)
        else:
            v = k  # unused: the dV pass needs no dP
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # queries that see this key block: the transposed band (offset -> -offset, left <-> right)
    lo, full_lo, full_hi, hi = _block_ranges(start_n, seqlen_q, -offset, right, left,
                                             BLOCK_N, BLOCK_M, EVEN_M, HAS_RIGHT, HAS_LEFT)
    for g in range(0, group):
        off_h = off_hk * group + g
        q_base = _rows_at(Q + off_b * stride_qb + off_h * stride_qh, q_start, stride_qs)
        do_base = _rows_at(DO + off_b * stride_dob + off_h * stride_doh, q_start, stride_dos)
        lse2_base = LSE2 + off_b * stride_lb + off_h * stride_lh + q_start
        delta_base = DELTA + off_b * stride_lb + off_h * stride_lh + q_start
        bias_base = BIAS + off_b * stride_bb + off_h * stride_bh
        ctr_row0 = off_b * ctr_sb + off_h * ctr_sh + q_start
        slope2 = _alibi_slope2(ALIBI, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse2_base, delta_base,
                                 stride_qs, stride_dos, offs_n, offs_m, offs_d, offs_dv, lo, full_lo,
                                 seqlen_q, seqlen_k, head_dim, head_dim_v, offset, left, right, qk_scale, softcap_pre,
                                 softcap_post, slope2, bias_base, stride_bm, stride_bn, seed, drop_thresh,
                                 drop_scale, ctr_row0, ctr_sk,
                                 True, EVEN_N, PAD_D, PAD_DV, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                                 HAS_DROPOUT, BLOCK_M, DOT_PRECISION, WRITE_DK, WRITE_DV, BLOCK_N,
                                 CHUNK_D, CHUNK_DV)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse2_base, delta_base,
                                 stride_qs, stride_dos, offs_n, offs_m, offs_d, offs_dv, full_lo, full_hi,
                                 seqlen_q, seqlen_k, head_dim, head_dim_v, offset, left, right, qk_scale, softcap_pre,
                                 softcap_post, slope2, bias_base, stride_bm, stride_bn, seed, drop_thresh,
                                 drop_scale, ctr_row0, ctr_sk,
                                 False, EVEN_N, PAD_D, PAD_DV, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                                 HAS_DROPOUT, BLOCK_M, DOT_PRECISION, WRITE_DK, WRITE_DV, BLOCK_N,
                                 CHUNK_D, CHUNK_DV)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse2_base, delta_base,
                                 stride_qs, stride_dos, offs_n, offs_m, offs_d, offs_dv, full_hi, hi,
                                 seqlen_q, seqlen_k, head_dim, head_dim_v, offset, left, right, qk_scale, softcap_pre,
                                 softcap_post, slope2, bias_base, stride_bm, stride_bn, seed, drop_thresh,
                                 drop_scale, ctr_row0, ctr_sk,
                                 True, EVEN_N, PAD_D, PAD_DV, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                                 HAS_DROPOUT, BLOCK_M, DOT_PRECISION, WRITE_DK, WRITE_DV, BLOCK_N,
                                 CHUNK_D, CHUNK_DV)

    if WRITE_DK:
        dk = dk * sm_scale
        _store_tile(_rows_at(DK + off_b * stride_dkb + off_hk * stride_dkh, k_start + start_n, stride_dks)
                    + rel_n[:, None] * stride_dks + offs_d[None, :],
                    dk.to(DK.dtype.element_ty), offs_n, seqlen_k, offs_d, head_dim, not EVEN_N, PAD_D)
    if WRITE_DV:
        _store_tile(_rows_at(DV + off_b * stride_dvb + off_hk * stride_dvh, k_start + start_n, stride_dvs)
                    + rel_n[:, None] * stride_dvs + offs_dv[None, :],
                    dv.to(DV.dtype.element_ty), offs_n, seqlen_k, offs_dv, head_dim_v, not EVEN_N, PAD_DV)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs,
                  offs_m, offs_n, offs_d, offs_dv, lo, hi,
                  seqlen_q, seqlen_k, head_dim, head_dim_v, offset, left, right, qk_scale, softcap_pre, softcap_post, slope2,
                  bias_base, stride_bm, stride_bn, dbias_base, stride_dbm,
                  seed, drop_thresh, drop_scale, ctr_row0, ctr_sk,
                  MASKED: tl.constexpr, EVEN_M: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BIAS_GRAD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(_rows_at(k_base, start_n, stride_ks) + offs_n[:, None] * stride_ks + offs_d[None, :], cols,
                       seqlen_k, offs_d, head_dim, MASKED, PAD_D)
        v = _load_tile(_rows_at(v_base, start_n, stride_vs) + offs_n[:, None] * stride_vs + offs_dv[None, :], cols,
                       seqlen_k, offs_dv, head_dim_v, MASKED, PAD_DV)
        s, t = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), offs_m[:, None], cols[None, :],
                       qk_scale, softcap_pre, softcap_post, slope2, offset, HAS_SOFTCAP, HAS_ALIBI)
        if HAS_BIAS:
            s += _bias2(bias_base, offs_m[:, None], cols[None, :], stride_bm, stride_bn, seqlen_q, seqlen_k,
                        not EVEN_M, MASKED)
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            # also masks columns past the end, whose zero keys would give P = exp(-lse) != 0
            vis = _visible(offs_m[:, None], cols[None, :], seqlen_k, offset, left, right, HAS_LEFT, HAS_RIGHT)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _keep(seed, drop_thresh, ctr_row0, offs_m[:, None], cols[None, :], ctr_sk)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            # dS w.r.t. the final score (before the softcap chain factor) is the bias gradient;
            # every visible (row, key) pair is visited exactly once, here.
            db_ptrs = dbias_base + offs_m[:, None].to(tl.int64) * stride_dbm + cols[None, :]
            if MASKED:
                tl.store(db_ptrs, ds, mask=(offs_m[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))
            elif EVEN_M:
                tl.store(db_ptrs, ds)
            else:
                tl.store(db_ptrs, ds, mask=offs_m[:, None] < seqlen_q)
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def bwd_dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ, BIAS, DBIAS, CU_Q, CU_K, ALIBI,
                  stride_qb, stride_qs, stride_qh,
                  stride_kb, stride_ks, stride_kh,
                  stride_vb, stride_vs, stride_vh,
                  stride_dob, stride_dos, stride_doh,
                  stride_dqb, stride_dqs, stride_dqh,
                  stride_lb, stride_lh, stride_ab, stride_ah,
                  stride_bb, stride_bh, stride_bm, stride_bn,
                  stride_dbb, stride_dbh, stride_dbm,
                  seqlen_q, seqlen_k, head_dim, head_dim_v, group, offset, left, right, qk_scale, softcap_pre,
                  softcap_post, sm_scale, seed, drop_thresh, drop_scale, ctr_sb, ctr_sh, ctr_sk,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per (query block, query head, batch entry or sequence); loops over key blocks.
    Also writes dBias (float32, (B, H, Sq, Sk), contiguous keys) when asked."""
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    off_hk = (off_h // group).to(tl.int64)
    off_h = off_h.to(tl.int64)
    q_start, k_start, seqlen_q, seqlen_k, offset = _seq_bounds(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, offset,
                                                               IS_VARLEN)
    if IS_VARLEN:
        if start_m >= seqlen_q:
            return  # past the end of a shorter sequence

    rel_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + rel_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = _load_tile(_rows_at(Q + off_b * stride_qb + off_h * stride_qh, q_start + start_m, stride_qs)
                   + rel_m[:, None] * stride_qs + offs_d[None, :],
                   offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, PAD_D)
    do = _load_tile(_rows_at(DO + off_b * stride_dob + off_h * stride_doh, q_start + start_m, stride_dos)
                    + rel_m[:, None] * stride_dos + offs_dv[None, :],
                    offs_m, seqlen_q, offs_dv, head_dim_v, not EVEN_M, PAD_DV)
    row = off_b * stride_lb + off_h * stride_lh + q_start + offs_m
    if EVEN_M:
        lse2 = tl.load(LSE2 + row)
        delta = tl.load(DELTA + row)
    else:
        lse2 = tl.load(LSE2 + row, mask=offs_m < seqlen_q, other=float("inf"))
        delta = tl.load(DELTA + row, mask=offs_m < seqlen_q, other=0.0)

    k_base = _rows_at(K + off_b * stride_kb + off_hk * stride_kh, k_start, stride_ks)
    v_base = _rows_at(V + off_b * stride_vb + off_hk * stride_vh, k_start, stride_vs)
    bias_base = BIAS + off_b * stride_bb + off_h * stride_bh
    dbias_base = DBIAS + off_b * stride_dbb + off_h * stride_dbh
    ctr_row0 = off_b * ctr_sb + off_h * ctr_sh + q_start
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    slope2 = _alibi_slope2(ALIBI, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI)
    lo, full_lo, full_hi, hi = _block_ranges(start_m, seqlen_k, offset, left, right,
                                             BLOCK_M, BLOCK_N, EVEN_N, HAS_LEFT, HAS_RIGHT)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs,
                       offs_m, offs_n, offs_d, offs_dv, lo, full_lo, seqlen_q, seqlen_k, head_dim, head_dim_v, offset,
                       left, right, qk_scale, softcap_pre, softcap_post, slope2, bias_base, stride_bm, stride_bn,
                       dbias_base, stride_dbm, seed, drop_thresh, drop_scale, ctr_row0, ctr_sk,
                       True, EVEN_M, PAD_D, PAD_DV, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_GRAD,
                       HAS_DROPOUT, BLOCK_N, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs,
                       offs_m, offs_n, offs_d, offs_dv, full_lo, full_hi, seqlen_q, seqlen_k, head_dim, head_dim_v, offset,
                       left, right, qk_scale, softcap_pre, softcap_post, slope2, bias_base, stride_bm, stride_bn,
                       dbias_base, stride_dbm, seed, drop_thresh, drop_scale, ctr_row0, ctr_sk,
                       False, EVEN_M, PAD_D, PAD_DV, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_GRAD,
                       HAS_DROPOUT, BLOCK_N, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs,
                       offs_m, offs_n, offs_d, offs_dv, full_hi, hi, seqlen_q, seqlen_k, head_dim, head_dim_v, offset,
                       left, right, qk_scale, softcap_pre, softcap_post, slope2, bias_base, stride_bm, stride_bn,
                       dbias_base, stride_dbm, seed, drop_thresh, drop_scale, ctr_row0, ctr_sk,
                       True, EVEN_M, PAD_D, PAD_DV, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_GRAD,
                       HAS_DROPOUT, BLOCK_N, DOT_PRECISION)
    dq = dq * sm_scale
    _store_tile(_rows_at(DQ + off_b * stride_dqb + off_h * stride_dqh, q_start + start_m, stride_dqs)
                + rel_m[:, None] * stride_dqs + offs_d[None, :],
                dq.to(DQ.dtype.element_ty), offs_m, seqlen_q, offs_d, head_dim, not EVEN_M, PAD_D)
