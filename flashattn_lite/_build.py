"""Just-in-time build of the C++ extension (csrc/), cached on disk.

The cache key covers the source files' contents, the compiler flags, and the
torch and Python versions, so a changed source or a different torch never
reuses a stale binary.  A file lock makes concurrent first use from several
processes safe: one builds, the others wait and then load the result.

A binary built ahead of time by ``setup.py`` (``FLASHATTN_LITE_BUILD_EXT=1``) is
used first when present and it matches the running torch.
"""

import glob
import hashlib
import os
import platform
import sys
import threading

import torch

_lock = threading.Lock()
_state = {}  # "path" or "error", once known

# A plain source checkout (not pip-installed): <repo>/csrc beside <repo>/flashattn_lite
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def csrc_dir():
    # Installed (wheel or editable): the package flashattn_lite.csrc; else the checkout's csrc/
    try:
        import flashattn_lite.csrc as pkg
        return os.path.dirname(os.path.abspath(pkg.__file__))
    except ImportError:
        return CSRC


def cpu_sources():
    """The translation units of the CPU extension."""
    root = csrc_dir()
    return [os.path.join(root, "ops.cpp")] + sorted(glob.glob(os.path.join(root, "cpu", "*.cpp")))


def _hashed_files():
    """Everything the build reads: sources and headers."""
    root = csrc_dir()
    headers = sorted(glob.glob(os.path.join(root, "*.h")) + glob.glob(os.path.join(root, "cpu", "*.h")))
    return cpu_sources() + headers


def _vector_flags():
    """Compile for the host's vector ISA, capped at the one torch runs with: ATen's vec
    headers are told which one it is, and where torch was limited below the host
    (``ATEN_CPU_CAPABILITY=avx2`` or ``default``) the compiler may not use more."""
    flags = ["-march=native"]
    if platform.machine() in ("x86_64", "AMD64"):
        cap = torch.backends.cpu.get_cpu_capability()
        if cap == "AVX512":
            flags.append("-DCPU_CAPABILITY_AVX512")
        elif cap == "AVX2":
            flags += ["-mno-avx512f", "-DCPU_CAPABILITY_AVX2"]
        else:
            flags.append("-mno-avx")
    return flags


def cflags():
    return ["-O3", "-fopenmp", "-DNDEBUG", *_vector_flags()]


def ldflags():
    return ["-fopenmp"]


def _host_identity():
    """What -march=native compiles for, and who compiles: the CPU model and its
    feature flags, and the compiler named by $CXX (a cache shared between hosts
    must never hand one host another's instructions)."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        cpu = "".join(sorted(set(lines)))
    except OSError:
        pass
    return cpu + "|" + os.environ.get("CXX", "c++")


def cache_key(sources=None):
    h = hashlib.sha256()
    for path in sources or _hashed_files():
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    for part in (*cflags(), *ldflags(), torch.__version__, sys.version, platform.machine(), _host_identity()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def cache_root():
    return os.environ.get("FLASHATTN_LITE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "flashattn_lite")


STAMP = "_C.key"  # written by setup.py next to _C.so: the cache key it was built for


def _prebuilt(here=None):
    """Path of a library built by setup.py from these very sources, flags, torch and host, or None."""
    here = here or os.path.dirname(os.path.abspath(__file__))
    stamp = os.path.join(here, STAMP)
    if not os.path.exists(stamp):
        return None
    with open(stamp) as f:
        if f.read().strip() != cache_key():
            return None
    libs = glob.glob(os.path.join(here, "_C*.so"))
    return libs[0] if libs else None


def build_cpu(verbose=False):
    """Build (or reuse) the CPU extension and load it; returns the library path.

    Raises RuntimeError with the tail of the compiler output on failure.
    """
    with _lock:
        if "path" in _state:
            return _state["path"]
        if "error" in _state:
            raise RuntimeError(_state["error"])
        try:
            path = _prebuilt()
            if path is not None:
                torch.ops.load_library(path)
            else:
                path = _jit_build(verbose)  # builds if needed and loads it
        except Exception as exc:  # compiler missing, compile error, load error
            text = str(exc).strip().splitlines()
            if exc.__cause__ is not None:  # e.g. the dlopen error behind "Could not load this library"
                text += str(exc.__cause__).strip().splitlines()
            _state["error"] = "building the C++ CPU extension failed:\n" + "\n".join(text[-25:])
            raise RuntimeError(_state["error"]) from exc
        _state["path"] = path
        return path


def _jit_build(verbose):
    from filelock import FileLock
    from torch.utils import cpp_extension

    key = cache_key()
    name = f"flashattn_lite_C_{key}"
    build_dir = os.path.join(cache_root(), name)
    os.makedirs(build_dir, exist_ok=True)
    lib = os.path.join(build_dir, f"{name}.so")
    with FileLock(build_dir + ".lock"):
        # torch's own build baton: a build killed midway leaves it behind and every later
        # build would wait on it forever.  Holding our lock, nobody else is building.
        baton = os.path.join(build_dir, "lock")
        if os.path.exists(baton):
            os.remove(baton)
        # Always ask ninja: it is a no-op when the library is up to date and rebuilds a
        # missing one.  A library that exists but does not load (a link cut short) is
        # removed and linked again, once.
        def load():
            cpp_extension.load(name=name, sources=cpu_sources(), extra_cflags=cflags(), extra_ldflags=ldflags(),
                               build_directory=build_dir, is_python_module=False, verbose=verbose)

        try:
            load()
        except OSError:
            if not os.path.exists(lib):
                raise
            # cpp_extension will not rebuild twice in one process: run its ninja file directly
            os.remove(lib)
            import subprocess

            subprocess.run(["ninja", "-C", build_dir], check=True, capture_output=True)
            torch.ops.load_library(lib)
    return lib
