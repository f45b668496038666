"""The whole actor update (one optimizer step) with each policy loss, on verl's real actor path on CPU, with
its FSDP2 engine and its Megatron engine (tensor parallel 2 with sequence parallelism, through mbridge).

    python benchmarks/bench_train_step.py                        # both engines on 2 gloo ranks, about 2 minutes
    python benchmarks/bench_train_step.py --backends fsdp2       # or megatron-tp2

One RL batch (the demo's task and warm-started tiny Llama, 16 prompts x 8 responses) is updated on with
``TrainingWorker.train_mini_batch`` (the engine, micro-batches of 16 sequences, ppo_loss, the registered
policy loss, optimizer step), repeated ``--repeats`` times per loss in interleaved rounds; it prints the median
seconds per update, the ratio to verl's ``vanilla`` on the same engine from the same run, and the ratio to
the first engine's vanilla. FSDP2 runs the 2 ranks data parallel in float32 (4 micro-batches each);
Megatron runs them as one tensor-parallel pair in bf16 (verl's Megatron engine refuses fp32), both ranks on
all 8 micro-batches. The model is tiny, so the loss is a far larger share of the step here than on a real
model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The study aids live in the repository's tests/support (not in the package): run from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cw_verl.cpu.launch import run_ranks  # noqa: E402
from tests.support.batch import save_shared_batch  # noqa: E402

# verl's defaults for every knob (Clip-Cov/KL-Cov ratio 2e-4: one token of this batch's ~800).
LOSSES = [
    "vanilla",
    "clip_cov",
    "kl_cov",
    "cw_grpo",
    "cw_grpo_group",
    "cw_grpo_microbatch",
    "clip_cov_minibatch",
    "kl_cov_minibatch",
]
PROMPTS, GROUP_SIZE, MICRO_BATCH = 16, 8, 16
BACKENDS = {
    "fsdp2": {},
    "megatron-tp2": {"strategy": "megatron", "tensor_model_parallel_size": 2, "sequence_parallel": True},
}


def time_updates(
    rank: int, world_size: int, model_path: str, batch_path: str, losses, repeats: int, layout, allocator: str
) -> dict:
    import torch

    if allocator == "retain":
        from bench_loss import retain_freed_memory

        retain_freed_memory()

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
                **layout,
            )
        )
        for loss in losses
    }
    seconds = {loss: [] for loss in losses}
    for _ in range(repeats + 1):  # the first round warms up
        for loss, actor in actors.items():
            local = harness.actor_chunk(actor, batch)
            start = time.perf_counter()
            harness.train_step(actor, local)
            seconds[loss].append(time.perf_counter() - start)
    return {loss: values[1:] for loss, values in seconds.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--allocator", choices=("retain", "system"), default="retain", help="as bench_loss.py (glibc's freed memory)"
    )
    args = parser.parse_args(argv)

    from cw_verl.cpu.tiny_model import TinyModelSpec
    from cw_verl.demo.task import ReversalTask
    from cw_verl.demo.warmstart import WarmStart, build_demo_model

    steps = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_path, _ = build_demo_model(tmp, ReversalTask(), TinyModelSpec(), WarmStart(), 0)
        batch_path = f"{tmp}/batch.pt"
        run_ranks(save_shared_batch, 1, str(model_path), PROMPTS, GROUP_SIZE, 0, batch_path)
        for backend in args.backends:
            per_rank = run_ranks(
                time_updates,
                args.world_size,
                str(model_path),
                batch_path,
                LOSSES,
                args.repeats,
                BACKENDS[backend],
                args.allocator,
            )
            # A step ends when its slowest rank does.
            steps[backend] = {loss: np.max([r[loss] for r in per_rank], axis=0) for loss in LOSSES}
    print(
        f"one actor update: {PROMPTS} prompts x {GROUP_SIZE} responses on {args.world_size} gloo ranks, "
        f"micro-batches of {MICRO_BATCH} sequences per data-parallel rank, median of {args.repeats}, "
        f"allocator: {args.allocator}"
    )
    print(f"{'engine':>12} {'loss':>19} {'seconds':>8} {'vs vanilla':>10} {'vs ' + args.backends[0] + ' vanilla':>20}")
    first = float(np.median(steps[args.backends[0]]["vanilla"]))
    for backend, by_loss in steps.items():
        base = float(np.median(by_loss["vanilla"]))
        for loss in LOSSES:
            median = float(np.median(by_loss[loss]))
            print(f"{backend:>12} {loss:>19} {median:>8.3f} {median / base:>10.2f} {median / first:>20.2f}")
    return 0


if __name__ == "__main__":
    import torch

    # The parent only warm-starts the model: one thread (a loaded box's thread pool spins).
    torch.set_num_threads(1)
    raise SystemExit(main())
