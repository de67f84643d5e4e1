"""Every MLA family and every attention-sink family of transformers 5.24 on the "fa_lite" backend.

The families, found in the modeling sources (models that call ``ALL_ATTENTION_FUNCTIONS``):

* MLA, a value head dim of its own (``v_head_dim`` != the query/key head dim, the value
  reaching the attention function with that dim): the kv_lora_rank latent attention of
  deepseek_v2, deepseek_v3, deepseek_v32, axk1, axk2, bailing_hybrid, dots3_note,
  glm4_moe_lite, glm5_next, glm_moe_dsa, hy_v4, hy_v4_vl, kimi_linear, longcat_flash,
  minicpm3, mistral4, mistral_large4, youtu; and mimo_v2_flash (head_dim 192 for q/k,
  v_head_dim 128 for v, no latent).  (deepseek_v4 shares one tensor as key and value: not MLA.)
* Attention sinks, ``s_aux=self.sinks`` (one learnable logit per query head) handed to
  the attention function: deepseek_v4, flint, gpt_oss, granite_swa, granitemoe_swa, hy_v4,
  hy_v4_vl, mimo_v2_flash (its sliding layers), openai_privacy_filter.
  inkling2 and inkling2_loop pass ``sinks=`` too, but per token (B, H, q, 1, from a
  projection of the hidden states) together with a relative ``position_bias``, and declare
  ``_supports_attention_backend = False``: no kernel serves that, the backend hands those
  calls to the model's eager function (test_per_token_sinks_fall_back_to_eager).

Each family: a tiny random model (2 layers, hidden 64, 4 heads, vocab 96, 4 experts;
a 1-layer vision tower where the family is a VLM, run on text only), left- and
right-padded batches in float32 through fa_lite against the float64 eager oracle with
test_transformers.py's rule (``_check``, FWD_FACTOR, the float32 eager model as baseline),
no flashattn_lite warning (a warning means a fallback), only the kernels listed below ran,
and greedy ``generate()`` giving eager's tokens.

Choices that keep the check sharp: sinks drawn N(0, 2) (they take a real share of each row);
hy_v4 / hy_v4_vl with initializer_range 0.1 (at 0.02 their attention, behind 4 hyper-connection
streams, moves the logits by less than float32 rounding: a 5% error in the softmax scale went
unnoticed); index_topk 16 >= the sequence length for the DeepSeek-V3.2-style indexers, so
the oracle (each sequence alone, unpadded) is the padded batch's exact answer (with a smaller
top-k the indexer itself picks differently in a padded batch, for eager as for fa_lite).
"""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashattn_lite.integrations.transformers as fat  # noqa: E402
from flashattn_lite.testing import FWD_FACTOR  # noqa: E402
from helpers import kernels_run  # noqa: E402
from test_transformers import VOCAB, _batch, _check, _config, _positions  # noqa: E402

fat.register()

KERNELS = {"flashattn_lite_C::fwd", "flashattn_lite_C::cpu_fwd_sink", "flashattn_lite_C::decode"}

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# MLA: q/k head dim 24 (16 + 8 rope), value head dim 16
_MLA = dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16)
_MOE = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
            n_shared_experts=1)
_INDEXER = dict(index_topk=16, index_head_dim=16, index_n_heads=2)
_SPECIAL = VOCAB  # VLMs: image/video token ids VOCAB.. (text vocab VOCAB + 8), never drawn by _batch
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
         "beta_fast": 32.0, "beta_slow": 1.0}

MLA_FAMILIES = ["deepseek_v2", "deepseek_v3", "deepseek_v32", "axk1", "axk2", "bailing_hybrid", "dots3_note",
                "glm4_moe_lite", "glm5_next", "glm_moe_dsa", "hy_v4", "hy_v4_vl", "kimi_linear", "longcat_flash",
                "minicpm3", "mistral4", "mistral_large4", "youtu", "mimo_v2_flash"]
SINK_FAMILIES = ["deepseek_v4", "flint", "gpt_oss", "granite_swa", "granitemoe_swa", "hy_v4", "hy_v4_vl",
                 "mimo_v2_flash", "openai_privacy_filter"]
# every family builds tiny in transformers 5.24: nothing skipped
FAMILIES = list(dict.fromkeys(MLA_FAMILIES + SINK_FAMILIES))


def _family_config(family):  # noqa: C901 - one branch per family
    """(Auto class, tiny config)."""
    T = transformers
    causal = T.AutoModelForCausalLM
    if family in ("deepseek_v3", "gpt_oss"):
        return causal, _config(family)  # test_transformers.py's (yarn rope; sliding + full layers)
    if family in ("deepseek_v2", "deepseek_v32"):
        cls = T.DeepseekV2Config if family == "deepseek_v2" else T.DeepseekV32Config
        extra = _INDEXER if family == "deepseek_v32" else {}
        return causal, cls(**_COMMON, **_MLA, **_MOE, **extra, first_k_dense_replace=1)
    if family in ("axk1", "axk2", "glm4_moe_lite"):
        cls = {"axk1": T.AXK1Config, "axk2": T.AXK2Config, "glm4_moe_lite": T.Glm4MoeLiteConfig}[family]
        extra = _INDEXER if family == "axk2" else {}
        return causal, cls(**_COMMON, **_MLA, **_MOE, **extra, mlp_layer_types=["dense", "sparse"])
    if family == "glm_moe_dsa":
        return causal, T.GlmMoeDsaConfig(**_COMMON, **_MLA, **_MOE, **_INDEXER, first_k_dense_replace=1)
    if family in ("bailing_hybrid", "kimi_linear"):  # a linear-attention layer, then an MLA layer
        cls = T.BailingHybridConfig if family == "bailing_hybrid" else T.KimiLinearConfig
        return causal, cls(**_COMMON, **_MLA, moe_intermediate_size=32, num_experts=4, num_experts_per_token=2,
                           num_expert_group=1, topk_group=1, layer_types=["linear_attention", "full_attention"],
                           mlp_layer_types=["dense", "sparse"], linear_head_dim=16, linear_num_heads=4, head_dim=8)
    if family == "dots3_note":  # an indexed MLA layer, then a sliding-window MLA layer (window 4)
        swa = dict(swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=32, swa_kv_lora_rank=32,
                   swa_head_dim=24, swa_qk_nope_head_dim=16, swa_v_head_dim=16)
        return causal, T.Dots3NoteTextConfig(**_COMMON, **_MLA, **_MOE, **_INDEXER, **swa, head_dim=24,
                                             sliding_window=4, shared_experts_intermediate_size=32,
                                             layer_types=["indexed_attention", "sliding_attention"],
                                             mlp_layer_types=["dense", "sparse"])
    if family == "hy_v4":  # MLA + sinks, a full indexer layer, then a shared one
        return causal, T.HYV4Config(**_COMMON, **_MLA, **_MOE, **_INDEXER, initializer_range=0.1,
                                    mlp_layer_types=["dense", "sparse"], indexer_types=["full", "shared"])
    if family in ("minicpm3", "youtu"):
        cls = T.MiniCPM3Config if family == "minicpm3" else T.YoutuConfig
        return causal, cls(**_COMMON, **_MLA)
    if family == "longcat_flash":  # one layer of two attention sublayers
        common = {k: v for k, v in _COMMON.items() if k not in ("intermediate_size", "num_hidden_layers")}
        return causal, T.LongcatFlashConfig(**common, **_MLA, head_dim=8, num_layers=1, ffn_hidden_size=96,
                                            moe_topk=2, n_routed_experts=4, zero_expert_num=2,
                                            expert_ffn_hidden_size=32)
    if family == "mistral4":
        return T.AutoModelForImageTextToText, T.Mistral4Config(
            **_COMMON, **_MLA, **_MOE, first_k_dense_replace=1,
            rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1))
    if family == "mistral_large4":
        text = dict(_COMMON, vocab_size=VOCAB + 8, **_MLA, **_MOE, **_INDEXER, first_k_dense_replace=1,
                    indexer_types=["full", "shared"], rope_parameters=dict(_YARN, attention_factor=1.0))
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
                      image_size=56)
        return T.AutoModelForImageTextToText, T.MistralLarge4Config(text_config=text, vision_config=vision,
                                                                    image_token_index=_SPECIAL)
    if family == "glm5_next":  # a linear-attention layer, then an indexed MLA layer (NoPE: q/k 24, v 16)
        text = dict(_COMMON, vocab_size=VOCAB + 8, **dict(_MLA, qk_nope_head_dim=24, qk_rope_head_dim=0), **_MOE,
                    **_INDEXER, layer_types=["linear_attention", "indexed_attention"],
                    mlp_layer_types=["dense", "sparse"], indexer_types=["full", "full"], linear_head_dim=16,
                    linear_num_heads=4, hc_mult=2, index_kpool=2)
        vision = dict(depth=1, hidden_size=32, num_heads=2, out_hidden_size=64, intermediate_size=64,
                      projection_intermediate_size=64)
        return T.AutoModelForImageTextToText, T.Glm5NextConfig(
            text_config=text, vision_config=vision, image_token_id=_SPECIAL, video_token_id=_SPECIAL + 1,
            image_start_token_id=_SPECIAL + 2, image_end_token_id=_SPECIAL + 3, video_start_token_id=_SPECIAL + 4,
            video_end_token_id=_SPECIAL + 5)
    if family == "hy_v4_vl":
        text = dict(_COMMON, vocab_size=VOCAB + 8, **_MLA, **_MOE, **_INDEXER, initializer_range=0.1,
                    mlp_layer_types=["dense", "sparse"], indexer_types=["full", "shared"],
                    rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [2, 1, 1]})
        vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                      num_hidden_layers=1, out_hidden_size=64)
        return T.AutoModelForImageTextToText, T.HYV4VLConfig(text_config=text, vision_config=vision,
                                                             image_token_id=_SPECIAL, video_token_id=_SPECIAL + 1)
    if family == "mimo_v2_flash":  # q/k head dim 24, value 16; a full layer, then a sliding layer with sinks
        return causal, T.MiMoV2FlashConfig(**_COMMON, num_key_value_heads=2, head_dim=24, v_head_dim=16,
                                           moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                                           n_group=1, topk_group=1, sliding_window=4,
                                           layer_types=["full_attention", "sliding_attention"],
                                           mlp_layer_types=["dense", "sparse"])
    if family == "deepseek_v4":  # one key=value head; a sliding layer, then a compressed-sparse one
        return causal, T.DeepseekV4Config(
            **_COMMON, num_key_value_heads=1, head_dim=32, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=4,
            moe_intermediate_size=32, layer_types=["sliding_attention", "compressed_sparse_attention"],
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
            mlp_layer_types=["moe", "moe"], sliding_window=4, o_groups=2, o_lora_rank=16, index_n_heads=2,
            index_head_dim=16, index_topk=4, num_nextn_predict_layers=0, hc_mult=2)
    if family == "flint":
        return causal, T.FlintConfig(**_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                     moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                     num_experts_per_tok=2, num_experts=4, mlp_only_layers=[0],
                                     layer_types=["sliding_attention", "full_attention"])
    if family in ("granite_swa", "granitemoe_swa"):  # sinks applied as sigmoid(lse - sink) by their eager
        layers = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                      layer_rope_theta=[10000.0, 10000.0])
        if family == "granite_swa":
            return causal, T.GraniteSWAConfig(**_COMMON, num_key_value_heads=2, **layers)
        return causal, T.GraniteMoeSWAConfig(**_COMMON, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2, **layers)
    if family == "openai_privacy_filter":  # bidirectional sliding window (token classification)
        return T.AutoModelForTokenClassification, T.OpenAIPrivacyFilterConfig(
            **_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4, num_local_experts=4,
            num_experts_per_tok=2, num_labels=5, rope_parameters=dict(_YARN, rope_theta=150000.0))
    raise ValueError(family)


def _build(auto, cfg, impl):
    # MoE experts default to torch's grouped_mm, which has no float64 (the oracle)
    return auto.from_config(copy.deepcopy(cfg), attn_implementation=impl, experts_implementation="eager").eval()


_MODELS = {}


def _models(family):
    """{"eager64" (oracle), "eager32", "fa_lite32"}: one set of random weights."""
    if family not in _MODELS:
        auto, cfg = _family_config(family)
        torch.manual_seed(1234)
        base = _build(auto, cfg, "eager")
        with torch.no_grad():
            for module in base.modules():
                sinks = getattr(module, "sinks", None)
                if isinstance(sinks, torch.nn.Parameter):
                    sinks.normal_(0.0, 2.0)  # sinks that take a real share of each row
        ours = _build(auto, cfg, "fa_lite")
        ours.load_state_dict(base.state_dict())
        _MODELS[family] = {"eager64": copy.deepcopy(base).double(), "eager32": base, "fa_lite32": ours}
    return _MODELS[family]


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits


def _oracle(family, ids, mask):
    """float64 eager attention, each sequence alone and unpadded, in the padded batch's layout
    (test_transformers._oracle).  deepseek_v4: the padded batch itself, in float64.  Its
    compressor pools fixed blocks of absolute positions, so left padding changes what the model
    computes (eager32 and eager64 both move by ~0.17 from the unpadded answer); its sinks keep
    every softmax row finite, so float64 eager has no NaN padding rows there."""
    model = _models(family)["eager64"]
    if family == "deepseek_v4":
        return _logits(model, ids, mask)
    out = None
    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        one_ids = ids[b][keep][None]
        one = _logits(model, one_ids, torch.ones_like(one_ids))
        if out is None:
            out = torch.full(ids.shape + one.shape[-1:], float("nan"), dtype=torch.float64)
        out[b, keep] = one[0]
    return out


def _ours_recorded(fn):
    """fn() under fa_lite: (result, flashattn_lite warnings, kernels that ran)."""
    fat._warned.clear()
    box = {}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ran = kernels_run(lambda: box.setdefault("out", fn()))
    return box["out"], [str(x.message) for x in w if "flashattn_lite" in str(x.message)], ran


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_logits_on_the_kernels(family, side):
    models = _models(family)
    ids, mask = _batch(side)
    ours, warned, ran = _ours_recorded(lambda: _logits(models["fa_lite32"], ids, mask))
    assert not warned
    assert ran and ran <= KERNELS, ran
    eager = _logits(models["eager32"], ids, mask)
    ref = _oracle(family, ids, mask)
    valid = mask.bool()
    c = _check("logits", ours[valid], ref[valid], [eager[valid]], FWD_FACTOR)
    print(f"{family} {side}: {c}")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "openai_privacy_filter"])  # (an encoder)
def test_generate_same_greedy_tokens(family):
    models = _models(family)
    ids, mask = _batch("left")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    eager = models["eager32"].generate(**kw)
    ours, warned, ran = _ours_recorded(lambda: models["fa_lite32"].generate(**kw))
    assert not warned
    assert ran and ran <= KERNELS, ran
    assert torch.equal(eager, ours)


@pytest.mark.parametrize("family", ["inkling2", "inkling2_loop"])
def test_per_token_sinks_fall_back_to_eager(family):
    """inkling2's per-token ``sinks`` (with a relative ``position_bias``): no kernel serves them,
    and sdpa would drop them silently; the call goes to the model's eager function, warned
    about, with eager's answer."""
    T = transformers
    cls = T.Inkling2TextConfig if family == "inkling2" else T.Inkling2LoopTextConfig
    loop = {} if family == "inkling2" else dict(loop_layer_index_start=1, loop_layer_index_end=2, loop_num_passes=2,
                                                loop_gate_rank=8)
    common = {k: v for k, v in _COMMON.items() if k != "intermediate_size"}
    cfg = cls(**common, num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2,
              swa_head_dim=16, sliding_window_size=4, rel_extent=8, d_rel=4, layer_types=["hybrid_sliding", "hybrid"],
              moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_layers_per_attn_res_block=1,
              unpadded_vocab_size=VOCAB, **loop)
    torch.manual_seed(1234)
    eager = _build(T.AutoModelForCausalLM, cfg, "eager")
    ours = _build(T.AutoModelForCausalLM, cfg, "fa_lite")
    ours.load_state_dict(eager.state_dict())
    for side in ("left", "right"):
        ids, mask = _batch(side)
        got, warned, _ = _ours_recorded(lambda: _logits(ours, ids, mask))
        assert [m for m in warned if "falling back to the model's eager attention" in m]
        valid = mask.bool()
        torch.testing.assert_close(got[valid], _logits(eager, ids, mask)[valid], rtol=1e-5, atol=1e-5)
    ids, mask = _batch("left")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(eager.generate(**kw), ours.generate(**kw))
