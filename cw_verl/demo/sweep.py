"""A learning-rate sweep of ``python -m cw_verl study`` (``--lrs``): one table and one figure across the rates.

Each rate's study lies in ``OUT_DIR/lr<rate>`` (its ``study.json`` and every seed's and arm's JSONL). The
table gives, per rate and arm, the seeds' mean ± std (min–max) of held-out accuracy at the start and end,
the entropy at the end and its maximum, and the share of the positive- and negative-covariance tokens that
CW-GRPO's kernel weighs below one half (:func:`cw_verl.demo.probes.kernel_tails`, observed on every arm).
The figure has a column per rate: entropy (paper Fig. 1), held-out accuracy, and the two shares (the seeds'
mean, as a moving average over 5 steps); entropy and accuracy draw each seed thin and their mean thick.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cw_verl.demo import runlog
from cw_verl.demo.plot import smooth

SMOOTH_STEPS = 5

COLUMNS = (
    ("held-out acc. start", "val_start", "{:.3f}"),
    ("held-out acc. end", "val_end", "{:.3f}"),
    ("entropy, last {window}", "entropy_end", "{:.3f}"),
    ("entropy max", "entropy_max", "{:.3f}"),
    ("c>0 tokens w~ < 0.5", "pos_below_half", "{:.1%}"),
    ("c<0 tokens w~ < 0.5", "neg_below_half", "{:.1%}"),
)


def _cell(stats: dict, fmt: str) -> str:
    if not stats["seeds"]:
        return "–"
    mean, std, low, high = (fmt.format(stats[k]) for k in ("mean", "std", "min", "max"))
    return f"{mean} ± {std} ({low}–{high})"


def format_sweep_table(studies: dict[str, dict]) -> str:
    """Markdown: a row per learning rate and arm, from each rate's ``study.json``."""
    first = next(iter(studies.values()))
    window = min(10, max(1, first["steps"] // 5))
    header = ["lr", "arm"] + [title.format(window=window) for title, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for token, study in studies.items():
        for arm, stats in study["aggregate"].items():
            lines.append("| " + " | ".join([token, arm] + [_cell(stats[key], fmt) for _, key, fmt in COLUMNS]) + " |")
    seeds = ", ".join(map(str, first["seeds"]))
    lines.append(
        f"\nseeds {seeds}; {first['steps']} steps, {first['mini_batches_per_step']} mini-batch(es) per step, "
        f"loss_agg_mode {first['loss_agg_mode']}, {first['world_size']} gloo ranks; mean ± sample std (min–max)."
    )
    return "\n".join(lines)


def _mean_curve(curves: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    """Per step, the mean of the finite values the seeds logged there."""
    by_step: dict[int, list[float]] = {}
    for steps, values in curves:
        for step, value in zip(steps, values, strict=True):
            if math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def draw_sweep(logs: dict[str, dict[str, list[runlog.RunLog]]], out: Path) -> Path:
    """``logs[rate][arm]``: the seeds' run logs. A column per rate; rows: entropy, held-out accuracy, and the
    kernel's share of the positive (solid) and negative (dashed) covariance tokens below one half."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(logs)
    arms = list(next(iter(logs.values())))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {arm: palette[i % len(palette)] for i, arm in enumerate(arms)}
    fig, axes = plt.subplots(3, len(rates), figsize=(5.2 * len(rates), 11), squeeze=False, sharey="row")
    # None: each run's own held-out key (mean@N for its N samples per problem).
    rows = (
        (runlog.ENTROPY, 1, "policy entropy"),
        (None, 0, "held-out accuracy"),
    )
    for column, rate in enumerate(rates):
        for row, (key, min_step, label) in enumerate(rows):
            ax = axes[row, column]
            for arm in arms:
                curves = [run.series(key or runlog.held_out_key(run), min_step=min_step) for run in logs[rate][arm]]
                for steps, values in curves:
                    ax.plot(steps, values, color=colors[arm], alpha=0.25, linewidth=0.8)
                # Held-out accuracy is measured at the start and the end only: markers, not a trajectory.
                marker = "o" if key is None else None
                ax.plot(*_mean_curve(curves), color=colors[arm], linewidth=2.0, label=arm, marker=marker)
            ax.set_title(f"lr {rate}: {label}")
            ax.set_xlabel("step")
        ax = axes[2, column]
        for arm in arms:
            for key, style in ((runlog.KERNEL_POS_BELOW_HALF, "-"), (runlog.KERNEL_NEG_BELOW_HALF, "--")):
                curves = [run.series(key) for run in logs[rate][arm]]
                steps, mean = _mean_curve(curves)
                # A step whose rewards barely vary leaves few tokens on a side: its share is noise, smoothed.
                ax.plot(steps, smooth(mean, SMOOTH_STEPS), color=colors[arm], linestyle=style, linewidth=1.6)
        ax.set_title(f"lr {rate}: w~ < 0.5, c>0 solid, c<0 dashed")
        ax.set_xlabel("step")
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(xmax=1.0))
    axes[0, 0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def combine(out_dir: Path, rates: list[str]) -> tuple[str, Path]:
    """The sweep's table (``stability.md``, with the studies in ``stability.json``) and figure
    (``stability.png``) from the studies in ``out_dir/lr<rate>``; returns the table and the figure's path."""
    studies, logs = {}, {}
    for rate in rates:
        folder = out_dir / f"lr{rate}"
        try:
            study = json.loads((folder / "study.json").read_text())
        except FileNotFoundError:
            raise SystemExit(f"no study for lr {rate}: {folder / 'study.json'} is missing") from None
        studies[rate] = study
        logs[rate] = {
            arm: [runlog.read_jsonl(folder / f"seed{seed}" / f"{arm}.jsonl", arm) for seed in study["seeds"]]
            for arm in study["aggregate"]
        }
    table = format_sweep_table(studies)
    (out_dir / "stability.md").write_text(table + "\n")
    (out_dir / "stability.json").write_text(json.dumps(studies, indent=2))
    return table, draw_sweep(logs, out_dir / "stability.png")
