"""cw_verl.paper.launch_check on the recipes' own overrides, with one setting broken at a time.

The overrides are taken from what the scripts print in a dry run, then checked in this process (Hydra
compose on verl's installed ppo_megatron_trainer, verl's validate_config, the config dataclasses).
"""

from __future__ import annotations

import shlex

import pytest
from recipe_helpers import recipe_env, run_recipes

from cw_verl.paper import launch_check


@pytest.fixture(scope="module")
def overrides(models, data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overrides")
    # A failing check still prints the command; only the overrides are needed here.
    runs = run_recipes(
        {
            key: (key, recipe_env(tmp, models[key], data_dir, ARM="cw_grpo", PYTHON="/bin/false"), [])
            for key in ("qwen7b", "r1_1p5b")
        }
    )
    printed = {}
    for key, result in runs.items():
        argv = shlex.split(next(line for line in result.stdout.splitlines() if "verl.trainer.main_ppo" in line))
        printed[key] = argv[argv.index("--config-name=ppo_megatron_trainer") + 1 :]
    return printed


def with_changes(base: list[str], *changes: str) -> list[str]:
    keys = {c.split("=", 1)[0].lstrip("+") for c in changes}
    return [o for o in base if o.split("=", 1)[0].lstrip("+") not in keys] + list(changes)


def errors(overrides: list[str]) -> list[str]:
    return launch_check.check(launch_check.compose(overrides), imports=False).errors


@pytest.mark.parametrize("model", ["qwen7b", "r1_1p5b"])
def test_script_overrides_pass(overrides, model):
    report = launch_check.check(launch_check.compose(overrides[model]), imports=False)
    assert report.errors == []
    assert report.facts["sequences_per_step"] == 144
    assert report.facts["prompt_plus_response"] == {"qwen7b": 4096, "r1_1p5b": 4608}[model]
    assert report.facts["max_position_embeddings"] == {"qwen7b": 4096, "r1_1p5b": 131072}[model]


def test_context_guard_fires_for_the_papers_completion_length(overrides):
    # The paper's 4096-token completions on Qwen2.5-Math-7B-Instruct (4096 positions).
    assert errors(with_changes(overrides["qwen7b"], "data.max_response_length=4096")) == [
        "context: data.max_prompt_length (512) + data.max_response_length (4096) = 4608 exceeds the model's "
        "max_position_embeddings (4096); lower data.max_response_length to 3584 or less"
    ]


def test_rollout_max_model_len_beyond_the_model_is_refused(overrides):
    (error,) = errors(with_changes(overrides["qwen7b"], "actor_rollout_ref.rollout.max_model_len=8192"))
    assert error.startswith("context: rollout.max_model_len (8192) must lie between")


def test_think_template_mismatch(overrides, models):
    # The 7B recipe's reward settings with a tokenizer whose generation prompt opens <think>.
    (error,) = errors(with_changes(overrides["qwen7b"], f"actor_rollout_ref.model.path={models['r1_1p5b']}"))
    assert error.startswith("reward: prompt_opens_think=False but the tokenizer's generation prompt ends with <think>")


def test_all_problems_are_reported_together(overrides):
    found = errors(
        with_changes(
            overrides["r1_1p5b"],
            "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=1",
            "trainer.n_gpus_per_node=5",
            "trainer.logger=[console,file,wandbb]",
            "+reward.custom_reward_function.reward_kwargs.prompt_open_think=True",
            "algorithm.adv_estimator=no_such_estimator",
        )
    )
    assert len(found) == 4, found
    assert found[0].startswith(
        "batch: 144 sequences per step (train_batch_size x rollout.n) do not split evenly over 5"
    )
    assert found[1].startswith("reward function pkg://cw_verl.paper.reward:compute_score: TypeError")
    assert found[2].startswith("registry: algorithm.adv_estimator=no_such_estimator not registered in verl")
    assert found[3].startswith("trainer.logger: ['wandbb'] not among verl's")


def test_verl_own_validation_is_reported(overrides):
    # verl's validate_config: 144 sequences do not divide into 4 ranks x micro-batches of 5.
    found = errors(
        with_changes(
            overrides["r1_1p5b"],
            "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=1",
            "actor_rollout_ref.actor.use_dynamic_bsz=False",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=5",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=5",
            "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=5",
        )
    )
    assert found == [
        "verl validate_config: AssertionError: real_train_batch_size (144) must be divisible by minimal possible "
        "batch size (20)"
    ]


def test_missing_data_file(overrides, tmp_path):
    found = errors(with_changes(overrides["r1_1p5b"], f"data.train_files=['{tmp_path}/none.parquet']"))
    assert found == [f"data: {tmp_path}/none.parquet does not exist (build it with python -m cw_verl.paper.data)"]


def test_overrides_that_do_not_compose(overrides):
    with pytest.raises(Exception, match="no_such_key"):
        launch_check.compose([*overrides["r1_1p5b"], "trainer.no_such_key=1"])
    assert launch_check.main(["--", *overrides["r1_1p5b"], "trainer.no_such_key=1"]) == 1
