"""One decoding step through ``flash_attn_varlen_func`` on the CPU: one query row per
sequence against packed keys (causal; sequence b has ``keys - (37 b mod 200)`` keys),
median ms of 60 calls after 3 warm-up calls.

    python benches/bench_varlen_decode.py

To time another checkout of the package the same way, put it first on the path:
``PYTHONPATH=/path/to/checkout python benches/bench_varlen_decode.py``.
"""

import statistics
import time

import torch

import flashattn_lite as fl

CASES = [(4, 8, 8, 1024, torch.bfloat16), (8, 16, 16, 512, torch.bfloat16), (4, 32, 8, 2048, torch.bfloat16),
         (4, 32, 8, 2048, torch.float32), (4, 16, 8, 1024, torch.float32), (4, 8, 8, 1024, torch.float32),
         (2, 8, 8, 4096, torch.float32), (8, 16, 16, 512, torch.float32)]


def median_ms(fn, reps=60):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    torch.manual_seed(0)
    print(f"# {fl.__file__}, {torch.get_num_threads()} threads")
    print("| batch x heads x kv x d | dtype | keys | ms |\n|---|---|---|---|")
    for batch, heads, heads_k, keys, dtype in CASES:
        lens = [keys - (b * 37) % 200 for b in range(batch)]
        q = torch.randn(batch, heads, 64, dtype=dtype)
        k, v = (torch.randn(sum(lens), heads_k, 64, dtype=dtype) for _ in range(2))
        cu_k = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu_q = torch.arange(batch + 1, dtype=torch.int32)
        with torch.no_grad(), fl.use_backend("cpu"):
            ms = median_ms(lambda q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, longest=max(lens):
                           fl.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, longest, causal=True))
        print(f"| {batch}x{heads}x{heads_k}x64 | {str(dtype)[6:]} | {keys} | {ms:.3f} |", flush=True)


if __name__ == "__main__":
    main()
