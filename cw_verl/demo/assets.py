"""The tiny task as verl's trainer reads it: a model directory, parquet data and a reward function.

    python -m cw_verl.demo.assets --out DIR [--seed S]

writes (or reuses, when built with the same settings) ``DIR/model`` (the warm-started tiny Llama of
:mod:`cw_verl.demo.warmstart`, whose tokenizer carries an identity chat template),
``DIR/data/train.parquet`` and ``DIR/data/val.parquet`` in the layout of verl's ``RLHFDataset``
(``data_source``, ``prompt`` as chat messages, ``reward_model.ground_truth``, ``extra_info``), and
prints their paths. ``recipes/run_cwgrpo_tiny_cpu.sh`` calls it on first use; the reward is
:func:`cw_verl.demo.reward.compute_score`. Training prompts come from the RL stream of
:class:`cw_verl.demo.task.ReversalTask`, validation prompts from its evaluation stream, the
warm-start from a third stream: the three never overlap by construction.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from cw_verl.demo.task import STREAM_EVAL, STREAM_RL, Problem, ReversalTask

DATA_SOURCE = "digit_reversal"
MANIFEST = "assets.json"


@dataclass(frozen=True)
class AssetSpec:
    seed: int = 0
    train_prompts: int = 8192
    val_prompts: int = 256
    warmstart_steps: int = 120

    @property
    def task(self) -> ReversalTask:
        return ReversalTask()


@dataclass(frozen=True)
class Assets:
    model_path: Path
    train_file: Path
    val_file: Path

    @classmethod
    def under(cls, root: Path) -> Assets:
        return cls(root / "model", root / "data" / "train.parquet", root / "data" / "val.parquet")


def rows(problems: list[Problem], split: str) -> list[dict]:
    """verl ``RLHFDataset`` rows: the chat messages, the reward's ground truth, and where the row came from."""
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": p.prompt}],
            "ability": "reversal",
            "reward_model": {"style": "rule", "ground_truth": p.answer},
            "extra_info": {"split": split, "index": i, "digits": p.digits},
        }
        for i, p in enumerate(problems)
    ]


def _write_parquet(path: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)


def build(root: str | Path, spec: AssetSpec = AssetSpec()) -> tuple[Assets, dict]:
    """Build the model and data under ``root``, or reuse them if ``root`` holds the same spec's build."""
    root = Path(root).resolve()
    assets = Assets.under(root)
    manifest_path = root / MANIFEST
    wanted = {"spec": asdict(spec), "task": asdict(spec.task)}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        complete = all(p.exists() for p in (assets.model_path / "config.json", assets.train_file, assets.val_file))
        if complete and {k: manifest.get(k) for k in wanted} == wanted:
            return assets, manifest
    from cw_verl.cpu.tiny_model import TinyModelSpec
    from cw_verl.demo.warmstart import WarmStart, build_demo_model

    task = spec.task
    _, model_info = build_demo_model(
        assets.model_path, task, TinyModelSpec(), WarmStart(steps=spec.warmstart_steps), spec.seed
    )
    # One sampling call per split: each split is one deterministic draw of its stream.
    _write_parquet(assets.train_file, rows(task.sample(spec.train_prompts, spec.seed, STREAM_RL, 0), "train"))
    _write_parquet(assets.val_file, rows(task.sample(spec.val_prompts, spec.seed, STREAM_EVAL, 0), "val"))
    manifest = wanted | {"model": model_info, "paths": {k: str(v) for k, v in asdict(assets).items()}}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return assets, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cw_verl.demo.assets", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for model/ and data/")
    parser.add_argument("--seed", type=int, default=AssetSpec.seed)
    parser.add_argument("--train-prompts", type=int, default=AssetSpec.train_prompts)
    parser.add_argument("--val-prompts", type=int, default=AssetSpec.val_prompts)
    args = parser.parse_args(argv)
    spec = AssetSpec(seed=args.seed, train_prompts=args.train_prompts, val_prompts=args.val_prompts)
    assets, manifest = build(args.out, spec)
    print(f"model: {assets.model_path}")
    print(f"train: {assets.train_file}")
    print(f"val: {assets.val_file}")
    print(f"warm-start sampled accuracy: {manifest['model']['warm_start_sampled_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
