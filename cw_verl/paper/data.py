"""Build verl-ready parquet files for the paper's training set and its five evaluation sets (Table 4).

    python -m cw_verl.paper.data --out ~/data/cw_grpo                      # from the Hugging Face Hub
    python -m cw_verl.paper.data --out DIR --source-dir LOCAL_COPIES       # offline, from local copies

With ``--source-dir``, each set is read from ``<dir>/<key>.jsonl`` or ``<dir>/<key>.parquet`` with the
hub dataset's own column names. Every row gets the layout verl's ``RLHFDataset`` and reward loop read:
``prompt`` (chat messages: the paper's App. B system prompt, then the problem), ``data_source`` (the
set's key), ``reward_model.ground_truth`` and ``extra_info``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from cw_verl.paper.answers import last_boxed

# Paper App. B, verbatim as Open-RS trained with it (recipes/grpo.yaml, knoveleng/open-rs): the YAML
# string "\\boxed{{}}" is a literal `\boxed{{}}` because open-r1 never str.format()s the system prompt.
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer, and put your final answer within \\boxed{{}} . The reasoning process and answer are "
    "enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. Note that respond by English, NOT use other "
    "languages."
)


@dataclass(frozen=True)
class Source:
    key: str  # output file stem and data_source tag
    hub_id: str
    split: str
    question_col: str
    answer_col: str
    answer_in_solution: bool  # the answer is the last \boxed{} of answer_col
    paper_size: int  # rows according to the paper (App. A / Table 4)


TRAIN = Source("open_rs", "knoveleng/open-rs", "train", "problem", "answer", False, 7000)
EVAL = (
    Source("aime24", "HuggingFaceH4/aime_2024", "train", "problem", "answer", False, 30),
    Source("math500", "HuggingFaceH4/MATH-500", "test", "problem", "answer", False, 500),
    Source("amc23", "knoveleng/AMC-23", "train", "problem", "answer", False, 40),
    Source("minerva", "knoveleng/Minerva-Math", "train", "problem", "solution", True, 272),
    Source("olympiadbench", "knoveleng/OlympiadBench", "train", "question", "answer", False, 675),
)
SOURCES = {s.key: s for s in (TRAIN, *EVAL)}


def answer_text(value: object) -> str:
    """Ground truth as a string; integral floats (some sets store 27 as 27.0) lose the ".0"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value).strip()
    raise TypeError(f"unexpected answer type {type(value).__name__}: {value!r}")


def build_rows(source: Source, records: list[dict]) -> list[dict]:
    missing = {source.question_col, source.answer_col} - set(records[0]) if records else set()
    if missing:
        raise ValueError(f"{source.key}: columns {sorted(missing)} missing; found {sorted(records[0])}")
    rows, bad = [], []
    for i, rec in enumerate(records):
        raw = rec[source.answer_col]
        try:
            answer = last_boxed(raw) if source.answer_in_solution else answer_text(raw)
        except TypeError as e:
            raise ValueError(f"{source.key}: row {i}: {e}") from e
        if not answer or not str(rec[source.question_col]).strip():
            bad.append(i)
            continue
        rows.append(
            {
                "data_source": source.key,
                "prompt": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": rec[source.question_col]},
                ],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": answer.strip()},
                "extra_info": {"split": source.split, "index": i, **_solution(rec)},
            }
        )
    if bad:
        what = f"no \\boxed{{}} answer in '{source.answer_col}'" if source.answer_in_solution else "empty fields"
        raise ValueError(f"{source.key}: rows {bad[:20]} ({len(bad)} in all) have {what}")
    return rows


def _solution(record: dict) -> dict:
    """The full worked solution, where the set has one: the authors' accuracy reward reads its gold from it
    (cw_verl.paper.authors_reward)."""
    solution = record.get("solution")
    return {"solution": solution} if isinstance(solution, str) and solution.strip() else {}


def load_records(source: Source, source_dir: Path | None) -> list[dict]:
    if source_dir is None:
        import datasets

        return datasets.load_dataset(source.hub_id, split=source.split).to_list()
    for suffix in (".jsonl", ".parquet"):
        path = source_dir / f"{source.key}{suffix}"
        if path.exists():
            return _read_table(path).to_pylist()
    raise FileNotFoundError(f"{source.key}: neither {source.key}.jsonl nor {source.key}.parquet in {source_dir}")


def _read_table(path: Path):
    import pyarrow.json
    import pyarrow.parquet

    return pyarrow.parquet.read_table(path) if path.suffix == ".parquet" else pyarrow.json.read_json(path)


def write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet

    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pa.Table.from_pylist(rows), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory for <key>.parquet files")
    parser.add_argument("--source-dir", type=Path, help="read local copies instead of the hub")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SOURCES)}")
    parser.add_argument(
        "--no-size-check", action="store_true", help="accept sets whose size differs from the paper's Table 4"
    )
    args = parser.parse_args(argv)

    keys = args.only.split(",") if args.only else list(SOURCES)
    unknown = [k for k in keys if k not in SOURCES]
    if unknown:
        parser.error(f"unknown set(s) {unknown}; choose from {list(SOURCES)}")
    for key in keys:
        source = SOURCES[key]
        rows = build_rows(source, load_records(source, args.source_dir))
        if not args.no_size_check and len(rows) != source.paper_size:
            raise SystemExit(
                f"{key}: {len(rows)} rows, the paper used {source.paper_size}; pass --no-size-check to write it anyway"
            )
        out = args.out / f"{key}.parquet"
        write_parquet(rows, out)
        print(f"{key}: {len(rows)} rows -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
