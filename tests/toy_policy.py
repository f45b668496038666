"""A tiny differentiable policy and a fixed global micro-batch, for invariance tests across ranks."""

import torch

NUM_SEQUENCES, LENGTH, HIDDEN, VOCAB, GROUP = 12, 16, 8, 11, 4


def global_batch(dtype=torch.float64):
    """Features, sampled tokens, old log-probs, GRPO-like advantages and a ragged response mask.

    Sequence 11 has no valid token, so a shard made of it alone is a rank without valid tokens.
    """
    gen = torch.Generator().manual_seed(1234)
    features = torch.randn(NUM_SEQUENCES, LENGTH, HIDDEN, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (NUM_SEQUENCES, LENGTH), generator=gen)
    lengths = torch.randint(3, LENGTH + 1, (NUM_SEQUENCES,), generator=gen)
    lengths[-1] = 0
    mask = torch.arange(LENGTH)[None, :] < lengths[:, None]
    rewards = torch.randint(0, 2, (NUM_SEQUENCES,), generator=gen, dtype=torch.float64)
    grouped = rewards.view(-1, GROUP)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).flatten()
    advantages = advantages[:, None].expand(NUM_SEQUENCES, LENGTH).clone()
    # Old log-probs off the current ones, so that ratios differ from 1 and clipping is exercised.
    model = make_policy(dtype)
    with torch.no_grad():
        old_log_prob = log_probs(model, features.to(dtype), tokens) + 0.3 * torch.randn(
            NUM_SEQUENCES, LENGTH, generator=gen, dtype=torch.float64
        ).to(dtype)
    return {
        "features": features.to(dtype),
        "tokens": tokens,
        "mask": mask,
        "advantages": advantages.to(dtype),
        "old_log_prob": old_log_prob,
    }


def make_policy(dtype=torch.float64):
    torch.manual_seed(99)
    return torch.nn.Linear(HIDDEN, VOCAB).to(dtype)


def log_probs(model, features, tokens):
    return torch.log_softmax(model(features), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def shard(batch, start, stop):
    return {key: value[start:stop] for key, value in batch.items()}


def actor_config(loss_agg_mode="token-mean", **overrides):
    from verl.workers.config import FSDPActorConfig

    settings = dict(
        strategy="fsdp2",
        rollout_n=GROUP,
        ppo_micro_batch_size_per_gpu=NUM_SEQUENCES,
        loss_agg_mode=loss_agg_mode,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
    )
    settings.update(overrides)
    return FSDPActorConfig(**settings)


def global_batch_info(batch, dp_size):
    mask = batch["mask"]
    return {
        "dp_size": dp_size,
        "batch_num_tokens": int(mask.sum()),
        "global_batch_size": int((mask.sum(-1) > 0).sum()),
        "loss_scale_factor": None,
    }
