"""Run verl's trainer with bounded waits and leave no process behind.

    python -m cw_verl.cpu.supervise --metrics FILE [--startup-timeout S] [--step-timeout S]
        [--timeout S] [--run-id ID] -- python -m verl.trainer.main_ppo ...

``main_ppo`` on a small machine can stop making progress without exiting: a Ray actor that cannot be
scheduled waits forever (e.g. TransferQueue's storage actors taking every logical CPU), a failed
weight sync left it hanging in the scratch run of the facts file, and a killed driver leaves Ray's
daemons and workers (and vLLM's engine processes) running, holding gigabytes. This supervisor:

* tags the command's environment with a unique ``CW_VERL_RUN_ID``, which every process it starts
  inherits -- Ray's GCS and raylet, every Ray worker, every vLLM server and engine process -- so that
  exactly this run's processes can be found in ``/proc`` and nothing else is touched. On a Ray cluster
  started apart from the launch (``RAY_ADDRESS``), Ray's daemons are not the run's and do not carry the
  tag, and its workers are started by their node's raylet: they carry it only if the command hands it to
  them through Ray's ``runtime_env`` (``--run-id`` names the tag the command uses; the recipes do so).
  Ending the driver ends the run's job, and Ray then ends the job's actors on every node; the
  supervisor also ends the tagged workers on its own host itself;
* watches progress through verl's metrics JSONL (``trainer.logger`` with ``file``; one line per
  logged step): no first line within ``--startup-timeout`` seconds, or no new line within
  ``--step-timeout`` seconds, or more than ``--timeout`` seconds in all, and the run is stopped with a
  message saying which limit was hit;
* watches the run's serving and training processes (vLLM's ``VLLM::EngineCore``/``VLLM::Worker``,
  Ray's ``WorkerDict``, ``vLLMHttpServer``, agent-loop and reward workers): verl 0.9.1 does not notice
  a dead vLLM engine and waits forever for its answers, so when one of them disappears while the
  trainer is still running and the trainer has not exited ``--lost-process-grace`` seconds later, the
  run is stopped with a message naming the lost process (a normal shutdown ends the trainer first);
* when the command ends (exit, crash, limit, or Ctrl-C/SIGTERM of the supervisor), terminates every
  process carrying the tag (SIGTERM, then SIGKILL after a grace period) and reports how many were left;
* exits with the command's status, or 124 when a limit was hit, 130/143 when interrupted;
* with ``--report FILE``, writes a JSON summary: status, wall seconds, seconds to the first logged
  step, and the run's peak memory (the sum of its processes' proportional set sizes, sampled every few
  seconds, so shared libraries are counted once).

Linux only (``/proc``). The command's own output passes through unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

RUN_ID_ENV = "CW_VERL_RUN_ID"
EXIT_LIMIT = 124
# Process titles (``/proc/<pid>/cmdline``) that vLLM and Ray give the processes a run cannot lose.
CRITICAL_TITLES = (
    "VLLM::EngineCore",
    "VLLM::Worker",
    "ray::WorkerDict",
    "ray::vLLMHttpServer",
    "ray::AgentLoopWorker",
    "ray::RewardLoopWorker",
    "ray::TaskRunner",
)


@dataclass(frozen=True)
class Limits:
    startup_s: float = 900.0
    step_s: float = 300.0
    total_s: float = 7200.0
    lost_process_grace_s: float = 30.0


def tagged_pids(run_id: str, exclude: set[int] = frozenset()) -> list[int]:
    """Pids of live processes whose environment has ``CW_VERL_RUN_ID=<run_id>`` (other users' are unreadable)."""
    needle = f"{RUN_ID_ENV}={run_id}".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
        except OSError:  # gone, or not ours
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def terminate_tagged(run_id: str, grace_s: float = 10.0) -> int:
    """SIGTERM every tagged process, SIGKILL what is left after ``grace_s``; returns how many were found.

    The table is read until two readings in a row find no tagged process, and each process seen for the first
    time is sent SIGTERM then: a process can be missing from one reading (forked by a dying parent, or
    mid-``exec``, when ``/proc/<pid>/environ`` reads empty) and must not be left to the SIGKILL at the end.
    """
    me = {os.getpid()}
    signalled: set[int] = set()
    deadline = time.monotonic() + grace_s
    previous_reading_empty = False
    while time.monotonic() < deadline:
        pids = set(tagged_pids(run_id, me))
        if not pids and previous_reading_empty:
            break
        for pid in pids - signalled:
            _signal(pid, signal.SIGTERM)
            signalled.add(pid)
        previous_reading_empty = not pids
        time.sleep(0.2)
    for pid in tagged_pids(run_id, me):
        _signal(pid, signal.SIGKILL)
        signalled.add(pid)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and tagged_pids(run_id, me):
        time.sleep(0.2)
    return len(signalled)


def critical_processes(pids: list[int]) -> dict[int, str]:
    """The pids among ``pids`` whose process title starts with one of :data:`CRITICAL_TITLES`, with that title."""
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0", 1)[0].decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith(CRITICAL_TITLES):
            found[pid] = title
    return found


def pss_bytes(pids: list[int]) -> int:
    """Sum of the processes' proportional set sizes (``/proc/<pid>/smaps_rollup``): shared pages counted once."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            continue
    return total


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _say(message: str) -> None:
    print(f"[cw_verl.supervise] {message}", file=sys.stderr, flush=True)


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def supervise(
    command: list[str],
    metrics: Path,
    limits: Limits,
    poll_s: float = 1.0,
    report: Path | None = None,
    run_id: str | None = None,
) -> int:
    """Run ``command`` under ``limits`` (see the module docstring); returns the exit status to use."""
    run_id = run_id or uuid.uuid4().hex
    env = dict(os.environ, **{RUN_ID_ENV: run_id})
    start = time.monotonic()

    def on_signal(signum, frame):
        raise _Interrupted(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    status = None
    reason = None
    peak_pss, first_step_s, last_memory_sample = 0, None, 0.0
    # Lines already in the file (a metrics file that is not fresh) are not progress of this run.
    baseline = _lines(metrics)
    seen, last_progress = baseline, start
    try:
        # Its own session: a Ctrl-C in the terminal reaches the supervisor, which then stops everything in order.
        proc = subprocess.Popen(command, env=env, start_new_session=True)
        watched: dict[int, str] = {}
        lost: tuple[int, str, float] | None = None
        while status is None:
            try:
                status = proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            lines = _lines(metrics)
            if lines > seen:
                seen, last_progress = lines, now
                if first_step_s is None:
                    first_step_s = now - start
            pids = tagged_pids(run_id, {os.getpid()})
            if now - last_memory_sample >= 5.0:
                peak_pss, last_memory_sample = max(peak_pss, pss_bytes(pids)), now
            if lost is None:
                # Gone from the process table (a title change, e.g. an actor's method ending, is not a loss).
                running = set(pids)
                gone = [pid for pid in watched if pid not in running]
                if gone:  # reported only if the trainer outlives the grace period (a shutdown ends it first)
                    lost = (gone[0], watched[gone[0]], now)
            watched.update(critical_processes(pids))
            if now - start > limits.total_s:
                reason = f"the run exceeded --timeout {limits.total_s:.0f} s"
            elif seen == baseline and now - start > limits.startup_s:
                reason = f"no training step was logged to {metrics} within --startup-timeout {limits.startup_s:.0f} s"
            elif seen > baseline and now - last_progress > limits.step_s:
                reason = (
                    f"no new training step was logged to {metrics} for --step-timeout {limits.step_s:.0f} s "
                    f"({seen - baseline} logged)"
                )
            elif lost is not None and now - lost[2] > limits.lost_process_grace_s:
                reason = (
                    f"the run lost {lost[1]} (pid {lost[0]}) and the trainer did not exit within "
                    f"--lost-process-grace {limits.lost_process_grace_s:.0f} s"
                )
            if reason is not None:
                _say(f"ERROR: {reason}; stopping the trainer and every process it started")
                status = EXIT_LIMIT
    except _Interrupted as interrupted:
        _say(f"interrupted ({interrupted}); stopping the trainer and every process it started")
        status = 128 + interrupted.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        left = terminate_tagged(run_id)
        if left:
            _say(f"terminated {left} process(es) the trainer left behind (Ray, vLLM, workers)")
    elapsed = time.monotonic() - start
    if first_step_s is None and _lines(metrics) > baseline:  # logged after the last poll
        first_step_s = elapsed
    status = 1 if status is None else status
    if status != 0 and reason is None:
        _say(f"the trainer exited with status {status} after {elapsed:.0f} s")
    if report is not None:
        summary = {
            "status": status,
            "run_id": run_id,
            "limit_hit": reason,
            "wall_seconds": elapsed,
            "seconds_to_first_logged_step": first_step_s,
            "peak_pss_gb": peak_pss / 2**30,
            "command": command,
        }
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(summary, indent=2))
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cw_verl.cpu.supervise",
        description=__doc__.splitlines()[0],
        usage="%(prog)s --metrics FILE [options] -- COMMAND...",
    )
    parser.add_argument("--metrics", required=True, type=Path, help="verl's metrics JSONL (VERL_FILE_LOGGER_PATH)")
    parser.add_argument("--startup-timeout", type=float, default=Limits.startup_s, help="seconds to the first step")
    parser.add_argument("--step-timeout", type=float, default=Limits.step_s, help="seconds between logged steps")
    parser.add_argument("--timeout", type=float, default=Limits.total_s, help="seconds for the whole run")
    parser.add_argument(
        "--lost-process-grace",
        type=float,
        default=Limits.lost_process_grace_s,
        help="seconds the trainer may keep running after losing a vLLM engine or a Ray worker",
    )
    parser.add_argument("--report", type=Path, help="write a JSON summary here (status, times, peak memory)")
    parser.add_argument(
        "--run-id",
        help=f"the {RUN_ID_ENV} tag (default: a new one); give the one the command also hands to Ray's workers",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    limits = Limits(
        startup_s=args.startup_timeout,
        step_s=args.step_timeout,
        total_s=args.timeout,
        lost_process_grace_s=args.lost_process_grace,
    )
    return supervise(command, args.metrics, limits, report=args.report, run_id=args.run_id)


if __name__ == "__main__":
    sys.exit(main())
