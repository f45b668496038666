"""Fixtures for the recipe tests. Nothing here touches the network or a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from recipe_helpers import FIXTURES, make_model


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        # The two models' real position limits and generation prompts.
        "qwen7b": make_model(root / "Qwen2.5-Math-7B-Instruct", 4096, "qwen_math"),
        "r1_1p5b": make_model(root / "DeepSeek-R1-Distill-Qwen-1.5B", 131072, "r1_distill"),
    }


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    from cw_verl.paper import data

    out = tmp_path_factory.mktemp("data")
    assert data.main(["--out", str(out), "--source-dir", str(FIXTURES / "sources"), "--no-size-check"]) == 0
    return out
