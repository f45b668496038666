"""The whole actor update (one optimizer step) with each policy loss, on verl's real actor path on CPU.

    python benchmarks/bench_train_step.py            # 2 gloo ranks, about 1 minute

One RL batch (the demo's task and warm-started tiny Qwen2, 16 prompts x 8 responses) is updated on with
``TrainingWorker.train_mini_batch`` (FSDP2 engine, 4 micro-batches of 16 sequences per rank, ppo_loss, the
registered policy loss, optimizer step), repeated ``--repeats`` times per loss in interleaved rounds;
it prints the median seconds per update and the ratio to verl's ``vanilla`` from the same run. The model
is tiny, so the loss is a far larger share of the step here than on a real model.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from cw_verl.cpu.launch import run_ranks
from cw_verl.demo.batch import save_shared_batch

LOSSES = ["vanilla", "clip_cov", "cw_grpo", "cw_grpo_group", "cw_grpo_microbatch"]
PROMPTS, GROUP_SIZE, MICRO_BATCH = 16, 8, 16


def time_updates(rank: int, world_size: int, model_path: str, batch_path: str, losses, repeats: int) -> dict:
    import torch

    from cw_verl.cpu import harness

    batch = torch.load(batch_path, weights_only=False)
    actors = {
        loss: harness.build_actor(
            harness.ActorSetup(
                model_path=model_path,
                rollout_n=GROUP_SIZE,
                ppo_mini_batch_size=PROMPTS,
                loss_mode=loss,
                ppo_micro_batch_size_per_gpu=MICRO_BATCH,
                lr=1e-6,
            )
        )
        for loss in losses
    }
    local = harness.dp_chunk(batch)
    seconds = {loss: [] for loss in losses}
    for _ in range(repeats + 1):  # the first round warms up
        for loss, actor in actors.items():
            start = time.perf_counter()
            harness.train_step(actor, local)
            seconds[loss].append(time.perf_counter() - start)
    return {loss: values[1:] for loss, values in seconds.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    from cw_verl.cpu.tiny_model import TinyModelSpec
    from cw_verl.demo.task import ReversalTask
    from cw_verl.demo.warmstart import WarmStart, build_demo_model

    with tempfile.TemporaryDirectory() as tmp:
        model_path, _ = build_demo_model(tmp, ReversalTask(), TinyModelSpec(), WarmStart(), 0)
        batch_path = f"{tmp}/batch.pt"
        run_ranks(save_shared_batch, 1, str(model_path), PROMPTS, GROUP_SIZE, 0, batch_path)
        per_rank = run_ranks(time_updates, args.world_size, str(model_path), batch_path, LOSSES, args.repeats)
    # A step ends when its slowest rank does.
    steps = {loss: np.max([r[loss] for r in per_rank], axis=0) for loss in LOSSES}
    base = float(np.median(steps["vanilla"]))
    print(
        f"one actor update: {PROMPTS} prompts x {GROUP_SIZE} responses on {args.world_size} gloo ranks, "
        f"micro-batches of {MICRO_BATCH} sequences per rank, median of {args.repeats}"
    )
    print(f"{'loss':>19} {'seconds':>8} {'vs vanilla':>10}")
    for loss in LOSSES:
        median = float(np.median(steps[loss]))
        print(f"{loss:>19} {median:>8.3f} {median / base:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
