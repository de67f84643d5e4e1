"""The CUDA host emulator (csrc/cuda/emu/cuda_emu.h) on its own, independent of the
attention kernels.

The expected lane layouts below are typed from the PTX ISA ("Matrix Fragments for
mma.m16n8k16 with floating point type" and "Warp-level matrix load instruction:
ldmatrix", https://docs.nvidia.com/cuda/parallel-thread-execution/), not taken from the
emulator; matrix products are checked against numpy.  So an emulator that misplaces an
element fails here even if the kernels were written with the same misunderstanding.
The probe kernels are in tests/cuda_emu_probe.cpp (compiled with the host compiler).
"""

import os
import shutil
import subprocess

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CXX = os.environ.get("CXX", "c++")
pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    exe = tmp_path_factory.mktemp("probe") / "cuda_emu_probe"
    proc = subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-o", str(exe),
                           os.path.join(HERE, "cuda_emu_probe.cpp")], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in proc.stderr, proc.stderr[-3000:]

    def run(*args, stdin="", ok=True):
        res = subprocess.run([str(exe), *map(str, args)], input=stdin, capture_output=True, text=True, timeout=60,
                             check=False)
        if ok:
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
            return np.array([[int(x) for x in line.split()] for line in res.stdout.strip().splitlines()],
                            dtype=np.uint64)
        return res
    return run


# ---------------------------------------------------------------- PTX ISA layouts, written out
def a_owner(lane, i):
    """(row, col) of element a_i (i = 0..7) held by `lane` in the m16n8k16 A fragment."""
    group, tig = lane >> 2, lane % 4
    row = group + 8 if i in (2, 3, 6, 7) else group
    col = tig * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def b_owner(lane, i):
    """(row, col) = (k, n) of element b_i (i = 0..3) in the B fragment (16 x 8)."""
    group, tig = lane >> 2, lane % 4
    row = tig * 2 + (i & 1) + (8 if i >= 2 else 0)
    return row, group


def c_owner(lane, i):
    """(row, col) of element c_i / d_i (i = 0..3) in the 16 x 8 accumulator."""
    group, tig = lane >> 2, lane % 4
    row = group + 8 if i >= 2 else group
    return row, tig * 2 + (i & 1)


def test_layout_formulas_cover_each_element_once():
    a = {a_owner(l, i) for l in range(32) for i in range(8)}
    b = {b_owner(l, i) for l in range(32) for i in range(4)}
    c = {c_owner(l, i) for l in range(32) for i in range(4)}
    assert a == {(r, k) for r in range(16) for k in range(16)}
    assert b == {(k, n) for k in range(16) for n in range(8)}
    assert c == {(r, n) for r in range(16) for n in range(8)}


def _bits(x, dtype):
    if dtype == "f16":
        return x.astype(np.float16).view(np.uint16).astype(np.uint32)
    f = x.astype(np.float32)
    return (f.view(np.uint32) >> 16).astype(np.uint32)  # exact for values representable in bf16


def _bf16_round(x):
    f = np.asarray(x, dtype=np.float32)
    return ((f.view(np.uint32) + 0x8000) & 0xFFFF0000).view(np.float32)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_mma_m16n8k16_against_matmul(probe, dtype):
    rng = np.random.default_rng(1 if dtype == "f16" else 2)
    A = rng.standard_normal((16, 16))
    B = rng.standard_normal((16, 8))
    C = rng.standard_normal((16, 8)).astype(np.float32)
    A = A.astype(np.float16).astype(np.float64) if dtype == "f16" else _bf16_round(A).astype(np.float64)
    B = B.astype(np.float16).astype(np.float64) if dtype == "f16" else _bf16_round(B).astype(np.float64)
    ab, bb = _bits(A, dtype), _bits(B, dtype)
    lines = []
    for lane in range(32):
        a_regs = []
        for r in range(4):  # two 16-bit elements per register, lower index in the low half
            lo, hi = a_owner(lane, 2 * r), a_owner(lane, 2 * r + 1)
            a_regs.append(int(ab[lo]) | (int(ab[hi]) << 16))
        b_regs = []
        for r in range(2):
            lo, hi = b_owner(lane, 2 * r), b_owner(lane, 2 * r + 1)
            b_regs.append(int(bb[lo]) | (int(bb[hi]) << 16))
        cs = [repr(float(C[c_owner(lane, i)])) for i in range(4)]
        lines.append(" ".join(f"{x:x}" for x in a_regs + b_regs) + " " + " ".join(cs))
    out = probe(f"mma_{dtype}", stdin="\n".join(lines) + "\n").astype(np.uint32).view(np.float32)
    D = np.zeros((16, 8))
    for lane in range(32):
        for i in range(4):
            D[c_owner(lane, i)] = out[lane, i]
    expect = A @ B + C
    # fp32 accumulation of exact products: a few fp32 ulps of the largest partial sum
    assert np.abs(D - expect).max() <= 1e-5 * (np.abs(A) @ np.abs(B) + np.abs(C)).max()
    # and it is not a coincidence: a transposed or shuffled layout would be far off
    assert np.abs(D - expect).max() < 1e-3 * np.abs(expect).max()


@pytest.mark.parametrize("nmat", [1, 2, 4])
@pytest.mark.parametrize("trans", [0, 1])
def test_ldmatrix_distribution(probe, nmat, trans):
    """Shared memory holds 16-bit codes row*8+col of a 32 x 8 matrix; lane l passes row l,
    so matrix i is rows 8i..8i+7.  Without .trans lane l gets (row l/4, cols 2(l%4), +1)
    of each matrix; with .trans (rows 2(l%4), +1; col l/4)."""
    out = probe("ldmatrix", nmat, trans).astype(np.uint32)
    for lane in range(32):
        for i in range(4):
            if i >= nmat:
                assert out[lane, i] == 0
                continue
            if trans:
                (r0, c0), (r1, c1) = (2 * (lane % 4), lane // 4), (2 * (lane % 4) + 1, lane // 4)
            else:
                (r0, c0), (r1, c1) = (lane // 4, 2 * (lane % 4)), (lane // 4, 2 * (lane % 4) + 1)
            lo, hi = (8 * i + r0) * 8 + c0, (8 * i + r1) * 8 + c1
            assert out[lane, i] == lo | (hi << 16), (lane, i)


@pytest.mark.parametrize("kind", [0, 1])
def test_kernel_warp_tiles_against_matmul(probe, kind):
    """The kernels' own operand loaders (load_a, load_b2_nk / load_b2_kn, accumulator
    -> A operand) with the emulated instructions give a plain matrix product."""
    K, N = 32, 16
    rng = np.random.default_rng(10 + kind)
    A = rng.standard_normal((16, K)).astype(np.float16)
    B = rng.standard_normal((K, N)).astype(np.float16)
    words = np.concatenate([A.view(np.uint16).ravel(), B.view(np.uint16).ravel()])
    out = probe("gemm", kind, stdin=" ".join(f"{int(w):x}" for w in words) + "\n").astype(np.uint32).view(np.float32)
    got = np.zeros((16, N))
    for lane in range(32):
        for nt in range(N // 8):
            for i in range(4):
                r, c = c_owner(lane, i)
                got[r, nt * 8 + c] = out[lane, nt * 4 + i]
    expect = A.astype(np.float64) @ B.astype(np.float64)
    assert np.abs(got - expect).max() <= 1e-5 * np.abs(expect).max() + 1e-6


@pytest.mark.parametrize("arg", [1, 2, 3, 16])
def test_shuffles(probe, arg):
    out = probe("shfl", arg).astype(np.int64)
    for lane in range(32):
        assert out[lane, 0] == 1000 + (lane ^ arg)
        assert out[lane, 1] == 1000 + (lane * 7 + arg) % 32
        assert out[lane, 2] == 1000 + (lane - arg if lane >= arg else lane)  # up: lanes below arg keep theirs
        assert out[lane, 3] == 1000 + (lane + arg if lane + arg < 32 else lane)


@pytest.mark.parametrize("threads", [64, 256])
def test_syncthreads_orders_shared_memory(probe, threads):
    out = probe("barrier", threads)
    assert out.shape == (threads, 1) and not out.any(), "a thread read a slot before its writer reached the barrier"


def test_cp_async_lands_at_wait_group(probe):
    out = probe("cp_async").astype(np.uint32)
    for t in range(32):
        before, mid, zero_before, zero_after = out[t]
        assert before == 7  # issued, not yet waited for: still the old contents
        assert mid == 100 + 4 * t  # wait_group 1 completed the older group
        assert zero_before == 0xFFFFFFFF  # the newer group (zero fill) is still pending: NaN-filled shared memory
        assert zero_after == 0


def test_reading_a_pending_cp_async_is_reported(probe):
    res = probe("cp_async_race", ok=False)
    assert res.returncode == 1 and "pending cp.async" in res.stdout


def test_divergent_barrier_is_reported(probe):
    res = probe("divergent_barrier", ok=False)
    assert res.returncode == 1 and "deadlock" in res.stdout


def test_divergent_collective_is_reported(probe):
    res = probe("divergent_shfl", ok=False)
    assert res.returncode == 1 and "divergence" in res.stdout
