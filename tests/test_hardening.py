"""Inputs that once gave a wrong answer, a crash, a hang or an unclear error (issue 14).

* softcap and softmax_scale at the ends of float32: one rule for every backend
  (flashattn_lite/checks.py); a large softcap is computed exactly on Triton too (its
  tanh was 1 - 2 / (e^2x + 1), which loses all precision for small arguments);
* Triton and varlen offsets: non-contiguous ``cu_seqlens`` and a ``max_seqlen_q`` of
  2**40 (these crashed or hung; they run in child processes, tests/isolated.py);
* torch.compile with dynamic shapes, numpy scalars, double backward;
* size-1 dims (head dim 1, one head, one query) that carry the largest stride: an MLA
  output once put its head dim outermost and the kernel wrote it as if innermost.
"""

import os

import numpy as np
import pytest
import torch

import flashattn_lite as fl
from flashattn_lite.testing import reference_results
from helpers import assert_checks_ok, check_case, make_qkv
from isolated import results

TRITON = pytest.mark.triton


# ------------------------------------------------------------------ scalar rules


@pytest.mark.parametrize("softcap", [1e-39, 1e-50, 2.0 ** -127, 1e39, 2.0 ** 127, float("inf"), float("nan"), -1.0])
def test_softcap_outside_float32_is_refused_everywhere(softcap):
    q, k, v = make_qkv(1, 4, 4, 2, 2, 8, torch.float32, requires_grad=False)
    calls = {
        "flash_attn_func": lambda: fl.flash_attn_func(q, k, v, softcap=softcap),
        "flash_attn_varlen_func": lambda: fl.flash_attn_varlen_func(
            q[0], k[0], v[0], torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32), 4, 4,
            softcap=softcap),
        "flash_attn_with_kvcache": lambda: fl.flash_attn_with_kvcache(q, k, v, softcap=softcap),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="softcap"):
            call()


@pytest.mark.parametrize("scale", [1e-50, 1e300, -1e300, float("nan")])
def test_softmax_scale_outside_float32_is_refused(scale):
    q, k, v = make_qkv(1, 4, 4, 2, 2, 8, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="softmax_scale"):
        fl.flash_attn_func(q, k, v, softmax_scale=scale)
    with pytest.raises(ValueError, match="scale"):
        fl.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)


def test_scale_over_softcap_beyond_float32_is_refused():
    q, k, v = make_qkv(1, 4, 4, 2, 2, 8, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="softmax_scale / softcap"):
        fl.flash_attn_func(q, k, v, softmax_scale=2.0 ** 100, softcap=2.0 ** -100)


def test_numpy_scalars_are_numbers():
    q, k, v = make_qkv(1, 6, 6, 2, 2, 8, torch.float32, requires_grad=False)
    want = fl.flash_attn_func(q, k, v, softmax_scale=0.5, softcap=3.0, dropout_p=0.0)
    got = fl.flash_attn_func(q, k, v, softmax_scale=np.float32(0.5), softcap=np.float64(3.0), dropout_p=np.float32(0))
    assert torch.equal(got, want)
    got = fl.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=np.float16(0.5))
    assert torch.allclose(got.transpose(1, 2), fl.flash_attn_func(q, k, v, softmax_scale=0.5), atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="softmax_scale"):
        fl.flash_attn_func(q, k, v, softmax_scale=np.bool_(True))


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("triton", marks=TRITON)])
@pytest.mark.parametrize("softcap", [2.0 ** -125, 1e4, 1e8])
def test_softcap_extremes_in_range_match_reference(backend, softcap):
    # smallest accepted softcap: every score is capped to +-2**-125, the softmax uniform;
    # large ones leave the scores (nearly) as they are, which Triton's tanh once got wrong
    # by up to 55% relative
    check_case(backend, 1, 5, 9, 2, 1, 16, torch.float32, causal=True, softcap=softcap)


@TRITON
def test_triton_decode_large_softcap_matches_reference():
    q, k, v = make_qkv(2, 1, 12, 4, 2, 16, torch.float32, requires_grad=False)
    want = None
    for backend in ("reference", "triton"):
        with fl.use_backend(backend):
            out = fl.flash_attn_with_kvcache(q if backend == "triton" else q.double(),
                                             k if backend == "triton" else k.double(),
                                             v if backend == "triton" else v.double(), softcap=1e8)
        want = out if want is None else want
    assert (out.double() - want).abs().max() < 1e-5


# ------------------------------------------------------------------ crash-prone Triton inputs (child processes)


def _noncontiguous_offsets(backend):
    q, k, v = (torch.randn(9, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 77, 4, -5, 4, 99, 9], dtype=torch.int32)[::2]  # [0, 4, 4, 9], stride 2
    out = fl.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True)
    with fl.use_backend("reference"):
        ref = fl.flash_attn_varlen_func(q.double(), k.double(), v.double(), cu.contiguous(), cu.contiguous(), 5, 5,
                                        causal=True)
    assert (out.double() - ref).abs().max() < 1e-5


def _absurd_max_seqlen(backend):
    q, k, v = (torch.randn(6, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out = fl.flash_attn_varlen_func(q, k, v, cu, cu, 2 ** 40, 2 ** 40)
    with fl.use_backend("reference"):
        ref = fl.flash_attn_varlen_func(q.double(), k.double(), v.double(), cu, cu, 4, 4)
    assert (out.double() - ref).abs().max() < 1e-5


def _noncontiguous_offsets_backward(backend):
    q, k, v = (torch.randn(9, 2, 16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 1, 4, 1, 9, 1], dtype=torch.int32)[::2]
    out = fl.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    with fl.use_backend("reference"):
        ref = torch.autograd.grad(fl.flash_attn_varlen_func(q, k, v, cu.contiguous(), cu.contiguous(), 5, 5).sum(),
                                  (q, k, v))
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(grads, ref))


CASES = {"noncontiguous_cu_seqlens": _noncontiguous_offsets, "max_seqlen_2_40": _absurd_max_seqlen,
         "noncontiguous_cu_seqlens_backward": _noncontiguous_offsets_backward}


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=TRITON)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_varlen_offsets_as_users_pass_them(backend, case):
    ok, detail = results(os.path.abspath(__file__), backend, sorted(CASES))[case]
    assert ok, detail


# ------------------------------------------------------------------ torch.compile, double backward


def test_compile_dynamic_fullgraph_matches_eager():
    torch._dynamo.reset()
    fn = torch.compile(fl.flash_attn_func, fullgraph=True, dynamic=True)
    for seqlen, softcap in ((12, 3.0), (17, 5.0)):
        q, k, v = make_qkv(2, seqlen, seqlen, 4, 2, 16, torch.float32)
        out = fn(q, k, v, causal=True, softcap=softcap)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        want = fl.flash_attn_func(q, k, v, causal=True, softcap=softcap)
        want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
        assert torch.allclose(out, want, atol=1e-6, rtol=0)
        assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(grads, want_grads))


def test_double_backward_says_so():
    q, k, v = make_qkv(1, 6, 6, 2, 2, 8, torch.float64)
    out = fl.flash_attn_func(q, k, v)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gq.sum().backward()


# ------------------------------------------------------------------ size-1 dims with any stride


def _unit_dim_outermost(shape, dim, dtype):
    """Random tensor of ``shape`` whose size-1 dim ``dim`` carries the largest stride (a
    permuted view that torch still calls contiguous: a size-1 dim's stride is free)."""
    order = [dim] + [i for i in range(len(shape)) if i != dim]
    t = torch.randn([shape[i] for i in order], dtype=dtype)
    return t.permute([order.index(i) for i in range(len(shape))])


# (batch, seqlen_q, seqlen_k, heads, head dim, value head dim, the size-1 dim of q given the largest stride)
UNIT_STRIDE_CASES = {
    "head_dim_1_mla": (2, 5, 3, 3, 1, 6, 3),  # once: the output put its head dim outermost, garbage
    "head_dim_1": (2, 5, 3, 3, 1, 1, 3),
    "one_head": (2, 4, 6, 1, 8, 5, 2),
    "one_query": (2, 1, 6, 2, 8, 5, 1),
    "batch_1": (1, 4, 6, 2, 8, 5, 0),
}


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("triton", marks=TRITON)])
@pytest.mark.parametrize("case", sorted(UNIT_STRIDE_CASES))
def test_size_one_dims_with_any_stride(backend, case):
    b, sq, sk, h, d, dv, dim = UNIT_STRIDE_CASES[case]
    q = _unit_dim_outermost((b, sq, h, d), dim, torch.float32).requires_grad_()
    k = torch.randn(b, sk, h, d, requires_grad=True)
    v = torch.randn(b, sk, h, dv, requires_grad=True)
    dout = torch.randn(b, sq, h, dv)
    ref, base = reference_results(q, k, v, dout, d ** -0.5, sk - sq, -1, 0)
    with fl.use_backend(backend):
        out, lse, _ = fl.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        dq, dk, dv_ = torch.autograd.grad(out, (q, k, v), dout)
        # the same call in torch's layout (its causal diagonal is top-left: Sq <= Sk shifts it)
        o_t = fl.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=_bottom_right(sq, sk))
    assert_checks_ok({"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv_}, ref, base, torch.float32)
    assert_checks_ok({"out": o_t.transpose(1, 2)}, {"out": ref["out"]}, {"out": base["out"]}, torch.float32)


def _bottom_right(sq, sk):
    return torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
