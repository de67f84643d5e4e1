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
from flashattn_lite import _build, backends

from helpers import assert_matches_reference, check_case, make_qkv, run_flash

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setenv("FLASHATTN_LITE_CPU_FWD_BLOCKS", "16,32")
    monkeypatch.setenv("FLASHATTN_LITE_CPU_BWD_BLOCKS", "16,16")


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


def test_forward_bitwise_equal_across_thread_counts():
    q, k, v = make_qkv(2, 300, 520, 4, 2, 64, torch.float32, requires_grad=False)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run_flash("cpu", q, k, v, causal=True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(results[0]["out"], other["out"]) and torch.equal(results[0]["lse"], other["lse"])


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_online_softmax_shift_raised_by_later_tiles(small_tiles, dtype):
    """Scores in later key tiles far above the first tile's (and above the
    provisional shift) take the rescaling path; the result must not change."""
    q, k, v = make_qkv(1, 40, 100, 2, 1, 16, dtype, requires_grad=False)
    with torch.no_grad():
        k[:, :, :, :] = k * 0.01
        k[:, 64:] = q[:, :1].mean(2, keepdim=True) * 30  # tile 3 scores ~ +30 nats higher
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
