"""``cw_grpo_authors`` on verl's real actor path (TrainingWorker, FSDP2 engine on 2 gloo ranks, verl's
micro-batching, ppo_loss): the gradient the optimizer receives is the released objective's, computed in
float64 by the transcription on a plain Hugging Face copy of the same model, for one group per loss call,
several groups per call, and dynamic micro-batching with force_group_size; a split group fails on both ranks."""

import numpy as np
import pytest
import torch

from tests.authors_reference import batch_loss
from tests.ranks import run_on_ranks

PROMPTS, GROUP_SIZE, TEMPERATURE = 4, 4, 0.7
LAYOUTS = {
    "one group per call": {"micro_batch_size": GROUP_SIZE},
    "two groups per call": {"micro_batch_size": 2 * GROUP_SIZE},
    "dynamic, force_group_size": {
        "use_dynamic_bsz": True,
        "max_token_len": 64,
        "extra_meta": {"force_group_size": GROUP_SIZE},
    },
    "half a group per call": {"micro_batch_size": GROUP_SIZE // 2},
}


def build_case(tmp_path):
    """A tiny untrained Llama and one RL batch (random responses, binary rewards, GRPO advantages, uids)."""
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    from cw_verl.cpu.tiny_model import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm, save_model_dir
    from cw_verl.demo.rollout import Samples, to_data_proto
    from cw_verl.demo.task import ALPHABET, EOS_ID, STREAM_RL, ReversalTask

    tokenizer = build_char_tokenizer(ALPHABET)
    model = build_tiny_causal_lm(len(tokenizer), TinyModelSpec(), seed=3)
    model_path = save_model_dir(tmp_path / "model", model, tokenizer, {})
    task = ReversalTask()
    gen = np.random.default_rng(11)
    problems = [p for p in task.sample(PROMPTS, 0, STREAM_RL, 1) for _ in range(GROUP_SIZE)]
    responses = []
    for _ in problems:
        length = int(gen.integers(1, task.max_response_tokens + 1))
        responses.append([int(t) for t in gen.integers(2, len(tokenizer), length - 1)] + [EOS_ID])
    samples = Samples(
        problems=problems,
        uids=[f"prompt{i // GROUP_SIZE}" for i in range(len(problems))],
        prompt_ids=[p.prompt_ids for p in problems],
        response_ids=responses,
        rollout_log_probs=[[0.0] * len(r) for r in responses],
        rewards=[float(x) for x in gen.integers(0, 2, len(problems))],
    )
    batch = to_data_proto(samples, task)
    batch = compute_advantage(batch, adv_estimator="grpo", num_repeat=GROUP_SIZE, config=AlgoConfig())
    keys = ["prompts", "responses", "input_ids", "attention_mask", "position_ids", "response_mask", "advantages"]
    batch = batch.select(batch_keys=keys, non_tensor_batch_keys=["uid"])
    batch_path = tmp_path / "batch.pt"
    torch.save(batch, batch_path)
    return str(model_path), str(batch_path)


def engine_layouts(rank, world_size, model_path, batch_path):
    """Per layout: the full gradient of one update (lr 0, so every layout starts from the same weights) and
    verl's reduced metrics, or the error every rank raised."""
    from cw_verl.authors_loss import WholeGroupError
    from cw_verl.cpu import harness
    from cw_verl.cpu.harness import recorded_gradient

    batch = torch.load(batch_path, weights_only=False)
    setup = harness.ActorSetup(
        model_path=model_path,
        rollout_n=GROUP_SIZE,
        ppo_mini_batch_size=PROMPTS,
        loss_mode="cw_grpo_authors",
        loss_agg_mode="seq-mean-token-mean",
        lr=0.0,
        temperature=TEMPERATURE,
    )
    actor = harness.build_actor(setup)
    # On-policy, as the released code: old log-probs are the engine's own recomputation.
    log_probs, _ = harness.compute_log_prob(actor, harness.dp_chunk(batch))
    batch.batch["old_log_probs"] = harness.all_gather_rows(log_probs)
    local = harness.dp_chunk(batch)
    out = {}
    for name, layout in LAYOUTS.items():
        try:
            with recorded_gradient(actor) as record:
                metrics = harness.train_step(actor, local, **layout)
            gradient = torch.cat([record[key].flatten() for key in sorted(record)])
            out[name] = {"gradient": gradient, "metrics": metrics}
        except WholeGroupError as error:
            out[name] = error
    return out


def reference_gradient(model_path, batch_path):
    """The transcription's loss and gradient (float64, parameters in sorted-name order as the engine records)."""
    from transformers import AutoModelForCausalLM

    from cw_verl.authors_objective import sequence_advantages

    batch = torch.load(batch_path, weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64, attn_implementation="eager")
    tensors = batch.batch
    width = tensors["responses"].shape[1]
    log_prob = torch.zeros(tensors["responses"].shape, dtype=torch.float64)
    rows = []
    for row in range(len(batch)):
        # One unpadded sequence at a time (a padded batch would put fully masked rows through attention).
        ids = tensors["input_ids"][row][tensors["attention_mask"][row].bool()]
        length = int(tensors["response_mask"][row].sum())
        logits = model(input_ids=ids[None]).logits[0]
        # verl's log-probs: the positions that predict the response, logits divided by the temperature.
        logits = logits[-length - 1 : -1] / TEMPERATURE
        values = torch.log_softmax(logits, dim=-1).gather(-1, ids[-length:, None]).squeeze(-1)
        rows.append(torch.cat([values, values.new_zeros(width - length)]))
    log_prob = torch.stack(rows)
    mask = tensors["response_mask"].bool()
    seq_adv = sequence_advantages(tensors["advantages"].double(), mask)
    loss = batch_loss(log_prob, seq_adv, mask, list(batch.non_tensor_batch["uid"]))
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters())])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("authors_engine")
    model_path, batch_path = build_case(tmp)
    results = run_on_ranks(engine_layouts, 2, model_path, batch_path)
    return results, reference_gradient(model_path, batch_path)


@pytest.mark.parametrize("name", [name for name in LAYOUTS if name != "half a group per call"])
def test_engine_gradient_is_the_released_objectives(case, name):
    results, (loss, gradient) = case
    assert gradient.norm() > 0
    for rank in results:
        got = rank[name]["gradient"]
        assert ((got - gradient).norm() / gradient.norm()).item() < 1e-5, name
    # verl's pg_loss metric sums the ranks' shares; the released value is the mean over the batch.
    assert results[0][name]["metrics"]["actor/pg_loss"] == pytest.approx(loss, rel=1e-4, abs=1e-7)


def test_engine_refuses_a_split_group_on_both_ranks(case):
    results, _ = case
    errors = [rank["half a group per call"] for rank in results]
    assert all(isinstance(error, Exception) for error in errors)
    assert any("not whole groups of rollout.n=4" in str(error) for error in errors)
