"""Compile the Triton kernels for a GPU without one: registers, spills and shared memory.

    python benchmarks/compile_report.py                   # every job, for sm_90 (H100)
    python benchmarks/compile_report.py --arch 80 flash   # the jobs whose name has "flash"
    python benchmarks/compile_report.py --arch 75 fp16    # a T4 (86: an L4, RTX 30xx/40xx)
    python benchmarks/compile_report.py --list            # the job names
    python benchmarks/compile_report.py --shared-memory-only flash  # faster

Whether a tile fits a card's shared memory, or spills registers to local memory (the usual
reason a kernel is slower than its tile size promises), is decided at compile time, and
Triton compiles for any NVIDIA architecture on any Linux machine: its wheel ships ``ptxas``.
This script runs each kernel's launcher on small CPU tensors with Triton's driver replaced
by one that reports the chosen architecture and launches nothing; every launch compiles
(every configuration of an autotuned kernel too) and ``ptxas``'s report is read. A job is a
launcher at one dtype and size; the table has one row per compiled kernel:

    job  kernel  constants (the launch's tiles and switches: BLOCK_*, TILE_*, CAUSAL, ...)
    warps  stages  registers  spill stores (bytes per thread)  shared memory (KiB; an H100
    block can have 227, an A100 163, an L4 or RTX 30xx/40xx 99, a T4 64)

A launch asking for more shared memory than the card has per block is refused as the card
would refuse it (``OutOfResources``, marked "(refused)"), so the launchers' fallbacks to
smaller tiles (``first_that_fits``) and the autotuner's skipping run as they would there.

Shared memory is fixed early: Triton allocates it on the GPU dialect (TTGIR), before any
LLVM IR exists. ``--shared-memory-only`` stops there, which takes about a fifth of the time,
and leaves registers and spills blank (LLVM, PTX and ``ptxas`` never run). ``--json`` also
records whether each kernel was compiled with multiply-add fusion (every launch asks for it;
the script's own default is Triton 3.10's, off, so a launch that does not ask shows). The
kernel comments' "compiled for sm_90" figures come from this script. It relies on Triton
internals (the driver, ``JITFunction.run``, ``Autotuner.run``, the stages hook, the passes
before shared-memory allocation) as of Triton 3.9; numbers are per Triton and ``ptxas``
version. Without Triton it says so and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

# before Triton is imported: compile for real (not the interpreter), in a fresh cache so
# that every kernel is compiled and reported here
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="effarch_compile_report_")
# Triton 3.10's default (no FMA fusion unless a launch asks): every launch of ours asks, and
# each row records what the compiled kernel got
os.environ["TRITON_DEFAULT_FP_FUSION"] = "0"

from _checkout import use_source_checkout  # noqa: E402  (beside this script)

use_source_checkout()

import torch  # noqa: E402

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - a machine without Triton
    sys.exit("compile_report.py: Triton is not installed (pip install triton, on Linux)")

ROWS: list[dict] = []  # one per compiled kernel
PTXAS: dict[str, tuple[int | None, int | None]] = {}  # registers, spills by kernel hash
JOB = {"name": ""}  # the job whose launcher is running


# The shared memory one block may opt in to (bytes; Triton's max_shared_mem), by compute
# capability: a launch asking for more is refused, as the card would refuse it
SHARED_MEMORY = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


class CompileOnlyDriver:
    """Triton's active driver, for a machine without a GPU: it names the target and a CPU
    device, and the launches it would serve are never made (``warmup=True`` below)."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


_jit_run = JITFunction.run


def _compile_and_record(self, *args, grid, warmup, **kwargs):
    """``JITFunction.run`` compiling only (``warmup=True``), with ptxas's report recorded."""
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # ptxas's report is printed to stdout
            kernel = _jit_run(self, *args, grid=grid, warmup=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - a configuration that does not compile is a row
        ROWS.append({"job": JOB["name"], "kernel": self.__name__, "error": f"{err!s:.200}"})
        return None
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores", text)
    # ptxas reports a kernel as it compiles it; a launch identical to an earlier one of this
    # run (another job's) reuses that kernel, so its figures are recalled by the kernel's hash
    if regs:
        PTXAS[kernel.hash] = (int(regs[-1]), int(spills[-1]) if spills else 0)
    registers, spill_bytes = PTXAS.get(kernel.hash, (None, None))
    constants = {k: v for k, v in kwargs.items() if k.isupper() and k != "PRECISION"}
    limit = SHARED_MEMORY[driver.active.arch]
    ROWS.append({
        "job": JOB["name"], "kernel": self.__name__, "constants": constants,
        "warps": kernel.metadata.num_warps, "stages": kernel.metadata.num_stages,
        "registers": registers, "spill_bytes": spill_bytes,
        "shared_kib": round(kernel.metadata.shared / 1024, 2),
        "fits": kernel.metadata.shared <= limit,
        "fp_fusion": kernel.metadata.enable_fp_fusion,
    })  # fmt: skip
    if kernel.metadata.shared > limit:  # as the card would refuse it, before launching
        raise OutOfResources(kernel.metadata.shared, limit, "shared memory")
    return kernel


def _allocate_shared_memory(src, metadata: dict, backend, options, capability: int) -> None:
    """The first passes of Triton 3.9's ``make_llir``, up to shared-memory allocation, on the
    kernel's TTGIR module; its metadata gets what ``make_llir`` would read from the module.
    Lowering to LLVM IR, most of a compile's time, is skipped."""
    from triton._C.libtriton import ir, nvidia, passes  # internals: another Triton may differ
    from triton.backends.nvidia.compiler import get_ptx_version_from_options

    pm = ir.pass_manager(src.context)
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    passes.ttgpuir.add_allocate_warp_groups(pm, False)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    ptx_version = get_ptx_version_from_options(options, backend.target.arch)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, capability, ptx_version)
    pm.run(src, "make_llir")
    shared = src.get_int_attr("ttg.shared")
    if shared is None:
        raise RuntimeError("no ttg.shared attribute after shared-memory allocation")
    metadata["shared"] = shared
    metadata["num_warps"] = src.get_int_attr("ttg.total-num-warps") or metadata["num_warps"]
    metadata["name"] = src.get_entry_func_name()
    metadata.update(tmem_size=None, global_scratch_size=0, global_scratch_align=1,
                    profile_scratch_size=0, profile_scratch_align=1)  # fmt: skip


def _shared_memory_only(*args):
    """Triton's ``knobs.runtime.add_stages_inspection_hook``: called with no arguments for a
    cache key, then with a backend's stages. The LLVM IR stage becomes the passes up to
    shared-memory allocation, the PTX and cubin stages return nothing; nothing is launched.
    Should another Triton's passes differ (an error building them), the kernel is lowered in
    full and only ``ptxas`` is skipped."""
    if not args:
        return "effarch-shared-memory-only", "effarch-shared-memory-only"
    backend, stages, options, _language, capability = args
    full_llir, full_ptx = stages["llir"], stages["ptx"]

    def llir(src, metadata):
        try:
            _allocate_shared_memory(src, metadata, backend, options, capability)
        except (ImportError, AttributeError, TypeError, RuntimeError) as err:
            warnings.warn(f"compile_report.py: lowering in full ({err!s:.100})", stacklevel=1)
            return full_llir(src, metadata)
        return ""  # no LLVM IR: the PTX stage below has nothing to translate

    stages["llir"] = llir
    stages["ptx"] = lambda src, metadata: full_ptx(src, metadata) if src else ""
    stages["cubin"] = lambda src, metadata: b""
    return None


def _compile_every_config(self, *args, **kwargs):
    """``Autotuner.run`` compiling each configuration instead of timing them (the tuner
    skips those the card refuses)."""
    for config in self.configs:
        with contextlib.suppress(OutOfResources):
            self.fn.run(*args, **kwargs, **config.all_kwargs())


# --- the jobs: each kernel's launcher at a dtype and size ---------------------------------


def _r(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


def flash(dtype: torch.dtype, d: int) -> None:
    from effarch_kernels.flash_attention import flash_attention_backward, flash_attention_forward

    q, k, v = (_r(2, 1024, 4, d, dtype=dtype) for _ in range(3))
    for causal in (False, True):
        o, lse = flash_attention_forward(q, k, v, causal, d**-0.5)
        flash_attention_backward(torch.randn_like(o), q, k, v, o, lse, causal, d**-0.5)


def block_sparse(dtype: torch.dtype, d: int, block: int) -> None:
    from effarch_kernels.block_sparse_attention import block_sparse_backward, block_sparse_forward

    q, k, v = (_r(1, 1024, 2, d, dtype=dtype) for _ in range(3))
    n = 1024 // block
    tile_id = torch.full((1, 1, n, n), -1, dtype=torch.int32)  # every tile full
    count = torch.full((1, 1, n), n, dtype=torch.int32)
    lists = torch.arange(n, dtype=torch.int32).expand(1, 1, n, n).contiguous()
    masks = torch.ones((1, block, block), dtype=torch.int8)
    o, lse = block_sparse_forward(q, k, v, tile_id, count, lists, masks, block, block, d**-0.5)
    block_sparse_backward(torch.randn_like(o), q, k, v, o, lse, tile_id, count, lists, count,
                          lists, masks, block, block, d**-0.5)  # fmt: skip


def chunk(dtype: torch.dtype, d: int) -> None:
    from effarch_kernels.chunk_scalar_decay import chunk_scalar_decay_bwd, chunk_scalar_decay_fwd

    q, k, v = (_r(2, 512, 4, d, dtype=dtype) for _ in range(3))
    g, h0 = -torch.rand(2, 512, 4), torch.randn(2, 4, d, d)
    o, _ = chunk_scalar_decay_fwd(q, k, v, g, d**-0.5, h0, True)
    chunk_scalar_decay_bwd(torch.randn_like(o), q, k, v, g, d**-0.5, h0, torch.randn_like(h0))


def delta(dtype: torch.dtype, d: int) -> None:
    from effarch_kernels.chunk_delta_rule import chunk_delta_rule_fwd

    q, k, v = (_r(2, 512, 4, d, dtype=dtype) for _ in range(3))
    g, beta, h0 = -torch.rand(2, 512, 4), torch.rand(2, 512, 4), torch.randn(2, 4, d, d)
    chunk_delta_rule_fwd(q, k, v, beta, g, d**-0.5, h0, True)


def recurrent(dtype: torch.dtype, d: int) -> None:
    from effarch_kernels.fused_recurrent import fused_recurrent

    q, k, v = (_r(2, 64, 4, d, dtype=dtype) for _ in range(3))
    h0 = torch.randn(2, 4, d, d)
    fused_recurrent(q, k, v, g=-torch.rand(2, 64, 4), beta=torch.rand(2, 64, 4, dtype=dtype),
                    scale=d**-0.5, initial_state=h0, output_final_state=True)  # fmt: skip
    fused_recurrent(q, k, v, gk=-torch.rand(2, 64, 4, d, dtype=dtype), scale=d**-0.5,
                    initial_state=h0, output_final_state=True)  # fmt: skip


def grouped(dtype: torch.dtype, d: int) -> None:
    from effarch_kernels.grouped_gemm import grouped_gemm_backward, grouped_gemm_forward

    m, groups, rows = 512, 4, 32  # 128 rows per group, tiles of 32 rows
    x, w = _r(m, d, dtype=dtype), _r(groups, d, 4 * d, dtype=dtype)
    offs = torch.tensor([128, 256, 384, 512], dtype=torch.int32)
    tiles = m // rows + groups
    tile_group = torch.full((tiles,), -1, dtype=torch.int32)
    tile_start = torch.zeros((tiles,), dtype=torch.int32)
    tile_group[: m // rows] = torch.arange(m // rows, dtype=torch.int32) // (128 // rows)
    tile_start[: m // rows] = torch.arange(m // rows, dtype=torch.int32) * rows
    y = grouped_gemm_forward(x, w, offs, tile_group, tile_start)
    grouped_gemm_backward(torch.randn_like(y), x, w, offs, tile_group, tile_start)


def int8(d: int) -> None:
    from effarch_kernels.int8_attention import int8_qk

    qi, ki = (torch.randint(-127, 127, (1, 1024, 4, d), dtype=torch.int8) for _ in range(2))
    int8_qk(qi, ki, torch.rand(1, 16, 4), torch.rand(1, 16, 4), 64, 64)


def scan(dtype: torch.dtype, n: int) -> None:
    from effarch_kernels.selective_scan import selective_scan_fwd

    u, dt, z = (_r(2, 64, 256, dtype=dtype) for _ in range(3))
    B, C = (_r(2, 64, 1, n, dtype=dtype) for _ in range(2))
    selective_scan_fwd(u, dt, -torch.rand(256, n), B, C, torch.randn(256), z, torch.randn(256),
                       True, True, torch.randn(2, 256, n))  # fmt: skip


def jobs() -> dict[str, Callable[[], None]]:
    """Every job by name, ``kernel module:dtype:size``."""
    out: dict[str, Callable[[], None]] = {}
    for dtype, dn in ((torch.float16, "fp16"), (torch.float32, "fp32")):
        for d in (64, 128, 256):
            out[f"flash_attention:{dn}:d{d}"] = partial(flash, dtype, d)
            for block in (32, 64, 128):
                name = f"block_sparse_attention:{dn}:d{d}:block{block}"
                out[name] = partial(block_sparse, dtype, d, block)
        for d in (64, 128, 256):  # 256: the largest K the linear-attention kernels take
            out[f"chunk_scalar_decay:{dn}:d{d}"] = partial(chunk, dtype, d)
            out[f"chunk_delta_rule:{dn}:d{d}"] = partial(delta, dtype, d)
            out[f"fused_recurrent:{dn}:d{d}"] = partial(recurrent, dtype, d)
        for d in (64, 128):
            out[f"grouped_gemm:{dn}:k{d}"] = partial(grouped, dtype, d)
        out[f"selective_scan:{dn}:n16"] = partial(scan, dtype, 16)
    for d in (64, 128):
        out[f"int8_attention:d{d}"] = partial(int8, d)
    return out


def _blank(value: int | None) -> str:
    return "-" if value is None else str(value)


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| job | kernel | constants | warps | stages | registers | spill bytes | shared KiB |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['job']} | {r['kernel']} | error: {r['error']} |||||||")
            continue
        constants = " ".join(f"{k}={v}" for k, v in r["constants"].items())
        lines.append(f"| {r['job']} | {r['kernel']} | {constants} | {r['warps']} | {r['stages']} | "
                     f"{_blank(r['registers'])} | {_blank(r['spill_bytes'])} | {r['shared_kib']}"
                     f"{'' if r['fits'] else ' (refused)'} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("only", nargs="*", help="run the jobs whose name contains one of these")
    p.add_argument(
        "--arch",
        type=int,
        default=90,
        choices=sorted(SHARED_MEMORY),
        help="compute capability x 10 (90: H100, 80: A100, 86/89: RTX 30xx/40xx and L4, 75: T4)",
    )
    p.add_argument("--list", action="store_true", help="print the job names and exit")
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    p.add_argument(
        "--shared-memory-only",
        action="store_true",
        help="stop once shared memory is allocated (no registers or spills), faster",
    )
    args = p.parse_args(argv)
    every = jobs()
    chosen = [n for n in every if not args.only or any(s in n for s in args.only)]
    if args.list:
        print("\n".join(chosen))
        return []
    if not chosen:
        sys.exit(f"compile_report.py: no job matches {args.only}; see --list")
    driver.set_active(CompileOnlyDriver(args.arch))
    from effarch_kernels import common

    common._FITTED.clear()  # the shapes chosen for another card
    triton.knobs.nvidia.dump_ptxas_log = True
    if args.shared_memory_only:
        triton.knobs.runtime.add_stages_inspection_hook = _shared_memory_only
    JITFunction.run = _compile_and_record
    Autotuner.run = _compile_every_config
    for name in chosen:
        JOB["name"] = name
        try:
            every[name]()
        except OutOfResources as err:  # no launch shape of a kernel fits this card
            ROWS.append({"job": name, "kernel": "(launcher)", "error": f"{err!s:.200}"})
    note = "up to shared-memory allocation: no registers or spills"
    until = f" ({note})" if args.shared_memory_only else ""
    print(f"Compiled for sm_{args.arch} with Triton {triton.__version__}{until}:\n")
    print(table(ROWS))
    if args.json:
        args.json.write_text(json.dumps(ROWS, indent=1))
    return ROWS


if __name__ == "__main__":
    main()
