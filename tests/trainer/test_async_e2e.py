"""CW-GRPO in verl's asynchronous trainers on CPU (issue 28), each through its real entry point (marker ``e2e``):

* ``colocate_async``: the user's override ``trainer.v1.trainer_mode=colocate_async`` after the recipe's arguments
  -> ``verl.trainer.main_ppo`` -> ``PPOTrainerColocateAsync`` (partial rollouts on the actor's ranks, one batch
  generated ahead);
* ``separate_async``: ``TRAINER_MODE=separate_async`` -> ``PPOTrainerSeparateAsync`` with a rollout pool of its own
  (one more vLLM server), its weights through cw_verl's CPU checkpoint engine (``cpu_gloo``);
* ``one_step_off``: ``verl.experimental.one_step_off_policy.main_ppo`` (batch k generated while step k - 1 trains);
* ``fully_async``: ``verl.experimental.fully_async_policy.fully_async_main`` (a rollouter streaming prompts, the
  trainer updating on every 16 finished groups).

One launch per mode, ``ARM=cw_grpo`` (loss ``cw_grpo_group``), every policy-loss call recorded
(``tests/trainer/loss_capture_hook.py``). Per mode: CW statistics on every update cover every valid token of the
optimizer mini-batch on both DP ranks once; the data is off-policy on some update; every mini-batch holds whole
prompt groups (the group scope's precondition); each loss call equals the paper's update on the data it saw (the
sync run's check, reused). ``one_step_off`` also resumes from step 2's checkpoint; its first update then trains on
rollouts of the checkpoint's weights, which reached the separate vLLM server only through the checkpoint engine.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.trainer import tiny_runs
from tests.trainer.test_main_ppo_e2e import (
    NO_VAL,
    SCHEDULE,
    check_loss_calls_against_the_paper,
    recorded_loss_calls,
)
from tests.trainer.test_megatron_dp2_e2e import GROUP_SIZE, PROMPTS, valid_response_tokens

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

STEPS = 3
COLOCATE_OVERRIDE = "trainer.v1.trainer_mode=colocate_async"
V1_ENTRY = "verl.trainer.main_ppo"  # verl's v1 trainer, which logs each trajectory's staleness
V1_STALENESS = "training/off_policy/trajectory_staleness/max"
# verl's rollout-vs-actor probability gap per token (verl.utils.debug.metrics): 0 up to float rounding when the
# rollout ran on the weights the actor's old log-probs come from.
PROBS_GAP = "training/rollout_probs_diff_max"
SAME_WEIGHTS_GAP = 1e-3


@dataclass(frozen=True)
class Mode:
    name: str
    entry: str
    overrides: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)
    # fully_async logs an update's metrics with the next weight version: one more step, three logged updates.
    launched_steps: int = STEPS


MODES = {
    mode.name: mode
    for mode in (
        Mode("colocate_async", V1_ENTRY, overrides=(COLOCATE_OVERRIDE,)),
        Mode("separate_async", V1_ENTRY, settings={"TRAINER_MODE": "separate_async"}),
        Mode(
            "one_step_off",
            "verl.experimental.one_step_off_policy.main_ppo",
            settings={"TRAINER_MODE": "one_step_off", "SAVE_FREQ": "1"},
        ),
        Mode(
            "fully_async",
            "verl.experimental.fully_async_policy.fully_async_main",
            settings={"TRAINER_MODE": "fully_async"},
            launched_steps=STEPS + 1,
        ),
    )
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("async_e2e")


def launch_mode(root: Path, tiny_assets: Path, mode: Mode) -> tiny_runs.TinyRun:
    capture = tiny_runs.loss_capture_settings(root, f"loss_calls_{mode.name}")
    settings = dict(ARM="cw_grpo", TOTAL_STEPS=str(mode.launched_steps), SAVE_FREQ="-1", **SCHEDULE)
    settings.update(mode.settings)
    run = tiny_runs.launch(root, tiny_assets, f"cw_{mode.name}", *NO_VAL, *mode.overrides, **settings, **capture)
    assert run.returncode == 0, run.output[-5000:]
    report = run.report()
    print(f"\n{mode.name}: wall {report['wall_seconds']:.0f} s, peak {report['peak_pss_gb']:.1f} GB (PSS)")
    # This launch's own metrics file: a resumed launch of the same run writes the next one.
    run.notes.update(
        mode=mode,
        settings=settings,
        metrics=run.metrics_files()[-1],
        loss_calls=Path(capture["CW_VERL_TEST_CAPTURE_DIR"]),
    )
    return run


@pytest.fixture(scope="module")
def one_step_off_run(root, tiny_assets):
    return launch_mode(root, tiny_assets, MODES["one_step_off"])


@pytest.fixture(scope="module", params=list(MODES))
def mode_run(request, root, tiny_assets):
    if request.param == "one_step_off":  # one launch for the mode's tests and the resume
        return request.getfixturevalue("one_step_off_run")
    return launch_mode(root, tiny_assets, MODES[request.param])


def updates(run: tiny_runs.TinyRun) -> dict[int, dict]:
    """The logged metrics of each actor update, by update number (1, 2, ...).

    fully_async logs a weight version's rollouter statistics and, with the next version, the update's training
    metrics (tagged ``training/global_step``); the others log each step once.
    """
    rows = run.steps(run.notes["metrics"])
    if run.notes["mode"].name != "fully_async":
        return {step: row for step, row in rows.items() if "critic/score/mean" in row}
    return {int(row["training/global_step"]): row for row in rows.values() if "training/global_step" in row}


def test_the_mode_reaches_its_trainer_through_its_entry_point(mode_run):
    mode = mode_run.notes["mode"]
    command = json.loads(mode_run.notes["metrics"].with_suffix(".run.json").read_text())["command"]
    assert command[:3] == [command[0], "-m", mode.entry], command[:3]
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=cw_grpo_group" in command
    if mode.name == "colocate_async":
        # The recipe's own setting first (TRAINER_MODE, which the override set), the user's after it.
        assert command.count(COLOCATE_OVERRIDE) == 2, command
    else:  # the rollout apart from the actor: weights through the CPU checkpoint engine
        assert "actor_rollout_ref.rollout.checkpoint_engine.backend=cpu_gloo" in command
    assert tiny_runs.marked_processes(mode_run.marker) == {}


def test_cw_statistics_are_global_on_every_update_and_the_data_is_off_policy(mode_run):
    mode, logged = mode_run.notes["mode"], updates(mode_run)
    assert sorted(logged) == list(range(1, STEPS + 1)), sorted(logged)
    for step, row in logged.items():
        # Every valid response token of the update's one optimizer mini-batch, on both DP ranks, once.
        assert row["actor/cw/num_tokens"] == valid_response_tokens(row), (step, row["actor/cw/num_tokens"])
        assert row["actor/cw/excluded_tokens"] == 0 and row["actor/cw/sigma"] > 0
        assert row["actor/cw/weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert 0 <= row["actor/cw/weight_min"] <= 1 <= row["actor/cw/weight_max"]
    gaps = {step: row[PROBS_GAP] for step, row in logged.items()}
    print(f"{mode.name}: {PROBS_GAP} per update {gaps}")
    if mode.entry == V1_ENTRY:
        staleness = {step: row[V1_STALENESS] for step, row in logged.items()}
        print(f"{mode.name}: {V1_STALENESS} per update {staleness}")
        assert max(staleness.values()) >= 1, staleness
        # Staleness >= 1 means rollouts of other weights than the actor's: the probabilities differ.
        assert all(gaps[step] > SAME_WEIGHTS_GAP for step, value in staleness.items() if value >= 1), gaps
    else:
        # No per-trajectory staleness metric: the first update trains on rollouts of the initial weights (the gap
        # is rounding), a later one on rollouts of weights one update older than the actor's.
        assert gaps[1] < SAME_WEIGHTS_GAP and max(gaps.values()) > 10 * SAME_WEIGHTS_GAP, gaps
    if mode.name == "fully_async":
        stale = {step: row["fully_async/count/stale_trajectory_processed"] for step, row in logged.items()}
        print(f"fully_async: stale_trajectory_processed per update {stale}")
        assert max(stale.values()) > 0, stale


def test_every_mini_batch_holds_whole_prompt_groups(mode_run):
    """The group scope's precondition, read from what the loss saw: per optimizer mini-batch, the rows of both
    ranks' shards hold TRAIN_BATCH_SIZE prompt groups of exactly N_GENERATIONS responses each."""
    by_mini_batch = recorded_loss_calls(mode_run.notes["loss_calls"])
    assert sorted(by_mini_batch) == list(range(mode_run.notes["mode"].launched_steps))
    for index, calls in by_mini_batch.items():
        shards = [call["mini_batch"] for call in calls if call["mini_batch"] is not None]
        assert len(shards) == 2, f"mini-batch {index}: {len(shards)} rank shards"
        rows = Counter(uid for shard in shards for uid in shard["uids"])
        assert len(rows) == PROMPTS and set(rows.values()) == {GROUP_SIZE}, (index, rows)


def test_each_loss_call_is_the_papers_update_on_the_data_it_saw(mode_run):
    check_loss_calls_against_the_paper(
        recorded_loss_calls(mode_run.notes["loss_calls"]), steps=mode_run.notes["mode"].launched_steps
    )


@pytest.fixture(scope="module")
def one_step_off_resumed(root, tiny_assets, one_step_off_run):
    tiny_runs.rewind_to_checkpoint(one_step_off_run, STEPS - 1)
    run = tiny_runs.launch(root, tiny_assets, one_step_off_run.name, *NO_VAL, **one_step_off_run.notes["settings"])
    assert run.returncode == 0, run.output[-5000:]
    return run


def test_a_second_launch_resumes_one_step_off_with_the_checkpoints_weights_in_the_rollout_pool(
    one_step_off_run, one_step_off_resumed
):
    assert len(one_step_off_resumed.metrics_files()) == 2  # one file per launch
    steps = one_step_off_resumed.steps()
    assert sorted(s for s, row in steps.items() if "critic/score/mean" in row) == [STEPS]
    assert "Resuming from" in one_step_off_resumed.output
    assert f"global_step_{STEPS - 1}" in one_step_off_resumed.output
    row = steps[STEPS]
    assert row["actor/cw/num_tokens"] == valid_response_tokens(row) and row["actor/cw/sigma"] > 0
    # The pool's vLLM server starts from the model's files (the initial weights). The resumed step trains on the
    # batch generated right after the launch's first weight sync, so on step 2's weights, which only the cpu_gloo
    # engine carried there: the probabilities agree with the actor's to rounding.
    assert row[PROBS_GAP] < SAME_WEIGHTS_GAP, row[PROBS_GAP]
    # One update already moves them past that bound (initial weights would have failed it).
    assert updates(one_step_off_run)[STEPS][PROBS_GAP] > 10 * SAME_WEIGHTS_GAP
    assert (one_step_off_resumed.run_dir / "checkpoints" / f"global_step_{STEPS}").is_dir()
    assert tiny_runs.marked_processes(one_step_off_resumed.marker) == {}
