"""The MQAR generator: its layout checked by a plain Python loop, seeding, vectorisation and
errors."""

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from effarch.tasks import IGNORE_INDEX, MQARBatch, mqar, recall_accuracy


def _check_layout(batch: MQARBatch, *, n_pairs: int, vocab_size: int, n_queries: int) -> None:
    """Re-derive every target from the inputs alone, one sequence at a time."""
    half = vocab_size // 2
    for seq, tgt in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        keys, values = seq[0 : 2 * n_pairs : 2], seq[1 : 2 * n_pairs : 2]
        assert len(set(keys)) == n_pairs, "keys must be distinct within a sequence"
        assert all(1 <= k < half for k in keys)
        assert all(half <= v < vocab_size for v in values)
        assert all(0 <= x < vocab_size for x in seq)
        binding = dict(zip(keys, values, strict=True))
        asked = []
        for t, (x, y) in enumerate(zip(seq, tgt, strict=True)):
            if y == IGNORE_INDEX:
                continue
            assert t >= 2 * n_pairs, "no query inside the pairs"
            assert x in binding, "a query is one of the sequence's keys"
            assert y == binding[x], "the target is the value bound to the queried key"
            asked.append(x)
        assert len(asked) == n_queries
        assert len(set(asked)) == n_queries, "each query asks for a different key"
        assert all(y == IGNORE_INDEX for y in tgt[: 2 * n_pairs])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(seq_len=64, n_pairs=8, vocab_size=64),
        dict(seq_len=20, n_pairs=4, vocab_size=16, n_queries=2, filler="zero"),
        dict(seq_len=24, n_pairs=7, vocab_size=16, n_queries=7),  # every key, no spare slot
        dict(seq_len=300, n_pairs=40, vocab_size=8192, n_queries=16),  # Floyd's draw
    ],
)
def test_layout_by_brute_force(kwargs):
    batch = mqar(50, seed=3, **kwargs)
    n_pairs, vocab = kwargs["n_pairs"], kwargs["vocab_size"]
    n_queries = kwargs.get("n_queries", n_pairs)
    assert batch.inputs.shape == batch.targets.shape == (50, kwargs["seq_len"])
    assert batch.inputs.dtype == batch.targets.dtype == torch.long
    sizes = (batch.n_pairs, batch.n_queries, batch.seq_len)
    assert sizes == (n_pairs, n_queries, kwargs["seq_len"])
    _check_layout(batch, n_pairs=n_pairs, vocab_size=vocab, n_queries=n_queries)
    # the extra fields agree with the tokens
    assert torch.equal(batch.inputs[:, 0 : 2 * n_pairs : 2], batch.keys)
    assert torch.equal(batch.inputs[:, 1 : 2 * n_pairs : 2], batch.values)
    asked = (batch.targets != IGNORE_INDEX).nonzero()[:, 1].reshape(50, n_queries)
    assert torch.equal(asked, batch.query_positions)
    if kwargs.get("filler") == "zero":
        filler = torch.ones_like(batch.inputs, dtype=torch.bool)
        filler[:, : 2 * n_pairs] = False
        filler.scatter_(1, batch.query_positions, False)
        assert (batch.inputs[filler] == 0).all()


def test_worked_example():
    b = mqar(1, seq_len=8, n_pairs=2, vocab_size=16, filler="zero", seed=1)
    seq, tgt = b.inputs[0].tolist(), b.targets[0].tolist()
    k1, v1, k2, v2 = seq[:4]
    for t in range(4, 8):
        if seq[t] == 0:
            assert tgt[t] == IGNORE_INDEX
        else:
            assert tgt[t] == (v1 if seq[t] == k1 else v2)


def test_draws_look_uniform():
    """Keys, values and query slots cover their ranges evenly (no position is favoured)."""
    b = mqar(4000, seq_len=40, n_pairs=6, vocab_size=32, seed=0)
    key_counts = torch.bincount(b.keys.flatten(), minlength=16)[1:16].float()
    assert key_counts.min() > 0.8 * key_counts.mean()
    slot_counts = torch.bincount(b.query_positions.flatten(), minlength=40)[12:].float()
    assert slot_counts.min() > 0.8 * slot_counts.mean()
    first_keys = torch.bincount(b.keys[:, 0], minlength=16)[1:16].float()
    assert first_keys.min() > 0.7 * first_keys.mean()


def test_seeds_reproduce_and_differ():
    a, b, c = mqar(200, seed=5), mqar(200, seed=5), mqar(200, seed=6)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    # the generator is private: the global random state is neither used nor changed
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    mqar(10, seed=1)
    assert torch.equal(torch.rand(1), before)


class _CountTorchCalls(TorchFunctionMode):
    """Counts the torch functions and tensor methods called while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _work(fn, filename: str) -> tuple[int, int]:
    """Run ``fn()``; return the torch calls it made and the lines of ``filename`` it ran."""
    lines = 0

    def count_lines(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return count_lines

    def tracer(frame, event, arg):
        return count_lines if frame.f_code.co_filename == filename else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        with _CountTorchCalls() as counter:
            fn()
    finally:
        sys.settrace(previous)
    return counter.calls, lines


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(seq_len=64, n_pairs=8, vocab_size=64),
        dict(seq_len=300, n_pairs=40, vocab_size=8192, n_queries=16, filler="random"),
    ],
)
def test_fast_because_vectorised_over_the_examples(kwargs):
    """Fast means no per-example work in Python: 100x the examples, the same torch calls
    (each a vectorised operation over all of them) and the same lines of the generator run."""
    source = mqar.__code__.co_filename
    few = _work(lambda: mqar(100, **kwargs), source)
    many = _work(lambda: mqar(10_000, **kwargs), source)
    assert few == many
    assert min(many) > 0


def test_the_work_counters_see_per_example_work():
    """The counters of the test above do see a loop over the examples."""

    def per_example(n):
        return [torch.zeros(3) for _ in range(n)]

    source = per_example.__code__.co_filename
    few = _work(lambda: per_example(100), source)
    many = _work(lambda: per_example(10_000), source)
    assert many[0] - few[0] == 9_900 and many[1] > 100 * few[1] // 2


def test_indexable():
    b = mqar(10_000, seq_len=64, n_pairs=8, vocab_size=64)
    assert len(b) == 10_000
    part = b[10:20]
    assert isinstance(part, MQARBatch) and len(part) == 10
    assert torch.equal(part.inputs, b.inputs[10:20])
    assert torch.equal(b[3].inputs, b.inputs[3:4]) and torch.equal(b[-1].inputs, b.inputs[-1:])
    assert b.to("cpu").vocab_size == 64


def test_recall_accuracy():
    b = mqar(20, seq_len=32, n_pairs=4, vocab_size=32)
    perfect = torch.nn.functional.one_hot(b.targets.clamp(min=0), 32).float()
    assert recall_accuracy(perfect, b.targets) == 1.0
    assert recall_accuracy(torch.zeros(20, 32, dtype=torch.long), b.targets) == 0.0
    # half of the queries right
    pred = b.targets.clamp(min=0).clone()
    rows, cols = (b.targets != IGNORE_INDEX).nonzero(as_tuple=True)
    wrong = torch.arange(len(rows)) % 2 == 0
    pred[rows[wrong], cols[wrong]] = 0
    assert recall_accuracy(pred, b.targets) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(n_examples=0), ValueError, "n_examples must be a positive int, got 0"),
        (dict(n_examples=2.0), TypeError, "n_examples must be an int"),
        (dict(seq_len=-1), ValueError, "seq_len must be a positive int"),
        (dict(vocab_size=3), ValueError, "vocab_size must be at least 4"),
        (dict(vocab_size=16, n_pairs=8), ValueError, "n_pairs must be at most the 7 key tokens"),
        (dict(n_pairs=8, n_queries=9), ValueError, "n_queries must be at most n_pairs=8"),
        (dict(seq_len=20, n_pairs=8), ValueError, "seq_len must be at least .* = 24"),
        (dict(filler="noise"), ValueError, "filler must be one of"),
        (dict(seed=-1), ValueError, "seed must be a non-negative int"),
        (dict(n_pairs=True), TypeError, "n_pairs must be an int"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = {"n_examples": 4, **kwargs}
    with pytest.raises(exc, match=match):
        mqar(args.pop("n_examples"), **args)


def test_recall_accuracy_bad_inputs():
    t = mqar(2, seq_len=16, n_pairs=2, vocab_size=16).targets
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        recall_accuracy([[0]], t)
    with pytest.raises(TypeError, match="targets must have dtype torch.int64"):
        recall_accuracy(torch.zeros(2, 16, 16), t.float())
    with pytest.raises(ValueError, match="targets must have 2 dimensions"):
        recall_accuracy(torch.zeros(2, 16, 16), t[0])
    with pytest.raises(ValueError, match=r"logits must be \[N, T, V\] floating scores"):
        recall_accuracy(torch.zeros(2, 16), t)
    with pytest.raises(ValueError, match="logits must match targets"):
        recall_accuracy(torch.zeros(2, 15, 16), t)
    with pytest.raises(ValueError, match="targets ask for nothing"):
        recall_accuracy(torch.zeros(2, 16, 16), torch.full_like(t, IGNORE_INDEX))
