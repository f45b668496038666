"""The demo's starting policy: a tiny Llama built from a config, then briefly taught the task.

A randomly initialised model essentially never reverses a 3-7 digit string exactly (chance is about
1e-5 per sample), so RL from scratch gets no reward signal. The demo therefore starts, like the
paper's distilled model, from a policy that is sometimes right: ``steps`` AdamW steps of supervised
teacher forcing on problems from a random stream that RL never samples from. The default is short
enough that the warm-started policy is right on only a fraction of its samples at temperature 1; the
sampled accuracy is measured and reported, and RL has to do the rest.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cw_verl.cpu.tiny_model import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm, save_model_dir
from cw_verl.demo.task import ALPHABET, EOS_ID, PAD_ID, STREAM_EVAL, STREAM_WARMSTART, ReversalTask, reward


@dataclass(frozen=True)
class WarmStart:
    steps: int = 120
    batch_size: int = 64
    lr: float = 3e-3


def _teacher_forcing_batch(problems) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sequences = [(p.prompt_ids, p.answer_ids) for p in problems]
    width = max(len(q) + len(a) for q, a in sequences)
    input_ids = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (q, a) in enumerate(sequences):
        ids = q + a
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        # Loss on the answer only: the prompt is given, the answer is what the policy must produce.
        labels[row, len(q) : len(ids)] = torch.tensor(a)
    return input_ids, attention_mask, labels


@torch.no_grad()
def sampled_accuracy(model, task: ReversalTask, count: int, seed: int, temperature: float = 1.0) -> float:
    """Share of ``count`` held-out problems solved by one temperature-``temperature`` sample each."""
    problems = task.sample(count, seed, STREAM_EVAL, 0)
    width = max(len(p.prompt_ids) for p in problems)
    input_ids = torch.full((count, width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, p in enumerate(problems):
        input_ids[row, width - len(p.prompt_ids) :] = torch.tensor(p.prompt_ids)
        attention_mask[row, width - len(p.prompt_ids) :] = 1
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=task.max_response_tokens,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )
    model.train(was_training)
    return sum(reward(p, out[row, width:].tolist()) for row, p in enumerate(problems)) / count


def build_demo_model(
    out_dir: str | Path, task: ReversalTask, spec: TinyModelSpec, warm: WarmStart, seed: int
) -> tuple[Path, dict]:
    """Build, warm-start and save the demo policy; returns its directory and what was measured."""
    start = time.perf_counter()
    tokenizer = build_char_tokenizer(ALPHABET)
    model = build_tiny_causal_lm(len(tokenizer), spec, seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=warm.lr, weight_decay=0.0)
    model.train()
    loss = float("nan")
    for step in range(warm.steps):
        input_ids, attention_mask, labels = _teacher_forcing_batch(
            task.sample(warm.batch_size, seed, STREAM_WARMSTART, step)
        )
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        loss = out.loss.item()
    info = {
        "seed": seed,
        "spec": asdict(spec),
        "warm_start": asdict(warm),
        "task": asdict(task),
        "parameters": sum(p.numel() for p in model.parameters()),
        "warm_start_final_loss": loss,
        "warm_start_sampled_accuracy": sampled_accuracy(model, task, 256, seed),
    }
    info["build_seconds"] = time.perf_counter() - start
    path = save_model_dir(out_dir, model, tokenizer, info)
    return path, info
