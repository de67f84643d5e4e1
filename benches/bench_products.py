"""The CPU backend's ways of multiplying bf16 (or fp16) tiles, against each other and
torch's SDPA in one run: products in that dtype by this extension's micro-kernels (``bf16``
/ ``fp16``, and ``bf16fma``: bf16 pairs widened in registers) and by oneDNN's brgemm
(``onednn``), and widened to float32 (``fp32``).

    python benches/bench_products.py [--dtype bf16|fp16] [--seqlens 1024 4096] [--repeats 5] [--json F]

Batch 1, 8 heads, head dim 64, BHSD inputs (as benches/bench_cpu.py), forward and
forward+backward, causal or not.  Every repeat runs each path once (each forced with
FLASHATTN_LITE_CPU_MATMUL or FLASHATTN_LITE_CPU_MATMUL_FP16, read at each call) and SDPA,
interleaved; the table gives the
median GFLOP/s (4·S²·H·D forward, halved when causal, 3.5x for forward+backward).  Paths
this machine cannot run are left out.  The header gives the CPU and the one-thread rates
that ``auto`` chooses by.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import IMPLS, _step  # noqa: E402

from flashattn_lite.backends import cpu  # noqa: E402
from flashattn_lite.bench import cpu_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    rates = cpu.probe_products()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    env = cpu.MATMUL_ENV if args.dtype == "bf16" else cpu.MATMUL_FP16_ENV
    dnn = "onednn" if args.dtype == "bf16" else "onednn_fp16"
    own = [args.dtype] + (["bf16fma"] if args.dtype == "bf16" else [])
    paths = [p for p, key in [(p, p) for p in own] + [("onednn", dnn)] if rates[key] > 0] + ["fp32"]
    auto = cpu.choose_products(rates, args.dtype)
    print(f"# {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# auto takes {auto[0]}: {auto[1]}")
    names = paths + ["torch_sdpa"]
    print("| pass | seqlen | causal | " + " | ".join(f"{n} GFLOP/s" for n in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    rows = []
    prev = os.environ.get(env)
    try:
        for backward in (False, True):
            for seqlen in args.seqlens:
                for causal in (False, True):
                    torch.manual_seed(0)
                    inputs = [torch.randn(1, 8, seqlen, 64, dtype=dtype, requires_grad=backward)
                              for _ in range(3)]
                    dout = torch.randn(1, 8, seqlen, 64, dtype=dtype)
                    times = {n: [] for n in names}

                    def run(name):
                        if name != "torch_sdpa":
                            os.environ[env] = name
                        impl = IMPLS["torch_sdpa" if name == "torch_sdpa" else "flashattn_lite"]
                        t = time.perf_counter()
                        _step(impl, inputs, causal, backward, dout)
                        return time.perf_counter() - t

                    for name in names:  # warm-up (and the JIT code of each engine)
                        run(name)
                    for _ in range(args.repeats):
                        for name in names:
                            times[name].append(run(name))
                    flops = 4 * 8 * seqlen * seqlen * 64 / (2 if causal else 1) * (3.5 if backward else 1.0)
                    gf = {n: flops / statistics.median(ts) / 1e9 for n, ts in times.items()}
                    rows.append(dict(passes="fwd+bwd" if backward else "fwd", seqlen=seqlen, causal=causal,
                                     gflops=gf))
                    print(f"| {rows[-1]['passes']} | {seqlen} | {causal} | "
                          + " | ".join(f"{gf[n]:.0f}" for n in names) + " |", flush=True)
    finally:
        if prev is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = prev
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "dtype": args.dtype, "threads": torch.get_num_threads(),
                       "torch": torch.__version__,
                       "probe": rates, "auto": auto, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
