"""effarch: efficient LLM architectures, derived, implemented, verified and measured.

Subpackages follow the survey's families (Sun et al., 2025, arXiv:2508.09834):

* :mod:`effarch.attention` -- softmax attention and its efficient exact forms;
* :mod:`effarch.linear` -- linear attention, gates, delta rules and linear RNNs;
* :mod:`effarch.scan` -- the parallel scan of linear recurrences;
* :mod:`effarch.nn` -- building blocks several families' layers share (short convolution,
  gated RMSNorm, LoRA, ...);
* :mod:`effarch.ssm` -- state space models: S4D, Mamba's selective scan, Mamba-2's SSD;
* :mod:`effarch.diffusion` -- masked and block diffusion LLMs, their samplers (section 7);
* :mod:`effarch.unified` -- every family's memory update in one registry (section 2.5);
* :mod:`effarch.models` -- the transformer baseline and its analytic cost;
* :mod:`effarch.bench` -- the measuring toolkit (time, memory, FLOPs, sweeps, plots);
* :mod:`effarch.notebook` -- the setup shared by every notebook of the book.

Everything here runs on a CPU without Triton; GPU kernels live in the optional
``effarch_kernels`` package and are imported only where a function dispatches to them.
"""

from . import attention, bench, diffusion, linear, models, nn, scan, ssm, survey, tasks, unified

__version__ = "0.1.0"  # the one place: pyproject.toml reads it, the notebooks' install pins it
__all__ = [
    "__version__",
    "attention",
    "bench",
    "diffusion",
    "linear",
    "models",
    "nn",
    "scan",
    "ssm",
    "survey",
    "tasks",
    "unified",
]
