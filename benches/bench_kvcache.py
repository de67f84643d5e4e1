"""KV-cache decoding: flash_attn_with_kvcache (contiguous and paged caches, split-KV)
against torch's scaled_dot_product_attention on the same cache, one new token per step.

    python benches/bench_kvcache.py [--device cpu|cuda] [--lengths 1024 8192] [--repeats 7]

Each row: batch, heads/kv heads, head dim, dtype, cache length; the median time of
``flash_attn_with_kvcache`` (append one token + attend) with a contiguous cache, with a
paged cache (page size 256 on CUDA, as vLLM; 16 shows the cost of small pages), and of
SDPA attending to the same cache (no append; kv heads repeated for GQA first, outside
the timing).  Runs are interleaved; every output is checked against the float64
reference before timing.
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--shapes", nargs="+", default=["4x32x8x128", "1x32x8x128", "16x8x8x64"],
                   help="batch x heads x kv_heads x head_dim")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["float16", "bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
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
