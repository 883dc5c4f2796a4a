"""Where a result came from: vaelab's version and commit, torch, the machine, threads, device, date."""

from __future__ import annotations

import datetime
import functools
import platform
import subprocess
from pathlib import Path


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout vaelab runs from, when it runs from one (an editable install): None where this file
    is not one that repository tracks. A vaelab installed into a project's own `.venv` lies inside that project's
    repository, and until 2026-12-07 every record named the project's commit as vaelab's (and "+modified" for the
    project's own changes)."""
    source = Path(__file__).resolve().parent
    try:
        tracked = subprocess.run(["git", "-C", str(source), "ls-files", "--error-unmatch", "--", Path(__file__).name],
                                 capture_output=True, encoding="utf-8", errors="replace", timeout=5)
        if tracked.returncode != 0:
            return None
        done = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, encoding="utf-8",
                              errors="replace", timeout=5)
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, encoding="utf-8", errors="replace", timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() + ("+modified" if dirty.returncode == 0 and dirty.stdout.strip() else "")


CPUINFO = Path("/proc/cpuinfo")


def cpuinfo(*fields: str) -> str:
    """The value of the first line of /proc/cpuinfo whose key is one of ``fields`` ("" where there is none).

    The key is matched whole: "model" is the model number, not the "model name" line."""
    try:
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            key, colon, value = line.partition(":")
            if colon and key.strip() in fields:
                return value.strip()
    except OSError:
        pass
    return ""


@functools.cache
def cpu_name() -> str:
    """The CPU's model name and, where /proc/cpuinfo gives them (x86), its family and model numbers.

    A virtual machine may show only a generic name ("AMD EPYC"); the numbers tell the generations apart (AMD's
    family 25 is Zen 3 and Zen 4, family 26 Zen 5), and results measured on different ones are not comparable."""
    name = cpuinfo("model name") or platform.processor() or platform.machine()
    family, model = cpuinfo("cpu family"), cpuinfo("model")
    return f"{name} (family {family}, model {model})" if family and model else name


def provenance(device: str, threads: int) -> dict:
    import torch

    from vaelab import __version__, native

    record = {"vaelab": __version__, "commit": git_commit(), "torch": torch.__version__,
              "python": platform.python_version(), "cpu": cpu_name(), "threads": threads, "device": str(device),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    kernels = native.resolved()         # e.g. {"planar": "native"}, where the process ran a planar flow
    return {**record, "native_kernels": kernels} if kernels else record
