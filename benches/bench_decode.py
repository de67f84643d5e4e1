"""Decoding: one query per sequence against a long KV cache (batch 4, 8 heads).

    python benches/bench_decode.py [--lengths 1024 4096 16384] [--out bench_out/decode]
"""

import argparse
import sys

from flashattn_lite import bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float16", "bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench_out/decode")
    a = p.parse_args(argv)
    cases = bench.workloads(head_dims=a.head_dims, dtypes=a.dtypes, passes=["decode"], decode_lengths=a.lengths)
    return bench.run_and_report(cases, a.repeats, a.out)[1]


if __name__ == "__main__":
    sys.exit(main())
