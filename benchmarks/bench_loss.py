"""Wall time of one policy-loss call, cw_grpo vs verl's own losses, measured side by side in one run.

    python benchmarks/bench_loss.py                      # [64 x 4096], float32
    python benchmarks/bench_loss.py --shapes 64x4096 256x8192 --dtypes float32 bfloat16

Each case times the loss call alone (``forward``) and the loss call plus ``backward`` to the log-probs
(``fwd+bwd``) with ``torch.utils.benchmark`` (warm-up and repetition handled there), on inputs shaped
like a GRPO micro-batch: per-sequence advantages, ragged response masks, log-probs that require grad.
Ratios are against verl's ``vanilla`` measured in the same run. Single process: the statistics make
no collective here (a DP run adds two small all-gathers per loss call).
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as benchmark
import verl  # noqa: F401  (loads the cw_verl plugin)


def make_inputs(batch: int, length: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 8, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    old_log_prob = -torch.rand(batch, length, generator=gen).pow(3) * 6
    log_prob = (old_log_prob + 0.05 * torch.randn(batch, length, generator=gen)).to(dtype).requires_grad_()
    rewards = torch.randint(0, 2, (batch // 8, 8), generator=gen).float()
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).flatten()
    advantages = adv[:, None].expand(batch, length).contiguous()
    return old_log_prob.to(dtype), log_prob, advantages, mask


def actor_config():
    from verl.workers.config import FSDPActorConfig

    return FSDPActorConfig(strategy="fsdp2", rollout_n=8, ppo_micro_batch_size_per_gpu=1)


def loss_call(name, inputs, config, backward):
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    old_log_prob, log_prob, advantages, mask = inputs
    fn = get_policy_loss_fn(name)

    def run():
        log_prob.grad = None
        loss, _ = fn(
            old_log_prob=old_log_prob,
            log_prob=log_prob,
            advantages=advantages,
            response_mask=mask,
            loss_agg_mode="token-mean",
            config=config,
        )
        if backward:
            loss.backward()

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["64x4096"])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--losses", nargs="+", default=["vanilla", "cw_grpo", "clip_cov"])
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per measurement")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'shape':>10} {'dtype':>9} {'loss':>9} {'mode':>8} {'median ms':>10} {'vs vanilla':>10}")
    config = actor_config()
    for shape in args.shapes:
        batch, length = (int(x) for x in shape.split("x"))
        for dtype_name in args.dtypes:
            inputs = make_inputs(batch, length, getattr(torch, dtype_name))
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "forward"
                medians = {}
                for name in args.losses:
                    timer = benchmark.Timer(stmt="run()", globals={"run": loss_call(name, inputs, config, backward)})
                    medians[name] = timer.blocked_autorange(min_run_time=args.min_run_time).median
                for name, median in medians.items():
                    ratio = median / medians["vanilla"] if "vanilla" in medians else float("nan")
                    print(f"{shape:>10} {dtype_name:>9} {name:>9} {mode:>8} {median * 1e3:>10.2f} {ratio:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
