"""The verl internals that cw_verl's patches rely on (written against verl 0.9.1).

If one of these fails after a verl upgrade, the patch in ``patches/`` named in the test no longer
fits: re-read the verl code it describes before changing the test.
"""

import inspect
import os
import re

import verl
from cw_verl.patches import VERL_VERSION

VERL_DIR = os.path.dirname(verl.__file__)


def read(relative_path):
    with open(os.path.join(VERL_DIR, relative_path)) as f:
        return f.read()


def test_verl_is_the_version_the_patches_were_written_against():
    assert verl.__version__ == VERL_VERSION, (
        f"verl {verl.__version__} installed, patches written against {VERL_VERSION}: re-check tests/test_patches.py"
    )


def test_plugins_are_loaded_from_the_verl_plugins_entry_point_group():
    source = read("__init__.py")
    assert 'entry_points(group="verl.plugins")' in source and "VERL_USE_EXTERNAL_PLUGINS" in source


# patches/engine_context.py


def test_every_engine_trains_and_infers_through_base_engine():
    from verl.workers.engine.base import BaseEngine

    assert list(inspect.signature(BaseEngine.train_batch.__wrapped__).parameters) == ["self", "data", "loss_function"]
    assert list(inspect.signature(BaseEngine.infer_batch.__wrapped__).parameters) == ["self", "data", "loss_function"]
    overriding = []
    for root, _, files in os.walk(os.path.join(VERL_DIR, "workers", "engine")):
        for name in files:
            if name.endswith(".py") and name != "base.py":
                with open(os.path.join(root, name)) as f:
                    if re.search(r"def (train_batch|infer_batch)\(", f.read()):
                        overriding.append(os.path.join(root, name))
    assert overriding == [], f"engines now override train_batch/infer_batch: {overriding}"


def test_fsdp_and_megatron_engines_pass_their_dp_group_to_the_loss():
    for path in ("workers/engine/fsdp/transformer_impl.py", "workers/engine/megatron/transformer_impl.py"):
        assert "dp_group=self.get_data_parallel_group()" in read(path), path


def test_ppo_loss_still_does_not_forward_dp_group_to_the_policy_loss():
    from verl.workers.utils.losses import ppo_loss

    assert list(inspect.signature(ppo_loss).parameters) == ["config", "model_output", "data", "dp_group"]
    call = re.search(r"policy_loss_fn\((.*?)\)\n", inspect.getsource(ppo_loss), re.S).group(1)
    # If verl starts passing dp_group itself, the bridge can be retired.
    assert "dp_group" not in call
    assert 'config.global_batch_info["dp_size"] = data["dp_size"]' in inspect.getsource(ppo_loss)


def test_the_policy_loss_signature_is_what_cw_grpo_implements():
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    from cw_verl.registry import CW_POLICY_LOSSES, OTHER_POLICY_LOSSES

    for policy_loss, _ in {**CW_POLICY_LOSSES, **OTHER_POLICY_LOSSES}.values():
        assert list(inspect.signature(compute_policy_loss_vanilla).parameters) == list(
            inspect.signature(policy_loss).parameters
        )


# patches/entry_points.py


def test_every_entry_point_hands_its_config_to_run_ppo_before_ray_starts():
    from verl.trainer import main_ppo

    assert list(inspect.signature(main_ppo.run_ppo).parameters)[:2] == ["config", "task_runner_class"]
    run_ppo_source = inspect.getsource(main_ppo.run_ppo.__wrapped__)
    assert "ray.init(" in run_ppo_source and "task_runner_class" in run_ppo_source
    for path in ("experimental/one_step_off_policy/main_ppo.py", "experimental/fully_async_policy/fully_async_main.py"):
        source = read(path)
        # imported from the module when main() runs, so the wrapped function
        assert "    from verl.trainer.main_ppo import run_ppo" in source, path
        assert "run_ppo(config, task_runner_class=" in source, path


def test_main_ppo_validates_before_run_ppo_and_picks_the_runner_by_use_v1():
    from verl.trainer import main_ppo
    from verl.utils import config as config_module

    original = config_module.validate_config.__wrapped__
    assert list(inspect.signature(original).parameters)[0] == "config"
    assert "from verl.utils.config import validate_config" in read("trainer/main_ppo.py")
    main_source = inspect.getsource(main_ppo.main)
    assert main_source.index("validate_config(") < main_source.index("run_ppo(config")
    assert "if config.trainer.use_v1:" in main_source and "TaskRunnerV1" in main_source
    assert "from verl.trainer.main_ppo_v0 import TaskRunner" in main_source


def test_the_task_runners_and_how_their_trainer_loops_size_an_update():
    from verl.trainer.main_ppo import TaskRunnerV1
    from verl.trainer.main_ppo_v0 import TaskRunner

    assert TaskRunnerV1.__ray_actor_class__.__name__ == "TaskRunnerV1"
    assert TaskRunner.__ray_actor_class__.__name__ == "TaskRunner"
    assert "class OneStepTaskRunner" in read("experimental/one_step_off_policy/main_ppo.py")
    assert "class FullyAsyncTaskRunner" in read("experimental/fully_async_policy/fully_async_main.py")
    base = read("trainer/ppo/v1/trainer_base.py")
    assert 'self.config.trainer.v1.get(self.trainer_mode, {}).get("parameter_sync_step", 1)' in base
    assert "sample_batch_size = train_batch_size // self.parameter_sync_step" in base
    assert "train_batch_size == parameter_sync_step * ppo_mini_batch_size" in read(
        "trainer/ppo/v1/trainer_separate_async.py"
    )
    fully_async = read("experimental/fully_async_policy/fully_async_trainer.py")
    assert "self.required_samples = config.actor_rollout_ref.actor.ppo_mini_batch_size * self.require_batches" in (
        fully_async
    )


# patches/advantage_source.py


def test_the_driver_can_mark_a_batch_and_the_actor_update_carries_the_mark():
    from verl import DataProto
    from verl.trainer.ppo import ray_trainer

    assert "adv_estimator" in inspect.signature(ray_trainer.compute_advantage.__wrapped__).parameters
    assert "batch_td = batch.to_tensordict()" in inspect.getsource(ray_trainer.RayPPOTrainer._update_actor)
    assert "non_tensor_dict=self.meta_info" in inspect.getsource(DataProto.to_tensordict)
    assert "from verl.trainer.ppo.ray_trainer import RayPPOTrainer, apply_kl_penalty, compute_advantage" in read(
        "experimental/separation/ray_trainer.py"
    )


def test_the_v1_trainer_can_mark_its_transfer_queue_batch():
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    original = PPOTrainer._compute_advantage.__wrapped__
    assert list(inspect.signature(original).parameters) == ["self", "batch", "metrics"]
    assert "return batch" in inspect.getsource(original)
    # the worker turns the batch's extra_info into fields of the TensorDict it trains on
    assert "meta_info = copy.deepcopy(meta.extra_info)" in read("utils/transferqueue_utils.py")


def test_ppo_loss_looks_the_policy_loss_up_on_every_call():
    from verl.workers.utils.losses import ppo_loss

    source = inspect.getsource(ppo_loss)
    assert "policy_loss_fn = get_policy_loss_fn(loss_mode)" in source
    assert "get_policy_loss_fn" in read("workers/utils/losses.py").split("def sft_loss")[0]  # imported by name


# patches/v1_multi_trajectory.py


def test_v1_multi_trajectory_path_still_special_cases_the_grpo_name():
    from verl.trainer.ppo.v1 import utils as v1_utils

    original = v1_utils.compute_advantage_for_multi_trajectories.__wrapped__
    assert list(inspect.signature(original).parameters)[:3] == ["data", "batch_keys", "adv_estimator"]
    assert "adv_estimator != core_algos.AdvantageEstimator.GRPO" in inspect.getsource(original)
    assert "compute_advantage_for_multi_trajectories" in read("trainer/ppo/v1/trainer_base.py")


# patches/__init__.py: the table


def test_the_patches_of_one_module_apply_in_table_order(monkeypatch):
    import dataclasses
    import types

    from cw_verl import patches

    seen = []
    table = patches.PATCHES
    monkeypatch.setattr(
        patches, "PATCHES", tuple(dataclasses.replace(p, apply=lambda module, p=p: seen.append(p)) for p in table)
    )
    patches.apply(types.ModuleType("verl.trainer.ppo.ray_trainer"))
    assert seen == [p for p in table if p.module == "verl.trainer.ppo.ray_trainer"] and len(seen) == 2
    # ep_inputs recognises verl's own compute_advantage only before advantage_source wraps it.
    assert [p.marker for p in seen] == ["_cw_verl_ep_inputs", "_cw_verl_advantage_source"]


def test_every_patch_is_applied_and_names_its_verl_version():
    from cw_verl import patches

    for patch in patches.PATCHES:
        assert patch.verl_version == verl.__version__, patch
        assert patches.applied(patch), patch
