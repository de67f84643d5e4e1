"""PyTorch operators of flashattn_lite: schemas, fake implementations, autograd.

Only registration lives here.  Tensors arrive in the logical layout
(batch, seqlen, heads, headdim) with any strides and a contiguous last dim;
outputs take the strides of the matching input (``empty_like``), so a
(B, H, S, D) caller gets (B, H, S, D) memory back.
"""

import contextlib
import dataclasses

import torch

from . import backends, checks
from .backends import OP_FIELDS, Params, accum_dtype, sinks

# Fwd: (out, lse).  ``backend`` is resolved by the caller (never "auto") so that
# forward and backward of one call always run on the same backend.  The arguments
# between ``v`` and ``backend`` are the fields of ``backends.Params`` (documented there),
# in ``backends.OP_FIELDS`` order:
# varlen when cu_seqlens_q is given; bias a (B, H, Sq, Sk) view; softcap 0 = off;
# alibi_slopes float32 (B, H); dropout_p 0 = off.  ``learnable_sink`` (H,) float or None:
# one extra logit per query head with a zero value (backends/sinks.py applies it around
# a backend's kernels; a backend with ``FUSES_SINK``, the cpu one, takes it in its fwd, and
# in its bwd when there is no dlse).
_PARAM_ARGS = ("Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, Tensor? bias, "
               "float softmax_scale, SymInt diag_offset, int window_left, int window_right, float softcap, "
               "Tensor? alibi_slopes, float dropout_p, int dropout_seed")
FWD_SCHEMA = (f"(Tensor q, Tensor k, Tensor v, {_PARAM_ARGS}, str backend, Tensor? learnable_sink=None) "
              "-> (Tensor, Tensor)")
# Bwd: (dq, dk, dv, dbias, dsink); dbias is (B, H, Sq, Sk) in the bias dtype when bias_grad, dsink (H,) in the
# sink's dtype when a sink is given, else empty tensors.
BWD_SCHEMA = (f"(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_PARAM_ARGS}, "
              "bool bias_grad, bool deterministic, str backend, Tensor? learnable_sink=None) "
              "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
# autograd input indices of the bias and the sink (after q, k, v)
_BIAS_INPUT = 3 + OP_FIELDS.index("bias")
_SINK_INPUT = 3 + len(OP_FIELDS) + 1  # after the backend
_TENSOR_FIELDS = ("cu_seqlens_q", "cu_seqlens_k", "bias", "alibi_slopes")


def empty_like_last(template, last, dtype=None):
    """``empty_like(template)`` with last dim ``last``: the other dims in the memory order
    ``empty_like(template)`` gives them (so a (B, H, S, D) caller's output is (B, H, S, Dv)
    memory) and the last dim innermost, dense.  The output of an MLA call (Dv != D) is this
    of q.  (A last dim of size 1 may carry any stride, so its place in the order is not
    taken from the template.)"""
    dtype = template.dtype if dtype is None else dtype
    if last == template.shape[-1]:
        return torch.empty_like(template, dtype=dtype)
    strides = torch.empty_like(template, device="meta").stride()
    order = sorted(range(template.dim() - 1), key=lambda i: -strides[i])  # outermost first; ties stay in order
    order.append(template.dim() - 1)
    shape = tuple(template.shape[:-1]) + (last,)
    dense = template.new_empty([shape[i] for i in order], dtype=dtype)
    return dense.permute([order.index(i) for i in range(template.dim())])


def _like(result, template):
    """Return ``result`` with the strides of ``empty_like(template)`` with ``result``'s last
    dim (copying only if needed)."""
    if result.is_contiguous() and template.is_contiguous():  # the common case, without an allocation
        return result
    target = empty_like_last(template, result.shape[-1], result.dtype)
    if result.stride() == target.stride():
        return result
    return target.copy_(result)


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _serving_backend(backend, q, v, params, extra=()):
    """The backend module named ``backend`` after checking it can serve this call (the
    operators may be called with any name)."""
    if backend not in backends.BACKENDS:
        raise ValueError(f"flashattn_lite: backend must be one of {', '.join(backends.BACKENDS)} (resolved, not "
                         f"'auto'), got {backend!r}")
    module = backends.BACKENDS[backend]
    why = backends.supports(backend, backends.Call(device=q.device, dtype=q.dtype, head_dim=int(q.shape[-1]),
                                                   head_dim_v=int(v.shape[-1]),
                                                   features=params.features() | set(extra)))
    if why is not None:
        raise RuntimeError(f"flashattn_lite backend {backend!r} cannot run this call: {why}")
    return module


def _unit_last(*tensors):
    """The kernels address the head dim with stride 1: a direct operator call with another
    last stride gets a copy (the public functions have made it so already)."""
    return [t.contiguous() if t.shape[-1] > 1 and t.stride(-1) != 1 else t for t in tensors]


def _fwd_direct(q, k, v, params, sink, backend, trusted=False):
    template = q
    if trusted or checks.is_trusted():
        module = backends.get(backend)
    else:
        checks.check_fwd(q, k, v, params, sink=sink)
        module = _serving_backend(backend, q, v, params)
        q, k, v = _unit_last(q, k, v)
    if sink is not None and getattr(module, "FUSES_SINK", False):
        out, lse = module.fwd(q, k, v, params, sink=sink)
    else:
        out, lse = module.fwd(q, k, v, params)
        if sink is not None:
            out = sinks.apply_to_out(out, lse, sink, params.varlen)
    return _like(out, template), lse.contiguous()


def _with_sink(args, before_sink, sink):
    """Split operator arguments whose last, defaulted one is ``learnable_sink``: torch passes it
    positionally when given, as a keyword or not at all when not."""
    if len(args) > before_sink:
        return args[:before_sink], args[before_sink]
    return args, sink


@torch.library.custom_op("flashattn_lite::fwd", mutates_args=(), schema=FWD_SCHEMA)
def fwd(q, k, v, *args, learnable_sink=None):
    args, sink = _with_sink(args, len(OP_FIELDS) + 1, learnable_sink)
    *params, backend = args
    return _fwd_direct(q, k, v, Params.from_op_args(params), sink, backend)


@fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens_q, *args):
    return empty_like_last(q, v.shape[-1]), q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=accum_dtype(q.dtype))


def _dbias_or_empty(dbias, bias, bias_grad, q):
    if not bias_grad:
        return (bias if bias is not None else q).new_empty(0)
    return dbias.to(bias.dtype)


def _bwd_direct(dout, dlse, q, k, v, out, lse, params, bias_grad, deterministic, backend, sink, trusted=False):
    templates = (q, k, v)
    if trusted or checks.is_trusted():
        module = backends.get(backend)
    else:
        checks.check_bwd(dout, dlse, q, k, v, out, lse, params, bias_grad, sink=sink)
        module = _serving_backend(backend, q, v, params, ("backward",))
        dout, out, q, k, v = _unit_last(dout, out, q, k, v)
    dsink = q.new_empty(0)
    if sink is None:
        dq, dk, dv, dbias = module.bwd(dout, dlse, q, k, v, out, lse, params, bias_grad, deterministic)
    elif dlse is None and getattr(module, "FUSES_SINK", False):
        dq, dk, dv, dbias, dsink = module.bwd(dout, None, q, k, v, out, lse, params, bias_grad, deterministic,
                                              sink=sink)
    else:
        lse_full, dsink = sinks.backward_inputs(dout, out, lse, sink, params.varlen)
        dq, dk, dv, dbias = module.bwd(dout, None, q, k, v, out, lse_full, params, bias_grad, deterministic)
        if dlse is not None:  # the sink-free lse's own gradient (backends/sinks.py)
            g = module.bwd(torch.zeros_like(dout), dlse, q, k, v, torch.zeros_like(out), lse, params, bias_grad,
                           deterministic)
            dq, dk, dv = dq + g[0], dk + g[1], dv + g[2]
            dbias = dbias + g[3] if bias_grad else dbias
    return (_like(dq, templates[0]), _like(dk, templates[1]), _like(dv, templates[2]),
            _dbias_or_empty(dbias, params.bias, bias_grad, q), dsink)


@torch.library.custom_op("flashattn_lite::bwd", mutates_args=(), schema=BWD_SCHEMA)
def bwd(dout, dlse, q, k, v, out, lse, *args, learnable_sink=None):
    args, sink = _with_sink(args, len(OP_FIELDS) + 3, learnable_sink)
    *params, bias_grad, deterministic, backend = args
    return _bwd_direct(dout, dlse, q, k, v, out, lse, Params.from_op_args(params), bias_grad, deterministic, backend,
                       sink)


@bwd.register_fake
def _bwd_fake(dout, dlse, q, k, v, out, lse, *args, learnable_sink=None):
    args, sink = _with_sink(args, len(OP_FIELDS) + 3, learnable_sink)
    *params, bias_grad, deterministic, backend = args
    bias = Params.from_op_args(params).bias
    dbias = bias.new_empty(bias.shape) if bias_grad else (bias.new_empty(0) if bias is not None else q.new_empty(0))
    dsink = sink.new_empty(sink.shape) if sink is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias, dsink


def direct_call_ok(tensors, autograd=False):
    """Whether calling the backend directly does exactly what the operator would.

    The operator's dispatch (autograd wrapper, torch.compile guard, schema checks) costs
    about 50 us a call on the CPU, as much as a whole decoding step's kernel.  It is
    needed only when something must see the operator: autograd (a tensor requiring grad
    with grad mode on), torch.compile or torch.jit tracing, a torch function or dispatch
    mode (FakeTensorMode, FlopCounterMode, ...), a tensor subclass (fake tensors
    included) or a functorch transform (vmap, grad).  Otherwise the operator would only
    run its implementation, and the caller may run that itself.  With ``autograd``, tensors
    that require grad are allowed: the caller records the call with :class:`_DirectAttention`.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled() and not autograd
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or (grad and t.requires_grad) or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
    return True


def _trusted():
    """The public functions have checked their arguments: the operators they call skip
    ``checks`` (at run time of a compiled graph they check, as for any caller)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else checks.trusted()


def run_fwd(q, k, v, params, backend, sink=None):
    """(out, lse) of ``flashattn_lite::fwd`` for a caller that has checked its arguments:
    the operator, or its implementation directly where :func:`direct_call_ok` says that is
    the same thing."""
    tensors = (q, k, v, sink, params.cu_seqlens_q, params.cu_seqlens_k, params.bias, params.alibi_slopes)
    if direct_call_ok(tensors):
        return _fwd_direct(q, k, v, params, sink, backend, trusted=True)
    if direct_call_ok(tensors, autograd=True):
        return _DirectAttention.apply(q, k, v, params.bias, sink, params, backend)
    with _trusted():
        return torch.ops.flashattn_lite.fwd(q, k, v, *params.op_args(), backend, sink)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, *args = inputs
    args, sink = _with_sink(tuple(args), len(OP_FIELDS) + 1, None)
    *args, backend = args
    params = Params.from_op_args(args)
    ctx.save_for_backward(q, k, v, *output, sink, *(getattr(params, name) for name in _TENSOR_FIELDS))
    ctx.params = dataclasses.replace(params, **dict.fromkeys(_TENSOR_FIELDS))  # tensors go through saved_tensors
    ctx.bias_grad = params.bias is not None and params.bias.requires_grad
    ctx.backend = backend
    # an output the loss does not use (usually lse) gets None, not a zero tensor: a sink
    # call then skips the second backward a real dlse needs (backends/sinks.py)
    ctx.set_materialize_grads(False)


def _backward(dout, dlse, q, k, v, out, lse, params, sink, bias_grad, backend, direct):
    """(dq, dk, dv, dbias, dsink) of a forward's own arguments and results: through the
    ``bwd`` operator, or (``direct``) its implementation."""
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    if dout.stride(-1) != 1:
        # e.g. the expanded gradient of out.sum(): kernels need a unit last stride
        dout = dout.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    if direct:
        return _bwd_direct(dout, dlse, q, k, v, out, lse, params, bias_grad, True, backend, sink, trusted=True)
    with _trusted():
        return torch.ops.flashattn_lite.bwd(dout, dlse, q, k, v, out, lse, *params.op_args(), bias_grad, True, backend,
                                            sink)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, sink, *tensors = ctx.saved_tensors
    params = dataclasses.replace(ctx.params, **dict(zip(_TENSOR_FIELDS, tensors)))
    bias_grad = bool(ctx.needs_input_grad[_BIAS_INPUT]) and ctx.bias_grad
    dq, dk, dv, dbias, dsink = _backward(dout, dlse, q, k, v, out, lse, params, sink, bias_grad, ctx.backend, False)
    grads = [dq, dk, dv] + [None] * (len(OP_FIELDS) + 2)  # + backend, sink
    grads[_BIAS_INPUT] = dbias if bias_grad else None
    grads[_SINK_INPUT] = dsink if sink is not None and ctx.needs_input_grad[_SINK_INPUT] else None
    return tuple(grads)


class _DirectAttention(torch.autograd.Function):
    """The ``fwd`` operator's autograd, recorded without the operator's dispatch (which
    costs tens of microseconds a call through torch.library's autograd wrapper) where
    :func:`direct_call_ok` allows it: the same kernels, checks and gradients.  A backward
    with ``create_graph=True`` goes through the ``bwd`` operator, which names double
    backward as unsupported."""

    @staticmethod
    def forward(ctx, q, k, v, bias, sink, params, backend):
        out, lse = _fwd_direct(q, k, v, params, sink, backend, trusted=True)
        ctx.save_for_backward(q, k, v, out, lse, sink, bias)
        ctx.params = params
        ctx.backend = backend
        ctx.set_materialize_grads(False)  # as _fwd_setup_context
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sink, bias = ctx.saved_tensors
        bias_grad = bias is not None and bool(ctx.needs_input_grad[3])
        params = ctx.params if bias is None else dataclasses.replace(ctx.params, bias=bias)
        dq, dk, dv, dbias, dsink = _backward(dout, dlse, q, k, v, out, lse, params, sink, bias_grad, ctx.backend,
                                             direct=not torch.is_grad_enabled())
        return (dq, dk, dv, dbias if bias_grad else None,
                dsink if sink is not None and ctx.needs_input_grad[4] else None, None, None)


fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("flashattn_lite: double backward (a gradient of a gradient, e.g. "
                              "torch.autograd.grad(..., create_graph=True) followed by a second backward) is not "
                              "supported: the attention backward is not differentiable here")


def _bwd_setup_context(ctx, inputs, output):
    pass


bwd.register_autograd(_no_double_backward, setup_context=_bwd_setup_context)


# ------------------------------------------------------------------ KV-cache decoding
# decode: (out, lse) of q (B, Sq, H, D) against paged caches k (num_blocks, page_size, Hk, D), v (.., Dv); out (.., Dv):
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
                 "Tensor? alibi_slopes, int num_splits, str backend, Tensor? learnable_sink=None, "
                 "Tensor? k_descale=None, Tensor? v_descale=None) -> (Tensor, Tensor)")
# Quantized caches (flashattn_lite/quant.py): k_cache/v_cache int8 or float8_e4m3fn with
# k_descale/v_descale float32 (num_blocks, page_size, heads_k) views (broadcast dims with
# stride 0); the value of a position is its code times its descale.
_DECODE_ARGS = 14  # before the defaulted ones
_DECODE_EXTRA = ("learnable_sink", "k_descale", "v_descale")


def _decode_direct(q, k_cache, v_cache, block_table, seqlens_k, leftpad, max_seqlen_k, softmax_scale, window_left,
                   window_right, softcap, alibi_slopes, num_splits, backend, sink=None, *, k_descale=None,
                   v_descale=None, trusted=False):
    params = backends.Params(softmax_scale=softmax_scale, window_left=window_left, window_right=window_right,
                             softcap=softcap, alibi_slopes=alibi_slopes)
    quant = {} if k_descale is None and v_descale is None else {"k_descale": k_descale, "v_descale": v_descale}
    if trusted or checks.is_trusted():
        module = backends.get(backend)
    else:
        checks.check_decode(q, k_cache, v_cache, block_table, seqlens_k, leftpad, max_seqlen_k, params, num_splits,
                            sink=sink, k_descale=k_descale, v_descale=v_descale)
        module = _serving_backend(backend, q, v_cache, params, ("kv-cache",) + (("kv-quant",) if quant else ()))
        q, k_cache, v_cache = _unit_last(q, k_cache, v_cache)
    out, lse = module.decode(q, k_cache, v_cache, block_table, seqlens_k, leftpad, params, max_seqlen_k, num_splits,
                             **quant)
    if sink is not None:
        out = sinks.apply_to_out(out, lse, sink, False)
    return _like(out, q), lse.contiguous()


def _decode_extras(args, kwargs):
    """The defaulted decode arguments (sink, k_descale, v_descale), however torch passed them."""
    extra = dict(zip(_DECODE_EXTRA, args[_DECODE_ARGS:]))
    extra.update({k: v for k, v in kwargs.items() if v is not None})
    return args[:_DECODE_ARGS], extra


@torch.library.custom_op("flashattn_lite::decode", mutates_args=(), schema=DECODE_SCHEMA)
def decode(*args, **kwargs):
    args, extra = _decode_extras(args, kwargs)
    return _decode_direct(*args, sink=extra.get("learnable_sink"), k_descale=extra.get("k_descale"),
                          v_descale=extra.get("v_descale"))


def run_decode(*args, k_descale=None, v_descale=None):
    """(out, lse) of ``flashattn_lite::decode`` (arguments in its schema's order, the descales
    as keywords) for a caller that has checked them: the operator, or its implementation
    directly where :func:`direct_call_ok` says that is the same thing."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)] + [t for t in (k_descale, v_descale) if t is not None]
    if direct_call_ok(tensors):
        return _decode_direct(*args, k_descale=k_descale, v_descale=v_descale, trusted=True)
    with _trusted():
        if k_descale is None and v_descale is None:
            return torch.ops.flashattn_lite.decode(*args)
        args = args + (None,) * (_DECODE_ARGS + 1 - len(args))  # the sink, positionally
        return torch.ops.flashattn_lite.decode(*args, k_descale=k_descale, v_descale=v_descale)


@decode.register_fake
def _decode_fake(q, k_cache, v_cache, *args, **kwargs):
    return empty_like_last(q, v_cache.shape[-1]), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=accum_dtype(q.dtype))
