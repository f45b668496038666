"""Held-out pass@k from verl's validation dumps (``trainer.validation_data_dir``).

verl's own ``best@k`` validation metric is a bootstrap over resamples with replacement, which understates
pass@k when k equals the samples drawn; this reads the dumped samples instead and applies the unbiased
estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on Code", eq. 1): with n samples
of a problem of which c are correct, pass@k = 1 - C(n - c, k) / C(n, k), averaged over problems.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """Probability that at least one of ``k`` samples drawn without replacement from ``samples`` is correct."""
    if not 0 <= correct <= samples or not 1 <= k <= samples:
        raise ValueError(f"need 0 <= correct <= samples and 1 <= k <= samples, got {correct=}, {samples=}, {k=}")
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def dump_pass_at_k(path: str | Path, ks: tuple[int, ...]) -> dict[int, float]:
    """``{k: pass@k}`` over the problems of one validation dump (one JSON object per sample).

    Samples are grouped by their prompt (``input``); a sample is correct when its ``acc`` (or, without one,
    its ``score``) is positive. A prompt that appears twice in the held-out set pools its samples, which
    leaves the estimator unbiased.
    """
    outcomes: dict[str, list[bool]] = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        if line.strip():
            sample = json.loads(line)
            outcomes[sample["input"]].append(float(sample["acc"] if "acc" in sample else sample["score"]) > 0)
    if not outcomes:
        raise ValueError(f"{path}: no validation samples")
    fewest = min(len(values) for values in outcomes.values())
    if max(ks) > fewest:
        raise ValueError(f"{path}: pass@{max(ks)} needs at least {max(ks)} samples per prompt, some have {fewest}")
    return {k: sum(pass_at_k(len(values), sum(values), k) for values in outcomes.values()) / len(outcomes) for k in ks}


def run_pass_at_k(dump_dir: str | Path, ks: tuple[int, ...]) -> dict[int, dict[int, float]]:
    """``{step: {k: pass@k}}`` for every validation dump ``<step>.jsonl`` verl wrote into ``dump_dir``."""
    dumps = sorted(Path(dump_dir).glob("*.jsonl"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
    return {int(p.stem): dump_pass_at_k(p, ks) for p in dumps if p.stem.isdigit()}
