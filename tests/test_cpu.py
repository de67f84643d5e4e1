"""The C++ CPU backend against the float64 reference, plus its build and fallback.

Most cases shrink the tiles (FLASHATTN_LITE_CPU_*_BLOCKS) so that small shapes
still cross several query/key blocks, partial tail blocks and thread boundaries;
a few run the shipped tile sizes on longer sequences.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import flashattn_lite as fl
from flashattn_lite import _build, backends, rng
from flashattn_lite.testing import (check_against_reference, record_dropout, reference_results,
                                    reference_results_varlen)

from helpers import assert_checks_ok, assert_matches_reference, check_case, kernels_run, make_qkv, run_flash

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setenv("FLASHATTN_LITE_CPU_FWD_BLOCKS", "16,32")
    monkeypatch.setenv("FLASHATTN_LITE_CPU_BWD_BLOCKS", "16,16")
    monkeypatch.setenv("FLASHATTN_LITE_CPU_POISON", "1")  # scratch starts as NaN: unwritten reads show


def _check(*args, **kwargs):
    return check_case("cpu", *args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(64, 64), (67, 93), (96, 33), (1, 77), (77, 1), (32, 128)])
def test_seqlens(small_tiles, sq, sk, causal, dtype):
    _check(2, sq, sk, 4, 2, 40, dtype, causal=causal)


@pytest.mark.parametrize("d", [1, 8, 40, 72, 96, 160, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(small_tiles, d, causal):
    _check(1, 40, 50, 2, 1, d, torch.float16, causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("hq,hk", [(2, 2), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_gqa(small_tiles, hq, hk, dtype):
    _check(2, 48, 80, hq, hk, 32, dtype, causal=True)


@pytest.mark.parametrize("memory", ["bhsd", "padded"])
def test_strided_layouts(small_tiles, memory):
    _check(2, 41, 75, 4, 2, 24, torch.float32, causal=True, memory=memory)


@pytest.mark.parametrize("window", [(8, 0), (5, 3), (-1, 4), (20, -1), (0, 0)])
@pytest.mark.parametrize("sq,sk", [(70, 70), (40, 90), (90, 40)])
def test_window(small_tiles, window, sq, sk):
    _check(1, sq, sk, 2, 1, 16, torch.float32, window=window)


@pytest.mark.parametrize("causal", [False, True])
def test_shipped_tiles_long_sequence(causal):
    """Default tile sizes (256 x 512 forward, 128 x 256 backward), several blocks each."""
    _check(1, 700, 1100, 4, 2, 64, torch.bfloat16, causal=causal)


@pytest.mark.parametrize("sq,sk", [(0, 16), (16, 0), (0, 0)])
def test_empty_sequences(sq, sk):
    q, k, v = make_qkv(2, sq, sk, 2, 1, 16, torch.float32)
    dout = torch.randn(2, sq, 2, 16)
    ours = run_flash("cpu", q, k, v, dout, causal=True)
    assert (ours["out"] == 0).all() and (ours["lse"] == float("-inf")).all()
    assert all((ours[key] == 0).all() for key in ("dq", "dk", "dv"))


def test_fully_masked_rows(small_tiles):
    q, k, v = make_qkv(1, 60, 10, 2, 2, 16, torch.float32)
    dout = torch.randn(1, 60, 2, 16)
    ours = run_flash("cpu", q, k, v, dout, causal=True)
    assert (ours["out"][:, :50] == 0).all() and (ours["dq"][:, :50] == 0).all()
    assert_matches_reference(ours, q, k, v, dout, causal=True)


def test_gradcheck_float64(small_tiles):
    q, k, v = make_qkv(1, 9, 13, 2, 1, 4, torch.float64)
    with fl.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b, c: fl.flash_attn_func(a, b, c, causal=True), (q, k, v))
        assert torch.autograd.gradcheck(lambda a, b, c: fl.flash_attn_func(a, b, c, window_size=(3, 2)), (q, k, v))


def test_gradient_through_lse(small_tiles):
    q, k, v = make_qkv(1, 20, 33, 2, 1, 16, torch.float64)
    with fl.use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda a, b, c: fl.flash_attn_func(a, b, c, causal=True, return_attn_probs=True)[1], (q, k, v))


def test_bitwise_deterministic_across_runs():
    q, k, v = make_qkv(2, 300, 520, 4, 2, 64, torch.float32)
    dout = torch.randn(2, 300, 4, 64)
    first = run_flash("cpu", q, k, v, dout, causal=True)
    second = run_flash("cpu", q, k, v, dout, causal=True)
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("shape", [(2, 300, 520, 4, 2, 64, torch.float32), (1, 1, 3000, 8, 2, 64, torch.bfloat16)],
                         ids=["tiled", "decode-route"])
def test_forward_bitwise_equal_across_thread_counts(shape):
    # decode-route: the short-query route's key splits depend on the shape only, never
    # on the thread count
    q, k, v = make_qkv(*shape, requires_grad=False)
    results = [_with_threads(n, lambda: run_flash("cpu", q, k, v, causal=True)) for n in (1, 2, 3)]
    for other in results[1:]:
        assert torch.equal(results[0]["out"], other["out"]) and torch.equal(results[0]["lse"], other["lse"])


# ---- short queries: the forward's route to the decode kernel (backends/cpu.py)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,hq,hk", [(1, 4, 4), (1, 8, 2), (3, 8, 2), (4, 4, 1)])
@pytest.mark.parametrize("feature", ["plain", "causal", "window", "softcap-alibi"])
def test_short_queries_on_the_decode_kernel(monkeypatch, dtype, sq, hq, hk, feature):
    # One query row (any group) or up to 4 rows of a GQA group of >= 4: forward on the
    # decode kernel (split over keys: 1100 keys, 2 splits per kv head), gradients from the
    # backward kernel with the lse the decode kernel wrote.
    kw = {"causal": dict(causal=True), "window": dict(window=(300, 0)),
          "softcap-alibi": dict(causal=True, softcap=3.0, alibi="batch-heads")}.get(feature, {})
    ran = kernels_run(lambda: _check(2, sq, 1100, hq, hk, 72, dtype, **kw))
    assert ran == {"flashattn_lite_C::decode", "flashattn_lite_C::bwd"}


@pytest.mark.parametrize("d", [1, 17])
def test_short_queries_on_the_decode_kernel_bhsd_memory(d):
    # (B, H, S, D) memory seen through the flash layout (each head's rows contiguous, the
    # heads far apart), odd head dims, 3 query rows of a GQA group of 4.
    ran = kernels_run(lambda: _check(2, 3, 300, 8, 2, d, torch.float32, memory="bhsd", causal=True))
    assert "flashattn_lite_C::decode" in ran and "flashattn_lite_C::fwd" not in ran


@pytest.mark.parametrize("case", ["two-rows-mha", "top-left-causal", "bias", "dropout"])
def test_short_queries_the_decode_kernel_cannot_take(case):
    # Two rows of plain MHA (the tiled forward is as fast), SDPA's top-left causal
    # alignment (another diagonal than the decode kernel's), a bias or dropout: the tiled
    # forward serves them, and the results are still right.
    ran = kernels_run(lambda: _declined_case(case))
    assert "flashattn_lite_C::fwd" in ran and "flashattn_lite_C::decode" not in ran


def _declined_case(case):
    if case == "two-rows-mha":
        _check(2, 2, 300, 4, 4, 32, torch.float32, causal=True)
    elif case == "top-left-causal":
        q, k, v = (torch.randn(1, 2, n, 32) for n in (1, 300, 300))
        with fl.use_backend("cpu"):
            out = fl.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(out, v[:, :, :1])  # the first query sees only the first key
    elif case == "bias":
        q, k, v = (torch.randn(1, 2, n, 32) for n in (1, 300, 300))
        bias = torch.randn(1, 2, 1, 300)
        with fl.use_backend("cpu"):
            out = fl.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 32 ** 0.5 + bias.double(), -1) @ v.double()
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    else:
        q, k, v = make_qkv(1, 1, 300, 2, 2, 32, torch.float32, requires_grad=False)
        with fl.use_backend("cpu"):
            fl.flash_attn_func(q, k, v, dropout_p=0.3)


def test_auto_picks_cpu_for_cpu_tensors():
    call = backends.Call(device=torch.device("cpu"), dtype=torch.bfloat16, head_dim=64)
    assert backends.select(call) == "cpu"
    assert fl.available_backends()["cpu"][0] is True


def test_kernel_op_rejects_bad_input():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="must be 4-D"):
        _raw_fwd(q[0], q, q)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        _raw_fwd(torch.randn(1, 4, 3, 8), q, q)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        _raw_fwd(q.int(), q.int(), q.int())
    with pytest.raises(RuntimeError, match="alibi_slopes must be float32"):
        _raw_fwd(q, q, q, alibi_slopes=torch.ones(3, 2))


_NO_COMPILER = textwrap.dedent("""
    import warnings, torch, flashattn_lite as fl
    state = fl.available_backends()["cpu"]
    print("CPU_STATE", state[0])
    assert state[0] is False and "failed" in state[1], state
    q = torch.randn(1, 8, 2, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fl.flash_attn_func(q, q, q)
        fl.flash_attn_func(q, q, q)
    msgs = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert len(msgs) == 1, msgs
    try:
        with fl.use_backend("cpu"):
            fl.flash_attn_func(q, q, q)
    except RuntimeError as exc:
        print("FORCED_ERROR", exc)
    else:
        raise AssertionError("forcing cpu without a compiler must raise")
""")


def test_without_a_compiler_auto_falls_back_and_forced_cpu_raises(tmp_path):
    env = dict(os.environ, CXX="/nonexistent/c++", CC="/nonexistent/cc", FLASHATTN_LITE_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", _NO_COMPILER], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CPU_STATE False" in proc.stdout
    # the forced backend's error carries the tail of the compiler's complaint
    assert "FORCED_ERROR" in proc.stdout and "nonexistent" in proc.stdout


def test_concurrent_first_use_builds_once(tmp_path):
    script = "import flashattn_lite._build as b; print(b.build_cpu())"
    env = dict(os.environ, FLASHATTN_LITE_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1 and os.path.exists(paths.pop())


def test_cache_key_covers_sources_flags_and_torch(monkeypatch, tmp_path):
    src = tmp_path / "a.cpp"
    src.write_text("int x;")
    key = _build.cache_key([str(src)])
    src.write_text("int y;")
    assert _build.cache_key([str(src)]) != key
    src.write_text("int x;")
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert _build.cache_key([str(src)]) != key
    monkeypatch.undo()
    monkeypatch.setattr(_build, "cflags", lambda: ["-O0"])
    assert _build.cache_key([str(src)]) != key


# float64 at 100 nats: dq is 3-4x over the bound (out, lse, dk, dv within it).  Inherent to
# the flash backward, not the rescaling: dq = scale * sum_j P_ij (dP_ij - D_i) k_j with
# D_i = dO_i . O_i from the forward's output, so O's rounding (an ulp of the scores, which
# each key tile's product rounds its own way) reaches dq multiplied by |k| * scale, here
# about 50; the naive baseline takes D from the same P and has no such term.  One key tile
# (no rescaling) gives 2.6e-14 against the bound 1.4e-13; float32 is within its bound.
_DQ_AMPLIFIED = pytest.mark.xfail(strict=False, reason="flash backward: dq amplifies O's rounding by |k| * scale")


@pytest.mark.parametrize("dtype,jump", [(torch.float32, 30), (torch.float32, 100), (torch.float64, 30),
                                        pytest.param(torch.float64, 100, marks=_DQ_AMPLIFIED)],
                         ids=["float32-30", "float32-100", "float64-30", "float64-100"])
def test_online_softmax_shift_raised_by_later_tiles(small_tiles, dtype, jump):
    """Scores in later key tiles far above the first tile's (and above the
    provisional shift) take the rescaling path; the result must not change.  A jump of
    100 nats overflows float32 if the shift is not raised."""
    q, k, v = make_qkv(1, 40, 100, 2, 1, 16, dtype, requires_grad=False)
    with torch.no_grad():
        k[:, :, :, :] = k * 0.01
        # tile 3 on: scores ~ jump nats higher.  The keys differ (by about a nat): for identical
        # keys every baseline gets their equal scores equal, which no tiling has to match
        # (each tile's product rounds its own way, by an ulp of the jump)
        k[:, 64:] = q[:, :1].mean(2, keepdim=True) * jump + torch.randn_like(k[:, 64:])
        k[:, 40:41] = -k[:, 40:41] * 100  # one key far below: underflows identically everywhere
    for t in (q, k, v):
        t.requires_grad_()
    dout = torch.randn(1, 40, 2, 16, dtype=dtype)
    ours = run_flash("cpu", q, k, v, dout, causal=False)
    assert_matches_reference(ours, q, k, v, dout)


def test_gradient_with_zero_sequence_stride():
    """out.sum(dim=1) hands the op a gradient with sequence stride 0; BLAS needs ld >= D."""
    q, k, v = make_qkv(1, 40, 40, 2, 2, 8, torch.float32)
    w = torch.randn(2, 8)
    grads = {}
    for backend in ("cpu", "reference"):
        with fl.use_backend(backend):
            out = fl.flash_attn_func(q, k, v, causal=True)
            grads[backend] = torch.autograd.grad((out.sum(dim=1) * w).sum(), (q, k, v))
    for ours, ref in zip(grads["cpu"], grads["reference"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["one-row-permuted", "expanded-kv"])
def test_row_strides_below_head_dim(case):
    if case == "one-row-permuted":  # "contiguous" by torch's rules, row stride 1 < D
        q = torch.randn(2, 2, 8, 1).permute(0, 3, 1, 2).requires_grad_()
        k, v = (torch.randn(2, 33, 2, 8).requires_grad_() for _ in range(2))
    else:  # every key/value row the same memory: stride 0
        q = torch.randn(2, 5, 2, 8).requires_grad_()
        k, v = (torch.randn(2, 1, 2, 8).expand(2, 17, 2, 8).detach().requires_grad_() for _ in range(2))
    dout = torch.randn(q.shape)
    ours = run_flash("cpu", q, k, v, dout)
    assert_matches_reference(ours, q, k, v, dout)


def test_op_with_non_unit_last_stride_writes_correct_memory():
    q = torch.randn(1, 8, 4, 2).transpose(2, 3)  # (1, 8, 2, 4), last stride 2
    params = (None, None, 0, 0, None, 0.5, 0, -1, -1, 0.0, None, 0.0, 0)
    out, lse = torch.ops.flashattn_lite.fwd(q, q, q, *params, "cpu")
    expected, _ = torch.ops.flashattn_lite.fwd(q.contiguous(), q.contiguous(), q.contiguous(), *params, "reference")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_many_key_chunks_with_more_threads_than_heads(monkeypatch):
    """MQA, batch 1, 8 threads: key tiles are split into chunks (capped at 4) whose dQ
    partials are summed in a fixed order; the result must still match."""
    q, k, v = make_qkv(1, 64, 64, 8, 1, 16, torch.float32)
    dout = torch.randn(1, 64, 8, 16)
    monkeypatch.setenv("FLASHATTN_LITE_CPU_BWD_BLOCKS", "16,8")
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        ours = run_flash("cpu", q, k, v, dout)
    finally:
        torch.set_num_threads(threads)
    assert_matches_reference(ours, q, k, v, dout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap,alibi", [(5.0, None), (0.0, "heads"), (2.0, "batch-heads")])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (6, 3))])
def test_softcap_and_alibi(small_tiles, dtype, softcap, alibi, causal, window):
    _check(2, 67, 93, 4, 2, 32, dtype, causal=causal, window=window, softcap=softcap, alibi=alibi)


def test_softcap_alibi_gradcheck(small_tiles):
    q, k, v = make_qkv(2, 9, 13, 2, 1, 4, torch.float64)
    slopes = torch.rand(2, 2)
    with fl.use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda a, b, c: fl.flash_attn_func(a, b, c, causal=True, softcap=1.5, alibi_slopes=slopes), (q, k, v))


def _build_in(cache, timeout=300):
    script = "import flashattn_lite._build as b; print(b.build_cpu())"
    return subprocess.run([sys.executable, "-c", script], env=dict(os.environ, FLASHATTN_LITE_CACHE=str(cache)),
                          capture_output=True, text=True, timeout=timeout)


def test_build_recovers_from_a_killed_build_and_a_truncated_library(tmp_path):
    first = _build_in(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    lib = first.stdout.strip()
    # a build killed midway leaves torch's baton file, and possibly a cut-short library
    with open(os.path.join(os.path.dirname(lib), "lock"), "w"):
        pass
    with open(lib, "wb") as f:
        f.write(b"\x7fELF partial")
    second = _build_in(tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.strip() == lib and os.path.getsize(lib) > 100_000


def test_prebuilt_library_is_used_only_while_its_key_matches(tmp_path):
    (tmp_path / "_C.so").write_bytes(b"not loaded by this test")
    assert _build._prebuilt(str(tmp_path)) is None  # no stamp: not ours
    (tmp_path / _build.STAMP).write_text("0123456789abcdef")  # built from other sources/flags/torch/host
    assert _build._prebuilt(str(tmp_path)) is None
    (tmp_path / _build.STAMP).write_text(_build.cache_key())
    assert _build._prebuilt(str(tmp_path)) == str(tmp_path / "_C.so")


# ------------------------------------------------------------------ varlen, bias, dropout (issue 5)

_RAW_DEFAULTS = dict(cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, bias=None,
                     softmax_scale=0.5, diag_offset=0, window_left=-1, window_right=-1, softcap=0.0,
                     alibi_slopes=None, dropout_p=0.0, dropout_seed=0)


def _raw_args(**params):
    unknown = set(params) - set(_RAW_DEFAULTS)
    assert not unknown, unknown
    return [params.get(name, default) for name, default in _RAW_DEFAULTS.items()]


def _raw_fwd(q, k, v, **params):
    """torch.ops.flashattn_lite_C.fwd with Params' fields as keywords (defaults: no feature)."""
    _build.build_cpu()
    return torch.ops.flashattn_lite_C.fwd(q, k, v, *_raw_args(**params))


def _raw_bwd(dout, dlse, q, k, v, out, lse, bias_grad=False, **params):
    _build.build_cpu()
    return torch.ops.flashattn_lite_C.bwd(dout, dlse, q, k, v, out, lse, *_raw_args(**params), bias_grad, True)


def _cu(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _with_threads(n, fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _varlen_case(lens_q, lens_k, hq, hk, d, dtype, causal=False, window=(-1, -1), alibi=False, softcap=0.0,
                 dropout_p=0.0, seed=0):
    """flash_attn_varlen_func on cpu, forward and gradients: (results, inputs)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(sum(lens_k), hk, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(sum(lens_k), hk, d, generator=gen).to(dtype).requires_grad_()
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    slopes = torch.rand(len(lens_q), hq, generator=gen) if alibi else None
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    torch.manual_seed(seed)
    with fl.use_backend("cpu"), record_dropout() as calls:
        out, lse, _ = fl.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p=dropout_p,
                                                causal=causal, window_size=window, softcap=softcap,
                                                alibi_slopes=slopes, return_attn_probs=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    ours = dict(out=out.detach(), lse=lse.detach(), dq=dq, dk=dk, dv=dv)
    keep = calls[0].keep() if dropout_p > 0 else None
    inputs = dict(q=q, k=k, v=v, dout=dout, cu_q=cu_q, cu_k=cu_k, slopes=slopes, keep=keep)
    return ours, inputs


def _assert_varlen_matches(ours, inp, d, causal=False, window=(-1, -1), softcap=0.0, dropout_p=0.0):
    ref, base = reference_results_varlen(inp["q"], inp["k"], inp["v"], inp["dout"], inp["cu_q"], inp["cu_k"],
                                         d ** -0.5, causal, window, softcap, inp["slopes"],
                                         dropout_keep=inp["keep"], dropout_p=dropout_p)
    failed = [str(c) for c in check_against_reference(ours, ref, base, inp["q"].dtype) if not c.ok]
    assert not failed, "; ".join(failed)
    assert torch.equal(torch.isinf(ours["lse"]), torch.isinf(ref["lse"]))
    for key in ("out", "dq", "dk", "dv"):
        assert torch.isfinite(ours[key]).all(), key


# lengths with empty sequences on either side, one long sequence (many query/key tiles),
# and many short ones: the largest-first dynamic schedule has to place all of them
_MANY_Q = [0, 70, 3, 0, 17, 1, 33, 0, 5, 48, 2, 9, 0, 21, 64, 1, 7, 12, 0, 30]
_MANY_K = [4, 70, 0, 0, 40, 1, 16, 9, 5, 48, 31, 2, 3, 21, 80, 0, 7, 25, 6, 30]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal,window,alibi,softcap", [(False, (-1, -1), False, 0.0), (True, (-1, -1), True, 0.0),
                                                         (False, (9, 4), False, 3.0)],
                         ids=["plain", "causal-alibi", "window-softcap"])
def test_varlen_many_sequences_over_threads_and_tiles(small_tiles, dtype, causal, window, alibi, softcap):
    kw = dict(causal=causal, window=window, alibi=alibi, softcap=softcap)
    ours, inp = _with_threads(3, lambda: _varlen_case(_MANY_Q, _MANY_K, 4, 2, 24, dtype, **kw))
    kw.pop("alibi")
    _assert_varlen_matches(ours, inp, 24, **kw)
    # rows of empty key sequences: 0 and -inf; keys of empty query sequences: zero gradients
    cu_q, cu_k = inp["cu_q"].tolist(), inp["cu_k"].tolist()
    for b, (lq, lk) in enumerate(zip(_MANY_Q, _MANY_K)):
        if lk == 0 and lq > 0:
            assert (ours["out"][cu_q[b]:cu_q[b + 1]] == 0).all()
            assert torch.isinf(ours["lse"][:, cu_q[b]:cu_q[b + 1]]).all()
        if lq == 0 and lk > 0:
            assert (ours["dk"][cu_k[b]:cu_k[b + 1]] == 0).all() and (ours["dv"][cu_k[b]:cu_k[b + 1]] == 0).all()


# A decoding step of a padded batch, packed as varlen (the transformers integration's
# "padded" layout): every sequence has the same 1 (or, GQA >= 4, up to 4) query rows.
# Those run on the decode kernel, each sequence seeing its own packed keys; the
# lengths include an empty key sequence (out 0, lse -inf) and one shorter than the
# query rows (causal: its first row sees nothing).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,hq,hk", [(1, 4, 4), (1, 6, 2), (3, 8, 2)])
@pytest.mark.parametrize("causal,window,alibi,softcap", [(False, (-1, -1), False, 0.0), (True, (-1, -1), True, 0.0),
                                                         (False, (90, 0), False, 3.0)],
                         ids=["plain", "causal-alibi", "window-softcap"])
def test_varlen_decoding_step_on_the_decode_kernel(dtype, sq, hq, hk, causal, window, alibi, softcap):
    lens_k = [700, 0, 2, 1100, 37]
    kw = dict(causal=causal, window=window, alibi=alibi, softcap=softcap)
    ran = kernels_run(lambda: _varlen_decode_check([sq] * len(lens_k), lens_k, hq, hk, dtype, kw))
    assert ran == {"flashattn_lite_C::decode", "flashattn_lite_C::bwd"}


def _varlen_decode_check(lens_q, lens_k, hq, hk, dtype, kw):
    ours, inp = _varlen_case(lens_q, lens_k, hq, hk, 40, dtype, **kw)
    kw = {name: value for name, value in kw.items() if name != "alibi"}
    _assert_varlen_matches(ours, inp, 40, **kw)
    cu_q = inp["cu_q"].tolist()
    for b, lk in enumerate(lens_k):
        if lk == 0:
            assert (ours["out"][cu_q[b]:cu_q[b + 1]] == 0).all()
            assert torch.isinf(ours["lse"][:, cu_q[b]:cu_q[b + 1]]).all()


@pytest.mark.parametrize("case", ["unequal-rows", "two-rows-mha", "dropout"])
def test_varlen_the_decode_kernel_cannot_take(case):
    # Sequences with different query counts (here 1 and 2, so total = batch * max does
    # not hold either way), two rows of plain MHA, dropout: the tiled forward serves them.
    lens_q, hk, kw = {"unequal-rows": ([1, 2, 1], 2, {}), "two-rows-mha": ([2, 2], 4, {}),
                      "dropout": ([1, 1], 4, dict(dropout_p=0.25))}[case]
    lens_k = [50, 80, 30][:len(lens_q)]

    def run():
        ours, inp = _varlen_case(lens_q, lens_k, 4, hk, 16, torch.float32, causal=True, **kw)
        _assert_varlen_matches(ours, inp, 16, causal=True, **kw)

    ran = kernels_run(run)
    assert "flashattn_lite_C::fwd" in ran and "flashattn_lite_C::decode" not in ran


def test_varlen_bitwise_equal_across_thread_counts(small_tiles):
    runs = [_with_threads(n, lambda: _varlen_case(_MANY_Q, _MANY_K, 4, 1, 16, torch.float32, causal=True,
                                                  dropout_p=0.2, seed=7)[0]) for n in (1, 2, 3)]
    for other in runs[1:]:
        for key in runs[0]:
            assert torch.equal(runs[0][key], other[key]), key


_BIAS_DIMS = (2, 4, 29, 41)  # (B, H, Sq, Sk) of the bias tests


def _sdpa_bias_case(bias, hq=4, hk=2, d=16, dtype=torch.float32, seed=0, dropout_p=0.0):
    """SDPA with the float mask ``bias`` (requires grad) on cpu: ours, reference, baseline."""
    batch, sq, sk = _BIAS_DIMS[0], _BIAS_DIMS[2], _BIAS_DIMS[3]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, sq, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(batch, hk, sk, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(batch, hk, sk, d, generator=gen).to(dtype).requires_grad_()
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    with fl.use_backend("cpu"), record_dropout() as calls:
        out = fl.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True, dropout_p=dropout_p)
        dq, dk, dv, dbias = torch.autograd.grad(out, (q, k, v, bias), dout)
    assert dbias.shape == bias.shape and dbias.dtype == bias.dtype
    ours = dict(out=out.detach().transpose(1, 2), dq=dq.transpose(1, 2), dk=dk.transpose(1, 2),
                dv=dv.transpose(1, 2), dbias=dbias)
    keep = calls[0].keep() if dropout_p > 0 else None
    ref, base = reference_results(*(t.transpose(1, 2) for t in (q, k, v)), dout.transpose(1, 2), d ** -0.5,
                                  bias=bias, dropout_keep=keep, dropout_p=dropout_p)
    return ours, ref, base


def _bias(kind, dtype):
    """Float masks whose (B, H, Sq, Sk) view has stride-0 dims (the last one included) or a
    non-unit last stride."""
    B, H, Sq, Sk = _BIAS_DIMS
    shapes = {"full": (B, H, Sq, Sk), "2d": (Sq, Sk), "rows": (B, 1, Sq, 1), "cols": (1, H, 1, Sk),
              "scalar": (1, 1, 1, 1), "last-stride-0": (B, H, Sq, 1)}
    if kind == "transposed":  # last stride Sq
        t = torch.randn(B, H, Sk, Sq).transpose(-1, -2)
    else:
        t = torch.randn(shapes[kind])
    return (t * 2).to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["full", "2d", "rows", "cols", "scalar", "last-stride-0", "transposed"])
def test_bias_broadcast_strides(small_tiles, kind, dtype):
    ours, ref, base = _sdpa_bias_case(_bias(kind, dtype), dtype=dtype)
    assert_checks_ok(ours, ref, base, dtype)


def test_bias_with_dropout_softcap_alibi_window_gqa(small_tiles):
    """Every score modifier at once through the Python op (the interface has no softcap for
    SDPA): softcap, ALiBi, window, a bias with -inf entries and stride-0 heads, dropout, GQA."""
    q, k, v = make_qkv(2, 37, 45, 4, 2, 16, torch.float32)
    bias = (torch.randn(2, 1, 37, 45) * 2).masked_fill(torch.rand(2, 1, 37, 45) < 0.2, float("-inf"))
    bias.requires_grad_()
    dout = torch.randn(2, 37, 4, 16)
    slopes = torch.rand(2, 4)
    scale, offset, left, right, softcap, p, seed = 0.3, 8, 12, 3, 4.0, 0.3, 1234
    out, lse = torch.ops.flashattn_lite.fwd(q, k, v, None, None, 0, 0, bias.expand(2, 4, 37, 45), scale, offset,
                                            left, right, softcap, slopes, p, seed, "cpu")
    dq, dk, dv, dbias = torch.autograd.grad(out, (q, k, v, bias), dout)
    keep = rng.dropout_keep(seed, p, 2, 4, 37, 45)
    ref, base = reference_results(q, k, v, dout, scale, offset, left, right, softcap, slopes, bias=bias,
                                  dropout_keep=keep, dropout_p=p)
    assert_checks_ok(dict(out=out.detach(), lse=lse.detach(), dq=dq, dk=dk, dv=dv, dbias=dbias), ref, base, torch.float32)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref["lse"]))


@pytest.mark.parametrize("sq", [16, 1])
@pytest.mark.parametrize("window", [(-1, 0), (3, 2)], ids=["causal", "window"])
def test_bias_grad_on_tiles_the_band_cuts(small_tiles, window, sq):
    """Tiles the band cuts run on row slabs over the columns each sees; dBias still needs
    every element of the tile (0 outside the band).  One tile per head, so the first tile
    each worker runs is a cut one and its scratch is still NaN-poisoned; sq = 1 makes a
    one-row tile, whose single slab is still cut."""
    q, k, v = make_qkv(1, sq, 16, 2, 2, 8, torch.float32)
    bias = torch.randn(1, 2, sq, 16, requires_grad=True)
    dout = torch.randn(1, sq, 2, 8)
    out, lse = torch.ops.flashattn_lite.fwd(q, k, v, None, None, 0, 0, bias, 0.3, 0, *window, 0.0, None, 0.0, 0,
                                            "cpu")
    dq, dk, dv, dbias = torch.autograd.grad(out, (q, k, v, bias), dout)
    ref, base = reference_results(q, k, v, dout, 0.3, 0, *window, bias=bias)
    assert_checks_ok(dict(out=out.detach(), lse=lse.detach(), dq=dq, dk=dk, dv=dv, dbias=dbias), ref, base,
                     torch.float32)


def test_bias_all_neg_inf_rows_and_tiles(small_tiles):
    """Rows whose every score is -inf: out 0, lse -inf, zero gradients, never NaN; rows
    whose first key tiles are all -inf (the online softmax must not take its shift from them)."""
    B, H, Sq, Sk = 1, 2, 40, 90
    q, k, v = make_qkv(B, Sq, Sk, H, H, 16, torch.float32)
    bias = torch.randn(B, H, Sq, Sk)
    bias[:, :, 3] = float("-inf")  # whole row
    bias[:, 1, 10:20] = float("-inf")  # whole rows of one head only
    bias[:, :, 25:35, :70] = float("-inf")  # the first tiles (32 keys each) of these rows
    bias[:, :, 36, 1:] = float("-inf")  # one visible key, the first
    bias.requires_grad_()
    dout = torch.randn(B, Sq, H, 16)
    out, lse = torch.ops.flashattn_lite.fwd(q, k, v, None, None, 0, 0, bias, 0.25, 0, -1, -1, 0.0, None, 0.0, 0,
                                            "cpu")
    dq, dk, dv, dbias = torch.autograd.grad(out, (q, k, v, bias), dout)
    ours = dict(out=out.detach(), lse=lse.detach(), dq=dq, dk=dk, dv=dv, dbias=dbias)
    ref, base = reference_results(q, k, v, dout, 0.25, bias=bias)
    assert_checks_ok(ours, ref, base, torch.float32)
    assert (out[:, 3] == 0).all() and torch.isinf(lse[:, :, 3]).all() and (dq[:, 3] == 0).all()
    assert (dbias[:, :, 3] == 0).all()
    assert (out[:, 10:20, 1] == 0).all() and torch.isinf(lse[:, 1, 10:20]).all() and (dbias[:, 1, 10:20] == 0).all()
    assert torch.isfinite(lse[:, 0, 10:20]).all() and torch.isfinite(lse[:, :, 25:37]).all()


def _keep_from_one_hot_values(out, sk):
    """With q = 0 every visible probability is equal and v[j] = e_j, so out[..., j] is
    P_ij * keep_ij / (1 - p): exactly 0 where dropped (or invisible), positive where kept."""
    return out[..., :sk] != 0


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_mask_is_exactly_the_rng_mask(small_tiles, causal):
    B, Sq, Sk, H, D = 2, 37, 203, 3, 208  # keys: 7 tiles of 32 (tail 11), D >= Sk for one-hot rows
    q = torch.zeros(B, Sq, H, D)
    v = torch.eye(Sk, D).expand(B, H, Sk, D).transpose(1, 2).contiguous()
    k = torch.randn(B, Sk, H, D)
    with fl.use_backend("cpu"), record_dropout() as calls:
        out = fl.flash_attn_func(q, k, v, dropout_p=0.37, causal=causal)
    keep = calls[0].keep()  # (B, H, Sq, Sk)
    visible = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        visible = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
    got = _keep_from_one_hot_values(out.transpose(1, 2), Sk)
    assert torch.equal(got, keep & visible)
    assert 0.55 < keep.float().mean() < 0.71


def test_dropout_mask_varlen_and_counter_low_word_wrap(small_tiles):
    """Varlen counters ((h * total_q + row) * max_seqlen_k + j) with max_seqlen_k = 2**31 - 1:
    the counter's low word wraps inside a row for every even h * total_q + row (the
    vectorised Philox's scalar path).  The operator is called directly: the public
    function passes the longest key length as max_seqlen_k."""
    lens_q, lens_k, H, D = [3, 5], [13, 21], 2, 24
    total_q = sum(lens_q)
    q = torch.zeros(total_q, H, D)
    k = torch.randn(sum(lens_k), H, D)
    v = torch.cat([torch.eye(n, D) for n in lens_k])[:, None, :].expand(-1, H, D).contiguous()
    max_k, seed = 2 ** 31 - 1, 987654321
    out, _ = torch.ops.flashattn_lite.fwd(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max_k, None, D ** -0.5,
                                          0, -1, -1, 0.0, None, 0.5, seed, "cpu")
    thr = rng.threshold(0.5)
    row = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        for i in range(lq):
            for h in range(H):
                counter = (h * total_q + row) * max_k + torch.arange(lk, dtype=torch.int64)
                want = rng.philox_first_word(seed, counter) >= thr
                assert torch.equal(out[row, h, :lk] != 0, want), (b, i, h)
            row += 1


def test_dropout_bitwise_equal_across_thread_counts(small_tiles):
    q, k, v = make_qkv(2, 45, 70, 4, 2, 24, torch.float32)
    dout = torch.randn(2, 45, 4, 24)

    def run():
        torch.manual_seed(11)
        with fl.use_backend("cpu"):
            out, lse, _ = fl.flash_attn_func(q, k, v, dropout_p=0.25, causal=True, return_attn_probs=True)
            return (out, lse) + torch.autograd.grad(out, (q, k, v), dout)

    runs = [_with_threads(n, run) for n in (1, 2, 3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_backward_bitwise_equal_across_thread_counts():
    """The backward's key-block chunks (and so its dQ summation order) do not depend on
    the thread count, and no BLAS call is split among threads of its own."""
    q, k, v = make_qkv(1, 300, 520, 4, 1, 32, torch.float32)
    dout = torch.randn(1, 300, 4, 32)
    runs = [_with_threads(n, lambda: run_flash("cpu", q, k, v, dout, causal=True)) for n in (1, 2, 4)]
    for other in runs[1:]:
        for key in runs[0]:
            assert torch.equal(runs[0][key], other[key]), key


def test_gradcheck_bias_float64(small_tiles):
    q = torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 13, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 13, 4, dtype=torch.float64, requires_grad=True)
    full = torch.randn(1, 2, 9, 13, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(1, 1, 9, 1, dtype=torch.float64, requires_grad=True)  # stride 0 on heads and keys
    with fl.use_backend("cpu"):
        for bias in (full, rows):
            assert torch.autograd.gradcheck(
                lambda a, b, c, m: fl.scaled_dot_product_attention(a, b, c, attn_mask=m, enable_gqa=True),
                (q, k, v, bias))


def test_gradcheck_varlen_float64(small_tiles):
    lens_q, lens_k = [4, 0, 7, 2], [6, 3, 5, 0]
    q = torch.randn(sum(lens_q), 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lens_k), 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lens_k), 1, 4, dtype=torch.float64, requires_grad=True)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    slopes = torch.rand(4, 2)

    def f(a, b, c, dropout_p=0.0):
        torch.manual_seed(0)  # the same dropout mask on every evaluation
        return fl.flash_attn_varlen_func(a, b, c, cu_q, cu_k, 7, 6, causal=True, alibi_slopes=slopes,
                                         dropout_p=dropout_p)

    with fl.use_backend("cpu"):
        assert torch.autograd.gradcheck(f, (q, k, v))
        assert torch.autograd.gradcheck(lambda a, b, c: f(a, b, c, 0.3), (q, k, v))


def test_operator_checks_arguments_the_decode_route_would_take():
    # torch.ops.flashattn_lite.fwd runs without the interface's checks: arguments shaped
    # like a decoding step (one query row per sequence) but malformed must still raise
    # the operator's errors (flashattn_lite/checks.py), not reach the decode kernel (which
    # would read out of bounds).
    def op(q, k, **params):
        args = backends.Params(softmax_scale=0.25, **params).op_args()
        return torch.ops.flashattn_lite.fwd(q, k, k, *args, "cpu")

    def i32(*values):
        return torch.tensor(values, dtype=torch.int32)

    q, k = torch.randn(2, 4, 16), torch.randn(10, 4, 16)
    ok = dict(cu_seqlens_q=i32(0, 1, 2), cu_seqlens_k=i32(0, 4, 10), max_seqlen_q=1, max_seqlen_k=6)
    assert kernels_run(lambda: op(q, k, **ok)) == {"flashattn_lite_C::decode"}  # well-formed: routed
    cases = [
        (dict(cu_seqlens_k=i32(0, 4, 10_000_000)), r"cu_seqlens_k\[-1\] = 10000000"),
        (dict(cu_seqlens_k=i32(-5_000_000, 4, 10)), r"cu_seqlens_k\[0\] must be 0"),
        (dict(cu_seqlens_k=i32(0, 10)), "have 3 and 2 entries"),
        (dict(cu_seqlens_k=i32(0, 8, 5)), "non-decreasing"),
        (dict(max_seqlen_k=5), "max_seqlen_k = 5 is smaller"),
        (dict(cu_seqlens_q=torch.tensor([0, 1, 2])), "cu_seqlens_q must be int32"),
        (dict(alibi_slopes=torch.ones(1, 4)), "alibi_slopes must be a float32"),
        (dict(alibi_slopes=torch.ones(2, 4, dtype=torch.float64)), "alibi_slopes must be a float32"),
    ]
    for params, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            op(q, k, **dict(ok, **params))
    q, k = torch.randn(2, 1, 4, 16), torch.randn(2, 30, 4, 16)  # dense, one query row
    assert kernels_run(lambda: op(q, k)) == {"flashattn_lite_C::decode"}
    with pytest.raises((ValueError, TypeError), match="alibi_slopes must be a float32"):
        op(q, k, alibi_slopes=torch.ones(1, 4))
    with pytest.raises((ValueError, TypeError), match="q has batch 2 but k/v have 1"):
        op(q, k[:1])


def test_kernel_op_rejects_bad_varlen_bias_dropout_input():
    q3, k3 = torch.randn(10, 2, 8), torch.randn(12, 2, 8)
    cu_q, cu_k = torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32)
    ok = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=6, max_seqlen_k=7)
    _raw_fwd(q3, k3, k3, **ok)  # well-formed
    cases = [
        (dict(ok, cu_seqlens_q=cu_q.long()), "cu_seqlens_q must be int32"),
        (dict(ok, cu_seqlens_k=torch.tensor([0, 5, 7, 12], dtype=torch.int32)), "must have the same length"),
        (dict(ok, cu_seqlens_k=torch.tensor([0, 8, 5], dtype=torch.int32)), "non-decreasing"),
        (dict(ok, cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32)), r"cu_seqlens_q\[-1\] = 9"),
        (dict(ok, cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32)), r"cu_seqlens_q\[0\] must be 0"),
        (dict(ok, cu_seqlens_q=torch.tensor([[0, 4, 10]], dtype=torch.int32)), "must be 1-D"),
        (dict(ok, cu_seqlens_k=None), "must be given together"),
        (dict(ok, max_seqlen_q=5), "max_seqlen_q = 5 is smaller"),
        (dict(ok, max_seqlen_k=6), "max_seqlen_k = 6 is smaller"),
        (dict(ok, alibi_slopes=torch.ones(3, 2)), "alibi_slopes must be float32"),
        (dict(ok, bias=torch.zeros(1, 2, 10, 12)), "not supported with cu_seqlens"),
        (dict(ok, dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    ]
    for params, match in cases:
        with pytest.raises(RuntimeError, match=match):
            _raw_fwd(q3, k3, k3, **params)
    with pytest.raises(RuntimeError, match="must be 3-D"):
        _raw_fwd(q3[None], k3[None], k3[None], **ok)
    q = torch.randn(2, 5, 2, 8)
    for bias, match in [(torch.zeros(2, 2, 5, 4), "bias must be a"), (torch.zeros(2, 2, 5), "bias must be a"),
                        (torch.zeros(2, 2, 5, 5, dtype=torch.int32), "bias must be a floating-point")]:
        with pytest.raises(RuntimeError, match=match):
            _raw_fwd(q, q, q, bias=bias)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        _raw_fwd(q, q, q, dropout_p=-0.1)
    out, lse = _raw_fwd(q, q, q)
    with pytest.raises(RuntimeError, match="bias_grad needs a bias"):
        _raw_bwd(q, None, q, q, q, out, lse, bias_grad=True)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        _raw_bwd(q, None, q, q, q, out, lse[:, :, :4])
    with pytest.raises(RuntimeError, match="dout and out must have shape"):
        _raw_bwd(q[:, :4], None, q, q, q, out, lse)


def test_raw_bwd_returns_dbias_in_the_bias_dtype():
    q = torch.randn(1, 6, 2, 8, dtype=torch.bfloat16)
    bias = torch.randn(1, 1, 6, 1, dtype=torch.bfloat16).expand(1, 2, 6, 6)
    out, lse = _raw_fwd(q, q, q, bias=bias)
    *_, dbias = _raw_bwd(torch.randn_like(q), None, q, q, q, out, lse, bias_grad=True, bias=bias)
    assert dbias.shape == (1, 2, 6, 6) and dbias.dtype == torch.bfloat16 and dbias.is_contiguous()
    *_, none = _raw_bwd(torch.randn_like(q), None, q, q, q, out, lse, bias=bias)
    assert none.numel() == 0
