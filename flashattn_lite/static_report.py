"""Static GPU report: compile every shipped Triton kernel config for sm_80 and
sm_90 on the CPU (no GPU needed) and read registers, spills, shared memory and
tensor-core instructions from ptxas and the SASS.

Run ``python benches/static_gpu_report.py`` (or import :func:`report`).  Must run
with ``TRITON_INTERPRET`` unset: the interpreter replaces ``triton.jit`` functions
by Python ones that cannot be compiled.
"""

import argparse
import concurrent.futures
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

# The causal specialisation of each kernel holds both the masked (diagonal) and
# the unmasked inner loop, so it is the largest code of each config.  Every config
# is compiled twice: plain, and with every score modifier at once (softcap, ALiBi,
# an additive bias with its gradient, and dropout: the most registers per score).
_CAUSAL = dict(HAS_LEFT=False, HAS_RIGHT=True, EVEN_M=True, EVEN_N=True, PAD_D=False, HAS_SOFTCAP=False,
               HAS_ALIBI=False, HAS_BIAS=False, HAS_DROPOUT=False, IS_VARLEN=False, BIAS_GRAD=False)
_FP32_ARGS = ("qk_scale", "sm_scale", "softcap_pre", "softcap_post", "drop_scale")
_I64_ARGS = ("seed", "drop_thresh", "ctr_sb", "ctr_sh", "ctr_sk")
_LSE_ARGS = ("LSE", "LSE2", "DELTA", "DLSE", "ALIBI", "DBIAS", "PART_O", "PART_LSE", "KD", "VD")
# 8-bit KV caches (decode_split_kernel): the variant names ``score_mods`` takes for them, and
# what the caches' pointers are, per architecture (e4m3: Triton's fp8 type on sm_90, its
# bits as uint8 on sm_80; triton_kernels/decode.py)
QUANT_VARIANTS = ("int8", "fp8")


def _quant(variant, arch):
    """(QUANT constexpr, K/V pointer type) of a decode variant; (0, None) for a float cache."""
    if variant == "int8":
        return 1, "*i8"
    if variant == "fp8":
        return (3, "*fp8e4nv") if arch == "sm90" else (2, "*u8")
    return 0, None
_I32_PTRS = ("CU_Q", "CU_K", "BLOCK_TABLE", "SEQLENS", "LEFTPAD")


def _signature(fn, elem, constexprs, cache_elem=None):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif cache_elem and name in ("K", "V"):
            sig[name] = cache_elem
        elif name in _FP32_ARGS:
            sig[name] = "fp32"
        elif name in _LSE_ARGS:
            sig[name] = "*fp32"
        elif name in _I32_PTRS:
            sig[name] = "*i32"
        elif name in _I64_ARGS:
            sig[name] = "i64"
        elif name.isupper():
            sig[name] = "*" + elem
        else:
            sig[name] = "i32"
        # What the launcher's specialisation sees for aligned tensors whose head
        # dim is a multiple of 16: 16-byte aligned pointers, strides divisible by 16.
        if sig[name].startswith("*") or name.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_one(kernel_name, arch, dclass, head_dim, block_m, block_n, num_warps, num_stages, score_mods=False,
                head_dim_v=None):
    """Compile one kernel config; returns a dict of its static facts.  ``score_mods``
    compiles the specialisation with softcap, ALiBi and a bias with its gradient instead of the plain
    one; ``score_mods="dropout"`` adds dropout to those; for ``decode_split_kernel``,
    ``score_mods`` "int8" / "fp8" compiles the plain specialisation reading an 8-bit cache
    (``QUANT_VARIANTS``).  ``head_dim_v``: the value head dim
    (default: ``head_dim``; the decode table's 576 row is absorbed MLA, Dv 512); a dim that
    is not a power of two is compiled padded, with the masks the launcher would compile in."""
    from flashattn_lite.triton_kernels import attention, configs, decode

    fn = getattr(decode if kernel_name in _DECODE_KERNELS else attention, kernel_name)
    if head_dim_v is None:
        head_dim_v = min(head_dim, configs.HEAD_DIM_BUCKETS[-1])
    if kernel_name == "decode_split_kernel":
        block_d, block_dt = configs.decode_qk_tiles(head_dim)
    elif kernel_name == "combine_kernel":  # merges outputs: its head dim is Dv
        block_d, block_dt = configs.padded_head_dim(head_dim_v), 0
    else:
        block_d, block_dt = configs.padded_head_dim(head_dim), 0
    block_dv = configs.padded_head_dim(head_dim_v)
    dims = dict(BLOCK_D=block_d, BLOCK_DT=block_dt, BLOCK_DV=block_dv, PAD_D=head_dim != block_d + block_dt,
                PAD_DV=head_dim_v != block_dv)
    elem = "fp32" if dclass == "fp32" else "fp16"
    quant, cache_elem = _quant(score_mods, arch)
    on = bool(score_mods) and not quant
    mods = dict(HAS_SOFTCAP=on, HAS_ALIBI=on, HAS_BIAS=on, BIAS_GRAD=on, HAS_DROPOUT=score_mods == "dropout")
    constexprs = dict(_CAUSAL, **mods, **_decode_constexprs(block_n), **dims, BLOCK_M=block_m, BLOCK_N=block_n,
                      QUANT=quant, DOT_PRECISION="ieee" if dclass == "fp32" else "tf32")
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    if kernel_name == "bwd_dkdv_kernel" and len(configs.dkdv_passes(head_dim, head_dim_v)) > 1:
        # compiled once per pass; the row reports the larger of each fact (spills summed)
        chunk_d, chunk_dv = configs.dkdv_chunks(head_dim, head_dim_v, score_mods, (int(arch[2:]) // 10, 0))
        rows = [_compile_facts(fn, elem, dict(constexprs, WRITE_DK=dk, WRITE_DV=dv, CHUNK_D=chunk_d, CHUNK_DV=chunk_dv),
                               arch, num_warps, num_stages)
                for dk, dv in configs.dkdv_passes(head_dim, head_dim_v)]
        facts = {key: max(r[key] for r in rows) for key in ("registers", "stack_bytes", "shared_bytes")}
        facts.update({key: sum(r[key] for r in rows) for key in ("spill_stores", "spill_loads")})
        facts.update({key: min(r[key] for r in rows) for key in ("hgmma", "hmma")})
        facts["ptxas_warnings"] = [w for r in rows for w in r["ptxas_warnings"]]
        facts["passes"] = rows
    else:
        if kernel_name == "bwd_dkdv_kernel":  # one pass for both, K and V kept whole
            constexprs = dict(constexprs, WRITE_DK=True, WRITE_DV=True, CHUNK_D=0, CHUNK_DV=0)
        facts = _compile_facts(fn, elem, constexprs, arch, num_warps, num_stages, cache_elem)
    return dict(kernel=kernel_name, arch=arch, dtype="fp16/bf16" if dclass == "lowp" else "fp32",
                head_dim=head_dim, head_dim_v=head_dim_v, block_m=block_m, block_n=block_n, num_warps=num_warps,
                num_stages=num_stages, score_mods=score_mods, **facts)


def _compile_facts(fn, elem, constexprs, arch, num_warps, num_stages, cache_elem=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    sig, attrs = _signature(fn, elem, constexprs, cache_elem)
    capability = int(arch[2:])
    try:
        ptxas = get_ptxas(capability).path
    except TypeError:  # Triton <= 3.4: one ptxas for every architecture
        ptxas = get_ptxas().path
    compiled = triton.compile(ASTSource(fn, signature=sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        # The same ptxas and flags Triton uses, rerun with -v so the facts do not
        # depend on Triton's on-disk cache.
        log = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(capability)}", ptx, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True).stderr
        cubin = os.path.join(tmp, "k2.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        nvdisasm = os.path.join(os.path.dirname(ptxas), "nvdisasm")
        sass = subprocess.run([nvdisasm, cubin], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    spill_ld = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    stack = int(re.search(r"(\d+) bytes stack frame", log).group(1))
    hgmma = len(re.findall(r"\bHGMMA\.", sass))
    hmma = len(re.findall(r"\bHMMA\.", sass))
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    return dict(registers=regs, spill_stores=spill_st, spill_loads=spill_ld, stack_bytes=stack,
                shared_bytes=compiled.metadata.shared, hgmma=hgmma, hmma=hmma, ptxas_warnings=warnings)


def _jobs():
    from flashattn_lite.triton_kernels import configs

    for mods in (False, True, configs.DROPOUT):
        for table, arch, dclass, head_dim, cfg in configs.shipped_configs(mods):
            yield (configs.KERNELS[table], arch, dclass, head_dim, cfg.block_m, cfg.block_n, cfg.num_warps,
                   cfg.num_stages, mods)
    # the decode configs reading 8-bit caches (the plain specialisation; configs._DECODE_SPLIT_QUANT)
    for arch, dclass, head_dim, cfg in configs.quant_decode_configs():
        for variant in QUANT_VARIANTS:
            yield ("decode_split_kernel", arch, dclass, head_dim, cfg.block_m, cfg.block_n, cfg.num_warps,
                   cfg.num_stages, variant)


def _mla_jobs():
    """The configs MLA calls use, compiled with their own (D, Dv): DeepSeek's 192/128 and
    512/512 through the attention kernels, absorbed-MLA decoding's 576/512 (one kv head)."""
    from flashattn_lite.triton_kernels import configs

    lookups = {"fwd": configs.fwd_config, "bwd_dkdv": configs.bwd_dkdv_config, "bwd_dq": configs.bwd_dq_config,
               "decode_split": configs.decode_split_config}
    for dclass, (table, d, dv), arch in itertools.product(("lowp", "fp32"), configs.MLA_HEAD_DIMS, ("sm80", "sm90")):
        if dclass == "fp32" and table.startswith("bwd") and configs.bucket(d, dv) > configs.FP32_BWD_MAX_HEAD_DIM:
            continue  # declined by the backend (configs.FP32_BWD_MAX_HEAD_DIM)
        dtype = torch.float32 if dclass == "fp32" else torch.float16
        mods_list = (False, True, configs.DROPOUT) if table in ("fwd", "bwd_dkdv", "bwd_dq") else (False,)
        for mods in mods_list:
            if table == "combine":
                cfg = configs.combine_config(dv, dtype, (int(arch[2]), 0))
            else:
                cfg = lookups[table](d, dtype, (int(arch[2]), 0), mods, head_dim_v=dv)
            yield (configs.KERNELS[table], arch, dclass, d, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
                   mods, dv)


def jobs(which="all"):
    """The compile jobs (``compile_one`` arguments): ``"shipped"`` every shipped config,
    ``"mla"`` the MLA head-dim pairs' configs, ``"all"`` both."""
    out = []
    if which in ("all", "shipped"):
        from flashattn_lite.triton_kernels import configs

        # the value head dim compile_one defaults to, spelled out (it is in every row)
        out += [job + (min(job[3], configs.HEAD_DIM_BUCKETS[-1]),) for job in _jobs()]
    if which in ("all", "mla"):
        out += list(_mla_jobs())
    return out


def job_of(row):
    """The ``compile_one`` arguments that produced a report row."""
    return (row["kernel"], row["arch"], "fp32" if row["dtype"] == "fp32" else "lowp", row["head_dim"],
            row["block_m"], row["block_n"], row["num_warps"], row["num_stages"], row["score_mods"],
            row["head_dim_v"])


def compile_one_or_error(*job):
    """:func:`compile_one`, or for a config that fails to compile (a compiler crash, e.g.
    an older Triton's ptxas) the row of its job with ``error`` set and no facts."""
    try:
        return compile_one(*job)
    except Exception as exc:  # noqa: BLE001 - reported per config, the report goes on
        kernel, arch, dclass, head_dim, block_m, block_n, num_warps, num_stages, score_mods, head_dim_v = job
        detail = exc.stderr.strip().splitlines()[-1:] if isinstance(exc, subprocess.CalledProcessError) and \
            exc.stderr else []
        return dict(kernel=kernel, arch=arch, dtype="fp16/bf16" if dclass == "lowp" else "fp32", head_dim=head_dim,
                    head_dim_v=head_dim_v, block_m=block_m, block_n=block_n, num_warps=num_warps,
                    num_stages=num_stages, score_mods=score_mods,
                    error=" ".join([f"{type(exc).__name__}: {exc}"[:300]] + detail))


def compile_many(job_list, workers=None, keep_going=False):
    """Compile ``job_list`` in parallel processes; list of result dicts.  ``keep_going``: a
    config that fails gives a row with ``error`` (see :func:`compile_one_or_error`) instead
    of stopping the report."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the static GPU report needs TRITON_INTERPRET unset (the interpreter cannot compile)")
    if not job_list:
        return []
    workers = workers or os.cpu_count() or 1
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_one_or_error if keep_going else compile_one, *zip(*job_list)))


def report(workers=None, mla=False):
    """Compile every shipped config (in parallel processes); list of result dicts.
    ``mla``: only the configs of the MLA head-dim pairs (``configs.MLA_HEAD_DIMS``)."""
    return compile_many(jobs("mla" if mla else "shipped"), workers)


# The files whose contents decide every compiled fact (with Triton's version).
_SOURCES = ("triton_kernels/attention.py", "triton_kernels/decode.py", "triton_kernels/configs.py")


def fingerprint():
    """What a saved report was compiled from: Triton's version and a SHA-256 of the kernel
    sources, the configs and this module.  A saved report whose fingerprint differs is stale."""
    import hashlib

    import triton

    from flashattn_lite import triton_kernels

    digest = hashlib.sha256()
    root = os.path.dirname(os.path.abspath(triton_kernels.__file__))
    for path in [os.path.join(root, os.path.basename(f)) for f in _SOURCES] + [os.path.abspath(__file__)]:
        with open(path, "rb") as f:
            digest.update(f.read())
    return {"triton": triton.__version__, "sources_sha256": digest.hexdigest()}


RESULTS_FILE = os.path.join("benches", "results", "static_gpu.json")


def format_table(rows, all_rows=False):
    """Markdown table of the plain specialisation (the score-modifier one is summarised by the caller);
    ``all_rows``: every specialisation, with a ``mods`` column."""
    head = ("kernel", "arch", "dtype", "hdim", "BMxBN", "warps", "stages", "regs", "spill B", "smem B",
            "tensor cores") + (("mods",) if all_rows else ())
    lines = [head]
    for r in rows:
        if r.get("score_mods") and not all_rows or "error" in r:
            continue
        tc = f"HGMMA x{r['hgmma']}" if r["hgmma"] else (f"HMMA x{r['hmma']}" if r["hmma"] else "none (FMA)")
        hdim = str(r["head_dim"]) if r.get("head_dim_v", r["head_dim"]) == r["head_dim"] else \
            f"{r['head_dim']}/{r['head_dim_v']}"
        lines.append((r["kernel"], r["arch"], r["dtype"], hdim, f"{r['block_m']}x{r['block_n']}",
                      str(r["num_warps"]), str(r["num_stages"]), str(r["registers"]),
                      str(r["spill_stores"] + r["spill_loads"]), str(r["shared_bytes"]), tc)
                     + (({False: "plain", True: "softcap+alibi+bias", "int8": "int8 cache",
                          "fp8": "fp8 cache"}.get(r["score_mods"], "all+dropout"),)
                        if all_rows else ()))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--mla", action="store_true",
                        help="only the MLA head-dim pairs (192/128, 512/512, decode 576/512), every score modifier")
    parser.add_argument("--all-rows", action="store_true", help="table rows for every specialisation, not only "
                                                                 "the plain one")
    parser.add_argument("--results", metavar="FILE", nargs="?", const=RESULTS_FILE,
                        help=f"compile every config (shipped and MLA) and save them with their fingerprint "
                             f"(default {RESULTS_FILE}; tests/test_static_gpu.py reads it)")
    parser.add_argument("--keep-going", action="store_true",
                        help="a config that fails to compile is reported (its error in the JSON) instead of "
                             "stopping the report; the exit status is 1 if any failed")
    args = parser.parse_args(argv)
    job_list = jobs("all") if args.results else jobs("mla" if args.mla else "shipped")
    rows = compile_many(job_list, args.workers, keep_going=args.keep_going)
    print(format_table(rows, all_rows=args.all_rows))
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"FAILED {r['kernel']} {r['arch']} {r['dtype']} hdim {r['head_dim']}/{r['head_dim_v']} "
              f"{r['block_m']}x{r['block_n']} w{r['num_warps']} s{r['num_stages']} mods={r['score_mods']}: "
              f"{r['error']}", file=sys.stderr)
    rows = [r for r in rows if "error" not in r] if failed else rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.results:
        with open(args.results, "w") as f:
            json.dump({"fingerprint": fingerprint(), "rows": rows, "failed": failed}, f, indent=0)
    bad = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    mods = [r for r in rows if r.get("score_mods") and r["score_mods"] not in QUANT_VARIANTS]
    quant = [r for r in rows if r.get("score_mods") in QUANT_VARIANTS]
    print(f"\n{len(rows)} kernel configs compiled ({len(mods)} of them with score modifiers: softcap, ALiBi, bias "
          f"(+ dropout for the dropout configs); {len(quant)} decoding 8-bit caches); "
          f"{len(bad)} spill" + (f"; {len(failed)} failed to compile." if failed else "."), file=sys.stderr)
    return 1 if failed else 0


# ------------------------------------------------------------------ KV-cache decoding
# triton_kernels/decode.py: compiled paged (the gather through the block table), with left
# padding, causal (from _CAUSAL); combine_kernel merges block_n splits per step.
_DECODE_KERNELS = ("decode_split_kernel", "combine_kernel")


def _decode_constexprs(block_n):
    return dict(PAGED=True, HAS_LEFTPAD=True, BLOCK_S=block_n)


if __name__ == "__main__":
    sys.exit(main())

