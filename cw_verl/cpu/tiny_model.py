"""A tiny causal LM and a character-level tokenizer, built locally (nothing is downloaded).

verl's engine loads its model with ``from_pretrained(path)`` and its tokenizer with
``AutoTokenizer.from_pretrained(path)``, so both are written to one directory that stands in for a
Hugging Face checkpoint. The model is a Llama shrunk to a few hundred thousand parameters: a model type
that vLLM, Hugging Face and verl's Megatron path (mbridge) all accept, with a head size (32) that vLLM's
CPU attention supports (32, 64, 80 and up). Not a Qwen2, although that is the paper's family: with
transformers 5, ``AutoTokenizer`` on a directory whose config says ``qwen2`` silently substitutes
``Qwen2Tokenizer`` for the saved tokenizer, which drops newlines and spaces.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
VOCAB_MULTIPLE = 8  # tensor parallelism up to 8 ranks
# verl's agent loop renders every prompt through the tokenizer's chat template. This one is the
# identity on a conversation's text: a prompt is exactly its messages' contents, no role markers, and
# the generation prompt adds nothing, so main_ppo's rollouts see what the harness's rollouts see.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    # head size hidden_size / num_attention_heads = 32, the smallest vLLM's CPU attention supports; two
    # key-value heads so that tensor parallelism of 2 (Megatron, vLLM) splits them evenly
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 64


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """One token per character of ``alphabet`` (ids from 2), ``<pad>`` (id 0), ``<eos>`` (id 1), ``<unk>``,
    then reserved tokens up to a multiple of :data:`VOCAB_MULTIPLE`.

    ``<unk>`` stands for any character outside the alphabet. Task code checks its own text
    (:func:`cw_verl.demo.task.encode` refuses foreign characters); the tokenizer itself must not fail on
    them, because vLLM's server renders a fixed "warmup" prompt through the chat template at start-up.
    """
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
    vocab = {PAD: 0, EOS: 1}
    vocab.update({ch: i + 2 for i, ch in enumerate(alphabet)})
    vocab[UNK] = len(vocab)
    # Megatron splits the embedding and output rows evenly over tensor-parallel ranks, and verl passes no
    # vocabulary padding to mbridge: reserved tokens make the vocabulary a multiple of VOCAB_MULTIPLE.
    while len(vocab) % VOCAB_MULTIPLE:
        vocab[f"<reserved_{len(vocab)}>"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token, so the word-level model maps characters to ids. "[\s\S]", not
    # ".": a regex dot never matches "\n", which would then silently vanish from the ids.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_causal_lm(vocab_size: int, spec: TinyModelSpec, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
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
    model = LlamaForCausalLM(config)
    # Sampling must come from the full tempered distribution (verl's rollout defaults), so that the
    # engine's recomputed log-probs are those of the sampling policy.
    model.generation_config = GenerationConfig(
        pad_token_id=0, eos_token_id=1, bos_token_id=1, do_sample=True, temperature=1.0, top_k=0, top_p=1.0
    )
    return model


def save_model_dir(path: str | Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, meta: dict) -> Path:
    """Write a checkpoint directory that verl's ``HFModelConfig(path=...)`` can load."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "cw_verl_tiny_model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def spec_dict(spec: TinyModelSpec) -> dict:
    return asdict(spec)
