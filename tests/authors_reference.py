"""A float64 transcription of the CW-GRPO authors' released objective, written from the facts in issue 11.

One call of the released trl loss holds one prompt's group: B completions of unequal lengths, padded to
the longest, L. Deliberately literal: one group at a time, boolean indexing, torch's own std, the
``if sum(w) > 0`` branch, and nothing detached.
"""

import torch


def pad_group(log_probs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` log-probs (0-padded) and mask of one group's completions (1-D tensors), L = the longest."""
    longest = max(len(lp) for lp in log_probs)
    padded = torch.stack([torch.cat([lp, lp.new_zeros(longest - len(lp))]) for lp in log_probs])
    mask = torch.stack([torch.arange(longest) < len(lp) for lp in log_probs]).to(torch.int64)
    return padded, mask


def group_weights(log_probs: list[torch.Tensor], advantages: torch.Tensor):
    """``(w~, c, mask)`` of one group, each ``[B, L]``."""
    logp, mask = pad_group(log_probs)
    # As released, with an integer mask: int64 sum + 1e-8 is a float32 tensor (torch's default dtype).
    logp_mean = (logp * mask).sum(dim=1, keepdim=True) / (mask.sum(dim=1, keepdim=True) + 1e-8)
    logp_centred = (logp - logp_mean) * mask
    adv_centred = advantages - advantages.mean()
    cov = logp_centred * adv_centred.unsqueeze(1)
    sigma = cov[mask == 1].std(unbiased=False) + 1e-8
    weights = torch.exp(-(cov**2) / (2 * sigma**2)) * mask
    total = weights.sum()
    if total > 0:
        weights = weights * mask.numel() / total
    return weights, cov, mask


def group_loss(log_probs: list[torch.Tensor], advantages: torch.Tensor, beta=0.0, ref_log_probs=None):
    """The released per-call loss of one group: token mean per completion, then mean over completions."""
    weights, _, mask = group_weights(log_probs, advantages)
    logp, _ = pad_group(log_probs)
    ratio = torch.exp(logp - logp.detach())
    token_loss = -(weights * ratio * advantages.unsqueeze(1))
    if beta:
        ref, _ = pad_group(ref_log_probs)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        token_loss = token_loss + beta * kl
    return ((token_loss * mask).sum(dim=1) / mask.sum(dim=1)).mean()


def batch_loss(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, group_of_row, **kw):
    """Mean over the groups' per-call losses (trl: gradient accumulation and data parallelism average calls of
    equal size) for a ``[B, T]`` batch whose rows belong to the groups ``group_of_row``."""
    losses = []
    for label in dict.fromkeys(group_of_row):
        rows = [i for i, g in enumerate(group_of_row) if g == label]
        lps = [log_prob[i][mask[i].bool()] for i in rows]
        refs = None if "ref_log_prob" not in kw else [kw["ref_log_prob"][i][mask[i].bool()] for i in rows]
        losses.append(group_loss(lps, advantages[rows], beta=kw.get("beta", 0.0), ref_log_probs=refs))
    return torch.stack(losses).mean()


def scatter_group_weights(log_prob, advantages, mask, group_of_row):
    """The transcription's ``w~`` and ``c`` of every group, placed back at the rows' positions in ``[B, T]``."""
    weights = torch.zeros(log_prob.shape, dtype=torch.float64)
    cov = torch.zeros(log_prob.shape, dtype=torch.float64)
    for label in dict.fromkeys(group_of_row):
        rows = [i for i, g in enumerate(group_of_row) if g == label]
        lps = [log_prob[i][mask[i].bool()] for i in rows]
        w, c, m = group_weights(lps, advantages[rows])
        for k, i in enumerate(rows):
            valid = mask[i].bool()
            weights[i, valid] = w[k][m[k].bool()].detach()
            cov[i, valid] = c[k][m[k].bool()].detach()
    return weights, cov
