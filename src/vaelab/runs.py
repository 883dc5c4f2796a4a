"""Reading run directories: config, metrics, status, evaluations. Used by `report`, `compare`, `runs` and
the Python API; reads only (no lock, nothing written)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vaelab import checkpoint as ckpt
from vaelab.config import RunConfig
from vaelab.errors import CheckpointError


@dataclass
class RunInfo:
    path: Path
    config: RunConfig
    metrics: list[dict[str, float]]
    status: str                    # finished | interrupted | training now | not started
    epochs_done: int
    holder: int | None             # pid of the process training it now
    meta: dict[str, Any] = field(default_factory=dict)          # the training state's metadata
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def epochs_total(self) -> int:
        return self.config.train.epochs

    @property
    def resumable(self) -> bool:
        return self.status == "interrupted"

    @property
    def training_seconds(self) -> float | None:
        return self.metrics[-1].get("elapsed_seconds") if self.metrics else None

    def best_evaluation(self, split: str = "test") -> dict | None:
        """The evaluation of ``split`` in float32 (records before bf16 evaluation were), then with the most
        digits, then the largest K, then the lowest NLL."""
        records = [r for r in self.evaluations if r.get("split", "test") == split and r.get("nll") is not None]
        return max(records, key=lambda r: (r["precision"] == "fp32", r["n_examples"], r["k"], -r["nll"]), default=None)


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv as dicts of floats (epoch as int); the columns of vaelab 0.1 are renamed on the way."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        return []
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})") from exc
    out, elapsed = [], 0.0
    for row in rows:
        try:
            values = {k: (int(v) if k == "epoch" else float(v) if v != "" else math.nan) for k, v in row.items()}
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed row {row} ({exc})") from exc
        if "total_seconds" in values:        # version 1 columns
            elapsed += values.pop("total_seconds")
            values["epoch_seconds"], values["elapsed_seconds"] = values.pop("seconds"), elapsed
        out.append(values)
    return out


def read_evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """The evaluation records in the run (eval*.json; vaelab 0.1 wrote eval.json), each with its file name."""
    records = []
    for path in sorted(run_dir.glob("eval*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and "nll" in record:
            record["file"] = path.name
            record.setdefault("precision", "fp32")          # records written before bf16 evaluation
            records.append(record)
    return records


def estimator_label(record: dict) -> str:
    """"IWAE-5000", with the decoder's precision where it was not float32."""
    precision = record["precision"]
    return f"IWAE-{record['k']}" + ("" if precision == "fp32" else f" ({precision} decoder products)")


def per_digit(run_dir: Path, record: dict) -> dict[str, np.ndarray] | None:
    """The per-digit values saved beside an evaluation record, by column name (digit, label, elbo, iwae, …)."""
    name = record.get("per_digit")
    if not name:
        return None
    try:
        with open(run_dir / name, newline="") as handle:
            rows = list(csv.reader(handle))
        header, body = rows[0], np.array(rows[1:], dtype=np.float64)
    except (OSError, IndexError, ValueError):
        return None
    return {column: body[:, i] for i, column in enumerate(header)}


def read_run(path: str | Path) -> RunInfo:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"run directory {path} does not exist; pass a directory written by `vaelab train`")
    config = RunConfig.load(path / ckpt.CONFIG)
    metrics = read_metrics(path / ckpt.METRICS)
    meta = ckpt.read_metadata(path / ckpt.STATE) if (path / ckpt.STATE).exists() else {}
    holder = ckpt.lock_holder(path)
    done = int(meta.get("epoch", len(metrics)))
    if holder is not None:
        status = "training now"
    elif not meta:
        status = "not started"
    elif done >= config.train.epochs and not meta.get("step"):
        status = "finished"
    else:
        status = "interrupted"
    return RunInfo(path, config, metrics, status, done, holder, meta, read_evaluations(path))


def find_runs(directory: str | Path) -> list[Path]:
    """Run directories (holding config.json) at or below ``directory``, sorted by path."""
    directory = Path(directory)
    if ckpt.is_run(directory):
        return [directory]
    return sorted(p.parent for p in directory.rglob(ckpt.CONFIG))
