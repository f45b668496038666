"""cw_verl.paper.data: verl-ready parquet files from local copies with the hub datasets' columns."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from recipe_helpers import FIXTURES

from cw_verl.paper import data

SOURCES = FIXTURES / "sources"


def rows(data_dir, key):
    return pq.read_table(data_dir / f"{key}.parquet").to_pylist()


def source_rows(key):
    return [json.loads(line) for line in (SOURCES / f"{key}.jsonl").read_text().splitlines()]


def test_every_set_is_written_with_verl_layout(data_dir):
    for key, source in data.SOURCES.items():
        written, raw = rows(data_dir, key), source_rows(key)
        assert len(written) == len(raw)
        for i, (row, rec) in enumerate(zip(written, raw, strict=True)):
            assert row["data_source"] == key
            assert row["prompt"] == [
                {"role": "system", "content": data.SYSTEM_PROMPT},
                {"role": "user", "content": rec[source.question_col]},
            ]
            assert row["reward_model"]["style"] == "rule"
            # The worked solution travels along where the set has one (the authors' reward reads its gold there).
            solution = {"solution": rec["solution"]} if rec.get("solution") else {}
            assert row["extra_info"] == {"split": source.split, "index": i, **solution}


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("open_rs", ["25", "1", "2, 3"]),
        ("aime24", ["400", "120"]),
        ("math500", ["11\\sqrt2", "4.5", "(-2, 2)"]),
        # Stored as floats on the hub: 6.0 -> "6".
        ("amc23", ["6", "27"]),
        # The last boxed answer of the solution, nested braces intact.
        ("minerva", ["10", "\\frac{1}{\\sqrt{2}}"]),
        ("olympiadbench", ["11", "$\\sqrt{2}$"]),
    ],
)
def test_ground_truths(data_dir, key, expected):
    assert [r["reward_model"]["ground_truth"] for r in rows(data_dir, key)] == expected


def test_system_prompt_is_the_papers_appendix_b_text():
    # The Open-RS string (verbatim, including its literal "\boxed{{}} .") that the paper's App. B shows.
    assert data.SYSTEM_PROMPT.startswith("A conversation between User and Assistant.")
    assert "within \\boxed{{}} . The reasoning process" in data.SYSTEM_PROMPT
    assert data.SYSTEM_PROMPT.endswith("Note that respond by English, NOT use other languages.")


def test_paper_sizes_are_enforced(tmp_path):
    with pytest.raises(SystemExit, match="aime24: 2 rows, the paper used 30"):
        data.main(["--out", str(tmp_path), "--source-dir", str(SOURCES), "--only", "aime24"])
    assert not (tmp_path / "aime24.parquet").exists()


def test_minerva_row_without_boxed_answer_is_an_error(tmp_path):
    (tmp_path / "minerva.jsonl").write_text(
        json.dumps({"problem": "p", "solution": "\\boxed{1}"})
        + "\n"
        + json.dumps({"problem": "q", "solution": "no box, or an unfinished \\boxed{2"})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"minerva: rows \[1\].*no \\boxed\{\} answer in 'solution'"):
        data.main(["--out", str(tmp_path / "out"), "--source-dir", str(tmp_path), "--only", "minerva"])


def test_wrong_columns_are_named(tmp_path):
    # OlympiadBench calls the problem "question"; a copy with "problem" is not the hub's dataset.
    (tmp_path / "olympiadbench.jsonl").write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"olympiadbench: columns \['question'\] missing"):
        data.main(["--out", str(tmp_path / "out"), "--source-dir", str(tmp_path), "--only", "olympiadbench"])


def test_missing_local_copy_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="amc23.jsonl nor amc23.parquet"):
        data.main(["--out", str(tmp_path / "out"), "--source-dir", str(tmp_path), "--only", "amc23"])


def test_verl_dataset_reads_the_files(data_dir, models):
    """verl's own RLHFDataset and collate path accept the files, as the trainer will use them."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tokenizer = AutoTokenizer.from_pretrained(models["r1_1p5b"])
    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 512, "filter_overlong_prompts": False})
    dataset = RLHFDataset([str(data_dir / "minerva.parquet")], tokenizer, config)
    item = dataset[1]
    assert item["raw_prompt"][0]["content"] == data.SYSTEM_PROMPT
    assert item["reward_model"]["ground_truth"] == "\\frac{1}{\\sqrt{2}}"
    assert item["data_source"] == "minerva"
    assert item["index"] == 1
