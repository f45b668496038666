"""``python -m cw_verl [check [--gpu]|demo|trainer-demo|plot|study]``.

``check`` (the default) imports verl the way every verl process does and reports what cw_verl
registered and patched, and what is wrong; it exits non-zero on any problem, because verl itself
hides plugin failures at DEBUG level.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys

TESTED_VERL = "0.9.1"


def _plugin_entry_points():
    return [ep for ep in importlib.metadata.entry_points(group="verl.plugins") if ep.value.startswith("cw_verl")]


def run_check() -> list[str]:
    """Print the state of the installation; return the list of problems (empty: all good)."""
    problems: list[str] = []

    def report(ok: bool, what: str, problem: str | None = None) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            problems.append(problem or what)

    import cw_verl

    print(f"cw_verl {cw_verl.__version__}")
    entry_points = _plugin_entry_points()
    report(
        bool(entry_points),
        "entry point in group 'verl.plugins': " + ", ".join(f"{ep.name} = {ep.value}" for ep in entry_points),
        "no 'verl.plugins' entry point for cw_verl: install the package (pip install -e .), not just PYTHONPATH",
    )
    vllm_plugins = [
        ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins") if ep.value.startswith("cw_verl")
    ]
    # Without it (e.g. an install older than the plugin), CPU runs hang in their first weight sync.
    report(
        bool(vllm_plugins),
        "entry point in group 'vllm.general_plugins': " + ", ".join(f"{ep.name} = {ep.value}" for ep in vllm_plugins),
        "no 'vllm.general_plugins' entry point for cw_verl (CPU runs need it): reinstall (pip install -e .)",
    )
    policy = os.getenv("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    allowed = policy == "auto" or any(ep.name in {p.strip() for p in policy.split(",")} for ep in entry_points)
    report(
        allowed, f"VERL_USE_EXTERNAL_PLUGINS={policy!r} lets verl load it", "VERL_USE_EXTERNAL_PLUGINS excludes cw_verl"
    )

    import verl

    print(f"verl {verl.__version__} (tested with {TESTED_VERL})")
    if verl.__version__ != TESTED_VERL:
        print(f"  [warn] verl {verl.__version__} is not the tested {TESTED_VERL}; run the test-suite's patch checks")
    report("cw_verl.verl_plugin" in sys.modules, "`import verl` loaded cw_verl.verl_plugin")

    from verl.trainer.ppo import core_algos

    from cw_verl.verl_losses import CW_GRPO, DEFAULT_SCOPE, LOSS_MODES

    report(CW_GRPO in core_algos.ADV_ESTIMATOR_REGISTRY, f"algorithm.adv_estimator={CW_GRPO} registered")
    for name, scope in LOSS_MODES.items():
        note = f" (default: {DEFAULT_SCOPE} scope)" if name == CW_GRPO else f" ({scope} scope)"
        report(name in core_algos.POLICY_LOSS_REGISTRY, f"actor.policy_loss.loss_mode={name} registered{note}")
    from cw_verl.authors_loss import AUTHORS_LOSS_MODE

    report(
        AUTHORS_LOSS_MODE in core_algos.POLICY_LOSS_REGISTRY,
        f"actor.policy_loss.loss_mode={AUTHORS_LOSS_MODE} registered (the authors' released objective)",
    )
    from cw_verl.verl_losses import VANILLA_WITH_CW_METRICS

    report(
        VANILLA_WITH_CW_METRICS in core_algos.POLICY_LOSS_REGISTRY,
        f"actor.policy_loss.loss_mode={VANILLA_WITH_CW_METRICS} registered (verl's vanilla loss + actor/cw/* metrics)",
    )

    report("ep_grpo" in core_algos.ADV_ESTIMATOR_REGISTRY, "algorithm.adv_estimator=ep_grpo registered (EP-GRPO)")
    ray_trainer = importlib.import_module("verl.trainer.ppo.ray_trainer")
    report(
        getattr(ray_trainer.compute_advantage, "_cw_verl_ep_inputs", None) is not None,
        "compute_advantage hands ep_grpo the entropy and reference log-probs",
    )

    from verl.workers.engine.base import BaseEngine

    report(
        getattr(BaseEngine.train_batch, "_cw_verl_engine_context", False),
        "BaseEngine.train_batch/infer_batch hand the engine's dp_group to the policy loss",
    )
    main_ppo = importlib.import_module("verl.trainer.main_ppo")
    config_module = importlib.import_module("verl.utils.config")
    report(
        getattr(main_ppo.run_ppo, "_cw_verl_config_rules", False)
        and getattr(config_module.validate_config, "_cw_verl_config_rules", False),
        "config rules (loss_mode follows adv_estimator=cw_grpo) run at every entry point before Ray starts",
    )
    ray_trainer = importlib.import_module("verl.trainer.ppo.ray_trainer")
    report(
        getattr(ray_trainer.compute_advantage, "_cw_verl_advantage_source", False)
        and getattr(core_algos.get_policy_loss_fn, "_cw_verl_advantage_source", False),
        "workers refuse to train cw_grpo advantages with a non-CW loss",
    )
    try:
        v1_utils = importlib.import_module("verl.trainer.ppo.v1.utils")
        v1_trainer = importlib.import_module("verl.trainer.ppo.v1.trainer_base")
    except ImportError as error:
        report(False, f"verl's v1 trainer imports ({error})", f"verl's v1 trainer cannot be imported: {error}")
    else:
        report(
            getattr(v1_utils.compute_advantage_for_multi_trajectories, "_cw_verl_multi_trajectory", False),
            "v1 trainer's multi-trajectory advantages treat cw_grpo as GRPO",
        )
        report(
            getattr(v1_trainer.PPOTrainer._compute_advantage, "_cw_verl_advantage_source", False),
            "v1 trainer marks cw_grpo advantages for the workers' check",
        )
        report(
            getattr(v1_trainer.PPOTrainer._balance_batch, "_cw_verl_whole_groups", False),
            f"v1 trainer keeps prompt groups whole for {AUTHORS_LOSS_MODE}",
        )
        report(
            getattr(v1_trainer.PPOTrainer._compute_metrics, "_cw_verl_reward_metrics", False),
            "v1 trainer logs cw_verl's reward diagnostics per step",
        )
    print("OK: cw_verl is active in verl" if not problems else f"{len(problems)} problem(s): " + "; ".join(problems))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cw_verl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check", help="report registrations and patches (default); --gpu: the GPU preflight")
    check.add_argument("--gpu", action="store_true", help="GPU node preflight (cw_verl/preflight.py; --help there)")
    sub.add_parser("demo", help="CW-GRPO vs GRPO on verl's engine on CPU (harness, fast)", add_help=False)
    sub.add_parser("trainer-demo", help="CW-GRPO vs GRPO through verl's main_ppo on CPU (make demo)", add_help=False)
    sub.add_parser("plot", help="figure from verl file-logger JSONL", add_help=False)
    sub.add_parser("study", help="GRPO vs CW-GRPO vs the authors' objective over seeds", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from cw_verl.demo.cli import main as demo_main

        return demo_main(rest)
    if args.command == "trainer-demo":
        from cw_verl.demo.trainer_demo import main as trainer_demo_main

        return trainer_demo_main(rest)
    if args.command == "plot":
        from cw_verl.demo.plot import main as plot_main

        return plot_main(rest)
    if args.command == "study":
        from cw_verl.demo.study import main as study_main

        return study_main(rest)
    if args.command == "check" and args.gpu:
        from cw_verl.preflight import main as preflight_main

        return preflight_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return 1 if run_check() else 0


if __name__ == "__main__":
    sys.exit(main())
