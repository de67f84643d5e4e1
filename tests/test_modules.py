"""nn.Module layers: FlashAttention against nn.MultiheadAttention, swapping inside
nn.TransformerEncoder/Decoder, state dicts, and flash-attn's FlashSelf/CrossAttention.

Tolerance as everywhere in the project (flashattn_lite.testing.compare): the oracle is
torch's own module in float64, the baseline torch's module in float32; ours runs in float32.
"""

import copy

import pytest
import torch
from torch import nn

import flashattn_lite as fl
from flashattn_lite.testing import FWD_FACTOR, GRAD_FACTOR, compare

E, H = 32, 4


def _check(name, ours, ref, base, factor):
    c = compare(name, ours, ref, base, torch.float32, factor, ref.abs().max().item())
    assert c.ok, str(c)


def _inputs(cfg, batch=3, tgt=6, src=9, dtype=torch.float32):
    kdim, vdim = cfg.get("kdim") or E, cfg.get("vdim") or E
    bf = cfg.get("batch_first", False)

    def t(n, d):
        return torch.randn((batch, n, d) if bf else (n, batch, d), dtype=dtype)

    return t(tgt, E), t(src, kdim), t(src, vdim)


def _masks(kind, batch=3, tgt=6, src=9):
    if kind == "none":
        return {}
    kpm = torch.rand(batch, src) < 0.4
    kpm[:, 0] = False  # every query keeps a key: torch gives NaN for rows with none
    am_bool = torch.rand(tgt, src) < 0.3
    am_bool[:, 0] = False
    if kind == "kpm_bool":
        return {"key_padding_mask": kpm}
    if kind == "kpm_float":
        return {"key_padding_mask": torch.randn(batch, src)}
    if kind == "mask_bool":
        return {"attn_mask": am_bool}
    if kind == "mask_float":
        return {"attn_mask": torch.randn(tgt, src)}
    if kind == "mask_3d":
        return {"attn_mask": torch.randn(batch * H, tgt, src)}
    if kind == "both":
        return {"attn_mask": am_bool, "key_padding_mask": kpm}
    raise ValueError(kind)


CONFIGS = [dict(), dict(batch_first=True), dict(add_bias_kv=True, add_zero_attn=True), dict(kdim=12, vdim=20),
           dict(bias=False, batch_first=True)]


def _double(kwargs):
    return {a: m.double() if torch.is_tensor(m) and m.is_floating_point() else m for a, m in kwargs.items()}


def _run(module, q, k, v, grads, **kw):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    self_attn = q is k and k is v
    if self_attn:
        leaves = [leaves[0]] * 3
    module.zero_grad(set_to_none=True)
    out, w = module(*leaves, **kw)
    res = {"out": out.detach(), "w": None if w is None else w.detach()}
    if grads is not None:
        (out * grads).sum().backward()
        res["dq"] = leaves[0].grad
        res["params"] = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    return res


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("masks", ["none", "kpm_bool", "kpm_float", "mask_bool", "mask_float", "mask_3d", "both"])
def test_matches_multihead_attention(cfg, masks):
    torch.manual_seed(0)
    ref_mod = nn.MultiheadAttention(E, H, **cfg).double()
    base_mod = nn.MultiheadAttention(E, H, **cfg)
    base_mod.load_state_dict(ref_mod.state_dict())
    ours = fl.FlashAttention.from_torch(base_mod)
    assert isinstance(ours, nn.MultiheadAttention) and type(ours) is fl.FlashAttention
    q, k, v = _inputs(cfg)
    kw = _masks(masks)
    dout = torch.randn_like(base_mod(q, k, v, need_weights=False, **kw)[0])
    for need_weights, average in ((False, True), (True, True), (True, False)):
        args = dict(need_weights=need_weights, average_attn_weights=average, **kw)
        r = _run(ref_mod, q.double(), k.double(), v.double(), dout.double(), **_double(args))
        b = _run(base_mod, q, k, v, dout, **args)
        o = _run(ours, q, k, v, dout, **args)
        _check("out", o["out"], r["out"], b["out"], FWD_FACTOR)
        if need_weights:
            assert o["w"].shape == r["w"].shape
            _check("weights", o["w"], r["w"], b["w"], FWD_FACTOR)
        else:
            assert o["w"] is None
        _check("dq", o["dq"], r["dq"], b["dq"], GRAD_FACTOR)
        _check("param grads", o["params"], r["params"], b["params"], GRAD_FACTOR)


@pytest.mark.parametrize("need_weights", [False, True])
def test_self_attention_causal_and_unbatched(need_weights):
    torch.manual_seed(0)
    ref_mod = nn.MultiheadAttention(E, H, batch_first=True).double()
    base_mod = copy.deepcopy(ref_mod).float()
    ours = fl.FlashAttention.from_torch(base_mod)
    x = torch.randn(2, 7, E)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    for kw in (dict(attn_mask=causal, is_causal=True),
               dict(attn_mask=causal, is_causal=True,
                    key_padding_mask=torch.tensor([[False] * 7, [False] * 5 + [True] * 2]))):
        dout = torch.randn(2, 7, E)
        xs = x.detach()
        xd = xs.double()
        r = _run(ref_mod, xd, xd, xd, dout.double(), need_weights=need_weights, **_double(kw))
        b = _run(base_mod, xs, xs, xs, dout, need_weights=need_weights, **kw)
        o = _run(ours, xs, xs, xs, dout, need_weights=need_weights, **kw)
        _check("out", o["out"], r["out"], b["out"], FWD_FACTOR)
        _check("param grads", o["params"], r["params"], b["params"], GRAD_FACTOR)
    # unbatched (L, E) input, 1-D key padding mask
    xu = x[0]
    kpm = torch.tensor([False] * 6 + [True])
    r = ref_mod(xu.double(), xu.double(), xu.double(), key_padding_mask=kpm, need_weights=need_weights)
    b = base_mod(xu, xu, xu, key_padding_mask=kpm, need_weights=need_weights)
    o = ours(xu, xu, xu, key_padding_mask=kpm, need_weights=need_weights)
    _check("unbatched out", o[0].detach(), r[0].detach(), b[0].detach(), FWD_FACTOR)
    if need_weights:
        assert o[1].shape == r[1].shape == (7, 7)


# ------------------------------------------------------------------ query rows that see no key (issue 14)


def _no_key_case(kind):
    """(sizes, module kwargs, kept batch items, kept query rows) for masks that leave some query
    rows without a visible key.  torch gives NaN there (and NaN in every parameter gradient);
    the kept part is what it still computes finitely."""
    batch, tgt, src = 3, (7 if kind == "padded_item_causal" else 6), (7 if kind == "padded_item_causal" else 9)
    kpm = torch.rand(batch, src) < 0.4
    kpm[:, 0] = False
    kpm[1] = True  # batch item 1: every key padded
    items, rows = [0, 2], list(range(tgt))
    if kind == "padded_item":
        kw = {"key_padding_mask": kpm}
    elif kind == "padded_item_float_mask":  # float masks: -inf entries, a whole row of them for item 1
        kw = {"key_padding_mask": torch.zeros(batch, src).masked_fill(kpm, float("-inf")),
              "attn_mask": torch.randn(tgt, src)}
    elif kind == "padded_item_causal":
        kw = {"key_padding_mask": torch.zeros(batch, src).masked_fill(kpm, float("-inf")),
              "attn_mask": nn.Transformer.generate_square_subsequent_mask(tgt), "is_causal": True}
    elif kind == "masked_row":
        am = torch.rand(tgt, src) < 0.3
        am[:, 0] = False
        am[2] = True  # query row 2 of every item: every key masked
        kw = {"attn_mask": am}
        items, rows = [0, 1, 2], [r for r in range(tgt) if r != 2]
    else:
        raise ValueError(kind)
    return (batch, tgt, src), kw, items, rows


def _run_loss(module, q, k, v, dout, dw, kw):
    """``module`` on batch-first q, k, v (transposed for a sequence-first module); backward of
    (out * dout).sum() + (weights * dw).sum(); everything returned batch-first."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    args = leaves if module.batch_first else [t.transpose(0, 1) for t in leaves]
    module.zero_grad(set_to_none=True)
    out, w = module(*args, **kw)
    out = out if module.batch_first else out.transpose(0, 1)
    loss = (out * dout).sum() + (0 if w is None else (w * dw).sum())
    loss.backward()
    return {"out": out.detach(), "w": None if w is None else w.detach(), "dq": leaves[0].grad,
            "dk": leaves[1].grad, "dv": leaves[2].grad,
            "params": {n: p.grad for n, p in module.named_parameters() if p.grad is not None}}


NO_KEY_CONFIGS = [dict(), dict(batch_first=True), dict(kdim=12, vdim=20), dict(add_bias_kv=True, add_zero_attn=True)]


@pytest.mark.parametrize("cfg", NO_KEY_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("kind", ["padded_item", "padded_item_float_mask", "padded_item_causal", "masked_row"])
def test_rows_without_keys_match_multihead_attention(cfg, kind):
    """A fully padded batch item (or a fully masked query row): output 0 before out_proj, zero
    weights, and finite gradients (issue 14: the weights path gave NaN gradients) that match
    nn.MultiheadAttention wherever torch is finite.  torch's parameter gradients are NaN
    there, so its oracle runs on the kept items / rows; the dropped rows' only contribution
    to any parameter gradient is dout to out_proj.bias (their attention output is constant)."""
    (batch, tgt, src), kw, items, rows = _no_key_case(kind)
    extra = int(cfg.get("add_bias_kv", False)) + int(cfg.get("add_zero_attn", False))
    if extra:  # bias_k / the zero key stay visible to every row: nothing is empty, torch is finite
        items, rows = list(range(batch)), list(range(tgt))
    ref_mod = nn.MultiheadAttention(E, H, **cfg).double()
    base_mod = nn.MultiheadAttention(E, H, **cfg)
    base_mod.load_state_dict(ref_mod.state_dict())
    ours = fl.FlashAttention.from_torch(base_mod)
    q = torch.randn(batch, tgt, E)
    k, v = torch.randn(batch, src, cfg.get("kdim") or E), torch.randn(batch, src, cfg.get("vdim") or E)
    dout = torch.randn(batch, tgt, E)
    i, r = torch.tensor(items), torch.tensor(rows)
    kept = torch.zeros(batch, tgt, dtype=torch.bool)
    kept[i[:, None], r] = True
    for need_weights, average in ((True, True), (True, False), (False, True)):
        dw = torch.randn((batch, tgt, src + extra) if average else (batch, H, tgt, src + extra))
        args = dict(kw, need_weights=need_weights, average_attn_weights=average)

        o = _run_loss(ours, q, k, v, dout, dw, args)
        for key in ("out", "dq", "dk", "dv"):
            assert torch.isfinite(o[key]).all(), key
        assert all(torch.isfinite(g).all() for g in o["params"].values())

        # torch on the kept part
        kept_kw = dict(args)
        if "key_padding_mask" in kw:
            kept_kw["key_padding_mask"] = kw["key_padding_mask"][i]
        if "attn_mask" in kw:
            kept_kw["attn_mask"] = kw["attn_mask"][r]
        qk, kk, vk, dk_out = q[i][:, r], k[i], v[i], dout[i][:, r]
        dwk = dw[i][..., r, :]
        ref = _run_loss(ref_mod, qk.double(), kk.double(), vk.double(), dk_out.double(), dwk.double(),
                        _double(kept_kw))
        base = _run_loss(base_mod, qk, kk, vk, dk_out, dwk, kept_kw)
        for res, dt in ((ref, torch.float64), (base, torch.float32)):
            res["params"]["out_proj.bias"] = res["params"]["out_proj.bias"] + dout[~kept].sum(0).to(dt)

        _check("out", o["out"][i][:, r], ref["out"], base["out"], FWD_FACTOR)
        assert torch.equal(o["out"][~kept], ours.out_proj.bias.detach().expand(int((~kept).sum()), E))
        _check("dq", o["dq"][i][:, r], ref["dq"], base["dq"], GRAD_FACTOR)
        assert (o["dq"][~kept] == 0).all()
        for key in ("dk", "dv"):  # a dropped row reads no key; a dropped item's keys are read by no row
            _check(key, o[key][i], ref[key], base[key], GRAD_FACTOR)
            assert (o[key][[b for b in range(batch) if b not in items]] == 0).all()
        names = list(o["params"])
        assert names == list(ref["params"])
        flat = {key: torch.cat([res["params"][n].flatten() for n in names]) for key, res in
                (("ours", o), ("ref", ref), ("base", base))}
        _check("param grads", flat["ours"], flat["ref"], flat["base"], GRAD_FACTOR)
        if need_weights:
            w = o["w"] if average else o["w"].transpose(0, 1)  # heads in front: (H, N, L, S)
            w_ref = ref["w"] if average else ref["w"].transpose(0, 1)
            w_base = base["w"] if average else base["w"].transpose(0, 1)
            _check("weights", w[..., i, :, :][..., r, :], w_ref, w_base, FWD_FACTOR)
            assert (w[..., ~kept, :] == 0).all()
        else:
            assert o["w"] is None


def test_rows_without_keys_unbatched_and_in_training():
    """The whole (unbatched) input padded, and weights with dropout in training: finite
    gradients, zero for everything but out_proj.bias."""
    for dropout, training in ((0.0, False), (0.5, True)):
        m = fl.FlashAttention(E, H, dropout=dropout).train(training)
        x = torch.randn(5, E, requires_grad=True)
        out, w = m(x, x, x, key_padding_mask=torch.ones(5, dtype=torch.bool), average_attn_weights=False)
        assert torch.equal(out, m.out_proj.bias.detach().expand(5, E)) and w.shape == (H, 5, 5) and (w == 0).all()
        dout = torch.randn(5, E)
        ((out * dout).sum() + (w * torch.randn_like(w)).sum()).backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
        for name, p in m.named_parameters():
            want = dout.sum(0) if name == "out_proj.bias" else torch.zeros_like(p)
            torch.testing.assert_close(p.grad, want, rtol=0, atol=1e-5 if name == "out_proj.bias" else 0, msg=name)
    # a padded item in a batch with dropout: the other items' gradients stay finite too
    m = fl.FlashAttention(E, H, dropout=0.5, batch_first=True)
    x = torch.randn(2, 5, E, requires_grad=True)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0] = True
    out, w = m(x, x, x, key_padding_mask=kpm)
    (out.sum() + (w * torch.randn_like(w)).sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[0] == 0).all() and (x.grad[1] != 0).any()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_state_dict_round_trips_both_ways():
    for cfg in CONFIGS:
        mha = nn.MultiheadAttention(E, H, **cfg)
        ours = fl.FlashAttention(E, H, **cfg)
        assert list(ours.state_dict()) == list(mha.state_dict())
        ours.load_state_dict(mha.state_dict())
        mha2 = nn.MultiheadAttention(E, H, **cfg)
        mha2.load_state_dict(ours.state_dict())
        for (n1, p1), (n2, p2) in zip(mha.state_dict().items(), mha2.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2)
    names = dict(fl.FlashAttention(E, H, kdim=8, vdim=8).named_parameters())
    assert {"q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "out_proj.weight"} <= set(names)


def test_from_torch_copies_or_shares():
    mha = nn.MultiheadAttention(E, H, dropout=0.1).eval()
    copied = fl.FlashAttention.from_torch(mha)
    shared = fl.FlashAttention.from_torch(mha, share_parameters=True)
    assert not copied.training and copied.dropout == 0.1
    assert copied.in_proj_weight is not mha.in_proj_weight and torch.equal(copied.in_proj_weight, mha.in_proj_weight)
    assert shared.in_proj_weight is mha.in_proj_weight and shared.out_proj is mha.out_proj
    with pytest.raises(TypeError):
        fl.FlashAttention.from_torch(nn.Linear(2, 2))


def _count_calls(monkeypatch):
    calls = []
    original = fl.FlashAttention.forward

    def spy(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(fl.FlashAttention, "forward", spy)
    return calls


def test_swap_attention_in_transformer_encoder(monkeypatch):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=48, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)
    swapped = fl.swap_attention(copy.deepcopy(model))
    assert all(type(m.self_attn) is fl.FlashAttention for m in swapped.layers)
    x = torch.randn(3, 8, E)
    kpm = torch.zeros(3, 8, dtype=torch.bool)
    kpm[1, 5:] = True
    kpm[2, 2:] = True
    calls = _count_calls(monkeypatch)
    for train in (False, True):
        model.train(train)
        swapped.train(train)
        # eval + no_grad: torch's fused fast path reads the (same) weights; it must still agree
        with torch.no_grad():
            a, b = model(x, src_key_padding_mask=kpm), swapped(x, src_key_padding_mask=kpm)
        valid = ~kpm
        torch.testing.assert_close(b[valid], a[valid], rtol=1e-5, atol=1e-5)
        # with grad: the layers call our forward
        n = len(calls)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = model(xa, src_key_padding_mask=kpm), swapped(xb, src_key_padding_mask=kpm)
        assert len(calls) == n + 2
        torch.testing.assert_close(b[valid], a[valid], rtol=1e-5, atol=1e-5)
        g = torch.randn_like(a) * valid[..., None]
        a.backward(g)
        b.backward(g)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
        for (n1, p1), (n2, p2) in zip(model.named_parameters(), swapped.named_parameters()):
            assert n1 == n2
            torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-5)
            p1.grad = p2.grad = None


def test_swap_attention_in_transformer_decoder_shares_parameters(monkeypatch):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=48, dropout=0.0)
    model = nn.TransformerDecoder(layer, num_layers=2)
    reference = copy.deepcopy(model)
    params_before = list(model.parameters())
    assert fl.swap_attention(model) is model
    assert all(type(m.self_attn) is fl.FlashAttention and type(m.multihead_attn) is fl.FlashAttention
               for m in model.layers)
    assert all(a is b for a, b in zip(params_before, model.parameters()))  # an optimizer keeps working
    calls = _count_calls(monkeypatch)
    tgt, memory = torch.randn(7, 2, E, requires_grad=True), torch.randn(9, 2, E)
    mem_kpm = torch.zeros(2, 9, dtype=torch.bool)
    mem_kpm[1, 6:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    kw = dict(tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=mem_kpm)
    for train in (True, False):
        model.train(train)
        reference.train(train)
        tgt_ref = tgt.detach().clone().requires_grad_()
        a = reference(tgt_ref, memory, **kw)
        b = model(tgt, memory, **kw)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(a)
        a.backward(g)
        b.backward(g)
        torch.testing.assert_close(tgt.grad, tgt_ref.grad, rtol=1e-5, atol=1e-5)
        for p1, p2 in zip(reference.parameters(), model.parameters()):
            torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-5)
            p1.grad = p2.grad = None
        tgt.grad = None
    assert len(calls) == 8  # 2 layers x (self + cross) x 2 passes


def test_dropout_in_training_only():
    from flashattn_lite.testing import record_dropout

    torch.manual_seed(0)
    m = fl.FlashAttention(E, H, dropout=0.5, batch_first=True)
    x = torch.randn(2, 5, E)
    with record_dropout() as calls:
        out_train = m(x, x, x, need_weights=False)[0]
    assert len(calls) == 1 and calls[0].p == 0.5
    m.eval()
    with record_dropout() as calls:
        out_eval = m(x, x, x, need_weights=False)[0]
    assert not calls and not torch.allclose(out_train, out_eval)
    # weights requested in training: the returned (dropped) weights are the ones applied, as in torch
    m.train()
    out, w = m(x, x, x, need_weights=True, average_attn_weights=False)
    assert (w == 0).any() and not torch.allclose(w.sum(-1), torch.ones(()))
    v = (x @ m.in_proj_weight[2 * E:].T + m.in_proj_bias[2 * E:]).view(2, 5, H, E // H).transpose(1, 2)
    expected = m.out_proj((w @ v).transpose(1, 2).reshape(2, 5, E))
    torch.testing.assert_close(out, expected)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        fl.FlashAttention(30, 4)
    with pytest.raises(ValueError, match="> 0"):
        fl.FlashAttention(0, 4)
    with pytest.raises(ValueError, match="head dim"):
        fl.FlashAttention(1040, 2)  # head dim 520 > 512
    m = fl.FlashAttention(E, H, batch_first=True)
    x = torch.randn(2, 5, E)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(5, 4))
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(3, 5, 5))
    with pytest.raises(ValueError, match="is_causal"):
        m(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="embed"):
        m(torch.randn(2, 5, E + 1), x, x)
    with pytest.raises(TypeError, match="bool or floating"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="qkv"):
        fl.FlashSelfAttention()(torch.randn(2, 5, 2, H, 8))
    with pytest.raises(ValueError, match="kv"):
        fl.FlashCrossAttention()(torch.randn(2, 5, H, 8), torch.randn(2, 5, 3, H, 8))


def test_flash_self_and_cross_attention_modules():
    from flashattn_lite.testing import reference_results, reference_results_varlen

    torch.manual_seed(0)
    qkv = torch.randn(2, 6, 3, H, 16)
    m = fl.FlashSelfAttention(causal=True, softmax_scale=0.3)
    out = m(qkv)
    ref, _ = reference_results(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None, 0.3, 0, -1, 0)
    torch.testing.assert_close(out.double(), ref["out"], rtol=1e-5, atol=1e-5)
    out_nc = m(qkv, causal=False)  # per-call override
    ref, _ = reference_results(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None, 0.3)
    torch.testing.assert_close(out_nc.double(), ref["out"], rtol=1e-5, atol=1e-5)
    # varlen packed qkv
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    packed = torch.randn(9, 3, H, 16)
    out = fl.FlashSelfAttention(causal=True)(packed, cu_seqlens=cu, max_seqlen=5)
    ref, _ = reference_results_varlen(packed[:, 0], packed[:, 1], packed[:, 2], None, cu, cu, 16 ** -0.5, causal=True)
    torch.testing.assert_close(out.double(), ref["out"], rtol=1e-5, atol=1e-5)
    # cross attention with GQA (4 query heads, 2 kv heads), dense and varlen
    q, kv = torch.randn(2, 3, H, 16), torch.randn(2, 7, 2, 2, 16)
    out = fl.FlashCrossAttention()(q, kv)
    ref, _ = reference_results(q, kv[:, :, 0], kv[:, :, 1], None, 16 ** -0.5)
    torch.testing.assert_close(out.double(), ref["out"], rtol=1e-5, atol=1e-5)
    cu_q, cu_k = torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([0, 4, 7], dtype=torch.int32)
    qv, kvv = torch.randn(3, H, 16), torch.randn(7, 2, 2, 16)
    out = fl.FlashCrossAttention(causal=True)(qv, kvv, cu_seqlens=cu_q, max_seqlen=2, cu_seqlens_k=cu_k,
                                              max_seqlen_k=4)
    ref, _ = reference_results_varlen(qv, kvv[:, 0], kvv[:, 1], None, cu_q, cu_k, 16 ** -0.5, causal=True)
    torch.testing.assert_close(out.double(), ref["out"], rtol=1e-5, atol=1e-5)
    # dropout only in training
    sa = fl.FlashSelfAttention(attention_dropout=0.5).eval()
    torch.testing.assert_close(sa(qkv), fl.flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]))
