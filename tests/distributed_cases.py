"""What each rank of a spawned gloo group runs for tests/test_distributed.py.

Kept apart from the test module so that a spawned process imports only this (and
torch, flashattn_lite), not pytest's test module with its fixtures.
"""

import datetime
import itertools
import os
import socket
import traceback
import zlib

import torch

CASE_FIELDS = ("dtype", "load_balance", "causal", "window", "alibi", "softcap", "heads_k", "len_k", "head_dim_v")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world, target, args=(), timeout=240, group_timeout=60, env=None):
    """Run ``target(rank, world, *args)`` on ``world`` fresh processes joined in a gloo group
    on 127.0.0.1.  Returns {rank: result or ("error", traceback)}; a rank that does not report
    within ``timeout`` seconds is killed and reported as ("hung", None)."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(rank, world, port, group_timeout, target, args, queue, env or {}))
             for rank in range(world)]
    for p in procs:
        p.start()
    results = {}
    import queue as queue_mod
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    while len(results) < world:
        left = (deadline - datetime.datetime.now()).total_seconds()
        if left <= 0:
            break
        try:
            rank, result = queue.get(timeout=left)
        except queue_mod.Empty:
            break
        results[rank] = result
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    for rank in range(world):
        results.setdefault(rank, ("hung", None))
    return results


def _entry(rank, world, port, group_timeout, target, args, queue, env):
    os.environ.update(env)
    torch.set_num_threads(1)
    import torch.distributed as dist
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=group_timeout))
        result = target(rank, world, *args)
    except BaseException:
        result = ("error", traceback.format_exc())
    queue.put((rank, result))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def make_inputs(case, world, seed):
    """Full-sequence q, k, v, dout (and ALiBi slopes) of ``case`` (a dict of CASE_FIELDS),
    identical on every rank (a seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    batch, heads, d = 2, 4, 8
    per_rank_q = 6 if case["dtype"] == torch.float64 else 8
    sq = per_rank_q * world
    sk = case["len_k"] * world if case["len_k"] else sq
    dtype = case["dtype"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)

    q = rnd(batch, sq, heads, d)
    k = rnd(batch, sk, case["heads_k"], d)
    v = rnd(batch, sk, case["heads_k"], case["head_dim_v"])
    dout = rnd(batch, sq, heads, case["head_dim_v"])
    slopes = torch.rand(heads, generator=g) * 0.5 if case["alibi"] else None
    return q, k, v, dout, slopes


def run_cases(rank, world, cases, backend="cpu"):
    """Every case's comparison on this rank: {case id: [failed comparison, ...]} plus
    {"stats": {case id: ring_stats()}}.  float64 cases must match the single-process
    ``flash_attn_func`` to 1e-10; the others follow the tolerance rule against the float64
    reference (``flashattn_lite.testing``), with the single-process same-dtype result as
    the baseline."""
    import flashattn_lite as fl
    from flashattn_lite import distributed as fd
    from flashattn_lite.testing import check_against_reference

    failures, stats = {}, {}
    for cid, case in cases.items():
        q, k, v, dout, slopes = make_inputs(case, world, seed=zlib.crc32(cid.encode()))
        kw = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"], alibi_slopes=slopes)
        lb = case["load_balance"]

        # a loss through lse too (case "lse_grad"): its gradient reaches every pair's backward
        dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(torch.float64 if case["dtype"] == torch.float64 else torch.float32)

        def backward(out, lse, dout_, dlse_):
            if case.get("lse_grad"):
                torch.autograd.backward([out, lse], [dout_, dlse_])
            else:
                out.backward(dout_)

        def single(dtype):
            leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            with fl.use_backend("cpu" if dtype == torch.float64 and backend != "reference" else backend):
                out, lse, _ = fl.flash_attn_func(*leaves, return_attn_probs=True, **kw)
            backward(out, lse, dout.to(dtype), dlse.to(lse.dtype))
            return {"out": out.detach(), "lse": lse.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad,
                    "dv": leaves[2].grad}

        local = [fd.shard(t, load_balance=lb).detach().requires_grad_() for t in (q, k, v)]
        with fl.use_backend(backend):
            out, lse = fd.ring_flash_attn_func(*local, load_balance=lb, return_lse=True, **kw)
        backward(out, lse, fd.shard(dout, load_balance=lb), fd.shard(dlse, dim=2, load_balance=lb).to(lse.dtype))
        lse = lse.detach()
        ours = {"out": out.detach(), "lse": lse, "dq": local[0].grad, "dk": local[1].grad, "dv": local[2].grad}
        stats[cid] = fd.ring_stats()

        def mine(res):
            return {key: fd.shard(t, dim=2 if key == "lse" else 1, load_balance=lb) for key, t in res.items()}

        bad = []
        if case["dtype"] == torch.float64:
            exact = mine(single(torch.float64))
            for key, t in ours.items():
                ref = exact[key]
                same_inf = (t == ref) & torch.isinf(ref)
                err = (t - ref).masked_fill(same_inf, 0).abs().max().item() if t.numel() else 0.0
                if not err <= 1e-10:
                    bad.append(f"{key}: max error {err:.3g} against the single-process float64 result (bound 1e-10)")
        else:
            ref = mine(single(torch.float64))
            base = mine(single(case["dtype"]))
            bad = [str(c) for c in check_against_reference(ours, ref, base, case["dtype"]) if not c.ok]
        failures[cid] = bad
    return {"failures": failures, "stats": stats}


def case_matrix(world):
    """{case id: case} for one world size: every feature pair in float64 (exact), a
    smaller set in float32 and bfloat16 (tolerance rule)."""
    cases = {}
    for lb, causal, window, alibi, softcap, heads_k in itertools.product(
            ("zigzag", None), (False, True), ((-1, -1), (5, -1), (3, 2)), (False, True), (0.0, 2.0), (4, 2, 1)):
        if heads_k == 1 and (alibi or softcap):
            continue
        cases[f"f64-{lb}-c{int(causal)}-w{window[0]}_{window[1]}-a{int(alibi)}-s{softcap}-hk{heads_k}"] = dict(
            dtype=torch.float64, load_balance=lb, causal=causal, window=window, alibi=alibi, softcap=softcap,
            heads_k=heads_k, len_k=0, head_dim_v=8)
    for lb, causal in itertools.product(("zigzag", None), (False, True)):
        # seqlen_k != seqlen_q (bottom-right causal) and an MLA value head dim
        cases[f"f64-{lb}-c{int(causal)}-sk!=sq-dv12"] = dict(
            dtype=torch.float64, load_balance=lb, causal=causal, window=(-1, -1), alibi=False, softcap=0.0,
            heads_k=2, len_k=10, head_dim_v=12)
    for lb, causal in itertools.product(("zigzag", None), (False, True)):
        # a loss that uses lse as well as out
        cases[f"f64-{lb}-c{int(causal)}-lse_grad"] = dict(
            dtype=torch.float64, load_balance=lb, causal=causal, window=(4, -1), alibi=False, softcap=0.0,
            heads_k=2, len_k=0, head_dim_v=8, lse_grad=True)
    for dtype, lb, causal, window in itertools.product((torch.float32, torch.bfloat16), ("zigzag", None),
                                                         (False, True), ((-1, -1), (6, 0))):
        name = str(dtype).split(".")[-1]
        cases[f"{name}-{lb}-c{int(causal)}-w{window[0]}_{window[1]}"] = dict(
            dtype=dtype, load_balance=lb, causal=causal, window=window, alibi=causal, softcap=0.0 if causal else 3.0,
            heads_k=2, len_k=0, head_dim_v=8)
    return cases


def subgroups(rank, world):
    """Two rings at once on disjoint groups of a world of 4 ({0, 1} and {2, 3}, different
    data): each matches its own single-process result, so peers are addressed by their
    global ranks."""
    import flashattn_lite as fl
    import torch.distributed as dist
    from flashattn_lite import distributed as fd
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    g = torch.Generator().manual_seed(100 + rank // 2)
    q, k, v = (torch.randn(1, 16, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    want = fd.shard(fl.flash_attn_func(q, k, v, causal=True), group=mine)
    got = fd.ring_flash_attn_func(*(fd.shard(t, group=mine) for t in (q, k, v)), group=mine, causal=True)
    return (got - want).abs().max().item()


def sharding_roundtrip(rank, world):
    """shard/unshard of both layouts, on several dims: unshard(shard(x)) == x, and the chunk
    table's positions are what shard took."""
    from flashattn_lite import distributed as fd
    x = torch.arange(2 * 4 * world * 3 * 5, dtype=torch.float32).reshape(2, 4 * world, 3, 5)
    out = []
    for lb, dim in itertools.product(("zigzag", None), (1, -3)):
        part = fd.shard(x, dim=dim, load_balance=lb)
        positions = [g + i for _, g, n in fd.chunks(rank, world, part.shape[1], lb) for i in range(n)]
        out.append(torch.equal(part, x[:, positions]) and torch.equal(fd.unshard(part, dim=dim, load_balance=lb), x))
    return out


def misuse(rank, world):
    """Each bad call's exception (type name, message) on this rank."""
    import flashattn_lite.distributed as fd
    got = {}

    def attempt(name, fn):
        try:
            fn()
            got[name] = None
        except Exception as exc:  # noqa: BLE001 - the test inspects what was raised
            got[name] = (type(exc).__name__, str(exc))

    q = torch.randn(1, 4 + 2 * rank, 2, 8)  # local lengths differ between ranks
    kv = torch.randn(1, 4, 2, 8)
    attempt("shapes differ across ranks", lambda: fd.ring_flash_attn_func(q, kv, kv))
    attempt("odd zigzag shard", lambda: fd.ring_flash_attn_func(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8),
                                                                torch.randn(1, 3, 2, 8)))
    attempt("dropout", lambda: fd.ring_flash_attn_func(kv, kv, kv, dropout_p=0.1))
    attempt("devices differ", lambda: fd.ring_flash_attn_func(kv, kv.to("meta"), kv))
    attempt("bad load_balance", lambda: fd.ring_flash_attn_func(kv, kv, kv, load_balance="ring"))
    attempt("indivisible shard", lambda: fd.shard(torch.randn(1, 2 * world + 1, 2, 8)))
    attempt("unshard shapes differ", lambda: fd.unshard(torch.randn(1, 2 + 2 * rank, 2, 8)))
    # arguments only one rank gets wrong, or that differ only in value: every rank raises at
    # once (a rank refusing its own arguments still joins the cross-rank check)
    attempt("alibi slopes differ", lambda: fd.ring_flash_attn_func(kv, kv, kv, alibi_slopes=torch.tensor([0.5, 0.25])
                                                                   * (1 + rank)))
    attempt("odd zigzag shard on rank 0", lambda: fd.ring_flash_attn_func(*(torch.randn(1, 3 + rank, 2, 8)
                                                                             for _ in range(3))))
    attempt("dropout on rank 1", lambda: fd.ring_flash_attn_func(kv, kv, kv, dropout_p=0.1 * rank))
    attempt("unshard ndim differs", lambda: fd.unshard(torch.randn(*(1,) * rank, 2, 2, 8)))
    attempt("unshard odd on rank 0", lambda: fd.unshard(torch.randn(1, 3 + rank, 2, 8)))
    # the group still works after every refusal: a good call runs
    good = fd.ring_flash_attn_func(kv, kv, kv, causal=True)
    got["good call after refusals"] = None if torch.isfinite(good).all() else ("bad", "non-finite")
    return got


def one_rank_fails(rank, world):
    """Rank 1 raises before the collective call and stays alive; rank 0's call must raise
    within the group timeout rather than wait forever."""
    import time
    import flashattn_lite.distributed as fd
    kv = torch.randn(1, 4, 2, 8)
    if rank == 1:
        time.sleep(12)  # alive, but never joins
        return ("skipped", None)
    start = time.perf_counter()
    try:
        fd.ring_flash_attn_func(kv, kv, kv, causal=True)
    except RuntimeError as exc:
        return ("raised", time.perf_counter() - start, str(exc)[:200])
    return ("returned", time.perf_counter() - start)


def no_full_length_tensor(rank, world):
    """The largest tensor any operator produces during the ring's fwd+bwd, in bytes, against
    one shard's q and a full-sequence q: every tensor is O(S/P) (a dispatch mode sees each
    operator's outputs, views included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from flashattn_lite import distributed as fd

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(result):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel() * t.element_size())
            return result

    torch.manual_seed(rank)
    b, s_local, h, d = 1, 64, 2, 16
    q, k, v = (torch.randn(b, s_local, h, d, requires_grad=True) for _ in range(3))
    with Largest():
        out = fd.ring_flash_attn_func(q, k, v, causal=True)
        out.sum().backward()
    assert torch.isfinite(q.grad).all()
    return {"largest_tensor_bytes": Largest.biggest, "shard_bytes": q.numel() * q.element_size(),
            "full_bytes": q.numel() * q.element_size() * world}
