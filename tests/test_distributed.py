"""flashattn_lite.distributed: ring attention over real processes (gloo on 127.0.0.1).

Each world size spawns one group that runs every case (spawning costs seconds); the
tests below then read its results case by case.  Oracle: the single-process
``flash_attn_func`` on the whole sequence (float64: to 1e-10) and the float64 reference
with the tolerance rule (float32, bfloat16).
"""

import os

import pytest
import torch

import distributed_cases as dc
from flashattn_lite import distributed as fd

WORLDS = (2, 3, 4)


@pytest.fixture(scope="module")
def ring_results():
    results = {}

    def get(world):
        if world not in results:
            ranks = dc.spawn(world, dc.run_cases, (dc.case_matrix(world),))
            results[world] = ranks
        return results[world]
    return get


def _case_ids(world):
    return sorted(dc.case_matrix(world))


def _rank_results(ranks):
    for rank, res in ranks.items():
        assert isinstance(res, dict), f"rank {rank}: {res[0]}\n{res[1]}"
    return ranks


@pytest.mark.parametrize("world", WORLDS)
def test_ring_matches_single_process(ring_results, world):
    """out, lse, dq, dk, dv of every rank's rows, for every case of the matrix (both layouts,
    causal or not, windows, ALiBi, softcap, GQA/MQA, seqlen_k != seqlen_q, value head dim
    != head dim; float64 exact, float32/bfloat16 within the tolerance rule)."""
    ranks = _rank_results(ring_results(world))
    failed = [f"rank {rank} {cid}: {'; '.join(bad)}" for rank, res in sorted(ranks.items())
              for cid, bad in sorted(res["failures"].items()) if bad]
    assert not failed, "\n".join(failed[:20])
    assert all(len(res["failures"]) == len(_case_ids(world)) for res in ranks.values())


@pytest.mark.parametrize("world", WORLDS)
def test_steps_nothing_sees_are_skipped(ring_results, world):
    """Contiguous layout + causal: rank 0 sees no other rank's keys, so it computes and
    receives nothing for P-1 steps; with a window narrower than a shard every rank needs at
    most its predecessor.  Zigzag + causal: every rank sees every other rank (balance)."""
    ranks = _rank_results(ring_results(world))
    causal = "f64-None-c1-w-1_-1-a0-s0.0-hk4"
    assert ranks[0]["stats"][causal]["steps_skipped"] == world - 1
    assert ranks[0]["stats"][causal]["fwd_calls"] == 1
    assert ranks[world - 1]["stats"][causal]["steps_skipped"] == 0
    window = "f64-None-c1-w5_-1-a0-s0.0-hk4"  # left 5 < shard length 6: only the predecessor
    for rank in range(world):
        assert ranks[rank]["stats"][window]["steps_skipped"] == world - (1 if rank == 0 else 2)
    zigzag = "f64-zigzag-c1-w-1_-1-a0-s0.0-hk4"
    assert all(ranks[r]["stats"][zigzag]["steps_skipped"] == 0 for r in range(world))
    # transfers are skipped with the compute: no rank needs the last rank's keys, so it sends
    # none in forward; rank 0 has no other rank's keys, so it sends no gradient home
    assert ranks[world - 1]["stats"][causal]["fwd_bytes_sent"] == 0
    assert ranks[0]["stats"][causal]["bwd_bytes_sent"] == ranks[0]["stats"][causal]["fwd_bytes_sent"] > 0


@pytest.mark.parametrize("world", (2, 3))
def test_shard_unshard_roundtrip(world):
    ranks = dc.spawn(world, dc.sharding_roundtrip)
    for rank, res in ranks.items():
        assert isinstance(res, list), f"rank {rank}: {res}"
        assert all(res), f"rank {rank}: {res}"


def test_rings_on_subgroups():
    ranks = dc.spawn(4, dc.subgroups)
    for rank, err in ranks.items():
        assert isinstance(err, float) and err <= 1e-12, f"rank {rank}: {err}"


def test_bad_calls_raise_clear_errors_on_every_rank():
    ranks = dc.spawn(2, dc.misuse)
    expected = {
        "shapes differ across ranks": ("ValueError", "ranks disagree on local seqlen_q"),
        "odd zigzag shard": ("ValueError", "odd local length"),
        "dropout": ("NotImplementedError", "dropout is not supported"),
        "devices differ": ("ValueError", "meta"),
        "bad load_balance": ("ValueError", "load_balance must be 'zigzag' or None"),
        "indivisible shard": ("ValueError", "cannot be cut into"),
        "unshard shapes differ": ("ValueError", "ranks disagree on size[1]"),
        "alibi slopes differ": ("ValueError", "ranks disagree on alibi_slopes[0, 0]: rank 0: 0.5, rank 1: 1"),
        "unshard ndim differs": ("ValueError", "ranks disagree on ndim"),
        "good call after refusals": None,
    }
    # refused on one rank only: that rank's own error there, on the other a ValueError naming it
    one_rank = {
        "odd zigzag shard on rank 0": (0, ("ValueError", "odd local length")),
        "dropout on rank 1": (1, ("NotImplementedError", "dropout is not supported")),
        "unshard odd on rank 0": (0, ("ValueError", "has odd length")),
    }
    for rank, got in ranks.items():
        assert isinstance(got, dict), f"rank {rank}: {got}"
        for name, (culprit, own) in one_rank.items():
            want = own if rank == culprit else ("ValueError", f"rank {culprit} refused its arguments")
            kind, message = got[name]
            assert kind == want[0] and want[1] in message, f"rank {rank} {name}: {kind}: {message}"
        for name, want in expected.items():
            if want is None:
                assert got[name] is None, f"rank {rank} {name}: {got[name]}"
                continue
            assert got[name] is not None, f"rank {rank} {name}: nothing raised"
            kind, message = got[name]
            assert kind == want[0] and want[1] in message, f"rank {rank} {name}: {kind}: {message}"


def test_a_failing_rank_does_not_hang_the_others():
    ranks = dc.spawn(2, dc.one_rank_fails, group_timeout=3, timeout=60)
    result = ranks[0]
    assert result[0] == "raised", result
    assert result[1] < 30, result


def test_memory_is_per_shard():
    """No tensor made during the ring's forward and backward reaches the size of a
    full-sequence tensor (the largest are per-shard K/V buffers)."""
    world = 3
    ranks = dc.spawn(world, dc.no_full_length_tensor)
    for rank, res in ranks.items():
        assert isinstance(res, dict), f"rank {rank}: {res}"
        assert res["shard_bytes"] <= res["largest_tensor_bytes"] <= 2 * res["shard_bytes"] < res["full_bytes"], res


def test_triton_backend_under_the_interpreter():
    """The ring on the triton backend (interpreter, float32, tiny): same comparisons."""
    cases = {cid: c for cid, c in dc.case_matrix(2).items()
             if cid in ("float32-zigzag-c1-w-1_-1", "float32-None-c1-w6_0")}
    assert len(cases) == 2
    ranks = dc.spawn(2, dc.run_cases, (cases, "triton"), env={"TRITON_INTERPRET": "1"})
    ranks = _rank_results(ranks)
    failed = [f"rank {r} {cid}: {bad}" for r, res in ranks.items() for cid, bad in res["failures"].items() if bad]
    assert not failed


def test_uninitialised_process_group_is_a_clear_error():
    import torch.distributed as dist
    assert not dist.is_initialized()
    x = torch.randn(1, 4, 2, 8)
    for call in (lambda: fd.ring_flash_attn_func(x, x, x), lambda: fd.shard(x), lambda: fd.unshard(x)):
        with pytest.raises(RuntimeError, match="not initialised"):
            call()


def test_visibility_plan_is_exact_against_brute_force():
    """The planner's calls, replayed on a dense mask with local offsets, give exactly the
    global mask, for many layouts, offsets and windows (and ALiBi, where distances must
    also agree)."""
    import itertools

    from flashattn_lite.distributed import _plan  # noqa: PLC2701 - the unit under test

    def mask(m, n, off, left, right):
        i = torch.arange(m)[:, None]
        j = torch.arange(n)[None, :]
        vis = torch.ones(m, n, dtype=torch.bool)
        if right >= 0:
            vis &= j <= i + off + right
        if left >= 0:
            vis &= j >= i + off - left
        return vis

    for world, lb, lq, lk, left, right, alibi in itertools.product(
            (1, 2, 3, 4), ("zigzag", None), (4, 6), (4, 8), (-1, 0, 3, 9), (-1, 0, 2), (False, True)):
        base = world * lk - world * lq
        for r, s in itertools.product(range(world), repeat=2):
            qc, kc = fd.chunks(r, world, lq, lb), fd.chunks(s, world, lk, lb)
            want = torch.zeros(lq, lk, dtype=torch.bool)
            dist_want = torch.zeros(lq, lk, dtype=torch.long)
            for (ql, qg, m), (kl, kg, n) in itertools.product(qc, kc):
                off = base + qg - kg
                want[ql:ql + m, kl:kl + n] = mask(m, n, off, left, right)
                dist_want[ql:ql + m, kl:kl + n] = torch.arange(m)[:, None] + off - torch.arange(n)[None, :]
            got = torch.zeros(lq, lk, dtype=torch.int)
            dist_got = torch.zeros(lq, lk, dtype=torch.long)
            for qs, m, ks, n, off in _plan(qc, kc, base, left, right, alibi):
                got[qs:qs + m, ks:ks + n] += mask(m, n, off, left, right).int()
                dist_got[qs:qs + m, ks:ks + n] = torch.arange(m)[:, None] + off - torch.arange(n)[None, :]
            assert torch.equal(got, want.int()), (world, lb, lq, lk, left, right, r, s)  # each pair once
            if alibi:
                assert torch.equal(dist_got[want], dist_want[want]), (world, lb, lq, lk, left, right, r, s)
