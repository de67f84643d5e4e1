"""Run test cases in child processes, so that a crash (segfault, abort, double free) or a
hang fails the one case that caused it instead of killing the pytest run.

A case module defines ``CASES = {name: function(backend)}``; a case passes when its
function returns, and fails with the exception it raises (use :func:`expect_error` for
the inputs that must be refused).  :func:`results` runs every case of a module for one
backend in as few children as possible: one child runs the cases in order and reports
each; when it dies or stops answering, the case it was in is recorded as crashed or
hung and a new child continues with the cases after it.

Used as a script (by :func:`results`): ``python isolated.py MODULE_PATH BACKEND CASE...``.
"""

import json
import os
import subprocess
import sys
import time

_CHILD_TIMEOUT = 600  # seconds for one child to finish its cases (a hang costs this once; the first child may
# also build the C++ extension, minutes on 2 cores)
_cache = {}


class ExpectedErrorMissing(AssertionError):
    pass


def expect_error(fn, types=(ValueError, TypeError, RuntimeError, NotImplementedError), match=None):
    """Call ``fn``; it must raise one of ``types`` whose message names the problem
    (contains ``match`` when given, case-insensitive).  ``types``: one exception class or a tuple."""
    if isinstance(types, type):
        types = (types,)
    try:
        fn()
    except types as e:
        if match is not None and match.lower() not in str(e).lower():
            raise AssertionError(f"raised {type(e).__name__} without naming {match!r}: {e}") from None
        return e
    raise ExpectedErrorMissing(f"no error raised (expected {', '.join(t.__name__ for t in types)}"
                               f"{' naming ' + repr(match) if match else ''})")


def results(module_path, backend, names):
    """{case: (ok, detail)} for ``names`` of ``module_path`` on ``backend`` (cached per run)."""
    key = (module_path, backend)
    if key not in _cache:
        _cache[key] = _run_all(module_path, backend, list(names))
    return _cache[key]


def _run_all(module_path, backend, names):
    out = {}
    remaining = list(names)
    while remaining:
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONFAULTHANDLER="1")
        cmd = [sys.executable, os.path.abspath(__file__), module_path, backend, *remaining]
        started = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_CHILD_TIMEOUT, env=env)
            stdout, stderr, code, hung = proc.stdout, proc.stderr, proc.returncode, False
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            code, hung = None, True
        current = None
        for line in stdout.splitlines():
            if not line.startswith("@@"):
                continue
            msg = json.loads(line[2:])
            if "start" in msg:
                current = msg["start"]
            else:
                out[msg["case"]] = (msg["ok"], msg["detail"])
                current = None
        done = [n for n in remaining if n in out]
        if current is None and len(done) == len(remaining):
            break
        if current is None:  # died before starting a case (import error, say)
            for n in remaining:
                if n not in out:
                    out[n] = (False, f"child failed before the case ran (exit {code}): {stderr[-2000:]}")
            break
        what = (f"hung (no answer in {time.time() - started:.0f} s)" if hung
                else f"crashed the process (exit code {code}, signal {-code if code and code < 0 else None})")
        out[current] = (False, f"{what}; stderr tail:\n{stderr[-3000:]}")
        remaining = remaining[remaining.index(current) + 1:]
    return out


def _child(module_path, backend, names):
    import importlib.util
    import traceback
    import zlib

    sys.path.insert(0, os.path.dirname(os.path.abspath(module_path)))
    spec = importlib.util.spec_from_file_location("_isolated_cases", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import torch

    import flashattn_lite as fl

    for name in names:
        print("@@" + json.dumps({"start": name}), flush=True)
        torch.manual_seed(zlib.crc32(name.encode()))
        try:
            with fl.use_backend(backend if backend != "any" else "auto"):
                module.CASES[name](backend)
            ok, detail = True, ""
        except Exception as e:  # noqa: BLE001  (every failure is reported to the parent)
            ok, detail = False, "".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:]
        print("@@" + json.dumps({"case": name, "ok": ok, "detail": detail}), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3:])
