"""Measurements the demo logs beside training, without touching any arm's update.

* :func:`covariance_percentiles`: the paper's Table 1 statistics (sigma, mean covariance, the percentile
  thresholds) of a batch, for arms that do not compute them in their loss (GRPO, Clip-Cov): the paper
  measured its Table 1 and Fig. 3 under plain GRPO.
* :func:`kernel_tails`: what CW-GRPO's kernel does (or would do, under GRPO) to each side of the token
  covariance: the share of the positive- and of the negative-covariance tokens it weighs below one half.
* :func:`weight_gradient_terms`: how much of the released objective's gradient flows through the weights
  themselves (``cw_grpo_authors`` detaches nothing), against the rest, for one batch.
"""

from __future__ import annotations

import torch

from cw_verl.authors_objective import Groups, authors_weights, sequence_advantages

PERCENTILE_PREFIXES = ("actor/cw/cov_", "actor/cw/sigma")


def covariance_percentiles(batch) -> dict[str, float]:
    """``actor/cw/sigma``, ``actor/cw/cov_mean`` and ``actor/cw/cov_{pos,neg}_top_*`` of a verl batch
    (``old_log_probs``, ``advantages``, ``response_mask``), over all its tokens (cw_grpo's default scope)."""
    from cw_verl.verl_losses import RANK_METRICS, SCOPE_METRICS, _scope_metrics
    from cw_verl.weights import raise_for_bad_input, scope_statistics

    tensors = batch.batch
    advantages, mask = tensors["advantages"], tensors["response_mask"]
    stats, tokens = scope_statistics(tensors["old_log_probs"], advantages, mask)
    raise_for_bad_input(stats.status.tolist(), stats.local_problem, tokens=(advantages, mask))
    values = _scope_metrics(stats, tokens).tolist()
    metrics = {f"actor/cw/{name}": value for name, value in zip(SCOPE_METRICS + RANK_METRICS, values, strict=True)}
    return {key: value for key, value in metrics.items() if key.startswith(PERCENTILE_PREFIXES)}


TAIL_PREFIX = "probe/kernel/"


def kernel_tails(batch) -> dict[str, float]:
    """The kernel's effect on each side of the covariance for a verl batch (``old_log_probs``, ``advantages``,
    ``response_mask``), with cw_grpo's default scope (all the batch's tokens; the arm's own weights when the
    step is one mini-batch).

    A token with ``c > 0`` (a likely token with a positive advantage, or an unlikely one with a negative
    advantage) lowers the policy's entropy when it is reinforced; ``c < 0`` raises it (Cui et al.; paper
    Sec. 2.2). The kernel is symmetric in ``c``, so when the positive tail is the longer one it takes away more
    entropy-lowering updates than entropy-raising ones.

    Returns:
        ``probe/kernel/pos_below_half`` and ``neg_below_half``: the share of the valid tokens with ``c > 0``
        (``c < 0``) whose ``w~ < 0.5``, NaN when that side is empty; ``pos_share_of_below_half``: the share of
        the tokens with ``w~ < 0.5`` that have ``c > 0`` (NaN when none is below one half).
    """
    from cw_verl.weights import covariance_weights

    tensors = batch.batch
    mask = tensors["response_mask"].bool()
    weights, cov, _ = covariance_weights(tensors["old_log_probs"], tensors["advantages"], tensors["response_mask"])
    below = (weights < 0.5) & mask
    positive, negative = (cov > 0) & mask, (cov < 0) & mask

    def share(part: torch.Tensor, whole: torch.Tensor) -> float:
        count = int(whole.sum())
        return float((part & whole).sum()) / count if count else float("nan")

    return {
        f"{TAIL_PREFIX}pos_below_half": share(below, positive),
        f"{TAIL_PREFIX}neg_below_half": share(below, negative),
        f"{TAIL_PREFIX}pos_share_of_below_half": share(positive, below),
    }


def response_log_probs(model, batch, temperature: float) -> torch.Tensor:
    """``[B, R]`` log-probs of each row's response under ``model`` at ``temperature`` (verl's convention:
    logits divided by the temperature), with their autograd graph; one unpadded sequence at a time."""
    tensors = batch.batch
    width = tensors["responses"].shape[1]
    rows = []
    for row in range(len(batch)):
        ids = tensors["input_ids"][row][tensors["attention_mask"][row].bool()]
        length = int(tensors["response_mask"][row].sum())
        logits = model(input_ids=ids[None]).logits[0, -length - 1 : -1] / temperature
        values = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[-length:, None]).squeeze(-1)
        rows.append(torch.cat([values, values.new_zeros(width - length)]))
    return torch.stack(rows)


def weight_gradient_terms(model, batch, temperature: float) -> dict[str, float]:
    """The released objective's gradient split into the weights' own term and the rest, for ``batch``.

    With ``L(theta) = -mean_i mean_t w~_it(theta) * r_it(theta) * A_i`` (on-policy, ``r = 1`` in value),
    ``grad L = -mean(A * r * grad w~) - mean(A * w~ * grad log pi)``: the first term exists only because
    the weights are not detached. Returns both norms, their ratio and the cosine between them.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    tensors = batch.batch
    mask = tensors["response_mask"].bool()
    log_prob = response_log_probs(model, batch, temperature)
    seq_adv = sequence_advantages(tensors["advantages"].float(), mask)
    weights = authors_weights(log_prob, seq_adv, mask, Groups.from_labels(list(batch.non_tensor_batch["uid"]))).weights
    ratio = torch.exp(log_prob - log_prob.detach())

    def loss(w):
        token_loss = -(w * ratio * seq_adv[:, None]) * mask
        rows = mask.sum(1).clamp(min=1)
        return (token_loss.sum(1) / rows).mean()

    total = torch.autograd.grad(loss(weights), params, retain_graph=True)
    rest = torch.autograd.grad(loss(weights.detach()), params)
    flat_total = torch.cat([g.flatten() for g in total]).double()
    flat_rest = torch.cat([g.flatten() for g in rest]).double()
    own = flat_total - flat_rest
    rest_norm = flat_rest.norm().item()
    return {
        "weights_term_norm": own.norm().item(),
        "rest_norm": rest_norm,
        "relative_norm": own.norm().item() / rest_norm if rest_norm > 0 else float("nan"),
        "cosine": (own @ flat_rest / (own.norm() * flat_rest.norm())).item() if rest_norm > 0 else float("nan"),
    }


def compare_objectives(model, batch, temperature: float) -> dict[str, float]:
    """The first update's gradient under three objectives on one batch (seq-mean-token-mean, on-policy):
    GRPO (weights 1), the paper's text with its group scope (``cw_grpo_group``: detached weights, token
    means over the group) and the authors' released objective (``cw_grpo_authors``). Returns the relative
    differences between them and the weights' statistics."""
    from cw_verl.verl_losses import uid_keys
    from cw_verl.weights import covariance_weights

    params = [p for p in model.parameters() if p.requires_grad]
    tensors = batch.batch
    mask = tensors["response_mask"].bool()
    uids = list(batch.non_tensor_batch["uid"])
    log_prob = response_log_probs(model, batch, temperature)
    seq_adv = sequence_advantages(tensors["advantages"].float(), mask)
    ratio = torch.exp(log_prob - log_prob.detach())
    groups = Groups.from_labels(uids)
    authors = authors_weights(log_prob, seq_adv, mask, groups).weights
    paper, _, _ = covariance_weights(
        log_prob.detach(),
        seq_adv[:, None].expand_as(log_prob),
        mask,
        row_keys=uid_keys(uids),
        max_segments=groups.count,
    )

    def gradient(weights):
        token_loss = -(weights * ratio * seq_adv[:, None]) * mask
        loss = (token_loss.sum(1) / mask.sum(1).clamp(min=1)).mean()
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        return torch.cat([g.flatten() for g in grads]).double()

    grpo, text, released = gradient(torch.ones_like(log_prob)), gradient(paper.float()), gradient(authors)
    own = released - gradient(authors.detach())

    def relative(a, b):
        return ((a - b).norm() / b.norm()).item()

    a, p = authors.detach()[mask].double(), paper[mask].double()
    return {
        "paper_vs_grpo": relative(text, grpo),
        "authors_vs_grpo": relative(released, grpo),
        "authors_vs_paper": relative(released, text),
        "weights_term_vs_rest": own.norm().item() / (released - own).norm().item(),
        "authors_weight_mean": a.mean().item(),
        "authors_frac_below_half": (a < 0.5).double().mean().item(),
        "paper_frac_below_half": (p < 0.5).double().mean().item(),
        "weights_correlation": torch.corrcoef(torch.stack([a, p]))[0, 1].item(),
    }


class LocalSelectionCounter:
    """Observation only: how many tokens verl 0.9.1's own ``clip_cov`` / ``kl_cov`` select, summed over one
    rank's loss calls (call :meth:`take` after each update, then sum over ranks).

    verl selects inside each loss call (``core_algos.compute_policy_loss_clip_cov`` / ``_kl_cov``), so the
    count depends on how the mini-batch is cut into calls: that is what the study measures. The counter wraps
    the registered function (verl looks it up by name at every call, ``workers/utils/losses.py: ppo_loss``)
    and returns its loss and metrics untouched:

    * ``clip_cov``: the call's ``actor/pg_clipfrac`` is the share of its valid tokens whose term the draw zeroed
      (``corr == 0``; PPO-clipped tokens are excluded from the draw and keep ``corr = 1``), so the count is
      ``pg_clipfrac x N_call``, read from verl's own output.
    * ``kl_cov``: verl logs no count; it takes the top ``max(int(kl_cov_ratio x N_call), 1)`` tokens of any call
      with valid tokens, counted here from the call's mask (``tests/demo/test_probes.py`` checks both counts
      against the tokens whose gradient verl's functions change).
    """

    MODES = ("clip_cov", "kl_cov")

    def __init__(self, loss_mode: str):
        from verl.trainer.ppo import core_algos

        if loss_mode not in self.MODES:
            raise ValueError(f"LocalSelectionCounter observes {self.MODES}, got {loss_mode!r}")
        self.loss_mode = loss_mode
        self._registry = core_algos.POLICY_LOSS_REGISTRY
        self._original = self._registry[loss_mode]
        self._count = 0
        self._registry[loss_mode] = self._observed

    def _observed(self, *, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, **kwargs):
        loss, metrics = self._original(
            old_log_prob=old_log_prob,
            log_prob=log_prob,
            advantages=advantages,
            response_mask=response_mask,
            loss_agg_mode=loss_agg_mode,
            config=config,
            **kwargs,
        )
        valid = int(response_mask.sum().item())
        if self.loss_mode == "clip_cov":
            self._count += round(metrics["actor/pg_clipfrac"] * valid)
        elif valid:
            ratio = config.policy_loss.kl_cov_ratio if config.policy_loss.kl_cov_ratio is not None else 0.0002
            self._count += max(int(valid * ratio), 1)
        return loss, metrics

    def take(self) -> int:
        """This rank's count since the last call."""
        count, self._count = self._count, 0
        return count

    def close(self) -> None:
        """Put verl's function back."""
        self._registry[self.loss_mode] = self._original
