"""``python -m cw_verl demo``: GRPO vs CW-GRPO on verl's own actor, on CPU, in a few minutes.

1. Build a tiny Llama and a character tokenizer locally and warm-start it on the task (one process).
2. For each arm, start ``--world-size`` gloo ranks and train with :func:`cw_verl.demo.loop.run_arm`
   (verl's TrainingWorker / FSDP2 engine / ppo_loss / registered estimator and policy loss), same seed,
   same prompts, same budget. Metrics go to ``<out-dir>/<arm>.jsonl`` through verl's file logger.
3. Draw ``<out-dir>/cw_grpo_demo.png`` with :mod:`cw_verl.demo.plot` and print a summary table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from cw_verl.cpu.tiny_model import TinyModelSpec
from cw_verl.demo.loop import ARMS, RunConfig, quiet_known_warnings, run_arm
from cw_verl.demo.task import ReversalTask
from cw_verl.demo.warmstart import WarmStart

FIGURE_NAME = "cw_grpo_demo.png"
SUMMARY_NAME = "summary.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cw_verl demo",
        description="CW-GRPO vs GRPO through verl's own FSDP2 actor on CPU gloo ranks (no GPU, no download).",
    )
    p.add_argument("--out-dir", default="runs/demo", help="where the model, JSONL metrics and figure go")
    p.add_argument(
        "--arms", default="grpo,cw_grpo", help="comma-separated: grpo, cw_grpo, clip_cov, cw_grpo_authors, ep_grpo"
    )
    p.add_argument("--steps", type=int, default=RunConfig.steps, help="RL steps per arm")
    p.add_argument("--seed", type=int, default=RunConfig.seed)
    p.add_argument("--world-size", type=int, default=2, help="data-parallel gloo ranks")
    p.add_argument("--prompts-per-step", type=int, default=RunConfig.prompts_per_step)
    p.add_argument("--group-size", type=int, default=RunConfig.group_size, help="G: samples per prompt")
    p.add_argument(
        "--mini-batches", type=int, default=RunConfig.mini_batches_per_step, help="optimizer steps per RL step"
    )
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=RunConfig.micro_batch_size_per_gpu,
        help="sequences per rank and forward/backward",
    )
    p.add_argument("--dynamic-bsz", action="store_true", help="verl's token-budget micro-batching")
    p.add_argument(
        "--max-token-len",
        type=int,
        default=RunConfig.max_token_len_per_gpu,
        help="token budget per micro-batch with --dynamic-bsz",
    )
    p.add_argument("--lr", type=float, default=RunConfig.lr)
    p.add_argument(
        "--lr-warmup-ratio",
        type=float,
        default=RunConfig.lr_warmup_steps_ratio,
        help="share of steps with linear lr warm-up",
    )
    p.add_argument("--temperature", type=float, default=RunConfig.temperature)
    p.add_argument("--warmstart-steps", type=int, default=WarmStart.steps)
    p.add_argument("--val-problems", type=int, default=RunConfig.val_problems)
    p.add_argument("--smoke", action="store_true", help="a tiny run (a few steps) to check the wiring")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per arm before its ranks are killed")
    return p


def _check_registered(arms) -> None:
    from verl.trainer.ppo import core_algos

    for arm in arms:
        if arm.adv_estimator not in core_algos.ADV_ESTIMATOR_REGISTRY:
            raise SystemExit(
                f"arm {arm.name}: advantage estimator {arm.adv_estimator!r} is not registered with verl "
                "(run `python -m cw_verl check`)"
            )
        if arm.loss_mode not in core_algos.POLICY_LOSS_REGISTRY:
            raise SystemExit(
                f"arm {arm.name}: policy loss {arm.loss_mode!r} is not registered with verl "
                "(run `python -m cw_verl check`)"
            )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_known_warnings()
    from cw_verl.cpu.launch import run_ranks
    from cw_verl.demo import plot, runlog
    from cw_verl.demo.warmstart import build_demo_model

    names = [name.strip() for name in args.arms.split(",") if name.strip()]
    unknown = [name for name in names if name not in ARMS]
    if unknown or not names or len(set(names)) != len(names):
        raise SystemExit(f"--arms must name distinct arms among {sorted(ARMS)}, got {args.arms!r}")
    arms = [ARMS[name] for name in names]
    _check_registered(arms)

    warm = WarmStart(steps=args.warmstart_steps)
    config_kwargs = dict(
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        mini_batches_per_step=args.mini_batches,
        micro_batch_size_per_gpu=args.micro_batch_size,
        use_dynamic_bsz=args.dynamic_bsz,
        max_token_len_per_gpu=args.max_token_len,
        lr=args.lr,
        lr_warmup_steps_ratio=args.lr_warmup_ratio,
        temperature=args.temperature,
        seed=args.seed,
        val_problems=args.val_problems,
        progress=not args.no_progress,
    )
    if args.smoke:
        # The full warm-start (a few seconds) so that even 3 steps see rewards and update the policy.
        config_kwargs.update(steps=min(args.steps, 3), prompts_per_step=8, group_size=4, mini_batches_per_step=2)
        config_kwargs.update(micro_batch_size_per_gpu=2, val_problems=16)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    task = ReversalTask()
    print(f"[demo] building and warm-starting the tiny policy ({warm.steps} supervised steps) ...", flush=True)
    model_path, model_info = build_demo_model(out_dir / "model", task, TinyModelSpec(), warm, args.seed)
    print(
        f"[demo] {model_info['parameters']:,} parameters; sampled accuracy after warm-start "
        f"{model_info['warm_start_sampled_accuracy']:.3f} ({model_info['build_seconds']:.1f} s)",
        flush=True,
    )
    cfg = RunConfig(model_path=str(model_path), out_dir=str(out_dir), task=task, **config_kwargs)
    cfg.validate(args.world_size)

    arm_results = {}
    for arm in arms:
        print(
            f"[demo] arm {arm.name}: adv_estimator={arm.adv_estimator}, loss_mode={arm.loss_mode}, "
            f"{args.world_size} gloo ranks, {cfg.steps} steps",
            flush=True,
        )
        arm_start = time.perf_counter()
        result = run_ranks(run_arm, args.world_size, cfg, arm, timeout_s=args.timeout)[0]
        result["wall_seconds"] = time.perf_counter() - arm_start
        arm_results[arm.name] = result

    _, window, summaries, figure = plot.report(
        {name: result["jsonl"] for name, result in arm_results.items()},
        out_dir / FIGURE_NAME,
        cfg.steps,
        f"verl FSDP2 actor on CPU ({args.world_size} gloo ranks): digit reversal, seed {args.seed}",
    )
    total = time.perf_counter() - started
    summary = {
        "total_seconds": total,
        "model": model_info,
        "run_config": {k: v for k, v in asdict(cfg).items() if k != "task"} | {"task": asdict(task)},
        "world_size": args.world_size,
        "arms": {
            name: {
                "adv_estimator": ARMS[name].adv_estimator,
                "loss_mode": ARMS[name].loss_mode,
                "jsonl": result["jsonl"],
                "wall_seconds": result["wall_seconds"],
                "engine_init_seconds": result["init_seconds"],
                **plot.json_safe(summaries[name]),
            }
            for name, result in arm_results.items()
        },
        "figure": str(figure),
    }
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
    print()
    print(runlog.format_table(summaries, window=window))
    print()
    print(f"[demo] figure: {figure}")
    print(f"[demo] metrics: {', '.join(result['jsonl'] for result in arm_results.values())}")
    print(f"[demo] redraw: python -m cw_verl plot {' '.join(r['jsonl'] for r in arm_results.values())} --out fig.png")
    print(f"[demo] total wall time {total:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
