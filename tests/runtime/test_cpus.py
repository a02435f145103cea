"""The CPUs a process may use (xaiserve.runtime.cpus), on fake cgroup file systems: affinity
and cgroup v2 / v1 quotas, the process's own cgroup and its ancestors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xaiserve.runtime.cpus import cgroup_cpu_quota, torch_threads, usable_cpus


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _v2(root: Path, cpu_max: str, cgroup: str = "/") -> tuple[Path, Path]:
    """A cgroup v2 mount whose ``cgroup`` has ``cpu.max``; returns (mount, /proc/self/cgroup)."""
    _write(root / "sys" / cgroup.strip("/") / "cpu.max", cpu_max)
    _write(root / "proc_cgroup", f"0::{cgroup}")
    return root / "sys", root / "proc_cgroup"


@pytest.mark.parametrize(
    ("cpu_max", "affinity", "expected"),
    [
        ("200000 100000", 8, 2),  # docker run --cpus 2
        ("150000 100000", 8, 2),  # 1.5 CPUs: rounded up
        ("50000 100000", 8, 1),  # half a CPU: still one thread
        ("max 100000", 8, 8),  # no quota: the affinity
        ("400000 100000", 3, 3),  # the affinity is smaller
        ("garbage", 4, 4),  # unreadable: no quota
    ],
)
def test_cgroup_v2_quota_and_affinity(
    tmp_path: Path, cpu_max: str, affinity: int, expected: int
) -> None:
    mount, proc = _v2(tmp_path, cpu_max)
    assert usable_cpus(mount, proc, affinity=affinity) == expected


@pytest.mark.parametrize(
    ("quota", "period", "mount", "expected"),
    [
        ("300000", "100000", "cpu", 3),
        ("-1", "100000", "cpu", 16),  # -1: unlimited
        ("250000", "100000", "cpu,cpuacct", 3),
        ("0", "100000", "cpu", 16),  # nonsense: no quota
    ],
)
def test_cgroup_v1_quota(
    tmp_path: Path, quota: str, period: str, mount: str, expected: int
) -> None:
    _write(tmp_path / "sys" / mount / "cpu.cfs_quota_us", quota)
    _write(tmp_path / "sys" / mount / "cpu.cfs_period_us", period)
    _write(tmp_path / "proc_cgroup", "4:memory:/x\n2:cpu,cpuacct:/\n0::/")
    assert usable_cpus(tmp_path / "sys", tmp_path / "proc_cgroup", affinity=16) == expected


def test_the_smallest_quota_of_the_cgroup_and_its_ancestors_counts(tmp_path: Path) -> None:
    mount, proc = _v2(tmp_path, "max 100000", "/kubepods/pod1/app")
    _write(mount / "kubepods" / "pod1" / "cpu.max", "300000 100000")
    _write(mount / "cpu.max", "max 100000")
    assert cgroup_cpu_quota(mount, proc) == 3.0
    assert usable_cpus(mount, proc, affinity=64) == 3
    _write(mount / "kubepods" / "pod1" / "app" / "cpu.max", "120000 100000")
    assert usable_cpus(mount, proc, affinity=64) == 2


def test_a_v1_cgroup_path_outside_the_namespace_falls_back_to_the_mounts_root(
    tmp_path: Path,
) -> None:
    """Docker without a cgroup namespace: /proc/self/cgroup names the host's path, which
    the container's mount does not have; the mount's root holds the container's quota."""
    _write(tmp_path / "sys" / "cpu" / "cpu.cfs_quota_us", "200000")
    _write(tmp_path / "sys" / "cpu" / "cpu.cfs_period_us", "100000")
    _write(tmp_path / "proc_cgroup", "3:cpu,cpuacct:/docker/0123abcd")
    assert usable_cpus(tmp_path / "sys", tmp_path / "proc_cgroup", affinity=32) == 2


def test_no_cgroup_files_leave_the_affinity_and_at_least_one(tmp_path: Path) -> None:
    missing = tmp_path / "none"
    assert cgroup_cpu_quota(missing, missing) is None
    assert usable_cpus(missing, missing, affinity=6) == 6
    assert usable_cpus(missing, missing, affinity=0) == 1


def test_this_process() -> None:
    cpus = usable_cpus()
    assert 1 <= cpus <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert cpus <= len(os.sched_getaffinity(0))


def test_torch_threads_follow_the_request_then_omp_then_the_usable_cpus() -> None:
    assert torch_threads(3, {}) == 3
    assert torch_threads(3, {"OMP_NUM_THREADS": "1"}) == 3  # asked for: wins
    assert torch_threads(0, {"OMP_NUM_THREADS": "1"}) is None  # torch follows OpenMP's
    assert torch_threads(0, {"OMP_NUM_THREADS": " "}) == usable_cpus()
    assert torch_threads(0, {}) == usable_cpus()
    with pytest.raises(ValueError, match=">= 0"):
        torch_threads(-1, {})
