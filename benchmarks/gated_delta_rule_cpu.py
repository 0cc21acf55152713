"""Chunked gated delta rule on the CPU: effarch against the PyTorch reference that
``transformers`` ships for Qwen3-Next (``torch_chunk_gated_delta_rule``), in one run.

    pip install transformers   # only for this comparison; not a dependency of effarch
    python benchmarks/gated_delta_rule_cpu.py

Both take ``[B, T, H, K]`` inputs and the same log decays ``g`` and ``beta``; the script
checks that the outputs agree and prints the median time of each (fp32, B=1, H=4,
K=V=64, two threads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effarch.bench import benchmark
from effarch.linear import gated_delta_rule


def main() -> None:
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    torch.manual_seed(0)
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for t in (4096, 8192):
        q, k = (F.normalize(torch.randn(1, t, 4, 64), dim=-1) for _ in range(2))
        v = torch.randn(1, t, 4, 64)
        g = -torch.rand(1, t, 4) * 0.1
        beta = torch.rand(1, t, 4)
        args = (q, k, v, g, beta)
        ours = lambda a=args: gated_delta_rule(*a, mode="chunk", chunk_size=64)[0]
        theirs = lambda a=args: torch_chunk_gated_delta_rule(*a, chunk_size=64)[0]
        err = (ours() - theirs()).abs().max().item()
        t_ours = benchmark(ours, min_run_time=1.0)
        t_theirs = benchmark(theirs, min_run_time=1.0)
        print(
            f"T={t}: effarch {t_ours}; transformers {t_theirs}; "
            f"ratio {t_theirs.median / t_ours.median:.2f}; max |difference| {err:.2e}"
        )


if __name__ == "__main__":
    main()
