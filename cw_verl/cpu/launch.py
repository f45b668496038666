"""Start N gloo ranks on this machine, run a function in each, and never hang.

A torchrun-like launcher inside Python: ``run_ranks(fn, world_size, *args)`` starts ``world_size``
processes, sets the ``torch.distributed`` environment verl's ``Worker`` reads (RANK, WORLD_SIZE,
MASTER_ADDR/PORT, LOCAL_RANK...), selects the CPU platform, initialises a gloo process group and calls
``fn(rank, world_size, *args)``. It returns the ranks' return values in rank order. When a rank fails,
the others are killed and the failing rank's traceback is raised; past ``timeout_s`` every rank is killed
and ``TimeoutError`` is raised; a rank also ends when the launching process does.

Ranks come from multiprocessing's ``forkserver``: a clean process (not a fork of the caller, so no rank
inherits the caller's threads or verl state) that imports the heavy third-party libraries once
(``PRELOAD``) and forks each rank from there. A spawned rank spent ~5-10 s of one core importing them, more
than most test updates take. verl itself (its import loads the verl plugins, which depends on the
environment) and cw_verl are imported in the rank, after the rank has taken the caller's environment of
this call (the fork server's is the one it started with).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

# Imported once in the fork server. Each reads no setting the callers vary (VERL_*, CW_VERL_*, HF_*) at
# import time; a module missing here is skipped by multiprocessing.
PRELOAD = ("torch", "tensordict", "transformers", "datasets", "megatron.core", "ray")
# verl's CPU platform, known to every rank (and to the fork server) before any verl import.
PLATFORM_ENV = {"VERL_PLATFORM": "cpu", "VERL_ENGINE_DEVICE": "cuda"}


class RankFailed(RuntimeError):
    """A rank raised; the message carries its traceback."""


def free_port() -> int:
    # Bound and released right away: another process could take it before rank 0 listens, which
    # then fails loudly at rendezvous rather than hanging.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_launcher(launcher: int) -> None:
    """Linux: end this rank when the launching process ends, even by SIGKILL.

    Without it, a launcher killed from outside leaves its ranks running, each holding a CPU core and a port.
    The rank's parent is the fork server, which outlives the launcher while any rank it forked lives (each
    rank holds the server's "alive" pipe), so the parent-death signal would not carry the launcher's death: a
    daemon thread waits on a pidfd of the launcher instead.
    """
    if not sys.platform.startswith("linux"):
        return
    import select
    import signal
    import threading

    try:
        launcher_fd = os.pidfd_open(launcher)
    except ProcessLookupError:
        # The launcher died before this rank started watching it.
        raise SystemExit(1) from None

    def watch() -> None:
        select.select([launcher_fd], [], [])  # readable once the launcher has exited
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="cw_verl-launcher-watch", daemon=True).start()


def _rank_main(fn, rank, world_size, port, threads, collective_timeout_s, args, results, launcher, env) -> None:
    _die_with_launcher(launcher)
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    try:
        import torch

        torch.set_num_threads(threads)
        from cw_verl.cpu.platform import enable_cpu_platform

        enable_cpu_platform()
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=collective_timeout_s)
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle bytes: through the queue's own pickler, torch would hand tensors over as
        # shared-memory file descriptors, which vanish when this process exits before the parent reads.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1) from None


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 600.0,
    threads_per_rank: int | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; see the module docstring.

    ``fn`` and ``args`` must be picklable (a module-level function), and so must the return values.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("forkserver")
    # Takes effect when this process starts its fork server (the first call), ignored after.
    ctx.set_forkserver_preload(list(PRELOAD))
    results = ctx.Queue()
    port = free_port()
    # Collectives time out a little before the launcher does, so a stuck rank reports where it was.
    collective_timeout_s = max(30.0, timeout_s - 10.0)
    env = os.environ | PLATFORM_ENV  # the ranks' environment: this process's, with the platform
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, threads, collective_timeout_s, args, results, os.getpid(), env),
            name=f"cw_verl-rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    # The fork server, when this call starts it, imports PRELOAD with the same platform settings.
    saved = {key: os.environ.get(key) for key in PLATFORM_ENV}
    os.environ.update(PLATFORM_ENV)
    try:
        for proc in procs:
            proc.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{world_size} ranks did not finish within {timeout_s:.0f} s (killed)")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    # A rank died without reporting (e.g. killed by the OOM killer or a segfault).
                    raise RankFailed(
                        f"{dead[0].name} exited with code {dead[0].exitcode} without a report"
                        + _failure_reports(results, world_size - len(values))
                    ) from None
                continue
            if not ok:
                # The first report may be a peer's broken connection rather than the cause, so
                # collect what the other ranks report in the next seconds too.
                raise RankFailed(
                    f"rank {rank} of {world_size} failed:\n{value}" + _failure_reports(results, world_size)
                )
            values[rank] = pickle.loads(value)
        for proc in procs:
            proc.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        results.close()
    return [values[rank] for rank in range(world_size)]


def _failure_reports(results, limit: int, grace_s: float = 5.0) -> str:
    """Other ranks' failure reports that arrive within ``grace_s``, as text to append to an error."""
    texts = []
    deadline = time.monotonic() + grace_s
    while len(texts) < limit and time.monotonic() < deadline:
        try:
            rank, ok, value = results.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if not ok:
            texts.append(f"\n--- rank {rank} also failed:\n{value}")
    return "".join(texts)
