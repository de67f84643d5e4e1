"""The C++ CPU backend with row strides of 2^31 elements or more (issue 14).

BLAS takes its leading dimensions as 32-bit ints: a q/k/v/dout row stride of 2^31
elements or more used to reach it wrapped (2^31 -> a negative int, which MKL rejects
with a message on stdout and leaves the product unwritten; 2^32 + w -> w, a valid
leading dimension that reads the wrong rows).  The kernels now pack such a tile.

Such tensors cost no memory beyond the rows used: every input here is a view into
one buffer from ``torch.empty`` (address space, committed page by page as it is
written), whose row ``i`` of every tensor lies in slot ``i`` (``WIDTH`` elements at
``i * stride``), and only those slots are written.  A one-row tensor may have any
row stride at no cost at all.  Sequence lengths of 2^31 or more are refused with a
ValueError naming the limit (seqlens and cu_seqlens are int32, as in flash-attn).
"""

import pytest
import torch

import flashattn_lite as fl
from flashattn_lite.backends import Params
from flashattn_lite.backends import cpu as cpu_backend
from flashattn_lite.testing import record_dropout, reference_results, reference_results_varlen

from helpers import assert_checks_ok, kernels_run

WIDTH = 2**16  # elements of a slot: every tensor's block of one row
WRAPS_NEGATIVE = 2**31  # int(2**31) is -2**31: MKL refused it ("Parameter ... was incorrect")
WRAPS_SMALL = 2**32 + WIDTH  # int() of it is WIDTH: a valid leading dimension, the wrong rows
D = 24


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("FLASHATTN_LITE_CPU_POISON", "1")  # scratch starts as NaN: unwritten reads show


class Arena:
    """Views whose dim ``huge`` (the sequence by default) has extent at most ``rows`` and
    stride ``stride``, their other dims packed in slots of ``WIDTH`` elements, all in one
    lazily committed buffer."""

    def __init__(self, rows, stride, dtype, seed=0):
        self.buf = torch.empty((rows - 1) * stride + WIDTH, dtype=dtype)
        self.rows, self.stride, self.dtype, self.used = rows, stride, dtype, 0
        self.gen = torch.Generator().manual_seed(seed)

    def take(self, batch, seqlen, heads, dim=D, scale=1.0, huge=1):
        """A random (batch, seqlen, heads, dim) tensor; dim ``huge`` strides ``stride`` elements."""
        shape = (batch, seqlen, heads, dim)
        strides, packed = [0] * 4, 1
        for i in reversed(range(4)):
            if i != huge:
                strides[i], packed = packed, packed * shape[i]
        strides[huge] = self.stride
        assert shape[huge] <= self.rows and self.used + packed <= WIDTH
        t = torch.as_strided(self.buf, shape, strides, self.used)
        self.used += packed
        t.copy_((torch.randn(shape, generator=self.gen) * scale).to(self.dtype))
        return t


def rows_for(dtype):
    # buffers of at most 16 GiB of address space (rows - 1 strides)
    return 3 if dtype.itemsize == 2 else 2


def contiguous_leaves(*tensors):
    return [t.detach().contiguous().requires_grad_() for t in tensors]


def leaves(*tensors):
    return [t.requires_grad_() for t in tensors]


def flash(q, k, v, dout, **kw):
    with fl.use_backend("cpu"):
        out, lse, _ = fl.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return dict(out=out.detach(), lse=lse.detach(), dq=dq, dk=dk, dv=dv)


def assert_same(ours, contiguous):
    """Same results as the inputs made contiguous (BLAS may sum a packed tile in another order)."""
    for key in ours:
        torch.testing.assert_close(ours[key], contiguous[key], msg=key)


def assert_no_blas_message(capfd):
    text = "".join(capfd.readouterr())  # e.g. "Intel oneMKL ERROR: Parameter 8 was incorrect on entry to SGEMM"
    assert "MKL ERROR" not in text and "incorrect on entry" not in text


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,stride", [(torch.float32, WRAPS_NEGATIVE), (torch.float32, WRAPS_SMALL),
                                          (torch.float64, WRAPS_NEGATIVE + 8), (torch.bfloat16, WRAPS_NEGATIVE)],
                         ids=["fp32-2^31", "fp32-2^32+w", "fp64-2^31+8", "bf16-2^31"])
def test_dense_all_huge(capfd, dtype, stride, causal):
    """q, k, v and dout all with a huge row stride: every product of the forward and the backward."""
    arena = Arena(rows_for(dtype), stride, dtype)
    s = arena.rows
    q, k, v = leaves(arena.take(2, s, 4), arena.take(2, s, 2), arena.take(2, s, 2))
    dout = arena.take(2, s, 4)
    ours = flash(q, k, v, dout, causal=causal)
    assert_no_blas_message(capfd)
    ref, base = reference_results(q, k, v, dout, D ** -0.5, 0, -1, 0 if causal else -1)
    assert_checks_ok(ours, ref, base, dtype)
    assert_same(ours, flash(*contiguous_leaves(q, k, v), dout.contiguous(), causal=causal))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["q", "kv"])
def test_dense_huge_beside_long(capfd, which, dtype):
    """One side with a huge row stride, the other long and contiguous (several query blocks,
    two key tiles; bf16 queries above 128 rows widen K and V once for the call)."""
    arena = Arena(rows_for(dtype), WRAPS_NEGATIVE, dtype)
    long = 600
    if which == "q":
        q = arena.take(1, arena.rows, 4)
        dout = arena.take(1, arena.rows, 4)
        k, v = (torch.randn(1, long, 2, D).to(dtype) for _ in range(2))
    else:
        k, v = arena.take(1, arena.rows, 2), arena.take(1, arena.rows, 2)
        q, dout = (torch.randn(1, long, 4, D).to(dtype) for _ in range(2))
    q, k, v = leaves(q, k, v)
    ours = flash(q, k, v, dout, causal=True)
    assert_no_blas_message(capfd)
    ref, base = reference_results(q, k, v, dout, D ** -0.5, k.shape[1] - q.shape[1], -1, 0)
    assert_checks_ok(ours, ref, base, dtype)
    assert_same(ours, flash(*contiguous_leaves(q, k, v), dout.contiguous(), causal=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_sdpa_bhsd_with_mask(capfd, dtype, dropout_p):
    """torch's (B, H, S, D) layout, with a float mask whose query-row stride is huge too."""
    arena = Arena(rows_for(dtype), WRAPS_NEGATIVE, dtype)
    s = arena.rows
    q, k, v, dout = (arena.take(2, s, h).transpose(1, 2) for h in (4, 2, 2, 4))  # (B, H, S, D) views
    mask = arena.take(2, s, 4, dim=s, scale=2.0).transpose(1, 2)  # (B, H, Sq, Sk), Sq stride huge
    q, k, v = leaves(q, k, v)

    def run(q, k, v, dout, mask):
        torch.manual_seed(1234)
        with fl.use_backend("cpu"), record_dropout() as calls:
            out = fl.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=True)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        res = dict(out=out.detach(), dq=dq, dk=dk, dv=dv)
        return {key: t.transpose(1, 2) for key, t in res.items()}, (calls[0].keep() if dropout_p else None)

    ours, keep = run(q, k, v, dout, mask)
    assert_no_blas_message(capfd)
    ref, base = reference_results(*(t.transpose(1, 2) for t in (q, k, v, dout)), D ** -0.5, bias=mask,
                                  dropout_keep=keep, dropout_p=dropout_p)
    assert_checks_ok(ours, ref, base, dtype)
    assert_same(ours, run(*contiguous_leaves(q, k, v), dout.contiguous(), mask.contiguous())[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 4])
def test_decode_route(capfd, dtype, rows):
    """Few query rows against keys with a huge row stride: the split-KV decode kernel
    (its addresses are 64-bit; one query row, or 4 rows of a GQA group of 4)."""
    arena = Arena(rows_for(dtype), WRAPS_NEGATIVE, dtype)
    k, v = arena.take(2, arena.rows, 2), arena.take(2, arena.rows, 2)
    q = arena.take(2, 1, 8) if rows == 1 else torch.randn(2, rows, 8, D).to(dtype)
    dout = torch.randn(2, rows, 8, D).to(dtype)
    q, k, v = leaves(q, k, v)
    assert "flashattn_lite_C::decode" in kernels_run(lambda: flash(q, k, v, dout))
    ours = flash(q, k, v, dout)
    assert_no_blas_message(capfd)
    ref, base = reference_results(q, k, v, dout, D ** -0.5, k.shape[1] - rows)
    assert_checks_ok(ours, ref, base, dtype)
    assert_same(ours, flash(*contiguous_leaves(q, k, v), dout.contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sq", [1, 40])
def test_huge_batch_and_head_strides(capfd, dtype, sq):
    """Batch (q, dout) and kv-head (k, v) strides of 2^31 elements: addresses only, no BLAS
    argument; the tiled kernels, and the decode kernel for one query row."""
    arena = Arena(2, WRAPS_NEGATIVE, dtype)
    q, dout = arena.take(2, sq, 4, huge=0), arena.take(2, sq, 4, huge=0)
    k, v = arena.take(2, 50, 2, huge=2), arena.take(2, 50, 2, huge=2)
    q, k, v = leaves(q, k, v)
    ours = flash(q, k, v, dout, causal=True)
    assert_no_blas_message(capfd)
    ref, base = reference_results(q, k, v, dout, D ** -0.5, 50 - sq, -1, 0)
    assert_checks_ok(ours, ref, base, dtype)
    assert_same(ours, flash(*contiguous_leaves(q, k, v), dout.contiguous(), causal=True))


def _cu(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("route", ["tiled", "decode"])
def test_varlen(capfd, dtype, route):
    """Packed (total, H, D) tensors with a huge token stride, on both varlen routes."""
    arena = Arena(rows_for(dtype), WRAPS_NEGATIVE, dtype)
    n = arena.rows
    if route == "tiled":
        lens_q, lens_k = [n, 0], [1, n - 1]
    else:  # one query row per sequence: a decoding step of a padded batch
        lens_q, lens_k = [1] * n, [1] * n
    q, k, v, dout = (arena.take(1, n, h)[0] for h in (4, 2, 2, 4))
    q, k, v = leaves(q, k, v)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)

    def run(q, k, v, dout):
        with fl.use_backend("cpu"):
            out, lse, _ = fl.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                                    return_attn_probs=True)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        return dict(out=out.detach(), lse=lse.detach(), dq=dq, dk=dk, dv=dv)

    ran = kernels_run(lambda: run(q, k, v, dout))
    assert ("flashattn_lite_C::decode" in ran) == (route == "decode")
    ours = run(q, k, v, dout)
    assert_no_blas_message(capfd)
    ref, base = reference_results_varlen(q, k, v, dout, cu_q, cu_k, D ** -0.5, causal=True)
    assert_checks_ok(ours, ref, base, dtype)
    assert_same(ours, run(*contiguous_leaves(q, k, v), dout.contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("which", ["q", "kv"])
def test_one_row_any_stride(capfd, which, dtype):
    """A one-row tensor's row stride is never used, yet BLAS checks the leading dimension:
    2^40 (int() of it is 0) on the tiled path (a mask keeps one query row off the decode
    kernel)."""
    def one_row(batch, heads):
        t = torch.randn(batch, 1, heads, D, dtype=dtype)
        return torch.as_strided(t, t.shape, (heads * D, 2**40, D, 1))

    if which == "q":
        q, dout = one_row(2, 4), one_row(2, 4)
        k, v = torch.randn(2, 37, 2, D, dtype=dtype), torch.randn(2, 37, 2, D, dtype=dtype)
    else:
        k, v = one_row(2, 2), one_row(2, 2)
        q, dout = torch.randn(2, 9, 4, D, dtype=dtype), torch.randn(2, 9, 4, D, dtype=dtype)
    mask = torch.randn(2, 4, q.shape[1], k.shape[1], dtype=dtype)
    q, k, v = leaves(q, k, v)

    def run(q, k, v, dout):
        with fl.use_backend("cpu"):
            out = fl.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                                  enable_gqa=True).transpose(1, 2)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        return dict(out=out.detach(), dq=dq, dk=dk, dv=dv)

    ours = run(q, k, v, dout)
    assert_no_blas_message(capfd)
    ref, base = reference_results(q, k, v, dout, D ** -0.5, bias=mask)
    assert_checks_ok(ours, ref, base, dtype)
    assert_same(ours, run(*contiguous_leaves(q, k, v), dout.contiguous()))


@pytest.mark.parametrize("sq", [1, 2])
def test_sequence_of_2_31_keys_is_refused(sq):
    """2^31 + 5 stride-0 keys: a ValueError naming the limit, from the public function, the
    backend (one query row would take the decode route, whose seqlens are int32) and the
    C++ operator alike, before anything is copied."""
    k = torch.randn(1, 1, 2, D).expand(1, 2**31 + 5, 2, D)
    q = torch.randn(1, sq, 2, D)
    limit = r"2(\*\*|\^)31"
    with fl.use_backend("cpu"), pytest.raises(ValueError, match=limit):
        fl.flash_attn_func(q, k, k)
    with pytest.raises(ValueError, match=limit):
        cpu_backend.fwd(q, k, k, Params(softmax_scale=D ** -0.5))
    lib = cpu_backend._ensure_built()
    with pytest.raises(ValueError, match=limit):
        lib.fwd(q, k, k, None, None, 0, 0, None, D ** -0.5, 0, -1, -1, 0.0, None, 0.0, 0)
    with pytest.raises(ValueError, match=limit):
        lib.bwd(q, None, q, k, k, q, torch.zeros(1, 2, sq), None, None, 0, 0, None, D ** -0.5, 0, -1, -1, 0.0, None,
                0.0, 0, False, True)
