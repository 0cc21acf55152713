"""The byte-level LM of chapter 3, its corpus and its stored checkpoint."""

import hashlib
import json
import math

import pytest
import torch

from effarch.models.bytelm import (
    BYTELM_CARD,
    BYTELM_WEIGHTS,
    ByteLM,
    ByteLMConfig,
    bits_per_byte,
    bits_per_byte_per_row,
    decode,
    encode,
    load_bytelm,
    sink_mass,
)
from effarch.tasks.text import BOS, byte_batches, heldout_windows, stdlib_corpus

TINY = ByteLMConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, train_len=32)


# ------------------------------------------------------------------------------------------
# the corpus
# ------------------------------------------------------------------------------------------


@pytest.fixture
def fake_stdlib(tmp_path):
    """A folder of .py files, some in excluded folders; returns (root, {relpath: bytes})."""
    files = {f"pkg{i % 3}/mod{i}.py": f"# module {i}\nx = {i}\n".encode() for i in range(60)}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    for skipped in ("test/test_x.py", "site-packages/foo.py", "idlelib/a.py"):
        (tmp_path / skipped).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / skipped).write_bytes(b"SKIPPED\n")
    (tmp_path / "notes.txt").write_bytes(b"not python")
    return tmp_path, files


def test_corpus_split_is_the_path_hash_rule(fake_stdlib):
    root, files = fake_stdlib
    c = stdlib_corpus(root, holdout=4)
    held = sorted(r for r in files if hashlib.sha1(r.encode()).digest()[0] % 4 == 0)
    assert list(c.heldout_files) == held
    assert sorted(c.train_files) == sorted(set(files) - set(held))
    assert bytes(c.heldout.numpy()) == b"".join(files[r] + b"\n" for r in held)
    assert bytes(c.train.numpy()) == b"".join(files[r] + b"\n" for r in c.train_files)
    assert b"SKIPPED" not in bytes(c.train.numpy()) + bytes(c.heldout.numpy())
    assert c.description["train_files"] + c.description["heldout_files"] == len(files)


def test_corpus_bad_input(tmp_path, fake_stdlib):
    with pytest.raises(ValueError, match="root must be a folder"):
        stdlib_corpus(tmp_path / "missing")
    with pytest.raises(ValueError, match="holdout must be at least 2"):
        stdlib_corpus(fake_stdlib[0], holdout=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .py files"):
        stdlib_corpus(empty)


def test_the_real_standard_library_is_found():
    c = stdlib_corpus()
    assert c.train.numel() > 1_000_000 and c.heldout.numel() > 10_000
    assert not set(c.train_files) & set(c.heldout_files)


def test_byte_batches_are_windows_after_bos():
    data = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    batches = byte_batches(data, 40, 6, seed=3)
    x, y = batches(7)
    assert x.shape == y.shape == (6, 40) and x.dtype == y.dtype == torch.long
    assert (x[:, 0] == BOS).all() and torch.equal(x[:, 1:], y[:, :-1])
    text = bytes(data.numpy())
    for row in y:
        assert bytes(row.to(torch.uint8).numpy()) in text  # a contiguous window of the data
    x2, y2 = batches(7)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # the step alone fixes the batch
    assert not torch.equal(batches(8)[1], y)
    hx, hy = heldout_windows(data, 40, 5)
    assert (hx[:, 0] == BOS).all() and torch.equal(hx[:, 1:], hy[:, :-1])
    assert torch.equal(hy[0], data[:40].long())


def test_byte_batches_bad_input():
    with pytest.raises(TypeError, match="data must be a 1-D uint8 tensor"):
        byte_batches(torch.zeros(100), 10, 2)
    with pytest.raises(ValueError, match="more than seq_len=100"):
        byte_batches(torch.zeros(100, dtype=torch.uint8), 100, 2)
    with pytest.raises(ValueError, match="seq_len"):
        byte_batches(torch.zeros(100, dtype=torch.uint8), 0, 2)


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------


def test_encode_decode_round_trip():
    ids = encode("héllo")
    assert ids[0, 0] == BOS and ids.shape == (1, 1 + len("héllo".encode()))
    assert decode(ids) == "héllo"


def test_decoding_with_caches_equals_the_full_pass():
    model = ByteLM(TINY).double()
    x = torch.randint(0, 257, (2, 23))
    full = model(x)
    caches = model.new_caches(2, 23)
    steps = [model(x[:, :5], caches)] + [model(x[:, t : t + 1], caches) for t in range(5, 23)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


def test_equals_transformers_llama_with_the_same_weights():
    transformers = pytest.importorskip("transformers")
    model = ByteLM(TINY).double()
    ref = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**model.llama_config(), attn_implementation="eager")
    )
    ref.load_state_dict(model.llama_state_dict(), strict=True)
    ref = ref.double().eval()
    x = torch.randint(0, 257, (2, 19))
    out = ref(input_ids=x, output_attentions=True)
    # transformers builds the RoPE angles in float32, hence 1e-6 rather than 1e-12
    torch.testing.assert_close(model(x), out.logits, rtol=1e-6, atol=1e-6)
    probs = model.attention_probs(x)
    torch.testing.assert_close(probs.double(), torch.stack(out.attentions), rtol=0, atol=1e-6)


def test_bad_ids():
    model = ByteLM(TINY)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 257\)"):
        model(torch.tensor([[0, 300]]))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="n_heads must divide d_model"):
        ByteLMConfig(d_model=30, n_heads=4)


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab():
    model = ByteLM(TINY)
    torch.nn.init.zeros_(model.embed_tokens.weight)  # all logits 0: the uniform distribution
    x = torch.randint(0, 257, (3, 10))
    assert bits_per_byte(model, x, x, batch_size=2) == pytest.approx(math.log2(257), rel=1e-6)
    per_row = bits_per_byte_per_row(model, x, x, batch_size=2)  # batches of 2 over 3 rows
    torch.testing.assert_close(per_row, torch.full((3,), math.log2(257), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"equal \[N, T\] shapes"):
        bits_per_byte_per_row(model, x, x[:, 1:])


def test_sink_mass_against_a_loop():
    t = 9
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
    probs = uniform.expand(2, 3, 4, t, t)  # [L, B, H, T, T]
    mass, base = sink_mass(probs, n_sink=2)
    want = sum(2 / (i + 1) for i in range(2, t)) / (t - 2)
    assert base == pytest.approx(want)
    torch.testing.assert_close(mass, torch.full((2, 4), want))
    sink = torch.zeros(1, 1, 1, t, t)
    sink[..., 0] = 1.0
    assert sink_mass(sink)[0].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n_sink must be less than T=9"):
        sink_mass(probs, n_sink=9)


# ------------------------------------------------------------------------------------------
# the stored model
# ------------------------------------------------------------------------------------------

needs_checkpoint = pytest.mark.skipif(
    not BYTELM_WEIGHTS.is_file(), reason="no stored ByteLM checkpoint"
)


@needs_checkpoint
def test_stored_checkpoint_is_small_and_its_card_is_complete():
    assert BYTELM_WEIGHTS.stat().st_size <= 4 * 2**20
    card = json.loads(BYTELM_CARD.read_text())
    for key in ("config", "recipe", "corpus", "loss_curve", "heldout_bits_per_byte",
                "bos_attention_mass", "train_seconds"):  # fmt: skip
        assert key in card
    curve = card["loss_curve"]
    assert curve[-1][1] < curve[0][1] - 2.0  # it learned: from ~5.5 nats to well below


@needs_checkpoint
def test_stored_model_reproduces_its_card_on_this_machines_corpus():
    model, card = load_bytelm()
    n = card["config"]["train_len"]
    x, y = heldout_windows(stdlib_corpus().heldout, n, 16)
    bpb = bits_per_byte(model, x, y)
    # another Python version ships slightly different held-out files: a loose margin
    assert bpb == pytest.approx(card["heldout_bits_per_byte"][str(n)], abs=0.25)
    assert bpb < 4.0  # far below a byte's 8 bits and a unigram model's ~4.5
