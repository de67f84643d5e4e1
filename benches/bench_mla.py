"""MLA prefill on the CPU: forward of D = 192 (query/key), Dv = 128 (value) attention,
flashattn_lite's cpu backend against torch SDPA on the same problem (torch allows Ev != E).

    PYTHONPATH=. python benches/bench_mla.py [--seqlens 1024 2048] [--heads 8] [--dtypes float32 bfloat16]

Prints the median of ``--reps`` timed calls of each and the ratio torch / ours (> 1: ours faster).
Name the machine (``lscpu`` model and flags) beside any number quoted from this.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import flashattn_lite as fl


def median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d", type=int, default=192)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(f"threads {torch.get_num_threads()}, B=1 H={args.heads} D={args.d} Dv={args.dv}, forward only")
    print(f"{'dtype':>9} {'N':>6} {'causal':>6} {'ours ms':>9} {'sdpa ms':>9} {'sdpa/ours':>9}")
    for dtype in (getattr(torch, d) for d in args.dtypes):
        for n in args.seqlens:
            for causal in (False, True):
                torch.manual_seed(0)
                q = torch.randn(1, n, args.heads, args.d, dtype=dtype)
                k = torch.randn(1, n, args.heads, args.d, dtype=dtype)
                v = torch.randn(1, n, args.heads, args.dv, dtype=dtype)
                qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
                with torch.no_grad(), fl.use_backend("cpu"):
                    ours = median_ms(lambda: fl.flash_attn_func(q, k, v, causal=causal), args.reps)
                    theirs = median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                                       args.reps)
                print(f"{str(dtype).split('.')[1]:>9} {n:>6} {str(causal):>6} {ours:9.1f} {theirs:9.1f} "
                      f"{theirs / ours:9.2f}")


if __name__ == "__main__":
    main()
