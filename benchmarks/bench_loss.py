"""One policy-loss call, cw_grpo vs verl's own losses, measured side by side in one run (CPU).

    python benchmarks/bench_loss.py                                   # [64 x 4096], float32 and bfloat16
    python benchmarks/bench_loss.py --shapes 64x4096 256x8192 --min-run-time 3

For each micro-batch shape and log-prob dtype it prints, per loss, the median wall time of the loss call
alone (``forward``) and of the loss call plus ``backward`` to the log-probs (``fwd+bwd``), measured with
``torch.utils.benchmark`` in interleaved rounds (the median over rounds), as a ratio to verl's ``vanilla``
measured in the same run, and the peak memory the fwd+bwd call allocates on top of its inputs (from
torch.profiler's memory timeline). Inputs look like a GRPO micro-batch: per-sequence advantages of groups
of 8, ragged response masks, log-probs that require grad. Metrics are on (verl's policy losses always
compute theirs).

cw_grpo's default (mini-batch) scope computes its statistics and metrics on the first loss call of an
optimizer mini-batch and reuses them on the others, so it is timed twice: ``cw_grpo@first`` (the mini-batch
is this one micro-batch: statistics, metrics and loss) and ``cw_grpo@later`` (cached statistics). So are
``clip_cov_minibatch`` and ``kl_cov_minibatch`` (the same pass plus their selection round on the first call),
beside verl's per-call ``clip_cov`` and ``kl_cov``, all at verl's default knobs (ratio 2e-4).
Allocator: by default glibc hands every freed block above its mmap threshold (128 KiB at first) back to
the operating system, so each new [B, T] tensor costs page faults proportional to its size, and the ratios
then measure allocation counts as much as arithmetic (a loss's backward could come out cheaper than its
forward). ``--allocator retain`` (the default) raises glibc's mmap and trim thresholds at start-up
(``mallopt``), as a long-running trainer's heap and a GPU's caching allocator behave; ``--allocator
system`` leaves glibc as it is.

Single process: the statistics make no collective here; a DP run adds three small all-gathers per
mini-batch, and a one-element all-gather per loss call for the collective input check (counted below).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.utils.benchmark as benchmark
import verl  # noqa: F401  (loads the cw_verl plugin)

GROUP = 8


def retain_freed_memory() -> None:
    """Keep freed blocks in the process's heap (glibc ``mallopt``), so that allocations do not page-fault."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest mmap threshold on 64-bit
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    libc.mallopt(m_top_pad, 256 * 2**20)


def make_inputs(batch: int, length: int, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 8, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    old_log_prob = -torch.rand(batch, length, generator=gen).pow(3) * 6
    log_prob = (old_log_prob + 0.05 * torch.randn(batch, length, generator=gen)).to(dtype).requires_grad_()
    rewards = torch.randint(0, 2, (batch // GROUP, GROUP), generator=gen).float()
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).flatten()
    return {
        "old_log_prob": old_log_prob.to(dtype),
        "log_prob": log_prob,
        "advantages": adv[:, None].expand(batch, length).contiguous(),
        "response_mask": mask,
        "uid": [f"prompt-{i // GROUP}" for i in range(batch)],
    }


def actor_config():
    from verl.workers.config import FSDPActorConfig

    return FSDPActorConfig(strategy="fsdp2", rollout_n=GROUP, ppo_micro_batch_size_per_gpu=1)


def mini_batch(inputs):
    from verl.utils import tensordict_utils as tu

    return tu.get_tensordict(
        {
            "old_log_probs": inputs["old_log_prob"],
            "advantages": inputs["advantages"],
            "response_mask": inputs["response_mask"],
            "uid": inputs["uid"],
        }
    )


def loss_call(loss_mode: str, inputs: dict, config, backward: bool):
    """A closure that runs one loss call the way verl's engine does (inside its train_batch context)."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from cw_verl.context import loss_call as loss_call_context
    from cw_verl.context import train_batch_call

    name, _, phase = loss_mode.partition("@")
    fn = get_policy_loss_fn(name)
    td = mini_batch(inputs)
    # "later": every repetition is a later call of the same mini-batch (statistics already cached).
    shared_cache = {} if phase == "later" else None
    args = {k: inputs[k] for k in ("old_log_prob", "log_prob", "advantages", "response_mask")}

    def run():
        inputs["log_prob"].grad = None
        with train_batch_call(td, shared_cache), loss_call_context(None, td):
            loss, _ = fn(**args, loss_agg_mode="token-mean", config=config)
            if backward:
                loss.backward()

    if phase == "later":
        run()  # fill the cache
    return run


def peak_extra_bytes(run) -> int:
    """Peak bytes allocated during ``run()`` above what was live when it started (CPU memory timeline)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        run()
    _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline("cpu")
    live = np.asarray(sizes).sum(axis=1)
    return int(live.max() - live[0]) if len(live) else 0


def count_collectives(num_sequences: int, length: int, micro_batches: int) -> list[tuple[str, int, int]]:
    """Gather rounds and bytes each rank sends per optimizer mini-batch, per scope, counted by running the
    losses over ``micro_batches`` micro-batches as one rank of a (pretend) two-rank group."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from cw_verl import context, cov_losses, verl_losses

    inputs = make_inputs(num_sequences, length, torch.float32, seed=1)
    config = actor_config()
    config.global_batch_info.update(global_batch_size=num_sequences, dp_size=1)
    rows = []
    originals = (
        verl_losses.group_gather,
        verl_losses.resolve_data_parallel_group,
        cov_losses.resolve_data_parallel_group,
    )
    for loss_mode in (
        "cw_grpo_microbatch",
        "cw_grpo_minibatch",
        "cw_grpo_group",
        "clip_cov_minibatch",
        "kl_cov_minibatch",
    ):
        counts = {"rounds": 0, "bytes": 0}

        def counting(group, counts=counts):
            def gather(table):
                counts["rounds"] += 1
                counts["bytes"] += table.numel() * table.element_size()
                return table.unsqueeze(0)

            return gather

        verl_losses.group_gather = counting
        verl_losses.resolve_data_parallel_group = cov_losses.resolve_data_parallel_group = lambda dp_size: "a group"
        try:
            td = mini_batch(inputs)
            size = num_sequences // micro_batches
            with context.train_batch_call(td):
                for start in range(0, num_sequences, size):
                    part = {k: v[start : start + size] for k, v in inputs.items()}
                    with context.loss_call(None, mini_batch(part)):
                        get_policy_loss_fn(loss_mode)(
                            old_log_prob=part["old_log_prob"],
                            log_prob=part["log_prob"].detach(),
                            advantages=part["advantages"],
                            response_mask=part["response_mask"],
                            loss_agg_mode="token-mean",
                            config=config,
                        )
        finally:
            verl_losses.group_gather, verl_losses.resolve_data_parallel_group = originals[:2]
            cov_losses.resolve_data_parallel_group = originals[2]
        rows.append((loss_mode, counts["rounds"], counts["bytes"]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["64x4096"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument(
        "--losses",
        nargs="+",
        default=[
            "vanilla",
            "clip_cov",
            "kl_cov",
            "cw_grpo@first",
            "cw_grpo@later",
            "cw_grpo_microbatch",
            "clip_cov_minibatch@first",
            "clip_cov_minibatch@later",
            "kl_cov_minibatch@first",
            "kl_cov_minibatch@later",
        ],
    )
    parser.add_argument("--min-run-time", type=float, default=4.0, help="seconds per measurement, over all rounds")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory timeline")
    parser.add_argument("--allocator", choices=("retain", "system"), default="retain", help="see the module docstring")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (on this 2-core VM a 2-thread op pays ~15 ms waking its helper thread)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.allocator == "retain":
        retain_freed_memory()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, allocator: {args.allocator}")
    print(
        f"{'shape':>9} {'dtype':>8} {'loss':>24} {'forward ms':>10} {'ratio':>6} {'fwd+bwd ms':>10} {'ratio':>6}",
        end="",
    )
    print("" if args.no_memory else f" {'peak extra MB':>13}")
    config = actor_config()
    for shape in args.shapes:
        batch, length = (int(x) for x in shape.split("x"))
        for dtype_name in args.dtypes:
            inputs = make_inputs(batch, length, getattr(torch, dtype_name))
            # Interleaved rounds (every loss once per round), median over rounds: this VM's timing drifts
            # by tens of percent over seconds, which a loss-after-loss schedule would turn into ratios.
            runs = {(name, bwd): loss_call(name, inputs, config, bwd) for name in args.losses for bwd in (False, True)}
            timers = {key: benchmark.Timer(stmt="run()", globals={"run": run}) for key, run in runs.items()}
            samples = {key: [] for key in runs}
            per_round = args.min_run_time / args.rounds
            for _ in range(args.rounds):
                for key, timer in timers.items():
                    samples[key].append(timer.blocked_autorange(min_run_time=per_round).median)
            results = {}
            for name in args.losses:
                memory = None if args.no_memory else peak_extra_bytes(loss_call(name, inputs, config, True))
                results[name] = (float(np.median(samples[name, False])), float(np.median(samples[name, True])), memory)
            base = results.get("vanilla", (float("nan"),) * 2)
            for name, (fwd, both, memory) in results.items():
                line = f"{shape:>9} {dtype_name:>8} {name:>24} {fwd * 1e3:>10.2f} {fwd / base[0]:>6.2f}"
                line += f" {both * 1e3:>10.2f} {both / base[1]:>6.2f}"
                print(line + ("" if memory is None else f" {memory / 2**20:>13.1f}"))
    print("\ncollectives per optimizer mini-batch of 64 sequences x 1024 tokens in 8 micro-batches (8 groups of 8):")
    print(f"{'loss':>19} {'gather rounds':>13} {'bytes sent per rank':>20}")
    for loss_mode, rounds, sent in count_collectives(64, 1024, 8):
        print(f"{loss_mode:>19} {rounds:>13} {sent:>20}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
