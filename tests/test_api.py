"""Public API: backend selection, argument handling and bad input."""

import pytest
import torch
import torch.nn.functional as F

import flashattn_lite as fl
from flashattn_lite import backends

from helpers import make_qkv


def _qkv(**kw):
    return make_qkv(1, 8, 8, 2, 2, 16, torch.float32, requires_grad=False, **kw)


def test_available_backends_lists_every_backend():
    states = fl.available_backends()
    assert set(states) == {"triton", "cuda", "cuda_emu", "cpu", "reference"}
    assert states["reference"][0] is True
    for usable, why in states.values():
        assert isinstance(usable, bool) and why


def test_auto_uses_reference_for_other_devices():
    call = backends.Call(device=torch.device("meta"), dtype=torch.float32, head_dim=16)
    assert backends.select(call) == "reference"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown flashattn_lite backend 'nope'"):
        with fl.use_backend("nope"):
            pass


def test_env_var_backend(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv("FLASHATTN_LITE_BACKEND", "nope")
    with pytest.raises(ValueError, match="FLASHATTN_LITE_BACKEND='nope'"):
        fl.flash_attn_func(q, k, v)
    monkeypatch.setenv("FLASHATTN_LITE_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run this call"):
        fl.flash_attn_func(q, k, v)
    with fl.use_backend("reference"):  # the context manager wins over the environment
        fl.flash_attn_func(q, k, v)


def test_forced_backend_never_falls_back(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with fl.use_backend("triton"), pytest.raises(RuntimeError, match="backend 'triton' cannot run this call"):
        fl.flash_attn_func(q, k, v)
    with fl.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run this call"):
        fl.flash_attn_func(q, k, v)


def test_triton_declines_float64():
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8, torch.float64, requires_grad=False)
    with fl.use_backend("triton"), pytest.raises(RuntimeError, match="float64 is not supported by triton"):
        fl.flash_attn_func(q, k, v)


def test_return_attn_probs():
    q, k, v = _qkv()
    with fl.use_backend("reference"):
        out, lse, probs = fl.flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (1, 2, 8) and lse.dtype == torch.float32 and probs is None


def test_sdpa_unbatched_and_default_scale():
    q, k, v = (torch.randn(2, 6, 8, dtype=torch.float64) for _ in range(3))
    with fl.use_backend("reference"):
        out = fl.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected)


def test_last_dim_not_contiguous_is_copied():
    base = torch.randn(1, 8, 2, 16, 2)
    q = base[..., 0]  # last-dim stride 2
    assert q.stride(-1) == 2
    with fl.use_backend("reference"):
        out = fl.flash_attn_func(q, q, q)
        expected = fl.flash_attn_func(q.contiguous(), q.contiguous(), q.contiguous())
    torch.testing.assert_close(out, expected)


BAD = [
    ("3 dims", lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dims"),
    ("batch", lambda q, k, v: (q, k[:, :, :, :].expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)), ValueError,
     "batch size differs"),
    ("head dim", lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, "head dim differs"),
    ("kv shapes", lambda q, k, v: (q, k, v[:, :4]), ValueError, "must have the same shape"),
    ("heads", lambda q, k, v: (torch.randn(1, 8, 3, 16), k, v), ValueError, "multiple of the number of key/value"),
    ("dtype mix", lambda q, k, v: (q.half(), k, v), TypeError, "share one dtype"),
    ("int dtype", lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "has dtype torch.int32"),
    ("big head dim", lambda q, k, v: (torch.randn(1, 8, 2, 513),) * 3, ValueError, r"head dim must be in 1..512"),
    ("big value head dim", lambda q, k, v: (q, k, torch.randn(1, 8, 2, 513)), ValueError,
     r"value head dim must be in 1..512"),
    ("not tensor", lambda q, k, v: ([1.0], k, v), TypeError, "q must be a torch.Tensor"),
    ("device mix", lambda q, k, v: (q, k.to("meta"), v), ValueError, "one device"),
]


@pytest.mark.parametrize("case,make,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, make, exc, match):
    q, k, v = make(*_qkv())
    with pytest.raises(exc, match=match):
        fl.flash_attn_func(q, k, v)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(window_size=5), ValueError, "window_size"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (dict(softmax_scale=torch.tensor(0.5)), TypeError, "softmax_scale"),
    (dict(softcap=-1.0), ValueError, "softcap must be >= 0"),
    (dict(softcap=torch.tensor(1.0)), TypeError, "softcap must be a Python number"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(2,\) or \(1, 2\)"),
    (dict(alibi_slopes=torch.ones(2, 2)), ValueError, "alibi_slopes must have shape"),
    (dict(alibi_slopes=[0.5, 0.25]), TypeError, "alibi_slopes must be a torch.Tensor"),
    (dict(alibi_slopes=torch.ones(2, dtype=torch.int32)), TypeError, "alibi_slopes must be a float tensor"),
    (dict(alibi_slopes=torch.ones(2, device="meta")), ValueError, "alibi_slopes is on meta"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fl.flash_attn_func(*_qkv(), **kwargs)


def test_sdpa_bad_input():
    q, k, v = (t.transpose(1, 2) for t in _qkv())
    with pytest.raises(ValueError, match="enable_gqa=True"):
        fl.scaled_dot_product_attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="query must have 4 dims"):
        fl.scaled_dot_product_attention(q[0, 0], k, v)


def test_validation_happens_before_any_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(backends.reference, "fwd", lambda *a: calls.append(a))
    with fl.use_backend("reference"), pytest.raises(ValueError):
        fl.flash_attn_func(*make_qkv(1, 8, 8, 3, 2, 16, torch.float32, requires_grad=False))
    assert calls == []


# ---------------------------------------------------------------- varlen, masks, dropout: bad input

def _varlen(lengths=(3, 5), heads=2, d=8):
    total = sum(lengths)
    q = torch.randn(total, heads, d)
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return q, cu


@pytest.mark.parametrize("change,exc,match", [
    (lambda cu: cu.long(), TypeError, "cu_seqlens_q must be int32"),
    (lambda cu: torch.tensor([0, 5, 3, 8], dtype=torch.int32), ValueError, "non-decreasing"),
    (lambda cu: torch.tensor([1, 3, 8], dtype=torch.int32), ValueError, r"cu_seqlens_q\[0\] must be 0"),
    (lambda cu: torch.tensor([0, 3, 7], dtype=torch.int32), ValueError, "must equal the number of packed tokens"),
    (lambda cu: torch.tensor([0, 8], dtype=torch.int32), ValueError, "same length"),
    (lambda cu: cu[None], ValueError, "1-D"),
    (lambda cu: [0, 3, 8], TypeError, "must be a torch.Tensor"),
])
def test_varlen_bad_cu_seqlens(change, exc, match):
    q, cu = _varlen()
    with pytest.raises(exc, match=match):
        fl.flash_attn_varlen_func(q, q, q, change(cu), cu, 5, 5)


def test_varlen_bad_arguments():
    q, cu = _varlen()
    with pytest.raises(ValueError, match="max_seqlen_q = 4 is smaller than the longest sequence"):
        fl.flash_attn_varlen_func(q, q, q, cu, cu, 4, 5)
    with pytest.raises(ValueError, match="max_seqlen_k = 2 is smaller"):
        fl.flash_attn_varlen_func(q, q, q, cu, cu, 5, 2)
    with pytest.raises(ValueError, match="must have 3 dims"):
        fl.flash_attn_varlen_func(q[None], q, q, cu, cu, 5, 5)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(2,\) or \(2, 2\)"):
        fl.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, alibi_slopes=torch.rand(3, 2))
    with pytest.raises(NotImplementedError, match="block_table"):
        fl.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, block_table=torch.zeros(2, 1, dtype=torch.int32))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_p_out_of_range(p):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        fl.flash_attn_func(q, k, v, dropout_p=p)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        fl.scaled_dot_product_attention(q, k, v, dropout_p=p)


@pytest.mark.parametrize("mask,exc,match", [
    (torch.zeros(8, 7), ValueError, "does not broadcast"),
    (torch.zeros(3, 2, 8, 8), ValueError, "does not broadcast"),
    (torch.zeros(1, 1, 1, 8, 8), ValueError, "does not broadcast"),
    (torch.zeros(8, 8, dtype=torch.int64), TypeError, "bool or floating point"),
    ("mask", TypeError, "must be a torch.Tensor"),
])
def test_sdpa_bad_mask(mask, exc, match):
    q, k, v = (t.transpose(1, 2) for t in _qkv())
    with pytest.raises(exc, match=match):
        fl.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_sdpa_mask_and_causal_together():
    q, k, v = (t.transpose(1, 2) for t in _qkv())
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        fl.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(8, 8), is_causal=True)


def test_features_route_auto_and_forced_backends(monkeypatch):
    """A backend whose capability check lacks a feature is skipped by auto and raises when forced."""
    q, k, v = _qkv()
    monkeypatch.setattr(backends.cpu, "FEATURES", tuple(f for f in backends.cpu.FEATURES if f != "dropout"))
    with fl.use_backend("cpu"), pytest.raises(RuntimeError, match="does not implement dropout"):
        fl.flash_attn_func(q, k, v, dropout_p=0.1)
    with pytest.warns(RuntimeWarning, match="cannot serve this call"):
        fl.flash_attn_func(q, k, v, dropout_p=0.1)


def test_autocast_casts_as_torch_sdpa_does():
    # inside torch.autocast torch's SDPA casts q, k, v and a float mask to the autocast dtype
    # (also when they differ: rotary embeddings often leave q and k in float32); ours did not
    # and refused the mixed call
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 12, 16, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.randn(12, 12, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for args in ((q, k, v), (q.bfloat16(), k, v)):
            ours = fl.scaled_dot_product_attention(*args, attn_mask=mask)
            theirs = F.scaled_dot_product_attention(*args, attn_mask=mask)
            assert ours.dtype == theirs.dtype == torch.bfloat16
        out = fl.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=True)
        packed = fl.flash_attn_varlen_func(*(t.detach()[0].transpose(0, 1) for t in (q, k, v)),
                                           torch.tensor([0, 12], dtype=torch.int32),
                                           torch.tensor([0, 12], dtype=torch.int32), 12, 12, causal=True)
        f64 = fl.scaled_dot_product_attention(q.double(), k.double(), v.double())  # float64 is left alone
    assert out.dtype == packed.dtype == torch.bfloat16 and f64.dtype == torch.float64
    # the same numbers as the call made in bf16 outside autocast
    bf = [t.detach().bfloat16() for t in (q, k, v)]
    assert torch.equal(ours, fl.scaled_dot_product_attention(*bf, attn_mask=mask.bfloat16()))
    assert torch.equal(out, fl.flash_attn_func(*(t.transpose(1, 2) for t in bf), causal=True))
    assert torch.equal(packed, fl.flash_attn_varlen_func(*(t[0].transpose(0, 1) for t in bf),
                                                         torch.tensor([0, 12], dtype=torch.int32),
                                                         torch.tensor([0, 12], dtype=torch.int32), 12, 12,
                                                         causal=True))
    # gradients reach the float32 leaves in float32
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(gr.dtype == torch.float32 and torch.isfinite(gr).all() for gr in grads)
