"""Static facts of the CUDA C++ kernels (csrc/cuda), no GPU needed.

Compiles csrc/cuda/fa_cuda.cu (every kernel instantiation and the launchers) with nvcc
for sm_80 and sm_90 (-Xptxas -v, host code with -Wall -Wextra), in parallel, and reads
per kernel: registers, spill stores/loads and stack frame (ptxas), dynamic shared
memory and threads per block (csrc/cuda/fa_config.h, through a tiny host program), and
the number of tensor-core instructions (HMMA) in the SASS (cuobjdump from Triton's
package, or from the CUDA toolkit).  Compiler warnings are collected.

    python benches/cuda_static_report.py [--json benches/results/cuda_static.json] [--md FILE]

Prints a table and the compile time; exits 1 if nvcc is missing or a compile fails.
"""

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
ARCHS = ("sm80", "sm90")
# the flags of the just-in-time build (torch's COMMON_NVCC_FLAGS + ours), plus -Xptxas -v and host warnings
NVCC_FLAGS = ["-std=c++17", "-O3", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
              "-Xptxas", "-v", "-Xcompiler", "-Wall,-Wextra"]
KERNELS = ("fwd_kernel", "bwd_preprocess_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel")
# per kernel name: the fa_config.h struct that sizes it
_CFG = {"fwd_kernel": "FwdCfg", "bwd_dkdv_kernel": "DkdvCfg", "bwd_dq_kernel": "DqCfg"}

_CONFIG_PROBE = r"""
#include <cstdio>
#include "fa_config.h"
template <int D> void row() {
  std::printf("fwd_kernel %d %d %d\n", D, fa::FwdCfg<D>::SMEM, fa::FwdCfg<D>::THREADS);
  std::printf("bwd_dkdv_kernel %d %d %d\n", D, fa::DkdvCfg<D>::SMEM, fa::DkdvCfg<D>::THREADS);
  std::printf("bwd_dq_kernel %d %d %d\n", D, fa::DqCfg<D>::SMEM, fa::DqCfg<D>::THREADS);
}
int main() {
  row<32>(); row<64>(); row<96>(); row<128>(); row<256>();
  std::printf("bwd_preprocess_kernel 0 0 %d\n", fa::PreCfg::THREADS);
}
"""


def find_tool(name):
    """Triton ships cuobjdump/nvdisasm/ptxas in triton/backends/nvidia/bin; else PATH / CUDA_HOME."""
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", name)
    return path if os.path.exists(path) else None


def config_table(tmp):
    src = os.path.join(tmp, "config_probe.cpp")
    exe = os.path.join(tmp, "config_probe")
    with open(src, "w") as f:
        f.write(_CONFIG_PROBE)
    subprocess.run([os.environ.get("CXX", "c++"), "-std=c++17", "-I", CUDA_DIR, "-o", exe, src], check=True)
    table = {}
    for line in subprocess.run([exe], check=True, capture_output=True, text=True).stdout.splitlines():
        kernel, d, smem, threads = line.split()
        table[(kernel, int(d))] = (int(smem), int(threads))
    return table


def compile_arch(nvcc, arch, tmp):
    obj = os.path.join(tmp, f"fa_cuda_{arch}.o")
    cc = arch[2:]
    cmd = [nvcc, *NVCC_FLAGS, f"-gencode=arch=compute_{cc},code=sm_{cc}", "-c", "-o", obj,
           os.path.join(CUDA_DIR, "fa_cuda.cu")]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return arch, obj, proc, time.time() - t0, " ".join(cmd)


def parse_ptxas(text):
    """{mangled name: {registers, spill_stores, spill_loads, stack}} from -Xptxas -v output."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
            out[name] = {}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            out[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            out[name]["registers"] = int(m.group(1))
    return out


def count_hmma(cuobjdump, obj):
    sass = subprocess.run([cuobjdump, "-sass", obj], check=True, capture_output=True, text=True).stdout
    counts, name = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            counts[name] = 0
        elif name and re.search(r"\bHMMA\.", line):
            counts[name] += 1
    return counts


def describe(mangled):
    kernel = next(k for k in KERNELS if k in mangled)
    dtype = "bf16" if "bfloat16" in mangled else "fp16"
    m = re.search(r"Li(\d+)E", mangled)
    return kernel, dtype, int(m.group(1)) if m else 0


def build_report():
    nvcc = shutil.which("nvcc") or find_tool("nvcc")
    if nvcc is None:
        raise SystemExit("nvcc not found")
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        raise SystemExit("cuobjdump not found")
    with tempfile.TemporaryDirectory() as tmp:
        table = config_table(tmp)
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(len(ARCHS)) as pool:
            results = list(pool.map(lambda a: compile_arch(nvcc, a, tmp), ARCHS))
        wall = time.time() - t0
        rows, meta = [], {"compile_wall_s": round(wall, 1), "commands": [], "warnings": []}
        for arch, obj, proc, seconds, cmd in results:
            meta["commands"].append(cmd)
            meta[f"compile_{arch}_s"] = round(seconds, 1)
            if proc.returncode != 0:
                raise SystemExit(f"nvcc failed for {arch}:\n{proc.stderr[-4000:]}")
            meta["warnings"] += [f"{arch}: {line}" for line in proc.stderr.splitlines() if "warning" in line.lower()]
            ptxas = parse_ptxas(proc.stderr)
            hmma = count_hmma(cuobjdump, obj)
            for mangled, info in sorted(ptxas.items()):
                kernel, dtype, d = describe(mangled)
                smem, threads = table[(kernel, d)]
                rows.append({"kernel": kernel, "dtype": dtype, "head_dim": d, "arch": arch, "threads": threads,
                             "registers": info["registers"], "spill_stores": info["spill_stores"],
                             "spill_loads": info["spill_loads"], "stack": info["stack"], "shared_bytes": smem,
                             "hmma": hmma.get(mangled, 0), "mangled": mangled})
    order = {k: i for i, k in enumerate(KERNELS)}
    rows.sort(key=lambda r: (r["arch"], order[r["kernel"]], r["head_dim"], r["dtype"]))
    return rows, meta


def markdown(rows):
    lines = ["| arch | kernel | head dim | dtype | threads | registers | spills (st/ld) | shared memory | HMMA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['kernel']} | {r['head_dim'] or '-'} | {r['dtype']} | {r['threads']} | "
                     f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['shared_bytes'] / 1024:.1f} KiB | {r['hmma']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the per-kernel table (and compile facts) here")
    ap.add_argument("--md", help="write the markdown table here")
    args = ap.parse_args(argv)
    rows, meta = build_report()
    table = markdown(rows)
    print(table)
    print(f"\ncompile wall time (both archs in parallel): {meta['compile_wall_s']} s "
          f"(sm80 {meta['compile_sm80_s']} s, sm90 {meta['compile_sm90_s']} s); warnings: {len(meta['warnings'])}")
    for w in meta["warnings"]:
        print("  " + w)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"kernels": rows, **meta}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
