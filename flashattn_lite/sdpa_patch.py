"""Route ``torch.nn.functional.scaled_dot_product_attention`` through flashattn_lite.

::

    with flashattn_lite.patch_sdpa():
        out = model(x)                # every F.scaled_dot_product_attention call inside

    flashattn_lite.enable_sdpa_patch()    # or for the rest of the program
    flashattn_lite.disable_sdpa_patch()

While the patch is on, ``torch.nn.functional.scaled_dot_product_attention`` is a wrapper
that sends the calls flashattn_lite supports (4-D or 3-D float16/bfloat16/float32/float64
tensors of one dtype (after autocast's cast, inside ``torch.autocast``), device and batch
size, query/key head dims equal and up to 512, a value head dim up to 512 that may differ,
no nested tensors, a bool or float ``attn_mask`` broadcastable to (batch, heads, L, S),
GQA with ``enable_gqa=True``) to
:func:`flashattn_lite.scaled_dot_product_attention`, and every other call, unchanged, to
the function it replaced, so unsupported or invalid calls behave (and raise) exactly as
before.  Differences on supported calls: a query row that may attend
to no key gives 0 (torch may give NaN), and dropout draws its mask from flashattn_lite's
own random stream.

Only lookups through the module attribute see the patch (``F.scaled_dot_product_attention(...)``,
as transformers' sdpa backend and ``nn.MultiheadAttention`` do); a name bound earlier with
``from torch.nn.functional import scaled_dot_product_attention`` keeps the original.
"""

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F

from .interface import MAX_HEAD_DIM, SUPPORTED_DTYPES, autocast_dtype
from .interface import scaled_dot_product_attention as _fa_sdpa

__all__ = ["patch_sdpa", "enable_sdpa_patch", "disable_sdpa_patch", "sdpa_patch_enabled"]

_lock = threading.Lock()
_replaced = None  # the function the patch replaced while it is on, else None


def _supported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    if any(t.is_nested or t.layout != torch.strided for t in tensors):
        return False
    dim = query.dim()
    if dim not in (3, 4) or key.dim() != dim or value.dim() != dim:
        return False
    def dtype(t):  # inside torch.autocast, the dtype flashattn_lite (as torch) casts it to
        return autocast_dtype(t, query.device.type)

    if dtype(query) not in SUPPORTED_DTYPES or not (dtype(query) == dtype(key) == dtype(value)):
        return False
    if not (query.device == key.device == value.device) or query.device.type not in ("cpu", "cuda"):
        return False
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-1] != value.shape[:-1]:
        return False  # batch broadcasting or a different value shape (but the head dim): leave it to torch
    d = query.shape[-1]
    if key.shape[-1] != d or not 1 <= d <= MAX_HEAD_DIM or not 1 <= value.shape[-1] <= MAX_HEAD_DIM:
        return False
    hq, hk = query.shape[-3], key.shape[-3]
    if hq != hk and not (enable_gqa and hk > 0 and hq % hk == 0):
        return False
    if attn_mask is not None:
        if is_causal or not isinstance(attn_mask, torch.Tensor) or attn_mask.device != query.device:
            return False
        if dtype(attn_mask) not in (torch.bool, torch.float32, dtype(query)):
            return False  # torch rejects a float mask of another dtype; let it say so
        full = tuple(query.shape[:-1]) + (key.shape[-2],)
        try:
            if attn_mask.dim() > len(full) or torch.broadcast_shapes(attn_mask.shape, full) != full:
                return False
        except RuntimeError:
            return False
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        return False
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        return False
    return True


def _make_wrapper(original):
    @functools.wraps(original)
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                     enable_gqa=False, **kwargs):
        if not kwargs and _supported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
            return _fa_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        if enable_gqa:  # only passed on when set: torch < 2.5 has no such argument
            kwargs["enable_gqa"] = enable_gqa
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kwargs)

    scaled_dot_product_attention._flashattn_lite_replaced = original
    return scaled_dot_product_attention


def sdpa_patch_enabled():
    """True while ``torch.nn.functional.scaled_dot_product_attention`` is routed here."""
    return _replaced is not None


def enable_sdpa_patch():
    """Route ``F.scaled_dot_product_attention`` to flashattn_lite (idempotent); returns
    whether it was already on."""
    global _replaced
    with _lock:
        if _replaced is not None:
            return True
        _replaced = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _make_wrapper(_replaced)
        return False


def disable_sdpa_patch():
    """Put back the function the patch replaced (idempotent)."""
    global _replaced
    with _lock:
        if _replaced is None:
            return
        F.scaled_dot_product_attention = _replaced
        _replaced = None


@contextlib.contextmanager
def patch_sdpa():
    """Context manager: the patch is on inside the block and back to its previous state on
    exit, also when the block raises."""
    was_on = enable_sdpa_patch()
    try:
        yield
    finally:
        if not was_on:
            disable_sdpa_patch()
