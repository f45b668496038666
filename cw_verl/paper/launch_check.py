"""Check a verl launch before any GPU is touched.

    python -m cw_verl.paper.launch_check [--dump-config FILE] -- <hydra overrides...>

Composes verl 0.9.1's own trainer configuration (``ppo_megatron_trainer``) with the overrides, exactly
as ``python -m verl.trainer.main_ppo --config-name=ppo_megatron_trainer <overrides>`` would, runs verl's
``validate_config``, builds the config dataclasses the workers build (actor, rollout, algorithm, and the
model config, which loads the tokenizer and ``config.json`` from the model path), and then checks what
verl would only discover on the cluster, or never:

* prompt + response fits the model's ``max_position_embeddings`` (verl's vLLM server otherwise
  silently shortens generations to the space left);
* the rollout batch splits evenly over the actor's data-parallel ranks (verl otherwise pads the batch
  with dummy sequences);
* the reward's ``prompt_opens_think`` agrees with the tokenizer's chat template;
* the custom reward function loads and accepts the configured ``reward_kwargs``;
* the advantage estimator and policy loss are registered (a plugin that fails to import is silently
  skipped by ``import verl``);
* data files exist and have the columns verl reads;
* the installed verl is the one cw_verl's patches were written against;
* the packages the workers will import (vLLM, and with a Megatron actor megatron-core, the bridge that
  ``actor.megatron.vanilla_mbridge`` selects and, on GPUs, TransformerEngine) import here, at the versions
  cw_verl was tested with (:mod:`cw_verl.packages`; ``--skip-imports`` on a machine that is not the cluster's);
* the per-GPU memory estimate of :mod:`cw_verl.paper.memory` fits ``--gpu-memory-gb``;
* with ``--run-dir``: a checkpoint already in the run directory was written with the same settings
  (``trainer.resume_mode=auto`` would otherwise silently resume a different run); ``--record`` stores
  this launch's settings there.

``--entry-module`` names another verl entry point (:data:`ENTRY_POINTS`: the experimental one-step-off and fully
async trainers); their configs compose from their own folder, as their ``main`` does.

All problems are reported together; the exit status is 1 if there is any.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_NAME = "ppo_megatron_trainer"
DATA_COLUMNS = {"data_source", "prompt", "reward_model"}
SETTINGS_FILE = "run_settings.json"
# Settings that name or pace a run without changing what it computes: they may differ on resume.
OPERATIONAL_KEYS = (
    "trainer.logger",
    "trainer.save_freq",
    "trainer.test_freq",
    "trainer.val_before_train",
    "trainer.max_actor_ckpt_to_keep",
    "ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH",
)


@dataclass(frozen=True)
class EntryPoint:
    """A verl 0.9.1 entry module: its config folder (under the verl package), the task runner its ``main`` hands to
    ``run_ppo`` (what cw_verl's config rules see there), and whether it runs verl's ``validate_config``."""

    config_dir: tuple[str, ...]
    runner: str
    validates: bool


ENTRY_POINTS = {
    "verl.trainer.main_ppo": EntryPoint(("trainer", "config"), "main_ppo", True),
    "verl.experimental.one_step_off_policy.main_ppo": EntryPoint(
        ("experimental", "one_step_off_policy", "config"), "OneStepTaskRunner", True
    ),
    "verl.experimental.fully_async_policy.fully_async_main": EntryPoint(
        ("experimental", "fully_async_policy", "config"), "FullyAsyncTaskRunner", False
    ),
}
MAIN_PPO = "verl.trainer.main_ppo"


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)


def verl_config_dir(entry_module: str = MAIN_PPO) -> str:
    import verl

    return os.path.join(os.path.dirname(verl.__file__), *ENTRY_POINTS[entry_module].config_dir)


def compose(overrides: list[str], config_name: str = CONFIG_NAME, entry_module: str = MAIN_PPO):
    """The DictConfig ``entry_module``'s main would receive (Hydra compose on its installed config directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=verl_config_dir(entry_module), version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides)


def check(cfg, gpu_memory_gb: float | None = None, imports: bool = True, entry_module: str = MAIN_PPO) -> Report:
    entry = ENTRY_POINTS[entry_module]
    report = Report()
    _check_verl_version(report)
    if imports:
        _run(report, "worker packages", _check_packages, report, cfg)
    else:
        report.facts["worker packages"] = "not checked (--skip-imports)"
    _run(report, "cw_verl config rules", _cw_verl_rules, cfg, entry.runner)
    if entry.validates:
        _run(report, "verl validate_config", _verl_validation, cfg)
    actor = _run(report, "actor config", _dataclass, cfg.actor_rollout_ref.actor)
    _run(report, "rollout config", _dataclass, cfg.actor_rollout_ref.rollout)
    _run(report, "algorithm config", _dataclass, cfg.algorithm)
    model = _run(report, "model config", _dataclass, cfg.actor_rollout_ref.model)
    if model is not None:
        _check_context(report, cfg, model)
        _check_think_template(report, cfg, model)
        if gpu_memory_gb is not None:
            _run(report, "memory estimate", _check_memory, report, cfg, model, gpu_memory_gb)
    if actor is not None:
        _check_batch_split(report, cfg)
    _check_reward_fn(report, cfg)
    _check_registry(report, cfg)
    _check_data(report, cfg)
    _check_loggers(report, cfg)
    return report


def _run(report: Report, what: str, fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # every failure becomes a reported problem; the check itself must not stop
        report.errors.append(f"{what}: {type(e).__name__}: {e}")
        return None


def _check_verl_version(report: Report) -> None:
    import verl

    from cw_verl.patches import VERL_VERSION

    report.facts["verl_version"] = verl.__version__
    if verl.__version__ != VERL_VERSION and os.environ.get("CW_VERL_ALLOW_UNTESTED_VERL") != "1":
        report.errors.append(
            f"verl {verl.__version__} is installed, cw_verl's patches were written against {VERL_VERSION}: install "
            f"verl=={VERL_VERSION} (recipes/README.md, environment), or run the patch checks (pytest "
            "tests/test_patches.py tests/test_whole_groups.py) and set CW_VERL_ALLOW_UNTESTED_VERL=1"
        )


def _check_packages(report: Report, cfg) -> None:
    from cw_verl import packages

    needs = packages.needed(cfg)
    found = packages.probe(needs)
    report.facts["worker packages"] = ", ".join(
        f"{need.distribution} {found[need.module]['version'] or 'absent'}" for need in needs
    )
    allow = os.environ.get("CW_VERL_ALLOW_UNTESTED_VERL") == "1"
    report.errors.extend(packages.problems(needs, found, allow_untested=allow))


def _check_memory(report: Report, cfg, model, gpu_memory_gb: float) -> None:
    from cw_verl.paper.memory import estimate, layout_from_config

    result = estimate(model.hf_config, layout_from_config(cfg, gpu_memory_gb))
    report.facts["memory_per_gpu"] = result.summary()
    if not result.fits:
        report.errors.append(
            f"memory: about {result.peak:.0f} GB per GPU needed, {gpu_memory_gb:.0f} GB available (rollout phase "
            f"{result.rollout:.0f}, training {result.training:.0f}); pick a MEMORY_PROFILE for these GPUs, raise "
            "ACTOR_TP, lower ROLLOUT_GPU_MEMORY or the micro-batch, or set OFFLOAD=1"
        )


def run_settings(cfg) -> dict[str, object]:
    """The resolved configuration, flattened, without the keys of :data:`OPERATIONAL_KEYS`."""
    from omegaconf import OmegaConf

    flat: dict[str, object] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return {key: value for key, value in sorted(flat.items()) if key not in OPERATIONAL_KEYS}


def _has_checkpoint(checkpoint_dir: Path) -> bool:
    return (checkpoint_dir / "latest_checkpointed_iteration.txt").exists() or any(checkpoint_dir.glob("global_step_*"))


def check_run_dir(report: Report, cfg, run_dir: Path, record: bool) -> None:
    """Refuse to resume a checkpoint written with different settings; with ``record``, store these settings."""
    settings = run_settings(cfg)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    report.facts["run_settings"] = fingerprint
    path = run_dir / SETTINGS_FILE
    checkpoint_dir = Path(cfg.trainer.default_local_dir)
    if path.exists() and _has_checkpoint(checkpoint_dir):
        stored = json.loads(path.read_text())
        if stored["fingerprint"] != fingerprint:
            old = stored["settings"]
            changed = sorted(k for k in set(old) | set(settings) if old.get(k, "<unset>") != settings.get(k, "<unset>"))
            shown = ", ".join(f"{k}: {old.get(k, '<unset>')!r} -> {settings.get(k, '<unset>')!r}" for k in changed[:8])
            report.errors.append(
                f"run directory {run_dir} holds a checkpoint of a run with other settings ({len(changed)} differ: "
                f"{shown}); trainer.resume_mode=auto would resume it. Use another EXPERIMENT (or RUN_ROOT), or "
                "launch again with the settings it was started with"
            )
            return
    elif not _has_checkpoint(checkpoint_dir) and path.exists():
        report.facts["run_settings_replaced"] = json.loads(path.read_text())["fingerprint"]
    if record and not report.errors:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fingerprint": fingerprint, "settings": settings}, indent=1, default=str))


def _cw_verl_rules(cfg, runner: str) -> None:
    # The rules run_ppo applies before Ray starts (patches/entry_points.py), for the trainer loop the entry picks.
    from cw_verl.config_rules import apply_config_rules, launch_of

    apply_config_rules(cfg, launch_of(cfg, runner))


def _verl_validation(cfg) -> None:
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(cfg)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


def _dataclass(node):
    from verl.utils.config import omega_conf_to_dataclass

    return omega_conf_to_dataclass(node)


def _check_context(report: Report, cfg, model) -> None:
    from verl.workers.rollout.utils import get_max_position_embeddings

    max_pos = get_max_position_embeddings(model.hf_config)
    prompt, response = cfg.data.max_prompt_length, cfg.data.max_response_length
    max_model_len = cfg.actor_rollout_ref.rollout.max_model_len
    report.facts.update(max_position_embeddings=max_pos, prompt_plus_response=prompt + response)
    if prompt + response > max_pos:
        report.errors.append(
            f"context: data.max_prompt_length ({prompt}) + data.max_response_length ({response}) = "
            f"{prompt + response} exceeds the model's max_position_embeddings ({max_pos}); lower "
            f"data.max_response_length to {max_pos - prompt} or less"
        )
    elif max_model_len is not None and not prompt + response <= max_model_len <= max_pos:
        report.errors.append(
            f"context: rollout.max_model_len ({max_model_len}) must lie between prompt + response "
            f"({prompt + response}) and max_position_embeddings ({max_pos})"
        )


def _check_think_template(report: Report, cfg, model) -> None:
    kwargs = _reward_kwargs(cfg)
    if "prompt_opens_think" not in kwargs:
        return
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    rendered = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    opens = re.search(r"<think>\s*$", rendered) is not None
    report.facts["chat_template_opens_think"] = opens
    if bool(kwargs["prompt_opens_think"]) != opens:
        report.errors.append(
            f"reward: prompt_opens_think={kwargs['prompt_opens_think']} but the tokenizer's generation "
            f"prompt {'ends' if opens else 'does not end'} with <think> (tail: {rendered[-40:]!r}); "
            "the format reward would be wrong for every sample"
        )


def _check_batch_split(report: Report, cfg) -> None:
    actor = cfg.actor_rollout_ref.actor
    n_gpus = cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes
    if actor.strategy == "megatron":
        mg = actor.megatron
        model_parallel = mg.tensor_model_parallel_size * mg.pipeline_model_parallel_size * mg.context_parallel_size
    else:  # FSDP: only Ulysses sequence parallelism splits a data-parallel rank's sequences
        model_parallel = actor.fsdp_config.ulysses_sequence_parallel_size
    rollout_tp = cfg.actor_rollout_ref.rollout.tensor_model_parallel_size
    sequences = cfg.data.train_batch_size * cfg.actor_rollout_ref.rollout.n
    if n_gpus % model_parallel:
        report.errors.append(f"parallelism: {n_gpus} GPUs do not divide into model-parallel groups of {model_parallel}")
        return
    dp = n_gpus // model_parallel
    report.facts.update(n_gpus=n_gpus, actor_dp=dp, sequences_per_step=sequences)
    if sequences % dp:
        report.errors.append(
            f"batch: {sequences} sequences per step (train_batch_size x rollout.n) do not split evenly over "
            f"{dp} data-parallel ranks; verl would pad the batch with dummy sequences"
        )
    if n_gpus % rollout_tp:
        report.errors.append(f"rollout: tensor_model_parallel_size {rollout_tp} does not divide {n_gpus} GPUs")


def _reward_kwargs(cfg) -> dict:
    from omegaconf import OmegaConf

    node = OmegaConf.select(cfg, "reward.custom_reward_function.reward_kwargs", default=None)
    return {} if node is None else dict(OmegaConf.to_container(node, resolve=True))


def _check_reward_fn(report: Report, cfg) -> None:
    from verl.utils.import_utils import load_extern_object

    fn_cfg = cfg.reward.custom_reward_function
    if not fn_cfg.path:
        return
    try:
        fn = load_extern_object(module_path=fn_cfg.path, object_name=fn_cfg.name)
        # The arguments verl's NaiveRewardManager passes, plus the configured reward_kwargs.
        inspect.signature(fn).bind(
            data_source="", solution_str="", ground_truth="", extra_info={}, **_reward_kwargs(cfg)
        )
    except Exception as e:
        report.errors.append(f"reward function {fn_cfg.path}:{fn_cfg.name}: {type(e).__name__}: {e}")


def _check_registry(report: Report, cfg) -> None:
    from verl.trainer.ppo import core_algos

    wanted = {
        "algorithm.adv_estimator": (cfg.algorithm.adv_estimator, core_algos.ADV_ESTIMATOR_REGISTRY),
        "actor.policy_loss.loss_mode": (
            cfg.actor_rollout_ref.actor.policy_loss.loss_mode,
            core_algos.POLICY_LOSS_REGISTRY,
        ),
    }
    missing = [f"{key}={name}" for key, (name, registry) in wanted.items() if name not in registry]
    if not missing:
        return
    try:  # `import verl` hides a failing plugin; importing it here shows why it did not register
        import cw_verl.verl_plugin  # noqa: F401

        why = "cw_verl.verl_plugin imports fine but does not register it"
    except Exception as e:
        why = f"importing cw_verl.verl_plugin fails: {type(e).__name__}: {e}"
    report.errors.append(f"registry: {', '.join(missing)} not registered in verl ({why})")


def _check_data(report: Report, cfg) -> None:
    import pyarrow.parquet

    files = []
    for key in ("train_files", "val_files"):
        value = cfg.data[key]
        files += [value] if isinstance(value, str) else list(value)
    for path in files:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            report.errors.append(f"data: {path} does not exist (build it with python -m cw_verl.paper.data)")
            continue
        columns = set(pyarrow.parquet.read_schema(path).names)
        if not DATA_COLUMNS <= columns:
            report.errors.append(f"data: {path} lacks columns {sorted(DATA_COLUMNS - columns)}")


def _check_loggers(report: Report, cfg) -> None:
    from verl.utils.tracking import Tracking

    loggers = cfg.trainer.logger
    unknown = [
        name for name in ([loggers] if isinstance(loggers, str) else loggers) if name not in Tracking.supported_backend
    ]
    if unknown:
        report.errors.append(f"trainer.logger: {unknown} not among verl's {Tracking.supported_backend}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry-module", default=MAIN_PPO, choices=sorted(ENTRY_POINTS), help="verl's entry module")
    parser.add_argument("--config-name", default=CONFIG_NAME)
    parser.add_argument("--dump-config", help="write the resolved configuration (YAML) here")
    parser.add_argument("--gpu-memory-gb", type=float, help="check the per-GPU memory estimate against this size")
    parser.add_argument("--run-dir", help="refuse a checkpoint there with other settings (resume guard)")
    parser.add_argument("--record", action="store_true", help="with --run-dir: store this launch's settings")
    parser.add_argument(
        "--skip-imports",
        action="store_true",
        help="do not import the workers' packages (a dry run on a machine that is not the cluster's)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as passed to verl.trainer.main_ppo")
    args = parser.parse_args(argv)

    from omegaconf import OmegaConf

    try:
        cfg = compose(args.overrides, args.config_name, args.entry_module)
    except Exception as e:
        print(f"launch check: the overrides do not compose with verl's {args.config_name}: {e}", file=sys.stderr)
        return 1
    report = check(cfg, args.gpu_memory_gb, imports=not args.skip_imports, entry_module=args.entry_module)
    if args.run_dir:
        _run(report, "run directory", check_run_dir, report, cfg, Path(args.run_dir), args.record)
    if args.dump_config:
        with open(args.dump_config, "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
    for key, value in report.facts.items():
        print(f"launch check: {key} = {value}")
    for error in report.errors:
        print(f"launch check: ERROR: {error}", file=sys.stderr)
    print(f"launch check: {'FAILED' if report.errors else 'OK'} ({len(report.errors)} problem(s))")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
