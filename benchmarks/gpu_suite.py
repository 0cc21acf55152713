"""Every GPU check of the book in one run: the kernel tests natively, then the figures.

    python benchmarks/gpu_suite.py --out gpu_results      # on a CUDA machine
    python benchmarks/gpu_suite.py --smoke --out /tmp/x   # tiny shapes on any machine

1. ``pytest -m kernel`` (every test marked ``kernel``): with CUDA present they run the Triton
   kernels natively (fp16/bf16 included) instead of under the interpreter.
2. FlashAttention (chapter 4.1): our Triton kernel against PyTorch SDPA's flash backend,
   bf16, head_dim 64 and 128, causal and not, T = 4k, 8k, 16k, forward and backward in
   TFLOP/s (batch x T = 16k tokens and 2048 / head_dim heads, as flash-attn's own
   benchmark); the targets are forward >= 0.8x and backward >= 0.6x of SDPA.
3. Chunked linear attention (chapter 2.7): ``simple_gla`` forward + backward by the Triton
   kernel and by the PyTorch chunk form, against SDPA flash at the same T (the crossover),
   and flash-linear-attention's ``chunk_simple_gla`` when it is installed.

Writes ``results.md`` (the tables for ``benchmarks/README.md``, with the card's name and
the library versions) and ``results.json`` to ``--out`` and prints the tables.
``--smoke`` runs tiny shapes under the Triton interpreter on the CPU, to check the script
itself; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the tests that launch a Triton kernel carry the ``kernel`` marker (pyproject.toml)
KERNEL_TESTS = ["tests", "-m", "kernel", "--continue-on-collection-errors"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_results"), help="folder for the results")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    p.add_argument("--skip-tests", action="store_true", help="do not run the kernel tests")
    return p.parse_args()


ARGS = parse_args()
from _checkout import use_source_checkout  # noqa: E402  (beside this script)

use_source_checkout()  # effarch and effarch_kernels importable without an install
if ARGS.smoke:  # must be set before triton defines any kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from effarch.attention import flash_attention  # noqa: E402
from effarch.bench import benchmark  # noqa: E402
from effarch.linear import simple_gla  # noqa: E402

CUDA = torch.cuda.is_available() and not ARGS.smoke
if not ARGS.smoke and not CUDA:
    sys.exit("gpu_suite.py: no CUDA device is visible; run it on a GPU, or pass --smoke")
DEV = torch.device("cuda" if CUDA else "cpu")


def timer(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median seconds of ``fn`` by ``effarch.bench.benchmark``: ``triton.testing.do_bench``
    on a GPU (100 ms of repeats), its ``perf_counter`` loop on the CPU; the ``.grad`` of
    ``grad_to_none`` is reset before every call, outside the timed region."""
    return benchmark(
        fn, device=DEV, min_run_time=0.1 if CUDA else 0.05, grad_to_none=grad_to_none
    ).median


def fwd_bwd_times(
    fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]
) -> tuple[float, float]:
    """Forward seconds, and backward seconds as (forward + backward) - forward."""
    out = fn()
    grad = torch.randn_like(out)

    def both() -> None:
        fn().backward(grad)

    t_fwd = timer(fn)
    t_both = timer(both, grad_to_none=inputs)
    return t_fwd, max(t_both - t_fwd, 0.0)


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """SDPA on ``[B, H, T, D]``, restricted to its flash backend on a GPU."""
    if not CUDA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def run_tests(timeout: float = 300.0) -> dict[str, object]:
    """Run the kernel tests in a subprocess (8 workers when pytest-xdist is installed: Triton
    compiles on the CPU, one kernel at a time per process); stop after ``timeout`` seconds so
    the tables still get measured."""
    start = time.perf_counter()
    workers = []
    try:
        import xdist  # noqa: F401

        workers = ["-n", "8"]
    except ImportError:
        pass
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, *KERNEL_TESTS]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        print(out[-3000:])
        return {"returncode": None, "summary": f"stopped after {timeout:.0f} s", "seconds": timeout}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else proc.stderr[-500:]
    print(proc.stdout[-3000:])
    return {
        "returncode": proc.returncode,
        "summary": summary,
        "seconds": time.perf_counter() - start,
    }


def attention_table() -> list[dict[str, object]]:
    dtype = torch.bfloat16 if CUDA else torch.float32
    seq_lens = (4096, 8192, 16384) if CUDA else (64,)
    head_dims = (64, 128) if CUDA else (32,)
    tokens = 16384 if CUDA else 128
    rows = []
    for d in head_dims:
        for causal in (False, True):
            for t in seq_lens:
                b, h = max(tokens // t, 1), 2048 // d if CUDA else 2
                gen = torch.Generator(device=DEV).manual_seed(0)
                ours = [
                    torch.randn(b, t, h, d, device=DEV, dtype=dtype, generator=gen)
                    for _ in range(3)
                ]
                theirs = [x.detach().transpose(1, 2).contiguous() for x in ours]
                for x in (*ours, *theirs):
                    x.requires_grad_(True)
                q, k, v = ours
                qt, kt, vt = theirs
                ours_fn = partial(flash_attention, q, k, v, causal=causal, backend="triton")
                f_ours, b_ours = fwd_bwd_times(ours_fn, ours)
                f_sdpa, b_sdpa = fwd_bwd_times(partial(sdpa_flash, qt, kt, vt, causal), theirs)
                flops = 4 * b * h * t * t * d // (2 if causal else 1)
                rows.append({
                    "head_dim": d, "causal": causal, "T": t, "B": b, "H": h,
                    "fwd_ours_tflops": flops / f_ours / 1e12,
                    "fwd_sdpa_tflops": flops / f_sdpa / 1e12,
                    "bwd_ours_tflops": 2.5 * flops / max(b_ours, 1e-12) / 1e12,
                    "bwd_sdpa_tflops": 2.5 * flops / max(b_sdpa, 1e-12) / 1e12,
                })  # fmt: skip
                r = rows[-1]
                print(
                    f"attention d={d} causal={causal!s:5} T={t:6d}: fwd {r['fwd_ours_tflops']:.1f} "
                    f"vs {r['fwd_sdpa_tflops']:.1f} TFLOP/s, bwd {r['bwd_ours_tflops']:.1f} vs "
                    f"{r['bwd_sdpa_tflops']:.1f}",
                    flush=True,
                )
    return rows


def linear_table() -> list[dict[str, object]]:
    dtype = torch.bfloat16 if CUDA else torch.float32
    seq_lens = (1024, 2048, 4096, 8192, 16384, 32768) if CUDA else (64, 128)
    b, h, d = (1, 16, 128) if CUDA else (1, 2, 32)
    try:
        from fla.ops.simple_gla import chunk_simple_gla  # type: ignore[import-not-found]
    except Exception as err:  # missing, or built for another Triton: the table goes on
        print(f"flash-linear-attention not used: {type(err).__name__}: {err}", flush=True)
        chunk_simple_gla = None
    rows = []
    for t in seq_lens:
        gen = torch.Generator(device=DEV).manual_seed(0)
        q, k, v = (
            torch.randn(b, t, h, d, device=DEV, dtype=dtype, generator=gen) for _ in range(3)
        )
        g = F.logsigmoid(torch.randn(b, t, h, device=DEV, generator=gen)) / 16
        leaves = [x.requires_grad_(True) for x in (q, k, v)]
        row: dict[str, object] = {"T": t, "B": b, "H": h, "D": d}
        impls = {
            "triton": partial(simple_gla, q, k, v, g, backend="triton"),
            "torch_chunk": partial(simple_gla, q, k, v, g, backend="torch"),
        }
        if chunk_simple_gla is not None:
            impls["fla"] = partial(chunk_simple_gla, q, k, v, g, scale=d**-0.5)
        for name, fn in impls.items():
            try:
                f, bw = fwd_bwd_times(lambda fn=fn: fn()[0], leaves)
            except Exception as err:  # one implementation failing keeps the others' times
                if name != "fla":
                    raise
                print(f"fla at T={t} failed: {type(err).__name__}: {err}", flush=True)
                continue
            row[f"{name}_ms"] = (f + bw) * 1e3
        qt, kt, vt = (
            x.detach().transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v)
        )
        f, bw = fwd_bwd_times(partial(sdpa_flash, qt, kt, vt, True), [qt, kt, vt])
        row["sdpa_flash_ms"] = (f + bw) * 1e3
        rows.append(row)
        print(
            "linear",
            {key: round(val, 3) if isinstance(val, float) else val for key, val in row.items()},
            flush=True,
        )
    return rows


def markdown(env: dict[str, str], tests: dict[str, object] | None, att: list, lin: list) -> str:
    out = [f"Recorded with {env['device']}, torch {env['torch']}, triton {env['triton']}, "
           f"CUDA {env['cuda']}, driver {env['driver']}.", ""]  # fmt: skip
    if tests is not None:
        out += [f"Kernel tests natively: `{tests['summary']}` ({tests['seconds']:.0f} s).", ""]
    head = "| head_dim | causal | T | fwd ours | fwd SDPA | ratio | bwd ours | bwd SDPA | ratio |"
    out += [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in att:
        fwd, bwd = (
            r[f"{p}_ours_tflops"] / max(r[f"{p}_sdpa_tflops"], 1e-30) for p in ("fwd", "bwd")
        )
        out.append(
            f"| {r['head_dim']} | {r['causal']} | {r['T']} | {r['fwd_ours_tflops']:.3g} | "
            f"{r['fwd_sdpa_tflops']:.3g} | {fwd:.2f} | {r['bwd_ours_tflops']:.3g} | "
            f"{r['bwd_sdpa_tflops']:.3g} | {bwd:.2f} |"
        )
    out += [
        "",
        "(TFLOP/s, SDPA = its flash backend; targets: forward ratio >= 0.8, backward",
        "ratio >= 0.6.)",
        "",
    ]
    cols = [
        c for c in ("triton_ms", "torch_chunk_ms", "fla_ms", "sdpa_flash_ms") if lin and c in lin[0]
    ]
    out += ["| T | " + " | ".join(c[:-3] + " fwd+bwd (ms)" for c in cols) + " |",
            "|---|" + "---|" * len(cols)]  # fmt: skip
    for r in lin:
        out.append(
            f"| {r['T']} | " + " | ".join(f"{r[c]:.2f}" if c in r else "n/a" for c in cols) + " |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    import triton

    env = {
        "device": torch.cuda.get_device_name() if CUDA else "CPU (Triton interpreter, smoke run)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "driver": "n/a",
    }
    if CUDA:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        env["driver"] = smi.stdout.strip() or "unknown"
    print(env, flush=True)
    ARGS.out.mkdir(parents=True, exist_ok=True)
    tests, att, lin = None, [], []

    def save() -> str:  # after every phase, so a run stopped early keeps what it measured
        text = markdown(env, tests, att, lin)
        (ARGS.out / "results.md").write_text(text)
        payload = {"env": env, "tests": tests, "attention": att, "linear": lin}
        (ARGS.out / "results.json").write_text(json.dumps(payload, indent=1))
        return text

    tests = None if (ARGS.skip_tests or ARGS.smoke) else run_tests()
    save()
    att = attention_table()
    save()
    lin = linear_table()
    print(save())


if __name__ == "__main__":
    main()
