"""The resolved configuration of a run: model, data and training, saved as ``config.json``.

Loading checks every field (names, types, ranges) so that a hand-edited or damaged file is a clear
error, and a model is rebuilt from this file alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaelab.data import DataConfig
from vaelab.errors import CheckpointError, UsageError
from vaelab.model import ModelConfig

CONFIG_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: Adam on the per-example mean of −ELBO, one reparameterised draw per example."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    engine: str = "fused"          # fused (hand-derived backward, fast) | autograd; see training.ENGINES
    eval_batch_size: int = 1000    # batch for the per-epoch test ELBO
    eval_seed: int = 0             # the test ELBO uses the same draws every epoch


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    version: int = CONFIG_VERSION

    def validate(self) -> "RunConfig":
        """Raise UsageError naming the first field out of range, else return self."""
        checks = [
            ("--epochs", self.train.epochs, self.train.epochs >= 1),
            ("--batch-size", self.train.batch_size, self.train.batch_size >= 1),
            ("--lr", self.train.lr, math.isfinite(self.train.lr) and self.train.lr > 0),
            ("--hidden", self.model.hidden, self.model.hidden >= 1),
            ("--latent", self.model.latent, self.model.latent >= 1),
            ("--train-examples", self.data.train_examples,
             self.data.train_examples is None or self.data.train_examples >= 1),
            ("--test-examples", self.data.test_examples,
             self.data.test_examples is None or self.data.test_examples >= 1),
            ("--seed", self.train.seed, 0 <= self.train.seed < 2**63),
            ("eval_batch_size", self.train.eval_batch_size, self.train.eval_batch_size >= 1),
        ]
        for name, value, ok in checks:
            if not ok:
                raise UsageError(f"{name} must be positive (a finite number > 0 for --lr), got {value!r}")
        if self.data.binarize not in ("dynamic", "static"):
            raise UsageError(f"binarize must be 'dynamic' or 'static', got {self.data.binarize!r}")
        if self.train.device not in ("auto", "cpu", "cuda") and not self.train.device.startswith("cuda:"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {self.train.device!r}")
        if self.model.data_dim != 784:
            raise UsageError(f"data_dim must be 784 for MNIST, got {self.model.data_dim}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config") -> "RunConfig":
        """Build and validate from a dict; unknown, missing or mistyped fields are errors."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("version") != CONFIG_VERSION:
            raise CheckpointError(f"{source}: config version {raw.get('version')!r} is not {CONFIG_VERSION}; "
                                  f"this run was written by another vaelab version")
        parts = {}
        for name, kind in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
            parts[name] = _build(kind, raw.get(name), f"{source}: {name}")
        try:
            return cls(**parts).validate()
        except UsageError as exc:
            raise CheckpointError(f"{source}: {exc}") from exc

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path.parent} is not a vaelab run (no config.json); "
                                  f"pass a directory written by `vaelab train`") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc}); restore it from a copy or retrain") from exc
        return cls.from_dict(raw, str(path))


def _build(kind: type, raw: Any, source: str):
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: missing or not an object")
    hints = typing.get_type_hints(kind)
    names = {f.name for f in dataclasses.fields(kind)}
    unknown, missing = set(raw) - names, names - set(raw)
    if unknown or missing:
        raise CheckpointError(f"{source}: unknown fields {sorted(unknown)} / missing fields {sorted(missing)}")
    for name, value in raw.items():
        if not _has_type(value, hints[name]):
            raise CheckpointError(f"{source}.{name}: {value!r} is not of type {hints[name]}")
    return kind(**raw)


def _has_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)
