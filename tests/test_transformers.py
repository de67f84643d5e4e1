"""The Hugging Face backend "fa_lite" on tiny random models built from configs (nothing downloaded).

Tolerance, the project's scheme (flashattn_lite.testing.compare) applied to whole models:
the oracle is the same model in float64 with eager attention; ours (float32, fa_lite)
passes when ``max|ours - ref| <= factor * max|baseline - ref| + rounding`` with the
baseline the float32 model under eager attention or sdpa (whichever is further from the
oracle), factor 2 for logits and 3 for gradients.  Padding query positions carry no
meaning in transformers (eager gives them arbitrary values) and are excluded.
"""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashattn_lite.integrations.transformers as fat  # noqa: E402
from flashattn_lite.testing import FWD_FACTOR, GRAD_FACTOR, compare  # noqa: E402
from helpers import kernels_run  # noqa: E402

fat.register()

VOCAB = 96


def _config(family, **over):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, attention_dropout=0.0)
    if family == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, **common)  # GQA 4/2
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
                                       max_window_layers=1, **common)  # layer 0 full, layer 1 sliding
    elif family == "mistral":
        cfg = transformers.MistralConfig(num_key_value_heads=1, sliding_window=4, **common)  # MQA, window 4
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2, attn_pdrop=0.0, resid_pdrop=0.0,
                                      embd_pdrop=0.0)
    elif family == "gemma2":  # softcap, its own scaling (query_pre_attn_scalar), alternating sliding layers
        cfg = transformers.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=4,
                                        attn_logit_softcapping=5.0, final_logit_softcapping=None,
                                        query_pre_attn_scalar=24, **common)
    elif family == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
    elif family == "gpt_oss":  # learnable attention sinks (s_aux), sliding + full layers, MoE, GQA 4/2
        cfg = transformers.GptOssConfig(num_key_value_heads=2, head_dim=16, sliding_window=4, num_local_experts=4,
                                        num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                                        **common)
    elif family == "deepseek_v3":  # MLA: q/k head dim 24 (16 + 8 rope), value head dim 16; yarn scaling
        cfg = transformers.DeepseekV3Config(
            num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
            topk_group=1, first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                             "original_max_position_embeddings": 16, "rope_theta": 10000.0}, **common)
    else:
        raise ValueError(family)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _auto(family):
    return transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM


def _from_config(family, impl):
    # MoE experts default to torch's grouped_mm, which has no float64 (the oracle)
    extra = dict(experts_implementation="eager") if family in ("gpt_oss", "deepseek_v3") else {}
    return _auto(family).from_config(_config(family), attn_implementation=impl, **extra)


_NO_SDPA = ("gemma2", "gpt_oss")  # transformers' sdpa has no softcap / no sinks


_MODELS = {}


def _models(family):
    """{impl: model} sharing one set of random weights: eager64 (oracle), eager32, sdpa32 (not for
    gemma2: transformers has no sdpa for it), fa_lite32."""
    if family not in _MODELS:
        torch.manual_seed(1234)
        base = _from_config(family, "eager").eval()
        if family == "gpt_oss":
            with torch.no_grad():
                for layer in base.model.layers:
                    layer.self_attn.sinks.normal_(0.0, 2.0)  # sinks that take a real share of each row
        models = {"eager64": copy.deepcopy(base).double(), "eager32": base}
        for impl in ("fa_lite",) if family in _NO_SDPA else ("sdpa", "fa_lite"):
            m = _from_config(family, impl).eval()
            m.load_state_dict(base.state_dict())
            models[impl + "32"] = m
        _MODELS[family] = models
    return _MODELS[family]


def _batch(side, batch=3, seqlen=11):
    ids = torch.randint(1, VOCAB, (batch, seqlen))
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    for b, n in enumerate((0, 3, 6)[:batch]):
        if n:
            if side == "left":
                mask[b, :n] = 0
            else:
                mask[b, seqlen - n:] = 0
    return ids, mask


def _check(name, ours, ref, baselines, factor):
    base = max(baselines, key=lambda t: (t.double() - ref).abs().max().item())
    c = compare(name, ours, ref, base, torch.float32, factor, ref.abs().max().item())
    assert c.ok, str(c)
    return c


FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "bert", "gemma2", "gpt_oss", "deepseek_v3"]


def _baselines(family):
    return ("eager32",) if family in _NO_SDPA else ("eager32", "sdpa32")


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _loss(family, logits, ids, mask):
    """Summed cross-entropy over real tokens (next token for causal LMs, the token itself for BERT)."""
    if family == "bert":
        keep = mask.bool()
        return torch.nn.functional.cross_entropy(logits[keep], ids[keep], reduction="sum")
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    return torch.nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep], reduction="sum")


def _run(family, model, ids, mask, grads=False):
    """logits (NaN-free at real tokens) and, with ``grads``, the flattened parameter gradients of
    the mean loss over real tokens."""
    model.zero_grad(set_to_none=True)
    model.train(grads)
    try:
        with torch.set_grad_enabled(grads):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
            if grads:
                count = mask.sum() if family == "bert" else (mask[:, :-1] * mask[:, 1:]).sum()
                (_loss(family, logits, ids, mask) / count).backward()
    finally:
        model.eval()
    g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]) if grads else None
    return logits.detach(), g


def _oracle(family, ids, mask, grads=False):
    """float64 eager attention, each sequence alone and unpadded (eager itself turns padding
    rows into NaN in float64: its softmax runs in float32 where the float64 mask value is
    -inf), assembled into the padded batch's layout; gradients of the same mean loss."""
    model = _models(family)["eager64"]
    model.zero_grad(set_to_none=True)
    model.train(grads)
    logits = torch.full(ids.shape + (VOCAB,), float("nan"), dtype=torch.float64)
    count = mask.sum() if family == "bert" else (mask[:, :-1] * mask[:, 1:]).sum()
    try:
        with torch.set_grad_enabled(grads):
            for b in range(ids.shape[0]):
                keep = mask[b].bool()
                one_ids = ids[b][keep][None]
                one_mask = torch.ones_like(one_ids)
                out = model(input_ids=one_ids, attention_mask=one_mask, position_ids=_positions(one_mask)).logits
                logits[b, keep] = out[0].detach()
                if grads:
                    (_loss(family, out, one_ids, one_mask) / count).backward()
    finally:
        model.eval()
    g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]) if grads else None
    return logits, g


def _check(name, ours, ref, baselines, factor):
    base = max(baselines, key=lambda t: (t.double() - ref).abs().max().item())
    c = compare(name, ours, ref, base, torch.float32, factor, ref.abs().max().item())
    assert c.ok, str(c)
    return c


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_padded_batch_match_eager(family, side):
    models = _models(family)
    ids, mask = _batch(side)
    out = {impl: _run(family, models[impl], ids, mask)[0] for impl in _baselines(family) + ("fa_lite32",)}
    ref, _ = _oracle(family, ids, mask)
    valid = mask.bool()
    _check("logits", out["fa_lite32"][valid], ref[valid], [out[b][valid] for b in _baselines(family)], FWD_FACTOR)


def test_no_seqlen_by_seqlen_mask_for_padding(monkeypatch):
    """Padding + causal (prefill and decode steps) never builds the q x kv mask."""
    def forbidden(self):
        raise AssertionError("dense mask materialised")

    monkeypatch.setattr(fat.MaskPlan, "dense", forbidden)
    for family in ("llama", "mistral"):
        m = _models(family)["fa_lite32"]
        for side in ("left", "right"):
            ids, mask = _batch(side)
            with torch.no_grad():
                m(input_ids=ids, attention_mask=mask)
        ids, mask = _batch("left")
        m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False)


@pytest.mark.parametrize("family,cache", [("llama", "dynamic"), ("llama", "static"), ("mistral", "dynamic"),
                                          ("mistral", "static"), ("gpt2", "dynamic"), ("qwen2", "dynamic"),
                                          ("gemma2", "dynamic"), ("gpt_oss", "dynamic"),
                                          ("deepseek_v3", "dynamic")])
def test_generate_left_padding_same_greedy_tokens(family, cache):
    models = _models(family)
    ids, mask = _batch("left")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    eager = models["eager32"].generate(**kw)
    ours = models["fa_lite32"].generate(**kw)
    assert torch.equal(eager, ours)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_gradients_match_eager(family):
    models = _models(family)
    ids, mask = _batch("left" if family in ("llama", "qwen2") else "right")
    res = {impl: _run(family, models[impl], ids, mask, grads=True) for impl in _baselines(family) + ("fa_lite32",)}
    _, ref = _oracle(family, ids, mask, grads=True)
    _check("grads", res["fa_lite32"][1], ref, [res[b][1] for b in _baselines(family)], GRAD_FACTOR)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_packed_sequences_via_position_ids(family):
    """Three sequences packed in one row, marked by position_ids restarting at 0 (no padding
    mask): equal to running each sequence alone.  With use_cache=False transformers' eager
    itself separates them (same layout as ours); with the default cache eager does not, and
    fa_lite follows flash-attn's convention (as transformers' flash-attn backends do)."""
    models = _models(family)
    lengths = (4, 7, 5)
    ids = torch.randint(1, VOCAB, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        alone = []
        start = 0
        for n in lengths:
            alone.append(models["eager64"](input_ids=ids[:, start:start + n], use_cache=False).logits)
            start += n
        ref = torch.cat(alone, dim=1)
        out = {impl: m(input_ids=ids, position_ids=pos, use_cache=False).logits for impl, m in models.items()}
        torch.testing.assert_close(out["eager64"], ref)  # eager itself treats them as separate sequences
        _check("packed logits", out["fa_lite32"], ref, [out["eager32"], out["sdpa32"]], FWD_FACTOR)
        with_cache = models["fa_lite32"](input_ids=ids, position_ids=pos).logits
    _check("packed logits (cache on)", with_cache, ref, [out["eager32"], out["sdpa32"]], FWD_FACTOR)


def test_training_with_attention_dropout_uses_the_kernel():
    from flashattn_lite.testing import record_dropout

    torch.manual_seed(0)
    cfg = _config("llama", attention_dropout=0.3)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="fa_lite").train()
    ids, mask = _batch("right")
    with record_dropout() as calls:
        out = m(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert calls and all(c.p == pytest.approx(0.3) for c in calls)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    m.eval()
    with record_dropout() as calls, torch.no_grad():
        m(input_ids=ids, attention_mask=mask)
    assert not calls  # no dropout in eval mode


def test_gradient_checkpointing_replays_the_same_dropout():
    """Recomputation under gradient checkpointing draws the same dropout mask (the seed comes
    from torch's generator, whose state checkpointing restores): identical gradients."""
    cfg = _config("llama", attention_dropout=0.2)
    torch.manual_seed(0)
    plain = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="fa_lite")
    ckpt = copy.deepcopy(plain)
    (getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable)()
    ids, mask = _batch("left")
    grads = []
    for m in (plain, ckpt):
        m.train()
        torch.manual_seed(5)
        m(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert torch.equal(grads[0], grads[1])


def test_registration_paths(tmp_path):
    models = _models("llama")
    ids, mask = _batch("left")
    with torch.no_grad():
        expected = models["fa_lite32"](input_ids=ids, attention_mask=mask).logits
    # set_attn_implementation on a live model
    m = copy.deepcopy(models["eager32"])
    m.set_attn_implementation("fa_lite")
    assert m.config._attn_implementation == "fa_lite"
    # from_pretrained from a local directory
    models["eager32"].save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fa_lite").eval()
    assert loaded.config._attn_implementation == "fa_lite"
    with torch.no_grad():
        for model in (m, loaded):
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="flash"):
        fat.register("my_flash")


def test_custom_4d_mask_and_unrecognised_pattern_are_honoured():
    """A user's own 4-D mask, and a mask function this backend does not recognise (an
    or_mask_function overlay), are served exactly: dense mask, same answer as eager."""
    models = _models("llama")
    ids, mask = _batch("right")
    s = ids.shape[1]
    custom = torch.tril(torch.ones(s, s, dtype=torch.bool))
    custom[:, 0] = True
    custom4 = torch.where(custom, 0.0, torch.finfo(torch.float32).min)[None, None].expand(3, 1, s, s)
    with torch.no_grad():
        out = {impl: m(input_ids=ids, attention_mask=custom4.to(m.dtype)).logits for impl, m in models.items()}
    _check("4-D mask logits", out["fa_lite32"], out["eager64"], [out["eager32"], out["sdpa32"]], FWD_FACTOR)

    from transformers.masking_utils import create_causal_mask

    def see_first(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx == 0

    cfg = models["fa_lite32"].config
    emb = torch.zeros(3, s, 8)
    ours = create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=mask.bool(), cache=None,
                              or_mask_function=see_first)
    plan = fat.plan_of(ours)
    assert plan.pattern is None  # unrecognised: the dense mask is what it runs with
    cfg_e = copy.deepcopy(cfg)
    cfg_e._attn_implementation = "sdpa"
    dense = create_causal_mask(config=cfg_e, inputs_embeds=emb, attention_mask=mask.bool(), cache=None,
                               or_mask_function=see_first)
    assert torch.equal(plan.dense(), dense)


def test_unsupported_call_falls_back_to_sdpa_with_one_warning():
    """Head dim 520 (> 512): served by sdpa, warned about once, same answer as eager."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=520, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=32)
    eager = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ours = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="fa_lite").eval()
    ours.load_state_dict(eager.state_dict())
    ids, mask = _batch("left", seqlen=6)
    fat._warned.clear()
    with warnings.catch_warnings(record=True) as w, torch.no_grad():
        warnings.simplefilter("always")
        a = ours(input_ids=ids, attention_mask=mask).logits
        ours(input_ids=ids, attention_mask=mask)
    msgs = [str(x.message) for x in w if "falling back to sdpa" in str(x.message)]
    assert len(msgs) == 1 and "head dim 520" in msgs[0]
    with torch.no_grad():
        b = eager(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], rtol=1e-4, atol=1e-5)


def test_softcap_with_a_dense_only_mask_falls_back_to_eager():
    """A hole in the padding mask needs the dense mask; with softcap (which sdpa lacks) the call
    goes to the model's own eager function, warned about once, same answer."""
    models = _models("gemma2")
    ids, mask = _batch("right")
    mask[0, 3] = 0
    fat._warned.clear()
    with warnings.catch_warnings(record=True) as w, torch.no_grad():
        warnings.simplefilter("always")
        ours = models["fa_lite32"](input_ids=ids, attention_mask=mask).logits
        eager = models["eager32"](input_ids=ids, attention_mask=mask).logits
    assert [x for x in w if "falling back to the model's eager attention" in str(x.message)]
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], eager[valid], rtol=1e-5, atol=1e-5)


def test_plan_matches_transformers_dense_masks():
    """The compact plan, run through the kernel, against the dense mask transformers builds,
    for mask shapes the models above do not all reach: decode offsets, sliding caches,
    bidirectional windows, rows of pure padding, holes in the padding (dense fallback)."""
    from transformers import masking_utils as mu

    def run_both(mask_function, b, sq, sk, q_off, kv_off, pad, heads=4):
        plan_t = fat.fa_lite_mask(b, sq, sk, q_off, kv_off, mask_function=mask_function, attention_mask=pad)
        plan = fat.plan_of(plan_t)
        q = torch.randn(b, heads, sq, 8, dtype=torch.float64)
        k = torch.randn(b, 2, sk, 8, dtype=torch.float64)
        v = torch.randn(b, 2, sk, 8, dtype=torch.float64)
        ours, _ = fat.fa_lite_attention_forward(torch.nn.Module(), q, k, v, plan_t)
        dense = mu.sdpa_mask(batch_size=b, q_length=sq, kv_length=sk, q_offset=q_off, kv_offset=kv_off,
                             mask_function=mask_function, attention_mask=pad, allow_is_causal_skip=False)
        kk, vv = k.repeat_interleave(heads // 2, 1), v.repeat_interleave(heads // 2, 1)
        scores = (q @ kk.transpose(-1, -2)) * 8 ** -0.5
        scores = scores.masked_fill(~dense, float("-inf"))
        ref = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0) @ vv
        ref = ref.transpose(1, 2)
        # rows compared: real query tokens (a query's own key is real), or every row when bidirectional
        rows = torch.ones(b, sq, dtype=torch.bool)
        if pad is not None and mask_function is not mu.bidirectional_mask_function:
            padded = torch.nn.functional.pad(pad, (0, max(0, q_off + sq - pad.shape[1])))
            rows = padded[:, q_off:q_off + sq].bool()
        torch.testing.assert_close(ours[rows], ref[rows], rtol=1e-9, atol=1e-9)
        if plan.run_layout[1][0] != "mask":  # (the dense-mask fallback gives what sdpa gives there)
            assert (ours[~rows] == 0).all()  # padding queries give 0
        return plan

    def decode_kernel_ran(fn):
        return kernels_run(fn) == {"flashattn_lite_C::decode"}

    pad_left = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6, [0] * 9], dtype=torch.bool)
    pad_right = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7], dtype=torch.bool)
    causal, bidir = mu.causal_mask_function, mu.bidirectional_mask_function
    sw = mu.sliding_window_causal_mask_function(3)
    for fn in (causal, sw):
        for pad in (None, pad_left, pad_right):
            assert run_both(fn, 3, 9, 9, 0, 0, pad).run_layout[1][0] in ("dense", "padded")
        # padded decoding steps (one row; two rows of a GQA group of 4; right padding, whose
        # second row's query is padding) read the keys in place through the KV-cache kernel
        for pad in (pad_left, pad_right):
            assert decode_kernel_ran(lambda: run_both(fn, 3, 1, 9, 8, 0, pad))
        assert decode_kernel_ran(lambda: run_both(fn, 3, 2, 9, 7, 0, pad_left, heads=8))
        assert run_both(fn, 3, 1, 9, 8, 0, pad_left).run_layout[1][0] == "padded"  # decode step
        assert run_both(fn, 3, 2, 9, 7, 0, pad_left).run_layout[1][0] == "padded"  # two-token step (tiled)
    assert decode_kernel_ran(lambda: run_both(sw, 3, 1, 4, 8, 5, pad_left))  # sliding-window cache: keys 5..8
    for pad in (None, pad_right, pad_left):
        run_both(bidir, 3, 9, 9, 0, 0, pad)
        run_both(mu.sliding_window_bidirectional_mask_function(2), 3, 9, 9, 0, 0, pad)
    holes = pad_right.clone()
    holes[0, 4] = False
    assert run_both(causal, 3, 9, 9, 0, 0, holes).run_layout[1][0] == "mask"


def test_padded_decoding_step_with_only_value_requiring_grad():
    # e.g. an adapter on v_proj alone, scored with grad on: the KV-cache kernel has no
    # backward, so the step takes the varlen path and the gradient reaches v.
    from transformers import masking_utils as mu
    pad = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6], dtype=torch.bool)
    plan_t = fat.fa_lite_mask(2, 1, 9, 8, 0, mask_function=mu.causal_mask_function, attention_mask=pad)
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 9, 8)
    v = torch.randn(2, 2, 9, 8, requires_grad=True)
    out, _ = fat.fa_lite_attention_forward(torch.nn.Module(), q, k, v, plan_t)
    (grad,) = torch.autograd.grad(out.sum(), v)
    ref = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8 ** -0.5).masked_fill(~pad[:, None, None],
                                                                                                 float("-inf")), -1)
    # d(sum out)/dv[b, h, j] = sum over the group's heads of the probabilities of key j
    expected = ref.view(2, 2, 2, 1, 9).sum(2).sum(2)[..., None].expand(2, 2, 9, 8)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_a_copied_mask_is_not_misread():
    """A copy of the mask (.clone(), copy.deepcopy, .to()) keeps its causal meaning: the same
    answer as the mask itself (test_transformers_masks.py covers what models compute from it)."""
    from transformers import masking_utils as mu

    mask = fat.fa_lite_mask(1, 6, 6, 0, 0, mask_function=mu.causal_mask_function, attention_mask=None)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    expected, _ = fat.fa_lite_attention_forward(torch.nn.Module(), q, k, v, mask)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(expected, causal)
    for copied in (mask.clone(), copy.deepcopy(mask), mask.to("cpu"), mask.to(torch.float64)):
        out, _ = fat.fa_lite_attention_forward(torch.nn.Module(), q, k, v, copied)
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_modern_shapes_run_on_the_kernels_without_warnings(family, side):
    """gpt-oss's attention sinks (s_aux) reach the kernels as learnable_sink, DeepSeek-V3's MLA
    (value head dim 16 != query/key head dim 24) as a value of its own: no fallback, no warning."""
    model = _models(family)["fa_lite32"]
    ids, mask = _batch(side)
    fat._warned.clear()
    with warnings.catch_warnings(record=True) as w, torch.no_grad():
        warnings.simplefilter("always")
        ran = kernels_run(lambda: model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)))
    assert not [str(x.message) for x in w if "flashattn_lite" in str(x.message)]
    kernels = {"flashattn_lite_C::fwd", "flashattn_lite_C::cpu_fwd_sink", "flashattn_lite_C::decode"}
    assert ran and ran <= kernels


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_autocast_runs_on_the_kernels(family):
    """Under torch.autocast(bf16) on the CPU, rotary embeddings leave q and k in float32 beside
    a bf16 v; the backend casts them as torch's SDPA does instead of falling back (a warning
    and the model's slower attention), and the logits stay as close to the float64 oracle as
    eager's under the same autocast."""
    models = _models(family)
    ids, mask = _batch("left")
    fat._warned.clear()
    out = {}
    with warnings.catch_warnings(record=True) as w, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        ran = kernels_run(lambda: out.update(fa=_run(family, models["fa_lite32"], ids, mask)[0]))
        out["eager"] = _run(family, models["eager32"], ids, mask)[0]
    assert not [str(x.message) for x in w if "flashattn_lite" in str(x.message)]
    assert ran and ran <= {"flashattn_lite_C::fwd", "flashattn_lite_C::decode"}
    ref, _ = _oracle(family, ids, mask)
    valid = mask.bool()
    c = compare("logits", out["fa"][valid].float(), ref[valid], out["eager"][valid].float(), torch.bfloat16,
                FWD_FACTOR, ref.abs().max().item())
    assert c.ok, str(c)
