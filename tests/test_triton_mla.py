"""Triton kernels with a value head dim Dv != the query/key head dim D (MLA) and head
dims up to 512 (576 for the query/key of KV-cache decoding), in Triton's CPU
interpreter, called through the backend module against the float64 reference.

The backend is called directly (``tb.fwd``/``tb.bwd``/``tb.decode``) so these tests do
not depend on the public functions accepting Dv != D.  Shapes are tiny: the
interpreter costs about 10 ms per tile step, and 512-wide tiles cost more.
"""

import pytest
import torch

import flashattn_lite as fl
from flashattn_lite import rng
from flashattn_lite.backends import Params, reference
from flashattn_lite.backends import triton as tb
from flashattn_lite.testing import check_against_reference, reference_results, reference_results_varlen

pytestmark = pytest.mark.triton


def _assert_ok(ours, ref, baseline, dtype):
    for key, value in ours.items():
        if value is not None:
            assert torch.isfinite(value[torch.isfinite(ref[key])]).all(), key
    bad = [str(c) for c in check_against_reference(ours, ref, baseline, dtype) if not c.ok]
    assert not bad, "; ".join(bad)


def _qkv(b, sq, sk, h, hk, d, dv, dtype):
    q = torch.randn(b, sq, h, d, dtype=dtype)
    k = torch.randn(b, sk, hk, d, dtype=dtype)
    v = torch.randn(b, sk, hk, dv, dtype=dtype)
    return q, k, v


def _run_dense(b, sq, sk, h, hk, d, dv, dtype, causal=False, window=(-1, -1), softcap=0.0, alibi=False,
               bias=False, dropout_p=0.0, grads=True):
    q, k, v = _qkv(b, sq, sk, h, hk, d, dv, dtype)
    scale = d ** -0.5
    left, right = window
    if causal:
        right = 0
    slopes = torch.rand(b, h, dtype=torch.float32) * 0.5 if alibi else None
    bias_t = torch.randn(b, h, sq, sk, dtype=torch.float32) if bias else None
    p = Params(softmax_scale=scale, diag_offset=sk - sq, window_left=left, window_right=right, softcap=softcap,
               alibi_slopes=slopes, bias=bias_t, dropout_p=dropout_p,
               dropout_seed=rng.draw_seed() if dropout_p > 0 else 0)
    out, lse = tb.fwd(q, k, v, p)
    assert out.shape == (b, sq, h, dv) and lse.shape == (b, h, sq)
    ours = {"out": out, "lse": lse}
    dout = torch.randn_like(out) if grads else None
    if grads:
        dq, dk, dv_, dbias = tb.bwd(dout, None, q, k, v, out, lse, p, bias, True)
        assert dq.shape == q.shape and dk.shape == k.shape and dv_.shape == v.shape
        ours.update(dq=dq, dk=dk, dv=dv_)
        if bias:
            ours["dbias"] = dbias
    keep = rng.dropout_keep(p.dropout_seed, dropout_p, b, h, sq, sk) if dropout_p > 0 else None
    ref_bias = bias_t.clone().requires_grad_(True) if bias else None
    ref, baseline = reference_results(q, k, v, dout, scale, sk - sq, left, right, softcap, slopes, ref_bias,
                                      keep, dropout_p)
    if bias:  # the same-dtype baseline of dbias is float32 (the bias' dtype): widen its yardstick to q's dtype
        baseline["dbias"] = baseline["dbias"].to(dtype).to(torch.float32)
    _assert_ok(ours, ref, baseline, dtype)


DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,dv", [(32, 64), (64, 16)], ids=["32x64", "64x16"])
def test_dv_differs(d, dv, dtype):
    _run_dense(1, 20, 35, 2, 1, d, dv, dtype, causal=True)


def test_deepseek_192_128():
    _run_dense(1, 17, 18, 1, 1, 192, 128, torch.bfloat16, causal=True)


def test_odd_dims_padded_both():
    # neither dim a power of two: both tiles padded and masked
    _run_dense(1, 19, 21, 2, 2, 40, 24, torch.float16)


def test_head_dim_512():
    _run_dense(1, 17, 20, 1, 1, 512, 512, torch.float16, causal=True)


@pytest.mark.parametrize("feature", ["window", "softcap_alibi", "bias_grad", "dropout", "gqa"])
def test_features_dv_differs(feature):
    kw = dict(window=dict(window=(6, 3)), softcap_alibi=dict(softcap=5.0, alibi=True, causal=True),
              bias_grad=dict(bias=True), dropout=dict(dropout_p=0.2, causal=True), gqa=dict(causal=True))[feature]
    h, hk = (4, 2) if feature == "gqa" else (2, 2)
    d, dv = (48, 32) if feature in ("window", "dropout") else (32, 48)
    _run_dense(1, 19, 26, h, hk, d, dv, torch.float16, **kw)


def test_dkdv_in_two_passes(monkeypatch):
    """Head dims of 512 compute dK and dV in separate launches; force that at small dims,
    with every score modifier, dropout and GQA (the dV pass reads neither V nor dP)."""
    from flashattn_lite.triton_kernels import configs

    monkeypatch.setattr(configs, "dkdv_passes", lambda d, dv=None: ((True, False), (False, True)))
    _run_dense(1, 19, 26, 4, 2, 32, 48, torch.float16, causal=True, softcap=5.0, alibi=True, bias=True,
               dropout_p=0.2)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_dv_differs(causal):
    dtype, h, hk, d, dv = torch.float16, 2, 1, 32, 16
    lens_q, lens_k = [5, 0, 19], [9, 3, 17]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), h, d, dtype=dtype)
    k = torch.randn(int(cu_k[-1]), hk, d, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), hk, dv, dtype=dtype)
    scale = d ** -0.5
    p = Params(softmax_scale=scale, window_right=0 if causal else -1, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
               max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    out, lse = tb.fwd(q, k, v, p)
    assert out.shape == (q.shape[0], h, dv)
    dout = torch.randn_like(out)
    dq, dk, dv_, _ = tb.bwd(dout, None, q, k, v, out, lse, p, False, True)
    ref, baseline = reference_results_varlen(q, k, v, dout, cu_q, cu_k, scale, causal=causal)
    _assert_ok({"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv_}, ref, baseline, dtype)


# ------------------------------------------------------------------ KV-cache decoding

def _run_decode(b, sq, h, hk, d, dv, dtype, seqlens, num_splits, page_size=None, softcap=0.0, window=(-1, -1)):
    """Cache of capacity max(seqlens) (paged when ``page_size``); reference: attention_math per
    batch item over its valid keys, with the decode diagonal (query i at seqlens[b] - sq + i)."""
    cap = max(seqlens)
    q = torch.randn(b, sq, h, d, dtype=dtype)
    k = torch.randn(b, cap, hk, d, dtype=dtype)
    v = torch.randn(b, cap, hk, dv, dtype=dtype)
    if page_size:
        pages = cap // page_size
        perm = torch.randperm(b * pages)
        k_cache = torch.empty(b * pages, page_size, hk, d, dtype=dtype)
        v_cache = torch.empty(b * pages, page_size, hk, dv, dtype=dtype)
        k_cache[perm] = k.reshape(b * pages, page_size, hk, d)
        v_cache[perm] = v.reshape(b * pages, page_size, hk, dv)
        table = perm.reshape(b, pages).to(torch.int32)
    else:
        k_cache, v_cache = k, v
        table = torch.arange(b, dtype=torch.int32).reshape(b, 1)
    lens = torch.tensor(seqlens, dtype=torch.int32)
    scale = d ** -0.5
    p = Params(softmax_scale=scale, window_left=window[0], window_right=window[1], softcap=softcap)
    out, lse = tb.decode(q, k_cache, v_cache, table, lens, None, p, cap, num_splits)
    assert out.shape == (b, sq, h, dv)
    for i, n in enumerate(seqlens):
        ref, baseline = reference_results(q[i:i + 1], k[i:i + 1, :n], v[i:i + 1, :n], None, scale, n - sq,
                                          window[0], window[1], softcap)
        _assert_ok({"out": out[i:i + 1], "lse": lse[i:i + 1]}, ref, baseline, dtype)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_absorbed_mla_576_512(num_splits):
    # absorbed MLA: one kv head, D = 512 latent + 64 rope dims, Dv = 512, a group of query heads
    _run_decode(2, 1, 4, 1, 576, 512, torch.bfloat16, [37, 20], num_splits, page_size=None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_dv_differs(dtype):
    _run_decode(2, 2, 4, 2, 48, 24, dtype, [40, 23], 2, page_size=8, softcap=4.0, window=(9, 0))


def test_decode_tail_padded():
    # D = 520: the 64-wide tail tile holds 8 dims
    _run_decode(1, 3, 2, 1, 520, 64, torch.float32, [29], 2, window=(-1, 0))


def test_supports_head_dims():
    from flashattn_lite.backends import Call

    def call(d, dv, features=(), dtype=torch.float16):
        c = Call(device=torch.device("cpu"), dtype=dtype, head_dim=d, features=frozenset(features))
        if dv != d:
            object.__setattr__(c, "head_dim_v", dv)
        return tb.supports(c)

    assert call(192, 128) is None and call(512, 512) is None and call(32, 64) is None
    assert call(576, 512, ["kv-cache"]) is None
    assert "576" in call(576, 512) and "head dims" in call(512, 520)
    assert call(600, 512, ["kv-cache"]) is not None
    # float32 backward stops at 256 (dK/dV tiles past the GPU's shared memory); its forward does not
    assert call(512, 512, ["backward"], torch.float32) and "float32 backward" in call(64, 320, ["backward"], torch.float32)
    assert call(512, 512, [], torch.float32) is None and call(256, 192, ["backward"], torch.float32) is None
    assert call(512, 512, ["backward"], torch.bfloat16) is None


def test_fp32_backward_above_256_is_refused_before_the_forward():
    q, k, v = (torch.randn(1, 3, 1, 320, requires_grad=True) for _ in range(3))
    with fl.use_backend("triton"), pytest.raises(RuntimeError, match="float32 backward"):
        fl.flash_attn_func(q, k, v)
    with fl.use_backend("triton"), torch.no_grad():
        fl.flash_attn_func(q, k, v)  # inference needs no backward
