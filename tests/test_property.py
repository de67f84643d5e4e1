"""Property-based: random valid shapes and options, forward and gradients
against the float64 reference, on the reference, C++ cpu and Triton backends."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashattn_lite.testing import record_dropout
from helpers import assert_matches_reference, make_qkv, run_flash

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@st.composite
def attention_cases(draw):
    hk = draw(st.integers(1, 2))
    window = draw(st.sampled_from([(-1, -1), (-1, -1), (4, 0), (6, 3), (-1, 2), (10, -1)]))
    return dict(
        batch=draw(st.integers(1, 2)),
        sq=draw(st.integers(0, 40)),
        sk=draw(st.integers(0, 40)),
        hk=hk,
        hq=hk * draw(st.integers(1, 3)),
        d=draw(st.integers(1, 72)),
        dtype=draw(st.sampled_from(DTYPES)),
        causal=draw(st.booleans()),
        window=window,
        memory=draw(st.sampled_from(["bshd", "bhsd", "padded"])),
        scale=draw(st.sampled_from([None, 0.1, 1.0])),
        softcap=draw(st.sampled_from([0.0, 0.0, 3.0])),
        alibi=draw(st.sampled_from([None, None, "heads", "batch-heads"])),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.0, 0.3])),
    )


def _property(backend, case):
    if backend == "triton" and case["dtype"] == torch.float64:
        case = dict(case, dtype=torch.float32)  # triton declines float64 by design
    q, k, v = make_qkv(case["batch"], case["sq"], case["sk"], case["hq"], case["hk"], case["d"], case["dtype"],
                       case["memory"])
    dout = torch.randn(case["batch"], case["sq"], case["hq"], case["d"], dtype=case["dtype"])
    slopes = {None: None, "heads": torch.rand(case["hq"]),
              "batch-heads": torch.rand(case["batch"], case["hq"])}[case["alibi"]]
    kw = dict(causal=case["causal"], window_size=case["window"], softmax_scale=case["scale"],
              softcap=case["softcap"], alibi_slopes=slopes, dropout_p=case["dropout"])
    with record_dropout() as calls:
        ours = run_flash(backend, q, k, v, dout, **kw)
    keep = calls[0].keep() if calls else None
    assert_matches_reference(ours, q, k, v, dout, dropout_keep=keep, **kw)


_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=40, **_SETTINGS)
@given(case=attention_cases())
def test_reference_backend_property(case):
    _property("reference", case)


@settings(max_examples=40, **_SETTINGS)
@given(case=attention_cases())
def test_cpu_backend_property(case):
    # small tiles so that the drawn lengths cross tile boundaries
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FLASHATTN_LITE_CPU_FWD_BLOCKS", "16,16")
        m.setenv("FLASHATTN_LITE_CPU_BWD_BLOCKS", "16,16")
        _property("cpu", case)


@pytest.mark.triton
@settings(max_examples=30, **_SETTINGS)
@given(case=attention_cases())
def test_triton_backend_property(case):
    _property("triton", case)


@st.composite
def varlen_mask_cases(draw):
    """Packed sequences (varlen) or an SDPA attention mask, with the options that combine with them."""
    hk = draw(st.integers(1, 2))
    n = draw(st.integers(1, 3))
    return dict(
        kind=draw(st.sampled_from(["varlen", "mask"])),
        lens_q=draw(st.lists(st.integers(0, 24), min_size=n, max_size=n)),
        lens_k=draw(st.lists(st.integers(0, 24), min_size=n, max_size=n)),
        hk=hk, hq=hk * draw(st.integers(1, 2)), d=draw(st.integers(1, 40)),
        dtype=draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])),
        causal=draw(st.booleans()),
        window=draw(st.sampled_from([(-1, -1), (-1, -1), (3, 1)])),
        softcap=draw(st.sampled_from([0.0, 0.0, 3.0])),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.3])),
        mask_shape=draw(st.sampled_from(["full", "2d", "rows"])),
        bias_grad=draw(st.booleans()),
    )


def _varlen_mask_property(backend, case):
    import test_features as tf

    if case["kind"] == "varlen":
        if max(case["lens_q"]) == 0 or max(case["lens_k"]) == 0:
            case = dict(case, lens_q=[1] + case["lens_q"][1:], lens_k=[1] + case["lens_k"][1:])
        tf.check_varlen(backend, case["lens_q"], case["lens_k"], case["hq"], case["hk"], case["d"], case["dtype"],
                        causal=case["causal"], window=case["window"], softcap=case["softcap"],
                        dropout_p=case["dropout"])
    else:
        batch, sq, sk = len(case["lens_q"]), max(case["lens_q"]) or 1, max(case["lens_k"]) or 1
        shape = {"full": (batch, case["hq"], sq, sk), "2d": (sq, sk), "rows": (batch, 1, sq, 1)}[case["mask_shape"]]
        tf.check_mask(backend, batch, sq, sk, case["hq"], case["hk"], case["d"], case["dtype"], shape,
                      "float-grad" if case["bias_grad"] else "bool", dropout_p=case["dropout"])


@settings(max_examples=25, **_SETTINGS)
@given(case=varlen_mask_cases())
def test_cpu_backend_varlen_mask_property(case):
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FLASHATTN_LITE_CPU_FWD_BLOCKS", "16,16")
        m.setenv("FLASHATTN_LITE_CPU_BWD_BLOCKS", "16,16")
        _varlen_mask_property("cpu", case)


@pytest.mark.triton
@settings(max_examples=20, **_SETTINGS)
@given(case=varlen_mask_cases())
def test_triton_backend_varlen_mask_property(case):
    _varlen_mask_property("triton", case)
