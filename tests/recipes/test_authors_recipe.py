"""ARM=cw_grpo_authors and the recipe defects of issue 11: the authors' run settings as an arm, memory
profiles with a launch-time estimate, the resume guard, the schedule length, and the verl version check.
All dry runs against verl 0.9.1's real configuration (no GPU, no Ray)."""

from __future__ import annotations

import json

import pytest
import yaml
from recipe_helpers import flatten, make_model, recipe_env, run_recipes

from cw_verl.paper import launch_check, memory

QWEN7B_DIMS = {  # Qwen2.5-Math-7B-Instruct's config.json (the parts the estimate reads)
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
R1_1P5B_DIMS = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
}


def real_size_model(path, dims, positions, template):
    """A model directory whose config.json has the real model's dimensions (no weights are read)."""
    path = make_model(path, positions, template)
    config = json.loads((path / "config.json").read_text())
    config.update(dims)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def sized_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sized")
    return {
        "qwen7b": real_size_model(root / "qwen7b", QWEN7B_DIMS, 4096, "qwen_math"),
        "r1_1p5b": real_size_model(root / "r1", R1_1P5B_DIMS, 131072, "r1_distill"),
    }


@pytest.fixture(scope="module")
def runs(sized_models, data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("authors_recipes")
    scenarios = {}
    for model in ("qwen7b", "r1_1p5b"):
        for arm in ("grpo", "cw_grpo_authors"):
            env = recipe_env(tmp, sized_models[model], data_dir, ARM=arm, DUMP_CONFIG=str(tmp / f"{model}-{arm}.yaml"))
            scenarios[(model, arm)] = (model, env, [])
    scenarios["qwen7b first defaults"] = (
        "qwen7b",
        recipe_env(tmp, sized_models["qwen7b"], data_dir, ACTOR_TP="2", ROLLOUT_GPU_MEMORY="0.5"),
        [],
    )
    scenarios["qwen7b 141gb"] = (
        "qwen7b",
        recipe_env(tmp, sized_models["qwen7b"], data_dir, MEMORY_PROFILE="141gb"),
        [],
    )
    scenarios["grpo with the authors' reward"] = (
        "r1_1p5b",
        recipe_env(
            tmp, sized_models["r1_1p5b"], data_dir, ARM="grpo", REWARD="authors", DUMP_CONFIG=str(tmp / "r.yaml")
        ),
        [],
    )
    results = run_recipes(scenarios)
    configs = {}
    for name, (_, env, _) in scenarios.items():
        if "DUMP_CONFIG" in env and results[name].returncode == 0:
            configs[name] = yaml.safe_load(open(env["DUMP_CONFIG"]))
    return results, configs


@pytest.mark.parametrize("model", ["qwen7b", "r1_1p5b"])
def test_authors_arm_runs_their_settings(runs, model):
    results, configs = runs
    result = results[(model, "cw_grpo_authors")]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "launch check: OK (0 problem(s))" in result.stdout
    cfg = configs[(model, "cw_grpo_authors")]
    actor = cfg["actor_rollout_ref"]["actor"]
    assert cfg["algorithm"]["adv_estimator"] == "cw_grpo" and actor["policy_loss"]["loss_mode"] == "cw_grpo_authors"
    # Their run lengths, the learning-rate schedule over all of them.
    assert cfg["trainer"]["total_training_steps"] == {"qwen7b": 150, "r1_1p5b": 300}[model]
    # One prompt group per loss call, as trl ran it (cw_verl.whole_groups), with full activation recompute.
    assert not actor["use_dynamic_bsz"] and actor["ppo_micro_batch_size_per_gpu"] == 12 and not actor["shuffle"]
    assert actor["megatron"]["override_transformer_config"]["recompute_granularity"] == "full"
    reward = cfg["reward"]["custom_reward_function"]
    assert reward["path"] == "pkg://cw_verl.paper.authors_reward"
    # Their 7B reward is accuracy alone, their 1.5B reward accuracy + format.
    assert reward["reward_kwargs"] == {"format_reward": model == "r1_1p5b"}


@pytest.mark.parametrize("model", ["qwen7b", "r1_1p5b"])
def test_authors_arm_differs_from_grpo_only_where_it_must(runs, model):
    _, configs = runs
    grpo, authors = flatten(configs[(model, "grpo")]), flatten(configs[(model, "cw_grpo_authors")])
    differing = {k for k in grpo.keys() | authors.keys() if grpo.get(k) != authors.get(k)}
    run_names = {k for k in differing if "experiment_name" in k or k.endswith(("_DIR", "_PATH", "default_local_dir"))}
    allowed = {
        "algorithm.adv_estimator",
        "actor_rollout_ref.actor.policy_loss.loss_mode",
        "reward.custom_reward_function.path",
        "reward.custom_reward_function.reward_kwargs.prompt_opens_think",
        "reward.custom_reward_function.reward_kwargs.format_reward",
    }
    # Whole-group micro-batches (fixed, one group) and the recompute they need.
    batching = {k for k in differing if "micro_batch_size" in k or "dynamic_bsz" in k or "max_token_len" in k}
    batching |= {k for k in differing if "override_transformer_config.recompute" in k}
    assert differing - run_names - allowed - batching == set()


def test_reward_option_applies_to_any_arm(runs):
    results, configs = runs
    assert results["grpo with the authors' reward"].returncode == 0
    cfg = configs["grpo with the authors' reward"]
    assert cfg["reward"]["custom_reward_function"]["path"] == "pkg://cw_verl.paper.authors_reward"
    assert cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] == "vanilla"


def printed_overrides(result) -> list[str]:
    import shlex

    argv = shlex.split(next(line for line in result.stdout.splitlines() if "verl.trainer.main_ppo" in line))
    return argv[argv.index("--config-name=ppo_megatron_trainer") + 1 :]


def with_changes(base: list[str], *changes: str) -> list[str]:
    keys = {c.split("=", 1)[0].lstrip("+") for c in changes}
    return [o for o in base if o.split("=", 1)[0].lstrip("+") not in keys] + list(changes)


def test_memory_profiles_fit_and_the_first_7b_defaults_do_not(runs):
    results, _ = runs
    default = results[("qwen7b", "grpo")].stdout
    assert "launch check: memory_per_gpu = 66.1 of 80 GB per GPU (estimate; 7.62B parameters)" in default
    authors_1p5b = results[("r1_1p5b", "cw_grpo_authors")].stdout
    assert "launch check: memory_per_gpu = 58.3 of 80 GB per GPU (estimate; 1.78B parameters)" in authors_1p5b
    overrides = printed_overrides(results[("qwen7b", "grpo")])
    # The first 7B defaults: TP 2, no offload, vLLM 0.5 of an 80 GB GPU.
    first = with_changes(
        overrides,
        "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.5",
    )
    report = launch_check.check(launch_check.compose(first), gpu_memory_gb=80, imports=False)
    assert report.facts["memory_per_gpu"].startswith("93.3 of 80 GB")
    assert [e for e in report.errors if e.startswith("memory: about 93 GB per GPU needed, 80 GB available")]
    assert launch_check.check(launch_check.compose(first), gpu_memory_gb=141, imports=False).errors == []
    # Offloading the weights frees the rollout phase, not training with 12288-token micro-batches at TP 2.
    offloaded = with_changes(first, "actor_rollout_ref.actor.megatron.param_offload=True")
    report = launch_check.check(launch_check.compose(offloaded), gpu_memory_gb=80, imports=False)
    assert "rollout phase 62.8, training 83.6" in report.facts["memory_per_gpu"] and len(report.errors) == 1
    smaller = with_changes(offloaded, "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=6144")
    assert launch_check.check(launch_check.compose(smaller), gpu_memory_gb=80, imports=False).errors == []


def test_parameter_counts_match_the_published_sizes():
    from types import SimpleNamespace

    assert memory.parameter_count(SimpleNamespace(model_type="qwen2", **QWEN7B_DIMS)) == 7_615_616_512
    assert round(memory.parameter_count(SimpleNamespace(model_type="qwen2", **R1_1P5B_DIMS)) / 1e9, 2) == 1.78


# --- resume guard --------------------------------------------------------------------------------------------


def test_a_different_config_cannot_resume_a_checkpoint(runs, tmp_path):
    overrides = with_changes(
        printed_overrides(runs[0][("r1_1p5b", "grpo")]), f"trainer.default_local_dir={tmp_path}/checkpoints"
    )

    def launch(*changes, record=True):
        report = launch_check.Report()
        cfg = launch_check.compose(with_changes(overrides, *changes))
        launch_check.check_run_dir(report, cfg, tmp_path, record)
        return report

    assert launch().errors == [] and (tmp_path / launch_check.SETTINGS_FILE).exists()
    # Without a checkpoint yet, another configuration replaces the record.
    replaced = launch("trainer.total_training_steps=120")
    assert replaced.errors == [] and "run_settings_replaced" in replaced.facts
    assert launch().errors == []
    (tmp_path / "checkpoints" / "global_step_50").mkdir(parents=True)  # the run saved a checkpoint
    assert launch().errors == []
    # Logging and checkpoint cadence may change on resume.
    assert launch("trainer.save_freq=25", "trainer.logger=[console]").errors == []
    for change, key in (
        ("actor_rollout_ref.actor.policy_loss.loss_mode=cw_grpo", "policy_loss.loss_mode"),
        ("trainer.total_training_steps=100", "trainer.total_training_steps"),
        ("actor_rollout_ref.actor.loss_agg_mode=token-mean", "loss_agg_mode"),
        ("actor_rollout_ref.actor.kl_loss_coef=0.0", "kl_loss_coef"),
        ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu=9216", "ppo_max_token_len_per_gpu"),
    ):
        errors = launch(change, record=False).errors
        assert len(errors) == 1 and "holds a checkpoint of a run with other settings" in errors[0], change
        assert key in errors[0] and "trainer.resume_mode=auto would resume it" in errors[0]


# --- verl version ----------------------------------------------------------------------------------------------


def test_launch_check_refuses_an_untested_verl(monkeypatch):
    import verl

    monkeypatch.setattr(verl, "__version__", "0.9.2")
    monkeypatch.delenv("CW_VERL_ALLOW_UNTESTED_VERL", raising=False)
    report = launch_check.Report()
    launch_check._check_verl_version(report)
    assert report.errors and "verl 0.9.2 is installed" in report.errors[0] and "verl==0.9.1" in report.errors[0]
    monkeypatch.setenv("CW_VERL_ALLOW_UNTESTED_VERL", "1")
    report = launch_check.Report()
    launch_check._check_verl_version(report)
    assert report.errors == []
