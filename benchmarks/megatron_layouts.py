"""One actor update on verl's Megatron engine under each parallel layout, against one process (CPU, gloo).

    python benchmarks/megatron_layouts.py            # about 3 minutes on 2 cores (launches of 1, 2 and 4 ranks)

The demo's warm-started tiny Llama and one RL batch of 4 prompts x 4 responses (old log-probs from the
one-process Megatron actor, GRPO advantages); every update starts from the same checkpoint. Layouts: TP2
with sequence parallelism, PP2, CP2 (2 ranks), TP2xPP2 and TP2xDP2 with sequence parallelism (4 ranks).
Layouts with one data-parallel rank use 4 micro-batches of 4 sequences, like the one-process reference;
TP2xDP2 uses one micro-batch of 8 per rank, against one micro-batch of 16 on one process (the same global
partition, which the per-call scope depends on). For each layout and loss it prints the deviation from one
process (tests.support.megatron_study.deviations): |loss| (verl's pg_loss, absolute), grad norm (relative),
the full gradient and the parameter update (relative L2), and the largest change of a token's weight w~.
``vanilla`` is the bf16 floor of each layout: verl's Megatron engine trains in bf16 only. The last line is
the single-process floor: vanilla with one micro-batch of 16 against 4 of 4 on one process.
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
from tests.support.megatron_study import (  # noqa: E402
    MICRO_BATCH,
    REFERENCE_MICRO_BATCH,
    Variant,
    deviations,
    layout_run,
    layout_variants,
    reference_run,
)

PROMPTS, GROUP_SIZE = 4, 4
LOSSES = ["vanilla", "cw_grpo", "cw_grpo_group", "cw_grpo_microbatch"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from cw_verl.cpu.tiny_model import TinyModelSpec
    from cw_verl.demo.task import ReversalTask
    from cw_verl.demo.warmstart import WarmStart, build_demo_model

    def plan(names):
        return [(name, layout_variants(name, LOSSES)) for name in names]

    with tempfile.TemporaryDirectory() as tmp:
        model_path, _ = build_demo_model(tmp, ReversalTask(), TinyModelSpec(), WarmStart(), args.seed)
        model_path, batch_path = str(model_path), f"{tmp}/batch.pt"
        reference_variants = [Variant(loss, micro_batch_size=m) for loss in LOSSES for m in (4, 16)]
        reference = run_ranks(
            reference_run, 1, model_path, batch_path, PROMPTS, GROUP_SIZE, args.seed, reference_variants
        )[0]["variants"]
        layouts = run_ranks(layout_run, 2, model_path, batch_path, plan(["TP2, SP", "PP2", "CP2"]), timeout_s=1800)[0]
        layouts |= run_ranks(layout_run, 4, model_path, batch_path, plan(["TP2xPP2", "TP2xDP2, SP"]), timeout_s=1800)[0]

    print(f"one update, {PROMPTS} prompts x {GROUP_SIZE} responses, deviation from one process (bf16)")
    print(
        f"{'layout':>12} {'loss mode':>19} {'|d loss|':>9} {'grad norm':>9} {'gradient':>9} {'update':>9} "
        f"{'max |dw|':>9}"
    )
    for name, results in layouts.items():
        for loss in LOSSES:
            got = results["variants"][Variant(loss, micro_batch_size=MICRO_BATCH[name])]
            d = deviations(got, reference[Variant(loss, micro_batch_size=REFERENCE_MICRO_BATCH[name])])
            print(
                f"{name:>12} {loss:>19} {d['loss']:>9.1e} {d['grad_norm']:>9.1e} {d['gradient']:>9.1e} "
                f"{d['update']:>9.1e} {d['weights']:>9.1e}"
            )
    d = deviations(
        reference[Variant("vanilla", micro_batch_size=16)], reference[Variant("vanilla", micro_batch_size=4)]
    )
    print(
        f"{'1 process':>12} {'vanilla 1x16 vs 4x4':>19} {d['loss']:>9.1e} {d['grad_norm']:>9.1e} "
        f"{d['gradient']:>9.1e} {d['update']:>9.1e} {d['weights']:>9.1e}"
    )
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
