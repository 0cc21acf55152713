r"""The reverse process: generating by unmasking, with LLaDA's reference semantics (7.1).

Generation starts from a prompt followed by ``gen_length`` mask tokens. Each step runs the
model once on the whole sequence (one *function evaluation*, NFE), proposes a token for every
masked position, and *commits* some of them; the rest stay masked for later steps::

    x0_hat = argmax(logits + temperature * Gumbel)       # a proposal everywhere
    score  = confidence of each proposal                  # rule: see below
    commit the k_s masked positions of the current block with the highest score

* ``k_s`` is :func:`num_transfer_tokens`: the block's masked count split evenly over its
  steps, the remainder going to the first steps (LLaDA's ``get_num_transfer_tokens``);
  with ``threshold`` instead, every proposal whose confidence exceeds it is committed, and
  at least the most confident one (Fast-dLLM's parallel decoding): a variable number per step.
* Semi-autoregressive blocks: ``gen_length`` is cut into blocks of ``block_length`` filled
  left to right; positions right of the current block cannot be committed.
* Rules (``remasking``, LLaDA's and Dream's names): ``"low_confidence"`` keeps masked the
  least confident proposals, i.e. commits those with the highest probability
  ``p(x0_hat)``; ``"random"`` commits uniformly random positions; ``"margin"`` scores
  ``p_top1 - p_top2``; ``"entropy"`` scores ``-H(p)`` (Dream's ``topk_margin`` and
  ``entropy``).
* Classifier-free guidance: ``logits = u + (s + 1) (c - u)``, ``c`` from the sequence and
  ``u`` from the same sequence with the prompt masked.

:func:`infill` runs the same steps on masks placed anywhere: every conditional of the joint
distribution, with no prompt/generation split (chapter 7.3 generates an image's text and a
text's image with it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_choice, check_positive_int, check_positive_number, check_tensor
from .process import logits_of

__all__ = [
    "REMASKING",
    "DiffusionSample",
    "add_gumbel_noise",
    "confidence",
    "generate",
    "infill",
    "num_transfer_tokens",
    "unmask_step",
]

REMASKING = ("low_confidence", "random", "margin", "entropy")
"""The rules that choose which proposals to commit (see the module docstring)."""


def num_transfer_tokens(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens each row commits at each of ``steps`` steps.

    ``mask [B, L]`` bool marks the masked positions of a block. Row ``b`` has
    ``m_b = mask[b].sum()`` of them; every step commits ``m_b // steps`` and the first
    ``m_b % steps`` steps one more, so row ``b`` sums to ``m_b``. Returns ``[B, steps]``
    int64. Equals LLaDA's ``get_num_transfer_tokens(mask_index, steps)``.
    """
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
    check_positive_int("steps", steps)
    m = mask.sum(dim=1, keepdim=True)
    base, rem = m // steps, m % steps
    step = torch.arange(steps, device=mask.device)[None, :]
    return (base + (step < rem)).to(torch.int64)


def add_gumbel_noise(
    logits: torch.Tensor,
    temperature: float,
    *,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``logits + temperature * g``, ``g = -log(-log u)``, ``u ~ U(0, 1)``, computed in ``dtype``.

    ``argmax`` of the result is a sample of ``softmax(logits / temperature)`` (the Gumbel-max
    trick); ``temperature = 0`` returns the logits (greedy). LLaDA computes
    ``exp(logits) / (-log u) ** temperature``, whose logarithm this is: the same argmax.

    Why float64: ``u`` is a multiple of ``2^-24`` in float32, so ``-log u >= 6e-8`` and
    ``g <= 16.6``: a token whose logit is more than about ``16.6 temperature`` below the
    best (plus the best's own noise) can never win, and the far tail is under-sampled. That
    tail is reached by large vocabularies and by samplers whose categorical includes a
    "stay masked" class of probability near 1 (MDLM's many-step sampler), and cutting it
    lowers the effective temperature: samples look more likely (lower generative
    perplexity) and are less diverse (Zheng et al., 2025). In float64 the cut is at 36.7;
    ``dtype=torch.float16`` (every Gumbel capped at 7.6) shows the effect at small sizes.
    (Torch's float16 uniforms are not on a grid of ``2^-11``: they reach ``2^-23``, and are
    exactly 0, a Gumbel of ``-inf``, about once in 4,000 draws on a CPU.)
    """
    check_tensor("logits", logits, floating=True)
    check_positive_number("temperature", temperature, allow_zero=True)
    if dtype not in (torch.float16, torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float16, float32 or float64, got {dtype}")
    if temperature == 0:
        return logits
    u = torch.rand(logits.shape, generator=generator, dtype=dtype).to(logits.device)
    return logits.to(dtype) - temperature * torch.log(-torch.log(u))


def confidence(
    logits: torch.Tensor, x0: torch.Tensor, rule: str, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The score by which proposals ``x0 [B, L]`` are ranked for commitment, ``[B, L]`` float.

    ``low_confidence``: ``p(x0)`` under ``softmax(logits)``; ``margin``: ``p_top1 - p_top2``;
    ``entropy``: ``sum_v p_v log p_v`` (minus the entropy); ``random``: ``U(0, 1)``.
    Higher is committed first.
    """
    check_choice("rule", rule, REMASKING)
    if rule == "random":
        return torch.rand(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
    p = logits.double().softmax(-1)
    if rule == "low_confidence":
        return p.gather(-1, x0[..., None])[..., 0]
    if rule == "margin":
        top = p.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    return (p * p.clamp_min(1e-300).log()).sum(-1)


def unmask_step(
    logits: torch.Tensor,
    x: torch.Tensor,
    allowed: torch.Tensor,
    *,
    k: torch.Tensor | None = None,
    threshold: float | None = None,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    gumbel_dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
    mask_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step: propose a token everywhere, commit the best ``allowed`` proposals.

    Args:
        logits: ``[B, T, V]`` the model's output on ``x [B, T]``.
        allowed: ``[B, T]`` bool, the masked positions that may be committed now.
        k: ``[B]`` int64, how many to commit per row (the highest scores under
            ``remasking``); or ``threshold``: commit every allowed proposal whose probability
            exceeds it, and at least the best-scored one.
        mask_id: the mask token, never proposed (its logit is set to ``-inf`` first). A
            trained model gives it no mass; LLaDA's loop would commit it and leave the
            position masked.

    Returns:
        ``x`` with the committed proposals written in, and ``commit [B, T]`` bool.
    """
    if (k is None) == (threshold is None):
        raise ValueError("give exactly one of k and threshold")
    if mask_id is not None and mask_id < logits.shape[-1]:  # never propose the mask itself
        logits = logits.clone()
        logits[..., mask_id] = -torch.inf
    x0 = add_gumbel_noise(logits, temperature, dtype=gumbel_dtype, generator=generator).argmax(-1)
    score = confidence(logits, x0, remasking, generator=generator)
    score = torch.where(allowed, score, -torch.inf)
    if threshold is None:  # the k highest scores of each row: rank < k
        k = torch.minimum(k.to(allowed.device), allowed.sum(1))
        rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        commit = rank < k[:, None]
    else:
        prob = logits.double().softmax(-1).gather(-1, x0[..., None])[..., 0]
        commit = (prob > threshold) & allowed
        best = score.argmax(-1, keepdim=True)
        any_allowed = allowed.any(1, keepdim=True)
        commit.scatter_(1, best, any_allowed | commit.gather(1, best))
    return torch.where(commit, x0, x), commit


def _run_steps(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    until: torch.Tensor,
    region: torch.Tensor,
    counts: torch.Tensor | None,
    step_of: torch.Tensor,
    per_step: list[int],
    *,
    mask_id: int,
    **step_kw: Any,
) -> torch.Tensor:
    """Reverse steps (:func:`unmask_step`) until ``until [B, T]`` holds no mask: each step
    commits among the masks inside ``region``, ``counts[:, i]`` per row (or by threshold
    when ``counts`` is None); records the step of each commit in ``step_of`` and the count
    in ``per_step``. A step with nothing to commit in any row is skipped (LLaDA still calls
    the model; the tokens are the same). The loop of :func:`generate` and :func:`infill`."""
    i = 0
    while bool((x[until] == mask_id).any()):
        if counts is not None and i >= counts.shape[1]:
            break
        if counts is not None and not bool((counts[:, i] > 0).any()):
            i += 1
            continue
        x, commit = unmask_step(logits_fn(x), x, (x == mask_id) & region,
                                k=None if counts is None else counts[:, i], mask_id=mask_id,
                                **step_kw)  # fmt: skip
        step_of[commit] = len(per_step)
        per_step.append(int(commit.sum()))
        i += 1
    return x


@dataclass
class DiffusionSample:
    """What :func:`generate` returns.

    ``tokens [B, P + gen_length]``: the prompt and the generated tokens (LLaDA's return
    value). ``step_of [B, P + gen_length]`` int64: the step (from 0) at which each position
    was committed, ``-1`` for the prompt. ``nfe``: model calls (a guided step counts one,
    with a doubled batch). ``per_step [nfe]``: tokens committed at each step, summed over rows.
    """

    tokens: torch.Tensor
    step_of: torch.Tensor
    nfe: int
    per_step: list[int]


def _check_generate(prompt, gen_length, block_length, steps, threshold, temperature, cfg_scale):
    check_tensor("prompt", prompt, ndim=2, dtypes=(torch.long,))
    check_positive_int("gen_length", gen_length)
    check_positive_int("block_length", block_length)
    if gen_length % block_length:
        raise ValueError(
            f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})"
        )
    blocks = gen_length // block_length
    if threshold is None:
        check_positive_int("steps", steps)
        if steps % blocks:
            raise ValueError(f"steps ({steps}) must be a multiple of the {blocks} blocks")
    elif check_positive_number("threshold", threshold) > 1:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    check_positive_number("temperature", temperature, allow_zero=True)
    check_positive_number("cfg_scale", cfg_scale, allow_zero=True)
    return blocks


@torch.no_grad()
def generate(
    model: Callable[[torch.Tensor], Any],
    prompt: torch.Tensor,
    *,
    mask_id: int,
    gen_length: int = 128,
    steps: int | None = 128,
    block_length: int | None = None,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    threshold: float | None = None,
    gumbel_dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> DiffusionSample:
    """Generate ``gen_length`` tokens after ``prompt`` by iterative unmasking.

    LLaDA's ``generate(model, prompt, steps, gen_length, block_length, temperature,
    cfg_scale, remasking, mask_id)``, plus Dream's ``margin``/``entropy`` rules and
    Fast-dLLM's ``threshold``. The module docstring gives the algorithm.

    Args:
        model: ``[B, T] -> [B, T, V]`` logits over the whole sequence (or ``.logits``).
        prompt: ``[B, P]`` int64 (``P`` may be 0).
        mask_id: the mask token.
        gen_length: tokens to generate.
        steps: steps over all blocks, a multiple of the number of blocks (ignored with
            ``threshold``: each block then takes as many steps as it needs).
        block_length: semi-autoregressive block (default ``gen_length``: one block).
        temperature: Gumbel temperature of the proposals (0: greedy).
        cfg_scale: classifier-free guidance scale ``s`` (0: none).
        remasking: one of :data:`REMASKING`.
        threshold: commit every proposal with ``softmax`` probability above it (and at
            least the best one) instead of a fixed number per step.
        gumbel_dtype: float64 (the reference) or float32, to measure the difference.
        generator: for the Gumbel noise and the random rule.

    A step that would commit nothing in every row (``steps`` per block above the block's
    length) is skipped, where LLaDA still calls the model: the tokens are the same (greedy)
    and ``nfe`` counts the calls that did work.
    """
    block_length = gen_length if block_length is None else block_length
    blocks = _check_generate(prompt, gen_length, block_length, steps, threshold, temperature,
                             cfg_scale)  # fmt: skip
    check_choice("remasking", remasking, REMASKING)
    check_positive_int("mask_id", mask_id, allow_zero=True)
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :p] = prompt
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :p] = True
    step_of = torch.full_like(x, -1)
    per_step: list[int] = []

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        if cfg_scale > 0:
            un_x = torch.where(prompt_index, torch.full_like(x, mask_id), x)
            cond, uncond = logits_of(model(torch.cat([x, un_x]))).chunk(2)
            return uncond + (cfg_scale + 1) * (cond - uncond)
        return logits_of(model(x))

    pos = torch.arange(x.shape[1], device=x.device)
    for blk in range(blocks):
        lo, hi = p + blk * block_length, p + (blk + 1) * block_length
        block = ((pos >= lo) & (pos < hi)).expand_as(x)
        counts = None
        if threshold is None:
            counts = num_transfer_tokens(x[:, lo:hi] == mask_id, steps // blocks)
        x = _run_steps(logits_fn, x, block, (pos < hi).expand_as(x), counts, step_of, per_step,
                       threshold=threshold, remasking=remasking, temperature=temperature,
                       gumbel_dtype=gumbel_dtype, generator=generator, mask_id=mask_id)  # fmt: skip
    return DiffusionSample(tokens=x, step_of=step_of, nfe=len(per_step), per_step=per_step)


@torch.no_grad()
def infill(
    model: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    *,
    mask_id: int,
    steps: int | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    threshold: float | None = None,
    gumbel_dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> DiffusionSample:
    """Fill every ``mask_id`` position of ``x``, wherever it lies, by iterative unmasking.

    A masked diffusion model conditions on whatever is left unmasked, so one sampler serves
    every conditional: a prompt before the masks (:func:`generate` with one block equals
    ``infill`` of ``[prompt, M, ..., M]``), a suffix, an image's missing half, the text of an
    image (chapter 7.3). Each step runs the model on the whole of ``x`` and commits
    :func:`num_transfer_tokens` of the masked positions (or, with ``threshold``, those above
    it and at least one) by the ``remasking`` rule, as :func:`unmask_step`.

    Args:
        model: ``[B, T] -> [B, T, V]`` logits (or ``.logits``).
        x: ``[B, T]`` int64, ``mask_id`` where a token is to be generated (rows may hold
            different numbers of masks).
        steps: steps to fill the most-masked row (default: that row's mask count, one token
            per step); ignored with ``threshold``.
        temperature, remasking, threshold, gumbel_dtype, generator: as :func:`generate`.

    Returns:
        A :class:`DiffusionSample` with ``tokens [B, T]`` (unmasked positions untouched) and
        ``step_of`` (``-1`` where ``x`` was given).
    """
    check_tensor("x", x, ndim=2, dtypes=(torch.long,))
    check_positive_int("mask_id", mask_id, allow_zero=True)
    check_choice("remasking", remasking, REMASKING)
    check_positive_number("temperature", temperature, allow_zero=True)
    masks = x == mask_id
    most = int(masks.sum(1).max()) if x.numel() else 0
    if threshold is None:
        steps = max(most, 1) if steps is None else check_positive_int("steps", steps)
        counts = num_transfer_tokens(masks, steps)
    elif check_positive_number("threshold", threshold) > 1:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    step_of = torch.full_like(x, -1)
    per_step: list[int] = []
    everywhere = torch.ones_like(x, dtype=torch.bool)
    x = _run_steps(lambda z: logits_of(model(z)), x.clone(), everywhere, everywhere,
                   counts if threshold is None else None, step_of, per_step,
                   threshold=threshold, remasking=remasking, temperature=temperature,
                   gumbel_dtype=gumbel_dtype, generator=generator, mask_id=mask_id)  # fmt: skip
    return DiffusionSample(tokens=x, step_of=step_of, nfe=len(per_step), per_step=per_step)
