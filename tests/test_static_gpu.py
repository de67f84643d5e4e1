"""Static GPU facts: every shipped Triton kernel config compiled for sm_80 and
sm_90 on the CPU, plain and with every score modifier (softcap, ALiBi, bias with
gradient, dropout), read back from ptxas and the
SASS (no GPU involved)."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(_BIN, "ptxas")),
                                reason="Triton's bundled ptxas is missing")

# Largest shared memory one block may use: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {"sm80": 163 * 1024, "sm90": 227 * 1024}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "flashattn_lite.static_report", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    return json.loads(out.read_text())


def test_every_shipped_config_compiled(report):
    from flashattn_lite.triton_kernels import configs

    for mods in (False, True, configs.DROPOUT):
        expected = {(configs.KERNELS[t], arch, hd, dclass, (c.block_m, c.block_n, c.num_warps, c.num_stages))
                    for t, arch, dclass, hd, c in configs.shipped_configs(mods)}
        got = {(r["kernel"], r["arch"], r["head_dim"], "fp32" if r["dtype"] == "fp32" else "lowp",
                (r["block_m"], r["block_n"], r["num_warps"], r["num_stages"]))
               for r in report if r["score_mods"] == mods}
        assert got == expected


def test_no_register_spills(report):
    spilling = [r for r in report if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, [(r["kernel"], r["arch"], r["dtype"], r["head_dim"], r["spill_stores"]) for r in spilling]


def test_no_ptxas_warnings(report):
    assert not [r["ptxas_warnings"] for r in report if r["ptxas_warnings"]]


def test_shared_memory_within_architecture_limit(report):
    over = [r for r in report if r["shared_bytes"] > SHARED_LIMIT[r["arch"]]]
    assert not over, [(r["kernel"], r["arch"], r["head_dim"], r["shared_bytes"]) for r in over]


def test_tensor_cores_used_for_half_precision(report):
    from flashattn_lite.triton_kernels import configs

    table = {v: k for k, v in configs.KERNELS.items()}
    for r in report:
        if r["dtype"] == "fp32":
            continue  # fp32 runs on the FMA units unless torch allows tf32
        if table[r["kernel"]] in configs.ELEMENTWISE_KERNELS:
            continue  # no matrix product (the split-KV combine)
        key = (table[r["kernel"]], "lowp", r["head_dim"], r["score_mods"])
        if r["arch"] == "sm90" and key in configs.SM90_MMA_SYNC:
            assert r["hmma"] > 0, f"{r['kernel']} hd={r['head_dim']}: no tensor-core instructions on sm_90"
        elif r["arch"] == "sm90":
            assert r["hgmma"] > 0, f"{r['kernel']} hd={r['head_dim']}: no HGMMA on sm_90"
        else:
            assert r["hmma"] > 0, f"{r['kernel']} hd={r['head_dim']}: no HMMA on sm_80"
