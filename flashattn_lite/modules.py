"""nn.Module layers: a drop-in for ``torch.nn.MultiheadAttention`` and flash-attn's core modules.

:class:`FlashAttention` *is* an ``nn.MultiheadAttention`` (a subclass): same constructor,
same parameters and ``state_dict`` keys, same ``forward`` signature and return values;
only the attention itself runs through :func:`flashattn_lite.scaled_dot_product_attention`.
Being a subclass keeps every ``isinstance(m, nn.MultiheadAttention)`` check true, so
``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` keep working after
:func:`swap_attention`; their own inference fast path (eval mode, no grad, see
``torch.backends.mha.get_fastpath_enabled()``) reads the projection weights directly and
runs PyTorch's fused kernel on them, which gives the same (correct) results with the same
weights; everywhere else the layer calls this module's ``forward``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .interface import MAX_HEAD_DIM, flash_attn_func, flash_attn_varlen_func, scaled_dot_product_attention

__all__ = ["FlashAttention", "FlashSelfAttention", "FlashCrossAttention", "swap_attention"]


def _check_mask_dtype(name, mask):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    return mask


def _as_additive(mask, dtype):
    """nn.MultiheadAttention's mask convention (bool True = masked out; float = added) -> float bias."""
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask if mask.dtype == dtype else mask.to(dtype)


def _softmax_zero_when_empty(scores):
    """softmax over the last dim, with 0 weights (and 0 gradients) in a row whose scores are
    all -inf: such a row sees no key, and gets 0 output like the kernels' masked rows.

    A plain softmax gives NaN there, and zeroing the NaN afterwards (nan_to_num) fixes the
    forward only: softmax's backward, ``w * (g - sum(g * w))``, still multiplies by the
    NaN weights and spreads NaN into every input and weight gradient.  So the empty rows
    are given finite scores before the softmax and their weights zeroed after it; both
    masked_fills pass a zero gradient for the filled entries."""
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (also true when there are no keys at all)
    return torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


class FlashAttention(nn.MultiheadAttention):
    """Drop-in replacement for :class:`torch.nn.MultiheadAttention` on flashattn_lite kernels.

    Constructor, parameters (``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight``/
    ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``, ``in_proj_bias``,
    ``out_proj``, ``bias_k``, ``bias_v``), ``state_dict`` and ``forward`` are those of
    ``nn.MultiheadAttention``; a state dict loads in either direction.

    Memory: the attention itself is O(seqlen) (no seqlen x seqlen matrix) except

    * ``need_weights=True`` (the default, as in torch): the weights are returned, so they
      are computed, which takes batch x heads x seqlen_q x seqlen_k memory.  Pass
      ``need_weights=False`` to avoid it.  With dropout active in training the whole
      call then runs as explicit math, so the returned (dropped) weights are exactly
      the ones applied to ``value``, as in torch.
    * an ``attn_mask`` (it is seqlen x seqlen already) and an ``attn_mask`` or causal
      mask combined with a ``key_padding_mask`` (merged into one mask, as torch does).
      A ``key_padding_mask`` alone is applied as a broadcast view, without an S x S mask.

    A query row that may attend to no key gives 0 output (and 0 weights), where torch
    gives NaN.  Head dim ``embed_dim // num_heads`` must be in 1..512.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if embed_dim // num_heads > MAX_HEAD_DIM:
            raise ValueError(f"head dim embed_dim // num_heads = {embed_dim // num_heads} exceeds {MAX_HEAD_DIM}, "
                             "the largest flashattn_lite supports")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first, device=device,
                         dtype=dtype)

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_torch(cls, mha, share_parameters=False):
        """A :class:`FlashAttention` with ``mha``'s configuration and weights.

        ``share_parameters=False`` (default) copies the weights; ``True`` makes the new
        module use ``mha``'s own Parameter objects (and its ``out_proj`` module), so an
        optimizer built on the old module keeps training the new one (what
        :func:`swap_attention` does).  The training/eval mode is carried over.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_torch expects an nn.MultiheadAttention, got {type(mha).__name__}")
        ref = mha.out_proj.weight
        kwargs = dict(dropout=mha.dropout, bias=mha.in_proj_bias is not None, add_bias_kv=mha.bias_k is not None,
                      add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first,
                      dtype=ref.dtype)
        if share_parameters:
            new = cls(mha.embed_dim, mha.num_heads, device="meta", **kwargs)
            for name in list(new._parameters):
                new._parameters[name] = mha._parameters[name]
            new.out_proj = mha.out_proj
        else:
            new = cls(mha.embed_dim, mha.num_heads, device=ref.device, **kwargs)
            new.load_state_dict(mha.state_dict())
        new.train(mha.training)
        return new

    # ------------------------------------------------------------------ forward
    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """Same arguments and return values as ``nn.MultiheadAttention.forward``:
        ``(attn_output, attn_weights or None)``; weights (N, L, S) averaged over heads, or
        (N, num_heads, L, S) with ``average_attn_weights=False``."""
        if any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):
            # Nested tensors only come from nn.TransformerEncoder's inference fast path; torch's
            # own implementation serves them (or raises exactly as it would).
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        key_padding_mask = _check_mask_dtype("key_padding_mask", key_padding_mask)
        attn_mask = _check_mask_dtype("attn_mask", attn_mask)

        self_attention = query is key and key is value  # decided before any view is taken
        batched = query.dim() == 3
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (L, E) unbatched or 3-D batched, got shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must have the same number of dims, got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                if key_padding_mask.dim() != 1:
                    raise ValueError(f"key_padding_mask for unbatched input must be 1-D (S,), got shape "
                                     f"{tuple(key_padding_mask.shape)}")
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)  # (H, L, S) -> (1, H, L, S)
        elif not self.batch_first:
            # (L, N, E) -> (N, L, E) as views: the projections below work on any strides
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)

        bsz, tgt_len, e = query.shape
        if e != self.embed_dim:
            raise ValueError(f"query has embedding dim {e}, expected embed_dim = {self.embed_dim}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != bsz:
            raise ValueError(f"key and value must share batch and sequence dims with batch {bsz}; got key "
                             f"{tuple(key.shape)}, value {tuple(value.shape)} (batch-first view)")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"key/value feature dims ({key.shape[-1]}, {value.shape[-1]}) must equal kdim/vdim "
                             f"({self.kdim}, {self.vdim})")
        src_len = key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim

        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (bsz, src_len):
            raise ValueError(f"key_padding_mask must have shape (batch, src_len) = {(bsz, src_len)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True is a hint that attn_mask is the causal mask, so attn_mask is required "
                             "(as in nn.MultiheadAttention); use nn.Transformer.generate_square_subsequent_mask")
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise ValueError(f"2-D attn_mask must have shape (L, S) = {(tgt_len, src_len)}, got "
                                     f"{tuple(attn_mask.shape)}")
                attn_mask = attn_mask[None, None]
            elif attn_mask.dim() == 3 and batched:
                if tuple(attn_mask.shape) != (bsz * heads, tgt_len, src_len):
                    raise ValueError(f"3-D attn_mask must have shape (N * num_heads, L, S) = "
                                     f"{(bsz * heads, tgt_len, src_len)}, got {tuple(attn_mask.shape)}")
                attn_mask = attn_mask.view(bsz, heads, tgt_len, src_len)
            elif attn_mask.dim() == 4 and not batched:
                if tuple(attn_mask.shape) != (1, heads, tgt_len, src_len):
                    raise ValueError(f"3-D attn_mask for unbatched input must have shape (num_heads, L, S) = "
                                     f"{(heads, tgt_len, src_len)}, got {tuple(attn_mask.shape[1:])}")
            else:
                raise ValueError(f"attn_mask must be 2-D (L, S) or 3-D (N * num_heads, L, S), got shape "
                                 f"{tuple(attn_mask.shape)}")
            if attn_mask.device != query.device:
                raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        if key_padding_mask is not None and key_padding_mask.device != query.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but query is on {query.device}")

        q, k, v = self._project(query, key, value, self_attention)  # (N, L|S, E)
        q = q.reshape(bsz, tgt_len, heads, head_dim)
        k = k.reshape(bsz, k.shape[1], heads, head_dim)
        v = v.reshape(bsz, v.shape[1], heads, head_dim)

        extra = 0  # keys appended after the inputs (bias_k, zero attention), visible to every query
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.view(1, 1, heads, head_dim).expand(bsz, 1, heads, head_dim)], dim=1)
            v = torch.cat([v, self.bias_v.view(1, 1, heads, head_dim).expand(bsz, 1, heads, head_dim)], dim=1)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, 1, heads, head_dim)], dim=1)
            v = torch.cat([v, v.new_zeros(bsz, 1, heads, head_dim)], dim=1)
            extra += 1

        dropout_p = self.dropout if self.training else 0.0
        dtype = q.dtype
        # The causal hint replaces attn_mask exactly where torch's own forward lets it: no padding mask,
        # no weights (keys appended by bias_k / add_zero_attn then stay hidden behind the top-left
        # diagonal, as in torch).
        use_causal_flag = is_causal and key_padding_mask is None and not need_weights
        bias = None
        if not use_causal_flag:
            if attn_mask is not None:
                bias = _as_additive(attn_mask, dtype)
            if key_padding_mask is not None:
                kpm = _as_additive(key_padding_mask, dtype)[:, None, None, :]  # (N, 1, 1, S): a view, no S x S
                bias = kpm if bias is None else bias + kpm
            if bias is not None and extra:
                bias = F.pad(bias, (0, extra))
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (N, H, L|S, D) views
        weights = None
        if need_weights:
            scores = torch.matmul(qh, kh.transpose(-2, -1)) * (head_dim ** -0.5)
            if bias is not None:
                scores = scores + bias
            weights = _softmax_zero_when_empty(scores)
            if dropout_p > 0:
                weights = F.dropout(weights, p=dropout_p)
                out = torch.matmul(weights, vh)
            else:
                out = scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)
        else:
            out = scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, dropout_p=dropout_p,
                                               is_causal=use_causal_flag)
        out = out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)

        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            if weights is not None:
                weights = weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query, key, value, self_attention):
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            b = self.in_proj_bias
            if self_attention:  # one GEMM, then views
                return F.linear(query, w, b).chunk(3, dim=-1)
            wq, wk, wv = w[:e], w[e:2 * e], w[2 * e:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            b = self.in_proj_bias
        bq = bk = bv = None
        if b is not None:
            bq, bk, bv = b[:e], b[e:2 * e], b[2 * e:]
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def extra_repr(self):
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, " \
               f"batch_first={self.batch_first}"


def swap_attention(model, share_parameters=True):
    """Replace every ``nn.MultiheadAttention`` inside ``model`` by a :class:`FlashAttention`
    with the same configuration and weights, in place; returns ``model``.

    Works inside ``nn.TransformerEncoder``/``nn.TransformerDecoder`` (and any other
    container).  By default the new modules use the old modules' Parameter objects, so an
    optimizer created before the swap keeps working.  ``model`` itself is returned
    converted when it is an ``nn.MultiheadAttention``.
    """
    if isinstance(model, nn.MultiheadAttention) and not isinstance(model, FlashAttention):
        return FlashAttention.from_torch(model, share_parameters=share_parameters)
    converted = {}  # a module registered in several places stays one module
    for parent in list(model.modules()):
        # parent._modules, not named_children(): that skips a module's second name in one parent
        for name, child in list(parent._modules.items()):
            if isinstance(child, nn.MultiheadAttention) and not isinstance(child, FlashAttention):
                if id(child) not in converted:
                    converted[id(child)] = FlashAttention.from_torch(child, share_parameters=share_parameters)
                setattr(parent, name, converted[id(child)])
    return model


class _CoreAttention(nn.Module):
    """What flash-attn's FlashSelfAttention and FlashCrossAttention share: the constructor,
    and the keyword arguments of one call (dropout in training mode only)."""

    def __init__(self, causal=False, softmax_scale=None, attention_dropout=0.0, window_size=(-1, -1),
                 alibi_slopes=None, deterministic=False):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.window_size = window_size
        self.deterministic = deterministic

    def _call_kwargs(self, causal):
        causal = self.causal if causal is None else causal
        p = self.drop.p if self.training else 0.0
        return dict(dropout_p=p, softmax_scale=self.softmax_scale, causal=causal, window_size=self.window_size,
                    alibi_slopes=self.alibi_slopes, deterministic=self.deterministic)


class FlashSelfAttention(_CoreAttention):
    """flash-attn's ``FlashSelfAttention``: softmax attention on packed qkv, no projections.

    ``forward(qkv, causal=None, cu_seqlens=None, max_seqlen=None)``:
    qkv (batch, seqlen, 3, nheads, headdim), or (total, 3, nheads, headdim) with
    ``cu_seqlens`` (int32, (batch + 1,)) and ``max_seqlen``; returns (batch, seqlen,
    nheads, headdim) or (total, nheads, headdim).  ``causal`` overrides the constructor's.
    Dropout applies in training mode only.
    """

    def forward(self, qkv, causal=None, cu_seqlens=None, max_seqlen=None):
        if not isinstance(qkv, torch.Tensor):
            raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
        kw = self._call_kwargs(causal)
        if cu_seqlens is not None:
            if qkv.dim() != 4 or qkv.shape[1] != 3:
                raise ValueError(f"with cu_seqlens, qkv must be (total, 3, nheads, headdim), got {tuple(qkv.shape)}")
            if max_seqlen is None:
                raise ValueError("max_seqlen is required with cu_seqlens")
            q, k, v = qkv.unbind(dim=1)
            return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)
        if qkv.dim() != 5 or qkv.shape[2] != 3:
            raise ValueError(f"qkv must be (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
        q, k, v = qkv.unbind(dim=2)
        return flash_attn_func(q, k, v, **kw)


class FlashCrossAttention(_CoreAttention):
    """flash-attn's ``FlashCrossAttention``: q attends to packed kv, no projections.

    ``forward(q, kv, causal=None, cu_seqlens=None, max_seqlen=None, cu_seqlens_k=None, max_seqlen_k=None)``:
    q (batch, seqlen_q, nheads, headdim), kv (batch, seqlen_k, 2, nheads_k, headdim)
    (nheads % nheads_k == 0), or packed: q (total_q, nheads, headdim),
    kv (total_k, 2, nheads_k, headdim) with all four varlen arguments.
    """

    def forward(self, q, kv, causal=None, cu_seqlens=None, max_seqlen=None, cu_seqlens_k=None, max_seqlen_k=None):
        for name, t in (("q", q), ("kv", kv)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        kw = self._call_kwargs(causal)
        if cu_seqlens is not None:
            if cu_seqlens_k is None or max_seqlen is None or max_seqlen_k is None:
                raise ValueError("varlen mode needs cu_seqlens, max_seqlen, cu_seqlens_k and max_seqlen_k")
            if kv.dim() != 4 or kv.shape[1] != 2:
                raise ValueError(f"with cu_seqlens, kv must be (total_k, 2, nheads_k, headdim), got "
                                 f"{tuple(kv.shape)}")
            k, v = kv.unbind(dim=1)
            return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, **kw)
        if kv.dim() != 5 or kv.shape[2] != 2:
            raise ValueError(f"kv must be (batch, seqlen_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
        k, v = kv.unbind(dim=2)
        return flash_attn_func(q, k, v, **kw)
