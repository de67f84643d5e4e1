"""Hugging Face transformers attention backend ``"fa_lite"``.

::

    from flashattn_lite.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fa_lite")

:func:`register` adds two functions under one name to transformers' registries:

* a **mask function** (``AttentionMaskInterface``).  transformers calls it wherever a
  model builds its attention mask (``create_causal_mask``, ``create_sliding_window_causal_mask``,
  ``create_bidirectional_mask``, ...), with the pattern as a composed ``mask_function``
  plus the 2-D padding mask, the cache offsets and lengths.  Instead of expanding that
  into a ``(batch, 1, q_len, kv_len)`` matrix, :func:`fa_lite_mask` recognises the
  pattern (causal, bidirectional, sliding window, packed sequences from ``position_ids``)
  and returns a compact :class:`MaskPlan` carried by a :class:`PlannedMask` (both in
  ``transformers_masks.py``).
  Patterns it does not recognise keep a dense mask built exactly as ``sdpa`` would build it.
* an **attention function** (``AttentionInterface``), :func:`fa_lite_attention_forward`,
  which turns the plan into flashattn_lite calls: one dense :func:`flash_attn_func` call
  when no row is padded, otherwise :func:`flash_attn_varlen_func` over each row's
  contiguous key range (left or right padding, KV-cache decoding with left padding) or
  over the packed sequences; on the CPU a padded decoding step calls
  :func:`flash_attn_with_kvcache` with those key ranges instead (no packed copy).  GQA
  runs without repeating K/V; sliding windows, softcap, the model's scaling and dropout
  map onto the kernel's arguments.  Packed sequences are those transformers' mask marks
  (``position_ids`` given, no padding mask, no cache) and,
  following flash-attn's convention as transformers' flash-attn backends do, also a
  ``position_ids`` restarting at 0 with no padding mask and no past tokens while a cache
  is in use (where eager attention would let the sequences see each other).

Models that compute with the mask.  Some models transform the mask between its creation
and attention: add a learned bias to it (doge), concatenate it with another mask or with a
bias over extra keys (t5gemma2's merged self/cross attention, deepseek_v4's compressed
keys), index it (the DeepSeek-V3.2 family's indexer, gemma4's KV-shared layers keeping the
last queries).  The :class:`PlannedMask` answers such code as eager attention's mask would:
its shape, dtype (the model's float dtype) and device are the eager mask's, and every torch
operation other than reading those runs on the exact eager mask (0 / dtype minimum, built
from transformers' own ``sdpa_mask`` when first needed) and returns an ordinary tensor.  So
whatever a model computes from the mask, it computes as under eager attention, and the
attention function receives a plain 4-D mask, which it applies as eager would (through
flashattn_lite's :func:`scaled_dot_product_attention`, or the model's eager function where
softcap requires it).  Writing into the mask (in place, or through a view of it)
makes the written eager mask its meaning.  An unchanged mask, also after a no-op index,
``.to()`` that changes nothing, ``.contiguous()``, ``.detach()`` or ``.clone()``, keeps the
compact plan and the fast kernels; copies (``copy.deepcopy``, pickling, ``.to()`` another
dtype or device) are the dense eager mask.  torch.compile traces through it.  Code that
reaches the carrier's storage bypassing torch's subclass dispatch finds one NaN, broadcast:
its results are NaN, and the attention function refuses that storage passed on as a mask.  Sparse attention handed to backends as arguments
rather than in the mask: the DeepSeek-V3.2 family's top-k ``indices`` are folded into the
mask as their eager path does; block-sparse ``block_indices`` (minimax_m3_vl) are refused.

Outputs at *padding query positions* are 0 (as with flash-attn): those positions carry
no meaning in transformers (losses and generation ignore them), and eager attention
itself gives them arbitrary values.  Everything else is computed exactly as eager
attention's mask says.  Anything this backend cannot serve (weights requested with
``output_attentions``, a head dim over 512, a mask that is not 4-D...)
goes to transformers' ``sdpa`` function (or the model's eager function where sdpa cannot
serve it either) with a one-time warning; it is never answered wrongly.
"""

import warnings

import torch

from ..backends import cpu as cpu_backend
from ..interface import (MAX_HEAD_DIM, SUPPORTED_DTYPES, autocast_inputs, flash_attn_func, flash_attn_varlen_func,
                         scaled_dot_product_attention)
from ..kvcache import flash_attn_with_kvcache
from .transformers_masks import MaskPlan, PlannedMask  # noqa: F401  (re-exported: the module's API)
from .transformers_masks import eager_mask, fa_lite_mask, plan_of, written_mask

NAME = "fa_lite"  # a name containing "flash" would switch on transformers' flash-attn-specific code paths

__all__ = ["NAME", "register", "fa_lite_attention_forward", "fa_lite_mask", "MaskPlan", "PlannedMask"]

_warned = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"flashattn_lite ({NAME}): {message}", RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------

def register(name=NAME):
    """Register the attention function and its mask function under ``name`` (default
    ``"fa_lite"``); afterwards ``attn_implementation=name`` works in ``from_pretrained``,
    ``from_config`` and ``model.set_attn_implementation``.  Idempotent; returns ``name``."""
    if "flash" in name:
        raise ValueError(f"{name!r}: transformers treats names containing 'flash' as flash-attn itself; "
                         "choose another name")
    try:
        from transformers import AttentionInterface
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise ImportError("flashattn_lite's transformers backend needs transformers >= 4.48 "
                          "(AttentionInterface)") from e
    AttentionInterface.register(name, fa_lite_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover - transformers < 4.53 builds 4-D masks itself
        return name
    AttentionMaskInterface.register(name, fa_lite_mask)
    return name


# ---------------------------------------------------------------------------------------------
# the attention side
# ---------------------------------------------------------------------------------------------

def _int_list(t):
    return [int(x) for x in t.tolist()]


def _segments_from_position_ids(plan, position_ids, sq, sk):
    """flash-attn's packing convention: with no padding mask and no past tokens, a position id
    of 0 after a row's first token starts a new sequence.  (B, sq) segment ids, or None."""
    p = plan.pattern
    if (p is None or p["segments"] is not None or plan.attention_mask is not None or plan.q_offset != 0
            or plan.kv_offset != 0 or sq != sk or sq < 2 or not isinstance(position_ids, torch.Tensor)):
        return None
    if position_ids.dim() != 2 or position_ids.shape[-1] != sq or position_ids.shape[0] not in (1, plan.batch_size):
        return None
    starts = position_ids.expand(plan.batch_size, sq) == 0
    if not bool(starts[:, 1:].any()):
        return None
    starts = starts.clone()
    starts[:, 0] = True
    return starts.cumsum(-1)


def _layout(plan, sq, sk, position_ids=None):
    """How to run ``plan`` for q length ``sq`` and k length ``sk``: ("dense", k_end) |
    ("padded", ...) | ("packed", ...) | ("mask", None) (the dense bool mask)."""
    p = plan.pattern
    if p is None:
        return ("mask", None)
    d = plan.q_offset - plan.kv_offset  # key index j and query index i share a position iff j == i + d
    causal = p["causal"]
    left, right = p["window"]
    seg = p["segments"]
    if seg is None:
        seg = _segments_from_position_ids(plan, position_ids, sq, sk)
    if seg is not None:
        seg = seg.expand(plan.batch_size, -1) if seg.shape[0] == 1 else seg
        if plan.attention_mask is not None or d != 0 or sq != sk or tuple(seg.shape) != (plan.batch_size, sq):
            return ("mask", None)
        starts = torch.ones(seg.shape, dtype=torch.bool, device=seg.device)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        begin = starts.flatten().nonzero().flatten()
        cu = torch.cat([begin, begin.new_tensor([seg.numel()])]).to(torch.int32)
        lengths = cu[1:] - cu[:-1]
        return ("packed", cu, int(lengths.max()))

    if causal and sq + d > sk:
        return ("mask", None)  # the last queries' own keys are not in K: no kernel diagonal fits
    pad = plan.padding()
    batch = plan.batch_size
    if pad is None:
        ks, ke = [0] * batch, [sk] * batch
    else:
        pad = pad.to(torch.bool)
        idx = torch.arange(sk, device=pad.device)
        count = pad.sum(1)
        first = torch.where(pad, idx, sk).amin(1)
        last = torch.where(pad, idx + 1, 0).amax(1)
        contiguous = (count == 0) | (last - first == count)
        if not bool(contiguous.all()):
            return ("mask", None)  # holes in a row's keys: only the dense mask describes that
        ks, ke = _int_list(torch.where(count == 0, 0, first)), _int_list(torch.where(count == 0, 0, last))
    qs, qe = [0] * batch, [sq] * batch
    for b in range(batch):
        if causal:
            # keys after the last query's position are invisible to every query: drop them, so that the
            # kernel's bottom-right diagonal (last query row <-> last key row) is the true one; query rows
            # after the row's last real key are padding queries and are not computed (output 0)
            ke[b] = min(ke[b], sq + d)
            qe[b] = max(0, min(sq, ke[b] - d))
        elif left >= 0 or right >= 0:
            if ke[b] - sq != d:
                return ("mask", None)  # a windowed band whose diagonal the kernel cannot place
        if ke[b] <= ks[b]:
            ks[b] = ke[b] = 0
            qe[b] = 0  # no visible key at all: the row's queries give 0
    if pad is None or all(k0 == 0 and k1 == ke[0] and q1 == sq for k0, k1, q1 in zip(ks, ke, qe)):
        if ke[0] > 0 and qe[0] == sq:
            return ("dense", ke[0])
    return ("padded", ks, ke, qs, qe)


def _run_plan(plan, q, k, v, scale, softcap, dropout, position_ids=None, sink=None):
    """q (B, Sq, Hq, D), k (B, Sk, Hk, D), v (B, Sk, Hk, Dv) (views) -> out (B, Sq, Hq, Dv);
    ``sink``: the model's attention sinks (s_aux), (Hq,) or None."""
    batch, sq, hq, dim = q.shape
    dim_v = v.shape[-1]
    sk = k.shape[1]
    key = (sq, sk)
    if plan.run_layout is None or plan.run_layout[0] != key:
        plan.run_layout = (key, _layout(plan, sq, sk, position_ids))
    layout = plan.run_layout[1]
    p = plan.pattern
    kw = dict(softmax_scale=scale, softcap=softcap, dropout_p=dropout, learnable_sink=sink)
    if layout[0] == "mask":
        if softcap:
            return None  # SDPA has no softcap: the caller falls back
        out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=plan.dense(), dropout_p=dropout, scale=scale, enable_gqa=True,
                                           learnable_sink=sink)
        return out.transpose(1, 2)
    causal = p["causal"]
    left, right = p["window"]
    window = (left, -1 if causal else right)
    if layout[0] == "dense":
        k_end = layout[1]
        return flash_attn_func(q, k[:, :k_end], v[:, :k_end], causal=causal, window_size=window, **kw)
    if layout[0] == "packed":
        _, cu, max_len = layout
        out = flash_attn_varlen_func(q.reshape(batch * sq, hq, dim), k.reshape(batch * sk, k.shape[2], dim),
                                     v.reshape(batch * sk, v.shape[2], dim_v), cu, cu, max_len, max_len,
                                     causal=causal, window_size=window, **kw)
        return out.view(batch, sq, hq, dim_v)
    if len(layout) == 5:  # first use: build the index tensors once, every layer reuses them
        _, ks, ke, qs, qe = layout
        device = q.device
        k_idx = torch.arange(sk, device=device)
        q_idx = torch.arange(sq, device=device)
        def between(idx, lo, hi):
            return (idx >= torch.tensor(lo, device=device)[:, None]) & (idx < torch.tensor(hi, device=device)[:, None])

        k_keep, q_keep = between(k_idx, ks, ke), between(q_idx, qs, qe)
        lens_k = [e - s for s, e in zip(ks, ke)]
        lens_q = [e - s for s, e in zip(qs, qe)]
        cu_k = torch.tensor([0, *_cumsum(lens_k)], dtype=torch.int32, device=device)
        cu_q = torch.tensor([0, *_cumsum(lens_q)], dtype=torch.int32, device=device)
        rows = None if all(n == sq for n in lens_q) else q_keep.nonzero(as_tuple=True)
        step = None
        if all(n in (0, sq) for n in lens_q):  # (qs is 0) each row computes all its queries or none
            step = tuple(torch.tensor([x if n else 0 for x, n in zip(bounds, lens_q)], dtype=torch.int32,
                                      device=device) for bounds in (ks, ke))
        layout = ("padded", k_keep, q_keep, cu_k, cu_q, max(max(lens_q), 1), max(max(lens_k), 1), rows, step)
        plan.run_layout = (key, layout)
    _, k_keep, q_keep, cu_k, cu_q, max_q, max_k, rows, step = layout
    if step is not None and _decoding_step(q, k, v, dropout, sink):
        # A decoding step of a padded batch: the KV-cache kernel reads each row's keys
        # [ks, ke) where they lie (its cache_leftpad and cache_seqlens, the queries at the end
        # as varlen's bottom-right places them; a row without queries sees no key and gives
        # 0), instead of gathering every layer's keys into a packed copy first.
        return flash_attn_with_kvcache(q, k, v, cache_seqlens=step[1], cache_leftpad=step[0], causal=causal,
                                       window_size=window, softcap=softcap, softmax_scale=scale, learnable_sink=sink,
                                       num_splits=cpu_backend.decode_splits(batch, k.shape[2], sk))
    out_packed = flash_attn_varlen_func(q[q_keep], k[k_keep], v[k_keep], cu_q, cu_k, max_q, max_k, causal=causal,
                                        window_size=window, **kw)
    if rows is None:
        return out_packed.view(batch, sq, hq, dim_v)
    return out_packed.new_zeros(batch, sq, hq, dim_v).index_put(rows, out_packed)


def _decoding_step(q, k, v, dropout, sink=None):
    """Whether a padded call takes the KV-cache kernel: on the CPU (where the gather it saves
    was measured: 2.4 ms against 0.45 for 4 rows x 8 heads x 1024 keys), for the few query
    rows the cpu backend decodes that way, with no dropout and nothing needing a gradient
    (the KV-cache API has no backward)."""
    needs_grad = any(t is not None and t.requires_grad for t in (q, k, v, sink))
    if q.device.type != "cpu" or dropout or (torch.is_grad_enabled() and needs_grad):
        return False
    return cpu_backend.decode_rows(q.shape[1], q.shape[2] // k.shape[2])


def _cumsum(values):
    total = 0
    for x in values:
        total += x
        yield total


def _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, softcap, is_causal, kwargs):
    """Hand the call to transformers' sdpa function (or the model's eager one where sdpa cannot serve)."""
    plan = plan_of(attention_mask)
    mask = plan.dense() if plan is not None else attention_mask
    # sdpa has no softcap and no sinks (it would drop s_aux / sinks silently)
    needs_eager = softcap or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None
    if needs_eager:
        import sys
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"flashattn_lite ({NAME}) cannot serve this call ({reason}), and neither "
                                      "sdpa nor an eager function of this model can")
        _warn_once(f"{reason}: falling back to the model's eager attention")
        if plan is not None:
            mask = eager_mask(attention_mask)  # the very mask eager attention would have got
        elif mask is not None and mask.dtype == torch.bool:
            mask = torch.where(mask, torch.zeros((), dtype=query.dtype, device=query.device),
                               torch.finfo(query.dtype).min)
        extra = dict(kwargs)
        if softcap:
            extra["softcap"] = softcap
        return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **extra)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    _warn_once(f"{reason}: falling back to sdpa")
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _fold_topk_indices(mask, indices, query, key):
    """Sparse attention of the DeepSeek-V3.2 kind: models of that family hand backends other than
    eager and sdpa the indexer's choice, ``indices`` (batch, q_len, k) key indices per query,
    instead of folding it into the mask.  Fold it in as their eager path does."""
    drop = indices.new_ones((query.shape[0], query.shape[2], key.shape[2]), dtype=torch.bool)
    drop = drop.scatter(-1, indices.long(), False).unsqueeze(1)  # (batch, 1, q_len, kv_len), True: not chosen
    if mask is None:
        mask = torch.zeros((), dtype=query.dtype, device=query.device)
    if mask.dtype == torch.bool:
        return mask & ~drop
    return mask.masked_fill(drop, torch.finfo(query.dtype).min)  # (a PlannedMask: on its eager mask)


def fa_lite_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers attention function for ``"fa_lite"``.

    query (batch, heads, q_len, head_dim), key/value (batch, kv_heads, kv_len, head_dim);
    returns ``(out (batch, q_len, heads, head_dim), None)``.  The band and padding come
    from the mask (see :class:`MaskPlan`); ``sliding_window`` and ``is_causal`` are what
    the mask already encodes and only serve when the mask is None.
    """
    softcap = float(softcap) if softcap else 0.0
    written = written_mask(attention_mask)
    if written is not None:
        attention_mask = written  # written into: its eager mask is its meaning
    if kwargs.get("block_indices") is not None:
        raise NotImplementedError(f"{NAME}: block-sparse attention (block_indices) is not supported; the model leaves "
                                  "the selection out of the mask for backends other than eager/sdpa. Use "
                                  "attn_implementation='eager' or 'sdpa'.")
    indices = kwargs.pop("indices", None)
    if indices is not None:
        attention_mask = _fold_topk_indices(attention_mask, indices, query, key)
    # under torch.autocast, rotary embeddings leave q and k in float32 beside a bf16 v: cast
    # them as the kernels' own entry points (and torch's SDPA) do, rather than fall back
    query, key, value = autocast_inputs(query, key, value)
    args = (module, query, key, value, attention_mask, dropout, scaling, softcap, is_causal, kwargs)
    if kwargs.get("output_attentions"):
        _warn_once("output_attentions=True is not supported (no weights are returned)")
    if kwargs.get("position_bias") is not None:
        return _fallback("position_bias", *args)
    if kwargs.get("sinks") is not None:  # inkling2's per-token sinks (B, H, q_len, 1), not the kernel's per-head s_aux
        return _fallback("attention sinks passed as `sinks`", *args)
    dim = query.shape[-1]
    if key.shape[-1] != dim:  # (value's head dim may differ: MLA)
        return _fallback("different query/key head dims", *args)
    if not 1 <= dim <= MAX_HEAD_DIM or not 1 <= value.shape[-1] <= MAX_HEAD_DIM:
        return _fallback(f"head dim {dim}, value head dim {value.shape[-1]} (supported: 1..{MAX_HEAD_DIM})", *args)
    if query.dtype not in SUPPORTED_DTYPES or not (query.dtype == key.dtype == value.dtype):
        return _fallback(f"dtypes {query.dtype}/{key.dtype}/{value.dtype}", *args)
    hq, hk = query.shape[1], key.shape[1]
    if hk == 0 or hq % hk:
        return _fallback(f"{hq} query heads over {hk} key/value heads", *args)
    scale = dim ** -0.5 if scaling is None else float(scaling)
    sink = kwargs.get("s_aux")  # attention sinks (gpt-oss & co): one zero-value logit per query head
    if sink is not None and not (isinstance(sink, torch.Tensor) and sink.is_floating_point()
                                 and tuple(sink.shape) == (hq,) and sink.device == query.device):
        return _fallback(f"attention sinks (s_aux) of shape {tuple(getattr(sink, 'shape', ()))}, not ({hq},)", *args)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D) views
    sq, sk = q.shape[1], k.shape[1]

    plan = plan_of(attention_mask)
    if plan is not None:
        if (plan.batch_size, plan.q_length, plan.kv_length) != (q.shape[0], sq, sk):
            return _fallback(f"mask built for (batch, q, kv) = {(plan.batch_size, plan.q_length, plan.kv_length)} "
                             f"used with {(q.shape[0], sq, sk)}", *args)
        out = _run_plan(plan, q, k, v, scale, softcap, dropout, kwargs.get("position_ids"), sink)
        if out is None:
            return _fallback("softcap with a mask pattern only a dense mask describes", *args)
        return out, None
    if attention_mask is not None:
        if attention_mask.dim() == 4 and attention_mask.is_floating_point() and attention_mask.numel() > 1 \
                and not any(attention_mask.stride()) and bool(attention_mask.reshape(-1)[0].isnan()):
            # A PlannedMask's own storage (one NaN, broadcast), reached without the PlannedMask:
            # something read it bypassing torch's dispatch to tensor subclasses.  Refused.
            raise RuntimeError(
                f"{NAME}: the attention mask is the bare storage of a {NAME} mask, separated from its "
                "description by code that bypassed torch's tensor-subclass dispatch; it has no meaning as a "
                "mask. Use attn_implementation='sdpa' with this code.")
        # a mask this backend did not build, or one a model computed from ours (which then is the mask
        # eager attention would have got, transformed the same way): honour it as eager/sdpa would
        if attention_mask.dim() == 4 and (attention_mask.dtype == torch.bool or attention_mask.is_floating_point()) \
                and not softcap:
            out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask.to(query.device),
                                               dropout_p=dropout, scale=scale, enable_gqa=True, learnable_sink=sink)
            return out.transpose(1, 2), None
        return _fallback(f"a {attention_mask.dim()}-D {attention_mask.dtype} mask not built by {NAME}", *args)

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if causal and sq > 1 and sq != sk:
        return _fallback("no mask, causal, and q_len != kv_len (ambiguous alignment)", *args)
    window = (-1, -1)
    if sliding_window and causal:
        window = (int(sliding_window) - 1, -1)
    elif sliding_window:
        return _fallback("bidirectional sliding window without a mask", *args)
    out = flash_attn_func(q, k, v, causal=causal and sq > 1, window_size=window, softmax_scale=scale,
                          softcap=softcap, dropout_p=dropout, learnable_sink=sink)
    return out, None
