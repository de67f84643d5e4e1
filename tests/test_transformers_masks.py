"""The "fa_lite" backend when a model computes with the attention mask before attention.

transformers hands models the mask the backend's mask function made; some models transform it
(add a learned bias, concatenate masks or bias blocks, index it) before attention.  Whatever
they do must give eager attention's numbers, or fail loudly: never a silently different answer.

Tolerance, the project's scheme (flashattn_lite.testing.compare): ``max|ours - ref| <= factor *
max|baseline - ref| + rounding``.  In the attention-function checks the oracle is float64 eager
attention and the baseline float32 eager.  In the whole-model checks the reference is the float32
eager model on the same padded batch (float64 eager turns left-padded query rows into NaN, which
spread through later layers, and running each sequence alone is not the same computation for
these models: t5gemma2 numbers positions with the padding, deepseek_v4 compresses windows that
include it), and the baseline the float32 sdpa model where the model has one.  Padding query
positions carry no meaning in transformers and are excluded.
"""

import copy
import pickle
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashattn_lite.integrations.transformers as fat  # noqa: E402
from flashattn_lite.testing import FWD_FACTOR, GRAD_FACTOR, compare  # noqa: E402

fat.register()

VOCAB = 96
B, S, HQ, HK, D = 3, 9, 4, 2, 8


def _left_padded(batch=B, seqlen=S, pads=(0, 3, 6)):
    ids = torch.randint(3, VOCAB, (batch, seqlen))
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    for b, n in enumerate(pads[:batch]):
        mask[b, :n] = 0
    return ids, mask


def _check(name, ours, ref, baselines, factor=FWD_FACTOR):
    base = max(baselines, key=lambda t: (t.double() - ref.double()).abs().max().item())
    c = compare(name, ours, ref.double(), base, torch.float32, factor, ref.abs().max().item())
    assert c.ok, str(c)


# ---------------------------------------------------------------------------------------------
# the attention function fed with transformed masks (synthetic models)
# ---------------------------------------------------------------------------------------------

def _causal_mask(impl, dtype, pad):
    from transformers.masking_utils import create_causal_mask

    cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=HQ, num_key_value_heads=HK)
    cfg._attn_implementation = impl
    return create_causal_mask(config=cfg, inputs_embeds=torch.zeros(B, S, 8, dtype=dtype), attention_mask=pad,
                              cache=None)


def _module():
    m = torch.nn.Module()
    m.num_key_value_groups = HQ // HK
    m.is_causal = True
    return m.eval()


def _extras():
    """float64 random inputs every transform may use (the same for every dtype)."""
    g = torch.Generator().manual_seed(7)
    keep_own = ~torch.eye(S, dtype=torch.bool)  # never drop a query's own key: no valid row left empty
    return {"bias": torch.randn(B, HQ, S, S, generator=g, dtype=torch.float64),
            "bias1": torch.randn(1, 1, S, S, generator=g, dtype=torch.float64),
            "drop": (torch.rand(1, 1, S, S, generator=g) < 0.3) & keep_own,
            "block": torch.randn(B, 1, S, 5, generator=g, dtype=torch.float64).masked_fill(
                torch.rand(B, 1, S, 5, generator=g) < 0.4, float("-inf")),
            "k5": torch.randn(B, HK, 5, D, generator=g, dtype=torch.float64),
            "v5": torch.randn(B, HK, 5, D, generator=g, dtype=torch.float64),
            "kS": torch.randn(B, HK, S, D, generator=g, dtype=torch.float64),
            "vS": torch.randn(B, HK, S, D, generator=g, dtype=torch.float64),
            "perm": torch.randperm(S, generator=g)}


def _min(m):
    return torch.finfo(m.dtype if m.is_floating_point() else torch.float32).min


def _after(m, write):
    write()  # the result is not used: the model goes on with the object it wrote into
    return m


# Each takes (mask, q, k, v, extras) and returns the (mask, q, k, v) attention gets and the query
# rows that remain (an index into the S rows).  Masks are what eager attention's masks are (0 /
# dtype minimum, float), as models written for eager attention assume.
_ALL = slice(None)
TRANSFORMS = {
    # ADD: a learned bias (doge's dynamic mask), both operand orders, and in place
    "add": lambda m, q, k, v, x: (m + x["bias"].to(m.dtype), q, k, v, _ALL),
    "radd": lambda m, q, k, v, x: (x["bias1"].to(m.dtype) + m, q, k, v, _ALL),
    "add_in_place": lambda m, q, k, v, x: (m.add_(x["bias1"].to(m.dtype)), q, k, v, _ALL),
    "masked_fill_in_place_result_unused": lambda m, q, k, v, x: (
        _after(m, lambda: m.masked_fill_(x["drop"], _min(m))), q, k, v, _ALL),
    "setitem": lambda m, q, k, v, x: (_after(m, lambda: m.__setitem__((Ellipsis, 1), _min(m))), q, k, v, _ALL),
    "write_through_a_view": lambda m, q, k, v, x: (_after(m, lambda: m[:, :, :, 1].fill_(_min(m))), q, k, v, _ALL),
    "where_bias": lambda m, q, k, v, x: (torch.where(m == 0, x["bias"].to(m.dtype), _min(m)), q, k, v, _ALL),
    # CONCATENATE: a bias block over extra keys (deepseek_v4), two masks side by side (t5gemma2)
    "cat_block": lambda m, q, k, v, x: (torch.cat([m, x["block"].to(m.dtype)], -1), q,
                                        torch.cat([k, x["k5"].to(k.dtype)], 2), torch.cat([v, x["v5"].to(v.dtype)], 2),
                                        _ALL),
    "cat_masks": lambda m, q, k, v, x: (torch.cat([m, m], -1), q, torch.cat([k, x["kS"].to(k.dtype)], 2),
                                        torch.cat([v, x["vS"].to(v.dtype)], 2), _ALL),
    # INDEX: reorder the keys, keep the last queries (gemma4's KV-shared layers), take a head, broadcast
    "index_keys": lambda m, q, k, v, x: (m[..., x["perm"]], q, k[:, :, x["perm"]], v[:, :, x["perm"]], _ALL),
    "index_queries": lambda m, q, k, v, x: (m[:, :, -3:], q[:, :, -3:], k, v, slice(S - 3, S)),
    "index_head": lambda m, q, k, v, x: (m[:, 0][:, None], q, k, v, _ALL),
    "expand_heads": lambda m, q, k, v, x: (m.expand(B, HQ, S, S), q, k, v, _ALL),
    # no-ops
    "identity": lambda m, q, k, v, x: (m, q, k, v, _ALL),
    "noop_slice": lambda m, q, k, v, x: (m[:, :, :, :k.shape[2]], q, k, v, _ALL),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transformed_masks_give_eager_attention(name, monkeypatch):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    _, pad = _left_padded()
    extras = _extras()
    qkv = [torch.randn(B, h, S, D, dtype=torch.float64) for h in (HQ, HK, HK)]
    module, scale = _module(), D ** -0.5
    if name in ("identity", "noop_slice"):
        def forbidden(self):
            raise AssertionError("dense mask materialised for an unchanged mask")
        monkeypatch.setattr(fat.MaskPlan, "dense", forbidden)  # these keep the compact plan
    outs, rows = {}, None
    for impl, dtype in (("eager", torch.float64), ("eager", torch.float32), ("fa_lite", torch.float32)):
        m, q, k, v, rows = TRANSFORMS[name](_causal_mask(impl, dtype, pad), *(t.to(dtype) for t in qkv), extras)
        fn = fat.fa_lite_attention_forward if impl == "fa_lite" else eager_attention_forward
        outs[(impl, dtype)] = fn(module, q, k, v, m, scaling=scale, dropout=0.0)[0]
    valid = pad.bool()[:, rows]
    ours = outs[("fa_lite", torch.float32)][valid]
    assert torch.isfinite(ours).all()
    _check(name, ours, outs[("eager", torch.float64)][valid], [outs[("eager", torch.float32)][valid]])


def test_copies_of_the_mask_keep_its_meaning():
    """clone keeps the compact plan; deepcopy, pickling and a dtype change give eager's mask;
    .to() that changes nothing is the mask itself."""
    _, pad = _left_padded()
    eager = _causal_mask("eager", torch.float32, pad)
    ours = _causal_mask("fa_lite", torch.float32, pad)
    assert ours.shape == eager.shape and ours.dtype == eager.dtype and ours.device == eager.device
    assert ours.to("cpu") is ours and ours.to(torch.float32) is ours and ours.contiguous() is ours
    clone = ours.clone()
    assert fat.plan_of(clone) is fat.plan_of(ours) is not None
    for copied in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours)), ours.to(torch.float64), ours + 0):
        assert type(copied) is torch.Tensor and torch.equal(copied, eager.to(copied.dtype))
    q, k, v = (torch.randn(B, h, S, D) for h in (HQ, HK, HK))
    ref = fat.fa_lite_attention_forward(_module(), q, k, v, ours)[0]
    valid = pad.bool()
    for m in (clone, copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        torch.testing.assert_close(fat.fa_lite_attention_forward(_module(), q, k, v, m)[0][valid], ref[valid])


def test_bare_storage_of_the_mask_is_refused():
    """Code that bypasses torch's subclass dispatch sees only the mask's placeholder storage:
    refused, never read as a mask."""
    _, pad = _left_padded()
    ours = _causal_mask("fa_lite", torch.float32, pad)
    with torch._C.DisableTorchFunctionSubclass():
        bare = ours.as_subclass(torch.Tensor)
    q, k, v = (torch.randn(B, h, S, D) for h in (HQ, HK, HK))
    with pytest.raises(RuntimeError, match="bare storage"):
        fat.fa_lite_attention_forward(_module(), q, k, v, bare)


# ---------------------------------------------------------------------------------------------
# models of transformers that transform the mask (tiny random configs, nothing downloaded)
# ---------------------------------------------------------------------------------------------

def _models(cls, cfg, impls, setup=None):
    torch.manual_seed(1234)
    models = {}
    for impl in impls:
        m = cls._from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
        if models:
            m.load_state_dict(next(iter(models.values())).state_dict())
        elif setup:
            setup(m)
        models[impl] = m
    return models


_DOGE = []


def _doge():
    if not _DOGE:
        _DOGE.append(_make_doge())
    return _DOGE[0]


def _make_doge(layers=2, impls=("eager", "sdpa", "fa_lite")):
    cfg = transformers.DogeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                  num_attention_heads=HQ, num_key_value_heads=HK, max_position_embeddings=64,
                                  keep_window_size=64)

    def dynamic(m):  # A = 0 (the initial value) makes the learned bias a constant; give it a shape
        with torch.no_grad():
            for layer in m.model.layers:
                layer.self_attn.A.copy_(torch.linspace(-1.0, 1.0, layer.self_attn.A.numel()))

    return _models(transformers.DogeForCausalLM, cfg, impls, dynamic)


def _logits(models, valid, **inputs):
    with torch.no_grad():
        return {impl: m(**inputs).logits[valid] for impl, m in models.items()}


def test_doge_dynamic_mask_matches_eager():
    """doge adds a learned (batch, heads, q, kv) bias to the mask: logits, greedy tokens and the
    gradients reaching that bias's parameters (with gradient checkpointing) are eager's."""
    models = _doge()
    ids, mask = _left_padded()
    out = _logits(models, mask.bool(), input_ids=ids, attention_mask=mask)
    _check("doge logits", out["fa_lite"], out["eager"], [out["sdpa"]])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(models["fa_lite"].generate(**kw), models["eager"].generate(**kw))

    grads = {}
    for impl, m in models.items():
        m = copy.deepcopy(m).train()
        if impl == "fa_lite":
            (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
        logits = m(input_ids=ids, attention_mask=mask, use_cache=False).logits
        keep = (mask[:, :-1] * mask[:, 1:]).bool()  # real tokens predicting real tokens (as test_transformers)
        torch.nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep]).backward()
        grads[impl] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert any("dt_proj" in n for n in grads["fa_lite"])  # the bias's parameters get a gradient
    flat = {impl: torch.cat([g[n].flatten() for n in sorted(grads["eager"])]) for impl, g in grads.items()}
    _check("doge grads", flat["fa_lite"], flat["eager"], [flat["sdpa"]], GRAD_FACTOR)


def test_doge_under_torch_compile():
    """torch.compile traces through the mask's torch-function override (dynamo, no graph break
    needed) and gives eager's logits."""
    models = _make_doge(layers=1, impls=("eager", "fa_lite"))
    ids, mask = _left_padded()
    torch._dynamo.reset()
    compiled = torch.compile(models["fa_lite"], backend="eager")
    with torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        ref = models["eager"](input_ids=ids, attention_mask=mask).logits[mask.bool()]
    _check("compiled doge logits", out, ref, [ref])


def test_t5gemma2_merged_self_and_cross_masks_match_eager():
    """t5gemma2's decoder concatenates its causal self-attention mask with the cross-attention
    mask (one attention over both): teacher-forced logits with left-padded encoder and decoder."""
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=HQ,
                num_key_value_heads=HK, head_dim=D, max_position_embeddings=64, sliding_window=4,
                layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=D)
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    cfg = transformers.T5Gemma2Config(encoder=dict(text_config=text, vision_config=vision, mm_tokens_per_image=4),
                                      decoder=dict(text), vocab_size=VOCAB)
    models = _models(transformers.T5Gemma2ForConditionalGeneration, cfg, ("eager", "sdpa", "fa_lite"))
    ids, mask = _left_padded(seqlen=11)
    dec_ids, dec_mask = _left_padded(seqlen=7, pads=(0, 2, 4))
    out = _logits(models, dec_mask.bool(), input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids,
                  decoder_attention_mask=dec_mask)
    _check("t5gemma2 logits", out["fa_lite"], out["eager"], [out["sdpa"]])


def test_deepseek_v4_block_bias_concatenated_onto_the_mask():
    """deepseek_v4's compressed layers concatenate a block bias onto the mask; its attention
    sinks (s_aux) run on the kernels (learnable_sink), not on a fallback."""
    cfg = transformers.DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=HQ,
        head_dim=16, q_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2, hc_mult=2, sliding_window=8,
        o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4})
    models = _models(transformers.DeepseekV4ForCausalLM, cfg, ("eager", "fa_lite"))
    ids, mask = _left_padded(seqlen=11)
    fat._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = _logits(models, mask.bool(), input_ids=ids, attention_mask=mask)
    assert not any("falling back" in str(x.message) for x in w), [str(x.message) for x in w]
    _check("deepseek_v4 logits", out["fa_lite"], out["eager"], [out["eager"]])


def test_deepseek_v32_sparse_indices_match_eager():
    """DeepSeek-V3.2-style sparse attention: the model indexes the mask for its indexer and, for
    backends other than eager/sdpa, passes the chosen keys as ``indices`` instead of masking them."""
    cfg = transformers.DeepseekV32Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=HQ, num_key_value_heads=HQ, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8,
        head_dim=8, index_topk=4, index_head_dim=16, index_n_heads=2, first_k_dense_replace=1,
        max_position_embeddings=64)
    models = _models(transformers.DeepseekV32ForCausalLM, cfg, ("eager", "sdpa", "fa_lite"))
    ids, mask = _left_padded(seqlen=11)
    out = _logits(models, mask.bool(), input_ids=ids, attention_mask=mask)
    _check("deepseek_v32 logits", out["fa_lite"], out["eager"], [out["sdpa"]])
