"""The SDPA monkey-patch: numerics on code that calls F.scaled_dot_product_attention directly,
routing (supported calls to flashattn_lite, the rest to torch), and restoration."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flashattn_lite as fl
import flashattn_lite.sdpa_patch as sp
from flashattn_lite.testing import FWD_FACTOR, GRAD_FACTOR, compare

ORIGINAL = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _restore():
    yield
    fl.disable_sdpa_patch()
    F.scaled_dot_product_attention = ORIGINAL


@pytest.fixture
def routed(monkeypatch):
    calls = []
    real = sp._fa_sdpa

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sp, "_fa_sdpa", spy)
    return calls


class TinyAttentionModel(nn.Module):
    """A block that calls F.scaled_dot_product_attention itself, as many codebases do."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd)
        self.o = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.hd).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


def _model_results(model, x, mask):
    x = x.detach().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x, mask)
    y.square().sum().backward()
    return y.detach(), torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("masked", [False, True])
def test_patch_numerics_on_a_model_calling_sdpa(routed, masked):
    torch.manual_seed(0)
    model = TinyAttentionModel()
    model64 = TinyAttentionModel().double()
    model64.load_state_dict(model.state_dict())
    x = torch.randn(2, 9, 32)
    mask = None
    if masked:
        mask = torch.rand(2, 1, 9, 9) < 0.7
        mask[..., 0] = True
    ref = _model_results(model64, x.double(), mask)
    base = _model_results(model, x, mask)
    with fl.patch_sdpa():
        assert fl.sdpa_patch_enabled() and F.scaled_dot_product_attention is not ORIGINAL
        ours = _model_results(model, x, mask)
    assert routed, "the patched call did not reach flashattn_lite"
    for name, i, factor in (("out", 0, FWD_FACTOR), ("grads", 1, GRAD_FACTOR)):
        c = compare(name, ours[i], ref[i], base[i], torch.float32, factor, ref[i].abs().max().item())
        assert c.ok, str(c)
    assert F.scaled_dot_product_attention is ORIGINAL and not fl.sdpa_patch_enabled()


def test_patch_reaches_transformers_sdpa_and_multihead_attention(routed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with fl.patch_sdpa():
            got = model(input_ids=ids).logits
    assert routed
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    routed.clear()
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 5, 32)
    expected = mha(x, x, x, need_weights=False)[0]
    with fl.patch_sdpa():
        got = mha(x, x, x, need_weights=False)[0]
    assert routed
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_restores_on_exit_exception_and_nesting():
    with pytest.raises(KeyError):
        with fl.patch_sdpa():
            assert F.scaled_dot_product_attention is not ORIGINAL
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is ORIGINAL and not fl.sdpa_patch_enabled()
    with fl.patch_sdpa():
        patched = F.scaled_dot_product_attention
        with fl.patch_sdpa():
            assert F.scaled_dot_product_attention is patched
        assert F.scaled_dot_product_attention is patched  # the inner exit keeps the outer patch
    assert F.scaled_dot_product_attention is ORIGINAL
    assert fl.enable_sdpa_patch() is False and fl.enable_sdpa_patch() is True
    with fl.patch_sdpa():
        pass
    assert fl.sdpa_patch_enabled()  # a block entered while enabled leaves it enabled
    fl.disable_sdpa_patch()
    fl.disable_sdpa_patch()
    assert F.scaled_dot_product_attention is ORIGINAL


def test_unsupported_and_invalid_calls_go_to_torch(routed):
    q = torch.randn(1, 2, 4, 8)
    with fl.patch_sdpa():
        # a value head dim beyond 512: torch serves it
        v = torch.randn(1, 2, 4, 520)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, q, v), ORIGINAL(q, q, v))
        # broadcast batch (key batch 1, query batch 3)
        q3 = torch.randn(3, 2, 4, 8)
        torch.testing.assert_close(F.scaled_dot_product_attention(q3, q, q), ORIGINAL(q3, q, q))
        assert not routed
        # invalid input raises torch's own error
        with pytest.raises(Exception) as ours:
            F.scaled_dot_product_attention(q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8))
        with pytest.raises(Exception) as theirs:
            ORIGINAL(q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8))
        assert type(ours.value) is type(theirs.value)
        # a supported call is routed
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert routed
        # so is a value head dim that differs from the query's (MLA; torch allows Ev != E)
        v = torch.randn(1, 2, 4, 16)
        n = len(routed)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, q, v), ORIGINAL(q, q, v))
        assert len(routed) == n + 1


def test_float32_mask_of_a_16_bit_call_is_routed_and_not_rounded(routed):
    # torch accepts a float32 mask with a bf16 query; the patch serves it without rounding
    # the mask to bf16 (a mask of 300 + N(0, 1) rounded so is off by 0.7 in the output)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g).bfloat16() for _ in range(3))
    mask = 300 + torch.randn(16, 16, generator=g)
    ref = ORIGINAL(q.double(), k.double(), v.double(), attn_mask=mask.double())
    theirs = ORIGINAL(q, k, v, attn_mask=mask)
    with fl.patch_sdpa():
        ours = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert routed
        with pytest.raises(RuntimeError, match="attn_mask dtype"):  # a float16 mask: torch refuses, as before
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask.half())
    assert len(routed) == 1
    check = compare("out", ours, ref, theirs, torch.bfloat16, FWD_FACTOR, v.abs().max().item())
    assert check.ok, str(check)


def test_mixed_dtypes_inside_autocast_are_routed(routed):
    # inside torch.autocast, rotary embeddings leave q and k in float32 beside a bf16 v; torch
    # casts all three, and so does the patch (it routes the call instead of leaving it to torch)
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 2, 16, 16, generator=g) for _ in range(2))
    v = torch.randn(1, 2, 16, 16, generator=g).bfloat16()
    ref = ORIGINAL(q.bfloat16().double(), k.bfloat16().double(), v.double(), is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = ORIGINAL(q, k, v, is_causal=True)
        with fl.patch_sdpa():
            ours = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert len(routed) == 1 and ours.dtype == theirs.dtype == torch.bfloat16
    check = compare("out", ours, ref, theirs, torch.bfloat16, FWD_FACTOR, v.abs().max().item())
    assert check.ok, str(check)
