"""torch.library integration: opcheck, torch.compile, and no hidden copies."""

import pytest
import torch

import flashattn_lite as fl
from flashattn_lite import backends

from helpers import make_qkv


def _fwd_args(backend, dtype=torch.float32, causal=True, softcap=0.0, alibi=False):
    q, k, v = make_qkv(2, 17, 23, 4, 2, 16, dtype)
    slopes = torch.rand(4).expand(2, 4) if alibi else None
    return q, k, v, None, None, 0, 0, None, 0.25, 23 - 17, -1, 0 if causal else -1, softcap, slopes, 0.0, 0, backend


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_opcheck_fwd(backend):
    torch.library.opcheck(torch.ops.flashattn_lite.fwd.default, _fwd_args(backend))
    torch.library.opcheck(torch.ops.flashattn_lite.fwd.default, _fwd_args(backend, softcap=4.0, alibi=True))


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_opcheck_bwd(backend):
    q, k, v, *params, _ = _fwd_args(backend, softcap=4.0, alibi=True)
    out, lse = torch.ops.flashattn_lite.fwd(q, k, v, *params, backend)
    dout = torch.randn_like(out)
    for dlse in (None, torch.randn_like(lse)):
        args = (dout, dlse, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), *params, False, True,
                backend)
        torch.library.opcheck(torch.ops.flashattn_lite.bwd.default, args)


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()

    def layer(q, k, v, w):
        out = fl.flash_attn_func(q * w, k, v, causal=True)
        return (out.float() ** 2).sum()

    q, k, v = make_qkv(1, 20, 20, 2, 1, 16, torch.float32)
    w = torch.randn(16, requires_grad=True)
    with fl.use_backend(backend):
        eager = layer(q, k, v, w)
        eager_grads = torch.autograd.grad(eager, (q, k, v, w))
        compiled = torch.compile(layer, fullgraph=True, backend="inductor")
        result = compiled(q, k, v, w)
        grads = torch.autograd.grad(result, (q, k, v, w))
    torch.testing.assert_close(result, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_both_layouts_reach_the_kernel_without_copies(monkeypatch):
    seen = []
    real = backends.reference.fwd

    def spy(q, k, v, *args):
        seen.append((q.data_ptr(), k.data_ptr(), v.data_ptr()))
        return real(q, k, v, *args)

    monkeypatch.setattr(backends.reference, "fwd", spy)
    bhsd = [torch.randn(2, 3, 10, 8) for _ in range(3)]
    bshd = [torch.randn(2, 10, 3, 8) for _ in range(3)]
    with fl.use_backend("reference"):
        out = fl.scaled_dot_product_attention(*bhsd)
        fl.flash_attn_func(*bshd)
    assert seen[0] == tuple(t.data_ptr() for t in bhsd)
    assert seen[1] == tuple(t.data_ptr() for t in bshd)
    assert out.is_contiguous()  # the output comes back in the caller's layout


def _feature_args(backend, feature):
    """Op arguments exercising varlen, a bias that requires grad, or dropout."""
    if feature == "varlen":
        q, k, v = (torch.randn(20, 2, 16, requires_grad=True) for _ in range(3))
        cu = torch.tensor([0, 7, 7, 20], dtype=torch.int32)
        return (q, k, v, cu, cu, 13, 13, None, 0.25, 0, -1, 0, 0.0, None, 0.0, 0, backend)
    q, k, v = make_qkv(2, 11, 13, 2, 1, 16, torch.float32)
    bias = None
    if feature == "bias":
        bias = torch.randn(1, 2, 11, 1).requires_grad_().expand(2, 2, 11, 13)
    dropout = (0.3, 1234) if feature == "dropout" else (0.0, 0)
    return (q, k, v, None, None, 0, 0, bias, 0.25, 0, -1, -1, 0.0, None, *dropout, backend)


@pytest.mark.parametrize("feature", ["varlen", "bias", "dropout"])
@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_opcheck_features(backend, feature):
    torch.library.opcheck(torch.ops.flashattn_lite.fwd.default, _feature_args(backend, feature))


def test_opcheck_bwd_float64_without_bias():
    """The empty dbias of a call without bias follows q's dtype and device in the real and the fake op."""
    q, k, v, *params, backend = _fwd_args("reference", dtype=torch.float64)
    out, lse = torch.ops.flashattn_lite.fwd(q, k, v, *params, backend)
    args = (torch.randn_like(out), None, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), *params,
            False, True, backend)
    torch.library.opcheck(torch.ops.flashattn_lite.bwd.default, args)
    assert torch.ops.flashattn_lite.bwd(*args)[3].dtype == torch.float64
