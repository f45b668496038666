"""Rollout for the demo: plain Hugging Face ``generate`` on an unsharded copy of the policy.

verl 0.9.1 only rolls out through inference servers (vLLM/SGLang/TRT-LLM), which need GPUs. The
demo keeps verl's division of labour: the training engine holds FSDP2 shards, and before each
rollout its weights are all-gathered (``engine.get_per_tensor_param()``, the same call verl's
``update_weights`` uses to feed its rollout servers) into a separate, unsharded HF model on every
rank. Each rank then samples for its own share of the prompts, and the ranks exchange the results
so that every rank holds the whole batch, as verl's driver does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from cw_verl.cpu import harness
from cw_verl.demo.task import EOS_ID, PAD_ID, Problem, ReversalTask, response_length, reward


@dataclass
class Samples:
    """One step's rollouts for the whole batch (identical on every rank); ``G`` rows per prompt."""

    problems: list[Problem]  # one per row
    uids: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # generated tokens, trimmed after the first <eos>
    rollout_log_probs: list[list[float]]  # log-probs of those tokens under the sampling distribution
    rewards: list[float]


class Rollout:
    def __init__(self, model_path: str, task: ReversalTask, temperature: float):
        self.model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa", dtype=torch.float32)
        self.model.eval()
        self.task = task
        self.temperature = temperature

    def sync_weights(self, actor: harness.Actor) -> None:
        """Load the actor's current (all-gathered) weights; collective."""
        state = harness.full_state_dict(actor)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # Non-persistent buffers (rotary inverse frequencies) are not in the state dict; anything
        # else missing or extra means the rollout would sample from a different model.
        if unexpected or any(not name.endswith("inv_freq") for name in missing):
            raise RuntimeError(f"weight sync mismatch: missing={missing}, unexpected={unexpected}")

    @torch.no_grad()
    def _generate(self, problems: list[Problem], seed: int) -> tuple[list[list[int]], list[list[float]]]:
        width = max(len(p.prompt_ids) for p in problems)
        input_ids = torch.full((len(problems), width), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, p in enumerate(problems):
            input_ids[row, width - len(p.prompt_ids) :] = torch.tensor(p.prompt_ids)
            attention_mask[row, width - len(p.prompt_ids) :] = 1
        generator_state = torch.get_rng_state()
        torch.manual_seed(seed)
        try:
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=self.temperature,
                # The full tempered distribution, which is what the engine's log-probs describe.
                top_k=0,
                top_p=1.0,
                max_new_tokens=self.task.max_response_tokens,
                pad_token_id=PAD_ID,
                eos_token_id=EOS_ID,
                output_scores=True,
                return_dict_in_generate=True,
            )
        finally:
            torch.set_rng_state(generator_state)
        generated = out.sequences[:, width:]
        # scores[t] are the processed logits (divided by the temperature) the token at t was drawn from.
        scores = torch.stack(out.scores, dim=1).float().log_softmax(dim=-1)
        token_log_probs = scores.gather(-1, generated.unsqueeze(-1)).squeeze(-1)
        responses, log_probs = [], []
        for row in range(len(problems)):
            ids = generated[row].tolist()
            length = response_length(ids)
            responses.append(ids[:length])
            log_probs.append(token_log_probs[row, :length].tolist())
        return responses, log_probs

    def sample(self, prompts: list[Problem], group_size: int, seed: int, step: int) -> Samples:
        """``group_size`` samples per prompt; each rank generates for its contiguous share; collective."""
        rank, world = dist.get_rank(), dist.get_world_size()
        if len(prompts) % world:
            raise ValueError(f"{len(prompts)} prompts do not split over {world} ranks")
        share = len(prompts) // world
        mine = list(range(rank * share, (rank + 1) * share))
        # Rows grouped per prompt (verl's repeat(interleave=True)), so contiguous chunks keep groups whole.
        rows = [i for i in mine for _ in range(group_size)]
        responses, log_probs = self._generate([prompts[i] for i in rows], seed=_sampling_seed(seed, step, rank))
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (rows, responses, log_probs))
        all_rows = [r for part in gathered for r in part[0]]
        all_responses = [x for part in gathered for x in part[1]]
        all_log_probs = [x for part in gathered for x in part[2]]
        problems = [prompts[i] for i in all_rows]
        return Samples(
            problems=problems,
            uids=[f"step{step}-prompt{i}" for i in all_rows],
            prompt_ids=[p.prompt_ids for p in problems],
            response_ids=all_responses,
            rollout_log_probs=all_log_probs,
            rewards=[reward(p, r) for p, r in zip(problems, all_responses, strict=True)],
        )


def _sampling_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def to_data_proto(samples: Samples, task: ReversalTask):
    """The batch as verl's trainer holds it after rollout and reward: left-padded prompts,
    right-padded responses, masks, position ids, and the outcome reward on each response's last token."""
    from verl import DataProto
    from verl.utils.model import compute_position_id_with_mask

    n = len(samples.problems)
    prompt_width = task.max_digits + 2
    response_width = task.max_response_tokens
    prompts = torch.full((n, prompt_width), PAD_ID, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompts)
    responses = torch.full((n, response_width), PAD_ID, dtype=torch.long)
    response_mask = torch.zeros_like(responses)
    rollout_log_probs = torch.zeros(n, response_width)
    scores = torch.zeros(n, response_width)
    for row in range(n):
        q, r = samples.prompt_ids[row], samples.response_ids[row]
        if not r:
            raise ValueError(f"row {row} has an empty response; max_new_tokens must be >= 1")
        prompts[row, prompt_width - len(q) :] = torch.tensor(q)
        prompt_mask[row, prompt_width - len(q) :] = 1
        responses[row, : len(r)] = torch.tensor(r)
        response_mask[row, : len(r)] = 1
        rollout_log_probs[row, : len(r)] = torch.tensor(samples.rollout_log_probs[row])
        scores[row, len(r) - 1] = samples.rewards[row]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    return DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": attention_mask,
            "position_ids": compute_position_id_with_mask(attention_mask),
            "response_mask": response_mask,
            "rollout_log_probs": rollout_log_probs,
            "token_level_scores": scores,
            "token_level_rewards": scores.clone(),
        },
        non_tensors={"uid": np.array(samples.uids, dtype=object)},
    )
