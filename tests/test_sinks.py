"""Learnable attention sinks (``learnable_sink``): one extra logit per query head with a
zero value, against the float64 oracle that writes the sink as the extra score column
it is (transformers' eager formulation), on every backend, alone and with each feature.
"""

import pytest
import torch

import flashattn_lite as fl
from flashattn_lite.testing import record_dropout, reference_results, \
    reference_results_varlen
from helpers import assert_checks_ok, make_qkv

TRITON = pytest.mark.triton
BACKENDS = ["cpu", "reference", pytest.param("triton", marks=TRITON)]


def _sink(heads, scale=2.0, requires_grad=True):
    return (torch.randn(heads) * scale).requires_grad_(requires_grad)


def _run_dense(backend, q, k, v, sink, dout, **kw):
    with fl.use_backend(backend):
        out, lse, _ = fl.flash_attn_func(q, k, v, learnable_sink=sink, return_attn_probs=True, **kw)
        grads = torch.autograd.grad(out, (q, k, v, sink), dout)
    return dict(out=out.detach(), lse=lse, dq=grads[0], dk=grads[1], dv=grads[2], dsink=grads[3])


FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(3, 1)),
    "softcap": dict(softcap=4.0),
    "alibi": dict(alibi=True),
    "causal+window+softcap+alibi": dict(causal=True, window_size=(2, -1), softcap=6.0, alibi=True),
}


def _feature_cases():
    # the sink is applied around the kernels (backends/sinks.py), the same code for every
    # backend: the slow Triton interpreter runs two combinations, the others all
    for feature in sorted(FEATURES):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for backend in ("cpu", "reference"):
                yield pytest.param(backend, dtype, feature)
    yield pytest.param("triton", torch.float32, "causal+window+softcap+alibi", marks=TRITON)
    yield pytest.param("triton", torch.bfloat16, "plain", marks=TRITON)
    yield pytest.param("cuda_emu", torch.float16, "causal")
    yield pytest.param("cuda_emu", torch.bfloat16, "window")


@pytest.mark.parametrize("backend, dtype, feature", list(_feature_cases()))
def test_sink_with_each_feature(backend, dtype, feature):
    kw = dict(FEATURES[feature])
    batch, sq, sk, hq, hk, d = 2, 7, 11, 4, 2, 16
    q, k, v = make_qkv(batch, sq, sk, hq, hk, d, dtype)
    sink = _sink(hq)
    dout = torch.randn(batch, sq, hq, d, dtype=dtype)
    slopes = torch.rand(hq) if kw.pop("alibi", False) else None
    ours = _run_dense(backend, q, k, v, sink, dout, alibi_slopes=slopes, **kw)
    left, right = kw.get("window_size", (-1, -1))
    right = 0 if kw.get("causal") else right
    ref, base = reference_results(q, k, v, dout, d ** -0.5, sk - sq, left, right, kw.get("softcap", 0.0), slopes,
                                  learnable_sink=sink)
    assert_checks_ok(ours, ref, base, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sink_rows_that_see_nothing_give_zero(backend):
    # causal with Sq > Sk: the first Sq - Sk rows see no key at all
    q, k, v = make_qkv(1, 6, 3, 2, 1, 8, torch.float32)
    sink = _sink(2)
    dout = torch.randn(1, 6, 2, 8)
    ours = _run_dense(backend, q, k, v, sink, dout, causal=True)
    assert (ours["out"][:, :3] == 0).all() and torch.isinf(ours["lse"][:, :, :3]).all()
    ref, base = reference_results(q, k, v, dout, 8 ** -0.5, -3, -1, 0, learnable_sink=sink)
    assert_checks_ok(ours, ref, base, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sink_limits_and_lse(backend):
    q, k, v = make_qkv(1, 5, 5, 2, 2, 8, torch.float32, requires_grad=False)
    with fl.use_backend(backend):
        plain, plain_lse, _ = fl.flash_attn_func(q, k, v, return_attn_probs=True)
        out, lse, _ = fl.flash_attn_func(q, k, v, learnable_sink=torch.full((2,), float("-inf")),
                                         return_attn_probs=True)
        assert torch.equal(out, plain) and torch.equal(lse, plain_lse)  # a -inf sink takes no mass
        out, lse, _ = fl.flash_attn_func(q, k, v, learnable_sink=torch.tensor([0.5, -1.0]), return_attn_probs=True)
        assert torch.equal(lse, plain_lse)  # lse leaves the sink out
        # each row keeps the share e^lse / (e^lse + e^sink) of its sink-free output
        share = torch.sigmoid(plain_lse - torch.tensor([0.5, -1.0])[None, :, None]).transpose(1, 2)[..., None]
        assert torch.allclose(out, plain * share, atol=1e-6, rtol=0)
        out = fl.flash_attn_func(q, k, v, learnable_sink=torch.full((2,), 1e4))
        assert (out.abs() < 1e-30).all()  # the sink takes (all but e^-1e4 of) the mass


@pytest.mark.parametrize("backend", BACKENDS)
def test_sink_with_a_gradient_into_lse(backend):
    q, k, v = make_qkv(1, 5, 6, 2, 1, 8, torch.float32)
    sink = _sink(2)
    wo, wl = torch.randn(1, 5, 2, 8), torch.randn(1, 2, 5)
    with fl.use_backend(backend):
        out, lse, _ = fl.flash_attn_func(q, k, v, causal=True, learnable_sink=sink, return_attn_probs=True)
        grads = torch.autograd.grad((out * wo).sum() + (lse * wl).sum(), (q, k, v, sink))
    from flashattn_lite.backends.reference import attention_math
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sink)]
    ro, rl = attention_math(*leaves[:3], 8 ** -0.5, 1, -1, 0, sink=leaves[3])
    want = torch.autograd.grad((ro * wo.double()).sum() + (rl * wl.double()).sum(), leaves)
    for name, a, b in zip(("dq", "dk", "dv", "dsink"), grads, want):
        assert (a.double() - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("use", ["out", "lse", "both"])
def test_backward_pass_count_and_unused_outputs(monkeypatch, use):
    """An output the loss does not use reaches the backward as None: a sink call whose loss
    uses only out runs the backend's backward once (a zero dlse would cost a second one), and
    a loss on lse alone (no dout) still gets exact gradients."""
    from flashattn_lite.backends import cpu as cpu_backend
    from flashattn_lite.backends.reference import attention_math

    calls = []
    original = cpu_backend.bwd
    monkeypatch.setattr(cpu_backend, "bwd", lambda *a, **kw: calls.append(a[1] is None) or original(*a, **kw))
    q, k, v = make_qkv(1, 6, 7, 2, 1, 8, torch.float64)
    sink = _sink(2).double().detach().requires_grad_()
    wo, wl = torch.randn(1, 6, 2, 8, dtype=torch.float64), torch.randn(1, 2, 6, dtype=torch.float64)

    def loss(out, lse):
        return {"out": (out * wo).sum(), "lse": (lse * wl).sum(), "both": (out * wo).sum() + (lse * wl).sum()}[use]

    with fl.use_backend("cpu"):
        out, lse, _ = fl.flash_attn_func(q, k, v, causal=True, learnable_sink=sink, return_attn_probs=True)
        grads = torch.autograd.grad(loss(out, lse), (q, k, v, sink))
    assert calls == {"out": [True], "lse": [True, False], "both": [True, False]}[use]  # (dlse is None?) per call
    leaves = [t.detach().requires_grad_() for t in (q, k, v, sink)]
    want = torch.autograd.grad(loss(*attention_math(*leaves[:3], 8 ** -0.5, 1, -1, 0, sink=leaves[3])), leaves,
                               allow_unused=True)  # lse alone reads neither v nor the sink
    want = [torch.zeros_like(t) if g is None else g for g, t in zip(want, leaves)]
    for name, a, b in zip(("dq", "dk", "dv", "dsink"), grads, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sink_varlen(backend):
    lengths_q, lengths_k = [3, 0, 5, 1], [4, 2, 5, 0]
    cu_q = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11, 11], dtype=torch.int32)
    q = torch.randn(sum(lengths_q), 4, 16, requires_grad=True)
    k = torch.randn(sum(lengths_k), 2, 16, requires_grad=True)
    v = torch.randn(sum(lengths_k), 2, 16, requires_grad=True)
    sink, dout = _sink(4), torch.randn(sum(lengths_q), 4, 16)
    with fl.use_backend(backend):
        out, lse, _ = fl.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, causal=True, learnable_sink=sink,
                                                return_attn_probs=True)
        grads = torch.autograd.grad(out, (q, k, v, sink), dout)
    ours = dict(out=out.detach(), lse=lse, dq=grads[0], dk=grads[1], dv=grads[2], dsink=grads[3])
    ref, base = reference_results_varlen(q, k, v, dout, cu_q, cu_k, 16 ** -0.5, causal=True, learnable_sink=sink)
    assert_checks_ok(ours, ref, base, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sink_with_dropout(backend):
    q, k, v = make_qkv(1, 6, 8, 2, 2, 8, torch.float32)
    sink, dout = _sink(2), torch.randn(1, 6, 2, 8)
    with record_dropout() as calls:
        ours = _run_dense(backend, q, k, v, sink, dout, dropout_p=0.3, causal=True)
    ref, base = reference_results(q, k, v, dout, 8 ** -0.5, 2, -1, 0, dropout_keep=calls[0].keep(), dropout_p=0.3,
                                  learnable_sink=sink)
    assert_checks_ok(ours, ref, base, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True])
def test_sink_kvcache_decoding(backend, paged):
    batch, hq, hk, d, cap = 3, 4, 2, 16, 24
    q = torch.randn(batch, 2, hq, d)
    kc, vc = torch.randn(batch, cap, hk, d), torch.randn(batch, cap, hk, d)
    seqlens = torch.tensor([5, 0, 17], dtype=torch.int32)
    sink = torch.randn(hq) * 2
    kw = dict(cache_seqlens=seqlens, causal=True, learnable_sink=sink, return_softmax_lse=True)
    if paged:  # pages of 8 in shuffled order
        order = torch.randperm(batch * 3)
        kw["block_table"] = order.view(batch, 3).to(torch.int32)
        kc_p, vc_p = torch.empty(batch * 3, 8, hk, d), torch.empty(batch * 3, 8, hk, d)
        kc_p[order] = kc.view(batch * 3, 8, hk, d)
        vc_p[order] = vc.view(batch * 3, 8, hk, d)
        kc, vc = kc_p, vc_p
    with fl.use_backend(backend):
        out, lse = fl.flash_attn_with_kvcache(q, kc, vc, **kw)
    with fl.use_backend("reference"):
        plain, plain_lse = fl.flash_attn_with_kvcache(q.double(), kc.double(), vc.double(),
                                                      **dict(kw, learnable_sink=None))
    # the oracle: each row's sink-free output scaled by its share e^lse / (e^lse + e^sink)
    share = torch.sigmoid(plain_lse - sink.double()[None, :, None]).nan_to_num(0.0).transpose(1, 2)[..., None]
    assert (out.double() - plain * share).abs().max() < 1e-5
    assert torch.allclose(lse.double(), plain_lse, atol=1e-5)


def test_sink_gradcheck_fp64_cpu():
    q, k, v = make_qkv(1, 4, 5, 2, 1, 4, torch.float64)
    sink = (torch.randn(2, dtype=torch.float64)).requires_grad_()
    slopes = torch.rand(2, dtype=torch.float64)

    def fn(q, k, v, sink):
        out, lse, _ = fl.flash_attn_func(q, k, v, causal=True, softcap=3.0, alibi_slopes=slopes,
                                         learnable_sink=sink, return_attn_probs=True)
        return out, lse

    with fl.use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, (q, k, v, sink))


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3), "shape"), (torch.zeros(2, 1), "shape"), (torch.zeros(2, dtype=torch.int64), "float"),
    ([0.0, 0.0], "Tensor")])
def test_sink_bad_arguments(bad, match):
    q, k, v = make_qkv(1, 4, 4, 2, 2, 8, torch.float32, requires_grad=False)
    with pytest.raises((ValueError, TypeError), match=match):
        fl.flash_attn_func(q, k, v, learnable_sink=bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fl.flash_attn_with_kvcache(q, k, v, learnable_sink=bad)


def test_cpu_kernel_takes_the_sink_itself():
    """The cpu backend's tiled forward adds the sink to its normaliser (the fused operator,
    no pass over the output); its decoding route applies it around the kernel.  Both
    against the float64 reference; the operator checks the sink it is given."""
    from helpers import ops_seen

    q, k, v = (torch.randn(1, 70, 2, 16, dtype=torch.bfloat16) for _ in range(3))
    sink = torch.tensor([3.0, -1.0])
    with fl.use_backend("cpu"):
        seen = ops_seen(lambda: fl.flash_attn_func(q, k, v, causal=True, learnable_sink=sink))
        out, lse, _ = fl.flash_attn_func(q, k, v, causal=True, learnable_sink=sink, return_attn_probs=True)
        one_row = fl.flash_attn_func(q[:, :1], k, v, learnable_sink=sink)  # the decoding route
    assert "flashattn_lite_C::cpu_fwd_sink" in seen and "flashattn_lite_C::fwd" not in seen
    ref, base = reference_results(q, k, v, None, 16 ** -0.5, 0, -1, 0, learnable_sink=sink)
    assert_checks_ok({"out": out, "lse": lse}, ref, base, torch.bfloat16)
    ref1, base1 = reference_results(q[:, :1], k, v, None, 16 ** -0.5, learnable_sink=sink)
    assert_checks_ok({"out": one_row}, ref1, base1, torch.bfloat16)
    args = (None, None, 0, 0, None, 0.25, 0, -1, 0, 0.0, None, 0.0, 0)
    with pytest.raises(ValueError, match=r"learnable_sink must have shape \(num_heads_q,\) = \(2,\)"):
        torch.ops.flashattn_lite_C.cpu_fwd_sink(q, k, v, *args, torch.zeros(3))
    with pytest.raises(TypeError, match="learnable_sink must be a float tensor"):
        torch.ops.flashattn_lite_C.cpu_fwd_sink(q, k, v, *args, torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("varlen", [False, True])
def test_cpu_backward_takes_the_sink_itself(dtype, varlen):
    """The cpu backend's backward derives dsink from its own dO.O row sums and joins the sink
    to lse (``cpu_bwd_sink``, no separate pass in Python); with a loss through lse it takes
    the generic path (a second backward for dlse).  dq, dk, dv, dsink against float64."""
    from helpers import ops_seen

    torch.manual_seed(3)
    q, k, v = make_qkv(2, 37, 37, 4, 2, 16, dtype)
    sink = torch.tensor([2.0, -1.0, 0.5, 30.0], requires_grad=True)  # 30: the sink takes almost everything
    dout = torch.randn(2, 37, 4, 16, dtype=dtype)
    kw = dict(causal=True, window_size=(9, 0), learnable_sink=sink)
    with fl.use_backend("cpu"):
        if varlen:
            cu = torch.tensor([0, 37, 74], dtype=torch.int32)
            flat = [t.detach().reshape(74, *t.shape[2:]).requires_grad_() for t in (q, k, v)]

            def run():
                out = fl.flash_attn_varlen_func(*flat, cu, cu, 37, 37, **kw)
                out.backward(dout.reshape(74, 4, 16))
                return out
            seen = ops_seen(run)
            grads = [t.grad.view(2, 37, *t.shape[1:]) for t in flat]
        else:
            def run():
                out = fl.flash_attn_func(q, k, v, **kw)
                out.backward(dout)
                return out
            seen = ops_seen(run)
            grads = [q.grad, k.grad, v.grad]
    assert "flashattn_lite_C::cpu_bwd_sink" in seen and "flashattn_lite_C::bwd" not in seen
    ref, base = reference_results(q, k, v, dout, 16 ** -0.5, 0, 9, 0, learnable_sink=sink)
    assert_checks_ok({"dq": grads[0], "dk": grads[1], "dv": grads[2], "dsink": sink.grad}, ref, base, dtype)


def test_cpu_backward_with_a_loss_through_lse_and_a_sink():
    """dlse with a sink: the generic path (two backward calls), still exact."""
    from helpers import ops_seen

    q, k, v = make_qkv(1, 21, 21, 2, 2, 8, torch.float64)
    sink = torch.tensor([1.5, -0.5], dtype=torch.float64, requires_grad=True)
    with fl.use_backend("cpu"):
        def run():
            out, lse, _ = fl.flash_attn_func(q, k, v, causal=True, learnable_sink=sink, return_attn_probs=True)
            (out.sum() + (lse * torch.linspace(-1, 1, 21)).sum()).backward()
        seen = ops_seen(run)
    assert "flashattn_lite_C::bwd" in seen and "flashattn_lite_C::cpu_bwd_sink" not in seen
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    s = sink.detach().clone().requires_grad_()
    with fl.use_backend("reference"):
        out, lse, _ = fl.flash_attn_func(*leaves, causal=True, learnable_sink=s, return_attn_probs=True)
        (out.sum() + (lse * torch.linspace(-1, 1, 21)).sum()).backward()
    for ours, want in zip((q.grad, k.grad, v.grad, sink.grad), (*[t.grad for t in leaves], s.grad)):
        torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-10)


def test_cpu_bwd_sink_operator_checks_its_sink():
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    out, lse = torch.ops.flashattn_lite_C.fwd(q, k, v, None, None, 0, 0, None, 0.25, 0, -1, -1, 0.0, None, 0.0, 0)
    args = (None, None, 0, 0, None, 0.25, 0, -1, -1, 0.0, None, 0.0, 0, False, True)
    dout = torch.randn_like(out)
    with pytest.raises(ValueError, match=r"learnable_sink must have shape \(num_heads_q,\) = \(2,\)"):
        torch.ops.flashattn_lite_C.cpu_bwd_sink(dout, None, q, k, v, out, lse, *args, torch.zeros(3))
    with pytest.raises(TypeError, match="learnable_sink must be a float tensor"):
        torch.ops.flashattn_lite_C.cpu_bwd_sink(dout, None, q, k, v, out, lse, *args, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="takes no dlse"):
        torch.ops.flashattn_lite_C.cpu_bwd_sink(dout, torch.zeros_like(lse), q, k, v, out, lse, *args, torch.zeros(2))
