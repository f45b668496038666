"""The plot command and the run-log reader, on JSONL recorded from a real demo run."""

import json
import math
from pathlib import Path

import pytest

from cw_verl.demo import plot
from cw_verl.demo.runlog import RunLogError, format_table, held_out_key, read_jsonl, summarize

FIXTURES = Path(__file__).parent / "fixtures"
GRPO, CW = FIXTURES / "grpo.jsonl", FIXTURES / "cw_grpo.jsonl"


def _raw(path):
    """The fixture parsed without the code under test: {step: merged data}."""
    rows = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        rows.setdefault(record["step"], {}).update(record["data"])
    return rows


def test_plot_command_draws_both_runs(tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "figure.png"
    assert plot.main([str(GRPO), str(CW), "--out", str(out), "--smooth", "3", "--title", "fixture"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (1540, 1045)


def test_plot_command_copes_with_runs_without_cw_metrics(tmp_path):
    assert plot.main([str(GRPO), "--out", str(tmp_path / "grpo_only.png")]) == 0


def test_plot_command_reports_bad_input(tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1, "data": {"actor/entropy": 0.5}}\nnot json\n')
    assert plot.main([str(broken), "--out", str(tmp_path / "x.png")]) == 2
    assert "broken.jsonl:2" in capsys.readouterr().out
    assert plot.main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.png")]) == 2
    with pytest.raises(SystemExit):
        plot.main([str(GRPO), str(CW), "--labels", "one", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):
        plot.main([str(GRPO), str(GRPO), "--out", str(tmp_path / "x.png")])  # two runs named "grpo"


def test_read_jsonl_merges_lines_of_a_step_and_rejects_other_shapes(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text(
        '{"step": 0, "data": {"val": 0.25}}\n'
        '{"step": 1, "data": {"a": 1, "table": "text is skipped"}}\n'
        '{"step": 1, "data": {"val": 0.5}}\n'
    )
    run = read_jsonl(path)
    assert run.rows == {0: {"val": 0.25}, 1: {"a": 1.0, "val": 0.5}}
    assert run.series("val") == ([1], [0.5])
    assert run.series("val", min_step=0) == ([0, 1], [0.25, 0.5])
    path.write_text('{"step": "1", "data": {}}\n')
    with pytest.raises(RunLogError, match="integer"):
        read_jsonl(path)
    path.write_text('{"metrics": {}}\n')
    with pytest.raises(RunLogError, match="file logger"):
        read_jsonl(path)


def test_summary_matches_the_recorded_metrics():
    for path in (GRPO, CW):
        raw = _raw(path)
        steps = sorted(s for s in raw if s > 0)
        reward = [raw[s]["critic/score/mean"] for s in steps]
        entropy = [raw[s]["actor/entropy"] for s in steps]
        summary = summarize(read_jsonl(path), window=3)
        assert summary["steps"] == len(steps) == 8
        assert summary["reward_start"] == pytest.approx(sum(reward[:3]) / 3)
        assert summary["reward_end"] == pytest.approx(sum(reward[-3:]) / 3)
        assert (summary["entropy_min"], summary["entropy_max"]) == (min(entropy), max(entropy))
        assert summary["val_start"] == raw[0]["val-core/digit_reversal/acc/mean@1"]
        assert summary["val_end"] == raw[steps[-1]]["val-core/digit_reversal/acc/mean@1"]
        seconds = [raw[s]["timing_s/step"] for s in steps]
        assert summary["seconds_per_step"] == pytest.approx(sum(seconds) / len(seconds))
        if path == CW:
            below = [raw[s]["actor/cw/frac_below_half"] for s in steps]
            assert summary["frac_below_half"] == pytest.approx(sum(below) / len(below))
            for side in ("pos", "neg"):
                tail = [raw[s][f"actor/cw/cov_{side}_top_0.01pct"] for s in steps]
                assert summary[f"cov_{side}_top"] == pytest.approx(sum(tail) / len(tail))
            assert summary["cov_pos_top"] > 0 > summary["cov_neg_top"]
        else:
            assert math.isnan(summary["frac_below_half"]) and math.isnan(summary["cov_pos_top"])


def test_table_lists_every_arm_and_marks_missing_values():
    table = format_table({"grpo": summarize(read_jsonl(GRPO)), "cw_grpo": summarize(read_jsonl(CW))})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].split()[0] == "grpo" and lines[3].split()[0] == "cw_grpo"
    assert "n/a" in lines[2] and "n/a" not in lines[3]


def test_held_out_accuracy_is_mean_at_n_for_n_validation_samples(tmp_path):
    mean8, best8 = "val-core/digit_reversal/acc/mean@8", "val-core/digit_reversal/acc/best@8/mean"
    rows = [{mean8: 0.25, best8: 0.9}, {"critic/score/mean": 0.5}, {"critic/score/mean": 0.5, mean8: 0.5}]
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps({"step": step, "data": row}) + "\n" for step, row in enumerate(rows)))
    run = read_jsonl(path)
    assert held_out_key(run) == mean8
    summary = summarize(run, window=1)
    assert (summary["val_start"], summary["val_end"]) == (0.25, 0.5)
    assert held_out_key(read_jsonl(GRPO)) == "val-core/digit_reversal/acc/mean@1"
    path.write_text(json.dumps({"step": 0, "data": {mean8: 0.25, "val-core/digit_reversal/acc/mean@4": 0.2}}))
    with pytest.raises(RunLogError, match="several held-out accuracy keys"):
        held_out_key(read_jsonl(path))


def test_summary_reads_the_harness_pass_at_k_and_selected_tokens(tmp_path):
    pass1, pass8, selected = (
        "val-aux/digit_reversal/pass@1",
        "val-aux/digit_reversal/pass@8",
        "probe/cov_select/selected_per_step",
    )
    rows = [{pass1: 0.25, pass8: 0.5}, {selected: 10.0}, {selected: 13.0, pass1: 0.375, pass8: 0.875}]
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps({"step": step, "data": row}) + "\n" for step, row in enumerate(rows)))
    summary = summarize(read_jsonl(path), window=1)
    assert (summary["pass@1_start"], summary["pass@1_end"]) == (0.25, 0.375)
    assert (summary["pass@8_start"], summary["pass@8_end"]) == (0.5, 0.875)
    assert summary["selected_per_step"] == 11.5
    assert math.isnan(summarize(read_jsonl(GRPO))["selected_per_step"])
    assert not any(key.startswith("pass@") for key in summarize(read_jsonl(GRPO)))


def test_table_shows_pass_at_k_when_the_summaries_carry_it():
    summaries = {"grpo": summarize(read_jsonl(GRPO)), "cw_grpo": summarize(read_jsonl(CW))}
    assert "pass@" not in format_table(summaries)
    summaries["grpo"].update({"pass@1_start": 0.125, "pass@8_end": 0.75})
    header, _, grpo, cw = format_table(summaries).splitlines()
    order = ["val acc end", "pass@1 start", "pass@1 end", "pass@8 start", "pass@8 end", "entropy min"]
    assert [header.index(title) for title in order] == sorted(header.index(title) for title in order)
    assert "0.125" in grpo and "0.750" in grpo and cw.count("n/a") >= 2


def test_smooth_is_a_trailing_mean_that_skips_nan():
    assert plot.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    out = plot.smooth([math.nan, 2.0, math.nan, 4.0], 3)
    assert math.isnan(out[0]) and out[1:] == [2.0, 2.0, 3.0]
