"""KV-cache decoding: ``flash_attn_with_kvcache`` (flash-attn's API and semantics).

What happens in one call:

1. every argument is validated on the host (this reads ``cache_seqlens``,
   ``cache_leftpad``, ``cache_batch_idx`` and the used part of ``block_table`` back from
   the device: one small device-to-host copy per index tensor, the price of a clear error
   instead of an out-of-bounds read inside a kernel);
2. rotary embedding (when ``rotary_cos``/``rotary_sin`` are given) is applied to ``q``
   (into a new tensor) and to the new ``k``;
3. the new ``k``/``v`` are written into the caches in place at positions
   ``cache_seqlens[b] ..`` (through the block table for a paged cache), once it is clear
   that no two written positions share memory and that nothing read afterwards (another
   position, the other cache, q) lives where they go: an expanded cache, say, is refused
   for appends (read-only calls accept it);
4. ``torch.ops.flashattn_lite.decode`` runs attention of ``q`` against the cache (called
   directly, without the operator dispatch, where ``ops.direct_call_ok`` allows).

Both cache layouts reach the operator as one: a contiguous cache
(batch_cache, seqlen_cache, heads_k, headdim) *is* a paged cache whose pages are
seqlen_cache long, with a one-column block table (``cache_batch_idx`` or 0..batch-1).
So every backend implements only the paged read.

Positions are absolute cache indices.  For batch item b the valid keys are positions
``[leftpad[b], seqlens_k[b])`` with ``seqlens_k[b] = cache_seqlens[b] + seqlen_new``;
query row i sits at position ``seqlens_k[b] - seqlen_q + i`` (causal is aligned
bottom-right: q's last row with the last key).  Window and ALiBi distances are
measured between those positions; left padding shifts both sides equally, so it
changes nothing but the first valid key (as in flash-attn).

Forward only: there is no backward (flash-attn has none either).  A call that would
need one (grad mode on and an input that requires grad) raises instead of returning
an output whose backward would fail later.
"""

import numbers
import operator

import torch

from . import backends
from . import ops as _ops  # (also registers torch.ops.flashattn_lite.decode)
from .backends import select_backend
from .checks import (MAX_DECODE_HEAD_DIM, MAX_HEAD_DIM, check_alibi, check_scale, check_scale_over_softcap, check_sink,
                     check_softcap, check_tensor, check_window)
from .planning import MAX_SPLITS, unbounded_if_beyond
from .quant import QUANT_DTYPES, descale_view, is_per_position, quantize_rows

_LAYOUT = "(batch, seqlen, heads, headdim)"
_CACHE_LAYOUT = "(batch_cache, seqlen_cache, heads_k, headdim) or, paged, (num_blocks, page_size, heads_k, headdim)"


def _check_int32_vector(name, t, batch, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as in flash-attn), got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one entry per batch item), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    return t.tolist()


def _check_caches(q, k_cache, v_cache):
    """The caches against q; returns the caches' 8-bit dtype when they are quantized, else None."""
    check_tensor("q", q, 4, _LAYOUT)
    check_tensor("k_cache", k_cache, 4, _CACHE_LAYOUT, quantized_ok=True)
    check_tensor("v_cache", v_cache, 4, _CACHE_LAYOUT, quantized_ok=True)
    quantized = None
    if k_cache.dtype in QUANT_DTYPES or v_cache.dtype in QUANT_DTYPES:
        if k_cache.dtype != v_cache.dtype:
            raise TypeError(f"k_cache and v_cache must share one dtype, got {k_cache.dtype} and {v_cache.dtype} (a "
                            "quantized cache is int8 or float8_e4m3fn for both)")
        if not q.is_floating_point() or q.dtype in QUANT_DTYPES:
            raise TypeError(f"q must be float16, bfloat16 or float32 with a quantized ({k_cache.dtype}) cache, got "
                            f"{q.dtype}: queries are not quantized")
        quantized = k_cache.dtype
    elif not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache, v_cache must share one dtype (or the caches be int8/float8_e4m3fn, quantized, "
                        f"with k_descale/v_descale), got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(f"q, k_cache, v_cache must be on one device, got {q.device}, {k_cache.device}, "
                         f"{v_cache.device}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache and v_cache must have the same shape except the head dim (which may differ: "
                         f"MLA), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    d, hq, hk = q.shape[3], q.shape[2], k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"head dim differs: q has {d}, k_cache has {k_cache.shape[3]} (only v_cache's head dim "
                         "may differ)")
    if not 1 <= d <= MAX_DECODE_HEAD_DIM:
        raise ValueError(f"head dim must be in 1..{MAX_DECODE_HEAD_DIM}, got {d}")
    if not 1 <= v_cache.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"value head dim (v_cache.shape[3]) must be in 1..{MAX_HEAD_DIM}, got {v_cache.shape[3]}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"number of query heads ({hq}) must be a multiple of the number of cache heads ({hk})")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last (head) dim: the new keys/values are "
                             "written into it in place, so it cannot be copied")
    return quantized


def _check_descales(k_cache, v_cache, k_descale, v_descale, quantized, appending):
    """(k, v) descales as float32 (num_blocks, page_size, heads_k) views, or (None, None) for
    float caches; a clear error for a quantized cache without them, descales with a float
    cache, a wrong shape, dtype or device, and, when appending, descales that are not one
    entry per (position, kv head) of their own memory (the new scales are written there)."""
    given = [name for name, t in (("k_descale", k_descale), ("v_descale", v_descale)) if t is not None]
    if quantized is None:
        if given:
            raise ValueError(f"{' and '.join(given)} given with a {k_cache.dtype} cache: descales belong to quantized "
                             "(int8 or float8_e4m3fn) caches")
        return None, None
    if len(given) != 2:
        missing = [n for n in ("k_descale", "v_descale") if n not in given]
        raise ValueError(f"a quantized ({quantized}) cache needs k_descale and v_descale (float32, broadcastable to "
                         f"(blocks or batch, positions, kv heads)); {' and '.join(missing)} missing")
    views = (descale_view("k_descale", k_descale, k_cache, "k_cache"),
             descale_view("v_descale", v_descale, v_cache, "v_cache"))
    if appending:
        for name, t, cache in (("k_descale", k_descale, k_cache), ("v_descale", v_descale, v_cache)):
            if not is_per_position(t, cache) or not _distinct(t):
                raise ValueError(f"{name} has shape {tuple(t.shape)} (strides {t.stride()}): appending writes one scale "
                                 f"per new (position, kv head), so it needs the full {tuple(cache.shape[:3])} with "
                                 "distinct memory, not a broadcast (per kv head or per tensor) descale")
        ek, ev = _extent(k_descale), _extent(v_descale)
        if not _apart(k_descale, v_descale, ek, ev):
            raise ValueError("k_descale and v_descale share memory: appending would write both scales into one place")
    return views


def _check_new(k, v, q, k_cache, v_cache):
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (the new keys/values to append), or neither")
    if k is None:
        return 0
    check_tensor("k", k, 4, _LAYOUT)
    check_tensor("v", v, 4, _LAYOUT)
    for name, t, cache in (("k", k, k_cache), ("v", v, v_cache)):
        want = (q.shape[0], k.shape[1], k_cache.shape[2], cache.shape[3])
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, but q has {q.dtype} (new keys/values come in q's dtype; "
                            "a quantized cache quantizes them on append)")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape (batch, seqlen_new, heads_k, headdim) = (B, S, {want[2]}, "
                             f"{want[3]}) with batch {want[0]} and the head dim of {name}_cache, got {tuple(t.shape)}")
    return k.shape[1]


def _check_block_table(block_table, batch, num_blocks, page_size, ends, device):
    """int32 (batch, max_blocks); every entry a used position needs lies in [0, num_blocks)."""
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a torch.Tensor, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32 (as in flash-attn), got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must have shape (batch, max_blocks_per_sequence) with batch {batch}, got "
                         f"{tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {device}")
    if page_size == 0:
        raise ValueError("k_cache has pages of size 0 (dim 1)")
    table = block_table.cpu()
    used = torch.tensor([-(-e // page_size) for e in ends], dtype=torch.int64)
    in_use = torch.arange(table.shape[1])[None, :] < used[:, None]
    bad = in_use & ((table < 0) | (table >= num_blocks))
    if bad.any():
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(table[b, j])} is out of range: the paged cache has "
                         f"{num_blocks} blocks (k_cache.shape[0])")
    return table, in_use


def _check_shared_pages(table, in_use, written, lengths, starts, seqlen_new, page_size):
    """A page listed more than once in the used part of the block table (prefix sharing, or twice
    in one sequence) may only be appended to at rows no other position reads: the new key
    would replace that position's key.  ``table``, ``in_use``: the host table and its used
    entries; ``written``: the pages appended to; ``starts``: left pads (None: 0)."""
    written = written.cpu()
    pages = set(written.view(-1).tolist())
    if int((torch.isin(table, written) & in_use).sum()) == len(pages):
        return  # each page appended to is used once: by its writer, at that column
    writer = {}
    for b, n in enumerate(lengths):
        for p in range(n, n + seqlen_new):
            writer[(int(table[b, p // page_size]), p % page_size)] = (b, p)
    for b, j in in_use.nonzero().tolist():
        page = int(table[b, j])
        if page not in pages:
            continue
        start, end = (0 if starts is None else starts[b]), lengths[b] + seqlen_new
        for p in range(max(start, j * page_size), min(end, (j + 1) * page_size)):
            a, pa = writer.get((page, p % page_size), (b, p))
            if (a, pa) != (b, p):
                raise ValueError(f"block_table: the token appended at position {pa} of sequence {a} goes to page "
                                 f"{page}, row {p % page_size}, which sequence {b} reads as its position {p} (a page "
                                 "shared between sequences, or listed twice): the append would overwrite that key")


def _positions(cache_seqlens, count, device):
    """(B, count) int64 absolute positions ``cache_seqlens[b] + t``."""
    first = cache_seqlens.to(device=device, dtype=torch.int64)[:, None]
    return first if count == 1 else first + torch.arange(count, device=device)  # one token: the decoding step


def apply_rotary(x, cos, sin, positions, interleaved):
    """Rotary embedding of ``x`` (B, S, H, D) at ``positions`` (B, S): the first
    ``2 * cos.shape[1]`` channels rotate, the rest pass through.

    Interleaved (GPT-J): channel pairs (0, 1), (2, 3), ...; otherwise (GPT-NeoX) the
    pairs are (c, c + rd/2).  A pair (x1, x2) at position p with angle index c becomes
    (x1 cos - x2 sin, x1 sin + x2 cos), cos = ``cos[p, c]``.  Computed in float32
    (float64 for float64 input) and rounded once to x's dtype.
    """
    rd = 2 * cos.shape[1]
    work = backends.accum_dtype(x.dtype)
    c = cos[positions].to(work)[:, :, None, :]
    s = sin[positions].to(work)[:, :, None, :]
    xr = x[..., :rd].to(work)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :rd // 2], xr[..., rd // 2:]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)


def _check_rotary(cos, sin, head_dim, device, has_new):
    if (cos is None) != (sin is None):
        raise ValueError("pass both rotary_cos and rotary_sin, or neither")
    if cos is None:
        return 0
    if not has_new:
        raise ValueError("rotary_cos/rotary_sin need new k and v to append (as in flash-attn): the cache holds keys "
                         "that were rotated when they were appended")
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (seqlen_rotary, rotary_dim / 2), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if cos.shape != sin.shape:
        raise ValueError(f"rotary_cos and rotary_sin must have the same shape, got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    rd = 2 * cos.shape[1]
    if rd == 0 or rd > head_dim:
        raise ValueError(f"rotary dim 2 * rotary_cos.shape[1] = {rd} must be in 1..headdim ({head_dim})")
    return cos.shape[0]


# ------------------------------------------------------------------ memory the appends write
# The new keys/values are written into the caches in place, so the cache elements written must
# be distinct memory, and nothing read after a write (q, the other cache, the new values still
# to be copied) may live in them: an expanded cache (stride 0 in batch) would otherwise give
# every batch item the last item's key, silently.  torch's own checks do not fit:
# index_put_ only warns for expanded tensors, torch._debug_has_internal_overlap answers "too
# hard" for any sliced cache, and torch._C._overlaps compares address ranges, so it would
# refuse a k/v cache packed into one buffer.  The checks below read sizes, strides and data
# pointers on the host (no device work) and clear the usual layouts at once: separate
# allocations, slices of wider buffers, torch's (B, H, S, D) layout, k and v packed side by
# side.  Only a layout these cannot clear has its written element offsets compared.


_internal_overlap = getattr(torch, "_debug_has_internal_overlap", None)  # torch's own O(1) answer, where it has one


def _distinct(t, dims=None):
    """Whether tensor t's layout (or the (stride, size) ``dims``) certainly gives every index its
    own element: in order of stride, each stride reaches beyond the last element the smaller
    dims reach.  Sufficient, not necessary: a rare interleaving without overlap fails it, and
    the callers then compare element offsets."""
    if dims is None:
        if t.is_contiguous():
            return True
        overlap = _internal_overlap(t) if _internal_overlap else 2  # 0: dense, 1: a stride 0, 2: can't tell
        if overlap != 2:
            return overlap == 0
        dims = zip(t.stride(), t.shape)
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in dims if sz > 1):
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


def _extent(t):
    """(first, last) byte address of t's elements, or None when t is empty."""
    size = t.nbytes
    if not size:
        return None
    first = t.data_ptr()
    if t.is_contiguous():
        return first, first + size - 1
    strides = t.stride()
    return first, first + (sum(map(operator.mul, strides, t.shape)) - sum(strides) + 1) * t.element_size() - 1


def _apart(a, b, ea, eb):
    """Whether a and b (address ranges ``ea``, ``eb``) certainly share no element: from the
    ranges, or, for two tensors of one shape and strides, from the layout with the offset
    between them as one more dim (k and v packed side by side in one buffer)."""
    if ea is None or eb is None or ea[1] < eb[0] or eb[1] < ea[0]:
        return True
    delta, rest = divmod(abs(b.data_ptr() - a.data_ptr()), a.element_size())
    return (a.shape == b.shape and a.stride() == b.stride() and rest == 0
            and _distinct(a, list(zip(a.stride(), a.shape)) + [(delta, 2)]))


def _offset(t, base):
    """t's first element, in elements from the byte address ``base`` (every tensor here has one dtype)."""
    delta, rest = divmod(t.data_ptr() - base, t.element_size())
    if rest:
        raise ValueError("the caches, q and the new k/v share memory at addresses that are not a whole number of "
                         "elements apart: the append cannot be checked; pass separate tensors")
    return delta


def _element_offsets(t, base, index=None):
    """Offsets (from ``base``) of t's elements, shaped like t; with ``index`` = (blocks, rows),
    of the elements ``t[blocks, rows]`` (B, S, H, D) an append writes."""
    dev, strides = t.device, t.stride()
    if index is None:
        offs = torch.tensor(_offset(t, base), device=dev)
        for dim, (stride, size) in enumerate(zip(strides, t.shape)):
            offs = offs + (torch.arange(size, device=dev) * stride).view([-1] + [1] * (t.dim() - dim - 1))
        return offs
    blocks, rows = index
    slots = _offset(t, base) + blocks * strides[0] + rows * strides[1]
    inner = (torch.arange(t.shape[2], device=dev) * strides[2])[:, None] + torch.arange(t.shape[3], device=dev) * \
        strides[3]
    return slots[..., None, None] + inner


def _members(offs, t, base):
    """Which of the element offsets ``offs`` (from ``base``) belong to tensor t."""
    dims = [(st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1 and st > 0]
    if _distinct(t, dims):
        # every element has one index (dims of stride 0 repeat elements, they add none):
        # peel it off from the largest stride down, like the digits of a mixed-radix number
        rest = offs - _offset(t, base)
        inside = rest >= 0
        for stride, size in sorted(dims, reverse=True):
            rest = rest - (rest // stride).clamp(0, size - 1) * stride
        return inside & (rest == 0)
    return torch.isin(offs, _element_offsets(t, base))


def _check_rows_distinct(name, cache, used_rows, base):
    """Refuse a cache whose positions, or whose rows (dim 0: batch rows or pages) in use, share
    memory: an append into one would change another (a cache made with expand(), as_strided)."""
    if _distinct(cache):
        return
    what = (f"{name} (shape {tuple(cache.shape)}, strides {cache.stride()}) has {{}} that share memory (a cache made "
            "with expand() or as_strided?): appending a key/value into one would change the other.  Appending needs "
            "a cache whose positions are distinct memory (e.g. .contiguous()); read-only calls (no k/v) accept it")
    row_dims = list(zip(cache.stride()[1:], cache.shape[1:]))
    if not _distinct(None, row_dims):
        offs = _element_offsets(cache[0], base)
        if torch.unique(offs).numel() != offs.numel():
            raise ValueError(what.format("positions (dim 1) or heads"))
    used = sorted(set(used_rows()))
    row_stride = cache.stride(0)
    if len(used) < 2 or row_stride > sum(st * (sz - 1) for st, sz in row_dims):
        return  # one row, or rows farther apart than a row reaches
    if row_stride == 0:
        raise ValueError(what.format(f"rows {used[0]} and {used[1]} (dim 0)"))
    offs = _element_offsets(cache[0], base)[None] + torch.tensor(used, device=cache.device).view(-1, 1, 1, 1) * \
        row_stride
    if torch.unique(offs).numel() != offs.numel():
        raise ValueError(what.format("rows (dim 0) in use"))


def _check_append_memory(q, k_cache, v_cache, k, v, blocks, rows, used_rows):
    """Refuse an append whose writes overlap memory that is read after them: other positions of
    the same cache (an expanded or as_strided cache), the other cache, q, or new values not yet
    copied.  ``blocks``, ``rows``: (B, S_new) indices of the written slots (already distinct);
    ``used_rows()``: host list of the cache rows (pages) the call uses."""
    ek, ev = _extent(k_cache), _extent(v_cache)
    if k_cache.is_contiguous() and v_cache.is_contiguous() and (ek is None or ev is None or ek[1] < ev[0]
                                                                or ev[1] < ek[0]):
        # the common case, decided from address ranges alone: dense caches (every position its
        # own memory) apart from each other, and q and the new k/v apart from both
        ranges = [e for e in (ek, ev) if e]
        lo, hi = (min(e[0] for e in ranges), max(e[1] for e in ranges)) if ranges else (0, -1)
        if all(e is None or e[1] < lo or hi < e[0] for e in map(_extent, (q, k, v))):
            return
    base = k_cache.data_ptr()
    written = {}

    def offsets(cache):  # (B, S_new, H, D) offsets of the elements written into ``cache``
        if id(cache) not in written:
            written[id(cache)] = _element_offsets(cache, base, (blocks, rows))
        return written[id(cache)]

    _check_rows_distinct("k_cache", k_cache, used_rows, base)
    _check_rows_distinct("v_cache", v_cache, used_rows, base)
    if not _apart(k_cache, v_cache, ek, ev):
        for name, cache, other in (("k", k_cache, v_cache), ("v", v_cache, k_cache)):
            if _members(offsets(cache), other, base).any():
                raise ValueError(f"k_cache and v_cache overlap in memory where the new {name} is written: the "
                                 "append would overwrite the other cache; pass separate (non-overlapping) caches")
    # q and the new k/v: usually apart from both caches' address ranges at once
    lo, hi = min(ek[0], ev[0]), max(ek[1], ev[1])
    # (tensor read after a write, the caches written before that read, the cache it is copied into)
    for what, t, targets, dest in (("q", q, ("k_cache", "v_cache"), None), ("the new k", k, ("k_cache",), "k_cache"),
                                   ("the new v", v, ("k_cache", "v_cache"), "v_cache")):
        et = _extent(t)
        if et is None or et[1] < lo or hi < et[0]:
            continue
        for name in targets:
            cache, ec = (k_cache, ek) if name == "k_cache" else (v_cache, ev)
            if _apart(cache, t, ec, et):
                continue
            offs, t_offs = offsets(cache), _element_offsets(t, base)
            if name == dest and torch.equal(offs, t_offs):
                continue  # the new values are views of the very slots they go to: a copy onto itself
            if torch.isin(t_offs, offs).any():
                raise ValueError(f"{what} overlaps the {name} positions being appended to: the append would "
                                 f"overwrite {what} before it is read; pass {what} as a separate tensor")


def _check_quantized_append_memory(q, k_cache, v_cache, k, v, k_descale, v_descale, used_rows):
    """The append checks for 8-bit caches: each cache's positions and rows in use distinct, the
    caches apart, and q, the new k/v (float) and the descales nowhere inside the memory the
    append writes: the caches and the two descales (refused outright, by address range)."""
    _check_rows_distinct("k_cache", k_cache, used_rows, k_cache.data_ptr())
    _check_rows_distinct("v_cache", v_cache, used_rows, k_cache.data_ptr())
    ek, ev = _extent(k_cache), _extent(v_cache)
    if not _apart(k_cache, v_cache, ek, ev):
        raise ValueError("k_cache and v_cache overlap in memory: the append would overwrite the other cache; pass "
                         "separate (non-overlapping) caches")
    read = (("q", q), ("the new k", k), ("the new v", v), ("k_descale", k_descale), ("v_descale", v_descale))
    # the descales' appended positions are written too, before q and the new v are read
    written = (("k_cache", ek), ("v_cache", ev), ("k_descale", _extent(k_descale)), ("v_descale", _extent(v_descale)))
    for name, t in read:
        et = _extent(t)
        for target, ew in written:
            if target != name and et is not None and ew is not None and not (et[1] < ew[0] or ew[1] < et[0]):
                raise ValueError(f"{name} shares memory with {target}: the append would overwrite it; pass it as a "
                                 "separate tensor")


def _check_requires_grad(tensors):
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise NotImplementedError("flash_attn_with_kvcache is forward-only (no backward, as in flash-attn) and an "
                                  "input requires grad: call it under torch.no_grad() or torch.inference_mode(), or "
                                  "use flash_attn_func for attention that needs gradients")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            learnable_sink=None, k_descale=None, v_descale=None):
    """Attention of ``q`` against a KV cache, appending new keys/values first (decoding).

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or with ``block_table``
            a paged cache (num_blocks, page_size, nheads_k, headdim), any page size.  v_cache (and v)
            may have another head dim Dv (MLA; the output then has Dv); headdim of q/k_cache up to
            576 (absorbed-MLA decoding: 576 / 512), Dv up to 512.
            ``nheads % nheads_k == 0`` (GQA/MQA).  Updated in place when k/v are given; the rows
            in use (batch rows or pages) must then be distinct memory (not an ``expand()``-ed
            cache), and not overlap q or each other.
        k, v: None, or (batch, seqlen_new, nheads_k, headdim) new keys/values, written into the
            cache at positions ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1`` (after
            rotary, when given) and attended to in the same call.
        rotary_cos, rotary_sin: None, or (seqlen_rotary, rotary_dim / 2), rotary_dim <= headdim.
            Needs k/v.  The new k at position ``cache_seqlens[b] + t`` uses row
            ``cache_seqlens[b] + t``; q's row i uses ``cache_seqlens[b] + i`` when causal or
            windowed, else ``cache_seqlens[b]`` for every row (flash-attn's rule).
        rotary_interleaved: True: rotate channel pairs (0, 1), (2, 3), ... (GPT-J); False:
            pairs (c, c + rotary_dim / 2) (GPT-NeoX).
        cache_seqlens: int, or int32 (batch,): the cache length before appending (positions
            count from the start of the cache row, left padding included).  None: the whole
            cache (``seqlen_cache``, or ``max_blocks * page_size`` when paged); then k/v cannot
            be appended.
        cache_batch_idx: None, or int32 (batch,): batch item b uses cache row
            ``cache_batch_idx[b]`` (not with ``block_table``).  Must be distinct when appending.
        cache_leftpad: None, or int32 (batch,): keys before this position are padding, not seen.
        block_table: None, or int32 (batch, max_blocks_per_sequence): page j of sequence b is
            ``k_cache[block_table[b, j]]``.  Pages may be shared (prefix caching), but not at a
            row that one position appends to and another reads.
        softmax_scale: defaults to ``headdim ** -0.5``.
        causal: bottom-right: q's last row is aligned with the last key after appending.
        window_size, softcap, alibi_slopes: as in ``flash_attn_func``, on the same diagonal.
        num_splits: split-KV count (the cache divided among programs whose partial results are
            merged through their lse); 0 picks it from batch x heads and the cache length.
        return_softmax_lse: also return the lse, float32 (batch, nheads, seqlen_q).
        learnable_sink: None, or (nheads,) float: one extra logit per query head with a zero
            value (as ``flash_attn_func``); the lse leaves it out.
        k_descale, v_descale: with a quantized cache (``k_cache``/``v_cache`` of dtype
            ``torch.int8`` or ``torch.float8_e4m3fn``, both the same), float32 scales
            broadcastable to the cache's (blocks or batch, positions, kv heads): per (position,
            kv head), per kv head (1, 1, heads_k) or per tensor (1, 1, 1).  Attention sees
            ``cache.float() * descale[..., None]``.  New k/v (in q's dtype) are quantized into
            the cache with one scale per (position, kv head) (``flashattn_lite.quantize_kv``'s
            rule), written into the descales, which must then be per (position, kv head).

    Returns ``out`` (batch, seqlen_q, nheads, headdim of v_cache), or ``(out, softmax_lse)``.
    Forward only (no gradients).
    """
    quantized = _check_caches(q, k_cache, v_cache)
    _check_requires_grad((q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, alibi_slopes, learnable_sink, k_descale,
                          v_descale))
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_new = _check_new(k, v, q, k_cache, v_cache)
    k_scales, v_scales = _check_descales(k_cache, v_cache, k_descale, v_descale, quantized, seqlen_new > 0)
    device = q.device
    num_blocks, page_size = k_cache.shape[0], k_cache.shape[1]

    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (a paged cache maps every batch "
                             "item through its own block table row; as in flash-attn)")
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            raise ValueError("block_table must be an int32 tensor of shape (batch, max_blocks_per_sequence)")
        capacity = block_table.shape[1] * page_size
    else:
        capacity = page_size
        if cache_batch_idx is None and num_blocks != batch:
            raise ValueError(f"k_cache has batch {num_blocks} but q has {batch}: pass cache_batch_idx to select "
                             "cache rows")

    # cache lengths before appending, as a host list and an int32 device tensor
    if cache_seqlens is None:
        if seqlen_new:
            raise ValueError("cache_seqlens is required when appending k/v: it says where they go")
        lengths = [capacity] * batch
        seqlens_t = torch.full((batch,), capacity, dtype=torch.int32, device=device)
    elif isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        lengths = [int(cache_seqlens)] * batch
        seqlens_t = None  # made below, once the range is checked (int32)
    elif isinstance(cache_seqlens, torch.Tensor):
        lengths = _check_int32_vector("cache_seqlens", cache_seqlens, batch, device)
        seqlens_t = cache_seqlens
    else:
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor (batch,), got {type(cache_seqlens).__name__}")
    for b, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"cache_seqlens[{b}] = {n} is negative")
        if n + seqlen_new > capacity:
            what = f" + {seqlen_new} new keys" if seqlen_new else ""
            raise ValueError(f"cache_seqlens[{b}] = {n}{what} exceeds the cache capacity of {capacity} positions "
                             f"({'max_blocks * page_size' if block_table is not None else 'k_cache.shape[1]'})")
    if seqlens_t is None:
        seqlens_t = torch.full((batch,), lengths[0] if lengths else 0, dtype=torch.int32, device=device)
    ends = [n + seqlen_new for n in lengths]

    starts = None
    if cache_leftpad is not None:
        starts = _check_int32_vector("cache_leftpad", cache_leftpad, batch, device)
        for b, (s, n) in enumerate(zip(starts, lengths)):
            if not 0 <= s <= n:
                raise ValueError(f"cache_leftpad[{b}] = {s} must be in 0..cache_seqlens[{b}] ({n})")

    if block_table is not None:
        table_host, in_use = _check_block_table(block_table, batch, num_blocks, page_size, ends, device)
        table = block_table
        used_rows = lambda: table_host[in_use].tolist()  # noqa: E731  (pages in use, for the append checks)
    else:
        if cache_batch_idx is not None:
            batch_rows = _check_int32_vector("cache_batch_idx", cache_batch_idx, batch, device)
            for b, r in enumerate(batch_rows):
                if not 0 <= r < num_blocks:
                    raise ValueError(f"cache_batch_idx[{b}] = {r} is out of range: k_cache has {num_blocks} rows")
            if seqlen_new and len(set(batch_rows)) != len(batch_rows):
                raise ValueError("cache_batch_idx has repeated entries: appending k/v would write one cache row "
                                 "twice")
            table = cache_batch_idx[:, None]
            used_rows = lambda: batch_rows  # noqa: E731
        else:
            table = torch.arange(batch, dtype=torch.int32, device=device)[:, None]
            used_rows = lambda: range(batch)  # noqa: E731

    seqlen_ro = _check_rotary(rotary_cos, rotary_sin, head_dim, device, seqlen_new > 0)
    softcap = check_softcap(softcap)
    sink = check_sink(learnable_sink, heads, device)
    slopes = check_alibi(alibi_slopes, batch, heads, device)
    scale = head_dim ** -0.5 if softmax_scale is None else check_scale(softmax_scale, "softmax_scale")
    check_scale_over_softcap(scale, softcap)
    left, right = check_window(window_size)
    local = left >= 0 or right >= 0
    if causal:
        right = 0
    left, right = unbounded_if_beyond(left, right, seqlen_q, capacity)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 0 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int in 0..{MAX_SPLITS} (0 = automatic), got {num_splits!r}")

    # the backend is chosen before the caches are touched: a call no backend can serve
    # raises without having appended anything
    params = backends.Params(softmax_scale=scale, window_left=left, window_right=right, softcap=softcap,
                             alibi_slopes=slopes)
    features = params.features() | {"kv-cache"} | ({"kv-quant"} if quantized else set())
    backend = select_backend(device, q.dtype, head_dim, features,
                             None if v_cache.shape[3] == head_dim else v_cache.shape[3])

    if seqlen_ro:
        q_rows = seqlen_q if (causal or local) else 1
        needed = max(lengths) + max(seqlen_new, q_rows)
        if needed > seqlen_ro:
            raise ValueError(f"rotary_cos/rotary_sin have {seqlen_ro} rows but positions up to {needed - 1} are "
                             "needed (cache_seqlens + new tokens)")
        q_pos = _positions(seqlens_t, seqlen_q, device) if (causal or local) else \
            _positions(seqlens_t, 1, device).expand(batch, seqlen_q)
        q = apply_rotary(q, rotary_cos, rotary_sin, q_pos, rotary_interleaved)
        k = apply_rotary(k, rotary_cos, rotary_sin, _positions(seqlens_t, seqlen_new, device), rotary_interleaved)

    if seqlen_new:
        pos = _positions(seqlens_t, seqlen_new, device)
        if block_table is not None:
            blocks = block_table.long().gather(1, pos // page_size)
            rows = pos % page_size
            slots = blocks * page_size + rows
            if torch.unique(slots).numel() != slots.numel():
                raise ValueError("block_table maps two appended tokens to one cache slot (a page shared between "
                                 "sequences at the positions being appended): the append would write it twice")
            _check_shared_pages(table_host, in_use, blocks, lengths, starts, seqlen_new, page_size)
        else:
            blocks = table.long().expand(batch, seqlen_new)
            rows = pos
        if quantized:
            _check_quantized_append_memory(q, k_cache, v_cache, k, v, k_descale, v_descale, used_rows)
            quantized_new = [quantize_rows(t, quantized) for t in (k, v)]
            for name, (_, descale) in zip("kv", quantized_new):
                if not bool(torch.isfinite(descale).all()):
                    raise ValueError(f"the new {name} holds a non-finite value (inf or NaN): an 8-bit code cannot "
                                     "represent it; nothing was appended")
            for (codes, descale), cache, scales in zip(quantized_new, (k_cache, v_cache), (k_descale, v_descale)):
                cache[blocks, rows] = codes
                scales[blocks, rows] = descale
        else:
            _check_append_memory(q, k_cache, v_cache, k, v, blocks, rows, used_rows)
            k_cache[blocks, rows] = k
            v_cache[blocks, rows] = v

    seqlens_k = (seqlens_t + seqlen_new).to(torch.int32)
    if q.shape[-1] > 1 and q.stride(-1) != 1:
        q = q.contiguous()
    out, lse = _ops.run_decode(q, k_cache, v_cache, table, seqlens_k, cache_leftpad,
                                max(ends, default=0), scale, left, right, softcap, slopes, num_splits, backend, sink,
                                k_descale=k_scales, v_descale=v_scales)
    return (out, lse) if return_softmax_lse else out
