"""The CPUs this process may use, and the threads torch and ONNX Runtime get (torch-free).

A container limited to two CPUs still sees every core of its host in ``os.cpu_count()``,
and torch and ONNX Runtime start one thread per core by default: more threads than CPUs,
which then take turns (DESIGN.md, "Execution"). What the process may use is the smaller of
its CPU affinity (``os.sched_getaffinity``: taskset, cpuset) and its cgroup's CPU quota
(``cpu.max`` of cgroup v2, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of cgroup v1:
Kubernetes CPU limits, ``docker run --cpus``), rounded up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
#: The environment variable through which OpenMP (and so torch) takes its thread count.
OMP_ENV = "OMP_NUM_THREADS"
#: cgroup v1 directories that may hold the cpu controller.
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def usable_cpus(
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_CGROUP,
    affinity: int | None = None,
) -> int:
    """min(CPUs of the affinity mask, ceil(cgroup quota / period)), at least 1.

    cgroup_root, proc_cgroup: where the cgroup file systems are mounted and the file that
    names this process's cgroups (the defaults; tests pass fakes). affinity: the number of
    CPUs of the affinity mask (default: ``os.sched_getaffinity(0)``, or ``os.cpu_count()``
    where the platform has no affinity).
    """
    if affinity is None:
        affinity = _affinity()
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    cpus = affinity if quota is None else min(affinity, math.ceil(quota))
    return max(1, cpus)


def _affinity() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cgroup_cpu_quota(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP
) -> float | None:
    """The CPUs the cgroup quota allows (quota / period, e.g. 1.5), or None without one.

    The smallest quota of the process's cgroup and its ancestors (each level limits what
    is below it), of cgroup v2 and of v1's cpu controller, wherever the files exist.
    Unreadable or malformed files count as no quota.
    """
    quotas = [
        quota
        for directory in _cgroup_dirs(Path(cgroup_root), Path(proc_cgroup))
        for quota in (_v2_quota(directory), _v1_quota(directory))
        if quota is not None
    ]
    return min(quotas, default=None)


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> Iterator[Path]:
    """The directories of this process's cgroup and of its ancestors, v2 and v1 (cpu).

    ``/proc/self/cgroup`` lines are ``id:controllers:path``: ``0::path`` for v2, and for
    v1 the line whose controllers include ``cpu``. Without that file (or a line), the
    cgroup is taken to be the root, as it is inside a container with its own cgroup
    namespace.
    """
    v2, v1 = "/", "/"
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        number, controllers, path = parts
        if number == "0" and not controllers:
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    yield from _with_ancestors(root, v2)
    for mount in _V1_CPU_MOUNTS:
        yield from _with_ancestors(root / mount, v1)


def _with_ancestors(base: Path, path: str) -> Iterator[Path]:
    """``base/path``, then each parent of it up to ``base`` itself."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    for end in range(len(parts), -1, -1):
        yield base.joinpath(*parts[:end])


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ratio(quota: str, period: str) -> float | None:
    """quota / period in CPUs, or None for "max", -1, zero or non-numbers."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _v2_quota(directory: Path) -> float | None:
    """``cpu.max`` of cgroup v2: ``"<quota> <period>"``, the quota ``max`` when unlimited."""
    text = _read(directory / "cpu.max")
    fields = text.split() if text else []
    return _ratio(fields[0], fields[1]) if len(fields) == 2 else None


def _v1_quota(directory: Path) -> float | None:
    """``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of cgroup v1 (quota -1: unlimited)."""
    quota = _read(directory / "cpu.cfs_quota_us")
    period = _read(directory / "cpu.cfs_period_us")
    return _ratio(quota, period) if quota is not None and period is not None else None


def torch_threads(requested: int, environ: Mapping[str, str] | None = None) -> int | None:
    """The intra-op threads torch should get, or None to leave torch's own choice.

    requested: ``--torch-threads`` (``XAISERVE_TORCH_THREADS``); > 0 is taken as it is.
    0 (auto): None when ``OMP_NUM_THREADS`` is set (torch follows it), else
    :func:`usable_cpus`.
    """
    if requested < 0:
        raise ValueError(f"torch threads must be >= 0, got {requested}")
    if requested > 0:
        return requested
    environ = os.environ if environ is None else environ
    if environ.get(OMP_ENV, "").strip():
        return None
    return usable_cpus()
