"""Forward, backward and forward+backward throughput against torch SDPA and naive attention.

    python benches/bench_fwd_bwd.py [--seqlens 512 1024 2048 4096] [--head-dims 64 128] [--out bench_out/fwd_bwd]
"""

import argparse
import sys

from flashattn_lite import bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float16", "bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench_out/fwd_bwd")
    a = p.parse_args(argv)
    cases = bench.workloads(seqlens=a.seqlens, head_dims=a.head_dims, dtypes=a.dtypes, passes=["fwd", "bwd", "fwd+bwd"])
    return bench.run_and_report(cases, a.repeats, a.out)[1]


if __name__ == "__main__":
    sys.exit(main())
