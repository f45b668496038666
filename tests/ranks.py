"""Multi-process tests: ``run_on_ranks(fn, world_size, *args, **kwargs)`` on gloo ranks, one thread each.

A thin front to :func:`cw_verl.cpu.launch.run_ranks` (which selects verl's CPU platform in every rank,
bounds the run in time and reports a failing rank's traceback as :class:`RankFailed`).
"""

import functools

from cw_verl.cpu.launch import RankFailed, run_ranks

__all__ = ["RankFailed", "run_on_ranks"]


def run_on_ranks(fn, world_size: int, *args, **kwargs):
    """``[fn(rank, world_size, *args, **kwargs) for each rank]``, each rank a gloo process."""
    target = functools.partial(fn, **kwargs) if kwargs else fn
    return run_ranks(target, world_size, *args, timeout_s=300.0, threads_per_rank=1)
