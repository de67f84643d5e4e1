"""Quantized KV caches: int8 / float8_e4m3fn caches with float32 descales.

Oracle: the float64 attention of test_kvcache.py's ``oracle`` over the *dequantized* cache
(codes times descales, in float64), with the tolerance rule of flashattn_lite.testing: a
quantized cache must give what its dequantized values give, to the query dtype's rounding.
The quantization rule itself (flashattn_lite.quant) is checked from its definition.
"""

import itertools

import pytest
import torch

import flashattn_lite as fl
from flashattn_lite.quant import dequantize
from flashattn_lite.testing import check_against_reference
from test_kvcache import geometry, make_case, oracle, rotated_inputs, slot

QDTYPES = [torch.int8, torch.float8_e4m3fn]
BACKENDS = ["cpu", "reference", "triton"]


def _name(dtype):
    return str(dtype).split(".")[-1]


# ------------------------------------------------------------------ quantize_kv


def test_quantize_kv_int8_rule():
    """descale = amax / 127 per row; codes round half to even; zero rows give 0 / 0."""
    x = torch.tensor([[127.0, 0.5, -1.5, 2.5, -127.0], [0.0, 0.0, 0.0, 0.0, 0.0], [254.0, 1.0, 3.0, -5.0, 0.0]])
    codes, descale = fl.quantize_kv(x, torch.int8)
    assert codes.dtype == torch.int8 and descale.dtype == torch.float32 and descale.shape == (3,)
    assert descale.tolist() == [1.0, 0.0, 2.0]
    assert codes.tolist() == [[127, 0, -2, 2, -127], [0, 0, 0, 0, 0], [127, 0, 2, -2, 0]]  # half to even


def test_quantize_kv_e4m3_rule():
    x = torch.randn(4, 3, 2, 16, dtype=torch.float64) * torch.logspace(-6, 6, 16, dtype=torch.float64)
    codes, descale = fl.quantize_kv(x, torch.float8_e4m3fn)
    assert codes.dtype == torch.float8_e4m3fn and descale.shape == (4, 3, 2)
    torch.testing.assert_close(descale, (x.abs().amax(-1) / 448).float())
    # each code is the nearest e4m3 value to x / descale (largest magnitude exactly 448)
    want = (x.float() / descale[..., None]).to(torch.float8_e4m3fn)
    assert torch.equal(codes.view(torch.uint8), want.view(torch.uint8))
    assert (codes.float().abs().amax(-1) == 448).all()
    err = (dequantize(codes, descale, torch.float64) - x).abs() / x.abs().amax(-1, keepdim=True)
    assert err.max() <= 2 ** -4  # 3 mantissa bits: half an ulp of the largest is 1/16 of it


@pytest.mark.parametrize("bad, kind, match", [
    (torch.tensor([1.0, float("inf")]), ValueError, "non-finite"),
    (torch.tensor([1e300, 1.0], dtype=torch.float64), ValueError, "beyond float32's range"),  # finite, not "non-finite"
    (torch.tensor([1, 2], dtype=torch.int32), TypeError, "floating-point"),
    (torch.tensor(1.0), ValueError, "at least one dim")])
def test_quantize_kv_errors(bad, kind, match):
    with pytest.raises(kind, match=match):
        fl.quantize_kv(bad, torch.int8)
    with pytest.raises(ValueError, match="torch.int8 or torch.float8_e4m3fn"):
        fl.quantize_kv(torch.randn(2, 4), torch.float16)


# ------------------------------------------------------------------ decoding


def quantize_cache(cache, dtype, form):
    """(codes, descale as given to the API) of a float cache: ``form`` "position" (one
    scale per (row, position, kv head)), "head" ((1, 1, heads_k)) or "tensor" ((1, 1, 1))."""
    if form == "position":
        return fl.quantize_kv(cache, dtype)
    dims = (0, 1, 3) if form == "head" else (0, 1, 2, 3)
    amax = cache.float().abs().amax(dim=dims, keepdim=True)
    descale = amax / (127.0 if dtype == torch.int8 else 448.0)
    scaled = cache.float() / descale
    codes = scaled.round().clamp(-127, 127).to(dtype) if dtype == torch.int8 else scaled.to(dtype)
    return codes, descale[..., 0] if form == "head" else descale.view(1, 1, 1)


def run_quant_case(backend, case, qdtype, form="position", causal=False, window=(-1, -1), softcap=0.0,
                   alibi=False, num_splits=0, sink=None, dv=None):
    """``case`` (test_kvcache.make_case, float caches) with its caches quantized; checks the
    appended codes/descales and out/lse against the float64 oracle over the dequantized cache."""
    q = case["q"]
    batch, sq, hq, d = q.shape
    k_codes, k_desc = quantize_cache(case["k_cache"], qdtype, form)
    v_float = case["v_cache"] if dv is None else torch.randn(*case["v_cache"].shape[:3], dv, dtype=q.dtype)
    v_codes, v_desc = quantize_cache(v_float, qdtype, form)
    args = dict(case, k_cache=k_codes.clone(), v_cache=v_codes.clone(), k_descale=k_desc.clone(),
                v_descale=v_desc.clone())
    if dv is not None and "v" in case:
        args["v"] = torch.randn(*case["v"].shape[:3], dv, dtype=q.dtype)
    slopes = torch.rand(hq) if alibi else None
    with fl.use_backend(backend):
        out, lse = fl.flash_attn_with_kvcache(**args, causal=causal, window_size=window, softcap=softcap,
                                              alibi_slopes=slopes, num_splits=num_splits, return_softmax_lse=True,
                                              learnable_sink=sink)
    assert out.shape == (batch, sq, hq, dv or d) and out.dtype == q.dtype
    lengths, snew, ends, starts, table, bidx = geometry(case)
    kc, vc = args["k_cache"], args["v_cache"]
    q64 = q.double()
    if snew:
        # the appended rows: quantize_kv of the new (rotated) keys and of the new values,
        # nothing else of the caches or descales changed
        new_k, q64 = rotated_inputs(case, lengths, causal, window)
        expect_k, expect_kd = k_codes.clone(), k_desc.clone()
        expect_v, expect_vd = v_codes.clone(), v_desc.clone()
        nk = fl.quantize_kv(new_k.to(q.dtype), qdtype)
        nv = fl.quantize_kv(args["v"], qdtype)
        for b, t in itertools.product(range(batch), range(snew)):
            blk, row = slot(b, lengths[b] + t, table, bidx, kc.shape[1])
            expect_k[blk, row], expect_kd[blk, row] = nk[0][b, t], nk[1][b, t]
            expect_v[blk, row], expect_vd[blk, row] = nv[0][b, t], nv[1][b, t]
        assert torch.equal(vc.view(torch.uint8), expect_v.view(torch.uint8))
        assert torch.equal(args["v_descale"], expect_vd)
        # the new keys are rotated by the API in q's dtype, the oracle in float64: a code
        # may differ by one step where the rotated value sits at a rounding boundary
        step = expect_kd[..., None].double() * (1.0 if qdtype == torch.int8 else 32.0)
        assert ((dequantize(kc, args["k_descale"], torch.float64) - dequantize(expect_k, expect_kd, torch.float64))
                .abs() <= step + 1e-12).all()
    k64 = dequantize(kc, args["k_descale"].expand(kc.shape[:3]), torch.float64)
    v64 = dequantize(vc, args["v_descale"].expand(vc.shape[:3]), torch.float64)
    scale = d ** -0.5
    ref, base = oracle(q64.to(q.dtype), q64, k64, v64, ends, starts, scale, causal, window, softcap, slopes, table,
                       bidx)
    if sink is not None:  # the sink joins each row's normaliser: out * sigmoid(lse - sink)
        for res in (ref, base):
            w = torch.sigmoid(res["lse"].double() - sink.double()[None, :, None]).nan_to_num(0.0)
            res["out"] = (res["out"].double() * w.transpose(1, 2)[..., None]).to(res["out"].dtype)
    failed = [str(c) for c in check_against_reference({"out": out, "lse": lse}, ref, base, q.dtype) if not c.ok]
    assert not failed, "; ".join(failed)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref["lse"]))
    assert torch.isfinite(out).all()


SCENARIOS = {
    # name: (make_case kwargs, run kwargs)
    "one-query-gqa": (dict(batch=3, seqlens=(0, 7, 37), capacity=40, hq=4, hk=2), {}),
    "paged3-append-causal": (dict(sq=3, snew=3, seqlens=(4, 20), page_size=3, capacity=30, hq=4, hk=1),
                             dict(causal=True, num_splits=3)),
    "paged16-window-softcap": (dict(sq=2, seqlens=(9, 30), page_size=16, capacity=40, hq=4, hk=2),
                               dict(window=(6, 0), softcap=4.0, num_splits=2)),
    "alibi-leftpad": (dict(sq=2, seqlens=(12, 20), leftpad=(3, 0), capacity=24, hq=2, hk=2), dict(alibi=True)),
    "batch-idx-append": (dict(sq=1, snew=2, seqlens=(5, 9), batch_idx=True, capacity=20, hq=2, hk=1),
                         dict(causal=True)),
    "rotary-append": (dict(sq=2, snew=2, seqlens=(3, 11), capacity=20, hq=2, hk=2, rotary=(8, False)),
                      dict(causal=True)),
    "sink-mla": (dict(sq=1, seqlens=(10, 25), page_size=8, capacity=32, hq=4, hk=1),
                 dict(sink=torch.tensor([0.5, -1.0, 2.0, 8.0]), dv=24)),
}


# the triton backend (interpreter) runs the scenarios that cover its branches: paged reads,
# appends, splits, window, softcap, GQA/MQA, sinks and a value head dim of its own
_TRITON_SCENARIOS = ("paged3-append-causal", "paged16-window-softcap", "sink-mla", "alibi-leftpad")
_CASES = [(backend, scenario) for backend in BACKENDS for scenario in SCENARIOS
          if backend != "triton" or scenario in _TRITON_SCENARIOS]


@pytest.mark.parametrize("backend, scenario", _CASES)
@pytest.mark.parametrize("qdtype", QDTYPES, ids=_name)
def test_quantized_cache_matches_the_dequantized_oracle(backend, qdtype, scenario):
    make, run = SCENARIOS[scenario]
    dtype = {"one-query-gqa": torch.bfloat16, "paged3-append-causal": torch.float16,
             "batch-idx-append": torch.bfloat16}.get(scenario, torch.float32)
    run_quant_case(backend, make_case(dtype=dtype, **make), qdtype, **run)


# model-sized head dims, for the cpu kernel's register blocks (csrc/cpu/decode_cpu.cpp:
# group_scores takes whole 2W-wide slices of D, group_accumulate_block whole 4W-wide slices
# of Dv and 4 query rows): full blocks (d 128, group of 4), a group of 3 (a short row block),
# 8 rows (two blocks) with d 96 (a 64-wide slice and a partial one), and d 80 (no whole
# slice of D; 64 + 16 of Dv); several key tiles, splits, an append
_HEAD_DIM_CASES = {
    "d128-g4": (dict(batch=2, sq=1, hq=8, hk=2, d=128, seqlens=(150, 37), capacity=160), {}),
    "d64-g3-append": (dict(batch=2, sq=1, snew=1, hq=6, hk=2, d=64, seqlens=(100, 9), capacity=128),
                      dict(causal=True)),
    "d96-sq2-g4-splits": (dict(batch=1, sq=2, hq=4, hk=1, d=96, seqlens=(200,), capacity=208),
                          dict(causal=True, num_splits=3)),
    "d80-g2-paged": (dict(batch=2, sq=1, hq=4, hk=2, d=80, seqlens=(70, 130), page_size=32, capacity=160), {}),
}


@pytest.mark.parametrize("scenario", list(_HEAD_DIM_CASES))
@pytest.mark.parametrize("qdtype", QDTYPES, ids=_name)
def test_model_head_dims_on_cpu(qdtype, scenario):
    make, run = _HEAD_DIM_CASES[scenario]
    dtype = torch.bfloat16 if "g4" in scenario else torch.float32
    run_quant_case("cpu", make_case(dtype=dtype, **make), qdtype, **run)


@pytest.mark.parametrize("form", ["head", "tensor"])
@pytest.mark.parametrize("qdtype", QDTYPES, ids=_name)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_broadcast_descales(backend, qdtype, form):
    """Per kv head (1, 1, heads_k) and per tensor (1, 1, 1) descales: broadcasts of the
    per-position form (read-only calls)."""
    case = make_case(sq=2, seqlens=(6, 13), page_size=4, capacity=16, hq=4, hk=2, dtype=torch.float32)
    run_quant_case(backend, case, qdtype, form=form, causal=True)


@pytest.mark.parametrize("qdtype", QDTYPES, ids=_name)
def test_outlier_keys_and_every_code(qdtype):
    """Keys with outliers (one channel 100x the rest) and caches holding every code value
    (all 256 bit patterns but e4m3's NaNs): the kernels read each code as torch does."""
    torch.manual_seed(0)
    b, s, hk, d = 1, 256, 1, 16
    if qdtype == torch.int8:
        codes = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
    else:
        bits = torch.arange(256, dtype=torch.int16).to(torch.uint8)
        bits = bits[(bits & 0x7F) != 0x7F]  # e4m3fn's NaNs
        codes = bits.view(torch.float8_e4m3fn)
    k_codes = codes[torch.randint(0, codes.numel(), (b, s, hk, d))].clone()
    v_codes = codes[torch.randint(0, codes.numel(), (b, s, hk, d))].clone()
    k_desc = torch.rand(b, s, hk) * 2e-3  # keys up to ~0.9 (e4m3) ...
    k_desc[:, ::17] *= 30  # ... and outlier positions 30x that
    v_desc = torch.rand(b, s, hk)
    q = torch.randn(b, 1, 2, d)
    k64, v64 = dequantize(k_codes, k_desc, torch.float64), dequantize(v_codes, v_desc, torch.float64)
    for backend in ("cpu", "triton"):
        with fl.use_backend(backend):
            out, lse = fl.flash_attn_with_kvcache(q, k_codes, v_codes, k_descale=k_desc, v_descale=v_desc,
                                                  return_softmax_lse=True)
        ref, base = oracle(q, q.double(), k64, v64, [s], [0], d ** -0.5, False, (-1, -1), 0.0, None, None, None)
        failed = [str(c) for c in check_against_reference({"out": out, "lse": lse}, ref, base, q.dtype) if not c.ok]
        assert not failed, f"{backend}: " + "; ".join(failed)


def test_e4m3_nan_codes_give_nan():
    """A NaN code (0x7F / 0xFF) is read as NaN, as torch reads it: never as a number."""
    k = torch.zeros(1, 4, 1, 8, dtype=torch.uint8)
    k[0, 2, 0, 3] = 0x7F
    k = k.view(torch.float8_e4m3fn)
    v = torch.zeros(1, 4, 1, 8, dtype=torch.float8_e4m3fn)
    ones = torch.ones(1, 4, 1)
    for backend in ("cpu", "triton"):
        with fl.use_backend(backend):
            out = fl.flash_attn_with_kvcache(torch.ones(1, 1, 1, 8), k, v, k_descale=ones, v_descale=ones)
        assert torch.isnan(out).all(), backend


# ------------------------------------------------------------------ errors


def _caches(dtype=torch.int8, b=2, s=8, hk=2, d=16):
    return (torch.zeros(b, s, hk, d, dtype=dtype), torch.zeros(b, s, hk, d, dtype=dtype),
            torch.ones(b, s, hk), torch.ones(b, s, hk))


def _q_inside_k_descale(kc, vc, vd):
    buf = torch.rand(200) + 0.5
    kd = buf[:32].view(2, 8, 2)  # position 3's descales are written by the append; q starts at buf[5]
    q = buf[5:5 + 128].view(2, 1, 4, 16)
    return fl.flash_attn_with_kvcache(q, kc, vc, torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16), cache_seqlens=3,
                                      k_descale=kd, v_descale=vd)


@pytest.mark.parametrize("call, kind, match", [
    (lambda q, kc, vc, kd, vd: fl.flash_attn_with_kvcache(q, kc, vc), ValueError, "needs k_descale and v_descale"),
    (lambda q, kc, vc, kd, vd: fl.flash_attn_with_kvcache(q, kc, vc, k_descale=kd), ValueError, "v_descale missing"),
    (lambda q, kc, vc, kd, vd: fl.flash_attn_with_kvcache(q, kc.float(), vc.float(), k_descale=kd, v_descale=vd),
     ValueError, "descales belong to quantized"),
    (lambda q, kc, vc, kd, vd: fl.flash_attn_with_kvcache(q, kc, vc, k_descale=kd[:, :4], v_descale=vd), ValueError,
     "broadcastable"),
    (lambda q, kc, vc, kd, vd: fl.flash_attn_with_kvcache(q, kc, vc, k_descale=kd.double(), v_descale=vd), TypeError,
     "float32"),
    (lambda q, kc, vc, kd, vd: fl.flash_attn_with_kvcache(q, kc, vc, k_descale=kd.to("meta"), v_descale=vd),
     ValueError, "meta"),
    (lambda q, kc, vc, kd, vd: fl.flash_attn_with_kvcache(q, kc, vc, k_descale=kd.tolist(), v_descale=vd),
     TypeError, "torch.Tensor"),
    (lambda q, kc, vc, kd, vd: fl.flash_attn_with_kvcache(q.to(torch.int8), kc, vc, k_descale=kd, v_descale=vd),
     TypeError, "q has dtype torch.int8"),
    (lambda q, kc, vc, kd, vd: fl.flash_attn_with_kvcache(q, kc, vc.view(torch.float8_e4m3fn), k_descale=kd,
                                                          v_descale=vd), TypeError, "share one dtype"),
    (lambda q, kc, vc, kd, vd: fl.flash_attn_with_kvcache(q, kc, vc, torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16),
                                                          cache_seqlens=3, k_descale=kd[:1, :1], v_descale=vd),
     ValueError, "not a broadcast"),
    (lambda q, kc, vc, kd, vd: fl.flash_attn_with_kvcache(q, kc, vc, torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16),
                                                          cache_seqlens=3, k_descale=kd, v_descale=kd),
     ValueError, "share memory"),
    (lambda q, kc, vc, kd, vd: fl.flash_attn_with_kvcache(q, kc, vc, torch.full((2, 1, 2, 16), float("inf")),
                                                          torch.randn(2, 1, 2, 16), cache_seqlens=3, k_descale=kd,
                                                          v_descale=vd), ValueError, "non-finite"),
    # q (or the new v) inside a descale the append writes: it was overwritten before being read
    (lambda q, kc, vc, kd, vd: _q_inside_k_descale(kc, vc, vd), ValueError, "q shares memory with k_descale"),
    (lambda q, kc, vc, kd, vd: fl.flash_attn_with_kvcache(q, kc, vc, torch.randn(2, 1, 2, 16),
                                                          kd.view(-1)[:32].view(1, 1, 2, 16).expand(2, 1, 2, 16),
                                                          cache_seqlens=3, k_descale=kd, v_descale=vd),
     ValueError, "the new v shares memory with k_descale"),
])
def test_bad_quantized_calls_raise_clear_errors(call, kind, match):
    q = torch.randn(2, 1, 4, 16)
    kc, vc, kd, vd = _caches()
    before = kc.clone(), kd.clone()
    with pytest.raises(kind, match=match):
        call(q, kc, vc, kd, vd)
    assert torch.equal(kc, before[0]) and torch.equal(kd, before[1])  # nothing appended


def test_decode_operator_checks_descales():
    """torch.ops.flashattn_lite.decode (public) validates the descales before any kernel."""
    q = torch.randn(2, 1, 4, 16)
    kc, vc, kd, vd = _caches()
    table = torch.arange(2, dtype=torch.int32)[:, None]
    seqlens = torch.full((2,), 8, dtype=torch.int32)
    args = (q, kc, vc, table, seqlens, None, 8, 0.25, -1, -1, 0.0, None, 0, "cpu", None)
    out, _ = torch.ops.flashattn_lite.decode(*args, k_descale=kd, v_descale=vd)
    assert torch.equal(out, torch.zeros_like(out))  # zero values
    with pytest.raises(ValueError, match="needs k_descale float32 of shape"):
        torch.ops.flashattn_lite.decode(*args)
    with pytest.raises(ValueError, match="needs v_descale float32 of shape"):
        torch.ops.flashattn_lite.decode(*args, k_descale=kd, v_descale=vd[:, :3])
    with pytest.raises(ValueError, match="belong to int8/float8_e4m3fn caches"):
        torch.ops.flashattn_lite.decode(q, kc.float(), vc.float(), *args[3:], k_descale=kd, v_descale=vd)


def test_fp64_queries_fall_back_to_the_reference_with_a_reason():
    q = torch.randn(1, 1, 2, 8, dtype=torch.float64)
    kc, vc, kd, vd = _caches(b=1, hk=1, d=8)
    with fl.use_backend("cpu"), pytest.raises(RuntimeError, match="not float64"):
        fl.flash_attn_with_kvcache(q, kc, vc, k_descale=kd, v_descale=vd)
    with fl.use_backend("reference"):
        out = fl.flash_attn_with_kvcache(q, kc, vc, k_descale=kd, v_descale=vd)
    assert out.dtype == torch.float64


def test_torch_compile_and_fake_tensors():
    """Under torch.compile the quantized call gives eager's bits; the decode operator's fake
    implementation takes the descales (shapes only, no kernel)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(5)
    kc, kd = fl.quantize_kv(torch.randn(1, 32, 2, 16))
    vc, vd = fl.quantize_kv(torch.randn(1, 32, 2, 16))
    q = torch.randn(1, 1, 4, 16)
    compiled = torch.compile(lambda q: fl.flash_attn_with_kvcache(q, kc, vc, k_descale=kd, v_descale=vd))
    with torch.no_grad():
        assert torch.equal(compiled(q), fl.flash_attn_with_kvcache(q, kc, vc, k_descale=kd, v_descale=vd))
    table, seqlens = torch.zeros(1, 1, dtype=torch.int32), torch.full((1,), 32, dtype=torch.int32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out, lse = torch.ops.flashattn_lite.decode(q, kc, vc, table, seqlens, None, 32, 0.25, -1, -1, 0.0, None, 0,
                                                   "cpu", None, k_descale=kd, v_descale=vd)
    assert out.shape == (1, 1, 4, 16) and lse.shape == (1, 4, 1)


@pytest.mark.parametrize("magnitude", [1e-3, 1e-4])
@pytest.mark.parametrize("qdtype", QDTYPES, ids=_name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_small_values_with_float16_queries(backend, qdtype, magnitude):
    """Values of magnitude 1e-4 give descales near 1e-6: Triton rounded P * descale to float16,
    into its subnormals, and was 2.3e-2 off relative to the output (now P * descale / the
    tile's largest).  Bound: float16's rounding of P and of the output, relative."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 1, 2, 64, generator=g).half()
    k_codes, k_desc = fl.quantize_kv(torch.randn(1, 64, 1, 64, generator=g), qdtype)
    v_codes, v_desc = fl.quantize_kv(torch.randn(1, 64, 1, 64, generator=g) * magnitude, qdtype)
    with torch.no_grad(), fl.use_backend(backend):
        out = fl.flash_attn_with_kvcache(q, k_codes, v_codes, k_descale=k_desc, v_descale=v_desc, num_splits=1)
    k64, v64 = dequantize(k_codes, k_desc, torch.float64), dequantize(v_codes, v_desc, torch.float64)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k64.expand(1, 64, 2, 64)) * 64 ** -0.5
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v64.expand(1, 64, 2, 64))
    rel = (out.double() - ref).abs().max() / ref.abs().max()
    assert rel <= 2 * torch.finfo(torch.float16).eps, rel
