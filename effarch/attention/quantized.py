"""Quantized attention: INT8 ``Q K^T`` with smoothed keys, as SageAttention does.

SageAttention (Zhang et al., ICLR 2025; SageAttention2, ICML 2025) speeds attention up by
running the score product ``Q K^T`` on INT8 tensor cores. Three ideas make that accurate:

1. **Per-block quantization.** ``Q`` and ``K`` get one symmetric INT8 scale per block of
   tokens (and per batch and head), ``scale = absmax / 127``, so one outlier token only
   coarsens its own block (:func:`quantize_per_block`).
2. **Smoothing K.** Keys share a large per-channel bias across tokens; subtracting the mean
   key removes it before quantization without changing the softmax (:func:`smooth_k`).
3. **Higher precision for P V.** The probabilities and values are multiplied in FP16 with
   FP32 accumulation (SageAttention2 goes further with FP8 and a two-level accumulation).

:func:`quantized_attention` simulates this numerically: the integer products are exact, so
its error is the error of the quantization, which is what the book's section 4.4 measures.
With ``backend="triton"`` the INT8 product runs in the kernel
``effarch_kernels.int8_attention.int8_qk`` (imported lazily, on a GPU or under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from effarch_kernels.limits import head_dim_reason
from einops import repeat

from .._checks import check_attention_qkv, check_choice, check_positive_int, check_tensor
from .._kernels import capability_reason, triton_unusable_reason, use_triton
from .naive import attention_mask

BACKENDS = ("torch", "triton")
PV_DTYPES = (torch.float16, torch.float32)
INT8_MAX = 127


def _check_block_dim(x: torch.Tensor, block_size: int, dim: int) -> int:
    check_positive_int("block_size", block_size)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__} ({dim!r})")
    if x.ndim < 2:
        raise ValueError(
            f"x must have at least 2 dimensions (tokens and channels), got shape {tuple(x.shape)}"
        )
    if not -x.ndim <= dim < x.ndim or dim % x.ndim == x.ndim - 1:
        raise ValueError(
            f"dim must name a token axis of x (shape {tuple(x.shape)}), not the last, "
            f"channel axis: expected {-x.ndim} <= dim < {x.ndim - 1}, got {dim}"
        )
    dim = dim % x.ndim
    return dim


def _blocked(x: torch.Tensor, block_size: int, dim: int) -> tuple[torch.Tensor, int]:
    """``x`` with ``dim`` moved next to the channels, zero-padded to whole blocks and split:
    ``[..., n_blocks, block_size, C]``, and the original token count."""
    xt = x.movedim(dim, -2)
    n = xt.shape[-2]
    n_blocks = math.ceil(n / block_size)
    xt = F.pad(xt, (0, 0, 0, n_blocks * block_size - n))  # zeros never raise an absmax
    return xt.reshape(*xt.shape[:-2], n_blocks, block_size, xt.shape[-1]), n


def quantize_per_block(
    x: torch.Tensor, *, block_size: int = 64, dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 quantization with one scale per block of tokens.

    For ``x [B, T, H, D]`` and the default ``dim=1`` (the sequence axis), tokens
    ``n * block_size ... (n + 1) * block_size - 1`` of one (batch, head) share one scale
    (the last block may be shorter when ``T`` is not a multiple of ``block_size``)::

        scale[b, n, h] = max |x[b, t, h, :]| over the block / 127
        x_int8[b, t, h, d] = clamp(round(x[b, t, h, d] / scale[b, t // block_size, h]),
                                   -127, 127)

    so ``x ~= x_int8 * scale`` with an error of at most ``scale / 2`` per element. A block
    of zeros gets ``scale = 0`` and zeros. This is SageAttention's per-block granularity
    (its ``per_block_int8`` uses blocks of 128 query and 64 key tokens); -128 is never used,
    so the range is symmetric.

    Args:
        x: floating-point tensor with at least 2 dimensions; the last one is the channel
            (head) dimension that each scale covers entirely.
        block_size: tokens per block, a positive int.
        dim: the token axis that is cut into blocks (any axis but the last).

    Returns:
        ``x_int8`` (int8, shape of ``x``) and ``scale`` (float32): the shape of ``x`` with
        ``dim`` replaced by ``ceil(T / block_size)`` and the last axis dropped, i.e.
        ``[B, ceil(T / block_size), H]`` for ``[B, T, H, D]`` inputs.
    """
    check_tensor("x", x, floating=True)
    dim = _check_block_dim(x, block_size, dim)
    compute = torch.promote_types(x.dtype, torch.float32)
    xb, n = _blocked(x.to(compute), block_size, dim)  # [..., nb, bs, C]
    absmax = xb.abs().amax(dim=(-1, -2))  # [..., nb]
    scale = (absmax / INT8_MAX).to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).to(compute)
    xq = torch.round(xb / safe[..., None, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    xq = xq.reshape(*xq.shape[:-3], -1, xq.shape[-1])[..., :n, :].movedim(-2, dim)
    return xq.contiguous(), scale.movedim(-1, dim).contiguous()


def dequantize_per_block(
    x_int8: torch.Tensor,
    scale: torch.Tensor,
    block_size: int = 64,
    *,
    dim: int = 1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_per_block`: ``x[b, t, h, d] = x_int8[b, t, h, d] *
    scale[b, t // block_size, h]`` (for ``dim=1``), returned in ``dtype``."""
    check_tensor("x_int8", x_int8, dtypes=(torch.int8,))
    check_tensor("scale", scale, floating=True)
    dim = _check_block_dim(x_int8, block_size, dim)
    n = x_int8.shape[dim]
    expected = list(x_int8.shape[:-1])
    expected[dim] = math.ceil(n / block_size)
    if list(scale.shape) != expected:
        raise ValueError(
            f"scale must have shape {tuple(expected)} for x_int8 of shape "
            f"{tuple(x_int8.shape)} and block_size={block_size}, got {tuple(scale.shape)}"
        )
    s = scale.to(torch.float32).repeat_interleave(block_size, dim=dim).narrow(dim, 0, n)
    return (x_int8.to(torch.float32) * s.unsqueeze(-1)).to(dtype)


def smooth_k(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract the mean key: ``k_smoothed = k - mean_t k[:, t]``, per batch, head, channel.

    Args:
        k: ``[B, Tk, H, D]`` keys (floating point).

    Returns:
        ``k_smoothed`` ``[B, Tk, H, D]`` and ``k_mean`` ``[B, 1, H, D]``, both in ``k``'s
        dtype (the mean is accumulated in at least float32).

    Why attention does not change: for a query ``q``,
    ``q . (k_j - mean) = q . k_j - q . mean``; the second term is the same for every key
    ``j`` (it depends on the query only), and softmax is invariant to adding a constant
    to a whole row, ``softmax(s - c) = softmax(s)``. This holds under any mask, since
    the mean is over all keys whatever each row sees. What changes is the quantization:
    keys of real models share a large per-channel bias, so the absmax of a block is set by
    the bias rather than by what distinguishes the keys; after smoothing the INT8 grid is
    spent on the differences. This is SageAttention's ``smooth_k``
    (``k - k.mean(dim=seq_dim, keepdim=True)``).
    """
    check_tensor("k", k, ndim=4, floating=True)
    compute = torch.promote_types(k.dtype, torch.float32)
    mean = k.to(compute).mean(dim=1, keepdim=True)
    return (k.to(compute) - mean).to(k.dtype), mean.to(k.dtype)


def int8_qk_reference(
    q_int8: torch.Tensor,
    k_int8: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    block_q: int,
    block_k: int,
) -> torch.Tensor:
    """PyTorch twin of the kernel ``effarch_kernels.int8_attention.int8_qk``.

    ``S[b, h, i, j] = (q_int8[b, i, h] . k_int8[b, j, h // g]) * q_scale[b, i // block_q, h]
    * k_scale[b, j // block_k, h // g]`` as float32 ``[B, Hq, Tq, Tk]``. The integer dot
    product is computed in float64, where it is exact (``|sum| <= 127^2 D < 2^53``), the
    result is an integer below ``2^24`` for ``D <= 1040`` and so exact in float32, and the
    two scale products are rounded in float32 in the kernel's order: the two agree bit
    for bit.
    """
    check_tensor("q_int8", q_int8, ndim=4, dtypes=(torch.int8,))
    check_tensor("k_int8", k_int8, ndim=4, dtypes=(torch.int8,))
    b, tq, hq, d = q_int8.shape
    tk, hkv = k_int8.shape[1], k_int8.shape[2]
    if k_int8.shape[0] != b or k_int8.shape[3] != d or hq % hkv != 0:
        raise ValueError(
            f"k_int8 must be [{b}, Tk, Hkv, {d}] with Hkv dividing {hq}, got {tuple(k_int8.shape)}"
        )
    for name, sc, t, h, blk in (("q_scale", q_scale, tq, hq, block_q),
                                ("k_scale", k_scale, tk, hkv, block_k)):  # fmt: skip
        check_tensor(name, sc, ndim=3, floating=True)
        want = (b, math.ceil(t / check_positive_int("block size", blk)), h)
        if tuple(sc.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(sc.shape)}")
    g = hq // hkv
    kk = repeat(k_int8, "b t h d -> b t (h g) d", g=g)
    prod = torch.einsum("bqhd,bkhd->bhqk", q_int8.double(), kk.double()).float()
    qs = q_scale.float().repeat_interleave(block_q, dim=1)[:, :tq]  # [B, Tq, Hq]
    ks = repeat(k_scale.float(), "b n h -> b n (h g)", g=g).repeat_interleave(block_k, dim=1)
    ks = ks[:, :tk]  # [B, Tk, Hq]
    return prod * qs.permute(0, 2, 1)[..., :, None] * ks.permute(0, 2, 1)[..., None, :]


_INT8_KERNEL = "the INT8 kernel"  # Triton compiles no INT8 product below 8.0


def int8_kernel_reason(x: torch.Tensor) -> str | None:
    """Why ``quantized_attention(..., backend="triton")`` cannot run its INT8 kernel on the
    device of ``x`` (Triton missing, a CPU without ``TRITON_INTERPRET=1``, or a GPU older
    than compute capability 8.0, such as a T4, for which Triton compiles no INT8 product),
    or None when it can. ``x`` only names the device: ``torch.empty(0, device=...)`` will do.
    """
    return triton_unusable_reason(x, dtypes=None) or capability_reason(x, 8, _INT8_KERNEL)


def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    smooth: bool = True,
    block_q: int = 64,
    block_k: int = 64,
    pv_dtype: torch.dtype = torch.float16,
    backend: str = "torch",
) -> torch.Tensor:
    """Softmax attention with INT8 ``Q K^T`` and FP16 ``P V``, as in SageAttention.

    With ``K' = K - mean_t K`` when ``smooth`` (else ``K' = K``) and per-block INT8
    quantization ``Q ~= Qi * dq``, ``K' ~= Ki * dk`` (:func:`quantize_per_block`)::

        S = (Qi Ki^T) * dq * dk * scale      integer product exact, then float32
        P = exp(S + M - rowmax), l = rowsum(P)   float32, M the mask (0 or -inf)
        O = (fp16(P) fp16(V)) / l             products of fp16 values, float32 sums

    Args:
        q: ``[B, Tq, Hq, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]``, floating
            point, ``Hq`` a multiple of ``Hkv`` (query head ``h`` uses key/value head
            ``h // (Hq // Hkv)``).
        causal: bottom-right aligned causal mask: query ``i`` sees keys
            ``j <= i + Tk - Tq``, as :func:`~effarch.attention.naive_attention`.
        scale: softmax scale, default ``D ** -0.5`` (folded into the query scales).
        smooth: subtract the mean key before quantizing (:func:`smooth_k`).
        block_q, block_k: tokens per quantization block of ``Q`` and ``K``.
        pv_dtype: ``torch.float16`` rounds ``P`` and ``V`` to FP16 before their product
            (SageAttention), ``torch.float32`` keeps them in float32.
        backend: ``"torch"`` computes the integer product in PyTorch (exactly, in
            float64); ``"triton"`` runs the kernel ``effarch_kernels.int8_attention.int8_qk``
            (a CUDA GPU of compute capability 8.0 or newer, or the CPU under
            ``TRITON_INTERPRET=1``; Triton compiles no INT8 product for a T4) or raises a
            ValueError saying why it cannot (the rule of :mod:`effarch._kernels`; there is no
            ``"auto"`` here, since the PyTorch form is the reference). Both give the same
            scores bit for bit.

    Returns:
        ``[B, Tq, Hq, Dv]`` in the dtype of ``q``; zeros for a query that sees no key.

    This corresponds to ``sageattn_qk_int8_pv_fp16_triton(q, k, v, tensor_layout="NHD",
    is_causal=causal, sm_scale=scale, smooth_k=smooth)`` of the SageAttention package (its
    first method: per-block INT8 ``Q K^T``, FP16 ``P V``), computed with the full score
    matrix rather than fused, so the row maximum is the exact one instead of a running
    one. The block sizes here are the quantization granularity, not tiles (SageAttention
    uses 128 query and 64 key tokens). Its kernels also offer accumulating ``P V`` in FP16
    within a key block before adding to an FP32 buffer; here the sums are FP32 throughout.
    The causal mask is the bottom-right one of :func:`~effarch.attention.naive_attention`.
    """
    check_attention_qkv(q, k, v)
    check_choice("backend", backend, BACKENDS)
    check_positive_int("block_q", block_q)
    check_positive_int("block_k", block_k)
    if pv_dtype not in PV_DTYPES:
        raise ValueError(f"pv_dtype must be one of {list(PV_DTYPES)}, got {pv_dtype!r}")
    if not isinstance(smooth, bool):
        raise TypeError(f"smooth must be a bool, got {type(smooth).__name__} ({smooth!r})")
    d = q.shape[-1]
    # the kernel reads INT8 copies, so any floating dtype will do
    limit = head_dim_reason(d) or capability_reason(q, 8, _INT8_KERNEL)
    run_kernel = use_triton(backend, q, limit=limit, dtypes=None)
    scale = d**-0.5 if scale is None else float(scale)
    b, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv

    kf = k.float()
    if smooth:
        kf, _ = smooth_k(kf)
    q_i8, q_s = quantize_per_block(q.float(), block_size=block_q)
    k_i8, k_s = quantize_per_block(kf, block_size=block_k)
    q_s = q_s * scale  # fold the softmax scale into the query scales, as SageAttention does
    if run_kernel:
        from effarch_kernels.int8_attention import int8_qk

        s = int8_qk(q_i8, k_i8, q_s, k_s, block_q, block_k)
    else:
        s = int8_qk_reference(q_i8, k_i8, q_s, k_s, block_q, block_k)  # [B, Hq, Tq, Tk]

    mask = None
    if causal:
        mask = attention_mask(tq, tk, causal=True, device=q.device)
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows that see no key
    p = torch.exp(s - m)  # masked entries: exp(-inf) = 0
    l_sum = p.sum(dim=-1, keepdim=True)
    vv = repeat(v.to(pv_dtype).float(), "b t h d -> b (h g) t d", g=g)  # [B, Hq, Tk, Dv]
    pf = p.to(pv_dtype).float()  # fp16 P times fp16 V is exact in float32: fp32 accumulation
    o = torch.matmul(pf, vv) / torch.where(l_sum > 0, l_sum, torch.ones_like(l_sum))
    return o.transpose(1, 2).to(q.dtype)


def attention_error(o: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Error of an attention output ``o`` against a reference of the same shape.

    Returns ``max_abs`` (largest ``|o - ref|``), ``mean_abs``, ``rel_l1``
    (``sum |o - ref| / sum |ref|``) and ``cos_sim`` (cosine similarity of the flattened
    tensors), all computed in float64: the metrics SageAttention reports.
    """
    check_tensor("o", o, floating=True)
    check_tensor("ref", ref, floating=True)
    if o.shape != ref.shape:
        raise ValueError(f"o must have the shape of ref {tuple(ref.shape)}, got {tuple(o.shape)}")
    a, r = o.double().flatten(), ref.double().flatten().to(o.device)
    diff = (a - r).abs()
    denom = r.abs().sum().clamp_min(torch.finfo(torch.float64).tiny)
    cos = F.cosine_similarity(a, r, dim=0, eps=1e-300)
    return {
        "max_abs": diff.max().item() if diff.numel() else 0.0,
        "mean_abs": diff.mean().item() if diff.numel() else 0.0,
        "rel_l1": (diff.sum() / denom).item(),
        "cos_sim": cos.item(),
    }
