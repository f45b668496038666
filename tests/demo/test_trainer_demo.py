"""``python -m cw_verl trainer-demo``'s own pieces (the launches themselves: tests/trainer/test_main_ppo_e2e.py)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from cw_verl.demo import trainer_demo


def test_held_out_settings_are_refused_below_one_before_anything_starts(tmp_path):
    for flag in ("--val-samples", "--val-prompts"):
        with pytest.raises(SystemExit, match="must be at least 1"):
            trainer_demo.main([flag, "0", "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_validation_samples_at_the_rollout_temperature_into_the_arms_dump(tmp_path):
    args = SimpleNamespace(val_prompts=64, val_samples=8, temperature=0.9)
    overrides = trainer_demo.validation_overrides(args, tmp_path, "cw_grpo")
    assert "actor_rollout_ref.rollout.val_kwargs.n=8" in overrides
    assert "actor_rollout_ref.rollout.val_kwargs.temperature=0.9" in overrides
    assert "data.val_max_samples=64" in overrides
    assert f"trainer.validation_data_dir={tmp_path / 'cw_grpo_validation'}" in overrides


def test_pass_at_k_summary_reads_the_first_and_last_dump(tmp_path: Path):
    dumps = tmp_path / "grpo_validation"
    dumps.mkdir()
    for step, correct in ((0, 1), (10, 2), (30, 4)):
        rows = [{"input": "R12=", "acc": float(i < correct)} for i in range(4)]
        (dumps / f"{step}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = trainer_demo.pass_at_k_summary(dumps, (1, 4))
    assert summary == {"pass@1_start": 0.25, "pass@1_end": 1.0, "pass@4_start": 1.0, "pass@4_end": 1.0}
    empty = trainer_demo.pass_at_k_summary(tmp_path / "absent", (1,))
    assert all(value != value for value in empty.values())  # NaN: no validation ran


def test_cov_arms_get_their_selection_ratio_and_the_others_nothing():
    args = SimpleNamespace(cov_ratio=0.05)
    assert trainer_demo.cov_ratio_overrides(args, "clip_cov_minibatch") == [
        "actor_rollout_ref.actor.policy_loss.clip_cov_ratio=0.05"
    ]
    assert trainer_demo.cov_ratio_overrides(args, "kl_cov_minibatch") == [
        "actor_rollout_ref.actor.policy_loss.kl_cov_ratio=0.05"
    ]
    assert trainer_demo.cov_ratio_overrides(args, "clip_cov") == [
        "actor_rollout_ref.actor.policy_loss.clip_cov_ratio=0.05"
    ]
    assert trainer_demo.cov_ratio_overrides(args, "cw_grpo") == []
    assert set(trainer_demo.COV_RATIO_KEYS) <= set(trainer_demo.ARMS)


def test_cov_ratio_outside_zero_one_is_refused_before_anything_starts(tmp_path):
    for ratio in ("0", "1.5"):
        with pytest.raises(SystemExit, match="--cov-ratio must be in"):
            trainer_demo.main(["--cov-ratio", ratio, "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
