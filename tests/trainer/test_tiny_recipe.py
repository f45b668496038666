"""``recipes/run_cwgrpo_tiny_cpu.sh`` with DRY_RUN=1: the paper's common.sh with the tiny CPU profile,
checked against verl 0.9.1's real configuration (no Ray, no vLLM)."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.recipes.recipe_helpers import flatten
from tests.trainer import tiny_runs

ARMS = ("grpo", "cw_grpo", "ep_grpo")
# The module fixture runs three launch checks on the session's tiny assets: minutes on a loaded 2-core box.
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory, tiny_assets):
    root = tmp_path_factory.mktemp("tiny_recipe")
    tiny_dir = tiny_assets
    results = {}
    for arm in ARMS:
        env, _ = tiny_runs.recipe_env(
            root,
            tiny_dir,
            arm,
            ARM=arm,
            DRY_RUN="1",
            DUMP_CONFIG=str(root / f"{arm}.yaml"),
            METRICS_FILE=f"{root}/{arm}.jsonl",
        )
        result = subprocess.run(["bash", str(tiny_runs.RECIPE)], env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        results[arm] = (result, yaml.safe_load((root / f"{arm}.yaml").read_text()))
    return root, results


def test_dry_run_passes_verls_checks_with_the_fsdp2_trainer_config(dry_runs):
    _, results = dry_runs
    for result, _ in results.values():
        assert "launch check: OK (0 problem(s))" in result.stdout
        command = next(line for line in result.stdout.splitlines() if "verl.trainer.main_ppo" in line)
        assert " -m verl.trainer.main_ppo --config-name=ppo_trainer " in command
        # Under the supervisor in a real launch; not started here.
        assert "# DRY_RUN=1: not started" in result.stdout


def test_cpu_profile_settings(dry_runs, tiny_assets):
    root, results = dry_runs
    cfg = results["cw_grpo"][1]
    actor, rollout = cfg["actor_rollout_ref"]["actor"], cfg["actor_rollout_ref"]["rollout"]
    assert cfg["trainer"]["device"] == "cpu" and cfg["trainer"]["n_gpus_per_node"] == 2
    assert cfg["ray_kwargs"]["ray_init"]["num_gpus"] == 2
    assert cfg["transfer_queue"]["backend"]["SimpleStorage"]["num_data_storage_units"] == 1
    assert actor["strategy"] == "fsdp2" and cfg["actor_rollout_ref"]["ref"]["strategy"] == "fsdp2"
    assert actor["fsdp_config"]["mixed_precision"]["param_dtype"] == "fp32"
    assert rollout["name"] == "vllm" and rollout["dtype"] == "float32" and rollout["enforce_eager"]
    assert rollout["enable_sleep_mode"] is False
    assert cfg["data"]["train_files"] == [str(tiny_assets / "data" / "train.parquet")]
    assert cfg["reward"]["custom_reward_function"]["path"] == "pkg://cw_verl.demo.reward"
    # The paper's algorithm settings from common.sh are kept: group-scope CW loss, KL loss, on-policy.
    assert actor["policy_loss"]["loss_mode"] == "cw_grpo_group" and cfg["algorithm"]["adv_estimator"] == "cw_grpo"
    assert actor["use_kl_loss"] and actor["kl_loss_coef"] == 0.04
    assert actor["ppo_mini_batch_size"] == cfg["data"]["train_batch_size"] and actor["ppo_epochs"] == 1
    assert actor["optim"]["lr_scheduler_type"] == "cosine"
    assert actor["optim"]["min_lr_ratio"] == pytest.approx(0.1)  # MIN_LR 1e-5 / LR 1e-4
    # common.sh's dynamic micro-batches, with a budget of one prompt group of the longest sequences (8 x (16 + 9)).
    ref = cfg["actor_rollout_ref"]["ref"]
    assert actor["use_dynamic_bsz"] and actor["ppo_max_token_len_per_gpu"] == 8 * (16 + 9)
    assert ref["log_prob_use_dynamic_bsz"] and ref["log_prob_max_token_len_per_gpu"] == 8 * (16 + 9)
    assert rollout["log_prob_use_dynamic_bsz"] and rollout["log_prob_max_token_len_per_gpu"] == 8 * (16 + 9)


def _dry_run(root, tiny_assets, name: str, *args: str, **settings: str) -> tuple[dict, str]:
    """One more ``DRY_RUN=1`` of the tiny recipe (``ARM=cw_grpo`` plus ``settings``, ``args`` after the recipe);
    its resolved config and what the recipe printed."""
    env, _ = tiny_runs.recipe_env(
        root,
        tiny_assets,
        name,
        ARM="cw_grpo",
        DRY_RUN="1",
        DUMP_CONFIG=str(root / f"{name}.yaml"),
        METRICS_FILE=f"{root}/{name}.jsonl",
        **settings,
    )
    result = subprocess.run(
        ["bash", str(tiny_runs.RECIPE), *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "launch check: OK (0 problem(s))" in result.stdout
    return yaml.safe_load((root / f"{name}.yaml").read_text()), result.stdout


def test_micro_batch_per_gpu_selects_fixed_micro_batches(dry_runs, tiny_assets):
    root, _ = dry_runs
    cfg, _ = _dry_run(root, tiny_assets, "fixed", MICRO_BATCH_PER_GPU="16")
    actor, ref = cfg["actor_rollout_ref"]["actor"], cfg["actor_rollout_ref"]["ref"]
    assert not actor["use_dynamic_bsz"] and actor["ppo_micro_batch_size_per_gpu"] == 16
    assert ref["log_prob_micro_batch_size_per_gpu"] == 16


@pytest.mark.parametrize("arm", ARMS[1:])
def test_arms_differ_only_in_the_algorithm_and_run_names(dry_runs, arm):
    _, results = dry_runs
    grpo, other = flatten(results["grpo"][1]), flatten(results[arm][1])
    assert grpo.keys() == other.keys()
    differing = {key for key in grpo if grpo[key] != other[key]}
    algorithm = {"algorithm.adv_estimator"} | (
        {"actor_rollout_ref.actor.policy_loss.loss_mode"} if arm == "cw_grpo" else set()
    )
    assert algorithm <= differing
    for key in differing - algorithm:  # the run's name (experiment, directories, metrics file), nothing else
        assert str(grpo[key]).replace("grpo", arm) == str(other[key]), key


def test_ep_grpo_arm_runs_verls_vanilla_loss_with_a_reference_policy(dry_runs):
    _, results = dry_runs
    cfg = results["ep_grpo"][1]
    actor = cfg["actor_rollout_ref"]["actor"]
    assert cfg["algorithm"]["adv_estimator"] == "ep_grpo" and actor["policy_loss"]["loss_mode"] == "vanilla"
    assert actor["use_kl_loss"]  # what starts verl's reference worker, whose log-probs EP-GRPO reads


# --- verl's trainer modes (issue 28) --------------------------------------------------------------------------


def test_trainer_mode_knob_selects_colocate_async_with_the_cpu_async_buffer(dry_runs, tiny_assets):
    root, results = dry_runs
    cfg, _ = _dry_run(root, tiny_assets, "colocate_async", TRAINER_MODE="colocate_async")
    v1 = cfg["trainer"]["v1"]
    assert v1["trainer_mode"] == "colocate_async"
    # One sampler setting for every mode: cw_verl.cpu.sampler picks verl's sync or async buffer by the mode.
    assert v1["sampler"]["custom_sampler"] == {"path": "pkg://cw_verl.cpu.sampler", "name": "fast_poll_replay_buffer"}
    assert results["cw_grpo"][1]["trainer"]["v1"]["trainer_mode"] == "sync"  # the default


CPU_GLOO = {
    "backend": "cpu_gloo",
    "custom_backend_module": "cw_verl.cpu.gloo_checkpoint_engine",
}


def _launched_command(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if " -m verl." in line)


def test_separate_async_gets_a_rollout_pool_of_its_own_and_the_cpu_checkpoint_engine(dry_runs, tiny_assets):
    root, _ = dry_runs
    # verl's own override after the recipe's arguments (TRAINER_MODE=separate_async, the knob, is the e2e test's).
    cfg, stdout = _dry_run(root, tiny_assets, "separate_override", "trainer.v1.trainer_mode=separate_async")
    rollout = cfg["actor_rollout_ref"]["rollout"]
    assert cfg["trainer"]["v1"]["trainer_mode"] == "separate_async"
    assert cfg["trainer"]["v1"]["separate_async"]["parameter_sync_step"] == 1  # one mini-batch per weight update
    assert rollout["nnodes"] == 1 and rollout["n_gpus_per_node"] == 1
    assert {key: rollout["checkpoint_engine"][key] for key in CPU_GLOO} == CPU_GLOO
    assert cfg["ray_kwargs"]["ray_init"]["num_gpus"] == 2 + 1  # the actor's rank slots and the rollout pool's
    assert " -m verl.trainer.main_ppo --config-name=ppo_trainer " in _launched_command(stdout)


@pytest.mark.parametrize(
    "mode, entry, config_name",
    [
        ("one_step_off", "verl.experimental.one_step_off_policy.main_ppo", "one_step_off_ppo_trainer"),
        ("fully_async", "verl.experimental.fully_async_policy.fully_async_main", "fully_async_ppo_trainer"),
    ],
)
def test_the_experimental_trainers_run_their_entry_module_and_config(dry_runs, tiny_assets, mode, entry, config_name):
    root, results = dry_runs
    cfg, stdout = _dry_run(root, tiny_assets, mode, TRAINER_MODE=mode, TOTAL_STEPS="5")
    assert f" -m {entry} --config-name={config_name} " in _launched_command(stdout)
    actor_rollout_ref = cfg["actor_rollout_ref"]
    # The rollout on its own pool (the trainers copy the top-level rollout.* over actor_rollout_ref's).
    assert actor_rollout_ref["hybrid_engine"] is False
    assert cfg["rollout"]["nnodes"] == 1 and cfg["rollout"]["n_gpus_per_node"] == 1
    assert {key: actor_rollout_ref["rollout"]["checkpoint_engine"][key] for key in CPU_GLOO} == CPU_GLOO
    # Their configs default to bypass mode, which replaces the loss: the actor recomputes old log-probs instead.
    assert cfg["algorithm"]["rollout_correction"]["bypass_mode"] is False
    assert actor_rollout_ref["actor"]["policy_loss"]["loss_mode"] == "cw_grpo_group"
    # The v1 trainer's settings are not passed (the custom sampler stays verl's default).
    assert cfg["trainer"]["v1"]["sampler"]["custom_sampler"]["path"] is None
    if mode == "fully_async":
        # The rollouter streams prompts; the run's length and the schedule's come from TOTAL_STEPS.
        assert cfg["data"]["train_batch_size"] == 0 and cfg["rollout"]["total_rollout_steps"] == 5 * 16
        assert actor_rollout_ref["actor"]["optim"]["total_training_steps"] == 5
        assert actor_rollout_ref["actor"]["ppo_mini_batch_size"] == 16
        assert cfg["async_training"]["require_batches"] == 1
        assert cfg["async_training"]["trigger_parameter_sync_step"] == 1
    else:
        assert cfg["data"]["train_batch_size"] == 16 == actor_rollout_ref["actor"]["ppo_mini_batch_size"]
    # Everything else is the sync run's (the CPU profile, the algorithm, the sizes).
    here, sync = flatten(cfg), flatten(results["cw_grpo"][1])
    for key in ("algorithm.adv_estimator", "actor_rollout_ref.actor.kl_loss_coef", "actor_rollout_ref.rollout.dtype"):
        assert here[key] == sync[key], key


@pytest.mark.parametrize(
    "settings, args, message",
    [
        (
            {"TRAINER_MODE": "colocated_async"},
            (),
            "TRAINER_MODE must be sync, colocate_async, separate_async, one_step_off or fully_async",
        ),
        # verl 0.9.1's separate_async fails at start-up without its colocated replicas, on any machine.
        (
            {"TRAINER_MODE": "separate_async"},
            ("actor_rollout_ref.hybrid_engine=False",),
            "hybrid_engine=False: verl 0.9.1 fails at start-up",
        ),
    ],
)
def test_a_mode_the_recipe_cannot_run_is_refused_before_anything_starts(tmp_path, settings, args, message):
    tiny_dir = tmp_path / "assets"  # not built: the refusal comes before the model build, Ray and any worker
    env, _ = tiny_runs.recipe_env(tmp_path, tiny_dir, "refused", ARM="cw_grpo", **settings)
    result = subprocess.run(
        ["bash", str(tiny_runs.RECIPE), *args], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("ERROR: ") and message in result.stderr, result.stderr
    assert result.stderr.rstrip().endswith("nothing was started") and not tiny_dir.exists()
