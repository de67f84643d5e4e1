"""The registered operators check every argument a kernel reads, on every backend.

``torch.ops.flashattn_lite.fwd``, ``.bwd`` and ``.decode`` are public.  Each malformed
argument below once crashed, hung or read out of bounds on some backend (a block index
outside the cache, seqlens beyond capacity, a negative left pad, bad cu_seqlens, a
wrong-shaped lse, a short bias, wrong-shaped slopes); now each must raise an error
that names it before any kernel runs.  Every case runs in a child process
(tests/isolated.py), so a crash fails its own case.  Well-formed calls must still
match the float64 reference (the checks refuse nothing valid).
"""

import os

import pytest
import torch

from isolated import expect_error, results

BACKENDS = ("cpu", "reference", "triton", "cuda_emu")
D = 16


def _dtype(backend):
    return torch.float16 if backend == "cuda_emu" else torch.float32


def _dense(backend, b=2, sq=5, sk=7, h=2, hk=1):
    dt = _dtype(backend)
    return (torch.randn(b, sq, h, D, dtype=dt), torch.randn(b, sk, hk, D, dtype=dt),
            torch.randn(b, sk, hk, D, dtype=dt))


def _varlen(backend, lengths=(3, 0, 4)):
    dt = _dtype(backend)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return (torch.randn(total, 2, D, dtype=dt), torch.randn(total, 2, D, dtype=dt), torch.randn(total, 2, D, dtype=dt),
            cu)


def _fwd_args(q, k, v, backend, **kw):
    """Operator arguments in FWD_SCHEMA order, defaults well formed."""
    a = dict(cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, bias=None, softmax_scale=D ** -0.5,
             diag_offset=0, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
             dropout_seed=0)
    a.update(kw)
    return (q, k, v, *a.values(), backend)


def _fwd(*args, **kw):
    return torch.ops.flashattn_lite.fwd(*_fwd_args(*args, **kw))


def _varlen_fwd(backend, cu_q=None, cu_k=None, max_q=None, max_k=None, **kw):
    q, k, v, cu = _varlen(backend)
    cu_q = cu if cu_q is None else cu_q
    cu_k = cu if cu_k is None else cu_k
    return _fwd(q, k, v, backend, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4 if max_q is None else max_q,
                max_seqlen_k=4 if max_k is None else max_k, **kw)


def _bwd(backend, **override):
    q, k, v = _dense(backend)
    with torch.no_grad():
        out, lse = _fwd(q, k, v, backend)
    a = dict(dout=torch.randn_like(out), dlse=None, q=q, k=k, v=v, out=out, lse=lse)
    a.update(override)
    rest = _fwd_args(q, k, v, backend)[3:-1]
    return torch.ops.flashattn_lite.bwd(*a.values(), *rest, False, True, backend)


def _decode(backend, b=2, sq=1, h=2, hk=1, blocks=4, page=8, table=None, seqlens=None, leftpad=None, max_k=None,
            slopes=None, num_splits=0):
    dt = _dtype(backend)
    q = torch.randn(b, sq, h, D, dtype=dt)
    kc = torch.randn(blocks, page, hk, D, dtype=dt)
    vc = torch.randn(blocks, page, hk, D, dtype=dt)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32) if table is None else table
    seqlens = torch.tensor([9, 16], dtype=torch.int32) if seqlens is None else seqlens
    max_k = int(seqlens.max()) if max_k is None else max_k
    return torch.ops.flashattn_lite.decode(q, kc, vc, table, seqlens, leftpad, max_k, D ** -0.5, -1, -1, 0.0, slopes,
                                          num_splits, backend)


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


CASES = {
    # ---------------------------------------------------------------- fwd, dense
    "fwd_bias_short": lambda be: expect_error(lambda: _fwd(*_dense(be), be, bias=torch.zeros(2, 2, 5, 3)), match="bias"),
    "fwd_bias_wrong_device_dtype": lambda be: expect_error(
        lambda: _fwd(*_dense(be), be, bias=torch.zeros(2, 2, 5, 7, dtype=torch.int64)), match="bias"),
    "fwd_slopes_wrong_shape": lambda be: expect_error(
        lambda: _fwd(*_dense(be), be, alibi_slopes=torch.zeros(2, 1)), match="alibi_slopes"),
    "fwd_slopes_wrong_dtype": lambda be: expect_error(
        lambda: _fwd(*_dense(be), be, alibi_slopes=torch.zeros(2, 2, dtype=torch.float64)), match="alibi_slopes"),
    "fwd_head_dim_mismatch": lambda be: expect_error(
        lambda: _fwd(_dense(be)[0], *(t[..., :8] for t in _dense(be)[1:]), be), match="head dim"),
    "fwd_heads_not_multiple": lambda be: expect_error(lambda: _fwd(*_dense(be, h=3, hk=2), be), match="heads"),
    "fwd_batch_mismatch": lambda be: expect_error(
        lambda: _fwd(_dense(be)[0][:1], *_dense(be)[1:], be), match="batch"),
    "fwd_last_stride": lambda be: _fwd(_dense(be)[0].transpose(-1, -2).contiguous().transpose(-1, -2),
                                       *_dense(be)[1:], be),  # copied, not refused
    "fwd_auto_backend": lambda be: expect_error(lambda: _fwd(*_dense(be), "auto"), match="backend"),
    "fwd_unknown_backend": lambda be: expect_error(lambda: _fwd(*_dense(be), "nope"), match="backend"),
    "fwd_nan_scale": lambda be: expect_error(lambda: _fwd(*_dense(be), be, softmax_scale=float("nan")),
                                             match="softmax_scale"),
    "fwd_tiny_softcap": lambda be: expect_error(lambda: _fwd(*_dense(be), be, softcap=1e-39), match="softcap"),
    "fwd_dropout_one": lambda be: expect_error(lambda: _fwd(*_dense(be), be, dropout_p=1.0), match="dropout"),
    "fwd_window_below": lambda be: expect_error(lambda: _fwd(*_dense(be), be, window_left=-5), match="window_left"),
    "fwd_int_dtype": lambda be: expect_error(
        lambda: _fwd(*(t.to(torch.int32) for t in _dense(be)), be), match="dtype"),
    # ---------------------------------------------------------------- fwd, varlen
    "varlen_cu_decreasing": lambda be: expect_error(lambda: _varlen_fwd(be, cu_q=_i32(0, 5, 3, 7)),
                                                    match="non-decreasing"),
    "varlen_cu_wrong_total": lambda be: expect_error(lambda: _varlen_fwd(be, cu_k=_i32(0, 3, 3, 9)), match="packed"),
    "varlen_cu_not_from_zero": lambda be: expect_error(lambda: _varlen_fwd(be, cu_q=_i32(1, 3, 3, 7)), match="[0]"),
    "varlen_cu_int64": lambda be: expect_error(
        lambda: _varlen_fwd(be, cu_q=torch.tensor([0, 3, 3, 7])), match="int32"),
    "varlen_cu_lengths_differ": lambda be: expect_error(lambda: _varlen_fwd(be, cu_k=_i32(0, 7)), match="entries"),
    "varlen_cu_one_entry": lambda be: expect_error(
        lambda: _varlen_fwd(be, cu_q=_i32(7), cu_k=_i32(7)), match="entries"),
    "varlen_cu_only_q": lambda be: expect_error(
        lambda: _fwd(*_varlen(be)[:3], be, cu_seqlens_q=_varlen(be)[3], max_seqlen_q=4, max_seqlen_k=4),
        match="together"),
    "varlen_max_too_small": lambda be: expect_error(lambda: _varlen_fwd(be, max_q=2), match="max_seqlen_q"),
    "varlen_max_absurd": lambda be: expect_error(lambda: _varlen_fwd(be, max_k=2 ** 40), match="max_seqlen_k"),
    "varlen_bias": lambda be: expect_error(lambda: _varlen_fwd(be, bias=torch.zeros(3, 2, 4, 4)), match="bias"),
    "varlen_slopes_per_token": lambda be: expect_error(
        lambda: _varlen_fwd(be, alibi_slopes=torch.zeros(7, 2)), match="alibi_slopes"),
    # ---------------------------------------------------------------- bwd
    "bwd_lse_wrong_shape": lambda be: expect_error(lambda: _bwd(be, lse=torch.zeros(2, 2, 4)), match="lse"),
    "bwd_lse_wrong_dtype": lambda be: expect_error(
        lambda: _bwd(be, lse=torch.zeros(2, 2, 5, dtype=torch.float16)), match="lse"),
    "bwd_dlse_wrong_shape": lambda be: expect_error(lambda: _bwd(be, dlse=torch.zeros(2, 5)), match="dlse"),
    "bwd_dout_wrong_shape": lambda be: expect_error(
        lambda: _bwd(be, dout=torch.zeros(2, 4, 2, D, dtype=_dtype(be))), match="dout"),
    "bwd_out_wrong_dtype": lambda be: expect_error(
        lambda: _bwd(be, out=torch.zeros(2, 5, 2, D, dtype=torch.float64)), match="out"),
    # ---------------------------------------------------------------- decode
    "decode_block_index_past_end": lambda be: expect_error(lambda: _decode(be, table=_i32([0, 1], [2, 4])),
                                                           match="block_table"),
    "decode_block_index_negative": lambda be: expect_error(lambda: _decode(be, table=_i32([0, -1], [2, 3])),
                                                           match="block_table"),
    "decode_seqlens_beyond_capacity": lambda be: expect_error(lambda: _decode(be, seqlens=_i32(9, 17)),
                                                              match="seqlens_k"),
    "decode_seqlens_negative": lambda be: expect_error(lambda: _decode(be, seqlens=_i32(-1, 3), max_k=3),
                                                       match="seqlens_k"),
    "decode_leftpad_negative": lambda be: expect_error(lambda: _decode(be, leftpad=_i32(-4, 0)), match="leftpad"),
    "decode_leftpad_past_end": lambda be: expect_error(lambda: _decode(be, leftpad=_i32(10, 0)), match="leftpad"),
    "decode_seqlens_wrong_shape": lambda be: expect_error(lambda: _decode(be, seqlens=_i32(9)), match="seqlens_k"),
    "decode_table_wrong_dtype": lambda be: expect_error(
        lambda: _decode(be, table=torch.tensor([[0, 1], [2, 3]])), match="block_table"),
    "decode_table_wrong_batch": lambda be: expect_error(lambda: _decode(be, table=_i32([0, 1])),
                                                        match="block_table"),
    "decode_max_seqlen_small": lambda be: expect_error(lambda: _decode(be, max_k=4), match="max_seqlen_k"),
    "decode_slopes_wrong_shape": lambda be: expect_error(lambda: _decode(be, slopes=torch.zeros(2)),
                                                         match="alibi_slopes"),
    "decode_num_splits": lambda be: expect_error(lambda: _decode(be, num_splits=1000), match="num_splits"),
}


def _valid_fwd_matches_reference(be):
    from flashattn_lite.backends import Params, reference
    q, k, v = _dense(be)
    out, lse = _fwd(q, k, v, be, diag_offset=2, window_right=0)
    ref, ref_lse = reference.fwd(q.double(), k.double(), v.double(),
                                 Params(softmax_scale=D ** -0.5, diag_offset=2, window_right=0))
    tol = 2e-3 if q.dtype == torch.float16 else 1e-5
    assert (out.double() - ref).abs().max() < tol and (lse.double() - ref_lse).abs().max() < tol


def _valid_decode_matches_reference(be):
    from flashattn_lite.backends import Params, reference
    torch.manual_seed(0)
    args = dict(leftpad=_i32(2, 0))
    out, lse = _decode(be, **args)
    torch.manual_seed(0)
    dt = _dtype(be)
    q = torch.randn(2, 1, 2, D, dtype=dt)
    kc, vc = torch.randn(4, 8, 1, D, dtype=dt), torch.randn(4, 8, 1, D, dtype=dt)
    ref, _ = reference.decode(q.double(), kc.double(), vc.double(), _i32([0, 1], [2, 3]), _i32(9, 16), _i32(2, 0),
                              Params(softmax_scale=D ** -0.5), 16, 0)
    assert (out.double() - ref).abs().max() < (2e-3 if dt == torch.float16 else 1e-5)


CASES["fwd_valid_call_runs"] = _valid_fwd_matches_reference
CASES["decode_valid_call_runs"] = lambda be: (None if be == "cuda_emu" else _valid_decode_matches_reference(be))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_operator_refuses_malformed_arguments(backend, case):
    ok, detail = results(os.path.abspath(__file__), backend, sorted(CASES))[case]
    assert ok, detail
