"""A small autoregressive model over image-patch and text tokens with an MoE FFN (chapter 8.3).

    python -m effarch.experiments multimodal-moe --out effarch/experiments/multimodal_moe_cpu.json

Each of scikit-learn's 8x8 digits (:func:`~effarch.tasks.load_digits`, two grey levels) is
cut into 16 patches of 2 x 2 pixels, each patch one token of 16 (its four bits), and paired
with its English name spelled in letters. Every image gives two sequences of 23 tokens, one
per task::

    caption:  [BOI] p_1 .. p_16 [BOT] l_1 .. l_5        (the name from the image)
    draw:     [BOT] l_1 .. l_5 [BOI] p_1 .. p_16        (the image from the name)

so each modality appears early and late in a sequence, and routing by modality is not
routing by position. :class:`MultimodalLM` is a causal transformer (RoPE attention, pre-norm)
whose FFN is :class:`~effarch.moe.ModalityMoE` with a shared pool or a pool per modality,
or a dense SwiGLU with the same active width; the modality of a token is that of its input
(patches: image; letters, pad and the two markers: text). The next-token loss is reported
per modality of the *target*: bits per patch (the image task) and bits per letter (the
text task). :func:`multimodal_moe_experiment` trains the three from one initialisation seed
on the same batches and measures both losses on the held-out digits, greedy captioning
accuracy, and which experts each modality uses.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_positive_int, check_tensor
from ..attention import MultiHeadAttention
from ..moe import ModalityMoE, coefficient_of_variation, modality_load
from ..nn import SwiGLU
from ..tasks import DIGIT_NAMES, IGNORE_INDEX, digits_split, load_digits
from ..train import train

__all__ = [
    "BOI",
    "BOT",
    "CONFIG",
    "FFNS",
    "IMAGE",
    "PAD",
    "STORED",
    "TEXT",
    "VOCAB",
    "MultimodalLM",
    "caption_accuracy",
    "digit_sequences",
    "main",
    "modality_losses",
    "multimodal_moe_experiment",
    "patch_tokens",
    "routing_by_modality",
    "routing_summary",
    "stored_multimodal_moe",
    "train_multimodal",
]

HERE = Path(__file__).resolve().parent
STORED = HERE / "multimodal_moe_cpu.json"
"""The card of the stored CPU run."""

N_CODES = 16  # a 2 x 2 patch of binary pixels
LETTER0 = N_CODES
PAD = LETTER0 + 26
BOI = PAD + 1
BOT = PAD + 2
VOCAB = BOT + 1
"""Token ids: patch codes ``0..15``, letters ``16..41``, then ``PAD``, ``BOI``, ``BOT``."""
IMAGE, TEXT = 0, 1
"""Modality ids."""
TEXT_LEN = 5
FFNS = ("dense", "shared", "separate")
"""A dense SwiGLU, an MoE with one pool, an MoE with a pool per modality."""

CONFIG: dict[str, Any] = {
    "d_model": 64, "n_layers": 2, "n_heads": 4, "n_experts": 8, "k": 2, "d_ff": 64,
    "steps": 1500, "batch_size": 64, "lr": 3e-3, "balance": 0.01, "seeds": [0, 1, 2],
}  # fmt: skip
"""Model and training sizes of the stored CPU run (the dense FFN is ``k d_ff`` wide)."""


def patch_tokens(images: torch.Tensor) -> torch.Tensor:
    """``images [N, 8, 8]`` of 0/1 -> ``[N, 16]`` patch codes in raster order of the 2 x 2
    patches; a patch's code is ``a + 2 b + 4 c + 8 d`` for its pixels ``[[a, b], [c, d]]``."""
    check_tensor("images", images, ndim=3, dtypes=(torch.int64,))
    if images.shape[1:] != (8, 8) or images.numel() and images.max() > 1:
        raise ValueError(f"images must be [N, 8, 8] of 0/1, got {tuple(images.shape)}")
    p = images.reshape(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
    return (p * torch.tensor([1, 2, 4, 8])).sum(-1)


def _name_tokens(labels: torch.Tensor) -> torch.Tensor:
    out = torch.full((labels.shape[0], TEXT_LEN), PAD, dtype=torch.long)
    for i, label in enumerate(labels.tolist()):
        name = DIGIT_NAMES[label]
        out[i, : len(name)] = torch.tensor([LETTER0 + ord(c) - ord("a") for c in name])
    return out


def digit_sequences(split: str) -> dict[str, torch.Tensor]:
    """Both tasks' sequences for the ``"train"`` or ``"heldout"`` digits
    (:func:`~effarch.tasks.digits_split`).

    Returns a dict of ``tokens [2N, 23]`` (the first ``N`` rows caption, the last ``N``
    draw), ``modality [2N, 23]`` (of each input token), ``targets [2N, 23]`` (the next token;
    ``-100`` after the last and where the next token is a marker), ``target_modality``
    ``[2N, 23]`` and ``labels [N]``.
    """
    check_choice("split", split, ("train", "heldout"))
    images, labels = load_digits(levels=2)
    idx = digits_split()[0 if split == "train" else 1]
    patches, names = patch_tokens(images[idx]), _name_tokens(labels[idx])
    n = patches.shape[0]
    boi = torch.full((n, 1), BOI, dtype=torch.long)
    bot = torch.full((n, 1), BOT, dtype=torch.long)
    tokens = torch.cat(
        [torch.cat([boi, patches, bot, names], 1), torch.cat([bot, names, boi, patches], 1)]
    )
    modality = torch.where(tokens < N_CODES, IMAGE, TEXT)
    targets = torch.cat([tokens[:, 1:], torch.full((2 * n, 1), IGNORE_INDEX)], 1)
    targets = targets.masked_fill(targets >= BOI, IGNORE_INDEX)  # markers are given, not predicted
    target_modality = torch.where(targets < N_CODES, IMAGE, TEXT)
    return {
        "tokens": tokens,
        "modality": modality,
        "targets": targets,
        "target_modality": target_modality,
        "labels": labels[idx],
    }


class _Block(nn.Module):
    def __init__(self, d: int, n_heads: int, ffn: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = MultiHeadAttention(d, n_heads)
        self.ffn = ffn

    def forward(self, h: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h))
        u = self.norm2(h)
        return h + (self.ffn(u, modality) if isinstance(self.ffn, ModalityMoE) else self.ffn(u))


class MultimodalLM(nn.Module):
    """A causal transformer over the joint vocabulary whose FFN is chosen by ``ffn``.

    Args:
        ffn: ``"dense"`` (SwiGLU of width ``k d_ff``: the MoEs' active width), ``"shared"``
            or ``"separate"`` (:class:`~effarch.moe.ModalityMoE`'s pools).
        d_model, n_layers, n_heads, n_experts, k, d_ff: sizes.

    ``forward(tokens [B, T], modality [B, T]) -> logits [B, T, VOCAB]``;
    :meth:`balance_loss` sums the MoE layers' load-balancing losses of the last call.
    """

    def __init__(
        self,
        ffn: str,
        *,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        n_experts: int = 8,
        k: int = 2,
        d_ff: int = 64,
    ) -> None:
        super().__init__()
        self.ffn_kind = check_choice("ffn", ffn, FFNS)
        check_positive_int("n_layers", n_layers)

        def make_ffn() -> nn.Module:
            if ffn == "dense":
                return SwiGLU(d_model, k * d_ff)
            return ModalityMoE(d_model, d_ff, n_experts, k, n_modalities=2, pools=ffn)

        self.embed = nn.Embedding(VOCAB, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, make_ffn()) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)

    def moe_layers(self) -> list[ModalityMoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, ModalityMoE)]

    def forward(self, tokens: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        check_tensor("tokens", tokens, ndim=2, dtypes=(torch.int64,))
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h, modality)
        return self.head(self.norm(h))

    def balance_loss(self) -> torch.Tensor:
        layers = self.moe_layers()
        if not layers:
            return torch.zeros((), device=self.head.weight.device)
        return torch.stack([m.balance_loss() for m in layers]).sum()

    def active_parameters(self) -> int:
        """Parameters one token uses: all but the experts it was not routed to."""
        total = sum(p.numel() for p in self.parameters())
        for m in self.moe_layers():
            total -= m.experts.gate_up_proj.numel() + m.experts.down_proj.numel()
            total -= m.gate.weight.numel()
            total += m.active_parameters()
        return total


@torch.no_grad()
def modality_losses(model: MultimodalLM, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean next-token loss in bits, per modality of the target, over ``data``
    (:func:`digit_sequences`): ``"image"`` (bits per patch) and ``"text"`` (bits per letter)
    over both orders, and each task alone: ``"text_given_image"``, the letters of the caption
    half (the name after the image), and ``"image_given_text"``, the patches of the draw half
    (the image after the name).

    The orders differ in what can be learned: after ``[BOT]`` alone, the draw half's letters
    can only guess which digit comes, so ``"text"`` carries that guess (the names' entropy)
    whatever the model; ``"text_given_image"`` is the captioning task.
    """
    model.eval()
    logits = model(data["tokens"], data["modality"])
    nll = F.cross_entropy(
        logits.flatten(0, 1), data["targets"].flatten().clamp_min(0), reduction="none"
    )
    nll = nll.view_as(data["targets"]) / math.log(2)
    scored = data["targets"] != IGNORE_INDEX
    caption = torch.arange(scored.shape[0]) < data["labels"].shape[0]  # the first N rows
    out = {}
    for name, m, rows in (("image", IMAGE, None), ("text", TEXT, None),
                          ("text_given_image", TEXT, caption),
                          ("image_given_text", IMAGE, ~caption)):  # fmt: skip
        mask = scored & (data["target_modality"] == m)
        if rows is not None:
            mask = mask & rows[:, None]
        out[name] = nll[mask].mean().item()
    return out


@torch.no_grad()
def caption_accuracy(model: MultimodalLM, data: dict[str, torch.Tensor]) -> float:
    """Fraction of images whose name the model writes exactly, greedily, after
    ``[BOI] patches [BOT]`` (the caption half of ``data``), letters and pads only."""
    model.eval()
    n = data["labels"].shape[0]
    seq = data["tokens"][:n, : 1 + 16 + 1]
    allowed = torch.full((VOCAB,), float("-inf"))
    allowed[LETTER0 : PAD + 1] = 0.0
    for _ in range(TEXT_LEN):
        mod = torch.where(seq < N_CODES, IMAGE, TEXT)
        nxt = (model(seq, mod)[:, -1] + allowed).argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    want = data["tokens"][:n, 18:]
    return (seq[:, 18:] == want).all(-1).float().mean().item()


@torch.no_grad()
def routing_by_modality(model: MultimodalLM, data: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per MoE layer, ``[2, E]``: the fraction of image tokens' (row 0) and text tokens'
    (row 1) assignments that each expert receives, over ``data``."""
    model.eval()
    model(data["tokens"], data["modality"])
    return [
        modality_load(m.routing.experts, m.modality, m.n_experts, m.n_modalities)
        for m in model.moe_layers()
    ]


def routing_summary(model: MultimodalLM, data: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per MoE layer, over ``data``: ``load`` (:func:`routing_by_modality`'s ``[2, E]``),
    ``separation``, the total-variation distance between the image and the text rows
    (``0.5 sum_e |l_image,e - l_text,e|``: 0 when both use the experts alike, 1 when they
    use disjoint ones), and ``cv_image`` / ``cv_text``, the coefficient of variation of each
    modality's load over the experts of its pool (:meth:`~effarch.moe.ModalityMoE.pool`)."""
    out = []
    for layer, load in zip(model.moe_layers(), routing_by_modality(model, data), strict=True):
        cv = [
            coefficient_of_variation(load[m, layer.pool(m).start : layer.pool(m).stop]).item()
            for m in (IMAGE, TEXT)
        ]
        out.append({
            "load": load,
            "separation": 0.5 * (load[IMAGE] - load[TEXT]).abs().sum().item(),
            "cv_image": cv[IMAGE],
            "cv_text": cv[TEXT],
        })  # fmt: skip
    return out


def train_multimodal(
    ffn: str,
    *,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    data: dict[str, torch.Tensor] | None = None,
    eval_data: dict[str, torch.Tensor] | None = None,
    eval_every: int = 100,
    progress: bool = True,
) -> tuple[MultimodalLM, dict[str, list]]:
    """Train one :class:`MultimodalLM` with FFN ``ffn`` on ``data`` (default: the training
    digits' sequences) for ``config["steps"]`` steps; ``config`` overrides :data:`CONFIG`.

    The initialisation comes from ``seed``, and so do the batches, the same for every
    ``ffn``: the three FFNs of one seed differ in nothing else. The loss is the next-token
    cross-entropy over every scored target plus ``config["balance"]`` times the MoE layers'
    balance losses. With ``eval_data``, both held-out losses (:func:`modality_losses`) are
    measured every ``eval_every`` steps and after the last.

    Returns:
        ``(model, history)``: ``history["losses"]`` the training loss at every step and
        ``history["eval"]`` a list of ``(step, bits per patch, bits per letter, bits per
        letter of the caption half, bits per patch of the draw half)`` (the values of
        :func:`modality_losses`, in its order).
    """
    cfg = {**CONFIG, **(config or {})}
    data = digit_sequences("train") if data is None else data
    sizes = {k: cfg[k] for k in ("d_model", "n_layers", "n_heads", "n_experts", "k", "d_ff")}
    torch.manual_seed(seed)
    model = MultimodalLM(ffn, **sizes)
    n = data["tokens"].shape[0]

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 * seed + step)  # same batches for every ffn
        idx = torch.randint(0, n, (cfg["batch_size"],), generator=g)
        return idx, idx

    def loss_fn(m: MultimodalLM, idx: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        logits = m(data["tokens"][idx], data["modality"][idx])
        ce = F.cross_entropy(
            logits.flatten(0, 1), data["targets"][idx].flatten(), ignore_index=IGNORE_INDEX
        )
        return ce + cfg["balance"] * m.balance_loss()

    evals: list[tuple[float, ...]] = []

    def after_step(m: nn.Module, step: int) -> None:
        if eval_data is not None and ((step + 1) % eval_every == 0 or step + 1 == cfg["steps"]):
            losses = modality_losses(m, eval_data)
            evals.append((step + 1, *losses.values()))
            m.train()

    result = train(model, batch, steps=cfg["steps"], lr=cfg["lr"], loss_fn=loss_fn,
                   progress=progress, desc=f"{ffn}, seed {seed}",
                   after_step=after_step)  # fmt: skip
    return model, {"losses": result.losses, "eval": evals}


def multimodal_moe_experiment(
    config: dict[str, Any] | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Train every FFN of :data:`FFNS` for each seed; return the card (configuration, per
    run: both held-out losses after the last step and every 100 steps, caption accuracy,
    the routing by modality per layer, the training loss every 10 steps, parameters and
    active parameters)."""
    cfg = {**CONFIG, **(config or {})}
    train_data, held = digit_sequences("train"), digit_sequences("heldout")
    runs = []
    start = time.perf_counter()
    for seed in cfg["seeds"]:
        for ffn in FFNS:
            model, history = train_multimodal(
                ffn, seed=seed, config=cfg, data=train_data, eval_data=held, progress=progress
            )
            runs.append({
                "ffn": ffn,
                "seed": seed,
                **{f"{k}_bits": v for k, v in modality_losses(model, held).items()},
                "caption_accuracy": caption_accuracy(model, held),
                "routing": [r.tolist() for r in routing_by_modality(model, held)],
                "losses": history["losses"][::10],
                "eval": history["eval"],
                "parameters": sum(p.numel() for p in model.parameters()),
                "active_parameters": model.active_parameters(),
            })  # fmt: skip
    return {"config": cfg, "seconds": time.perf_counter() - start, "runs": runs}


def stored_multimodal_moe() -> dict[str, Any]:
    """The stored CPU card (:data:`STORED`)."""
    return json.loads(STORED.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m effarch.experiments multimodal-moe")
    parser.add_argument("--out", type=Path, default=STORED)
    parser.add_argument("--steps", type=int, default=CONFIG["steps"])
    args = parser.parse_args(argv)
    card = multimodal_moe_experiment({"steps": args.steps})
    args.out.write_text(json.dumps(card, indent=1))
    print(f"wrote {args.out} ({card['seconds']:.0f} s)")
