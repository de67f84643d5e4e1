"""Static GPU facts: every shipped Triton kernel config (and the configs of the MLA head-dim
pairs) compiled for sm_80 and sm_90 on the CPU, plain and with every score modifier
(softcap, ALiBi, bias with gradient, dropout), read back from ptxas and the SASS (no GPU
involved).

Compiling all of them takes minutes, so the full report is saved in
``benches/results/static_gpu.json`` (``python -m flashattn_lite.static_report --results``)
with the fingerprint of what it was compiled from: Triton's version and a hash of the
kernel sources, the configs and the report module.  When the fingerprint matches, the
tests read the saved rows and recompile a sample of them (the most register-hungry config
of every kernel and architecture, and every MLA pair's forward), which must reproduce the
saved facts exactly; when it does not (another Triton, or kernels changed without
regenerating the report), everything is compiled here.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(_BIN, "ptxas")),
                                reason="Triton's bundled ptxas is missing")

from flashattn_lite import static_report  # noqa: E402

# Largest shared memory one block may use: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {"sm80": 163 * 1024, "sm90": 227 * 1024}
SAVED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), static_report.RESULTS_FILE)
FACTS = ("registers", "spill_stores", "spill_loads", "shared_bytes", "hgmma", "hmma")


def _compile(job_list, tmp_path_factory):
    """Compile in a child process (TRITON_INTERPRET unset); list of rows."""
    folder = tmp_path_factory.mktemp("static")
    (folder / "jobs.json").write_text(json.dumps(job_list))
    code = ("import json, sys\nfrom flashattn_lite import static_report as s\n"
            "jobs = [tuple(j) for j in json.load(open(sys.argv[1]))]\n"
            "json.dump(s.compile_many(jobs), open(sys.argv[2], 'w'))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code, str(folder / "jobs.json"), str(folder / "rows.json")],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((folder / "rows.json").read_text())


def _sample(rows):
    """The most register-hungry row of every (kernel, arch), and every MLA pair's forward rows."""
    top = {}
    for r in rows:
        key = (r["kernel"], r["arch"])
        if key not in top or r["registers"] > top[key]["registers"]:
            top[key] = r
    mla = [r for r in rows if r.get("head_dim_v") not in (None, r["head_dim"]) and r["kernel"] == "fwd_kernel"
           and not r["score_mods"]]
    return list(top.values()) + mla


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    saved = None
    if os.path.exists(SAVED):
        with open(SAVED) as f:
            saved = json.load(f)
    if saved is None or saved["fingerprint"] != static_report.fingerprint():
        # stale or missing: the facts of these sources under this Triton, compiled now
        return _compile([list(j) for j in static_report.jobs("all")], tmp_path_factory)
    assert not saved.get("failed"), f"configs that failed to compile: {saved['failed']}"
    rows = saved["rows"]
    sample = _sample(rows)
    live = _compile([list(static_report.job_of(r)) for r in sample], tmp_path_factory)
    for old, new in zip(sample, live):
        assert {k: old[k] for k in FACTS} == {k: new[k] for k in FACTS}, (static_report.job_of(old), old, new)
    return rows


def test_every_shipped_config_compiled(report):
    rows = report
    assert {static_report.job_of(r) for r in rows} == set(static_report.jobs("all"))
    assert len(rows) == len(static_report.jobs("all"))


def test_no_register_spills(report):
    """0 spill bytes everywhere but the few configs listed, with their reason, in
    ``configs.known_spills()`` (the running Triton's), which may not spill more than listed there."""
    from flashattn_lite.triton_kernels import configs

    table = {v: k for k, v in configs.KERNELS.items()}
    spilling = []
    for r in report:
        key = (table[r["kernel"]], r["arch"], "fp32" if r["dtype"] == "fp32" else "lowp",
               _bucket(r), r["score_mods"])
        allowed = configs.known_spills().get(key, (0, None))[0]
        if r["spill_stores"] + r["spill_loads"] > allowed:
            spilling.append(static_report.job_of(r) + (r["spill_stores"] + r["spill_loads"],))
    assert not spilling, spilling


def _bucket(row):
    """The config table key of a row's head dims (decoding's 576 is its own key)."""
    from flashattn_lite.triton_kernels import configs

    if row["head_dim"] > configs.HEAD_DIM_BUCKETS[-1]:
        return row["head_dim"]
    return configs.bucket(row["head_dim"], row.get("head_dim_v"))


def test_no_ptxas_warnings(report):
    rows = report
    assert not [r["ptxas_warnings"] for r in rows if r["ptxas_warnings"]]


def test_shared_memory_within_architecture_limit(report):
    rows = report
    over = [r for r in rows if r["shared_bytes"] > SHARED_LIMIT[r["arch"]]]
    assert not over, [(r["kernel"], r["arch"], r["head_dim"], r["shared_bytes"]) for r in over]


def test_tensor_cores_used_for_half_precision(report):
    from flashattn_lite.triton_kernels import configs

    rows = report
    table = {v: k for k, v in configs.KERNELS.items()}
    for r in rows:
        if r["dtype"] == "fp32":
            continue  # fp32 runs on the FMA units unless torch allows tf32
        if table[r["kernel"]] in configs.ELEMENTWISE_KERNELS:
            continue  # no matrix product (the split-KV combine)
        key = (table[r["kernel"]], "lowp", _bucket(r), r["score_mods"])
        if r["arch"] == "sm90" and key in configs.SM90_MMA_SYNC:
            assert r["hmma"] > 0, f"{r['kernel']} hd={r['head_dim']}: no tensor-core instructions on sm_90"
        elif r["arch"] == "sm90":
            assert r["hgmma"] > 0, f"{r['kernel']} hd={r['head_dim']}: no HGMMA on sm_90"
        else:
            assert r["hmma"] > 0, f"{r['kernel']} hd={r['head_dim']}: no HMMA on sm_80"
