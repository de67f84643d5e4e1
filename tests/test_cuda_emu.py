"""The CUDA C++ kernels (csrc/cuda), run on the CPU under the host emulator through
the ``cuda_emu`` backend, against the float64 reference with the project tolerance.

Tile sizes (csrc/cuda/fa_config.h): forward and dQ use 64 query rows x 64 keys (32 keys
at head dim 256), dK/dV 64 keys x 32 queries; the shapes below cross several blocks with
ragged tails.  Head dims off the compiled set (32, 64, 96, 128, 256) are zero padded;
a head dim that is not a multiple of 8, or unaligned strides, take the element-load path
instead of cp.async.
"""

import pytest
import torch
from helpers import check_case, make_qkv, run_flash

import flashattn_lite as fl
from flashattn_lite.backends import Call, select
from flashattn_lite.testing import check_against_reference, reference_results

F16, BF16 = torch.float16, torch.bfloat16


@pytest.fixture(scope="module", autouse=True)
def _emu():
    from flashattn_lite.backends import cuda_emu
    ok, why = cuda_emu.available()
    if not ok:
        pytest.skip(why)


CASES = [
    # batch, sq, sk, hq, hk, d, dtype, causal, window, memory
    (1, 130, 130, 2, 2, 64, F16, False, (-1, -1), "bshd"),
    (2, 70, 150, 2, 2, 64, BF16, False, (-1, -1), "bshd"),       # Sq < Sk
    (1, 150, 40, 2, 2, 32, F16, False, (-1, -1), "bshd"),        # Sq > Sk, one ragged key block
    (1, 70, 200, 2, 1, 64, F16, True, (-1, -1), "bshd"),         # causal, Sq < Sk (bottom-right)
    (1, 200, 70, 2, 1, 32, BF16, True, (-1, -1), "bshd"),        # causal, Sq > Sk: top rows see nothing
    (1, 160, 160, 2, 2, 32, F16, False, (40, 10), "bshd"),       # window both sides
    (1, 100, 170, 1, 1, 64, BF16, False, (-1, 0), "bshd"),       # causal by window
    (1, 170, 100, 1, 1, 32, F16, True, (25, -1), "bshd"),        # causal + left window
    (1, 96, 96, 4, 2, 32, F16, True, (-1, -1), "bshd"),          # GQA
    (2, 90, 200, 4, 2, 64, BF16, False, (30, 20), "bshd"),       # GQA + window, Sq < Sk
    (1, 90, 130, 4, 1, 64, BF16, False, (-1, -1), "bshd"),       # MQA
    (1, 80, 100, 2, 1, 96, F16, False, (-1, -1), "bshd"),        # head dim 96
    (1, 80, 100, 2, 1, 128, BF16, True, (-1, -1), "bshd"),       # head dim 128
    (1, 70, 90, 2, 1, 256, F16, False, (-1, -1), "bshd"),        # head dim 256 (8-warp dK/dV)
    (1, 70, 90, 1, 1, 256, BF16, True, (-1, -1), "bshd"),
    (1, 75, 110, 2, 2, 40, F16, False, (-1, -1), "bshd"),        # padded to 64
    (1, 75, 110, 2, 1, 17, BF16, True, (-1, -1), "bshd"),        # padded to 32, element loads
    (1, 100, 120, 2, 1, 200, BF16, False, (-1, -1), "bshd"),     # padded to 256
    (2, 90, 110, 2, 2, 64, F16, True, (-1, -1), "bhsd"),         # torch's layout through strides
    (1, 90, 70, 2, 1, 64, BF16, False, (-1, -1), "padded"),      # gaps between rows/heads, unaligned
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_matches_reference(case):
    batch, sq, sk, hq, hk, d, dtype, causal, window, memory = case
    check_case("cuda_emu", batch, sq, sk, hq, hk, d, dtype, causal=causal, window=window, memory=memory)


def test_softmax_scale_and_tiny_lengths():
    check_case("cuda_emu", 1, 1, 1, 2, 1, 64, F16, scale=0.3)
    check_case("cuda_emu", 1, 3, 65, 1, 1, 32, BF16, causal=True, scale=1.7)


def test_row_that_sees_nothing():
    # window (0, 0) with Sq > Sk: rows i >= Sk... no: bottom-right alignment puts row i on
    # key i + Sk - Sq, so the first Sq - Sk rows see no key at all.
    res = check_case("cuda_emu", 1, 100, 30, 1, 1, 32, F16, window=(0, 0))
    assert torch.isinf(res["lse"][0, 0, :70]).all() and (res["out"][0, :70] == 0).all()
    assert (res["dq"][0, :70] == 0).all()


def test_top_left_causal_through_sdpa():
    """scaled_dot_product_attention(is_causal=True) aligns the diagonal top-left (offset 0)."""
    q, k, v = make_qkv(1, 100, 140, 2, 2, 64, F16, memory="bhsd")
    q, k, v = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))  # (B, H, S, D)
    dout = torch.randn(1, 2, 100, 64, dtype=F16)
    with fl.use_backend("cuda_emu"):
        out = fl.scaled_dot_product_attention(q, k, v, is_causal=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    ours = {"out": out.detach().transpose(1, 2), "dq": dq.transpose(1, 2), "dk": dk.transpose(1, 2),
            "dv": dv.transpose(1, 2)}
    t = [x.detach().transpose(1, 2) for x in (q, k, v)]
    ref, base = reference_results(*t, dout.transpose(1, 2), 64 ** -0.5, 0, -1, 0)
    failed = [str(c) for c in check_against_reference(ours, ref, base, F16) if not c.ok]
    assert not failed, failed


def test_gradient_through_lse():
    q, k, v = make_qkv(1, 70, 90, 2, 1, 64, BF16)
    g = torch.randn(1, 2, 70)
    grads = {}
    for backend in ("cuda_emu", "reference"):
        with fl.use_backend(backend):
            out, lse, _ = fl.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
            grads[backend] = torch.autograd.grad((lse * g).sum() + out.float().sum(), (q, k, v))
    for ours, ref in zip(grads["cuda_emu"], grads["reference"]):
        assert (ours.float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max() + 1e-2


def test_backward_is_bitwise_deterministic():
    q, k, v = make_qkv(1, 130, 130, 4, 2, 64, F16)
    dout = torch.randn(1, 130, 4, 64, dtype=F16)
    a = run_flash("cuda_emu", q, k, v, dout, causal=True)
    b = run_flash("cuda_emu", q, k, v, dout, causal=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_auto_never_picks_cuda_emu():
    from flashattn_lite import backends
    assert all("cuda_emu" not in order for order in backends._AUTO_ORDER.values())
    assert "cuda_emu" in backends.BACKENDS  # listed (available_backends, info), never auto
    for device in ("cuda", "meta"):
        assert select(Call(torch.device(device), F16, 64)) != "cuda_emu"


@pytest.mark.parametrize("call, reason", [
    (Call(torch.device("cpu"), torch.float32, 64), "dtype"),
    (Call(torch.device("cpu"), F16, 300), "head_dim"),
    (Call(torch.device("cpu"), F16, 64, frozenset({"softcap"})), "softcap"),
    (Call(torch.device("cpu"), F16, 64, frozenset({"varlen"})), "varlen"),
    (Call(torch.device("cpu"), F16, 64, frozenset({"dropout"})), "dropout"),
    (Call(torch.device("cpu"), F16, 64, frozenset({"attn_mask"})), "attn_mask"),
    (Call(torch.device("cpu"), F16, 64, frozenset({"alibi"})), "alibi"),
])
def test_capability_check_declines(call, reason):
    from flashattn_lite.backends import cuda, cuda_emu
    assert reason in cuda_emu.supports(call)
    assert cuda.supports(Call(torch.device("cuda"), call.dtype, call.head_dim, call.features)) is not None


def test_forced_backend_raises_for_fp32():
    q, k, v = make_qkv(1, 8, 8, 1, 1, 32, torch.float32)
    with fl.use_backend("cuda_emu"), pytest.raises(RuntimeError, match="cuda_emu"):
        fl.flash_attn_func(q, k, v)


def test_operator_validates_before_launch():
    from flashattn_lite.backends import cuda_emu
    ops = cuda_emu._ops()
    q = torch.randn(1, 8, 3, 32, dtype=F16)
    k = torch.randn(1, 8, 2, 32, dtype=F16)
    args = (None, None, 0, 0, None, 0.1, 0, -1, -1, 0.0, None, 0.0, 0)
    with pytest.raises(RuntimeError, match="multiple of the number of kv heads"):
        ops.fwd(q, k, k, *args)
    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        ops.fwd(q.float(), k.float(), k.float(), *args)
    with pytest.raises(RuntimeError, match="unit stride"):
        ops.fwd(q.transpose(1, 3).contiguous().transpose(1, 3)[:, :, :2], k, k, *args)
    with pytest.raises(RuntimeError, match="dropout"):
        ops.fwd(q[:, :, :2], k, k, *args[:11], 0.5, 0)
    with pytest.raises(RuntimeError, match="softcap"):
        ops.fwd(q[:, :, :2], k, k, *args[:9], 1.0, None, 0.0, 0)


@pytest.mark.parametrize("sq, sk", [(0, 20), (20, 0), (1, 1)])
def test_empty_and_single_sequences(sq, sk):
    check_case("cuda_emu", 1, sq, sk, 2, 1, 64, BF16, causal=True)


@pytest.mark.parametrize("batch, sq, sk, hq, hk", [(1, 0, 20, 2, 1), (1, 0, 0, 2, 1), (0, 5, 6, 2, 1),
                                                    (1, 5, 0, 2, 1), (1, 5, 6, 0, 1)])
@pytest.mark.parametrize("strides", ["contiguous", "zero"])
def test_empty_inputs_through_autograd(batch, sq, sk, hq, hk, strides):
    """Nothing to compute (batch, heads or a sequence length 0): output 0, lse -inf, zero
    gradients, as on the cpu and reference backends, also for the all-zero-stride ``dout``
    autograd hands over for ``out.sum()`` and for empty inputs with zero strides (issue 14)."""
    def make(shape):
        if strides == "zero" and 0 in shape:
            return torch.empty_strided(shape, (0,) * 4, dtype=F16).requires_grad_()
        return torch.randn(shape, dtype=F16).requires_grad_()

    q, k, v = make((batch, sq, hq, 64)), make((batch, sk, hk, 64)), make((batch, sk, hk, 64))
    results = {}
    for backend in ("cuda_emu", "reference"):
        with fl.use_backend(backend):
            out, lse, _ = fl.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
            grads = torch.autograd.grad(out.float().sum() + lse.sum(), (q, k, v))
        results[backend] = (out, lse) + grads
    for ours, ref in zip(results["cuda_emu"], results["reference"]):
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        assert torch.equal(ours, ref)  # zeros and -inf: exact
    assert (results["cuda_emu"][1] == float("-inf")).all()


def test_binding_schemas_match_ops_cpp():
    """cuda_emu's operators (and the CUDA binding, which registers into flashattn_lite_C)
    take exactly csrc/ops.cpp's fwd/bwd schema."""
    import os
    import re

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

    def literal(text):
        return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', text))

    with open(os.path.join(root, "ops.cpp")) as f:
        ops = f.read()
    defs = {literal(d).split("(")[0]: literal(d) for d in re.findall(r"m\.def\((.*?)\);", ops, re.DOTALL)}
    with open(os.path.join(root, "cuda", "fa_torch.h")) as f:
        ours = f.read()
    for name, var in (("fwd", "kFwdSchema"), ("bwd", "kBwdSchema")):
        mine = literal(re.search(var + r" =(.*?);", ours, re.DOTALL).group(1))
        assert mine == defs[name]
