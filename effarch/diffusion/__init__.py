r"""Diffusion language models (survey section 7): masked diffusion and block diffusion.

* :mod:`~effarch.diffusion.process`: the forward (masking) process, schedules, the training
  loss weighted by ``w(t)`` and Monte-Carlo estimates of the negative ELBO;
* :mod:`~effarch.diffusion.sampling`: the reverse process with LLaDA's reference semantics
  (:func:`generate`, :func:`num_transfer_tokens`, remasking rules, float64 Gumbel noise,
  classifier-free guidance, confidence-threshold parallel decoding);
* :mod:`~effarch.diffusion.block`: block diffusion (BD3-LM): its training mask, loss and a
  sampler with a KV cache over the committed blocks;
* :mod:`~effarch.diffusion.adapt`: an autoregressive model turned into a diffusion model
  (DiffuLLaMA's shift and attention-mask annealing);
* :mod:`~effarch.diffusion.multimodal`: one model over image and text tokens (a noise level
  per modality, :func:`joint_diffusion_loss`), sampled by :func:`infill`;
* :class:`DiffusionLM`: the book's Llama-style decoder, bidirectional (the denoiser) or
  causal (the autoregressive baseline of the same size).
"""

from .adapt import ShiftedDenoiser, annealed_mask, from_autoregressive
from .block import (
    block_causal_mask,
    block_diffusion_loss,
    block_diffusion_mask,
    block_elbo_samples,
    block_generate,
)
from .model import DiffusionLM, DiffusionLMConfig
from .multimodal import PerPositionVocab, joint_diffusion_loss
from .process import (
    SCHEDULES,
    elbo_samples,
    forward_process,
    logits_of,
    loss_weight,
    mask_prob,
    masked_diffusion_loss,
)
from .sampling import (
    REMASKING,
    DiffusionSample,
    add_gumbel_noise,
    confidence,
    generate,
    infill,
    num_transfer_tokens,
    unmask_step,
)

__all__ = [
    "REMASKING",
    "SCHEDULES",
    "DiffusionLM",
    "DiffusionLMConfig",
    "DiffusionSample",
    "PerPositionVocab",
    "ShiftedDenoiser",
    "add_gumbel_noise",
    "annealed_mask",
    "block_causal_mask",
    "block_diffusion_loss",
    "block_diffusion_mask",
    "block_elbo_samples",
    "block_generate",
    "confidence",
    "elbo_samples",
    "forward_process",
    "from_autoregressive",
    "generate",
    "infill",
    "joint_diffusion_loss",
    "logits_of",
    "loss_weight",
    "mask_prob",
    "masked_diffusion_loss",
    "num_transfer_tokens",
    "unmask_step",
]
