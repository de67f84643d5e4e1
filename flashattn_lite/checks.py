"""What a kernel may assume, checked on the host before it runs.

Two layers use these rules:

* the public functions (interface.py, kvcache.py) check what users pass, with the
  user's argument names (the scalar checks and :func:`check_tensor`, :func:`check_alibi`,
  :func:`check_sink` here, shared by both), and turn it into operator arguments;
* the registered operators (``torch.ops.flashattn_lite.fwd``, ``.bwd``, ``.decode``) are
  public too, so :func:`check_fwd`, :func:`check_bwd` and :func:`check_decode` check
  every argument a kernel reads (shapes, dtypes, devices, strides, offsets, indices)
  once, for every backend, before any kernel runs.  They are skipped only inside
  :func:`trusted`, which the public functions enter after their own checks, so the
  common path pays for one set of checks, not two.

Scalar rules (one for every backend; the kernels compute in float32):

* ``softmax_scale``: finite, and 0 or of magnitude in [2**-126, 2**126];
* ``softcap``: 0 (off) or in [2**-126, 2**126], and ``|softmax_scale| / softcap`` at most
  2**126 (the kernels multiply by it; beyond, float32 overflows);
* ``dropout_p`` in [0, 1); window bounds >= -1;
* sequence lengths (and ``max_seqlen_*``) below 2**31: offsets and lengths are int32,
  as in flash-attn.
"""

import contextlib
import numbers
import threading

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Head dims: q/k (D) and v (Dv, which may differ: MLA) each in 1..MAX_HEAD_DIM; decoding
# (flash_attn_with_kvcache) takes D up to MAX_DECODE_HEAD_DIM (absorbed MLA: D = 576, Dv = 512).
MAX_HEAD_DIM = 512
MAX_DECODE_HEAD_DIM = 576
# 8-bit KV-cache codes (flashattn_lite/quant.py)
QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)
INT32_MAX = 2 ** 31 - 1
_INF = float("inf")
# a normal float32 whose reciprocal is one too
_TINY, _HUGE = 2.0 ** -126, 2.0 ** 126


# ------------------------------------------------------------------ scalars

def _is_number(x):
    """A real Python/numpy number or a torch symbolic one (torch.compile with dynamic shapes);
    not a bool, not a tensor."""
    if type(x) is float or type(x) is int:  # the common case, without the ABC checks below
        return True
    return isinstance(x, (numbers.Real, torch.SymFloat, torch.SymInt)) and not isinstance(x, (bool, torch.Tensor))


def _as_float(x):
    # numpy scalars become Python floats; symbolic floats stay symbolic (comparisons below
    # are guards under torch.compile, where math.isfinite would break the graph)
    return x if isinstance(x, (torch.SymFloat, torch.SymInt)) else float(x)


def check_scale(scale, name="softmax_scale"):
    if isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a Python number, not a tensor")
    if not _is_number(scale):
        raise TypeError(f"{name} must be a real number, got {type(scale).__name__}")
    scale = _as_float(scale)
    if not -_INF < scale < _INF:
        raise ValueError(f"{name} must be a finite number, got {scale!r}")
    if scale != 0 and not _TINY <= abs(scale) <= _HUGE:
        raise ValueError(f"{name} = {scale!r} is outside the float32 range the kernels compute in: use 0 or a "
                         "magnitude in [2**-126, 2**126]")
    return scale


def check_softcap(softcap):
    if isinstance(softcap, torch.Tensor) or not _is_number(softcap):
        raise TypeError(f"softcap must be a Python number, got {type(softcap).__name__}")
    softcap = _as_float(softcap)
    if not -_INF < softcap < _INF or softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 = off), got {softcap!r}")
    if softcap != 0 and not _TINY <= softcap <= _HUGE:
        raise ValueError(f"softcap = {softcap!r} is outside the range the kernels compute in float32: use 0 (off) "
                         "or a value in [2**-126, 2**126]")
    return softcap


def check_scale_over_softcap(scale, softcap):
    """The kernels multiply the raw scores by ``scale / softcap`` before the tanh."""
    if softcap != 0 and abs(scale) > _HUGE * softcap:
        raise ValueError(f"softmax_scale / softcap = {scale!r} / {softcap!r} exceeds 2**126, beyond the float32 "
                         "range the kernels compute in")


def check_dropout(dropout_p):
    if isinstance(dropout_p, torch.Tensor) or not _is_number(dropout_p):
        raise TypeError(f"dropout_p must be a Python number, got {type(dropout_p).__name__}")
    dropout_p = _as_float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return dropout_p


def check_window(window_size):
    try:
        left, right = window_size
        if not (type(left) is int and type(right) is int) and not all(
                isinstance(x, (numbers.Integral, torch.SymInt)) and not isinstance(x, bool) for x in (left, right)):
            raise TypeError
        left, right = int(left), int(right)
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right) of ints, got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= 0, or -1 for unbounded, got {window_size!r}")
    return left, right


def check_seqlen(name, n):
    if n > INT32_MAX:
        raise ValueError(f"{name} = {n} is too long: sequence lengths must be below 2**31 (offsets and lengths are "
                         "int32, as in flash-attn)")


# ------------------------------------------------------------------ tensors (the public functions' checks)

def check_tensor(name, t, ndim, layout, quantized_ok=False):
    """A tensor argument of a public function: ``ndim`` dims (``layout`` names them in the
    error) and a supported dtype (``quantized_ok``: or an 8-bit KV-cache code dtype)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES and not (quantized_ok and t.dtype in QUANT_DTYPES):
        extra = ", or int8 / float8_e4m3fn (a quantized cache, with descales)" if quantized_ok else ""
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64{extra}")


def check_alibi(slopes, batch, heads, device):
    """ALiBi slopes: (heads,) or (batch, heads), float; returned as float32 (batch, heads),
    with a stride-0 batch dim for the (heads,) form (no copy)."""
    if slopes is None:
        return None
    if not isinstance(slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor, got {type(slopes).__name__}")
    if slopes.shape not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}) (heads, or batch x "
                         f"heads), got {tuple(slopes.shape)}")
    if not slopes.is_floating_point():
        raise TypeError(f"alibi_slopes must be a float tensor, got {slopes.dtype}")
    if slopes.device != device:
        raise ValueError(f"alibi_slopes is on {slopes.device} but q is on {device}")
    slopes = slopes.to(torch.float32)
    return slopes.expand(batch, heads) if slopes.dim() == 1 else slopes


# ------------------------------------------------------------------ the operators' contract

_state = threading.local()


@contextlib.contextmanager
def trusted():
    """Inside: the operators skip :func:`check_fwd`/:func:`check_bwd`/:func:`check_decode`
    (the caller has checked its arguments itself).  Per thread."""
    before = getattr(_state, "trusted", False)
    _state.trusted = True
    try:
        yield
    finally:
        _state.trusted = before


def is_trusted():
    return getattr(_state, "trusted", False)


def _fail(op, message, kind=ValueError):
    raise kind(f"flashattn_lite.{op}: {message}")


def _tensor(op, name, t, ndim):
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    if t.dim() != ndim:
        _fail(op, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def _same(op, names, tensors):
    t0 = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != t0.dtype:
            _fail(op, f"{names[0]} and {name} must share one dtype, got {t0.dtype} and {t.dtype}", TypeError)
        if t.device != t0.device:
            _fail(op, f"{names[0]} and {name} must be on one device, got {t0.device} and {t.device}")


def _heads(op, hq, hk, what="k/v"):
    if hk == 0 or hq % hk != 0:
        _fail(op, f"q has {hq} heads, not a multiple of the {hk} heads of {what}")


def _head_dim(op, d, what="head dim", limit=MAX_HEAD_DIM):
    if not 1 <= d <= limit:
        _fail(op, f"{what} must be in 1..{limit}, got {d}")


def out_shape(q, v):
    """The output's shape: q's, with v's head dim (Dv may differ from D: MLA)."""
    return tuple(q.shape[:-1]) + (v.shape[-1],)


def _int32_vector(op, name, t, n, device):
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    if t.dtype != torch.int32:
        _fail(op, f"{name} must be int32, got {t.dtype}", TypeError)
    if t.dim() != 1 or (n is not None and t.shape[0] != n):
        want = f"({n},)" if n is not None else "1-D"
        _fail(op, f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        _fail(op, f"{name} is on {t.device} but q is on {device}")
    return t.tolist()


def _slopes(op, slopes, batch, heads, device):
    if slopes is None:
        return
    if not isinstance(slopes, torch.Tensor) or slopes.dtype != torch.float32 or tuple(slopes.shape) != (batch, heads):
        what = f"{slopes.dtype} {tuple(slopes.shape)}" if isinstance(slopes, torch.Tensor) else type(slopes).__name__
        _fail(op, f"alibi_slopes must be a float32 tensor of shape (batch, heads) = ({batch}, {heads}), got {what}")
    if slopes.device != device:
        _fail(op, f"alibi_slopes is on {slopes.device} but q is on {device}")


def _scalars(op, p):
    for name, value in (("softmax_scale", p.softmax_scale), ("softcap", p.softcap), ("dropout_p", p.dropout_p)):
        if not _is_number(value):
            _fail(op, f"{name} must be a number, got {type(value).__name__}", TypeError)
    try:
        scale = check_scale(p.softmax_scale)
        check_scale_over_softcap(scale, check_softcap(p.softcap))
        check_dropout(p.dropout_p)
    except (TypeError, ValueError) as e:
        _fail(op, str(e), type(e))
    for name in ("window_left", "window_right"):
        if getattr(p, name) < -1:
            _fail(op, f"{name} must be >= -1 (-1 = unbounded), got {getattr(p, name)}")
    if abs(p.diag_offset) > INT32_MAX:
        _fail(op, f"diag_offset = {p.diag_offset} is beyond int32")


def _cu_seqlens(op, name, cu, total, device):
    values = _int32_vector(op, name, cu, None, device)
    if len(values) < 2:
        _fail(op, f"{name} must have batch + 1 >= 2 entries, got {len(values)}")
    if values[0] != 0:
        _fail(op, f"{name}[0] must be 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        _fail(op, f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        _fail(op, f"{name}[-1] = {values[-1]} must equal the number of packed tokens ({total})")
    return [b - a for a, b in zip(values, values[1:])]


def _max_seqlen(op, name, value, lengths):
    if not 0 <= value <= INT32_MAX:
        _fail(op, f"{name} = {value} must be in 0..2**31-1")
    if value < max(lengths):
        _fail(op, f"{name} = {value} is smaller than the longest sequence ({max(lengths)})")


def _bias(op, bias, full, device):
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        _fail(op, "bias must be a floating-point tensor", TypeError)
    if tuple(bias.shape) != full:
        _fail(op, f"bias must be a (batch, heads, seqlen_q, seqlen_k) = {full} view (broadcast dims with stride 0), "
                  f"got shape {tuple(bias.shape)}")
    if bias.device != device:
        _fail(op, f"bias is on {bias.device} but q is on {device}")


def check_sink(sink, heads, device, op=None):
    """learnable_sink: None, or a float tensor (num_heads_q,) on q's device."""
    if sink is None:
        return None
    where = f"flashattn_lite.{op}: " if op else ""
    if not isinstance(sink, torch.Tensor):
        raise TypeError(f"{where}learnable_sink must be a torch.Tensor, got {type(sink).__name__}")
    if not sink.is_floating_point():
        raise TypeError(f"{where}learnable_sink must be a float tensor, got {sink.dtype}")
    if tuple(sink.shape) != (heads,):
        raise ValueError(f"{where}learnable_sink must have shape (num_heads_q,) = ({heads},), got "
                         f"{tuple(sink.shape)}")
    if sink.device != device:
        raise ValueError(f"{where}learnable_sink is on {sink.device} but q is on {device}")
    return sink


def check_fwd(q, k, v, p, op="fwd", sink=None):
    """The forward's contract (``backends.Params`` documents it); raises naming the problem."""
    dims = 3 if p.varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(op, name, t, dims)
    _same(op, ("q", "k", "v"), (q, k, v))
    if q.dtype not in SUPPORTED_DTYPES:
        _fail(op, f"dtype {q.dtype} is not supported (float16, bfloat16, float32, float64)", TypeError)
    if k.shape[:-1] != v.shape[:-1]:
        _fail(op, f"k and v must have the same shape except the head dim, got {tuple(k.shape)} and "
                  f"{tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        _fail(op, f"q has head dim {q.shape[-1]} but k has {k.shape[-1]}")
    _head_dim(op, q.shape[-1])
    _head_dim(op, v.shape[-1], "value head dim")
    _heads(op, q.shape[-2], k.shape[-2])
    _scalars(op, p)
    if p.varlen:
        if p.cu_seqlens_k is None:
            _fail(op, "cu_seqlens_q and cu_seqlens_k must be given together")
        lengths_q = _cu_seqlens(op, "cu_seqlens_q", p.cu_seqlens_q, q.shape[0], q.device)
        lengths_k = _cu_seqlens(op, "cu_seqlens_k", p.cu_seqlens_k, k.shape[0], q.device)
        if len(lengths_q) != len(lengths_k):
            _fail(op, f"cu_seqlens_q and cu_seqlens_k have {len(lengths_q) + 1} and {len(lengths_k) + 1} entries")
        _max_seqlen(op, "max_seqlen_q", p.max_seqlen_q, lengths_q)
        _max_seqlen(op, "max_seqlen_k", p.max_seqlen_k, lengths_k)
        if p.bias is not None:
            _fail(op, "bias is not supported with cu_seqlens (varlen)")
        batch = len(lengths_q)
    else:
        if p.cu_seqlens_k is not None:
            _fail(op, "cu_seqlens_q and cu_seqlens_k must be given together")
        batch = q.shape[0]
        if k.shape[0] != batch:
            _fail(op, f"q has batch {batch} but k/v have {k.shape[0]}")
        check_seqlen("seqlen_q", q.shape[1])
        check_seqlen("seqlen_k", k.shape[1])
        _bias(op, p.bias, (batch, q.shape[2], q.shape[1], k.shape[1]), q.device)
    _slopes(op, p.alibi_slopes, batch, q.shape[-2], q.device)
    check_sink(sink, q.shape[-2], q.device, op)


def check_bwd(dout, dlse, q, k, v, out, lse, p, bias_grad, sink=None):
    op = "bwd"
    check_fwd(q, k, v, p, op, sink=sink)
    want_out = out_shape(q, v)
    for name, t in (("dout", dout), ("out", out)):
        _tensor(op, name, t, q.dim())
        if tuple(t.shape) != want_out:
            _fail(op, f"{name} must have shape {want_out} (q's, with v's head dim), got {tuple(t.shape)}")
        _same(op, ("q", name), (q, t))
    from .backends.base import accum_dtype
    want = (q.shape[1], q.shape[0]) if p.varlen else (q.shape[0], q.shape[2], q.shape[1])
    for name, t in (("lse", lse), ("dlse", dlse)):
        if t is None and name == "dlse":
            continue
        _tensor(op, name, t, len(want))
        if tuple(t.shape) != want or t.dtype != accum_dtype(q.dtype) or t.device != q.device:
            _fail(op, f"{name} must be {accum_dtype(q.dtype)} of shape {want} on {q.device}, got {t.dtype} "
                      f"{tuple(t.shape)} on {t.device}")
    if bias_grad and p.bias is None:
        _fail(op, "bias_grad needs a bias")


def check_decode(q, k_cache, v_cache, block_table, seqlens_k, leftpad, max_seqlen_k, p, num_splits, sink=None,
                 k_descale=None, v_descale=None):
    """The decode operator's contract (``ops.DECODE_SCHEMA``): every page a valid position
    needs lies in the cache, every length within the table's capacity; an 8-bit cache comes
    with float32 (num_blocks, page_size, heads_k) descales, a float cache without."""
    op = "decode"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _tensor(op, name, t, 4)
    if k_cache.dtype in QUANT_DTYPES:
        _same(op, ("k_cache", "v_cache"), (k_cache, v_cache))
        if q.device != k_cache.device:
            _fail(op, f"q and k_cache must be on one device, got {q.device} and {k_cache.device}")
        for name, t, cache in (("k_descale", k_descale, k_cache), ("v_descale", v_descale, v_cache)):
            want = tuple(cache.shape[:3])
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != want \
                    or t.device != cache.device:
                what = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else repr(t)
                _fail(op, f"a {k_cache.dtype} cache needs {name} float32 of shape {want} (num_blocks, page_size, "
                          f"heads_k; broadcast dims with stride 0) on {cache.device}, got {what}")
    else:
        _same(op, ("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
        if k_descale is not None or v_descale is not None:
            _fail(op, f"k_descale/v_descale given with a {k_cache.dtype} cache: they belong to int8/float8_e4m3fn caches")
    if q.dtype not in SUPPORTED_DTYPES:
        _fail(op, f"dtype {q.dtype} is not supported (float16, bfloat16, float32, float64)", TypeError)
    if k_cache.shape[:3] != v_cache.shape[:3]:
        _fail(op, f"k_cache and v_cache must have the same shape except the head dim, got {tuple(k_cache.shape)} "
                  f"and {tuple(v_cache.shape)}")
    if k_cache.shape[3] != q.shape[3]:
        _fail(op, f"q has head dim {q.shape[3]} but k_cache has {k_cache.shape[3]}")
    _head_dim(op, q.shape[3], limit=MAX_DECODE_HEAD_DIM)
    _head_dim(op, v_cache.shape[3], "value head dim")
    _heads(op, q.shape[2], k_cache.shape[2], "the caches")
    _scalars(op, p)
    batch, num_blocks, page = q.shape[0], k_cache.shape[0], k_cache.shape[1]
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
            or block_table.shape[0] != batch:
        what = (f"{block_table.dtype} {tuple(block_table.shape)}" if isinstance(block_table, torch.Tensor)
                else type(block_table).__name__)
        _fail(op, f"block_table must be int32 of shape (batch={batch}, blocks), got {what}")
    if block_table.device != q.device:
        _fail(op, f"block_table is on {block_table.device} but q is on {q.device}")
    ends = _int32_vector(op, "seqlens_k", seqlens_k, batch, q.device)
    starts = _int32_vector(op, "leftpad", leftpad, batch, q.device) if leftpad is not None else [0] * batch
    capacity = block_table.shape[1] * page
    for b, (s, e) in enumerate(zip(starts, ends)):
        if not 0 <= e <= capacity:
            _fail(op, f"seqlens_k[{b}] = {e} must be in 0..{capacity} (blocks per sequence x page size)")
        if not 0 <= s <= e:
            _fail(op, f"leftpad[{b}] = {s} must be in 0..seqlens_k[{b}] ({e})")
    if not 0 <= max_seqlen_k <= INT32_MAX or (ends and max_seqlen_k < max(ends)):
        _fail(op, f"max_seqlen_k = {max_seqlen_k} must be in max(seqlens_k)..2**31-1")
    if batch and page and block_table.shape[1]:
        table = block_table.cpu()
        ends_t = torch.tensor(ends, dtype=torch.int64)
        j = torch.arange(table.shape[1])[None, :]
        # every page up to the one holding position end - 1 (kernels may read the pages before a left pad)
        used = j < (ends_t[:, None] + page - 1) // page
        bad = used & ((table < 0) | (table >= num_blocks))
        if bool(bad.any()):
            b, jj = (int(x) for x in bad.nonzero()[0])
            _fail(op, f"block_table[{b}, {jj}] = {int(table[b, jj])} is outside the cache's {num_blocks} blocks")
    elif any(e > 0 for e in ends):
        _fail(op, "the caches hold no positions but seqlens_k is positive")
    _slopes(op, p.alibi_slopes, batch, q.shape[2], q.device)
    check_sink(sink, q.shape[2], q.device, op)
    if isinstance(num_splits, bool) or not 0 <= num_splits <= 128:
        _fail(op, f"num_splits must be in 0..128 (0 = automatic), got {num_splits}")
