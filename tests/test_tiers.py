"""The tier guard of tests/conftest.py, run in pytester sessions of its own (subprocesses, so that their
``RAY_TMPDIR`` stays theirs): a test without the ``e2e`` marker that starts Ray fails, one with it passes."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py").read_text()

pytest_plugins = ["pytester"]

# A Ray session as Ray lays it out (``$RAY_TMPDIR/ray/session_<time>_<pid>`` and the ``session_latest`` link).
FAKE_SESSION = """
import itertools
import os
from pathlib import Path

import pytest

PIDS = itertools.count(1)


def start_ray_session():
    sessions = Path(os.environ["RAY_TMPDIR"]) / "ray"
    session = sessions / f"session_2026-12-07_00-00-00_000000_{next(PIDS)}"
    session.mkdir(parents=True)
    (sessions / "session_latest").unlink(missing_ok=True)
    (sessions / "session_latest").symlink_to(session)


@pytest.fixture(scope="module")
def cluster():
    start_ray_session()


def test_plain():
    assert True


def test_starts_ray_unmarked():
    start_ray_session()


@pytest.mark.e2e
def test_starts_ray_marked():
    start_ray_session()


def test_fixture_starts_ray(cluster):
    assert True


def test_fixture_already_up(cluster):
    assert True
"""


def run_inner(pytester, source: str):
    pytester.makeconftest(CONFTEST)
    pytester.makeini(
        "[pytest]\nmarkers =\n    e2e: second tier\n    smoke: make test's launch\n"
        "asyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")


def test_a_ray_session_fails_an_unmarked_test_and_not_a_marked_one(pytester):
    result = run_inner(pytester, FAKE_SESSION)
    outcomes = result.parseoutcomes()
    # A teardown failure counts as an error beside the test's own pass.
    assert outcomes.get("errors") == 2 and outcomes.get("passed") == 5, result.stdout.str()
    text = result.stdout.str()
    assert "test_starts_ray_unmarked started Ray (1 session(s): session_2026-12-07" in text
    # The module fixture's cluster counts against the first test that used it, not the one after.
    assert "test_fixture_starts_ray started Ray" in text
    assert "test_fixture_already_up started Ray" not in text and "test_starts_ray_marked started Ray" not in text


@pytest.mark.e2e
def test_a_real_ray_start_is_seen(pytester):
    """The guard reads the directory real Ray writes (Ray's own ``ray.init``, one CPU, no dashboard)."""
    source = """
import ray


def test_real_ray():
    ray.init(num_cpus=1, include_dashboard=False)
    ray.shutdown()
"""
    result = run_inner(pytester, source)
    assert result.parseoutcomes().get("errors") == 1, result.stdout.str()
    assert "test_real_ray started Ray (1 session(s): session_" in result.stdout.str()
