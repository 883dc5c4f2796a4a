"""What the machine lends this process: memory that may still be allocated, and CPU threads.

Sizes that cannot fit are refused before anything is allocated (``require_memory``), with the estimate
and what is available, instead of ending in an allocator's traceback half-way through a run.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from vaelab.errors import ResourceError, UsageError
from vaelab.provenance import cpuinfo


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdecimal() else None     # cgroup v2 writes "max" for no limit


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8", errors="replace").splitlines():
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
        for line in Path("/proc/self/status").read_text(encoding="utf-8", errors="replace").splitlines():
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


def gpu_memory(device) -> tuple[int, str]:
    """The memory this process may still allocate on a CUDA ``device``: what the device has free, and what torch's
    caching allocator holds reserved but unused (it serves the next allocations first): (bytes, its name)."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached, f"free on {torch.cuda.get_device_name(device)}"


def require_memory(need_bytes: float, what: str, fix: str, device=None) -> None:
    """Raise ResourceError if ``need_bytes`` exceeds the memory this process may still allocate: the host's, or on a
    CUDA ``device`` (a torch.device) that device's."""
    available, source = gpu_memory(device) if device is not None and device.type == "cuda" else available_memory()
    if need_bytes > available:
        raise ResourceError(f"{what} needs about {format_bytes(need_bytes)} of memory, but only "
                            f"{format_bytes(available)} is available ({source}); {fix}")


def default_threads(local_size: int = 1) -> int:
    """CPU threads for one of ``local_size`` processes on this machine when ``--threads`` is not given.

    One process: ``$OMP_NUM_THREADS`` when it is set to a whole number ≥ 1 (the variable every BLAS and torch
    read, so ``OMP_NUM_THREADS=1 make test`` runs everything on one thread), else the cores this process may
    run on (its CPU affinity mask), not the machine's core count. Under torchrun (``local_size`` > 1) the cores
    are shared out instead: torchrun itself sets OMP_NUM_THREADS=1 in every worker, whatever the machine."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    if local_size == 1 and text.isascii() and text.isdigit() and int(text) >= 1:     # str.isdigit() alone takes "²"
        return int(text)
    return max(1, usable_cores() // max(1, local_size))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity mask; the machine's count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (``Features`` on ARM)."""
    return set(cpuinfo("flags", "Features").split())


NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})   # /proc/cpuinfo flags of bf16 product kernels
# The flags that decide which product kernels a CPU runs (oneDNN's and Inductor's), recorded beside timings.
KERNEL_FLAGS = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"})


def kernel_flags() -> list[str]:
    """Which of ``KERNEL_FLAGS`` this CPU has, sorted: what a timing's record says about its kernels."""
    return sorted(cpu_flags() & KERNEL_FLAGS)


def has_native_bf16(device) -> bool:
    """Whether ``device`` computes bfloat16 products in hardware (a CUDA device with bf16 support, or a CPU
    with AVX-512 BF16 or AMX) rather than emulating them."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


# bf16 products slower than float32 by more than this are emulated in software (measured: 22–124× on an
# AVX2-only EPYC); a native kernel without AMX runs about 1.5–2× (an AVX-512 BF16 Xeon), with AMX or a Zen 4's
# bf16 kernels 0.2–0.5× (faster). So the decision is made from a timing, and the flags only named.
EMULATED_RATIO = 3.0


def bf16_product_ratio(device, rounds: int = 20, budget_s: float = 0.5) -> float:
    """Time of a 512 × 512 × 512 bfloat16 product over the float32 one on ``device``, the best of each.

    The two are timed in turn, one of each per round, for ``rounds`` rounds or until ``budget_s`` seconds have
    passed, whichever comes first, but at least 3 rounds (an emulated bf16 product takes 22–124 × float32's time).
    In turn, so that another process's load, or a clock still rising, reaches both: timed one dtype after the
    other, five of each, the ratio read 0.06–2.3 on a 2-core Zen 4 beside a training run (0.32 and 0.85 there
    alone); in turn, 0.38–0.50 beside the same run (benchmarks/README.md, twenty-eighth session)."""
    import time

    import torch

    a32 = torch.randn(512, 512, device=device)
    operands = (a32, a32.to(torch.bfloat16))
    for a in operands:
        torch.mm(a, a)                                   # each kernel's first call (dispatch, packing) untimed

    def timed(a) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    best = [float("inf"), float("inf")]                 # float32, bfloat16
    started = time.perf_counter()
    for done in range(rounds):
        if done >= 3 and time.perf_counter() - started > budget_s:
            break
        best = [min(b, timed(a)) for b, a in zip(best, operands)]
    return best[1] / best[0]


def check_bf16(device) -> str:
    """Decide ``--precision bf16`` from a timing on the spot: refuse (UsageError) where bf16 products are emulated
    (more than ``EMULATED_RATIO`` × float32's time), else return one line saying how bf16 compares with float32
    here, slower or faster, measured now."""
    import torch

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                         f"use --precision fp32")
    ratio = bf16_product_ratio(device)
    where = "this GPU" if device.type == "cuda" else "this CPU"
    if ratio > EMULATED_RATIO:
        flags = sorted(cpu_flags() & NATIVE_BF16_FLAGS) if device.type == "cpu" else []
        named = f"/proc/cpuinfo lists {', '.join(flags)}" if flags else \
            "neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo"
        raise UsageError(f"--precision bf16: a bf16 product runs {ratio:.1f}× the time of float32 on {where} (a "
                         f"512³ product, measured now; {named}): it is emulated, not native; use --precision fp32, "
                         f"or bf16-emulated to see bf16's numbers at float32 speed")
    if ratio > 1:
        return (f"bf16 products run {ratio:.2f}× the time of float32 on {where} (a 512³ product, measured now): "
                f"slower than fp32 here, run as asked")
    return f"bf16 products run {ratio:.2f}× the time of float32 on {where} (a 512³ product, measured now)"


def process_runs(pid: int) -> bool:
    """Whether process ``pid`` of this machine runs: a zombie (killed, not yet reaped by its parent: torchrun, a
    sweep) does not, nor a pid that is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False
