"""Peak memory of forward+backward against sequence length (fp32, causal and not).

Naive attention is reported as "out of memory" where it would not fit.

    python benches/bench_memory.py [--seqlens 1024 2048 4096 8192 16384] [--out bench_out/memory]
"""

import argparse
import sys

from flashattn_lite import bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="bench_out/memory")
    a = p.parse_args(argv)
    cases = bench.workloads(seqlens=a.seqlens, head_dims=[64], dtypes=["float32"], passes=["fwd+bwd"])
    results, files = bench.run(cases, repeats=a.repeats, out_dir=a.out)
    print("| seqlen | causal | " + " | ".join(dict.fromkeys(r.impl for r in results)) + " |")
    by_case = {}
    for r in results:
        by_case.setdefault((r.case.seqlen_q, r.case.causal), []).append(r)
    for (s, c), rs in by_case.items():
        cells = [(f"{r.peak_mib:.0f} MiB" if r.peak_mib == r.peak_mib else "not measurable") if r.status == "ok"
                 else r.status for r in rs]
        print(f"| {s} | {c} | " + " | ".join(cells) + " |")
    print("written: " + ", ".join(files))
    return 1 if any(r.status in ("mismatch", "error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
