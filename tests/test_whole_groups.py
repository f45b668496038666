"""Whole prompt groups per loss call for cw_grpo_authors: the config rule (on verl's own composed configs, and
as one of the rules every entry point applies), the group-aware partition, the v1 trainer patch, and the
verl 0.9.1 code shapes the patch relies on."""

import inspect
import os

import pytest
import verl  # noqa: F401  (loads the cw_verl plugin)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cw_verl.config_rules import ConfigConflictError
from cw_verl.whole_groups import check_whole_groups, data_parallel_size, group_partitions

VERL_DIR = os.path.dirname(verl.__file__)
AUTHORS = "actor_rollout_ref.actor.policy_loss.loss_mode=cw_grpo_authors"
GOOD = [
    AUTHORS,
    "actor_rollout_ref.rollout.n=4",
    "data.train_batch_size=8",
    "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "actor_rollout_ref.actor.use_dynamic_bsz=False",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "trainer.n_gpus_per_node=2",
]


def verl_config(*overrides, name="ppo_trainer"):
    with initialize_config_dir(config_dir=os.path.join(VERL_DIR, "trainer", "config"), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def test_a_whole_group_configuration_passes():
    check_whole_groups(verl_config(*GOOD))
    dynamic = GOOD + [
        "actor_rollout_ref.actor.use_dynamic_bsz=True",
        "data.max_prompt_length=64",
        "data.max_response_length=192",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=1024",
    ]
    check_whole_groups(verl_config(*dynamic))


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("trainer.use_v1=False", "trainer.use_v1=True"),
        ("actor_rollout_ref.actor.shuffle=True", "actor_rollout_ref.actor.shuffle=False"),
        ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=6", "set it to 4"),
        ("trainer.n_gpus_per_node=3", "multiple of 3"),
    ],
)
def test_each_splitting_setting_is_refused_with_the_setting_to_change(override, names):
    with pytest.raises(ConfigConflictError, match="cw_grpo_authors") as error:
        check_whole_groups(verl_config(*GOOD, override))
    assert names in str(error.value)


def test_dynamic_micro_batches_must_hold_a_whole_group():
    config = verl_config(
        *GOOD,
        "actor_rollout_ref.actor.use_dynamic_bsz=True",
        "data.max_prompt_length=64",
        "data.max_response_length=192",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=1000",
    )
    with pytest.raises(ConfigConflictError, match="at least 1024"):
        check_whole_groups(config)


def test_megatron_data_parallel_size_excludes_model_parallel_ranks():
    config = verl_config(
        *GOOD,
        "trainer.n_gpus_per_node=8",
        "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
        "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2",
        name="ppo_megatron_trainer",
    )
    assert data_parallel_size(config) == 2
    check_whole_groups(config)
    odd = verl_config(*[o for o in GOOD if "train_batch_size" not in o], "data.train_batch_size=12", name="ppo_trainer")
    check_whole_groups(odd)  # 12 prompts over 2 ranks
    with pytest.raises(ConfigConflictError, match="data.train_batch_size=12"):
        check_whole_groups(
            verl_config(
                *GOOD,
                "data.train_batch_size=12",
                "trainer.n_gpus_per_node=8",
                "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=1",
                name="ppo_megatron_trainer",
            )
        )


def test_other_loss_modes_are_left_alone():
    check_whole_groups(verl_config("actor_rollout_ref.actor.shuffle=True", "trainer.use_v1=False"))


def test_the_rule_is_one_of_the_config_rules_every_entry_point_applies():
    from cw_verl.config_rules import apply_config_rules, launch_of

    config = verl_config(*GOOD, "actor_rollout_ref.actor.shuffle=True")
    with pytest.raises(ConfigConflictError, match="shuffle"):
        apply_config_rules(config, launch_of(config, "TaskRunnerV1"))


@pytest.mark.parametrize("runner", ["OneStepTaskRunner", "FullyAsyncTaskRunner", "TaskRunner"])
def test_the_legacy_loops_balancing_is_refused_for_every_entry_that_runs_it(runner):
    from cw_verl.config_rules import apply_config_rules, launch_of

    # The experimental trainers' configs keep trainer.use_v1=True, yet run verl's legacy loop.
    config = verl_config(*GOOD)
    apply_config_rules(config, launch_of(config, "TaskRunnerV1"))
    with pytest.raises(ConfigConflictError, match="legacy trainer loop.*balances batches sequence by sequence"):
        apply_config_rules(config, launch_of(config, runner))


# --- the partition ------------------------------------------------------------------------------------------


def test_partition_keeps_groups_whole_contiguous_and_balanced():
    # Rows in completion order, groups interleaved; group workloads 30, 60, 90, 120.
    uids = ["a", "b", "c", "a", "d", "c", "b", "d", "a", "b", "c", "d"]
    per_row = {"a": 10, "b": 20, "c": 30, "d": 40}
    workloads = [per_row[uid] for uid in uids]
    partitions = group_partitions(uids, workloads, dp_size=2, rollout_n=3)
    assert sorted(row for part in partitions for row in part) == list(range(12))
    for part in partitions:
        labels = [uids[row] for row in part]
        assert len(set(labels)) == 2 and all(labels[i : i + 3] == [labels[i]] * 3 for i in (0, 3))
        # Rows of a group keep their order.
        assert all(part[i] < part[i + 1] for i in (0, 1, 3, 4))
    assert {uids[part[0]] for part in partitions} | {uids[part[3]] for part in partitions} == set("abcd")
    loads = [sum(workloads[row] for row in part) for part in partitions]
    assert loads == [150, 150]  # {a, d} and {b, c}


def test_partition_refuses_incomplete_groups_and_uneven_splits():
    with pytest.raises(ValueError, match=r"\[2, 3\] responses"):
        group_partitions(["a", "a", "a", "b", "b"], [1] * 5, dp_size=1, rollout_n=3)
    with pytest.raises(ValueError, match="3 prompt groups do not split evenly over 2"):
        group_partitions(list("aabbcc"), [1] * 6, dp_size=2, rollout_n=2)


# --- the v1 trainer patch -------------------------------------------------------------------------------------


class FakeWorkerGroup:
    def __init__(self, dp_size):
        self._dispatch_info = {}
        self.dp_size = dp_size
        self.updates = []

    def _query_dispatch_info(self, role):
        return [rank for rank in range(self.dp_size) for _ in range(2)]  # e.g. TP=2: two workers per DP rank

    def update_actor(self, batch):
        self.updates.append(dict(batch.extra_info))
        return {"metrics": {"mfu": 0.0, "pg_loss": [0.1]}}


def fake_trainer(*overrides, dp_size=2):
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync  # inherits the patched PPOTrainer methods

    trainer = object.__new__(PPOTrainerSync)
    trainer.config = verl_config("actor_rollout_ref.actor.ppo_mini_batch_size=4", *overrides)
    trainer.actor_rollout_wg = FakeWorkerGroup(dp_size)
    trainer.use_critic, trainer.global_steps = False, 1
    trainer.tokenizer = type("Tokenizer", (), {"eos_token_id": 1})()
    return trainer


def kv_batch(groups=4, n=4):
    from verl.utils.transferqueue_utils import KVBatchMeta

    keys, tags = [], []
    for i in range(n):  # completion order: the groups' responses interleaved
        for g in range(groups):
            keys.append(f"uid{g}_{i}_0")
            tags.append({"seq_len": 10 + 7 * g + i})
    return KVBatchMeta(partition_id="train", keys=keys, tags=tags)


def test_patched_balance_gives_each_rank_whole_contiguous_groups():
    trainer = fake_trainer(AUTHORS, "actor_rollout_ref.rollout.n=4")
    batch = trainer._balance_batch(kv_batch(), metrics := {})
    uids = [key.split("_")[0] for key in batch.keys]
    for rank in range(2):
        chunk = uids[rank * 8 : (rank + 1) * 8]  # verl's dispatch: contiguous chunks
        assert chunk[:4] == [chunk[0]] * 4 and chunk[4:] == [chunk[4]] * 4 and chunk[0] != chunk[4]
    assert any(key.startswith("global_seqlen") for key in metrics)


def test_other_loss_modes_get_verls_own_balance():
    trainer = fake_trainer("actor_rollout_ref.rollout.n=4")
    batch = trainer._balance_batch(kv_batch(), {})
    uids = [key.split("_")[0] for key in batch.keys]
    # verl balances sequence by sequence: at least one group ends up on both ranks.
    assert set(uids[:8]) & set(uids[8:])


@pytest.mark.parametrize("dynamic", [True, False])
def test_patched_update_asks_verl_for_group_atomic_dynamic_micro_batches(dynamic):
    trainer = fake_trainer(
        AUTHORS, "actor_rollout_ref.rollout.n=4", f"actor_rollout_ref.actor.use_dynamic_bsz={dynamic}"
    )
    trainer._update_actor(kv_batch(), {})
    sent = trainer.actor_rollout_wg.updates[0]
    assert sent.get("force_group_size") == (4 if dynamic else None)
    plain = fake_trainer("actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.use_dynamic_bsz=True")
    plain._update_actor(kv_batch(), {})
    assert "force_group_size" not in plain.actor_rollout_wg.updates[0]


# --- verl 0.9.1 code the patch relies on (fails loudly when verl changes it) -------------------------------------


def test_v1_trainer_balances_every_step_and_forwards_extra_info():
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    step_once = inspect.getsource(PPOTrainer._step_once)
    assert "batch = self._balance_batch(batch, metrics=metrics)" in step_once
    assert "balance_batch" not in step_once.replace("_balance_batch", "")  # trainer.balance_batch is not read
    original = PPOTrainer._balance_batch.__wrapped__
    assert list(inspect.signature(original).parameters) == [
        "self",
        "batch",
        "metrics",
        "logging_prefix",
        "keep_minibatch",
    ]
    assert "get_seqlen_balanced_partitions(workload_lst, k_partitions=dp_size, equal_size=True)" in inspect.getsource(
        original
    )
    update = inspect.getsource(PPOTrainer._update_actor.__wrapped__)
    assert "batch.extra_info.update(extra_info)" in update and "self.actor_rollout_wg.update_actor(batch)" in update


def test_extra_info_reaches_the_micro_batching_as_force_group_size():
    from verl.utils import transferqueue_utils
    from verl.workers.engine import utils as engine_utils

    assert "meta.extra_info" in inspect.getsource(transferqueue_utils._async_meta_to_realdata)
    source = inspect.getsource(engine_utils.prepare_micro_batches)
    assert 'key="force_group_size"' in source and "force_group_size=force_group_size" in source
    assert "force_group_size" in inspect.signature(engine_utils.rearrange_micro_batches).parameters


def test_replay_buffer_keys_start_with_the_prompt_uid():
    from verl.trainer.ppo.v1 import replay_buffer

    assert 'uid = key.split("_")[0]' in inspect.getsource(replay_buffer.ReplayBuffer._materialize_batch)


def test_train_mini_batch_slices_contiguous_mini_batches_unless_shuffled():
    from verl.utils import tensordict_utils

    source = inspect.getsource(tensordict_utils.make_iterator)
    assert "DataLoader(" in source and "idx_lst = torch.arange(tensordict.shape[0])" in source
    assert OmegaConf.select(verl_config(), "actor_rollout_ref.actor.shuffle") is False
