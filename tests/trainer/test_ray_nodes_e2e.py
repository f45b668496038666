"""The tiny recipe on a Ray cluster of two nodes started before the launch, as on a real cluster (marker ``e2e``).

``ray.cluster_utils.Cluster`` plays the nodes on this host: a head and a second node, each with one "GPU" (a
rank slot of the CPU platform), started from an environment without the CPU platform's switches, so the
run's workers get them only from the recipe's Ray ``runtime_env``. Two launches (module-scoped fixtures):

* ``lost_node``: ``RAY_ADDRESS=<cluster> NNODES=2 GPUS_PER_NODE=1 ARM=cw_grpo``, a checkpoint every step; once
  step 2 is logged, the second node is removed (its processes killed, as a crashed machine's): the trainer's
  ranks ran on both nodes, the CW metrics were logged, and the run ends non-zero in bounded time with no
  process of it left -- on this host nor as an actor in the cluster, whose daemons keep running;
* ``resumed``: a node added back, the same launch again: it resumes from the last checkpoint at the next step,
  on the prompts an uninterrupted run would train on, at the learning rate of the schedule at that step.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from cw_verl.cpu.supervise import RUN_ID_ENV, critical_processes, tagged_pids
from tests.trainer import tiny_runs

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

# What the recipe hands Ray's workers (WORKER_ENV and the metrics file): absent from the nodes' environment.
WORKER_VARS = (
    "VERL_PLATFORM",
    "VLLM_TARGET_DEVICE",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "OMP_NUM_THREADS",
    "HF_HUB_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "VERL_FILE_LOGGER_PATH",
)
# Logical CPUs per node for Ray's scheduler (the tiny profile's 16 on one node; see run_cwgrpo_tiny_cpu.sh).
NODE = dict(num_cpus=16, num_gpus=1, object_store_memory=300 * 2**20)
TOTAL_STEPS = 4
# How long the GCS may take to list a dead job's actors as DEAD.
ACTOR_CLEANUP_S = 60
# A cosine decay from the first step (no warm-up): each step has its own learning rate.
LR, MIN_LR = 1e-3, 1e-4
SETTINGS = dict(
    ARM="cw_grpo",
    NNODES="2",
    GPUS_PER_NODE="1",
    TOTAL_STEPS=str(TOTAL_STEPS),
    SAVE_FREQ="1",
    LR=str(LR),
    MIN_LR=str(MIN_LR),
    WARMUP_RATIO="0",
    LOST_PROCESS_GRACE="20",
    STEP_TIMEOUT="240",
)
NO_VAL = ("trainer.val_before_train=False", "trainer.test_freq=-1")
TRAIN_BATCH_SIZE, N_GENERATIONS, SEED = 16, 8, 42  # the tiny recipe's defaults, common.sh's seed


@contextlib.contextmanager
def without_worker_vars():
    """Nodes started here inherit this process's environment: keep the run's worker settings out of it."""
    with pytest.MonkeyPatch.context() as patch:
        for name in WORKER_VARS:
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ray_nodes_e2e")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    with without_worker_vars():
        cluster = Cluster(initialize_head=True, head_node_args=NODE)
    try:
        with without_worker_vars():
            cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def job_actors(cluster, job_id: str) -> list[dict]:
    return [a for a in cluster.global_state.actor_table(None).values() if a["JobID"] == job_id]


def live_actors_after(cluster, job_id: str, seconds: float) -> list[str]:
    """The job's actors the GCS does not list as DEAD, once they are all DEAD or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [a["Name"] for a in job_actors(cluster, job_id) if a["State"] != "DEAD"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(1)


def new_job(cluster, known: set[str]) -> str:
    jobs = [job["JobID"] for job in cluster.global_state.job_table() if job["JobID"] not in known]
    assert len(jobs) == 1, jobs
    return jobs[0]


def launch_steps(run) -> dict[int, dict]:
    """The metrics of this launch (the two launches share a run directory, each writes its own file)."""
    return run.steps(Path(run.notes["metrics"]))


def report(run) -> dict:
    return json.loads(Path(run.notes["metrics"]).with_suffix(".run.json").read_text())


def samples_yielded(checkpoint: Path) -> int:
    """Prompts verl's dataloader had handed out when it saved this checkpoint (its state in data.pt)."""
    import torch

    return torch.load(checkpoint / "data.pt", weights_only=False)["_sampler_iter_state"]["samples_yielded"]


def run_tag(run) -> str:
    """The supervisor's tag of a live launch, from the environment of its processes on this host."""
    for pid in tiny_runs.marked_processes(run.marker):
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(f"{RUN_ID_ENV}=".encode()):
                    return item.split(b"=", 1)[1].decode()
    raise AssertionError(f"no process of {run.name} carries {RUN_ID_ENV}")


def launch(root, tiny_assets, cluster):
    return tiny_runs.start(
        root,
        tiny_assets,
        "nodes",
        *NO_VAL,
        f"trainer.rollout_data_dir={root / 'rollouts'}",
        RAY_ADDRESS=cluster.address,
        **SETTINGS,
    )


@pytest.fixture(scope="module")
def lost_node(root, tiny_assets, cluster):
    known_jobs = {job["JobID"] for job in cluster.global_state.job_table()}
    head, second = cluster.head_node, next(iter(cluster.worker_nodes))
    run, proc = launch(root, tiny_assets, cluster)
    try:
        assert tiny_runs.wait_for_steps(run, proc, 2, timeout=1500), "2 steps never logged:\n" + run.output[-5000:]
        job = new_job(cluster, known_jobs)
        nodes = {head.node_id: "head", second.node_id: "second"}
        run.notes.update(
            job=job,
            # What the supervisor can see of the run on this host: the nodes' raylets started the workers.
            tagged_titles=sorted(set(critical_processes(tagged_pids(run_tag(run))).values())),
            placement={
                a["Name"] or a["ActorClassName"]: nodes.get(a["Address"]["NodeID"], a["Address"]["NodeID"])
                for a in job_actors(cluster, job)
                if a["State"] == "ALIVE"
            },
            killed_at=time.monotonic(),
        )
        # Its processes killed at once (no graceful stop), as a machine that crashed.
        cluster.remove_node(second, allow_graceful=False)
        proc.wait(timeout=900)
        run.notes["exit_after_kill_s"] = time.monotonic() - run.notes["killed_at"]
        run.returncode = proc.returncode
        run.seconds = time.monotonic() - run.notes["started"]
        run.notes["metrics"] = str(run.metrics_files()[-1])
    finally:
        if proc.poll() is None:
            tiny_runs.kill_marked(run.marker)
            proc.wait(timeout=60)
    print(json.dumps({k: v for k, v in run.notes.items() if k != "started"}, indent=1))
    return run


@pytest.fixture(scope="module")
def resumed(root, tiny_assets, cluster, lost_node):
    checkpoints = lost_node.run_dir / "checkpoints"
    last = int((checkpoints / "latest_checkpointed_iteration.txt").read_text())
    known_jobs = {job["JobID"] for job in cluster.global_state.job_table()}
    with without_worker_vars():
        cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    run, proc = launch(root, tiny_assets, cluster)
    run = tiny_runs.finish(run, proc, timeout=1800)
    assert run.returncode == 0, run.output[-5000:]
    run.notes.update(resumed_from=last, job=new_job(cluster, known_jobs), metrics=str(run.metrics_files()[-1]))
    return run


# --- two nodes ------------------------------------------------------------------------------------------------


def test_the_trainers_ranks_ran_on_both_nodes(lost_node):
    placement = lost_node.notes["placement"]
    ranks = {name: node for name, node in placement.items() if "WorkerDict" in name}
    assert len(ranks) == 2 and set(ranks.values()) == {"head", "second"}, placement
    # The rollout servers (vLLMHttpServer actors, vllm_server_<replica>_<node within it>), one per rank, beside it.
    servers = [node for name, node in placement.items() if name.startswith("vllm_server_")]
    assert sorted(servers) == ["head", "second"], placement


def test_the_cw_metrics_were_logged_on_two_nodes(lost_node):
    steps = launch_steps(lost_node)
    for step in (1, 2):
        row = steps[step]
        assert row["actor/cw/num_tokens"] > 0 and row["actor/cw/weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert 0 <= row["actor/cw/weight_min"] <= 1 <= row["actor/cw/weight_max"]


def test_the_workers_settings_came_through_runtime_env_only(lost_node, cluster):
    command = report(lost_node)["command"]
    assert not [arg for arg in command if "ray_init.num_gpus" in arg or "ray_init.num_cpus" in arg]
    for name in WORKER_VARS[:-1]:
        assert any(f"runtime_env.env_vars.{name}=" in arg for arg in command), name
    # The nodes' own daemons never had them: only the run's runtime_env can have selected the CPU platform.
    raylet = cluster.head_node.all_processes["raylet"][0].process.pid
    with open(f"/proc/{raylet}/environ", "rb") as f:
        environ = f.read()
    assert b"VERL_PLATFORM=" not in environ and f"{RUN_ID_ENV}=".encode() not in environ
    # The supervisor's tag reached the run's workers the same way, so it finds (and ends) them on this host.
    titles = lost_node.notes["tagged_titles"]
    assert {"ray::WorkerDict", "VLLM::EngineCore"} <= {title.split(".")[0] for title in titles}, titles


# --- a node lost mid-run ---------------------------------------------------------------------------------------


def test_a_lost_node_ends_the_run_nonzero_in_bounded_time(lost_node):
    assert lost_node.returncode not in (0, None), lost_node.output[-3000:]
    # Ray notices the dead node within seconds; the supervisor's lost-process grace (20 s) bounds a trainer that
    # keeps waiting on it; then the run's processes are ended.
    assert lost_node.notes["exit_after_kill_s"] < 240, lost_node.notes
    assert TOTAL_STEPS not in launch_steps(lost_node)


def test_no_process_of_the_run_is_left_and_the_cluster_lives_on(lost_node, cluster):
    assert tiny_runs.marked_processes(lost_node.marker) == {}  # supervisor, driver
    assert tagged_pids(report(lost_node)["run_id"]) == []  # its Ray workers and vLLM engines on this host
    # The job ended with its driver, and Ray ended its actors on every node.
    job = next(j for j in cluster.global_state.job_table() if j["JobID"] == lost_node.notes["job"])
    assert job["IsDead"]
    # The GCS marks them DEAD asynchronously, after their processes are gone: a CI run read four of them still
    # ALIVE right after the driver's exit while none of their processes was left (the line above).
    assert live_actors_after(cluster, job["JobID"], ACTOR_CLEANUP_S) == []
    assert cluster.head_node.remaining_processes_alive()


# --- the relaunch ----------------------------------------------------------------------------------------------


def test_the_relaunch_resumes_at_the_next_step(resumed, lost_node):
    last = resumed.notes["resumed_from"]
    assert last >= 2  # a checkpoint every step, and step 2 was logged before the node was lost
    assert f"global_step_{last}" in resumed.output and "Resuming from" in resumed.output
    trained = sorted(s for s, row in launch_steps(resumed).items() if "critic/score/mean" in row)
    assert trained == list(range(last + 1, TOTAL_STEPS + 1))
    assert tiny_runs.marked_processes(resumed.marker) == {}
    assert tagged_pids(report(resumed)["run_id"]) == []


def _batches(train_file, count: int) -> list[Counter]:
    """The ground truths of the first ``count`` training batches of an uninterrupted run: verl's sampler
    (``create_rl_sampler``: torchdata's RandomSampler seeded with data.seed), whole batches in order."""
    import pandas as pd
    import torch
    from torchdata.stateful_dataloader.sampler import RandomSampler

    rows = pd.read_parquet(train_file)
    order = list(RandomSampler(range(len(rows)), generator=torch.Generator().manual_seed(SEED)))
    truths = [rows.iloc[i]["reward_model"]["ground_truth"] for i in order[: count * TRAIN_BATCH_SIZE]]
    return [Counter(truths[k * TRAIN_BATCH_SIZE : (k + 1) * TRAIN_BATCH_SIZE]) for k in range(count)]


def _trained_on(root, step: int) -> Counter:
    """Each prompt of the step once (verl dumps its N_GENERATIONS samples)."""
    lines = (root / "rollouts" / f"{step}.jsonl").read_text().splitlines()
    counts = Counter(json.loads(line)["gts"] for line in lines)
    assert all(n % N_GENERATIONS == 0 for n in counts.values()), counts
    return Counter({gt: n // N_GENERATIONS for gt, n in counts.items()})


def test_the_relaunch_trains_on_the_prompts_an_uninterrupted_run_would(root, tiny_assets, resumed):
    expected = _batches(tiny_assets / "data" / "train.parquet", TOTAL_STEPS)
    # The first launch's steps check the reconstruction of verl's order; the relaunch's continue it.
    for step in range(1, TOTAL_STEPS + 1):
        assert _trained_on(root, step) == expected[step - 1], step
    # verl's dataloader state: where the relaunch started, and where it ended.
    checkpoints = resumed.run_dir / "checkpoints"
    last = resumed.notes["resumed_from"]
    assert samples_yielded(checkpoints / f"global_step_{last}") == last * TRAIN_BATCH_SIZE
    assert samples_yielded(checkpoints / f"global_step_{TOTAL_STEPS}") == TOTAL_STEPS * TRAIN_BATCH_SIZE


def test_the_relaunch_continues_the_learning_rate_schedule(resumed, lost_node):
    import torch
    from verl.utils.torch_functional import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    schedule = get_cosine_schedule_with_warmup(optimizer, 0, TOTAL_STEPS, min_lr_ratio=MIN_LR / LR)
    rates = []
    for _ in range(TOTAL_STEPS + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    logged = {s: row["actor/lr"] for s, row in launch_steps(lost_node).items() if "actor/lr" in row}
    logged.update({s: row["actor/lr"] for s, row in launch_steps(resumed).items() if "actor/lr" in row})
    # Which schedule position verl logs at step s (before or after its own scheduler step), from the first launch.
    offset = next(o for o in (0, 1) if logged[1] == pytest.approx(rates[o], rel=1e-6))
    for step in sorted(logged):
        assert logged[step] == pytest.approx(rates[step - 1 + offset], rel=1e-6), (step, logged, rates)
    first = resumed.notes["resumed_from"] + 1
    # A schedule restarted by the relaunch would log the first step's rate again.
    assert logged[first] != pytest.approx(logged[1], rel=1e-3)
