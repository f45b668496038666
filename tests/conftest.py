"""The two test tiers, and the guard that keeps Ray out of the fast one.

Tiers (Makefile): ``make test`` runs ``-m "not e2e or smoke"`` (the fast tier plus the one launch marked
``smoke``); ``make test-e2e`` runs ``-m "e2e and not smoke"``; ``make test-all`` runs every test once.

The guard: a test that starts Ray (in this process or in any subprocess, e.g. a recipe launch) must carry the
``e2e`` marker, so that a new launch cannot slip into the fast tier. Ray writes one ``session_*`` directory per
cluster it starts under ``$RAY_TMPDIR/ray`` (``ray._common.utils.get_default_system_temp_dir``, Ray 2.x); this
file points ``RAY_TMPDIR`` at a directory of its own for the whole run (inherited by every subprocess) and
fails the test during whose setup, call or teardown a new session appeared. A module fixture that starts Ray
counts against the first test that uses it, which in the fast tier is a fast-tier test: the run catches it.
Self-contained (no import of the ``tests`` package): ``tests/test_tiers.py`` runs it in a pytester session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

RAY_SESSIONS_KEY = pytest.StashKey[set]()
_ray_root: Path | None = None


def ray_sessions(root: Path) -> set[str]:
    """Names of the Ray sessions started under ``RAY_TMPDIR=root``."""
    sessions = root / "ray"
    return {p.name for p in sessions.glob("session_*") if p.name != "session_latest"} if sessions.is_dir() else set()


def pytest_configure(config):
    global _ray_root
    # Short: Ray's Unix socket paths live under it (the kernel caps them at 107 bytes).
    _ray_root = Path(tempfile.mkdtemp(prefix="cwray-"))
    os.environ["RAY_TMPDIR"] = str(_ray_root)


def pytest_unconfigure(config):
    if _ray_root is not None:
        shutil.rmtree(_ray_root, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[RAY_SESSIONS_KEY] = ray_sessions(_ray_root)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if call.when != "teardown" or item.get_closest_marker("e2e") is not None:
        return report
    started = sorted(ray_sessions(_ray_root) - item.stash.get(RAY_SESSIONS_KEY, set()))
    if started:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} started Ray ({len(started)} session(s): {', '.join(started)}) without the `e2e` "
            "marker: a test that starts Ray belongs to the e2e tier (tests/conftest.py)"
        )
    return report


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """The tiny task's model and data (``cw_verl.demo.assets`` at its default spec: the warm-started demo
    policy, seed 0), built once per run. Every test that trains or launches on the demo policy reads it, and
    ``recipes/run_cwgrpo_tiny_cpu.sh`` given ``TINY_DIR=<this>`` reuses the build (its manifest matches)."""
    from cw_verl.demo import assets

    root = tmp_path_factory.mktemp("tiny_assets")
    assets.build(root)
    return root
