"""The C++ CPU backend (csrc/cpu), built just in time on first use.

Serves CPU tensors in fp16, bf16, fp32 and fp64.  Where the extension cannot be
built (no C++ compiler, say), it reports itself unavailable with the tail of the
compiler error; ``auto`` then falls back to ``reference`` with a one-time warning.
"""

import json
import os
import warnings

import torch

from .. import _build
from . import sinks
from .base import getenv, missing_features

NAME = "cpu"
FEATURES = ("forward", "backward", "causal", "window", "gqa", "fp16", "bf16", "fp32", "fp64", "softcap", "alibi",
            "varlen", "attn_mask", "dropout", "kv-cache", "kv-quant")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# any head dims checks.py allows (D, Dv <= 512, D <= 576 decoding; Dv may differ from D)
_warned = []


def _ensure_built():
    _build.build_cpu()
    lib = torch.ops.flashattn_lite_C
    if _envs() != _products["env"]:
        _set_products(lib)
    return lib


# ------------------------------------------------------------------ bf16 / fp16 products
# bf16 (and fp16) tile products run either in that type with float32 accumulation, or
# widened to float32 through BLAS; attention_cpu.h says what is rounded where.  Each type
# has engines on the same packed operands: this extension's micro-kernels (bf16:
# AVX512-BF16 vdpbf16ps, or "bf16fma": pairs widened in registers for float32 FMAs on
# AVX-512; fp16: pairs widened the same way) and oneDNN's brgemm through
# torch (at::native::cpublas::brgemm, which uses AMX tiles where the CPU has them, AMX-FP16
# for fp16).  "auto" picks the fastest by a short measurement at first use (cached next
# to the extension, under its key: CPU model and flags, sources, torch); an environment
# variable per type forces one.
MATMUL_ENV = "FLASHATTN_LITE_CPU_MATMUL"
MATMUL_FP16_ENV = "FLASHATTN_LITE_CPU_MATMUL_FP16"
MATMUL_CHOICES = ("auto", "bf16", "bf16fma", "onednn", "fp32")
MATMUL_FP16_CHOICES = ("auto", "fp16", "onednn", "fp32")
_ENV = {"bf16": (MATMUL_ENV, MATMUL_CHOICES), "fp16": (MATMUL_FP16_ENV, MATMUL_FP16_CHOICES)}
_ENGINES = {"fp32": 0, "bf16": 1, "fp16": 1, "onednn": 2, "bf16fma": 3}
PATH_NAMES = {"fp32": "widened to float32", "bf16": "bf16 products", "fp16": "fp16 products",
              "onednn": "oneDNN products", "bf16fma": "bf16 products (FMA)"}
# products in bf16/fp16 must beat float32 by this factor to be chosen: a tie keeps
# float32's rounding (P is not rounded to bf16/fp16 there)
_MATMUL_MARGIN = 1.25
_RATE_KEYS = {"unit", "bf16", "fp32", "onednn", "fp16", "onednn_fp16", "bf16fma"}
_products = {"env": None, "bf16": (None, None), "fp16": (None, None)}


def _probe_file():
    return os.path.join(_build.cache_root(), f"products-{_build.cache_key()}.json")


def probe_products():
    """{"unit": bool, "bf16": GFLOP/s, "fp32": GFLOP/s, "onednn": GFLOP/s, "fp16": GFLOP/s,
    "onednn_fp16": GFLOP/s, "bf16fma": GFLOP/s} of the forward's tile products each way on
    one thread (``cpu_probe_products``; "bf16", "bf16fma" and "fp16" are this extension's
    micro-kernels, "onednn" and "onednn_fp16" oneDNN's brgemm, 0 where it cannot run;
    "unit": AVX512-BF16), measured once per extension key and cached."""
    path = _probe_file()
    try:
        with open(path) as f:
            rates = json.load(f)
        if set(rates) == _RATE_KEYS:
            return rates
    except (OSError, ValueError):
        pass
    _build.build_cpu()
    unit, bf16, fp32, onednn, fp16, onednn_fp16, bf16fma = torch.ops.flashattn_lite_C.cpu_probe_products()
    rates = {"unit": bool(unit), "bf16": round(bf16, 1), "fp32": round(fp32, 1), "onednn": round(onednn, 1),
             "fp16": round(fp16, 1), "onednn_fp16": round(onednn_fp16, 1), "bf16fma": round(bf16fma, 1)}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(rates, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: measured again next time
    return rates


def choose_products(rates, dtype="bf16"):
    """(path, why) that "auto" takes for ``dtype`` ("bf16" or "fp16") at these measured
    rates.  An engine must run at least _MATMUL_MARGIN times float32; oneDNN must also beat
    the micro-kernel by that factor (as AMX does), since it generates code for every new
    product shape (a first call with many new shapes is slower, and only a budget of
    shapes runs on it: products_cpu.cpp) and the micro-kernel needs none."""
    if dtype == "bf16":  # the bf16 unit (vdpbf16ps) or pairs widened for FMAs, whichever is faster
        kernels = {"bf16": rates["bf16"] if rates["unit"] else 0.0, "bf16fma": rates["bf16fma"]}
        dnn = rates["onednn"]
    else:
        kernels, dnn = {"fp16": rates["fp16"]}, rates["onednn_fp16"]
    best = max(kernels, key=lambda k: kernels[k])  # (a tie keeps the first)
    own = kernels[best]
    if not own:
        return "fp32", f"auto: no {dtype} micro-kernel (AVX-512) in this build/CPU"
    bar = _MATMUL_MARGIN * rates["fp32"]
    if dnn >= max(bar, _MATMUL_MARGIN * own):
        path = "onednn"
    else:
        path = best if own >= bar else "fp32"
    measured = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in kernels.items() if v)
    onednn = f"{dnn:.0f} GFLOP/s" if dnn else "not available"
    return path, (f"auto: measured {dtype} micro-kernels {measured}, oneDNN brgemm {onednn}, float32 "
                  f"{rates['fp32']:.0f} GFLOP/s (one thread; {dtype} products are chosen at >= {_MATMUL_MARGIN}x "
                  f"float32, oneDNN at >= {_MATMUL_MARGIN}x the micro-kernel too)")


def _envs():
    return tuple(getenv(_ENV[dtype][0], "auto") for dtype in ("bf16", "fp16"))


def _set_products(lib):
    rates = None
    for dtype, env in zip(("bf16", "fp16"), _envs()):
        name, choices = _ENV[dtype]
        setter = getattr(lib, f"cpu_{dtype}_products")
        if env not in choices:
            raise ValueError(f"{name}={env!r}: expected one of {', '.join(choices)}")
        if env == "auto":
            rates = rates or probe_products()
            path, why = choose_products(rates, dtype)
        else:
            path, why = env, f"forced by {name}={env}"
        if path == "onednn":
            lib.cpu_onednn_shapes()  # reads FLASHATTN_LITE_ONEDNN_SHAPES: a bad value raises before any choice
        try:
            setter(_ENGINES[path])
        except RuntimeError as exc:
            if env != "auto" or path != "onednn":
                raise RuntimeError(f"{name}={env}: {exc}") from None
            # measured once (cached), refused in this process: the next choice, with the reason
            key = "onednn" if dtype == "bf16" else "onednn_fp16"
            path, why = choose_products(dict(rates, **{key: 0.0}), dtype)
            why += f"; oneDNN refused here: {str(exc).splitlines()[0]}"
            setter(_ENGINES[path])
        _products[dtype] = (path, why)
    _products["env"] = _envs()


def products_choice():
    """{"bf16": (path, why), "fp16": (path, why)}: how this process multiplies each
    low-precision dtype's tiles (``flashattn-lite info``)."""
    _ensure_built()
    return {"bf16": _products["bf16"], "fp16": _products["fp16"]}


def available():
    try:
        path = _build.build_cpu()
    except RuntimeError as exc:
        return False, str(exc)
    return True, f"C++ extension {path}"


def supports(call):
    if call.device.type != "cpu":
        return f"tensors on {call.device.type}; the cpu backend needs CPU tensors"
    if call.dtype not in _DTYPES:
        return f"dtype {call.dtype} is not supported by the cpu backend"
    missing = missing_features(call, FEATURES)
    if missing:
        return f"the cpu backend {missing}"
    if "kv-quant" in call.features and call.dtype == torch.float64:
        return "the cpu backend reads 8-bit caches with float16, bfloat16 or float32 queries, not float64"
    ok, why = available()
    return None if ok else why


def warn_fallback_once(reason, built):
    """auto handed a CPU call to the slow O(N^2) reference backend: say so once per reason.
    ``built``: the extension is there but declined the call (rather than failed to build)."""
    if reason not in _warned:
        _warned.append(reason)
        what = "the C++ CPU backend cannot serve this call" if built else "the C++ CPU backend is unavailable"
        warnings.warn(f"flashattn_lite: {what}, falling back to the slow 'reference' backend. {reason}",
                      RuntimeWarning, stacklevel=4)


# Short query sequences against long keys (decoding a token through flash_attn_func or
# a transformers model) run on the split-KV decode kernel (csrc/cpu/decode_cpu.cpp): the
# tiled forward's products are matrix-vector products there, and it reads each kv head
# once for its whole GQA group.  Measured on 2 cores (Sk 2048, head dim 64), the decode
# kernel is 1.1x (fp32) to 2x (bf16) faster for one query row, 1.3-2.7x for up to 4 rows
# of a GQA group of 4, and slower beyond (tests/test_cpu.py covers both routes).
DECODE_MAX_QUERIES = 4
DECODE_MIN_GROUP = 4  # GQA group size from which 2..DECODE_MAX_QUERIES query rows use it


def decode_rows(sq, group):
    """Whether ``sq`` query rows per sequence (GQA group ``group``) go to the decode kernel."""
    return sq == 1 or (sq <= DECODE_MAX_QUERIES and group >= DECODE_MIN_GROUP)


def _decode_route(q, k, v, p):
    """Whether this forward call runs on the decode kernel: dense, no bias or dropout, few
    query rows, and a diagonal that is the decode kernel's own (bottom-right) wherever
    the result depends on it (window, causal, ALiBi).  Malformed arguments (the operator
    can be called without the interface's checks) stay on the tiled forward, whose own
    checks raise."""
    if p.varlen or p.bias is not None or p.dropout_p > 0 or q.dim() != 4 or not _same_kv(q, k, v, 4):
        return False
    if k.shape[1] == 0 or q.shape[0] != k.shape[0] or not _slopes_ok(p.alibi_slopes, q.shape[0], q.shape[2]):
        return False
    if k.shape[1] >= 2**31:  # seqlens are int32: the tiled forward raises a ValueError naming the limit
        return False
    sq = q.shape[1]
    if not decode_rows(sq, q.shape[2] // k.shape[2]):
        return False
    return not _positional(p) or p.diag_offset == k.shape[1] - sq


def _positional(p):
    """Whether the result depends on where the diagonal sits (window, causal, ALiBi)."""
    return p.window_left >= 0 or p.window_right >= 0 or p.alibi_slopes is not None


def _same_kv(q, k, v, dims):
    """k and v as the kernels take them with q (else the tiled forward's checks raise)."""
    return (k.dim() == dims and v.dim() == dims and v.shape[:-1] == k.shape[:-1] and q.dtype == k.dtype == v.dtype and k.shape[-1] == q.shape[-1]
            and k.shape[-2] > 0 and q.shape[-2] % k.shape[-2] == 0)


def _slopes_ok(slopes, batch, heads):
    return slopes is None or (slopes.dtype == torch.float32 and tuple(slopes.shape) == (batch, heads))


def _offsets(cu, batch, total):
    """cu_seqlens as a host list when well formed (int32, 1-D, batch + 1 entries from 0 to
    ``total``, non-decreasing), else None."""
    if cu is None or cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] != batch + 1:
        return None
    values = cu.tolist()
    if values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
        return None
    return values


def _varlen_decode_rows(q, k, v, p):
    """Varlen calls whose every sequence has the same few query rows (a decoding step of
    a padded batch, as the transformers integration packs it) run on the decode kernel
    too: the packed keys are one page that each sequence sees from ``cu_seqlens_k[b]`` (its
    left pad) to ``cu_seqlens_k[b + 1]`` (its end), its queries at the end (bottom-right,
    varlen's own diagonal when ``diag_offset`` is 0).  Returns the rows per sequence, or 0
    (also for malformed arguments: the tiled forward's checks then raise)."""
    if not p.varlen or p.dropout_p > 0 or q.dim() != 3 or not _same_kv(q, k, v, 3) or k.shape[0] == 0:
        return 0
    cu_q, sq = p.cu_seqlens_q, p.max_seqlen_q
    if cu_q.dim() != 1 or cu_q.shape[0] < 2:
        return 0
    batch = cu_q.shape[0] - 1
    if sq < 1 or q.shape[0] != batch * sq or not decode_rows(sq, q.shape[1] // k.shape[1]):
        return 0
    if (_positional(p) and p.diag_offset != 0) or not _slopes_ok(p.alibi_slopes, batch, q.shape[1]):
        return 0
    # every sequence exactly sq rows, and well-formed key offsets (a host read of
    # 2 (batch + 1) ints; CPU tensors)
    if _offsets(cu_q, batch, q.shape[0]) != list(range(0, batch * sq + 1, sq)):
        return 0
    starts = _offsets(p.cu_seqlens_k, batch, k.shape[0])
    if starts is None or max(b - a for a, b in zip(starts, starts[1:])) > p.max_seqlen_k:
        return 0
    return sq


def decode_splits(batch, heads_k, seqlen_k):
    """Key splits for a routed call: enough (batch, kv head, split) tasks for 16 threads,
    at least 512 keys a split, and never a function of the thread count (the forward's
    bits must not depend on it)."""
    tasks = batch * heads_k
    return max(1, min(-(-16 // tasks), seqlen_k // 512, 64))


def _decode(lib, q, k, v, p, table, seqlens, leftpad, seqlen_k):
    return lib.decode(q, k, v, table, seqlens, leftpad, p.softmax_scale, p.window_left, p.window_right, p.softcap,
                      p.alibi_slopes, decode_splits(q.shape[0], k.shape[2], seqlen_k))


# fwd takes learnable sinks itself: the tiled kernel adds them to its normaliser (no pass
# over the output afterwards), and so does bwd (the sink gradient from its own dO.O row sums);
# the decoding routes apply them as every backend does.
FUSES_SINK = True


def fwd(q, k, v, p, sink=None):
    lib = _ensure_built()
    if _decode_route(q, k, v, p):
        batch, seqlen_k = k.shape[0], k.shape[1]
        table = torch.arange(batch, dtype=torch.int32).view(batch, 1)  # one page per sequence
        seqlens = torch.full((batch,), seqlen_k, dtype=torch.int32)
        return _with_sink(*_decode(lib, q, k, v, p, table, seqlens, None, seqlen_k), sink, False)
    sq = _varlen_decode_rows(q, k, v, p)
    if sq:
        batch, heads = q.shape[0] // sq, q.shape[1]
        cu_k = p.cu_seqlens_k
        table = torch.zeros((batch, 1), dtype=torch.int32)  # every sequence in the one page
        out, lse = _decode(lib, q.view(batch, sq, heads, q.shape[2]), k[None], v[None], p, table, cu_k[1:], cu_k[:-1],
                           p.max_seqlen_k)
        # (batch, sq, H, Dv) -> (total_q, H, Dv); lse (batch, H, sq) -> varlen's (H, total_q)
        return _with_sink(out.view(*q.shape[:-1], v.shape[-1]), lse.permute(1, 0, 2).reshape(heads, batch * sq), sink,
                          True)
    if sink is not None:
        return lib.cpu_fwd_sink(q, k, v, *p.op_args(), sink)
    return lib.fwd(q, k, v, *p.op_args())


def _with_sink(out, lse, sink, varlen):
    return (out if sink is None else sinks.apply_to_out(out, lse, sink, varlen)), lse


def bwd(dout, dlse, q, k, v, out, lse, p, bias_grad, deterministic, sink=None):
    """(dq, dk, dv, dbias or None), and dsink as a fifth when ``sink`` is given: then the
    kernel's own delta (dO.O) gives the sink's gradient and its normaliser joins lse
    (``cpu_bwd_sink``; ``dlse`` must be None, sinks.py handles that case)."""
    lib = _ensure_built()
    if sink is not None:
        dq, dk, dv, dbias, dsink = lib.cpu_bwd_sink(dout, dlse, q, k, v, out, lse, *p.op_args(), bool(bias_grad),
                                                    bool(deterministic), sink)
        return dq, dk, dv, (dbias if bias_grad else None), dsink
    dq, dk, dv, dbias = lib.bwd(dout, dlse, q, k, v, out, lse, *p.op_args(), bool(bias_grad), bool(deterministic))
    return dq, dk, dv, (dbias if bias_grad else None)


# ------------------------------------------------------------------ KV-cache decoding


def decode(q, k_cache, v_cache, block_table, seqlens_k, leftpad, p, max_seqlen_k, num_splits, k_descale=None,
           v_descale=None):
    """csrc/cpu/decode_cpu.cpp: split-KV over (batch, kv head, split) tasks; ``num_splits=0``
    picks enough splits to occupy every thread (keeping >= 256 positions per split).  8-bit
    caches (``k_descale``/``v_descale`` given) go to ``cpu_decode_quant``: codes widened in
    registers, each score and probability times its position's descale."""
    lib = _ensure_built()
    args = (q, k_cache, v_cache, block_table, seqlens_k, leftpad, p.softmax_scale, p.window_left, p.window_right,
            p.softcap, p.alibi_slopes, num_splits)
    if k_descale is not None:
        return lib.cpu_decode_quant(*args, k_descale, v_descale)
    return lib.decode(*args)
