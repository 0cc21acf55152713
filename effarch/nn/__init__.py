"""Building blocks that several families' layers share.

* :class:`ShortConvolution` -- the causal depthwise convolution with a decode cache
  (fla's ``ShortConvolution``, the ``conv1d`` of mamba_ssm's blocks);
* :class:`GatedRMSNorm` -- RMSNorm with an optional SiLU gate, before or after the norm, over
  the whole channel dim or groups of it (fla's ``FusedRMSNormGated``, mamba_ssm's
  ``RMSNormGated``);
* :func:`init_dt_bias` -- Mamba's step-size bias initialisation;
* :func:`l2norm`, :func:`split_heads`, :func:`merge_heads`, :func:`repeat_kv` -- the small
  tensor moves every multi-head layer makes;
* :class:`LoRALinear`, :func:`add_lora` -- a frozen linear layer plus a trainable low-rank
  update;
* :class:`SwiGLU` -- the gated feed-forward block of Llama-family models (and of MoE experts).

The layers of :mod:`effarch.linear`, :mod:`effarch.ssm` and :mod:`effarch.models` build on
these; a reader who meets one of them in a layer finds its definition here.
"""

from .conv import ShortConvolution
from .heads import l2norm, merge_heads, repeat_kv, split_heads
from .init import init_dt_bias
from .lora import LoRALinear, add_lora
from .mlp import SwiGLU
from .norm import GatedRMSNorm

__all__ = [
    "GatedRMSNorm",
    "LoRALinear",
    "ShortConvolution",
    "SwiGLU",
    "add_lora",
    "init_dt_bias",
    "l2norm",
    "merge_heads",
    "repeat_kv",
    "split_heads",
]
