"""Run several simulated ranks in threads whose ``gather`` meets at a barrier.

This exercises the cross-rank merge of :mod:`cw_verl.weights` with any number of shards inside one
process (the real multi-process tests use torch.distributed with gloo).
"""

import threading

import torch

TIMEOUT_S = 10


def run_lockstep(fn, shards):
    """Call ``fn(shard, gather)`` for every shard concurrently; return results or the raised errors."""
    world = len(shards)
    slots = [None] * world
    barrier = threading.Barrier(world, timeout=TIMEOUT_S)
    results, errors = [None] * world, [None] * world

    def make_gather(rank):
        def gather(vector):
            slots[rank] = vector.detach().clone()
            barrier.wait()
            stacked = torch.stack(list(slots))
            barrier.wait()  # every rank has read this round before anyone writes the next
            return stacked

        return gather

    def run(rank):
        try:
            results[rank] = fn(shards[rank], make_gather(rank))
        except Exception as error:  # collected for the test to inspect
            errors[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S * 3)
        if thread.is_alive():
            raise TimeoutError("a simulated rank hung")
    return results, errors
