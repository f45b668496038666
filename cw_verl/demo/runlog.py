"""Read the JSONL that verl's ``file`` logger writes, and summarise a run.

``verl.utils.tracking.FileLogger`` writes one line per ``Tracking.log`` call:
``{"step": <int>, "data": {<metric>: <value>, ...}}``; a step can appear on several lines (verl logs
validation separately from training metrics), so lines are merged per step. The file goes to
``$VERL_FILE_LOGGER_PATH`` if set, else ``$VERL_FILE_LOGGER_ROOT/<project_name>/<experiment_name>.jsonl``
(root defaults to the working directory).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

# verl's metric keys, as its PPO trainer logs them.
REWARD = "critic/score/mean"
ENTROPY = "actor/entropy"
STEP_SECONDS = "timing_s/step"
VAL_ACC = "val-core/digit_reversal/acc/mean@1"
# With N validation samples per prompt (val_kwargs.n) verl logs mean@N: the accuracy over all samples.
VAL_ACC_ANY_N = re.compile(r"^val-core/digit_reversal/acc/mean@\d+$")
# The harness's held-out pass@k (cw_verl.demo.loop logs it; the trainer demo reads pass@k from verl's dumps).
PASS_AT_K_KEY = "val-aux/digit_reversal/pass@{k}"
PASS_AT_K = re.compile("^" + re.escape(PASS_AT_K_KEY.format(k="")) + r"(\d+)$")
# Tokens the Clip-Cov / KL-Cov arms selected per step, over all ranks (cw_verl.demo.loop logs it).
SELECTED = "probe/cov_select/selected_per_step"
CW_FRAC_BELOW_HALF = "actor/cw/frac_below_half"
# cw_verl.demo.probes.kernel_tails (the harness logs them for every arm)
KERNEL_POS_BELOW_HALF = "probe/kernel/pos_below_half"
KERNEL_NEG_BELOW_HALF = "probe/kernel/neg_below_half"
TABLE1_LEVELS = ("0.01pct", "1pct", "20pct", "40pct")
TABLE1_PERCENT = {"0.01pct": 0.01, "1pct": 1.0, "20pct": 20.0, "40pct": 40.0}


class RunLogError(ValueError):
    """A metrics file that is not what verl's file logger writes."""


@dataclass
class RunLog:
    """Metrics of one run: ``steps`` ascending, ``series[key]`` aligned to ``steps_of[key]``."""

    name: str
    path: Path
    rows: dict[int, dict[str, float]]

    @property
    def steps(self) -> list[int]:
        return sorted(self.rows)

    def keys(self) -> set[str]:
        return {key for row in self.rows.values() for key in row}

    def series(self, key: str, min_step: int = 1) -> tuple[list[int], list[float]]:
        """Steps >= ``min_step`` that logged ``key``, and its values there."""
        steps = [s for s in self.steps if s >= min_step and key in self.rows[s]]
        return steps, [self.rows[s][key] for s in steps]


def held_out_key(run: RunLog) -> str:
    """The run's held-out accuracy key: ``mean@N`` for its N validation samples per prompt (default ``mean@1``)."""
    keys = sorted(key for key in run.keys() if VAL_ACC_ANY_N.match(key))
    if len(keys) > 1:
        raise RunLogError(f"{run.path}: several held-out accuracy keys {keys}")
    return keys[0] if keys else VAL_ACC


def read_jsonl(path: str | Path, name: str | None = None) -> RunLog:
    path = Path(path)
    rows: dict[int, dict[str, float]] = {}
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RunLogError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("data"), dict) or "step" not in record:
                raise RunLogError(
                    f'{path}:{number}: expected {{"step": ..., "data": {{...}}}} as verl\'s file logger writes'
                )
            step = record["step"]
            if not isinstance(step, int) or isinstance(step, bool):
                raise RunLogError(f"{path}:{number}: step must be an integer, got {step!r}")
            merged = rows.setdefault(step, {})
            for key, value in record["data"].items():
                # Non-numeric entries (verl can log text tables) have no place on a curve.
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                merged[key] = float(value)
    if not rows:
        raise RunLogError(f"{path}: no metrics")
    return RunLog(name=name or path.stem, path=path, rows=rows)


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _mean(values: list[float]) -> float:
    values = _finite(values)
    return sum(values) / len(values) if values else math.nan


def _edge_mean(values: list[float], count: int, last: bool) -> float:
    """Mean of the first/last ``count`` finite values: single-step rewards are noisy at this batch size."""
    values = _finite(values)
    if not values:
        return math.nan
    part = values[-count:] if last else values[:count]
    return sum(part) / len(part)


def summarize(run: RunLog, window: int = 10) -> dict[str, float]:
    """The demo's summary numbers for one run (NaN where the run did not log the metric)."""
    _, reward = run.series(REWARD)
    _, entropy = run.series(ENTROPY)
    _, seconds = run.series(STEP_SECONDS)
    _, below_half = run.series(CW_FRAC_BELOW_HALF)
    val_steps, val = run.series(held_out_key(run), min_step=0)
    entropy_finite = _finite(entropy)
    return {
        "steps": float(len(run.series(REWARD)[0])),
        "reward_start": _edge_mean(reward, window, last=False),
        "reward_end": _edge_mean(reward, window, last=True),
        "val_start": val[0] if val_steps and val_steps[0] == 0 else math.nan,
        "val_end": val[-1] if val_steps and val_steps[-1] > 0 else math.nan,
        "entropy_min": min(entropy_finite) if entropy_finite else math.nan,
        "entropy_max": max(entropy_finite) if entropy_finite else math.nan,
        "entropy_end": _edge_mean(entropy, window, last=True),
        # Table 1's extreme tails (top 0.01% of each sign), mean over steps.
        "cov_pos_top": _mean(run.series(f"actor/cw/cov_pos_top_{TABLE1_LEVELS[0]}")[1]),
        "cov_neg_top": _mean(run.series(f"actor/cw/cov_neg_top_{TABLE1_LEVELS[0]}")[1]),
        "frac_below_half": _mean(below_half),
        "pos_below_half": _mean(run.series(KERNEL_POS_BELOW_HALF)[1]),
        "neg_below_half": _mean(run.series(KERNEL_NEG_BELOW_HALF)[1]),
        "seconds_per_step": _mean(seconds),
        "selected_per_step": _mean(run.series(SELECTED)[1]),
        **_pass_at_k(run),
    }


def _pass_at_k(run: RunLog) -> dict[str, float]:
    """``pass@k_start`` / ``pass@k_end`` from the run's held-out pass@k (step 0 and its last step)."""
    out = {}
    for key in sorted(run.keys()):
        match = PASS_AT_K.match(key)
        if match:
            steps, values = run.series(key, min_step=0)
            out[f"pass@{match[1]}_start"] = values[0] if steps[0] == 0 else math.nan
            out[f"pass@{match[1]}_end"] = values[-1] if steps[-1] > 0 else math.nan
    return out


def pass_at_k_orders(keys) -> list[int]:
    """Ascending, the ``k`` of every summary key ``pass@k_start`` / ``pass@k_end`` among ``keys``."""
    return sorted({int(key[len("pass@") :].split("_")[0]) for key in keys if key.startswith("pass@")})


def format_table(summaries: dict[str, dict[str, float]], window: int = 10) -> str:
    columns = [
        ("arm", None, "{}"),
        ("steps", "steps", "{:.0f}"),
        (f"reward first{window}", "reward_start", "{:.3f}"),
        (f"reward last{window}", "reward_end", "{:.3f}"),
        ("val acc start", "val_start", "{:.3f}"),
        ("val acc end", "val_end", "{:.3f}"),
        ("entropy min", "entropy_min", "{:.3f}"),
        ("entropy max", "entropy_max", "{:.3f}"),
        (f"entropy last{window}", "entropy_end", "{:.3f}"),
        ("cov +0.01%", "cov_pos_top", "{:.2f}"),
        ("cov -0.01%", "cov_neg_top", "{:.2f}"),
        ("CW w<0.5", "frac_below_half", "{:.2%}"),
        ("s/step", "seconds_per_step", "{:.2f}"),
    ]
    # Held-out pass@k after the held-out accuracy, when the caller added it to the summaries (cw_verl.demo.passk).
    ks = pass_at_k_orders(key for summary in summaries.values() for key in summary)
    columns[6:6] = [(f"pass@{k} {edge}", f"pass@{k}_{edge}", "{:.3f}") for k in ks for edge in ("start", "end")]

    def cell(fmt: str, value) -> str:
        if isinstance(value, float) and math.isnan(value):
            return "n/a"
        return fmt.format(value)

    rows = [[title for title, _, _ in columns]]
    for arm, summary in summaries.items():
        rows.append([arm if key is None else cell(fmt, summary.get(key, math.nan)) for _, key, fmt in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(width) for text, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
