"""cw_verl.cpu.supervise on stand-in commands: bounded waits, the exit status, and nothing left running.

The stand-ins behave like main_ppo where it matters: they log steps to a metrics file, start detached
processes in their own session (as Ray starts its GCS, raylet and workers), and carry process titles
like vLLM's engine. Each run is a real ``python -m cw_verl.cpu.supervise`` subprocess.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cw_verl.cpu.supervise import RUN_ID_ENV


def supervise(tmp_path: Path, script: str, *options: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cw_verl.cpu.supervise", "--metrics", str(tmp_path / "metrics.jsonl")]
    command += ["--report", str(tmp_path / "report.json"), *options, "--", "bash", "-c", script]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def tagged_anywhere() -> list[int]:
    """Live processes still carrying any supervisor tag that these tests created (their cwd is a pytest tmp dir)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = open(f"/proc/{entry.name}/environ", "rb").read()
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
        except OSError:
            continue
        if f"{RUN_ID_ENV}=".encode() in environ and "pytest" in cwd and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def no_process_left():
    """Whatever a test does, no tagged process outlives it (a failed assertion must not leak sleepers)."""
    yield
    leaked = tagged_anywhere()
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert leaked == [], f"processes left running: {leaked}"


STEP = 'echo \'{"step": 1, "data": {}}\' >> metrics.jsonl'


def test_a_finished_run_keeps_its_status_and_its_detached_processes_are_ended(tmp_path):
    # A "daemon" in its own session, as Ray's raylet: it outlives the command unless the supervisor ends it.
    result = supervise(tmp_path, f"{STEP}; setsid sleep 600 & echo $! > daemon.pid; {STEP}; exit 3")
    assert result.returncode == 3, result.stderr
    daemon = int((tmp_path / "daemon.pid").read_text())
    assert not alive(daemon)
    assert "terminated 1 process(es) the trainer left behind" in result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == 3 and report["limit_hit"] is None and report["peak_pss_gb"] >= 0
    assert report["command"][:2] == ["bash", "-c"]


def test_on_a_cluster_the_workers_handed_the_tag_are_ended_and_the_clusters_daemons_are_not(tmp_path):
    # Both started apart from the command, as a Ray cluster's raylet and the workers it starts for the run are;
    # only the "worker" carries the run's tag, as Ray's runtime_env hands it to the run's workers (--run-id).
    env = {k: v for k, v in os.environ.items() if k != RUN_ID_ENV}
    daemon = subprocess.Popen(["sleep", "600"], env=env, cwd=tmp_path, start_new_session=True)
    worker = subprocess.Popen(["sleep", "600"], env={**env, RUN_ID_ENV: "run-7"}, cwd=tmp_path, start_new_session=True)
    try:
        result = supervise(tmp_path, f"{STEP}; {STEP}", "--run-id", "run-7")
        assert result.returncode == 0, result.stderr
        assert worker.wait(timeout=30) == -signal.SIGTERM
        assert daemon.poll() is None
        assert json.loads((tmp_path / "report.json").read_text())["run_id"] == "run-7"
    finally:
        for proc in (daemon, worker):
            proc.kill()
            proc.wait()


def test_a_clean_run_exits_zero(tmp_path):
    result = supervise(tmp_path, f"{STEP}; {STEP}")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "report.json").read_text())["seconds_to_first_logged_step"] is not None


@pytest.mark.parametrize(
    ("script", "options", "message"),
    [
        ("setsid sleep 600 & sleep 600", ["--startup-timeout", "3"], "no training step was logged to"),
        (f"{STEP}; setsid sleep 600 & sleep 600", ["--step-timeout", "3"], "no new training step was logged"),
        (f"while true; do {STEP}; sleep 0.5; done", ["--timeout", "4"], "the run exceeded --timeout 4 s"),
    ],
    ids=["startup", "stalled-step", "total"],
)
def test_a_stalled_run_is_stopped_with_the_limit_named(tmp_path, script, options, message):
    start = time.monotonic()
    result = supervise(tmp_path, script, *options)
    assert result.returncode == 124
    assert message in result.stderr
    assert time.monotonic() - start < 60
    assert json.loads((tmp_path / "report.json").read_text())["limit_hit"].startswith(message.split(" to")[0])
    assert tagged_anywhere() == []


def test_losing_a_vllm_engine_stops_a_run_that_keeps_waiting(tmp_path):
    # A process titled like vLLM's engine core; the "trainer" then waits forever, as verl 0.9.1 does.
    script = f'{STEP}; (exec -a "VLLM::EngineCore" sleep 600) & echo $! > engine.pid; sleep 600'
    command = [sys.executable, "-m", "cw_verl.cpu.supervise", "--metrics", str(tmp_path / "metrics.jsonl")]
    command += ["--lost-process-grace", "3", "--", "bash", "-c", script]
    proc = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / "engine.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    engine = int(pid_file.read_text())
    time.sleep(2.5)  # the supervisor polls once a second: let it see the engine alive first
    os.kill(engine, signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 124
    assert f"the run lost VLLM::EngineCore (pid {engine})" in stderr
    assert time.monotonic() - killed < 30
    assert tagged_anywhere() == []


def test_a_worker_changing_its_title_is_not_a_lost_process(tmp_path):
    # Ray retitles an actor's process per method call ("ray::WorkerDict.update_actor" -> "ray::IDLE"...): the same
    # pid under a new title, which is not a loss. Here bash exec's itself under a new title, keeping its pid.
    worker = 'exec -a "ray::WorkerDict.update_actor" bash -c "sleep 3; exec -a ray::IDLE sleep 600"'
    result = supervise(tmp_path, f"{STEP}; ({worker}) & sleep 8; {STEP}", "--lost-process-grace", "2")
    assert result.returncode == 0, result.stderr
    assert "the run lost" not in result.stderr


def test_interrupting_the_supervisor_ends_the_run(tmp_path):
    command = [sys.executable, "-m", "cw_verl.cpu.supervise", "--metrics", str(tmp_path / "metrics.jsonl")]
    command += ["--", "bash", "-c", "setsid sleep 600 & echo $! > daemon.pid; sleep 600"]
    proc = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "daemon.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM)" in stderr
    assert not alive(int((tmp_path / "daemon.pid").read_text()))


def test_no_command_is_a_usage_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cw_verl.cpu.supervise", "--metrics", str(tmp_path / "m.jsonl")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "no command given" in result.stderr


def test_a_process_missing_from_the_first_reading_is_still_sent_sigterm_and_counted(tmp_path, monkeypatch):
    # A process forked by a dying parent, or mid-exec (its environ reads empty), can be missing from one reading
    # of /proc: it must get SIGTERM on the next reading, not wait for the SIGKILL at the end of the grace period.
    from cw_verl.cpu import supervise as supervise_module

    straggler = subprocess.Popen(["sleep", "600"], env={**os.environ, RUN_ID_ENV: "run-late"}, cwd=tmp_path)
    real_tagged_pids = supervise_module.tagged_pids
    readings = []

    def first_reading_misses_it(run_id, exclude=frozenset()):
        readings.append(run_id)
        return [] if len(readings) == 1 else real_tagged_pids(run_id, exclude)

    monkeypatch.setattr(supervise_module, "tagged_pids", first_reading_misses_it)
    try:
        assert supervise_module.terminate_tagged("run-late", grace_s=30.0) == 1
        assert straggler.wait(timeout=5) == -signal.SIGTERM
    finally:
        straggler.kill()
