"""What the machine lends this process: memory that may still be allocated, and CPU threads.

Sizes that cannot fit are refused before anything is allocated (``require_memory``), with the estimate
and what is available, instead of ending in an allocator's traceback half-way through a run.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from vaelab.errors import ResourceError


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None       # cgroup v2 writes "max" for no limit


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _address_space_left() -> int | None:
    """RLIMIT_AS (``ulimit -v``) minus the address space this process already maps."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(0, soft - int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return soft


def memory_limits() -> dict[str, int]:
    """Every limit that applies, in bytes of memory still available under it, by name."""
    limits = {"MemAvailable": _meminfo_available(), "ulimit -v": _address_space_left()}
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),           # cgroup v2
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",                            # cgroup v1
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        total, used = _read_int(limit), _read_int(usage)
        if total is not None and used is not None and total < 1 << 60:
            limits["cgroup memory limit"] = max(0, total - used)
    return {name: value for name, value in limits.items() if value is not None}


def available_memory() -> tuple[int, str]:
    """The tightest limit: (bytes, its name); (2⁶³, 'unknown') where nothing can be read."""
    limits = memory_limits()
    if not limits:
        return 2**63, "unknown"
    name = min(limits, key=limits.get)
    return limits[name], name


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(count) < 1024 or unit == "PiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def require_memory(need_bytes: float, what: str, fix: str) -> None:
    """Raise ResourceError if ``need_bytes`` exceeds the memory this process may still allocate."""
    available, source = available_memory()
    if need_bytes > available:
        raise ResourceError(f"{what} needs about {format_bytes(need_bytes)} of memory, but only "
                            f"{format_bytes(available)} is available ({source}); {fix}")


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity mask), not the machine's core count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
