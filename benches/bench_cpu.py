"""CPU benchmark: flashattn_lite's C++ ``cpu`` backend against
``torch.nn.functional.scaled_dot_product_attention`` and naive
matmul-softmax-matmul, on the same BHSD inputs, in one process, with the
implementations interleaved inside every repeat; medians are reported.

    python benches/bench_cpu.py [--isa native|avx2] [--seqlens 1024 4096] [--repeats 5]
                                [--memory-seqlen 8192] [--json out.json]

``--isa avx2`` reruns the whole measurement with every party held to AVX2 on an
AVX-512 host: torch's kernels (``ATEN_CPU_CAPABILITY=avx2``), MKL
(``MKL_ENABLE_INSTRUCTIONS=AVX2``), oneDNN (``ONEDNN_MAX_CPU_ISA=AVX2``) and our
extension, whose build follows torch's capability (it is compiled without AVX-512).
That reproduces the instruction set of the AVX2 machine the speed targets were set on
(not its clock or caches).

FLOPs follow flash-attn's convention: 4*B*S^2*H*D for the forward (halved when
causal); forward+backward counts 3.5x the forward.  The same run measures
``torch.mm`` on fp32 4096 x 4096 matrices as the machine's practical peak.
Peak memory of forward+backward is measured in a fresh subprocess per
implementation: the peak resident set (VmHWM, reset just before the measured
call) above the resident set after the inputs were allocated and a warm-up of
that implementation ran, with glibc returning freed blocks of 64 KiB or more to
the OS.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

import flashattn_lite as fl
from flashattn_lite.bench import cpu_model, naive_attention


def ours(q, k, v, causal):
    with fl.use_backend("cpu"):
        return fl.scaled_dot_product_attention(q, k, v, is_causal=causal)


def sdpa(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


IMPLS = {"flashattn_lite": ours, "torch_sdpa": sdpa, "naive": naive_attention}


def _step(fn, inputs, causal, backward, dout):
    if backward:
        out = fn(*inputs, causal)
        torch.autograd.grad(out, inputs, dout)
    else:
        with torch.no_grad():
            fn(*inputs, causal)


def mm_gflops(repeats, dtype=torch.float32):
    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 4096 ** 3 / statistics.median(times) / 1e9


def bench_case(seqlen, dtype, causal, backward, repeats, heads=8, head_dim=64, names=IMPLS):
    torch.manual_seed(0)
    inputs = [torch.randn(1, heads, seqlen, head_dim, dtype=dtype, requires_grad=backward) for _ in range(3)]
    dout = torch.randn(1, heads, seqlen, head_dim, dtype=dtype)
    for name in names:  # warm-up (and the JIT build of the C++ extension)
        _step(IMPLS[name], inputs, causal, backward, dout)
    times = {name: [] for name in names}
    for _ in range(repeats):  # interleaved: each repeat runs every implementation once
        for name in names:
            t = time.perf_counter()
            _step(IMPLS[name], inputs, causal, backward, dout)
            times[name].append(time.perf_counter() - t)
    flops = 4 * heads * seqlen * seqlen * head_dim / (2 if causal else 1) * (3.5 if backward else 1.0)
    return {name: {"ms": statistics.median(ts) * 1e3, "gflops": flops / statistics.median(ts) / 1e9}
            for name, ts in times.items()}


_MEMORY_CHILD = """
import sys, torch
sys.path.insert(0, {bench_dir!r})
import bench_cpu
seqlen = {seqlen}
inputs = [torch.randn(1, 8, seqlen, 64, requires_grad=True) for _ in range(3)]
dout = torch.randn(1, 8, seqlen, 64)
from flashattn_lite.bench import _glibc_return_large_blocks
_glibc_return_large_blocks()  # freed blocks go back to the OS, so reuse cannot hide memory
bench_cpu._step(bench_cpu.IMPLS[{name!r}], [t.detach().requires_grad_() for t in inputs], False, True,
                dout)  # warm-up of the measured implementation (JIT build, BLAS buffers) before the baseline
def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
bench_cpu._step(bench_cpu.IMPLS[{name!r}], inputs, False, True, dout)
print(max(status("VmHWM") - base, 0))
"""


def peak_memory(name, seqlen):
    """Peak extra RSS (bytes) of one fp32 forward+backward, or None if it failed (e.g. out of memory)."""
    code = _MEMORY_CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), seqlen=seqlen, name=name)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return int(proc.stdout.strip().splitlines()[-1])


# The targets (ratios measured in one run).
TARGETS = {"fwd_min_vs_sdpa": 0.9, "fwd_geomean_vs_sdpa": 1.2, "fwd_bwd_geomean_vs_sdpa": 2.0,
           "fp32_fwd_fraction_of_mm": 0.9, "memory_naive_over_ours": 10.0,
           # issue 16: the bf16 forward at >= 60% of the faster of torch.mm bf16 / fp32
           "bf16_fwd_fraction_of_mm": 0.6}
# Modern shapes (issue 15): MLA prefill and gpt-oss-style sinks + window at least 1.2x their
# baselines' speed, and sinks costing at most 5% over the same call without them.
TARGETS.update({"mla_min_vs_sdpa": 1.2, "sinks_min_vs_eager": 1.2})
CEILINGS = {"sinks_max_cost": 0.05}
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="avx2: hold torch, MKL, oneDNN and the extension to AVX2 (see the module doc)")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-seqlen", type=int, default=8192, help="0 skips the memory measurement")
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--no-naive", action="store_true",
                        help="skip naive attention in the timings (its bf16 is very slow under --isa avx2)")
    args = parser.parse_args(argv)
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        # torch reads these at import: run the measurement in a fresh interpreter
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.run([sys.executable, os.path.abspath(__file__), *argv],
                              env={**os.environ, **AVX2_ENV}).returncode

    from flashattn_lite import _build
    info = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "isa": args.isa,
            "isa_env": {k: os.environ.get(k) for k in AVX2_ENV}, "extension_flags": _build.cflags()}
    print(f"# {info['cpu']}, {info['threads']} threads, torch {info['torch']} ({info['cpu_capability']}); "
          f"--isa {args.isa}; extension built with {' '.join(info['extension_flags'])}")
    mm = mm_gflops(args.repeats)
    mm_bf16 = mm_gflops(args.repeats, torch.bfloat16)
    print(f"# torch.mm 4096x4096: fp32 {mm:.0f} GFLOP/s, bf16 {mm_bf16:.0f} GFLOP/s")
    from flashattn_lite.backends import cpu as cpu_backend
    path, why = cpu_backend.products_choice()["bf16"]
    info["bf16_products"] = {"path": path, "why": why}
    print(f"# cpu backend bf16 tiles: {cpu_backend.PATH_NAMES[path]} ({why})")
    rows = []
    names = [n for n in IMPLS if not (args.no_naive and n == "naive")]
    print("| pass | seqlen | dtype | causal | flashattn_lite GFLOP/s | torch SDPA GFLOP/s | naive GFLOP/s "
          "| vs SDPA | vs naive |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backward in (False, True):
        for seqlen in args.seqlens:
            for dtype in (torch.float32, torch.bfloat16):
                for causal in (False, True):
                    res = bench_case(seqlen, dtype, causal, backward, args.repeats, names=names)
                    row = dict(passes="fwd+bwd" if backward else "fwd", seqlen=seqlen, dtype=str(dtype)[6:],
                               causal=causal, **{f"{k}_{m}": v[m] for k, v in res.items() for m in ("ms", "gflops")})
                    row["vs_sdpa"] = res["torch_sdpa"]["ms"] / res["flashattn_lite"]["ms"]
                    naive = res.get("naive")
                    row["vs_naive"] = naive["ms"] / res["flashattn_lite"]["ms"] if naive else None
                    rows.append(row)
                    print(f"| {row['passes']} | {seqlen} | {row['dtype']} | {causal} | "
                          f"{res['flashattn_lite']['gflops']:.0f} | {res['torch_sdpa']['gflops']:.0f} | "
                          + (f"{naive['gflops']:.0f} | {row['vs_sdpa']:.2f}x | {row['vs_naive']:.2f}x |" if naive
                             else f"- | {row['vs_sdpa']:.2f}x | - |"), flush=True)

    def geomean(xs):
        return math.exp(sum(math.log(x) for x in xs) / len(xs))

    fwd = [r["vs_sdpa"] for r in rows if r["passes"] == "fwd"]
    both = [r["vs_sdpa"] for r in rows if r["passes"] == "fwd+bwd"]
    summary = {"torch_mm_gflops": mm, "torch_mm_bf16_gflops": mm_bf16, "fwd_min_vs_sdpa": min(fwd), "fwd_geomean_vs_sdpa": geomean(fwd),
               "fwd_bwd_geomean_vs_sdpa": geomean(both)}
    peak_case = [r for r in rows if r["passes"] == "fwd" and r["dtype"] == "float32" and not r["causal"]]
    if peak_case:
        best = max(peak_case, key=lambda r: r["seqlen"])
        summary["fp32_fwd_fraction_of_mm"] = best["flashattn_lite_gflops"] / mm
        summary["fp32_fwd_fraction_of_mm_seqlen"] = best["seqlen"]
    bf16_case = [r for r in rows if r["passes"] == "fwd" and r["dtype"] == "bfloat16" and not r["causal"]]
    if bf16_case:
        best = max(bf16_case, key=lambda r: r["seqlen"])
        summary["bf16_fwd_fraction_of_mm"] = best["flashattn_lite_gflops"] / max(mm, mm_bf16)
        summary["bf16_fwd_fraction_of_mm_seqlen"] = best["seqlen"]
    # What the forward+backward geomean would be if every case ran at torch.mm's own rate
    # (attention adds its elementwise work to the same products, so this is a ceiling).
    summary["fwd_bwd_geomean_at_mm_rate"] = geomean(
        [mm / r["torch_sdpa_gflops"] for r in rows if r["passes"] == "fwd+bwd"])
    print(f"\nforward vs SDPA: min {summary['fwd_min_vs_sdpa']:.2f}x, geomean {summary['fwd_geomean_vs_sdpa']:.2f}x;"
          f" forward+backward geomean {summary['fwd_bwd_geomean_vs_sdpa']:.2f}x"
          f" (every case at torch.mm's rate would give {summary['fwd_bwd_geomean_at_mm_rate']:.2f}x)")
    if "fp32_fwd_fraction_of_mm" in summary:
        print(f"fp32 non-causal forward at seqlen {summary['fp32_fwd_fraction_of_mm_seqlen']}: "
              f"{100 * summary['fp32_fwd_fraction_of_mm']:.0f}% of torch.mm's GFLOP/s")
    if "bf16_fwd_fraction_of_mm" in summary:
        print(f"bf16 non-causal forward at seqlen {summary['bf16_fwd_fraction_of_mm_seqlen']}: "
              f"{100 * summary['bf16_fwd_fraction_of_mm']:.0f}% of the faster torch.mm (bf16 or fp32)")
    if args.memory_seqlen:
        mem = {name: peak_memory(name, args.memory_seqlen) for name in IMPLS}
        summary["memory_seqlen"] = args.memory_seqlen
        summary["peak_memory_bytes"] = mem
        parts = [f"{n} {m / 2**20:.0f} MiB" if m is not None else f"{n} failed (out of memory?)"
                 for n, m in mem.items()]
        print(f"peak extra memory of fp32 forward+backward at seqlen {args.memory_seqlen}: " + ", ".join(parts))
        if mem["flashattn_lite"] and mem["naive"]:
            summary["memory_naive_over_ours"] = mem["naive"] / mem["flashattn_lite"]
            print(f"naive / flashattn_lite: {summary['memory_naive_over_ours']:.1f}x")
    summary.update(modern_shapes(args.seqlens, args.repeats, rows))
    met = {k: summary[k] >= t for k, t in TARGETS.items() if k in summary}
    met.update({k: summary[k] <= t for k, t in CEILINGS.items() if k in summary})
    summary["targets_met"] = met
    print("targets: " + ", ".join(f"{k} {'>= ' + str(TARGETS[k]) if k in TARGETS else '<= ' + str(CEILINGS[k])}: "
                                  f"{'met' if ok else 'NOT met'}" for k, ok in met.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows, "summary": summary}, f, indent=1)
    return 0


def sink_cost(case, repeats):
    """Median ms of flashattn_lite's cpu backend on a sink case with its sinks and without
    them (the same window), alternating the two so both meet the same caches."""
    from flashattn_lite import bench

    impls = bench._sink_impls(case, {"fa_lite:cpu": None}, "cpu")
    q, k, v, dout = bench._make_inputs(case, "cpu")
    steps = [bench._runner(impls[name], case, q, k, v, dout) for name in ("fa_lite:cpu", "fa_lite:cpu no sink")]
    for step in steps:
        step()
    times = ([], [])
    for i in range(repeats):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            t = time.perf_counter()
            steps[j]()
            times[j].append(time.perf_counter() - t)
    return tuple(statistics.median(ts) * 1e3 for ts in times)


def modern_shapes(seqlens, repeats, rows):
    """MLA prefill (D 192 / Dv 128) against torch SDPA on the same problem, and gpt-oss-style
    sinks + 128-key window against transformers' eager formulation and against the same call
    without sinks, causal, fp32 and bf16, forward and forward+backward (each output checked
    against float64 first: see flashattn_lite.bench).  Appends rows; returns the summary."""
    from flashattn_lite import bench

    impls = bench.implementations("cpu", ["cpu", "torch_sdpa"])
    print("\n| pass | seqlen | dtype | shape | flashattn_lite ms | baseline | baseline ms | vs baseline "
          "| without sinks ms | sink cost |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    mla, sink_speed, costs = [], [], []
    for case in bench.modern_workloads(False, ("fwd", "fwd+bwd"), ("float32", "bfloat16"), seqlens=seqlens):
        res = {r.impl: r for r in bench.run_case(case, impls, "cpu", repeats)}
        bad = [f"{r.impl}: {r.status} {r.detail}" for r in res.values() if r.status != "ok"]
        if bad:
            print(f"| {case.passes} | {case.seqlen_q} | {case.dtype} | " + "; ".join(bad) + " |")
            continue
        ours = res["fa_lite:cpu"].ms
        base_name = "eager_sinks" if case.sink_window else "torch_sdpa"
        base = res[base_name].ms
        shape = f"sinks, window {case.sink_window}, D {case.head_dim}" if case.sink_window else \
            f"MLA D {case.head_dim} / Dv {case.dv}"
        row = dict(passes=case.passes, seqlen=case.seqlen_q, dtype=case.dtype, shape=shape, ours_ms=ours,
                   baseline=base_name, baseline_ms=base, vs_baseline=base / ours)
        cost = ""
        if case.sink_window:
            # in the interleaved run above, the call after the O(N^2) eager baseline meets cold
            # caches; the sink's cost is measured on its own, with and without alternating
            with_sink, plain = sink_cost(case, max(repeats, 7))
            row.update(no_sink_ms=plain, sink_cost=with_sink / plain - 1)
            sink_speed.append(row["vs_baseline"])
            costs.append(row["sink_cost"])
            cost = f"{plain:.1f} | {100 * row['sink_cost']:+.1f}%"
        else:
            mla.append(row["vs_baseline"])
            cost = "- | -"
        rows.append(row)
        print(f"| {case.passes} | {case.seqlen_q} | {case.dtype} | {shape} | {ours:.1f} | {base_name} | {base:.1f} | "
              f"{row['vs_baseline']:.2f}x | {cost} |", flush=True)
    out = {}
    if mla:
        out["mla_min_vs_sdpa"] = min(mla)
    if sink_speed:
        out["sinks_min_vs_eager"] = min(sink_speed)
        out["sinks_max_cost"] = max(costs)
    print("modern shapes: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    sys.exit(main())
