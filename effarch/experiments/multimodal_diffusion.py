"""One masked diffusion model over digit images and their names (chapter 7.3).

    python -m effarch.experiments multimodal-diffusion --out-dir effarch/experiments
    python -m effarch.experiments multimodal-diffusion --steps 200 --out-dir /tmp/x

Each training pair is one sequence of ``5 + 64`` tokens: the digit's English name spelled in
letters (padded to 5) and scikit-learn's 8x8 image quantised to ``levels`` grey levels, read
row by row (:func:`~effarch.tasks.load_digits`). A bidirectional
:class:`~effarch.diffusion.DiffusionLM` learns to denoise the joint sequence with
:func:`~effarch.diffusion.joint_diffusion_loss`, in two variants trained from the same
initialisation on the same batches:

- ``independent``: a noise level per modality (the default of the loss);
- ``shared``: one level for the whole sequence (the joint ELBO, as UniDisc trains).

The held-out images (:func:`~effarch.tasks.digits_split`) measure the two directions:
:func:`caption` (the text from the image: mask the name, :func:`~effarch.diffusion.infill`)
scored by exact match, and :func:`draw` (the image from the text: mask the image) scored by
:func:`image_judge`, a logistic regression fitted on the real training images, a third model.
The float16 weights (``multimodal_<variant>.pt``, under 2 MB) and a card
``multimodal_diffusion_cpu.json`` (configuration, loss curves, both accuracies) are stored;
:func:`load_multimodal_model` loads them.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_positive_int, check_tensor
from ..diffusion import (
    DiffusionLM,
    DiffusionLMConfig,
    PerPositionVocab,
    infill,
    joint_diffusion_loss,
)
from ..tasks import DIGIT_NAMES, digits_split, load_digits
from ..train import train

__all__ = ["CONFIG", "STORED", "VARIANTS", "DigitsVocab", "caption", "draw", "image_judge",
           "load_multimodal_model", "main", "multimodal_experiment", "pairs",
           "stored_multimodal", "vocab"]  # fmt: skip

HERE = Path(__file__).resolve().parent
STORED = HERE / "multimodal_diffusion_cpu.json"
"""The card of the stored CPU run."""

CONFIG: dict[str, Any] = {
    "levels": 4, "text_len": 5, "d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 384,
    "steps": 2500, "batch_size": 64, "lr": 2e-3, "n_heldout": 297,
}  # fmt: skip
"""Model and training sizes of the stored CPU run."""

VARIANTS = ("independent", "shared")
"""A noise level per modality, or one for the whole sequence."""


@dataclass(frozen=True)
class DigitsVocab:
    """Token ids of the joint sequence ``[text (text_len) | image (64)]``.

    Grey levels ``0 .. levels-1``, then the letters ``a .. z``, then the pad (ends a short
    name) and the mask.
    """

    levels: int = 4
    text_len: int = 5

    @property
    def letter0(self) -> int:
        return self.levels

    @property
    def pad_id(self) -> int:
        return self.levels + 26

    @property
    def mask_id(self) -> int:
        return self.pad_id + 1

    @property
    def vocab_size(self) -> int:
        return self.mask_id + 1

    @property
    def length(self) -> int:
        return self.text_len + 64

    @property
    def segments(self) -> list[tuple[int, int]]:
        """``[(0, text_len), (text_len, text_len + 64)]``: text, then image."""
        return [(0, self.text_len), (self.text_len, self.length)]

    def encode_text(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels [N]`` (0..9) to their names' tokens ``[N, text_len]``."""
        check_tensor("labels", labels, ndim=1, dtypes=(torch.long,))
        rows = []
        for y in labels.tolist():
            name = DIGIT_NAMES[y]
            ids = [self.letter0 + ord(c) - ord("a") for c in name]
            rows.append(ids + [self.pad_id] * (self.text_len - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.text_len)

    def decode_text(self, tokens: torch.Tensor) -> list[str]:
        """The text positions of ``tokens [N, L]`` as strings (pad dropped; ``?`` for a token
        that is not a letter)."""
        out = []
        for row in tokens[:, : self.text_len].tolist():
            chars = []
            for t in row:
                if t == self.pad_id:
                    continue
                ok = self.letter0 <= t < self.letter0 + 26
                chars.append(chr(ord("a") + t - self.letter0) if ok else "?")
            out.append("".join(chars))
        return out

    def allowed(self) -> torch.Tensor:
        """``[L, V]`` bool: letters and pad in the text, grey levels in the image."""
        a = torch.zeros(self.length, self.vocab_size, dtype=torch.bool)
        a[: self.text_len, self.letter0 : self.pad_id + 1] = True
        a[self.text_len :, : self.levels] = True
        return a


def vocab() -> DigitsVocab:
    """The vocabulary of the stored run."""
    return DigitsVocab(CONFIG["levels"], CONFIG["text_len"])


def pairs(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [N, 69], labels [N])`` of the ``"train"`` or ``"heldout"`` images."""
    check_choice("split", split, ("train", "heldout"))
    v = vocab()
    images, labels = load_digits(v.levels)
    idx = digits_split(CONFIG["n_heldout"])[0 if split == "train" else 1]
    tokens = torch.cat([v.encode_text(labels[idx]), images[idx].flatten(1)], 1)
    return tokens, labels[idx]


def _model(seed: int) -> DiffusionLM:
    c = CONFIG
    torch.manual_seed(seed)
    cfg = DiffusionLMConfig(vocab().vocab_size, d_model=c["d_model"], n_layers=c["n_layers"],
                            n_heads=c["n_heads"], d_ff=c["d_ff"])  # fmt: skip
    return DiffusionLM(cfg)


@torch.no_grad()
def caption(
    model: nn.Module, images: torch.Tensor, *, steps: int | None = None, **sampling: Any
) -> list[str]:
    """The text a model writes for ``images [N, 8, 8]`` (grey-level tokens): the name masked,
    the image given, :func:`~effarch.diffusion.infill` with ``steps`` (default one letter per
    step; greedy unless ``sampling`` says otherwise)."""
    v = vocab()
    check_tensor("images", images, ndim=3, dtypes=(torch.long,))
    x = torch.cat([torch.full((len(images), v.text_len), v.mask_id), images.flatten(1)], 1)
    out = infill(model, x, mask_id=v.mask_id, steps=steps, **sampling)
    return v.decode_text(out.tokens)


@torch.no_grad()
def draw(
    model: nn.Module,
    labels: torch.Tensor,
    *,
    steps: int = 64,
    temperature: float = 1.0,
    remasking: str = "random",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Images ``[N, 8, 8]`` (grey-level tokens) drawn for the names of ``labels [N]``: the image
    masked, the name given, ``steps`` steps of :func:`~effarch.diffusion.infill` (default:
    one pixel per step, at temperature 1 in a random order, the exact reverse process)."""
    v = vocab()
    x = torch.cat([v.encode_text(labels), torch.full((len(labels), 64), v.mask_id)], 1)
    out = infill(model, x, mask_id=v.mask_id, steps=steps, temperature=temperature,
                 remasking=remasking, generator=generator)  # fmt: skip
    return out.tokens[:, v.text_len :].reshape(-1, 8, 8)


@functools.cache
def _judge():
    from sklearn.linear_model import LogisticRegression

    v = vocab()
    images, labels = load_digits(v.levels)
    train_idx = digits_split(CONFIG["n_heldout"])[0]
    x = images[train_idx].flatten(1).float().numpy()
    return LogisticRegression(max_iter=5000).fit(x, labels[train_idx].numpy())


def image_judge(images: torch.Tensor) -> torch.Tensor:
    """The digit a logistic regression (scikit-learn, fitted on the training split's
    quantised images) sees in ``images [N, 8, 8]`` (grey-level tokens): labels ``[N]``."""
    check_tensor("images", images, ndim=3, dtypes=(torch.long,))
    return torch.from_numpy(_judge().predict(images.flatten(1).float().numpy())).long()


def _evaluate(model: nn.Module) -> dict[str, float]:
    tokens, labels = pairs("heldout")
    images = tokens[:, vocab().text_len :].reshape(-1, 8, 8)
    names = [DIGIT_NAMES[y] for y in labels.tolist()]
    said = caption(model, images)
    drawn = draw(model, torch.arange(10).repeat(10), generator=torch.Generator().manual_seed(0))
    seen = image_judge(drawn)
    return {
        "caption_accuracy": sum(a == b for a, b in zip(said, names, strict=True)) / len(names),
        "draw_accuracy": (seen == torch.arange(10).repeat(10)).float().mean().item(),
    }


def multimodal_experiment(
    out_dir: Path, *, variants: list[str] | None = None, steps: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Train each variant, store its weights under ``out_dir``; return the card. Its
    ``config`` is :data:`CONFIG` as written; a ``steps`` override shows in each run's
    ``steps``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    v = vocab()
    tokens, _ = pairs("train")
    n_steps = steps or CONFIG["steps"]
    card: dict[str, Any] = {"config": CONFIG, "seed": seed, "runs": []}
    t0 = time.perf_counter()
    for variant in variants or list(VARIANTS):
        check_choice("variant", variant, VARIANTS)
        g = torch.Generator().manual_seed(seed + 1)

        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            gb = torch.Generator().manual_seed(seed * 1_000_003 + step)
            rows = tokens[torch.randint(len(tokens), (CONFIG["batch_size"],), generator=gb)]
            return rows, rows

        def loss_fn(m, inputs, targets, independent=variant == "independent", g=g):
            return joint_diffusion_loss(m, targets, v.segments, v.mask_id,
                                        independent=independent, generator=g)  # fmt: skip

        model = _model(seed)
        t1 = time.perf_counter()
        res = train(model, batch, steps=n_steps, lr=CONFIG["lr"], loss_fn=loss_fn,
                    desc=f"multimodal {variant}", seed=seed)  # fmt: skip
        model.eval()
        scores = _evaluate(PerPositionVocab(model, v.allowed()))
        every = max(1, len(res.losses) // 200)
        card["runs"].append({
            "variant": variant, "steps": res.steps, "seconds": time.perf_counter() - t1,
            "parameters": sum(p.numel() for p in model.parameters()),
            "loss_every": every, "losses": res.losses[::every], **scores,
        })  # fmt: skip
        sd = {k: t.half() for k, t in model.state_dict().items()}
        torch.save(sd, out_dir / f"multimodal_{variant}.pt")
        print(f"\n{variant}: {scores}")
    card["seconds"] = time.perf_counter() - t0
    return card


def stored_multimodal() -> dict[str, Any]:
    """The stored card (:data:`STORED`)."""
    return json.loads(STORED.read_text())


def load_multimodal_model(
    variant: str = "independent", *, directory: Path | None = None
) -> PerPositionVocab:
    """A stored model (float32, eval mode), its logits restricted per position
    (:class:`~effarch.diffusion.PerPositionVocab`: letters in the text, grey levels in the
    image); ``.model`` is the :class:`~effarch.diffusion.DiffusionLM` itself."""
    check_choice("variant", variant, VARIANTS)
    model = _model(0)
    sd = torch.load((directory or HERE) / f"multimodal_{variant}.pt", map_location="cpu",
                    weights_only=True)  # fmt: skip
    model.load_state_dict({k: t.float() for k, t in sd.items()})
    return PerPositionVocab(model.eval(), vocab().allowed()).eval()


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m effarch.experiments multimodal-diffusion",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, required=True)
    args = p.parse_args(argv)
    if args.steps is not None:
        check_positive_int("steps", args.steps)
    card = multimodal_experiment(args.out_dir, variants=args.variants, steps=args.steps,
                                 seed=args.seed)  # fmt: skip
    out = args.out_dir / "multimodal_diffusion_cpu.json"
    out.write_text(json.dumps(card, indent=1) + "\n")
    print(f"wrote {out} in {card['seconds']:.0f} s")
