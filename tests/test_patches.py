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

    from cw_verl.verl_losses import POLICY_LOSSES

    for policy_loss in POLICY_LOSSES.values():
        assert list(inspect.signature(compute_policy_loss_vanilla).parameters) == list(
            inspect.signature(policy_loss).parameters
        )


# patches/validate_config.py


def test_trainer_entry_points_validate_the_config_before_starting_ray():
    from verl.utils import config as config_module

    original = config_module.validate_config.__wrapped__
    assert list(inspect.signature(original).parameters)[0] == "config"
    from verl.trainer import main_ppo

    assert "from verl.utils.config import validate_config" in read("trainer/main_ppo.py")
    main_source = inspect.getsource(main_ppo.main)
    assert main_source.index("validate_config(") < main_source.index("run_ppo(config")


# patches/v1_multi_trajectory.py


def test_v1_multi_trajectory_path_still_special_cases_the_grpo_name():
    from verl.trainer.ppo.v1 import utils as v1_utils

    original = v1_utils.compute_advantage_for_multi_trajectories.__wrapped__
    assert list(inspect.signature(original).parameters)[:3] == ["data", "batch_keys", "adv_estimator"]
    assert "adv_estimator != core_algos.AdvantageEstimator.GRPO" in inspect.getsource(original)
    assert "compute_advantage_for_multi_trajectories" in read("trainer/ppo/v1/trainer_base.py")
