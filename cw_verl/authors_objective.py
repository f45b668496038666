"""The covariance weights of the CW-GRPO authors' released code, as differentiable torch functions.

The paper's Table 2 comes from the authors' trl fork (GitHub ``WangCheng0116/CW-GRPO``, vendored trl 0.15.2,
``GRPOTrainer.compute_loss`` with ``use_ours: true``), whose objective differs from the Sec. 2.3 text that
:mod:`cw_verl.weights` implements. One trl loss call held exactly one prompt's group of ``B`` completions
(``per_device_train_batch_size = num_generations``), padded to the group's longest completion ``L``. For
that group, with ``logp`` the *current* policy's log-probs and ``A_i`` the sequence advantages::

    m_i   = sum_t logp_it / n_i                     per-sequence mean over its n_i valid tokens
    c_it  = (logp_it - m_i) * (A_i - mean_j A_j)    plain mean of the B sequence advantages
    sigma = std(c) + 1e-8                           population std over the group's valid tokens
    w_it  = exp(-c_it^2 / (2 sigma^2))              on valid tokens, 0 on padding
    w~_it = w_it * (B * L) / sum(w)                 only if sum(w) > 0; B * L counts padding too

and nothing is detached: the gradient flows through ``c``, both means, ``sigma`` and the normaliser. (The
released code writes ``m_i``'s denominator as ``mask.sum() + 1e-8`` with an integer mask; torch promotes
that sum to float32, where ``n + 1e-8 == n`` for every ``n >= 1``, so the mean is the plain mean.) Since
``B * L`` counts padded positions, the mean of ``w~`` over the real tokens exceeds 1 whenever the group's
completions differ in length. Statistics belong to the group, so several groups in one call (what verl's
micro-batches may hold) get exactly what trl computed for each of them alone.

Pure torch, no verl or process-group import; the verl loss is :mod:`cw_verl.authors_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIGMA_EPS = 1e-8
"""Added to the population std of ``c`` (the released code's sigma)."""


@dataclass(frozen=True)
class Groups:
    """Which rows form each prompt group: ``index`` is ``[B]`` int64 in ``[0, count)``."""

    index: torch.Tensor
    count: int

    @classmethod
    def from_labels(cls, labels) -> Groups:
        """Groups of equal labels (any hashable per row, e.g. verl's prompt ``uid``), numbered by first appearance."""
        numbering: dict = {}
        index = [numbering.setdefault(label, len(numbering)) for label in labels]
        return cls(torch.tensor(index, dtype=torch.int64, device="cpu"), len(numbering))  # labels live on the host

    def sizes(self) -> torch.Tensor:
        return torch.bincount(self.index, minlength=self.count)


@dataclass(frozen=True)
class AuthorsWeights:
    """The weights of one call and the statistics behind them (``[G]`` tensors are per group).

    ``weights`` and ``cov`` are ``[B, T]`` (0 at padding) and keep their autograd graph; the rest is detached.
    """

    weights: torch.Tensor
    cov: torch.Tensor
    sigma: torch.Tensor
    num_tokens: torch.Tensor
    num_rows: torch.Tensor
    padded_length: torch.Tensor
    weight_sum: torch.Tensor


def sequence_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's advantage ``[B]`` from verl's token-level ``[B, T]`` advantages (0 for rows without tokens).

    Raises:
        ValueError: a row's valid tokens carry different advantages (the released objective has one
            advantage per completion, as GRPO's outcome advantage).
    """
    valid = mask.bool()
    has_tokens = valid.any(dim=1)
    first = valid.to(torch.int8).argmax(dim=1)
    per_row = advantages.gather(1, first[:, None]).squeeze(1)
    varies = (advantages != per_row[:, None]) & valid
    if bool(varies.any()):
        rows = varies.any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"the authors' objective needs one advantage per sequence, but rows {rows[:8]} carry different advantages "
            "on their tokens (use an outcome-advantage estimator such as grpo/cw_grpo)"
        )
    return torch.where(has_tokens, per_row, torch.zeros_like(per_row))


def _per_group(values: torch.Tensor, groups: Groups) -> torch.Tensor:
    """Differentiable sums of per-row ``values`` ``[B]`` into ``[G]``."""
    return values.new_zeros(groups.count).index_add(0, groups.index.to(values.device), values)


def _sqrt_zero_safe(variance: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite derivative at 0; with a zero variance nothing depends on sigma, so its gradient
    # must be 0, not inf * 0 = NaN (torch.std's backward makes the same choice).
    positive = variance > 0
    return torch.where(positive, torch.where(positive, variance, 1.0).sqrt(), 0.0)


def covariance(
    log_prob: torch.Tensor, seq_advantages: torch.Tensor, mask: torch.Tensor, groups: Groups
) -> torch.Tensor:
    """``c_it = (logp_it - m_i) * (A_i - mean A over i's group)`` as ``[B, T]``, 0 at padding (differentiable).

    Rows without valid tokens take no part in their group's advantage mean (the released code never
    met one: every completion has at least its end-of-sequence token).
    """
    valid = mask.to(log_prob.dtype)
    tokens = valid.sum(dim=1)
    # where, not a product with the mask: whatever sits at padded positions (even inf) stays out.
    log_prob = torch.where(mask.bool(), log_prob, 0.0)
    logp_mean = log_prob.sum(dim=1) / tokens.clamp(min=1)
    centred_logp = (log_prob - logp_mean[:, None]) * valid
    real_row = (tokens > 0).to(log_prob.dtype)
    advantages = seq_advantages.to(log_prob.dtype) * real_row
    adv_mean = _per_group(advantages, groups) / _per_group(real_row, groups).clamp(min=1)
    centred_adv = (advantages - adv_mean[groups.index.to(log_prob.device)]) * real_row
    return centred_logp * centred_adv[:, None]


def kernel_weights(cov: torch.Tensor, mask: torch.Tensor, groups: Groups) -> AuthorsWeights:
    """Gaussian-kernel weights of ``c`` per group, normalised by the group's padded size ``B * L``.

    ``B`` counts the group's rows with valid tokens and ``L`` is their longest valid length. A group whose
    weights all underflow (``sum(w) = 0``) keeps them unnormalised, i.e. 0, as the released code does.
    """
    index = groups.index.to(cov.device)
    valid = mask.to(cov.dtype)
    tokens = valid.sum(dim=1)
    num_tokens = _per_group(tokens, groups)
    safe_tokens = num_tokens.clamp(min=1)
    cov_mean = _per_group(cov.sum(dim=1), groups) / safe_tokens
    deviation = (cov - cov_mean[index][:, None]) * valid
    variance = _per_group((deviation * deviation).sum(dim=1), groups) / safe_tokens
    sigma = _sqrt_zero_safe(variance) + SIGMA_EPS
    weights = torch.exp(-(cov * cov) / (2 * sigma[index][:, None] ** 2)) * valid
    weight_sum = _per_group(weights.sum(dim=1), groups)
    num_rows = _per_group((tokens > 0).to(cov.dtype), groups)
    padded_length = torch.zeros(groups.count, dtype=cov.dtype, device=cov.device)
    padded_length = padded_length.scatter_reduce(0, index, tokens.detach(), reduce="amax", include_self=True)
    positive = weight_sum > 0
    scale = torch.where(positive, num_rows * padded_length / torch.where(positive, weight_sum, 1.0), 1.0)
    return AuthorsWeights(
        weights=weights * scale[index][:, None],
        cov=cov,
        sigma=sigma.detach(),
        num_tokens=num_tokens.detach(),
        num_rows=num_rows.detach(),
        padded_length=padded_length,
        weight_sum=weight_sum.detach(),
    )


def authors_weights(
    log_prob: torch.Tensor, seq_advantages: torch.Tensor, mask: torch.Tensor, groups: Groups
) -> AuthorsWeights:
    """The released code's normalised weights ``w~`` of every prompt group in a call (see the module docstring).

    Args:
        log_prob: ``[B, T]`` current log-probs of the sampled tokens, with their autograd graph.
        seq_advantages: ``[B]`` one advantage per sequence (:func:`sequence_advantages`).
        mask: ``[B, T]`` valid-token mask (nonzero = valid).
        groups: the prompt group of every row; each group must be whole in the call.

    Returns:
        :class:`AuthorsWeights`; ``weights`` is ``[B, T]`` in ``log_prob``'s dtype promoted to at least
        float32, differentiable with respect to ``log_prob``.
    """
    if not (log_prob.shape == mask.shape and log_prob.dim() == 2 and seq_advantages.shape == log_prob.shape[:1]):
        raise ValueError(
            f"expected log_prob and mask [B, T] and seq_advantages [B], got {tuple(log_prob.shape)}, "
            f"{tuple(mask.shape)} and {tuple(seq_advantages.shape)}"
        )
    if groups.index.shape != seq_advantages.shape:
        raise ValueError(f"groups.index has shape {tuple(groups.index.shape)}, expected {tuple(seq_advantages.shape)}")
    compute = torch.promote_types(log_prob.dtype, torch.float32)
    cov = covariance(log_prob.to(compute), seq_advantages, mask, groups)
    return kernel_weights(cov, mask, groups)
