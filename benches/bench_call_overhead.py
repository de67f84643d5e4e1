"""Per-call time of small CPU calls, where the host-side work (argument checks, backend
choice, operator dispatch) is a visible share: decoding steps, short sequences, varlen.

    python benches/bench_call_overhead.py [--repeat 400] [--threads 1] [--clock cpu] [--json out.json]

To compare two checkouts, run it alternately with each on PYTHONPATH (the package
and its csrc/ and triton_kernels/ resolved from that checkout).  Prints the median and
the quartiles of ``--repeat`` calls per case, in microseconds, with the machine's CPU.
``--clock cpu`` times the calling thread's CPU time (with ``--threads 1`` that is the whole
call's work), which other jobs on the machine disturb less than wall time.

``--instructions`` counts instead the instructions each call executes (thousands per call,
after 20 warm-up calls), by running this script under valgrind's callgrind with one
client-request region per case.  The count does not move with other jobs on the machine,
so two checkouts can be compared on a busy host; it needs valgrind and a C compiler, and
takes a few minutes (torch's import runs under valgrind).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import flashattn_lite as fl
from bench_cpu import cpu_model  # benches/ is on sys.path when run as a script


def cases():
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    q1, kc, vc = rnd(1, 1, 8, 64), rnd(1, 1024, 8, 64), rnd(1, 1024, 8, 64)
    new_k, new_v = rnd(1, 1, 8, 64), rnd(1, 1, 8, 64)
    q, k, v = rnd(2, 64, 8, 64), rnd(2, 64, 8, 64), rnd(2, 64, 8, 64)
    qg, kg, vg = (rnd(1, 32, 4, 32).requires_grad_() for _ in range(3))
    lengths = [17, 5, 40, 2]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qv, kv, vv = rnd(sum(lengths), 4, 64), rnd(sum(lengths), 4, 64), rnd(sum(lengths), 4, 64)
    seqlens = torch.tensor([1000], dtype=torch.int32)

    def kvcache_step():
        with torch.no_grad():
            fl.flash_attn_with_kvcache(q1, kc, vc, k=new_k, v=new_v, cache_seqlens=seqlens, causal=True)

    def fwd_bwd():
        out = fl.flash_attn_func(qg, kg, vg, causal=True)
        torch.autograd.grad(out.sum(), (qg, kg, vg))

    return {
        "kvcache step B1 H8 d64 1000+1": kvcache_step,
        "flash_attn_func 1 row vs 1024 keys": lambda: fl.flash_attn_func(q1, kc, vc),
        "flash_attn_func B2 S64 H8 d64 causal": lambda: fl.flash_attn_func(q, k, v, causal=True),
        "fwd+bwd B1 S32 H4 d32 causal": fwd_bwd,
        "varlen 4 seqs H4 d64": lambda: fl.flash_attn_varlen_func(qv, kv, vv, cu, cu, 40, 40, causal=True),
        "sdpa B2 H8 S64 d64 causal": lambda: fl.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True),
    }


_REGION_C = r"""
#include <valgrind/callgrind.h>
typedef void (*body_t)(void);
/* callgrind counts from here to the dump, which it writes as its own part file */
void fl_region(body_t body, const char *name) { CALLGRIND_ZERO_STATS; body(); CALLGRIND_DUMP_STATS_AT(name); }
"""


def _run_regions(workdir, calls):
    """Inside callgrind: each case's ``calls`` calls in one counted region (dump part i+2),
    with Python's garbage collector held off so that no region counts a collection."""
    import ctypes
    import gc
    lib = ctypes.CDLL(os.path.join(workdir, "libregions.so"))
    body_t = ctypes.CFUNCTYPE(None)
    # part 1: the process's first ctypes callback, which does one-time work worth several
    # calls; it is not reported
    lib.fl_region(body_t(lambda: None), b"warm-up")
    for i, fn in enumerate(cases().values()):
        for _ in range(20):
            fn()

        def body(fn=fn):
            for _ in range(calls):
                fn()
        gc.collect()
        gc.disable()
        lib.fl_region(body_t(body), f"case{i}".encode())
        gc.enable()


def count_instructions(calls, threads):
    """{case: thousands of instructions per call}, from a callgrind run of this script."""
    valgrind, cc = shutil.which("valgrind"), shutil.which("cc") or shutil.which("gcc")
    if not valgrind or not cc:
        raise SystemExit("--instructions needs valgrind and a C compiler on PATH")
    with tempfile.TemporaryDirectory() as work:
        src = os.path.join(work, "regions.c")
        with open(src, "w") as f:
            f.write(_REGION_C)
        subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", os.path.join(work, "libregions.so"), src], check=True)
        out = os.path.join(work, "cg.out")
        subprocess.run([valgrind, "--tool=callgrind", "--callgrind-out-file=" + out, sys.executable,
                        os.path.abspath(__file__), "--_regions", work, "--calls", str(calls),
                        "--threads", str(threads)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        counts = {}
        for i, name in enumerate(cases(), 2):
            with open(f"{out}.{i}") as f:
                total = next(int(line.split()[1]) for line in f if line.startswith("summary:"))
            counts[name] = total / calls / 1e3
        return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=400)
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions per call under valgrind's callgrind instead of timing")
    ap.add_argument("--calls", type=int, default=50, help="calls per case counted with --instructions")
    ap.add_argument("--_regions", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._regions:
        return _run_regions(args._regions, args.calls)
    if args.instructions:
        counts = count_instructions(args.calls, args.threads or 1)
        for name, k in counts.items():
            print(f"{name:40s} {k:10.1f} k instructions per call")
        print(f"# {cpu_model()}, torch {torch.__version__}, {args.threads or 1} threads, {fl.__file__}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"cpu": cpu_model(), "torch": torch.__version__, "package": fl.__file__,
                           "kinstructions_per_call": counts}, f, indent=1)
        return
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    report = {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "package": fl.__file__, "clock": args.clock, "cases": {}}
    for name, fn in cases().items():
        for _ in range(20):
            fn()
        times = []
        for _ in range(args.repeat):
            t0 = clock()
            fn()
            times.append((clock() - t0) * 1e6)
        q = statistics.quantiles(times, n=4)
        report["cases"][name] = {"median_us": statistics.median(times), "q1_us": q[0], "q3_us": q[2]}
        print(f"{name:40s} median {statistics.median(times):8.1f} us  (quartiles {q[0]:.1f}-{q[2]:.1f})")
    print(f"# {report['cpu']}, torch {report['torch']}, {report['threads']} threads, {report['package']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
