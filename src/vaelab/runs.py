"""Reading run directories: config, metrics, status, evaluations. Used by `report`, `compare`, `runs` and
the Python API; reads only (no lock, nothing written)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vaelab import checkpoint as ckpt
from vaelab.config import RunConfig
from vaelab.data import file_sha256
from vaelab.errors import CheckpointError
from vaelab.precision import PRECISIONS
from vaelab.schedules import stops_early
from vaelab.tables import plural


@dataclass
class RunInfo:
    path: Path
    config: RunConfig
    metrics: list[dict[str, float]]
    status: str                    # finished | stopped early | pruned (by a sweep) | interrupted | diverged (its
    #                                last training stopped at a NaN or absurd loss; the checkpoint before stands) |
    #                                training now | not started | weights only (trained weights without the
    #                                training state: not resumable)
    epochs_done: int
    holder: int | None             # pid of the process training it now
    meta: dict[str, Any] = field(default_factory=dict)          # the training state's metadata
    evaluations: list[dict[str, Any]] = field(default_factory=list)   # every record, each with "stale"
    notes: list[str] = field(default_factory=list)                    # files that were skipped, and why
    label: str | None = None       # what a page calls it among others (distinct_labels); its folder's name if None
    diverged: dict[str, Any] | None = None     # RUN/diverged.json where its last training diverged (``divergence``)

    @property
    def name(self) -> str:
        return self.label or self.path.name

    @property
    def epochs_total(self) -> int:
        return self.config.train.epochs

    @property
    def resumable(self) -> bool:
        return self.status == "interrupted" or self.status == "pruned" and self.epochs_done < self.epochs_total

    @property
    def resume_command(self) -> str:
        """The command that goes on with it (``checkpoint.resume_command``: torchrun's where several processes
        trained it)."""
        return ckpt.resume_command(self.path, ckpt.written_by(self.meta))

    @property
    def training_seconds(self) -> float | None:
        return self.metrics[-1].get("elapsed_seconds") if self.metrics else None

    @property
    def best_validation(self) -> tuple[int, float] | None:
        """(epoch, ELBO) of the best validation ELBO so far, whose weights model-best.safetensors holds; None
        without a validation split (or a training state)."""
        epoch, elbo = int(self.meta.get("best_epoch", 0)), self.meta.get("best_validation_elbo")
        return (epoch, float(elbo)) if epoch and elbo is not None else None

    def headline_evaluation(self, split: str = "test") -> dict | None:
        """The headline evaluation of ``split``: among the records of the run's current weights (never a stale
        one), the float32 one (records before bf16 evaluation were), then with the most digits, then the
        largest K, then the newest."""
        records = [r for r in self.evaluations if r.get("split", "test") == split and r.get("nll") is not None
                   and not r["stale"]]
        return max(records, key=lambda r: (r["precision"] == "fp32", r["n_examples"], r["k"], r.get("date") or ""),
                   default=None)

    def stale_evaluations(self, split: str = "test") -> list[dict]:
        return [r for r in self.evaluations if r.get("split", "test") == split and r["stale"]]


# What a record must hold to be shown (vaelab writes all of these; a hand-written file may not):
# field → (accepted types, whether None is allowed).
_NUMBER = (int, float)
RECORD_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "nll": (_NUMBER, False), "nll_stderr": (_NUMBER, True), "elbo": (_NUMBER, True), "k": ((int,), False),
    "n_examples": ((int,), False), "estimates": ((list,), False), "layers": ((list,), False),
}
ESTIMATE_FIELDS = {"name": ((str,), False), "mean": (_NUMBER, True), "stderr": (_NUMBER, True), "kind": ((str,), False)}
LAYER_FIELDS = {"layer": ((int,), False), "latent": ((int,), False), "active_units": ((int,), True),
                "kl": (_NUMBER, False)}
# fields a record may lack (an older vaelab's), but which, where present, name files: not of another type (until
# 2026-12-06 `"weights": 5` or `"per_digit": [1]` ended `report` and `compare` in a traceback)
OPTIONAL_FIELDS = {"weights": ((str,), False), "per_digit": ((str,), False)}
# the gap decomposition (`evaluate --gaps`), where a record has one: what `evaluate`'s lines, the report and compare
# show of it (until 2026-12-06 a hand-edited one without a field, or a field of another type, ended them in a traceback)
_MEAN = {"mean": (_NUMBER, True), "stderr": (_NUMBER, True)}    # null: a non-finite value (``records.strict_json``)
GAP_QUANTITIES = ("log_px", "elbo_optimised", "elbo_encoder", "approximation_gap", "amortisation_gap")
GAP_FIELDS = {"family": ((str,), False), "log_px_estimator": ((str,), False), "digits": ((int,), False),
              "converged_fraction": (_NUMBER, False), "mean_steps": (_NUMBER, False), "max_steps": ((int,), False),
              "rule": ((str,), False), **{name: ((dict,), False) for name in GAP_QUANTITIES}}
GAP_OPTIONAL = {"log_px_optimised": ((dict,), False), "log_px_optimised_estimator": ((str,), False),
                "elbo_laplace": ((dict,), False), "warning": ((str,), False)}
# the convergence curve in K (`evaluate --k-curve`), where a record has one: a list of points, each IWAE-k's mean and
# standard error (until 2026-12-06 one not a list of such points ended `report` in a traceback)
K_CURVE_FIELDS = {"k": ((int,), False), **_MEAN}


def _record_problem(record: Any) -> str | None:
    """Why ``record`` is not a vaelab evaluation record, or None when it is one."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"

    def check(entry: dict, fields: dict, where: str, required: bool = True) -> str | None:
        for name, (types, nullable) in fields.items():
            if name not in entry:
                if not required:
                    continue
                return f"no {where}{name!r}"
            value = entry[name]
            if value is None and nullable:
                continue
            if isinstance(value, bool) or not isinstance(value, types):
                return f"{where}{name!r} is {value!r}"
        return None

    problem = check(record, RECORD_FIELDS, "") or check(record, OPTIONAL_FIELDS, "", required=False)
    if problem is None and (record["k"] < 1 or record["n_examples"] < 1):
        problem = f"k {record['k']} and n_examples {record['n_examples']} must be ≥ 1"
    # (their entries only where they are lists: until 2026-12-06 `"layers": 5` ended runs, compare and report in a
    # TypeError, the loop going on after the type's problem was found)
    for index, entry in enumerate(record["estimates"] if problem is None else []):
        problem = problem or (check(entry, ESTIMATE_FIELDS, f"estimates[{index}].") if isinstance(entry, dict)
                              else f"estimates[{index}] is not an object")
    for index, entry in enumerate(record["layers"] if problem is None else []):
        problem = problem or (check(entry, LAYER_FIELDS, f"layers[{index}].") if isinstance(entry, dict)
                              else f"layers[{index}] is not an object")
    if problem is None and "gaps" in record:
        gaps = record["gaps"]
        problem = (check(gaps, GAP_FIELDS, "gaps.") or check(gaps, GAP_OPTIONAL, "gaps.", required=False)
                   if isinstance(gaps, dict) else f"gaps is {gaps!r}, not an object")
        for name in [*GAP_QUANTITIES, *(key for key in ("log_px_optimised", "elbo_laplace") if key in gaps)]:
            problem = problem or check(gaps[name], _MEAN, f"gaps.{name}.")
    if problem is None and "k_curve" in record:
        curve = record["k_curve"]
        problem = None if isinstance(curve, list) else f"k_curve is {curve!r}, not a list"
        for index, point in enumerate(curve if isinstance(curve, list) else []):
            problem = problem or (check(point, K_CURVE_FIELDS, f"k_curve[{index}].") if isinstance(point, dict)
                                  else f"k_curve[{index}] is not an object")
            problem = problem or (f"k_curve[{index}].k is {point['k']}, not ≥ 1" if point["k"] < 1 else None)
    if problem is None and record.get("precision", "fp32") not in PRECISIONS:
        problem = f"precision {record.get('precision')!r} is none of {', '.join(PRECISIONS)}"
    if problem is None and record.get("split", "test") not in ("test", "validation"):
        problem = f"split {record.get('split')!r} is neither test nor validation"
    return problem


def of_best_weights(record: dict) -> bool:
    """Whether an evaluation measured the best-validation weights (a record of vaelab 0.1 names none: the last)."""
    return record.get("weights", ckpt.WEIGHTS) != ckpt.WEIGHTS


def weights_label(record: dict) -> str:
    """Which weights an evaluation measured: 'model.safetensors after epoch 5', 'model-best.safetensors of epoch 3
    (the best validation ELBO), evaluated after epoch 5' (and 'stale' where they are no longer the run's)."""
    epochs, best = record.get("epochs_trained"), record.get("best_epoch")
    text = record.get("weights", ckpt.WEIGHTS)
    if isinstance(best, int):
        text += f" of epoch {best} (the best validation ELBO)" + (
            f", evaluated after epoch {epochs}" if isinstance(epochs, int) else "")
    elif isinstance(epochs, int):
        text += f" after epoch {epochs}" + _steps_into(record)
    if record.get("stale"):
        text += f", stale: {stale_weights(record)}, not the run's now"
    elif record.get("stale") is None:
        text += " (weights not recorded)"
    return text


def stale_weights(record: dict) -> str:
    """What a stale record measured in place of the run's weights: "earlier weights", or "the weights of /runs/a"
    where the record was made from another directory's run (written here by ``evaluate --out``, or copied here)."""
    elsewhere = record.get("elsewhere")
    return f"the weights of {elsewhere}" if elsewhere else "earlier weights"


def weights_position(loaded, run: RunInfo) -> dict[str, int]:
    """Where weights just loaded (``checkpoint.LoadedWeights``) stand in their run, as an evaluation records it:
    "epochs_trained", the run's whole epochs (for the last weights, theirs); "best_epoch", the epoch of the
    best-validation weights; "weights_step" where the last weights are that many steps into the next epoch (a run
    stopped inside one). From the file's own metadata where it holds them (written since 2026-12-03: a training
    that went on after ``run`` was read cannot mislabel them), else from ``run`` as read."""
    if of_best_weights({"weights": loaded.file}):
        best = loaded.epoch or (run.best_validation or (None,))[0]
        return {"epochs_trained": run.epochs_done, **({"best_epoch": best} if best else {})}
    if loaded.epoch is None:
        return {"epochs_trained": run.epochs_done}
    return {"epochs_trained": loaded.epoch, **({"weights_step": loaded.step} if loaded.step else {})}


def pictured_weights(loaded, run: RunInfo) -> str:
    """Which weights a picture or statistic drawn now is of (``weights_position``): 'model.safetensors after epoch
    630', 'model-best.safetensors of epoch 594'."""
    position = weights_position(loaded, run)
    if of_best_weights({"weights": loaded.file}):
        return loaded.file + (f" of epoch {position['best_epoch']}" if "best_epoch" in position else "")
    return weights_label({"weights": loaded.file, "stale": False, **position})


def _steps_into(record: dict) -> str:
    """' and 120 steps of epoch 6' for weights saved inside an epoch (a run stopped there), else ''."""
    steps, epochs = record.get("weights_step"), record.get("epochs_trained")
    return f" and {steps} steps of epoch {epochs + 1}" if isinstance(steps, int) and steps > 0 and \
        isinstance(epochs, int) else ""


def format_duration(seconds: float | None) -> str:
    """'42 s', '5.3 min', '1.42 h': a unit that shows short runs too ('—' for None)."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if 0 < seconds < 0.095:     # two digits that say something (until 2026-12-07 a 0.02 s trial read "0.0 s")
        return f"{seconds:.2g} s"
    if seconds < 100:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def headline_nll(run: RunInfo) -> str:
    """'84.27 (K 5000, 10000 digits, epoch 520)' for the run's headline evaluation of its current weights (test,
    else validation); '—' where there is none, with the newest stale one named where one exists."""
    best = run.headline_evaluation() or run.headline_evaluation("validation")
    if best is not None:
        epochs = best.get("epochs_trained")
        of_best = best.get("best_epoch")                     # the best weights' own epoch, where recorded
        where = ", ".join([f"K {best['k']}", digits_label(best)]
                          + ([f"best weights of epoch {of_best}"] if isinstance(of_best, int) else
                             ([f"epoch {epochs}{_steps_into(best)}"] if isinstance(epochs, int) else [])
                             + (["best weights"] if of_best_weights(best) else [])))
        return f"{best['nll']:.2f} ({where})"
    stale = run.stale_evaluations() or run.stale_evaluations("validation")
    if stale:
        newest = max(stale, key=lambda r: r.get("date") or "")
        epochs, of_best = newest.get("epochs_trained"), newest.get("best_epoch")
        which = (f"the best weights of epoch {of_best}" if isinstance(of_best, int) else
                 f"the weights after epoch {epochs if isinstance(epochs, int) else '?'}{_steps_into(newest)}")
        if newest.get("elsewhere"):                           # another directory's run: which weights, and where
            which += f" of {newest['elsewhere']}"
        return f"— (stale: {newest['nll']:.2f} of {which})"
    return "—"


# the columns of metrics.csv that every vaelab wrote (vaelab 0.1's ``seconds`` and ``total_seconds`` under their
# names since) and that its pages read; the others (lr, β, validation, clipping) are read where present
METRIC_COLUMNS = ("epoch", "train_elbo", "train_reconstruction", "train_kl", "test_elbo", "test_reconstruction",
                  "test_kl", "epoch_seconds", "elapsed_seconds")
_VERSION_1_NAMES = {"seconds": "epoch_seconds", "total_seconds": "elapsed_seconds"}


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv as dicts of floats (epoch as int); the columns of vaelab 0.1 are renamed on the way."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
    except FileNotFoundError:
        return []
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})") from exc
    # a header without a column vaelab writes (a hand edit, a spreadsheet's export): until 2026-12-06 `report` ended
    # in a traceback where the page or a figure reads it
    named = {_VERSION_1_NAMES.get(name, name) for name in reader.fieldnames or ()}
    missing = [name for name in METRIC_COLUMNS if name not in named]
    if rows and missing:
        raise CheckpointError(f"{path} is malformed (its header lacks {', '.join(missing)}); "
                              + (ckpt.rewrite_fix(path.parent) or "restore the file from a copy"))
    out, elapsed = [], 0.0
    for line, row in enumerate(rows, start=2):                   # line 1 is the header
        columns = len(row) - (None in row)
        try:
            if None in row or None in row.values():              # DictReader's rest key and rest value
                count = columns + len(row.get(None, [])) - sum(v is None for v in row.values())
                raise ValueError(f"{plural(count, 'value')} where the header names {plural(columns, 'column')}")
            values = {k: (int(v) if k == "epoch" else float(v) if v != "" else math.nan) for k, v in row.items()}
        except ValueError as exc:
            raise CheckpointError(f"{path}, line {line}, is malformed ({exc}); "
                                  + (ckpt.rewrite_fix(path.parent) or "restore the file from a copy")) from exc
        if "total_seconds" in values:        # version 1 columns
            elapsed += values.pop("total_seconds")
            values["epoch_seconds"], values["elapsed_seconds"] = values.pop("seconds"), elapsed
        out.append(values)
    return out


def read_evaluations(run_dir: Path, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The evaluation records in the run (eval*.json, and a record written under a name of the user's choosing:
    `evaluate RUN --out RUN/best.json`, until 2026-12-05 shown nowhere; vaelab 0.1 wrote eval.json), each with its
    file name and ``stale``: True where the weights it measured (``weights_sha256`` of the file named by
    ``weights``) are no longer that file's, False where they still are, None where the record does not say
    (vaelab 0.1); a stale record made from the run of another directory has that directory in ``elsewhere``.

    A file named eval*.json that does not parse as vaelab's record (not JSON, or a hand-written {"nll": 85.3}) is
    skipped with a one-line note appended to ``notes``, naming the file and what is wrong; other JSON files that
    are not records (the user's own) are passed over without one."""
    records, digests, here = [], {}, str(run_dir.resolve())
    for path in sorted(run_dir.glob("*.json")):
        if path.name == ckpt.CONFIG:
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8-sig"))        # (a BOM: a record edited by hand)
            problem = _record_problem(record)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            problem = f"not readable JSON ({type(exc).__name__})"
        if problem is not None:
            if notes is not None and path.name.startswith("eval"):
                notes.append(f"{path}: not a vaelab evaluation record ({problem}); skipped")
            continue
        record["file"] = path.name
        record.setdefault("precision", "fp32")          # records written before bf16 evaluation
        weights = record.get("weights", ckpt.WEIGHTS)
        if not isinstance(record.get("weights_sha256"), str) or not isinstance(weights, str) or "/" in weights:
            record["stale"] = None
        else:
            if weights not in digests:
                try:
                    digests[weights] = file_sha256(run_dir / weights)
                except OSError:
                    digests[weights] = None             # the weights it measured are gone
            record["stale"] = digests[weights] != record["weights_sha256"]
            # a record of another directory's run (`evaluate A --out B/eval.json`, a copied file) says whose weights it
            # measured; a run moved or copied with its records measured its own, and is stale only if it trained on
            measured = record.get("run")
            if record["stale"] and isinstance(measured, str) and measured != here:
                record["elsewhere"] = measured
        records.append(record)
    return records


def digits_label(record: dict) -> str:
    """Which digits an evaluation record measured, counted: '10000 test digits', '1 validation digit'."""
    return plural(record["n_examples"], f"{record.get('split', 'test')} digit")


def estimator_label(record: dict) -> str:
    """"IWAE-5000", with the decoder's precision where it was not float32."""
    precision = record["precision"]
    return f"IWAE-{record['k']}" + ("" if precision == "fp32" else f" ({precision} decoder products)")


def per_digit(run_dir: Path, record: dict, columns: Sequence[str] = ("iwae",)) -> dict[str, np.ndarray] | None:
    """The per-digit values saved beside an evaluation record, by column name (digit, label, elbo, iwae, …); None
    where there are none (vaelab 0.1 wrote none) or the file is damaged: unreadable, without the ``columns`` its
    caller reads, or with another count of rows than the record's digits (until 2026-12-06 a row too many, or a
    header without iwae, ended `compare` in a traceback)."""
    name = record.get("per_digit")
    if not name:
        return None
    try:
        with open(run_dir / name, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        header, body = rows[0], np.array(rows[1:], dtype=np.float64).reshape(len(rows) - 1, len(rows[0]))
    except (OSError, IndexError, ValueError, UnicodeDecodeError):
        return None
    if not set(columns) <= set(header) or len(body) != record.get("n_examples"):
        return None
    return {column: body[:, i] for i, column in enumerate(header)}


def read_run(path: str | Path) -> RunInfo:
    path = ckpt.require_run_dir(path)
    config = ckpt.load_config(path)
    metrics = read_metrics(path / ckpt.METRICS)
    meta = ckpt.read_metadata(path / ckpt.STATE) if (path / ckpt.STATE).exists() else {}
    holder = ckpt.lock_holder(path)
    done = int(meta.get("epoch", len(metrics)))
    if holder is not None:
        status = "training now"
    elif not meta and (path / ckpt.WEIGHTS).exists():       # weights copied without the training state
        status = "finished" if done >= config.train.epochs else "weights only"
    elif not meta:
        status = "not started"
    elif not meta.get("step") and pruned_after(path) == done:       # trained on after it by hand: not pruned now
        status = "pruned"
    elif (diverged := divergence(path, meta)) is not None:
        status = "diverged"
    elif done >= config.train.epochs and not meta.get("step"):
        status = "finished"
    elif not meta.get("step") and stops_early(config, done, int(meta.get("best_epoch", 0))):
        status = "stopped early"
    else:
        status = "interrupted"
    notes: list[str] = []
    return RunInfo(path, config, metrics, status, done, holder, meta, read_evaluations(path, notes), notes,
                   diverged=diverged if status == "diverged" else None)


def pruned_after(path: Path) -> int | None:
    """The epoch after which a sweep's pruner stopped the run in ``path`` (ckpt.PRUNED), or None."""
    try:
        epoch = json.loads((path / ckpt.PRUNED).read_text(encoding="utf-8")).get("epoch")
    except (OSError, ValueError, AttributeError):
        return None
    return epoch if isinstance(epoch, int) else None


TARGET_FIELDS = ("train.epochs", "train.early_stopping", "data.data_dir")


def uncheckpointed_changes(run: RunInfo) -> list[str]:
    """The fields of config.json that differ from the copy in the run's last checkpoint ("train.lr: 0.001 → 3.0"):
    set by a resume that wrote no checkpoint (it diverged or was stopped before one), or while one trains now. The
    weights were trained with the checkpoint's values; the next resume trains with config.json's (until 2026-12-06
    the report and `compare` showed config.json's train.lr 3.0 of a run whose every step used 0.001)."""
    copy = run.meta.get("config")
    if not isinstance(copy, dict):
        return []
    try:
        changes = RunConfig.from_dict(copy, "the checkpoint's copy of config.json").differences(run.config)
    except CheckpointError:
        return []
    # how long to train, when to stop and where the data lives say nothing of the steps taken so far
    return [change for change in changes if change.split(":")[0] not in TARGET_FIELDS]


def divergence(path: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """What RUN/diverged.json says (ckpt.DIVERGED): the checkpoint training diverged from, ``epoch`` and ``step``,
    and ``what`` ("the ELBO became … at epoch 2, step 2"), where it is the checkpoint whose training state's
    metadata is ``meta``; None where there is none, it is not vaelab's, or it is of an earlier checkpoint."""
    try:
        marker = json.loads((path / ckpt.DIVERGED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not all(isinstance(marker.get(key), int) and not isinstance(marker[key], bool)
                                               for key in ("epoch", "step")) or not isinstance(marker.get("what"), str):
        return None
    return marker if (marker["epoch"], marker["step"]) == (int(meta.get("epoch", -1)), int(meta.get("step") or 0)) \
        else None


def distinct_labels(paths: Sequence[str | Path]) -> list[str]:
    """A label per run that tells it apart from the others: the shortest tail of its resolved path, in whole
    folders, that no other run shares (one-hour-60/h4 and s35/h4 for two runs named h4); the same folder given twice
    is told apart by its place in the list (h4 (2))."""
    parts = [Path(p).resolve().parts for p in paths]
    labels = []
    for mine in parts:
        depth = 1
        while depth < len(mine) and any(other[-depth:] == mine[-depth:] for other in parts if other != mine):
            depth += 1
        labels.append(str(Path(*mine[-depth:])))
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} ({seen[label]})"
    return labels


def _path_key(parts: Sequence[str]) -> list:
    """A path's sort key, folder by folder, the numbers in names taken as numbers (t2 before t10; until 2026-12-07
    the whole path as one text: out2/… and out10/… came before out/…, "out" ending a piece of text where "out/trials"
    went on)."""
    return [[(0, int(piece), "") if piece.isdecimal() else (1, 0, piece) for piece in re.split(r"(\d+)", part) if piece]
            for part in parts]


def runs_inside(directory: Path, take: str = "one of them", fewest: int = 1) -> str:
    """' but holds 3 runs (DIR/a …; vaelab runs DIR lists them): pass one of them' where ``fewest`` or more runs lie
    directly in ``directory`` (a folder of runs given where one run is taken: until 2026-12-07 the line said only that
    it was not a run, and to pass a directory written by `vaelab train`), the first in `vaelab runs`' order; else ''."""
    from vaelab.tables import shell_word

    try:
        runs = sorted((child for child in directory.iterdir() if ckpt.is_run(child)), key=lambda p: _path_key([p.name]))
    except OSError:                                 # not a directory, gone, or not ours to read
        return ""
    if not runs or len(runs) < fewest:
        return ""
    first = shell_word(runs[0])
    if len(runs) == 1:
        return f" but holds one: pass {first}"
    return f" but holds {len(runs)} runs ({first} …; vaelab runs {shell_word(directory)} lists them): pass {take}"


def find_runs(directory: str | Path) -> list[Path]:
    """Run directories (holding config.json) at or below ``directory``, sorted by path with the numbers in names
    taken as numbers (t2 before t10, as a person counts). Links to directories are followed (a folder of links to
    chosen runs, or to a folder of runs on another disk: until 2026-12-06 they were not, and `vaelab runs` of such a
    folder said it held none), as `find -L` does, and each directory is read once however many names lead to it: a
    run behind two names is listed once, under the one nearest the top (then first in the listing's order), and a
    link back up the tree ends there."""
    directory = Path(directory)
    if ckpt.is_run(directory):
        return [directory]

    def key(path: Path) -> list:
        return _path_key(path.relative_to(directory).parts)

    def is_directory(entry: os.DirEntry) -> bool:
        try:
            return entry.is_dir()                   # through a link
        except OSError:
            return False

    found: list[Path] = []
    seen: set[tuple[int, int]] = set()              # (device, inode) of each directory read
    level = [directory]
    while level:                                    # breadth first: the name nearest the top reaches a directory first
        below: list[Path] = []
        for folder in level:
            try:
                where = folder.stat()
                if (where.st_dev, where.st_ino) in seen:
                    continue
                seen.add((where.st_dev, where.st_ino))
                with os.scandir(folder) as listing:
                    entries = list(listing)
            except OSError:                         # gone, or not ours to read: as rglob, passed over
                continue
            if any(entry.name == ckpt.CONFIG for entry in entries):
                found.append(folder)
            below += [folder / entry.name for entry in entries if is_directory(entry)]
        level = sorted(below, key=key)
    return sorted(found, key=key)
