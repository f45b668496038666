"""A tiny causal LM and a character-level tokenizer, built locally (nothing is downloaded).

verl's engine loads its model with ``from_pretrained(path)`` and its tokenizer with
``AutoTokenizer.from_pretrained(path)``, so both are written to one directory that stands in for a
Hugging Face checkpoint. The model is a Qwen2 (the family of the paper's DeepSeek-R1-Distill-Qwen)
shrunk to a few hundred thousand parameters.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD, EOS = "<pad>", "<eos>"


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 64


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """One token per character of ``alphabet``, plus ``<pad>`` (id 0) and ``<eos>`` (id 1)."""
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
    vocab = {PAD: 0, EOS: 1}
    vocab.update({ch: i + 2 for i, ch in enumerate(alphabet)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    # Every character is its own pre-token, so the word-level model maps characters to ids.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS)
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_causal_lm(vocab_size: int, spec: TinyModelSpec, seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        # Untied: verl then initialises the FSDP2 model on the meta device on ranks > 0 and
        # broadcasts rank 0's weights, the path large models take.
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Sampling must come from the full tempered distribution (verl's rollout defaults), so that the
    # engine's recomputed log-probs are those of the sampling policy.
    model.generation_config = GenerationConfig(
        pad_token_id=0, eos_token_id=1, bos_token_id=1, do_sample=True, temperature=1.0, top_k=0, top_p=1.0
    )
    return model


def save_model_dir(path: str | Path, model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, meta: dict) -> Path:
    """Write a checkpoint directory that verl's ``HFModelConfig(path=...)`` can load."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "cw_verl_tiny_model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def spec_dict(spec: TinyModelSpec) -> dict:
    return asdict(spec)
