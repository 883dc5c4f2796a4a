"""The run directory on disk: weights, the resumable training state, loading a run.

Every file is written through ``vaelab.atomic.atomic_write``. Nothing here unpickles: weights and
training state are safetensors files whose scalar parts travel as JSON in the safetensors metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save as save_bytes

from vaelab.atomic import WriteError, atomic_write, write_text
from vaelab.config import RunConfig
from vaelab.errors import CheckpointError
from vaelab.model import VAE

__all__ = ["WriteError", "atomic_write", "write_text", "save_tensors", "load_tensors", "save_weights",
           "load_model", "is_run"]

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
STATE = "training_state.safetensors"
METRICS = "metrics.csv"


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
