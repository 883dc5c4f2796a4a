"""`vaelab sweep SPEC.toml --out DIR`: a hyperparameter search on the validation split with Optuna.

The spec (TOML, read with the standard library) names a base preset, fixed fields, the search space, the
objective and the number of trials. Every field is a flag of `vaelab train` with ``_`` for ``-`` (``lr``,
``hidden``, ``train_examples``, …): a search entry is a range ``{ low, high, log?, step? }`` (integers when both
ends are) or a list of choices (numbers, names, or lists of widths such as ``[[64], [128]]``); a table of named
options under a name that is not a field (``[search.depth]`` with ``two = { latent = [8, 4], blocks = [[64], [64]] }``
…) is one parameter whose options each set several fields together, those that only make sense together.

How the study is kept (Optuna's RDB storage: ``DIR/study.db``, SQLite, or ``--storage URL``, e.g. PostgreSQL
shared by several machines):
- The spec's trials are **slots** 0 … N−1, each enqueued as a waiting trial carrying its slot, in their order,
  a few (``WAITING_WINDOW``) ahead of the workers; a worker
  takes a waiting trial (an atomic pop in the storage), trains its slot's run directory ``DIR/trials/NNNN``
  (an ordinary run: report, compare, runs and the API work on it) and tells the study the objective.
- Nothing is lost: a trial whose process died (kill -9, a closed machine) is found stale (its pid gone on this
  host; elsewhere, its heartbeat, written every ``HEARTBEAT_SECONDS`` while it trains, older than
  ``GRACE_SECONDS``), marked failed, and its slot enqueued again with the same parameters; the retry resumes the
  slot's run directory from its checkpoint (vaelab's exact resume), or starts it again where no epoch had
  finished. The number of finished (complete or pruned) trials stays N. A worker takes a trial and writes its
  host and pid under one lock (``.ask.lock``) that `reconcile` takes too, so a trial found running without
  them was taken by a process that died in between.
- Never two trials in one directory: a slot taken by another live trial (two sweeps racing for one waiting
  trial, or enqueueing the same slot twice) makes the later trial a surplus, told failed at once and never
  shown; the run directory's lock (one writer per run) is the last guard.
- Pruning (Optuna's median pruner by default) watches each trial's per-epoch validation ELBO (its negative under
  ``validation-nll``, whose direction is to minimise); a pruned trial keeps its run directory.
The objective is computed on the validation split only: ``validation-elbo`` (the last epoch's) or
``validation-nll`` (IWAE-K of the best-validation weights, ``vaelab evaluate --split validation``). The test
set is never evaluated by a sweep; the command printed at the end trains the best configuration in full and
evaluates it on the test set once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import itertools
import json
import math
import os
import shlex
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from vaelab.atomic import WriteError, write_text
from vaelab.errors import CheckpointError, UsageError
from vaelab.tables import path_word, plural, shell_word, text_table

MAX_TRIALS = 100_000                    # a spec's trials, or --trials
SPEC_KEYS = {"preset", "trials", "objective", "k", "fixed", "search", "enqueue", "sampler", "seed", "pruner",
             "pruner_warmup"}
DIRECTIONS = {"validation-nll": "minimize", "validation-elbo": "maximize"}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")
# flags of `vaelab train` a sweep sets itself or that make no sense per trial
RESERVED = {"out", "resume", "preset", "no_progress", "threads", "tensorboard", "device"}
# fields that set a sweep's budget: dropped from the command that trains the best configuration in full
BUDGET_FIELDS = ("epochs", "train_examples", "validation", "test_examples")
SPEC_FILE, STATE_FILE, STORAGE_FILE = "sweep.toml", "sweep.json", "study.db"
FINISHED = ("COMPLETE", "PRUNED")
IMPORTANCE_QUANTILE = 0.1   # PED-ANOVA's best trials: the best 10 % (Optuna's default, the paper's γ')
# a running trial writes a heartbeat this often; one silent for the grace period is dead (Optuna's RDB heartbeat)
HEARTBEAT_SECONDS, GRACE_SECONDS = 20, 90


class StorageUnavailable(UsageError):
    """The study's database could not be opened (a server down, a race creating its tables)."""


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise UsageError("vaelab sweep needs Optuna: pip install 'vaelab[sweep]' (or: pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# ------------------------------------------------------------------------------------------------
# The spec.


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched parameter: a range (float or int, maybe log or stepped), categorical choices of one field, or
    named options each setting several fields (``options``: label → {field: value}; its choices are the labels)."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None          # JSON texts of the choices (Optuna's categories are scalars)
    integer: bool = False
    options: dict[str, dict[str, Any]] | None = dataclasses.field(default=None, compare=False)

    def fields(self, value: Any) -> dict[str, Any]:
        """The train fields a value of this parameter sets: its option's, or the field itself."""
        return dict(self.options[value]) if self.options is not None else {self.name: value}

    def sets(self) -> set[str]:
        """Every field some value of this parameter sets."""
        return {f for option in self.options.values() for f in option} if self.options is not None else {self.name}

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return self.stored(trial.suggest_categorical(self.name, list(self.choices)))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return self.stored(trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step))

    def stored(self, value: Any) -> Any:
        """The value of this parameter that Optuna stored, as a trial uses it: a choice decoded; a stepped value,
        low + n·step in floating point (7e-4 came as 0.0007000000000000001, and so in the best command), as the
        grid's point is written, to 12 significant digits."""
        if self.choices is not None:
            return json.loads(value)
        return float(f"{value:.12g}") if self.step is not None and not self.integer else value

    def choice_of(self, value: Any) -> str | None:
        """The stored choice (its JSON text) equal to ``value``, an option by its label (the choices of options are
        their labels' texts); None where none is. Equal as TOML values: 1 is the choice 1.0, but true is not the
        choice 1."""
        return next((text for text in self.choices if (loaded := json.loads(text)) == value
                     and isinstance(loaded, bool) == isinstance(value, bool)), None)

    def refusal(self, value: Any) -> str | None:
        """Why an enqueued ``value`` is not one this parameter can take (None where it is): not one of its choices
        or options, outside its range, not whole in a range of integers, or off its step's grid. Optuna would
        fail the trial on a choice it does not have (and spend its slot) and run one outside a range."""
        if self.choices is not None:
            if self.choice_of(value) is not None:
                return None
            kind, names = ("options", self.options) if self.options is not None else ("choices", self.choices)
            return f"{toml_text(value)} is not one of its {kind}: {', '.join(names)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None                          # not a number at all: the train command's own check names it
        if not self.low <= value <= self.high:
            low, high = self.values_to_check()             # the ends as written: 1 … 5 in a range of integers
            return f"{toml_text(value)} is outside the searched range {toml_text(low)} … " \
                   f"{toml_text(high)}; enqueue a value inside it, or widen the range"
        if self.integer and value != int(value):
            return f"{toml_text(value)} is not a whole number, in a range of integers"
        if self.step is not None and not math.isclose(n := (value - self.low) / self.step, round(n), abs_tol=1e-8):
            return f"{toml_text(value)} is not on the range's grid {self.low:.12g}, {self.low + self.step:.12g}, " \
                   f"… (step {self.step:.12g})"
        return None

    def values_to_check(self) -> list[Any]:
        """The values whose flags are validated before any trial: both ends, or every choice."""
        if self.choices is not None:
            return [json.loads(c) for c in self.choices]
        cast = int if self.integer else float
        return [cast(self.low), cast(self.high)]

    def inner_value(self) -> float | None:
        """A value of a range of decimals strictly inside it, not whole (on its step's grid where it has one): a
        field of whole numbers refuses it where it takes both ends written as decimals (k = { low = 1.0, high = 3.0 }
        drew k = 2.098, a failed trial each); None for choices and ranges of whole numbers."""
        if self.choices is not None or self.integer:
            return None
        if self.step is not None:
            inside = self.low + self.step
            return inside if inside < self.high and inside != int(inside) else None
        return self.low + (self.high - self.low) * 0.382


@dataclasses.dataclass(frozen=True)
class Spec:
    preset: str
    trials: int
    objective: str
    k: int
    fixed: dict[str, Any]
    search: tuple[Param, ...]
    enqueue: tuple[dict[str, Any], ...]
    sampler: str
    seed: int
    pruner: str
    pruner_warmup: int
    text: str

    @property
    def direction(self) -> str:
        return DIRECTIONS[self.objective]

    @property
    def base_fields(self) -> dict[str, Any]:
        """The fixed fields with the first option of each searched name (its options set the same fields: together
        with the fixed ones they may be what makes a whole config, the latent sizes of a model fixed to hvae)."""
        fields = dict(self.fixed)
        for param in self.search:
            if param.options is not None:
                fields.update(next(iter(param.options.values())))
        return fields

    @functools.cached_property
    def base_model(self) -> dict[str, Any]:
        """The model's fields of the preset with ``base_fields`` (``ModelConfig`` names, which are the flags' for the
        fields a condition reads: prior, flow, flow_steps); a field an option sets is always read from the option."""
        return dataclasses.asdict(_config_of(self.preset, self.base_fields).model)

    @functools.cached_property
    def grid(self) -> list[dict]:
        """The parameters of the slots after the enqueued ones under ``sampler = "grid"`` (``grid_points``), made
        once a process: ``reconcile`` reads them at every take (until 2026-12-05 it made them each time, 0.44 s a
        take for a grid of 100 000 points and 3000 trials on a Zen 1); [] for the other samplers."""
        return grid_points(self, max(0, self.trials - len(self.enqueue))) if self.sampler == "grid" else []

    def trial_fields(self, params: dict[str, Any]) -> dict[str, Any]:
        """The fields a trial trains with: the fixed ones, its searched values, and a bound field where its model
        would not read it (``CONDITIONAL_FIELDS``: a flow's steps, 0 without a flow, where the preset or the fixed
        fields give others)."""
        from vaelab.models import CONDITIONAL_FIELDS

        searched = {param.name: param for param in self.search}
        fields = dict(self.fixed)
        for name, chosen in params.items():
            fields.update(searched[name].fields(chosen))

        def value(name: str) -> Any:
            return fields.get(name, self.base_model[name])

        for name, (idle, bound, _) in CONDITIONAL_FIELDS.items():
            if bound is not None and idle(value) and value(name) != bound:
                fields[name] = bound
        return fields


_UNSET = object()


def sample_params(spec: Spec, choose) -> tuple[dict[str, Any], list[str]]:
    """(values, idle): ``choose(param)`` for each searched field in the spec's order, except a field the trial's
    model would not read given the others (``CONDITIONAL_FIELDS``: a mixture's K beside the standard prior, a
    flow's steps without a flow, the IAF width without IAF steps). The fields its condition reads are chosen first;
    it is not chosen at all (a conditional search space, as Optuna's define-by-run trials allow: the sampler spends
    nothing on it and no trial is refused for it) and is returned among the idle. ``choose`` may return ``_UNSET``
    (an enqueued trial that leaves a field to the sampler): the preset's or fixed value stands in for it."""
    from vaelab.models import CONDITIONAL_FIELDS

    setter = {field: param for param in spec.search for field in param.sets()}    # field → the parameter setting it
    values: dict[str, Any] = {}
    idle: list[str] = []

    def value(name: str) -> Any:
        param = setter.get(name)
        if param is not None and param.name not in values and param.name not in idle:
            take(param)
        if name in idle and CONDITIONAL_FIELDS[name][1] is not None:
            return CONDITIONAL_FIELDS[name][1]
        chosen = {} if param is None or values.get(param.name, _UNSET) is _UNSET else param.fields(values[param.name])
        return chosen.get(name, spec.base_model[name])

    def take(param: Param) -> None:
        condition = CONDITIONAL_FIELDS.get(param.name)
        if condition is not None and condition[0](value):
            idle.append(param.name)
        else:
            values[param.name] = choose(param)

    for param in spec.search:
        if param.name not in values and param.name not in idle:
            take(param)
    return {name: v for name, v in values.items() if v is not _UNSET}, idle


@functools.cache
def train_actions() -> dict[str, Any]:
    """`vaelab train`'s flags, dest → argparse action (--help aside): the keywords of `vaelab.train` too."""
    parser = _parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    return {a.dest: a for a in train._actions if a.dest != "help"}


def train_fields() -> dict[str, Any]:
    """The fields a spec may set: `vaelab train`'s flags (dest → argparse action), less the reserved ones."""
    return {name: action for name, action in train_actions().items() if name not in RESERVED}


@functools.cache
def _negatable_fields() -> frozenset[str]:
    """The fields whose flag has a --no- form (argparse's BooleanOptionalAction)."""
    return frozenset(name for name, action in train_fields().items()
                     if "--no-" + name.replace("_", "-") in action.option_strings)


@functools.cache
def _switch_fields() -> frozenset[str]:
    """The fields whose flag takes no value (a switch: --batch-norm, --compiled)."""
    return frozenset(name for name, action in train_fields().items() if action.nargs == 0)


def _plain(value: Any) -> Any:
    """NumPy's and torch's arrays and scalars as the Python lists and numbers they hold (numpy.array([256, 256]),
    numpy.int64(50), a tensor); a float32 number as it prints: numpy.float32(1e-3) is 0.001, not its double
    0.0010000000474974513, which a run's config.json and `compare` would show."""
    if not hasattr(value, "tolist"):
        return value
    plain = value.tolist()
    if isinstance(plain, float) and str(getattr(value, "dtype", "")).endswith("float32"):
        import numpy as np

        return float(str(np.float32(plain)))
    return plain


def flags_of(fields: dict[str, Any]) -> list[str]:
    """`vaelab train` argv for {field: value} (lists become several values, True a bare flag, False the flag's
    --no- form where it has one, e.g. --no-batch-norm against a preset that turns it on; `blocks` one word per
    block, 512,512). NumPy's and torch's arrays and scalars are read as the lists and numbers they hold. A value
    that begins with a dash is joined to its flag, --data-dir=-data: as a word of its own the parser took it for
    a flag (until 2026-12-06 a sweep into --out=-sw failed every trial, "--out: expected one argument")."""
    argv: list[str] = []
    negatable, switches = _negatable_fields(), _switch_fields()
    for name, value in fields.items():
        option = "--" + name.replace("_", "-")
        value = _plain(value)
        if isinstance(value, bool) and name not in switches and name in train_fields():
            # true or false for a flag that takes a value (lr = true): given as its value, so that the flag's own
            # check names it ("--lr: … got 'true'"; it read "--lr: expected one argument")
            argv += [option, toml_text(value)]
        elif value is True:
            argv.append(option)
        elif value is False and name in negatable:
            argv.append("--no-" + option[2:])
        elif value is False or value is None:
            continue
        elif name == "blocks" and isinstance(value, (list, tuple)):
            argv += [option, *(block if isinstance(block, str) else ",".join(map(str, block)) for block in value)]
        elif isinstance(value, (list, tuple, range)):
            argv += [option, *map(str, value)]
        elif str(value).startswith("-"):
            argv.append(f"{option}={value}")
        else:
            argv += [option, str(value)]
    return argv


def _bad(where: str, why: str) -> UsageError:
    return UsageError(f"sweep spec: {where}: {why}")


def toml_text(value: Any) -> str:
    """A value of the spec as TOML writes it (true, "seed", [64, 32], { low = 1 }), for messages about what the
    spec says: Python's repr would show True, 'seed' and {'low': 1}."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float, str)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(map(toml_text, value))}]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {toml_text(v)}" for key, v in value.items()) + " }" if value else "{}"
    return str(value)                            # dates and times: TOML's own form


def load_spec(path: Path, trials: int | None = None) -> Spec:
    """Read and check a spec: unknown keys and fields, empty ranges and values the train command would refuse
    are one-line errors naming the field."""
    try:
        text = path.read_text(encoding="utf-8-sig")      # TOML is UTF-8, whatever the locale (an editor's BOM skipped)
    except FileNotFoundError:
        raise UsageError(f"sweep spec {path} does not exist; give a TOML file (see the README's Sweeps section)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"sweep spec {path} cannot be read ({exc})") from None
    return parse_spec(text, str(path), trials)


def _toml():
    """Python's TOML parser: tomllib from Python 3.11, the same parser as tomli on 3.10 (`vaelab[sweep]` installs it
    there). Until 2026-12-07 sweep.py imported tomllib at its top, and the command line imports sweep.py to build its
    parser: on Python 3.10, which pyproject.toml admits, every command failed."""
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise UsageError("vaelab sweep reads its spec with tomli on Python 3.10: pip install 'vaelab[sweep]' (or: "
                             "pip install tomli)") from None
    return tomllib


def parse_spec(text: str, where: str, trials: int | None = None) -> Spec:
    """``load_spec`` of a spec's ``text`` (``where``: the file it came from, for the message where it is not TOML)."""
    tomllib = _toml()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"sweep spec {where} is not valid TOML ({exc})") from None
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise _bad(f"unknown key {sorted(unknown)[0]!r}", f"the keys are {', '.join(sorted(SPEC_KEYS))}")
    from vaelab.presets import PRESETS

    preset = raw.get("preset", "seed")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise _bad(f"preset {toml_text(preset)}", f"choose one of {', '.join(PRESETS)}")
    count = raw.get("trials", 10) if trials is None else trials
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_TRIALS:
        raise _bad(f"trials {toml_text(count)}", f"must be a whole number from 1 to {MAX_TRIALS:,}".replace(",", " "))
    objective = raw.get("objective", "validation-nll")
    if not isinstance(objective, str) or objective not in DIRECTIONS:
        raise _bad(f"objective {toml_text(objective)}", f"choose one of {', '.join(DIRECTIONS)}")
    k = raw.get("k", 1000)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 100_000:
        raise _bad(f"k {toml_text(k)}", "must be a whole number from 1 to 100 000 (IWAE-K for validation-nll)")
    for key, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if raw.get(key, allowed[0]) not in allowed:
            raise _bad(f"{key} {toml_text(raw[key])}", f"choose one of {', '.join(allowed)}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise _bad(f"seed {toml_text(seed)}", "must be a whole number from 0 to 2³¹ − 1")
    warmup = raw.get("pruner_warmup", 1)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise _bad(f"pruner_warmup {toml_text(warmup)}", "must be a whole number ≥ 0 (epochs no trial is pruned in)")
    fields = train_fields()
    fixed, search = raw.get("fixed", {}), raw.get("search", {})
    if not isinstance(fixed, dict) or not isinstance(search, dict):
        raise _bad("[fixed] and [search]", "must be tables")
    for table, entries in (("fixed", fixed), ("search", search)):
        misplaced = sorted(set(entries) & (SPEC_KEYS - set(fields)))
        if misplaced:                      # TOML puts every key after a [table] line into that table
            raise _bad(f"{table}.{misplaced[0]}", f"{misplaced[0]!r} is a key of the spec itself, not a field of "
                                                  f"[{table}]: move it above the first [table] line (every key after "
                                                  f"one belongs to that table)")
    params = tuple(_param(name, value) for name, value in search.items())
    for name, where in [(name, None) for name in fixed] + [(field, param.name if param.options else None)
                                                           for param in params for field in sorted(param.sets())]:
        if name not in fields:
            raise _bad(f"unknown field {name!r}" + (f" in search.{where}" if where else ""),
                       f"the fields are the flags of `vaelab train` with _ for -: {', '.join(sorted(fields))}")
    for param in params:
        if param.options is not None and param.name in fields:
            raise _bad(f"search.{param.name}", "options that set several fields together need a name that is not a "
                                               "field of `vaelab train`, e.g. [search.architecture]")
    setters = [*fixed, *(field for param in params for field in param.sets())]
    twice = sorted({name for name in setters if setters.count(name) > 1})
    if twice:
        raise _bad(f"field {twice[0]!r}", "is set twice (fixed, searched, or in the options of a searched name); "
                                          "keep one")
    enqueue = raw.get("enqueue", [])
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
        raise _bad("enqueue", "must be a list of tables of searched fields, e.g. enqueue = [{ lr = 1e-3 }]")
    for index, entry in enumerate(enqueue):
        for name, value in entry.items():
            if name not in search:
                raise _bad(f"enqueue[{index}].{name}", "is not a searched field; enqueued trials set searched fields")
            refusal = next(param for param in params if param.name == name).refusal(value)
            if refusal is not None:
                raise _bad(f"enqueue[{index}].{name}", refusal)
    ranged = next((param.name for param in params if param.choices is None), None)
    if raw.get("sampler") == "grid" and ranged is not None:
        # (until 2026-12-05 found only while the study opened, and said as "--storage …: cannot open the study")
        raise _bad("sampler grid", f"searches lists of choices only, and search.{ranged} is a range: give it "
                                   f"choices, or use tpe or random")
    spec = Spec(preset, count, objective, k, dict(fixed), params, tuple(enqueue), raw.get("sampler", "tpe"), seed,
                raw.get("pruner", "median"), warmup, text)
    _check_values(spec)
    return spec


def _param(name: str, value: Any) -> Param:
    if isinstance(value, dict) and value and all(isinstance(option, dict) for option in value.values()):
        # named options, each a table of fields set together: one categorical parameter over the names
        empty = next((label for label, option in value.items() if not option), None)
        if empty is not None:
            raise _bad(f"search.{name}.{empty}", "an option sets one or more fields, e.g. { latent = [8, 4] }")
        (first, fields), *others = value.items()
        for label, option in others:             # the same fields in each: a field is never left to the preset
            if set(option) != set(fields):
                raise _bad(f"search.{name}.{label}", f"sets {', '.join(sorted(option))} where {first} sets "
                                                     f"{', '.join(sorted(fields))}; give every option the same fields")
        return Param(name, choices=tuple(json.dumps(label) for label in value),
                     options={label: dict(option) for label, option in value.items()})
    if isinstance(value, list):
        if not value:
            raise _bad(f"search.{name}", "an empty list of choices; give at least one")
        return Param(name, choices=tuple(json.dumps(v) for v in value))
    if isinstance(value, dict):
        unknown = set(value) - {"low", "high", "log", "step"}
        if unknown or "low" not in value or "high" not in value:
            raise _bad(f"search.{name}", "a range is { low = …, high = …, log = true|false, step = … } (options: a "
                                         "table of named tables of fields, [search.NAME] with a = { … }, b = { … })")
        low, high = value["low"], value["high"]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in (low, high)):
            raise _bad(f"search.{name}", f"low and high must be finite numbers, got {toml_text(low)} and "
                                         f"{toml_text(high)}")
        if not low < high:
            raise _bad(f"search.{name}", f"an empty range: low {low} must be below high {high}")
        log = value.get("log", False)
        if not isinstance(log, bool):
            raise _bad(f"search.{name}", f"log = {toml_text(log)}: write log = true or log = false")
        if log and low <= 0:
            raise _bad(f"search.{name}", "log = true needs low > 0")
        integer = isinstance(low, int) and isinstance(high, int)
        step = value.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 or log):
            raise _bad(f"search.{name}", "step must be a number > 0, and cannot go with log = true")
        if step is not None and integer and step != int(step):
            raise _bad(f"search.{name}", f"step {step} in a range of whole numbers (low and high are integers): "
                                         f"give a whole step (for a field of decimals, write low and high as "
                                         f"decimals)")
        if step is not None and step > high - low:
            raise _bad(f"search.{name}", f"step {step} is wider than the range {low} … {high}: every trial would "
                                         f"take {low}; give a smaller step")
        return Param(name, float(low), float(high), log, None if step is None else float(step), integer=integer)
    raise _bad(f"search.{name}", f"{toml_text(value)} is neither a range {{ low, high }} nor a list of choices")


@functools.cache
def _parser():
    """The command line's parser, raising UsageError, made once a process: a spec is checked by thousands of parses
    (``_untrainable``), and making the parser took 15 ms (until 2026-12-05 it was made for each: checking
    benchmarks/sweeps/cpu-hour.toml took 35 s, in the command and again in each worker, on a Zen 1). Parsing
    leaves it unchanged."""
    from vaelab.cli import RaisingParser, build_parser

    return build_parser(RaisingParser)


def _config_of(preset: str, fields: dict[str, Any]):
    """The RunConfig `vaelab train --preset PRESET FLAGS` would train (UsageError as the command would refuse it)."""
    from vaelab.cli import _train_config
    from vaelab.config import RunConfig

    return _train_config(_parser().parse_args(["train", "--preset", preset, *flags_of(fields)]), RunConfig())


def _check_values(spec: Spec) -> None:
    """Checked as `vaelab train` checks them: the fixed fields on the preset (a whole valid config, with a
    validation split; with each option of a searched name, whose fields may be what completes it), every end or
    choice of the search as a flag of its own (searched fields may depend on each other, model and latent sizes
    say: a sampled combination the train command refuses is a failed trial that says why, unless the fields are
    one name's options; a field its model would not read is not sampled, ``sample_params``), and every enqueued
    trial as a whole config."""
    from vaelab.models import CONDITIONAL_FIELDS

    parser = _parser()

    def config_of(fields: dict, where: str):
        try:
            return _config_of(spec.preset, fields)
        except UsageError as exc:
            why = str(exc).replace("argument --", "--")
            # a field searched as plain choices is not part of the whole config checked (until 2026-12-07 the line
            # named only the preset's value, "got --latent 50", beside a search over latent sizes)
            searched = [p.name for p in spec.search if p.options is None and f"--{p.name.replace('_', '-')}" in why]
            if where == "fixed" and searched:
                why += (f"; {' and '.join(searched)} {'is' if len(searched) == 1 else 'are'} searched, but the fixed "
                        f"fields must make a whole config on preset {spec.preset} with the first option of each "
                        f"[search.NAME] table of named options: search fields that only make sense together as one "
                        f"(e.g. [search.depth] with two = {{ latent = [8, 4], blocks = [[64], [32]] }}), or fix them")
            raise _bad(where, why) from None

    try:
        parser.parse_args(["train", *flags_of(spec.fixed)])
    except UsageError as exc:
        raise _bad("fixed", str(exc).replace("argument --", "--")) from None
    # whole configs: the fixed fields with each option of each searched name (the other names at their first)
    base = spec.base_fields
    for param in spec.search:
        for label, option in (param.options or {}).items():
            config_of({**base, **option}, f"search.{param.name}.{label}")
    if config_of(base, "fixed").data.validation == 0:
        raise _bad("fixed.validation", f"the objective {spec.objective} is computed on a validation split: set "
                                       f"validation = N (held-out training digits) in [fixed]")
    for param in spec.search:
        for value in param.values_to_check():
            try:
                parser.parse_args(["train", *flags_of(param.fields(value))])
            except UsageError as exc:
                where = param.name if param.options is None else f"{param.name}.{value}"
                raise _bad(f"search.{where}", str(exc).replace("argument --", "--")) from None
        inside = param.inner_value()
        if inside is not None:
            try:
                parser.parse_args(["train", *flags_of(param.fields(inside))])
            except UsageError as exc:
                step = ", step = …" if param.step else ""
                raise _bad(f"search.{param.name}", f"the values inside the range are refused "
                                                   f"({str(exc).replace('argument --', '--')}); for whole numbers "
                                                   f"write the range in integers (low = {int(param.low)}, high = "
                                                   f"{int(param.high)}{step})") from None
    # a value that no combination of the other searched values makes a config `vaelab train` takes (--adam-eps 1e-39,
    # two latent sizes for a model fixed to mlp): refused here, where until 2026-12-05 each trial that drew it failed
    for param in spec.search:
        others = [other for other in spec.search if other is not param]
        for value in param.values_to_check():
            refused = _untrainable(spec, param, value, others)
            if refused is not None:
                where = param.name if param.options is None else f"{param.name}.{value}"
                raise _bad(f"search.{where}", f"{toml_text(value)}: no trial could train it, whatever the other "
                                              f"searched fields draw ({refused.replace('argument --', '--')})")
    # a searched field no trial would read (a flow's steps where every trial has no flow): over every combination of
    # the choices (a range by its two ends, which is where a condition such as "no steps" can change)
    ends = [param.values_to_check() for param in spec.search]
    if math.prod(map(len, ends)) <= 20_000:
        read: set[str] = set()
        for combination in itertools.product(*ends):
            chosen = dict(zip((param.name for param in spec.search), combination))
            read.update(sample_params(spec, lambda param: chosen[param.name])[0])
        for param in spec.search:
            if param.name not in read:
                raise _bad(f"search.{param.name}", f"no trial would read it ({CONDITIONAL_FIELDS[param.name][2]}, "
                                                   f"whichever values the spec's fixed and searched fields and preset "
                                                   f"{spec.preset} give); leave it out, or fix or search what it "
                                                   f"depends on")
    for index, entry in enumerate(spec.enqueue):
        values, _ = sample_params(spec, lambda param: entry.get(param.name, _UNSET))
        config_of(spec.trial_fields(values), f"enqueue[{index}]")


def _untrainable(spec: Spec, param: "Param", value: Any, others: list, most: int = 2000) -> str | None:
    """Why no trial that draws ``value`` for ``param`` could train (the train command's refusal of the first
    combination of the other searched values, ends of ranges and choices, tried), or None where one combination can
    (or more than ``most`` would have to be tried to tell)."""
    first = None
    combinations = itertools.product(*(other.values_to_check() for other in others))
    for combination in itertools.islice(combinations, most):
        chosen = {param.name: value, **{other.name: v for other, v in zip(others, combination)}}
        values, _ = sample_params(spec, lambda p: chosen[p.name])
        if param.name not in values:
            return None                       # a combination in which the value is not even read
        try:
            _config_of(spec.preset, spec.trial_fields(values))
            return None
        except UsageError as exc:
            first = first or str(exc)
    return first if next(combinations, None) is None else None


# ------------------------------------------------------------------------------------------------
# The study.


def storage_url(out: Path, given: str | None) -> str:
    return given or f"sqlite:///{(out / STORAGE_FILE).resolve()}"


def read_state(out: Path) -> dict:
    """sweep.json, its storage resolved: the default study.db is the one beside it, wherever the directory is now.
    sweep.json holds null for it; before 2026-12-05 it held its absolute path, so that a moved sweep opened no study
    and a copied one (`cp -r`) trained its new trials into the original's: such a path to a study.db elsewhere, with
    one here, is read as the one here (a --storage given by hand leaves no study.db in the directory)."""
    path = out / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8-sig"))     # (an editor's byte-order mark skipped)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedState(path, f"not JSON: {exc}") from None
    if problem := _state_problem(state):
        raise DamagedState(path, problem)
    if not (out / SPEC_FILE).exists():
        # sweep.toml lost (a kill between the two files' writes, a hand): its text is sweep.json's own copy. Without
        # it every worker ended at its start, "sweep spec … does not exist", and the command said the sweep was done
        with contextlib.suppress(WriteError, FileExistsError):   # (read-only; or another restored it first)
            write_text(out / SPEC_FILE, state["spec"], replace=False)
    stored = state.get("storage")
    was_default = isinstance(stored, str) and stored.startswith("sqlite:///") and stored.endswith(f"/{STORAGE_FILE}")
    if stored is None or (was_default and (out / STORAGE_FILE).exists()):
        state["storage"] = storage_url(out, None)
    return state


def state_spec(out: Path, state: dict) -> Spec:
    """The spec a sweep was begun with: sweep.json's copy of its text, not DIR/sweep.toml, which a hand may have
    edited since (until 2026-12-06 the sweep's page and its workers read that file: an edited search ended the page
    in a ValueError, "'None' is not in list")."""
    return parse_spec(state["spec"], str(out / STATE_FILE), state["trials"])


def edited_copy(out: Path, begun: str) -> bool:
    """Whether DIR/sweep.toml, vaelab's copy of the spec, differs from ``begun``, the text the sweep was begun with
    (sweep.json's)."""
    try:
        return (out / SPEC_FILE).read_text(encoding="utf-8-sig") != begun
    except (OSError, UnicodeDecodeError):                 # no copy (read-only, where read_state could not restore it)
        return False


class DamagedState(UsageError):
    """sweep.json is not what vaelab wrote (cut short, emptied, edited): until 2026-12-06 `sweep` and `report` ended
    in a traceback. It ties the directory to its study; the same sweep command writes it again (``rebuilt_state``)."""

    def __init__(self, path: Path, problem: str):
        spec = path.parent / SPEC_FILE
        given = (shell_word(spec), f"from {SPEC_FILE}") if spec.exists() else ("SPEC", "from the spec it was begun with")
        super().__init__(f"{path} is damaged ({problem}); it ties the sweep to its study: `vaelab sweep {given[0]} "
                         f"--out {shell_word(path.parent)}` writes it again {given[1]} and the study (with the "
                         f"--storage it was begun with, if one was given)")
        self.problem = problem


def _state_problem(state: Any) -> str | None:
    """Why sweep.json's content is not a sweep's state, or None where it is."""
    if not isinstance(state, dict):
        return f"a JSON {type(state).__name__}, not an object"
    for key, kinds, what in (("spec", str, "text"), ("study", str, "text"),
                             ("storage", (str, type(None)), "text or null")):
        if not isinstance(state.get(key), kinds):
            return f"{key!r} is {json.dumps(state.get(key))}, not {what}"
    count = state.get("trials")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_TRIALS:
        return f"'trials' is {json.dumps(count)}, not a whole number from 1 to {MAX_TRIALS:_}".replace("_", " ")
    return None


def rebuilt_state(out: Path, spec: "Spec", storage: str | None, damaged: DamagedState) -> dict:
    """sweep.json written again where it is damaged, from what it held: the spec's text (sweep.toml's, which the
    spec given must equal), the storage (--storage, or the study.db beside it), the study (the one of that spec's
    text in it, named after its digest) and the trials (the spec's or --trials, or more where the study has more
    slots)."""
    optuna = require_optuna()
    spec_file, damaged_text = out / SPEC_FILE, f"{out / STATE_FILE} is damaged ({damaged.problem})"
    if spec_file.exists() and spec_file.read_text(encoding="utf-8-sig") != spec.text:
        raise UsageError(f"{damaged_text}, and the spec given is not the sweep's ({spec_file}): give that spec, to "
                         f"write it again")
    url = storage or (storage_url(out, None) if (out / STORAGE_FILE).exists() else None)
    if url is None:
        raise UsageError(f"{damaged_text}, and {out} holds no {STORAGE_FILE}: give the --storage the sweep was begun "
                         f"with, to write it again")
    # the study's name ends with the digest of the spec's text (``sweep``); its beginning, the spec file's name
    digest = hashlib.sha256(spec.text.encode()).hexdigest()[:10]
    storage_ = _storage(url)
    try:
        names = [name for name in optuna.study.get_all_study_names(storage_)
                 if name.startswith("vaelab-") and name.endswith(f"-{digest}")]
    except Exception as exc:                                       # noqa: BLE001 - the storage's own errors
        raise StorageUnavailable(f"storage {url}: cannot read the study's database ({_reason(exc, True)})") from None
    if len(names) != 1:
        held = f"several studies ({', '.join(names)})" if names else "no study"
        raise UsageError(f"{damaged_text}, and {url} holds {held} of this spec: give the --storage the sweep was begun "
                         f"with, to write it again")
    study = open_study(spec, url, names[0])
    # --trials may have added slots: every slot the study has seen (enqueued ones too) is one of the sweep's
    slots = [trial.user_attrs.get("slot") for trial in study.get_trials(deepcopy=False)
             if not trial.user_attrs.get("surplus")]
    state = {"spec": spec.text, "storage": url, "study": names[0],
             "trials": max([spec.trials, *(slot + 1 for slot in slots if isinstance(slot, int))]),
             "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
    _write_state(out, state)
    if not spec_file.exists():             # lost too: the workers read the spec there
        write_text(spec_file, spec.text, replace=False)
    return state


def _write_state(out: Path, state: dict) -> None:
    """sweep.json, with null for the default storage (the study.db beside it), so that the directory can move."""
    stored = None if state["storage"] == storage_url(out, None) else state["storage"]
    write_text(out / STATE_FILE, json.dumps({**state, "storage": stored}, indent=2) + "\n")


def make_sampler(spec: Spec, slot: int = 0):
    """The spec's sampler, seeded from the spec's seed and the slot: each slot draws its own parameters (workers
    sharing one seed would draw the same ones), the same for the same slot and history."""
    optuna = require_optuna()
    seed = (spec.seed * 1_000_003 + slot) % 2**31
    # grid: the slots are enqueued with the grid's points (``grid_points``); the sampler only fills what is left
    return (optuna.samplers.TPESampler if spec.sampler == "tpe" else optuna.samplers.RandomSampler)(seed=seed)


# A grid of up to so many points is enumerated and shuffled whole; a larger one has its points drawn at random
# without repeats, at most GRID_DRAWS_PER_SLOT draws a slot (until 2026-12-05 any grid was enumerated: 10⁷ points
# took minutes and gigabytes before the first trial, once for every slot)
GRID_ENUMERATED = 100_000
GRID_DRAWS_PER_SLOT = 20


def grid_points(spec: Spec, slots: int) -> list[dict]:
    """The parameters of the first ``slots`` slots under ``sampler = "grid"`` (as the study stores them): the grid's
    combinations of choices in an order shuffled by the spec's seed (slots beyond the grid are sampled at random)."""
    import random

    names, choices = [p.name for p in spec.search], [p.choices for p in spec.search]
    rng, size = random.Random(spec.seed), math.prod(len(values) for values in choices)
    if size <= GRID_ENUMERATED:
        points = [dict(zip(names, values)) for values in itertools.product(*choices)]
        rng.shuffle(points)
    else:
        points = (_grid_point(names, choices, index) for index in _distinct_draws(rng, size, GRID_DRAWS_PER_SLOT * slots))
    # a field a point's model would not read is left out (``sample_params``), and points that then coincide (a
    # flow's steps beside no flow) are trained once
    distinct: dict[str, dict] = {}
    for point in points:
        if len(distinct) == slots:
            break
        values, _ = sample_params(spec, lambda param: json.loads(point[param.name]))
        distinct.setdefault(json.dumps(values, sort_keys=True), {name: point[name] for name in values})
    return list(distinct.values())


def _distinct_draws(rng, size: int, draws: int):
    """At most ``draws`` numbers from range(size), each once, in a random order (without a list of them all)."""
    seen: set[int] = set()
    for _ in range(draws):
        index = rng.randrange(size)
        if index not in seen:
            seen.add(index)
            yield index


def _grid_point(names: list[str], choices: list[tuple], index: int) -> dict:
    """The ``index``-th combination of ``choices`` (the last name's choice varying fastest)."""
    point = {}
    for name, values in reversed(list(zip(names, choices))):
        index, which = divmod(index, len(values))
        point[name] = values[which]
    return {name: point[name] for name in names}


def open_study(spec: Spec, url: str, name: str, attempts: int = 5, read_only: bool = False):
    """The sweep's study in its storage; two processes creating the same new database at once race on its
    tables (one wins, the other's CREATE fails), so a failed first open is tried again a few times.
    ``read_only``: the study as it is, for a page of it, loaded without a write (a sweep on a read-only file system,
    or someone else's: creating it "if it does not exist" wrote, and failed there with Optuna's traceback)."""
    for attempt in range(attempts):
        try:
            return _open_study(spec, url, name, read_only)
        except StorageUnavailable:
            if attempt == attempts - 1 or read_only:
                raise
            time.sleep(0.5 + attempt)


def _reason(exc: BaseException, innermost: bool = False) -> str:
    """'Type: the first line of its message' of ``exc``, or of its innermost cause (Optuna wraps the database
    driver's own words)."""
    while innermost and exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _storage(url: str):
    """Optuna's storage of ``url``, or a UsageError (a driver not installed) or StorageUnavailable saying why not.
    Its errors, and ``_open_study``'s, name it "storage URL": until 2026-12-06 "--storage URL", also where no --storage
    had been given (the sweep's own study.db)."""
    optuna = require_optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(_with_driver(url), heartbeat_interval=HEARTBEAT_SECONDS,
                                              grace_period=GRACE_SECONDS,
                                              engine_kwargs={"connect_args": {"timeout": 60}}
                                              if url.startswith("sqlite") else None)
        except ImportError as exc:
            raise UsageError(f"storage {url}: its database driver is not installed ({exc}); pip install "
                             f"'vaelab[sweep]' brings PostgreSQL's (psycopg)") from None
        except Exception as exc:                                  # noqa: BLE001 - SQLAlchemy's connection errors
            raise StorageUnavailable(f"storage {url}: cannot open the study's database ({_reason(exc)})") from None


def _with_driver(url: str) -> str:
    """The URL SQLAlchemy is given for ``url``: a PostgreSQL URL that names no driver (`postgresql://…`, as the README
    writes it) names psycopg, the driver `vaelab[sweep]` installs, where psycopg2 is not installed. SQLAlchemy before
    2.1, all there is on Python 3.10, takes psycopg2 for such a URL: until 2026-12-07 the sweep said the driver was not
    installed, with psycopg there. Everything else (sweep.json, the lines printed) keeps the URL as given."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if sep and scheme == "postgresql" and importlib.util.find_spec("psycopg2") is None \
            and importlib.util.find_spec("psycopg") is not None:
        return f"postgresql+psycopg://{rest}"
    return url


def _open_study(spec: Spec, url: str, name: str, read_only: bool = False):
    optuna = require_optuna()
    storage = _storage(url)
    # no trial is pruned in its first ``pruner_warmup`` epochs, nor before two trials have finished
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=spec.pruner_warmup + 1) \
        if spec.pruner == "median" else optuna.pruners.NopPruner()
    try:
        if read_only:
            return optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(spec), pruner=pruner)
        return optuna.create_study(study_name=name, storage=storage, direction=spec.direction,
                                   sampler=make_sampler(spec), pruner=pruner, load_if_exists=True)
    except KeyError:
        raise UsageError(f"storage {url} holds no study {name}: this sweep's trials are not in it") from None
    except Exception as exc:                                      # noqa: BLE001 - the storage's own errors
        raise StorageUnavailable(f"storage {url}: cannot {'read' if read_only else 'open'} the study "
                                 f"({_reason(exc, innermost=True)})") from None


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive flock (held by one process of this machine at a time; released however it dies)."""
    try:
        handle = open(path, "ab")
    except OSError as exc:              # a read-only --out: the sweep keeps its study, trials and locks there
        raise WriteError(f"cannot open {path}: {exc.strerror} (errno {exc.errno}); a sweep writes in its directory: "
                         f"make {path.parent} writable") from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(host: str | None, pid: int | None) -> bool | None:
    """Whether the process that ran a trial still runs: True/False on this host, None elsewhere (the heartbeat
    decides there)."""
    from vaelab.resources import process_runs

    if host != socket.gethostname() or not pid:
        return None
    return process_runs(pid)


def _dead(trial, shared: bool, now: float) -> bool:
    """Whether a running trial's process is gone. Seen under the ask lock (see `_take`): without a pid it was taken
    by a process killed before it wrote one, for sure where every worker shares this directory's lock (the sweep's
    own SQLite study), after the grace period where workers elsewhere share the storage (they hold other locks);
    with a pid on this host, that process; elsewhere the heartbeat decides (`fail_stale_trials`)."""
    if "pid" not in trial.user_attrs:
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return not shared or now - started > GRACE_SECONDS
    return _alive(trial.user_attrs.get("host"), trial.user_attrs["pid"]) is False


# Waiting trials the study holds at once: a slot is enqueued when the workers are about to need it, not all N at the
# start (until 2026-12-05: 20 000 slots took 75 s to enqueue, and each take read every waiting trial back from the
# storage, 15 s a trial at 20 000 and growing with N; Optuna's cache keeps finished trials, so a take reads few rows)
WAITING_WINDOW = 8


def reconcile(study, spec: Spec, out: Path, shared: bool = False) -> bool:
    """Make the study hold at most one live or finished trial per slot: stale trials failed, empty slots (new, or
    whose last trial failed) enqueued, with the parameters of their failed trial where there was one, in the order
    of the slots while fewer than ``WAITING_WINDOW`` trials wait. True where empty slots are left for a later call.
    ``shared``: the study lives in a storage that workers with other directories may use too (``--storage URL``)."""
    optuna = require_optuna()
    from optuna.trial import TrialState

    # the ask lock too (always after the reconcile lock: no deadlock), so that no worker of this directory is
    # between taking a trial and writing its pid while the running trials are judged
    with file_lock(out / ".reconcile.lock"), file_lock(out / ".ask.lock"), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
        now = time.time()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if _dead(trial, shared, now):
                study.tell(trial.number, state=TrialState.FAIL)            # its process died: retried below
        trials = study.get_trials(deepcopy=False)
        by_slot: dict[int, list] = {}
        for trial in trials:
            if "slot" in trial.user_attrs and not trial.user_attrs.get("surplus"):
                by_slot.setdefault(trial.user_attrs["slot"], []).append(trial)
        waiting = sum(trial.state == TrialState.WAITING for trial in trials)
        for slot in range(spec.trials):
            held = by_slot.get(slot, [])
            if any(t.state in (TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE, TrialState.PRUNED)
                   or "error" in t.user_attrs for t in held):
                continue                     # live, finished, or failed for a reason of its own (shown, not retried)
            if waiting >= WAITING_WINDOW:
                return True
            waiting += 1
            failed = [t for t in held if t.state == TrialState.FAIL and t.params]
            if failed:
                params = failed[-1].params
            elif slot < len(spec.enqueue):
                params = {name: _choice_or_value(spec, name, value) for name, value in spec.enqueue[slot].items()}
            elif 0 <= slot - len(spec.enqueue) < len(spec.grid):
                params = spec.grid[slot - len(spec.enqueue)]
            else:
                params = {}
            study.enqueue_trial(params, user_attrs={"slot": slot, "retry_of": failed[-1].number if failed else None})
    return False


def _choice_or_value(spec: Spec, name: str, value: Any) -> Any:
    """An enqueued value as Optuna stores it: the text of the equal choice (1 enqueued for the choice 1.0), else
    the number itself."""
    param = next(p for p in spec.search if p.name == name)
    return value if param.choices is None else param.choice_of(value)


def run_dir_of(out: Path, slot: int) -> Path:
    return out / "trials" / f"{slot:04d}"


def _take(study, out: Path):
    """A waiting trial of this study, or None when there is none (this worker is done)."""
    from optuna.trial import TrialState

    with file_lock(out / ".ask.lock"), warnings.catch_warnings():
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return None
        # trials are asked and told here, not by Study.optimize, which warns of that on a storage with a heartbeat:
        # `heartbeat` below writes it the same way
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        trial = study.ask()
        # inside the lock: `reconcile` never sees a live trial of this directory's workers without its pid, and a
        # trial with a pid always has a heartbeat (a worker elsewhere judges it by that alone)
        study._storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
    slot = trial.user_attrs.get("slot")
    rivals = [t for t in study.get_trials(deepcopy=False)
              if t.user_attrs.get("slot") == slot and t.number != trial.number and not t.user_attrs.get("surplus")
              and t.state in (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)]
    if slot is None or any(t.state != TrialState.RUNNING or t.number < trial.number for t in rivals):
        trial.set_user_attr("surplus", True)        # another process took this slot: never two writers
        study.tell(trial, state=TrialState.FAIL)
        return _take(study, out)
    return trial


@contextlib.contextmanager
def heartbeat(study, trial):
    """Optuna's RDB heartbeat for a trial run outside `Study.optimize` (which is where Optuna writes it): every
    ``HEARTBEAT_SECONDS`` from a thread until the trial ends, so that `fail_stale_trials` anywhere finds the trial
    dead ``GRACE_SECONDS`` after its process stopped."""
    import threading

    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):          # a storage hiccup: the next beat comes anyway
                study._storage.record_heartbeat(trial._trial_id)

    thread = threading.Thread(target=beat, name="vaelab-sweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _write_pruned(run_dir: Path, epoch: int, number: int, slot: int, pruner: str) -> None:
    from vaelab import checkpoint as ckpt

    write_text(run_dir / ckpt.PRUNED, json.dumps({"epoch": epoch, "trial": number, "slot": slot, "pruner": pruner}))


def mark_pruned(study, spec: Spec, out: Path) -> None:
    """The run directory of each pruned trial here says so (``ckpt.PRUNED``), also where a sweep before 2026-12-04
    wrote none: after its last reported epoch, unless it has been trained on since."""
    from optuna.trial import TrialState

    from vaelab import checkpoint as ckpt
    from vaelab.runs import read_run

    for trial in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        slot = trial.user_attrs.get("slot")
        if slot is None or trial.user_attrs.get("surplus") or not trial.intermediate_values:
            continue
        run_dir, epoch = run_dir_of(out, slot), max(trial.intermediate_values)
        if (run_dir / ckpt.STATE).exists() and not (run_dir / ckpt.PRUNED).exists() \
                and read_run(run_dir).epochs_done == epoch:
            _write_pruned(run_dir, epoch, trial.number, slot, spec.pruner)


def run_trial(trial, spec: Spec, out: Path, threads: int, log) -> tuple[float | None, str]:
    """Train (or resume) the trial's slot and compute its objective: (value, state name)."""
    optuna = require_optuna()
    from vaelab import checkpoint as ckpt
    from vaelab.cli import _new_run, _resume
    from vaelab.compiling import forget
    from vaelab.distributed import SINGLE
    from vaelab.runs import read_evaluations

    forget()                                                   # the graphs of this worker's earlier trials
    slot = trial.user_attrs["slot"]
    run_dir = run_dir_of(out, slot)
    trial.study.sampler = make_sampler(spec, slot)
    params, idle = sample_params(spec, lambda param: param.suggest(trial))
    trial.set_user_attr("idle", idle)
    fields = spec.trial_fields(params)
    trial.set_user_attr("run_dir", str(run_dir.relative_to(out)))

    # the pruner compares intermediate values in the study's direction: the validation ELBO (higher is better) as
    # it is for validation-elbo, its negative (lower is better, an upper bound of the NLL) for validation-nll
    sign = 1.0 if spec.direction == "maximize" else -1.0
    # after its last epoch a trial has spent its training: pruning it there saves at most its objective's evaluation
    # and drops a finished trial, whose objective may rank it where its validation ELBO did not (until 2026-12-07 a
    # trial of 2 epochs of 2 could end "pruned after 2 epochs", its NLL never taken)
    last = _config_of(spec.preset, fields).train.epochs

    def report(model, row):
        trial.report(sign * row["validation_elbo"], row["epoch"])
        if row["epoch"] < last and trial.should_prune():
            # said in the run directory too (its checkpoint of this epoch is written): `runs` and `report` call it
            # pruned, not interrupted
            _write_pruned(run_dir, row["epoch"], trial.number, slot, spec.pruner)
            raise optuna.TrialPruned(f"pruned after epoch {row['epoch']} (validation ELBO {row['validation_elbo']:.2f})")

    parser = _parser()
    common = ["--threads", str(threads), "--no-progress"]
    if (run_dir / ckpt.STATE).exists():                        # a retry: the slot's run resumes exactly
        args = parser.parse_args(["train", f"--out={run_dir}", "--resume", *common])
        _resume(args, SINGLE, observers=[report])
    else:
        if run_dir.exists():                                   # the dead trial's first epoch never finished
            for leftover in run_dir.iterdir():
                if leftover.is_file():
                    leftover.unlink()
        args = parser.parse_args(["train", "--preset", spec.preset, f"--out={run_dir}", *flags_of(fields), *common])
        _new_run(args, SINGLE, observers=[report])
    from vaelab.runs import read_run

    info = read_run(run_dir)
    if spec.objective == "validation-elbo":
        return info.metrics[-1]["validation_elbo"], "COMPLETE"
    name = f"eval-validation-best-k{spec.k}-n{info.config.data.validation}-seed0.json"
    if not (run_dir / name).exists():
        # the command's own code, so that its exceptions reach the worker as they are: Ctrl-C or a full disk stop the
        # slot, and the next sweep evaluates its trained run (through `main` they became exit statuses, and the slot
        # failed for good: "the validation evaluation failed (exit 130)"); any other error fails the trial
        from vaelab.cli import cmd_evaluate

        args = parser.parse_args(["evaluate", path_word(run_dir), "--split", "validation", "--checkpoint", "best",
                                  "--k", str(spec.k), "--threads", str(threads), "--no-progress"])
        args.print_table = log
        with contextlib.redirect_stdout(sys.stderr):
            cmd_evaluate(args)
    record = next(r for r in read_evaluations(run_dir) if r["file"] == name)
    trial.set_user_attr("objective_stderr", record["nll_stderr"])
    return record["nll"], "COMPLETE"


def worker(spec_path: str, out: str, url: str, name: str, threads: int, log_path: str, stopping=None) -> None:
    """One worker process: take waiting trials until there are none left, or until ``stopping`` (the command's
    shared byte, a multiprocessing RawValue) is set. The command also sends each worker SIGINT, which stops the
    trial under way; one that lands after a trial's last step (its final evaluation and checkpoint) is taken by its
    trainer, which has no step left to stop, so that the trial ends as finished and the signal is spent (until
    2026-12-06 the worker then went on through every remaining trial: seen on a Zen 4, where a trial of
    tests/test_sweep.py takes about a second). The byte is looked at before each trial is taken."""
    import threading

    import torch
    from tqdm import tqdm

    # tqdm's first bar (even a disabled one: each trial's evaluation makes one) takes a multiprocessing lock, which in
    # a process of the spawn method is a named semaphore in /dev/shm kept until the process ends cleanly: a worker
    # killed (kill -9, the out-of-memory killer) left it there for ever, or for its resource tracker to remove with a
    # two-line warning after the command's own line. A worker's bars are its own: a thread lock does
    tqdm.set_lock(threading.RLock())
    out_dir = Path(out)
    with open(log_path, "a", buffering=1, encoding="utf-8") as log_file, contextlib.redirect_stdout(log_file), \
            contextlib.redirect_stderr(log_file):
        torch.set_num_threads(threads)
        spec = state_spec(out_dir, read_state(out_dir))
        optuna = require_optuna()
        from optuna.trial import TrialState

        from vaelab.training import Interrupted

        study = open_study(spec, url, name)
        shared = url != storage_url(out_dir, None)
        while True:
            if stopping is not None and stopping.value:      # the command was stopped: take no further trial
                return
            more = reconcile(study, spec, out_dir, shared)
            trial = _take(study, out_dir)
            if trial is None:
                if more:                   # the other workers took the waiting ones: enqueue the next slots
                    continue
                return
            started = time.perf_counter()
            try:
                with heartbeat(study, trial):
                    value, _ = run_trial(trial, spec, out_dir, threads, print)
                trial.set_user_attr("seconds", time.perf_counter() - started)
                study.tell(trial, value)
                print(f"trial {trial.user_attrs['slot']:04d}: {spec.objective} {value:.3f}", flush=True)
            except optuna.TrialPruned as pruned:
                trial.set_user_attr("seconds", time.perf_counter() - started)
                study.tell(trial, state=TrialState.PRUNED)
                print(f"trial {trial.user_attrs['slot']:04d}: {pruned}", flush=True)
            except (Interrupted, KeyboardInterrupt, WriteError) as exc:
                # Ctrl-C, SIGTERM, or files that could not be written (a full disk, a directory made read-only):
                # nothing the trial's parameters did, and its last checkpoint stands. Failed without an error of its
                # own, the slot is retried from it by the next sweep; the other trials would meet the same disk, so
                # this worker ends (the command says why, and that the same command again goes on)
                reason = str(exc) if isinstance(exc, (Interrupted, WriteError)) else \
                    f"interrupted by {signal.Signals(getattr(exc, 'stop_signal', signal.SIGINT)).name}"
                trial.set_user_attr("stopped", reason[:500])
                study.tell(trial, state=TrialState.FAIL)
                print(f"trial {trial.user_attrs['slot']:04d} stopped: {reason}", flush=True)
                return
            except Exception as exc:                              # noqa: BLE001 - the trial fails, the sweep goes on
                # e.g. a sampled combination `vaelab train` refuses (model and latent sizes that do not fit):
                # the slot is done, failed, with its reason in the table; it is not retried
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
                study.tell(trial, state=TrialState.FAIL)
                print(f"trial {trial.user_attrs['slot']:04d} failed: {exc}", flush=True)


# ------------------------------------------------------------------------------------------------
# The command.


def sweep(spec_path: Path, out: Path, workers: int, storage: str | None, trials: int | None,
          log=print, progress: bool = False) -> dict:
    """Run (or join, or continue) the sweep of ``spec_path`` in ``out`` with ``workers`` processes here."""
    import multiprocessing

    from vaelab.resources import default_threads
    from vaelab.training import stop_signals

    require_optuna()
    state_path = out / STATE_FILE
    begun = None
    if spec_path.resolve() == (out / SPEC_FILE).resolve() and state_path.exists():   # the sweep's own copy, given
        with contextlib.suppress(UsageError):   # (a damaged sweep.json: the reads below say so)
            begun = read_state(out)["spec"]     # which writes the copy again from sweep.json's where it is gone
    if begun is not None and edited_copy(out, begun):
        # the sweep's own copy, edited (to widen the search, say): until 2026-12-06 "holds a sweep of another spec
        # (DIR/sweep.toml); give the same spec", which it was, or the edit's TOML error
        raise UsageError(f"{spec_path} was edited after the sweep began ({state_path} keeps the spec it was begun "
                         f"with): to go on with this sweep, put the file back (remove it, and vaelab writes it again); "
                         f"to sweep the edited spec, copy it elsewhere and give another --out")
    spec = load_spec(spec_path, trials)
    if len(spec.enqueue) > spec.trials and not state_path.exists():
        # each entry is a slot of its own: those beyond the trials were never tried (until 2026-12-05 without a word;
        # a sweep begun so goes on as it was)
        more = f"--trials {len(spec.enqueue)}" if trials is not None else f"trials = {len(spec.enqueue)} in the spec"
        raise UsageError(f"sweep spec: enqueue has {len(spec.enqueue)} entries and the sweep "
                         f"{plural(spec.trials, 'trial')}: each entry is a trial of its own, the first slots; give "
                         f"{more} or more, or fewer entries")

    def refuse_others() -> None:
        """A new sweep takes an empty or new directory: its sweep.toml and study.db never go over someone's files,
        nor into a run's directory (checked before the lock file is made there, and again under the lock)."""
        from vaelab.checkpoint import is_run

        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; a sweep needs a directory: give another --out")
        found = sorted(entry.name for entry in out.iterdir() if entry.name != ".reconcile.lock") \
            if out.is_dir() and not state_path.exists() else []
        if found:
            what = "is a vaelab run" if is_run(out) else \
                f"holds other files ({', '.join(found[:3])}{f' and {len(found) - 3} more' if len(found) > 3 else ''})"
            raise UsageError(f"--out {out} {what}, not a sweep; a new sweep needs an empty or new directory: give "
                             f"another --out")

    refuse_others()
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    study = None
    with file_lock(out / ".reconcile.lock"):
        new = not state_path.exists()
        if not new:
            try:
                state = read_state(out)
            except DamagedState as damaged:
                state = rebuilt_state(out, spec, storage, damaged)
                log(f"note: {out / STATE_FILE} was damaged ({damaged.problem}); written again from the spec and "
                    f"the study {state['study']} in {state['storage']}, of {plural(state['trials'], 'trial')}")
            if state["spec"] != spec.text:
                raise UsageError(f"{out} holds a sweep of another spec ({out / SPEC_FILE}); give the same spec to "
                                 f"continue it, or another --out")
            if storage and storage != state["storage"]:
                raise UsageError(f"{out} keeps its study in {state['storage']}; give that --storage (or none)")
            if trials is not None and trials < state["trials"]:
                raise UsageError(f"--trials {trials}: the sweep in {out} has {state['trials']} trials already; "
                                 f"--trials can add trials, not take them away")
            if trials is not None:
                state["trials"] = trials
        else:
            refuse_others()                        # again under the lock: nothing came in meanwhile
            # named after the spec's text: sweeps of one spec on several machines share one study in one storage
            digest = hashlib.sha256(spec.text.encode()).hexdigest()[:10]
            state = {"spec": spec.text, "storage": storage_url(out, storage), "study": f"vaelab-{spec_path.stem}-{digest}",
                     "trials": spec.trials, "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
        # sweep.json first: a second sweep command on this --out that finds it waits for the lock and joins (it finds
        # no files of someone else's there). A new sweep opens its storage under the lock: where that cannot be opened
        # (a typo in --storage, a server down) or a file cannot be written (a full disk), its files are taken back, so
        # that no sweep.json ties this --out to that storage (every later command was refused with "give that
        # --storage"), and a directory this command made is removed again (it was left holding its lock file)
        try:
            _write_state(out, state)
            if new:
                write_text(out / SPEC_FILE, spec.text)
                study = open_study(spec, state["storage"], state["study"])
        except (UsageError, WriteError):
            if new:
                ours = [STATE_FILE, SPEC_FILE] + ([".reconcile.lock"] if made else [])
                if storage is None:        # the study.db it began (the directory held no file of that name)
                    ours += [STORAGE_FILE + suffix for suffix in ("", "-journal", "-wal", "-shm")]
                for name in ours:
                    (out / name).unlink(missing_ok=True)
                if made:
                    with contextlib.suppress(OSError):
                        out.rmdir()
            raise
    spec = dataclasses.replace(spec, trials=state["trials"])
    study = study or open_study(spec, state["storage"], state["study"])
    reconcile(study, spec, out, shared=state["storage"] != storage_url(out, None))
    # a worker beyond the trials would only wait, holding its own torch (about 260 MB each)
    asked, workers = workers, min(workers, spec.trials)
    threads = max(1, default_threads() // workers)
    (out / "workers").mkdir(exist_ok=True)
    log(f"sweep {out}: {plural(spec.trials, 'trial')} of preset {spec.preset}, objective {spec.objective}"
        f"{f' (IWAE-{spec.k})' if spec.objective == 'validation-nll' else ''}, {workers} worker"
        f"{'s' * (workers > 1)}{f' (of --workers {asked}: one per trial)' if asked > workers else ''} × {threads} "
        f"thread{'s' * (threads > 1)}, study in {state['storage']}")
    context = multiprocessing.get_context("spawn")
    logs = [out / "workers" / f"{os.getpid()}-{i}.log" for i in range(workers)]
    # set on a stop signal: no worker takes a further trial (shared memory without a lock: an Event's named semaphore
    # in /dev/shm would outlive a command killed with -9)
    stopping = context.RawValue("b", 0)
    processes = [context.Process(target=worker, args=(str(spec_path), str(out), state["storage"], state["study"],
                                                      threads, str(log), stopping)) for log in logs]

    received: list[int] = []

    def stop(signum, frame):                       # Ctrl-C, SIGTERM (schedulers, `timeout`) and SIGHUP alike
        # noted, not raised: Python runs a handler between any two steps of Python code, a garbage collector's weakref
        # callback among them (SQLAlchemy's, under Optuna's storage), where an exception is printed as "Exception
        # ignored" and lost, and the sweep went on to its end (until 2026-12-06); the loops below look at this list
        received.append(signum)

    def join_until(processes, seconds: float, stops: int) -> bool:
        """Waits until ``processes`` have ended, ``seconds`` have passed, or ``stops`` signals have come (within
        STOP_LOOK_S of it); True when they have ended."""
        deadline = time.monotonic() + seconds
        while len(received) < stops and (alive := [process for process in processes if process.is_alive()]):
            if (left := deadline - time.monotonic()) <= 0:
                return False
            alive[0].join(min(STOP_LOOK_S, left))
        return not any(process.is_alive() for process in processes)

    # the stop signals of `vaelab train` (stop_signals: Ctrl-C even in a background job, SIGHUP unless nohup),
    # taken before the workers start, so that they start with the signals' default actions, not an inherited
    # "ignore"
    started = []
    watch = Watch(study, spec, out, log, progress)
    with stop_signals(stop), contextlib.closing(watch):
        for process in processes:
            if received:
                break
            process.start()
            started.append(process)
        # the workers train; this process shows how far the sweep has come, every few seconds
        while not received and not join_until(started, WATCH_S, stops=1):
            watch.poll()
        if not received:
            watch.poll()                           # the trials that ended since the last look
        if received:                               # (a stop in that last look too: the command stops, as it did)
            signum = received[0]                   # the first stop signal: the exit status's
            # every worker finishes its step and writes a checkpoint that resumes exactly, and takes no further trial
            stopping.value = 1
            for process in started:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGINT)
            if not join_until(started, 300, stops=2):
                if len(received) > 1:
                    # a second Ctrl-C: this command ends now; the workers, already asked, still finish their step
                    # and write their checkpoints
                    raise SweepStopped(f"stopped at once (a second signal): the trials under way are writing their "
                                       f"checkpoints; the same command again goes on with the study ({out})",
                                       signum)
                for process in started:
                    if process.is_alive():
                        process.terminate()
            # the trials that ended since the last look, and those stopped now, have their lines (until 2026-12-05
            # not: a continued sweep counted them as done before it)
            watch.poll()
            raise SweepStopped(f"stopped: the trials under way wrote their checkpoints; the same command again goes "
                               f"on with the study ({out})", signum)
    mark_pruned(study, spec, out)
    summary = summarize(study, spec, out)
    # a worker that did not end by itself (the kernel's out-of-memory killer, a crash): its trial is left running in
    # the study, retried by the next sweep; the command must not end as if the sweep were done
    summary["workers_ended"] = [f"worker {log} ended by {_ending(process.exitcode)}: {_last_line(log)}"
                                for process, log in zip(processes, logs) if process.exitcode]
    return summary


WATCH_S = 3.0        # seconds between two looks at the study while the workers train
STOP_LOOK_S = 0.1    # seconds between two looks for a stop signal while the workers train


class Watch:
    """What `vaelab sweep` shows while its workers train (until 2026-12-05 nothing, however long the sweep): a line
    for each trial as it ends (its objective, epochs and time, or why it was pruned, failed or stopped; the trials
    done of the spec's, the best so far) on stdout, a log's one line per trial; and on a terminal a bar of the trials
    done, with the best so far and the epoch each trial under way has reached. Trials that ended before this command
    (a sweep continued) are counted, not reported again."""

    ENDED = ("complete", "pruned", "fail", "stopped")

    def __init__(self, study, spec: "Spec", out: Path, log, progress: bool):
        from tqdm import tqdm

        self.study, self.spec, self.out, self.log = study, spec, out, log
        rows = summarize(study, spec, out)["rows"]
        self.reported = {row["slot"]: (row["trial"], row["state"]) for row in rows if row["state"] in self.ENDED}
        self.best = self._better(None, [row for row in rows if row["slot"] in self.reported])
        self.states: dict[int, str] = {}      # the state of each of the study's trials at the last look
        self.running: list[int] = []          # the slots under way then
        self.bar = tqdm(total=spec.trials, initial=self.done(), desc=f"sweep {out.name}", unit="trial",
                        disable=not progress, dynamic_ncols=True, leave=False)

    def done(self) -> int:
        """The slots done: complete, pruned or failed for a reason of their own; not those stopped (a signal, a full
        disk), which the same command retries (until 2026-12-05 counted as done)."""
        return sum(state != "stopped" for _, state in self.reported.values())

    def _better(self, best: dict | None, rows: list[dict]) -> dict | None:
        """The best complete trial of ``best`` and ``rows``."""
        complete = [row for row in rows if row["state"] == "complete" and row["value"] is not None]
        choose = min if self.spec.direction == "minimize" else max
        return choose(complete + ([best] if best else []), key=lambda row: row["value"], default=None)

    def poll(self) -> None:
        try:
            # the trials' states at every look (well under a millisecond); the rows of the slots whose trials
            # changed, which read their files (about 2 ms a trial; until 2026-12-05 every slot's at each change, 6 s
            # a look at 3000 trials), so that a sweep of many trials does not take the workers' cores to watch them
            trials = [trial for trial in self.study.get_trials(deepcopy=False)
                      if "slot" in trial.user_attrs and not trial.user_attrs.get("surplus")]
            states = {trial.number: trial.state.name for trial in trials}
            changed = sorted({trial.user_attrs["slot"] for trial in trials
                              if self.states.get(trial.number) != trial.state.name})
            rows = summarize(self.study, self.spec, self.out, changed)["rows"] if changed else None
        except Exception:                 # noqa: BLE001 - a look that fails (a busy database) waits for the next
            return
        if rows is not None:
            self.states = states
            self.running = sorted(trial.user_attrs["slot"] for trial in trials if trial.state.name == "RUNNING")
            for row in rows:
                if row["state"] in self.ENDED and self.reported.get(row["slot"]) != (row["trial"], row["state"]):
                    # several that ended between two looks are counted one after the other, in the order of slots
                    self.reported[row["slot"]] = (row["trial"], row["state"])
                    self.best = self._better(self.best, [row])
                    so_far = "" if self.best is None else \
                        f", the best so far trial {self.best['slot']:04d} ({self.best['value']:.3f})"
                    (self.bar.write if not self.bar.disable else self.log)(
                        f"{self._ended(row)}; {self.done()} of {plural(self.spec.trials, 'trial')} done{so_far}")
        if not self.bar.disable:
            running = [f"{slot:04d}" + ("" if epochs is None else f" epoch {epochs}")
                       for slot, epochs in ((slot, self._epochs(slot)) for slot in self.running)]
            self.bar.n = self.done()
            self.bar.set_postfix_str("; ".join(([] if self.best is None else [f"best {self.best['value']:.3f}"])
                                               + ([f"running {', '.join(running)}"] if running else [])))

    def _epochs(self, slot: int) -> int | None:
        """The epochs a trial under way has finished: the rows of its metrics.csv; None where this machine holds no
        run of it (a trial of another machine's workers, on a shared --storage)."""
        run_dir = run_dir_of(self.out, slot)
        try:
            with open(run_dir / "metrics.csv", "rb") as handle:
                return max(0, sum(1 for _ in handle) - 1)
        except OSError:
            return 0 if run_dir.is_dir() else None

    def _ended(self, row: dict) -> str:
        from vaelab.runs import format_duration

        name = f"trial {row['slot']:04d}"
        if row["state"] == "complete":
            error = "" if row["stderr"] is None else f" ± {row['stderr']:.3f}"
            return (f"{name} complete: {self.spec.objective} {row['value']:.3f}{error}, "
                    f"{_epochs_text(row['epochs'], 'epoch')} in {format_duration(row['seconds'])}")
        if row["state"] == "pruned":
            return f"{name} pruned after {_epochs_text(row['epochs'], 'epoch')}"
        return f"{name} {'failed' if row['state'] == 'fail' else 'stopped'}: {row['error'] or row['stopped']}"

    def close(self) -> None:
        self.bar.close()


def _ending(exitcode: int) -> str:
    """How a process ended, in words: 'SIGKILL (the out-of-memory killer sends it)', 'exit status 1'."""
    if exitcode >= 0:
        return f"exit status {exitcode}"
    name = signal.Signals(-exitcode).name
    return name + (" (the kernel's out-of-memory killer sends it, or kill -9)" if -exitcode == signal.SIGKILL else "")


def _last_line(log: Path) -> str:
    """The last line a worker wrote in its log (where it failed: its error), or a word that it wrote none."""
    try:
        lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return lines[-1].strip()[:300] if lines else "its log is empty"


class SweepStopped(UsageError):
    """The sweep stopped by a signal: exit status 128 + its number, as every command (130 Ctrl-C, 143 SIGTERM, 129
    SIGHUP; until 2026-12-05 130 for all three)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + signum


def summarize(study, spec: Spec, out: Path, slots: Sequence[int] | None = None) -> dict:
    """Every slot's latest trial (or the ``slots`` given): parameters, objective ± s.e., epochs, seconds, state;
    the best of them marked."""
    from vaelab.runs import read_metrics

    rows = []
    latest: dict[int, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        slot = trial.user_attrs.get("slot")
        if slot is None or trial.user_attrs.get("surplus") or slot >= spec.trials:
            continue
        if slot not in latest or trial.number > latest[slot].number:
            latest[slot] = trial
    for slot in range(spec.trials) if slots is None else slots:
        trial = latest.get(slot)
        run_dir = run_dir_of(out, slot)
        try:
            metrics, damaged = read_metrics(run_dir / "metrics.csv") if run_dir.exists() else [], None
        except CheckpointError as exc:
            # one trial's metrics.csv damaged (a hand, a copy cut short): its row says so, the others are shown
            # (until 2026-12-06 the sweep's page and its summary ended in that trial's error, or a KeyError)
            metrics, damaged = [], str(exc)
        params = {p.name: p.stored(trial.params[p.name]) for p in spec.search
                  if trial is not None and p.name in trial.params}
        stopped = None if trial is None else trial.user_attrs.get("stopped")
        if trial is not None and trial.state.name == "RUNNING" and \
                _alive(trial.user_attrs.get("host"), trial.user_attrs.get("pid")) is False:
            # its process is gone (kill -9 of the sweep, the out-of-memory killer) and no sweep has looked since:
            # until 2026-12-05 shown "running", and counted so, when nothing ran
            stopped = ("its process ended without telling the study (kill -9, the out-of-memory killer, or a stop "
                       "signal as it took the trial); the same sweep command again retries it")
        rows.append({"slot": slot, "trial": None if trial is None else trial.number,
                     "unused": sorted({*_unused_params(spec, run_dir),
                                       *(() if trial is None else trial.user_attrs.get("idle", ()))}),
                     # stopped: failed by no fault of its own (a signal, a full disk), retried by the next sweep
                     "state": "waiting" if trial is None else "stopped" if stopped is not None and
                     trial.state.name in ("FAIL", "RUNNING") else trial.state.name.lower(),
                     "error": None if trial is None else trial.user_attrs.get("error"),
                     "stopped": stopped,
                     # a pruned trial's value is its last reported intermediate value (Optuna's tell): the
                     # objective itself only for validation-elbo (for validation-nll it is −ELBO, not an NLL)
                     "params": params, "value": None if trial is None or (
                         trial.state.name == "PRUNED" and spec.objective != "validation-elbo") else trial.value,
                     "stderr": None if trial is None else trial.user_attrs.get("objective_stderr"),
                     "epochs": None if damaged else len(metrics), "damaged": damaged,
                     "seconds": metrics[-1]["elapsed_seconds"] if metrics else None,
                     "run_dir": str(run_dir)})
    finished = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    best = (min if spec.direction == "minimize" else max)(finished, key=lambda r: r["value"], default=None)
    for row in rows:
        row["best"] = row is best
    return {"spec": spec, "rows": rows, "best": best, "objective": spec.objective}


def _unused_params(spec: Spec, run_dir: Path) -> list[str]:
    """The searched and fixed fields this trial's run never reads (RunConfig.unused: a mixture's K beside the
    standard prior …; with the fields a trial did not sample, ``sample_params``): its table shows the searched ones
    as unused, its parameter plots leave it out, and its command leaves them out (but a bound value, a flow's steps
    set to 0): a fixed `prior_components = 3` beside a searched prior whose best is the standard one was in the
    command, whose run then said that --prior-components 3 changes nothing."""
    from vaelab.cli import _FLAGS
    from vaelab.config import RunConfig
    from vaelab.errors import VaelabError

    try:
        unused = RunConfig.load(run_dir / "config.json").unused() if (run_dir / "config.json").is_file() else {}
    except VaelabError:                 # a damaged trial's config: its row shows the values sampled
        return []
    return [name for name in [*(p.name for p in spec.search), *spec.fixed]
            if ".".join(_FLAGS.get(name, ("", name))) in unused]


def options_legend(spec: Spec) -> list[tuple[str, list[tuple[str, str]]]]:
    """What each option of a searched name sets, as `vaelab train` flags: [(name, [(option, flags), …]), …]."""
    return [(param.name, [(label, " ".join(flags_of(fields))) for label, fields in param.options.items()])
            for param in spec.search if param.options is not None]


def _epochs_text(epochs: int | None, noun: str | None = None) -> str:
    """A trial's epochs ('3', or '3 epochs' with ``noun``); '?' where its metrics.csv is damaged (``summarize``)."""
    if epochs is None:
        return "? epochs" if noun else "?"
    return plural(epochs, noun) if noun else str(epochs)


def failures(rows: list[dict]) -> list[tuple[str, str]]:
    """(which trials, the reason) for each reason trials failed for, in the order of its first trial: a reason they
    share (a fixed train_examples above the data set's, a combination `vaelab train` refuses) is one line naming
    them, 'trials 0000, 0003 and 0007', where it was a line per trial, the same text each time."""
    slots: dict[str, list[int]] = {}
    for row in rows:
        if row.get("error"):
            slots.setdefault(row["error"], []).append(row["slot"])
    return [(_trial_list(numbers), reason) for reason, numbers in slots.items()]


def _trial_list(slots: list[int]) -> str:
    """'trial 0003', 'trials 0003 and 0007', 'trials 0000, 0001, 0002, 0003, 0004, 0005, … 0049 (30 trials)'."""
    names = [f"{slot:04d}" for slot in slots]
    if len(names) == 1:
        return f"trial {names[0]}"
    if len(names) <= 8:
        return f"trials {', '.join(names[:-1])} and {names[-1]}"
    return f"trials {', '.join(names[:6])}, … {names[-1]} ({len(names)} trials)"


def summary_table(summary: dict) -> str:
    from vaelab.config import UNUSED
    from vaelab.runs import format_duration

    spec, rows = summary["spec"], summary["rows"]
    names = [p.name for p in spec.search]
    header = ["", "trial", *names, summary["objective"], "± s.e.", "epochs", "training", "state"]

    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return json.dumps(value) if isinstance(value, (list, tuple)) else str(value)

    body = [["*" if r["best"] else "", f"{r['slot']:04d}",
             *(UNUSED if n in r.get("unused", ()) else cell(r["params"].get(n, "—")) for n in names),
             "—" if r["value"] is None else f"{r['value']:.3f}", "—" if r["stderr"] is None else f"{r['stderr']:.3f}",
             _epochs_text(r["epochs"]), format_duration(r["seconds"]), r["state"]] for r in rows]
    lines = text_table(header, body)
    lines += [f"{name}: " + "; ".join(f"{label} = {flags}" for label, flags in options)   # depth: two = --latent 8 4 …
              for name, options in options_legend(spec)]
    lines += [f"{which} failed: {reason}" for which, reason in failures(rows)]
    lines += [f"trial {r['slot']:04d}: {r['damaged']}" for r in rows if r.get("damaged")]
    lines += [f"trial {r['slot']:04d} stopped (the next sweep goes on with it): {r['stopped']}" for r in rows
              if r["state"] == "stopped"]
    best = summary["best"]
    if best is not None:
        from vaelab.config import RunConfig
        from vaelab.presets import apply_preset

        from vaelab.models import CONDITIONAL_FIELDS

        fields = {k: v for k, v in spec.trial_fields(best["params"]).items() if k not in BUDGET_FIELDS and (
                  k not in best.get("unused", ()) or CONDITIONAL_FIELDS.get(k, (None, None))[1] is not None)}
        command = shlex.join(["vaelab", "train", "--preset", spec.preset, *flags_of(fields), "--out", "runs/best"])
        # the full run holds out the preset's validation digits (a budget field, left out): its weights are then
        # the best-validation ones, model-best.safetensors
        held_out = apply_preset(RunConfig(), spec.preset).data.validation
        evaluate = "vaelab evaluate runs/best" + (" --checkpoint best" if held_out else "") + " --k 5000"
        lines += ["", f"* best: trial {best['slot']:04d} ({best['run_dir']}). Train it in full (without the sweep's "
                      f"budget fields {', '.join(f for f in BUDGET_FIELDS if f in spec.fixed) or '—'}) and evaluate "
                      f"it on the test set once:", f"  {command} && {evaluate}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The report of a sweep.


def is_sweep(path: Path) -> bool:
    """A sweep's directory: its sweep.json, with its sweep.toml, its study.db, or the copy of the spec's text inside
    (``read_state``)."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        return False
    if (path / SPEC_FILE).exists() or (path / STORAGE_FILE).exists():    # (a damaged sweep.json: read_state says so)
        return True
    try:
        return isinstance(json.loads((path / STATE_FILE).read_text(encoding="utf-8-sig")).get("spec"), str)
    except (OSError, ValueError, AttributeError):
        return False


def not_a_sweep(path: Path) -> None:
    """A UsageError where a command that takes a run was given a sweep's directory: its runs are its trials."""
    if is_sweep(path):
        raise UsageError(f"{path} is a sweep's directory (vaelab sweep), not a run: its runs are its trials, "
                         f"{Path(path) / 'trials'}/NNNN (vaelab runs {shell_word(path)} lists them; "
                         f"vaelab report {shell_word(path)} makes "
                         f"the sweep's page)")


def importance_trials(values: Sequence[float], minimize: bool) -> int:
    """How many of the complete trials' objective ``values`` PED-ANOVA takes as the best (Optuna's quantile
    filter): the ceil(10 % · n)-th best value and every trial as good, so at least one (until 2026-12-07 the page
    said "the best 10 % of the 4 complete trials", which was one trial)."""
    ranked = sorted(values, reverse=not minimize)
    cutoff = ranked[math.ceil(IMPORTANCE_QUANTILE * len(ranked)) - 1]
    return sum(1 for v in ranked if (v <= cutoff if minimize else v >= cutoff))


def build_sweep_report(out: Path, trial_reports: bool = True, data_dir: str | None = None,
                       progress: bool | str = False) -> str:
    """One page: the results, the optimisation history, each parameter against the objective, Optuna's
    parameter importances, and every trial with a link to its own report (made here when missing, about a second
    each: ``progress`` shows them, as a bar on a terminal or a line a minute in a log, ``evaluation.progress_bar``;
    until 2026-12-05 nothing for minutes)."""
    optuna = require_optuna()
    from vaelab import plots
    from vaelab.config import UNUSED
    from vaelab.evaluation import progress_bar
    from vaelab.report import Figure, _environment, _fmt, data_uri
    from vaelab.runs import format_duration

    state = read_state(out)
    spec = state_spec(out, state)
    study = open_study(spec, state["storage"], state["study"], read_only=True)
    with contextlib.suppress(WriteError):   # a sweep that cannot be written (read-only): the marks wait for one
        mark_pruned(study, spec, out)
    summary = summarize(study, spec, out)
    rows, minimize = summary["rows"], spec.direction == "minimize"
    label = {"validation-nll": "validation NLL (nats)", "validation-elbo": "validation ELBO (nats)"}[spec.objective]
    linked = {row["slot"] for row in rows if trial_reports and row["state"] in ("complete", "pruned")
              and (Path(row["run_dir"]) / "model.safetensors").exists()}
    missing = {row["slot"] for row in rows if row["slot"] in linked and not (Path(row["run_dir"]) / "report.html").exists()}
    bar = progress_bar(len(missing), "trial reports", progress, unit="report")
    for row in rows:
        row["report"] = None
        run_dir = Path(row["run_dir"])
        if row["slot"] in linked:
            if row["slot"] in missing:
                from vaelab.report import build_report

                try:
                    write_text(run_dir / "report.html", build_report(run_dir, data_dir)[0])
                except (WriteError, CheckpointError):   # a trial directory that cannot be written, or a file of
                    continue                          # it damaged (its row says so): no link, the rest shown
                finally:
                    bar.update()
            row["report"] = str((run_dir / "report.html").relative_to(out))
    bar.close()
    # the objective of pruned trials: their last reported validation ELBO (on the ELBO objective's scale only)
    latest = {t.user_attrs.get("slot"): t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")}
    values = [r["value"] if r["state"] == "complete" else
              (latest[r["slot"]].intermediate_values[max(latest[r["slot"]].intermediate_values)]
               if r["state"] == "pruned" and spec.objective == "validation-elbo" and latest[r["slot"]].intermediate_values
               else None) for r in rows]
    states = [r["state"] for r in rows]
    history = Figure(f"{label} of each trial; the line is the best so far", data_uri(plots.sweep_history_figure(
        [r["slot"] for r in rows], values, states, minimize, label))) if any(v is not None for v in values) else None
    complete = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    reading = {p.name: [r for r in complete if p.name not in r["unused"]] for p in spec.search}   # trials that read p
    left = {name: len(complete) - len(kept) for name, kept in reading.items()}

    def order(p: Param) -> list[str] | None:            # choices along the axis as the spec lists them
        return [str(json.loads(c)) for c in p.choices] if p.choices else None

    parameters = [Figure(f"{p.name} against {label}" + (f" (left out: {left[p.name]} trial"
                                                         f"{' that does' if left[p.name] == 1 else 's that do'} not "
                                                         f"read it)" if left[p.name] else ""),
                         data_uri(plots.sweep_parameter_figure(p.name, [r["params"].get(p.name) for r in reading[p.name]],
                                                               [r["value"] for r in reading[p.name]], label, p.log,
                                                               order(p))))
                  for p in spec.search if reading[p.name]]
    importance, note = None, ""
    try:
        # PED-ANOVA (Watanabe et al. 2023), named here rather than left to Optuna's default, which changed (fANOVA
        # before Optuna 5, and that one needs scikit-learn): how far each parameter's density among the best 10 % of
        # the complete trials lies from its density over all of them (Pearson divergence). Raw values, normalised
        # here: Optuna's own normalisation turns all zeros (no parameter tells the best trials apart) into equal bars.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                   # its few-trials and experimental-argument warnings
            raw = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(target_quantile=IMPORTANCE_QUANTILE),
                normalize=False)
        total = sum(raw.values())
        if total > 0:
            finite = [t.value for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                      if math.isfinite(t.value)]
            top = importance_trials(finite, minimize)
            # Optuna's advice: five or more trials in that set for stable importances (so about 50 trials)
            caution = ("; with fewer than the 5 best trials Optuna advises for stable importances, read them as a "
                       "hint, not a measurement" if top < 5 else "")
            importance = Figure(f"parameter importances (Optuna's PED-ANOVA evaluator: how far each parameter's "
                                f"values among the best 10 % of the {len(finite)} complete trials (here "
                                f"{plural(top, 'trial')}) lie from their spread over all of them{caution})",
                                data_uri(plots.importance_figure({name: v / total for name, v in raw.items()})))
    except (ValueError, RuntimeError) as exc:
        note = f"No parameter importances: {exc}"
    if importance is None and not note:
        note = ("No parameter importances: they need two or more complete trials whose parameters differ, and a "
                "parameter whose values among the best trials differ from the others'.")
    counts = [f"{states.count(s)} {'failed' if s == 'fail' else s}" for s in ("complete", "pruned", "running", "fail",
                                                                             "stopped", "waiting") if states.count(s)]
    best = summary["best"]
    command = summary_table(summary).split("\n")[-1].strip() if best else ""
    return _environment().get_template("sweep.html.j2").render(
        name=out.resolve().name, spec=spec, rows=rows, best=best, command=command, history=history,
        parameters=parameters, importance=importance, importance_note=note, minimize=minimize, counts=counts,
        legend=options_legend(spec), failures=failures(rows),
        finished=sum(states.count(s) for s in ("complete", "pruned")), storage=state["storage"], fmt=_fmt,
        edited=edited_copy(out, state["spec"]),
        pending=states.count("running") + states.count("waiting"),
        short=lambda v: f"{v:.4g}" if isinstance(v, float) else v, unused=UNUSED,
        duration=format_duration, generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
