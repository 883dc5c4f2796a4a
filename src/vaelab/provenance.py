"""Where a result came from: vaelab's version and commit, torch, the machine, threads, device, date."""

from __future__ import annotations

import datetime
import functools
import platform
import subprocess
from pathlib import Path


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout vaelab runs from, when it runs from one (an editable install)."""
    source = Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() + ("+modified" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def cpuinfo(*fields: str) -> str:
    """The value of the first /proc/cpuinfo line that starts with one of ``fields`` ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(fields):
                return line.split(":", 1)[1].strip()
    except (OSError, IndexError):
        pass
    return ""


@functools.cache
def cpu_name() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def provenance(device: str, threads: int) -> dict:
    import torch

    from vaelab import __version__, native

    record = {"vaelab": __version__, "commit": git_commit(), "torch": torch.__version__,
              "python": platform.python_version(), "cpu": cpu_name(), "threads": threads, "device": str(device),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    kernels = native.resolved()         # e.g. {"planar": "native"}, where the process ran a planar flow
    return {**record, "native_kernels": kernels} if kernels else record
