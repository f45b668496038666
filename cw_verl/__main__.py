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
    cpu_platform = os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"
    needed = {"cw_verl", "cw_verl_cpu"} if cpu_platform else {"cw_verl"}
    allowed = policy == "auto" or needed <= {name.strip() for name in policy.split(",")}
    report(
        allowed,
        f"VERL_USE_EXTERNAL_PLUGINS={policy!r} lets verl load {', '.join(sorted(needed))}",
        f"VERL_USE_EXTERNAL_PLUGINS={policy!r} excludes one of {sorted(needed)}",
    )

    import verl

    print(f"verl {verl.__version__} (tested with {TESTED_VERL})")
    if verl.__version__ != TESTED_VERL:
        print(f"  [warn] verl {verl.__version__} is not the tested {TESTED_VERL}; run the test-suite's patch checks")
    report("cw_verl.verl_plugin" in sys.modules, "`import verl` loaded cw_verl.verl_plugin")
    if cpu_platform:
        report("cw_verl.cpu.verl_plugin" in sys.modules, "VERL_PLATFORM=cpu: `import verl` loaded the CPU support")

    from verl.trainer.ppo import core_algos

    from cw_verl import patches
    from cw_verl.registry import ADVANTAGE_ESTIMATORS, CW_POLICY_LOSSES, OTHER_POLICY_LOSSES

    for name, (_, what) in ADVANTAGE_ESTIMATORS.items():
        report(name in core_algos.ADV_ESTIMATOR_REGISTRY, f"algorithm.adv_estimator={name} registered ({what})")
    for name, (_, what) in {**CW_POLICY_LOSSES, **OTHER_POLICY_LOSSES}.items():
        report(name in core_algos.POLICY_LOSS_REGISTRY, f"actor.policy_loss.loss_mode={name} registered ({what})")
    for patch in patches.PATCHES:
        try:
            ok, problem = patches.applied(patch), None
        except ImportError as error:
            ok, problem = False, f"{patch.module} cannot be imported: {error}"
        report(ok, f"{patch.module}.{patch.attribute}: {patch.what}", problem)
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
