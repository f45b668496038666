"""``loss_mode=vanilla_cw_metrics`` (a GRPO baseline that logs the covariance CW-GRPO would see, for the
paper's Table 1 on both arms) on verl's real actor path (FSDP2 on 2 gloo ranks, verl's micro-batching):
its loss and gradient are bitwise verl's ``vanilla``, its ``actor/cw/*`` metrics are ``cw_grpo_group``'s on
the same mini-batch, and the config rules treat it as a group-scope loss but never as a CW loss."""

import pytest
import torch
from omegaconf import OmegaConf

from tests.ranks import run_on_ranks
from tests.test_authors_engine import GROUP_SIZE, PROMPTS, TEMPERATURE, build_case

MODES = ("vanilla", "vanilla_cw_metrics", "cw_grpo_group")


def updates(rank, world_size, model_path, batch_path):
    """Per mode: the full gradient of one update (lr 0: every mode starts from the same weights) and metrics."""
    from cw_verl.cpu import harness

    batch = torch.load(batch_path, weights_only=False)
    setup = harness.ActorSetup(
        model_path=model_path,
        rollout_n=GROUP_SIZE,
        ppo_mini_batch_size=PROMPTS,
        loss_agg_mode="seq-mean-token-mean",
        lr=0.0,
        temperature=TEMPERATURE,
    )
    actor = harness.build_actor(setup)
    log_probs, _ = harness.compute_log_prob(actor, harness.dp_chunk(batch))
    # Off-policy old log-probs, so that PPO's clipping acts on some tokens.
    noise = torch.Generator().manual_seed(5)
    old = harness.all_gather_rows(log_probs)
    batch.batch["old_log_probs"] = old + 0.3 * torch.randn(old.shape, generator=noise)
    local = harness.dp_chunk(batch)
    out = {}
    for mode in MODES:
        with harness.recorded_gradient(actor) as record:
            metrics = harness.train_step(actor, local, loss_mode=mode, micro_batch_size=GROUP_SIZE // 2)
        out[mode] = {"gradient": torch.cat([record[k].flatten() for k in sorted(record)]), "metrics": metrics}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    model_path, batch_path = build_case(tmp_path_factory.mktemp("vanilla_cw_metrics"))
    return run_on_ranks(updates, 2, model_path, batch_path)


def test_loss_and_gradient_are_bitwise_verls_vanilla(results):
    for rank in results:
        vanilla, observed = rank["vanilla"], rank["vanilla_cw_metrics"]
        assert vanilla["gradient"].norm() > 0
        assert torch.equal(observed["gradient"], vanilla["gradient"])
        for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl"):
            assert observed["metrics"][key] == vanilla["metrics"][key], key
        assert observed["metrics"]["actor/pg_clipfrac"] > 0  # the clipped branch was exercised
        # ... and it differs from CW-GRPO's update on the same batch, which the metrics describe.
        assert not torch.equal(rank["cw_grpo_group"]["gradient"], vanilla["gradient"])


def test_metrics_are_the_group_scopes(results):
    for rank in results:
        observed, cw = rank["vanilla_cw_metrics"]["metrics"], rank["cw_grpo_group"]["metrics"]
        cw_keys = {k for k in cw if k.startswith("actor/cw/")}
        assert {"actor/cw/cov_pos_top_0.01pct", "actor/cw/cov_neg_top_20pct", "actor/cw/sigma"} <= cw_keys
        weight_keys = {f"actor/cw/{name}" for name in ("weight_min", "weight_max", "weight_mean", "frac_below_half")}
        assert weight_keys <= cw_keys
        # The covariance it would weigh, not weights it does not apply.
        assert {k for k in observed if k.startswith("actor/cw/")} == cw_keys - weight_keys
        cw_keys -= weight_keys
        for key in cw_keys:
            assert observed[key] == pytest.approx(cw[key], rel=1e-6, abs=1e-9), key
        assert not any(k.startswith("actor/cw/") for k in rank["vanilla"]["metrics"])


def _config(estimator, loss_mode, mini):
    return OmegaConf.create(
        {
            "algorithm": {"adv_estimator": estimator},
            "data": {"train_batch_size": 16},
            "actor_rollout_ref": {"actor": {"policy_loss": {"loss_mode": loss_mode}, "ppo_mini_batch_size": mini}},
        }
    )


def test_config_rules_treat_it_as_a_group_scope_loss_that_is_not_cw():
    from cw_verl.config_rules import ConfigConflictError, Launch, apply_config_rules

    launch = Launch(entry_point="test", prompts_per_update=16)
    apply_config_rules(_config("grpo", "vanilla_cw_metrics", 16), launch)  # whole groups: accepted
    with pytest.raises(ConfigConflictError, match="per prompt group"):
        apply_config_rules(_config("grpo", "vanilla_cw_metrics", 8), launch)
    # With the CW estimator it would silently train plain GRPO: refused.
    with pytest.raises(ConfigConflictError, match="selects CW-GRPO"):
        apply_config_rules(_config("cw_grpo", "vanilla_cw_metrics", 16), launch)


def test_without_the_actor_config_it_says_what_it_needs():
    from cw_verl.verl_losses import compute_policy_loss_vanilla_cw_metrics

    values = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs the actor config"):
        compute_policy_loss_vanilla_cw_metrics(values, values, values, torch.ones(2, 3, dtype=torch.bool))
