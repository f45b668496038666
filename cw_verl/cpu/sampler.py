"""verl's synchronous replay buffer with a short poll interval, for small fast runs (the tiny CPU recipe).

verl 0.9.1's v1 trainer waits for each step's rollouts in ``ReplayBuffer.sample``, which checks the
TransferQueue every ``poll_interval`` seconds, fixed at 2.0 in its constructor and not configurable.
A tiny model's rollouts finish in well under a second, so a step's generation time is rounded up to
2 or 4 seconds: half of a tiny-recipe step. This subclass, selected through verl's own extension point
(``trainer.v1.sampler.custom_sampler.{path,name}``), polls every 0.05 s and is otherwise verl's class.
On a GPU cluster, where generation takes minutes, the default is harmless; the paper recipes keep it.
"""

from __future__ import annotations

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

POLL_INTERVAL_S = 0.05


class FastPollReplayBuffer(ReplayBuffer):
    """``ReplayBuffer`` with ``poll_interval`` = :data:`POLL_INTERVAL_S` (sync trainer mode, no DAPO filtering).

    verl hands a custom sampler only the base arguments (``trainer_mode``, ``trainer_config``, the
    off-policy settings, ``sampler_kwargs``, ``refill_fn``); the DAPO arguments keep their defaults,
    which is verl's own behaviour without ``algorithm.filter_groups``.
    """

    def __init__(self, **kwargs) -> None:
        if kwargs.get("trainer_mode") != "sync":
            mode = kwargs.get("trainer_mode")
            raise ValueError(f"{type(self).__name__} is verl's sync-mode buffer; got trainer_mode={mode!r}")
        super().__init__(poll_interval=POLL_INTERVAL_S, **kwargs)
