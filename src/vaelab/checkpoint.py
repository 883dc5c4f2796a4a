"""The run directory on disk: atomic writes, weights, the resumable training state, loading a run.

Every file is written to a temporary name in the same directory, flushed, fsync'ed and renamed over
the old one (rename is atomic on POSIX), so a kill at any moment leaves the previous version or the
new one, never a torn file. Nothing here unpickles: weights and training state are safetensors files
whose scalar parts travel as JSON in the safetensors metadata.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save as save_bytes

from vaelab.config import RunConfig
from vaelab.errors import CheckpointError, VaelabError
from vaelab.model import VAE

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
STATE = "training_state.safetensors"
METRICS = "metrics.csv"


class WriteError(VaelabError):
    """A file of the run could not be written (permissions, full disk); names the path and the OS error."""


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through ``write(handle)`` atomically: temporary file, flush, fsync, rename."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WriteError(f"cannot write in {path.parent}: {exc.strerror} (errno {exc.errno}); "
                         f"choose a writable --out with free space") from exc
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write {path}: {exc.strerror} (errno {exc.errno}); "
                             f"free some space or choose another --out") from exc
        raise
    # Make the rename itself durable.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text), mode="w")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """A safetensors file; ``metadata`` (any JSON) is stored under the key ``json``."""
    payload = save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                         metadata={"json": json.dumps(metadata or {})})
    atomic_write(path, lambda handle: handle.write(payload))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file written by ``save_tensors``; a damaged one is a CheckpointError."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the run is incomplete: retrain, or pass another run")
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
        metadata = json.loads(header.get("__metadata__", {}).get("json", "{}"))
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupted ({exc}); it cannot be loaded: "
                              f"resume from an intact run or retrain") from exc
    return tensors, metadata


def save_weights(path: Path, model: VAE) -> None:
    save_tensors(path, model.state_dict())


def load_model(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[RunConfig, VAE]:
    """Rebuild the model from ``config.json`` alone and load ``model.safetensors`` into it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; pass a directory written by `vaelab train`")
    config = RunConfig.load(run_dir / CONFIG)
    model = VAE(config.model).to(torch.float32)
    tensors, _ = load_tensors(run_dir / WEIGHTS)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != found or any(t.dtype != torch.float32 for t in tensors.values()):
        raise CheckpointError(f"{run_dir / WEIGHTS} does not match the architecture in config.json "
                              f"(expected {expected}, found {found}); the files come from different runs")
    model.load_state_dict(tensors)
    return config, model.to(device).eval()


def is_run(path: Path) -> bool:
    return (path / CONFIG).exists()
