r"""Multi-query associative recall (MQAR): the synthetic task that measures a mixer's memory.

Arora et al. (2023), *Zoology: Measuring and Improving Recall in Efficient Language Models*
(arXiv:2312.04927), show that the quality gap between attention and fixed-state mixers is
largely a gap in *associative recall*: finding, in the context, the token that followed an
earlier occurrence of the current one. MQAR isolates that ability. The vocabulary is split
into key tokens and value tokens; a sequence first lists ``P`` key-value pairs, then asks for
several of the keys again, and the model must answer each query with the value bound to that
key. A softmax-attention layer solves it at any ``P`` (it can look the key up); a mixer with a
fixed state of ``S`` numbers must compress all ``P`` bindings into that state, and fails once
``P`` outgrows it.

Layout of one sequence of length ``T`` (token ids; ``V`` the vocabulary size)::

    position   0   1   2   3  ...  2P-2 2P-1 | 2P ...                         T-1
    input     k1  v1  k2  v2  ...  kP   vP   | filler, with the Q queries at random positions
    target   -100 ...                   -100 | -100 except at a query q_j = k_i: target v_i

* keys are drawn from ``1 .. V/2 - 1`` (distinct within a sequence), values from
  ``V/2 .. V - 1`` (drawn independently, so two keys may share a value); id ``0`` never is a
  key, it is the filler in ``filler="zero"`` mode;
* the ``Q = n_queries`` queries ask for ``Q`` distinct keys of the sequence, in random order,
  at ``Q`` distinct random positions after the pairs;
* filler positions hold ``0`` (``filler="zero"``, the default) or uniformly random tokens
  (``"random"``, as in Zoology). Random filler is a harder, noisier task: a filler key
  followed by a filler value looks exactly like a new binding, which a recurrent state
  absorbs and which may overwrite the true one before it is asked for;
* ``targets[n, t]`` is what the model must output *at* position ``t`` (the next-token
  convention: the answer to a query is predicted at the query itself), ``-100`` (PyTorch's
  ``ignore_index``) wherever nothing is asked.

Worked example, ``V = 16`` (keys ``1..7``, values ``8..15``), ``P = 2``, ``Q = 2``, ``T = 8``,
zero filler::

    inputs   3 12  5  9 | 0  5  0  3
    targets  -100 x 4   | -100 9 -100 12

The pairs bind ``3 -> 12`` and ``5 -> 9``; the query ``5`` at position 5 must be answered
``9``, the query ``3`` at position 7 must be answered ``12``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_choice, check_positive_int, check_tensor

__all__ = ["IGNORE_INDEX", "MQARBatch", "mqar", "recall_accuracy"]

#: Target value of the positions that ask for nothing (``torch.nn.CrossEntropyLoss`` default).
IGNORE_INDEX = -100

_FILLERS = ("random", "zero")
# Random keys for at most this many (example, candidate) pairs at a time: bounds the memory
# of drawing distinct keys by ranking random numbers, whatever the vocabulary.
_DRAW_BLOCK = 1 << 22


@dataclass(frozen=True)
class MQARBatch:
    """A set of MQAR sequences (see :func:`mqar` for the layout).

    Attributes:
        inputs: ``[N, T]`` long, the token ids.
        targets: ``[N, T]`` long, the value to predict at each query position and
            :data:`IGNORE_INDEX` (``-100``) elsewhere.
        keys: ``[N, P]`` long, the keys in the order of the pairs.
        values: ``[N, P]`` long, ``values[n, i]`` is bound to ``keys[n, i]``.
        query_positions: ``[N, Q]`` long, the positions of the queries, ascending.
        vocab_size: ``V``; every token id lies in ``0 .. V - 1``.

    ``len(batch)`` is ``N``; ``batch[i:j]`` (or any index of the first dimension) selects
    examples; ``batch.to(device)`` moves every tensor.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    query_positions: torch.Tensor
    vocab_size: int

    @property
    def seq_len(self) -> int:
        """``T``."""
        return self.inputs.shape[1]

    @property
    def n_pairs(self) -> int:
        """``P``."""
        return self.keys.shape[1]

    @property
    def n_queries(self) -> int:
        """``Q``."""
        return self.query_positions.shape[1]

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: Any) -> MQARBatch:
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return MQARBatch(
            self.inputs[index],
            self.targets[index],
            self.keys[index],
            self.values[index],
            self.query_positions[index],
            self.vocab_size,
        )

    def to(self, device: torch.device | str) -> MQARBatch:
        """The same examples on ``device``."""
        return MQARBatch(
            self.inputs.to(device),
            self.targets.to(device),
            self.keys.to(device),
            self.values.to(device),
            self.query_positions.to(device),
            self.vocab_size,
        )


def _distinct(n: int, k: int, low: int, high: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, k]`` long: in each row ``k`` distinct integers drawn uniformly from ``[low, high)``,
    in random order.

    Small ranges rank ``high - low`` i.i.d. uniform numbers and keep the ``k`` smallest (rows in
    blocks, to bound the memory); large ranges use Floyd's algorithm, ``k`` vectorised steps
    that cost ``O(n k^2)`` whatever the range, followed by a random shuffle of each row.
    """
    width = high - low
    if k * k > 4 * width:
        rows = max(1, _DRAW_BLOCK // width)
        out = [
            torch.rand(min(rows, n - s), width, generator=gen).argsort(dim=1)[:, :k]
            for s in range(0, n, rows)
        ]
        return torch.cat(out) + low
    # Floyd: for j = W-k .. W-1 draw t in [0, j]; take t unless already taken, else take j.
    chosen = torch.empty(n, k, dtype=torch.long)
    for i, j in enumerate(range(width - k, width)):
        t = torch.randint(0, j + 1, (n,), generator=gen)
        taken = (chosen[:, :i] == t[:, None]).any(dim=1)
        chosen[:, i] = torch.where(taken, torch.full_like(t, j), t)
    order = torch.rand(n, k, generator=gen).argsort(dim=1)
    return chosen.gather(1, order) + low


def mqar(
    n_examples: int,
    *,
    seq_len: int = 64,
    n_pairs: int = 8,
    vocab_size: int = 64,
    n_queries: int | None = None,
    filler: str = "zero",
    seed: int = 0,
    device: torch.device | str | None = None,
) -> MQARBatch:
    r"""Generate ``n_examples`` multi-query associative recall sequences.

    Layout (positions ``0 .. T-1``; details in the module docstring)::

        k1 v1 k2 v2 ... kP vP | filler with Q queries k_{pi(1)} ... k_{pi(Q)} at random places

    and ``targets[n, t] = v_i`` where ``inputs[n, t]`` is a query for ``k_i``, ``-100``
    elsewhere. Keys come from ``1 .. V/2 - 1`` (distinct within a sequence), values from
    ``V/2 .. V-1``. Generation is vectorised over the examples and uses its own
    ``torch.Generator`` seeded with ``seed`` on the CPU, so the same arguments give the same
    data on any device and leave the global random state alone.

    Args:
        n_examples: ``N``.
        seq_len: ``T``; must hold the ``2P`` pair tokens and the ``Q`` queries after them.
        n_pairs: ``P``, at most ``V/2 - 1`` (the number of key tokens).
        vocab_size: ``V`` (at least 4).
        n_queries: ``Q``, at most ``P`` (every query asks for a different key); default ``P``.
        filler: ``"zero"`` (token ``0``) or ``"random"`` (uniform over the whole vocabulary).
        seed: seed of the generator.
        device: where the tensors go (default CPU).

    Returns:
        An :class:`MQARBatch` with ``inputs``/``targets`` ``[N, T]``.

    Example:
        >>> b = mqar(2, seq_len=8, n_pairs=2, vocab_size=16, filler="zero", seed=1)
        >>> b.inputs.shape, int((b.targets != -100).sum())
        (torch.Size([2, 8]), 4)
    """
    check_positive_int("n_examples", n_examples)
    check_positive_int("seq_len", seq_len)
    check_positive_int("n_pairs", n_pairs)
    check_positive_int("vocab_size", vocab_size)
    if n_queries is None:
        n_queries = n_pairs
    check_positive_int("n_queries", n_queries)
    check_choice("filler", filler, _FILLERS)
    check_positive_int("seed", seed, allow_zero=True)
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be at least 4 (keys and values), got {vocab_size}")
    half = vocab_size // 2
    if n_pairs > half - 1:
        raise ValueError(
            f"n_pairs must be at most the {half - 1} key tokens of vocab_size={vocab_size} "
            f"(keys are 1 .. vocab_size // 2 - 1 and distinct), got {n_pairs}"
        )
    if n_queries > n_pairs:
        raise ValueError(
            f"n_queries must be at most n_pairs={n_pairs} (each query asks for a different "
            f"key), got {n_queries}"
        )
    if seq_len < 2 * n_pairs + n_queries:
        raise ValueError(
            f"seq_len must be at least 2 * n_pairs + n_queries = {2 * n_pairs + n_queries} "
            f"to hold the pairs and the queries, got {seq_len}"
        )

    gen = torch.Generator().manual_seed(seed)
    n, p, q, t = n_examples, n_pairs, n_queries, seq_len
    context = 2 * p
    keys = _distinct(n, p, 1, half, gen)  # [N, P]
    values = torch.randint(half, vocab_size, (n, p), generator=gen)  # [N, P]
    asked = _distinct(n, q, 0, p, gen)  # [N, Q]: which pair each query asks for
    slots = _distinct(n, q, 0, t - context, gen) + context  # [N, Q]: where, unordered
    if filler == "random":
        inputs = torch.randint(0, vocab_size, (n, t), generator=gen)
    else:
        inputs = torch.zeros(n, t, dtype=torch.long)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    inputs.scatter_(1, slots, keys.gather(1, asked))
    targets = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
    targets.scatter_(1, slots, values.gather(1, asked))
    batch = MQARBatch(inputs, targets, keys, values, slots.sort(dim=1).values, vocab_size)
    return batch if device is None else batch.to(device)


def recall_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    r"""Fraction of the query positions whose most likely token is the right value.

    ``acc = #{(n, t): targets[n, t] != -100 and argmax_v logits[n, t, v] = targets[n, t]}
    / #{(n, t): targets[n, t] != -100}``.

    Args:
        logits: ``[N, T, V]`` floating scores (or ``[N, T]`` long predicted ids).
        targets: ``[N, T]`` long, ``-100`` where nothing is asked.

    Returns:
        The accuracy, a float in ``[0, 1]``.
    """
    check_tensor("targets", targets, ndim=2)
    if targets.dtype != torch.long:
        raise TypeError(f"targets must have dtype torch.int64, got {targets.dtype}")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim == 3 and logits.is_floating_point():
        pred = logits.argmax(dim=-1)
    elif logits.ndim == 2 and logits.dtype == torch.long:
        pred = logits
    else:
        raise ValueError(
            "logits must be [N, T, V] floating scores or [N, T] long predictions, got "
            f"shape {tuple(logits.shape)} and dtype {logits.dtype}"
        )
    if pred.shape != targets.shape:
        raise ValueError(
            f"logits must match targets [N, T] = {tuple(targets.shape)} in their first two "
            f"dimensions, got {tuple(logits.shape)}"
        )
    asked = targets != IGNORE_INDEX
    total = int(asked.sum())
    if total == 0:
        raise ValueError("targets ask for nothing: every entry is -100")
    return float((pred.to(targets.device)[asked] == targets[asked]).sum()) / total
