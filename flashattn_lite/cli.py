"""``flashattn-lite`` command line (also ``python -m flashattn_lite``).

    flashattn-lite info    versions, device, and every backend's state
    flashattn-lite check   quick self-test of every usable backend against the float64 reference
    flashattn-lite demo    run attention on a small problem and print its error against the reference
    flashattn-lite bench   microbenchmarks (table, CSV, JSON and PNG plots in --out)
    flashattn-lite build   build the C++ CPU extension now (otherwise built on first use) and print its path
    flashattn-lite gpu-check  one-shot GPU check: correctness and timing against torch's SDPA (benches/gpu_check.py)
"""

import argparse
import os
import platform
import sys


def _enable_interpreter_without_gpu():
    """Without a GPU, run the Triton kernels in Triton's CPU interpreter.

    Must happen before the kernels are first imported (they are imported lazily)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def cmd_info(args):
    import torch

    import flashattn_lite
    from flashattn_lite import available_backends
    from flashattn_lite.backends import feature_table

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"flashattn_lite {flashattn_lite.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}")
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({platform.processor() or platform.machine()})"
    print(f"device: {device}")
    print("backends:")
    backends_here = available_backends()
    for name, (usable, why) in backends_here.items():
        print(f"  {name:<10} {'yes' if usable else 'no ':<4} {why}")
    if backends_here.get("cpu", (False,))[0]:
        from flashattn_lite.backends import cpu

        print("cpu backend products:")
        try:
            for dtype, (path, why) in cpu.products_choice().items():
                print(f"  {dtype:<10} {cpu.PATH_NAMES[path]:<23} {why}")
        except (RuntimeError, ValueError) as exc:  # e.g. a bad FLASHATTN_LITE_CPU_MATMUL
            print(f"  {exc}")
    table = feature_table()
    names = list(next(iter(table.values())))
    print("\nfeatures:")
    print(f"  {'':<10}" + "".join(f"{n:>11}" for n in names))
    for feature, by_backend in table.items():
        print(f"  {feature:<10}" + "".join(f"{'yes' if by_backend[n] else '-':>11}" for n in names))
    return 0


def cmd_check(args):
    import torch

    import flashattn_lite as fl
    from flashattn_lite.testing import check_against_reference, reference_results

    _enable_interpreter_without_gpu()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # (batch, Sq, Sk, Hq, Hk, D, causal, window, softcap, alibi)
    shapes = [(2, 33, 47, 4, 2, 40, False, (-1, -1), 0.0, False), (1, 48, 17, 2, 1, 64, True, (-1, -1), 0.0, False),
              (1, 1, 29, 2, 2, 96, True, (-1, -1), 0.0, False), (1, 40, 40, 2, 2, 32, True, (-1, -1), 0.0, False),
              (1, 37, 45, 2, 1, 32, False, (8, 3), 4.0, True)]
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    failures = 0
    for name, (usable, why) in fl.available_backends().items():
        if not usable:
            print(f"{name:<10} skipped: {why}")
            continue
        for dtype in dtypes:
            for batch, sq, sk, hq, hk, d, causal, window, softcap, alibi in shapes:
                gen = torch.Generator().manual_seed(sq * 1000 + sk)
                q, k, v = (torch.randn(batch, s, h, d, generator=gen, dtype=dtype).to(device).requires_grad_()
                           for s, h in ((sq, hq), (sk, hk), (sk, hk)))
                dout = torch.randn(batch, sq, hq, d, generator=gen, dtype=dtype).to(device)
                slopes = torch.rand(hq, generator=gen).to(device) if alibi else None
                label = (f"{name:<10} {str(dtype)[6:]:<8} B={batch} Sq={sq} Sk={sk} H={hq}/{hk} D={d} causal={causal}"
                         + (f" window={window}" if window != (-1, -1) else "")
                         + (f" softcap={softcap}" if softcap else "") + (" alibi" if alibi else ""))
                try:
                    with fl.use_backend(name):
                        out, lse, _ = fl.flash_attn_func(q, k, v, causal=causal, window_size=window,
                                                         softcap=softcap, alibi_slopes=slopes, return_attn_probs=True)
                        grads = torch.autograd.grad(out, (q, k, v), dout)
                except RuntimeError as exc:
                    if "cannot run this call" in str(exc):
                        print(f"{label}: not supported ({exc})")
                        continue
                    raise
                ours = dict(out=out.detach().cpu(), lse=lse.cpu(), dq=grads[0].cpu(), dk=grads[1].cpu(),
                            dv=grads[2].cpu())
                cpu = [t.detach().cpu() for t in (q, k, v)]
                ref, base = reference_results(*cpu, dout.cpu(), d ** -0.5, sk - sq, window[0],
                                              0 if causal else window[1], softcap,
                                              None if slopes is None else slopes.cpu())
                checks = check_against_reference(ours, ref, base, dtype)
                bad = [str(c) for c in checks if not c.ok]
                failures += bool(bad)
                print(f"{label}: {'FAIL ' + '; '.join(bad) if bad else 'ok'}")
    print("all checks passed" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0


def cmd_demo(args):
    import time

    import torch

    _enable_interpreter_without_gpu()
    import flashattn_lite as fl
    from flashattn_lite.backends.reference import attention_math

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    batch, seqlen, heads, kv_heads, head_dim = 1, 96, 4, 2, 64
    q = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=torch.float16, requires_grad=True)
    k = torch.randn(batch, seqlen, kv_heads, head_dim, device=device, dtype=torch.float16, requires_grad=True)
    v = torch.randn(batch, seqlen, kv_heads, head_dim, device=device, dtype=torch.float16, requires_grad=True)
    print(f"causal GQA attention: batch={batch} seqlen={seqlen} heads={heads}/{kv_heads} head_dim={head_dim} fp16 "
          f"on {device}")
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_out, _ = attention_math(*ref_leaves, head_dim ** -0.5, 0, -1, 0)
    ref_out.sum().backward()
    for name, (usable, why) in fl.available_backends().items():
        if not usable:
            print(f"  {name:<10} not available: {why}")
            continue
        start = time.perf_counter()
        with fl.use_backend(name):
            out = fl.flash_attn_func(q, k, v, causal=True)
            grads = torch.autograd.grad(out.sum(), (q, k, v))
        elapsed = time.perf_counter() - start
        err = (out.double().cpu() - ref_out).abs().max().item()
        gerr = max((g.double().cpu() - r.grad).abs().max().item() for g, r in zip(grads, ref_leaves))
        print(f"  {name:<10} max |out - ref| = {err:.2e}   max |grad - ref| = {gerr:.2e}   ({elapsed:.2f} s)")
    if device == "cpu":
        print("(no GPU: the triton backend ran in Triton's CPU interpreter, so its time says nothing about speed)")
    return 0


def cmd_bench(args):
    import torch

    from flashattn_lite import bench

    causal = {"both": None, "yes": True, "no": False}[args.causal]
    cases = bench.workloads(quick=args.quick, seqlens=args.seqlens, head_dims=args.head_dims, dtypes=args.dtypes,
                            passes=args.passes, causal=causal, batch=args.batch, heads=args.heads,
                            decode_lengths=args.decode_lengths)
    if args.repeats is not None and args.repeats < 1:
        print("--repeats must be at least 1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    repeats = args.repeats or (3 if args.quick else 5)
    try:
        _, status = bench.run_and_report(cases, repeats, args.out, device=args.device, impl_names=args.impls)
    except ValueError as exc:  # e.g. an unknown --impls name
        print(exc, file=sys.stderr)
        return 2
    return status


def cmd_build(args):
    from flashattn_lite import _build

    try:
        path = _build.build_cpu(verbose=args.verbose)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"C++ CPU extension ready: {path}")
    return 0


def cmd_gpu_check(args):
    from flashattn_lite import gpu_check

    return gpu_check.run(args)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="flashattn-lite", description="flashattn_lite command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and backends").set_defaults(func=cmd_info)
    sub.add_parser("check", help="self-test every usable backend against the reference").set_defaults(
        func=cmd_check)
    sub.add_parser("demo", help="run attention once and print its error against the reference").set_defaults(
        func=cmd_demo)
    bench = sub.add_parser("bench", help="microbenchmarks against torch SDPA and naive attention")
    bench.add_argument("--quick", action="store_true", help="a small set that runs in under 2 minutes on 2 cores")
    bench.add_argument("--seqlens", type=int, nargs="+")
    bench.add_argument("--head-dims", type=int, nargs="+")
    bench.add_argument("--dtypes", nargs="+", choices=["float16", "bfloat16", "float32"])
    bench.add_argument("--passes", nargs="+", choices=["fwd", "bwd", "fwd+bwd", "decode"])
    bench.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    bench.add_argument("--batch", type=int)
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--decode-lengths", type=int, nargs="+", help="KV lengths of the decode workload")
    bench.add_argument("--repeats", type=int)
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present, else cpu")
    bench.add_argument("--impls", nargs="+", help="restrict to these (e.g. cpu torch_sdpa naive)")
    bench.add_argument("--out", default="bench_out", help="folder for results.{md,csv,json} and PNG plots")
    bench.set_defaults(func=cmd_bench)
    build = sub.add_parser("build", help="build the C++ CPU extension ahead of time and print where it is")
    build.add_argument("--verbose", action="store_true", help="show the compiler's output")
    build.set_defaults(func=cmd_build)
    from flashattn_lite import gpu_check

    check_gpu = sub.add_parser("gpu-check", help="one-shot GPU check: correctness of every GPU path and timing "
                                                 "against torch's SDPA, under 8 minutes (the plan without a GPU)")
    gpu_check.add_arguments(check_gpu).set_defaults(func=cmd_gpu_check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
