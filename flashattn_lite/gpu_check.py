"""One-shot GPU check: the environment, correctness on CUDA tensors against float64
attention, and timing against torch's own SDPA kernels, in one run bounded in time.

    python benches/gpu_check.py [--out gpu_check_out] [--full] [--budget 440] [--dry-run]
    flashattn-lite gpu-check    (the same options)

Stages, in the order they report (:func:`plan` builds the cases, ``--dry-run`` lists them):

* ``env``: GPU, driver, CUDA, compute capability, torch, Triton, Python, cuDNN, nvcc, ninja.
* ``build``: the C++ extensions (CPU, then CUDA) built just in time, in a child process
  that starts first and runs while the Triton stages use the GPU.
* ``triton``: the Triton backend forward + backward at small shapes, one feature or
  awkward shape per case (tails that are not multiples of 16, GQA/MQA, rows that see no
  key, windows, softcap, ALiBi, dropout with its exact mask and bitwise repeatability,
  varlen, MLA 192/128, learnable sinks, fp32, head dims 40 to 256).
* ``triton-large``: Sq = Sk = 4096, head dims 64/128/256, fp16/bf16, causal or not,
  forward + backward against float64 attention computed on the GPU.  These are the
  kernel specialisations the timing stage launches, so it finds them compiled.
* ``kvcache``: ``flash_attn_with_kvcache`` on Triton: paged caches with appends,
  windows, softcap + ALiBi, split-KV, absorbed MLA 576/512, the decode timing's shape.
* ``compile``: ``torch.compile(fullgraph=True)`` around ``flash_attn_func``, forward and
  backward, and with ``dynamic=True`` over two sequence lengths.
* ``cuda``: the CUDA C++ backend (fp16/bf16, D == Dv <= 256) forward + backward at small
  shapes, once the build is done.
* ``bench``: prefill timing in the FlashAttention paper's setting (16k tokens per batch,
  hidden 2048: batch = 16384 // seqlen, heads = 2048 // d), forward and forward +
  backward, fp16/bf16, causal or not, head dims 64/128/256: ``triton`` and ``cuda``
  against ``torch.nn.functional.scaled_dot_product_attention`` restricted to its FLASH
  and CUDNN backends (a backend that raises is recorded as unavailable).
* ``decode``: one query token per sequence, batch 64, 8k cached tokens, GQA 32/8, d 128:
  our Triton decoding (contiguous and paged cache) against SDPA (``enable_gqa``, or the
  KV heads repeated where a backend refuses it).

Correctness uses :mod:`flashattn_lite.testing` (flash-attn's tolerance: twice the error
of the same math in the same dtype, three times for gradients).  Timing uses CUDA events;
every repeat runs every implementation once (interleaved) and the medians are reported as
TFLOP/s with flash-attn's convention (:func:`attention_flops`) and as the ratio to the
best SDPA backend of the same case.  ``--out`` receives ``results.json`` (strict JSON:
null, never NaN) and ``results.md``.

How it runs.  A kernel fault (an illegal address) leaves a CUDA context unusable for
everything after it, and a kernel may also hang; so the cases run in worker processes
that this process watches.  A case that crashes or outlives its time is recorded as such
and a fresh worker carries on with the next one.  Correctness cases are spread over a few
workers at once (compiling Triton kernels is CPU work); the timing stages run in one
worker alone on the GPU.  Every stage has a deadline inside ``--budget`` seconds (default
440, so the whole run stays under 8 minutes); cases that would start after it are
reported as skipped.

Without a CUDA device nothing runs: the plan is printed and nothing is written.
"""

import argparse
import collections
import json
import math
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # a source checkout's root

STAGES = ("env", "build", "triton", "triton-large", "kvcache", "compile", "cuda", "bench", "decode")
STAGE_INFO = {
    "env": "GPU, driver, CUDA, compute capability, torch, Triton, Python",
    "build": "C++ extensions (CPU, then CUDA) built just in time in a child process",
    "triton": "triton backend fwd+bwd, small shapes and every feature, vs float64 attention",
    "triton-large": "triton backend fwd+bwd, Sq = Sk = 4096, d 64/128/256, fp16/bf16, vs float64 on the GPU",
    "kvcache": "flash_attn_with_kvcache on triton: paged caches, appends, splits, GQA, MLA",
    "compile": "torch.compile(fullgraph=True) around flash_attn_func, fwd+bwd and dynamic shapes",
    "cuda": "CUDA C++ backend fwd+bwd, small shapes (fp16/bf16, D == Dv <= 256)",
    "bench": "prefill timing vs SDPA (FLASH, CUDNN): 16k tokens/batch, hidden 2048, fwd and fwd+bwd",
    "decode": "decoding timing vs SDPA: batch 64, 8k cached tokens, GQA 32/8, d 128, one query",
}
CORRECTNESS_STAGES = ("triton", "triton-large", "kvcache", "compile", "cuda")

# FlashAttention-2 paper's benchmark: 16k tokens per batch, hidden dimension 2048.
PAPER_TOKENS = 16384
PAPER_HIDDEN = 2048
HEAD_DIMS = (64, 128, 256)
# in order of priority: a budget that runs short drops the last ones
DEFAULT_SEQLENS = (4096, 16384, 1024)
FULL_SEQLENS = (4096, 16384, 1024, 8192, 2048, 512)
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION"}
PREFILL_SDPA = ("sdpa_flash", "sdpa_cudnn")
DECODE_SDPA = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")

DEFAULT_BUDGET_S = 440.0
DEFAULT_REPEATS = 10
PYTEST_COMMAND = "python -m pytest -q tests"


# ----------------------------------------------------------------------------- FLOPs


def attention_flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal=False, passes="fwd", head_dim_v=None):
    """Floating-point operations of attention, flash-attn's convention.

    Forward: two matrix products, ``2 * B * H * Sq * Sk * (D + Dv)``, which is
    ``4 * B * Sq * Sk * H * D`` when ``Dv == D``; halved when causal with Sq == Sk (the
    paper's count).  Causal with Sq != Sk (bottom-right aligned) counts the visible
    (query, key) pairs, so decoding (Sq = 1) counts every cached key.  ``passes``:
    "fwd", "bwd" (2.5x the forward) or "fwd+bwd" (3.5x).
    """
    dv = head_dim_v or head_dim
    flops = 2.0 * batch * heads * seqlen_q * seqlen_k * (head_dim + dv)
    if causal and seqlen_q * seqlen_k:
        if seqlen_q == seqlen_k:
            flops /= 2
        else:
            flops *= causal_pairs(seqlen_q, seqlen_k) / (seqlen_q * seqlen_k)
    return flops * FLOP_FACTOR[passes]


def causal_pairs(seqlen_q, seqlen_k):
    """(query, key) pairs visible under bottom-right causal masking: query i sees keys
    ``j <= i + Sk - Sq``, i.e. ``sum_i clamp(i + 1 + Sk - Sq, 0, Sk)``."""
    if seqlen_q <= seqlen_k:
        return seqlen_q * seqlen_k - seqlen_q * (seqlen_q - 1) // 2
    return seqlen_k * (seqlen_k + 1) // 2


# ----------------------------------------------------------------------------- the plan


def _case(stage, name, **params):
    return {"stage": stage, "name": f"{stage}: {name}", "params": params}


def _dense(stage, name, dtype, batch, sq, sk, hq, hk, d, backend="triton", **kw):
    return _case(stage, name, kind="dense", backend=backend, dtype=dtype, batch=batch, sq=sq, sk=sk, hq=hq, hk=hk,
                 d=d, **kw)


def triton_cases():
    """Small shapes, one feature or awkward shape each, forward and backward."""
    t = "triton"
    return [
        _dense(t, "fp16 d64 128x128 MHA", "float16", 2, 128, 128, 4, 4, 64),
        _dense(t, "fp16 d64 113x203 GQA 8/2 causal", "float16", 2, 113, 203, 8, 2, 64, causal=True),
        _dense(t, "bf16 d128 256x256 causal", "bfloat16", 1, 256, 256, 4, 4, 128, causal=True),
        _dense(t, "bf16 d128 77x77 MQA 4/1", "bfloat16", 2, 77, 77, 4, 1, 128),
        _dense(t, "fp16 d96 200x64 causal (rows that see no key)", "float16", 1, 200, 64, 2, 2, 96, causal=True),
        _dense(t, "fp16 d40 90x150", "float16", 1, 90, 150, 2, 1, 40),
        _dense(t, "fp16 d256 130x130 causal", "float16", 1, 130, 130, 2, 2, 256, causal=True),
        _dense(t, "fp32 d64 100x100 causal", "float32", 1, 100, 100, 2, 2, 64, causal=True),
        _dense(t, "fp16 d128 1x333 causal GQA 8/2 (one query row)", "float16", 3, 1, 333, 8, 2, 128, causal=True),
        _dense(t, "fp16 d64 300x300 window (32, 8)", "float16", 1, 300, 300, 4, 2, 64, window=[32, 8]),
        _dense(t, "bf16 d128 190x190 causal softcap 30", "bfloat16", 1, 190, 190, 2, 2, 128, causal=True,
               softcap=30.0),
        _dense(t, "fp16 d64 150x270 ALiBi", "float16", 2, 150, 270, 4, 2, 64, alibi=True),
        _dense(t, "bf16 d64 200x200 learnable sink, causal window (63, 0)", "bfloat16", 1, 200, 200, 4, 2, 64,
               causal=True, window=[63, 0], sink=True),
        _dense(t, "bf16 MLA d192/dv128 257x257 causal", "bfloat16", 1, 257, 257, 4, 4, 192, dv=128, causal=True),
        _case(t, "fp16 d64 160x160 dropout 0.17 (exact mask, repeatable bits)", kind="dropout", backend="triton",
              dtype="float16", batch=2, sq=160, sk=160, hq=4, hk=4, d=64, dropout_p=0.17, causal=False),
        _case(t, "fp16 d64 varlen causal GQA 4/2 (an empty sequence, Sq > Sk and Sq < Sk)", kind="varlen",
              backend="triton", dtype="float16", lengths_q=[37, 0, 129, 64], lengths_k=[50, 10, 129, 31], hq=4,
              hk=2, d=64, causal=True),
    ]


def triton_large_cases():
    """Realistic shapes: the bench's kernel specialisations (MHA, tails a multiple of 128)."""
    return [_dense("triton-large", f"{_short(dtype)} d{d} 4096x4096{' causal' if causal else ''}", dtype, 2, 4096,
                   4096, 2, 2, d, causal=causal)
            for d in HEAD_DIMS for dtype in ("float16", "bfloat16") for causal in (False, True)]


def cuda_cases():
    """The CUDA C++ kernels: instantiated head dims 32/64/96/128/256 and a padded one (80)."""
    c = "cuda"
    return [
        _dense(c, "fp16 d64 128x128 MHA", "float16", 2, 128, 128, 4, 4, 64, backend="cuda"),
        _dense(c, "bf16 d128 113x203 GQA 8/2 causal", "bfloat16", 2, 113, 203, 8, 2, 128, causal=True,
               backend="cuda"),
        _dense(c, "fp16 d256 130x130 causal", "float16", 1, 130, 130, 2, 2, 256, causal=True, backend="cuda"),
        _dense(c, "bf16 d32 200x64 causal (rows that see no key)", "bfloat16", 1, 200, 64, 2, 2, 32, causal=True,
               backend="cuda"),
        _dense(c, "fp16 d96 150x150 window (16, 4)", "float16", 1, 150, 150, 4, 2, 96, window=[16, 4],
               backend="cuda"),
        _dense(c, "fp16 d80 90x150 MQA 4/1", "float16", 1, 90, 150, 4, 1, 80, backend="cuda"),
        _dense(c, "bf16 d128 1024x1024 causal", "bfloat16", 2, 1024, 1024, 4, 4, 128, causal=True, backend="cuda"),
    ]


def kvcache_cases():
    k = "kvcache"
    return [
        _case(k, "fp16 d128 paged(16) GQA 8/2, append 1, causal, lengths 0/17/300", kind="kvcache",
              dtype="float16", batch=3, sq=1, hq=8, hk=2, d=128, seqlens=[0, 17, 300], snew=1, page_size=16,
              capacity=320, causal=True),
        _case(k, "bf16 d64 paged(256) GQA 8/1, append 4, causal window (64, 0)", kind="kvcache", dtype="bfloat16",
              batch=4, sq=4, hq=8, hk=1, d=64, seqlens=[1000, 2047, 5, 513], snew=4, page_size=256,
              capacity=2304, causal=True, window=[64, 0]),
        _case(k, "fp16 d128 contiguous cache, 1 query, softcap 20 + ALiBi, 3 splits", kind="kvcache",
              dtype="float16", batch=2, sq=1, hq=4, hk=4, d=128, seqlens=[2000, 1500], snew=0, page_size=None,
              capacity=2048, softcap=20.0, alibi=True, num_splits=3),
        _case(k, "bf16 absorbed MLA d576/dv512 paged(64) 16/1, 1 query", kind="kvcache", dtype="bfloat16",
              batch=2, sq=1, hq=16, hk=1, d=576, dv=512, seqlens=[700, 64], snew=0, page_size=64, capacity=704),
        _case(k, "bf16 d128 paged(256) GQA 32/8, 1 query, 8192 cached (the decode timing's kernels)",
              kind="kvcache", dtype="bfloat16", batch=4, sq=1, hq=32, hk=8, d=128, seqlens=[8192] * 4, snew=0,
              page_size=256, capacity=8192),
    ]


def compile_cases():
    return [
        _case("compile", "fp32 fwd+bwd, fullgraph, causal GQA 4/2 (compiled vs eager)", kind="fwd_bwd",
              dtype="float32", batch=1, seqlen=256, hq=4, hk=2, d=64),
        _case("compile", "bf16 fwd, fullgraph, dynamic=True, seqlens 128 then 200 (bitwise vs eager)",
              kind="dynamic", dtype="bfloat16", batch=2, seqlens=[128, 200], hq=4, hk=4, d=64),
    ]


def bench_grid(seqlens=DEFAULT_SEQLENS, head_dims=HEAD_DIMS, dtypes=("float16", "bfloat16"), causals=(False, True),
               passes=("fwd", "fwd+bwd")):
    """Prefill timing cases, the FlashAttention-2 paper's setting: 16k tokens per batch
    (batch = 16384 // seqlen) and hidden 2048 (heads = 2048 // head_dim), in the order given
    (``seqlens`` first: the priority order when the budget runs short)."""
    cases = []
    for seqlen in seqlens:
        batch = max(1, PAPER_TOKENS // seqlen)
        for dtype in dtypes:
            for d in head_dims:
                heads = PAPER_HIDDEN // d
                for causal in causals:
                    for ps in passes:
                        name = (f"{ps} {_short(dtype)} S={seqlen} B={batch} H={heads} d={d}"
                                f"{' causal' if causal else ''}")
                        cases.append(_case("bench", name, passes=ps, dtype=dtype, seqlen=seqlen, batch=batch,
                                           heads=heads, head_dim=d, causal=causal))
    return cases


def decode_cases(dtypes=("bfloat16", "float16")):
    return [_case("decode", f"{_short(dtype)} B=64 cache 8192 GQA 32/8 d=128 1 query", dtype=dtype, batch=64,
                  seqlen_k=8192, hq=32, hk=8, d=128, page_size=256) for dtype in dtypes]


def plan(full=False, stages=STAGES):
    """{stage: [case, ...]} for the stages asked for.  A case is a dict (stage, name, params),
    JSON all through: it is handed to a worker process as one line."""
    builders = {
        "env": lambda: [_case("env", "environment report")],
        "build": lambda: [_case("build", "C++ CPU extension, then the CUDA extension (nvcc)")],
        "triton": triton_cases,
        "triton-large": triton_large_cases,
        "kvcache": kvcache_cases,
        "compile": compile_cases,
        "cuda": cuda_cases,
        "bench": lambda: bench_grid(FULL_SEQLENS if full else DEFAULT_SEQLENS),
        "decode": decode_cases,
    }
    return {stage: builders[stage]() for stage in STAGES if stage in stages}


def format_plan(the_plan):
    lines = []
    total = 0
    for stage, cases in the_plan.items():
        total += len(cases)
        lines.append(f"  {stage:<13} {len(cases):>3} case{'s' if len(cases) != 1 else ' '}  {STAGE_INFO[stage]}")
        if stage in ("env", "build"):
            continue
        if stage == "bench":
            lines += _grid_summary(cases)
            continue
        for case in cases:
            lines.append(f"      - {case['name'].split(': ', 1)[1]}")
    lines.append(f"  {len(the_plan)} stages, {total} cases")
    return "\n".join(lines)


def _grid_summary(cases):
    """The bench grid in a few lines: its axes, not every case."""
    params = [c["params"] for c in cases]

    def values(key):
        return list(dict.fromkeys(p[key] for p in params))

    shapes = ", ".join(f"S={s} B={b}" for s, b in dict.fromkeys((p["seqlen"], p["batch"]) for p in params))
    dims = ", ".join(f"d={d} H={h}" for d, h in dict.fromkeys((p["head_dim"], p["heads"]) for p in params))
    return [f"      - sequence lengths (priority order): {shapes}",
            f"      - head dims: {dims}",
            f"      - dtypes {', '.join(values('dtype'))}; causal {', '.join(map(str, values('causal')))}; "
            f"passes {', '.join(values('passes'))}",
            "      - implementations: triton, cuda (when its build and checks passed), SDPA FLASH_ATTENTION, "
            "SDPA CUDNN_ATTENTION"]


def _short(dtype):
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)


# ----------------------------------------------------------------------------- environment


def ensure_kernel_packages():
    """Make ``flashattn_lite.triton_kernels`` and ``flashattn_lite.csrc`` the ones of the
    checkout this ``flashattn_lite`` was imported from, when it was imported from a source
    checkout (``PYTHONPATH=.``, no install).

    setup.py maps them from the top-level ``triton_kernels/`` and ``csrc/`` folders; an
    install provides them, a bare checkout does not, and an editable install of another
    checkout would provide that one's.  In a checkout (setup.py, csrc/ and triton_kernels/
    beside the package) each is registered from the checkout's folder unless it already
    resolves there.  Returns {name: where it comes from}.
    """
    import importlib.util

    import flashattn_lite

    root = os.path.dirname(os.path.dirname(os.path.abspath(flashattn_lite.__file__)))
    checkout = all(os.path.exists(os.path.join(root, f)) for f in ("setup.py", "csrc/__init__.py",
                                                                     "triton_kernels/__init__.py"))
    found = {}
    for sub in ("triton_kernels", "csrc"):
        name = f"flashattn_lite.{sub}"
        folder = os.path.join(root, sub)
        if name in sys.modules:
            found[sub] = os.path.dirname(os.path.abspath(sys.modules[name].__file__))
            continue
        spec = importlib.util.find_spec(name)
        where = os.path.dirname(spec.origin) if spec is not None and spec.origin else None
        if not checkout or (where and os.path.realpath(where) == os.path.realpath(folder)):
            found[sub] = where
            continue
        init = os.path.join(folder, "__init__.py")
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(flashattn_lite, sub, module)
        found[sub] = folder
    return found


def _run_text(cmd, timeout=20):
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _nvidia_smi():
    """GPU 0 as nvidia-smi sees it (no CUDA context needed): name, driver, compute
    capability, memory, compute mode; {} where nvidia-smi is missing."""
    if not shutil.which("nvidia-smi"):
        return {}
    fields = ("gpu", "driver", "compute_capability", "gpu_memory_mib", "compute_mode")
    for query in ("name,driver_version,compute_cap,memory.total,compute_mode", "name,driver_version"):
        text = _run_text(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"])
        if text:
            values = [v.strip() for v in text.splitlines()[0].split(",")]
            return dict(zip(fields, values))
    return {}


def _driver_from_proc():
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
    except OSError:
        return None
    for word in first.split():
        if word[:1].isdigit() and "." in word:
            return word
    return None


def _nvcc_version():
    try:
        from torch.utils import cpp_extension
        home = cpp_extension.CUDA_HOME
    except Exception:  # a torch without the extension tools
        home = None
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None
    text = _run_text([nvcc, "--version"])
    if not text:
        return None
    release = [ln for ln in text.splitlines() if "release" in ln]
    return (release[-1] if release else text.splitlines()[-1]).strip()


def _git_commit():
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(os.path.join(ROOT, ".git")):
        return None
    return _run_text(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], timeout=10)


def environment():
    """What the run happened on (``env`` stage)."""
    import torch

    import flashattn_lite
    from flashattn_lite.bench import cpu_model

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        from torch.utils import cpp_extension
        ninja = bool(cpp_extension.is_ninja_available())
    except Exception:
        ninja = None
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "triton": triton_version, "flashattn_lite": flashattn_lite.__version__, "git_commit": _git_commit(),
           "cpu": f"{cpu_model()} ({os.cpu_count()} logical CPUs)", "ninja": ninja, "nvcc": _nvcc_version()}
    env.update(_nvidia_smi())
    env.setdefault("driver", _driver_from_proc())
    try:
        env["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # a torch without cuDNN
        env["cudnn"] = None
    return env


def device_facts():
    """What torch says about the GPU; asked in a worker, which holds a CUDA context anyway
    (this process creates none, so the timing worker has the GPU to itself)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
            "compute_capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1)}


ENV_LABELS = (("gpu", "GPU"), ("gpu_count", "GPUs visible"), ("compute_capability", "compute capability"),
              ("sms", "SMs"), ("gpu_memory_gib", "GPU memory (GiB)"), ("gpu_memory_mib", "GPU memory (MiB)"),
              ("compute_mode", "compute mode"), ("driver", "NVIDIA driver"),
              ("torch_cuda", "CUDA (torch built with)"), ("nvcc", "nvcc"), ("cudnn", "cuDNN"), ("torch", "torch"),
              ("triton", "Triton"), ("python", "Python"), ("cpu", "CPU"), ("ninja", "ninja"),
              ("flashattn_lite", "flashattn_lite"), ("git_commit", "git commit"))


def format_environment(env):
    return "\n".join(f"  {label:<24} {env.get(key)}" for key, label in ENV_LABELS if key in env)


# ----------------------------------------------------------------------------- checks (worker side)


def _torch_dtype(name):
    import torch
    return getattr(torch, name)


def _sync(device):
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _judge(checks, problems=()):
    """Record fields from :class:`flashattn_lite.testing.Comparison` results and any other
    problems found (strings)."""
    failed = [str(c) for c in checks if not c.ok] + list(problems)

    def ratio(c):
        if not math.isfinite(c.error):
            return math.inf
        return c.error / c.bound if c.bound > 0 else (0.0 if c.error == 0 else math.inf)

    worst = max(checks, key=ratio, default=None)
    return {"status": "fail" if failed else "ok", "detail": "; ".join(failed),
            "worst": None if worst is None else str(worst),
            "checks": [{"name": c.name, "error": c.error, "bound": c.bound, "ok": c.ok} for c in checks]}


def _structure_problems(ours, ref, out_rows_first=True):
    """Rows that see no key give exactly 0 and lse -inf, as the reference; nothing else is
    NaN/inf.  ``out_rows_first``: out is (B, S, H, Dv) against lse (B, H, S); else varlen's
    (T, H, Dv) against (H, T)."""
    import torch

    problems = []
    empty = torch.isinf(ref["lse"])
    if not torch.equal(torch.isinf(ours["lse"]), empty):
        problems.append("lse is -inf on other rows than the reference's")
    elif empty.any():
        out = ours["out"].transpose(1, 2) if out_rows_first else ours["out"].transpose(0, 1)
        if not (out[empty] == 0).all():
            problems.append("rows that see no key are not exactly 0")
    for key, t in ours.items():
        if key != "lse" and not torch.isfinite(t).all():
            problems.append(f"{key} has NaN/inf")
    return problems


def _generator(device, seed):
    import torch
    return torch.Generator(device=device).manual_seed(seed)


def _seed(name):
    import zlib
    return zlib.crc32(name.encode())


def run_attention_case(case, device="cuda"):
    """``triton``, ``triton-large`` and ``cuda`` cases: forward and backward through
    ``flash_attn_func`` / ``flash_attn_varlen_func`` against :func:`testing.reference_results`
    (float64, computed on ``device``)."""
    import torch

    import flashattn_lite as fl
    from flashattn_lite import testing

    p = case["params"]
    dtype = _torch_dtype(p["dtype"])
    gen = _generator(device, _seed(case["name"]))

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).requires_grad_(grad)

    d, hq, hk = p["d"], p["hq"], p["hk"]
    dv = p.get("dv") or d
    causal = p.get("causal", False)
    window = tuple(p.get("window", (-1, -1)))
    left, right = window[0], 0 if causal else window[1]
    scale = d ** -0.5
    problems = []
    if p["kind"] == "varlen":
        lq, lk = p["lengths_q"], p["lengths_k"]
        cu_q = torch.tensor([0] + [sum(lq[:i + 1]) for i in range(len(lq))], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0] + [sum(lk[:i + 1]) for i in range(len(lk))], dtype=torch.int32, device=device)
        q, k, v = rnd(sum(lq), hq, d), rnd(sum(lk), hk, d), rnd(sum(lk), hk, dv)
        dout = rnd(sum(lq), hq, dv, grad=False)
        with fl.use_backend(p["backend"]):
            out, lse, _ = fl.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                                    window_size=window, return_attn_probs=True)
            grads = torch.autograd.grad(out, (q, k, v), dout)
        _sync(device)
        ours = dict(out=out.detach(), lse=lse.detach(), dq=grads[0], dk=grads[1], dv=grads[2])
        ref, base = testing.reference_results_varlen(q, k, v, dout, cu_q, cu_k, scale, causal=causal,
                                                     window_size=window)
        problems += _structure_problems(ours, ref, out_rows_first=False)
        return _judge(testing.check_against_reference(ours, ref, base, dtype), problems)

    b, sq, sk = p["batch"], p["sq"], p["sk"]
    q, k, v = rnd(b, sq, hq, d), rnd(b, sk, hk, d), rnd(b, sk, hk, dv)
    dout = rnd(b, sq, hq, dv, grad=False)
    if p["kind"] == "dropout":
        drop = p["dropout_p"]

        def run():
            torch.manual_seed(_seed(case["name"]))
            with fl.use_backend(p["backend"]), testing.record_dropout() as calls:
                o, l_, _ = fl.flash_attn_func(q, k, v, dropout_p=drop, causal=causal, return_attn_probs=True)
                g = torch.autograd.grad(o, (q, k, v), dout)
            _sync(device)
            return dict(out=o.detach(), lse=l_.detach(), dq=g[0], dk=g[1], dv=g[2]), calls

        ours, calls = run()
        again, _ = run()
        if len(calls) != 1:
            problems.append(f"{len(calls)} dropout calls recorded, expected 1")
        for key in ours:
            if not torch.equal(ours[key], again[key]):
                problems.append(f"{key} differs between two runs with the same torch seed")
        keep = calls[0].keep()
        ref, base = testing.reference_results(q, k, v, dout, scale, sk - sq, -1, 0 if causal else -1,
                                              dropout_keep=keep, dropout_p=drop)
        problems += _structure_problems(ours, ref)
        return _judge(testing.check_against_reference(ours, ref, base, dtype), problems)

    slopes = torch.rand(hq, generator=gen, device=device) if p.get("alibi") else None
    sink = (2.0 * torch.randn(hq, generator=gen, device=device)).requires_grad_() if p.get("sink") else None
    softcap = p.get("softcap", 0.0)
    with fl.use_backend(p["backend"]):
        out, lse, _ = fl.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                         alibi_slopes=slopes, return_attn_probs=True, learnable_sink=sink)
        leaves = (q, k, v) + ((sink,) if sink is not None else ())
        grads = torch.autograd.grad(out, leaves, dout)
    _sync(device)
    ours = dict(out=out.detach(), lse=lse.detach(), dq=grads[0], dk=grads[1], dv=grads[2])
    if sink is not None:
        ours["dsink"] = grads[3]
    ref, base = testing.reference_results(q, k, v, dout, scale, sk - sq, left, right, softcap, slopes,
                                          learnable_sink=sink)
    problems += _structure_problems(ours, ref)
    return _judge(testing.check_against_reference(ours, ref, base, dtype), problems)


def run_kvcache_case(case, device="cuda", backend="triton"):
    """``kvcache`` cases: ``flash_attn_with_kvcache`` against float64 attention over each
    sequence's keys, read page by page from the expected cache (the original with the new
    keys written at ``cache_seqlens``); the appended cache must equal that exactly."""
    import torch

    import flashattn_lite as fl
    from flashattn_lite import testing
    from flashattn_lite.backends.reference import attention_math

    p = case["params"]
    dtype = _torch_dtype(p["dtype"])
    gen = _generator(device, _seed(case["name"]))
    batch, sq, hq, hk, d = p["batch"], p["sq"], p["hq"], p["hk"], p["d"]
    dv = p.get("dv") or d
    page, capacity, snew = p.get("page_size"), p["capacity"], p.get("snew", 0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    if page:
        max_blocks = -(-capacity // page)
        num_blocks = batch * max_blocks + 3
        k_cache, v_cache = rnd(num_blocks, page, hk, d), rnd(num_blocks, page, hk, dv)
        perm = torch.randperm(num_blocks, generator=gen, device=device)
        table = perm[:batch * max_blocks].reshape(batch, max_blocks).to(torch.int32)
    else:
        k_cache, v_cache, table = rnd(batch, capacity, hk, d), rnd(batch, capacity, hk, dv), None
    lengths = p["seqlens"]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    q = rnd(batch, sq, hq, d)
    k_new, v_new = (rnd(batch, snew, hk, d), rnd(batch, snew, hk, dv)) if snew else (None, None)
    slopes = torch.rand(hq, generator=gen, device=device) if p.get("alibi") else None
    causal, window, softcap = p.get("causal", False), tuple(p.get("window", (-1, -1))), p.get("softcap", 0.0)
    kc, vc = k_cache.clone(), v_cache.clone()
    with fl.use_backend(backend):
        out, lse = fl.flash_attn_with_kvcache(q, kc, vc, k=k_new, v=v_new, cache_seqlens=seqlens, block_table=table,
                                              causal=causal, window_size=window, softcap=softcap,
                                              alibi_slopes=slopes, num_splits=p.get("num_splits", 0),
                                              return_softmax_lse=True)
    _sync(device)

    def slot(b, pos):
        if table is None:
            return b, pos
        return int(table[b, pos // page]), pos % page

    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    for b in range(batch):
        for t in range(snew):
            blk, row = slot(b, lengths[b] + t)
            expect_k[blk, row] = k_new[b, t]
            expect_v[blk, row] = v_new[b, t]
    problems = []
    if not (torch.equal(kc, expect_k) and torch.equal(vc, expect_v)):
        problems.append("the cache after appending differs from the original with the new keys/values written "
                        "at cache_seqlens")

    def keys(cache, b, end):
        if table is None:
            return cache[b, :end]
        blocks = table[b, :-(-end // page)].long()
        return cache[blocks].reshape(-1, *cache.shape[2:])[:end]

    left, right = window[0], 0 if causal else window[1]
    res = {"ref": {"out": [], "lse": []}, "base": {"out": [], "lse": []}}
    for b in range(batch):
        end = lengths[b] + snew
        kb, vb = keys(expect_k, b, end)[None], keys(expect_v, b, end)[None]
        for key, cast, upcast in (("ref", torch.float64, True), ("base", dtype, False)):
            sl = None if slopes is None else slopes[None].to(cast)
            o, l_ = attention_math(q[b:b + 1].to(cast), kb.to(cast), vb.to(cast), d ** -0.5, end - sq, left, right,
                                   upcast=upcast, softcap=softcap, alibi_slopes=sl)
            res[key]["out"].append(o)
            res[key]["lse"].append(l_)
    ref = {k: torch.cat(v) for k, v in res["ref"].items()}
    base = {k: torch.cat(v) for k, v in res["base"].items()}
    ours = {"out": out, "lse": lse}
    problems += _structure_problems(ours, ref)
    return _judge(testing.check_against_reference(ours, ref, base, dtype), problems)


def run_compile_case(case, device="cuda", backend="triton"):
    """``compile`` cases: ``torch.compile(fullgraph=True)`` (a graph break raises) against
    eager on the same inputs.  Both launch the same kernels on the same values; forward
    alone must match bit for bit, forward + backward within float32 reduction order."""
    import torch

    import flashattn_lite as fl

    p = case["params"]
    dtype = _torch_dtype(p["dtype"])
    gen = _generator(device, _seed(case["name"]))
    torch._dynamo.reset()
    problems = []
    if p["kind"] == "fwd_bwd":
        b, s, hq, hk, d = p["batch"], p["seqlen"], p["hq"], p["hk"], p["d"]
        q = torch.randn(b, s, hq, d, generator=gen, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(b, s, hk, d, generator=gen, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(b, s, hk, d, generator=gen, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(d, generator=gen, device=device, dtype=dtype, requires_grad=True)

        def layer(q, k, v, w):
            out = fl.flash_attn_func(q * w, k, v, causal=True)
            return (out.float() ** 2).sum()

        with fl.use_backend(backend):
            eager = layer(q, k, v, w)
            eager_grads = torch.autograd.grad(eager, (q, k, v, w))
            compiled = torch.compile(layer, fullgraph=True, backend="inductor")
            result = compiled(q, k, v, w)
            grads = torch.autograd.grad(result, (q, k, v, w))
        _sync(device)
        eps = torch.finfo(torch.float32).eps
        for name, got, want in zip(("loss", "dq", "dk", "dv", "dw"), (result, *grads), (eager, *eager_grads)):
            # float32 sums in another order: a few units of rounding at the tensor's scale
            bound = 64 * eps * max(1.0, want.abs().max().item()) * math.sqrt(max(1, b * s * hq))
            err = (got.double() - want.double()).abs().max().item()
            if not err <= bound:
                problems.append(f"{name}: compiled differs from eager by {err:.3g} (bound {bound:.3g})")
        return {"status": "fail" if problems else "ok", "detail": "; ".join(problems), "worst": None, "checks": []}

    b, hq, hk, d = p["batch"], p["hq"], p["hk"], p["d"]

    def fn(q, k, v):
        return fl.flash_attn_func(q, k, v, causal=True)

    with fl.use_backend(backend):
        compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="inductor")
        for s in p["seqlens"]:
            q = torch.randn(b, s, hq, d, generator=gen, device=device, dtype=dtype)
            k = torch.randn(b, s, hk, d, generator=gen, device=device, dtype=dtype)
            v = torch.randn(b, s, hk, d, generator=gen, device=device, dtype=dtype)
            got, want = compiled(q, k, v), fn(q, k, v)
            _sync(device)
            if got.shape != want.shape or not torch.equal(got, want):
                problems.append(f"seqlen {s}: compiled output differs from eager")
    return {"status": "fail" if problems else "ok", "detail": "; ".join(problems), "worst": None, "checks": []}


# ----------------------------------------------------------------------------- timing (worker side)


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend
    return getattr(SDPBackend, SDPA_BACKENDS[name])


def prefill_impls(names, causal):
    """{name: fn(q, k, v) -> out}, all on (B, S, H, D) tensors; SDPA gets transposed views."""
    import torch
    from torch.nn.attention import sdpa_kernel

    import flashattn_lite as fl

    impls = {}
    for name in names:
        if name in SDPA_BACKENDS:
            def run(q, k, v, _backend=_sdpa_backend(name)):
                with sdpa_kernel(_backend):
                    out = torch.nn.functional.scaled_dot_product_attention(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
                return out.transpose(1, 2)
        else:
            def run(q, k, v, _backend=name):
                with fl.use_backend(_backend):
                    return fl.flash_attn_func(q, k, v, causal=causal)
        impls[name] = run
    return impls


def _elapsed_ms(step, n):
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _elapsed_ms_host(step, n):
    """Wall time of ``n`` calls, for CPU tensors (how the tests exercise this module)."""
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) * 1e3


def time_interleaved(steps, repeats, target_ms=2.0, elapsed_ms=None):
    """{name: [ms per call, one per repeat]}.  Each repeat runs every implementation once,
    in turn, so a change in the machine's speed affects all alike.  A call shorter than
    ``target_ms`` is repeated within one event pair (the same count in every repeat)."""
    elapsed_ms = elapsed_ms or _elapsed_ms
    inner = {}
    for name, step in steps.items():
        est = elapsed_ms(step, 1)
        inner[name] = max(1, min(50, math.ceil(target_ms / max(est, 1e-3))))
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(elapsed_ms(step, inner[name]) / inner[name])
    return times


def _rows_problem(out, q, k, v, causal, dtype, rows=64, batch_items=None):
    """None when ``out``'s first, middle and last ``rows`` query rows agree with float64
    attention (flash-attn's forward tolerance), else a description.  All on the GPU."""
    from flashattn_lite import testing
    from flashattn_lite.backends.reference import attention_math

    if batch_items is not None:
        out, q, k, v = out[:batch_items], q[:batch_items], k[:batch_items], v[:batch_items]
    sq, sk, d = q.shape[1], k.shape[1], q.shape[-1]
    for lo in sorted({0, max(0, sq // 2 - rows // 2), max(0, sq - rows)}):
        hi = min(sq, lo + rows)
        qs = q.detach()[:, lo:hi]
        kd, vd = k.detach(), v.detach()
        right = 0 if causal else -1
        ref = attention_math(qs.double(), kd.double(), vd.double(), d ** -0.5, sk - sq + lo, -1, right)[0]
        base = attention_math(qs, kd, vd, d ** -0.5, sk - sq + lo, -1, right, upcast=False)[0]
        cmp = testing.compare("out", out[:, lo:hi].detach(), ref, base, dtype, testing.FWD_FACTOR,
                              testing.max_abs(ref))
        if not cmp.ok:
            return f"rows {lo}..{hi - 1}: {cmp}"
    return None


def _is_cuda(device):
    return str(device).startswith("cuda")


def _context_alive():
    """False once the CUDA context is unusable (a sticky error such as an illegal address)."""
    import torch

    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2.0
    except Exception:
        return False


def _first_line(exc):
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}"


def _finish_timing(record, steps, repeats, flops, bytes_moved=None, device="cuda"):
    times = time_interleaved(steps, repeats, elapsed_ms=_elapsed_ms if _is_cuda(device) else _elapsed_ms_host)
    for name, ts in times.items():
        med = statistics.median(ts)
        entry = record["impls"][name]
        entry.update(ms=med, tflops=flops / (med * 1e-3) / 1e12, min_ms=min(ts), max_ms=max(ts))
        if bytes_moved:
            entry["gbps"] = bytes_moved / (med * 1e-3) / 1e9
    sdpa = {n: e["tflops"] for n, e in record["impls"].items()
            if n.startswith("sdpa") and e["status"] == "ok" and e.get("tflops")}
    best = max(sdpa, key=sdpa.get) if sdpa else None
    record["best_sdpa"] = best
    record["ratio"] = {}
    for name, entry in record["impls"].items():
        if not name.startswith("sdpa"):
            ok = entry["status"] == "ok" and entry.get("tflops") and best
            record["ratio"][name] = entry["tflops"] / sdpa[best] if ok else None
    ours = [e for n, e in record["impls"].items() if not n.startswith("sdpa")]
    if any(e["status"] == "error" for e in ours):
        record["status"] = "error"
    elif any(e["status"] == "mismatch" for e in ours):
        record["status"] = "fail"
    else:
        record["status"] = "ok"
    record["detail"] = "; ".join(f"{n}: {e.get('detail')}" for n, e in record["impls"].items()
                                 if e["status"] in ("error", "mismatch"))
    return record


def _prepare(record, name, fn, check, make_step, device):
    """Run ``fn`` once, check it, warm its timed step up; returns the step or None.
    An SDPA backend that raises is recorded as unavailable, one of ours as an error."""
    import torch

    _announce(impl=name)  # should this crash the process, the parent knows who did it
    entry = record["impls"][name] = {"status": "ok"}
    try:
        with torch.no_grad():
            out = fn()
        _sync(device)
        bad = check(out)
        del out
        if bad is not None:
            entry.update(status="mismatch", detail=bad)
        step = make_step()
        step()
        _sync(device)
        return step
    except Exception as exc:
        sdpa = name.startswith("sdpa")
        entry.update(status="unavailable" if sdpa else "error", detail=_first_line(exc))
        if _is_cuda(device) and not _context_alive():
            record["context_lost"] = True
            record["culprit"] = name
        return None


def run_bench_case(case, impl_names, repeats, device="cuda"):
    """``bench`` cases: every implementation checked (rows against float64), warmed up,
    then timed with interleaved repeats; medians, TFLOP/s and ratio to the best SDPA.
    ``impl_names``: flashattn_lite backends and keys of ``SDPA_BACKENDS``."""
    import warnings

    import torch

    p = case["params"]
    dtype = _torch_dtype(p["dtype"])
    b, s, h, d, causal = p["batch"], p["seqlen"], p["heads"], p["head_dim"], p["causal"]
    grad = p["passes"] == "fwd+bwd"
    gen = _generator(device, 0)
    q, k, v = (torch.randn(b, s, h, d, generator=gen, device=device, dtype=dtype).requires_grad_(grad)
               for _ in range(3))
    dout = torch.randn(b, s, h, d, generator=gen, device=device, dtype=dtype)
    flops = attention_flops(b, h, s, s, d, causal, p["passes"])
    record = {"flops": flops, "impls": {}, "repeats": repeats}
    steps = {}
    for name, fn in prefill_impls(impl_names, causal).items():
        def make_step(fn=fn):
            if grad:
                return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

            def fwd():
                with torch.no_grad():
                    fn(q, k, v)
            return fwd

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA explains at length why a backend cannot run
            step = _prepare(record, name, lambda fn=fn: fn(q, k, v),
                            lambda out: _rows_problem(out, q, k, v, causal, dtype), make_step, device)
        if step is not None:
            steps[name] = step
        if record.get("context_lost"):
            return record
    return _finish_timing(record, steps, repeats, flops, device=device)


def run_decode_case(case, impl_names, repeats, device="cuda"):
    """``decode`` cases: one query row per sequence against a full cache of ``seqlen_k``
    keys; ours (each flashattn_lite backend named) with the cache contiguous and paged
    (``<name>_paged``: pages scattered at random), SDPA with ``enable_gqa`` (or the KV heads
    repeated where a backend refuses it).  TFLOP/s and GB/s of K/V read."""
    import warnings

    import torch

    import flashattn_lite as fl

    p = case["params"]
    dtype = _torch_dtype(p["dtype"])
    b, sk, hq, hk, d, page = p["batch"], p["seqlen_k"], p["hq"], p["hk"], p["d"], p["page_size"]
    gen = _generator(device, 0)
    q = torch.randn(b, 1, hq, d, generator=gen, device=device, dtype=dtype)
    k_cache = torch.randn(b, sk, hk, d, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(b, sk, hk, d, generator=gen, device=device, dtype=dtype)
    seqlens = torch.full((b,), sk, dtype=torch.int32, device=device)
    # the same keys in scattered pages: page j of sequence i is block table[i, j]
    pages_per_seq = sk // page
    perm = torch.randperm(b * pages_per_seq, generator=gen, device=device)
    k_paged = torch.empty(b * pages_per_seq, page, hk, d, device=device, dtype=dtype)
    v_paged = torch.empty_like(k_paged)
    k_paged[perm] = k_cache.reshape(-1, page, hk, d)
    v_paged[perm] = v_cache.reshape(-1, page, hk, d)
    table = perm.reshape(b, pages_per_seq).to(torch.int32)
    flops = attention_flops(b, hq, 1, sk, d, causal=True)
    kv_bytes = 2 * b * sk * hk * d * k_cache.element_size()
    record = {"flops": flops, "kv_bytes": kv_bytes, "impls": {}, "repeats": repeats}
    repeated = {}

    def ours(backend, paged):
        def run():
            with fl.use_backend(backend):
                if paged:
                    return fl.flash_attn_with_kvcache(q, k_paged, v_paged, cache_seqlens=seqlens, block_table=table)
                return fl.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)
        return run

    def sdpa(name):
        from torch.nn.attention import sdpa_kernel

        backend = _sdpa_backend(name)
        qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)

        def run():
            with sdpa_kernel(backend):
                if name not in repeated:
                    try:
                        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt,
                                                                                enable_gqa=True).transpose(1, 2)
                    except RuntimeError:
                        # this backend refuses GQA: give it the KV heads repeated (memory the
                        # real use would hold too), once, outside the timed calls
                        repeated[name] = tuple(t.repeat_interleave(hq // hk, dim=1) for t in (kt, vt))
                return torch.nn.functional.scaled_dot_product_attention(qt, *repeated[name]).transpose(1, 2)
        return run

    fns = {}
    for name in impl_names:
        if name in SDPA_BACKENDS:
            fns[name] = sdpa(name)
        else:
            fns[name], fns[name + "_paged"] = ours(name, False), ours(name, True)
    steps = {}
    for name, fn in fns.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step = _prepare(record, name, fn, lambda out: _rows_problem(out, q, k_cache, v_cache, False, dtype,
                                                                        batch_items=2),
                            lambda fn=fn: fn, device)
        if name in repeated and record["impls"][name]["status"] == "ok":
            record["impls"][name]["note"] = "KV heads repeated (enable_gqa refused)"
        if step is not None:
            steps[name] = step
        if record.get("context_lost"):
            return record
    return _finish_timing(record, steps, repeats, flops, bytes_moved=kv_bytes, device=device)


# ----------------------------------------------------------------------------- worker process


_announcer = []  # a worker's message sender, while it runs


def _announce(**msg):
    for send in _announcer:
        send(**msg)


def _worker_main(argv):
    """A worker: reads one case (JSON) per line on stdin, runs it, answers on its original
    stdout with ``@@``-prefixed JSON lines; everything else it prints goes to stderr (the log).
    Exits after a case that left the CUDA context unusable."""
    options = json.loads(argv[0]) if argv else {}
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to the log, not into the protocol

    def send(**msg):
        channel.write("@@" + json.dumps(_jsonable(msg), allow_nan=False) + "\n")
        channel.flush()

    _announcer.append(send)
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    ensure_kernel_packages()
    torch.cuda.init()
    try:
        facts = device_facts()
    except Exception as exc:
        facts = {"error": _first_line(exc)}
    send(ready=os.getpid(), device=facts)
    runners = {
        "triton": lambda c: run_attention_case(c), "triton-large": lambda c: run_attention_case(c),
        "cuda": lambda c: run_attention_case(c), "kvcache": lambda c: run_kvcache_case(c),
        "compile": lambda c: run_compile_case(c),
        "bench": lambda c: run_bench_case(c, options.get("impls", ["triton", *PREFILL_SDPA]),
                                          options.get("repeats", DEFAULT_REPEATS)),
        "decode": lambda c: run_decode_case(c, options.get("decode_impls", ["triton", *DECODE_SDPA]),
                                            options.get("repeats", DEFAULT_REPEATS)),
    }
    while True:
        line = sys.stdin.readline()
        if not line.strip():  # an empty line, or the parent closed the pipe
            break
        case = json.loads(line)
        started = time.perf_counter()
        try:
            record = runners[case["stage"]](case)
        except Exception as exc:
            record = {"status": "error", "detail": _first_line(exc),
                      "traceback": "".join(traceback.format_exc())[-2500:]}
        alive = _context_alive()
        if not alive:
            record["context_lost"] = True
        record.update(stage=case["stage"], case=case["name"], params=case["params"],
                      seconds=round(time.perf_counter() - started, 2))
        send(result=record)
        if not alive:
            return 3
        torch.cuda.empty_cache()
    return 0


def _build_main():
    """The build child: builds (or finds cached) the CPU then the CUDA extension."""
    os.environ.pop("TRITON_INTERPRET", None)
    started = time.perf_counter()
    result = {}
    try:
        ensure_kernel_packages()
        from flashattn_lite import _build_cuda
        result["path"] = _build_cuda.build_cuda()
        result["status"] = "ok"
    except Exception as exc:
        result["status"] = "error"
        result["detail"] = str(exc).strip()[-3000:] or type(exc).__name__
    result["seconds"] = round(time.perf_counter() - started, 1)
    print("@@" + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------- orchestration


def _child_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the interpreter would run the kernels on the CPU
    env.pop("FLASHATTN_LITE_BACKEND", None)
    env["PYTHONFAULTHANDLER"] = "1"  # a segfault leaves a Python traceback in the log
    env["PYTHONUNBUFFERED"] = "1"
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = ROOT + (os.pathsep + path if path else "")
    return env


def _tail(path, chars=1500):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


class _Worker:
    """One worker process and the thread that reads its answers into the shared queue."""

    def __init__(self, cmd, log_path, env, inbox):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1, env=env, start_new_session=True)
        self.spawned = time.time()
        self.ready = False
        self.alive = True
        self.retiring = False
        self.case = None
        self.case_started = None
        self.impl = None  # the implementation a timing case was preparing last
        threading.Thread(target=self._read, args=(inbox,), daemon=True).start()

    def _read(self, inbox):
        for line in self.proc.stdout:
            if line.startswith("@@"):
                try:
                    inbox.put((self, json.loads(line[2:])))
                except ValueError:
                    pass
        inbox.put((self, None))

    def send(self, case):
        self.case, self.case_started, self.impl = case, time.time(), None
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it died: its end of the pipe is reported by the reader

    def ask_to_exit(self):
        """An empty line ends the worker's loop (closing stdin does too)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except OSError:
                pass

    def finish(self, deadline):
        """Wait for the exit until ``deadline`` (time.time()), then stop it."""
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.kill()
        self.log.close()

    def kill(self):
        """The worker and whatever it started (its own process group: inductor's compile
        workers, a compiler)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


class Orchestrator:
    """Runs the plan's cases in worker processes under the time budget and collects records.

    ``worker_cmd`` (a list) starts a worker speaking :func:`_worker_main`'s protocol; the
    default runs this module.  ``watchdog_s``: {stage: seconds one case may take}."""

    def __init__(self, the_plan, out_dir, budget_s=DEFAULT_BUDGET_S, workers=None, repeats=DEFAULT_REPEATS,
                 worker_cmd=None, build_cmd=None, watchdog_s=None, progress=print, max_restarts=8):
        self.plan = the_plan
        self.out_dir = out_dir
        self.log_dir = os.path.join(out_dir, "logs")
        self.budget = budget_s
        self.workers = workers or max(1, min(6, (os.cpu_count() or 2) // 2))
        self.repeats = repeats
        self.worker_cmd = worker_cmd or [sys.executable, "-m", "flashattn_lite.gpu_check", "--worker"]
        self.build_cmd = build_cmd or [sys.executable, "-m", "flashattn_lite.gpu_check", "--build-child"]
        self.watchdog = watchdog_s or {"triton": 240, "triton-large": 240, "kvcache": 180, "compile": 300,
                                       "cuda": 180, "bench": 150, "decode": 120}
        self.progress = progress
        self.max_restarts = max_restarts
        self.restarts = 0
        self.records = {}
        self.inbox = queue.Queue()
        self.env = _child_env()
        self.build = None
        self.build_record = None
        self.spawned = 0
        self.device = {}  # device_facts() from the first worker

    # -- deadlines, in seconds after the start; the hard stop is budget + 10 s
    def _deadlines(self):
        b = self.budget
        return {"correctness": 0.50 * b, "build_wait": 0.56 * b, "cuda": 0.63 * b, "bench": b - 15.0,
                "hard": b + 10.0}

    def _now(self):
        return time.time() - self.t0

    def record(self, case, status, detail="", **extra):
        rec = {"stage": case["stage"], "case": case["name"], "params": case["params"], "status": status,
               "detail": detail}
        rec.update(extra)
        self._store(rec)

    def _store(self, rec):
        self.records[rec["case"]] = rec
        self.progress(_progress_line(rec))

    def _spawn(self, phase, options):
        self.spawned += 1
        path = os.path.join(self.log_dir, f"worker-{phase}-{self.spawned}.log")
        return _Worker(self.worker_cmd + [json.dumps(options)], path, self.env, self.inbox)

    # -- the build child
    def start_build(self):
        if "build" not in self.plan:
            return
        env = dict(self.env)
        env.setdefault("MAX_JOBS", str(max(2, (os.cpu_count() or 4) // 2)))  # leave cores to Triton's compiles
        log = open(os.path.join(self.log_dir, "build.log"), "w")
        self.build = subprocess.Popen(self.build_cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                      start_new_session=True)
        self.build_log = log
        self.build_started = time.time()

    def _poll_build(self, give_up):
        """None while the build runs; then its record (also stored)."""
        if self.build_record is not None or self.build is None:
            return self.build_record
        case = self.plan["build"][0]
        if self.build.poll() is None:
            if not give_up:
                return None
            try:
                os.killpg(self.build.pid, 9)
            except OSError:
                pass
            self.build.wait()
            rec = dict(status="timeout", detail=f"still building after {time.time() - self.build_started:.0f} s "
                                                f"(the stage deadline); the cuda stages are skipped")
        else:
            out = self.build.stdout.read()
            msgs = [json.loads(ln[2:]) for ln in out.splitlines() if ln.startswith("@@")]
            rec = msgs[-1] if msgs else dict(status="error", detail="the build child died: "
                                                                   + _tail(self.build_log.name))
        self.build_log.close()
        rec.setdefault("seconds", round(time.time() - self.build_started, 1))
        self.record(case, rec.pop("status"), rec.pop("detail", ""), **rec)
        self.build_record = self.records[case["name"]]
        return self.build_record

    # -- one phase: a queue of cases over ``n`` workers
    def run_phase(self, phase, cases, n, options, deadline_of, more=None):
        """Run ``cases`` (and those ``more()`` adds) on up to ``n`` workers.  ``deadline_of(case)``:
        seconds after the start past which the case is not started.  ``more()`` returns
        (new cases, finished?) and is polled until finished."""
        pending = collections.deque(cases)
        workers = []
        started = 0
        hard = self._deadlines()["hard"]
        while True:
            if more is not None:
                new, finished = more()
                pending.extend(new)
                if finished:
                    more = None
            now = self._now()
            # cases whose deadline has passed are not started
            for case in [c for c in pending if now > deadline_of(c)]:
                pending.remove(case)
                self.record(case, "skipped", f"time budget: not started before {deadline_of(case):.0f} s")
            live = [w for w in workers if w.alive]
            busy = [w for w in live if w.case is not None]
            if not pending and not busy and more is None:
                break
            if now > hard:
                self._stop(live, pending, "the run's hard time limit")
                break
            wanted = min(n, len(pending) + len(busy))
            usable = [w for w in live if not w.retiring]
            while len(usable) < wanted:
                if started < n:
                    started += 1
                elif self.restarts < self.max_restarts:
                    self.restarts += 1  # a replacement for a worker that died or was stopped
                else:
                    break
                w = self._spawn(phase, options(self))
                workers.append(w)
                usable.append(w)
            if not usable and pending:
                for case in list(pending):
                    self.record(case, "skipped", "no worker could be started (see the logs)")
                pending.clear()
                continue
            for w in usable:
                if w.ready and w.case is None and pending:
                    w.send(pending.popleft())
            try:
                w, msg = self.inbox.get(timeout=0.25)
            except queue.Empty:
                self._watch(workers, pending)
                continue
            self._handle(w, msg, phase)
            self._watch(workers, pending)
        for w in workers:
            w.ask_to_exit()
        deadline = time.time() + 10
        for w in workers:
            w.finish(deadline)
        return workers

    def _handle(self, w, msg, phase):
        if msg is None:  # the worker's output ended: it exited or died
            w.alive = False
            rc = w.proc.wait()
            if w.case is not None:
                case, w.case = w.case, None
                self.record(case, "crashed", f"worker exited with status {rc} during this case"
                            + (f" (preparing {w.impl})" if w.impl else ""), culprit=w.impl,
                            log_tail=_tail(w.log_path))
            elif not w.ready:
                self.progress(f"  (a {phase} worker exited with status {rc} before it was ready; log: "
                              f"{w.log_path})")
            return
        if "ready" in msg:
            w.ready = True
            if msg.get("device") and not self.device:
                self.device = msg["device"]
        elif "impl" in msg:
            w.impl = msg["impl"]
        elif "result" in msg:
            rec = msg["result"]
            w.case = None
            if rec.get("context_lost"):
                w.retiring = True  # it exits; a fresh worker takes the next case
            self._store(rec)

    def _watch(self, workers, pending):
        now = time.time()
        for w in workers:
            if not w.alive:
                continue
            if not w.ready and now - w.spawned > 180:
                w.kill()
            elif w.case is not None and now - w.case_started > self.watchdog.get(w.case["stage"], 180):
                case, w.case = w.case, None
                w.kill()
                self.record(case, "timeout", f"no answer within {self.watchdog.get(case['stage'], 180)} s; the "
                                             f"worker was stopped" + (f" (preparing {w.impl})" if w.impl else ""),
                            culprit=w.impl, log_tail=_tail(w.log_path))

    def _stop(self, live, pending, why):
        for w in live:
            if w.case is not None:
                case, w.case = w.case, None
                self.record(case, "timeout", f"stopped at {why}", log_tail=_tail(w.log_path))
            w.kill()
        for case in pending:
            self.record(case, "skipped", f"not started before {why}")
        pending.clear()

    # -- the whole run
    def run(self):
        self.t0 = time.time()
        os.makedirs(self.log_dir, exist_ok=True)
        deadlines = self._deadlines()
        self.start_build()
        correctness = [c for s in ("triton", "triton-large", "kvcache", "compile") for c in self.plan.get(s, [])]
        # the longest first, so that the tail of the phase is short ones
        order = {"compile": 0, "triton-large": 1, "triton": 2, "kvcache": 3}
        correctness.sort(key=lambda c: order[c["stage"]])
        cuda = list(self.plan.get("cuda", []))

        def more():
            if cuda and self.build is None:
                for case in cuda:
                    self.record(case, "skipped", "the build stage is not part of this run")
                return [], True
            if not cuda:
                if self.build is not None:
                    self._poll_build(give_up=self._now() > deadlines["build_wait"])
                    return [], self.build_record is not None
                return [], True
            rec = self._poll_build(give_up=self._now() > deadlines["build_wait"])
            if rec is None:
                return [], False
            if rec["status"] == "ok":
                return list(cuda), True
            for case in cuda:
                self.record(case, "skipped", f"the build did not succeed ({rec['status']})")
            return [], True

        def deadline_of(case):
            return deadlines["cuda"] if case["stage"] == "cuda" else deadlines["correctness"]

        if correctness or cuda or self.build is not None:
            self.run_phase("check", correctness, self.workers, lambda _: {}, deadline_of, more)
        timing = list(self.plan.get("decode", [])) + list(self.plan.get("bench", []))
        if timing:
            self.cuda_in_bench = self._cuda_verified()

            def options(_):
                impls = ["triton"] + (["cuda"] if self.cuda_in_bench else []) + list(PREFILL_SDPA)
                return {"impls": impls, "decode_impls": ["triton", *DECODE_SDPA], "repeats": self.repeats}

            durations = {}

            def timing_deadline(case):
                # leave the room this case is expected to take (the slowest seen of its kind)
                kind = (case["stage"], case["params"].get("seqlen"), case["params"].get("passes"))
                return deadlines["bench"] - durations.get(kind, 0.0)

            original_store = self._store

            def store(rec):
                if "seconds" in rec:
                    p = rec.get("params", {})
                    kind = (rec["stage"], p.get("seqlen"), p.get("passes"))
                    durations[kind] = max(durations.get(kind, 0.0), rec["seconds"])
                if rec.get("culprit") == "cuda" and (rec.get("context_lost") or rec["status"] in ("crashed",
                                                                                                "timeout")):
                    self.cuda_in_bench = False  # the next worker times the others without it
                original_store(rec)

            self._store = store
            try:
                self.run_phase("timing", timing, 1, options, timing_deadline)
            finally:
                self._store = original_store
        self.elapsed = self._now()
        ordered = []
        for stage, cases in self.plan.items():
            for case in cases:
                if case["name"] in self.records:
                    ordered.append(self.records[case["name"]])
        return ordered

    def _cuda_verified(self):
        """The cuda backend joins the timing only after its build and every correctness case
        ran without crashing, hanging or breaking the CUDA context (wrong numbers are
        reported by the checks and do not exclude it)."""
        if self.build_record is None or self.build_record["status"] != "ok":
            return False
        recs = [r for r in self.records.values() if r["stage"] == "cuda"]
        return bool(recs) and not any(r["status"] in ("crashed", "timeout", "skipped") or r.get("context_lost")
                                      for r in recs)


def _progress_line(rec):
    head = f"[{rec['stage']}] {rec['case'].split(': ', 1)[-1]}: {rec['status']}"
    if rec["stage"] in ("bench", "decode") and rec.get("impls"):
        parts = []
        for name, e in rec["impls"].items():
            if e.get("tflops") is not None:
                parts.append(f"{name} {e['tflops']:.1f}")
            else:
                parts.append(f"{name} {e['status']}")
        head += "  (TFLOP/s: " + ", ".join(parts) + ")"
    if rec.get("seconds") is not None:
        head += f"  [{rec['seconds']} s]"
    if rec["status"] not in ("ok",) and rec.get("detail"):
        head += "\n      " + rec["detail"][:400]
    return head


# ----------------------------------------------------------------------------- results


def _jsonable(x):
    """Strict-JSON copy: NaN and infinities become None, tuples lists, unknown objects strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def _fmt(x, spec=".1f"):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _md_escape(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_markdown(env, records, meta):
    lines = ["# flashattn_lite GPU check", ""]
    lines += [f"Run of {meta.get('elapsed_s', '?')} s (budget {meta.get('budget_s')} s), "
              f"{meta.get('repeats')} interleaved timing repeats.", ""]
    lines += ["## Environment", "", "| item | value |", "|---|---|"]
    lines += [f"| {label} | {_md_escape(env.get(key))} |" for key, label in ENV_LABELS if key in env]
    lines.append("")

    checks = [r for r in records if r["stage"] in ("build",) + CORRECTNESS_STAGES]
    counts = collections.Counter(r["status"] for r in checks)
    lines += ["## Correctness", "",
              "Against float64 attention with flash-attn's tolerance (`flashattn_lite.testing`: output and lse "
              "within 2x the same-dtype error, gradients within 3x, plus rounding).", "",
              "Summary: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), "",
              "| stage | case | status | worst check (error / bound) | s | detail |", "|---|---|---|---|---|---|"]
    for r in checks:
        lines.append(f"| {r['stage']} | {_md_escape(r['case'].split(': ', 1)[-1])} | {r['status']} | "
                     f"{_md_escape(r.get('worst') or '')} | {_fmt(r.get('seconds'))} | "
                     f"{_md_escape((r.get('detail') or '')[:300])} |")
    lines.append("")

    bench = [r for r in records if r["stage"] == "bench"]
    if bench:
        lines += ["## Prefill timing", "",
                  "TFLOP/s from the median of interleaved repeats (CUDA events); FLOPs as flash-attn counts them "
                  "(4·B·S²·H·d forward, halved when causal, fwd+bwd 3.5x). Ratio: ours / the best SDPA backend of "
                  "the same case (> 1: faster). 16k tokens per batch, hidden 2048.", ""]
        impls = []
        for r in bench:
            for name in r.get("impls", {}):
                if name not in impls:
                    impls.append(name)
        ours = [n for n in impls if not n.startswith("sdpa")]
        groups = collections.OrderedDict()
        for r in bench:
            p = r["params"]
            groups.setdefault((p["passes"], p["dtype"]), []).append(r)
        for (passes, dtype), rows in groups.items():
            lines += [f"### {passes}, {dtype}", "",
                      "| seqlen | batch x heads | d | causal | " + " | ".join(impls) + " | "
                      + " | ".join(f"{n} / best SDPA" for n in ours) + " | status |",
                      "|" + "---|" * (5 + len(impls) + len(ours))]
            rows = sorted(rows, key=lambda r: (r["params"]["seqlen"], r["params"]["head_dim"], r["params"]["causal"]))
            for r in rows:
                p = r["params"]
                cells = []
                for name in impls:
                    e = r.get("impls", {}).get(name)
                    if e is None:
                        cells.append("")
                    elif e.get("tflops") is not None and e["status"] == "ok":
                        cells.append(_fmt(e["tflops"]))
                    elif e.get("tflops") is not None:
                        cells.append(f"{_fmt(e['tflops'])} ({e['status']})")
                    else:
                        cells.append(e["status"])
                ratios = [_fmt((r.get("ratio") or {}).get(n), ".2f") for n in ours]
                lines.append(f"| {p['seqlen']} | {p['batch']} x {p['heads']} | {p['head_dim']} | "
                             f"{'yes' if p['causal'] else 'no'} | " + " | ".join(cells) + " | "
                             + " | ".join(ratios) + f" | {r['status']} |")
            lines.append("")

    decode = [r for r in records if r["stage"] == "decode"]
    if decode:
        lines += ["## Decoding", "",
                  "One query token per sequence against a full KV cache; GB/s counts the K and V bytes read once.",
                  "", "| case | impl | status | ms | TFLOP/s | GB/s | ours / best SDPA | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in decode:
            best = r.get("best_sdpa")
            sdpa_tflops = (r.get("impls", {}).get(best) or {}).get("tflops") if best else None
            if not r.get("impls"):
                lines.append(f"| {_md_escape(r['case'].split(': ', 1)[-1])} | - | {r['status']} | | | | | "
                             f"{_md_escape((r.get('detail') or '')[:200])} |")
            for name, e in r.get("impls", {}).items():
                ratio = (e["tflops"] / sdpa_tflops if not name.startswith("sdpa") and e.get("tflops")
                         and sdpa_tflops else None)
                note = _md_escape(e.get("note") or e.get("detail") or "")[:200]
                lines.append(f"| {_md_escape(r['case'].split(': ', 1)[-1])} | {name} | {e['status']} | "
                             f"{_fmt(e.get('ms'), '.3f')} | {_fmt(e.get('tflops'), '.2f')} | "
                             f"{_fmt(e.get('gbps'), '.0f')} | {_fmt(ratio, '.2f')} | {note} |")
        lines.append("")
    lines += ["## Test suite", "", f"The repository's tests (CPU and Triton's interpreter; no GPU needed): "
              f"`{PYTEST_COMMAND}`", ""]
    return "\n".join(lines)


def write_results(out_dir, env, records, meta):
    """Write ``results.json`` (strict JSON) and ``results.md``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    data = _jsonable({"environment": env, "meta": meta, "records": records})
    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1, allow_nan=False)
    md_path = os.path.join(out_dir, "results.md")
    with open(md_path, "w") as f:
        f.write(format_markdown(data["environment"], data["records"], data["meta"]))
    return [json_path, md_path]


# ----------------------------------------------------------------------------- command line


def add_arguments(parser):
    parser.add_argument("--out", default="gpu_check_out", help="folder for results.json, results.md and logs/")
    parser.add_argument("--full", action="store_true",
                        help="time every sequence length 512..16k (default: " + ", ".join(map(str, DEFAULT_SEQLENS))
                             + "); twice the timing cases, so give it a larger --budget (e.g. 900)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for the whole run, builds included (stages that would start later are "
                             "skipped and reported)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes running the correctness cases at once (default: half the CPUs, at most 6)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="interleaved timing repeats")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="run only these stages")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return parser


def run(args):
    """The command: plan, then (on a CUDA machine) run and write the results.  Exit status 0
    when every case that ran passed (skipped cases do not fail the run), else 1."""
    stages = set(args.stages) | {"env"}
    if "cuda" in stages:
        stages.add("build")  # the cuda cases need the extension
    the_plan = plan(full=args.full, stages=stages)
    if args.dry_run:
        print("flashattn_lite GPU check, the plan:")
        print(format_plan(the_plan))
        print(f"budget {args.budget:.0f} s; results would go to {os.path.abspath(args.out)}/results.json, "
              f"results.md; the test suite: {PYTEST_COMMAND}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print(f"No CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
              f"built with CUDA {torch.version.cuda or 'none'}). Nothing was run and nothing was written.")
        print("On a machine with a GPU this check would run:")
        print(format_plan(the_plan))
        print(f"The repository's test suite needs no GPU: {PYTEST_COMMAND}")
        return 0
    if args.repeats < 1 or (args.workers is not None and args.workers < 1):
        print("--repeats and --workers must be at least 1", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    ensure_kernel_packages()
    env = environment()
    print("flashattn_lite GPU check\n" + format_environment(env))
    n_cases = sum(len(c) for s, c in the_plan.items() if s not in ("env", "build"))
    print(f"{n_cases} cases in {len(the_plan)} stages, budget {args.budget:.0f} s; logs in "
          f"{os.path.join(args.out, 'logs')}\n")
    workers = args.workers
    if str(env.get("compute_mode", "")).lower().startswith("exclusive"):
        workers = 1  # one CUDA context at a time: no parallel correctness workers
        print(f"compute mode {env['compute_mode']}: correctness cases run in one worker at a time")
    orch = Orchestrator(the_plan, args.out, budget_s=args.budget, workers=workers, repeats=args.repeats,
                        progress=lambda line: print(line, flush=True))
    orch.record(the_plan["env"][0], "ok", environment=env)
    records = orch.run()
    env.update(orch.device)  # what torch said in the first worker (SMs, capability, memory)
    if orch.device:
        print("device (from torch in a worker): " + ", ".join(f"{k} {v}" for k, v in orch.device.items()))
    meta = {"elapsed_s": round(orch.elapsed, 1), "budget_s": args.budget, "repeats": args.repeats,
            "full": args.full, "stages": list(the_plan), "cuda_in_timing": getattr(orch, "cuda_in_bench", None),
            "pytest_command": PYTEST_COMMAND}
    files = write_results(args.out, env, records, meta)
    counts = collections.Counter(r["status"] for r in records)
    print("\n" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" in {orch.elapsed:.0f} s")
    print("written: " + ", ".join(files))
    print(f"The repository's test suite (CPU, no GPU needed): {PYTEST_COMMAND}")
    bad = [r for r in records if r["status"] in ("fail", "error", "crashed", "timeout")]
    return 1 if bad else 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1:])
    if argv[:1] == ["--build-child"]:
        return _build_main()
    parser = add_arguments(argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
