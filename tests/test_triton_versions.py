"""The oldest supported Triton (``backends.triton.MIN_TRITON``): a representative part of
the interpreter suite runs under it, installed with pip into a cache folder next to the
C++ extension's (``FLASHATTN_LITE_CACHE``, default ~/.cache/flashattn_lite) and put first
on the path of a child pytest.  The full suite runs under the installed (newest) Triton.
Also the version floor itself: an older Triton makes the backend unavailable, with the
reason, and never breaks the import."""

import os
import subprocess
import sys

import pytest

from flashattn_lite import _build
from flashattn_lite.backends import triton as triton_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLDEST = "{}.{}.0".format(*triton_backend.MIN_TRITON)
# Every kernel family once, at interpreter shapes: forward/backward with each score
# modifier, windows, GQA, head dims, varlen, MLA, decoding from a paged cache (also an
# int8 / e4m3 one), dropout.  (The last nodeid runs every backend's scenarios: the cpu and
# reference ones take a second.)
SUBSET = ["tests/test_triton.py::test_gqa", "tests/test_triton.py::test_window", "tests/test_triton.py::test_head_dims",
          "tests/test_triton.py::test_empty_sequences", "tests/test_triton.py::test_gradient_through_lse",
          "tests/test_triton.py::test_every_element_written", "tests/test_triton_mla.py::test_varlen_dv_differs",
          "tests/test_triton_mla.py::test_decode_absorbed_mla_576_512", "tests/test_triton_mla.py::test_dkdv_in_two_passes",
          "tests/test_features.py::test_varlen_softcap_alibi[triton]", "tests/test_features.py::test_varlen_dropout[triton]",
          "tests/test_features.py::test_dropout_with_mask[triton]",
          "tests/test_features.py::test_dropout_stream_is_triton_philox_on_split_counter",
          "tests/test_kvcache.py::test_paged_window_gqa", "tests/test_kvcache.py::test_append_causal",
          "tests/test_kvcache_quant.py::test_quantized_cache_matches_the_dequantized_oracle"]


def _oldest_triton():
    """Folder holding Triton ``OLDEST`` (pip --target, installed once and reused)."""
    target = os.path.join(_build.cache_root(), f"triton-{OLDEST}")
    if not os.path.exists(os.path.join(target, "triton", "__init__.py")):
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                               target + ".partial", f"triton=={OLDEST}"], capture_output=True, text=True)
        assert proc.returncode == 0, f"pip could not install triton=={OLDEST}:\n{proc.stderr[-2000:]}"
        os.replace(target + ".partial", target)
    return target


def test_interpreter_suite_under_the_oldest_triton():
    target = _oldest_triton()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([target, ROOT] + [os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "1"}
    check = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__, triton.__file__)"],
                           env=env, capture_output=True, text=True)
    assert check.stdout.startswith(OLDEST) and check.stdout.split()[1].startswith(target), check.stdout + check.stderr
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SUBSET],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail


def test_an_older_triton_is_declined_with_the_reason(monkeypatch):
    monkeypatch.setattr(triton_backend, "triton_version", lambda: (3, 2))
    ok, why = triton_backend.available()
    assert not ok and "triton 3.2 is older than the oldest supported 3.4" in why
    monkeypatch.setattr(triton_backend, "triton_version", lambda: None)
    assert triton_backend.available() == (False, "triton is not installed")


@pytest.mark.parametrize("version", [(3, 4), (3, 9), (4, 0)])
def test_supported_versions_are_available(monkeypatch, version):
    monkeypatch.setattr(triton_backend, "triton_version", lambda: version)
    ok, why = triton_backend.available()
    assert ok, why  # the test suite runs the interpreter (TRITON_INTERPRET=1)


def test_the_installed_version_is_read_without_importing_triton():
    code = ("import sys; from flashattn_lite.backends import triton as t; v = t.triton_version(); "
            "print(v, 'triton' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    version, imported = proc.stdout.split(")")
    assert version.startswith("(3, ") and imported.strip() == "False"


def test_configs_keyed_by_the_running_triton(monkeypatch):
    """A config an older Triton's ptxas cannot build is replaced for that Triton only, in the
    lookup and in the shipped list the static report compiles."""
    import torch

    from flashattn_lite.triton_kernels import configs

    key = ("fwd", "sm90", "lowp", 16)
    newest = configs.fwd_config(16, torch.float16, (9, 0), configs.DROPOUT)
    for version, replaced in configs._BY_TRITON.items():
        monkeypatch.setattr(configs, "triton_minor", lambda v=version: v)
        for (kernel, arch, dclass, hd, mods), cfg in replaced.items():
            lookup = {"fwd": configs.fwd_config, "bwd_dkdv": configs.bwd_dkdv_config,
                      "bwd_dq": configs.bwd_dq_config}[kernel]
            dtype = torch.float32 if dclass == "fp32" else torch.bfloat16
            assert lookup(hd, dtype, (int(arch[2]), 0), mods) == cfg
            assert (kernel, arch, dclass, hd, cfg) in set(configs.shipped_configs(mods))
    monkeypatch.setattr(configs, "triton_minor", lambda: (3, 7))
    assert configs.fwd_config(16, torch.float16, (9, 0), configs.DROPOUT) != newest  # the 3.7 entry
    assert configs.fwd_config(16, torch.float16, (9, 0), True) == configs.fwd_config(16, torch.float16, (9, 0), True)
    monkeypatch.setattr(configs, "triton_minor", lambda: (3, 9))
    assert configs.fwd_config(16, torch.float16, (9, 0), configs.DROPOUT) == newest
    assert key + (newest,) in set(configs.shipped_configs(configs.DROPOUT))
