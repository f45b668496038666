"""``python -m cw_verl study``: GRPO vs CW-GRPO (paper text) vs the authors' released objective, over seeds.

For every seed, the demo's pipeline (:mod:`cw_verl.demo.cli`): a tiny Llama warm-started with that seed, then
each arm trained from it through verl's own FSDP2 actor on gloo ranks, same prompts and budget. The study
then reports, per arm, the mean and spread over seeds of the demo's summary numbers (reward, held-out
accuracy, entropy), the share of down-weighted tokens, and for ``cw_grpo_authors`` the relative norm of the
weights' own gradient term at the first update (:func:`cw_verl.demo.probes.weight_gradient_terms`).

All arms share ``--loss-agg-mode`` (default ``seq-mean-token-mean``, the paper's and the released code's
aggregation), so ``cw_grpo`` and ``cw_grpo_authors`` differ only in their weights.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from cw_verl.cpu.tiny_model import TinyModelSpec
from cw_verl.demo import runlog
from cw_verl.demo.loop import ARMS, WEIGHT_GRAD_KEY, RunConfig, quiet_known_warnings, run_arm
from cw_verl.demo.task import ReversalTask
from cw_verl.demo.warmstart import WarmStart

DEFAULT_ARMS = "grpo,cw_grpo,cw_grpo_authors"
COLUMNS = (
    ("reward, last {window}", "reward_end", "{:.3f}"),
    ("held-out acc. start", "val_start", "{:.3f}"),
    ("held-out acc. end", "val_end", "{:.3f}"),
    ("entropy, last {window}", "entropy_end", "{:.3f}"),
    ("entropy min", "entropy_min", "{:.3f}"),
    ("tokens w~ < 0.5", "frac_below_half", "{:.2%}"),
    ("kernel: c>0 tokens w~ < 0.5", "pos_below_half", "{:.2%}"),
    ("kernel: c<0 tokens w~ < 0.5", "neg_below_half", "{:.2%}"),
    ("weights' grad term / rest, step 1", "weights_grad_rel_norm", "{:.3f}"),
    ("Clip-/KL-Cov tokens selected per step", "selected_per_step", "{:.1f}"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cw_verl study", description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="runs/study")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (model warm start, prompts, sampling)")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated among {sorted(ARMS)}")
    p.add_argument("--steps", type=int, default=RunConfig.steps)
    p.add_argument("--loss-agg-mode", default="seq-mean-token-mean", help="verl's actor.loss_agg_mode, for every arm")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument(
        "--lrs",
        "--lr",
        default=str(RunConfig.lr),
        help="comma-separated learning rates; several: one study each in OUT_DIR/lr<value>, then a sweep table "
        "and figure (OUT_DIR/stability.md, stability.png)",
    )
    p.add_argument(
        "--combine-only",
        action="store_true",
        help="no training: redo the sweep table and figure from the studies already in OUT_DIR/lr<value>",
    )
    p.add_argument(
        "--mini-batches", type=int, default=RunConfig.mini_batches_per_step, help="optimizer steps per RL step"
    )
    p.add_argument("--kl-coef", type=float, default=0.0, help="verl's KL loss to the starting policy (low_var_kl)")
    p.add_argument("--temperature", type=float, default=RunConfig.temperature, help="rollout and validation")
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=RunConfig.micro_batch_size_per_gpu,
        help="sequences per rank and loss call (verl's ppo_micro_batch_size_per_gpu)",
    )
    p.add_argument(
        "--log-prob-micro-batch-size",
        type=int,
        default=None,
        help="sequences per rank and forward of the old log-probs (verl's log_prob_micro_batch_size_per_gpu; "
        "default: --micro-batch-size)",
    )
    p.add_argument(
        "--clip-cov-ratio", type=float, default=None, help="verl's policy_loss.clip_cov_ratio (default 2e-4)"
    )
    p.add_argument("--kl-cov-ratio", type=float, default=None, help="verl's policy_loss.kl_cov_ratio (default 2e-4)")
    p.add_argument(
        "--val-samples",
        type=int,
        default=RunConfig.val_samples,
        help="held-out samples per problem: accuracy over all of them and pass@k up to k = this",
    )
    p.add_argument("--smoke", action="store_true", help="one seed, 3 steps: checks the wiring")
    p.add_argument(
        "--first-update",
        action="store_true",
        help="no training: per seed, compare the first update's gradient under GRPO, cw_grpo_group and cw_grpo_authors",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per arm before its ranks are killed")
    return p


def summarize_seed(jsonl: str, name: str, window: int) -> dict[str, float]:
    run = runlog.read_jsonl(jsonl, name)
    summary = runlog.summarize(run, window=window)
    _, ratio = run.series(WEIGHT_GRAD_KEY)
    summary["weights_grad_rel_norm"] = ratio[0] if ratio else math.nan
    return summary


def aggregate(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per key: mean, sample std, min and max over the seeds that logged it."""
    out = {}
    for key in per_seed[0]:
        values = [s[key] for s in per_seed if not math.isnan(s[key])]
        if not values:
            out[key] = {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "seeds": 0}
            continue
        out[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
            "seeds": len(values),
        }
    return out


def format_table(results: dict[str, dict[str, dict[str, float]]], seeds: list[int], window: int = 10) -> str:
    """Markdown: per arm, mean ± sample std over seeds (min-max below)."""
    ks = runlog.pass_at_k_orders(key for stats in results.values() for key in stats)
    # Held-out pass@k after the accuracy (pass@1 is the accuracy's own estimator, so from k = 2).
    columns = list(COLUMNS)
    columns[3:3] = [
        (f"pass@{k} {edge}", f"pass@{k}_{edge}", "{:.3f}") for k in ks if k > 1 for edge in ("start", "end")
    ]
    # Columns no arm logged (e.g. the kernel shares of a study without them) are left out.
    columns = [c for c in columns if any(stats.get(c[1], {}).get("seeds") for stats in results.values())]
    header = ["arm"] + [title.format(window=window) for title, _, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for arm, stats in results.items():
        cells = [arm]
        for _, key, fmt in columns:
            s = stats.get(key, {"seeds": 0})
            if not s["seeds"]:
                cells.append("–")
                continue
            cells.append(
                f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{len(seeds)} seed(s): {', '.join(map(str, seeds))}; mean ± sample std (min–max).")
    return "\n".join(lines)


def format_seed_table(runs: dict[str, list[dict[str, float]]], seeds: list[int], window: int = 10) -> str:
    """Markdown: every seed of every arm (held-out accuracy start -> end, the largest pass@k at the end, entropy
    over the last ``window`` steps, and the Clip-/KL-Cov tokens selected per step where the arm selects)."""
    ks = runlog.pass_at_k_orders(key for per_seed in runs.values() for s in per_seed for key in s)
    top = f"pass@{ks[-1]}_end" if ks and ks[-1] > 1 else None

    def cell(s: dict[str, float]) -> str:
        text = f"{s['val_start']:.3f} -> {s['val_end']:.3f}"
        if top:
            text += f", {top[:-4]} {s[top]:.3f}"
        text += f", H {s['entropy_end']:.3f}"
        if not math.isnan(s.get("selected_per_step", math.nan)):
            text += f", sel {s['selected_per_step']:.1f}"
        return text

    lines = ["| arm | " + " | ".join(f"seed {seed}" for seed in seeds) + " |", "|" + " --- |" * (len(seeds) + 1)]
    lines += ["| " + arm + " | " + " | ".join(cell(s) for s in per_seed) + " |" for arm, per_seed in runs.items()]
    return "\n".join(lines) + (
        f"\n\nEvery seed: held-out accuracy start -> end{', ' + top[:-4] + ' at the end' if top else ''}, "
        f"entropy over the last {window} steps (H), Clip-/KL-Cov tokens selected per step (sel)."
    )


def first_update(rank: int, world_size: int, cfg: RunConfig) -> dict[str, float]:
    """One rank: the step-1 batch of ``cfg`` sampled from its model, then :func:`probes.compare_objectives`."""
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    from cw_verl.demo import probes
    from cw_verl.demo.rollout import Rollout, to_data_proto
    from cw_verl.demo.task import STREAM_RL

    rollout = Rollout(cfg.model_path, cfg.task, cfg.temperature)
    prompts = cfg.task.sample(cfg.prompts_per_step, cfg.seed, STREAM_RL, 1)
    batch = to_data_proto(rollout.sample(prompts, cfg.group_size, cfg.seed, 1), cfg.task)
    batch = compute_advantage(batch, adv_estimator="grpo", num_repeat=cfg.group_size, config=AlgoConfig())
    return probes.compare_objectives(rollout.model, batch, cfg.temperature)


def run_study(args, lr: float, out_dir: Path) -> int:
    """One study (every seed and arm at learning rate ``lr``) into ``out_dir``, as ``main`` describes."""
    from cw_verl.cpu.launch import run_ranks
    from cw_verl.demo.cli import _check_registered
    from cw_verl.demo.warmstart import build_demo_model

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    names = [name.strip() for name in args.arms.split(",") if name.strip()]
    if not seeds or not names or any(name not in ARMS for name in names) or len(set(names)) != len(names):
        raise SystemExit(f"--arms must name distinct arms among {sorted(ARMS)} and --seeds at least one seed")
    arms = [ARMS[name] for name in names]
    _check_registered(arms)
    steps = args.steps
    config_kwargs = {
        "loss_agg_mode": args.loss_agg_mode,
        "progress": False,
        "lr": lr,
        "mini_batches_per_step": args.mini_batches,
        "kl_coef": args.kl_coef,
        "temperature": args.temperature,
        "micro_batch_size_per_gpu": args.micro_batch_size,
        "log_prob_micro_batch_size_per_gpu": args.log_prob_micro_batch_size,
        "clip_cov_ratio": args.clip_cov_ratio,
        "kl_cov_ratio": args.kl_cov_ratio,
        "val_samples": args.val_samples,
    }
    if args.smoke:
        seeds, steps = seeds[:1], min(steps, 3)
        config_kwargs.update(prompts_per_step=8, group_size=4, mini_batches_per_step=2, micro_batch_size_per_gpu=8)
        config_kwargs.update(val_problems=16)
    task = ReversalTask()
    started = time.perf_counter()
    runs: dict[str, list[dict[str, float]]] = {arm.name: [] for arm in arms}
    window = min(10, max(1, steps // 5))
    comparisons = []
    for seed in seeds:
        seed_dir = out_dir / f"seed{seed}"
        model_path, info = build_demo_model(seed_dir / "model", task, TinyModelSpec(), WarmStart(), seed)
        print(f"[study] seed {seed}: warm-started accuracy {info['warm_start_sampled_accuracy']:.3f}", flush=True)
        cfg = RunConfig(
            model_path=str(model_path), out_dir=str(seed_dir), task=task, steps=steps, seed=seed, **config_kwargs
        )
        cfg.validate(args.world_size)
        if args.first_update:
            comparisons.append(run_ranks(first_update, 1, cfg, timeout_s=args.timeout)[0])
            print(f"[study] seed {seed} first update: {json.dumps(comparisons[-1])}", flush=True)
            continue
        for arm in arms:
            arm_start = time.perf_counter()
            result = run_ranks(run_arm, args.world_size, cfg, arm, timeout_s=args.timeout)[0]
            summary = summarize_seed(result["jsonl"], arm.name, window)
            runs[arm.name].append(summary)
            print(
                f"[study] seed {seed} {arm.name}: reward last{window} {summary['reward_end']:.3f}, held-out "
                f"{summary['val_end']:.3f}, entropy last{window} {summary['entropy_end']:.3f} "
                f"({time.perf_counter() - arm_start:.0f} s)",
                flush=True,
            )
    if args.first_update:
        stats = aggregate(comparisons)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "first_update.json").write_text(
            json.dumps({"seeds": seeds, "per_seed": comparisons, "aggregate": stats})
        )
        lines = ["| quantity | mean ± std (min–max) |", "| --- | --- |"]
        lines += [
            f"| {k} | {s['mean']:.4f} ± {s['std']:.4f} ({s['min']:.4f}–{s['max']:.4f}) |" for k, s in stats.items()
        ]
        print("\n".join(lines) + f"\n\n{len(seeds)} seed(s), first update, {config_kwargs['loss_agg_mode']}")
        return 0
    results = {name: aggregate(per_seed) for name, per_seed in runs.items()}
    table = format_table(results, seeds, window) + "\n\n" + format_seed_table(runs, seeds, window)
    report = {
        "seeds": seeds,
        "steps": steps,
        "loss_agg_mode": args.loss_agg_mode,
        "lr": lr,
        "mini_batches_per_step": args.mini_batches,
        "kl_coef": args.kl_coef,
        "temperature": args.temperature,
        "world_size": args.world_size,
        "micro_batch_size_per_gpu": config_kwargs["micro_batch_size_per_gpu"],
        "log_prob_micro_batch_size_per_gpu": config_kwargs["log_prob_micro_batch_size_per_gpu"],
        "clip_cov_ratio": args.clip_cov_ratio,
        "kl_cov_ratio": args.kl_cov_ratio,
        "val_samples": config_kwargs["val_samples"],
        "total_seconds": time.perf_counter() - started,
        "per_seed": runs,
        "aggregate": results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "study.json").write_text(json.dumps(report, indent=2))
    (out_dir / "study.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\n[study] {out_dir / 'study.json'}; total {report['total_seconds']:.0f} s", flush=True)
    return 0


def _learning_rates(text: str) -> list[tuple[str, float]]:
    """``"1e-4,3e-4"`` -> ``[("1e-4", 1e-4), ("3e-4", 3e-4)]``: the text names each study's folder."""
    try:
        rates = [(token.strip(), float(token)) for token in text.split(",") if token.strip()]
    except ValueError:
        raise SystemExit(f"--lrs must be comma-separated numbers, got {text!r}") from None
    if not rates or any(not rate > 0 for _, rate in rates) or len({t for t, _ in rates}) != len(rates):
        raise SystemExit(f"--lrs must name distinct positive learning rates, got {text!r}")
    return rates


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_known_warnings()
    rates = _learning_rates(args.lrs)
    out_dir = Path(args.out_dir)
    if len(rates) == 1 and not args.combine_only:
        return run_study(args, rates[0][1], out_dir)
    if args.first_update:
        raise SystemExit("--first-update trains nothing: give it one learning rate")
    if not args.combine_only:
        for token, rate in rates:
            print(f"[study] learning rate {token}", flush=True)
            run_study(args, rate, out_dir / f"lr{token}")
    from cw_verl.demo.sweep import combine

    table, figure = combine(out_dir, [token for token, _ in rates])
    print()
    print(table)
    print(f"\n[study] {out_dir / 'stability.md'}; figure {figure}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
