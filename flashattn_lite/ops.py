"""PyTorch operators of flashattn_lite: schemas, fake implementations, autograd.

Only registration lives here.  Tensors arrive in the logical layout
(batch, seqlen, heads, headdim) with any strides and a contiguous last dim;
outputs take the strides of the matching input (``empty_like``), so a
(B, H, S, D) caller gets (B, H, S, D) memory back.
"""

import torch

from . import backends

# Fwd: (out, lse).  ``backend`` is resolved by the caller (never "auto") so that
# forward and backward of one call always run on the same backend.  The arguments
# between ``v`` and ``backend`` are the fields of ``backends.Params`` (documented there):
# varlen when cu_seqlens_q is given; bias a (B, H, Sq, Sk) view; softcap 0 = off;
# alibi_slopes float32 (B, H); dropout_p 0 = off.
_PARAM_ARGS = ("Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, Tensor? bias, "
               "float softmax_scale, SymInt diag_offset, int window_left, int window_right, float softcap, "
               "Tensor? alibi_slopes, float dropout_p, int dropout_seed")
FWD_SCHEMA = f"(Tensor q, Tensor k, Tensor v, {_PARAM_ARGS}, str backend) -> (Tensor, Tensor)"
# Bwd: (dq, dk, dv, dbias); dbias is (B, H, Sq, Sk) in the bias dtype when bias_grad, else an empty tensor.
BWD_SCHEMA = (f"(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_PARAM_ARGS}, "
              "bool bias_grad, bool deterministic, str backend) -> (Tensor, Tensor, Tensor, Tensor)")
_N_PARAMS = 13


def _params(args):
    (cu_q, cu_k, max_q, max_k, bias, scale, offset, left, right, softcap, slopes, dropout_p, seed) = args
    return backends.Params(softmax_scale=scale, diag_offset=offset, window_left=left, window_right=right,
                           softcap=softcap, alibi_slopes=slopes, bias=bias, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                           max_seqlen_q=max_q, max_seqlen_k=max_k, dropout_p=dropout_p, dropout_seed=seed)


def _like(result, template):
    """Return ``result`` with the strides of ``empty_like(template)`` (copying only if needed)."""
    target = torch.empty_like(template, dtype=result.dtype)
    if result.stride() == target.stride():
        return result
    return target.copy_(result)


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def lse_dtype(dtype):
    """lse is float32, except float64 for float64 input (so gradcheck sees full precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("flashattn_lite::fwd", mutates_args=(), schema=FWD_SCHEMA)
def fwd(q, k, v, *args):
    *params, backend = args
    out, lse = backends.get(backend).fwd(q, k, v, _params(params))
    return _like(out, q), lse.contiguous()


@fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens_q, *args):
    return torch.empty_like(q), q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=lse_dtype(q.dtype))


def _dbias_or_empty(dbias, bias, bias_grad, q):
    if not bias_grad:
        return (bias if bias is not None else q).new_empty(0)
    return dbias.to(bias.dtype)


@torch.library.custom_op("flashattn_lite::bwd", mutates_args=(), schema=BWD_SCHEMA)
def bwd(dout, dlse, q, k, v, out, lse, *args):
    *params, bias_grad, deterministic, backend = args
    params = _params(params)
    dq, dk, dv, dbias = backends.get(backend).bwd(dout, dlse, q, k, v, out, lse, params, bias_grad, deterministic)
    return _like(dq, q), _like(dk, k), _like(dv, v), _dbias_or_empty(dbias, params.bias, bias_grad, q)


@bwd.register_fake
def _bwd_fake(dout, dlse, q, k, v, out, lse, *args):
    *params, bias_grad, deterministic, backend = args
    bias = params[4]
    dbias = bias.new_empty(bias.shape) if bias_grad else (bias.new_empty(0) if bias is not None else q.new_empty(0))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, *params, backend = inputs
    out, lse = output
    cu_q, cu_k, bias, slopes = params[0], params[1], params[4], params[10]
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, bias, slopes)
    ctx.scalars = [None if isinstance(a, torch.Tensor) else a for a in params]
    ctx.bias_grad = bias is not None and bias.requires_grad
    ctx.backend = backend


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, bias, slopes = ctx.saved_tensors
    params = list(ctx.scalars)
    params[0], params[1], params[4], params[10] = cu_q, cu_k, bias, slopes
    if dout.stride(-1) != 1:
        # e.g. the expanded gradient of out.sum(): kernels need a unit last stride
        dout = dout.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    bias_grad = bool(ctx.needs_input_grad[7]) and ctx.bias_grad
    dq, dk, dv, dbias = torch.ops.flashattn_lite.bwd(dout, dlse, q, k, v, out, lse, *params, bias_grad, True,
                                                     ctx.backend)
    return (dq, dk, dv) + (None,) * 4 + ((dbias if bias_grad else None),) + (None,) * (_N_PARAMS - 4)


fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ------------------------------------------------------------------ KV-cache decoding
# decode: (out, lse) of q (B, Sq, H, D) against a paged cache (num_blocks, page_size, Hk, D):
# position p of sequence b lives at page ``block_table[b, p // page_size]``, row
# ``p % page_size`` (a contiguous cache is one page per sequence).  Keys
# ``[leftpad[b], seqlens_k[b])`` are valid; query row i sits at position
# ``seqlens_k[b] - Sq + i``, the diagonal of window/ALiBi.  ``max_seqlen_k`` >= every
# seqlens_k (for split planning without reading the device); num_splits 0 = automatic.
# Forward only: no autograd is registered (flashattn_lite.kvcache refuses inputs that
# require grad).  The new keys/values are appended by the caller, so the op reads the
# caches and mutates nothing.
DECODE_SCHEMA = ("(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seqlens_k, Tensor? leftpad, "
                 "SymInt max_seqlen_k, float softmax_scale, int window_left, int window_right, float softcap, "
                 "Tensor? alibi_slopes, int num_splits, str backend) -> (Tensor, Tensor)")


@torch.library.custom_op("flashattn_lite::decode", mutates_args=(), schema=DECODE_SCHEMA)
def decode(q, k_cache, v_cache, block_table, seqlens_k, leftpad, max_seqlen_k, softmax_scale, window_left,
           window_right, softcap, alibi_slopes, num_splits, backend):
    params = backends.Params(softmax_scale=softmax_scale, window_left=window_left, window_right=window_right,
                             softcap=softcap, alibi_slopes=alibi_slopes)
    out, lse = backends.get(backend).decode(q, k_cache, v_cache, block_table, seqlens_k, leftpad, params,
                                            max_seqlen_k, num_splits)
    return _like(out, q), lse.contiguous()


@decode.register_fake
def _decode_fake(q, *args):
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype(q.dtype))
