"""Launch ``recipes/run_cwgrpo_tiny_cpu.sh`` (verl's main_ppo on CPU) from tests, and inspect what it left.

Every launch carries a marker in its environment (``CW_VERL_TEST_RUN=<unique>``), which all its
processes inherit -- the supervisor, main_ppo, Ray's daemons and workers, vLLM's engines -- so a test can
find them (to kill a vLLM engine, or to assert that none outlived the run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "run_cwgrpo_tiny_cpu.sh"
MARKER = "CW_VERL_TEST_RUN"


@dataclass
class TinyRun:
    name: str
    marker: str
    run_dir: Path
    log: Path
    returncode: int | None = None
    seconds: float = 0.0
    notes: dict = field(default_factory=dict)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics_files(self) -> list[Path]:
        return sorted((self.run_dir / "metrics").glob("*.jsonl"))

    def steps(self, path: Path | None = None) -> dict[int, dict]:
        """Logged metrics per step (lines of one step merged) of the newest metrics file, or of ``path``."""
        path = path or self.metrics_files()[-1]
        rows: dict[int, dict] = {}
        for line in path.read_text().splitlines():
            record = json.loads(line)
            rows.setdefault(record["step"], {}).update(record["data"])
        return rows

    def report(self) -> dict:
        return json.loads(self.metrics_files()[-1].with_suffix(".run.json").read_text())


def recipe_env(root: Path, tiny_dir: Path, name: str, **settings: str) -> tuple[dict, str]:
    marker = f"{name}-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARM", "TOTAL_", "ACTOR_", "VERL_"))}
    env.update(
        PYTHON=sys.executable,
        TINY_DIR=str(tiny_dir),
        RUN_ROOT=str(root),
        PROJECT="e2e",
        EXPERIMENT=name,
        **{MARKER: marker},
    )
    env.update(settings)
    return env, marker


def start(root: Path, tiny_dir: Path, name: str, *overrides: str, **settings: str) -> tuple[TinyRun, subprocess.Popen]:
    env, marker = recipe_env(root, tiny_dir, name, **settings)
    run = TinyRun(name=name, marker=marker, run_dir=root / "e2e" / name, log=root / f"{name}.{marker}.log")
    sink = open(run.log, "w")
    # In root: Hydra writes its outputs/ directory into the working directory.
    proc = subprocess.Popen(["bash", str(RECIPE), *overrides], env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=root)
    sink.close()
    run.notes["started"] = time.monotonic()
    return run, proc


def finish(run: TinyRun, proc: subprocess.Popen, timeout: float) -> TinyRun:
    try:
        run.returncode = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - run.notes["started"])))
    except subprocess.TimeoutExpired:
        kill_marked(run.marker)
        proc.wait(timeout=60)
        raise
    finally:
        run.seconds = time.monotonic() - run.notes["started"]
    return run


def launch(root: Path, tiny_dir: Path, name: str, *overrides: str, timeout: float = 1800, **settings: str) -> TinyRun:
    run, proc = start(root, tiny_dir, name, *overrides, **settings)
    return finish(run, proc, timeout)


def rewind_to_checkpoint(run: TinyRun, step: int) -> None:
    """Leave ``run`` as a run that died right after step ``step``'s checkpoint: step ``step + 1``'s checkpoint
    removed (it must exist, as must ``step``'s) and verl's ``latest_checkpointed_iteration.txt``, from which a
    relaunch resumes, pointing at ``step``."""
    checkpoints = run.run_dir / "checkpoints"
    assert (checkpoints / f"global_step_{step}").is_dir() and (checkpoints / f"global_step_{step + 1}").is_dir()
    shutil.rmtree(checkpoints / f"global_step_{step + 1}")
    (checkpoints / "latest_checkpointed_iteration.txt").write_text(str(step))


def loss_capture_settings(root: Path, name: str = "loss_calls") -> dict[str, str]:
    """Launch settings that record every policy-loss call of the run's actor workers under ``root / name``
    (``tests/trainer/loss_capture_hook.py``, installed as the ``sitecustomize`` of a folder put first on
    ``PYTHONPATH``, which Ray's workers inherit)."""
    hook_dir = root / f"{name}_hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text((Path(__file__).parent / "loss_capture_hook.py").read_text())
    return {
        "PYTHONPATH": os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]),
        "CW_VERL_TEST_CAPTURE_DIR": str(root / name),
    }


def marked_processes(marker: str) -> dict[int, str]:
    """Live processes carrying ``marker``, with their titles."""
    needle = f"{MARKER}={marker}".encode()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry.name}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                found[int(entry.name)] = f.read().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
    return found


def kill_marked(marker: str) -> list[int]:
    pids = list(marked_processes(marker))
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return pids


def wait_for_steps(run: TinyRun, proc: subprocess.Popen, count: int, timeout: float) -> bool:
    """Wait until the run has logged ``count`` training steps; False if it ended or timed out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        files = run.metrics_files() if run.run_dir.exists() else []
        if files and sum(1 for s, row in run.steps(files[-1]).items() if s > 0 and "critic/score/mean" in row) >= count:
            return True
        time.sleep(1.0)
    return False
