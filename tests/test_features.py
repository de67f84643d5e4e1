"""Variable length, attention masks with bias gradient, and dropout, on every kernel
backend, forward and gradients, against the float64 reference (tolerance of
flashattn_lite.testing), alone and in the combinations that interact."""

import pytest
import torch

import flashattn_lite as fl
from flashattn_lite import rng
from flashattn_lite.testing import record_dropout, reference_results, reference_results_varlen
from helpers import assert_checks_ok

BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.triton)]


# ---------------------------------------------------------------- varlen

def _packed(lengths, heads, head_dim, dtype):
    t = torch.randn(sum(lengths), heads, head_dim, dtype=dtype).requires_grad_()
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return t, cu


def check_varlen(backend, lens_q, lens_k, hq, hk, d, dtype, causal=False, window=(-1, -1), softcap=0.0, alibi=False,
                 dropout_p=0.0, max_extra=0):
    q, cu_q = _packed(lens_q, hq, d, dtype)
    k, cu_k = _packed(lens_k, hk, d, dtype)
    v = torch.randn_like(k).requires_grad_()
    dout = torch.randn_like(q)
    slopes = torch.rand(len(lens_q), hq) if alibi else None
    with fl.use_backend(backend), record_dropout() as calls:
        out, lse, _ = fl.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q) + max_extra, max(lens_k) + max_extra,
                                                dropout_p=dropout_p, causal=causal, window_size=window, softcap=softcap,
                                                alibi_slopes=slopes, return_attn_probs=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert out.shape == q.shape and lse.shape == (hq, q.shape[0])
    keep = calls[0].keep() if dropout_p > 0 else None
    ref, base = reference_results_varlen(q, k, v, dout, cu_q, cu_k, d ** -0.5, causal, window, softcap, slopes,
                                         dropout_keep=keep, dropout_p=dropout_p)
    assert_checks_ok(dict(out=out.detach(), lse=lse, dq=dq, dk=dk, dv=dv), ref, base, dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref["lse"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_varlen(backend, dtype):
    check_varlen(backend, [5, 17, 1, 33], [9, 17, 30, 2], 2, 2, 32, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hq,hk", [(4, 2), (3, 1)], ids=["gqa", "mqa"])
def test_varlen_causal_gqa(backend, hq, hk):
    # Sq > Sk and Sq < Sk per sequence: bottom-right causal per sequence, rows that see nothing
    check_varlen(backend, [20, 3, 18], [7, 21, 18], hq, hk, 16, torch.float16, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_window_empty_sequences(backend):
    check_varlen(backend, [0, 23, 5, 0, 12], [4, 23, 0, 6, 30], 2, 1, 24, torch.float32, window=(6, 2),
                 max_extra=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_softcap_alibi(backend):
    check_varlen(backend, [9, 26], [26, 9], 2, 2, 40, torch.bfloat16, causal=True, softcap=5.0, alibi=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_dropout(backend):
    check_varlen(backend, [11, 19], [19, 11], 2, 1, 16, torch.float32, causal=True, dropout_p=0.3)


# ---------------------------------------------------------------- masks and bias

def check_mask(backend, batch, sq, sk, hq, hk, d, dtype, mask_shape, kind, dropout_p=0.0, mask_rows=False):
    q = torch.randn(batch, hq, sq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, hk, sk, d, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, hk, sk, d, dtype=dtype, requires_grad=True)
    if kind == "bool":
        mask = torch.rand(mask_shape) > 0.3
        if mask_rows:
            mask[..., 1, :] = False  # a row (of every head/batch that uses it) sees nothing
        bias = torch.zeros(mask_shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    else:
        mask = bias = (torch.randn(mask_shape) * 2).to(dtype).requires_grad_(kind == "float-grad")
        if mask_rows:
            with torch.no_grad():
                mask[..., 1, :] = float("-inf")
    dout = torch.randn(batch, hq, sq, d, dtype=dtype)
    with fl.use_backend(backend), record_dropout() as calls:
        out = fl.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=hq != hk)
        inputs = (q, k, v) + ((mask,) if kind == "float-grad" else ())
        grads = torch.autograd.grad(out, inputs, dout)
    ours = dict(out=out.detach().transpose(1, 2), dq=grads[0].transpose(1, 2), dk=grads[1].transpose(1, 2),
                dv=grads[2].transpose(1, 2))
    if kind == "float-grad":
        assert grads[3].shape == mask.shape
        ours["dbias"] = grads[3]
    keep = calls[0].keep() if dropout_p > 0 else None
    ref, base = reference_results(*(t.transpose(1, 2) for t in (q, k, v)), dout.transpose(1, 2), d ** -0.5,
                                  bias=bias, dropout_keep=keep, dropout_p=dropout_p)
    assert_checks_ok(ours, ref, base, dtype)
    if mask_rows:
        assert (ours["out"][:, 1] == 0).all()
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float", "float-grad"])
@pytest.mark.parametrize("mask_shape", [(2, 2, 19, 37), (19, 37), (2, 1, 19, 1), (1, 2, 1, 37)],
                         ids=["full", "2d", "b1s1", "1h1s"])
def test_attn_mask(backend, kind, mask_shape):
    check_mask(backend, 2, 19, 37, 2, 2, 16, torch.float32, mask_shape, kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attn_mask_gqa_lowp(backend, dtype):
    check_mask(backend, 1, 33, 20, 4, 2, 32, dtype, (1, 4, 33, 20), "float-grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, mask_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                               (torch.bfloat16, torch.float16), (torch.float16, torch.float64)],
                         ids=["bf16-fp32mask", "fp16-fp32mask", "bf16-fp16mask", "fp16-fp64mask"])
def test_attn_mask_of_another_dtype_is_not_rounded(backend, dtype, mask_dtype):
    # a mask of 300 + N(0, 1): rounded to bf16 (spacing 2 there) its detail was lost and the
    # output off by 0.7; read in float32 the call is as good as torch's with a float32 mask
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
    mask = (300 + torch.randn(16, 16, generator=g)).to(mask_dtype).requires_grad_()
    dout = torch.randn(1, 2, 16, 16, generator=g).to(dtype)
    with fl.use_backend(backend):
        out = fl.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        grads = torch.autograd.grad(out, (q, k, v, mask), dout)
    assert grads[3].dtype == mask_dtype
    ref, base = reference_results(*(t.transpose(1, 2) for t in (q, k, v)), dout.transpose(1, 2), 16 ** -0.5,
                                  bias=mask.double())
    # the baseline: torch's SDPA on the same 16-bit q, k, v with the mask in float32
    torch_out = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(),
                                                                 attn_mask=mask.detach().float())
    base["out"] = torch_out.transpose(1, 2)
    assert_checks_ok({"out": out.detach().transpose(1, 2)}, {"out": ref["out"]}, {"out": base["out"]}, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float-grad"])
def test_attn_mask_fully_masked_rows_give_zero(backend, kind):
    check_mask(backend, 1, 18, 18, 2, 2, 16, torch.float32, (1, 2, 18, 18), kind, mask_rows=True)


# ---------------------------------------------------------------- dropout

def check_dropout(backend, batch, sq, sk, hq, hk, d, dtype, p, causal=False):
    q = torch.randn(batch, sq, hq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, sk, hk, d, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, sk, hk, d, dtype=dtype, requires_grad=True)
    dout = torch.randn_like(q)
    with fl.use_backend(backend), record_dropout() as calls:
        out, lse, _ = fl.flash_attn_func(q, k, v, dropout_p=p, causal=causal, return_attn_probs=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert len(calls) == 1
    keep = calls[0].keep()
    ref, base = reference_results(q, k, v, dout, d ** -0.5, sk - sq, -1, 0 if causal else -1, dropout_keep=keep,
                                  dropout_p=p)
    assert_checks_ok(dict(out=out.detach(), lse=lse, dq=dq, dk=dk, dv=dv), ref, base, dtype)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dropout(backend, dtype):
    check_dropout(backend, 2, 21, 34, 2, 2, 32, dtype, 0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_causal_gqa(backend):
    check_dropout(backend, 1, 40, 24, 4, 2, 16, torch.float32, 0.5, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_with_mask(backend):
    check_mask(backend, 1, 17, 23, 2, 1, 16, torch.float32, (17, 23), "float-grad", dropout_p=0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_reproducible_from_torch_seed(backend):
    q = torch.randn(1, 16, 2, 16)
    with fl.use_backend(backend):
        torch.manual_seed(3)
        a = fl.flash_attn_func(q, q, q, dropout_p=0.4)
        torch.manual_seed(3)
        b = fl.flash_attn_func(q, q, q, dropout_p=0.4)
        c = fl.flash_attn_func(q, q, q, dropout_p=0.4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_kept_fraction(p):
    # 2**20 draws: the binomial standard deviation is below 0.0005, far inside 0.01
    keep = rng.dropout_keep(rng.draw_seed(), p, 2, 4, 256, 512)
    assert abs(keep.double().mean().item() - (1 - p)) < 0.01


def test_dropout_stream_is_triton_randint():
    """rng.philox_first_word is bit-for-bit Triton's tl.randint (which the kernels call)."""
    pytest.importorskip("triton")
    import triton
    import triton.language as tl

    @triton.jit
    def draw(out, seed, base, N: tl.constexpr):
        offs = base + tl.arange(0, N).to(tl.int64)
        tl.store(out + tl.arange(0, N), tl.randint(seed, offs).to(tl.int64))

    for seed, base in [(12345, 0), (2 ** 62 + 987654321, 2 ** 33 + 5)]:
        got = torch.empty(64, dtype=torch.int64)
        draw[(1,)](got, seed, base, N=64)
        want = rng.philox_first_word(seed, torch.arange(64, dtype=torch.int64) + base)
        assert torch.equal(got & 0xFFFFFFFF, want)


def test_philox_known_answer():
    """Philox4x32-10 known-answer vector of the Random123 suite (counter 0, key 0),
    first word 0x6627e8d5: a check independent of Triton."""
    assert rng.philox_first_word(0, torch.zeros(1, dtype=torch.int64)).item() == 0x6627E8D5


def test_dropout_stream_is_triton_philox_on_split_counter():
    """The kernels' exact call: tl.philox on the (lo, hi) words of the 64-bit counter."""
    pytest.importorskip("triton")
    import triton
    import triton.language as tl

    @triton.jit
    def draw(out, seed, base, N: tl.constexpr):
        counter = base + tl.arange(0, N).to(tl.int64)
        lo = counter.to(tl.uint32)
        hi = (counter >> 32).to(tl.uint32)
        word, _, _, _ = tl.philox(seed, lo, hi, lo * 0, lo * 0)
        tl.store(out + tl.arange(0, N), word.to(tl.int64))

    for seed, base in [(7, 0), (2 ** 63 - 5, 2 ** 34 + 3)]:
        got = torch.empty(64, dtype=torch.int64)
        draw[(1,)](got, seed, base, N=64)
        assert torch.equal(got, rng.philox_first_word(seed, torch.arange(64, dtype=torch.int64) + base))


def test_triton_refuses_a_mask_layout_that_overflows_32_bit_key_offsets():
    from flashattn_lite.backends import Params, triton as triton_backend

    # key stride 2**30 over 4 keys: offsets past 2**31 (a meta tensor: nothing allocated)
    huge = torch.empty_strided((1, 1, 4, 4), (0, 0, 1, 2 ** 30), device="meta")
    with pytest.raises(ValueError, match="exceeds 32-bit offsets"):
        triton_backend._check_bias_layout(Params(softmax_scale=1.0, bias=huge), 4)
    fits = torch.empty_strided((1, 1, 4, 4), (0, 0, 1, 2 ** 20), device="meta")
    triton_backend._check_bias_layout(Params(softmax_scale=1.0, bias=fits), 4)
