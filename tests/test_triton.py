"""Triton kernels (run in Triton's CPU interpreter) against the float64 reference.

Interpreter tiles are 16 x 16, so these small shapes still span several key and
query blocks, partial tail blocks, and both masked and unmasked inner loops.
"""

import pytest
import torch

import flashattn_lite as fl
from flashattn_lite.backends import triton as triton_backend

from helpers import assert_matches_reference, check_case, make_qkv, run_flash

pytestmark = pytest.mark.triton

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SEQLENS = [(32, 32), (33, 47), (48, 17), (1, 37), (37, 1), (16, 64)]


def _check(*args, **kwargs):
    return check_case("triton", *args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", SEQLENS)
def test_seqlens(sq, sk, causal, dtype):
    _check(1, sq, sk, 2, 1, 40, dtype, causal=causal)


@pytest.mark.parametrize("d", [1, 8, 40, 72, 96, 160, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(d, causal):
    _check(1, 20, 24, 1, 1, d, torch.float16, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hk", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_gqa(hq, hk, dtype):
    _check(2, 24, 40, hq, hk, 32, dtype, causal=True)


@pytest.mark.parametrize("memory", ["bhsd", "padded"])
@pytest.mark.parametrize("causal", [False, True])
def test_strided_layouts(memory, causal):
    _check(2, 21, 35, 2, 1, 24, torch.float32, causal=causal, memory=memory)


@pytest.mark.parametrize("window", [(8, 0), (5, 3), (-1, 4), (20, -1), (0, 0)])
@pytest.mark.parametrize("sq,sk", [(40, 40), (24, 50), (50, 24)])
def test_window(window, sq, sk):
    _check(1, sq, sk, 2, 1, 16, torch.float32, window=window)


def test_softmax_scale():
    _check(1, 20, 30, 2, 2, 32, torch.float32, causal=True, scale=0.3)


@pytest.mark.parametrize("sq,sk", [(0, 16), (16, 0), (0, 0)])
def test_empty_sequences(sq, sk):
    q, k, v = make_qkv(2, sq, sk, 2, 1, 16, torch.float16)
    dout = torch.randn(2, sq, 2, 16, dtype=torch.float16)
    ours = run_flash("triton", q, k, v, dout, causal=True)
    assert ours["out"].shape == (2, sq, 2, 16) and ours["lse"].shape == (2, 2, sq)
    assert (ours["out"] == 0).all() and (ours["lse"] == float("-inf")).all()
    for key in ("dq", "dk", "dv"):
        assert (ours[key] == 0).all()


def test_fully_masked_rows_give_zero_and_no_nan():
    # bottom-right causal with Sq > Sk: the first Sq - Sk queries see no key
    q, k, v = make_qkv(1, 40, 8, 2, 2, 16, torch.float16)
    dout = torch.randn(1, 40, 2, 16, dtype=torch.float16)
    ours = run_flash("triton", q, k, v, dout, causal=True)
    assert (ours["out"][:, :32] == 0).all()
    assert (ours["lse"][:, :, :32] == float("-inf")).all()
    assert (ours["dq"][:, :32] == 0).all()
    assert_matches_reference(ours, q, k, v, dout, causal=True)


def test_every_element_written(monkeypatch):
    """Outputs and gradients are pre-filled with NaN; every element must be overwritten."""
    real = torch.empty_like

    def nan_empty_like(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(triton_backend.torch, "empty_like", nan_empty_like)
    real_empty = torch.empty
    monkeypatch.setattr(triton_backend.torch, "empty",
                        lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    q, k, v = make_qkv(2, 33, 47, 4, 2, 40, torch.float32)
    dout = torch.randn(2, 33, 4, 40)
    ours = run_flash("triton", q, k, v, dout, causal=False)
    for key, t in ours.items():
        assert not torch.isnan(t).any(), f"{key} has untouched elements"
    assert_matches_reference(ours, q, k, v, dout)


def test_repeated_fwd_bwd_is_bitwise_equal():
    q, k, v = make_qkv(1, 35, 50, 4, 2, 32, torch.bfloat16)
    dout = torch.randn(1, 35, 4, 32, dtype=torch.bfloat16)
    first = run_flash("triton", q, k, v, dout, causal=True)
    second = run_flash("triton", q, k, v, dout, causal=True)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_gradient_through_lse():
    """A loss that uses softmax_lse gets its gradient (d lse / d s = P)."""
    q, k, v = make_qkv(1, 20, 33, 2, 1, 16, torch.float32)
    grads = {}
    for backend in ("triton", "reference"):
        with fl.use_backend(backend):
            out, lse, _ = fl.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
            loss = (out * out).sum() + (lse.masked_fill(torch.isinf(lse), 0) ** 2).sum()
            grads[backend] = torch.autograd.grad(loss, (q, k, v))
    for ours, ref in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(24, 24), (20, 36), (36, 20)])
def test_sdpa_api_matches_torch(causal, sq, sk):
    """The torch-layout API: top-left causal, compared with torch's own SDPA in float64."""
    query = torch.randn(2, 4, sq, 32, requires_grad=True)
    key = torch.randn(2, 2, sk, 32, requires_grad=True)
    value = torch.randn(2, 2, sk, 32, requires_grad=True)
    with fl.use_backend("triton"):
        out = fl.scaled_dot_product_attention(query, key, value, is_causal=causal, enable_gqa=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (query, key, value), dout)
    leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
    expected = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=True)
    expected_grads = torch.autograd.grad(expected, leaves, dout.double())
    assert out.shape == expected.shape and out.stride() == torch.empty_like(query).stride()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)


def test_invisible_blocks_are_never_read():
    """Key blocks no query of a block can see are skipped, not computed and discarded.

    NaN is planted in K/V where only skipped blocks would read it: with 16 x 16
    tiles and causal Sq = Sk = 64, query block 0 must never touch keys 16..63, and
    in the backward the dK/dV program of key block 3 must never touch queries 0..47.
    """
    q, k, v = make_qkv(1, 64, 64, 1, 1, 16, torch.float32, requires_grad=False)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, 16:] = float("nan")
    v_bad[:, 16:] = float("nan")
    with fl.use_backend("triton"):
        out = fl.flash_attn_func(q, k_bad, v_bad, causal=True)
    assert torch.isfinite(out[:, :16]).all()
    assert torch.isnan(out[:, 16:]).all()  # the planted NaN is visible where it should be

    q_bad = q.clone().requires_grad_()
    with torch.no_grad():
        q_bad[:, :48] = float("nan")
    k, v = k.requires_grad_(), v.requires_grad_()
    dout = torch.randn(1, 64, 1, 16)
    with fl.use_backend("triton"):
        out = fl.flash_attn_func(q_bad, k, v, causal=True)
        _, dk, dv = torch.autograd.grad(out, (q_bad, k, v), dout)
    assert torch.isfinite(dk[:, 48:]).all() and torch.isfinite(dv[:, 48:]).all()
    assert torch.isnan(dk[:, :48]).any()


def test_window_skips_blocks_left_of_the_band():
    q, k, v = make_qkv(1, 64, 64, 1, 1, 16, torch.float32, requires_grad=False)
    k[:, :16] = float("nan")
    v[:, :16] = float("nan")
    with fl.use_backend("triton"):
        out = fl.flash_attn_func(q, k, v, window_size=(8, 0))
    # queries 48..63 see keys 40..63 only: key block 0 is never read
    assert torch.isfinite(out[:, 48:]).all()


@pytest.mark.parametrize("bm,bn", [(32, 16), (16, 32)])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (5, 3)), (False, (-1, -1))])
def test_asymmetric_blocks(bm, bn, causal, window):
    """The GPU tables use BLOCK_M != BLOCK_N; the interpreter default is 16 x 16."""
    from flashattn_lite.triton_kernels import configs

    cfg = configs.KernelConfig(bm, bn, 4, 1)
    with configs.override("fwd", cfg), configs.override("bwd_dkdv", cfg), configs.override("bwd_dq", cfg):
        _check(1, 45, 70, 2, 1, 16, torch.float32, causal=causal, window=window)
        _check(1, 70, 45, 2, 1, 16, torch.float32, causal=causal, window=window)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_huge_window_is_unbounded(backend):
    q, k, v = make_qkv(1, 20, 10, 2, 1, 16, torch.float32)
    dout = torch.randn(1, 20, 2, 16)
    for window in [(-1, 2**31 - 1), (2**31 - 1, -1), (2**62, 2**62)]:
        ours = run_flash(backend, q, k, v, dout, causal=window[1] == -1, window_size=window)
        assert_matches_reference(ours, q, k, v, dout, causal=window[1] == -1, window_size=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap,alibi", [(5.0, None), (0.0, "heads"), (2.0, "batch-heads")])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (6, 3))])
def test_softcap_and_alibi(dtype, softcap, alibi, causal, window):
    _check(2, 37, 45, 4, 2, 32, dtype, causal=causal, window=window, softcap=softcap, alibi=alibi)


def test_interpreter_rounds_float32_to_bf16_to_nearest_even():
    """The interpreter truncated float32 -> bf16 casts (the GPU rounds to nearest even); the
    package's interpreter patch rounds them as torch does, ties, NaN and overflow included."""
    import numpy as np
    from triton.runtime import interpreter

    triton_backend.patch_interpreter_bf16_dot()
    bits = torch.randint(0, 2 ** 31, (4096,), dtype=torch.int64)
    bits[:8] = torch.tensor([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x7F800000, 0x7FC00001, 0x00008000, 0x00018000,
                             0x80000000])  # ties both ways, max, inf, NaN, subnormal ties, -0
    bits[8:16] |= 0x8000  # more ties
    x = (bits - (bits >= 2 ** 31).long() * 2 ** 32).to(torch.int32).view(torch.float32)
    x[16:2048] = -x[16:2048]
    handle = interpreter.TensorHandle(x.numpy(), interpreter.tl.float32)
    got = interpreter.InterpreterBuilder.cast_impl(None, handle, interpreter.tl.bfloat16).data
    got = torch.from_numpy(np.asarray(got).view(np.int16)).view(torch.bfloat16)
    want = x.to(torch.bfloat16)
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
    assert same.all(), (x[~same][:4], got[~same][:4], want[~same][:4])
