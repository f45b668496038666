"""``python -m cw_verl study --lrs ...``: the sweep's table and figure, from study folders written here."""

import json
import shutil
from pathlib import Path

import pytest

from cw_verl.demo import study
from cw_verl.demo.runlog import read_jsonl, summarize

FIXTURES = Path(__file__).parent / "fixtures"


def fake_study(folder: Path, seeds: list[int], scale: float) -> None:
    """A study folder as ``run_study`` leaves it, from the fixture logs with the kernel shares added."""
    per_seed = {"grpo": [], "cw_grpo": []}
    for seed in seeds:
        for arm in per_seed:
            target = folder / f"seed{seed}" / f"{arm}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            lines = []
            for line in (FIXTURES / f"{arm}.jsonl").read_text().splitlines():
                row = json.loads(line)
                if row["step"] > 0:
                    row["data"]["probe/kernel/pos_below_half"] = scale * (seed + 1) / 10
                    row["data"]["probe/kernel/neg_below_half"] = scale * (seed + 1) / 20
                lines.append(json.dumps(row))
            shutil.copyfile(FIXTURES / f"{arm}.jsonl", target)
            target.write_text("\n".join(lines) + "\n")
            per_seed[arm].append(summarize(read_jsonl(target, arm), window=2))
    report = {
        "seeds": seeds,
        "steps": 10,
        "loss_agg_mode": "token-mean",
        "lr": 0.0,
        "mini_batches_per_step": 1,
        "world_size": 2,
        "per_seed": per_seed,
        "aggregate": {arm: study.aggregate(rows) for arm, rows in per_seed.items()},
    }
    (folder / "study.json").write_text(json.dumps(report))


def test_combine_only_tabulates_and_draws_every_rate_and_arm(tmp_path, capsys):
    fake_study(tmp_path / "lr1e-4", [0, 1], scale=1.0)
    fake_study(tmp_path / "lr1e-3", [0, 1], scale=2.0)
    assert study.main(["--combine-only", "--lrs", "1e-4,1e-3", "--out-dir", str(tmp_path)]) == 0
    table = (tmp_path / "stability.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 1e-")]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| 1e-4", "grpo"],
        ["| 1e-4", "cw_grpo"],
        ["| 1e-3", "grpo"],
        ["| 1e-3", "cw_grpo"],
    ]
    # Seed shares 0.1 and 0.2 (scale 1), 0.2 and 0.4 (scale 2): mean, sample std, range.
    assert "15.0% ± 7.1% (10.0%–20.0%)" in rows[0] and "30.0% ± 14.1% (20.0%–40.0%)" in rows[2]
    assert "seeds 0, 1; 10 steps, 1 mini-batch(es) per step, loss_agg_mode token-mean" in table
    assert (tmp_path / "stability.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "stability.json").read_text()).keys() == {"1e-4", "1e-3"}
    assert "stability.md" in capsys.readouterr().out


def test_combine_only_names_a_missing_study(tmp_path):
    fake_study(tmp_path / "lr1e-4", [0], scale=1.0)
    with pytest.raises(SystemExit, match=r"no study for lr 3e-4: .*lr3e-4/study.json is missing"):
        study.main(["--combine-only", "--lrs", "1e-4,3e-4", "--out-dir", str(tmp_path)])


@pytest.mark.parametrize("text", ["", "1e-4,abc", "1e-4,1e-4", "0", "-1e-3"])
def test_learning_rates_must_be_distinct_positive_numbers(text):
    with pytest.raises(SystemExit, match="--lrs must"):
        study.main(["--combine-only", f"--lrs={text}"])
