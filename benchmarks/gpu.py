"""The GPU check: vaelab's CUDA tests and its speed on a GPU, in one run of a few minutes (for a lent GPU machine).

    python benchmarks/gpu.py --out DIR [--data-dir MNIST] [--budget SECONDS]

Runs, each as the user would, through the CLI in its own process (`python -m vaelab …`), with a time limit:
tests/test_gpu.py (the CUDA paths against the CPU's numbers); the reference setting (`seed`) trained three epochs
with each engine and precision; `evaluate --k 5000` on all 10 000 test digits (fp32, `--compiled`, bf16); one epoch of
every preset (two of those that train compiled, the first holding the compilation) and two of burda-iwae-2 compiled;
a one-rank `torchrun` (NCCL). It writes DIR/gpu.json (machine,
every command with its exit status and seconds, the epochs' seconds from metrics.csv, the evaluations' records),
DIR/commands.log (their output) and DIR/pytest.log, after every step, so a run cut short keeps what it measured;
with --profile, last, DIR/profile.txt (where a training step's time goes).

The targets it judges are those the speed issues set for a GPU: 100 epochs of the reference setting in ≤ 20 s and
IWAE-5000 of the 10 000 test digits in ≤ 10 s (issue 4), burda-iwae-2 at ≥ 2 700 steps per second, its 3 280 epochs
in under an hour (issue 15). Projections (a whole schedule from one epoch) are labelled as such in the JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Check:
    def __init__(self, out: Path, budget: float):
        self.out, self.deadline, self.started = out, time.monotonic() + budget, time.monotonic()
        self.record: dict = {"machine": machine(), "steps": [], "targets": {}}
        self.log = open(out / "commands.log", "w")

    def run(self, name: str, args: list[str], limit: float, log: Path | None = None) -> dict:
        """``args`` in a child process, at most ``limit`` seconds and never past the budget's end."""
        left = self.deadline - time.monotonic()
        step = {"name": name, "command": " ".join(args)}
        if left < 10:
            step.update(status="skipped: the run's time budget was spent")
        else:
            started = time.perf_counter()
            sink = open(log, "w") if log else self.log
            print(f"$ {' '.join(args)}", file=sink, flush=True)
            try:
                done = subprocess.run(args, stdout=sink, stderr=subprocess.STDOUT, timeout=min(limit, left), cwd=ROOT)
                step.update(status=done.returncode)
            except subprocess.TimeoutExpired:
                step.update(status=f"stopped after {min(limit, left):.0f} s")
            step["seconds"] = round(time.perf_counter() - started, 2)
            if log:
                sink.close()
        print(f"{name}: {step['status']} ({step.get('seconds', 0)} s)", flush=True)
        self.record["steps"].append(step)
        self.save()
        return step

    def save(self) -> None:
        self.record["total_seconds"] = round(time.monotonic() - self.started, 1)
        (self.out / "gpu.json").write_text(json.dumps(self.record, indent=2) + "\n")


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def epochs(run: Path) -> list[float]:
    """The epochs' seconds (the steps alone, not the per-epoch test ELBO) from a run's metrics.csv."""
    try:
        return [float(row["epoch_seconds"]) for row in csv.DictReader(open(run / "metrics.csv"))]
    except OSError:
        return []


def steps_per_epoch(run: Path) -> int | None:
    try:
        config = json.loads((run / "config.json").read_text())
    except OSError:
        return None
    count = (config["data"]["train_examples"] or 60000) - config["data"]["validation"]
    return math.ceil(count / config["train"]["batch_size"])


def profile_steps(out: Path, runs: Path, data: list[str], device: str, presets=("seed", "burda-iwae-2")) -> dict:
    """Where a training step's time goes: ``torch.profiler`` over one epoch of 3200 digits after a warm-up epoch in
    this process, per preset; the tables (by self device time, by self CPU time) go to DIR/profile.txt, the
    kernel launches per step and the device's busy time per step to the record."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from vaelab.cli import main as vaelab_main

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    found = {}
    with open(out / "profile.txt", "w") as text:
        for preset in presets:
            common = ["--preset", preset, "--epochs", "1", "--train-examples", "3200", "--test-examples", "200",
                      "--device", device, "--no-progress", *data]
            vaelab_main(["train", "--out", str(runs / f"profile-warm-{preset}"), *common])
            with profile(activities=activities) as prof:
                vaelab_main(["train", "--out", str(runs / f"profile-{preset}"), *common])
            steps = steps_per_epoch(runs / f"profile-{preset}")
            events = prof.key_averages()
            launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC",
                                                                 "cuLaunchKernel"))
            # the kernels' own time: an operator's row repeats its kernels' device time, so only the device's
            # events count (as the table's "Self CUDA time total"; summing every row counted it twice)
            busy = sum(e.self_device_time_total for e in events
                       if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e3  # ms
            found[preset] = {"steps": steps, "epoch_seconds": epochs(runs / f"profile-{preset}"),
                             "kernel_launches_per_step": round(launches / steps, 1) if device == "cuda" else None,
                             "device_busy_ms_per_step": round(busy / steps, 3) if device == "cuda" else None,
                             "note": "over the epoch's steps and its per-epoch test ELBO of 200 digits"}
            print(f"{preset}: {found[preset]}", file=text)
            for key in (("self_device_time_total",) if device == "cuda" else ()) + ("self_cpu_time_total",):
                print(events.table(sort_by=key, row_limit=18, max_name_column_width=60), file=text)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where gpu.json and the logs go")
    parser.add_argument("--runs", type=Path, help="a new folder for the run directories (default: a fresh temporary "
                        "one, so that the script can run again)")
    parser.add_argument("--data-dir", type=Path, help="MNIST (a folder with the cache, IDX files or mnist.pkl.gz)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole check")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--profile", action="store_true", help="last, torch.profiler over a training epoch of 3200 "
                        "digits of seed and burda-iwae-2 (DIR/profile.txt)")
    parser.add_argument("--skip-engines", action="store_true", help="the reference setting with the default engine "
                        "in fp32 only (not compiled, not bf16)")
    parser.add_argument("--presets", nargs="*", help="presets trained one epoch each, two where the preset trains "
                        "compiled (default: all)")
    parser.add_argument("--also-autograd", action="store_true", help="each compiled preset also two epochs with "
                        "--engine autograd, to compare the engines")
    parser.add_argument("--evaluate", nargs="*", help="presets whose run of this check is evaluated with --k 5000 on "
                        "all test digits (default: cpu-hour, where it is trained)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script itself")
    parser.add_argument("--train-examples", type=int, help="fewer training digits (only to try the script itself)")
    parser.add_argument("--eval-examples", type=int, help="fewer test digits, for the evaluations and the trainings' "
                        "test ELBO (only to try the script itself)")
    args = parser.parse_args()
    from vaelab.presets import PRESETS

    trained = [n for n in (PRESETS if args.presets is None else args.presets) if n != "seed"]
    unknown = [n for n in args.presets or [] if n not in PRESETS]
    if unknown:                                                     # before anything runs, not after minutes of it
        parser.error(f"unknown preset {', '.join(unknown)}; choose among {', '.join(PRESETS)}")
    if args.evaluate is None:
        args.evaluate = ["cpu-hour"] if "cpu-hour" in trained else []
    untrained = [n for n in args.evaluate if n not in trained]
    if untrained:
        parser.error(f"--evaluate {' '.join(untrained)}: only presets this run trains can be evaluated "
                     f"({' '.join(trained) or 'none: see --presets'})")
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.budget)
    vaelab = [sys.executable, "-m", "vaelab"]
    data = ["--data-dir", str(args.data_dir)] if args.data_dir else []
    quiet = ["--no-progress", "--device", args.device]
    digits = ["--test-examples", str(args.eval_examples)] if args.eval_examples else []
    # the trainings' per-epoch test ELBO on those fewer test digits too
    subset = (["--train-examples", str(args.train_examples)] if args.train_examples else []) + digits
    runs = args.runs or Path(tempfile.mkdtemp(prefix="vaelab-gpu-"))
    check.record["runs"] = str(runs)

    check.run("data", [*vaelab, "data", *data], 120)
    if not args.skip_tests:
        step = check.run("tests/test_gpu.py", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                               "tests/test_gpu.py"], 240, log=args.out / "pytest.log")
        tail = (args.out / "pytest.log").read_text().strip().splitlines()[-1:] if (args.out / "pytest.log").exists() else []
        step["summary"] = tail[0] if tail else ""
        check.save()

    # the reference setting: three epochs per engine and precision (the first of `compiled` includes compiling)
    seed_runs = {}
    variants = (("default engine fp32", []), ("compiled fp32", ["--engine", "compiled"]),
                ("default engine bf16", ["--precision", "bf16"]))
    for label, extra in variants[:1] if args.skip_engines else variants:
        run = runs / f"seed-{label.replace(' ', '-')}"
        step = check.run(f"train seed, {label}", [*vaelab, "train", "--out", str(run), "--epochs", "3", *quiet, *data, *subset,
                                                  *extra], 150)
        step.update(epoch_seconds=epochs(run), steps_per_epoch=steps_per_epoch(run))
        seed_runs[label] = step
        check.save()
    fused = seed_runs["default engine fp32"]
    if len(fused.get("epoch_seconds", [])) >= 2 and fused.get("steps_per_epoch") == 938:   # all 60 000 digits
        best = min(fused["epoch_seconds"][1:])
        check.record["targets"]["seed: 100 epochs <= 20 s (issue 4)"] = {
            "projected_seconds_from_epochs_2_3": round(100 * best, 1), "met": 100 * best <= 20}

    evaluations = {}
    model = runs / "seed-default-engine-fp32"
    variants = (("fp32", []), ("compiled", ["--compiled"]), ("bf16", ["--precision", "bf16"]))
    for label, extra in variants[:1] if args.skip_engines else variants:
        out = runs / f"eval-seed-{label}.json"
        step = check.run(f"evaluate seed --k 5000, all test digits, {label}",
                         [*vaelab, "evaluate", str(model), "--k", "5000", "--out", str(out), "--overwrite", *quiet,
                          *digits, *extra], 120)
        if out.exists():
            record = json.loads(out.read_text())
            step.update({k: record.get(k) for k in ("nll", "nll_stderr", "n_examples", "k")},
                        record_seconds=record.get("seconds"))     # the evaluation itself, without starting up
        evaluations[label] = step
        check.save()
    done = {k: e["record_seconds"] for k, e in evaluations.items() if e.get("record_seconds") and e["n_examples"] == 10000}
    if done:
        check.record["targets"]["IWAE-5000 of 10 000 digits <= 10 s (issue 4)"] = {
            "seconds": done, "met": min(done.values()) <= 10}

    from vaelab.config import RunConfig
    from vaelab.presets import apply_preset

    # One epoch of each preset; two where the preset trains compiled (its first epoch holds torch.compile's build,
    # tens of seconds on a GPU), and the projection of its whole schedule from the last epoch alone. With
    # --also-autograd a compiled preset trains two epochs with --engine autograd too, side by side.
    for name in trained:
        preset = apply_preset(RunConfig(), name)
        count = 2 if preset.train.engine == "compiled" else 1
        variants = [("", [])]
        if preset.train.engine == "compiled" and args.also_autograd:
            variants.append((" autograd", ["--engine", "autograd"]))
        for suffix, extra in variants:
            run = runs / (name + suffix.replace(" ", "-"))
            step = check.run(f"train {name}{suffix}, {('one epoch', 'two epochs')[count - 1]}", [
                *vaelab, "train", "--preset", name, "--out", str(run), "--epochs", str(count), *quiet, *data, *subset,
                *extra], 90 * count)
            seconds, steps = epochs(run), steps_per_epoch(run)
            if seconds and steps:
                full = preset.train.epochs                                  # the preset's whole schedule
                step.update(epoch_seconds=seconds, steps_per_epoch=steps, schedule_epochs=full,
                            steps_per_second=round(steps / seconds[-1], 1), projected_from_epoch=len(seconds),
                            projected_schedule_hours=round(full * seconds[-1] / 3600, 2))
            check.save()
    if not args.skip_engines:
        run = runs / "burda-iwae-2-compiled"
        step = check.run("train burda-iwae-2, compiled, two epochs", [
            *vaelab, "train", "--preset", "burda-iwae-2", "--engine", "compiled", "--out", str(run), "--epochs", "2",
            *quiet, *data, *subset], 150)
        step.update(epoch_seconds=epochs(run), steps_per_epoch=steps_per_epoch(run))
    rates = [s.get("steps_per_epoch", 0) / min(s["epoch_seconds"][-1:] or [math.inf])
             for s in check.record["steps"] if "burda-iwae-2" in s["name"] and s.get("epoch_seconds")]
    if rates:
        check.record["targets"]["burda-iwae-2 >= 2700 steps per second (issue 15)"] = {
            "steps_per_second": [round(r, 1) for r in rates], "met": max(rates) >= 2700,
            "projected_schedule_hours": round(3280 * 3000 / max(rates) / 3600, 2)}
    for name in args.evaluate:
        out = runs / f"eval-{name}.json"
        step = check.run(f"evaluate {name} (one epoch) --k 5000, all test digits", [
            *vaelab, "evaluate", str(runs / name), "--k", "5000", "--out", str(out), "--overwrite", *quiet, *digits],
            120)
        if out.exists():
            record = json.loads(out.read_text())
            step.update({k: record.get(k) for k in ("nll", "n_examples", "k")}, record_seconds=record.get("seconds"))
            check.save()
    if not args.skip_engines:
        check.run("torchrun, one rank (NCCL), seed, one epoch of 6400 digits", [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "vaelab", "train",
            "--out", str(runs / "torchrun"), "--epochs", "1", "--train-examples", "6400", *quiet, *data], 90)
    if args.profile and check.deadline - time.monotonic() > 60:
        check.record["profile"] = profile_steps(args.out, runs, data, args.device)
    check.save()
    print(json.dumps(check.record["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
