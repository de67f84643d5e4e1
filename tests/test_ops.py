"""torch.library integration: opcheck, torch.compile, and no hidden copies."""

import pytest
import torch

import flashattn_lite as fl
from flashattn_lite import backends

from helpers import make_qkv, ops_seen


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


# ------------------------------------------------------------------ direct calls in eager mode


def test_eager_call_without_grad_skips_the_operator_dispatch():
    # Plain tensors, nothing to record for autograd: the backend runs without going
    # through flashattn_lite::fwd / ::decode (same kernel, same bits), saving the
    # dispatch's cost.  A call that needs autograd is recorded by ops._DirectAttention,
    # also without the operator; its gradients are the operator's, bit for bit.
    q, k, v = make_qkv(1, 9, 12, 2, 1, 16, torch.float32)
    with fl.use_backend("cpu"):
        with torch.no_grad():
            direct = fl.flash_attn_func(q, k, v, causal=True)
            seen = ops_seen(lambda: fl.flash_attn_func(q, k, v, causal=True))
        assert "flashattn_lite::fwd" not in seen and "flashattn_lite_C::fwd" in seen
        seen = ops_seen(lambda: fl.flash_attn_func(q, k, v, causal=True))  # make_qkv's tensors require grad
        assert "flashattn_lite::fwd" not in seen and "flashattn_lite_C::fwd" in seen
        recorded = fl.flash_attn_func(q, k, v, causal=True)
        assert type(recorded.grad_fn).__name__ == "_DirectAttentionBackward"
        params = fl.backends.Params(softmax_scale=16 ** -0.5, diag_offset=3, window_right=0)
        via_op, _ = torch.ops.flashattn_lite.fwd(q, k, v, *params.op_args(), "cpu")
    assert torch.equal(direct, recorded.detach()) and torch.equal(direct, via_op.detach())
    dout = torch.randn_like(direct)
    grads = torch.autograd.grad(recorded, (q, k, v), dout)
    grads_op = torch.autograd.grad(via_op, (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_op))

    cache = torch.randn(1, 12, 1, 16)
    with torch.inference_mode():
        seen = ops_seen(lambda: fl.flash_attn_with_kvcache(q[:, :1].detach(), cache, cache))
    assert "flashattn_lite::decode" not in seen and "flashattn_lite_C::decode" in seen


def test_direct_call_ok_declines_whatever_must_see_the_operator():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    ok = fl.ops.direct_call_ok
    q = torch.randn(1, 4, 2, 8)
    assert ok((q, q, None))
    grad_q = q.clone().requires_grad_()
    assert not ok((q, grad_q, q))  # autograd must record the call
    with torch.no_grad():
        assert ok((q, grad_q, q))

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Watch():
        assert not ok((q,))
    with TorchFunctionMode():
        assert not ok((q,))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(q)
    assert not ok((fake,))  # a subclass, even outside its mode
    assert torch.vmap(lambda x: torch.tensor(ok((x,))))(torch.randn(3, 4)).tolist() == [False] * 3
