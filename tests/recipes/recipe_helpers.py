"""Helpers for the recipe tests: tiny local "models" and recipe runs (no network, no GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
FIXTURES = Path(__file__).parent / "fixtures"

# Simplified chat templates that reproduce what matters here, the end of the generation prompt: the
# DeepSeek-R1-Distill template opens a think block, the Qwen2.5-Math one does not.
TEMPLATES = {
    "r1_distill": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}",
    "qwen_math": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}


def make_model(path: Path, max_position_embeddings: int, template: str) -> Path:
    """A Hugging Face model directory with a config.json and a word-level tokenizer: enough for verl's
    HFModelConfig (which loads both) and for rendering the chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(["<unk>", "<eos>", "<think>", "</think>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = TEMPLATES[template]
    fast.save_pretrained(path)
    config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": len(vocab),
        "max_position_embeddings": max_position_embeddings,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


SCRIPTS = {"qwen7b": RECIPES / "run_cwgrpo_qwen7b.sh", "r1_1p5b": RECIPES / "run_cwgrpo_r1distill_1p5b.sh"}


def recipe_env(tmp_path: Path, model: Path, data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARM", "MAX_", "NNODES", "GPUS_", "ACTOR_"))}
    env.update(
        DRY_RUN="1",
        PYTHON=sys.executable,
        MODEL_PATH=str(model),
        DATA_DIR=str(data),
        RUN_ROOT=str(tmp_path / "runs"),
        # verl's CPU platform probe is noisy but harmless here; keep the GPU path out of the picture.
        CUDA_VISIBLE_DEVICES="",
        # This box is not a GPU node: the workers' GPU packages (TransformerEngine) are not here by design.
        # tests/recipes/test_bridge.py runs the import check itself.
        CHECK_IMPORTS="0",
    )
    env.update(extra)
    return env


def start_recipe(model_key: str, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(SCRIPTS[model_key]), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_recipes(
    runs: dict[str, tuple[str, dict[str, str], list[str]]], parallel: int = os.cpu_count() or 1
) -> dict[str, subprocess.CompletedProcess]:
    """Run recipes ``parallel`` at a time: a dry run spends ~5-10 s of one core importing verl (~0.5 GB)."""
    pending, running, done = list(runs.items()), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, (key, env, args) = pending.pop(0)
            running[name] = start_recipe(key, env, *args)
        name, proc = next(iter(running.items()))
        out, err = proc.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        del running[name]
    return done


def flatten(node, prefix=""):
    """A dumped config (nested dicts) as ``{"a.b.c": value}``, to compare two recipes' settings key by key."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}
