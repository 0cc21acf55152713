r"""A small byte-level language model, trained once and shipped with the package.

Training-free sparse attention (attention sinks, heavy hitters, page selection; chapter 3)
is about what *trained* attention does, so the book needs a trained model that loads
offline. :class:`ByteLM` is a Llama-style decoder over bytes (vocabulary 257: the 256 byte
values and ``BOS = 256``)::

    h_0 = E[x]                                            # [B, T, d]
    h   = h + Attn_l(RMSNorm(h))     # GQA, RoPE: effarch.attention.MultiHeadAttention
    h   = h + W_down (SiLU(W_gate u) * W_up u),  u = RMSNorm(h)
    logits = RMSNorm(h_L) E^T                             # head tied to the embedding

Names and semantics follow ``transformers``' ``LlamaForCausalLM`` (``embed_tokens``,
``layers.i.self_attn.{q,k,v,o}_proj``, ``input_layernorm``, ``post_attention_layernorm``,
``mlp.{gate,up,down}_proj``, ``norm``, rotate-half RoPE, tied embeddings), so
:meth:`ByteLM.llama_config` plus the state dict load into that class unchanged.

The stored checkpoint (``bytelm.pt``, float16, with its card ``bytelm.json``: recipe, seed,
corpus, loss curve, held-out bits per byte) is loaded by :func:`load_bytelm`; the command
that trains it is ``python -m effarch.experiments bytelm`` (:mod:`effarch.experiments.bytelm`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from .._checks import check_positive_int, check_tensor
from ..attention import KVCache, MultiHeadAttention, project_qkv
from ..nn import SwiGLU

__all__ = [
    "BYTELM_CARD",
    "BYTELM_WEIGHTS",
    "ByteLM",
    "ByteLMConfig",
    "bits_per_byte",
    "bits_per_byte_per_row",
    "config_dict",
    "decode",
    "encode",
    "load_bytelm",
    "sink_mass",
]

_HERE = Path(__file__).resolve().parent
BYTELM_WEIGHTS = _HERE / "bytelm.pt"
"""The stored float16 state dict of the trained model."""
BYTELM_CARD = _HERE / "bytelm.json"
"""Its card: configuration, recipe, corpus, loss curve and held-out results."""


@dataclass(frozen=True)
class ByteLMConfig:
    """Sizes of a :class:`ByteLM` (the stored model uses the defaults).

    ``LlamaConfig`` names: ``d_model`` = ``hidden_size``, ``n_layers`` = ``num_hidden_layers``,
    ``n_heads`` = ``num_attention_heads``, ``n_kv_heads`` = ``num_key_value_heads``, ``d_ff``
    = ``intermediate_size``, ``rope_base`` = ``rope_theta``, ``norm_eps`` = ``rms_norm_eps``,
    ``train_len`` = the training window (``max_position_embeddings``; RoPE has no hard limit).
    """

    vocab_size: int = 257
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int = 2
    d_ff: int = 512
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    train_len: int = 512

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                     "train_len"):  # fmt: skip
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads must divide d_model and n_kv_heads must divide n_heads, got "
                f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class _Layer(nn.Module):
    def __init__(self, cfg: ByteLMConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.input_layernorm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.self_attn = MultiHeadAttention(
            d, cfg.n_heads, cfg.n_kv_heads, rope=True, rope_base=cfg.rope_base
        )
        self.post_attention_layernorm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.mlp = SwiGLU(d, cfg.d_ff)

    def forward(self, h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class ByteLM(nn.Module):
    """The byte-level decoder described in the module docstring.

    ``forward(input_ids [B, T] int64, caches=None) -> logits [B, T, vocab] float``. With one
    :class:`~effarch.attention.KVCache` per layer (:meth:`new_caches`), new tokens take the
    positions after those cached, so decoding byte by byte equals one full pass.
    """

    def __init__(self, cfg: ByteLMConfig | None = None) -> None:
        super().__init__()
        cfg = ByteLMConfig() if cfg is None else cfg
        if not isinstance(cfg, ByteLMConfig):
            raise TypeError(f"cfg must be a ByteLMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) weights; residual outputs scaled by ``1 / sqrt(2 L)`` (GPT-2)."""
        for name, p in self.named_parameters():
            if p.ndim == 2:
                scale = (2 * self.cfg.n_layers) ** -0.5 if name.endswith(
                    ("o_proj.weight", "down_proj.weight")
                ) else 1.0  # fmt: skip
                nn.init.normal_(p, std=std * scale)

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        """One empty KV cache per layer, in the weights' dtype and device."""
        return [layer.self_attn.new_cache(batch, max_len) for layer in self.layers]

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        check_tensor("input_ids", input_ids, ndim=2)
        if input_ids.dtype != torch.long:
            raise TypeError(f"input_ids must be int64 token ids, got {input_ids.dtype}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.cfg.vocab_size):
            raise ValueError(
                f"input_ids must lie in [0, {self.cfg.vocab_size}), got "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )

    def forward(self, input_ids: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        self._check_ids(input_ids)
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"caches must hold {len(self.layers)} caches, got {len(caches)}")
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if caches is None else caches[i])
        return self.norm(h) @ self.embed_tokens.weight.T

    @torch.no_grad()
    def attention_probs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Every layer's causal attention probabilities, ``[L, B, H, T, T]`` float32.

        ``P[l, b, h, i, j] = softmax_j(q_i . k_j / sqrt(dh))`` over ``j <= i``, with the
        queries and keys layer ``l`` forms in a full forward pass (key/value heads repeated
        for their query heads). Row ``i`` sums to 1.
        """
        self._check_ids(input_ids)
        h = self.embed_tokens(input_ids)
        t = input_ids.shape[1]
        future = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        probs = []
        for layer in self.layers:
            attn = layer.self_attn
            q, k, _ = project_qkv(attn, layer.input_layernorm(h))
            k = repeat(k, "b t g d -> b t (g r) d", r=attn.n_heads // attn.n_kv_heads)
            s = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * attn.head_dim**-0.5
            probs.append(s.masked_fill(future, float("-inf")).softmax(-1))
            h = layer(h)
        return torch.stack(probs)

    def llama_config(self) -> dict[str, Any]:
        """The keyword arguments of ``transformers.LlamaConfig`` describing this model."""
        c = self.cfg
        return {
            "vocab_size": c.vocab_size, "hidden_size": c.d_model,
            "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
            "head_dim": c.head_dim, "rope_theta": c.rope_base, "rms_norm_eps": c.norm_eps,
            "max_position_embeddings": c.train_len, "tie_word_embeddings": True,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "bos_token_id": 256, "eos_token_id": None, "pad_token_id": None,
        }  # fmt: skip

    def llama_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under ``LlamaForCausalLM``'s names (``model.`` prefix)."""
        sd = {f"model.{k}": v for k, v in self.state_dict().items()}
        sd["lm_head.weight"] = self.embed_tokens.weight
        return sd


def _logits_in_batches(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits [b, T, V] float32, targets [b, T])`` in batches of ``batch_size``, on the
    model's device, after checking the shapes (for :func:`bits_per_byte` and
    :func:`bits_per_byte_per_row`)."""
    if inputs.shape != targets.shape or inputs.ndim != 2:
        raise ValueError(
            f"inputs and targets must be equal [N, T] shapes, got {tuple(inputs.shape)} and "
            f"{tuple(targets.shape)}"
        )
    check_positive_int("batch_size", batch_size)
    device = next(model.parameters()).device
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i : i + batch_size].to(device), targets[i : i + batch_size].to(device)
        yield model(x).float(), y


@torch.no_grad()
def bits_per_byte(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 16
) -> float:
    """Mean cross-entropy of ``targets`` given ``inputs`` (both ``[N, T]``), in bits per byte.

    ``model`` maps ``[B, T]`` token ids to ``[B, T, V]`` logits (a :class:`ByteLM`, a
    :class:`~effarch.models.TinyLM`, a hybrid); it runs as it is (set ``eval()`` first).

    ``bpb = CE / ln 2``; perplexity per byte is ``2 ** bpb``. Runs in batches of ``batch_size``
    on the model's device.
    """
    total, count = 0.0, 0
    for logits, y in _logits_in_batches(model, inputs, targets, batch_size):
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count / math.log(2)


@torch.no_grad()
def bits_per_byte_per_row(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 16
) -> torch.Tensor:
    """:func:`bits_per_byte` of each row: ``[N]`` float64 on the CPU, whose mean is
    :func:`bits_per_byte` up to rounding (every row has ``T`` bytes); for a standard error
    over rows."""
    rows = []
    for logits, y in _logits_in_batches(model, inputs, targets, batch_size):
        nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # [b, T]
        rows.append(nll.double().mean(1).cpu())
    return torch.cat(rows) / math.log(2)


def sink_mass(probs: torch.Tensor, n_sink: int = 1) -> tuple[torch.Tensor, float]:
    """Attention mass on the first ``n_sink`` positions, per layer and head, against uniform.

    Args:
        probs: ``[L, B, H, T, T]`` causal attention probabilities (:meth:`ByteLM.attention_probs`).
        n_sink: how many leading positions count as the sink.

    Returns:
        ``mass [L, H]``: the mean over batch and query rows ``i >= n_sink`` of
        ``sum_{j < n_sink} P[i, j]``; and the same mean for uniform causal attention,
        ``mean_i n_sink / (i + 1)``, the value a model without sinks would be near.
    """
    check_tensor("probs", probs, ndim=5, floating=True)
    check_positive_int("n_sink", n_sink)
    t = probs.shape[-1]
    if n_sink >= t:
        raise ValueError(f"n_sink must be less than T={t}, got {n_sink}")
    mass = probs[..., n_sink:, :n_sink].sum(-1).mean(dim=(1, 3))
    uniform = (n_sink / torch.arange(n_sink + 1, t + 1, dtype=torch.float64)).mean().item()
    return mass, uniform


def encode(text: str | bytes, *, bos: bool = True) -> torch.Tensor:
    """Bytes of ``text`` (UTF-8) as ``[1, T]`` int64 ids, ``BOS = 256`` first by default."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    ids = ([256] if bos else []) + list(data)
    return torch.tensor([ids], dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    """The text of a 1-D sequence of ids (BOS dropped, invalid UTF-8 replaced)."""
    return bytes(int(i) for i in ids.flatten() if int(i) < 256).decode(errors="replace")


def load_bytelm(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[ByteLM, dict[str, Any]]:
    """The stored trained :class:`ByteLM` (in eval mode) and its card (a dict).

    Raises ``FileNotFoundError`` naming the training command when no checkpoint is stored.
    """
    if not BYTELM_WEIGHTS.is_file() or not BYTELM_CARD.is_file():
        raise FileNotFoundError(
            f"no stored ByteLM at {BYTELM_WEIGHTS.name}; train one with "
            "`python -m effarch.experiments bytelm --out-dir effarch/models`"
        )
    card = json.loads(BYTELM_CARD.read_text())
    model = ByteLM(ByteLMConfig(**card["config"]))
    state = torch.load(BYTELM_WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device=device, dtype=dtype).eval(), card


def config_dict(cfg: ByteLMConfig) -> dict[str, Any]:
    """``cfg`` as a plain dict (what the card stores)."""
    return asdict(cfg)
