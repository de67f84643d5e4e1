"""Attention microbenchmarks: every usable flashattn_lite backend against
``torch.nn.functional.scaled_dot_product_attention`` and naive
matmul-softmax-matmul, on the default device.

Used by ``flashattn-lite bench`` and the scripts in ``benches/``.

* FLOPs follow flash-attn's convention: 4*B*Sq*Sk*H*D for the forward (halved
  when causal with Sq == Sk), the backward 2.5x the forward, forward+backward 3.5x.
* Timing: CUDA events and the median of repeats on a GPU; on the CPU a warm-up,
  then the median of ``perf_counter`` repeats.  Implementations are interleaved
  inside every repeat, so drift in the machine's speed hits all of them alike.
* Peak memory per case: ``torch.cuda.max_memory_allocated`` on a GPU; on Linux
  CPUs the peak resident set (VmHWM, reset before the call) above the resident set
  before it, with glibc set to return blocks of 64 KiB and more to the OS on free
  (so memory reused from an earlier call still counts).  Per-thread scratch below
  64 KiB and BLAS workspaces kept across calls are not counted.  A case whose
  estimated memory exceeds what is available is reported as "out of memory"
  without running; one that fails for lack of memory anyway is reported the same
  way.
* Before timing, each flashattn_lite backend's output is checked against the
  float64 reference (the first, a middle and the last 64 query rows, with the
  tolerance of ``flashattn_lite.testing``), and for backward passes its gradients
  on a copy of the case shrunk to batch 1 and at most 128 x 128; a backend that
  disagrees is reported as a mismatch instead of a speed.
"""

import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from . import backends, testing
from .backends.reference import attention_math

PASSES = ("fwd", "bwd", "fwd+bwd", "decode")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5, "decode": 1.0}


@dataclass
class Case:
    passes: str
    batch: int
    heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    dtype: str
    causal: bool
    head_dim_v: int = 0  # the value head dim where it differs from head_dim (MLA); 0: head_dim
    sink_window: int = 0  # > 0: gpt-oss-style attention: learnable sinks, causal, a sliding window of this many keys

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def dv(self):
        return self.head_dim_v or self.head_dim

    def window(self):
        """flash-attn's ``window_size`` of a sink case: each query sees itself and the
        ``sink_window - 1`` keys before it (transformers' ``sliding_window``)."""
        return (self.sink_window - 1, 0) if self.sink_window else (-1, -1)

    def flops(self):
        f = 2.0 * self.batch * self.heads * self.seqlen_q * self.seqlen_k * (self.head_dim + self.dv)
        if self.sink_window:  # the (query, key) pairs inside the window, not the full square
            w, sq, sk = self.sink_window, self.seqlen_q, self.seqlen_k
            pairs = sum(min(w, i + 1 + sk - sq) for i in range(sq))
            f *= pairs / (sq * sk)
        elif self.causal and self.seqlen_q == self.seqlen_k:
            f /= 2
        return f * FLOP_FACTOR[self.passes]


@dataclass
class Result:
    case: Case
    impl: str
    status: str  # "ok", "mismatch", "out of memory", "error"
    ms: float = float("nan")
    tflops: float = float("nan")
    peak_mib: float = float("nan")
    detail: str = ""
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- implementations


def naive_attention(q, k, v, causal):
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _backend_impl(name):
    import flashattn_lite as fl

    def run(q, k, v, causal):
        with fl.use_backend(name):
            # flash layout from the BHSD inputs: bottom-right causal, which for
            # decode (Sq = 1) means the query sees the whole cache, as in generation
            out = fl.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)

    return run


def _sdpa(q, k, v, causal):
    if causal and q.shape[-2] != k.shape[-2]:
        # torch aligns causal top-left; build the bottom-right mask the others use
        sq, sk = q.shape[-2], k.shape[-2]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def case_sink(case, device):
    """The learnable sinks of a sink case: one logit per head, ~N(0, 2) (a real share of each row)."""
    gen = torch.Generator().manual_seed(2)
    return (2.0 * torch.randn(case.heads, generator=gen)).to(device)


def eager_sinks_attention(q, k, v, sink, window):
    """transformers' eager formulation of attention with sinks (gpt-oss), BHSD: scores plus the
    additive causal sliding-window mask, the sink logit concatenated as one more column, a
    softmax over the row, the column dropped, times v."""
    sq, sk = q.shape[-2], k.shape[-2]
    rows = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    cols = torch.arange(sk, device=q.device)[None, :]
    visible = (cols <= rows) & (cols > rows - window)
    mask = torch.zeros(sq, sk, dtype=q.dtype, device=q.device).masked_fill(~visible, torch.finfo(q.dtype).min)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + mask
    sinks = sink.to(q.dtype).reshape(1, -1, 1, 1).expand(q.shape[0], -1, sq, 1)
    combined = torch.cat([scores, sinks], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)
    return probs[..., :-1] @ v


def _sink_impls(case, impls, device):
    """The implementations of a sink case: each flashattn_lite backend with the sinks and, as the
    cost baseline, without them (same window), and transformers' eager formulation.  torch's
    SDPA and naive attention have no sinks.  Each function carries ``.sink`` (None: none)."""
    import flashattn_lite as fl

    sink = case_sink(case, device)
    window = case.window()
    out = {}
    for name in impls:
        if not name.startswith("fa_lite:"):
            continue
        for label, s in ((name, sink), (name + " no sink", None)):
            def run(q, k, v, causal, _backend=name.split(":", 1)[1], _s=s):
                with fl.use_backend(_backend):
                    o = fl.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                           window_size=window, learnable_sink=_s)
                return o.transpose(1, 2)
            run.sink = s
            out[label] = run

    def eager(q, k, v, causal):
        return eager_sinks_attention(q, k, v, sink, case.sink_window)
    eager.sink = sink
    out["eager_sinks"] = eager
    return out


def implementations(device, names=None, skipped=None):
    """{name: fn(q, k, v, causal)} for every usable backend on ``device`` plus torch and naive.

    ``names`` restricts the set (a backend may be named with or without its
    ``fa_lite:`` prefix; unknown names raise ValueError).  Backends that cannot run
    here are left out; when ``skipped`` is a list, (name, reason) pairs are appended.
    """
    impls, unusable = {}, []
    call = backends.Call(device=torch.device(device), dtype=torch.float32, head_dim=64)
    for name, mod in backends.BACKENDS.items():
        if name == "triton" and device == "cpu":
            # Triton's CPU interpreter is a verification tool; timing it means nothing
            unusable.append((f"fa_lite:{name}", "no GPU (the CPU interpreter is never timed)"))
            continue
        why = mod.supports(call)
        if why is None:
            impls[f"fa_lite:{name}"] = _backend_impl(name)
        else:
            unusable.append((f"fa_lite:{name}", why.splitlines()[0]))
    impls["torch_sdpa"] = _sdpa
    impls["naive"] = naive_attention
    if names:
        known = set(impls) | {n for n, _ in unusable}
        known |= {n.split(":")[-1] for n in known}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown implementation(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(sorted(known))}")
        impls = {k: v for k, v in impls.items() if k in names or k.split(":")[-1] in names}
        unusable = [(n, why) for n, why in unusable if n in names or n.split(":")[-1] in names]
    if skipped is not None:
        skipped.extend(unusable)
    return impls


# ----------------------------------------------------------------------------- measurement


def _available_bytes(device):
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _estimate_bytes(impl, case):
    """Rough peak of one call: O(N^2) score matrices for naive/reference, O(N) otherwise."""
    elem = torch.finfo(case.torch_dtype).bits // 8
    io = 6 * case.batch * case.heads * max(case.seqlen_q, case.seqlen_k) * max(case.head_dim, case.dv) * 4
    scores = case.batch * case.heads * case.seqlen_q * case.seqlen_k
    if impl in ("naive", "eager_sinks"):
        per = 4 + elem + 4  # fp32 scores, softmax in fp32, cast
        return io + scores * per * (3 if case.passes != "fwd" and case.passes != "decode" else 1)
    if impl == "fa_lite:reference":
        return io + scores * 8 * (4 if case.passes not in ("fwd", "decode") else 2)
    return io


def _glibc_return_large_blocks():
    """Make glibc hand every block of 64 KiB or more straight back to the OS on free.

    By default glibc raises its mmap threshold after large frees and keeps later
    blocks on its heap, so a call that reuses memory freed by an earlier one would
    not show in the resident set.  With a fixed threshold the resident-set peak of a
    call measures what it allocates.  Linux/glibc only; a no-op elsewhere.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 64 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _proc_status("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current resident set
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            hwm = _proc_status("VmHWM")
            self.peak = None if self.base is None or hwm is None else max(hwm - self.base, 0)
        return False


def _proc_status(field_name):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _make_inputs(case, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape_q = (case.batch, case.heads, case.seqlen_q, case.head_dim)
    shape_k = (case.batch, case.heads, case.seqlen_k, case.head_dim)
    shape_v = shape_k[:-1] + (case.dv,)
    grad = case.passes in ("bwd", "fwd+bwd")
    q, k, v = (torch.randn(s, generator=gen, dtype=case.torch_dtype).to(device).requires_grad_(grad)
               for s in (shape_q, shape_k, shape_v))
    dout = torch.randn(shape_q[:-1] + (case.dv,), generator=gen, dtype=case.torch_dtype).to(device)
    return q, k, v, dout


def _runner(fn, case, q, k, v, dout):
    """A zero-argument callable that runs one measured step of ``case``."""
    if case.passes in ("fwd", "decode"):
        def step():
            with torch.no_grad():
                fn(q, k, v, case.causal)
    elif case.passes == "fwd+bwd":
        def step():
            torch.autograd.grad(fn(q, k, v, case.causal), (q, k, v), dout)
    else:  # bwd: the forward graph is built once, outside the timed region
        out = fn(q, k, v, case.causal)

        def step():
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    return step


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(step, device):
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def check_against_reference(fn, case, q, k, v, rows=64):
    """Compare ``fn``'s output with float64 attention on the first and last ``rows`` queries.

    Returns None when it agrees, else a short description of the disagreement.
    """
    with torch.no_grad():
        out = fn(q, k, v, case.causal)
    sq, sk = case.seqlen_q, case.seqlen_k
    offset = sk - sq  # bottom-right alignment, as every implementation here uses
    # the first, a middle and the last ``rows`` queries (every query for short sequences)
    starts = sorted({0, max(0, sq // 2 - rows // 2), max(0, sq - rows)})
    spans = [(lo, min(lo + rows, sq)) for lo in starts]
    for lo, hi in spans:
        sub = [t.detach()[:, :, lo:hi] if i == 0 else t.detach() for i, t in enumerate((q, k, v))]
        q_, k_, v_ = (t.transpose(1, 2).cpu() for t in sub)
        left, right = case.window() if case.sink_window else (-1, 0 if case.causal else -1)
        sink = getattr(fn, "sink", None)
        sink = None if sink is None else sink.cpu()
        ref = attention_math(*(t.double() for t in (q_, k_, v_)), case.head_dim ** -0.5, offset + lo, left, right,
                             sink=None if sink is None else sink.double())[0]
        base = attention_math(q_, k_, v_, case.head_dim ** -0.5, offset + lo, left, right, upcast=False,
                              sink=None if sink is None else sink.to(q_.dtype))[0]
        ours = out[:, :, lo:hi].transpose(1, 2).cpu()
        scale = testing.max_abs(ref)
        cmp = testing.compare("out", ours, ref, base, case.torch_dtype, testing.FWD_FACTOR, scale)
        if not cmp.ok:
            return f"rows {lo}..{hi - 1}: {cmp}"
    return None


def check_gradients(fn, case, device, max_seqlen=128, name=None):
    """Gradients of ``fn`` on a downsized copy of ``case`` (batch 1, lengths capped at
    ``max_seqlen``) against float64 autograd; None when they agree, else a description.
    ``name``: the implementation's name (a sink case's function is rebuilt for the small case)."""
    small = Case(case.passes, 1, case.heads, min(case.seqlen_q, max_seqlen), min(case.seqlen_k, max_seqlen),
                 case.head_dim, case.dtype, case.causal, case.head_dim_v, min(case.sink_window, max_seqlen // 2))
    if small.sink_window:
        fn = _sink_impls(small, {name.removesuffix(" no sink"): None}, device)[name]
    q, k, v, dout = _make_inputs(small, device, seed=1)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    grads = torch.autograd.grad(fn(q, k, v, small.causal), (q, k, v), dout)
    ours = {name: g.transpose(1, 2).cpu() for name, g in zip(("dq", "dk", "dv"), grads)}
    cpu = [t.detach().transpose(1, 2).cpu() for t in (q, k, v)]
    left, right = small.window() if small.sink_window else (-1, 0 if small.causal else -1)
    sink = getattr(fn, "sink", None)
    ref, base = testing.reference_results(*cpu, dout.transpose(1, 2).cpu(), small.head_dim ** -0.5,
                                          small.seqlen_k - small.seqlen_q, left, right,
                                          learnable_sink=None if sink is None else sink.cpu())
    bad = [str(c) for c in testing.check_against_reference(ours, ref, base, small.torch_dtype) if not c.ok]
    return f"gradients on {small.seqlen_q}x{small.seqlen_k}: " + "; ".join(bad) if bad else None


def run_case(case, impls, device, repeats, warmup=1):
    """Measure one case for every implementation; returns a list of Result."""
    results = {}
    available = _available_bytes(device)
    q, k, v, dout = _make_inputs(case, device)
    if case.sink_window:
        impls = _sink_impls(case, impls, device)
    steps = {}
    for name, fn in impls.items():
        need = _estimate_bytes(name, case)
        if available is not None and need > 0.8 * available:
            results[name] = Result(case, name, "out of memory",
                                   detail=f"needs about {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB free")
            continue
        try:
            if name.startswith("fa_lite:"):
                bad = check_against_reference(fn, case, q, k, v)
                if bad is None and case.passes in ("bwd", "fwd+bwd"):
                    bad = check_gradients(fn, case, device, name=name)
                if bad is not None:
                    results[name] = Result(case, name, "mismatch", detail=bad)
                    continue
            step = _runner(fn, case, q, k, v, dout)
            for _ in range(warmup):
                step()
            with _PeakMemory(device) as mem:
                step()
            _sync(device)
            steps[name] = step
            results[name] = Result(case, name, "ok", peak_mib=float("nan") if mem.peak is None
                                   else mem.peak / 2**20)
        except Exception as exc:  # one implementation failing must not end the run
            text = str(exc) or type(exc).__name__
            oom = isinstance(exc, MemoryError) or "out of memory" in text.lower() or "can't allocate" in text
            results[name] = Result(case, name, "out of memory" if oom else "error", detail=text.splitlines()[0][:200])
            if device == "cuda":
                torch.cuda.empty_cache()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(_time_once(step, device))
    for name, ts in times.items():
        med = statistics.median(ts)
        results[name].ms = med * 1e3
        results[name].tflops = case.flops() / med / 1e12
    return [results[name] for name in impls]


# ----------------------------------------------------------------------------- workloads


def workloads(quick=False, seqlens=None, head_dims=None, dtypes=None, passes=None, causal=None, batch=None,
              heads=8, decode_lengths=None):
    """The list of cases; ``quick`` finishes in well under 2 minutes on 2 CPU cores.  Without
    ``head_dims``, the :func:`modern_workloads` follow."""
    explicit_dims = head_dims
    if quick:
        seqlens = seqlens or [256, 512, 1024]
        head_dims = head_dims or [64]
        dtypes = dtypes or ["float32", "bfloat16"]
        passes = passes or ["fwd", "fwd+bwd", "decode"]
        decode_lengths = decode_lengths or [1024, 4096]
    else:
        seqlens = seqlens or [512, 1024, 2048, 4096]
        head_dims = head_dims or [64, 128]
        dtypes = dtypes or ["float32", "bfloat16"]
        passes = passes or ["fwd", "bwd", "fwd+bwd", "decode"]
        decode_lengths = decode_lengths or [1024, 4096, 16384]
    causal_opts = [False, True] if causal is None else [causal]
    cases = []
    for p in passes:
        for dtype in dtypes:
            for d in head_dims:
                for c in causal_opts:
                    if p == "decode":
                        if c != causal_opts[0]:
                            continue
                        # one query aligned bottom-right sees the whole cache, causal or not:
                        # one case, without a mask (which would push torch off its fast kernels)
                        for n in decode_lengths:
                            cases.append(Case(p, batch or 4, heads, 1, n, d, dtype, False))
                    else:
                        for s in seqlens:
                            cases.append(Case(p, batch or 1, heads, s, s, d, dtype, c))
    if explicit_dims is None:
        cases += modern_workloads(quick, passes, dtypes, batch, heads)
    return cases


def modern_workloads(quick=False, passes=("fwd", "fwd+bwd"), dtypes=("float32", "bfloat16"), batch=None, heads=8,
                     seqlens=None):
    """The modern shapes, causal: MLA prefill (DeepSeek's query/key head dim 192, value head
    dim 128) against torch SDPA on the same problem, and gpt-oss-style attention (head dim
    64, learnable sinks, a 128-key sliding window) against transformers' eager formulation
    and against the same call without sinks."""
    seqlens = seqlens or ([1024] if quick else [1024, 4096])
    cases = []
    for p in passes:
        if p not in ("fwd", "fwd+bwd"):
            continue
        for dtype in dtypes:
            for s in seqlens:
                cases.append(Case(p, batch or 1, heads, s, s, 192, dtype, True, head_dim_v=128))
                cases.append(Case(p, batch or 1, heads, s, s, 64, dtype, True, sink_window=128))
    return cases


# ----------------------------------------------------------------------------- output


def _progress(i, total, label, stream=sys.stderr):
    """A one-line progress bar on a terminal; one line per step otherwise (logs, CI)."""
    width = 30
    done = int(width * i / total) if total else width
    bar = f"[{'#' * done}{'.' * (width - done)}] {i}/{total} {label[:60]}"
    if stream.isatty():
        stream.write(f"\r{bar:<100}" + ("\n" if i == total else ""))
    else:
        stream.write(bar + "\n")
    stream.flush()


def _cell(r):
    if r.status == "ok":
        return f"{r.tflops * 1e3:.1f}"
    return r.status


def format_table(results):
    impls = list(dict.fromkeys(r.impl for r in results))
    rows = {}
    for r in results:
        rows.setdefault(tuple(asdict(r.case).values()), {})[r.impl] = r
    head = ["pass", "B", "H", "Sq", "Sk", "D", "dtype", "causal", "Dv", "sinks+window"] + \
        [f"{i} GFLOP/s" for i in impls]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_impl in rows.items():
        cells = [str(x) for x in key] + [_cell(by_impl[i]) if i in by_impl else "" for i in impls]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(results, out_dir, meta):
    os.makedirs(out_dir, exist_ok=True)
    def num(x):
        return None if x != x else x  # NaN (not measured) -> null: strict JSON has no NaN

    records = [dict(asdict(r.case), impl=r.impl, status=r.status, ms=num(r.ms), gflops=num(r.tflops * 1e3),
                    peak_mib=num(r.peak_mib), flops=r.case.flops(), detail=r.detail) for r in results]
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": records}, f, indent=1, default=str, allow_nan=False)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else ["impl"])
        writer.writeheader()
        writer.writerows(records)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(format_table(results) + "\n")
    return plot(results, out_dir, meta)


def plot(results, out_dir, meta):
    """PNG plots: throughput and peak memory against sequence length, one panel per
    (pass, dtype, head dim, causal) group of non-decode cases.  Needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = {}
    for r in results:
        if r.case.passes == "decode":
            continue
        key = (r.case.passes, r.case.dtype, r.case.head_dim, r.case.causal, r.case.dv, r.case.sink_window)
        groups.setdefault(key, []).append(r)
    written = []
    for stale in ("throughput.png", "memory.png"):  # never leave plots of an earlier run beside these results
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    for metric, label, fname in (("tflops", "GFLOP/s", "throughput.png"), ("peak_mib", "peak MiB", "memory.png")):
        if not groups:
            break
        n = len(groups)
        cols = min(4, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        for ax, (key, rs) in zip(axes.flat, sorted(groups.items(), key=lambda kv: str(kv[0]))):
            for impl in dict.fromkeys(r.impl for r in rs):
                pts = sorted((r.case.seqlen_q, getattr(r, metric) * (1e3 if metric == "tflops" else 1))
                             for r in rs if r.impl == impl and r.status == "ok")
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            shape = f"d={key[2]}" + (f"/{key[4]}" if key[4] != key[2] else "") + (f" sinks w={key[5]}" if key[5] else "")
            ax.set_title(f"{key[0]} {key[1]} {shape}{' causal' if key[3] else ''}", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_ylabel(label)
            if metric == "peak_mib":
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"flashattn_lite bench on {meta.get('device', '?')}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device):
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU ({torch.get_num_threads()} threads)"


def busy_warning():
    """A warning when the machine is busier than it has cores (the one-minute load average
    above ``os.cpu_count()``), else None.  Another job running beside a benchmark on a
    2-core machine once moved every timing 3-5x and changed the ranking."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform (Windows)
        return None
    cores = os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"warning: the machine is busy (load average {load:.2f} over the last minute, {cores} cores): other "
            "jobs compete for the cores, so these timings will be noisy (another job on a 2-core machine once "
            "moved every timing 3-5x and changed the ranking); rerun on an idle machine to compare speeds")


def run(cases, device=None, repeats=5, impl_names=None, out_dir="bench_out", progress=True):
    """Run ``cases``; write table, CSV, JSON and PNGs into ``out_dir``; return (results, files).
    Warns on stderr first when the machine is busy (:func:`busy_warning`)."""
    busy = busy_warning()
    if busy:
        print(busy, file=sys.stderr)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        _glibc_return_large_blocks()
    skipped = []
    impls = implementations(device, impl_names, skipped)
    for name, why in skipped:
        print(f"not benchmarked: {name}: {why}", file=sys.stderr)
    results = []
    for i, case in enumerate(cases):
        if progress:
            _progress(i, len(cases), f"{case.passes} S={case.seqlen_q}/{case.seqlen_k} {case.dtype} "
                                     f"d={case.head_dim}{' causal' if case.causal else ''}")
        results.extend(run_case(case, impls, device, repeats))
    if progress:
        _progress(len(cases), len(cases), "done")
    meta = {"device": device_description(device), "torch": torch.__version__, "repeats": repeats,
            "implementations": list(impls), "not_benchmarked": dict(skipped)}
    files = write_outputs(results, out_dir, meta)
    return results, [os.path.join(out_dir, f) for f in ("results.md", "results.csv", "results.json")] + files


def run_and_report(cases, repeats, out_dir, device=None, impl_names=None):
    """Run, print the table and any mismatches, list the files; exit status 1 on a mismatch."""
    results, files = run(cases, device=device, repeats=repeats, impl_names=impl_names, out_dir=out_dir)
    print(format_table(results))
    bad = [r for r in results if r.status in ("mismatch", "error")]
    for r in bad:
        print(f"{r.status.upper()} {r.impl} {r.case}: {r.detail}")
    print("\nwritten: " + ", ".join(files))
    return results, 1 if bad else 0
