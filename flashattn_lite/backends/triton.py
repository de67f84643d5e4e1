"""Launches the Triton kernels of ``flashattn_lite.triton_kernels``.

Serves CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` (Triton's
interpreter; that is how the kernels are tested without a GPU).  Kernel modules
are imported on first use only, so importing flashattn_lite never initialises
Triton's GPU driver.
"""

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import re
import os

import torch

from .. import planning, rng
from .base import missing_features

NAME = "triton"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FEATURES = ("forward", "backward", "causal", "window", "gqa", "fp16", "bf16", "fp32", "dropout", "softcap", "alibi",
            "attn_mask", "varlen", "kv-cache", "kv-quant")


def interpreter_enabled():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The oldest Triton whose interpreter runs the test suite and whose compiler builds every
# shipped config for sm_80/sm_90 (docs/development.md: tested versions).
MIN_TRITON = (3, 4)


def triton_version():
    """The installed Triton's (major, minor), read without importing it; None if absent."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        text = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # a source tree on the path: import it
        import triton

        text = triton.__version__
    parts = [int(p) for p in re.findall(r"\d+", text)[:2]]
    return tuple(parts + [0] * (2 - len(parts)))


def available():
    version = triton_version()
    if version is None:
        return False, "triton is not installed"
    if version < MIN_TRITON:
        return False, (f"triton {version[0]}.{version[1]} is older than the oldest supported "
                       f"{MIN_TRITON[0]}.{MIN_TRITON[1]}")
    if torch.cuda.is_available():
        return True, "triton on CUDA"
    if interpreter_enabled():
        return True, "triton interpreter on CPU tensors (TRITON_INTERPRET=1)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"


def supports(call):
    """None if this backend can serve ``call``, else the reason it cannot."""
    ok, why = available()
    if not ok:
        return why
    if not (call.device.type == "cuda" or (call.device.type == "cpu" and interpreter_enabled())):
        return f"tensors on {call.device.type}; triton needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"
    if call.dtype not in _DTYPES:
        return f"dtype {call.dtype} is not supported by triton (fp16, bf16, fp32)"
    missing = missing_features(call, FEATURES)
    if missing:
        return f"triton {missing}"
    head_dim, head_dim_v = call.head_dim, call.dv
    # decoding reads a D above 512 as a 512-wide tile plus a tail (absorbed MLA: 576 = 512 + 64)
    max_d = MAX_DECODE_HEAD_DIM if "kv-cache" in call.features else MAX_HEAD_DIM
    if head_dim > max_d or head_dim_v > MAX_HEAD_DIM:
        return (f"triton supports head dims up to {MAX_HEAD_DIM} (query/key up to {MAX_DECODE_HEAD_DIM} when "
                f"decoding from a KV cache), got {head_dim} and value head dim {head_dim_v}")
    from flashattn_lite.triton_kernels import configs

    if ("backward" in call.features and call.dtype == torch.float32
            and max(head_dim, head_dim_v) > configs.FP32_BWD_MAX_HEAD_DIM):
        return (f"triton has no float32 backward for head dims above {configs.FP32_BWD_MAX_HEAD_DIM} (got "
                f"{head_dim}/{head_dim_v}: its dK/dV tiles would exceed the GPU's shared memory); use fp16/bf16")
    return None


MAX_HEAD_DIM = 512
MAX_DECODE_HEAD_DIM = 576


def patch_interpreter_bf16_dot():
    """Work around Triton's CPU interpreter multiplying bf16 ``tl.dot`` operands as raw
    uint16 bits: widen bf16 operands to fp32 (exact) first, as tensor cores do; and round
    its float32 -> bf16 casts to nearest even, as the GPU does.

    Touches only the interpreter (never GPU code generation) and is idempotent; it
    is applied whenever the kernels are first used under TRITON_INTERPRET=1.
    """
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_flashattn_lite_bf16_patch", False):
        return
    original = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar == interpreter.tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, interpreter.tl.float32)
        return handle

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, widen(a), widen(b), d, *args, **kwargs)

    builder.create_dot = create_dot
    _patch_interpreter_bf16_cast(interpreter)
    builder._flashattn_lite_bf16_patch = True
    _patch_interpreter_index(interpreter)


def _patch_interpreter_bf16_cast(interpreter):
    """Triton's interpreter casts float32 to bf16 by dropping the low 16 bits (truncation);
    the GPU rounds to nearest even.  Round here too, so interpreter results carry the GPU's
    rounding (a truncated P put a bf16 backward 3x over the tolerance once)."""
    import numpy as np

    builder = interpreter.InterpreterBuilder
    original = getattr(builder, "cast_impl", None)
    if original is None:
        return
    tl = interpreter.tl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.asarray(src.data, dtype=np.float32)
            bits = data.view(np.uint32)
            # add half an ulp of bf16, minus one unless the kept lsb is odd (ties to even)
            rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
            out = np.where(np.isnan(data), (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)
            return interpreter.TensorHandle(out, dst_type.scalar)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl


def _patch_interpreter_index(interpreter):
    """Triton's interpreter before 3.7 turns a scalar into a Python int with ``int(data)``,
    which NumPy 2.x refuses for the one-element 1-D arrays its scalars are (``range(lo, hi,
    BLOCK_N)`` then fails: "only 0-dimensional arrays can be converted to Python scalars");
    Triton 3.7+ squeezes first.  Do that on every version."""
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_flashattn_lite_index_patch", False):
        return

    def index(self):
        return int(self.handle.data.squeeze())

    def patched(tensor, *args, **kwargs):
        result = original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if scope is not None:
            scope.set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index
        return result

    patched._flashattn_lite_index_patch = True
    interpreter._patch_lang_tensor = patched


@functools.lru_cache(maxsize=None)
def _kernels():
    if interpreter_enabled():
        patch_interpreter_bf16_dot()
    from flashattn_lite.triton_kernels import attention, configs
    return attention, configs


def _capability(device):
    return None if device.type == "cpu" else torch.cuda.get_device_capability(device)


def _dot_precision(dtype):
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _geometry(q, k, p):
    """(batch, seqlen_q, seqlen_k, heads, heads_k): dense shapes, or varlen's
    (sequences, max_seqlen_q, max_seqlen_k, ...), the bounds capped by the packed token
    counts (no sequence is longer, and the grid follows them)."""
    if p.varlen:
        return (p.cu_seqlens_q.shape[0] - 1, min(p.max_seqlen_q, q.shape[0]), min(p.max_seqlen_k, k.shape[0]),
                q.shape[1], k.shape[1])
    return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2]


def _offsets_contiguous(p):
    """The kernels read cu_seqlens as packed int32 arrays."""
    if p.varlen and (p.cu_seqlens_q.stride(0) != 1 or p.cu_seqlens_k.stride(0) != 1):
        return dataclasses.replace(p, cu_seqlens_q=p.cu_seqlens_q.contiguous(),
                                   cu_seqlens_k=p.cu_seqlens_k.contiguous())
    return p


def _s(t, varlen=False):
    """(batch, seq, head) strides of a (B, S, H, D) tensor; varlen (T, H, D) has batch stride 0."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse, varlen):
    """(batch, head) strides of lse: (B, H, Sq), or varlen's (H, total_q)."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _strides(varlen, **tensors):
    """Keyword strides for the kernels: ``q=t`` gives stride_qb, stride_qs, stride_qh; ``l=lse``
    gives stride_lb, stride_lh."""
    named = {}
    for prefix, t in tensors.items():
        if prefix == "l":
            named.update(zip(("stride_lb", "stride_lh"), _lse_strides(t, varlen)))
        else:
            named.update(zip((f"stride_{prefix}b", f"stride_{prefix}s", f"stride_{prefix}h"), _s(t, varlen)))
    return named


def _common(q, k, v, p, cfg, configs):
    """Kernel arguments shared by every attention kernel: pointers, strides, scalars and flags.
    Q/K tiles are ``head_dim`` wide, V/O/dO tiles ``head_dim_v`` (which may differ: MLA)."""
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    block_d, block_dv = configs.padded_head_dim(head_dim), configs.padded_head_dim(head_dim_v)
    _, seqlen_q, seqlen_k, heads, heads_k = _geometry(q, k, p)
    # bounds past both sequences act as unbounded; clamping keeps the kernels' int32 sums in range
    reach = seqlen_q + seqlen_k + abs(p.diag_offset)
    slopes, bias, dropout = p.alibi_slopes, p.bias, p.dropout_p > 0
    # the Philox counter layout of flashattn_lite.rng: ((b * ctr_sb + h * ctr_sh) + row) * ctr_sk + key
    ctr = (0, q.shape[0], p.max_seqlen_k) if p.varlen else (heads * seqlen_q, seqlen_q, seqlen_k)
    args = dict(ALIBI=slopes if slopes is not None else q,  # dummy pointers when unused
                BIAS=bias if bias is not None else q,
                CU_Q=p.cu_seqlens_q if p.varlen else q, CU_K=p.cu_seqlens_k if p.varlen else q,
                stride_ab=slopes.stride(0) if slopes is not None else 0,
                stride_ah=slopes.stride(1) if slopes is not None else 0,
                **dict(zip(("stride_bb", "stride_bh", "stride_bm", "stride_bn"),
                           bias.stride() if bias is not None else (0, 0, 0, 0))),
                seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim, head_dim_v=head_dim_v,
                group=heads // heads_k,
                offset=p.diag_offset, left=min(max(p.window_left, 0), reach),
                right=min(max(p.window_right, 0), reach),
                qk_scale=p.softmax_scale * 1.4426950408889634,
                softcap_pre=p.softmax_scale / p.softcap if p.softcap > 0 else 0.0,
                softcap_post=p.softcap * 1.4426950408889634,
                seed=p.dropout_seed if dropout else 0, drop_thresh=rng.threshold(p.dropout_p) if dropout else 0,
                drop_scale=1.0 / (1.0 - p.dropout_p), **dict(zip(("ctr_sb", "ctr_sh", "ctr_sk"), ctr)))
    even = not p.varlen
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
                EVEN_M=even and seqlen_q % cfg.block_m == 0, EVEN_N=even and seqlen_k % cfg.block_n == 0,
                PAD_D=head_dim != block_d, PAD_DV=head_dim_v != block_dv, HAS_LEFT=p.window_left >= 0, HAS_RIGHT=p.window_right >= 0,
                HAS_SOFTCAP=p.softcap > 0, HAS_ALIBI=slopes is not None, HAS_BIAS=bias is not None,
                HAS_DROPOUT=dropout, IS_VARLEN=p.varlen,
                DOT_PRECISION=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return args, meta


_GRID_YZ_LIMIT = 65535  # CUDA grid dims y and z carry heads and batch


def _check_grid(batch, heads):
    if batch > _GRID_YZ_LIMIT or heads > _GRID_YZ_LIMIT:
        raise ValueError(f"triton backend: batch ({batch}) and heads ({heads}) must each be <= {_GRID_YZ_LIMIT}")


def _on_device(t):
    """Launch on the tensors' GPU, not on whichever one is current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _score_mods(p):
    """Which config table serves a call: calls whose scores carry more than q.k get their own,
    register-lighter configs (``configs.DROPOUT`` for dropout, the lightest)."""
    if p.dropout_p > 0:
        return "dropout"
    return p.softcap > 0 or p.alibi_slopes is not None or p.bias is not None


_INT32_MAX = 2 ** 31 - 1


def _check_bias_layout(p, seqlen_k):
    """The kernels add ``key * stride`` to a 64-bit row address in 32-bit arithmetic (64-bit there
    costs registers in every score tile); refuse the rare layout where that could overflow
    (keys up to one 256-wide tile past the end are addressed, masked)."""
    if p.bias is not None and (seqlen_k + 256) * abs(p.bias.stride(3)) > _INT32_MAX:
        raise ValueError(f"triton backend: the attention mask's key stride ({p.bias.stride(3)}) times seqlen_k "
                         f"({seqlen_k}) exceeds 32-bit offsets; pass a mask whose last dim is contiguous")


def fwd(q, k, v, p):
    attention, configs = _kernels()
    p = _offsets_contiguous(p)
    batch, seqlen_q, _, heads, _ = _geometry(q, k, p)
    out = _like_with_last_dim(q, v.shape[-1])
    lse_shape = (heads, q.shape[0]) if p.varlen else (batch, heads, seqlen_q)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or seqlen_q == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    _check_grid(batch, heads)
    cfg = configs.fwd_config(q.shape[-1], q.dtype, _capability(q.device), _score_mods(p), head_dim_v=v.shape[-1])
    _check_bias_layout(p, k.shape[1])
    args, meta = _common(q, k, v, p, cfg, configs)
    grid = (triton_cdiv(seqlen_q, cfg.block_m), heads, batch)
    with _on_device(q):
        attention.fwd_kernel[grid](q, k, v, out, lse, **_strides(p.varlen, q=q, k=k, v=v, o=out, l=lse), **args,
                                   **meta)
    return out, lse


def _like_with_last_dim(t, last):
    """``empty_like(t)`` (its layout kept) when the last dim matches, else a contiguous
    tensor of t's shape with the last dim ``last`` (the output of a call with Dv != D)."""
    if t.shape[-1] == last:
        return torch.empty_like(t)
    return torch.empty((*t.shape[:-1], last), dtype=t.dtype, device=t.device)


def triton_cdiv(a, b):
    return (a + b - 1) // b


def bwd(dout, dlse, q, k, v, out, lse, p, bias_grad, deterministic):
    attention, configs = _kernels()
    p = _offsets_contiguous(p)
    batch, seqlen_q, seqlen_k, heads, heads_k = _geometry(q, k, p)
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias = None
    if bias_grad:
        # invisible blocks are never visited: their dS stays 0
        dbias = torch.zeros(p.bias.shape, dtype=torch.float32, device=q.device)
    if q.numel() == 0 or k.numel() == 0 or seqlen_q == 0 or seqlen_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias
    _check_grid(batch, heads)
    _check_bias_layout(p, seqlen_k)
    capability = _capability(q.device)
    mods = _score_mods(p)
    dq_cfg = configs.bwd_dq_config(head_dim, q.dtype, capability, mods, head_dim_v=head_dim_v)
    dkdv_cfg = configs.bwd_dkdv_config(head_dim, q.dtype, capability, mods, head_dim_v=head_dim_v)
    dq_args, dq_meta = _common(q, k, v, p, dq_cfg, configs)
    dkdv_args, dkdv_meta = _common(q, k, v, p, dkdv_cfg, configs)
    delta = torch.empty_like(lse)
    lse2 = torch.empty_like(lse)
    num_m = triton_cdiv(seqlen_q, dq_cfg.block_m)
    common = _strides(p.varlen, q=q, k=k, v=v, do=dout, l=lse)
    db = dbias if dbias is not None else lse
    db_strides = dict(zip(("stride_dbb", "stride_dbh", "stride_dbm"), dbias.stride()[:3] if bias_grad else (0, 0, 0)))
    with _on_device(q):
        attention.bwd_preprocess_kernel[(num_m, heads, batch)](
            out, dout, lse, lse if dlse is None else dlse, delta, lse2, dq_args["CU_Q"],
            **_strides(p.varlen, o=out, do=dout, l=lse), seqlen_q=seqlen_q, head_dim=head_dim_v,  # O, dO: Dv
            BLOCK_M=dq_cfg.block_m, BLOCK_D=dq_meta["BLOCK_DV"], EVEN_M=dq_meta["EVEN_M"], PAD_D=dq_meta["PAD_DV"],
            HAS_DLSE=dlse is not None, IS_VARLEN=p.varlen, num_warps=dq_cfg.num_warps)
        chunk_d, chunk_dv = configs.dkdv_chunks(head_dim, head_dim_v, mods, capability)
        for write_dk, write_dv in configs.dkdv_passes(head_dim, head_dim_v):
            attention.bwd_dkdv_kernel[(triton_cdiv(seqlen_k, dkdv_cfg.block_n), heads_k, batch)](
                q, k, v, dout, lse2, delta, dk, dv, **common, **_strides(p.varlen, dk=dk, dv=dv), **dkdv_args,
                sm_scale=p.softmax_scale, WRITE_DK=write_dk, WRITE_DV=write_dv, CHUNK_D=chunk_d,
                CHUNK_DV=chunk_dv, **dkdv_meta)
        attention.bwd_dq_kernel[(num_m, heads, batch)](
            q, k, v, dout, lse2, delta, dq, DBIAS=db, **common, **_strides(p.varlen, dq=dq), **db_strides, **dq_args,
            sm_scale=p.softmax_scale, BIAS_GRAD=bias_grad, **dq_meta)
    # varlen: every packed row belongs to exactly one sequence, whose programs write it
    return dq, dk, dv, dbias


# ------------------------------------------------------------------ KV-cache decoding

# Compute units assumed where no GPU can be asked (Triton's interpreter): an H100 SXM's
# 132 SMs, so the automatic split count there is the one an H100 would pick.
ASSUMED_SMS = 132


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return ASSUMED_SMS


def _visible_span(max_seqlen_k, seqlen_q, left, right):
    """Most cache positions one query block can see (bounds the useful split count)."""
    if left >= 0:
        return min(max_seqlen_k, left + (right if right >= 0 else max_seqlen_k) + seqlen_q)
    return max_seqlen_k


def _quant_mode(cache, capability):
    """``decode_split_kernel``'s QUANT for a cache, and the cache as the kernel reads it:
    0 float, 1 int8, 3 float8_e4m3fn through Triton's fp8 type (sm_89 and later), 2 its
    bits as uint8 (older architectures and the interpreter, which have no fp8 conversion)."""
    if cache.dtype == torch.int8:
        return 1, cache
    if cache.dtype == torch.float8_e4m3fn:
        native = not interpreter_enabled() and capability is not None and tuple(capability) >= (8, 9)
        return (3, cache) if native else (2, cache.view(torch.uint8))
    return 0, cache


def decode(q, k_cache, v_cache, block_table, seqlens_k, leftpad, p, max_seqlen_k, num_splits, k_descale=None,
           v_descale=None):
    """Split-KV decoding (see ``flashattn_lite.ops.DECODE_SCHEMA`` and triton_kernels/decode.py).
    8-bit caches come with ``k_descale``/``v_descale`` float32 (num_blocks, page_size, heads_k).

    ``num_splits=0``: :func:`flashattn_lite.planning.auto_num_splits` from the programs
    (batch x kv heads x row blocks), the SM count (``ASSUMED_SMS`` under the interpreter)
    and the longest visible key range.
    """
    from flashattn_lite.triton_kernels import decode as kernels

    _, configs = _kernels()
    batch, seqlen_q, heads, head_dim = q.shape
    head_dim_v = v_cache.shape[-1]
    heads_k, page_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // heads_k
    out = _like_with_last_dim(q, head_dim_v)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    capability = _capability(q.device)
    mods = p.softcap > 0 or p.alibi_slopes is not None
    cfg = configs.decode_split_config(head_dim, q.dtype, capability, mods, head_dim_v=head_dim_v,
                                      quant=k_descale is not None)
    row_blocks = triton_cdiv(seqlen_q * group, cfg.block_m)
    _check_grid(batch, row_blocks * heads_k)
    if num_splits == 0:
        span = _visible_span(max_seqlen_k, seqlen_q, p.window_left, p.window_right)
        num_splits = planning.auto_num_splits(batch * heads_k * row_blocks, span, cfg.block_n, _num_sms(q.device))
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    leftpad = leftpad.contiguous() if leftpad is not None else None
    seqlens_k = seqlens_k.contiguous()
    block_d, block_dt = configs.decode_qk_tiles(head_dim)
    block_dv = configs.padded_head_dim(head_dim_v)
    if num_splits == 1:
        o, l_ = out, lse
        o_strides, l_strides = (0, *out.stride()[:3]), (0, *lse.stride()[:2])
    else:
        o = torch.empty((num_splits, batch, seqlen_q, heads, head_dim_v), dtype=torch.float32, device=q.device)
        l_ = torch.empty((num_splits, batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
        o_strides, l_strides = o.stride()[:4], l_.stride()[:3]
    slopes = p.alibi_slopes
    quant, k_read = _quant_mode(k_cache, capability)
    _, v_read = _quant_mode(v_cache, capability)
    kd = k_descale if quant else lse  # (any float32 pointer where there is none)
    vd = v_descale if quant else lse
    kd_strides = k_descale.stride() if quant else (0, 0, 0)
    vd_strides = v_descale.stride() if quant else (0, 0, 0)
    with _on_device(q):
        kernels.decode_split_kernel[(num_splits, row_blocks * heads_k, batch)](
            q, k_read, v_read, o, l_, block_table, seqlens_k, leftpad if leftpad is not None else seqlens_k,
            slopes if slopes is not None else lse, kd, vd,
            *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *kd_strides, *vd_strides,
            *o_strides, *l_strides,
            block_table.stride(0), *(slopes.stride() if slopes is not None else (0, 0)),
            seqlen_q, head_dim, head_dim_v, heads_k, group, page_size, max(p.window_left, 0), max(p.window_right, 0),
            p.softmax_scale * 1.4426950408889634,
            p.softmax_scale / p.softcap if p.softcap > 0 else 0.0, p.softcap * 1.4426950408889634,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DT=block_dt, BLOCK_DV=block_dv,
            PAGED=block_table.shape[1] > 1, PAD_D=head_dim != block_d + block_dt, PAD_DV=head_dim_v != block_dv,
            HAS_LEFTPAD=leftpad is not None, HAS_LEFT=p.window_left >= 0,
            HAS_RIGHT=p.window_right >= 0, HAS_SOFTCAP=p.softcap > 0, HAS_ALIBI=slopes is not None, QUANT=quant,
            DOT_PRECISION=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if num_splits > 1:
            ccfg = configs.combine_config(head_dim_v, q.dtype, capability)
            kernels.combine_kernel[(seqlen_q, heads, batch)](
                o, l_, out, lse, o.stride(0), o.stride(1), o.stride(2), o.stride(3), *l_.stride()[:3],
                *out.stride()[:3], *lse.stride()[:2], num_splits, head_dim_v,
                BLOCK_S=ccfg.block_n, BLOCK_D=block_dv, PAD_D=head_dim_v != block_dv, num_warps=ccfg.num_warps)
    return out, lse
