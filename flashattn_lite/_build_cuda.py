"""Just-in-time builds of csrc/cuda, cached like the CPU extension (see ``_build``).

Two libraries come from the same kernel sources:

* ``flashattn_lite_emu_<key>``: the kernels compiled by the host C++ compiler against
  the emulation header ``csrc/cuda/emu/cuda_emu.h``, registered as the CPU operators
  ``torch.ops.flashattn_lite_emu.fwd/bwd`` (the ``cuda_emu`` verification backend);
* ``flashattn_lite_cuda_<key>``: the kernels compiled by nvcc, registered as the CUDA
  implementation of ``torch.ops.flashattn_lite_C.fwd/bwd`` (the ``cuda`` backend).
  Only attempted where torch has CUDA, a device of compute capability 8.0 or newer is
  present, and nvcc is found.

The cache key covers every file under csrc/cuda, the flags, torch, Python, the
machine and the compiler; a file lock makes concurrent first use safe.
"""

import glob
import hashlib
import os
import platform
import subprocess
import sys
import threading

import torch

from . import _build

_lock = threading.Lock()
_state = {}  # {"emu": path or RuntimeError, "cuda": ...}

EMU_CFLAGS = ["-O2", "-std=c++17", "-fopenmp", "-Wno-unknown-pragmas", "-DNDEBUG"]
EMU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3", "-std=c++17"]


def cuda_dir():
    return os.path.join(_build.csrc_dir(), "cuda")


def emu_sources():
    root = cuda_dir()
    return [os.path.join(root, "emu", "attention_emu.cpp"), os.path.join(root, "emu", "emu_kernels.cpp")]


def cuda_sources():
    root = cuda_dir()
    return [os.path.join(root, "attention_cuda.cpp"), os.path.join(root, "fa_cuda.cu")]


def _hashed_files():
    root = cuda_dir()
    files = [f for f in glob.glob(os.path.join(root, "**", "*"), recursive=True)
             if os.path.isfile(f) and f.endswith((".h", ".cuh", ".cu", ".cpp"))]
    return sorted(files)


def cache_key(kind, flags):
    h = hashlib.sha256(kind.encode())
    root = cuda_dir()
    for path in _hashed_files():
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    for part in (*flags, torch.__version__, str(torch.version.cuda), sys.version, platform.machine(),
                 os.environ.get("CXX", "c++")):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _jit(name, sources, verbose, **kwargs):
    from filelock import FileLock
    from torch.utils import cpp_extension

    build_dir = os.path.join(_build.cache_root(), name)
    os.makedirs(build_dir, exist_ok=True)
    lib = os.path.join(build_dir, f"{name}.so")
    with FileLock(build_dir + ".lock"):
        baton = os.path.join(build_dir, "lock")  # torch's build baton, stale if a build was killed
        if os.path.exists(baton):
            os.remove(baton)
        try:
            cpp_extension.load(name=name, sources=sources, build_directory=build_dir, is_python_module=False,
                               verbose=verbose, **kwargs)
        except OSError:
            if not os.path.exists(lib):
                raise
            os.remove(lib)  # a library that exists but does not load: relink once
            subprocess.run(["ninja", "-C", build_dir], check=True, capture_output=True)
            torch.ops.load_library(lib)
    return lib


def _cached(kind, build, what):
    with _lock:
        if kind in _state:
            if isinstance(_state[kind], str):
                return _state[kind]
            raise RuntimeError(_state[kind])
        try:
            path = build()
        except Exception as exc:
            text = str(exc).strip().splitlines()
            if exc.__cause__ is not None:
                text += str(exc.__cause__).strip().splitlines()
            _state[kind] = RuntimeError(f"building {what} failed:\n" + "\n".join(text[-25:]))
            raise RuntimeError(str(_state[kind])) from exc
        _state[kind] = path
        return path


def build_emu(verbose=False):
    """Build (or reuse) and load the emulated-kernel CPU extension; returns its path."""
    def build():
        key = cache_key("emu", EMU_CFLAGS + EMU_LDFLAGS)
        return _jit(f"flashattn_lite_emu_{key}", emu_sources(), verbose, extra_cflags=EMU_CFLAGS,
                    extra_ldflags=EMU_LDFLAGS, extra_include_paths=[cuda_dir()])
    return _cached("emu", build, "the emulated CUDA kernels (cuda_emu)")


def cuda_arch_flags():
    major, minor = torch.cuda.get_device_capability()
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]


def cuda_unavailable_reason():
    """Why the real CUDA extension cannot be built here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if torch.version.cuda is None:
        return "this torch was built without CUDA"
    if torch.cuda.get_device_capability() < (8, 0):
        return "the CUDA C++ kernels need compute capability 8.0 or newer (mma.sync bf16, cp.async)"
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def build_cuda(verbose=False):
    """Build (or reuse) and load the CUDA extension; returns its path.  The operator
    schema lives in the CPU extension (csrc/ops.cpp), so that one is loaded first."""
    def build():
        why = cuda_unavailable_reason()
        if why:
            raise RuntimeError(why)
        _build.build_cpu()
        flags = CUDA_CFLAGS + cuda_arch_flags()
        key = cache_key("cuda", flags)
        return _jit(f"flashattn_lite_cuda_{key}", cuda_sources(), verbose, extra_cflags=["-O3", "-std=c++17"],
                    extra_cuda_cflags=flags, extra_include_paths=[cuda_dir()])
    return _cached("cuda", build, "the CUDA extension")
