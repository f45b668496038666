"""How much one actor update depends on the micro-batch size, per CW-GRPO statistics scope, on verl's real
actor path on CPU (TrainingWorker, verl's micro-batching, ppo_loss) with its FSDP2 engine and its Megatron
engine (tensor parallel 2 with sequence parallelism, through mbridge; cw_verl.cpu.megatron's CPU support).

    python benchmarks/microbatch_dependence.py                        # both engines, about 6 minutes on 2 cores
    python benchmarks/microbatch_dependence.py --backends fsdp2       # or megatron-tp2

One RL batch (8 prompts x 8 responses of the demo's digit-reversal task, the demo's warm-started tiny
Llama, verl's old log-probs and GRPO advantages) is used for every update; every update starts from the
same checkpoint and is one optimizer step over the whole batch (one mini-batch). For each engine, loss and
micro-batching it prints, against the same engine and loss with one micro-batch per rank on the engine's
first layout (FSDP2: one rank; Megatron: TP2, one data-parallel rank):

- ``grad rel diff``: ||g - g_ref|| / ||g_ref|| for the full gradient the optimizer receives;
- ``max |dw|``, ``mean |dw|``: the change of the per-token weights w~ the loss calls used (valid tokens);
- ``w moved >10%``: share of valid tokens whose weight changed by more than 10%.

``vanilla`` (verl's GRPO loss) has no weights and shows the floating-point floor of the comparison: float32
rounding for FSDP2, bf16 rounding for Megatron (verl's Megatron engine trains in bf16 only).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

# The study aids live in the repository's tests/support (not in the package): run from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cw_verl.cpu.launch import run_ranks  # noqa: E402
from tests.support.batch import save_shared_batch  # noqa: E402
from tests.support.studies import Variant, updates_per_variant  # noqa: E402

PROMPTS, GROUP_SIZE = 8, 8
LOSSES = ["vanilla", "cw_grpo_microbatch", "cw_grpo_minibatch", "cw_grpo_group"]
# Engine -> (ActorSetup keys, world sizes); the data-parallel size is the world size over TP.
BACKENDS = {
    "fsdp2": ({}, [1, 2]),
    "megatron-tp2": ({"strategy": "megatron", "tensor_model_parallel_size": 2, "sequence_parallel": True}, [2, 4]),
}


def micro_batchings(sequences_per_rank: int, dynamic_tokens: int):
    return (
        [(f"1 x {sequences_per_rank} seq (reference)", {"micro_batch_size": sequences_per_rank})]
        + [(f"{sequences_per_rank // size} x {size} seq", {"micro_batch_size": size}) for size in (8, 4, 2, 1)]
        + [(f"dynamic, <= {dynamic_tokens} tokens", {"max_token_len": dynamic_tokens})]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--dynamic-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from cw_verl.cpu.tiny_model import TinyModelSpec
    from cw_verl.demo.task import ReversalTask
    from cw_verl.demo.warmstart import WarmStart, build_demo_model

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_path, _ = build_demo_model(tmp, ReversalTask(), TinyModelSpec(), WarmStart(), args.seed)
        batch_path = f"{tmp}/batch.pt"
        run_ranks(save_shared_batch, 1, str(model_path), PROMPTS, GROUP_SIZE, args.seed, batch_path)
        for backend in args.backends:
            layout, world_sizes = BACKENDS[backend]
            tensor_parallel = layout.get("tensor_model_parallel_size", 1)
            for world_size in world_sizes:
                per_rank = PROMPTS * GROUP_SIZE * tensor_parallel // world_size
                layouts = micro_batchings(per_rank, args.dynamic_tokens)
                variants = [Variant(loss, **kw) for loss in LOSSES for _, kw in layouts]
                out = run_ranks(
                    updates_per_variant, world_size, str(model_path), variants, batch_path, layout, timeout_s=3600
                )[0]
                results[backend, world_size] = (layouts, out)

    mask = next(iter(results.values()))[1]["response_mask"]
    print(
        f"one update, {PROMPTS} prompts x {GROUP_SIZE} responses, {int(mask.sum())} valid tokens; reference: one "
        "micro-batch per rank on the engine's first layout"
    )
    print(
        f"{'engine':>12} {'loss':>19} {'ranks':>5} {'micro-batches per rank':>26} {'grad rel diff':>13} "
        f"{'max |dw|':>9} {'mean |dw|':>9} {'w moved >10%':>12}"
    )
    for backend in args.backends:
        first = BACKENDS[backend][1][0]
        layouts_ref, out_ref = results[backend, first]
        for loss in LOSSES:
            reference = out_ref["variants"][Variant(loss, **layouts_ref[0][1])]
            for world_size in BACKENDS[backend][1]:
                layouts, out = results[backend, world_size]
                for label, kw in layouts:
                    got = out["variants"][Variant(loss, **kw)]
                    grad_diff = ((got["gradient"] - reference["gradient"]).norm() / reference["gradient"].norm()).item()
                    line = f"{backend:>12} {loss:>19} {world_size:>5} {label:>26} {grad_diff:>13.2e}"
                    if got["weights"] is not None:
                        change = (got["weights"] - reference["weights"])[mask].abs()
                        moved = (change > 0.1 * reference["weights"][mask]).double().mean().item()
                        line += f" {change.max().item():>9.3f} {change.mean().item():>9.4f} {moved:>12.1%}"
                    print(line)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
