"""Apply cw_verl's config rules at every verl entry point, before Ray or any worker starts (verl 0.9.1).

Every trainer entry point of verl 0.9.1 hands its composed config to ``verl.trainer.main_ppo.run_ppo``
before ``ray.init``: ``main_ppo.main`` (v1 trainer modes and the legacy trainer), ``one_step_off_policy``
and ``fully_async_policy`` (which import ``run_ppo`` from the module when their ``main`` runs), and a
programmatic ``compose`` + ``run_ppo``. The wrapper applies :data:`cw_verl.config_rules.CONFIG_RULES` there,
with the trainer loop named by the task-runner class it receives.

``python -m verl.trainer.main_ppo`` runs the module as ``__main__``, whose ``run_ppo`` is its own copy;
there ``main`` calls ``validate_config`` (imported from ``verl.utils.config``, so the wrapped one) before
``run_ppo``, and that call applies the rules, for the runner ``main`` picks next (``trainer.use_v1``).
``validate_config`` is also called inside Ray task runners (legacy trainer, one_step_off_policy), after the
driver applied the rules. So the wrapped ``validate_config`` applies them only in the one process state
where ``run_ppo`` cannot: the process's ``__main__`` is ``verl.trainer.main_ppo`` (``python -m``) and Ray has
not started (Ray workers run Ray's own ``__main__``). Applying them twice changes nothing.
"""

from __future__ import annotations

import functools
import sys

from cw_verl.config_rules import apply_config_rules, launch_of

MARKER = "_cw_verl_config_rules"
MAIN_PPO = "verl.trainer.main_ppo"


def runner_name(task_runner_class) -> str:
    """The verl task-runner class a (Ray actor) class is, or derives from, by name."""
    known = ("TaskRunnerV1", "TaskRunner", "OneStepTaskRunner", "FullyAsyncTaskRunner")
    cls = getattr(task_runner_class, "__ray_actor_class__", task_runner_class)
    for base in getattr(cls, "__mro__", ()):
        if base.__name__ in known:
            return base.__name__
    return getattr(cls, "__name__", str(cls))


def patch_run_ppo(main_ppo_module) -> None:
    """Post-import hook for ``verl.trainer.main_ppo``."""
    original = main_ppo_module.run_ppo
    if getattr(original, MARKER, False):
        return

    @functools.wraps(original)
    def run_ppo(config, task_runner_class, *args, **kwargs):
        apply_config_rules(config, launch_of(config, runner_name(task_runner_class)))
        return original(config, task_runner_class, *args, **kwargs)

    setattr(run_ppo, MARKER, True)
    main_ppo_module.run_ppo = run_ppo


def driver_of_python_m_main_ppo() -> bool:
    """Whether this process runs ``python -m verl.trainer.main_ppo`` and Ray has not started yet."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(spec, "name", None) != MAIN_PPO:
        return False
    import ray

    return not ray.is_initialized()


def patch_validate_config(config_module) -> None:
    """Post-import hook for ``verl.utils.config``."""
    original = config_module.validate_config
    if getattr(original, MARKER, False):
        return

    @functools.wraps(original)
    def validate_config(config, *args, **kwargs):
        if driver_of_python_m_main_ppo():
            runner = "TaskRunnerV1" if config.trainer.use_v1 else "TaskRunner"
            apply_config_rules(config, launch_of(config, runner))
        return original(config, *args, **kwargs)

    setattr(validate_config, MARKER, True)
    config_module.validate_config = validate_config
    # verl.utils re-exports it; keep the two names the same function.
    utils_package = sys.modules.get("verl.utils")
    if utils_package is not None and getattr(utils_package, "validate_config", None) is original:
        utils_package.validate_config = validate_config
