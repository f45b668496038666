"""Start each verl 0.9.1 trainer entry point in this process with Ray faked, and report what it resolved.

    python tests/entry_points.py            # prints the table of resolved loss modes (markdown)
    python tests/entry_points.py --json     # the raw results (what tests/test_config_rules.py reads)

Each case runs an entry point exactly as a user would (``python -m <module>`` via ``runpy``, with the
config from the command line or from a user YAML file, or a programmatic hydra ``compose`` + ``run_ppo``).
Ray is replaced by fakes: ``ray.init`` records that it was called, and the task runner's ``run.remote``
records the config it would have shipped to the Ray workers, without starting anything. So a case shows
the ``loss_mode`` the workers would have received, or the error, and whether Ray would have started first.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import tempfile
import traceback

LOSS_MODE_KEY = "actor_rollout_ref.actor.policy_loss.loss_mode"
BYPASS_MODE_KEY = "algorithm.rollout_correction.bypass_mode"
# Enough for verl's own validate_config to pass, so that only cw_verl's rules can stop a run.
VALID = [
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1",
    "trainer.n_gpus_per_node=1",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.use_dynamic_bsz=false",
]
ENTRY_POINTS = {
    # name: (module, primary config, config package, extra overrides)
    "main_ppo (v1 sync)": ("verl.trainer.main_ppo", "ppo_trainer", None, []),
    "main_ppo (v1 colocate_async)": (
        "verl.trainer.main_ppo",
        "ppo_trainer",
        None,
        ["trainer.v1.trainer_mode=colocate_async"],
    ),
    "main_ppo (v1 separate_async)": (
        "verl.trainer.main_ppo",
        "ppo_trainer",
        None,
        [
            "trainer.v1.trainer_mode=separate_async",
            "data.train_batch_size=16",
            "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        ],
    ),
    "main_ppo (legacy trainer)": ("verl.trainer.main_ppo", "ppo_trainer", None, ["trainer.use_v1=false"]),
    # Their configs default to rollout-correction bypass mode, in which these trainers rewrite the loss mode:
    # refused with a CW loss (BYPASS_CASES); the loss rule's cases run them without it.
    "one_step_off_policy": (
        "verl.experimental.one_step_off_policy.main_ppo",
        "one_step_off_ppo_trainer",
        "verl.experimental.one_step_off_policy.config",
        [f"{BYPASS_MODE_KEY}=false"],
    ),
    "fully_async_policy": (
        "verl.experimental.fully_async_policy.fully_async_main",
        "fully_async_ppo_trainer",
        "verl.experimental.fully_async_policy.config",
        ["data.train_batch_size=0", f"{BYPASS_MODE_KEY}=false"],
    ),
    "compose + run_ppo": (None, "ppo_trainer", None, []),
}
SOURCES = ("estimator only", "YAML", "command line", "compose overrides")


class RayStarted(Exception):
    pass


def install_fake_ray(events: list) -> None:
    import ray
    import ray.actor

    class Runner:
        class run:  # noqa: N801  (mimics the remote method)
            @staticmethod
            def remote(config):
                events.append(("run", str(config.actor_rollout_ref.actor.policy_loss.loss_mode)))

    ray.init = lambda *args, **kwargs: events.append(("ray.init", None))
    ray.is_initialized = lambda: False
    ray.get = lambda value, *args, **kwargs: value
    ray.actor.ActorClass.remote = lambda self, *args, **kwargs: Runner()


def verl_config_dir() -> str:
    import verl

    return os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


def user_yaml(directory: str, loss_mode: str | None) -> list[str]:
    """A user's YAML file added to the entry point's own config (``--config-dir`` + a config group, as a
    recipe ships it); returns the command-line arguments that select it."""
    lines = ["# @package _global_", "algorithm:", "  adv_estimator: cw_grpo"]
    if loss_mode is not None:
        lines += ["actor_rollout_ref:", "  actor:", "    policy_loss:", f"      loss_mode: {loss_mode}"]
    os.makedirs(os.path.join(directory, "experiment"), exist_ok=True)
    with open(os.path.join(directory, "experiment", "cw.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return [f"--config-dir={directory}", "+experiment=cw"]


def run_case(entry: str, source: str, loss_mode: str | None, workdir: str, more: tuple = ()) -> dict:
    from hydra.core.global_hydra import GlobalHydra

    module, primary, package, extra = ENTRY_POINTS[entry]
    extra = extra + list(more)
    overrides = VALID + extra + [f"hydra.run.dir={workdir}", "hydra.output_subdir=null"]
    explicit = [] if loss_mode is None else [f"{LOSS_MODE_KEY}={loss_mode}"]
    events: list = []
    install_fake_ray(events)
    GlobalHydra.instance().clear()
    try:
        if module is None:  # a programmatic launcher
            from hydra import compose, initialize_config_dir
            from verl.trainer.main_ppo import TaskRunnerV1, run_ppo

            with initialize_config_dir(config_dir=verl_config_dir(), version_base=None):
                config = compose(
                    config_name=primary,
                    overrides=VALID + extra + ["algorithm.adv_estimator=cw_grpo"] + explicit,
                )
            run_ppo(config, task_runner_class=TaskRunnerV1)
        else:
            if package is not None:  # its config's searchpath is relative to verl's source tree
                overrides.append(f"hydra.searchpath=[file://{verl_config_dir()}]")
            if source == "YAML":
                args = user_yaml(workdir, loss_mode) + overrides
            else:
                args = overrides + ["algorithm.adv_estimator=cw_grpo"] + explicit
            sys.argv = [module.replace(".", "/") + ".py", *args]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        error = None
    except SystemExit as exit_:
        error = f"SystemExit({exit_.code})"
    except Exception as exception:  # reported, not swallowed: the caller asserts on it
        error = f"{type(exception).__name__}: {exception}"
        if os.environ.get("CW_ENTRY_POINTS_TRACE"):
            traceback.print_exc()
    resolved = next((value for name, value in events if name == "run"), None)
    started = [name for name, _ in events]
    return {
        "entry": entry,
        "source": source,
        "loss_mode": loss_mode,
        "overrides": list(more),
        "resolved": resolved,
        "error": error,
        "ray_started": "ray.init" in started,
    }


# The group scope on the loops whose updates hold several mini-batches or whole groups.
GROUP_CASES = [
    ("main_ppo (v1 separate_async)", ()),  # 16 prompts per step in 4 updates of 4: whole groups
    ("main_ppo (v1 sync)", ("data.train_batch_size=16", "actor_rollout_ref.actor.ppo_mini_batch_size=4")),
    ("fully_async_policy", ("async_training.require_batches=1",)),
    ("fully_async_policy", ("async_training.require_batches=2",)),
]


# Rollout-correction bypass mode on every entry point: the v1 trainer keeps the loss, the others rewrite it.
BYPASS_CASES = [(entry, (f"{BYPASS_MODE_KEY}=true",)) for entry in ENTRY_POINTS if entry != "compose + run_ppo"]


def cases(quick: bool = False):
    """(entry point, source, loss_mode, extra overrides) of every case; ``quick``: what the tests need."""
    for entry in ENTRY_POINTS:
        if quick and entry == "main_ppo (v1 colocate_async)":  # the sync trainer's config path
            continue
        yield entry, "estimator only", None, ()
        for loss_mode in ("clip_cov", "vanilla"):
            sources = ("compose overrides",) if entry == "compose + run_ppo" else ("YAML", "command line")
            for source in sources:
                if not (quick and loss_mode == "vanilla" and entry not in ("one_step_off_policy", "compose + run_ppo")):
                    yield entry, source, loss_mode, ()
    for entry, more in GROUP_CASES:
        yield entry, "command line", "cw_grpo_group", more
    for entry, more in BYPASS_CASES:
        yield entry, "estimator only", None, more


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="only the cases tests/test_config_rules.py asserts on")
    args = parser.parse_args(argv)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    import verl  # noqa: F401  (loads the cw_verl plugin)

    results = []
    with tempfile.TemporaryDirectory() as workdir:
        os.chdir(workdir)
        for entry, source, loss_mode, more in cases(args.quick):
            results.append(run_case(entry, source, loss_mode, workdir, more))
    if args.json:
        print("RESULTS " + json.dumps(results))
        return 0
    print("| entry point | config | resolved loss_mode | Ray started |")
    print("| --- | --- | --- | --- |")
    for r in results:
        config = "estimator only" if r["loss_mode"] is None else f"+ loss_mode={r['loss_mode']} ({r['source']})"
        config += "".join(f" {o}" for o in r["overrides"])
        outcome = r["resolved"] if r["error"] is None else r["error"].split(":")[0]
        print(f"| {r['entry']} | {config} | {outcome} | {'yes' if r['ray_started'] else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
