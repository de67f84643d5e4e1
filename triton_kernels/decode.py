"""Triton kernels for KV-cache decoding with split-KV ("flash-decoding").

``decode_split_kernel``: one program per (split, row block x kv head, batch).  The
rows of a program are the query rows of one GQA group, ``r = i * group + g`` for
query position i and head ``kv_head * group + g``, so the group's heads share every
K/V tile they read (decode is bound by reading the cache; this reads it once per
kv head, not once per query head).  The program walks its share of the cache
positions in BLOCK_N tiles, reads each key's page through the block table, and
writes its normalised partial output and its lse.

``combine_kernel``: merges the splits of one (query row, head):
``lse = log sum_s exp(lse_s)``, ``out = sum_s exp(lse_s - lse) out_s``.  With one
split the split kernel writes the final output itself and no combine runs.

Conventions (as ``attention.py``): scores in base 2 (``exp2``), lse stored as the
natural log, a row that sees no key gives out 0 and lse -inf, and positions are
absolute cache indices: the valid keys of batch b are ``[leftpad[b], seqlens[b])``
and query row i sits at ``seqlens[b] - seqlen_q + i``; key p is visible to it iff
``i + offset - left <= p <= i + offset + right`` with ``offset = seqlens[b] - seqlen_q``.

The paged layout is (num_blocks, page_size, heads_k, headdim); position p of
sequence b is row ``p % page_size`` of block ``BLOCK_TABLE[b, p // page_size]``.  A
contiguous cache arrives as one page per sequence (``PAGED`` false: no division).

8-bit caches (``QUANT`` > 0; flashattn_lite/quant.py): K and V hold codes, int8 (1) or
float8_e4m3fn (2: its bits, decoded here with integer operations, for architectures and
the interpreter without fp8 conversions; 3: Triton's fp8 type, sm_89 and later), and
KD/VD a float32 descale per (block, row, kv head).  A tile's codes are widened right after
the load to q's dtype (exact: every int8 and e4m3 value is a bf16/fp16 value), the
product runs as for a float cache, each position's key descale multiplies its score
column, and its value descale its probability column, which is then divided by a running
max (so the weights stay in [-1, 1] whatever the descales' size): the cache is never
scaled.

Head dims: Q and K have ``head_dim``, V and the outputs ``head_dim_v`` (absorbed MLA
decodes with one kv head, D = 576 = 512 latent + 64 rope dims, and Dv = 512).  A D
that is not a power of two above BLOCK_D is read as two tiles, BLOCK_D wide and a
BLOCK_DT tail (576 = 512 + 64; padding it to 1024 would double the q.k registers),
and q.k is the sum of the two products.
"""

import triton
import triton.language as tl

from .attention import tanh

LOG2E = 1.4426950408889634


@triton.jit
def _widen_codes(x, QUANT: tl.constexpr):
    """8-bit cache codes as float32 (see the module docstring for ``QUANT``)."""
    if QUANT == 2:
        # e4m3fn bits s eeee mmm: a normal code is float32 bits with the exponent rebiased
        # (+120) and the mantissa moved up 20 bits; a subnormal (e = 0) is m * 2^-9; 0x7F is NaN
        b = x.to(tl.int32)
        mag = b & 0x7F
        sign = (b & 0x80) << 24
        normal = (((mag << 20) + (120 << 23)) | sign).to(tl.float32, bitcast=True)
        sub = (b & 7).to(tl.float32) * 0.001953125
        sub = tl.where((b & 0x80) != 0, -sub, sub)
        val = tl.where((b & 0x78) == 0, sub, normal)
        return tl.where(mag == 0x7F, float("nan"), val)
    else:
        return x.to(tl.float32)



@triton.jit
def _decode_tile(acc, m_i, l_i, r_i, q, q_tail, K, V, KD, VD, table_row, hk_off_k, hk_off_v, hk_off_kd, hk_off_vd,
                 start_n, split_hi, qpos,
                 offs_n, offs_d, offs_dt, offs_dv, head_dim, head_dim_v, page_size, left, right, qk_scale,
                 softcap_pre, softcap_post, slope2, stride_kb, stride_ks, stride_vb, stride_vs,
                 stride_kdb, stride_kds, stride_vdb, stride_vds,
                 PAGED: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, QUANT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One BLOCK_N tile of cache positions [start_n, start_n + BLOCK_N) folded into the
    online softmax of the rows (positions ``qpos``).  With an 8-bit cache, ``r_i`` is the
    running max of the descaled weights (see below); otherwise it passes through."""
    cols = start_n + offs_n
    in_range = cols < split_hi
    if PAGED:
        # any page size: each position finds its own page (a gather)
        blk = tl.load(table_row + cols // page_size, mask=in_range, other=0).to(tl.int64)
        row = cols % page_size
    else:
        blk = tl.load(table_row).to(tl.int64) + tl.zeros_like(cols).to(tl.int64)
        row = cols
    k_rows = blk * stride_kb + row.to(tl.int64) * stride_ks + hk_off_k
    v_rows = blk * stride_vb + row.to(tl.int64) * stride_vs + hk_off_v
    if PAD_D and BLOCK_DT == 0:
        kt = tl.load(K + k_rows[None, :] + offs_d[:, None], mask=in_range[None, :] & (offs_d[:, None] < head_dim),
                     other=0.0)
    else:
        kt = tl.load(K + k_rows[None, :] + offs_d[:, None], mask=in_range[None, :], other=0.0)
    if PAD_DV:
        v = tl.load(V + v_rows[:, None] + offs_dv[None, :],
                    mask=in_range[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    else:
        v = tl.load(V + v_rows[:, None] + offs_dv[None, :], mask=in_range[:, None], other=0.0)

    if QUANT > 0:  # codes -> q's dtype (exact), right after the load
        kt = _widen_codes(kt, QUANT).to(q.dtype)
        v = _widen_codes(v, QUANT).to(q.dtype)
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if BLOCK_DT > 0:
        kt_tail = tl.load(K + k_rows[None, :] + offs_dt[:, None],
                          mask=in_range[None, :] & (offs_dt[:, None] < head_dim), other=0.0)
        if QUANT > 0:
            kt_tail = _widen_codes(kt_tail, QUANT).to(q.dtype)
        qk = tl.dot(q_tail, kt_tail, qk, input_precision=DOT_PRECISION)
    if QUANT > 0:  # each position's key descale scales its score column
        kd = tl.load(KD + blk * stride_kdb + row.to(tl.int64) * stride_kds + hk_off_kd, mask=in_range, other=0.0)
        qk = qk * kd[None, :]
    if HAS_SOFTCAP:
        s = tanh(qk * softcap_pre) * softcap_post
    else:
        s = qk * qk_scale
    rel = cols[None, :] - qpos[:, None]  # key position minus query position
    if HAS_ALIBI:
        s = s - slope2[:, None] * tl.where(rel < 0, -rel, rel).to(tl.float32)
    vis = in_range[None, :]
    if HAS_RIGHT:
        vis = vis & (rel <= right)
    if HAS_LEFT:
        vis = vis & (rel >= -left)
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row with nothing visible so far keeps m = -inf; subtract 0 instead
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if QUANT > 0:
        # Each position's value descale scales its probability column, and the products are
        # divided by a running max of their magnitude, r: the weights the product sees stay
        # in [-1, 1] with the largest at 1 whatever the descales' size (P * descale alone fell
        # into float16's subnormals for small descales).  acc holds the sum divided by r; the
        # row's result is acc * r / l.
        vd = tl.load(VD + blk * stride_vdb + row.to(tl.int64) * stride_vds + hk_off_vd, mask=in_range, other=0.0)
        p = p * vd[None, :]
        r_old = r_i * alpha
        r_new = tl.maximum(r_old, tl.max(tl.abs(p), 1))
        inv = 1.0 / tl.where(r_new > 0, r_new, 1.0)  # (r_new = 0: every weight so far is 0)
        acc = acc * (r_old * inv)[:, None]
        acc = tl.dot((p * inv[:, None]).to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    else:
        r_new = r_i
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i, r_new


@triton.jit
def decode_split_kernel(Q, K, V, O, LSE, BLOCK_TABLE, SEQLENS, LEFTPAD, ALIBI, KD, VD,
                        stride_qb, stride_qs, stride_qh,
                        stride_kb, stride_ks, stride_kh,
                        stride_vb, stride_vs, stride_vh,
                        stride_kdb, stride_kds, stride_kdh,
                        stride_vdb, stride_vds, stride_vdh,
                        stride_osplit, stride_ob, stride_os, stride_oh,
                        stride_lsplit, stride_lb, stride_lh,
                        stride_tb, stride_ab, stride_ah,
                        seqlen_q, head_dim, head_dim_v, heads_k, group, page_size, left, right,
                        qk_scale, softcap_pre, softcap_post,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DT: tl.constexpr, BLOCK_DV: tl.constexpr,
                        PAGED: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
                        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        HAS_ALIBI: tl.constexpr, QUANT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per (split, row block x kv head, batch); see the module docstring.

    O/LSE are the partial buffers (split, batch, seqlen_q, heads, head_dim_v) float32 and
    (split, batch, heads, seqlen_q), or with one split the final out and lse.  BLOCK_DT > 0:
    Q/K dims [BLOCK_D, head_dim) are the second tile (PAD_D then pads that tile only).
    """
    split = tl.program_id(0)
    num_splits = tl.num_programs(0)
    n_rows = seqlen_q * group
    row_blocks = tl.cdiv(n_rows, BLOCK_M)
    off_hk = tl.program_id(1) // row_blocks
    start_m = (tl.program_id(1) % row_blocks) * BLOCK_M
    off_b = tl.program_id(2).to(tl.int64)

    r = start_m + tl.arange(0, BLOCK_M)
    row_ok = r < n_rows
    qi = r // group
    head = off_hk * group + r % group
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if BLOCK_DT > 0:
        offs_dt = BLOCK_D + tl.arange(0, BLOCK_DT)
    else:
        offs_dt = offs_d  # unused

    end = tl.load(SEQLENS + off_b)
    if HAS_LEFTPAD:
        start = tl.load(LEFTPAD + off_b)
    else:
        start = 0
    offset = end - seqlen_q
    qpos = qi + offset

    # cache positions any row of this block may see, divided evenly among the splits
    last_i = tl.minimum(start_m + BLOCK_M - 1, n_rows - 1) // group
    lo = start
    hi = end
    if HAS_LEFT:
        lo = tl.maximum(lo, start_m // group + offset - left)
    if HAS_RIGHT:
        hi = tl.minimum(hi, last_i + offset + right + 1)
    hi = tl.maximum(hi, lo)
    per_split = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    split_lo = tl.minimum(lo + split * per_split, hi)
    split_hi = tl.minimum(split_lo + per_split, hi)

    q_rows = off_b * stride_qb + qi.to(tl.int64) * stride_qs + head.to(tl.int64) * stride_qh
    if PAD_D and BLOCK_DT == 0:
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < head_dim),
                    other=0.0)
    else:
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if BLOCK_DT > 0:
        q_tail = tl.load(Q + q_rows[:, None] + offs_dt[None, :],
                         mask=row_ok[:, None] & (offs_dt[None, :] < head_dim), other=0.0)
    else:
        q_tail = q  # unused
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + off_b * stride_ab + head * stride_ah, mask=row_ok, other=0.0) * 1.4426950408889634
    else:
        slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    table_row = BLOCK_TABLE + off_b * stride_tb
    hk_off_k = off_hk.to(tl.int64) * stride_kh
    hk_off_v = off_hk.to(tl.int64) * stride_vh
    hk_off_kd = off_hk.to(tl.int64) * stride_kdh
    hk_off_vd = off_hk.to(tl.int64) * stride_vdh
    for start_n in range(split_lo, split_hi, BLOCK_N):
        acc, m_i, l_i, r_i = _decode_tile(acc, m_i, l_i, r_i, q, q_tail, K, V, KD, VD, table_row, hk_off_k, hk_off_v,
                                     hk_off_kd, hk_off_vd, start_n,
                                     split_hi, qpos, offs_n, offs_d, offs_dt, offs_dv, head_dim, head_dim_v,
                                     page_size, left, right, qk_scale, softcap_pre, softcap_post, slope2,
                                     stride_kb, stride_ks, stride_vb, stride_vs,
                                     stride_kdb, stride_kds, stride_vdb, stride_vds,
                                     PAGED, PAD_D, PAD_DV, BLOCK_DT, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
                                     QUANT, DOT_PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if QUANT > 0:  # acc holds the sum divided by r
        acc = acc * (r_i / l_safe)[:, None]
    else:
        acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)

    split = split.to(tl.int64)
    o_rows = split * stride_osplit + off_b * stride_ob + qi.to(tl.int64) * stride_os + head.to(tl.int64) * stride_oh
    if PAD_DV:
        tl.store(O + o_rows[:, None] + offs_dv[None, :], acc.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    else:
        tl.store(O + o_rows[:, None] + offs_dv[None, :], acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + split * stride_lsplit + off_b * stride_lb + head.to(tl.int64) * stride_lh + qi, lse, mask=row_ok)


@triton.jit
def combine_kernel(PART_O, PART_LSE, O, LSE,
                   stride_psplit, stride_pb, stride_ps, stride_ph,
                   stride_qsplit, stride_qb, stride_qh,
                   stride_ob, stride_os, stride_oh,
                   stride_lb, stride_lh,
                   num_splits, head_dim,
                   BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr):
    """One program per (query row, head, batch): merge ``num_splits`` partial results
    (``head_dim`` here is the value head dim: the outputs' width),
    BLOCK_S splits at a time with a running max (any number of splits, bounded registers).
    Splits that saw no key have lse -inf and weigh 0; if all did, out 0 and lse -inf."""
    off_i = tl.program_id(0).to(tl.int64)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_base = PART_LSE + off_b * stride_qb + off_h * stride_qh + off_i
    o_base = PART_O + off_b * stride_pb + off_i * stride_ps + off_h * stride_ph

    m = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        splits = s0 + offs_s
        ok = splits < num_splits
        lse_s = tl.load(lse_base + splits.to(tl.int64) * stride_qsplit, mask=ok, other=float("-inf"))
        lse_s = lse_s * 1.4426950408889634
        m_new = tl.maximum(m, tl.max(lse_s, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(lse_s - m_use)  # 0 for empty splits
        alpha = tl.exp2(m - m_use)
        if PAD_D:
            part = tl.load(o_base + splits[:, None].to(tl.int64) * stride_psplit + offs_d[None, :],
                           mask=ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
        else:
            part = tl.load(o_base + splits[:, None].to(tl.int64) * stride_psplit + offs_d[None, :],
                           mask=ok[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * part, 0)
        total = total * alpha + tl.sum(w, 0)
        m = m_new

    empty = total == 0.0
    t_safe = tl.where(empty, 1.0, total)
    out = acc / t_safe
    lse = tl.where(empty, float("-inf"), (m + tl.log2(t_safe)) / 1.4426950408889634)
    o_ptrs = O + off_b * stride_ob + off_i * stride_os + off_h * stride_oh + offs_d
    if PAD_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_d < head_dim)
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty))
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + off_i + tl.arange(0, 1), lse)
