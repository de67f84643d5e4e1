"""The one-shot GPU check (flashattn_lite/gpu_check.py, benches/gpu_check.py,
``flashattn-lite gpu-check``) on a machine without a GPU: the no-CUDA path of both
entry points, the plan, FLOP counting, the case grid, the results writer, the
interleaved timing loop, the worker orchestration (crash, hang, lost context, time
budget) with stand-in workers, the checks themselves on CPU tensors, and finding the
kernel folders from a bare checkout.  Expected numbers are written out by hand.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from flashattn_lite import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_STAGES = ["env", "build", "triton", "triton-large", "kvcache", "compile", "cuda", "bench", "decode"]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the whole check")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _assert_plan_printed(text):
    for stage in ALL_STAGES:
        assert f"\n  {stage} " in text, f"stage {stage} missing from:\n{text}"
    # hand count of the default bench grid: 3 seqlens x 3 head dims x 2 dtypes x 2 causal x 2 passes
    assert "bench          72 cases" in text
    assert "decode          2 cases" in text


# ----------------------------------------------------------------------------- entry points without CUDA


@no_gpu
def test_script_without_cuda_prints_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benches", "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No CUDA device" in proc.stdout
    assert "nothing was written" in proc.stdout
    _assert_plan_printed(proc.stdout)
    assert "python -m pytest" in proc.stdout
    assert not out.exists()


@no_gpu
def test_cli_subcommand_without_cuda(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "flashattn_lite", "gpu-check", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No CUDA device" in proc.stdout
    _assert_plan_printed(proc.stdout)
    assert not out.exists()


def test_dry_run_lists_every_stage(capsys, tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    _assert_plan_printed(text)
    assert "9 stages" in text
    assert not (tmp_path / "o").exists()
    assert gpu_check.main(["--dry-run", "--full"]) == 0
    assert "bench         144 cases" in capsys.readouterr().out  # 6 seqlens


def test_dry_run_of_some_stages_adds_the_build_for_cuda(capsys):
    assert gpu_check.main(["--dry-run", "--stages", "cuda"]) == 0
    text = capsys.readouterr().out
    assert "\n  cuda " in text and "\n  build " in text and "\n  env " in text
    assert "\n  bench " not in text and "\n  triton " not in text


# ----------------------------------------------------------------------------- FLOPs and the grid


def test_flop_counts_by_hand():
    f = gpu_check.attention_flops
    # 4 * B * S * S * H * D = 4 * 2 * 128 * 128 * 4 * 64
    assert f(2, 4, 128, 128, 64) == 33_554_432
    assert f(2, 4, 128, 128, 64, causal=True) == 16_777_216
    assert f(2, 4, 128, 128, 64, passes="fwd+bwd") == 117_440_512  # 3.5x
    assert f(2, 4, 128, 128, 64, passes="bwd") == 83_886_080  # 2.5x
    # the paper's S=4096, d=128 row: B=4, H=16: 4 * 4 * 4096^2 * 16 * 128 = 2^39
    assert f(4, 16, 4096, 4096, 128) == 549_755_813_888
    # decoding: B=64, Sq=1, Sk=8192, H=32, d=128, causal counts every key: 2^33
    assert f(64, 32, 1, 8192, 128, causal=True) == 8_589_934_592
    assert f(64, 32, 1, 8192, 128) == 8_589_934_592
    # bottom-right causal Sq=2 < Sk=5: rows see 4 and 5 keys, 9 pairs of 4 * d = 32 flops
    assert f(1, 1, 2, 5, 8, causal=True) == 288
    # Sq=5 > Sk=2: rows 3 and 4 see 1 and 2 keys: 3 pairs
    assert f(1, 1, 5, 2, 8, causal=True) == 96
    # MLA: 2 * Sq * Sk * (D + Dv) = 2 * 10 * 10 * (192 + 128)
    assert f(1, 1, 10, 10, 192, head_dim_v=128) == 64_000


def test_causal_pairs_match_counting():
    for sq, sk in [(1, 1), (3, 3), (2, 7), (7, 2), (5, 6), (6, 5), (1, 9)]:
        counted = sum(1 for i in range(sq) for j in range(sk) if j <= i + sk - sq)
        assert gpu_check.causal_pairs(sq, sk) == counted


def test_bench_grid_paper_setting():
    grid = gpu_check.bench_grid()
    assert len(grid) == 72
    params = [c["params"] for c in grid]
    assert {p["seqlen"] for p in params} == {1024, 4096, 16384}
    # 16k tokens per batch, hidden 2048
    batch_of = {512: 32, 1024: 16, 2048: 8, 4096: 4, 8192: 2, 16384: 1}
    heads_of = {64: 32, 128: 16, 256: 8}
    for p in params:
        assert p["batch"] == batch_of[p["seqlen"]]
        assert p["heads"] == heads_of[p["head_dim"]]
    assert {(p["dtype"], p["causal"], p["passes"]) for p in params} == {
        (dt, c, ps) for dt in ("float16", "bfloat16") for c in (False, True) for ps in ("fwd", "fwd+bwd")}
    full = gpu_check.plan(full=True)["bench"]
    assert {c["params"]["seqlen"] for c in full} == set(batch_of)
    assert all(c["params"]["batch"] == batch_of[c["params"]["seqlen"]] for c in full)
    assert grid[0]["params"]["seqlen"] == 4096  # the priority order: 4k first
    names = [c["name"] for cases in gpu_check.plan(full=True).values() for c in cases]
    assert len(names) == len(set(names))


def test_cases_are_json_and_cuda_cases_fit_the_cuda_kernels():
    the_plan = gpu_check.plan(full=True)
    assert json.loads(json.dumps(the_plan)) == the_plan
    for case in the_plan["cuda"]:
        p = case["params"]
        assert p["backend"] == "cuda" and p["dtype"] in ("float16", "bfloat16")
        assert p.get("dv") is None and p["d"] <= 256 and not p.get("softcap") and not p.get("alibi")
    large = the_plan["triton-large"]
    assert {(c["params"]["d"], c["params"]["dtype"], c["params"]["causal"]) for c in large} == {
        (d, dt, c) for d in (64, 128, 256) for dt in ("float16", "bfloat16") for c in (False, True)}
    assert all(c["params"]["sq"] == c["params"]["sk"] == 4096 for c in large)


# ----------------------------------------------------------------------------- results


def _synthetic_records():
    nan, inf = float("nan"), float("inf")
    return [
        {"stage": "triton", "case": "triton: fp16 d64", "params": {}, "status": "ok", "detail": "",
         "worst": "out: max error 0.0003 (bound 0.003)", "seconds": 1.5,
         "checks": [{"name": "out", "error": 3e-4, "bound": 3e-3, "ok": True}]},
        {"stage": "cuda", "case": "cuda: bf16 d128", "params": {}, "status": "fail", "detail": "dq: max error nan",
         "worst": None, "seconds": 0.4, "checks": [{"name": "dq", "error": nan, "bound": inf, "ok": False}]},
        {"stage": "kvcache", "case": "kvcache: paged", "params": {}, "status": "crashed",
         "detail": "worker exited with status -11 during this case", "log_tail": "Segmentation fault | here"},
        {"stage": "bench", "case": "bench: fwd fp16 S=4096", "status": "ok", "detail": "", "seconds": 3.0,
         "params": {"passes": "fwd", "dtype": "float16", "seqlen": 4096, "batch": 4, "heads": 16, "head_dim": 128,
                    "causal": True},
         "flops": 2.7e11, "best_sdpa": "sdpa_flash", "ratio": {"triton": 1.25, "cuda": None},
         "impls": {"triton": {"status": "ok", "ms": 0.5, "tflops": 500.0},
                   "cuda": {"status": "error", "detail": "RuntimeError: boom", "tflops": nan},
                   "sdpa_flash": {"status": "ok", "ms": 0.625, "tflops": 400.0},
                   "sdpa_cudnn": {"status": "unavailable", "detail": "No available kernel"}}},
        {"stage": "bench", "case": "bench: fwd+bwd bf16 S=16384", "status": "skipped", "detail": "time budget",
         "params": {"passes": "fwd+bwd", "dtype": "bfloat16", "seqlen": 16384, "batch": 1, "heads": 8,
                    "head_dim": 256, "causal": False}},
        {"stage": "decode", "case": "decode: bf16", "status": "ok", "detail": "", "params": {"dtype": "bfloat16"},
         "best_sdpa": "sdpa_flash",
         "impls": {"triton": {"status": "ok", "ms": 0.5, "tflops": 2.0, "gbps": 4000.0},
                   "sdpa_flash": {"status": "ok", "ms": 1.0, "tflops": 1.0, "gbps": 2000.0, "note": "repeated"}}},
    ]


def test_results_writer_strict_json_and_tables(tmp_path):
    env = {"gpu": "NVIDIA H200", "compute_capability": "9.0", "torch": "2.11.0", "triton": "3.6.0",
           "python": "3.12.3", "driver": None}
    meta = {"elapsed_s": 321.0, "budget_s": 440, "repeats": 10}
    paths = gpu_check.write_results(str(tmp_path), env, _synthetic_records(), meta)
    assert sorted(os.path.basename(p) for p in paths) == ["results.json", "results.md"]

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    text = (tmp_path / "results.json").read_text()
    data = json.loads(text, parse_constant=refuse)
    assert "NaN" not in text and "Infinity" not in text
    recs = {r["case"]: r for r in data["records"]}
    assert recs["cuda: bf16 d128"]["checks"][0]["error"] is None
    assert recs["cuda: bf16 d128"]["checks"][0]["bound"] is None
    assert recs["bench: fwd fp16 S=4096"]["impls"]["cuda"]["tflops"] is None
    assert recs["bench: fwd fp16 S=4096"]["impls"]["triton"]["tflops"] == 500.0
    assert data["environment"]["gpu"] == "NVIDIA H200" and data["meta"]["repeats"] == 10

    md = (tmp_path / "results.md").read_text()
    for heading in ("## Environment", "## Correctness", "## Prefill timing", "### fwd, float16",
                    "### fwd+bwd, bfloat16", "## Decoding", "## Test suite"):
        assert heading in md
    assert "| GPU | NVIDIA H200 |" in md and "| compute capability | 9.0 |" in md
    assert "| 4096 | 4 x 16 | 128 | yes | 500.0 | error | 400.0 | unavailable | 1.25 | - | ok |" in md
    assert "| 16384 | 1 x 8 | 256 | no |" in md and "skipped" in md
    assert "Segmentation fault" not in md  # log tails stay in the JSON
    # decode: ours / best SDPA = 2.0 / 1.0
    assert "| bf16 | triton | ok | 0.500 | 2.00 | 4000 | 2.00 |" in md
    assert "Summary: 1 crashed, 1 fail, 1 ok" in md


def test_jsonable_replaces_non_finite_numbers():
    out = gpu_check._jsonable({"a": float("nan"), "b": [1.0, float("-inf"), (2, "x")], 3: None, "t": True})
    assert out == {"a": None, "b": [1.0, None, [2, "x"]], "3": None, "t": True}


# ----------------------------------------------------------------------------- timing loop


def test_time_interleaved_runs_every_impl_once_per_repeat():
    calls = []
    cost = {"a": 0.5, "b": 4.0}  # ms per call

    def elapsed(step, n):
        for _ in range(n):
            step()
        return cost[calls[-1]] * n

    steps = {name: (lambda name=name: calls.append(name)) for name in cost}
    times = gpu_check.time_interleaved(steps, repeats=3, target_ms=2.0, elapsed_ms=elapsed)
    # one estimate each, then a (0.5 ms -> 4 calls per timing) and b (1 call) alternate
    assert calls == ["a", "b"] + (["a"] * 4 + ["b"]) * 3
    assert times == {"a": [0.5, 0.5, 0.5], "b": [4.0, 4.0, 4.0]}


# ----------------------------------------------------------------------------- the checks, on CPU tensors


def _tiny(case, **changes):
    case = json.loads(json.dumps(case))
    case["params"].update(changes)
    return case


def test_attention_check_passes_and_catches_a_wrong_row(monkeypatch):
    import flashattn_lite as fl

    case = _tiny(gpu_check.triton_cases()[1], backend="reference", sq=13, sk=21, batch=1, hq=4, hk=2, d=16)
    rec = gpu_check.run_attention_case(case, device="cpu")
    assert rec["status"] == "ok", rec
    assert {c["name"] for c in rec["checks"]} == {"out", "lse", "dq", "dk", "dv"}

    real = fl.flash_attn_func

    def one_wrong_row(*args, **kwargs):
        out, lse, probs = real(*args, **kwargs)
        bump = torch.zeros_like(out)
        bump[0, 5, 1, 3] = 0.05
        return out + bump, lse, probs

    monkeypatch.setattr(fl, "flash_attn_func", one_wrong_row)
    rec = gpu_check.run_attention_case(case, device="cpu")
    assert rec["status"] == "fail" and rec["detail"].startswith("out: max error 0.05")


def test_kvcache_check_passes_and_catches_a_wrong_append(monkeypatch):
    import flashattn_lite as fl

    case = _tiny(gpu_check.kvcache_cases()[0], seqlens=[0, 5, 30], capacity=40, hq=4, hk=2, d=16)
    rec = gpu_check.run_kvcache_case(case, device="cpu", backend="reference")
    assert rec["status"] == "ok", rec

    real = fl.flash_attn_with_kvcache

    def forgets_the_append(q, k_cache, v_cache, k=None, v=None, **kwargs):
        # attends to the new key but leaves the cache as it was
        saved = k_cache.clone()
        result = real(q, k_cache, v_cache, k=k, v=v, **kwargs)
        k_cache.copy_(saved)
        return result

    monkeypatch.setattr(fl, "flash_attn_with_kvcache", forgets_the_append)
    rec = gpu_check.run_kvcache_case(case, device="cpu", backend="reference")
    assert rec["status"] == "fail" and "the cache after appending differs" in rec["detail"]


def test_bench_case_on_cpu_records_speeds_ratio_and_unavailable_sdpa():
    case = gpu_check._case("bench", "tiny", passes="fwd", dtype="float32", seqlen=64, batch=1, heads=2, head_dim=16,
                           causal=True)
    rec = gpu_check.run_bench_case(case, ["reference", "sdpa_flash", "sdpa_cudnn"], 2, device="cpu")
    ours = rec["impls"]["reference"]
    assert ours["status"] == "ok" and ours["ms"] > 0
    assert math.isclose(ours["tflops"], rec["flops"] / (ours["ms"] * 1e-3) / 1e12)
    assert rec["flops"] == 4 * 64 * 64 * 2 * 16 / 2
    assert rec["impls"]["sdpa_cudnn"]["status"] == "unavailable"  # no cuDNN on the CPU
    if rec["impls"]["sdpa_flash"]["status"] == "ok":
        assert rec["best_sdpa"] == "sdpa_flash"
        assert math.isclose(rec["ratio"]["reference"], ours["tflops"] / rec["impls"]["sdpa_flash"]["tflops"])
    assert rec["status"] == "ok"


# ----------------------------------------------------------------------------- orchestration


FAKE_WORKER = textwrap.dedent("""
    import json, os, sys, time
    options = json.loads(sys.argv[1])
    print("@@" + json.dumps({"ready": os.getpid(), "device": {"gpu": "Fake GPU", "sms": 3}}), flush=True)
    while True:
        line = sys.stdin.readline()
        if not line.strip():
            break
        case = json.loads(line)
        tag = case["params"].get("fake", "ok")
        if tag == "crash":
            os._exit(7)
        if tag == "crash_in_cuda":
            print("@@" + json.dumps({"impl": "cuda"}), flush=True)
            os._exit(11)
        if tag == "hang":
            time.sleep(120)
        rec = dict(stage=case["stage"], case=case["name"], params=case["params"], status="ok", detail="",
                   seconds=0.01)
        if tag == "lost":
            rec.update(status="error", detail="illegal address", context_lost=True)
        if case["stage"] == "bench":
            rec["impls_asked"] = options.get("impls")
        print("@@" + json.dumps({"result": rec}), flush=True)
        if tag == "lost":
            sys.exit(3)
""")


def _fake_plan(build=True):
    case = gpu_check._case
    the_plan = {"env": [case("env", "environment report")],
                "triton": [case("triton", n, fake=tag) for n, tag in
                           [("a", "ok"), ("b", "crash"), ("c", "hang"), ("d", "lost"), ("e", "ok"), ("f", "ok")]],
                "cuda": [case("cuda", "g", fake="ok")],
                "bench": [case("bench", "h", fake="ok", seqlen=4096, passes="fwd"),
                          case("bench", "i", fake="crash_in_cuda", seqlen=4096, passes="fwd"),
                          case("bench", "j", fake="ok", seqlen=4096, passes="fwd")]}
    if build:
        the_plan["build"] = [case("build", "extensions")]
    return the_plan


def _orchestrator(tmp_path, the_plan, build_code, budget=60.0):
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    lines = []
    orch = gpu_check.Orchestrator(the_plan, str(tmp_path / "out"), budget_s=budget, workers=2,
                                  worker_cmd=[sys.executable, str(worker)],
                                  build_cmd=[sys.executable, "-c", build_code],
                                  watchdog_s={"triton": 3, "cuda": 3, "bench": 3}, progress=lines.append)
    return orch, lines


def test_orchestrator_survives_crash_hang_and_lost_context(tmp_path):
    orch, lines = _orchestrator(tmp_path, _fake_plan(), "print('@@' + '{\"status\": \"ok\", \"path\": \"x.so\"}')")
    records = orch.run()
    status = {r["case"].split(": ", 1)[1]: r["status"] for r in records}
    assert status == {"extensions": "ok", "a": "ok", "b": "crashed", "c": "timeout", "d": "error", "e": "ok",
                      "f": "ok", "g": "ok", "h": "ok", "i": "crashed", "j": "ok"}
    by_name = {r["case"]: r for r in records}
    assert "status 7" in by_name["triton: b"]["detail"]
    assert by_name["triton: d"]["context_lost"] is True
    assert orch.device == {"gpu": "Fake GPU", "sms": 3}
    # build ok and cuda cases ok: cuda is timed, until a timing case crashes inside it
    assert by_name["bench: h"]["impls_asked"] == ["triton", "cuda", "sdpa_flash", "sdpa_cudnn"]
    assert by_name["bench: i"]["culprit"] == "cuda" and "preparing cuda" in by_name["bench: i"]["detail"]
    assert by_name["bench: j"]["impls_asked"] == ["triton", "sdpa_flash", "sdpa_cudnn"]
    assert orch.cuda_in_bench is False
    assert orch.elapsed < 40
    assert len(lines) == len(records)
    assert os.path.isdir(tmp_path / "out" / "logs")


def test_orchestrator_failed_build_skips_cuda_and_keeps_it_out_of_timing(tmp_path):
    the_plan = _fake_plan()
    the_plan["triton"] = the_plan["triton"][:1]
    orch, _ = _orchestrator(tmp_path, the_plan, "print('@@' + '{\"status\": \"error\", \"detail\": \"nvcc died\"}')")
    records = {r["case"]: r for r in orch.run()}
    assert records["build: extensions"]["status"] == "error"
    assert records["build: extensions"]["detail"] == "nvcc died"
    assert records["cuda: g"]["status"] == "skipped"
    assert orch.cuda_in_bench is False
    assert records["bench: h"]["impls_asked"] == ["triton", "sdpa_flash", "sdpa_cudnn"]


def test_orchestrator_budget_skips_what_would_start_too_late(tmp_path):
    orch, _ = _orchestrator(tmp_path, _fake_plan(), "import time; time.sleep(60)", budget=0.01)
    records = {r["case"]: r for r in orch.run()}
    assert records["build: extensions"]["status"] == "timeout"
    for name in ("triton: a", "triton: f", "cuda: g", "bench: h"):
        assert records[name]["status"] == "skipped", records[name]
    assert "time budget" in records["triton: a"]["detail"]
    assert orch.elapsed < 20


# ----------------------------------------------------------------------------- a bare checkout


def test_bare_checkout_finds_the_kernel_folders(tmp_path):
    """No install and no symlinks: flashattn_lite.triton_kernels and .csrc come from the
    checkout's top-level folders (also where an editable install of another checkout would
    offer its own)."""
    def skip_links(folder, names):
        return [n for n in names if n == "__pycache__" or os.path.islink(os.path.join(folder, n))]

    for name in ("flashattn_lite", "triton_kernels", "csrc"):
        shutil.copytree(os.path.join(ROOT, name), tmp_path / name, ignore=skip_links)
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path / "setup.py")
    assert not (tmp_path / "flashattn_lite" / "triton_kernels").exists()
    code = ("import flashattn_lite.gpu_check as g; found = g.ensure_kernel_packages(); "
            "import flashattn_lite.triton_kernels.configs as c, flashattn_lite.csrc as s; "
            "print(c.__file__); print(s.__file__); print(sorted(found))")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    configs_file, csrc_file, _ = proc.stdout.strip().splitlines()
    assert configs_file == str(tmp_path / "triton_kernels" / "configs.py")
    assert csrc_file == str(tmp_path / "csrc" / "__init__.py")
