"""``python -m cw_verl study``: the seed aggregation and table (fast), and a one-seed smoke run of the GRPO and
cw_grpo_authors arms on verl's FSDP2 actor (e2e): the GRPO arm logs the Table 1 covariance statistics
without weighting anything, and the authors' arm logs the weights' own gradient term at step 1."""

import json
import math

import pytest

from cw_verl.demo import study
from cw_verl.demo.runlog import read_jsonl


def test_aggregate_gives_mean_spread_and_range_over_seeds():
    per_seed = [{"reward_end": 0.5, "x": math.nan}, {"reward_end": 0.7, "x": math.nan}, {"reward_end": 0.9, "x": 2.0}]
    stats = study.aggregate(per_seed)
    assert stats["reward_end"]["mean"] == pytest.approx(0.7)
    assert stats["reward_end"]["std"] == pytest.approx(0.2)
    assert (stats["reward_end"]["min"], stats["reward_end"]["max"], stats["reward_end"]["seeds"]) == (0.5, 0.9, 3)
    assert stats["x"] == {"mean": 2.0, "std": 0.0, "min": 2.0, "max": 2.0, "seeds": 1}


def test_table_has_a_row_per_arm_and_marks_missing_metrics():
    keys = [key for _, key, _ in study.COLUMNS]
    present = {key: {"mean": 0.5, "std": 0.1, "min": 0.4, "max": 0.6, "seeds": 3} for key in keys}
    missing = dict(present, weights_grad_rel_norm={"mean": math.nan, "std": math.nan, "min": 0, "max": 0, "seeds": 0})
    table = study.format_table({"cw_grpo_authors": present, "grpo": missing}, [0, 1, 2])
    lines = table.splitlines()
    assert lines[2].startswith("| cw_grpo_authors | 0.500 ± 0.100 (0.400–0.600)")
    column = lines[0].split(" | ").index("weights' grad term / rest, step 1")
    assert lines[3].split(" | ")[column] == "–" and lines[2].split(" | ")[column] != "–"
    assert "3 seed(s): 0, 1, 2" in table
    # A column no arm logged is left out; pass@k columns (k > 1) follow the held-out accuracy.
    nothing = {"mean": math.nan, "std": math.nan, "min": 0, "max": 0, "seeds": 0}
    with_pass = dict(
        present, selected_per_step=nothing, **{"pass@8_start": present["val_end"], "pass@8_end": present["val_end"]}
    )
    header = study.format_table({"grpo": with_pass}, [0]).splitlines()[0]
    assert "selected per step" not in header
    header = header.split(" | ")
    assert header.index("held-out acc. end") + 1 == header.index("pass@8 start")


def test_seed_table_has_every_seed_of_every_arm():
    def seed(val_start, val_end, entropy, selected=math.nan):
        return {
            "val_start": val_start,
            "val_end": val_end,
            "entropy_end": entropy,
            "selected_per_step": selected,
            "pass@1_end": val_end,
            "pass@8_end": 0.9,
        }

    runs = {
        "grpo": [seed(0.2, 0.5, 0.3), seed(0.4, 0.6, 0.2)],
        "kl_cov": [seed(0.2, 0.4, 0.35, 16), seed(0.4, 0.5, 0.3, 14)],
    }
    lines = study.format_seed_table(runs, [0, 1], window=6).splitlines()
    assert lines[0] == "| arm | seed 0 | seed 1 |"
    assert lines[2] == "| grpo | 0.200 -> 0.500, pass@8 0.900, H 0.300 | 0.400 -> 0.600, pass@8 0.900, H 0.200 |"
    assert lines[3].endswith("| 0.400 -> 0.500, pass@8 0.900, H 0.300, sel 14.0 |")


@pytest.mark.e2e
def test_smoke_study_on_two_arms(tmp_path):
    argv = ["--smoke", "--arms", "grpo,cw_grpo_authors", "--kl-coef", "0.04", "--out-dir", str(tmp_path)]
    assert study.main(argv) == 0
    report = json.loads((tmp_path / "study.json").read_text())
    assert report["seeds"] == [0] and report["loss_agg_mode"] == "seq-mean-token-mean"
    assert report["kl_coef"] == 0.04
    for arm in ("grpo", "cw_grpo_authors"):
        # verl's KL loss to the frozen starting policy (low_var_kl: never negative), moving away from it.
        steps, kl = read_jsonl(tmp_path / "seed0" / f"{arm}.jsonl").series("actor/kl_loss")
        assert steps == [1, 2, 3] and min(kl) >= 0 and kl[-1] > kl[0], (arm, kl)
    authors = report["per_seed"]["cw_grpo_authors"][0]
    assert math.isfinite(authors["weights_grad_rel_norm"]) and authors["weights_grad_rel_norm"] > 0
    assert math.isfinite(authors["frac_below_half"])
    grpo = read_jsonl(tmp_path / "seed0" / "grpo.jsonl")
    keys = grpo.keys()
    assert "actor/cw/cov_pos_top_1pct" in keys and "actor/cw/sigma" in keys
    assert "actor/cw/weight_mean" not in keys  # observed only: GRPO's update has no weights
    # What the kernel would do to each side of GRPO's covariance, also observed only.
    assert {"probe/kernel/pos_below_half", "probe/kernel/neg_below_half"} <= set(keys)
    assert 0.0 <= report["per_seed"]["grpo"][0]["pos_below_half"] <= 1.0
    cosine = read_jsonl(tmp_path / "seed0" / "cw_grpo_authors.jsonl").series("actor/cw/weights_grad_cosine")[1]
    assert len(cosine) == 1 and -1.0 <= cosine[0] <= 1.0
