"""CW-GRPO on verl's real Megatron engine on gloo ranks: ``MegatronEngineWithLMHead`` through mbridge,
megatron-core's pipeline schedule and distributed optimizer, the loss on the last pipeline stage, verl's
context-parallel all-gather before the loss, sequence parallelism (cw_verl.cpu.megatron's CPU support).

Every update starts from the same checkpoint and one shared batch (old log-probs from the one-process
Megatron actor, as verl's trainer recomputes them with the actor it trains). verl's Megatron engine trains
in bf16 only, so layouts differ from one process by bf16 rounding; every tolerance is a multiple of a floor
measured in this same run, never a constant:

- the *layout floor*: how far vanilla GRPO (no statistics) moves on that layout from one process;
- the *single-process floor*: how far vanilla moves in one process between two micro-batchings (bf16
  summation order only: vanilla does not depend on micro-batching);
- for ``infer_batch`` log-probs: how far the HF model in bf16 is from the HF model in fp32.

Measured here (``python benchmarks/megatron_layouts.py`` prints the table): a CW scope's deviation is at
most ~2x the larger floor for the default and group scopes, and ~5.4x for the per-call scope, whose weights
follow the current log-probs and so also move with tensor parallelism's log-prob rounding; the tolerances
below are 3x and 8x. Run alone: ``python -m pytest tests -k megatron``.
"""

import pytest
import torch

from cw_verl.cpu.launch import run_ranks
from tests.megatron_ranks import layouts_and_a_wrong_group
from tests.support.megatron_study import (
    LAYOUTS,
    MICRO_BATCH,
    REFERENCE_MICRO_BATCH,
    Variant,
    deviations,
    layout_run,
    layout_variants,
    reference_run,
)

PROMPTS, GROUP_SIZE = 4, 4  # 16 sequences
LOSSES = ["vanilla", "cw_grpo", "cw_grpo_group", "cw_grpo_microbatch"]
CW_LOSSES = LOSSES[1:]
WIDE_SCOPES = ["cw_grpo", "cw_grpo_group"]
TWO_RANKS = ["TP2, SP", "PP2", "CP2"]
# Micro-batch invariance on TP2xDP2: against one micro-batch per rank.
OTHER_MICRO_BATCHINGS = [{"micro_batch_size": 2}, {"max_token_len": 40}]
FACTOR = {"cw_grpo": 3.0, "cw_grpo_group": 3.0, "cw_grpo_microbatch": 8.0}
LAUNCH_TIMEOUT_S = 900.0


def launch(fn, world_size, *args):
    return run_ranks(fn, world_size, *args, timeout_s=LAUNCH_TIMEOUT_S, threads_per_rank=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_assets):
    tmp = tmp_path_factory.mktemp("megatron")
    model_path, batch_path = str(tiny_assets / "model"), str(tmp / "batch.pt")
    reference_variants = [Variant(loss, micro_batch_size=m) for loss in LOSSES for m in (4, 16)]
    reference = launch(reference_run, 1, model_path, batch_path, PROMPTS, GROUP_SIZE, 0, reference_variants)[0]
    two = launch(layout_run, 2, model_path, batch_path, [(name, layout_variants(name, LOSSES)) for name in TWO_RANKS])
    # The per-call scope's dependence on micro-batching needs one counter-example only.
    dp2_variants = layout_variants("TP2xDP2, SP", LOSSES) + [
        Variant(loss, **kw) for loss in ["vanilla", *WIDE_SCOPES] for kw in OTHER_MICRO_BATCHINGS
    ]
    dp2_variants.append(Variant("cw_grpo_microbatch", **OTHER_MICRO_BATCHINGS[0]))
    plan = [("TP2xPP2", layout_variants("TP2xPP2", LOSSES)), ("TP2xDP2, SP", dp2_variants)]
    four = launch(layouts_and_a_wrong_group, 4, model_path, batch_path, plan, "TP2xDP2, SP")
    per_rank = {name: [rank[name] for rank in ranks] for ranks in (two, four) for name in ranks[0] if name in LAYOUTS}
    return {
        "model_path": model_path,
        "reference": reference,
        "layouts": {name: results[0] for name, results in per_rank.items()},
        "per_rank": per_rank,
        "wrong group errors": [rank["wrong group error"] for rank in four],
    }


def _reference(runs, layout, loss):
    return runs["reference"]["variants"][Variant(loss, micro_batch_size=REFERENCE_MICRO_BATCH[layout])]


def _layout(runs, layout, loss, **micro_batching):
    return runs["layouts"][layout]["variants"][
        Variant(loss, **(micro_batching or {"micro_batch_size": MICRO_BATCH[layout]}))
    ]


def _single_process_floor(runs):
    variants = runs["reference"]["variants"]
    return deviations(
        variants[Variant("vanilla", micro_batch_size=16)], variants[Variant("vanilla", micro_batch_size=4)]
    )


def _floors(runs, layout):
    """Per quantity, the larger of the layout floor and the single-process floor. A gradient norm cannot move
    by more than the gradient does (|‖a‖ - ‖b‖| <= ‖a - b‖), so its floor is the gradient's."""
    layout_floor = deviations(_layout(runs, layout, "vanilla"), _reference(runs, layout, "vanilla"))
    single = _single_process_floor(runs)
    floors = {q: max(layout_floor[q], single[q]) for q in ("loss", "gradient", "update")}
    floors["grad_norm"] = floors["gradient"]
    return floors


@pytest.mark.parametrize("layout", list(MICRO_BATCH))
def test_vanilla_on_each_layout_differs_from_one_process_by_rounding_only(runs, layout):
    """Sanity of the floors the CW tests lean on: a broken layout (a wrong split or reduction) moves the
    gradient by O(1); bf16 rounding moved it by at most 3.7e-2 relative on TP layouts (10x the single-process
    floor with the padded vocabulary, 3.6x before it) and 2.9e-3 on CP2."""
    single = _single_process_floor(runs)
    layout_floor = deviations(_layout(runs, layout, "vanilla"), _reference(runs, layout, "vanilla"))
    assert 0 < single["gradient"] and 0 < single["update"]
    assert layout_floor["gradient"] <= 0.1, (layout_floor, single)


@pytest.mark.parametrize("loss_mode", CW_LOSSES)
@pytest.mark.parametrize("layout", list(MICRO_BATCH))
def test_each_layout_trains_like_one_process(runs, layout, loss_mode):
    """Same loss, gradient norm, gradient and updated weights as one process, within the measured floors."""
    got = deviations(_layout(runs, layout, loss_mode), _reference(runs, layout, loss_mode))
    floors = _floors(runs, layout)
    for quantity, floor in floors.items():
        assert got[quantity] <= FACTOR[loss_mode] * floor, (quantity, got, floors)
    assert _reference(runs, layout, loss_mode)["metrics"]["actor/grad_norm"] > 0


@pytest.mark.parametrize("layout", list(MICRO_BATCH))
def test_statistics_and_weights_do_not_depend_on_the_layout(runs, layout):
    """The wide scopes' statistics come from old log-probs, which are data: every layout applies the very
    same per-token weights, and their statistics cover each valid token of the batch exactly once (no
    tensor- or context-parallel replica counted twice). The per-call scope's weights follow the current
    log-probs: exact under pipeline parallelism, within bf16 rounding of those log-probs otherwise."""
    valid_tokens = int(runs["reference"]["response_mask"].sum())
    for loss in WIDE_SCOPES:
        got, reference = _layout(runs, layout, loss), _reference(runs, layout, loss)
        assert deviations(got, reference)["weights"] <= 1e-12
        assert got["metrics"]["actor/cw/num_tokens"] == valid_tokens
    if "TP2" not in layout:
        # Identical on PP2; CP2's current log-probs carry bf16 rounding of the split attention (2.5e-3 measured).
        per_call = _layout(runs, layout, "cw_grpo_microbatch")
        assert deviations(per_call, _reference(runs, layout, "cw_grpo_microbatch"))["weights"] <= 1e-2


@pytest.mark.parametrize("layout, stages", [("PP2", 2), ("TP2xPP2", 2)])
def test_the_loss_runs_only_on_the_last_pipeline_stage(runs, layout, stages):
    """Megatron orders ranks tensor-, context-, data-, then pipeline-parallel: the last stage is the last
    world_size / stages ranks. Each of them makes one loss call per micro-batch; the others none."""
    for loss in CW_LOSSES:
        calls = [
            rank["variants"][Variant(loss, micro_batch_size=MICRO_BATCH[layout])]["loss_calls"]
            for rank in runs["per_rank"][layout]
        ]
        per_stage = len(calls) // stages
        micro_batches = PROMPTS * GROUP_SIZE // MICRO_BATCH[layout]
        assert calls == [0] * (len(calls) - per_stage) + [micro_batches] * per_stage, (loss, calls)


def test_every_context_parallel_rank_sees_the_whole_micro_batch(runs):
    """verl all-gathers the model output over the CP group before the loss: each CP rank's loss calls see the
    same tokens as the one-process run's."""
    reference = _reference(runs, "CP2", "cw_grpo")["loss_call_tokens"]
    assert sum(reference) == int(runs["reference"]["response_mask"].sum())
    for rank in runs["per_rank"]["CP2"]:
        assert rank["variants"][Variant("cw_grpo", micro_batch_size=4)]["loss_call_tokens"] == reference


def test_a_group_other_than_the_engines_data_parallel_group_is_refused(runs):
    """TP2xDP2 with the engine handing WORLD (the tensor-parallel replica counted twice) to the loss."""
    for error in runs["wrong group errors"]:
        assert error is not None and "statistics group has 4 ranks but the batch's data-parallel size is 2" in error


@pytest.mark.parametrize("loss_mode", WIDE_SCOPES)
def test_wide_scopes_do_not_depend_on_micro_batching_on_megatron(runs, loss_mode):
    """TP2xDP2: 4 micro-batches of 2 per rank, and verl's dynamic batch size, against one micro-batch per
    rank: the same weights, and gradients within the floor vanilla shows for the same change."""
    reference, vanilla_reference = (_layout(runs, "TP2xDP2, SP", loss) for loss in (loss_mode, "vanilla"))
    for kw in OTHER_MICRO_BATCHINGS:
        got = deviations(_layout(runs, "TP2xDP2, SP", loss_mode, **kw), reference)
        floor = deviations(_layout(runs, "TP2xDP2, SP", "vanilla", **kw), vanilla_reference)
        single = _single_process_floor(runs)
        assert got["weights"] <= 1e-12, kw
        for quantity in ("gradient", "update"):
            assert got[quantity] <= FACTOR[loss_mode] * max(floor[quantity], single[quantity]), (kw, got, floor)


def test_the_per_call_scope_depends_on_micro_batching_on_megatron(runs):
    kw = OTHER_MICRO_BATCHINGS[0]
    got = deviations(
        _layout(runs, "TP2xDP2, SP", "cw_grpo_microbatch", **kw), _layout(runs, "TP2xDP2, SP", "cw_grpo_microbatch")
    )
    floor = deviations(_layout(runs, "TP2xDP2, SP", "vanilla", **kw), _layout(runs, "TP2xDP2, SP", "vanilla"))
    assert got["weights"] > 0.05
    assert got["gradient"] > 10 * floor["gradient"], (got, floor)


def _hugging_face_log_probs(model_path, batch, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
    responses = batch.batch["responses"]
    with torch.no_grad():
        logits = model(
            input_ids=batch.batch["input_ids"],
            attention_mask=batch.batch["attention_mask"],
            position_ids=batch.batch["position_ids"],
        ).logits.float()
    log_probs = torch.log_softmax(logits[:, -responses.shape[1] - 1 : -1], dim=-1)
    return log_probs.gather(-1, responses.unsqueeze(-1)).squeeze(-1)


def test_infer_batch_log_probs_match_hugging_face_within_bf16(runs):
    """The one-process engine's ``infer_batch`` log-probs (the batch's old log-probs) against the HF model in
    fp32, within 1.5x the distance between the HF model in bf16 and in fp32 (measured: 1.0x)."""
    batch = runs["reference"]["batch"]
    mask = batch.batch["response_mask"].bool()
    fp32 = _hugging_face_log_probs(runs["model_path"], batch, torch.float32)
    bf16 = _hugging_face_log_probs(runs["model_path"], batch, torch.bfloat16)
    engine = batch.batch["old_log_probs"]
    floor = (bf16 - fp32)[mask].abs()
    got = (engine - fp32)[mask].abs()
    assert 0 < floor.max() and got.max() <= 1.5 * floor.max() and got.mean() <= 1.5 * floor.mean()
