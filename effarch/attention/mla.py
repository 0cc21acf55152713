"""Multi-head latent attention (MLA), as in DeepSeek-V2 and DeepSeek-V3.

Keys and values are compressed jointly into a small latent ``c_kv`` per token, and only
the latent (plus one small shared RoPE key) is cached. With ``d_c`` the latent width,
``d_n`` the per-head "no-position" query/key width, ``d_r`` the RoPE width and ``d_v``
the value width:

    c_kv = RMSNorm(W_DKV x)                      [B, T, d_c]     (cached)
    k_r  = RoPE(W_KR x)                          [B, T, 1, d_r]  (cached, shared by heads)
    k_h  = [W_UK^h c_kv ; k_r],  v_h = W_UV^h c_kv
    q_h  = [q_n^h ; RoPE(q_r^h)]                 from x (or a low-rank c_q)
    o_h  = softmax(q_h . k_h / sqrt(d_n + d_r)) v_h

The cache holds ``d_c + d_r`` numbers per token per layer instead of ``2 H d_h``.

**Weight absorption.** ``q_n^h . (W_UK^h c) = ((W_UK^h)^T q_n^h) . c``, so the query can
be mapped into the latent space once and attend to the cached ``c_kv`` directly; and
``sum_j p_j W_UV^h c_j = W_UV^h sum_j p_j c_j``, so the values need not be expanded
either. Decoding then is multi-query attention over the latent cache with head
dimension ``d_c + d_r``. Both paths are implemented and equal.

The *constructor arguments* take the names of DeepSeek-V2/V3's configuration in
``transformers`` (``kv_lora_rank``, ``q_lora_rank``, ``qk_nope_head_dim``,
``qk_rope_head_dim``, ``v_head_dim``). The layer is not a drop-in for their checkpoints,
for two reasons:

* **Submodule names differ.** ``transformers``' ``DeepseekV2Attention`` and
  ``DeepseekV3Attention`` hold ``q_a_proj``, ``q_a_layernorm``, ``q_b_proj`` (``q_proj``
  without ``q_lora_rank``), ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj`` and
  ``o_proj``; here they are ``q_proj.0``, ``q_proj.1``, ``q_proj.2`` (``q_proj``, a
  ``Linear``, without ``q_lora_rank``), ``kv_down``, ``kv_norm``, ``kv_up`` and ``o_proj``.
  The shapes and row orders match (``kv_up``'s rows per head: ``d_n`` key rows, then ``d_v``
  value rows, as ``kv_b_proj``; no biases, as ``attention_bias=False``), so the tensors map
  one to one, except:
* **RoPE layout differs.** This layer rotates the ``d_r`` RoPE channels in the rotate-half
  layout (pairs ``(i, i + d_r/2)``, :func:`~effarch.attention.apply_rope`), DeepSeek in
  interleaved pairs ``(2i, 2i + 1)``: DeepSeek-V2's ``apply_rotary_emb`` takes
  ``view_as_complex`` of ``reshape(..., -1, 2)``, and DeepSeek-V3's
  ``apply_rotary_pos_emb_interleave`` does the same when ``rope_interleave=True``, its
  configuration's default (``False`` there selects rotate-half, as here). Loading DeepSeek
  weights therefore needs the RoPE output rows permuted from interleaved to half-split,
  ``perm = cat(arange(0, d_r, 2), arange(1, d_r, 2))`` (our row ``j`` is their row
  ``perm[j]``), in each head's last ``d_r`` rows of the query projection (``q_b_proj``, or
  ``q_proj``) and in the last ``d_r`` rows of ``kv_a_proj_with_mqa``. With the default,
  unscaled RoPE the outputs then agree up to rounding (tested against both classes; their
  RMSNorm ``eps`` is ``1e-6``, ours PyTorch's default). YaRN scaling, which their
  ``rope_parameters`` may select, is not implemented here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import nn

from .._checks import check_choice, check_positive_int, check_tensor
from .grouped import KVCache
from .naive import attention_mask, sdpa_attention
from .rope import apply_rope


class MultiHeadLatentAttention(nn.Module):
    """MLA self-attention with a latent KV cache and an optional absorbed decode path.

    ``attention`` (default :func:`sdpa_attention`) computes the naive path; the absorbed
    path writes its multi-query attention over the latents out directly.

    ``forward(x [B, T, d], cache=None, absorb=None) -> [B, T, d]``. ``cache`` is a
    :class:`KVCache` from :meth:`new_cache` holding ``c_kv`` as its keys and the shared
    RoPE key as its values. ``absorb=True`` computes the same output through the latent
    space (see the module docstring); left as ``None``, a call with a cache takes the path
    ``decode_impl`` names (``"naive"`` or ``"absorb"``, the values of DeepSeek-V3's
    ``attn_impl``, which its inference code sets to ``"absorb"``) and a call without one the
    naive path, so a model decodes absorbed through the generic ``layer(x, cache)`` call.
    The naive path keeps the latent cache and expands it into every head's keys and values
    at every step; DeepSeek-V3's ``"naive"`` caches them expanded instead (MHA's cache and
    work per step).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        kv_lora_rank: int = 512,
        q_lora_rank: int | None = None,
        qk_nope_head_dim: int = 128,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        rope_base: float = 10000.0,
        causal: bool = True,
        attention: Callable[..., torch.Tensor] = sdpa_attention,
        decode_impl: str = "naive",
    ) -> None:
        super().__init__()
        self.decode_impl = check_choice("decode_impl", decode_impl, ("naive", "absorb"))
        sizes = dict(d_model=d_model, n_heads=n_heads, kv_lora_rank=kv_lora_rank,
                     qk_nope_head_dim=qk_nope_head_dim, v_head_dim=v_head_dim)  # fmt: skip
        for name, v in sizes.items():
            check_positive_int(name, v)
        check_positive_int("qk_rope_head_dim", qk_rope_head_dim)
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even for RoPE, got {qk_rope_head_dim}")
        self.d_model, self.n_heads = d_model, n_heads
        self.d_c, self.d_n, self.d_r, self.d_v = (
            kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        )  # fmt: skip
        self.rope_base, self.causal, self.attention = rope_base, causal, attention
        dq = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, n_heads * dq, bias=False)
        else:
            check_positive_int("q_lora_rank", q_lora_rank)
            self.q_proj = nn.Sequential(
                nn.Linear(d_model, q_lora_rank, bias=False),
                nn.RMSNorm(q_lora_rank),
                nn.Linear(q_lora_rank, n_heads * dq, bias=False),
            )
        self.kv_down = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(kv_lora_rank)
        self.kv_up = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * v_head_dim, d_model, bias=False)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty latent cache: ``d_c + d_r`` numbers per token."""
        w = self.kv_down.weight
        return KVCache(batch, max_len, 1, self.d_c, head_dim_v=self.d_r, dtype=w.dtype,
                       device=w.device)  # fmt: skip

    def state_size(self, seq_len: int) -> int:
        """Latent-cache elements one sequence holds after ``seq_len = T`` tokens: ``T (d_c + d_r)``.

        The latent ``c_kv`` (``d_c = kv_lora_rank``) and the shared RoPE key
        (``d_r = qk_rope_head_dim``) of every token, whatever the number of heads.
        """
        check_positive_int("seq_len", seq_len)
        return seq_len * (self.d_c + self.d_r)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK [H, d_n, d_c]`` and ``W_UV [H, d_v, d_c]``, views of ``kv_up``."""
        w = rearrange(self.kv_up.weight, "(h e) c -> h e c", h=self.n_heads)
        return w[:, : self.d_n], w[:, self.d_n :]

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, *, absorb: bool | None = None
    ) -> torch.Tensor:
        check_tensor("x", x, ndim=3, floating=True)
        if absorb is None:
            absorb = cache is not None and self.decode_impl == "absorb"
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have d_model={self.d_model} features in dim 2, got {tuple(x.shape)}"
            )
        start = 0 if cache is None else cache.length
        pos = torch.arange(start, start + x.shape[1], device=x.device)
        h = self.n_heads
        q = rearrange(self.q_proj(x), "b t (h e) -> b t h e", h=h)
        q_n, q_r = q.split([self.d_n, self.d_r], dim=-1)
        q_r = apply_rope(q_r, pos, base=self.rope_base)
        c_kv, k_r = self.kv_down(x).split([self.d_c, self.d_r], dim=-1)
        c_kv = self.kv_norm(c_kv)[:, :, None, :]  # [B, T, 1, d_c]
        k_r = apply_rope(k_r[:, :, None, :], pos, base=self.rope_base)  # [B, T, 1, d_r]
        if cache is not None:
            c_kv, k_r = cache.update(c_kv, k_r)
        scale = (self.d_n + self.d_r) ** -0.5
        w_uk, w_uv = self._up_weights()
        if absorb:
            # Multi-query attention over the latent cache: every head reads the same c_kv and
            # k_r once, so the scores are written out here rather than through
            # self.attention, which would copy the shared key for every head.
            q_lat = torch.einsum("bthn,hnc->bthc", q_n, w_uk)  # the query, in latent space
            s = torch.einsum("bthc,blc->bhtl", q_lat, c_kv[:, :, 0])
            s = (s + torch.einsum("bthr,blr->bhtl", q_r, k_r[:, :, 0])) * scale
            if self.causal:
                mask = attention_mask(s.shape[2], s.shape[3], causal=True, device=x.device)
                s = s.masked_fill(~mask, float("-inf"))
            wide = torch.promote_types(s.dtype, torch.float32)
            p = torch.softmax(s.to(wide), dim=-1).nan_to_num(0.0).to(s.dtype)  # empty rows: 0
            o_lat = torch.einsum("bhtl,blc->bthc", p, c_kv[:, :, 0])
            o = torch.einsum("bthc,hvc->bthv", o_lat, w_uv)
        else:
            k_n = torch.einsum("blc,hnc->blhn", c_kv[:, :, 0], w_uk)  # expand every head
            v = torch.einsum("blc,hvc->blhv", c_kv[:, :, 0], w_uv)
            k = torch.cat([k_n, k_r.expand(-1, -1, h, -1)], dim=-1)
            o = self.attention(torch.cat([q_n, q_r], dim=-1), k, v, causal=self.causal,
                               scale=scale)  # fmt: skip
        return self.o_proj(rearrange(o, "b t h v -> b t (h v)"))
