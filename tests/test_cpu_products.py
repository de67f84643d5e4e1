"""The CPU backend's ways of multiplying bf16 and fp16 tiles (products in that type, by this
extension's micro-kernel or by oneDNN's brgemm, or widened to float32), each forced with
FLASHATTN_LITE_CPU_MATMUL (bf16) or FLASHATTN_LITE_CPU_MATMUL_FP16 and compared with the
float64 reference; and the choice between them (measurement, cache, forcing, errors).  Shapes
have more than 64 queries so the forward takes the chosen path (shorter ones widen their
tiles either way); the decoding kernel's bf16 scores follow the choice too."""

import json
import os
import subprocess
import sys

import pytest
import torch

import flashattn_lite as fl
from flashattn_lite.backends import cpu
from flashattn_lite.testing import reference_results
from helpers import assert_checks_ok, check_case
from test_features import check_dropout, check_mask, check_varlen
from test_kvcache import make_case, run_case
from test_mla import _assert_ok, _dense, _qkv


def _has_unit():
    return cpu.probe_products()["unit"]


def _has_onednn():
    return cpu.probe_products()["onednn"] > 0


def _has_fp16_kernel():
    return cpu.probe_products()["fp16"] > 0


def _has_bf16fma():
    return cpu.probe_products()["bf16fma"] > 0


def _has_onednn_fp16():
    return cpu.probe_products()["onednn_fp16"] > 0


PATHS = [pytest.param(("bf16", "bf16"), marks=pytest.mark.skipif("not _has_unit()", reason="no AVX512-BF16 here")),
         pytest.param(("bf16", "onednn"), marks=pytest.mark.skipif("not _has_onednn()",
                                                                   reason="oneDNN's bf16 brgemm does not run here")),
         pytest.param(("bf16", "bf16fma"), marks=pytest.mark.skipif("not _has_bf16fma()", reason="no AVX-512 here")),
         ("bf16", "fp32"),
         pytest.param(("fp16", "fp16"), marks=pytest.mark.skipif("not _has_fp16_kernel()",
                                                                 reason="no fp16 micro-kernel (AVX-512) here")),
         pytest.param(("fp16", "onednn"), marks=pytest.mark.skipif("not _has_onednn_fp16()",
                                                                   reason="oneDNN's fp16 brgemm does not run here")),
         ("fp16", "fp32")]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _forced(param, monkeypatch):
    dtype, name = param
    monkeypatch.setenv(cpu.MATMUL_ENV if dtype == "bf16" else cpu.MATMUL_FP16_ENV, name)
    if name != "onednn":
        yield _DTYPES[dtype], name
        return
    # every product shape these tests meet goes to oneDNN (the process's budget of shapes
    # would otherwise send later tests' new shapes to the micro-kernel)
    cpu._ensure_built()
    budget = torch.ops.flashattn_lite_C.cpu_onednn_shapes()[1]
    torch.ops.flashattn_lite_C.cpu_onednn_shapes(1 << 30)
    try:
        yield _DTYPES[dtype], name
    finally:
        torch.ops.flashattn_lite_C.cpu_onednn_shapes(budget)


@pytest.fixture(params=PATHS, ids=lambda p: "-".join(p))
def path(request, monkeypatch):
    """(dtype, path): the tests' dtype, with its path forced (the other dtype's left as is)."""
    yield from _forced(request.param, monkeypatch)


@pytest.fixture(params=PATHS[:4], ids=lambda p: "-".join(p))
def bf16_path(request, monkeypatch):
    """bf16's paths only (fp16 caches always decode widened)."""
    yield from _forced(request.param, monkeypatch)


@pytest.mark.parametrize("case", [
    dict(batch=2, sq=130, sk=301, hq=4, hk=2, d=64, causal=True),      # GQA, Sq != Sk, bottom-right diagonal
    dict(batch=1, sq=257, sk=129, hq=2, hk=2, d=33, causal=True),      # odd head dim, rows with no key
    dict(batch=1, sq=200, sk=200, hq=2, hk=1, d=80, window=(37, 5)),   # window edges at odd keys
    dict(batch=1, sq=150, sk=150, hq=2, hk=2, d=16, softcap=5.0, alibi="heads"),
    dict(batch=1, sq=140, sk=700, hq=2, hk=2, d=128, memory="bhsd"),  # torch's layout: strided rows
    dict(batch=1, sq=100, sk=99, hq=1, hk=1, d=1),                     # head dim 1, odd key count
], ids=["gqa-causal", "d33", "window", "softcap-alibi", "bhsd-d128", "d1"])
def test_dense_against_reference(path, case):
    check_case("cpu", dtype=path[0], **case)


def test_varlen_and_mla_and_bias(path):
    dt = path[0]
    check_varlen("cpu", [70, 1, 0, 131], [90, 5, 3, 131], 4, 2, 64, dt, causal=True)
    check_varlen("cpu", [67, 100], [99, 100], 2, 2, 32, dt, window=(9, 4), softcap=3.0, alibi=True)
    q, k, v = _qkv(1, 96, 160, 4, 2, 192, 128, dt)  # MLA: Dv != D
    dout = torch.randn(1, 96, 4, 128, dtype=dt)
    ours = _dense("cpu", q, k, v, dout, causal=True)
    _assert_ok(ours, *reference_results(q, k, v, dout, 192 ** -0.5, 64, -1, 0), dt)
    check_mask("cpu", 1, 80, 96, 2, 1, 40, dt, (1, 2, 80, 96), "float-grad")  # bias with its gradient
    check_mask("cpu", 1, 80, 96, 2, 2, 40, dt, (80, 96), "bool", mask_rows=True)
    check_dropout("cpu", 1, 90, 120, 2, 2, 32, dt, 0.2, causal=True)


def test_sink_against_reference(path):
    dt = path[0]
    q, k, v = (torch.randn(1, 100, 2, 48, dtype=dt, requires_grad=True) for _ in range(3))
    sink = torch.randn(2, requires_grad=True)
    dout = torch.randn(1, 100, 2, 48, dtype=dt)
    ours = _dense("cpu", q, k, v, dout, sink=sink, causal=True)
    ref, base = reference_results(q, k, v, dout, 48 ** -0.5, 0, -1, 0, learnable_sink=sink)
    assert_checks_ok(ours, ref, base, dt)


def test_scores_rising_along_the_row(path):
    """Scores that rise by 16 nats along each row (a bias ramp): the forward's first shift
    of a row sits far below its later scores, where P under that shift would pass fp16's
    largest value (65504); the row must be rescaled before P is rounded, not overflow."""
    dt = path[0]
    q, k, v = (torch.randn(1, 130, 2, 32, dtype=dt, requires_grad=True) for _ in range(3))
    bias = torch.linspace(0, 16, 300).expand(1, 2, 130, 300).to(dt)
    k2, v2 = (torch.randn(1, 300, 2, 32, dtype=dt, requires_grad=True) for _ in range(2))
    dout = torch.randn(1, 130, 2, 32, dtype=dt)
    with fl.use_backend("cpu"):
        out = fl.scaled_dot_product_attention(q.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2),
                                              attn_mask=bias)
        grads = torch.autograd.grad(out, (q, k2, v2), dout.transpose(1, 2))
    ours = dict(out=out.detach().transpose(1, 2), dq=grads[0], dk=grads[1], dv=grads[2])
    ref, base = reference_results(q, k2, v2, dout, 32 ** -0.5, bias=bias)
    assert torch.isfinite(ours["out"]).all()
    assert_checks_ok(ours, ref, base, dt)


@pytest.mark.parametrize("grad_scale", [1e-3, 3e-5])
def test_small_gradients(path, grad_scale):
    """dO of 1e-3 and 3e-5 (a mean loss, no loss scaling): dS is far below 1, and rounded to
    fp16 as it is it would underflow; the gradients keep about fp16's relative precision
    (the float32 path: 1.7e-3 at 3e-5 on this shape)."""
    dt = path[0]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 300, 2, 64, dtype=dt, requires_grad=True) for _ in range(3))
    dout = (torch.randn(1, 300, 2, 64) * grad_scale).to(dt)
    ours = dict(zip(("out", "dq", "dk", "dv"), _fwd_bwd(q, k, v, dout, causal=False)))
    ref, _ = reference_results(q, k, v, dout, 64 ** -0.5)
    eps = 2.0 ** -10 if dt == torch.float16 else 2.0 ** -7
    for name in ("dq", "dk", "dv"):
        rel = ((ours[name].double() - ref[name]).abs().max() / ref[name].abs().max()).item()
        assert rel < 6 * eps, (name, rel)


def _fwd_bwd(q, k, v, dout, causal=True):
    with fl.use_backend("cpu"):
        out = fl.flash_attn_func(q, k, v, causal=causal)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def test_reproducible_and_thread_count_invariant(path):
    q, k, v = (torch.randn(2, 300, 4, 64, dtype=path[0], requires_grad=True) for _ in range(3))
    dout = torch.randn(2, 300, 4, 64, dtype=path[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fwd_bwd(q, k, v, dout)
        torch.set_num_threads(max(2, threads))
        many = _fwd_bwd(q, k, v, dout)
        again = _fwd_bwd(q, k, v, dout)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(many, again))  # the backward bit for bit
    assert torch.equal(one[0], many[0])  # the forward for any thread count


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_paths_differ_only_by_rounding(monkeypatch, dtype):
    """The paths on the same inputs: each within tolerance (above), and on a machine with
    the unit they really are different paths (P rounded to bf16/fp16 changes low bits)."""
    if dtype == "bf16":
        paths = [p for p, ok in (("bf16", _has_unit()), ("bf16fma", _has_bf16fma()), ("onednn", _has_onednn())) if ok]
    else:
        paths = [p for p, ok in (("fp16", _has_fp16_kernel()), ("onednn", _has_onednn_fp16())) if ok]
    if not paths:
        pytest.skip("one path on this CPU")
    env = cpu.MATMUL_ENV if dtype == "bf16" else cpu.MATMUL_FP16_ENV
    q, k, v = (torch.randn(1, 128, 2, 64, dtype=_DTYPES[dtype]) for _ in range(3))
    outs = {}
    for p in paths + ["fp32"]:
        monkeypatch.setenv(env, p)
        with fl.use_backend("cpu"):
            outs[p] = fl.flash_attn_func(q, k, v)
        assert cpu.products_choice()[dtype][0] == p
    assert all(not torch.equal(outs[p], outs["fp32"]) for p in paths if p != "onednn")
    for p in outs:
        assert (outs[p].float() - outs["fp32"].float()).abs().max() < (0.05 if dtype == "bf16" else 0.01)


def test_auto_choice_by_measurement_and_its_cache(monkeypatch, tmp_path):
    cache = tmp_path / "products.json"
    monkeypatch.setattr(cpu, "_probe_file", lambda: str(cache))
    rates = cpu.probe_products()  # measured: one thread, every way
    assert set(rates) == {"unit", "bf16", "fp32", "onednn", "fp16", "onednn_fp16", "bf16fma"} and rates["fp32"] > 0
    assert (rates["bf16"] > 0) == rates["unit"]
    assert rates["onednn"] == 0 or rates["unit"]
    assert rates["onednn_fp16"] == 0 or rates["fp16"] > 0
    assert (rates["bf16fma"] > 0) == (rates["fp16"] > 0)  # (the same AVX-512 kernel)
    assert json.loads(cache.read_text()) == rates

    def no_second_measurement():
        raise AssertionError("measured again despite the cache")
    monkeypatch.setattr(torch.ops.flashattn_lite_C, "cpu_probe_products", no_second_measurement, raising=False)
    assert cpu.probe_products() == rates

    monkeypatch.setenv(cpu.MATMUL_ENV, "auto")
    monkeypatch.setenv(cpu.MATMUL_FP16_ENV, "auto")
    for (own, fp32, dnn), expect in (((500.0, 100.0, 0.0), "own"),
                                     ((500.0, 100.0, 400.0), "own"),
                                     ((500.0, 100.0, 550.0), "own"),  # a near tie
                                     ((300.0, 100.0, 2000.0), "onednn"),  # AMX
                                     ((100.0, 100.0, 130.0), "onednn"),
                                     ((110.0, 100.0, 120.0), "fp32"),  # not worth P's rounding
                                     ((0.0, 100.0, 0.0), "fp32")):
        for dtype in ("bf16", "fp16"):
            fake = dict(unit=True, bf16=500.0, fp32=fp32, onednn=0.0, fp16=0.0, onednn_fp16=0.0, bf16fma=0.0)
            fake.update({dtype: own, "onednn" if dtype == "bf16" else "onednn_fp16": dnn})
            fake["unit"] = fake["bf16"] > 0
            want = dtype if expect == "own" else expect
            can = {"bf16": rates["unit"], "fp16": rates["fp16"] > 0}[dtype]
            if (want == dtype and not can) or (want == "onednn" and not rates["onednn" if dtype == "bf16"
                                                                                 else "onednn_fp16"]):
                continue  # the extension cannot switch to that engine here
            if dtype == "fp16" and fake["bf16"] > 0 and not rates["unit"]:
                fake.update(unit=False, bf16=0.0)  # (bf16's own choice must be one this machine can set)
            cache.write_text(json.dumps(fake))
            cpu._products["env"] = None  # re-decide at the next call
            path, why = cpu.products_choice()[dtype]
            assert path == want and "auto" in why and (not own or "GFLOP/s" in why), (dtype, fake, path, why)
    # bf16's two micro-kernels: the faster one; a missing or slow bf16 unit (Intel Xeon:
    # vdpbf16ps at half the fp32 FMA rate) leaves pairs widened for FMAs
    for fake, want in (({"unit": True, "bf16": 500.0, "bf16fma": 150.0}, "bf16"),
                       ({"unit": True, "bf16": 80.0, "bf16fma": 150.0}, "bf16fma"),
                       ({"unit": False, "bf16": 0.0, "bf16fma": 150.0}, "bf16fma"),
                       ({"unit": True, "bf16": 80.0, "bf16fma": 110.0}, "fp32")):
        if (want == "bf16" and not rates["unit"]) or (want == "bf16fma" and not rates["bf16fma"]):
            continue
        cache.write_text(json.dumps(dict(fake, fp32=100.0, onednn=0.0, fp16=0.0, onednn_fp16=0.0)))
        cpu._products["env"] = None
        assert cpu.products_choice()["bf16"][0] == want, fake
    cpu._products["env"] = None


def test_forcing_errors(monkeypatch):
    monkeypatch.setenv(cpu.MATMUL_ENV, "fast")
    q = torch.randn(1, 100, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="FLASHATTN_LITE_CPU_MATMUL='fast'.*auto, bf16, bf16fma, onednn, fp32"):
        with fl.use_backend("cpu"):
            fl.flash_attn_func(q, q, q)
    monkeypatch.setenv(cpu.MATMUL_ENV, "bf16")
    if _has_unit():
        with fl.use_backend("cpu"):
            fl.flash_attn_func(q, q, q)
    else:  # a forced path this CPU cannot run
        with pytest.raises(RuntimeError, match="FLASHATTN_LITE_CPU_MATMUL=bf16.*AVX512-BF16"):
            with fl.use_backend("cpu"):
                fl.flash_attn_func(q, q, q)
    monkeypatch.setenv(cpu.MATMUL_ENV, "onednn")
    if _has_onednn():
        with fl.use_backend("cpu"):
            fl.flash_attn_func(q, q, q)
    else:  # the reason names what is missing
        with pytest.raises(RuntimeError, match="FLASHATTN_LITE_CPU_MATMUL=onednn.*(AVX512-BF16|oneDNN)"):
            with fl.use_backend("cpu"):
                fl.flash_attn_func(q, q, q)
    for bad in (4, -1):
        with pytest.raises(ValueError, match="cpu_bf16_products takes 0, 1, 2 or 3"):
            torch.ops.flashattn_lite_C.cpu_bf16_products(bad)
    for bad in (3, -1):
        with pytest.raises(ValueError, match="cpu_fp16_products takes 0, 1 or 2"):
            torch.ops.flashattn_lite_C.cpu_fp16_products(bad)
    monkeypatch.setenv(cpu.MATMUL_ENV, "bf16fma")
    if _has_bf16fma():
        with fl.use_backend("cpu"):
            fl.flash_attn_func(q, q, q)
    else:
        with pytest.raises(RuntimeError, match="FLASHATTN_LITE_CPU_MATMUL=bf16fma.*AVX-512"):
            with fl.use_backend("cpu"):
                fl.flash_attn_func(q, q, q)
    monkeypatch.delenv(cpu.MATMUL_ENV)
    for bad in ("bf16", "fast"):  # (bf16 is not an fp16 path)
        monkeypatch.setenv(cpu.MATMUL_FP16_ENV, bad)
        with pytest.raises(ValueError, match=f"FLASHATTN_LITE_CPU_MATMUL_FP16='{bad}'.*auto, fp16, onednn, fp32"):
            with fl.use_backend("cpu"):
                fl.flash_attn_func(q, q, q)
    monkeypatch.setenv(cpu.MATMUL_FP16_ENV, "fp16")
    if _has_fp16_kernel():
        with fl.use_backend("cpu"):
            fl.flash_attn_func(q.half(), q.half(), q.half())
    else:  # a forced path this CPU cannot run
        with pytest.raises(RuntimeError, match="FLASHATTN_LITE_CPU_MATMUL_FP16=fp16.*AVX-512"):
            with fl.use_backend("cpu"):
                fl.flash_attn_func(q.half(), q.half(), q.half())
    monkeypatch.setenv(cpu.MATMUL_FP16_ENV, "onednn")
    if _has_onednn_fp16():
        with fl.use_backend("cpu"):
            fl.flash_attn_func(q.half(), q.half(), q.half())
    else:  # the reason names what is missing
        with pytest.raises(RuntimeError, match="FLASHATTN_LITE_CPU_MATMUL_FP16=onednn.*(AVX-512|oneDNN)"):
            with fl.use_backend("cpu"):
                fl.flash_attn_func(q.half(), q.half(), q.half())
    monkeypatch.delenv(cpu.MATMUL_FP16_ENV)
    cpu._products["env"] = None


def test_each_dtype_follows_its_own_choice(monkeypatch):
    """bf16's choice leaves fp16 and fp32 alone, fp16's leaves bf16 and fp32: same bits."""
    for env, other, paths in ((cpu.MATMUL_ENV, torch.float16, ("bf16", "bf16fma", "onednn", "fp32")),
                              (cpu.MATMUL_FP16_ENV, torch.bfloat16, ("fp16", "onednn", "fp32"))):
        outs = []
        for p in paths:
            monkeypatch.setenv(env, p)
            torch.manual_seed(0)
            try:
                with fl.use_backend("cpu"):
                    outs.append([fl.flash_attn_func(*(torch.randn(1, 100, 2, 32, dtype=dt) for _ in range(3)))
                                 for dt in (other, torch.float32)])
            except RuntimeError as exc:  # an engine this machine cannot run
                assert p != "fp32" and env in str(exc)
        assert len(outs) >= 1
        assert all(torch.equal(a, b) for o in outs for a, b in zip(outs[0], o))
        monkeypatch.delenv(env)
    cpu._products["env"] = None


@pytest.mark.parametrize("d,hq,hk,sq", [(128, 8, 2, 1), (64, 6, 2, 1), (80, 6, 2, 2), (33, 3, 1, 3), (256, 4, 4, 1)],
                         ids=["d128-g4", "d64-g3", "d80-g3-2rows", "d33-g3-3rows", "d256-mha"])
def test_decode_against_reference(bf16_path, d, hq, hk, sq):
    """The decoding kernel's bf16 caches: the scores by vdpbf16ps from q's bf16 rows under
    either bf16 engine, widened under fp32; register blocks of 1, 2, 3 and 4 rows (9 rows:
    4 + 4 + 1), odd and multi-block head dims, pages across key tiles, windows, softcap,
    ALiBi, key splits."""
    case = make_case(batch=2, sq=sq, hq=hq, hk=hk, d=d, dtype=torch.bfloat16, seqlens=(150, 77), snew=sq,
                     page_size=7, capacity=170)
    run_case("cpu", case, causal=True, num_splits=2)
    run_case("cpu", case, causal=True, window=(40, 0), softcap=5.0, alibi="heads", num_splits=1)


def test_auto_falls_back_when_onednn_is_refused(monkeypatch, tmp_path):
    """A cached measurement that chose oneDNN, refused in this process (its self-check, or
    a torch without it): auto takes the next choice and says why, instead of failing."""
    cache = tmp_path / "products.json"
    monkeypatch.setattr(cpu, "_probe_file", lambda: str(cache))
    cache.write_text(json.dumps({"unit": True, "bf16": 500.0, "fp32": 100.0, "onednn": 2000.0, "fp16": 0.0,
                                 "onednn_fp16": 0.0, "bf16fma": 0.0}))
    calls = []

    class Lib:
        def cpu_bf16_products(self, engine):
            calls.append(engine)
            if engine == 2:
                raise RuntimeError("flashattn_lite cpu: oneDNN's bf16 brgemm failed here: refused\nbacktrace")

        def cpu_fp16_products(self, engine):
            calls.append(("fp16", engine))

        def cpu_onednn_shapes(self):
            return [0, 128]

    monkeypatch.setenv(cpu.MATMUL_ENV, "auto")
    monkeypatch.setenv(cpu.MATMUL_FP16_ENV, "fp32")
    try:
        cpu._set_products(Lib())
        assert calls == [2, 1, ("fp16", 0)]
        path, why = cpu._products["bf16"]
        assert path == "bf16"
        assert why.endswith("oneDNN refused here: flashattn_lite cpu: oneDNN's bf16 brgemm failed here: refused")
    finally:
        cpu._products["env"] = None  # re-decide with the real extension at the next call


def test_onednn_shape_budget(monkeypatch):
    """oneDNN keeps code for every product shape it meets, per thread, for the life of the
    process, so a process admits at most a budget of shapes to it: products of the other
    shapes run on the micro-kernel, with the same operands and within the same tolerance.
    Shapes are counted after rounding (rows to 16, columns to 32, pairs to 16)."""
    if not _has_onednn():
        pytest.skip("oneDNN's bf16 brgemm does not run here")
    monkeypatch.setenv(cpu.MATMUL_ENV, "onednn")
    cpu._ensure_built()
    shapes = torch.ops.flashattn_lite_C.cpu_onednn_shapes
    n0, budget = shapes()
    try:
        shapes(n0)  # full: nothing new is admitted
        check_case("cpu", dtype=torch.bfloat16, batch=1, sq=211, sk=347, hq=2, hk=1, d=72, causal=True)
        assert shapes()[0] == n0
        shapes(n0 + 3)  # room for three of the many new shapes below
        check_case("cpu", dtype=torch.bfloat16, batch=1, sq=233, sk=389, hq=2, hk=2, d=88, window=(100, 7))
        assert shapes()[0] == n0 + 3
        # many lengths, fresh shapes each (a server's prompts): the count stops at the budget
        for n in (150, 166, 181, 197):
            check_case("cpu", dtype=torch.bfloat16, batch=1, sq=n, sk=n + 5, hq=1, hk=1, d=56, causal=True)
        assert shapes()[0] == n0 + 3
    finally:
        shapes(budget)
    assert shapes() == [n0 + 3, budget]


def test_onednn_shape_budget_from_the_environment(tmp_path):
    """FLASHATTN_LITE_ONEDNN_SHAPES sets the budget; a bad value is a clear error."""
    if not _has_onednn():
        pytest.skip("oneDNN's bf16 brgemm does not run here")
    code = ("import torch, flashattn_lite as fl\n"
            "q = torch.randn(1, 100, 1, 32, dtype=torch.bfloat16)\n"
            "for attempt in range(2):  # a bad value raises every time, not just once\n"
            "    try:\n"
            "        with fl.use_backend('cpu'):\n"
            "            fl.flash_attn_func(q, q, q)\n"
            "    except ValueError as exc:\n"
            "        print('raised', attempt, exc)\n"
            "print(torch.ops.flashattn_lite_C.cpu_onednn_shapes())\n")
    env = dict(os.environ, FLASHATTN_LITE_CPU_MATMUL="onednn", FLASHATTN_LITE_ONEDNN_SHAPES="2")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[2, 2]"
    for bad in ("many", "-4", "12x"):
        env["FLASHATTN_LITE_ONEDNN_SHAPES"] = bad
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode != 0  # (the last line's query raises too)
        for attempt in (0, 1):
            assert f"raised {attempt} " in run.stdout, run.stdout
        assert f"FLASHATTN_LITE_ONEDNN_SHAPES must be an integer >= 0, got '{bad}'" in run.stdout


def test_onednn_with_mkldnn_switched_off(monkeypatch):
    """oneDNN chosen, then torch.backends.mkldnn switched off: the micro-kernel runs the same
    operands (no error, still within tolerance); choosing oneDNN while it is off is refused."""
    if not _has_onednn():
        pytest.skip("oneDNN's bf16 brgemm does not run here")
    monkeypatch.setenv(cpu.MATMUL_ENV, "onednn")
    q, k, v = (torch.randn(1, 100, 2, 32, dtype=torch.bfloat16) for _ in range(3))
    with fl.use_backend("cpu"):
        fl.flash_attn_func(q, k, v)
    with torch.backends.mkldnn.flags(enabled=False):
        check_case("cpu", dtype=torch.bfloat16, batch=1, sq=100, sk=90, hq=2, hk=1, d=40, causal=True)
        cpu._products["env"] = None
        with pytest.raises(RuntimeError, match="FLASHATTN_LITE_CPU_MATMUL=onednn.*torch.backends.mkldnn enabled"):
            with fl.use_backend("cpu"):
                fl.flash_attn_func(q, k, v)
    cpu._products["env"] = None
