"""PyTorch operators of flashattn_lite: schemas, fake implementations, autograd.

Only registration lives here.  Tensors arrive in the logical layout
(batch, seqlen, heads, headdim) with any strides and a contiguous last dim;
outputs take the strides of the matching input (``empty_like``), so a
(B, H, S, D) caller gets (B, H, S, D) memory back.
"""

import torch

from . import backends

# Fwd: (out, lse).  ``backend`` is resolved by the caller (never "auto") so that
# forward and backward of one call always run on the same backend.
# ``softcap`` 0 = off; ``alibi_slopes`` float32 (batch, heads) (a stride-0 batch is fine) or None.
FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, float softmax_scale, SymInt diag_offset, "
              "int window_left, int window_right, float softcap, Tensor? alibi_slopes, str backend) "
              "-> (Tensor, Tensor)")
BWD_SCHEMA = ("(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
              "float softmax_scale, SymInt diag_offset, int window_left, int window_right, float softcap, "
              "Tensor? alibi_slopes, bool deterministic, str backend) -> (Tensor, Tensor, Tensor)")


def _like(result, template):
    """Return ``result`` with the strides of ``empty_like(template)`` (copying only if needed)."""
    target = torch.empty_like(template, dtype=result.dtype)
    if result.stride() == target.stride():
        return result
    return target.copy_(result)


def _lse_shape(q):
    return (q.shape[0], q.shape[2], q.shape[1])


def lse_dtype(dtype):
    """lse is float32, except float64 for float64 input (so gradcheck sees full precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("flashattn_lite::fwd", mutates_args=(), schema=FWD_SCHEMA)
def fwd(q, k, v, softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes, backend):
    out, lse = backends.get(backend).fwd(q, k, v, softmax_scale, diag_offset, window_left, window_right, softcap,
                                         alibi_slopes)
    return _like(out, q), lse.contiguous()


@fwd.register_fake
def _fwd_fake(q, k, v, softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes, backend):
    return torch.empty_like(q), q.new_empty(_lse_shape(q), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("flashattn_lite::bwd", mutates_args=(), schema=BWD_SCHEMA)
def bwd(dout, dlse, q, k, v, out, lse, softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes,
        deterministic, backend):
    dq, dk, dv = backends.get(backend).bwd(dout, dlse, q, k, v, out, lse, softmax_scale, diag_offset,
                                           window_left, window_right, softcap, alibi_slopes, deterministic)
    return _like(dq, q), _like(dk, k), _like(dv, v)


@bwd.register_fake
def _bwd_fake(dout, dlse, q, k, v, out, lse, softmax_scale, diag_offset, window_left, window_right, softcap,
              alibi_slopes, deterministic, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, diag_offset, window_left, window_right, softcap, alibi_slopes, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.params = (softmax_scale, diag_offset, window_left, window_right, softcap)
    ctx.backend = backend
    ctx.deterministic = True


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    if dout.stride(-1) != 1:
        # e.g. the expanded gradient of out.sum(): kernels need a unit last stride
        dout = dout.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    dq, dk, dv = torch.ops.flashattn_lite.bwd(dout, dlse, q, k, v, out, lse, *ctx.params, alibi_slopes,
                                              ctx.deterministic, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None, None


fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
