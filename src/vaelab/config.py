"""The resolved configuration of a run: model, data, objective and training, saved as ``config.json``.

Loading checks every field (names, types, ranges, choices) so that a hand-edited or damaged file is a
clear error, and a model is rebuilt from this file alone. Files of earlier versions are migrated on
load (``_MIGRATIONS``): a version-1 file (one hidden width, one latent size) means the reference model;
version 2 lacked train.precision (float32); version 3 lacked the model's inference, prior and flow (bottom-up,
the standard prior, no flow: what every model of vaelab 0.2 was); version 4 lacked batch_norm (none); versions 5,
6 and 7 lacked train.clip_grad_norm, clip_grad_value and early_stopping (never clipped, clamped or stopped early).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaelab.atomic import unreadable
from vaelab.data import DataConfig
from vaelab.engines import ENGINE_CHOICES
from vaelab.errors import CheckpointError, UsageError
from vaelab.models import ModelConfig
from vaelab.objectives import OBJECTIVES
from vaelab.optimizers import OPTIMIZERS
from vaelab.precision import PRECISIONS
from vaelab.schedules import LR_SCHEDULES

CONFIG_VERSION = 9
SEED_LIMIT = 2**63            # every seed is a non-negative 63-bit integer (torch's generators take it)
DEVICE_NAMES = re.compile(r"auto|cpu|cuda(:[0-9]+)?")     # --device: auto, cpu, cuda or cuda:N (fullmatch)
UNUSED = "unused"             # how a table shows a config field that its run never reads (RunConfig.unused)


@dataclass(frozen=True)
class ObjectiveConfig:
    """What training maximises, per example: ``name`` ∈ OBJECTIVES with ``samples`` draws each."""

    name: str = "elbo"             # elbo (the mean over the draws) | iwae (log-mean-exp of the weights)
    samples: int = 1               # K draws per example
    beta: float = 1.0              # weight of the KL (of log p/q inside the IWAE weights) after warm-up
    warmup_epochs: int = 0         # β rises linearly from 0 over this many epochs (0: no warm-up)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: Adam on the batch mean of −objective (``optimizer``: vaelab.optimizers)."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | burda (see vaelab.schedules)
    optimizer: str = "adam"        # adam | adam-normgrad (each tensor's gradient normalised first; vaelab.optimizers)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    clip_grad_norm: float = 0.0    # rescale each step's gradient to this Euclidean norm where it is larger; 0: never
    clip_grad_value: float = 0.0   # then clamp each element of it to ±this; 0: never
    early_stopping: int = 0        # end after N epochs past the warm-up without a better validation ELBO; 0: never
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    engine: str = "auto"           # auto (the fast path where one covers the config) | fused | autograd | compiled
    threads: int = 0               # CPU threads; 0: the cores this process may use
    precision: str = "fp32"        # fp32 | bf16 | bf16-emulated (products in bfloat16; vaelab.engines, .precision)
    eval_batch_size: int = 1000    # batch for the per-epoch test and validation ELBO
    eval_seed: int = 0             # the per-epoch ELBOs use the same draws every epoch


FLOAT32_TINY = 2.0 ** -126      # float32's smallest normal number, 1.18e-38 (torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str | None = None      # the preset the run started from (informational)
    version: int = CONFIG_VERSION

    def validate(self) -> "RunConfig":
        """Raise UsageError naming the first field out of range or the unknown choice, else return self."""
        t, d, o = self.train, self.data, self.objective
        ranges = [
            ("--epochs", t.epochs, t.epochs >= 1, "≥ 1"),
            ("--batch-size", t.batch_size, t.batch_size >= 1, "≥ 1"),
            ("--lr", t.lr, math.isfinite(t.lr) and t.lr > 0, "a finite number > 0"),
            # below float32's smallest normal number ε is 0 in the step (denormals are flushed to zero), and a
            # weight whose gradient is 0 then steps by 0/0 = NaN: until 2026-12-05 such a run diverged at its 2nd step
            ("--adam-eps", t.adam_eps, math.isfinite(t.adam_eps) and t.adam_eps >= FLOAT32_TINY,
             f"a finite number ≥ {FLOAT32_TINY:.3g} (float32's smallest normal number; below it ε is 0)"),
            ("--clip-grad-norm", t.clip_grad_norm, math.isfinite(t.clip_grad_norm) and t.clip_grad_norm >= 0,
             "a finite number ≥ 0 (0: no clipping)"),
            ("--clip-grad-value", t.clip_grad_value, math.isfinite(t.clip_grad_value) and t.clip_grad_value >= 0,
             "a finite number ≥ 0 (0: no clamping)"),
            ("--early-stopping", t.early_stopping, t.early_stopping >= 0, "≥ 0 (0: train every epoch)"),
            ("adam_betas", t.adam_betas, all(0 <= b < 1 for b in t.adam_betas), "two numbers in [0, 1)"),
            ("--seed", t.seed, 0 <= t.seed < SEED_LIMIT, "in [0, 2⁶³)"),
            ("--threads", t.threads, 0 <= t.threads <= 4096, "in [0, 4096] (0: all cores this process may use)"),
            ("eval_batch_size", t.eval_batch_size, t.eval_batch_size >= 1, "≥ 1"),
            ("eval_seed", t.eval_seed, 0 <= t.eval_seed < SEED_LIMIT, "in [0, 2⁶³)"),
            ("--k", o.samples, 1 <= o.samples <= 100_000, "in [1, 100 000]"),
            ("--beta", o.beta, math.isfinite(o.beta) and o.beta >= 0, "a finite number ≥ 0"),
            ("--warmup", o.warmup_epochs, o.warmup_epochs >= 0, "≥ 0"),
            ("--train-examples", d.train_examples, d.train_examples is None or d.train_examples >= 1, "≥ 1"),
            ("--test-examples", d.test_examples, d.test_examples is None or d.test_examples >= 1, "≥ 1"),
            ("--validation", d.validation, d.validation >= 0, "≥ 0"),
            *((name, getattr(d, name), 0 <= getattr(d, name) < SEED_LIMIT, "in [0, 2⁶³)")
              for name in ("test_seed", "static_seed", "validation_seed")),
        ]
        for name, value, ok, wanted in ranges:
            if not ok:
                raise UsageError(f"{name} must be {wanted}, got {value!r}")
        choices = [("--binarize", d.binarize, ("dynamic", "static")), ("--objective", o.name, tuple(OBJECTIVES)),
                   ("--lr-schedule", t.lr_schedule, tuple(LR_SCHEDULES)), ("--engine", t.engine, ENGINE_CHOICES),
                   ("--precision", t.precision, PRECISIONS), ("--optimizer", t.optimizer, tuple(OPTIMIZERS))]
        for name, value, allowed in choices:
            if value not in allowed:
                raise UsageError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if not DEVICE_NAMES.fullmatch(t.device):
            raise UsageError(f"unknown --device {t.device!r}; use auto, cpu, cuda or cuda:N")
        if t.early_stopping and not d.validation:
            raise UsageError(f"--early-stopping {t.early_stopping} watches the validation ELBO, and this run holds out "
                             f"no validation digits; give --validation N (e.g. 10000) or --early-stopping 0")
        if d.train_examples is not None and d.validation >= d.train_examples:
            raise UsageError(f"--validation {d.validation} leaves no training digits of --train-examples "
                             f"{d.train_examples}; hold out fewer")
        self.model.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config") -> "RunConfig":
        """Build and validate from a dict (any version); unknown, missing or mistyped fields are errors."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        version = raw.get("version")
        if version not in _MIGRATIONS and version != CONFIG_VERSION:
            raise CheckpointError(f"{source}: config version {version!r} is not one this vaelab reads "
                                  f"(1 to {CONFIG_VERSION}); this run was written by another vaelab version")
        while version != CONFIG_VERSION:
            raw, version = _MIGRATIONS[version](raw, source), version + 1
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise CheckpointError(f"{source}: unknown fields {sorted(unknown)}")
        parts = {name: _build(kind, raw.get(name), f"{source}: {name}")
                 for name, kind in (("model", ModelConfig), ("data", DataConfig), ("objective", ObjectiveConfig),
                                    ("train", TrainConfig))}
        preset = raw.get("preset")
        if preset is not None and not isinstance(preset, str):
            raise CheckpointError(f"{source}: preset {preset!r} is not a name")
        try:
            return cls(**parts, preset=preset).validate()
        except UsageError as exc:
            raise CheckpointError(f"{source}: {exc}") from exc

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        try:
            # utf-8-sig: an editor's byte-order mark (Notepad's, PowerShell's utf8) is not part of the JSON
            raw = json.loads(path.read_text(encoding="utf-8-sig"))
        except FileNotFoundError as exc:
            from vaelab.runs import runs_inside
            from vaelab.sweep import not_a_sweep

            not_a_sweep(path.parent)
            raise CheckpointError(f"{path.parent} is not a vaelab run (no config.json)"
                                  f"{runs_inside(path.parent) or '; pass a directory written by `vaelab train`'}"
                                  ) from exc
        except OSError as exc:
            raise CheckpointError(unreadable(path, exc, "restore it from a copy, or train anew")) from exc
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(raw, str(path))

    def flat(self) -> dict[str, Any]:
        """{'section.field': value as in config.json} for every field."""
        return _flatten(json.loads(json.dumps(self.to_dict())))

    def unused(self) -> dict[str, str]:
        """{'section.field': why} for the fields this run never reads: a mixture's K beside the standard prior, an
        IAF width without IAF steps, the static binarisation's seed of a dynamic run, the validation digits' seed of
        a run without them."""
        why = {f"model.{name}": reason for name, reason in self.model.unused().items()}
        if self.data.binarize != "static":
            why["data.static_seed"] = "the training digits are binarised afresh every epoch"
        if not self.data.validation:
            why["data.validation_seed"] = "no validation digits are held out"
        return why

    def differences(self, other: "RunConfig") -> list[str]:
        """'section.field: mine → other' (values as in config.json) for every field that differs."""
        mine, theirs = self.flat(), other.flat()
        return [f"{key}: {json.dumps(mine.get(key))} → {json.dumps(theirs.get(key))}"
                for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]


def _flatten(raw: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _migrate_1(raw: dict, source: str) -> dict:
    """Version 1 (vaelab ≤ 0.1): model {data_dim, hidden, latent} was the one-hidden-layer ReLU VAE."""
    model, data, train = (raw.get(name) for name in ("model", "data", "train"))
    if not all(isinstance(part, dict) for part in (model, data, train)):
        raise CheckpointError(f"{source}: sections missing or malformed (model, data and train must be objects)")
    if not isinstance(model.get("hidden"), int) or not isinstance(model.get("latent"), int):
        raise CheckpointError(f"{source}: model.hidden and model.latent must be whole numbers in a version-1 config")
    defaults = RunConfig()
    return {
        "version": 2, "preset": None,
        "model": {**model, "name": "mlp", "hidden": [[model["hidden"]]], "latent": [model["latent"]],
                  "activation": "relu", "init": "torch"},
        "data": {**data, "validation": 0, "validation_seed": defaults.data.validation_seed},
        "objective": dataclasses.asdict(defaults.objective),
        "train": {**train, "lr_schedule": "constant", "adam_betas": list(defaults.train.adam_betas),
                  "adam_eps": defaults.train.adam_eps, "threads": 0},
    }


def _migrate_2(raw: dict, source: str) -> dict:
    """Version 2 (vaelab at commit d22ee58) had no train.precision: its runs trained in float32."""
    train = raw.get("train")
    if not isinstance(train, dict):
        raise CheckpointError(f"{source}: sections missing or malformed (train must be an object)")
    return {**raw, "version": 3, "train": {**train, "precision": "fp32"}}


def _migrate_3(raw: dict, source: str) -> dict:
    """Version 3 (vaelab 0.2, before priors, flows and ladders): bottom-up inference, N(0, I), no flow."""
    model = raw.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{source}: sections missing or malformed (model must be an object)")
    defaults = {name: value for name, value in dataclasses.asdict(ModelConfig()).items()
                if name in ("inference", "prior", "prior_components", "flow", "flow_steps", "flow_width")}
    return {**raw, "version": 4, "model": {**defaults, **model}}


def _migrate_4(raw: dict, source: str) -> dict:
    """Version 4 (before batch normalisation): none."""
    model = raw.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{source}: sections missing or malformed (model must be an object)")
    return {**raw, "version": 5, "model": {"batch_norm": False, **model}}


def _migrate_5(raw: dict, source: str) -> dict:
    """Version 5 (before --clip-grad-norm): gradients were never clipped."""
    train = raw.get("train")
    if not isinstance(train, dict):
        raise CheckpointError(f"{source}: sections missing or malformed (train must be an object)")
    return {**raw, "version": 6, "train": {"clip_grad_norm": 0.0, **train}}


def _migrate_6(raw: dict, source: str) -> dict:
    """Version 6 (before --clip-grad-value): no gradient element was clamped."""
    train = raw.get("train")
    if not isinstance(train, dict):
        raise CheckpointError(f"{source}: sections missing or malformed (train must be an object)")
    return {**raw, "version": 7, "train": {"clip_grad_value": 0.0, **train}}


def _migrate_7(raw: dict, source: str) -> dict:
    """Version 7 (before --early-stopping): every run trained to its last epoch."""
    train = raw.get("train")
    if not isinstance(train, dict):
        raise CheckpointError(f"{source}: sections missing or malformed (train must be an object)")
    return {**raw, "version": 8, "train": {"early_stopping": 0, **train}}


def _migrate_8(raw: dict, source: str) -> dict:
    """Version 8 (before --optimizer): every run trained with plain Adam."""
    train = raw.get("train")
    if not isinstance(train, dict):
        raise CheckpointError(f"{source}: sections missing or malformed (train must be an object)")
    return {**raw, "version": 9, "train": {"optimizer": "adam", **train}}


_MIGRATIONS = {1: _migrate_1, 2: _migrate_2, 3: _migrate_3, 4: _migrate_4, 5: _migrate_5, 6: _migrate_6,
               7: _migrate_7, 8: _migrate_8}


def _build(kind: type, raw: Any, source: str):
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: missing or not an object")
    hints = typing.get_type_hints(kind)
    names = {f.name for f in dataclasses.fields(kind)}
    unknown, missing = set(raw) - names, names - set(raw)
    if unknown or missing:
        raise CheckpointError(f"{source}: unknown fields {sorted(unknown)} / missing fields {sorted(missing)}")
    values = {}
    for name, value in raw.items():
        try:
            values[name] = _coerce(value, hints[name])
        except TypeError:
            hint = hints[name]
            wanted = (f"one of {', '.join(map(str, typing.get_args(hint)))}" if typing.get_origin(hint) is typing.Literal
                      else f"of type {hint}")
            raise CheckpointError(f"{source}.{name}: {value!r} is not {wanted}") from None
    return kind(**values)


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` (JSON lists become tuples); TypeError when it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if origin is typing.Literal:
        if value in args:
            return value
        raise TypeError
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeError
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if hint is type(None):
        if value is None:
            return None
        raise TypeError
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise TypeError from None
        raise TypeError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if isinstance(value, hint):
        return value
    raise TypeError
