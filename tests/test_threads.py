"""torch's threads: the cores this process may use (affinity, cgroup quota), OMP_NUM_THREADS when set, a share per
process of a launch; the plans say which."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from locedit.core import threads


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(threads, "cpu_quota", lambda: None)


def test_omp_num_threads_is_the_users_number(two_cores):
    assert threads.choose({"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS=3")
    assert threads.choose({"OMP_NUM_THREADS": "3", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})[0] == 3


def test_the_cores_of_the_affinity_shared_among_a_launchs_processes(two_cores):
    alone, reason = threads.choose({})
    assert alone == 2 and reason.startswith("2 cores of this process's CPU affinity")
    launched, reason = threads.choose({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    assert launched == 1 and "shared by the launch's 2 processes on this machine" in reason
    # Two machines of 2 processes each: 2 processes here.
    assert threads.choose({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})[0] == 1
    assert threads.choose({"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3"})[0] == 1  # never below one


def test_a_cgroup_quota_caps_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # Docker's --cpus 1.5 (cgroup v2)
    assert threads.cpu_quota(tmp_path) == 1.5
    read = threads.cpu_quota
    monkeypatch.setattr(threads, "cpu_quota", lambda: read(tmp_path))
    assert threads.choose({}) == (2, "2 cores of the cgroup's CPU quota (1.5); OMP_NUM_THREADS sets another number")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert read(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert read(v1) == 4.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert read(v1) is None


def test_apply_sets_torchs_threads_and_the_childrens(monkeypatch, two_cores):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "_chosen", None)
    try:
        assert threads.apply() == (1, "OMP_NUM_THREADS=1")
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert threads.describe() == "1 (OMP_NUM_THREADS=1)"
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_the_plan_says_how_many_threads_and_why():
    """A command started on one core (`taskset`, a Slurm binding) uses one thread, and its plan says so."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
    code += "from locedit.train import cli; sys.exit(cli(sys.argv[1:]))"
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")
    result = subprocess.run(
        [sys.executable, "-c", code, recipe, "--dry_run", "true"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "  threads      1 (1 core of this process's CPU affinity; OMP_NUM_THREADS sets another number)" in (
        result.stdout
    )
