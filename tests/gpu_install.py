"""Resolve pyproject's ``gpu`` extra for a GPU cluster from this machine (no GPU, no wheel downloaded).

``python -m tests.gpu_install [--python-version 3.12]`` prints the lock that ``make gpu-lock`` commits as
``recipes/gpu-linux-x86_64-py312.txt``. uv resolves for another platform than the one it runs on; the
package index is read as it was on :data:`EXCLUDE_NEWER` (move the date forward when the pins change, then
``make gpu-lock``). That keeps most of the set still, not all of it: an index can list a release late, so the
test checks that the lock is a resolution of pyproject, not that a fresh resolve reproduces it line by line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "recipes" / "gpu-linux-x86_64-py312.txt"
# glibc 2.35: Ubuntu 22.04, the base of verl's CUDA images; vLLM's dependencies ship manylinux_2_31 wheels.
PLATFORM = "x86_64-manylinux_2_35"
EXCLUDE_NEWER = "2026-12-03T00:00:00Z"
PYTHON_VERSIONS = ("3.10", "3.11", "3.12")


def uv() -> str:
    """The uv of this environment (the ``test`` extra installs it), else one on PATH."""
    local = Path(sysconfig.get_path("scripts")) / "uv"
    found = str(local) if local.exists() else shutil.which("uv")
    if found is None:
        raise FileNotFoundError("uv is not installed: pip install uv (cw_verl's `test` extra has it)")
    return found


def resolve(python_version: str = "3.12", *extra: str) -> subprocess.CompletedProcess:
    """``uv pip compile pyproject.toml --extra gpu`` for Linux x86_64 and ``python_version`` (+ ``extra`` options)."""
    command = [
        uv(),
        "pip",
        "compile",
        "pyproject.toml",
        "--extra",
        "gpu",
        "--python-platform",
        PLATFORM,
        "--python-version",
        python_version,
        "--exclude-newer",
        EXCLUDE_NEWER,
        "--custom-compile-command",
        "make gpu-lock",
        "--quiet",
        *extra,
    ]
    # The target interpreter need not exist here; uv must not try to download one (no network but the index).
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def pins(lock_text: str) -> dict[str, str]:
    """``{name: version}`` of a lock's ``name==version`` lines."""
    found = {}
    for line in lock_text.splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split("==", 1)
            found[name.strip().lower().replace("_", "-")] = version.split(";")[0].strip()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python-version", default="3.12")
    args = parser.parse_args(argv)
    result = resolve(args.python_version)
    sys.stderr.write(result.stderr)
    sys.stdout.write(result.stdout)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
