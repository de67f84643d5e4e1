"""Functional API: validate inputs, normalise layout, pick a backend, call the op.

Everything a user can get wrong is checked here, on the host, before any kernel
runs, and raises an exception that names the problem.
"""

import numbers

import torch

from . import backends, checks, ops, rng  # ops registers torch.ops.flashattn_lite.*
from .backends import select_backend
from .checks import MAX_DECODE_HEAD_DIM, MAX_HEAD_DIM, SUPPORTED_DTYPES  # noqa: F401  (re-exported)
from .checks import check_alibi, check_dropout, check_scale, check_softcap, check_tensor, check_window
from .planning import unbounded_if_beyond


def _unit_last_stride(t):
    # Kernels address the head dim with stride 1; anything else is copied once.
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def autocast_dtype(t, device_type):
    """The dtype ``t`` has after :func:`autocast_inputs` on ``device_type``: inside
    ``torch.autocast`` there, a floating dtype other than float64 becomes the autocast dtype
    (as torch casts for its own SDPA, a lower-precision op); else ``t``'s own."""
    if (device_type in ("cpu", "cuda") and t.is_floating_point() and t.dtype != torch.float64
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def autocast_inputs(*tensors):
    """The tensors cast as torch.autocast for the first one's device casts torch's SDPA
    inputs (:func:`autocast_dtype`); anything that is not a tensor passes unchanged."""
    device_type = next(t.device.type for t in tensors if isinstance(t, torch.Tensor))
    return tuple(t.to(autocast_dtype(t, device_type)) if isinstance(t, torch.Tensor) else t for t in tensors)


def _validate_qkv(q, k, v, names, layout, packed=False):
    """Checks common to both layouts; tensors given as logical (B, S, H, D), or as packed
    (S, H, D) with ``packed`` (one batch of them)."""
    nq, nk, nv = names
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{nq}, {nk}, {nv} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{nq}, {nk}, {nv} must be on one device, got {q.device}, {k.device}, {v.device}")
    qs, ks, vs = ((1, *t.shape) for t in (q, k, v)) if packed else (q.shape, k.shape, v.shape)
    b, _, hq, d = qs
    if ks[:3] != vs[:3]:
        raise ValueError(f"{nk} and {nv} must have the same shape {layout} except the head dim (which may "
                         f"differ: MLA), got {tuple(k.shape)} and {tuple(v.shape)}")
    if ks[0] != b:
        raise ValueError(f"batch size differs: {nq} has {b}, {nk} has {ks[0]}")
    if ks[3] != d:
        raise ValueError(f"head dim differs: {nq} has {d}, {nk} has {ks[3]} (only {nv}'s head dim may "
                         "differ)")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in 1..{MAX_HEAD_DIM}, got {d}")
    if not 1 <= vs[3] <= MAX_HEAD_DIM:
        raise ValueError(f"value head dim must be in 1..{MAX_HEAD_DIM}, got {vs[3]}")
    hk = ks[2]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"number of query heads ({hq}) must be a multiple of the number of key/value heads ({hk})")
    if qs[1] > checks.INT32_MAX or ks[1] > checks.INT32_MAX:
        checks.check_seqlen(f"seqlen of {nq}", qs[1])
        checks.check_seqlen(f"seqlen of {nk}", ks[1])


def _bound_for_choice(head_dim):
    for bound in sorted({256, MAX_HEAD_DIM, checks.MAX_DECODE_HEAD_DIM}):
        if head_dim <= bound:
            return bound
    return checks.MAX_DECODE_HEAD_DIM + 1


def _head_dims_for_choice(head_dim, head_dim_v):
    """(head dim, value head dim or None when equal) as the backend choice sees them.  Under
    torch.compile with dynamic shapes they may be symbolic, and the choice (a constant of the
    graph) needs plain ints; the backends' capabilities only differ by which bound (256,
    MAX_HEAD_DIM, the decoding limit) a head dim is under, and by whether the two are equal,
    so that is what is guarded on and passed."""
    if not torch.compiler.is_compiling():
        return int(head_dim), (None if head_dim_v == head_dim else int(head_dim_v))
    return _bound_for_choice(head_dim), (None if head_dim_v == head_dim else _bound_for_choice(head_dim_v))


def _run(q, k, v, softmax_scale, diag_offset, window_left, window_right, softcap=0.0, alibi_slopes=None, bias=None,
         cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, dropout_p=0.0, learnable_sink=None):
    checks.check_scale_over_softcap(softmax_scale, softcap)
    seed = rng.draw_seed() if dropout_p > 0 else 0
    params = backends.Params(softmax_scale=softmax_scale, diag_offset=diag_offset, window_left=window_left,
                             window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes, bias=bias,
                             cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                             max_seqlen_k=max_seqlen_k, dropout_p=dropout_p, dropout_seed=seed)
    features = set(params.features())  # (frozenset |= breaks torch 2.11's dynamo: "update on a frozenset")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias, learnable_sink)):
        features.add("backward")  # chosen once for both passes: a backend without this backward is passed over
    features = frozenset(features)
    head_dim, head_dim_v = _head_dims_for_choice(q.shape[-1], v.shape[-1])
    backend = select_backend(q.device, q.dtype, head_dim, features, head_dim_v)
    if dropout_p > 0:
        rng.note_call(params, q, k)
    return ops.run_fwd(q, k, v, params, backend, learnable_sink)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, learnable_sink=None):
    """Exact attention in flash-attn's layout.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k, v: (batch, seqlen_k, nheads_k, headdim); ``nheads % nheads_k == 0`` (GQA/MQA).
        softmax_scale: defaults to ``headdim ** -0.5``.
        causal: bottom-right aligned when seqlen_q != seqlen_k: query i sees keys
            ``j <= i + seqlen_k - seqlen_q`` (flash-attn >= 2.1).
        window_size: (left, right) local attention on the same diagonal; -1 = unbounded.
        softcap: > 0 caps the scaled scores at ``softcap * tanh(s / softcap)`` (Gemma 2); 0 = off.
        alibi_slopes: (nheads,) or (batch, nheads); adds ``-slope * |i + seqlen_k - seqlen_q - j|``.
        dropout_p: probability of dropping an attention probability (Philox, seeded from torch's
            default generator; see ``flashattn_lite.testing.record_dropout`` for the mask).
        deterministic: accepted for compatibility; every backward here is deterministic.
        return_attn_probs: also return ``softmax_lse`` (float32, (batch, nheads, seqlen_q)).
        learnable_sink: None, or a float tensor (nheads,): one extra logit per query head whose
            value is 0 (gpt-oss's attention sinks): row i of head h normalises over its visible
            scores plus ``learnable_sink[h]``.  ``softmax_lse`` leaves the sink out.  The sink
            receives a gradient when it requires grad.

    Returns ``out`` (batch, seqlen_q, nheads, headdim), or ``(out, softmax_lse, None)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4, "(batch, seqlen, heads, headdim)")
    q, k, v = autocast_inputs(q, k, v)
    _validate_qkv(q, k, v, ("q", "k", "v"), "(batch, seqlen, heads, headdim)")
    dropout_p = check_dropout(dropout_p)
    softcap = check_softcap(softcap)
    slopes = check_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else check_scale(softmax_scale, "softmax_scale")
    left, right = check_window(window_size)
    if causal:
        right = 0
    left, right = unbounded_if_beyond(left, right, q.shape[1], k.shape[1])
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    sink = checks.check_sink(learnable_sink, q.shape[2], q.device)
    out, lse = _run(q, k, v, scale, k.shape[1] - q.shape[1], left, right, softcap, slopes, dropout_p=dropout_p,
                    learnable_sink=sink)
    if return_attn_probs:
        return out, lse, None
    return out


def _attn_mask_as_bias(attn_mask, q, k):
    """torch's attn_mask (bool: True = may attend; float: added to the scores), broadcastable
    to (batch, heads, Sq, Sk) -> an additive bias viewed as (B, H, Sq, Sk) (stride 0 on
    broadcast dims, no copy for float masks).  A float mask keeps its autograd history."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
    full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    try:
        ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, full) == full
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch, heads, "
                         f"seqlen_q, seqlen_k) = {full}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {q.device}")
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
        bias = bias.expand(attn_mask.shape) if bias.dim() == 0 else bias
    elif attn_mask.is_floating_point():
        bias = attn_mask.to(_float_mask_dtype(attn_mask, q.dtype))
    else:
        raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    return bias.expand(full)


def _float_mask_dtype(attn_mask, dtype):
    """The dtype the kernels read a float mask in.  They add it to float32 scores, so a
    16-bit call reads a mask of another float dtype in float32 (exact for the 16-bit
    formats; a float32 mask is not rounded to the call's dtype)."""
    if dtype in (torch.float16, torch.bfloat16) and attn_mask.dtype != dtype:
        return torch.float32
    return dtype


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, learnable_sink=None):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Layout (batch, heads, seqlen, headdim) (or (heads, seqlen, headdim)); causal is
    aligned top-left as in torch: query i sees keys ``j <= i``.  With
    ``enable_gqa=True`` key/value may have fewer heads than query.  Internally
    the tensors are viewed as (B, S, H, D) through strides: nothing is copied.

    ``attn_mask``: bool (True = may attend) or float (added to the scaled scores),
    broadcastable to (batch, heads, seqlen_q, seqlen_k).  A float mask that requires
    grad receives its gradient (summed over broadcast dims).  A row that may attend to
    nothing gives 0 (torch's math path gives NaN there).

    ``learnable_sink`` (an extension; torch has none): None or (heads,) float, attention
    sinks as in :func:`flash_attn_func`.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    unbatched = query.dim() == 3
    if unbatched and key.dim() == 3 and value.dim() == 3:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, 4, "(batch, heads, seqlen, headdim)")
    query, key, value, attn_mask = autocast_inputs(query, key, value, attn_mask)
    dropout_p = check_dropout(dropout_p)
    if attn_mask is not None and is_causal:
        raise ValueError("pass either attn_mask or is_causal=True, not both (as torch)")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"query has {query.shape[1]} heads and key {key.shape[1]}: pass enable_gqa=True for "
                         "grouped-query attention")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    _validate_qkv(q, k, v, ("query", "key", "value"), "(batch, heads, seqlen, headdim)")
    bias = None if attn_mask is None else _attn_mask_as_bias(attn_mask, q, k)
    softmax_scale = q.shape[-1] ** -0.5 if scale is None else check_scale(scale, "scale")
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    sink = checks.check_sink(learnable_sink, q.shape[2], q.device)
    out, _ = _run(q, k, v, softmax_scale, 0, -1, 0 if is_causal else -1, bias=bias, dropout_p=dropout_p,
                  learnable_sink=sink)
    out = out.transpose(1, 2)
    return out.squeeze(0) if unbatched else out


def _check_cu_seqlens(name, cu, total, device):
    """int32, 1-D, starts at 0, non-decreasing, ends at ``total``; returns the lengths (host list)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as in flash-attn), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    values = cu.tolist()  # one device-to-host copy: the price of checking before launch
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if min(lengths) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] = {values[-1]} must equal the number of packed tokens ({total})")
    return lengths


def _check_max_seqlen(name, max_seqlen, lengths):
    """Checks the caller's bound and returns the longest length itself: the kernels' grid and
    the dropout counters then follow the sequences, not a loose (or absurd) bound."""
    if type(max_seqlen) is not int and (isinstance(max_seqlen, (torch.Tensor, bool))
                                        or not isinstance(max_seqlen, (numbers.Integral, torch.SymInt))):
        raise TypeError(f"{name} must be a Python int, got {type(max_seqlen).__name__}")
    longest = max(lengths)
    if max_seqlen < longest:
        raise ValueError(f"{name} = {max_seqlen} is smaller than the longest sequence ({longest})")
    return longest


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, learnable_sink=None):
    """Attention over packed variable-length sequences, flash-attn's varlen layout.

    Args:
        q: (total_q, nheads, headdim), the sequences concatenated.
        k, v: (total_k, nheads_k, headdim).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), cumulative lengths starting at 0;
            sequence b is ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]``.  No attention crosses
            a sequence boundary.
        max_seqlen_q, max_seqlen_k: ints >= the longest sequence.
        causal, window_size, softcap, alibi_slopes ((nheads,) or (batch, nheads)), dropout_p:
            as :func:`flash_attn_func`, per sequence (causal is bottom-right per sequence).
        block_table: paged K/V is served by :func:`flash_attn_with_kvcache`; here it must be None.
        learnable_sink: None or (nheads,) float, as :func:`flash_attn_func`.

    Validation reads cu_seqlens on the host (one small device-to-host copy per call).
    Returns ``out`` (total_q, nheads, headdim), or ``(out, softmax_lse (nheads, total_q), None)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 3, "(total_tokens, heads, headdim)")
    if block_table is not None:
        raise NotImplementedError("block_table (paged K/V) is supported by flash_attn_with_kvcache, not by "
                                  "flash_attn_varlen_func")
    q, k, v = autocast_inputs(q, k, v)
    _validate_qkv(q, k, v, ("q", "k", "v"), "(total_tokens, heads, headdim)", packed=True)
    lengths_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    lengths_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if len(lengths_q) != len(lengths_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                         f"{len(lengths_q) + 1} and {len(lengths_k) + 1}")
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, lengths_q)
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, lengths_k)
    dropout_p = check_dropout(dropout_p)
    softcap = check_softcap(softcap)
    batch = len(lengths_q)
    slopes = check_alibi(alibi_slopes, batch, q.shape[1], q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else check_scale(softmax_scale, "softmax_scale")
    left, right = check_window(window_size)
    if causal:
        right = 0
    left, right = unbounded_if_beyond(left, right, max_seqlen_q, max_seqlen_k)
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    sink = checks.check_sink(learnable_sink, q.shape[1], q.device)
    out, lse = _run(q, k, v, scale, 0, left, right, softcap, slopes, cu_seqlens_q=cu_seqlens_q.contiguous(),
                    cu_seqlens_k=cu_seqlens_k.contiguous(), max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                    dropout_p=dropout_p, learnable_sink=sink)
    if return_attn_probs:
        return out, lse, None
    return out
