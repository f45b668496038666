"""The demo end to end on 2 gloo ranks through verl's own TrainingWorker / FSDP2 engine / ppo_loss."""

import json
import math

import pytest
import torch

from cw_verl.cpu.launch import run_ranks
from cw_verl.demo import cli, probes
from cw_verl.demo.loop import VAL_KEY
from cw_verl.demo.runlog import PASS_AT_K_KEY, read_jsonl
from tests.demo import ranks

CW = "cw_grpo"
CW_KEYS = [f"actor/cw/{name}" for name in ("sigma", "weight_min", "weight_mean", "weight_max", "frac_below_half")]
CW_KEYS += ["actor/cw/cov_mean"] + [
    f"actor/cw/cov_{side}_top_{level}" for side in ("pos", "neg") for level in ("0.01pct", "1pct", "20pct", "40pct")
]
STEP_KEYS = [
    "actor/entropy",
    "critic/score/mean",
    "critic/advantages/mean",
    "response_length/mean",
    "actor/pg_loss",
    "actor/pg_clipfrac",
    "actor/ppo_kl",
    "actor/grad_norm",
    "actor/lr",
    "training/rollout_probs_diff_max",
    "timing_s/gen",
    "timing_s/old_log_prob",
    "timing_s/update_actor",
    "timing_s/step",
    "training/global_step",
]


@pytest.fixture(scope="module")
def policy_dir(tiny_assets):
    info = json.loads((tiny_assets / "assets.json").read_text())["model"]
    assert info["warm_start_sampled_accuracy"] > 0.05, "the warm-started policy must earn reward for RL to have signal"
    return str(tiny_assets / "model")


@pytest.fixture(scope="module")
def updates(policy_dir):
    return run_ranks(ranks.one_update_per_loss_mode, 2, policy_dir, ["vanilla", CW, "vanilla"], 2, 0, timeout_s=400)


def test_the_batch_carries_learning_signal(updates):
    assert sum(r["nonzero_advantage_rows"] for r in updates[:1]) > 0


def test_selected_policy_loss_runs_once_per_micro_batch(updates):
    for rank_result in updates:
        mini_batches = ranks.PROMPTS // ranks.PROMPTS_PER_MINI_BATCH
        per_rank_per_mini_batch = rank_result["local_sequences"] // mini_batches
        expected = mini_batches * per_rank_per_mini_batch // 2  # micro-batch size 2
        assert expected == 8
        for update in rank_result["updates"]:
            others = {name: n for name, n in update["calls"].items() if name != update["loss_mode"]}
            assert update["calls"][update["loss_mode"]] == expected, update["calls"]
            assert set(others.values()) == {0}, others


def test_every_parameter_shard_changed_on_every_rank(updates):
    for rank_result in updates:
        for update in rank_result["updates"]:
            unchanged = [name for name, delta in update["delta"].items() if not delta.abs().max() > 0]
            assert unchanged == [], f"{update['loss_mode']}: unchanged {unchanged}"


def test_cw_and_grpo_updates_differ_and_each_is_reproducible(updates):
    for rank_result in updates:
        vanilla, cw, vanilla_again = rank_result["updates"]
        for name in vanilla["delta"]:
            # Same batch, same initial weights, same seed: vanilla twice is bit-for-bit the same
            # update, so any difference to CW comes from its reweighted advantages.
            assert torch.equal(vanilla["delta"][name], vanilla_again["delta"][name]), name
        difference = max((cw["delta"][n] - vanilla["delta"][n]).abs().max().item() for n in vanilla["delta"])
        scale = max(vanilla["delta"][n].abs().max().item() for n in vanilla["delta"])
        assert difference > 1e-3 * scale


def test_cw_metrics_come_from_the_loss_and_only_with_cw_grpo(updates):
    vanilla, cw, _ = updates[0]["updates"]
    assert not [k for k in vanilla["metrics"] if k.startswith("actor/cw/")]
    for key in CW_KEYS:
        assert math.isfinite(cw["metrics"][key]), key
    assert 0.0 <= cw["metrics"]["actor/cw/frac_below_half"] <= 1.0
    assert cw["metrics"]["actor/cw/weight_min"] <= cw["metrics"]["actor/cw/weight_max"]

    # Ranks report the same reduced metrics, as verl's trainer would see them (verl's perf/* gauges,
    # such as host memory, are each rank's own reading and not reduced).
    def reduced(metrics):
        return {key: value for key, value in metrics.items() if "/perf/" not in key}

    assert reduced(updates[0]["updates"][1]["metrics"]) == reduced(updates[1]["updates"][1]["metrics"])


def test_dynamic_batch_size_per_call_splits_by_tokens_in_step_on_both_ranks(policy_dir):
    # The actor is set up with fixed micro-batches of 8; this update alone uses verl's token budget.
    overrides = {"use_dynamic_bsz": True, "max_token_len": 40}
    results = run_ranks(ranks.one_update_per_loss_mode, 2, policy_dir, [CW], 8, 0, overrides, timeout_s=400)
    calls = [r["updates"][0]["calls"][CW] for r in results]
    assert calls[0] == calls[1], "verl keeps the micro-batch count equal across data-parallel ranks"
    for result in results:
        assert calls[0] >= sum(result["min_micro_batches"])
    # Fixed micro-batches of 8 would have made one loss call per mini-batch.
    assert calls[0] > ranks.PROMPTS // ranks.PROMPTS_PER_MINI_BATCH


# --- the demo command --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["--smoke", "--out-dir", str(out), "--no-progress", "--arms", f"grpo,{CW},ep_grpo"]) == 0
    return out


def test_demo_writes_well_formed_verl_file_logger_jsonl(smoke_run):
    for arm in ("grpo", CW, "ep_grpo"):
        lines = [json.loads(line) for line in (smoke_run / f"{arm}.jsonl").read_text().splitlines()]
        assert all(set(line) == {"step", "data"} for line in lines)
        run = read_jsonl(smoke_run / f"{arm}.jsonl")
        assert run.steps == [0, 1, 2, 3]
        assert set(run.rows[0]) == {VAL_KEY, PASS_AT_K_KEY.format(k=1)}
        # One held-out sample per problem: pass@1 is the accuracy.
        assert run.rows[0][PASS_AT_K_KEY.format(k=1)] == pytest.approx(run.rows[0][VAL_KEY])
        expected = STEP_KEYS + (CW_KEYS if arm == CW else [])
        for step in (1, 2, 3):
            row = run.rows[step]
            missing = [key for key in expected if key not in row]
            assert missing == [], f"{arm} step {step} lacks {missing}"
            bad = {key: value for key, value in row.items() if not math.isfinite(value)}
            assert bad == {}, f"{arm} step {step}"
            assert row["training/global_step"] == step
            assert 0.0 <= row["critic/score/mean"] <= 1.0
            assert row["actor/entropy"] > 0.0
            # The rollout model and verl's engine compute the same log-probs for the sampled tokens.
            assert row["training/rollout_probs_diff_max"] < 1e-4
        assert VAL_KEY in run.rows[3]
        if arm != CW:
            # Other arms log the paper's Table 1 statistics of their batches, observed only: never weights.
            observed = [key for key in run.keys() if key.startswith("actor/cw/")]
            assert observed and all(key.startswith(probes.PERCENTILE_PREFIXES) for key in observed), observed


def test_demo_summary_and_figure(smoke_run):
    summary = json.loads((smoke_run / cli.SUMMARY_NAME).read_text())
    assert set(summary["arms"]) == {"grpo", CW, "ep_grpo"}
    for arm, entry in summary["arms"].items():
        run = read_jsonl(entry["jsonl"])
        entropies = [run.rows[s]["actor/entropy"] for s in (1, 2, 3)]
        assert entry["steps"] == 3
        assert entry["entropy_min"] == min(entropies) and entry["entropy_max"] == max(entropies)
        assert entry["val_start"] == run.rows[0][VAL_KEY]
        if arm == CW:
            below = [run.rows[s]["actor/cw/frac_below_half"] for s in (1, 2, 3)]
            assert entry["frac_below_half"] == pytest.approx(sum(below) / 3)
        else:
            assert entry["frac_below_half"] is None
    figure = smoke_run / cli.FIGURE_NAME
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_unknown_arms():
    with pytest.raises(SystemExit, match="--arms"):
        cli.main(["--arms", "grpo,ppo_magic"])
