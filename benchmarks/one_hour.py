"""Choose the one-hour preset of issue 21 on the validation split, reproducibly: one command.

    python benchmarks/one_hour.py --out runs/one-hour [--budget-minutes 15] [--engine compiled] [--parallel 1]

1. Times one epoch of every candidate alone on this machine (2 threads, the second of two epochs, with the
   per-epoch validation and test ELBO that training computes), on the first 50 000 training digits.
2. Gives every candidate the same budget of those seconds: epochs = budget / seconds per epoch, so a slower
   model gets fewer epochs; its learning-rate schedule and warm-up span the epochs it gets.
3. Trains them one at a time on 2 threads, holding out the last 10 000 training digits. (``--parallel N`` trains
   N at a time on one thread each. The epochs were fixed in step 2, so sharing the cores changes how long this
   takes, not what is trained; on the 2-core Xeon it took longer: on 2026-11-29, two at a time, each candidate
   trained for 2.3–4.0 × its budget (h6, the last, 1.5 ×). One at a time on 2 threads, 2026-12-03: 0.97–1.12 ×.)
4. Evaluates each once on those 10 000 validation digits with IWAE-1000 (``vaelab evaluate --split validation``;
   the test set is never touched) and prints the table, best first, with the winner's command for a full hour.

Writes ``results/one-hour-<date>.json``. The candidates are data below; each is a preset and flags.

``--engine`` trains every candidate on that engine; without it each takes its preset's (h4's `vampprior-2` asks for
the compiled one, the others' `cpu-hour` for autograd). The choice of 2026-11-29 ran before any preset asked for
the compiled engine, so all seven trained on autograd; the budget is in seconds, so an engine that is faster for one
candidate than for another changes what it buys. A rerun goes on with the engine and budget of the first run in
``--out`` and refuses others (they would mix two timings in one table).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from run import save_result                                     # benchmarks/run.py, beside this file
from vaelab.config import RunConfig, TrainConfig
from vaelab.engines import ENGINE_CHOICES
from vaelab.presets import apply_preset
from vaelab.provenance import cpu_name, git_commit
from vaelab.resources import kernel_flags

COMMON = ["--validation", "10000", "--test-examples", "1000", "--no-progress"]

# name → (what it tries, the flags of `vaelab train`)
CANDIDATES: dict[str, tuple[str, list[str]]] = {
    "h0": ("cpu-hour as it is (the standard prior): the baseline", ["--preset", "cpu-hour"]),
    "h1": ("cpu-hour with the VampPrior, K = 100", ["--preset", "cpu-hour", "--prior", "vampprior",
                                                    "--prior-components", "100"]),
    "h2": ("cpu-hour's widths inferred top-down (a two-layer ladder), VampPrior K = 100",
           ["--preset", "cpu-hour", "--model", "hvae", "--inference", "top-down", "--prior", "vampprior",
            "--prior-components", "100"]),
    "h3": ("a three-layer ladder 64-32-16, blocks 300-150-75, VampPrior K = 100",
           ["--preset", "cpu-hour", "--model", "hvae", "--inference", "top-down", "--latent", "64", "32", "16",
            "--blocks", "300,300", "150,150", "75,75", "--prior", "vampprior", "--prior-components", "100"]),
    "h4": ("Tomczak & Welling's HVAE (gated 300, 40 + 40), VampPrior K = 100, cpu-hour's optimiser",
           ["--preset", "vampprior-2", "--batch-size", "128", "--lr", "1e-3", "--lr-schedule", "exponential",
            "--warmup", "10", "--prior-components", "100"]),
    "h5": ("cpu-hour with two IAF steps in each layer's q, VampPrior K = 100",
           ["--preset", "cpu-hour", "--flow", "iaf", "--flow-steps", "2", "--flow-width", "128", "--prior",
            "vampprior", "--prior-components", "100"]),
    "h6": ("cpu-hour with the VampPrior K = 100 trained on IWAE k = 4",
           ["--preset", "cpu-hour", "--prior", "vampprior", "--prior-components", "100", "--objective", "iwae",
            "--k", "4"]),
}


def vaelab(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vaelab", *args], capture_output=True, text=True, **kwargs)


def candidate_flags(name: str, engine: str | None) -> list[str]:
    """The flags of `vaelab train` for a candidate, on ``engine`` when one is given."""
    return [*CANDIDATES[name][1], *(["--engine", engine] if engine else [])]


def engine_for(name: str, engine: str | None) -> str:
    """The engine a candidate trains on: ``engine`` when one is given, else its preset's."""
    flags = CANDIDATES[name][1]
    return engine or apply_preset(RunConfig(), flags[flags.index("--preset") + 1]).train.engine


def epochs_for(budget_seconds: float, seconds_per_epoch: float) -> int:
    """A candidate's epochs: as many as the budget buys at its measured pace, at least one."""
    return max(1, math.floor(budget_seconds / seconds_per_epoch))


def started_with(run: Path) -> TrainConfig | None:
    """The training settings a run in ``--out`` was started with (its config.json, read as `vaelab` reads it), None
    where there is none."""
    path = run / "config.json"
    return RunConfig.from_dict(json.loads(path.read_text()), source=str(path)).train if path.exists() else None


def refuse(reason: str, fix: str | None) -> NoReturn:
    """One line on stderr naming what differs and the fix, exit status 2."""
    print(f"one_hour.py: {reason}: " + (f"rerun with {fix} to go on, or choose a new --out" if fix else
                                         "choose a new --out"), file=sys.stderr)
    raise SystemExit(2)


def check_earlier_work(out: Path, settings: dict, timings: dict[str, float]) -> None:
    """Refuse to go on in ``out`` with other settings than its first run's: those in its settings.json, and those
    its runs were started with (a folder from before settings.json has only these): the engine of each candidate's
    runs, and the epochs of each training run, which the budget and the candidate's timing fix."""
    first = json.loads((out / "settings.json").read_text()) if (out / "settings.json").exists() else settings
    for key, flag in (("budget_minutes", "--budget-minutes"), ("engine", "--engine")):
        if first.get(key) != settings[key]:
            then = as_given(flag, first.get(key))
            refuse(f"{out} was started with {then}, not {as_given(flag, settings[key])}", then)
    engine, budget = settings["engine"], settings["budget_minutes"] * 60
    runs = [(name, run, train) for name in CANDIDATES for run in (out / "timing" / name, out / name)
            if (train := started_with(run)) is not None]

    def fits(choice: str | None) -> bool:
        return all(engine_for(name, choice) == train.engine for name, _, train in runs)

    for name, run, train in runs:
        if engine_for(name, engine) != train.engine:
            fix = next((as_given("--engine", choice) for choice in (None, *ENGINE_CHOICES) if fits(choice)), None)
            refuse(f"{run} trained on engine {train.engine}, and {as_given('--engine', engine)} trains {name} on "
                   f"{engine_for(name, engine)}", fix)
        if run == out / name and name in timings and train.epochs != epochs_for(budget, timings[name]):
            refuse(f"{run} was started with {train.epochs} epochs, and "
                   f"{as_given('--budget-minutes', settings['budget_minutes'])} gives {name} "
                   f"{epochs_for(budget, timings[name])} at its {timings[name]:.2f} s an epoch",
                   "the --budget-minutes it was started with")


def seconds_per_epoch(name: str, flags: list[str], out: Path) -> float:
    """The second of two epochs alone on 2 threads: its steps and its per-epoch ELBOs (elapsed_seconds)."""
    run = out / "timing" / name
    done = vaelab("train", *flags, *COMMON, "--epochs", "2", "--threads", "2", "--out", str(run))
    if done.returncode:
        raise SystemExit(f"{name}: timing failed: {done.stderr.strip()}")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    return float(rows[1]["elapsed_seconds"]) - float(rows[0]["elapsed_seconds"])


# The names `vaelab evaluate RUN --split validation --k 1000` gives its record: log weights computed eagerly, or
# compiled (its default for a run of --engine compiled). Either is IWAE-1000 on all 10 000 validation digits.
VALIDATION_RECORDS = ("eval-validation-k1000-n10000-seed0.json", "eval-validation-k1000-n10000-seed0-compiled.json")


def validation_record(run: Path) -> Path | None:
    """The candidate's IWAE-1000 validation record, None before it is evaluated."""
    return next((run / name for name in VALIDATION_RECORDS if (run / name).exists()), None)


def train_and_validate(name: str, flags: list[str], epochs: int, out: Path, threads: int) -> dict:
    run = out / name
    started = time.perf_counter()
    trained = len(list(csv.DictReader(open(run / "metrics.csv")))) if (run / "metrics.csv").exists() else 0
    if not (run / "training_state.safetensors").exists():
        done = vaelab("train", *flags, *COMMON, "--epochs", str(epochs), "--threads", str(threads), "--out", str(run))
    elif trained < epochs:                                     # a rerun after a stop continues the candidate
        done = vaelab("train", "--out", str(run), "--resume", "--threads", str(threads))
    else:                                                      # trained in an earlier run of this script
        done = subprocess.CompletedProcess([], 0)
    if done.returncode:
        return {"name": name, "error": done.stderr.strip()}
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    if validation_record(run) is None:
        done = vaelab("evaluate", str(run), "--split", "validation", "--k", "1000", "--threads", str(threads),
                      "--no-progress")
        if done.returncode or validation_record(run) is None:
            return {"name": name, "error": done.stderr.strip() or f"no validation record in {run}"}
    result = json.loads(validation_record(run).read_text())
    return {"name": name, "epochs": epochs, "validation_nll": result["nll"], "validation_nll_stderr": result["nll_stderr"],
            "log_weights_compiled": bool(result.get("compiled")),
            "validation_elbo_last_epoch": float(rows[-1]["validation_elbo"]),
            "active_units": [layer["active_units"] for layer in result["layers"]],
            "training_seconds": float(rows[-1]["elapsed_seconds"]), "wall_seconds": time.perf_counter() - started}


def as_given(flag: str, value) -> str:
    """How a setting reads on the command line: ``--budget-minutes 15``, ``--engine compiled``, ``no --engine``."""
    if value is None:
        return f"no {flag}"
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the candidates' runs go")
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="training budget of each, in minutes of "
                        "2-thread training alone (default 15)")
    parser.add_argument("--parallel", type=int, default=1, help="candidates trained at once (default 1, on 2 "
                        "threads; more: one thread each)")
    parser.add_argument("--only", nargs="+", choices=list(CANDIDATES), help="a subset of the candidates")
    parser.add_argument("--engine", choices=ENGINE_CHOICES, help="train every candidate on this engine (default: "
                        "each on its preset's)")
    args = parser.parse_args(argv)
    names = args.only or list(CANDIDATES)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"budget_minutes": args.budget_minutes, "engine": args.engine}
    timings_file = args.out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    check_earlier_work(args.out, settings, timings)
    if not (args.out / "settings.json").exists():
        (args.out / "settings.json").write_text(json.dumps(settings, indent=2))
    for name in names:
        if name not in timings:
            timings[name] = seconds_per_epoch(name, candidate_flags(name, args.engine), args.out)
            timings_file.write_text(json.dumps(timings, indent=2))
            print(f"{name}: {timings[name]:.2f} s per epoch (50 000 digits, 2 threads)", flush=True)
    epochs = {name: epochs_for(args.budget_minutes * 60, timings[name]) for name in names}
    threads = 1 if args.parallel > 1 else 2
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda n: train_and_validate(n, candidate_flags(n, args.engine), epochs[n], args.out,
                                                             threads), names))
    for result in results:
        result.update(about=CANDIDATES[result["name"]][0], flags=candidate_flags(result["name"], args.engine),
                      seconds_per_epoch=timings[result["name"]])
    done = sorted((r for r in results if "error" not in r), key=lambda r: r["validation_nll"])
    print(f"\nbudget {args.budget_minutes:g} min of 2-thread training each; IWAE-1000 on the 10 000 validation digits")
    print(f"{'':3}{'candidate':10}{'s/epoch':>8}{'epochs':>8}{'val. NLL':>10}{'± s.e.':>8}{'val. ELBO':>11}  active  about")
    for rank, r in enumerate(done):
        print(f"{'*' if rank == 0 else ' ':3}{r['name']:10}{r['seconds_per_epoch']:8.2f}{r['epochs']:8d}"
              f"{r['validation_nll']:10.2f}{r['validation_nll_stderr']:8.2f}{r['validation_elbo_last_epoch']:11.2f}  "
              f"{'+'.join(map(str, r['active_units'])):6}  {r['about']}")
    for r in results:
        if "error" in r:
            print(f"   {r['name']}: failed: {r['error']}")
    if done:
        best = done[0]
        hour = math.floor(3600 / (best["seconds_per_epoch"] * 60_000 / 50_000))
        print(f"\nbest: {best['name']}; one hour on all 60 000 training digits ≈ {hour} epochs:\n  vaelab train "
              + " ".join(best["flags"]) + f" --validation 0 --epochs {hour}")
        print("each against it, paired digit by digit on the validation digits:\n  vaelab compare --split validation "
              + " ".join(str(args.out / r["name"]) for r in done))
    stamp = datetime.date.today().isoformat()
    save_result({"machine": {"cpu": cpu_name(), "flags": kernel_flags(),
                             "python": platform.python_version(), "commit": git_commit()},
                 "date": stamp, "budget_minutes": args.budget_minutes, "engine": args.engine, "results": results},
                f"one-hour-{stamp}")


if __name__ == "__main__":
    main()
