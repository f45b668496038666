"""The tiny task as verl's trainer reads it: model directory, parquet rows, chat template, reward."""

import json

import pytest

from cw_verl.demo import assets
from cw_verl.demo.reward import compute_score
from cw_verl.demo.task import STREAM_EVAL, STREAM_RL, ReversalTask

SPEC = assets.AssetSpec(seed=3, train_prompts=64, val_prompts=16, warmstart_steps=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return root, *assets.build(root, SPEC)


def test_rows_are_what_verls_rl_dataset_reads_and_renders(built):
    """verl's own RLHFDataset on the train split, with the model directory's tokenizer and chat template."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    _, paths, _ = built
    tokenizer = AutoTokenizer.from_pretrained(paths.model_path)
    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 16, "filter_overlong_prompts": True})
    dataset = RLHFDataset(data_files=[str(paths.train_file)], tokenizer=tokenizer, config=config)
    assert len(dataset) == SPEC.train_prompts  # none filtered as over-long
    problems = ReversalTask().sample(SPEC.train_prompts, SPEC.seed, STREAM_RL, 0)
    item = dataset[5]
    assert item["data_source"] == "digit_reversal"
    assert item["reward_model"]["ground_truth"] == problems[5].answer
    rendered = tokenizer.apply_chat_template(item["raw_prompt"], add_generation_prompt=True, tokenize=True)
    ids = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
    assert list(ids) == problems[5].prompt_ids  # the identity template: the prompt's characters, nothing else


def test_val_split_comes_from_the_evaluation_stream(built):
    import pyarrow.parquet as pq

    _, paths, manifest = built
    rows = pq.read_table(paths.val_file).to_pylist()
    expected = ReversalTask().sample(SPEC.val_prompts, SPEC.seed, STREAM_EVAL, 0)
    assert [row["reward_model"]["ground_truth"] for row in rows] == [p.answer for p in expected]
    assert manifest["spec"]["val_prompts"] == SPEC.val_prompts


def test_build_reuses_a_matching_build_and_rebuilds_another(built, tmp_path):
    root, paths, _ = built
    stamp = paths.model_path.joinpath("model.safetensors").stat().st_mtime_ns
    assert assets.build(root, SPEC)[0] == paths
    assert paths.model_path.joinpath("model.safetensors").stat().st_mtime_ns == stamp
    other = assets.AssetSpec(seed=4, train_prompts=8, val_prompts=4, warmstart_steps=1)
    manifest = json.loads((root / assets.MANIFEST).read_text())
    assert manifest["spec"]["seed"] == 3
    assets.build(root, other)
    assert json.loads((root / assets.MANIFEST).read_text())["spec"]["seed"] == 4


def test_tokenizer_survives_vllms_warmup_prompt(built):
    """vLLM's server renders the text "warmup" through the chat template at start-up: foreign characters
    must map to <unk> rather than raise (they did with a vocabulary without one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[1].model_path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "warmup"}], tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == [tokenizer.unk_token_id] * len("warmup")


@pytest.mark.parametrize(
    ("response", "score"),
    [("1284", 1.0), ("4821", 0.0), ("12845", 0.0), ("128", 0.0), ("", 0.0), (" 1284", 0.0)],
)
def test_reward_is_exact_match_of_the_decoded_response(response, score):
    assert compute_score("digit_reversal", response, "1284", {}) == score


def test_reward_refuses_other_data_sources():
    with pytest.raises(ValueError, match="digit_reversal"):
        compute_score("gsm8k", "1", "1", {})
