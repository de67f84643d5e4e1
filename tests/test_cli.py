"""The command line: info, check, build and bench (tiny sizes), and what bench writes."""

import csv
import json
import os
import re
import struct
import subprocess
import sys

import pytest
import torch

from flashattn_lite import backends, bench


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "flashattn_lite", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_info_lists_backends_and_features():
    proc = _cli("info")
    assert proc.returncode == 0, proc.stderr
    for word in ("torch", "triton", "backends:", "reference", "cpu", "cuda", "features:", "backward", "kv-cache"):
        assert word in proc.stdout
    # how the cpu backend multiplies each low-precision dtype, and why (measured rates or the forcing variable)
    for dtype in ("bf16", "fp16"):
        assert re.search(rf"^  {dtype} +({dtype} products( \(FMA\))?|oneDNN products|widened to float32) +auto: ",
                         proc.stdout, re.M), proc.stdout
    forced = _cli("info", env={**os.environ, "FLASHATTN_LITE_CPU_MATMUL": "fp32",
                               "FLASHATTN_LITE_CPU_MATMUL_FP16": "fp32"})
    assert re.search(r"^  bf16 +widened to float32 +forced by FLASHATTN_LITE_CPU_MATMUL=fp32", forced.stdout, re.M)
    assert re.search(r"^  fp16 +widened to float32 +forced by FLASHATTN_LITE_CPU_MATMUL_FP16=fp32", forced.stdout,
                     re.M)


def test_check_passes_on_every_usable_backend():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = _cli("check", env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "all checks passed" in proc.stdout
    assert "cpu" in proc.stdout and "reference" in proc.stdout


def test_build_prints_the_library():
    proc = _cli("build")
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip().split(": ", 1)[1]
    assert os.path.exists(path)


def test_bench_quick_writes_table_csv_json_and_plots(tmp_path):
    out = tmp_path / "bench"
    proc = _cli("bench", "--quick", "--seqlens", "64", "128", "--decode-lengths", "256", "--dtypes", "float32",
                "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| pass |" in proc.stdout and "fa_lite:cpu GFLOP/s" in proc.stdout and "torch_sdpa" in proc.stdout
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    data = json.loads((out / "results.json").read_text())
    assert len(rows) == len(data["results"]) > 0
    impls = {r["impl"] for r in rows}
    assert {"fa_lite:cpu", "torch_sdpa", "naive"} <= impls
    assert {r["passes"] for r in rows} == {"fwd", "fwd+bwd", "decode"}
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["gflops"]) > 0 and float(r["ms"]) > 0
    for name in ("throughput.png", "memory.png"):
        width, height = _png_size(out / name)
        assert width > 100 and height > 100
    assert (out / "results.md").read_text().startswith("| pass |")


def test_flops_convention():
    fwd = bench.Case("fwd", 2, 4, 128, 128, 64, "float32", False)
    assert fwd.flops() == 4 * 2 * 4 * 128 * 128 * 64
    assert bench.Case("fwd", 2, 4, 128, 128, 64, "float32", True).flops() == fwd.flops() / 2
    assert bench.Case("bwd", 2, 4, 128, 128, 64, "float32", False).flops() == 2.5 * fwd.flops()
    assert bench.Case("fwd+bwd", 2, 4, 128, 128, 64, "float32", False).flops() == 3.5 * fwd.flops()


def test_disagreeing_backend_is_reported_not_timed(monkeypatch):
    real = backends.cpu.fwd

    def broken(*args):
        out, lse = real(*args)
        return out * 1.01, lse

    monkeypatch.setattr(backends.cpu, "fwd", broken)
    case = bench.Case("fwd", 1, 2, 64, 64, 32, "float32", True)
    results = {r.impl: r for r in bench.run_case(case, bench.implementations("cpu", ["cpu", "torch_sdpa"]), "cpu", 1)}
    assert results["fa_lite:cpu"].status == "mismatch" and "max error" in results["fa_lite:cpu"].detail
    assert results["fa_lite:cpu"].ms != results["fa_lite:cpu"].ms  # NaN: no speed reported
    assert results["torch_sdpa"].status == "ok"


def test_case_that_cannot_fit_is_reported_as_out_of_memory(monkeypatch):
    monkeypatch.setattr(bench, "_available_bytes", lambda device: 64 * 2**20)
    case = bench.Case("fwd", 1, 8, 4096, 4096, 64, "float32", False)
    impls = bench.implementations("cpu", ["cpu", "naive"])
    results = {r.impl: r for r in bench.run_case(case, impls, "cpu", 1)}
    assert results["naive"].status == "out of memory" and "GiB" in results["naive"].detail
    assert results["fa_lite:cpu"].status == "ok"


def test_workloads_quick_is_small():
    cases = bench.workloads(quick=True)
    assert {c.passes for c in cases} == {"fwd", "fwd+bwd", "decode"}
    assert max(c.seqlen_q for c in cases) <= 1024


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bench_on_gpu_uses_cuda_events():  # pragma: no cover - no GPU here
    case = bench.Case("fwd", 1, 2, 128, 128, 64, "float16", False)
    assert bench.run_case(case, bench.implementations("cuda"), "cuda", 2)


def test_bench_rejects_unknown_implementations_and_bad_repeats(tmp_path):
    proc = _cli("bench", "--impls", "sdpa", "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and "unknown implementation(s) sdpa" in proc.stderr
    proc = _cli("bench", "--repeats", "0", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "--repeats" in proc.stderr


def test_bench_json_is_strict_when_cases_are_not_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_available_bytes", lambda device: 1)  # nothing fits: nothing is timed
    cases = [bench.Case("fwd", 1, 2, 64, 64, 16, "float32", False)]
    bench.run(cases, repeats=1, impl_names=["naive"], out_dir=str(tmp_path), progress=False)
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["results"][0]["status"] == "out of memory"


def test_bench_checks_gradients_and_interior_rows(monkeypatch):
    """A backend wrong only in interior rows, or only in its backward, is caught."""
    real_fwd, real_bwd = backends.cpu.fwd, backends.cpu.bwd

    def wrong_middle(*args):
        out, lse = real_fwd(*args)
        out = out.clone()
        out[:, 100:140] *= 1.1
        return out, lse

    monkeypatch.setattr(backends.cpu, "fwd", wrong_middle)
    case = bench.Case("fwd", 1, 2, 256, 256, 32, "float32", False)
    r = {x.impl: x for x in bench.run_case(case, bench.implementations("cpu", ["cpu"]), "cpu", 1)}
    assert r["fa_lite:cpu"].status == "mismatch"

    def wrong_grad(*args):
        dq, dk, dv, dbias = real_bwd(*args)
        return dq, dk * 1.05, dv, dbias

    monkeypatch.setattr(backends.cpu, "fwd", real_fwd)
    monkeypatch.setattr(backends.cpu, "bwd", wrong_grad)
    case = bench.Case("fwd+bwd", 1, 2, 256, 256, 32, "float32", True)
    r = {x.impl: x for x in bench.run_case(case, bench.implementations("cpu", ["cpu"]), "cpu", 1)}
    assert r["fa_lite:cpu"].status == "mismatch" and "dk" in r["fa_lite:cpu"].detail


@pytest.mark.parametrize("load, warned", [(4.3, True), (2.0, False), (0.1, False)])
def test_bench_warns_when_the_machine_is_busy(monkeypatch, capsys, tmp_path, load, warned):
    """A load average above the core count is announced on stderr before anything is measured."""
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert (bench.busy_warning() is not None) == warned
    measured = []

    def fake_run_case(case, impls, device, repeats, warmup=1):  # the measurement, monkeypatched out
        measured.append(capsys.readouterr().err)  # what stderr held when measuring began
        return []

    monkeypatch.setattr(bench, "run_case", fake_run_case)
    cases = [bench.Case("fwd", 1, 2, 64, 64, 16, "float32", False)]
    bench.run(cases, device="cpu", repeats=1, impl_names=["naive"], out_dir=str(tmp_path), progress=False)
    assert len(measured) == 1
    if warned:
        assert "busy" in measured[0] and "load average 4.30" in measured[0] and "2 cores" in measured[0]
        assert "noisy" in measured[0]
    else:
        assert "busy" not in measured[0] + capsys.readouterr().err


def test_bench_busy_warning_without_a_load_average(monkeypatch):
    def missing():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", missing)
    assert bench.busy_warning() is None
