"""verl's replay buffers with a short poll interval, for small fast runs (the tiny CPU recipe).

verl 0.9.1's v1 trainer waits for each step's rollouts in ``ReplayBuffer.sample`` (sync mode) or
``ReplayBufferAsync.sample`` (``colocate_async``, ``separate_async``), which check the TransferQueue every
``poll_interval`` seconds, fixed at 2.0 in the constructor and not configurable. A tiny model's rollouts
finish in well under a second, so a step's generation time is rounded up to 2 or 4 seconds: half of a
tiny-recipe step. The subclasses here, selected through verl's own extension point
(``trainer.v1.sampler.custom_sampler.{path,name}``, name :func:`fast_poll_replay_buffer`), poll every
0.05 s and are otherwise verl's classes. On a GPU cluster, where generation takes minutes, the default is
harmless; the paper recipes keep it.
"""

from __future__ import annotations

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

POLL_INTERVAL_S = 0.05
SYNC_MODE = "sync"


class FastPollReplayBuffer(ReplayBuffer):
    """``ReplayBuffer`` with ``poll_interval`` = :data:`POLL_INTERVAL_S` (sync trainer mode, no DAPO filtering).

    verl hands a custom sampler only the base arguments (``trainer_mode``, ``trainer_config``, the
    off-policy settings, ``sampler_kwargs``, ``refill_fn``); the DAPO arguments keep their defaults,
    which is verl's own behaviour without ``algorithm.filter_groups``.
    """

    def __init__(self, **kwargs) -> None:
        if kwargs.get("trainer_mode") != SYNC_MODE:
            mode = kwargs.get("trainer_mode")
            raise ValueError(
                f"{type(self).__name__} is verl's sync-mode buffer; got trainer_mode={mode!r} "
                "(fast_poll_replay_buffer picks the buffer for each mode)"
            )
        super().__init__(poll_interval=POLL_INTERVAL_S, **kwargs)


class FastPollReplayBufferAsync(ReplayBufferAsync):
    """``ReplayBufferAsync`` with ``poll_interval`` = :data:`POLL_INTERVAL_S` (the v1 async trainer modes).

    verl's async buffer samples only prompt groups whose every response finished (a failed group is
    evicted and its prompt replaced), oldest first, and drops groups older than
    ``trainer.v1.sampler.max_off_policy_threshold`` steps: all of that is verl's, unchanged.
    """

    def __init__(self, **kwargs) -> None:
        if kwargs.get("trainer_mode") == SYNC_MODE:
            raise ValueError(f"{type(self).__name__} is verl's async-mode buffer; got trainer_mode='sync'")
        super().__init__(poll_interval=POLL_INTERVAL_S, **kwargs)


def fast_poll_replay_buffer(**kwargs) -> ReplayBuffer:
    """The replay buffer verl's v1 trainer would build for ``trainer_mode``, polling every 0.05 s.

    verl 0.9.1's ``PPOTrainer._build_replay_buffer`` picks ``ReplayBuffer`` for ``sync`` and
    ``ReplayBufferAsync`` otherwise; this makes the same choice, so one ``custom_sampler`` setting serves
    every mode (a user's ``trainer.v1.trainer_mode=colocate_async`` after the recipe's settings too).

    Args:
        **kwargs: what verl hands a custom sampler: ``trainer_mode``, ``trainer_config``,
            ``max_off_policy_threshold``, ``max_off_policy_strategy``, ``sampler_kwargs``, ``refill_fn``.

    Returns:
        A :class:`FastPollReplayBuffer` for ``sync``, else a :class:`FastPollReplayBufferAsync`.
    """
    buffer_class = FastPollReplayBuffer if kwargs.get("trainer_mode") == SYNC_MODE else FastPollReplayBufferAsync
    return buffer_class(**kwargs)
