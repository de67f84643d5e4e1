"""The CUDA C++ kernels (csrc/cuda) compiled with nvcc for sm_80 and sm_90: every
instantiation builds without warnings, spills nothing, fits the architecture's shared
memory and register file, and uses tensor cores (HMMA in the SASS).  No GPU involved;
skipped only where nvcc is missing.  benches/cuda_static_report.py does the compiling
(the same script writes benches/results/cuda_static.json for the README).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")

# Largest dynamic shared memory one block may opt into: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {"sm80": 163 * 1024, "sm90": 227 * 1024}
REGISTER_FILE = 64 * 1024  # 32-bit registers per SM on both
HEAD_DIMS = (32, 64, 96, 128, 256)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_static") / "report.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benches", "cuda_static_report.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=900, check=False)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_instantiation_compiled_for_both_archs(report):
    got = {(r["arch"], r["kernel"], r["dtype"], r["head_dim"]) for r in report["kernels"]}
    expected = {(arch, kernel, dtype, d) for arch in SHARED_LIMIT for dtype in ("fp16", "bf16")
                for kernel in ("fwd_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel") for d in HEAD_DIMS}
    expected |= {(arch, "bwd_preprocess_kernel", dtype, 0) for arch in SHARED_LIMIT for dtype in ("fp16", "bf16")}
    assert got == expected


def test_no_compiler_warnings(report):
    assert report["warnings"] == []


def test_no_register_spills_or_local_memory(report):
    bad = [(r["arch"], r["kernel"], r["dtype"], r["head_dim"], r["spill_stores"], r["spill_loads"], r["stack"])
           for r in report["kernels"] if r["spill_stores"] or r["spill_loads"] or r["stack"]]
    assert not bad


def test_shared_memory_and_registers_fit(report):
    for r in report["kernels"]:
        assert r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], r
        assert r["registers"] * r["threads"] <= REGISTER_FILE, r  # otherwise the launch fails
        assert r["registers"] <= 255, r


def test_tensor_cores_in_sass(report):
    for r in report["kernels"]:
        if r["kernel"] == "bwd_preprocess_kernel":
            continue  # a row sum, no matrix product
        assert r["hmma"] > 0, f"{r['arch']} {r['kernel']} {r['dtype']} d={r['head_dim']}: no HMMA"


def test_registers_reported(report):
    print("\n".join(f"{r['arch']} {r['kernel']:<22} {r['dtype']} d={r['head_dim']:<3} regs={r['registers']}"
                    for r in report["kernels"]))
    print(f"compile wall time: {report['compile_wall_s']} s")
    assert all(r["registers"] > 0 for r in report["kernels"])


def test_torch_binding_parses(tmp_path):
    """attention_cuda.cpp (the TORCH_LIBRARY_IMPL for CUDA) is only built where torch has
    CUDA; here it is at least parsed against torch's and CUDA's headers.  A CPU-only torch
    lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h): an empty stand-in."""
    import torch.utils.cpp_extension as ce

    cuda_home = ce.CUDA_HOME or os.environ.get("CUDA_HOME", "/usr/local/cuda")
    inc = [*ce.include_paths(), os.path.join(cuda_home, "include")]
    if not (os.path.exists(os.path.join(inc[0], "c10", "cuda", "CUDAGuard.h"))
            and os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime_api.h"))):
        pytest.skip("torch's c10/cuda headers or CUDA's headers are missing")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("")
    cmd = [os.environ.get("CXX", "c++"), "-std=c++17", "-fsyntax-only", f"-I{tmp_path}",
           *[f"-I{i}" for i in inc], os.path.join(ROOT, "csrc", "cuda", "attention_cuda.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
