"""``python -m cw_verl trainer-demo`` (``make demo``): GRPO vs CW-GRPO through verl's real trainer on CPU.

For each arm, runs ``recipes/run_cwgrpo_tiny_cpu.sh`` -- ``python -m verl.trainer.main_ppo`` with Ray,
vLLM's CPU build for the rollouts and the FSDP2 actor on 2 gloo ranks, the same ``recipes/common.sh``
as the paper's runs -- from the same warm-started tiny model, seed, prompts and budget; then draws the
figure (:mod:`cw_verl.demo.plot`) and prints the summary table from the runs' metrics JSONL, plus
verl's per-phase step times and each run's peak memory (from :mod:`cw_verl.cpu.supervise`). The GRPO arm
trains with ``loss_mode=vanilla_cw_metrics`` (verl's vanilla loss, plus the covariance percentiles, so Table 1
is drawn for both arms); validation samples several answers per held-out prompt at the rollout temperature
and verl dumps them, from which :mod:`cw_verl.demo.passk` computes pass@k.

The harness demo (``python -m cw_verl demo``) trains the same task with HF sampling in place of vLLM
and no Ray, about ten times faster per step: the path for multi-seed studies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("grpo", "cw_grpo", "clip_cov", "clip_cov_minibatch", "kl_cov_minibatch")
# The Clip-Cov / KL-Cov arms' verl knob per arm (the --cov-ratio flag sets it).
COV_RATIO_KEYS = {
    "clip_cov": "clip_cov_ratio",
    "clip_cov_minibatch": "clip_cov_ratio",
    "kl_cov_minibatch": "kl_cov_ratio",
}
FIGURE_NAME = "cw_grpo_trainer_demo.png"
SUMMARY_NAME = "summary.json"
# verl's per-phase timers (timing_s/<phase>), in the order a step runs them.
PHASES = ("gen", "old_log_prob", "ref", "adv", "update_actor", "update_weights", "step")


def recipe_path() -> Path:
    path = Path(__file__).resolve().parents[2] / "recipes" / "run_cwgrpo_tiny_cpu.sh"
    if not path.is_file():
        raise SystemExit(f"{path} not found: the trainer demo runs the repository's recipes (use a clone of cw_verl)")
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cw_verl trainer-demo",
        description="GRPO vs CW-GRPO through verl's main_ppo (Ray, vLLM-cpu, FSDP2) on CPU; figure and table.",
    )
    p.add_argument("--out-dir", default="runs/trainer_demo", help="assets, metrics, logs and the figure go here")
    p.add_argument("--arms", default="grpo,cw_grpo", help=f"comma-separated, among {', '.join(ARMS)}")
    p.add_argument("--steps", type=int, default=30, help="training steps per arm")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (data.train_batch_size)")
    p.add_argument("--group-size", type=int, default=8, help="responses per prompt (rollout.n)")
    # 3e-4: GRPO's held-out accuracy rises on every seed of the harness sweep, and CW-GRPO is stable there; at
    # 1e-3 CW-GRPO's entropy runs away on every seed (docs/stability.md).
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--temperature", type=float, default=1.0, help="rollout temperature")
    p.add_argument("--ranks", type=int, default=2, help="actor ranks = vLLM servers (GPUS_PER_NODE)")
    # 64 x 8: 512 samples per validation, 12-14 s on a 2-core box (verl's agent loop costs 25-35 ms per sample there).
    p.add_argument("--val-prompts", type=int, default=64, help="held-out prompts (data.val_max_samples)")
    p.add_argument(
        "--val-samples", type=int, default=8, help="samples per held-out prompt at the rollout temperature: pass@1..k"
    )
    # The tiny task's steps have about a thousand valid tokens: the paper's 2e-4 would select one per step.
    p.add_argument(
        "--cov-ratio",
        type=float,
        default=0.02,
        help="the Clip-Cov / KL-Cov arms' clip_cov_ratio / kl_cov_ratio (share of tokens selected)",
    )
    p.add_argument("--smoke", action="store_true", help="3 steps per arm, to check the wiring")
    return p


def run_arm(arm: str, args, out_dir: Path) -> dict:
    """One ``main_ppo`` run through the tiny recipe; its output goes to ``<out_dir>/<arm>.log``."""
    metrics = out_dir / f"{arm}.jsonl"
    log = out_dir / f"{arm}.log"
    for stale in (metrics, out_dir / f"{arm}.run.json"):
        stale.unlink(missing_ok=True)
    for stale in validation_dir(out_dir, arm).glob("*.jsonl"):
        stale.unlink()
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        ARM=arm,
        TOTAL_STEPS=str(args.steps),
        TRAIN_BATCH_SIZE=str(args.prompts),
        N_GENERATIONS=str(args.group_size),
        LR=str(args.lr),
        MIN_LR=str(args.lr),
        TEMPERATURE=str(args.temperature),
        GPUS_PER_NODE=str(args.ranks),
        TINY_DIR=str(out_dir / "assets"),
        RUN_ROOT=str(out_dir / "runs"),
        PROJECT="trainer_demo",
        EXPERIMENT=arm,
        METRICS_FILE=str(metrics),
        # No checkpoints: each launch of the demo is a fresh run.
        SAVE_FREQ="-1",
        # GRPO's loss unchanged (bitwise), plus the covariance percentiles CW-GRPO logs: Table 1 for both arms.
        GRPO_LOSS_MODE="vanilla_cw_metrics",
    )
    command = [
        "bash",
        str(recipe_path()),
        "trainer.resume_mode=disable",
        *validation_overrides(args, out_dir, arm),
        *cov_ratio_overrides(args, arm),
    ]
    start = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        reported = 0
        while proc.poll() is None:
            time.sleep(2.0)
            reported = _report_progress(arm, metrics, args.steps, reported)
    _report_progress(arm, metrics, args.steps, reported)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(
            f"[demo] arm {arm}: the trainer failed with status {proc.returncode}; full log: {log}\n" + "\n".join(tail)
        )
    run_report = out_dir / f"{arm}.run.json"
    return {
        "jsonl": str(metrics),
        "log": str(log),
        "wall_seconds": time.perf_counter() - start,
        "run": json.loads(run_report.read_text()) if run_report.is_file() else {},
    }


def validation_overrides(args, out_dir: Path, arm: str) -> list[str]:
    """Held-out validation at the rollout temperature, ``--val-samples`` per prompt, each sample dumped (pass@k)."""
    return [
        f"data.val_max_samples={args.val_prompts}",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
        f"actor_rollout_ref.rollout.val_kwargs.n={args.val_samples}",
        f"actor_rollout_ref.rollout.val_kwargs.temperature={args.temperature}",
        "actor_rollout_ref.rollout.val_kwargs.top_p=1.0",
        f"trainer.validation_data_dir={validation_dir(out_dir, arm)}",
    ]


def cov_ratio_overrides(args, arm: str) -> list[str]:
    """The Clip-Cov / KL-Cov arms' selection ratio (``--cov-ratio``); nothing for the other arms."""
    key = COV_RATIO_KEYS.get(arm)
    return [f"actor_rollout_ref.actor.policy_loss.{key}={args.cov_ratio}"] if key else []


def validation_dir(out_dir: Path, arm: str) -> Path:
    return out_dir / f"{arm}_validation"


def pass_at_k_summary(dump_dir: Path, ks: tuple[int, ...]) -> dict[str, float]:
    """``pass@k_start`` / ``pass@k_end``: held-out pass@k before training and after the last step."""
    from cw_verl.demo.passk import run_pass_at_k

    by_step = run_pass_at_k(dump_dir, ks)
    last = max((step for step in by_step if step > 0), default=None)
    out = {}
    for k in ks:
        out[f"pass@{k}_start"] = by_step[0][k] if 0 in by_step else math.nan
        out[f"pass@{k}_end"] = by_step[last][k] if last is not None else math.nan
    return out


def _report_progress(arm: str, metrics: Path, steps: int, reported: int) -> int:
    if not metrics.is_file():
        return reported
    for line in metrics.read_text().splitlines()[reported:]:
        record = json.loads(line)
        data = record["data"]
        if "critic/score/mean" in data:
            print(
                f"[demo] {arm}: step {record['step']}/{steps}  reward {data['critic/score/mean']:.3f}  "
                f"entropy {data.get('actor/entropy', math.nan):.3f}  {data.get('timing_s/step', math.nan):.1f} s",
                flush=True,
            )
        reported += 1
    return reported


def phase_seconds(run) -> dict[str, float]:
    """Median seconds of each of verl's step phases, over steps after the first (which compiles and warms up)."""
    out = {}
    for phase in PHASES:
        steps, values = run.series(f"timing_s/{phase}", min_step=2)
        values = sorted(v for v in values if math.isfinite(v))
        out[phase] = values[len(values) // 2] if values else math.nan
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from cw_verl.demo import plot, runlog

    arms = [name.strip() for name in args.arms.split(",") if name.strip()]
    if not arms or len(set(arms)) != len(arms) or any(arm not in ARMS for arm in arms):
        raise SystemExit(f"--arms must name distinct arms among {', '.join(ARMS)}, got {args.arms!r}")
    if not 0 < args.cov_ratio <= 1:
        raise SystemExit(f"--cov-ratio must be in (0, 1], got {args.cov_ratio}")
    if args.val_prompts < 1 or args.val_samples < 1:
        raise SystemExit(
            f"--val-prompts and --val-samples must be at least 1, got {args.val_prompts}, {args.val_samples}"
        )
    if args.smoke:
        args.steps = min(args.steps, 3)
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {}
    for arm in arms:
        print(f"[demo] arm {arm}: python -m verl.trainer.main_ppo through {recipe_path().name}, {args.steps} steps")
        results[arm] = run_arm(arm, args, out_dir)

    runs, window, summaries, figure = plot.report(
        {arm: results[arm]["jsonl"] for arm in arms},
        out_dir / FIGURE_NAME,
        args.steps,
        f"verl main_ppo on CPU (Ray, vLLM-cpu, FSDP2 x {args.ranks}): digit reversal",
    )
    ks = tuple(sorted({1, args.val_samples}))
    for arm in arms:
        summaries[arm].update(pass_at_k_summary(validation_dir(out_dir, arm), ks))
    phases = {run.name: phase_seconds(run) for run in runs}
    total = time.perf_counter() - started
    summary = {
        "total_seconds": total,
        "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "arms": {
            arm: {
                **results[arm],
                "phase_seconds_median": phases[arm],
                **plot.json_safe(summaries[arm]),
            }
            for arm in arms
        },
        "figure": str(figure),
    }
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
    print()
    print(runlog.format_table(summaries, window=window))
    print()
    print("median seconds per step after step 1 (verl's timers), run wall time and peak memory:")
    for arm in arms:
        run = results[arm]["run"]
        times = "  ".join(f"{phase} {phases[arm][phase]:.2f}" for phase in PHASES)
        first_step = run.get("seconds_to_first_logged_step") or math.nan
        print(
            f"  {arm:>8}: {times}  | wall {results[arm]['wall_seconds']:.0f} s, first step after "
            f"{first_step:.0f} s, peak {run.get('peak_pss_gb', math.nan):.1f} GB"
        )
    print(f"\n[demo] figure: {figure}")
    print(f"[demo] metrics: {', '.join(results[arm]['jsonl'] for arm in arms)}")
    print(f"[demo] total wall time {total:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
