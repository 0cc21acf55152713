"""benchmarks/compile_report.py: a kernel compiled for a GPU on a machine without one, with
the registers, spills and shared memory ptxas reports."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_report.py"


def ptxas_available() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


pytestmark = pytest.mark.skipif(not ptxas_available(), reason="needs Triton with its ptxas")


def report(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)  # fmt: skip


@pytest.mark.parametrize("arch", [80, 90])
def test_a_kernel_compiles_for_a_gpu_and_reports_its_resources(tmp_path, arch):
    out = tmp_path / "rows.json"
    run = report("int8_attention:d64", "--arch", str(arch), "--json", str(out))
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert [(r["job"], r["kernel"]) for r in rows] == [("int8_attention:d64", "_int8_qk_kernel")]
    row = rows[0]
    # a thread has at most 255 registers; a block at most 163 KiB (A100) or 227 KiB (H100)
    assert 0 < row["registers"] <= 255 and row["spill_bytes"] >= 0
    assert 0 < row["shared_kib"] <= (163 if arch == 80 else 227)
    assert row["constants"]["BLOCK_D"] == 64
    # the script compiles with Triton 3.10's default (no fusion); the launch asks for FMAs
    assert row["fp_fusion"] is True
    assert (
        f"Compiled for sm_{arch}" in run.stdout
        and "| int8_attention:d64 | _int8_qk_kernel |" in run.stdout
    )


def test_shared_memory_only_reads_the_full_compiles_figures(tmp_path):
    """The tests of shared memory below stop once Triton has allocated it
    (--shared-memory-only): the figures they read must be the full compile's, kernel by
    kernel (pipelined loads and layout conversions included), with registers and spills left
    blank rather than guessed, and the short path must be the one taken."""
    jobs = ("int8_attention:d64", "chunk_scalar_decay:fp16:d64")
    rows = {}
    for flag in ((), ("--shared-memory-only",)):
        out = tmp_path / f"rows{len(flag)}.json"
        run = report(*jobs, "--arch", "80", *flag, "--json", str(out))
        assert run.returncode == 0, run.stderr
        assert "lowering in full" not in run.stderr
        rows[bool(flag)] = json.loads(out.read_text())
    full, quick = rows[False], rows[True]
    assert len(full) == len(quick) == 7

    def layout(r):
        return r["job"], r["kernel"], r["constants"], r["warps"], r["stages"], r["shared_kib"]

    assert [layout(r) for r in quick] == [layout(r) for r in full]
    assert all(r["shared_kib"] > 0 for r in full)
    assert all(r["registers"] > 0 for r in full)
    assert all(r["registers"] is None and r["spill_bytes"] is None for r in quick)


def test_jobs_cover_every_kernel_module_and_a_wrong_name_is_refused():
    listed = report("--list")
    assert listed.returncode == 0, listed.stderr
    families = {name.split(":")[0] for name in listed.stdout.split()}
    modules = {p.stem for p in (ROOT / "kernels").glob("*.py")} - {"__init__", "common", "limits"}
    assert families == modules
    wrong = report("no_such_kernel")
    assert wrong.returncode != 0 and "no job matches" in wrong.stderr


def test_a_kernel_launched_twice_is_reported_twice(tmp_path):
    """The chunked forward's states kernel runs again in the backward pass: the second
    launch reuses the compiled kernel, of which ptxas says nothing the second time."""
    out = tmp_path / "rows.json"
    run = report("chunk_scalar_decay:fp16:d64", "--json", str(out))
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    states = [r for r in rows if r["kernel"] == "_fwd_states_kernel"]
    assert len(states) == 2 and states[0] == states[1]
    assert all(r["registers"] is not None and r["spill_bytes"] is not None for r in rows)


# jobs and the kernels each launches, with why their shared memory is worth checking
LARGE_TILES = {
    # the default 128 x 128 blocks at the head_dims and dtypes where a block is computed in
    # smaller tiles (_tiles): with 64 x 64 tiles at 16-bit d256 it asked for 200 KiB
    "block-sparse": ([f"block_sparse_attention:{dt}:d{d}:block128"
                      for dt, d in (("fp16", 128), ("fp16", 256), ("fp32", 128))], 3),
    # the states kernel, carrying 64 value columns in 3 pipeline stages, asked for 192.5 KiB
    # at float32 and K = V = 128, and 32 columns in 2 stages 200 KiB at K = V = 256
    "delta-rule": (["chunk_delta_rule:fp16:d128", "chunk_delta_rule:fp32:d128",
                    "chunk_delta_rule:fp32:d256"], 3),
    # the backward's dq/dk/dv kernel at float32 asked for 176 KiB at K = 64 (64 value
    # columns) and 168 KiB at K = 256 (chunks of 64), the states kernels 208.5 KiB at K = 256
    # (forward: states, outputs; backward: states again, states, dq/dk/dv, dg)
    "simple-gla": (["chunk_scalar_decay:fp32:d64", "chunk_scalar_decay:fp16:d128",
                    "chunk_scalar_decay:fp32:d256"], 6),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(LARGE_TILES))
@pytest.mark.parametrize(("arch", "limit_kib"), [(80, 163), (90, 227)])
def test_large_tiles_fit_the_cards_shared_memory(tmp_path, arch, limit_kib, family):
    """Every kernel of these jobs, as compiled for an A100 or an H100, asks for no more
    shared memory than the card has per block. Spills are not asserted: they change with
    the ptxas version."""
    out = tmp_path / "rows.json"
    jobs, kernels = LARGE_TILES[family]
    run = report(*jobs, "--arch", str(arch), "--shared-memory-only", "--json", str(out))
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == kernels * len(jobs) and all("error" not in r for r in rows), rows
    assert all(r["shared_kib"] <= limit_kib for r in rows), [
        (r["job"], r["kernel"], r["shared_kib"]) for r in rows
    ]


# (job, arch, shared memory per block in KiB): at 16 bits and head_dim 256 none of dK/dV's
# tilings fitted an A100 (164.8-273 KiB). (A T4, sm_75 with 64 KiB, at head_dim 128: in
# tests/test_compile_report_smaller_cards.py.)
FLASH_ON_SMALLER_CARDS = [
    ("flash_attention:fp16:d256", 80, 163),
    ("flash_attention:fp32:d256", 80, 163),
]


@pytest.mark.parametrize(("job", "arch", "limit_kib"), FLASH_ON_SMALLER_CARDS)
def test_flash_attention_has_a_tiling_each_card_holds(tmp_path, job, arch, limit_kib):
    """The backward kernels are tuned among several tilings, and the tuner skips those that
    do not fit a card's shared memory: one of each kernel's must fit, causal or not, on an
    A100 (sm_80) at head_dim 256, and the forward's one tiling must."""
    out = tmp_path / "rows.json"
    run = report(job, "--arch", str(arch), "--shared-memory-only", "--json", str(out))
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert all("error" not in r for r in rows), rows
    smallest: dict[tuple, float] = {}
    for r in rows:
        key = r["kernel"], r["constants"]["CAUSAL"]
        smallest[key] = min(smallest.get(key, float("inf")), r["shared_kib"])
    kernels = {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    assert {k for k, _ in smallest} == kernels and len(smallest) == 6, smallest
    assert all(kib <= limit_kib for kib in smallest.values()), smallest
    forward = [r["shared_kib"] for r in rows if r["kernel"] == "_fwd_kernel"]
    assert len(forward) == 2 and max(forward) <= limit_kib, forward
