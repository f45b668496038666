"""The demo's RL loop: one arm (GRPO, CW-GRPO, ...) on every rank of a gloo group.

Every rank runs this same program (SPMD); rank 0 also plays verl's driver for logging. One step is
verl's PPO step (``trainer/ppo/v1/trainer_base.py``), in the same order and with the same metric keys:

1. ``gen``: all-gather the FSDP2 weights into each rank's rollout model; each rank samples ``G``
   responses for its share of the prompts; score them (exact match); exchange so all ranks hold the batch.
2. ``old_log_prob``: verl's ``TrainingWorker.infer_batch`` recomputes log-probs and entropies of each
   rank's chunk; ``actor/entropy`` is their token mean over the batch (as verl logs it).
3. ``adv``: ``verl.trainer.ppo.ray_trainer.compute_advantage`` with the arm's registered estimator.
4. ``update_actor``: ``TrainingWorker.train_mini_batch`` on each rank's chunk: verl's FSDP2 engine,
   micro-batches, ``ppo_loss`` and the arm's registered policy loss, optimizer steps.

Metrics go through ``verl.utils.tracking.Tracking`` with the ``file`` backend (one JSONL per arm).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cw_verl.cpu import harness
from cw_verl.demo.task import STREAM_EVAL, STREAM_RL, ReversalTask

VAL_KEY = "val-core/digit_reversal/acc/mean@1"


@dataclass(frozen=True)
class Arm:
    """An arm is verl's ``algorithm.adv_estimator`` plus ``actor.policy_loss.loss_mode``; ``reference`` adds a
    frozen copy of the starting policy whose log-probs go to the batch's ``ref_log_prob`` (verl's ref worker)."""

    name: str
    adv_estimator: str
    loss_mode: str
    reference: bool = False


ARMS = {
    "grpo": Arm("grpo", adv_estimator="grpo", loss_mode="vanilla"),
    "cw_grpo": Arm("cw_grpo", adv_estimator="cw_grpo", loss_mode="cw_grpo"),
    # The paper's scope (each prompt's G responses), as the recipes and the trainer demo run it.
    "cw_grpo_group": Arm("cw_grpo_group", adv_estimator="cw_grpo", loss_mode="cw_grpo_group"),
    # verl's Clip-Cov / KL-Cov, tokens selected in each loss call (their knobs: RunConfig.clip_cov_ratio, ...).
    "clip_cov": Arm("clip_cov", adv_estimator="grpo", loss_mode="clip_cov"),
    "kl_cov": Arm("kl_cov", adv_estimator="grpo", loss_mode="kl_cov"),
    # The same objectives with the tokens selected once per optimizer mini-batch over all ranks (cw_verl.cov_losses).
    "clip_cov_minibatch": Arm("clip_cov_minibatch", adv_estimator="grpo", loss_mode="clip_cov_minibatch"),
    "kl_cov_minibatch": Arm("kl_cov_minibatch", adv_estimator="grpo", loss_mode="kl_cov_minibatch"),
    # The objective of the authors' released code (cw_verl.authors_objective): weights with gradient, per group.
    "cw_grpo_authors": Arm("cw_grpo_authors", adv_estimator="cw_grpo", loss_mode="cw_grpo_authors"),
    "ep_grpo": Arm("ep_grpo", adv_estimator="ep_grpo", loss_mode="vanilla", reference=True),
}
WEIGHT_GRAD_KEY = "actor/cw/weights_grad_rel_norm"


@dataclass(frozen=True)
class RunConfig:
    model_path: str
    out_dir: str
    steps: int = 200
    prompts_per_step: int = 16
    group_size: int = 8
    mini_batches_per_step: int = 2
    micro_batch_size_per_gpu: int = 16
    # Sequences per rank and forward of the old (and reference) log-probs, verl's separate
    # log_prob_micro_batch_size_per_gpu; None: micro_batch_size_per_gpu.
    log_prob_micro_batch_size_per_gpu: int | None = None
    use_dynamic_bsz: bool = False
    max_token_len_per_gpu: int = 512
    lr: float = 1e-4
    # The paper's recipe warms the learning rate up over the first 10% of steps (Appendix C).
    lr_warmup_steps_ratio: float = 0.1
    clip_ratio: float = 0.2
    # verl's actor.loss_agg_mode; the paper's objective (and the authors' code) is seq-mean-token-mean.
    loss_agg_mode: str = "token-mean"
    temperature: float = 1.0
    # verl's KL loss to the starting policy (low_var_kl), as the recipes' KL_COEF; 0: none.
    kl_coef: float = 0.0
    # verl's policy_loss.clip_cov_ratio / kl_cov_ratio for the Clip-Cov / KL-Cov arms; None: verl's default (2e-4).
    clip_cov_ratio: float | None = None
    kl_cov_ratio: float | None = None
    seed: int = 0
    val_problems: int = 256
    # Held-out samples per problem at the rollout temperature: accuracy over all of them, and pass@k for k <= this.
    val_samples: int = 1
    task: ReversalTask = field(default_factory=ReversalTask)
    project_name: str = "cw_verl_demo"
    progress: bool = True

    def validate(self, world_size: int) -> None:
        if self.prompts_per_step % self.mini_batches_per_step:
            raise ValueError("prompts_per_step must be a multiple of mini_batches_per_step")
        sequences_per_update = self.prompts_per_step // self.mini_batches_per_step * self.group_size
        if sequences_per_update % world_size:
            raise ValueError(
                f"{sequences_per_update} sequences per optimizer step do not split over {world_size} ranks"
            )
        per_rank = sequences_per_update // world_size
        if not self.use_dynamic_bsz and per_rank % self.micro_batch_size_per_gpu:
            raise ValueError(
                f"{per_rank} sequences per rank and optimizer step are not a multiple of "
                f"micro_batch_size_per_gpu={self.micro_batch_size_per_gpu}"
            )
        if self.prompts_per_step % world_size or self.val_problems % world_size:
            raise ValueError(f"prompts_per_step and val_problems must split over {world_size} ranks")
        if self.val_samples < 1:
            raise ValueError(f"val_samples must be at least 1, got {self.val_samples}")

    @property
    def val_key(self) -> str:
        """verl's held-out accuracy key for ``val_samples`` samples per problem (``mean@N``)."""
        return f"val-core/digit_reversal/acc/mean@{self.val_samples}"

    @property
    def pass_at_ks(self) -> tuple[int, ...]:
        """pass@k reported for k = 1, 2, 4, ... up to ``val_samples`` (and ``val_samples`` itself)."""
        return tuple(sorted({k for k in (1, 2, 4, 8, 16, 32) if k <= self.val_samples} | {self.val_samples}))

    def policy_loss_knobs(self) -> dict[str, float]:
        """The ``actor.policy_loss`` keys this run sets (verl's defaults for the rest)."""
        knobs = {"clip_cov_ratio": self.clip_cov_ratio, "kl_cov_ratio": self.kl_cov_ratio}
        return {key: value for key, value in knobs.items() if value is not None}


def quiet_known_warnings() -> None:
    """Silence import-time notices that verl 0.9.1 prints on every CPU box (absent optional engines,
    Apex) and transformers' weight-loading bars, so the demo's own progress stays readable."""
    import warnings

    from transformers.utils import logging as hf_logging

    for pattern in (r".* engine is not available", r".*Apex is not installed", r"Transformer Engine and Apex"):
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    hf_logging.disable_progress_bar()


def jsonl_path(out_dir: str | Path, arm_name: str) -> Path:
    return Path(out_dir) / f"{arm_name}.jsonl"


def _validate(rollout, cfg: RunConfig) -> dict[str, float]:
    """Held-out accuracy (``cfg.val_key``: the share of correct samples over ``val_samples`` temperature-``T``
    samples per problem, problems split over ranks) and pass@k (Chen et al.'s unbiased estimator per problem,
    :func:`cw_verl.demo.passk.pass_at_k`, averaged over problems) for ``cfg.pass_at_ks``."""
    from cw_verl.demo.passk import pass_at_k
    from cw_verl.demo.runlog import PASS_AT_K_KEY

    problems = cfg.task.sample(cfg.val_problems, cfg.seed, STREAM_EVAL, 0)
    # Step 0 is never a training step, so validation draws its own samples; start and end share them.
    samples = rollout.sample(problems, group_size=cfg.val_samples, seed=cfg.seed, step=0)
    n = cfg.val_samples
    # Rows come G per problem (Rollout.sample), so each problem's samples are one contiguous slice.
    correct = [int(sum(r > 0 for r in samples.rewards[i : i + n])) for i in range(0, len(samples.rewards), n)]
    metrics = {cfg.val_key: sum(samples.rewards) / len(samples.rewards)}
    for k in cfg.pass_at_ks:
        metrics[PASS_AT_K_KEY.format(k=k)] = sum(pass_at_k(n, c, k) for c in correct) / len(correct)
    return metrics


def _rl_step(rank: int, step: int, cfg: RunConfig, arm: Arm, actor, reference, rollout, algo, counter=None):
    """One RL step as verl's trainer makes it (generate, old and reference log-probs, advantages, one actor
    update); returns its metrics, timings and batch. ``counter``: the Clip-Cov / KL-Cov selection probe of
    verl's own modes (observation only)."""
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.trainer.ppo.ray_trainer import compute_advantage
    from verl.utils.debug.metrics import calculate_debug_metrics
    from verl.utils.profiler.performance import simple_timer

    from cw_verl.demo import probes
    from cw_verl.demo.rollout import to_data_proto

    timing: dict[str, float] = {}
    metrics: dict[str, float] = {}
    with simple_timer("step", timing):
        prompts = cfg.task.sample(cfg.prompts_per_step, cfg.seed, STREAM_RL, step)
        with simple_timer("gen", timing):
            rollout.sync_weights(actor)
            samples = rollout.sample(prompts, cfg.group_size, cfg.seed, step)
        batch = to_data_proto(samples, cfg.task)

        with simple_timer("old_log_prob", timing):
            log_probs, entropy = harness.compute_log_prob(
                actor, harness.dp_chunk(batch), micro_batch_size=cfg.log_prob_micro_batch_size_per_gpu
            )
        batch.batch["old_log_probs"] = harness.all_gather_rows(log_probs)
        batch.batch["entropys"] = harness.all_gather_rows(entropy)
        metrics["actor/entropy"] = agg_loss(
            loss_mat=batch.batch["entropys"],
            loss_mask=batch.batch["response_mask"],
            loss_agg_mode=actor.config.loss_agg_mode,
        ).item()
        metrics.update(calculate_debug_metrics(batch))
        if reference is not None:
            from cw_verl.context import EP_ENTROPY_KEY

            with simple_timer("ref", timing):
                ref_log_probs, _ = harness.compute_log_prob(
                    reference, harness.dp_chunk(batch), micro_batch_size=cfg.log_prob_micro_batch_size_per_gpu
                )
            batch.batch["ref_log_prob"] = harness.all_gather_rows(ref_log_probs)
            # what cw_verl's ep_inputs patch does in verl's legacy trainer (its fit pops "entropys")
            batch.batch[EP_ENTROPY_KEY] = batch.batch["entropys"]

        with simple_timer("adv", timing):
            batch = compute_advantage(
                batch,
                adv_estimator=arm.adv_estimator,
                num_repeat=cfg.group_size,
                norm_adv_by_std_in_grpo=algo.norm_adv_by_std_in_grpo,
                config=algo,
            )
        if rank == 0 and not arm.loss_mode.startswith("cw_grpo"):
            # The paper's Table 1 statistics under GRPO, observed only: the update is untouched.
            metrics.update(probes.covariance_percentiles(batch))
        if rank == 0:  # observed only, for every arm: the update never reads it
            metrics.update(probes.kernel_tails(batch))
        if rank == 0 and step == 1 and arm.loss_mode == ARMS["cw_grpo_authors"].loss_mode:
            terms = probes.weight_gradient_terms(rollout.model, batch, cfg.temperature)
            metrics[WEIGHT_GRAD_KEY] = terms["relative_norm"]
            metrics["actor/cw/weights_grad_cosine"] = terms["cosine"]

        with simple_timer("update_actor", timing):
            train_batch = batch.select(
                batch_keys=[
                    "prompts",
                    "responses",
                    "input_ids",
                    "attention_mask",
                    "position_ids",
                    "response_mask",
                    "old_log_probs",
                    "advantages",
                    # verl's KL loss reads the reference's log-probs from the batch.
                    *(["ref_log_prob"] if cfg.kl_coef > 0 else []),
                ],
                # As verl's trainers do: the prompts' uid reaches the actor (cw_grpo_group uses it).
                non_tensor_batch_keys=["uid"],
            )
            metrics.update(harness.train_step(actor, harness.dp_chunk(train_batch)))
        metrics.update(_selected_per_step(metrics, cfg, counter))
    return metrics, timing, batch


def _selected_per_step(metrics: dict[str, float], cfg: RunConfig, counter) -> dict[str, float]:
    """Tokens the Clip-Cov / KL-Cov arms selected in this step over all ranks (collective; {} for other arms).

    verl's own modes: :class:`cw_verl.demo.probes.LocalSelectionCounter`'s per-call counts summed over ranks.
    The mini-batch modes: ``actor/cov_select/selected`` is one mini-batch's global count, the same in every
    call, and verl's metric reduction averages it over the step's mini-batches (equal calls per mini-batch
    with a fixed micro-batch size), so the step's count is that mean times the mini-batches.
    """
    import torch
    import torch.distributed as dist

    from cw_verl.demo.runlog import SELECTED

    if counter is not None:
        total = torch.tensor([counter.take()], dtype=torch.int64)
        dist.all_reduce(total)
        return {SELECTED: float(total.item())}
    if "actor/cov_select/selected" in metrics:
        return {SELECTED: metrics["actor/cov_select/selected"] * cfg.mini_batches_per_step}
    return {}


def run_arm(rank: int, world_size: int, cfg: RunConfig, arm: Arm) -> dict:
    """Train one arm; rank 0 writes ``<out_dir>/<arm>.jsonl`` and returns what it measured."""
    quiet_known_warnings()
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.metric_utils import compute_data_metrics, compute_timing_metrics

    from cw_verl.demo.rollout import Rollout

    cfg.validate(world_size)
    init_start = time.perf_counter()
    setup = harness.ActorSetup(
        model_path=cfg.model_path,
        rollout_n=cfg.group_size,
        ppo_mini_batch_size=cfg.prompts_per_step // cfg.mini_batches_per_step,
        loss_mode=arm.loss_mode,
        ppo_micro_batch_size_per_gpu=cfg.micro_batch_size_per_gpu,
        use_dynamic_bsz=cfg.use_dynamic_bsz,
        ppo_max_token_len_per_gpu=cfg.max_token_len_per_gpu,
        lr=cfg.lr,
        lr_warmup_steps_ratio=cfg.lr_warmup_steps_ratio,
        clip_ratio=cfg.clip_ratio,
        loss_agg_mode=cfg.loss_agg_mode,
        total_training_steps=cfg.steps,
        temperature=cfg.temperature,
        data_loader_seed=cfg.seed,
        kl_loss_coef=cfg.kl_coef,
        policy_loss=cfg.policy_loss_knobs(),
    )
    actor = harness.build_actor(setup)
    # Never trained: the reference policy (EP-GRPO's progress signal, the KL loss).
    reference = harness.build_actor(setup) if arm.reference or cfg.kl_coef > 0 else None
    rollout = Rollout(cfg.model_path, cfg.task, cfg.temperature)
    algo = AlgoConfig(adv_estimator=arm.adv_estimator, norm_adv_by_std_in_grpo=True)
    init_seconds = time.perf_counter() - init_start
    from cw_verl.demo.probes import LocalSelectionCounter

    counter = LocalSelectionCounter(arm.loss_mode) if arm.loss_mode in LocalSelectionCounter.MODES else None

    tracker = None
    if rank == 0:
        from verl.utils.tracking import Tracking

        path = jsonl_path(cfg.out_dir, arm.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        # verl's FileLogger writes to $VERL_FILE_LOGGER_PATH, else <root>/<project>/<experiment>.jsonl.
        os.environ["VERL_FILE_LOGGER_PATH"] = str(path)
        tracker = Tracking(
            project_name=cfg.project_name,
            experiment_name=arm.name,
            default_backend=["file"],
            config={"arm": asdict(arm), "run": asdict(cfg)},
        )

    rollout.sync_weights(actor)
    val_start = _validate(rollout, cfg)
    if tracker is not None:
        tracker.log(val_start, step=0)

    progress = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.steps, desc=f"{arm.name:>8}", file=sys.stderr, dynamic_ncols=True)
    step_seconds = []
    try:
        for step in range(1, cfg.steps + 1):
            metrics, timing, batch = _rl_step(rank, step, cfg, arm, actor, reference, rollout, algo, counter)
            metrics.update(compute_data_metrics(batch, use_critic=False))
            metrics.update(compute_timing_metrics(batch, timing))
            metrics["training/global_step"] = step
            metrics["training/epoch"] = 0
            step_seconds.append(timing["step"])
            if step == cfg.steps:
                rollout.sync_weights(actor)
                metrics.update(_validate(rollout, cfg))
            if tracker is not None:
                tracker.log(metrics, step=step)
            if progress is not None:
                progress.set_postfix(
                    reward=f"{metrics['critic/score/mean']:.2f}", entropy=f"{metrics['actor/entropy']:.3f}"
                )
                progress.update(1)
    finally:
        if counter is not None:
            counter.close()
        if progress is not None:
            progress.close()
        if tracker is not None:
            tracker.finish()
    if rank != 0:
        return {}
    return {
        "arm": arm.name,
        "jsonl": str(jsonl_path(cfg.out_dir, arm.name)),
        "init_seconds": init_seconds,
        "step_seconds": step_seconds,
    }
