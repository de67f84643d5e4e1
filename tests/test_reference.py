"""The oracle itself: the reference math against torch's own SDPA in float64,
and the reference backend (explicit backward) against autograd of the oracle."""

import math

import pytest
import torch

import flashattn_lite as fl
from flashattn_lite.backends.reference import attention_math, visibility_mask

from helpers import assert_matches_reference, make_qkv, run_flash


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (3, 2), (0, -1)])
@pytest.mark.parametrize("sq,sk", [(7, 7), (5, 11), (11, 5), (1, 9)])
@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2)])
def test_oracle_matches_torch_sdpa(causal, window, sq, sk, hq, hk):
    """Bottom-right causal/window masks expressed as a boolean attn_mask for torch."""
    q, k, v = make_qkv(2, sq, sk, hq, hk, 12, torch.float64)
    left, right = window
    if causal:
        right = 0
    out, lse = attention_math(q, k, v, 0.37, sk - sq, left, right)
    mask = visibility_mask(sq, sk, sk - sq, left, right, "cpu")
    kr, vr = (t.repeat_interleave(hq // hk, dim=2) for t in (k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), attn_mask=mask, scale=0.37).transpose(1, 2)
    rows = mask.any(-1)  # torch gives NaN for rows that see nothing; ours gives 0
    torch.testing.assert_close(out[:, rows], expected[:, rows], rtol=1e-12, atol=1e-12)
    assert (out[:, ~rows] == 0).all()
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kr) * 0.37
    expected_lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.double(), expected_lse.float().double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_backend(dtype, causal):
    q, k, v = make_qkv(2, 13, 21, 4, 2, 24, dtype)
    dout = torch.randn(2, 13, 4, 24, dtype=dtype)
    ours = run_flash("reference", q, k, v, dout, causal=causal)
    assert_matches_reference(ours, q, k, v, dout, causal=causal)


def test_reference_gradcheck():
    q, k, v = make_qkv(1, 5, 7, 2, 1, 4, torch.float64)
    with fl.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda a, b, c: fl.flash_attn_func(a, b, c, causal=True), (q, k, v))


def test_score_transform_matches_the_definitions():
    """softcap * tanh(s / softcap), then -slope * |i + Sk - Sq - j| (flash-attn's order), written out by hand."""
    from flashattn_lite.backends.reference import score_transform

    scores = torch.randn(1, 2, 3, 5, dtype=torch.float64) * 10
    slopes = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    got = score_transform(scores, 4.0, slopes, 5 - 3)
    for h in range(2):
        for i in range(3):
            for j in range(5):
                expected = 4.0 * math.tanh(scores[0, h, i, j].item() / 4.0) - slopes[0, h].item() * abs(i + 2 - j)
                assert abs(got[0, h, i, j].item() - expected) < 1e-12


def test_tolerance_never_accepts_nan_even_with_an_overflowing_baseline():
    from flashattn_lite.testing import check_against_reference, reference_results

    q = (torch.randn(1, 8, 1, 16) * 200).half()
    k = (torch.randn(1, 8, 1, 16) * 200).half()
    v = torch.randn(1, 8, 1, 16).half()
    ref, base = reference_results(q, k, v, None, 16 ** -0.5)
    nan = {"out": torch.full_like(ref["out"], float("nan")).half(), "lse": torch.full_like(ref["lse"], float("nan"))}
    assert not any(c.ok for c in check_against_reference(nan, ref, base, torch.float16))


def test_float64_gradient_bound_counts_the_lse_rounding():
    """float64 gradients: the backward recomputes P from the forward's lse, whose rounding
    (eps64 * |lse|) the naive float32 baseline does not have; the bound adds
    GRAD_FACTOR * eps64 * |lse| * scale for gradients only, never for out/lse or float32."""
    from flashattn_lite.testing import GRAD_FACTOR, check_against_reference, compare

    eps64 = torch.finfo(torch.float64).eps
    ref = torch.zeros(4, dtype=torch.float64)
    base = torch.zeros(4, dtype=torch.float32)
    off = ref + 40 * eps64  # 40 ulps of a unit-scale gradient
    assert not compare("dq", off, ref, base, torch.float64, GRAD_FACTOR, 1.0).ok
    assert compare("dq", off, ref, base, torch.float64, GRAD_FACTOR, 1.0, lse_mag=10.0).ok
    assert not compare("dq", off, ref, base, torch.float64, GRAD_FACTOR, 1.0, lse_mag=1.0).ok
    # float32 input: its own baseline decides, no lse term
    ref32, base32 = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float32)
    off32 = torch.full((4,), 40 * torch.finfo(torch.float32).eps)
    assert not compare("dq", off32, ref32, base32, torch.float32, GRAD_FACTOR, 1.0, lse_mag=10.0).ok
    # through check_against_reference: the gradients get the term from ref's lse, out does not
    ref_all = {"out": torch.zeros(3, dtype=torch.float64), "lse": torch.full((3,), 10.0, dtype=torch.float64),
               "dq": torch.ones(3, dtype=torch.float64)}
    base_all = {k: v.float() for k, v in ref_all.items()}
    ours = {"out": ref_all["out"] + 40 * eps64, "dq": ref_all["dq"] + 40 * eps64}
    checks = {c.name: c.ok for c in check_against_reference(ours, ref_all, base_all, torch.float64)}
    assert checks == {"out": False, "dq": True}
