"""flash_attn_with_kvcache: KV-cache decoding (append, rotary, paged caches, split-KV)
on every backend against a float64 oracle written here from first principles.

The oracle reads each sequence's keys straight out of the cache (walking the block
table page by page), so it shares no code with the backends' paged reads; rotary is
checked against a complex-number formulation.  Tolerance: flashattn_lite.testing.
"""

import pytest
import torch

import flashattn_lite as fl
from flashattn_lite.backends.reference import attention_math
from flashattn_lite.testing import check_against_reference

BACKENDS = ["reference", "triton", "cpu"]


# ------------------------------------------------------------------ oracle


def rotary64(x, cos, sin, positions, interleaved):
    """Rotary in float64 via complex numbers: a channel pair (x1, x2) is x1 + i x2,
    multiplied by cos + i sin.  ``positions`` (B, S)."""
    rd = 2 * cos.shape[1]
    x = x.double()
    c = cos.double()[positions][:, :, None, :]
    s = sin.double()[positions][:, :, None, :]
    if interleaved:
        pairs = torch.view_as_complex(x[..., :rd].reshape(*x.shape[:-1], rd // 2, 2).contiguous())
    else:
        pairs = torch.complex(x[..., :rd // 2], x[..., rd // 2:rd])
    turned = pairs * torch.complex(c, s)
    if interleaved:
        rot = torch.view_as_real(turned).flatten(-2)
    else:
        rot = torch.cat((turned.real, turned.imag), dim=-1)
    return torch.cat((rot, x[..., rd:]), dim=-1)


def sequence(cache, b, start, end, block_table=None, batch_idx=None):
    """Keys [start, end) of batch item b, read page by page."""
    if block_table is None:
        row = b if batch_idx is None else int(batch_idx[b])
        return cache[row, start:end]
    page = cache.shape[1]
    pages = [cache[int(block_table[b, j])] for j in range(-(-end // page))]
    return torch.cat(pages)[start:end] if pages else cache[:0, 0]


def oracle(q, q64, k_cache, v_cache, ends, starts, scale, causal, window, softcap, slopes, block_table, batch_idx):
    """(ref, baseline) dicts {'out', 'lse'}: float64 attention on ``q64`` and the same
    math in q's dtype on ``q`` (flash-attn's tolerance yardstick)."""
    batch, sq = q.shape[:2]
    left, right = window
    if causal:
        right = 0
    res = {"ref": {"out": [], "lse": []}, "baseline": {"out": [], "lse": []}}
    for b in range(batch):
        k = sequence(k_cache, b, starts[b], ends[b], block_table, batch_idx)
        v = sequence(v_cache, b, starts[b], ends[b], block_table, batch_idx)
        off = ends[b] - sq - starts[b]
        for key, qq, upcast, cast in (("ref", q64, True, torch.float64), ("baseline", q, False, q.dtype)):
            sl = None if slopes is None else slopes.expand(batch, q.shape[2])[b:b + 1].to(cast)
            o, l = attention_math(qq[b:b + 1].to(cast), k[None].to(cast), v[None].to(cast), scale, off, left, right,
                                  upcast=upcast, softcap=softcap, alibi_slopes=sl)
            res[key]["out"].append(o)
            res[key]["lse"].append(l)
    return tuple({k: torch.cat(v) for k, v in res[key].items()} for key in ("ref", "baseline"))


# ------------------------------------------------------------------ one case


def geometry(case):
    """(lengths before appending, new positions per sequence, ends, left pads, block table,
    batch index) of a :func:`make_case` case."""
    batch = case["q"].shape[0]
    seqlens = case["cache_seqlens"]
    lengths = [seqlens] * batch if isinstance(seqlens, int) else seqlens.tolist()
    snew = case["k"].shape[1] if "k" in case else 0
    starts = case["cache_leftpad"].tolist() if "cache_leftpad" in case else [0] * batch
    return lengths, snew, [n + snew for n in lengths], starts, case.get("block_table"), case.get("cache_batch_idx")


def slot(b, p, table, bidx, page_size):
    """(cache row or page, row in it) holding position p of sequence b."""
    if table is None:
        return (b if bidx is None else int(bidx[b])), p
    return int(table[b, p // page_size]), p % page_size


def rotated_inputs(case, lengths, causal, window):
    """(new keys, q) in float64 after the case's rotary (none: as given), by flash-attn's rule
    for q's positions (see flash_attn_with_kvcache)."""
    q, new_k = case["q"], case["k"].double()
    if "rotary_cos" not in case:
        return new_k, q.double()
    cos, sin, inter = case["rotary_cos"], case["rotary_sin"], case["rotary_interleaved"]
    sq, snew = q.shape[1], new_k.shape[1]
    new_k = rotary64(new_k, cos, sin, torch.tensor(lengths)[:, None] + torch.arange(snew), inter)
    local = causal or window != (-1, -1)
    qpos = torch.tensor(lengths)[:, None] + (torch.arange(sq) if local else torch.zeros(sq, dtype=torch.long))
    return new_k, rotary64(q, cos, sin, qpos, inter)


def make_case(batch=2, sq=1, hq=2, hk=2, d=16, dtype=torch.float16, seqlens=(5, 9), snew=0, page_size=None,
              num_blocks=None, capacity=24, batch_idx=False, leftpad=None, rotary=None, seqlens_as_int=False):
    """Random inputs.  ``page_size`` None: contiguous cache of ``capacity`` positions
    (with ``batch_idx``: more cache rows than batch items, used in reverse order);
    else a paged cache with pages scattered randomly over ``num_blocks`` blocks.
    ``rotary``: None or (rotary_dim, interleaved)."""
    case = {}
    case["q"] = torch.randn(batch, sq, hq, d, dtype=dtype)
    if page_size is None:
        rows = batch + 2 if batch_idx else batch
        k_cache = torch.randn(rows, capacity, hk, d, dtype=dtype)
        v_cache = torch.randn(rows, capacity, hk, d, dtype=dtype)
        if batch_idx:
            case["cache_batch_idx"] = torch.arange(rows - 1, rows - 1 - batch, -1, dtype=torch.int32)
    else:
        max_blocks = -(-capacity // page_size)
        num_blocks = num_blocks or batch * max_blocks + 3
        k_cache = torch.randn(num_blocks, page_size, hk, d, dtype=dtype)
        v_cache = torch.randn(num_blocks, page_size, hk, d, dtype=dtype)
        case["block_table"] = torch.randperm(num_blocks)[:batch * max_blocks].reshape(batch, max_blocks).to(
            torch.int32)
    case["k_cache"], case["v_cache"] = k_cache, v_cache
    case["cache_seqlens"] = seqlens[0] if seqlens_as_int else torch.tensor(seqlens, dtype=torch.int32)
    if snew:
        case["k"] = torch.randn(batch, snew, hk, d, dtype=dtype)
        case["v"] = torch.randn(batch, snew, hk, d, dtype=dtype)
    if leftpad is not None:
        case["cache_leftpad"] = torch.tensor(leftpad, dtype=torch.int32)
    if rotary is not None:
        rd, interleaved = rotary
        angles = torch.rand(capacity + sq + 4, rd // 2, dtype=torch.float64) * 6.3
        case["rotary_cos"] = angles.cos().to(dtype)
        case["rotary_sin"] = angles.sin().to(dtype)
        case["rotary_interleaved"] = interleaved
    return case


def run_case(backend, case, causal=False, window=(-1, -1), softcap=0.0, alibi=None, num_splits=0, scale=None,
             in_place=False):
    """Run ``case`` on ``backend``; check the appended cache and out/lse against the oracle.
    ``in_place``: append into the case's own caches (keeping their memory layout), not copies."""
    q = case["q"]
    batch, sq, hq, d = q.shape
    slopes = None
    if alibi == "heads":
        slopes = torch.rand(hq)
    elif alibi == "batch-heads":
        slopes = torch.rand(batch, hq)
    kc0, vc0 = case["k_cache"].clone(), case["v_cache"].clone()
    args = {k: v for k, v in case.items()}
    if not in_place:
        args["k_cache"], args["v_cache"] = case["k_cache"].clone(), case["v_cache"].clone()
    with fl.use_backend(backend):
        out, lse = fl.flash_attn_with_kvcache(**args, softmax_scale=scale, causal=causal, window_size=window,
                                              softcap=softcap, alibi_slopes=slopes, num_splits=num_splits,
                                              return_softmax_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (batch, hq, sq)
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)

    lengths, snew, ends, starts, table, bidx = geometry(case)
    kc, vc = args["k_cache"], args["v_cache"]

    # the cache: new keys (rotated) at cache_seqlens.., every other position untouched
    expect_k, expect_v = kc0.clone(), vc0.clone()
    q64 = q.double()
    if snew:
        new_k, q64 = rotated_inputs(case, lengths, causal, window)
        for b in range(batch):
            for t in range(snew):
                blk, row = slot(b, lengths[b] + t, table, bidx, kc.shape[1])
                expect_k[blk, row] = new_k[b, t].to(q.dtype)
                expect_v[blk, row] = case["v"][b, t]
    eps = torch.finfo(q.dtype).eps
    torch.testing.assert_close(kc, expect_k, rtol=2 * eps, atol=4 * eps)
    assert torch.equal(vc, expect_v)

    scale_ = d ** -0.5 if scale is None else scale
    ref, base = oracle(q64.to(q.dtype), q64, kc, vc, ends, starts, scale_, causal, window, softcap, slopes, table,
                       bidx)
    ours = {"out": out, "lse": lse}
    failed = [str(c) for c in check_against_reference(ours, ref, base, q.dtype) if not c.ok]
    assert not failed, "; ".join(failed)
    empty = torch.isinf(ref["lse"])
    assert torch.equal(torch.isinf(lse), empty)
    assert (out.transpose(1, 2)[empty] == 0).all()
    assert torch.isfinite(out).all()
    return out, lse


# ------------------------------------------------------------------ correctness

PAGED = [None, 3, 16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", PAGED)
def test_decode_one_query(backend, page_size):
    run_case(backend, make_case(batch=3, seqlens=(0, 7, 37), page_size=page_size, capacity=40, hq=4, hk=2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", PAGED)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_append_causal(backend, page_size, num_splits):
    run_case(backend, make_case(sq=3, snew=3, seqlens=(4, 20), page_size=page_size, capacity=30, hq=4, hk=1,
                                dtype=torch.bfloat16), causal=True, num_splits=num_splits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_rotary(backend, interleaved, causal):
    run_case(backend, make_case(sq=2, snew=2, seqlens=(6, 11), d=24, rotary=(16, interleaved), page_size=5),
             causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_full_dim_local(backend):
    # not causal but windowed: q rows rotate at consecutive positions too
    run_case(backend, make_case(sq=2, snew=1, seqlens=(9, 3), d=16, rotary=(16, True)), window=(4, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_idx_and_int_seqlens(backend):
    run_case(backend, make_case(batch=3, snew=1, seqlens=(8,), seqlens_as_int=True, batch_idx=True, hq=2, hk=1),
             causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 4])
def test_leftpad(backend, page_size):
    run_case(backend, make_case(sq=2, snew=1, seqlens=(9, 14), leftpad=(3, 14), page_size=page_size,
                                rotary=(8, False)), causal=True, alibi="heads")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 3, 16])
def test_paged_window_gqa(backend, page_size):
    run_case(backend, make_case(batch=2, sq=2, snew=2, hq=6, hk=2, seqlens=(30, 13), capacity=40,
                                page_size=page_size, dtype=torch.float32), causal=True, window=(7, 0), num_splits=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_both_sides_not_causal(backend):
    run_case(backend, make_case(sq=4, seqlens=(20, 25), capacity=30, page_size=7), window=(3, 2), num_splits=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alibi", ["heads", "batch-heads"])
def test_softcap_alibi(backend, alibi):
    run_case(backend, make_case(sq=1, snew=1, seqlens=(10, 19), page_size=16, capacity=32, hq=4, hk=2),
             softcap=5.0, alibi=alibi, scale=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [0, 1, 2, 5])
def test_splits(backend, num_splits):
    # 5 splits of a 20-key range with 16-key tiles: some splits get no keys at all
    run_case(backend, make_case(seqlens=(20, 70), capacity=80, page_size=16, hq=4, hk=4), num_splits=num_splits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_page(backend):
    run_case(backend, make_case(batch=1, seqlens=(300,), capacity=512, page_size=256, num_blocks=3, d=8,
                                dtype=torch.float32), num_splits=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_query_rows(backend):
    # Sq x group = 40 rows: several row blocks of the Triton kernel
    run_case(backend, make_case(batch=1, sq=10, snew=10, hq=4, hk=1, seqlens=(12,), capacity=30, page_size=8),
             causal=True, num_splits=2)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_dtypes(backend, dtype):
    run_case(backend, make_case(sq=2, snew=1, seqlens=(5, 12), dtype=dtype, d=40, page_size=6), causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_cache_rows(backend):
    # a sequence with no keys at all: out 0, lse -inf
    run_case(backend, make_case(seqlens=(0, 4), page_size=4), num_splits=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq", [2, 4])
@pytest.mark.parametrize("d", [80, 256])
def test_cpu_long_cache(dtype, hq, d):
    # The CPU decode kernel past the short caches above: several 64-position key tiles per
    # split, pages of 7 positions that cross tile edges (the page walk of the tile being
    # read, and of the next one while it is prefetched), head dims over one register
    # block (80 leaves a partial vector, 256 four blocks), one query row per kv head
    # (hq 2) and two (hq 4), fp16/bf16 rows widened in the group's register blocks.
    case = make_case(batch=2, sq=1, hq=hq, hk=2, d=d, dtype=dtype, seqlens=(200, 131), page_size=7, capacity=210)
    run_case("cpu", case, num_splits=1)
    run_case("cpu", case, causal=True, window=(150, 0), num_splits=1)  # 3 tiles of the window
    run_case("cpu", case, num_splits=2)


def test_cpu_bits_independent_of_threads():
    case = make_case(batch=1, sq=2, hq=4, hk=1, seqlens=(300,), capacity=320, page_size=7, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with fl.use_backend("cpu"):
                results.append(fl.flash_attn_with_kvcache(**case, num_splits=3, return_softmax_lse=True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_auto_routes_cpu_tensors():
    case = make_case(seqlens=(3, 5))
    out = fl.flash_attn_with_kvcache(case["q"], case["k_cache"], case["v_cache"],
                                     cache_seqlens=case["cache_seqlens"])
    assert out.shape == case["q"].shape


def test_auto_num_splits():
    from flashattn_lite.planning import auto_num_splits

    assert auto_num_splits(programs=200, max_keys=10 ** 6, block_n=64, num_sms=132) == 1
    assert auto_num_splits(programs=8, max_keys=10 ** 6, block_n=64, num_sms=132) == 17
    assert auto_num_splits(programs=8, max_keys=300, block_n=64, num_sms=132) == 1
    assert auto_num_splits(programs=1, max_keys=10 ** 7, block_n=64, num_sms=1000) == 128


def test_fake_impl_and_schema():
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = make_case(seqlens=(3, 5), page_size=4)
    with FakeTensorMode() as mode:
        q = mode.from_tensor(case["q"])
        kc, vc = mode.from_tensor(case["k_cache"]), mode.from_tensor(case["v_cache"])
        bt, sl = mode.from_tensor(case["block_table"]), mode.from_tensor(case["cache_seqlens"])
        out, lse = torch.ops.flashattn_lite.decode(q, kc, vc, bt, sl, None, 5, 0.25, -1, -1, 0.0, None, 0,
                                                   "reference")
    assert out.shape == q.shape and lse.shape == (2, 2, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    # schema, fake implementation and dynamic-shape tracing of flashattn_lite::decode
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(5, 4, 2, 16), torch.randn(5, 4, 2, 16)
    table = torch.tensor([[0, 1], [3, 4]], dtype=torch.int32)
    seqlens = torch.tensor([3, 7], dtype=torch.int32)
    torch.library.opcheck(torch.ops.flashattn_lite.decode.default,
                          (q, kc, vc, table, seqlens, None, 7, 0.25, -1, 0, 0.0, None, 2, backend))


# ------------------------------------------------------------------ bad input


def _bad(match, exc=ValueError, **changes):
    case = make_case(seqlens=(3, 5), snew=1, page_size=4, capacity=8)
    case.update(changes)
    case = {k: v for k, v in case.items() if v is not None}
    with pytest.raises(exc, match=match):
        fl.flash_attn_with_kvcache(**case)


def test_bad_block_table_entry():
    table = make_case(page_size=4, capacity=8)["block_table"].clone()
    table[1, 1] = 999
    _bad(r"block_table\[1, 1\] = 999 is out of range", block_table=table)


def test_bad_shared_page_at_appended_positions():
    case = make_case(seqlens=(3, 5), snew=1, page_size=4, capacity=8)
    table = case["block_table"].clone()
    table[1, 0] = table[0, 0]  # both sequences append into the first page, at row 3
    k_before = case["k_cache"].clone()
    _bad("one cache slot", block_table=table, cache_seqlens=torch.tensor([3, 3], dtype=torch.int32))
    assert torch.equal(case["k_cache"], k_before)  # refused before anything was written


# appends into memory that something else also uses (issue 14): refused before anything is written


def _overlap_case(kind):
    """A contiguous-cache case (batch 2, 2 kv heads, head dim 16, 8 positions, one new token at
    cache_seqlens (3, 5)) whose caches or inputs share memory in the way ``kind`` names."""
    case = make_case(seqlens=(3, 5), snew=1, capacity=8)
    kc = case["k_cache"]
    if kind == "expanded batch":  # the issue's example: batch 1's key lands in batch 0's row
        case["k_cache"] = kc[:1].expand(2, 8, 2, 16)
    elif kind == "expanded paged":  # every page one memory
        case.update(make_case(seqlens=(3, 5), snew=1, page_size=4, capacity=8))
        case["v_cache"] = case["v_cache"][:1].expand_as(case["v_cache"])
    elif kind == "rows as_strided":  # row 1 starts at row 0's position 4
        case["k_cache"] = torch.randn(12 * 32, dtype=kc.dtype).as_strided((2, 8, 2, 16), (4 * 32, 32, 16, 1))
    elif kind == "positions as_strided":  # position p's head 1 is position p + 1's head 0
        case["v_cache"] = torch.randn(2 * 9 * 16, dtype=kc.dtype).as_strided((2, 8, 2, 16), (9 * 16, 16, 16, 1))
    elif kind == "heads as_strided":  # heads 8 apart with head dim 16
        case["k_cache"] = torch.randn(2 * 8 * 24, dtype=kc.dtype).as_strided((2, 8, 2, 16), (8 * 24, 24, 8, 1))
    elif kind == "v_cache is k_cache":
        case["v_cache"] = kc
    elif kind == "v_cache shifted k_cache":  # one buffer, v one row further on
        buf = torch.randn(3, 8, 2, 16, dtype=kc.dtype)
        case["k_cache"], case["v_cache"] = buf[:2], buf[1:]
    elif kind == "q in written slots":
        case["cache_seqlens"] = 3
        case["q"] = kc[:, 3:4]
    elif kind == "new v in k_cache":
        case["cache_seqlens"] = 3
        case["v"] = kc[:, 3:4]
    elif kind == "new k in other written slots":  # slots 3, 4 written from slots 4, 5
        case.update(cache_seqlens=3, k=kc[:, 4:6], v=torch.randn(2, 2, 2, 16, dtype=kc.dtype))
    else:
        raise ValueError(kind)
    return case


SHARED_MEMORY_ERRORS = {
    "expanded batch": r"k_cache \(shape \(2, 8, 2, 16\), strides \(0, 32, 16, 1\)\) has rows 0 and 1",
    "expanded paged": "v_cache .* has rows .* share memory",
    "rows as_strided": r"k_cache .* has rows \(dim 0\) in use that share memory",
    "positions as_strided": r"v_cache .* has positions \(dim 1\) or heads that share memory",
    "heads as_strided": r"k_cache .* has positions \(dim 1\) or heads that share memory",
    "v_cache is k_cache": "k_cache and v_cache overlap in memory where the new k is written",
    "v_cache shifted k_cache": "k_cache and v_cache overlap in memory",
    "q in written slots": "q overlaps the k_cache positions being appended to",
    "new v in k_cache": "the new v overlaps the k_cache positions",
    "new k in other written slots": "the new k overlaps the k_cache positions",
}


@pytest.mark.parametrize("kind", SHARED_MEMORY_ERRORS)
def test_bad_append_into_shared_memory(kind):
    match = SHARED_MEMORY_ERRORS[kind]
    case = _overlap_case(kind)
    before = [t.clone() for t in (case["k_cache"], case["v_cache"])]
    with pytest.raises(ValueError, match=match):
        fl.flash_attn_with_kvcache(**case)
    assert all(torch.equal(t, b) for t, b in zip((case["k_cache"], case["v_cache"]), before))  # nothing written


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_append_into_layouts_that_share_no_slot(backend):
    # k and v packed in one buffer; torch's (B, H, S, D) cache layout; a sequence-major
    # (S, B, H, D) cache: one address range each, written in place, no element shared
    B, cap, hk, d = 2, 24, 2, 16
    packed = torch.randn(B, cap, 2, hk, d, dtype=torch.float16)
    for kc, vc in ((packed[:, :, 0], packed[:, :, 1]),
                   (torch.randn(B, hk, cap, d, dtype=torch.float16).transpose(1, 2),
                    torch.randn(cap, B, hk, d, dtype=torch.float16).transpose(0, 1))):
        case = make_case(sq=2, snew=2, seqlens=(4, 19), capacity=cap)
        case["k_cache"], case["v_cache"] = kc, vc
        run_case(backend, case, causal=True, in_place=True)
    # new k/v that are views of the very slots they are appended to (a copy onto itself),
    # and q read from a part of the cache no append touches
    case = make_case(sq=1, snew=1, hq=2, seqlens=(5, 5), capacity=cap)
    case["cache_seqlens"] = 5
    case["k"], case["v"] = case["k_cache"][:, 5:6], case["v_cache"][:, 5:6]
    case["q"] = case["k_cache"][:, 0:1]
    run_case(backend, case, in_place=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:Use of index_put_ on expanded tensors")
def test_expanded_cache_read_only_or_one_row(backend):
    # a cache with stride 0 in batch serves read-only calls, and appends that write one row
    base_k, base_v = torch.randn(1, 24, 2, 16, dtype=torch.float16), torch.randn(1, 24, 2, 16, dtype=torch.float16)
    case = make_case(seqlens=(5, 9), capacity=24)
    case["k_cache"], case["v_cache"] = base_k.expand(2, 24, 2, 16), base_v.expand(2, 24, 2, 16)
    run_case(backend, case, in_place=True)
    case = make_case(batch=1, seqlens=(7,), snew=1, capacity=24)
    case["k_cache"], case["v_cache"] = base_k.expand(3, 24, 2, 16), base_v.expand(3, 24, 2, 16)
    case["cache_batch_idx"] = torch.tensor([2], dtype=torch.int32)
    with fl.use_backend(backend):
        out = fl.flash_attn_with_kvcache(**case)
    assert torch.equal(base_k[0, 7], case["k"][0, 0]) and torch.equal(base_v[0, 7], case["v"][0, 0])
    # the same step on a dense copy (which already holds the appended key: appending it again changes nothing)
    zero = torch.tensor([0], dtype=torch.int32)
    dense = dict(case, k_cache=base_k.clone(), v_cache=base_v.clone(), cache_batch_idx=zero)
    with fl.use_backend(backend):
        assert torch.equal(out, fl.flash_attn_with_kvcache(**dense))


def test_bad_append_into_a_page_another_position_reads():
    # sequence 1 shares sequence 0's first page and reads its row 3 as its own position 3;
    # sequence 0 appends its position 3 there
    case = make_case(seqlens=(3, 6), snew=1, page_size=4, capacity=8)
    table = case["block_table"].clone()
    table[1, 0] = table[0, 0]
    before = case["k_cache"].clone()
    with pytest.raises(ValueError, match="position 3 of sequence 0 goes to page .*, row 3, which sequence 1 reads as "
                                         "its position 3"):
        fl.flash_attn_with_kvcache(**dict(case, block_table=table))
    assert torch.equal(case["k_cache"], before)
    # one page listed twice in a sequence: position 5 lands on row 1, read as position 1
    table = case["block_table"].clone()
    table[0, 1] = table[0, 0]
    with pytest.raises(ValueError, match="position 5 of sequence 0 .* which sequence 0 reads as its position 1"):
        fl.flash_attn_with_kvcache(**dict(case, block_table=table, cache_seqlens=torch.tensor([5, 2],
                                                                                              dtype=torch.int32)))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_shared_prefix_page_appends_elsewhere(backend):
    # prefix sharing done right: both sequences read the same full first page, and append
    # into pages of their own
    case = make_case(seqlens=(5, 6), snew=1, page_size=4, capacity=12)
    case["block_table"][1, 0] = case["block_table"][0, 0]
    run_case(backend, case, causal=True)


def test_inputs_that_require_grad_are_refused():
    case = make_case(seqlens=(3, 5), page_size=4, capacity=8)
    case["alibi_slopes"] = torch.rand(case["q"].shape[2], requires_grad=True)
    with pytest.raises(NotImplementedError, match="forward-only"):
        fl.flash_attn_with_kvcache(**case)


def test_unused_block_table_entries_are_not_checked():
    case = make_case(seqlens=(3, 2), page_size=4, capacity=8)
    case["block_table"][:, 1] = -1  # padding, never read: 3 and 2 keys fit the first page
    fl.flash_attn_with_kvcache(**case)


def test_bad_block_table_dtype_and_shape():
    table = make_case(page_size=4, capacity=8)["block_table"]
    _bad("block_table must be int32", TypeError, block_table=table.long())
    _bad(r"block_table must have shape \(batch", block_table=table[:1])


def test_bad_seqlens_beyond_cache():
    _bad(r"cache_seqlens\[1\] = 8 \+ 1 new keys exceeds the cache capacity of 8",
         cache_seqlens=torch.tensor([3, 8], dtype=torch.int32))
    _bad(r"cache_seqlens\[0\] = 9 exceeds", cache_seqlens=torch.tensor([9, 1], dtype=torch.int32), k=None, v=None)
    _bad("cache_seqlens must be int32", TypeError, cache_seqlens=torch.tensor([3, 5]))
    _bad(r"cache_seqlens must have shape \(2,\)", cache_seqlens=torch.tensor([3], dtype=torch.int32))
    _bad("negative", cache_seqlens=torch.tensor([-1, 2], dtype=torch.int32))
    # a Python int beyond int32 gets the same errors (it was torch's "cannot be converted ... overflow")
    _bad(r"cache_seqlens\[0\] = 2147483648 \+ 1 new keys exceeds", cache_seqlens=2 ** 31)
    _bad(r"cache_seqlens\[0\] = -2147483649 is negative", cache_seqlens=-2 ** 31 - 1)
    _bad("cache_seqlens is required when appending", cache_seqlens=None)


def test_bad_contiguous_cache():
    case = make_case(seqlens=(3, 5), snew=1, capacity=8)
    with pytest.raises(ValueError, match="exceeds the cache capacity of 8 positions"):
        fl.flash_attn_with_kvcache(**dict(case, cache_seqlens=torch.tensor([8, 1], dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"cache_batch_idx\[1\] = 7 is out of range"):
        fl.flash_attn_with_kvcache(**dict(case, cache_batch_idx=torch.tensor([0, 7], dtype=torch.int32)))
    with pytest.raises(ValueError, match="repeated entries"):
        fl.flash_attn_with_kvcache(**dict(case, cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32)))
    with pytest.raises(ValueError, match="k_cache has batch 3 but q has 2"):
        fl.flash_attn_with_kvcache(**dict(case, k_cache=torch.randn(3, 8, 2, 16, dtype=torch.float16),
                                          v_cache=torch.randn(3, 8, 2, 16, dtype=torch.float16)))
    with pytest.raises(ValueError, match="unit stride"):
        kc = torch.randn(2, 8, 2, 32, dtype=torch.float16)[..., ::2]
        fl.flash_attn_with_kvcache(**dict(case, k_cache=kc, v_cache=kc))


def test_bad_batch_idx_with_block_table():
    _bad("cache_batch_idx cannot be combined with block_table", cache_batch_idx=torch.tensor([0, 1],
                                                                                             dtype=torch.int32))


def test_bad_shapes_and_dtypes():
    _bad("must share one dtype", TypeError, q=torch.randn(2, 1, 2, 16))
    _bad("head dim differs", q=torch.randn(2, 1, 2, 8, dtype=torch.float16))
    _bad(r"multiple of the number of cache heads", q=torch.randn(2, 1, 3, 16, dtype=torch.float16))
    _bad(r"k must have shape \(batch, seqlen_new, heads_k, headdim\)", k=torch.randn(2, 1, 1, 16, dtype=torch.float16),
         v=torch.randn(2, 1, 1, 16, dtype=torch.float16))
    _bad("pass both k and v", v=None)
    _bad("k has dtype", TypeError, k=torch.randn(2, 1, 2, 16))
    _bad("k_cache and v_cache must have the same shape", v_cache=torch.randn(9, 4, 2, 16, dtype=torch.float16))


def test_bad_leftpad():
    _bad(r"cache_leftpad\[1\] = 6 must be in 0..cache_seqlens\[1\] \(5\)",
         cache_leftpad=torch.tensor([0, 6], dtype=torch.int32))
    _bad("cache_leftpad must be int32", TypeError, cache_leftpad=torch.tensor([0, 1]))


def test_bad_rotary():
    cos = torch.rand(16, 4, dtype=torch.float16)
    _bad("pass both rotary_cos and rotary_sin", rotary_cos=cos)
    _bad(r"rotary dim 2 \* rotary_cos.shape\[1\] = 40 must be in 1..headdim \(16\)",
         rotary_cos=torch.rand(16, 20), rotary_sin=torch.rand(16, 20))
    _bad("rotary_cos/rotary_sin have 4 rows but positions up to 5", rotary_cos=cos[:4], rotary_sin=cos[:4])
    _bad("rotary_cos and rotary_sin must have the same shape", rotary_cos=cos, rotary_sin=cos[:, :2])
    _bad("need new k and v", rotary_cos=cos, rotary_sin=cos, k=None, v=None)


def test_bad_scalars_and_slopes():
    _bad(r"alibi_slopes must have shape \(2,\) or \(2, 2\)", alibi_slopes=torch.rand(3))
    _bad("num_splits must be an int in 0..128", num_splits=-1)
    _bad("num_splits must be an int in 0..128", num_splits=129)
    _bad("softcap must be >= 0", softcap=-1.0)
    _bad("window_size entries", window_size=(-2, 0))


def test_requires_grad_refused():
    _bad("forward-only", NotImplementedError, q=torch.randn(2, 1, 2, 16, dtype=torch.float16, requires_grad=True))
    case = make_case(seqlens=(3, 5))
    case["q"].requires_grad_(True)
    with torch.no_grad():
        fl.flash_attn_with_kvcache(**case)


def test_backends_without_kv_cache_decline():
    from flashattn_lite import backends

    call = backends.Call(device=torch.device("cpu"), dtype=torch.float16, head_dim=16,
                         features=frozenset({"kv-cache"}))
    for name, mod in backends.BACKENDS.items():
        if "kv-cache" not in mod.FEATURES:
            assert "kv-cache" in backends.missing_features(call, mod.FEATURES), name
    case = make_case(seqlens=(3, 5), snew=1)
    before = case["k_cache"].clone()
    with fl.use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda' cannot run this call"):
        fl.flash_attn_with_kvcache(**case)
    assert torch.equal(case["k_cache"], before)  # refused before anything was appended


# ------------------------------------------------------------------ property-based

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def kvcache_cases(draw):
    batch = draw(st.integers(1, 3))
    hk = draw(st.integers(1, 2))
    page = draw(st.sampled_from([None, None, 1, 3, 5, 16, 64]))
    capacity = draw(st.integers(1, 48))
    snew = draw(st.integers(0, min(3, capacity)))
    seqlens = [draw(st.integers(0, capacity - snew)) for _ in range(batch)]
    leftpad = draw(st.sampled_from([None, "some"]))
    rotary = draw(st.sampled_from([None, None, (8, True), (8, False), (16, True)])) if snew else None
    d = draw(st.sampled_from([8, 16, 24, 40]))
    return dict(
        make=dict(batch=batch, sq=draw(st.integers(1, 4)), hq=hk * draw(st.integers(1, 3)), hk=hk, d=d,
                  dtype=draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])), seqlens=tuple(seqlens),
                  snew=snew, page_size=page, capacity=capacity,
                  batch_idx=page is None and draw(st.booleans()),
                  leftpad=None if leftpad is None else tuple(draw(st.integers(0, n)) for n in seqlens),
                  rotary=None if rotary is None or rotary[0] > d else rotary),
        run=dict(causal=draw(st.booleans()),
                 window=draw(st.sampled_from([(-1, -1), (-1, -1), (4, 0), (3, 2), (-1, 1), (9, -1)])),
                 softcap=draw(st.sampled_from([0.0, 0.0, 4.0])),
                 alibi=draw(st.sampled_from([None, None, "heads", "batch-heads"])),
                 num_splits=draw(st.sampled_from([0, 1, 2, 3, 7]))),
    )


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_property(backend):
    examples = {"cpu": 40, "triton": 12}[backend]

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(kvcache_cases())
    def prop(case):
        run_case(backend, make_case(**case["make"]), **case["run"])

    prop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    # q from torch's (B, H, S, D) layout; caches that are slices of wider buffers (gaps
    # between heads and rows); a block table that is a column slice of a wider one
    case = make_case(sq=3, snew=2, hq=4, hk=2, seqlens=(6, 17), page_size=5, capacity=25)
    case["q"] = torch.randn(2, 4, 3, 16, dtype=torch.float16).transpose(1, 2)
    nb = case["k_cache"].shape[0]
    case["k_cache"] = torch.randn(nb, 5, 3, 24, dtype=torch.float16)[:, :, 1:, :16]
    case["v_cache"] = torch.randn(nb, 5, 3, 24, dtype=torch.float16)[:, :, :2, 4:20]
    wide = torch.full((2, 2 * case["block_table"].shape[1]), -1, dtype=torch.int32)
    wide[:, ::2] = case["block_table"]
    case["block_table"] = wide[:, ::2]
    run_case(backend, case, causal=True, num_splits=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_query_rows(backend):
    case = make_case(sq=0, snew=1, seqlens=(2, 3))
    with fl.use_backend(backend):
        out, lse = fl.flash_attn_with_kvcache(**case, return_softmax_lse=True)
    assert out.shape == (2, 0, 2, 16) and lse.shape == (2, 2, 0)
    # the new keys/values are appended all the same
    assert torch.equal(case["k_cache"][0, 2], case["k"][0, 0]) and torch.equal(case["v_cache"][1, 3], case["v"][1, 0])


def test_triton_other_tiles():
    # 32 x 32 split tiles (all 5 x 6 query rows of the group in one block) and 4 splits per combine step
    from flashattn_lite.triton_kernels import configs

    with configs.override("decode_split", configs.KernelConfig(32, 32, 4, 1)), \
            configs.override("combine", configs.KernelConfig(1, 4, 4, 1)):
        run_case("triton", make_case(batch=2, sq=5, snew=5, hq=6, hk=1, seqlens=(40, 3), capacity=50, page_size=9),
                 causal=True, num_splits=6, alibi="heads")


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_like_step(backend):
    # one generation step of a GQA model: head dim 64, 8 query / 2 kv heads, rotary over
    # the whole head (NeoX layout), paged cache with pages of 32, ragged lengths
    run_case(backend, make_case(batch=3, sq=1, snew=1, hq=8, hk=2, d=64, seqlens=(150, 31, 0), capacity=192,
                                page_size=32, rotary=(64, False), dtype=torch.bfloat16), causal=True)
