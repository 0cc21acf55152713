"""benchmarks/compile_report.py for the cards with less shared memory per block than an
A100: launches the card refuses, as it would, and the smaller shapes they fall back on.
(A file of its own, so that the test runner hands it to a worker beside the other file.)"""

import json

import pytest
from test_compile_report import ptxas_available, report

pytestmark = pytest.mark.skipif(not ptxas_available(), reason="needs Triton with its ptxas")


# (arch, shared memory per block in KiB, jobs): launches whose preferred shapes a smaller
# card refuses, each compiled as the card would take it. sm_86 (L4, RTX 30xx and 40xx):
# flash attention's float32 forward asked for 140 KiB at head_dim 128, the float32 states
# kernels 104-112.5 KiB at K = 128, block-sparse dK/dV 100.8 KiB at 16 bits and head_dim
# 256. sm_75 (T4): simple_gla's dq/dk/dv kernel asked for 112 KiB at 16 bits and K = 128
# (it falls back on chunks of 32), the delta rule's states kernel 64 KiB and 8 bytes at
# K = 256 (chunks of 32), flash attention's backward 80-192 KiB at 16 bits and head_dim
# 128 (every tuned tiling but the two smallest), block-sparse attention's backward 96-128
# KiB there (smaller tiles).
SMALLER_CARDS = [
    (86, 99, ["flash_attention:fp32:d128", "chunk_scalar_decay:fp32:d128",
              "chunk_delta_rule:fp32:d128", "block_sparse_attention:fp16:d256:block64"]),
    (75, 64, ["chunk_scalar_decay:fp16:d128", "chunk_delta_rule:fp16:d256",
              "flash_attention:fp16:d128", "block_sparse_attention:fp16:d128:block64"]),
]  # fmt: skip


@pytest.mark.parametrize(("arch", "limit_kib", "jobs"), SMALLER_CARDS)
def test_a_card_with_less_shared_memory_gets_launch_shapes_it_holds(
    tmp_path, arch, limit_kib, jobs
):
    """The report refuses a launch that asks for more shared memory than the card has, as
    the card would; the launchers then fall back on smaller shapes (first_that_fits). Each
    job must end with every kernel launched in a shape that fits, after at least one
    refusal (these are the launches that did not fit before the fallback)."""
    out = tmp_path / "rows.json"
    run = report(*jobs, "--arch", str(arch), "--shared-memory-only", "--json", str(out))
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
    assert all(r["fits"] == (r["shared_kib"] <= limit_kib) for r in rows)
    for job in jobs:
        mine = [r for r in rows if r["job"] == job]
        assert any(not r["fits"] for r in mine), f"{job}: nothing was refused"
        # a refused launch is followed by another of the same kernel: the last one fits
        last = {r["kernel"]: r for r in mine}
        assert all(r["fits"] for r in last.values()), (job, last)
    assert "(refused)" in run.stdout
