r"""A toy stream of key-value bindings for memories trained at test time (chapter 2.4).

A fixed set of keys is bound to values; at each step one random key arrives with its value
(plus optional noise), and from time to time some keys are re-bound to new values. A memory
``S`` that reads ``o = S^T key`` should return each key's *current* value. The stream is laid
out for the ops of :mod:`effarch.linear` so that one call scores a memory at every step: it is
repeated once per key along the batch dimension, and copy ``j`` queries key ``j`` at every
step, so ``o[j, t] = S_t^T key_j``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._checks import check_positive_int, check_positive_number

__all__ = ["MemoryStream", "memory_stream"]


@dataclass(frozen=True)
class MemoryStream:
    """A stream of bindings, ready for a linear-memory op.

    Attributes:
        keys: ``[N, K]`` the unit keys.
        bindings: ``[T, N, V]`` the value bound to each key after each step.
        index: ``[T]`` which key arrives at each step.
        q: ``[N, T, 1, K]``: copy ``j`` reads key ``j`` at every step.
        k: ``[N, T, 1, K]``: the stream's keys (the same in every copy).
        v: ``[N, T, 1, V]``: the stream's values.
    """

    keys: torch.Tensor
    bindings: torch.Tensor
    index: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    def rates(self, value: float) -> torch.Tensor:
        """A constant per-step rate (a beta, eta, theta, ...) of shape ``[N, T, 1]``."""
        return torch.full(self.q.shape[:3], float(value), dtype=self.q.dtype)

    def recall_error(self, o: torch.Tensor) -> torch.Tensor:
        """Relative recall error after each step, ``[T]``.

        ``err_t = sum_j ||o[j, t] - b_t(j)||^2 / sum_j ||b_t(j)||^2`` with ``b_t(j)`` the value
        bound to key ``j`` after step ``t``: 1 for an empty memory, 0 for perfect recall.
        """
        if o.shape != self.v.shape:
            raise ValueError(
                f"o must have the shape of v {tuple(self.v.shape)}, got {tuple(o.shape)}"
            )
        want = self.bindings.permute(1, 0, 2)  # [N, T, V]
        diff = (o[:, :, 0].to(want.dtype) - want).pow(2).sum(dim=(0, 2))
        return diff / want.pow(2).sum(dim=(0, 2))


def memory_stream(
    steps: int,
    *,
    n_keys: int = 16,
    d_key: int = 32,
    d_value: int = 32,
    rebind_every: int | None = None,
    rebind_fraction: float = 0.5,
    noise: float = 0.0,
    orthogonal: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> MemoryStream:
    r"""A seeded stream of ``steps`` key-value pairs drawn from ``n_keys`` bindings.

    At step ``t`` key ``i_t`` (uniform over the ``n_keys``) arrives with
    ``v_t = b_t(i_t) + noise * eps_t``. Every ``rebind_every`` steps (never if None) a random
    ``rebind_fraction`` of the keys gets a fresh value. Keys are unit vectors, mutually
    orthogonal when ``orthogonal=True`` (needs ``n_keys <= d_key``); with more keys than
    dimensions they interfere, and no ``d_key x d_value`` matrix can hold every binding.
    Values are Gaussian with unit expected squared norm.

    Returns:
        a :class:`MemoryStream`; its ``q, k, v`` go straight into an op with ``scale=1``.
    """
    check_positive_int("steps", steps)
    for name, value in (("n_keys", n_keys), ("d_key", d_key), ("d_value", d_value)):
        check_positive_int(name, value)
    if rebind_every is not None:
        check_positive_int("rebind_every", rebind_every)
    check_positive_number("rebind_fraction", rebind_fraction)
    if rebind_fraction > 1:
        raise ValueError(f"rebind_fraction must lie in (0, 1], got {rebind_fraction}")
    check_positive_number("noise", noise, allow_zero=True)
    if orthogonal and n_keys > d_key:
        raise ValueError(
            f"orthogonal=True needs n_keys <= d_key, got n_keys={n_keys} > d_key={d_key}; "
            "pass orthogonal=False for interfering keys"
        )
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(d_key, max(n_keys, 1), generator=gen, dtype=torch.float64)
    if orthogonal:
        keys = torch.linalg.qr(raw).Q[:, :n_keys].T
    else:
        keys = F.normalize(raw.T, dim=-1)
    values = torch.randn(n_keys, d_value, generator=gen, dtype=torch.float64) * d_value**-0.5
    index = torch.randint(n_keys, (steps,), generator=gen)
    bindings = torch.empty(steps, n_keys, d_value, dtype=torch.float64)
    stream_v = torch.empty(steps, d_value, dtype=torch.float64)
    n_rebind = max(1, round(rebind_fraction * n_keys))
    for t in range(steps):
        if rebind_every is not None and t > 0 and t % rebind_every == 0:
            chosen = torch.randperm(n_keys, generator=gen)[:n_rebind]
            fresh = torch.randn(n_rebind, d_value, generator=gen, dtype=torch.float64)
            values = values.clone()
            values[chosen] = fresh * d_value**-0.5
        bindings[t] = values
        eps = torch.randn(d_value, generator=gen, dtype=torch.float64) * d_value**-0.5
        stream_v[t] = values[index[t]] + noise * eps
    stream_k = keys[index]  # [T, K]
    rep = (n_keys, steps, 1)
    q = keys[:, None, None, :].expand(n_keys, steps, 1, d_key)
    k = stream_k[None, :, None, :].expand(*rep, d_key)
    v = stream_v[None, :, None, :].expand(*rep, d_value)
    return MemoryStream(
        keys=keys.to(dtype),
        bindings=bindings.to(dtype),
        index=index,
        q=q.to(dtype).contiguous(),
        k=k.to(dtype).contiguous(),
        v=v.to(dtype).contiguous(),
    )
