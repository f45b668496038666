"""GPU preflight: ``python -m cw_verl check --gpu`` on one GPU node tells in about two minutes whether the
cluster run will start and compute CW-GRPO right there.

1. **Packages**: verl, and what a recipe's workers import with the chosen bridge (vLLM at verl's pin,
   megatron-core, mbridge or Megatron-Bridge, TransformerEngine), at the tested versions
   (:mod:`cw_verl.packages`, the launch check's list).
2. **The loss on the device**: the per-call CW loss (``cw_grpo_microbatch``, through verl's registry) and the
   authors' weights, forward and backward in float32 on the device, against the same computation in float64
   on the CPU (loss, weights, gradient).
3. **The statistics over NCCL**: ``torchrun`` starts one process per GPU; each computes the Sec. 2.3
   statistics of its shard over the world group (three all-gathers on the GPU) and compares its weights with
   a float64 CPU computation on the whole batch; all ranks must hold bitwise the same statistics.

Exit status 0 only if every part passed. ``--device cpu --backend gloo`` runs the same code on a CPU box
(what the test-suite does here); only a GPU node shows what CUDA and NCCL do.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# float32 on the device against float64 on the CPU: the weights and the loss agree to float32 rounding of a
# few hundred operations per token; 1e-4 relative leaves room for that and none for a wrong formula (the
# differences between scopes or between the paper's and the authors' weights are of order 1e-1).
RTOL = 1e-4
# Where each torchrun rank of part 3 writes its verdict.
REPORTS_ENV = "CW_VERL_PREFLIGHT_REPORTS"


def _batch(seed: int, rows: int = 16, length: int = 48, dtype=torch.float64):
    """A GRPO-like batch: 4 groups of 4 responses, log-probs of a peaked policy, one advantage per response."""
    gen = torch.Generator().manual_seed(seed)
    log_prob = -torch.rand(rows, length, generator=gen, dtype=dtype).pow(3) * 4
    lengths = torch.randint(length // 4, length + 1, (rows,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    rewards = torch.randint(0, 2, (rows,), generator=gen).to(dtype)
    groups = torch.arange(rows) // 4
    adv = torch.zeros(rows, dtype=dtype)
    for g in groups.unique():
        member = groups == g
        adv[member] = (rewards[member] - rewards[member].mean()) / (rewards[member].std() + 1e-6)
    return log_prob, adv[:, None].expand(rows, length).contiguous() * mask, mask, groups


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = want.abs().max().clamp(min=1e-12)
    error = ((got - want).abs().max() / scale).item()
    return None if error <= RTOL else f"{name}: relative difference {error:.2e} > {RTOL:.0e}"


def loss_on_device(device: str) -> list[str]:
    """The CW loss and the authors' weights on ``device`` (float32) against float64 on the CPU."""
    import verl  # noqa: F401  (registers cw_verl's losses)
    from verl.trainer.ppo import core_algos
    from verl.workers.config import FSDPActorConfig

    from cw_verl.authors_objective import Groups, authors_weights, sequence_advantages
    from cw_verl.weights import covariance_weights

    problems = []
    log_prob, advantages, mask, groups = _batch(seed=0)
    old_log_prob = log_prob + 0.01 * torch.randn(log_prob.shape, generator=torch.Generator().manual_seed(1))
    config = FSDPActorConfig(strategy="fsdp2", rollout_n=4, ppo_micro_batch_size_per_gpu=16, clip_ratio_c=3.0)
    loss_fn = core_algos.get_policy_loss_fn("cw_grpo_microbatch")

    def run(where, dtype):
        current = log_prob.to(where, dtype).requires_grad_(True)
        args = (old_log_prob.to(where, dtype), current, advantages.to(where, dtype), mask.to(where))
        loss, _ = loss_fn(*args, loss_agg_mode="token-mean", config=config)
        loss.backward()
        weights, _, _ = covariance_weights(current, args[2], args[3])
        labels = Groups(groups.to(where), int(groups.max()) + 1)
        authored = authors_weights(current, sequence_advantages(args[2], args[3]), args[3], labels).weights
        (grad_authors,) = torch.autograd.grad(authored.sum(), current)
        return loss, current.grad, weights, authored, grad_authors

    got = run(device, torch.float32)
    if got[0].device.type != torch.device(device).type:
        problems.append(f"the loss came back on {got[0].device}, not {device}")
    want = run("cpu", torch.float64)
    names = ("cw_grpo_microbatch loss", "its gradient", "Sec. 2.3 weights", "authors' weights", "their gradient")
    for name, a, b in zip(names, got, want, strict=True):
        problem = _close(name, a, b)
        if problem:
            problems.append(problem)
    return problems


def statistics_rank() -> int:
    """One torchrun rank of part 3; writes ``OK`` or its problem to ``rank<rank>.txt`` in the directory named by
    :data:`REPORTS_ENV`; exit status 0 if OK."""
    import torch.distributed as dist

    from cw_verl.distributed import group_gather
    from cw_verl.weights import covariance_weights

    backend = os.environ.get("CW_VERL_PREFLIGHT_BACKEND", "nccl")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)
    try:
        log_prob, advantages, mask, _ = _batch(seed=2, rows=4 * world)
        whole, _, _ = covariance_weights(log_prob, advantages, mask)  # float64 on the CPU: the reference
        mine = slice(4 * rank, 4 * rank + 4)
        shard = (t[mine].to(device) for t in (log_prob.float(), advantages.float(), mask))
        weights, _, stats = covariance_weights(*shard, gather=group_gather(dist.group.WORLD))
        problem = None
        if weights.device != device:
            problem = f"weights on {weights.device}, not {device}"
        problem = problem or _close("weights over the group", weights * mask[mine].to(device), whole[mine] * mask[mine])
        summary = stats.summary()
        everyone = group_gather(dist.group.WORLD)(summary)
        if problem is None and not bool((everyone == summary).all()):
            problem = f"ranks hold different statistics: {everyone.tolist()}"
        # A file per rank, not a line on the shared stdout, where another process's output can run into it.
        verdict = "OK" if problem is None else problem
        (Path(os.environ[REPORTS_ENV]) / f"rank{rank}.txt").write_text(verdict)
        print(f"rank {rank}: {verdict}", flush=True)
        return 0 if problem is None else 1
    finally:
        dist.destroy_process_group()


def statistics_over_ranks(ranks: int, backend: str, timeout: float = 300.0) -> list[str]:
    """Part 3: ``ranks`` processes under torchrun; the problems they report."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command += ["-m", "cw_verl.preflight", "--statistics-rank"]
    with tempfile.TemporaryDirectory(prefix="cw_verl_preflight_") as reports:
        env = {**os.environ, "CW_VERL_PREFLIGHT_BACKEND": backend, REPORTS_ENV: reports}
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return [f"{backend} all-gather over {ranks} ranks did not finish in {timeout:.0f} s (a hung collective)"]
        verdicts = {path.stem: path.read_text() for path in Path(reports).glob("rank*.txt")}
    problems = [f"{rank}: {verdict}" for rank, verdict in sorted(verdicts.items()) if verdict != "OK"]
    if len(verdicts) != ranks or result.returncode != 0:
        problems.append(
            f"torchrun exited {result.returncode} with {len(verdicts)}/{ranks} ranks reporting: "
            f"{result.stderr.strip()[-800:]}"
        )
    return problems


def run_preflight(device: str = "cuda", backend: str = "nccl", ranks: int | None = None, bridge: str = "mbridge"):
    """All three parts; prints each and returns the problems (empty: the node is ready)."""
    from omegaconf import OmegaConf

    from cw_verl import packages

    problems: list[str] = []

    def part(title, fn, *args):
        start = time.monotonic()
        try:
            found = fn(*args)
        except Exception as e:  # a part that crashes is a failed part; the next ones still run
            found = [f"{type(e).__name__}: {e}"]
        seconds = time.monotonic() - start
        print(f"  [{'ok' if not found else 'FAIL'}] {title} ({seconds:.0f} s)")
        for problem in found:
            print(f"         {problem}")
        problems.extend(found)

    if device == "cuda" and not torch.cuda.is_available():
        print("  [FAIL] no CUDA device: run the GPU preflight on a GPU node (--device cpu runs its CPU rehearsal)")
        return ["no CUDA device"]
    cfg = OmegaConf.create(
        {
            "trainer": {"device": device},
            "actor_rollout_ref": {
                "rollout": {"name": "vllm"},
                "actor": {"strategy": "megatron", "megatron": {"vanilla_mbridge": bridge == "mbridge"}},
            },
        }
    )

    def package_problems():
        import verl

        needs = packages.needed(cfg)
        found = packages.probe(needs)
        for need in needs:
            print(f"         {need.distribution} {found[need.module]['version'] or 'absent'} ({need.why})")
        print(f"         verl {verl.__version__}")
        return packages.problems(needs, found)

    part(f"packages for a Megatron + vLLM run with BRIDGE={bridge}", package_problems)
    part(f"CW loss and weights on {device} (float32) vs float64 on the CPU", loss_on_device, device)
    count = ranks or (torch.cuda.device_count() if device == "cuda" else 2)
    part(f"statistics all-gathered over {count} {backend} ranks", statistics_over_ranks, count, backend)
    print("OK: this node is ready" if not problems else f"{len(problems)} problem(s)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cw_verl check --gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--backend", default=None, help="nccl (cuda, default) or gloo (cpu)")
    parser.add_argument("--ranks", type=int, help="processes for the all-gather (default: every GPU of the node)")
    parser.add_argument("--bridge", default="mbridge", choices=["mbridge", "megatron-bridge"])
    parser.add_argument("--statistics-rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.statistics_rank:
        return statistics_rank()
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    return 1 if run_preflight(args.device, backend, args.ranks, args.bridge) else 0


if __name__ == "__main__":
    sys.exit(main())
