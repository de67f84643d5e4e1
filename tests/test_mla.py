"""A value head dim Dv different from the query/key head dim D (MLA), and head dims up to 512.

One rule for every backend: ``v`` (and ``v_cache``) may have last dim Dv != D; the output has
Dv; 1 <= D, Dv <= 512 (D up to 576 in ``flash_attn_with_kvcache``); the default scale stays
D ** -0.5.  Checked against the float64 oracle with the flash-attn tolerance scheme
(flashattn_lite.testing), on ``cpu`` and ``reference``.
"""

import pytest
import torch

import flashattn_lite as fl
from flashattn_lite import backends
from flashattn_lite.testing import check_against_reference, record_dropout, reference_results, \
    reference_results_varlen

from test_kvcache import oracle

BACKENDS = ["cpu", "reference"]
# (D, Dv): both directions, tiny and the largest
DIMS = [(192, 128), (64, 32), (32, 64), (16, 1), (512, 512)]


def _qkv(batch, sq, sk, hq, hk, d, dv, dtype, memory="bshd"):
    def one(seqlen, heads, dim):
        if memory == "bhsd":  # torch's layout, seen through a transpose
            t = torch.randn(batch, heads, seqlen, dim, dtype=dtype).transpose(1, 2)
        else:
            t = torch.randn(batch, seqlen, heads, dim, dtype=dtype)
        return t.requires_grad_()
    return one(sq, hq, d), one(sk, hk, d), one(sk, hk, dv)


def _assert_ok(ours, ref, base, dtype):
    failed = [str(c) for c in check_against_reference(ours, ref, base, dtype) if not c.ok]
    assert not failed, "; ".join(failed)
    empty = torch.isinf(ref["lse"])
    assert torch.equal(torch.isinf(ours["lse"]), empty)
    for key, t in ours.items():
        if key != "lse":
            assert torch.isfinite(t).all(), f"{key} has NaN/inf"


def _dense(backend, q, k, v, dout, sink=None, **kw):
    with fl.use_backend(backend):
        out, lse, _ = fl.flash_attn_func(q, k, v, return_attn_probs=True, learnable_sink=sink, **kw)
        leaves = (q, k, v) + ((sink,) if sink is not None else ())
        grads = torch.autograd.grad(out, leaves, dout)
    assert out.shape == q.shape[:-1] + v.shape[-1:] and out.dtype == q.dtype
    ours = dict(out=out.detach(), lse=lse, dq=grads[0], dk=grads[1], dv=grads[2])
    if sink is not None:
        ours["dsink"] = grads[3]
    return ours


def _cases():
    for backend in BACKENDS:
        for d, dv in DIMS:
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                if d < 512 or dtype != torch.float16:
                    yield backend, d, dv, dtype
        yield backend, 192, 128, torch.float64


@pytest.mark.parametrize("backend, d, dv, dtype", list(_cases()))
def test_dense_causal_gqa(backend, d, dv, dtype):
    torch.manual_seed(d * 1000 + dv)
    q, k, v = _qkv(2, 9, 13, 4, 2, d, dv, dtype)
    dout = torch.randn(2, 9, 4, dv, dtype=dtype)
    ours = _dense(backend, q, k, v, dout, causal=True)
    ref, base = reference_results(q, k, v, dout, d ** -0.5, 4, -1, 0)
    _assert_ok(ours, ref, base, dtype)


# each feature once per direction of the mismatch, fp16 and fp32 (bf16 above)
FEATURES = ["window", "softcap", "alibi", "mqa", "rows_see_nothing", "sink", "long"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d, dv", [(48, 24), (24, 40)])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_features(backend, d, dv, feature, dtype):
    torch.manual_seed(hash((d, dv, feature)) % 1000)
    sq, sk, hq, hk = 7, 11, 4, 2
    if feature == "mqa":
        hk = 1
    if feature == "long":  # several query and key tiles of the C++ kernels
        sq, sk, hq, hk = 300, 600, 2, 1
    q, k, v = _qkv(1, sq, sk, hq, hk, d, dv, dtype, memory="bhsd" if feature == "mqa" else "bshd")
    dout = torch.randn(1, sq, hq, dv, dtype=dtype)
    kw, ref_kw = {}, {}
    offset, left, right = sk - sq, -1, -1
    if feature == "window":
        kw["window_size"] = (3, 1)
        left, right = 3, 1
    elif feature == "softcap":
        kw["softcap"] = ref_kw["softcap"] = 2.0
    elif feature == "alibi":
        kw["alibi_slopes"] = ref_kw["alibi_slopes"] = torch.rand(1, hq)
    elif feature == "rows_see_nothing":  # Sq > Sk causal: the first rows see no key
        q, k, v = _qkv(1, 9, 4, hq, hk, d, dv, dtype)
        dout = torch.randn(1, 9, hq, dv, dtype=dtype)
        kw["causal"] = True
        offset, right = 4 - 9, 0
    elif feature == "sink":
        kw["sink"] = ref_kw["learnable_sink"] = torch.randn(hq).requires_grad_()
        kw["causal"] = True
        right = 0
    elif feature == "long":
        kw["causal"] = True
        right = 0
    ours = _dense(backend, q, k, v, dout, **kw)
    ref, base = reference_results(q, k, v, dout, d ** -0.5, offset, left, right, **ref_kw)
    _assert_ok(ours, ref, base, dtype)
    if feature == "rows_see_nothing":
        assert (ours["out"][:, :5] == 0).all() and torch.isinf(ours["lse"][:, :, :5]).all()
        assert (ours["dq"][:, :5] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d, dv", [(40, 24), (16, 48)])
def test_varlen(backend, d, dv):
    torch.manual_seed(3)
    lengths_q, lengths_k = [3, 0, 5, 1], [4, 2, 5, 0]
    cu_q = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11, 11], dtype=torch.int32)
    q = torch.randn(sum(lengths_q), 4, d, requires_grad=True)
    k = torch.randn(sum(lengths_k), 2, d, requires_grad=True)
    v = torch.randn(sum(lengths_k), 2, dv, requires_grad=True)
    dout = torch.randn(sum(lengths_q), 4, dv)
    with fl.use_backend(backend):
        out, lse, _ = fl.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, causal=True, return_attn_probs=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    assert out.shape == (9, 4, dv)
    ours = dict(out=out.detach(), lse=lse, dq=grads[0], dk=grads[1], dv=grads[2])
    ref, base = reference_results_varlen(q, k, v, dout, cu_q, cu_k, d ** -0.5, causal=True)
    _assert_ok(ours, ref, base, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sq", [1, 3])
def test_varlen_decode_rows(backend, sq):
    """Every sequence the same few query rows (the C++ backend's decode route)."""
    torch.manual_seed(sq)
    batch, d, dv = 3, 64, 32
    cu_q = torch.arange(0, batch * sq + 1, sq, dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    q = torch.randn(batch * sq, 8, d)
    k, v = torch.randn(20, 2, d), torch.randn(20, 2, dv)
    with torch.no_grad(), fl.use_backend(backend):
        out, lse, _ = fl.flash_attn_varlen_func(q, k, v, cu_q, cu_k, sq, 8, causal=True, return_attn_probs=True)
    ref, base = reference_results_varlen(q, k, v, None, cu_q, cu_k, d ** -0.5, causal=True)
    _assert_ok(dict(out=out, lse=lse), ref, base, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sq", [1, 2])
def test_short_queries_dense(backend, sq):
    """flash_attn_func with one query row, or a few of a GQA group (the C++ decode route)."""
    torch.manual_seed(sq)
    q, k, v = _qkv(2, sq, 40, 8, 2, 96, 64, torch.bfloat16)
    with torch.no_grad(), fl.use_backend(backend):
        out, lse, _ = fl.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    ref, base = reference_results(q, k, v, None, 96 ** -0.5, 40 - sq, -1, 0)
    _assert_ok(dict(out=out, lse=lse), ref, base, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout(backend):
    torch.manual_seed(5)
    q, k, v = _qkv(1, 6, 8, 2, 2, 24, 8, torch.float32)
    dout = torch.randn(1, 6, 2, 8)
    with record_dropout() as calls:
        ours = _dense(backend, q, k, v, dout, dropout_p=0.3, causal=True)
    ref, base = reference_results(q, k, v, dout, 24 ** -0.5, 2, -1, 0, dropout_keep=calls[0].keep(), dropout_p=0.3)
    _assert_ok(ours, ref, base, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["bool", "float_grad"])
def test_sdpa_attn_mask(backend, mask):
    """torch's SDPA allows Ev != E; so does ours, in torch's layout, with an attention mask."""
    torch.manual_seed(7)
    query = torch.randn(2, 4, 6, 40, requires_grad=True)
    key = torch.randn(2, 2, 9, 40, requires_grad=True)
    value = torch.randn(2, 2, 9, 24, requires_grad=True)
    if mask == "bool":
        attn_mask = torch.rand(2, 1, 6, 9) > 0.4
        attn_mask[:, :, :, 0] = True
    else:
        attn_mask = torch.randn(1, 4, 6, 9, requires_grad=True)
    with fl.use_backend(backend):
        out = fl.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, enable_gqa=True)
    expect = torch.nn.functional.scaled_dot_product_attention(
        *(t.double() for t in (query, key, value)), attn_mask=attn_mask if mask == "bool" else attn_mask.double(),
        enable_gqa=True)
    assert out.shape == (2, 4, 6, 24) and out.is_contiguous()  # the caller's (B, H, S, Dv) layout
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)
    leaves = (query, key, value) + ((attn_mask,) if mask == "float_grad" else ())
    dout = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, dout)
    theirs = torch.autograd.grad(expect, leaves, dout.double())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    torch.manual_seed(11)
    q, k, v = _qkv(1, 4, 5, 2, 1, 6, 3, torch.float64)
    with fl.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b, c: fl.flash_attn_func(a, b, c, causal=True, softcap=3.0),
                                        (q, k, v))


# ------------------------------------------------------------------ KV-cache decoding


def _decode_case(batch, sq, hq, hk, d, dv, dtype, seqlens, page_size=None, capacity=24, snew=0):
    case = {"q": torch.randn(batch, sq, hq, d, dtype=dtype)}
    if page_size is None:
        case["k_cache"] = torch.randn(batch, capacity, hk, d, dtype=dtype)
        case["v_cache"] = torch.randn(batch, capacity, hk, dv, dtype=dtype)
    else:
        max_blocks = -(-capacity // page_size)
        blocks = batch * max_blocks + 3
        case["k_cache"] = torch.randn(blocks, page_size, hk, d, dtype=dtype)
        case["v_cache"] = torch.randn(blocks, page_size, hk, dv, dtype=dtype)
        case["block_table"] = torch.randperm(blocks)[:batch * max_blocks].reshape(batch, max_blocks).int()
    case["cache_seqlens"] = torch.tensor(seqlens, dtype=torch.int32)
    if snew:
        case["k"] = torch.randn(batch, snew, hk, d, dtype=dtype)
        case["v"] = torch.randn(batch, snew, hk, dv, dtype=dtype)
    return case


def _run_decode(backend, case, causal=True, num_splits=0, **kw):
    q = case["q"]
    args = dict(case)
    args["k_cache"], args["v_cache"] = case["k_cache"].clone(), case["v_cache"].clone()
    with fl.use_backend(backend):
        out, lse = fl.flash_attn_with_kvcache(**args, causal=causal, num_splits=num_splits, return_softmax_lse=True,
                                              **kw)
    dv = case["v_cache"].shape[-1]
    assert out.shape == q.shape[:-1] + (dv,) and out.dtype == q.dtype
    snew = case["k"].shape[1] if "k" in case else 0
    ends = [n + snew for n in case["cache_seqlens"].tolist()]
    ref, base = oracle(q, q.double(), args["k_cache"], args["v_cache"], ends, [0] * q.shape[0], q.shape[-1] ** -0.5,
                       causal, (-1, -1), 0.0, None, case.get("block_table"), None)
    _assert_ok(dict(out=out, lse=lse), ref, base, q.dtype)
    if snew:  # the new values went into v_cache at cache_seqlens
        for b, n in enumerate(case["cache_seqlens"].tolist()):
            if "block_table" not in case:
                assert torch.equal(args["v_cache"][b, n:n + snew], case["v"][b])
    return out, lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 5])
@pytest.mark.parametrize("d, dv, dtype", [(64, 32, torch.float16), (32, 64, torch.bfloat16),
                                          (192, 128, torch.float32), (16, 1, torch.float64)])
def test_kvcache(backend, page_size, d, dv, dtype):
    torch.manual_seed(d + dv)
    case = _decode_case(2, 2, 8, 2, d, dv, dtype, (6, 13), page_size, snew=2)
    _run_decode(backend, case)
    _run_decode(backend, case, num_splits=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kvcache_absorbed_mla_576_512(backend, page_size, dtype):
    """Absorbed-MLA decoding (DeepSeek): one shared kv head, D = 576 (512 latent + 64 rope), Dv = 512."""
    torch.manual_seed(576)
    case = _decode_case(2, 1, 16, 1, 576, 512, dtype, (40, 0), page_size, capacity=48)
    out, lse = _run_decode(backend, case, num_splits=2)
    assert (out[1] == 0).all() and torch.isinf(lse[1]).all()  # an empty cache row sees nothing


def test_kvcache_sink_and_opcheck():
    torch.manual_seed(1)
    case = _decode_case(2, 1, 4, 2, 24, 8, torch.float32, (5, 9), page_size=4)
    sink = torch.randn(4)
    for backend in BACKENDS:
        with fl.use_backend(backend):
            out = fl.flash_attn_with_kvcache(**case, causal=True, learnable_sink=sink)
        assert out.shape == (2, 1, 4, 8)
    torch.library.opcheck(torch.ops.flashattn_lite.decode.default,
                          (case["q"], case["k_cache"], case["v_cache"], case["block_table"],
                           case["cache_seqlens"], None, 9, 0.25, -1, 0, 0.0, None, 2, "cpu"))


# ------------------------------------------------------------------ operators, layouts, errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", ["bshd", "bhsd"])
def test_opcheck_fwd_bwd(backend, memory):
    q, k, v = _qkv(2, 7, 9, 4, 2, 24, 16, torch.float32, memory)
    params = (None, None, 0, 0, None, 0.25, 2, -1, 0, 0.0, None, 0.0, 0, backend)
    torch.library.opcheck(torch.ops.flashattn_lite.fwd.default, (q, k, v, *params))
    out, lse = torch.ops.flashattn_lite.fwd(q, k, v, *params)
    assert out.shape == (2, 7, 4, 16)
    # the output is in q's memory order: (B, H, S, Dv) memory for a (B, H, S, D) caller
    assert out.stride() == torch.empty(2, 4, 7, 16).transpose(1, 2).stride() if memory == "bhsd" \
        else out.is_contiguous()
    args = (torch.randn_like(out), None, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), *params[:-1],
            False, True, backend)
    torch.library.opcheck(torch.ops.flashattn_lite.bwd.default, args)


def test_default_scale_is_query_dim():
    q, k, v = _qkv(1, 5, 5, 2, 2, 36, 12, torch.float64)
    with fl.use_backend("cpu"):
        a = fl.flash_attn_func(q, k, v)
        b = fl.flash_attn_func(q, k, v, softmax_scale=36 ** -0.5)
    assert torch.equal(a, b)


def test_backends_that_do_not_take_mla_decline():
    call = backends.Call(device=torch.device("cpu"), dtype=torch.float16, head_dim=192, head_dim_v=128)
    assert "value head dim" in backends.supports("cuda_emu", call)
    assert backends.supports("reference", call) is None
    big = backends.Call(device=torch.device("cpu"), dtype=torch.float16, head_dim=512)
    assert "256" in backends.supports("cuda_emu", big)


@pytest.mark.parametrize("bad, match", [
    ("q_k_dims", "head dim differs"),
    ("v_seqlen", "same shape"),
    ("too_big", "1..512"),
    ("v_too_big", "value head dim"),
])
def test_bad_shapes(bad, match):
    q, k, v = (torch.randn(1, 4, 2, 16) for _ in range(3))
    if bad == "q_k_dims":
        k = torch.randn(1, 4, 2, 8)
    elif bad == "v_seqlen":
        v = torch.randn(1, 5, 2, 8)
    elif bad == "too_big":
        q, k = torch.randn(1, 4, 2, 513), torch.randn(1, 4, 2, 513)
    elif bad == "v_too_big":
        v = torch.randn(1, 4, 2, 513)
    with pytest.raises(ValueError, match=match):
        fl.flash_attn_func(q, k, v)


def test_bad_decode_shapes():
    case = _decode_case(1, 1, 2, 2, 16, 8, torch.float32, (3,), snew=1)
    bad = dict(case, v=torch.randn(1, 1, 2, 16))  # new v with k's head dim, not v_cache's
    with pytest.raises(ValueError, match="v must have shape"):
        fl.flash_attn_with_kvcache(**bad)
    bad = dict(case, v_cache=torch.randn(1, 20, 2, 8))  # v_cache shorter than k_cache
    with pytest.raises(ValueError, match="same shape except the head dim"):
        fl.flash_attn_with_kvcache(**bad)
    bad = dict(case, q=torch.randn(1, 1, 2, 577), k_cache=torch.randn(1, 24, 2, 577), k=torch.randn(1, 1, 2, 577))
    with pytest.raises(ValueError, match="1..576"):
        fl.flash_attn_with_kvcache(**bad)


@pytest.mark.parametrize("name", ["dout", "out"])
def test_operator_bwd_checks_dv(name):
    q, k, v = _qkv(1, 4, 4, 2, 2, 16, 8, torch.float32)
    params = (None, None, 0, 0, None, 0.25, 0, -1, -1, 0.0, None, 0.0, 0)
    out, lse = torch.ops.flashattn_lite.fwd(q, k, v, *params, "cpu")
    args = dict(dout=torch.randn_like(out), out=out.detach())
    args[name] = torch.randn(1, 4, 2, 16)  # q's head dim instead of v's
    with pytest.raises(ValueError, match="v's head dim"):
        torch.ops.flashattn_lite.bwd(args["dout"], None, q.detach(), k.detach(), v.detach(), args["out"], lse.detach(),
                                     *params, False, True, "cpu")
