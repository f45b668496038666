"""The demo task: problem generation, encoding and the exact-match reward."""

import pytest

from cw_verl.cpu.tiny_model import build_char_tokenizer
from cw_verl.demo.task import (
    ALPHABET,
    EOS_ID,
    PAD_ID,
    STREAM_EVAL,
    STREAM_RL,
    Problem,
    ReversalTask,
    decode,
    encode,
    response_length,
    reward,
)


def test_problem_text_and_ids_follow_the_tokenizer():
    tokenizer = build_char_tokenizer(ALPHABET)
    problem = Problem("4821")
    assert (problem.prompt, problem.answer) == ("R4821=", "1284")
    assert problem.prompt_ids == tokenizer(problem.prompt).input_ids
    assert problem.answer_ids == tokenizer("1284").input_ids + [tokenizer.eos_token_id]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (PAD_ID, EOS_ID)
    assert decode(problem.answer_ids) == "1284<eos>"


def test_reward_is_exact_match_with_eos():
    problem = Problem("4821")
    right = problem.answer_ids
    assert reward(problem, right) == 1.0
    assert reward(problem, right + [PAD_ID, PAD_ID]) == 1.0  # padding after <eos> is not part of the response
    assert reward(problem, right + [encode("7")[0]]) == 1.0  # tokens after <eos> were never generated
    assert reward(problem, right[:-1]) == 0.0  # no <eos>
    assert reward(problem, right[:-1] + [encode("1")[0], EOS_ID]) == 0.0  # one digit too many
    assert reward(problem, encode("4821") + [EOS_ID]) == 0.0  # copied instead of reversed
    assert reward(problem, [EOS_ID]) == 0.0
    assert reward(problem, []) == 0.0
    # <pad> is an ordinary token before <eos>: a response containing it is wrong, not shorter.
    assert reward(problem, encode("12") + [PAD_ID] + encode("84") + [EOS_ID]) == 0.0


def test_response_length_counts_through_the_first_eos():
    assert response_length(encode("12") + [EOS_ID, PAD_ID, PAD_ID]) == 3
    assert response_length(encode("12") + [PAD_ID] + encode("3")) == 4
    assert response_length([EOS_ID, EOS_ID]) == 1


def test_sampling_is_deterministic_and_streams_differ():
    task = ReversalTask(min_digits=3, max_digits=7)
    first = task.sample(64, seed=5, stream=STREAM_RL, index=3)
    assert first == task.sample(64, seed=5, stream=STREAM_RL, index=3)
    assert first != task.sample(64, seed=5, stream=STREAM_RL, index=4)
    assert first != task.sample(64, seed=5, stream=STREAM_EVAL, index=3)
    assert first != task.sample(64, seed=6, stream=STREAM_RL, index=3)
    lengths = {len(p.digits) for p in task.sample(2000, seed=0, stream=STREAM_RL, index=0)}
    assert lengths == set(range(3, 8))
    assert all(p.digits.isdigit() for p in first)


def test_max_response_tokens_leaves_room_for_an_overlong_answer():
    task = ReversalTask(min_digits=2, max_digits=5)
    longest = Problem("12345")
    assert len(longest.answer_ids) == task.max_response_tokens - 1


@pytest.mark.parametrize(("low", "high"), [(0, 3), (4, 3)])
def test_task_rejects_bad_lengths(low, high):
    with pytest.raises(ValueError):
        ReversalTask(min_digits=low, max_digits=high)


def test_encode_rejects_foreign_characters():
    with pytest.raises(ValueError, match="not in the task alphabet"):
        encode("R12+3=")


def test_saved_tokenizer_round_trips_every_character_through_auto_tokenizer(tmp_path):
    """verl and vLLM load the tokenizer with AutoTokenizer from the model directory: what they read must
    give back every character, newlines and spaces included (a regex "." pre-tokenizer drops "\\n", and a
    qwen2-typed directory makes transformers substitute a tokenizer that drops whitespace)."""
    from transformers import AutoTokenizer

    from cw_verl.cpu.tiny_model import TinyModelSpec, build_tiny_causal_lm, save_model_dir

    alphabet = "ab \n\t=0"
    tokenizer = build_char_tokenizer(alphabet)
    save_model_dir(tmp_path, build_tiny_causal_lm(len(tokenizer), TinyModelSpec(), 0), tokenizer, {})
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "a b\n\n=0\t a"
    ids = loaded(text).input_ids
    assert len(ids) == len(text)
    assert loaded.decode(ids) == text
    assert ids == tokenizer(text).input_ids


def test_tiny_vocabulary_splits_evenly_over_tensor_parallel_ranks():
    """Megatron divides the embedding rows by the TP size and verl asks mbridge for no padding: the tiny
    vocabulary is padded with reserved tokens, and every id (reserved ones included) decodes."""
    from cw_verl.cpu.tiny_model import VOCAB_MULTIPLE
    from cw_verl.demo.task import ALPHABET

    for alphabet in (ALPHABET, "ab", "abcdefgh"):
        tokenizer = build_char_tokenizer(alphabet)
        assert len(tokenizer) % VOCAB_MULTIPLE == 0 and len(tokenizer) >= len(alphabet) + 3
        assert all(isinstance(tokenizer.decode([i]), str) for i in range(len(tokenizer)))
