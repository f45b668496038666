"""The CPU platform (in fresh interpreters: verl resolves its platform once per process) and the launcher."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cw_verl.cpu.launch import RankFailed, run_ranks
from tests.demo import ranks


def _python(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_cpu_platform_selects_cpu_gloo_and_verls_fsdp_engine():
    lines = _python(
        "from cw_verl.cpu.platform import PlatformCPU, enable_cpu_platform\n"
        "enable_cpu_platform()\n"
        "import torch\n"
        "from verl.plugin.platform import get_platform\n"
        "from verl.utils.device import get_device_id, get_device_name, get_nccl_backend, get_torch_device\n"
        "from verl.workers.engine import EngineRegistry\n"
        "import verl.workers.engine.fsdp.transformer_impl as impl\n"
        "print(type(get_platform()).__name__, get_device_name(), get_device_id(), get_nccl_backend(),\n"
        "      impl.device_name)\n"
        "print(EngineRegistry.get_engine_cls('language_model', 'fsdp2').__name__)\n"
        "print(torch.zeros(2).to(get_device_id()).device.type, get_torch_device().max_memory_allocated())\n"
        "free, total = get_torch_device().mem_get_info(); print(0 < free <= total)\n"
    )
    assert lines[-4:] == ["PlatformCPU cpu cpu gloo cpu", "FSDPEngineWithLMHead", "cpu 0", "True"]


def test_cpu_platform_is_never_auto_detected():
    lines = _python(
        "import os; os.environ.pop('VERL_PLATFORM', None)\n"
        "import cw_verl.cpu.platform\n"
        "from verl.plugin.platform import get_platform\n"
        "print(type(get_platform()).__name__)\n"
    )
    assert lines[-1] != "PlatformCPU"


def test_enabling_after_verl_resolved_another_platform_fails_loudly():
    lines = _python(
        "import os; os.environ.pop('VERL_PLATFORM', None)\n"
        "from verl.plugin.platform import get_platform\n"
        "get_platform()\n"
        "from cw_verl.cpu.platform import enable_cpu_platform\n"
        "try:\n"
        "    enable_cpu_platform()\n"
        "except RuntimeError as error:\n"
        "    print('raised', 'before anything calls' in str(error))\n"
    )
    assert lines[-1] == "raised True"


def test_run_ranks_sets_up_gloo_ranks_on_the_cpu_platform():
    assert run_ranks(ranks.rank_and_platform, 2, timeout_s=240) == [(0, 2, "cpu", "gloo"), (1, 2, "cpu", "gloo")]


def test_run_ranks_raises_the_failing_ranks_traceback():
    with pytest.raises(RankFailed, match="rank one fails on purpose"):
        run_ranks(ranks.raise_on_rank_one, 2, timeout_s=240)


def test_run_ranks_kills_ranks_past_the_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        run_ranks(ranks.sleep_forever, 2, timeout_s=10)
    assert time.monotonic() - start < 40


def test_each_call_hands_the_ranks_the_callers_environment_of_that_call(monkeypatch):
    """Ranks fork from a server started at the first call: a setting made after it still reaches them."""
    run_ranks(ranks.rank_and_platform, 1, timeout_s=240)  # the fork server is up
    monkeypatch.setenv("CW_VERL_TEST_SETTING", "set after the fork server started")
    assert (
        run_ranks(ranks.environment_value, 2, "CW_VERL_TEST_SETTING", timeout_s=240)
        == ["set after the fork server started"] * 2
    )
    monkeypatch.delenv("CW_VERL_TEST_SETTING")
    assert run_ranks(ranks.environment_value, 1, "CW_VERL_TEST_SETTING", timeout_s=240) == [None]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ranks_die_with_a_launcher_killed_by_sigkill(tmp_path):
    """The launcher's death ends its fork server, whose death ends the ranks (PR_SET_PDEATHSIG)."""
    import os
    import signal

    code = (
        "from cw_verl.cpu.launch import run_ranks\n"
        "from tests.demo import ranks\n"
        f"run_ranks(ranks.write_pid_and_sleep, 2, {str(tmp_path)!r}, timeout_s=600)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)))
    try:
        deadline = time.monotonic() + 240
        while len(list(tmp_path.glob("rank*.pid"))) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids), pids
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if _alive(pid)]
