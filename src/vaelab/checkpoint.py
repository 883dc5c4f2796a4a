"""The run directory on disk: weights, the resumable training state, loading a run.

Every file is written through ``vaelab.atomic.atomic_write``. Nothing here unpickles: weights and
training state are safetensors files whose scalar parts travel as JSON in the safetensors metadata.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes, save as save_bytes

from vaelab.atomic import WriteError, atomic_write, unreadable, write_text
from vaelab.config import RunConfig
from vaelab.errors import CheckpointError, RunLocked, UsageError
from vaelab.models import build_model
from vaelab.tables import shell_word

__all__ = ["WriteError", "atomic_write", "write_text", "save_tensors", "load_tensors", "read_tensors", "save_weights",
           "load_model", "load_model_weights", "is_run", "RunLock", "lock_holder", "new_run_dir", "check_finite"]

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
STATE = "training_state.safetensors"
METRICS = "metrics.csv"
LOCK = ".lock"
PRUNED = "pruned.json"           # {"epoch", "trial", …}: a sweep's pruner stopped this run after that epoch
DIVERGED = "diverged.json"       # {"epoch", "step", "what"}: training from the checkpoint at that point diverged


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None,
                 encoded: str | None = None) -> None:
    """A safetensors file; ``metadata`` (any JSON), or ``encoded`` (its JSON text, made by the caller), is stored
    under the key ``json``."""
    payload = save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                         metadata={"json": encoded if encoded is not None else json.dumps(metadata or {})})
    atomic_write(path, lambda handle: handle.write(payload))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file written by ``save_tensors``; a damaged one is a CheckpointError."""
    tensors, metadata, _ = read_tensors(path)
    return tensors, metadata


def read_tensors(path: Path, fix: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """``load_tensors`` and the SHA-256 of the file, all from one read of its bytes: where a training replaces the
    file meanwhile (an atomic rename: the read goes on in the old one), the tensors, metadata and digest are still
    those of one version of it. ``fix``: what the error of a missing or damaged file advises instead of retraining."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing; " + (fix or "the run is incomplete: retrain, or pass another run"))
    try:
        data = path.read_bytes()
        tensors = load_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        metadata = json.loads(header.get("__metadata__", {}).get("json", "{}"))
    except OSError as exc:
        raise CheckpointError(unreadable(path, exc, fix or "resume from an intact run or retrain")) from exc
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupted ({exc}); "
                              + (fix or "it cannot be loaded: resume from an intact run or retrain")) from exc
    return tensors, metadata, hashlib.sha256(data).hexdigest()


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata of a safetensors file written by ``save_tensors``, without reading its tensors."""
    try:
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if not 0 < header_len < 1 << 26:
                raise ValueError(f"header length {header_len}")
            header = json.loads(handle.read(header_len))
            # the tensors' bytes end where the header's last data_offsets say: a shorter file lost its tail
            end = 8 + header_len + max((entry["data_offsets"][1] for name, entry in header.items()
                                        if name != "__metadata__"), default=0)
            size = os.fstat(handle.fileno()).st_size
            if size != end:
                raise ValueError(f"{size} bytes where its header describes {end}")
        return json.loads(header.get("__metadata__", {}).get("json", "{}"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing; the run is incomplete: retrain, or pass another run") from exc
    except OSError as exc:
        raise CheckpointError(unreadable(path, exc, "restore it from a copy, or retrain")) from exc
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, IndexError, TypeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupted ({exc}); it cannot be read") from exc


def resume_command(run_dir: Path, world) -> str:
    """The command that goes on with a run trained by ``world``'s processes: `vaelab train --out RUN --resume`, or
    torchrun's of as many (a run resumes exactly only under the processes that wrote it)."""
    return f"{world.launcher} train --out {shell_word(run_dir)} --resume"


def written_by(meta: dict):
    """The world of processes that wrote a training state with metadata ``meta`` (as many, on one machine)."""
    from vaelab.distributed import World

    processes = int(meta.get("world_size", 1))
    return World(size=processes, local_size=processes)


def rewrite_fix(run_dir: Path) -> str | None:
    """How to get a run's model.safetensors or metrics.csv back when it is missing or damaged: its training state
    holds the same weights and metrics, and a resume writes both again (training on first where the run is
    unfinished); None without an intact training state."""
    try:
        meta = read_metadata(run_dir / STATE)
    except CheckpointError:
        return None
    where = f"after epoch {meta.get('epoch')}" + (f", step {meta['step']}" if meta.get("step") else "")
    return (f"`{resume_command(run_dir, written_by(meta))}` writes it again from the training state "
            f"({STATE}, {where}), training on first if the run is unfinished")


def load_config(run_dir: Path) -> RunConfig:
    """A run's config.json. One that is there but cannot be used (not JSON, fields unknown, missing, mistyped or out
    of range: a hand edit, a damaged copy) is an error that says how to get it back: the training state keeps a copy,
    which a resume writes again once the damaged file is moved away (until 2026-12-05: "restore it from a copy or
    retrain", or nothing)."""
    path = run_dir / CONFIG
    try:
        return RunConfig.load(path)
    except UsageError as exc:
        unread = exc.__cause__ if isinstance(exc.__cause__, OSError) else None
        if not path.exists() or (unread and unread.errno != errno.EISDIR):
            raise                       # missing, or not readable by this user or from the disk: said as it is
        fix = config_fix(run_dir)
        if unread:                      # a directory in its place: moved away, the resume writes the copy
            raise CheckpointError(f"{path} is a directory, not vaelab's file; {fix}") if fix else exc
        raise CheckpointError(f"{exc}; {fix or 'restore it from a copy, or train anew'}") from exc


def config_fix(run_dir: Path) -> str | None:
    """How to get a run's config.json back from the copy its training state keeps; None without one."""
    try:
        meta = read_metadata(run_dir / STATE)
    except CheckpointError:
        return None
    if "config" not in meta:
        return None
    path = shell_word(run_dir / CONFIG)
    return (f"{STATE} keeps a copy of it: move it away (mv {path} {path}.bad), then "
            f"`{resume_command(run_dir, written_by(meta))}` writes it again")


def weights_problem(run_dir: Path) -> str | None:
    """'model.safetensors missing' or '… damaged' where a run's weights file cannot be read, else None."""
    try:
        read_metadata(run_dir / WEIGHTS)
    except CheckpointError:
        return f"{WEIGHTS} " + ("damaged" if (run_dir / WEIGHTS).exists() else "missing")
    return None


def save_weights(path: Path, model: torch.nn.Module, epoch: int | None = None, step: int = 0) -> None:
    """The model's weights; in a run, with where they stand in its training (``epoch`` whole epochs and ``step``
    steps of the next) in the file's metadata, so that a reader knows which weights it holds from the file itself
    (since 2026-12-03; older files hold none)."""
    save_tensors(path, model.state_dict(), None if epoch is None else {"epoch": epoch, "step": step})


class LoadedWeights(NamedTuple):
    """Which weights ``load_model_weights`` loaded: the file's name and the SHA-256 of the bytes it read, and where
    the file says they stand in the run's training (None where it does not: written before 2026-12-03)."""
    file: str
    sha256: str
    epoch: int | None
    step: int | None


def current_names(tensors: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights of a run written before models/ existed, under the names the model uses now
    (``LEGACY_NAMES`` of its class: ``enc_hidden.weight`` → ``encoder.0.weight``, …); others unchanged."""
    legacy = getattr(type(model), "LEGACY_NAMES", {})
    renamed = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        head, _, rest = module.partition(".")            # a legacy module and its submodules: encoder1.0 → up.0.net.0
        if module in legacy:
            module = legacy[module]
        elif head in legacy:
            module = f"{legacy[head]}.{rest}"
        renamed[f"{module}.{leaf}" if module else name] = tensor
    return renamed


def load_model(run_dir: str | Path, device: torch.device | str = "cpu",
               weights: str = WEIGHTS) -> tuple[RunConfig, torch.nn.Module]:
    """Rebuild the model from ``config.json`` alone and load ``weights`` (default model.safetensors) into it."""
    config, model, _ = load_model_weights(run_dir, device, weights)
    return config, model


def load_model_weights(run_dir: str | Path, device: torch.device | str = "cpu",
                       weights: str = WEIGHTS) -> tuple[RunConfig, torch.nn.Module, LoadedWeights]:
    """``load_model``, and which weights it loaded (``LoadedWeights``): read once, so that the digest and epoch are
    those of the weights in the model even while a training replaces the file."""
    run_dir = require_run_dir(run_dir)
    config = load_config(run_dir)
    model = build_model(config.model).to(torch.float32)
    tensors, meta, digest = read_tensors(run_dir / weights, rewrite_fix(run_dir) if weights == WEIGHTS else None)
    tensors = current_names(tensors, model)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != found or any(t.dtype != torch.float32 for t in tensors.values()):
        # an edited config.json, where the training state's copy says otherwise; else files of different runs
        try:
            edited = RunConfig.from_dict(read_metadata(run_dir / STATE)["config"]).differences(config)
        except (UsageError, KeyError):
            edited = []
        # the tensors that differ, not every tensor of both (a line of thousands of characters for a ladder)
        differ = [name for name in sorted(expected.keys() | found.keys()) if expected.get(name) != found.get(name)]
        shapes = ", ".join(f"{name} {expected.get(name, 'absent')} by config.json, {found.get(name, 'absent')} in "
                           f"the file" for name in differ[:3]) + (f" and {len(differ) - 3} more" if differ[3:] else "")
        why = (f"config.json was edited ({'; '.join(edited)}, the state's → config.json's): {config_fix(run_dir)}"
               if edited else "the files come from different runs")
        raise CheckpointError(f"{run_dir / weights} does not match the architecture in config.json "
                              f"({shapes or 'tensors not float32'}); {why}")
    check_finite(tensors, run_dir / weights)
    model.load_state_dict(tensors)
    where = [int(meta[key]) if isinstance(meta.get(key), int) else None for key in ("epoch", "step")]
    return config, model.to(device).eval(), LoadedWeights(weights, digest, *where)


def require_run_dir(path: str | Path) -> Path:
    """``path`` as a Path if it is a directory, else a CheckpointError saying what it is instead."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a run directory" if path.exists() else "does not exist"
        raise CheckpointError(f"{path} {what}; pass a directory written by `vaelab train`")
    return path


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A CheckpointError naming the first tensor that holds NaN or ±inf (such weights give NaN results)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{path}: tensor {name} holds {bad} NaN or infinite value(s); these weights "
                                  f"cannot be evaluated: use an earlier checkpoint or retrain with a lower --lr")


def is_run(path: Path) -> bool:
    return (path / CONFIG).exists()


# ------------------------------------------------------------------------------------------------
# One writer per run directory.


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock``, held while a process writes the run.

    The kernel releases a flock when its process ends, however it ends (kill -9 included), so a lock is
    never stale; the file keeps the holder's pid for the message a second process gets.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            # a run trains on where it is: its directory must become writable (or the run be copied, resumed there)
            fix = (f"a run resumes where it is: make {self.path.parent} writable, or copy the run to a writable "
                   f"place and resume the copy") if is_run(self.path.parent) else "choose a writable --out"
            raise WriteError(f"cannot create {self.path}: {exc.strerror} (errno {exc.errno}); {fix}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WriteError(f"cannot lock {self.path}: {exc.strerror}") from exc
            raise in_use(self.path.parent, holder) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass     # a full disk: the lock holds without the pid, which only a second process's message names
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)              # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def in_use(run_dir: Path, holder: int | None) -> RunLocked:
    """The error for a run whose lock process ``holder`` holds (None or -1: its pid unreadable)."""
    pid = holder if holder and holder > 0 else "(unknown pid)"
    return RunLocked(f"{run_dir} is in use by process {pid}, which is training into it; wait for it to finish "
                     f"(or stop it), or choose another --out")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdecimal() else None
    except (OSError, UnicodeDecodeError):
        return None


def lock_holder(run_dir: Path) -> int | None:
    """The pid of the live process that holds the run's lock, or None when nobody writes the run."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_pid(fd) or -1
    finally:
        os.close(fd)
    return None


def new_run_dir(parent: Path = Path("runs")) -> Path:
    """A fresh ``parent/<YYYYmmdd-HHMMSS>`` made by an exclusive mkdir; ``-2``, ``-3``, … on a collision,
    so two runs started in the same second never share a directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create {parent}: {exc.strerror} (errno {exc.errno}); choose a writable --out") from exc
    for suffix in range(1, 10_000):
        candidate = parent / (stamp if suffix == 1 else f"{stamp}-{suffix}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise WriteError(f"cannot create {candidate}: {exc.strerror} (errno {exc.errno}); "
                             f"choose a writable --out") from exc
    raise WriteError(f"{parent} holds 10 000 runs named {stamp}*; choose an --out")
