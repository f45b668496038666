"""The launch scripts, run with DRY_RUN=1 against verl 0.9.1's real configuration (no GPU, no Ray).

Each dry run composes ``ppo_megatron_trainer`` with the script's overrides, runs verl's validate_config,
builds the config dataclasses and the checks of cw_verl.paper.launch_check, and dumps the resolved
configuration, which the tests below read.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from recipe_helpers import RECIPES, flatten, recipe_env, run_recipes

ARMS = ("grpo", "clip_cov", "cw_grpo", "clip_cov_minibatch", "kl_cov_minibatch")
MODELS = ("qwen7b", "r1_1p5b")
ASYNC_OVERRIDE = "trainer.v1.trainer_mode=colocate_async"
# verl's experimental one-step-off trainer for the 1.5B model on the paper's node (recipes/README.md): 2 GPUs train,
# 2 roll out; its entry module and config through common.sh's hooks, its settings after the recipe's arguments.
ONE_STEP_OFF_ENV = dict(
    ENTRY_MODULE="verl.experimental.one_step_off_policy.main_ppo", CONFIG_PREFIX="one_step_off_", GPUS_PER_NODE="2"
)
ONE_STEP_OFF_ARGS = [
    "hydra.searchpath=[pkg://verl.trainer.config]",
    "actor_rollout_ref.hybrid_engine=False",
    "rollout.nnodes=1",
    "rollout.n_gpus_per_node=2",
    "algorithm.rollout_correction.bypass_mode=False",
]
# What may differ between arms of one model: the algorithm switch and everything named after the run.
ARM_KEYS = {"algorithm.adv_estimator", "actor_rollout_ref.actor.policy_loss.loss_mode"}
RUN_NAME_KEYS = {
    "trainer.experiment_name",
    "actor_rollout_ref.rollout.trace.experiment_name",
    "trainer.default_local_dir",
    "ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH",
    "ray_kwargs.ray_init.runtime_env.env_vars.TENSORBOARD_DIR",
}


@pytest.fixture(scope="module")
def runs(models, data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipes")
    scenarios = {}
    for model in MODELS:
        for arm in ARMS:
            dump = tmp / f"{model}-{arm}.yaml"
            scenarios[(model, arm)] = (
                model,
                recipe_env(tmp, models[model], data_dir, ARM=arm, DUMP_CONFIG=str(dump)),
                [],
            )
    r1 = models["r1_1p5b"]
    scenarios.update(
        {
            # 2 nodes x 8 GPUs, TP 2: 144 sequences over 8 data-parallel ranks, in micro-batches of 3 sequences
            # (verl checks 144 % (8 x 3) == 0); an extra argument is an override.
            "r1_two_nodes": (
                "r1_1p5b",
                recipe_env(
                    tmp,
                    r1,
                    data_dir,
                    NNODES="2",
                    GPUS_PER_NODE="8",
                    MICRO_BATCH_PER_GPU="3",
                    DUMP_CONFIG=str(tmp / "2x8.yaml"),
                ),
                ["trainer.save_freq=10"],
            ),
            # verl's asynchronous v1 trainer (recipes/README.md), selected by verl's own override after the recipe's.
            **{
                f"{model}_colocate_async": (
                    model,
                    recipe_env(tmp, models[model], data_dir, DUMP_CONFIG=str(tmp / f"{model}-async.yaml")),
                    [ASYNC_OVERRIDE],
                )
                for model in MODELS
            },
            "r1_one_step_off": (
                "r1_1p5b",
                recipe_env(
                    tmp, r1, data_dir, ARM="cw_grpo", DUMP_CONFIG=str(tmp / "r1-one-step-off.yaml"), **ONE_STEP_OFF_ENV
                ),
                ONE_STEP_OFF_ARGS,
            ),
            # A real launch (DRY_RUN=0) with a python whose `-m verl.trainer.main_ppo` only records its argv.
            "r1_launch": ("r1_1p5b", recipe_env(tmp, r1, data_dir, DRY_RUN="0", PYTHON=str(fake_trainer(tmp))), []),
        }
    )
    results = run_recipes(scenarios)
    configs = {}
    for (key, result), (_, env, _) in zip(results.items(), scenarios.values(), strict=True):
        if "DUMP_CONFIG" in env and result.returncode == 0:
            configs[key] = yaml.safe_load(open(env["DUMP_CONFIG"]))
    return results, configs, tmp


def fake_trainer(tmp):
    script = tmp / "python"
    script.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$2" == verl.trainer.main_ppo ]]; then\n'
        '    printf "%s\\n" "$@" > "$(dirname "$0")/trainer-argv"; exit 0\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    script.chmod(0o755)
    return script


def get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("arm", ARMS)
def test_dry_run_passes_verl_and_launch_checks(runs, model, arm):
    result = runs[0][(model, arm)]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[validate_config] All configuration checks passed successfully!" in result.stdout
    assert "launch check: OK (0 problem(s))" in result.stdout
    assert "# DRY_RUN=1: not started" in result.stdout
    command = next(line for line in result.stdout.splitlines() if "verl.trainer.main_ppo" in line)
    assert " -m verl.trainer.main_ppo --config-name=ppo_megatron_trainer " in command


@pytest.mark.parametrize("model", MODELS)
def test_arms_differ_only_in_the_algorithm_and_run_names(runs, model):
    flat = {arm: flatten(runs[1][(model, arm)]) for arm in ARMS}
    assert {arm: flat[arm]["algorithm.adv_estimator"] for arm in ARMS} == {
        "grpo": "grpo",
        "clip_cov": "grpo",
        "cw_grpo": "cw_grpo",
        "clip_cov_minibatch": "grpo",
        "kl_cov_minibatch": "grpo",
    }
    assert {arm: flat[arm]["actor_rollout_ref.actor.policy_loss.loss_mode"] for arm in ARMS} == {
        "grpo": "vanilla",
        "clip_cov": "clip_cov",
        "cw_grpo": "cw_grpo_group",  # the paper's per-prompt-group statistics
        "clip_cov_minibatch": "clip_cov_minibatch",
        "kl_cov_minibatch": "kl_cov_minibatch",
    }
    for arm in ARMS[1:]:
        assert flat[arm].keys() == flat["grpo"].keys()
        differing = {k for k in flat[arm] if flat[arm][k] != flat["grpo"][k]}
        assert differing - RUN_NAME_KEYS <= ARM_KEYS, differing
        assert flat[arm]["trainer.experiment_name"].endswith(arm)


@pytest.mark.parametrize("model", MODELS)
def test_paper_settings_in_verl_terms(runs, model):
    cfg = runs[1][(model, "cw_grpo")]
    actor = cfg["actor_rollout_ref"]["actor"]
    rollout = cfg["actor_rollout_ref"]["rollout"]
    # 12 prompts x 12 generations = 144 completions per optimizer step (recipes/README.md).
    assert cfg["data"]["train_batch_size"] == 12 and rollout["n"] == 12
    # One optimizer update per rollout batch: on-policy, as trl with num_iterations=1.
    assert actor["ppo_mini_batch_size"] == 12 and actor["ppo_epochs"] == 1
    assert actor["optim"]["lr"] == 1e-6 and actor["optim"]["lr_warmup_steps_ratio"] == 0.1
    assert actor["optim"]["weight_decay"] == 0.0 and actor["optim"]["clip_grad"] == 1.0
    # The authors' run lengths; verl's learning-rate schedule spans them (Table 2 is step 100 of such a run).
    assert cfg["trainer"]["total_training_steps"] == {"qwen7b": 150, "r1_1p5b": 300}[model]
    assert rollout["temperature"] == 0.7 and rollout["top_p"] == 1.0 and rollout["name"] == "vllm"
    assert cfg["data"]["max_prompt_length"] == 512
    # The paper's per-sequence mean (1/G sum_i 1/|o_i| sum_t) and trl's beta = 0.04 with the k3 estimator.
    assert actor["loss_agg_mode"] == "seq-mean-token-mean"
    assert actor["use_kl_loss"] and actor["kl_loss_coef"] == 0.04 and actor["kl_loss_type"] == "low_var_kl"
    assert not cfg["algorithm"]["use_kl_in_reward"] and actor["entropy_coeff"] == 0
    assert actor["strategy"] == "megatron" and cfg["actor_rollout_ref"]["ref"]["strategy"] == "megatron"
    assert actor["use_dynamic_bsz"] and cfg["actor_rollout_ref"]["ref"]["log_prob_use_dynamic_bsz"]
    assert cfg["reward"]["custom_reward_function"]["path"] == "pkg://cw_verl.paper.reward"
    assert cfg["trainer"]["resume_mode"] == "auto" and cfg["trainer"]["save_freq"] == 50
    assert cfg["trainer"]["logger"][:2] == ["console", "file"]
    assert cfg["ray_kwargs"]["ray_init"]["runtime_env"]["env_vars"]["VERL_FILE_LOGGER_PATH"].endswith(".jsonl")


def test_response_lengths_and_the_7b_context(runs):
    qwen, r1 = runs[1][("qwen7b", "grpo")], runs[1][("r1_1p5b", "grpo")]
    assert r1["data"]["max_response_length"] == 4096
    assert r1["actor_rollout_ref"]["rollout"]["max_model_len"] == 4608
    assert qwen["data"]["max_response_length"] == 3584
    assert qwen["data"]["max_prompt_length"] + qwen["data"]["max_response_length"] <= 4096
    assert qwen["actor_rollout_ref"]["rollout"]["max_model_len"] == 4096
    assert get(qwen, "reward.custom_reward_function.reward_kwargs.prompt_opens_think") is False
    assert get(r1, "reward.custom_reward_function.reward_kwargs.prompt_opens_think") is True


def test_sizes_scale_to_n_nodes_and_m_gpus(runs):
    result = runs[0]["r1_two_nodes"]
    assert result.returncode == 0, result.stderr
    assert "launch check: actor_dp = 8" in result.stdout  # TP=2 (the 80 GB profile)
    cfg = runs[1]["r1_two_nodes"]
    assert cfg["trainer"]["nnodes"] == 2 and cfg["trainer"]["n_gpus_per_node"] == 8
    assert cfg["data"]["train_batch_size"] == 12  # the optimisation does not change with the cluster
    assert cfg["trainer"]["save_freq"] == 10  # from the extra argument
    actor = cfg["actor_rollout_ref"]["actor"]
    assert not actor["use_dynamic_bsz"] and actor["ppo_micro_batch_size_per_gpu"] == 3
    assert cfg["actor_rollout_ref"]["ref"]["log_prob_micro_batch_size_per_gpu"] == 3


def test_real_launch_checks_then_execs_the_trainer(runs):
    result = runs[0]["r1_launch"]
    assert result.returncode == 0, result.stderr
    assert "launch check: OK" in result.stdout and "DRY_RUN" not in result.stdout
    argv = (runs[2] / "trainer-argv").read_text().splitlines()
    assert argv[:3] == ["-m", "verl.trainer.main_ppo", "--config-name=ppo_megatron_trainer"]
    assert "algorithm.adv_estimator=cw_grpo" in argv and "trainer.resume_mode=auto" in argv
    metrics = next(a for a in argv if "VERL_FILE_LOGGER_PATH=" in a).split("=", 1)[1]
    assert os.path.isdir(os.path.dirname(metrics))  # created before the launch; the file is verl's
    # The launch recorded its settings for the resume guard (cw_verl.paper.launch_check --run-dir --record).
    assert (
        runs[2] / "runs" / "cw_grpo_table2" / "deepseek-r1-distill-qwen-1.5b_cw_grpo" / "run_settings.json"
    ).exists()


def test_actor_config_is_a_megatron_actor_config(runs):
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import McoreActorConfig

    actor = omega_conf_to_dataclass(OmegaConf.create(runs[1][("qwen7b", "clip_cov")]["actor_rollout_ref"]["actor"]))
    assert type(actor) is McoreActorConfig
    assert actor.policy_loss.loss_mode == "clip_cov" and actor.megatron.tensor_model_parallel_size == 4


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MODEL_PATH": "/nonexistent/model"}, "MODEL_PATH=/nonexistent/model is not a local Hugging Face model"),
        ({"DATA_DIR": "/nonexistent/data"}, "training data /nonexistent/data/open_rs.parquet not found"),
        (
            {"ARM": "ppo"},
            "ARM must be grpo, clip_cov, clip_cov_minibatch, kl_cov_minibatch, cw_grpo, cw_grpo_authors or "
            "ep_grpo (got 'ppo')",
        ),
    ],
)
def test_fails_fast_before_python(models, data_dir, tmp_path, env, message):
    fake_python = tmp_path / "python-must-not-run"
    result = run_recipes(
        {"x": ("r1_1p5b", recipe_env(tmp_path, models["r1_1p5b"], data_dir, PYTHON=str(fake_python), **env), [])}
    )["x"]
    assert result.returncode == 1
    assert message in result.stderr
    assert "launch check" not in result.stdout + result.stderr


def test_missing_eval_set_is_named(models, data_dir, tmp_path):
    import shutil

    partial = tmp_path / "data"
    shutil.copytree(data_dir, partial)
    (partial / "minerva.parquet").unlink()
    result = run_recipes({"x": ("qwen7b", recipe_env(tmp_path, models["qwen7b"], partial), [])})["x"]
    assert result.returncode == 1 and f"evaluation data {partial}/minerva.parquet not found" in result.stderr


def test_scripts_are_executable_bash():
    for script in RECIPES.glob("*.sh"):
        assert script.read_text().startswith("#!/usr/bin/env bash\n"), script


def test_eval_script_checks_its_inputs(models, tmp_path):
    def run(*args, **env):
        full_env = {**os.environ, "PYTHON": str(tmp_path / "python-must-not-run"), "DATA_DIR": str(tmp_path), **env}
        return subprocess.run(
            ["bash", str(RECIPES / "eval_pass1.sh"), *args], env=full_env, capture_output=True, text=True
        )

    assert "usage:" in run().stderr
    result = run("/nonexistent", "GRPO")
    assert result.returncode == 1 and "/nonexistent is not a Hugging Face model directory" in result.stderr
    result = run(str(models["qwen7b"]), "GRPO")
    assert result.returncode == 1 and f"{tmp_path}/aime24.parquet not found" in result.stderr


@pytest.mark.parametrize("model", MODELS)
def test_the_paper_runs_launch_in_verls_colocate_async_trainer(runs, model):
    """The async launch of recipes/README.md passes verl's and cw_verl's launch checks for both models, with the
    arm's loss and statistics scope unchanged (the CW rules hold in every v1 trainer mode)."""
    results, configs, _ = runs
    result = results[f"{model}_colocate_async"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = configs[f"{model}_colocate_async"]
    assert config["trainer"]["use_v1"] and config["trainer"]["v1"]["trainer_mode"] == "colocate_async"
    sync = flatten(configs[(model, "cw_grpo")])
    changed = {key for key, value in flatten(config).items() if sync.get(key) != value}
    assert changed - RUN_NAME_KEYS == {"trainer.v1.trainer_mode"}, changed


def test_the_1p5b_run_launches_in_verls_one_step_off_trainer(runs):
    """recipes/README.md's one-step-off launch: verl's experimental entry module and its Megatron config, checked by
    verl's and cw_verl's launch checks for that runner (bypass mode off, the CW loss and scope unchanged)."""
    results, configs, _ = runs
    result = results["r1_one_step_off"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        " -m verl.experimental.one_step_off_policy.main_ppo --config-name=one_step_off_ppo_megatron_trainer "
        in result.stdout
    )
    config = configs["r1_one_step_off"]
    assert config["actor_rollout_ref"]["hybrid_engine"] is False and config["rollout"]["n_gpus_per_node"] == 2
    assert config["trainer"]["n_gpus_per_node"] == 2
    assert config["actor_rollout_ref"]["rollout"]["checkpoint_engine"]["backend"] == "nccl"  # verl's GPU engine
    assert config["algorithm"]["rollout_correction"]["bypass_mode"] is False
    sync = flatten(configs[("r1_1p5b", "cw_grpo")])
    here = flatten(config)
    for key in ARM_KEYS | {"actor_rollout_ref.actor.ppo_mini_batch_size", "data.train_batch_size"}:
        assert here[key] == sync[key], key
