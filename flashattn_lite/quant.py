"""8-bit KV caches: the codes, their scales, and quantizing keys/values into them.

A quantized cache holds codes (``torch.int8`` or ``torch.float8_e4m3fn``) and a float32
*descale* per (position, kv head): the value attention sees is
``codes.float() * descale[..., None]``.  Writing a row of D values picks its descale from
the row's largest magnitude:

* int8: ``descale = amax / 127``, codes ``round(x / descale)`` (round half to even), in
  [-127, 127];
* float8_e4m3fn: ``descale = amax / 448`` (e4m3's largest finite value), codes
  ``(x / descale)`` rounded to the nearest e4m3 value.

A row of zeros gets descale 0 and codes 0.  Nothing here imports the rest of the package:
the API (``flash_attn_with_kvcache``), the operator checks and the backends all use it.
"""

import torch

QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)
# the largest code magnitude a row's amax maps to
CODE_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def is_quantized(t):
    return isinstance(t, torch.Tensor) and t.dtype in QUANT_DTYPES


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def quantize_kv(x, dtype=torch.int8):
    """(codes, descale) of ``x`` (..., headdim), one scale per row of the last dim.

    Args:
        x: a float tensor, e.g. keys (batch, seqlen, heads_k, headdim); finite and within
            float32's range (the arithmetic is float32: float64 rows below its smallest
            magnitude quantize to 0).
        dtype: ``torch.int8`` or ``torch.float8_e4m3fn``.

    Returns ``codes`` (x's shape, ``dtype``) and ``descale`` (x's shape without the last dim,
    float32), so that ``codes.float() * descale[..., None]`` approximates x; these are what
    ``flash_attn_with_kvcache`` takes as ``k_cache``/``v_cache`` and ``k_descale``/``v_descale``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype in QUANT_DTYPES:
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"quantize_kv: x must be a floating-point tensor (float16, bfloat16, float32, float64), "
                        f"got {what}")
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"quantize_kv: dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")
    if x.dim() == 0:
        raise ValueError("quantize_kv: x needs at least one dim (the head dim is the last)")
    codes, descale = quantize_rows(x, dtype)
    if x.numel() and not bool(torch.isfinite(descale).all()):
        if not bool(torch.isfinite(x).all()):
            raise ValueError("quantize_kv: x holds a non-finite value (inf or NaN); an 8-bit code cannot represent it")
        raise ValueError(f"quantize_kv: x holds a value beyond float32's range (largest magnitude "
                         f"{x.abs().max().item():.3g} > {torch.finfo(torch.float32).max:.3g}); the descale is float32")
    return codes, descale


def quantize_rows(x, dtype):
    """The arithmetic of :func:`quantize_kv`, unchecked: float32 throughout."""
    x32 = x.float()
    amax = x32.abs().amax(-1) if x.shape[-1] else x32.new_zeros(x.shape[:-1])
    descale = amax / CODE_MAX[dtype]
    scaled = x32 / torch.where(descale > 0, descale, torch.ones_like(descale))[..., None]
    if dtype == torch.int8:
        codes = torch.round(scaled).clamp_(-127, 127).to(torch.int8)
    else:
        codes = scaled.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
    return codes, descale


def dequantize(codes, descale, dtype=torch.float32):
    """``codes.to(dtype) * descale[..., None]``: the values a quantized cache stands for."""
    return codes.to(dtype) * descale.to(dtype)[..., None]


def descale_view(name, descale, cache, cache_name):
    """``descale`` as a float32 (num_blocks, page_size, heads_k) view of ``cache``'s rows
    (broadcast dims with stride 0); a clear error when it cannot be one."""
    want = tuple(cache.shape[:3])
    if not isinstance(descale, torch.Tensor):
        raise TypeError(f"{name} must be a float32 torch.Tensor, got {type(descale).__name__}")
    if descale.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {descale.dtype}")
    if descale.device != cache.device:
        raise ValueError(f"{name} is on {descale.device} but {cache_name} is on {cache.device}")
    shape = tuple(descale.shape)
    ok = len(shape) <= 3 and all(s in (1, w) for s, w in zip(reversed(shape), reversed(want)))
    if not ok:
        raise ValueError(f"{name} must be broadcastable to {cache_name}'s (blocks or batch, positions, kv heads) = "
                         f"{want}: per (position, kv head) {want}, per kv head (1, 1, {want[2]}), or per tensor "
                         f"(1, 1, 1); got {shape}")
    return descale.expand(want)


def is_per_position(descale, cache):
    """Whether ``descale`` (as given) has one entry per (position, kv head) of ``cache``:
    the full shape with no broadcast (stride-0) dims, so appends can write their scales."""
    want = tuple(cache.shape[:3])
    if tuple(descale.shape) != want:
        return False
    return all(st != 0 or n <= 1 for st, n in zip(descale.stride(), want))


__all__ = ["quantize_kv", "dequantize", "QUANT_DTYPES", "CODE_MAX"]
