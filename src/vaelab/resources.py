"""What the machine lends this process: memory that may still be allocated, and CPU threads.

Sizes that cannot fit are refused before anything is allocated (``require_memory``), with the estimate
and what is available, instead of ending in an allocator's traceback half-way through a run.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from vaelab.errors import ResourceError, UsageError


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


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})   # /proc/cpuinfo flags of bf16 product kernels


def has_native_bf16(device) -> bool:
    """Whether ``device`` computes bfloat16 products in hardware (a CUDA device with bf16 support, or a CPU
    with AVX-512 BF16 or AMX) rather than emulating them."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def require_native_bf16(device) -> None:
    """Refuse ``--precision bf16`` where bfloat16 products would be emulated, saying how much slower they run
    here (measured on the spot: a 512 × 512 × 512 product in each dtype, best of 5)."""
    import time

    import torch

    if has_native_bf16(device):
        return
    if device.type == "cuda":
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                         f"use --precision fp32")
    a32 = torch.randn(512, 512)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = a32.to(dtype)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            torch.mm(a, a)
            best = min(best, time.perf_counter() - start)
        timings[dtype] = best
    ratio = timings[torch.bfloat16] / timings[torch.float32]
    raise UsageError(f"--precision bf16: this CPU has no native bfloat16 (neither avx512_bf16 nor amx_bf16 in "
                     f"/proc/cpuinfo), so the products would be emulated: a bf16 product runs {ratio:.1f}× the "
                     f"time of float32 here (measured now); use --precision fp32, or bf16-emulated to see bf16's numbers "
                     f"at float32 speed")
