r"""Every family on the same measurements (chapter 9.1): one function, any model of the book.

:func:`profile_models` takes language models built from the book's mixers (a
:class:`~effarch.models.HybridLM` or :class:`~effarch.models.YOCOLM`; to measure a mixer of
your own, add its factory ``(d_model, **kwargs) -> nn.Module`` to
:data:`~effarch.models.MIXERS` and build ``HybridLM(V, d, "X", {"X": ("yours", {})})``) and
measures, on one device, in one run:

- **parameters** without the embedding and head (what the mixers and FFNs cost);
- **FLOPs per token** of a forward pass at each prefill length ``T`` (matrix products,
  counted by ``FlopCounterMode``: attention's grow with ``T``, a recurrence's do not);
- **prefill time** of a forward pass over ``T`` tokens (smallest of ``repeats`` runs, all
  models visited in turn each round);
- **decode time** per step after a context of ``T`` tokens: one new token for each of the
  ``batch`` sequences (:func:`~effarch.models.decode_step_time`), so per token at the
  default ``batch=1``;
- **memory held** per sequence after ``T`` tokens: the bytes of every layer's cache or state
  for one sequence (:func:`~effarch.models.decode_memory` with ``batch=1``, whatever
  ``batch`` is);

and fits ``value ~ T^p`` to the upper half of each curve (small sizes are dominated by
fixed overheads): the exponents that say which family scales how.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_positive_int
from ..bench import best_of_rounds, fit_exponent, measure_flops
from .hybrid import YOCOLM, HybridLM, decode_memory, decode_step_time

__all__ = ["profile_models", "body_parameters"]


def body_parameters(model: nn.Module) -> int:
    """Trainable parameters outside the token embedding and the output head (shared modules
    once): what the mixers, FFNs and norms cost, independent of the vocabulary."""
    skip = set()
    for name in ("embed", "head"):
        module = getattr(model, name, None)
        if module is not None:  # a tied head is None: the embedding counts once, skipped
            skip |= {id(p) for p in module.parameters()}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _fit(sizes: Sequence[int], values: Sequence[float]) -> float:
    """Exponent of ``values ~ sizes^p`` over the upper half of the sizes (at least two)."""
    half = sizes[max(0, min(len(sizes) - 2, len(sizes) // 2))]
    return float(fit_exponent(sizes, values, min_size=half).exponent)


@torch.no_grad()
def _prefill_times(
    models: Mapping[str, nn.Module], lengths: list[int], repeats: int, batch: int, seed: int
) -> dict[str, list[float]]:
    """Seconds of one forward over ``T`` tokens, smallest of ``repeats`` interleaved rounds
    (:func:`~effarch.bench.best_of_rounds`); fresh random tokens for every run."""
    gen = torch.Generator().manual_seed(seed)

    def prepare(model: nn.Module, t: int) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            device = next(model.parameters()).device
            ids = torch.randint(0, model.vocab_size, (batch, t), generator=gen).to(device)
            return lambda: model(ids)

        return setup

    device = next(next(iter(models.values())).parameters()).device
    runs = {(name, t): prepare(m, t) for t in lengths for name, m in models.items()}
    best = best_of_rounds(runs, repeats=repeats, device=device)
    return {name: [best[name, t] for t in lengths] for name in models}


def profile_models(
    models: Mapping[str, HybridLM | YOCOLM],
    *,
    lengths: Sequence[int],
    contexts: Sequence[int],
    repeats: int = 3,
    steps: int = 4,
    batch: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure every model on the same lengths in one run (module docstring).

    Args:
        models: name -> model (eval mode, one device); each must decode with ``new_cache``.
        lengths: increasing prefill lengths ``T`` (time and FLOPs per token).
        contexts: increasing context lengths (decode time per step, memory held).
        repeats: timing rounds; the smallest time of each is kept.
        steps: single-token steps per timed decode run.
        batch, seed: sequences per call of the timed and counted runs (FLOPs are divided
            by ``batch T``, so they stay per token) and the seed of the random tokens.

    Returns:
        ``{"lengths": [...], "contexts": [...], "models": {name: record}}`` with each record
        ``{"parameters", "flops_per_token": [per T], "prefill_seconds": [per T],
        "decode_seconds": [per context], "memory_bytes": [per context], "exponents":
        {"prefill", "flops", "decode", "memory"}}``: ``prefill_seconds`` is one forward over
        ``batch`` sequences of ``T`` tokens, ``decode_seconds`` one decoding step of
        ``batch`` tokens (one per sequence; per token only at ``batch=1``), and
        ``memory_bytes`` what one sequence holds (measured with a cache of one sequence,
        whatever ``batch`` is); exponents of the upper half of each curve, ``"flops"`` of
        the whole prefill's (per token times ``T``); a constant curve fits ``p`` = 0.
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"models must be a non-empty mapping name -> model, got {models!r}")
    for name, model in models.items():
        if not isinstance(model, (HybridLM, YOCOLM)):
            raise TypeError(f"models[{name!r}] must be a HybridLM or YOCOLM, got {type(model)}")
    ts = [check_positive_int("lengths", t) for t in lengths]
    cs = [check_positive_int("contexts", c) for c in contexts]
    for arg, xs in (("lengths", ts), ("contexts", cs)):
        if len(xs) < 2 or xs != sorted(set(xs)):
            raise ValueError(f"{arg} must be at least two increasing lengths, got {list(xs)}")
    check_positive_int("repeats", repeats)
    records: dict[str, dict[str, Any]] = {}
    gen = torch.Generator().manual_seed(seed)
    for name, model in models.items():
        device = next(model.parameters()).device
        flops = []
        for t in ts:
            ids = torch.randint(0, model.vocab_size, (batch, t), generator=gen).to(device)
            with torch.no_grad():
                flops.append(measure_flops(lambda m=model, x=ids: m(x)).total / (batch * t))
        with torch.no_grad():
            memory = decode_memory(model, cs, batch=1, seed=seed)["total"]  # per sequence
        records[name] = {
            "parameters": body_parameters(model),
            "flops_per_token": flops,
            "memory_bytes": memory,
        }
    prefill = _prefill_times(models, ts, repeats, batch, seed)
    decode = decode_step_time(models, cs, steps=steps, repeats=repeats, batch=batch, seed=seed)
    for name, r in records.items():
        r["prefill_seconds"] = prefill[name]
        r["decode_seconds"] = decode[name]
        r["exponents"] = {
            "prefill": _fit(ts, prefill[name]),
            "flops": _fit(ts, [f * t for f, t in zip(r["flops_per_token"], ts, strict=True)]),
            "decode": _fit(cs, decode[name]),
            "memory": _fit(cs, r["memory_bytes"]),
        }
    return {"lengths": ts, "contexts": cs, "models": records}
