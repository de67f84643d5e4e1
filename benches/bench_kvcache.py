"""KV-cache decoding: flash_attn_with_kvcache (contiguous and paged caches, split-KV)
against torch's scaled_dot_product_attention on the same cache, one new token per step.

    python benches/bench_kvcache.py [--device cpu|cuda] [--lengths 1024 8192] [--repeats 7]
    python benches/bench_kvcache.py --quant [--quant-shape 4x32x8x128] [--quant-lengths 32768] [--json F]

Each row: batch, heads/kv heads, head dim, dtype, cache length; the median time of
``flash_attn_with_kvcache`` (append one token + attend) with a contiguous cache, with a
paged cache (page size 256 on CUDA, as vLLM; 16 shows the cost of small pages), and of
SDPA attending to the same cache (no append; kv heads repeated for GQA first, outside
the timing).  Runs are interleaved; every output is checked against the float64
reference before timing.

``--quant``: int8 and fp8 (e4m3) caches, quantized from a bf16 cache with
``quantize_kv``, against that bf16 cache: time, speedup, GB/s of cache read (codes and
descales), beside a plain copy's bandwidth measured in the same run; then the output
error against the float32 cache for random keys and for keys with outlier channels.
"""

import argparse
import statistics
import sys
import time

import torch

import flashattn_lite as fl
from flashattn_lite.backends.reference import attention_math


def _timer(device):
    def run(fn):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return run


def case(device, backend, batch, heads, heads_k, head_dim, dtype, length, page_sizes, repeats):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 1, heads, head_dim, generator=gen, dtype=dtype).to(device)
    k_new = torch.randn(batch, 1, heads_k, head_dim, generator=gen, dtype=dtype).to(device)
    v_new = torch.randn(batch, 1, heads_k, head_dim, generator=gen, dtype=dtype).to(device)
    k_cache = torch.randn(batch, length + 1, heads_k, head_dim, generator=gen, dtype=dtype).to(device)
    v_cache = torch.randn(batch, length + 1, heads_k, head_dim, generator=gen, dtype=dtype).to(device)
    # every step appends the same token at position ``length``: put it there from the start,
    # so the cache is the same before and after each timed call
    k_cache[:, length:length + 1] = k_new
    v_cache[:, length:length + 1] = v_new
    seqlens = torch.full((batch,), length, dtype=torch.int32, device=device)
    impls = {"contiguous": (k_cache, v_cache, None)}
    for page in page_sizes:
        pages = -(-(length + 1) // page)
        kp = torch.zeros(batch * pages, page, heads_k, head_dim, dtype=dtype, device=device)
        vp = torch.zeros_like(kp)
        table = torch.randperm(batch * pages, generator=gen).to(torch.int32).reshape(batch, pages).to(device)
        pos = torch.arange(length + 1, device=device)
        blocks = table.long()[:, pos // page]
        kp[blocks, pos % page] = k_cache
        vp[blocks, pos % page] = v_cache
        impls[f"paged {page}"] = (kp, vp, table)

    def flash(kc, vc, table):
        with fl.use_backend(backend), torch.no_grad():
            return fl.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens, block_table=table)

    group = heads // heads_k
    ks = k_cache.repeat_interleave(group, dim=2).transpose(1, 2)
    vs = v_cache.repeat_interleave(group, dim=2).transpose(1, 2)

    def sdpa():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), ks, vs)

    fns = {name: (lambda a=args: flash(*a)) for name, args in impls.items()}
    fns["torch sdpa"] = sdpa
    # correctness first
    ref = attention_math(q.double().cpu(), k_cache.double().cpu()[:, :length + 1],
                         v_cache.double().cpu()[:, :length + 1], head_dim ** -0.5)[0]
    for name, fn in fns.items():
        out = fn()
        out = out.transpose(1, 2) if name == "torch sdpa" else out
        err = (out.double().cpu() - ref).abs().max().item()
        if not err < (0.05 if dtype != torch.float32 else 1e-3):
            raise SystemExit(f"{name}: max error {err:.3g} against the float64 reference")
    timer = _timer(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def quant_case(device, backend, batch, heads, heads_k, head_dim, length, repeats):
    """8-bit caches against the bf16 cache they were quantized from: one new token appended
    and attended to, bf16 queries, contiguous caches; the three interleaved.  Returns
    {name: ms}, the bytes each reads per call, and the max error against the bf16 cache's
    float64 attention."""
    gen = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    q = torch.randn(batch, 1, heads, head_dim, generator=gen, dtype=dt).to(device)
    k_new = torch.randn(batch, 1, heads_k, head_dim, generator=gen, dtype=dt).to(device)
    v_new = torch.randn(batch, 1, heads_k, head_dim, generator=gen, dtype=dt).to(device)
    k_cache = torch.randn(batch, length + 1, heads_k, head_dim, generator=gen, dtype=dt).to(device)
    v_cache = torch.randn(batch, length + 1, heads_k, head_dim, generator=gen, dtype=dt).to(device)
    k_cache[:, length:] = k_new
    v_cache[:, length:] = v_new
    seqlens = torch.full((batch,), length, dtype=torch.int32, device=device)
    caches = {"bf16 cache": (k_cache, v_cache, None, None)}
    for name, qd in (("int8 cache", torch.int8), ("fp8 e4m3 cache", torch.float8_e4m3fn)):
        kc, kd = fl.quantize_kv(k_cache, qd)
        vc, vd = fl.quantize_kv(v_cache, qd)
        caches[name] = (kc, vc, kd, vd)

    def run(kc, vc, kd, vd):
        with fl.use_backend(backend), torch.no_grad():
            return fl.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens, k_descale=kd,
                                              v_descale=vd)

    fns = {name: (lambda a=args: run(*a)) for name, args in caches.items()}
    nbytes = {name: sum(t.numel() * t.element_size() for t in args if t is not None) for name, args in caches.items()}
    ref = None
    errors = {}
    for name, fn in fns.items():
        out = fn().double().cpu()
        if ref is None:
            ref = out
        errors[name] = (out - ref).abs().max().item()
    timer = _timer(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: statistics.median(t) for name, t in times.items()}, nbytes, errors


def copy_bandwidth(device, nbytes=512 * 2**20, repeats=5):
    """GB/s of a plain copy (bytes read + bytes written) of ``nbytes`` on this machine."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timer = _timer(device)
    best = min(timer(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * nbytes / (best / 1e3) / 1e9


def quant_accuracy(batch=1, heads=32, heads_k=8, head_dim=128, length=4096):
    """Max |out - out of the float32 cache| / max |out|, for random keys and for keys with
    outlier channels (4 of 128 channels 20x larger, as reported for LLM keys), each 8-bit
    dtype, the cpu backend."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, 1, heads, head_dim, generator=gen)
    rows = {}
    for kind in ("random keys", "outlier channels"):
        k = torch.randn(batch, length, heads_k, head_dim, generator=gen)
        if kind == "outlier channels":
            k[..., torch.randperm(head_dim, generator=gen)[:4]] *= 20
        v = torch.randn(batch, length, heads_k, head_dim, generator=gen)
        with torch.no_grad():
            want = fl.flash_attn_with_kvcache(q, k, v)
            for name, qd in (("int8", torch.int8), ("fp8 e4m3", torch.float8_e4m3fn)):
                kc, kd = fl.quantize_kv(k, qd)
                vc, vd = fl.quantize_kv(v, qd)
                got = fl.flash_attn_with_kvcache(q, kc, vc, k_descale=kd, v_descale=vd)
                rows[(kind, name)] = ((got - want).abs().max() / want.abs().max()).item()
    return rows


def main_quant(a):
    backend = "triton" if a.device == "cuda" else "cpu"
    batch, heads, heads_k, d = (int(x) for x in a.quant_shape.split("x"))
    print(f"quantized caches: flash_attn_with_kvcache on the {backend!r} backend, {a.device}, bf16 queries, "
          f"{batch} x {heads} heads / {heads_k} kv heads x d{d}, one new token appended; median ms of {a.repeats} "
          "interleaved runs")
    bw = copy_bandwidth(a.device)
    print(f"plain copy on this machine: {bw:.1f} GB/s (bytes read + written)")
    head = ["cache positions", "cache", "ms", "speedup vs bf16", "GB/s read", "max abs error vs bf16 cache"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    results = []
    for n in a.quant_lengths:
        times, nbytes, errors = quant_case(a.device, backend, batch, heads, heads_k, d, n, a.repeats)
        base = times["bf16 cache"]
        for name, ms in times.items():
            gbs = nbytes[name] / (ms / 1e3) / 1e9
            results.append(dict(length=n, cache=name, ms=ms, speedup=base / ms, gbs=gbs, error=errors[name]))
            print(f"| {n} | {name} | {ms:.2f} | {base / ms:.2f}x | {gbs:.1f} | {errors[name]:.3g} |", flush=True)
    acc = quant_accuracy()
    print("\naccuracy, cpu backend, 1 x 32 heads / 8 kv heads x d128, 4096 positions, float32 queries: max |out - "
          "out with the float32 cache| / max |out|")
    print("| keys | int8 | fp8 e4m3 |")
    print("|---|---|---|")
    for kind in ("random keys", "outlier channels"):
        print(f"| {kind} | {acc[(kind, 'int8')]:.2e} | {acc[(kind, 'fp8 e4m3')]:.2e} |")
    if a.json:
        import json
        with open(a.json, "w") as f:
            json.dump({"copy_gbs": bw, "rows": results, "accuracy": {f"{k[0]}, {k[1]}": v for k, v in acc.items()}},
                      f, indent=1)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--shapes", nargs="+", default=["4x32x8x128", "1x32x8x128", "16x8x8x64"],
                   help="batch x heads x kv_heads x head_dim")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["float16", "bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quant", action="store_true", help="8-bit caches (int8, fp8 e4m3) against the bf16 cache")
    p.add_argument("--quant-shape", default="4x32x8x128", help="batch x heads x kv_heads x head_dim (--quant)")
    p.add_argument("--quant-lengths", type=int, nargs="+", default=[32768], help="cache positions (--quant)")
    p.add_argument("--json", help="--quant: write the results here")
    a = p.parse_args(argv)
    if a.quant:
        return main_quant(a)
    backend = "triton" if a.device == "cuda" else "cpu"
    pages = [256, 16]
    print(f"flash_attn_with_kvcache on the {backend!r} backend, {a.device}; median ms of {a.repeats} interleaved runs")
    head = ["batch x heads x kv x d", "dtype", "cache", "contiguous"] + [f"paged {pg}" for pg in pages] + ["torch sdpa"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for shape in a.shapes:
        batch, heads, heads_k, d = (int(x) for x in shape.split("x"))
        for dtype in a.dtypes:
            for n in a.lengths:
                r = case(a.device, backend, batch, heads, heads_k, d, getattr(torch, dtype), n, pages, a.repeats)
                cells = [shape, dtype, str(n)] + [f"{r[k]:.3f}" for k in head[3:]]
                print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
