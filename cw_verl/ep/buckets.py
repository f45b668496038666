"""EP-GRPO's cumulative-entropy progress coordinate and bucket normalisation (arXiv 2605.04960,
"cumulative entropy mapping ... progress-aligned advantage normalization"; issue 12)."""

from __future__ import annotations

import torch

F64 = torch.float64


def progress_coordinate(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``tau(i,t) = S(i,t) / S(i,|o_i|)``, ``S(i,t)`` the entropy summed over i's valid tokens up to t.

    tau rises from ~0 to exactly 1 at each response's last valid token, however long the response:
    responses of different lengths are aligned by how much of their uncertainty they have resolved.
    It is invariant to scaling a response's entropies by a constant.

    *Interpretation*: a response whose total entropy is 0 (every token certain) has no entropy
    progress; it falls back to the position fraction ``t' / |o_i|`` (t' counting valid tokens).

    Args:
        entropy: ``[B, T]`` per-token entropy, >= 0.
        mask: ``[B, T]`` bool.

    Returns:
        ``[B, T]`` float64 in (0, 1] on valid tokens, 0 elsewhere.
    """
    return torch.where(mask, _scaled_progress(entropy, mask, 1.0), 0.0)


def _scaled_progress(entropy: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * tau`` on valid tokens (``[B, T]`` float64), the product formed before the division."""
    h = torch.where(mask, entropy.to(F64), 0.0)
    cumulative = h.cumsum(dim=-1)
    total = cumulative[:, -1:]
    count = mask.to(F64).cumsum(dim=-1)
    by_entropy = scale * cumulative / torch.where(total > 0, total, 1.0)
    by_position = scale * count / count[:, -1:].clamp(min=1.0)
    return torch.where(total > 0, by_entropy, by_position)


def bucket_index(entropy: torch.Tensor, mask: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket ``k = ceil(K * tau) - 1`` in ``[0, K-1]``: bucket k holds ``tau`` in ``(k/K, (k+1)/K]``.

    ``K * S / S_total`` is formed before dividing so that integer-valued entropies land exactly on
    bucket boundaries.

    Args:
        entropy: ``[B, T]``.
        mask: ``[B, T]`` bool.
        num_buckets: K >= 1.

    Returns:
        ``[B, T]`` int64, -1 on invalid tokens.
    """
    scaled = _scaled_progress(entropy, mask, float(num_buckets))
    index = (torch.ceil(scaled) - 1).clamp(0, num_buckets - 1).to(torch.int64)
    return torch.where(mask, index, -1)


def bucket_normalise(
    values: torch.Tensor, bucket: torch.Tensor, mask: torch.Tensor, num_buckets: int, epsilon: float = 1e-6
) -> torch.Tensor:
    """``(x - mu_k) / (sigma_k + eps)`` with mu_k, sigma_k over every valid token in bucket k (all rows).

    Population std. A bucket with one token, or equal values, gives 0 for its tokens (no token in it
    is above or below its peers at that stage of progress).

    Args:
        values: ``[B, T]``.
        bucket: ``[B, T]`` int64 from :func:`bucket_index`.
        mask: ``[B, T]`` bool.
        num_buckets: K.
        epsilon: added to sigma_k, as verl's GRPO adds it to the group std.

    Returns:
        ``[B, T]`` float64, 0 on invalid tokens.
    """
    x = values.to(F64)[mask]
    k = bucket[mask]
    count = torch.zeros(num_buckets, dtype=F64).index_add_(0, k, torch.ones_like(x))
    mean = torch.zeros(num_buckets, dtype=F64).index_add_(0, k, x) / count.clamp(min=1.0)
    centred = x - mean[k]
    variance = torch.zeros(num_buckets, dtype=F64).index_add_(0, k, centred.square()) / count.clamp(min=1.0)
    normalised = centred / (variance.sqrt()[k] + epsilon)
    out = torch.zeros(values.shape, dtype=F64)
    out[mask] = normalised
    return out
