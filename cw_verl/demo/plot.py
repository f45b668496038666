"""``python -m cw_verl plot <jsonl...> --out fig.png``: the paper's figures from verl run logs.

Reads the JSONL of verl's ``file`` logger (``trainer.logger=[...,file]``) of any number of runs (a
cluster run or the CPU demo alike) and draws:

- policy entropy vs step (``actor/entropy``), the paper's Fig. 1;
- reward vs step (``critic/score/mean``), with held-out accuracy where the run logged it;
- the token covariance at the paper's Table 1 percentiles (``actor/cw/cov_{pos,neg}_top_*``, logged
  by the ``cw_grpo`` policy loss; averaged over steps), the data behind Fig. 3;
- CW-GRPO's weight statistics over training (``actor/cw/frac_below_half``, ``weight_min``/``max``).

Panels whose metrics no run logged say so instead of staying silently empty.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from cw_verl.demo.runlog import (
    ENTROPY,
    REWARD,
    TABLE1_LEVELS,
    TABLE1_PERCENT,
    RunLog,
    RunLogError,
    held_out_key,
    read_jsonl,
)


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over the last ``window`` finite values (the first points use fewer)."""
    out, recent = [], []
    for value in values:
        if math.isfinite(value):
            recent.append(value)
            recent = recent[-window:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.4", wrap=True)


def _curve_panel(ax, runs, key, title, ylabel, window, colors) -> bool:
    drawn = False
    for run in runs:
        steps, values = run.series(key)
        if not steps:
            continue
        color = colors[run.name]
        if window > 1:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(values, window), color=color, linewidth=2.0, label=run.name)
        drawn = True
    ax.set_title(title)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="best", fontsize=9)
    else:
        _note(ax, f"no run logged {key}")
    return drawn


def _reward_panel(ax, runs, window, colors) -> None:
    _curve_panel(ax, runs, REWARD, f"Reward ({REWARD}, moving avg {window})", "mean reward", window, colors)
    held_out = {run.name: run.series(held_out_key(run), min_step=0) for run in runs}
    for run in runs:
        steps, values = held_out[run.name]
        if steps:
            ax.plot(
                steps, values, linestyle="none", marker="D", markersize=7, color=colors[run.name], markeredgecolor="k"
            )
    if any(steps for steps, _ in held_out.values()):
        ax.plot([], [], linestyle="none", marker="D", color="0.6", markeredgecolor="k", label="held-out accuracy")
        ax.legend(loc="best", fontsize=9)


def _covariance_panel(ax, runs, colors) -> None:
    ax.set_title("Token covariance at Table 1 percentiles (mean over steps)")
    ax.set_xlabel("top percentile of tokens (by covariance value)")
    ax.set_ylabel("covariance  (logp - mean)(A - mean A)")
    drawn = False
    for run in runs:
        for side, marker, style in (("pos", "o", "-"), ("neg", "s", "--")):
            xs, ys = [], []
            for level in TABLE1_LEVELS:
                _, values = run.series(f"actor/cw/cov_{side}_top_{level}")
                values = [v for v in values if math.isfinite(v)]
                if values:
                    xs.append(TABLE1_PERCENT[level])
                    ys.append(sum(values) / len(values))
            if xs:
                label = f"{run.name} {'positive' if side == 'pos' else 'negative'}"
                ax.plot(xs, ys, marker=marker, linestyle=style, color=colors[run.name], label=label)
                offset = (4, 5) if side == "pos" else (4, -12)
                for x, y in zip(xs, ys, strict=True):
                    ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=offset, fontsize=8)
                drawn = True
    ax.set_xscale("log")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="best", fontsize=8)
    else:
        _note(ax, "no actor/cw/cov_* metrics\n(the cw_grpo policy loss logs them)")


def _weights_panel(ax, runs, window, colors) -> None:
    ax.set_title("CW-GRPO token weights")
    ax.set_xlabel("training step")
    ax.set_ylabel("share of tokens with weight < 0.5")
    drawn = False
    twin = None
    for run in runs:
        steps, below = run.series("actor/cw/frac_below_half")
        if not steps:
            continue
        color = colors[run.name]
        ax.plot(steps, smooth(below, window), color=color, linewidth=2.0, label=f"{run.name}: w < 0.5 (left)")
        w_steps, w_min = run.series("actor/cw/weight_min")
        m_steps, w_max = run.series("actor/cw/weight_max")
        if w_steps or m_steps:
            twin = twin or ax.twinx()
            twin.plot(w_steps, smooth(w_min, window), color=color, linestyle=":", label=f"{run.name}: min w (right)")
            twin.plot(m_steps, smooth(w_max, window), color=color, linestyle="--", label=f"{run.name}: max w (right)")
        drawn = True
    ax.grid(alpha=0.3)
    if not drawn:
        _note(ax, "no actor/cw/* weight metrics\n(the cw_grpo policy loss logs them)")
        return
    ax.yaxis.set_major_formatter(_percent_formatter())
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:
        # verl averages each loss call's min/max over micro-batches and ranks, then takes the
        # min/max over mini-batches (reduce_metrics goes by the key name).
        twin.set_ylabel("normalised weight: min / max per loss call")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="center right", fontsize=8)


def _percent_formatter():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0)


def report(jsonl_by_arm: dict, out: str | Path, steps: int, title: str):
    """Each arm's run log read, summarised over its first and last ``window`` steps, and drawn.

    Args:
        jsonl_by_arm: arm name -> path of the run's JSONL metrics log.
        out: where the figure goes.
        steps: steps per run (the window is a fifth of them, at most 10).
        title: the figure's title.

    Returns:
        ``(runs, window, summaries, figure)``: the :class:`RunLog` of each arm, the window, each arm's
        :func:`summarize` with NaN as ``None`` (JSON has no NaN), and the figure's path.
    """
    from cw_verl.demo import runlog

    runs = [runlog.read_jsonl(path, name) for name, path in jsonl_by_arm.items()]
    window = min(10, max(1, steps // 5))
    summaries = {run.name: runlog.summarize(run, window=window) for run in runs}
    figure = draw(runs, out, window=window, title=title)
    return runs, window, summaries, figure


def json_safe(summary: dict) -> dict:
    """``summary`` with NaN values as ``None``."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}


def draw(runs: list[RunLog], out: str | Path, window: int = 10, title: str | None = None) -> Path:
    """Write the figure for ``runs`` to ``out`` (PNG, or any format matplotlib infers from the name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {run.name: palette[i % len(palette)] for i, run in enumerate(runs)}
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    _curve_panel(
        axes[0, 0],
        runs,
        ENTROPY,
        f"Policy entropy during training (cf. paper Fig. 1; moving avg {window})",
        "token-mean entropy of sampled responses",
        window,
        colors,
    )
    _reward_panel(axes[0, 1], runs, window, colors)
    _covariance_panel(axes[1, 0], runs, colors)
    _weights_panel(axes[1, 1], runs, window, colors)
    if title:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cw_verl plot",
        description="Entropy, reward and covariance figure from verl file-logger JSONL files.",
    )
    parser.add_argument("jsonl", nargs="+", help="metrics files written by verl's `file` logger, one per run")
    parser.add_argument("--out", required=True, help="output image (e.g. fig.png)")
    parser.add_argument("--labels", help="comma-separated run names (default: file names without .jsonl)")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window for reward/weights (steps)")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [Path(p).stem for p in args.jsonl]
    if len(labels) != len(args.jsonl):
        parser.error(f"--labels has {len(labels)} names for {len(args.jsonl)} files")
    if len(set(labels)) != len(labels):
        parser.error(f"run names must be distinct, got {labels}; pass --labels")
    if args.smooth < 1:
        parser.error("--smooth must be >= 1")
    try:
        runs = [read_jsonl(path, name) for path, name in zip(args.jsonl, labels, strict=True)]
    except (OSError, RunLogError) as error:
        print(f"error: {error}")
        return 2
    out = draw(runs, args.out, window=args.smooth, title=args.title)
    print(f"wrote {out}")
    return 0
