"""Shared test helpers: input makers and the run-and-compare routine."""

import torch

import flashattn_lite as fl
from flashattn_lite.testing import check_against_reference, reference_results


def make_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, dtype, memory="bshd", requires_grad=True):
    """Random q, k, v as logical (B, S, H, D) tensors.

    ``memory="bhsd"`` allocates torch's layout and returns transposed views, so
    the kernels must honour the strides; ``"padded"`` leaves gaps between rows
    and heads (a slice of a wider buffer).
    """
    def one(seqlen, heads):
        if memory == "bshd":
            t = torch.randn(batch, seqlen, heads, head_dim, dtype=dtype)
        elif memory == "bhsd":
            t = torch.randn(batch, heads, seqlen, head_dim, dtype=dtype).transpose(1, 2)
        elif memory == "padded":
            t = torch.randn(batch, seqlen, heads + 1, head_dim + 3, dtype=dtype)[:, :, 1:, :head_dim]
        else:
            raise ValueError(memory)
        return t.requires_grad_(requires_grad)

    return one(seqlen_q, heads_q), one(seqlen_k, heads_k), one(seqlen_k, heads_k)


def run_flash(backend, q, k, v, dout=None, causal=False, window_size=(-1, -1), softmax_scale=None, softcap=0.0,
              alibi_slopes=None, dropout_p=0.0):
    """flash_attn_func on ``backend``; returns {'out','lse'} (+ grads if dout)."""
    with fl.use_backend(backend):
        out, lse, _ = fl.flash_attn_func(q, k, v, causal=causal, window_size=window_size,
                                         softmax_scale=softmax_scale, softcap=softcap, alibi_slopes=alibi_slopes,
                                         dropout_p=dropout_p, return_attn_probs=True)
        res = {"out": out.detach(), "lse": lse.detach()}
        if dout is not None:
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
            res.update(dq=dq, dk=dk, dv=dv)
    return res


def window_args(seqlen_q, seqlen_k, causal, window_size):
    """(diag_offset, left, right) as flash_attn_func derives them."""
    left, right = window_size
    return seqlen_k - seqlen_q, left, 0 if causal else right


def assert_matches_reference(ours, q, k, v, dout, causal=False, window_size=(-1, -1), softmax_scale=None,
                             softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_keep=None):
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    offset, left, right = window_args(q.shape[1], k.shape[1], causal, window_size)
    ref, base = reference_results(q, k, v, dout, scale, offset, left, right, softcap, alibi_slopes,
                                  dropout_keep=dropout_keep, dropout_p=dropout_p)
    checks = check_against_reference(ours, ref, base, q.dtype)
    failed = [str(c) for c in checks if not c.ok]
    assert not failed, "; ".join(failed)
    # masked rows: exactly 0 output and -inf lse, as the reference
    empty = torch.isinf(ref["lse"])
    assert torch.equal(torch.isinf(ours["lse"]), empty)
    if empty.any():
        assert (ours["out"].transpose(1, 2)[empty] == 0).all()
    for key, t in ours.items():
        if key != "lse":
            assert torch.isfinite(t).all(), f"{key} has NaN/inf"
    return checks


def check_case(backend, batch, sq, sk, hq, hk, d, dtype, causal=False, window=(-1, -1), memory="bshd", scale=None,
               softcap=0.0, alibi=None):
    """Random inputs of this shape through ``backend``, forward and gradients, against the reference.

    ``alibi``: None, "heads" for (hq,) slopes or "batch-heads" for (batch, hq).
    """
    q, k, v = make_qkv(batch, sq, sk, hq, hk, d, dtype, memory)
    dout = torch.randn(batch, sq, hq, d, dtype=dtype)
    slopes = None if alibi is None else (torch.rand(hq) if alibi == "heads" else torch.rand(batch, hq))
    kw = dict(causal=causal, window_size=window, softmax_scale=scale, softcap=softcap, alibi_slopes=slopes)
    ours = run_flash(backend, q, k, v, dout, **kw)
    assert_matches_reference(ours, q, k, v, dout, **kw)
    return ours


def assert_checks_ok(ours, ref, base, dtype):
    """Every key of ``ours`` within tolerance of ``ref``, and finite (lse may hold -inf)."""
    failed = [str(c) for c in check_against_reference(ours, ref, base, dtype) if not c.ok]
    assert not failed, "; ".join(failed)
    for key, t in ours.items():
        if key != "lse":
            assert torch.isfinite(t).all(), f"{key} has NaN/inf"


def ops_seen(fn):
    """Names of the operators the profiler saw while ``fn()`` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


# the extension's settings operators: they choose a path once per process, compute nothing
_SETTINGS_OPS = {"flashattn_lite_C::cpu_bf16_products", "flashattn_lite_C::cpu_fp16_products",
                 "flashattn_lite_C::cpu_probe_products", "flashattn_lite_C::cpu_onednn_shapes"}


def kernels_run(fn):
    """Names of the C++ extension's compute operators that ran during ``fn()``."""
    return {name for name in ops_seen(fn) if name.startswith("flashattn_lite_C::")} - _SETTINGS_OPS
