r"""Text every machine has: the Python standard library's own source files, as bytes.

The small language model of chapter 3 (:mod:`effarch.models.bytelm`) needs real text to
learn from, and CI can download nothing. Every Python installation carries a few
megabytes of English-commented source code: :func:`stdlib_corpus` finds it at run time
(``sysconfig``'s ``stdlib`` path), leaves out the test suites and GUI demos, and splits the
files into a training and a held-out part by a hash of each file's relative path, so the
split is the same on every machine and does not depend on the order files are listed in::

    held out  <=>  sha1(relative path)[0] % holdout == 0      (about 1 file in ``holdout``)

A different Python version ships slightly different files; :attr:`TextCorpus.description`
records the version, the file counts and a digest of the file list so a run says what it
saw. :func:`byte_batches` cuts random windows for next-byte prediction, each preceded by the
beginning-of-sequence token ``BOS = 256`` (a vocabulary of 257: the 256 bytes and BOS).
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._checks import check_positive_int

__all__ = ["BOS", "EXCLUDED_DIRS", "TextCorpus", "byte_batches", "heldout_windows", "stdlib_corpus"]

BOS = 256
"""The beginning-of-sequence token, the 257th symbol after the 256 byte values."""

EXCLUDED_DIRS = frozenset({"test", "tests", "site-packages", "idlelib", "turtledemo"})
"""Folders of the standard library left out of the corpus (test data, GUI demos, packages
installed later)."""


@dataclass(frozen=True)
class TextCorpus:
    """A byte corpus split into training and held-out text.

    Attributes:
        train: ``uint8`` tensor, the training files concatenated (each file followed by a
            newline).
        heldout: the held-out files, likewise.
        train_files: the relative paths of the training files, sorted.
        heldout_files: those of the held-out files, sorted.
        description: where the text came from (root, Python version, counts, digest).
    """

    train: torch.Tensor
    heldout: torch.Tensor
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]
    description: dict[str, Any] = field(default_factory=dict)


def _is_heldout(relative: str, holdout: int) -> bool:
    return hashlib.sha1(relative.encode()).digest()[0] % holdout == 0


def stdlib_corpus(root: str | Path | None = None, *, holdout: int = 20) -> TextCorpus:
    """The ``*.py`` files under ``root`` (default: this Python's standard library), split.

    Args:
        root: the folder to read; default ``sysconfig.get_paths()["stdlib"]``.
        holdout: about one file in ``holdout`` goes to the held-out split (by path hash).

    Returns:
        A :class:`TextCorpus`. Files in :data:`EXCLUDED_DIRS` are skipped.
    """
    check_positive_int("holdout", holdout)
    if holdout < 2:
        raise ValueError(f"holdout must be at least 2 (one file in holdout), got {holdout}")
    base = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not base.is_dir():
        raise ValueError(f"root must be a folder, got {str(base)!r}")
    files = sorted(
        p.relative_to(base).as_posix()
        for p in base.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(p.relative_to(base).parts) and p.is_file()
    )
    if not files:
        raise ValueError(f"root holds no .py files outside {sorted(EXCLUDED_DIRS)}: {base}")
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    names: dict[bool, list[str]] = {False: [], True: []}
    for rel in files:
        held = _is_heldout(rel, holdout)
        parts[held].append((base / rel).read_bytes() + b"\n")
        names[held].append(rel)
    if not names[True] or not names[False]:
        raise ValueError(f"root has too few files ({len(files)}) for a split of 1 in {holdout}")

    def as_tensor(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

    train, heldout = as_tensor(parts[False]), as_tensor(parts[True])
    description = {
        "source": "Python standard library *.py files"
        + (" (default root)" if root is None else ""),
        "python": platform.python_version(),
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "holdout": f"sha1(relative path)[0] % {holdout} == 0",
        "train_files": len(names[False]),
        "heldout_files": len(names[True]),
        "train_bytes": int(train.numel()),
        "heldout_bytes": int(heldout.numel()),
        "file_list_sha1": hashlib.sha1("\n".join(files).encode()).hexdigest(),
    }
    return TextCorpus(train, heldout, tuple(names[False]), tuple(names[True]), description)


def _windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, ...]:
    idx = starts[:, None] + torch.arange(seq_len)
    targets = data[idx].long()
    bos = torch.full((len(starts), 1), BOS, dtype=torch.long)
    return torch.cat([bos, targets[:, :-1]], dim=1), targets


def _check_text(data: Any, seq_len: int) -> None:
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.ndim != 1:
        got = f"{data.dtype} {tuple(data.shape)}" if isinstance(data, torch.Tensor) else type(data)
        raise TypeError(f"data must be a 1-D uint8 tensor of bytes, got {got}")
    if data.numel() <= seq_len:
        raise ValueError(f"data must hold more than seq_len={seq_len} bytes, got {data.numel()}")


def byte_batches(
    data: torch.Tensor, seq_len: int, batch_size: int, *, seed: int = 0
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Random windows for next-byte prediction: ``step -> (inputs, targets)``, ``[B, T]``.

    A window is ``seq_len`` consecutive bytes ``w``; ``targets = w`` and ``inputs = [BOS,
    w_0 .. w_{T-2}]``, so the model predicts every byte of the window, the first from BOS
    alone. Step ``s`` draws its starts from a generator seeded with ``(seed, s)``: the same
    step gives the same batch however many steps ran before it.
    """
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
        check_positive_int(name, v)
    check_positive_int("seed", seed, allow_zero=True)
    _check_text(data, seq_len)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=gen)
        return _windows(data, starts, seq_len)

    return batch


def heldout_windows(data: torch.Tensor, seq_len: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` evenly spaced windows of ``data`` (same layout as :func:`byte_batches`)."""
    check_positive_int("seq_len", seq_len)
    check_positive_int("n", n)
    _check_text(data, seq_len)
    starts = torch.linspace(0, data.numel() - seq_len - 1, n).long()
    return _windows(data, starts, seq_len)
