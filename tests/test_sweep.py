"""`vaelab sweep` (issue 23): the README's example spec with two workers, a kill -9 and a rerun that ends with
exactly the spec's trials, pruning, two sweeps on one directory, a study shared on a real PostgreSQL server,
bad specs, and the report page."""

from __future__ import annotations

import contextlib
import errno
import functools
import html
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import needs_compiler, one_line, run
from vaelab import checkpoint as ckpt

optuna = pytest.importorskip("optuna", reason="Optuna is the sweep's optional dependency (pip install 'vaelab[sweep]')")

EXAMPLE = """\
preset = "seed"
trials = 4
objective = "validation-nll"        # or "validation-elbo"
k = 100                            # IWAE-K for validation-nll
[fixed]
epochs = 2
train_examples = 2000
validation = 500
test_examples = 100
[search]
lr = { low = 1e-4, high = 3e-3, log = true }
hidden = [[64], [128]]
activation = ["relu", "tanh"]
"""


def sweep_cli(spec: Path, out: Path, *flags, data_dir: Path, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, VAELAB_DATA=str(data_dir), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "vaelab", "sweep", str(spec), "--out", str(out), *map(str, flags)],
                            env=env, **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True,
                                        "start_new_session": True, **kwargs})


def trial_states(out: Path) -> list[tuple[int, str, int | None, bool]]:
    """(number, state, slot, surplus) of every trial in the sweep's SQLite study."""
    with sqlite3.connect(out / "study.db") as db:
        rows = db.execute("select trial_id, number, state from trials").fetchall()
        attrs = db.execute("select trial_id, key, value_json from trial_user_attributes").fetchall()
    user = {}
    for trial_id, key, value in attrs:
        user.setdefault(trial_id, {})[key] = json.loads(value)
    return [(number, state, user.get(trial_id, {}).get("slot"), bool(user.get(trial_id, {}).get("surplus")))
            for trial_id, number, state in rows]


def finished_slots(out: Path) -> list[int]:
    return sorted(slot for _, state, slot, surplus in trial_states(out) if state in ("COMPLETE", "PRUNED") and not surplus)


@pytest.fixture(scope="module")
def example(tmp_path_factory, data_dir):
    """The README's example spec as written, run to completion with two workers."""
    root = tmp_path_factory.mktemp("sweep")
    spec = root / "example.toml"
    spec.write_text(EXAMPLE)
    process = sweep_cli(spec, root / "out", "--workers", "2", data_dir=data_dir)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return root, out


@pytest.mark.slow      # 8 s on 2 cores of a Zen 4 (2026-12-07)
def test_the_example_spec_runs_with_two_workers(example):
    root, printed = example
    out = root / "out"
    assert finished_slots(out) == [0, 1, 2, 3]
    assert "2 workers × 1 thread" in printed and printed.count("*  ") == 1 and "vaelab evaluate runs/best --k 5000" in printed
    for slot in range(4):
        run = out / "trials" / f"{slot:04d}"
        config = json.loads((run / ckpt.CONFIG).read_text())
        assert config["data"]["validation"] == 500 and config["data"]["train_examples"] == 2000
        records = sorted(p.name for p in run.glob("eval*.json"))
        # the objective on the validation split only: the test set is never evaluated by a sweep
        assert all(name.startswith("eval-validation-") for name in records)
    params = [json.loads((out / "trials" / f"{s:04d}" / ckpt.CONFIG).read_text())["train"]["lr"] for s in range(4)]
    assert len(set(params)) == 4                                      # each slot drew its own parameters
    # a line for each trial as it ended (until 2026-12-05 nothing until the table at the end), counted in order
    ended = [line for line in printed.splitlines() if " trials done" in line]
    assert [line.split("; ")[-1].split(" of ")[0] for line in ended] == ["1", "2", "3", "4"], printed
    assert sorted(line.split()[1] for line in ended) == ["0000", "0001", "0002", "0003"]
    assert all(re.match(r"trial \d{4} (complete: validation-nll \d+\.\d{3} ± \d+\.\d{3}, 2 epochs in .+|pruned after "
                        r"\d epochs?); \d of 4 trials done, the best so far trial \d{4} \(\d+\.\d{3}\)$", line)
               for line in ended[1:]), ended


@pytest.mark.slow      # its fixture, the example sweep: 8 s on 2 cores of a Zen 4 (2026-12-07)
def test_trials_are_ordinary_runs(example, capsys):
    import vaelab
    from vaelab.cli import main

    root, _ = example
    assert main(["runs", str(root / "out" / "trials")]) == 0
    listing = capsys.readouterr().out
    assert all(f"{slot:04d}" in listing for slot in range(4)) and "validation" in listing
    run = vaelab.load_run(root / "out" / "trials" / "0000")
    assert run.status == "finished" and run.evaluations[0]["split"] == "validation"


@pytest.mark.slow      # 38 s on 2 cores of a Zen 4 (2026-12-07)
def test_on_a_terminal_a_bar_shows_the_trials_done_and_the_best_so_far(tmp_path, data_dir):
    """stderr a terminal: a bar of the trials done of the spec's, with the best objective so far and the epoch each
    trial under way has reached, above which each trial's line is printed as it ends; --no-progress: no bar."""
    import fcntl
    import pty
    import struct
    import termios

    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE.replace("trials = 4", "trials = 2").replace("epochs = 2", "epochs = 120")
                    .replace("validation-nll", "validation-elbo").replace("[search]", "hidden = [16]\n[search]")
                    .replace("hidden = [[64], [128]]\n", ""))
    for flags, bar in (((), True), (("--no-progress",), False)):
        main_fd, terminal = pty.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))    # 160 columns
        os.set_blocking(main_fd, False)
        process = sweep_cli(spec, tmp_path / f"out{bar}", *flags, data_dir=data_dir, stderr=terminal)
        os.close(terminal)
        shown = b""
        while process.poll() is None:
            time.sleep(0.05)
            with contextlib.suppress(BlockingIOError, OSError):
                shown += os.read(main_fd, 1 << 16)
        printed, _ = process.communicate(timeout=600)
        with contextlib.suppress(BlockingIOError, OSError):
            shown += os.read(main_fd, 1 << 16)
        os.close(main_fd)
        text = shown.decode(errors="replace")
        assert process.returncode == 0, text
        assert printed.count(" trials done") == 2 and "; 2 of 2 trials done, the best so far trial 000" in printed
        if bar:
            assert re.search(r"sweep outTrue: .*2/2 \[.*best -\d+\.\d{3}", text), text
            assert re.search(r"running 000\d epoch \d+", text), text
        else:
            assert "2/2" not in text and "running" not in text, text


@pytest.mark.slow      # 13 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_sweep_killed_after_its_first_trial_resumes_to_exactly_its_trials(tmp_path, data_dir):
    """kill -9 of the sweep and its workers once one trial has finished, then the same command again: the study
    ends with exactly four finished trials, one per slot, none duplicated, and the slot that was training holds a
    consistent run (it loads; its epochs are the spec's)."""
    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE.replace("epochs = 2", "epochs = 3").replace("validation-nll", "validation-elbo"))
    out = tmp_path / "out"
    semaphores = set(Path("/dev/shm").glob("sem.mp-*"))
    process = sweep_cli(spec, out, data_dir=data_dir)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "study.db").exists():
            try:
                if len(finished_slots(out)) >= 1 and any(s == "RUNNING" for _, s, _, _ in trial_states(out)):
                    break
            except sqlite3.Error:
                pass
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert 1 <= len(finished_slots(out)) < 4, "the sweep finished before it was killed"
    # the workers' named semaphores (their bars' lock) were left in /dev/shm for ever, one per kill
    assert set(Path("/dev/shm").glob("sem.mp-*")) <= semaphores
    before = len(finished_slots(out))
    rerun = sweep_cli(spec, out, data_dir=data_dir)
    printed, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert finished_slots(out) == [0, 1, 2, 3]
    # the trials that ended before are counted, not reported again
    ended = [line for line in printed.splitlines() if " trials done" in line]
    assert len(ended) == 4 - before and f"; {before + 1} of 4 trials done" in ended[0], printed
    for slot in range(4):
        run = out / "trials" / f"{slot:04d}"
        config, _ = ckpt.load_model(run)
        lines = (run / ckpt.METRICS).read_text().splitlines()
        assert config.train.epochs == 3 and len(lines) - 1 in (1, 2, 3)          # pruned ones stop early
    assert sum(line.rstrip().endswith(("complete", "pruned")) for line in printed.splitlines()) == 4     # the table


def _new_study(tmp_path, shared=False):
    """A sweep's study with its slots enqueued, as `vaelab sweep` leaves it before its workers start."""
    from vaelab import sweep

    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(EXAMPLE.replace("trials = 4", "trials = 2"))
    spec, out = sweep.load_spec(spec_path), tmp_path / "out"
    out.mkdir()
    study = sweep.open_study(spec, sweep.storage_url(out, None), "study")
    sweep.reconcile(study, spec, out, shared)
    return spec, out, study


def _state_of(study, number):
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number).state.name


def _waiting_slots(study):
    return sorted(t.user_attrs["slot"] for t in study.get_trials(deepcopy=False) if t.state.name == "WAITING")


def test_more_enqueued_entries_than_trials_are_refused_before_a_sweep_begins(tmp_path, data_dir):
    """Four enqueued entries and two trials: until 2026-12-05 the first two were trained and the others dropped
    without a word. Each entry is a trial of its own: refused in one line (exit 2), nothing written."""
    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE.replace("trials = 4", "trials = 2\nenqueue = [{ lr = 1e-3 }, { lr = 2e-3 }, { lr = 1e-4 }]"))
    for flags, more in (((), "trials = 3 in the spec"), (("--trials", "2"), "--trials 3")):
        process = sweep_cli(spec, tmp_path / "out", *flags, data_dir=data_dir)
        _, err = process.communicate(timeout=300)
        assert process.returncode == 2 and err == (
            f"vaelab sweep: error: sweep spec: enqueue has 3 entries and the sweep 2 trials: each entry is a trial of "
            f"its own, the first slots; give {more} or more, or fewer entries\n")
        assert not (tmp_path / "out").exists()


def test_slots_are_enqueued_a_few_ahead_of_the_workers_and_watched_by_what_changed(tmp_path, monkeypatch):
    """A sweep of 20 000 trials enqueued them all at its start (75 s), and each take read every waiting trial back
    (15 s a trial, growing with the trials); its watch read every slot's files at each change. Now the study holds
    at most WAITING_WINDOW waiting trials, enqueued in the order of the slots as the workers take them, and the
    watch reads the rows of the slots whose trials changed."""
    from vaelab import sweep

    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(EXAMPLE.replace("trials = 4", "trials = 1000"))
    spec, out = sweep.load_spec(spec_path), tmp_path / "out"
    out.mkdir()
    study = sweep.open_study(spec, sweep.storage_url(out, None), "study")
    assert sweep.reconcile(study, spec, out) is True                     # slots are left for later
    assert _waiting_slots(study) == list(range(sweep.WAITING_WINDOW))
    watch = sweep.Watch(study, spec, out, log=lambda line: None, progress=False)
    read: list = []
    real = sweep.summarize
    monkeypatch.setattr(sweep, "summarize", lambda *args: read.append(list(args[3])) or real(*args))
    watch.poll()
    assert read == [list(range(sweep.WAITING_WINDOW))]                 # the first look: every slot with a trial
    watch.poll()
    assert len(read) == 1                                                # nothing changed: nothing read
    taken = sweep._take(study, out)
    watch.poll()
    assert read[-1] == [taken.user_attrs["slot"]] and watch.running == [taken.user_attrs["slot"]]
    assert sweep.reconcile(study, spec, out) is True
    assert _waiting_slots(study) == list(range(1, sweep.WAITING_WINDOW + 1))   # the next slot, in order
    small = tmp_path / "small.toml"
    small.write_text(EXAMPLE.replace("trials = 4", "trials = 3"))
    spec, few = sweep.load_spec(small), tmp_path / "few"
    few.mkdir()
    study = sweep.open_study(spec, sweep.storage_url(few, None), "study")
    assert sweep.reconcile(study, spec, few) is False and _waiting_slots(study) == [0, 1, 2]


def test_a_grid_is_made_once_a_process_not_at_every_take(tmp_path, monkeypatch):
    """reconcile, called before every take, made the grid's points each time (0.44 s a take for 100 000 points and
    3000 trials on a Zen 1); now the spec makes them once, and the slots take them in order."""
    from vaelab import sweep

    path = tmp_path / "spec.toml"
    path.write_text('preset = "seed"\ntrials = 30\nsampler = "grid"\n[fixed]\nepochs = 1\nvalidation = 100\n'
                    '[search]\nseed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\nlr = [1e-3, 2e-3, 3e-3]\n')
    spec, out = sweep.load_spec(path), tmp_path / "out"
    out.mkdir()
    made, real = [], sweep.grid_points
    monkeypatch.setattr(sweep, "grid_points", lambda *args: made.append(args[1]) or real(*args))
    study = sweep.open_study(spec, sweep.storage_url(out, None), "study")
    for _ in range(3):
        assert sweep.reconcile(study, spec, out) is True
        sweep._take(study, out)
    assert made == [30]
    enqueued = {t.user_attrs["slot"]: t.system_attrs["fixed_params"] for t in study.get_trials(deepcopy=False)}
    assert [enqueued[slot] for slot in range(sweep.WAITING_WINDOW + 2)] == real(spec, 30)[:sweep.WAITING_WINDOW + 2]


@pytest.mark.slow      # 10 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_sweep_of_more_trials_than_wait_at_once_trains_them_all(tmp_path, data_dir):
    from vaelab import sweep

    printed = tiny_sweep(tmp_path, data_dir, f"trials = {sweep.WAITING_WINDOW + 3}\n", "lr = [1e-3, 2e-3]\n")
    assert finished_slots(tmp_path / "out") == list(range(sweep.WAITING_WINDOW + 3)), printed


@pytest.mark.slow      # 15 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_worker_killed_alone_ends_the_sweep_with_its_reason_and_the_same_command_goes_on(tmp_path, data_dir):
    """A worker killed by itself (the kernel's out-of-memory killer picks the largest process: a trial's) left the
    sweep ending with exit status 0 and its trial shown "running", as if the sweep were done. Now the command ends with
    one line naming the worker, how it ended and its log's last line (exit 1); the same command again finishes."""
    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE.replace("trials = 4", "trials = 2").replace("epochs = 2", "epochs = 40")
                    .replace("validation-nll", "validation-elbo").replace("[search]", "hidden = [16]\n[search]")
                    .replace("hidden = [[64], [128]]\n", ""))
    out = tmp_path / "out"
    process = sweep_cli(spec, out, data_dir=data_dir)
    deadline = time.monotonic() + 300
    while not list(out.glob("trials/*/metrics.csv")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)

    def children(pid: int) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and b"spawn_main" in cmdline:
                found.append(int(stat.parent.name))
        return found

    workers = children(process.pid)
    assert workers, "no worker found"
    os.kill(workers[0], signal.SIGKILL)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    line = err.strip().splitlines()[0]
    assert line.startswith(f"vaelab sweep: error: worker {out}/workers/") and "ended by SIGKILL (the kernel's " \
        "out-of-memory killer sends it, or kill -9): " in line and "the same command again goes on" in line, err
    # and nothing after it: the resource tracker's warning of a semaphore the killed worker left (its bars' lock)
    assert len(err.strip().splitlines()) == 1, err
    rerun = sweep_cli(spec, out, data_dir=data_dir)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert finished_slots(out) == [0, 1]


# the test asks as a bare Optuna process would, outside Study.optimize (vaelab's own asks silence this)
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_trial_taken_by_a_worker_killed_before_it_wrote_its_pid_is_retried(tmp_path):
    """The window a kill -9 once hit on CI: a worker took a waiting trial and died before writing its host and pid;
    the rerun left that slot running for ever and ended with three of four trials. Now the next reconcile fails it
    (every worker of this directory writes its pid under the lock the reconcile holds) and enqueues its slot."""
    from vaelab import sweep

    spec, out, study = _new_study(tmp_path)
    assert _waiting_slots(study) == [0, 1]
    dead = study.ask()                                   # taken, then the process was killed
    sweep.reconcile(study, spec, out)
    assert _state_of(study, dead.number) == "FAIL" and _waiting_slots(study) == [0, 1]
    live = sweep._take(study, out)                       # a worker of this process: host and pid written
    assert live.user_attrs["pid"] == os.getpid()
    sweep.reconcile(study, spec, out)
    assert _state_of(study, live.number) == "RUNNING"    # a live trial is never failed
    assert len(_waiting_slots(study)) == 1


def test_a_stopped_trial_is_not_counted_done(tmp_path):
    """A trial stopped by a signal or a full disk is retried by the same command: until 2026-12-05 the watch's line
    counted it among the trials done ("trial 0001 stopped: …; 1 of 2 trials done")."""
    from optuna.trial import TrialState

    from vaelab import sweep

    spec, out, study = _new_study(tmp_path)
    lines: list[str] = []
    watch = sweep.Watch(study, spec, out, log=lines.append, progress=False)
    trial = sweep._take(study, out)
    trial.set_user_attr("stopped", "interrupted by SIGTERM")
    study.tell(trial, state=TrialState.FAIL)
    watch.poll()
    assert lines == [f"trial {trial.user_attrs['slot']:04d} stopped: interrupted by SIGTERM; 0 of 2 trials done"]
    assert watch.done() == 0


def test_a_trial_whose_process_is_gone_is_shown_stopped_not_running(tmp_path):
    """A sweep killed with kill -9 (or a worker the out-of-memory killer took) leaves its trials running in the study
    until the next sweep looks: until 2026-12-05 its page and table said "running" (and counted them so) when
    nothing ran. Now such a trial, whose process on this machine is gone, is "stopped" with the reason."""
    import socket

    from vaelab import sweep

    spec, out, study = _new_study(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live, dead = sweep._take(study, out), sweep._take(study, out)
    dead.set_user_attr("pid", gone.pid)
    assert dead.user_attrs["host"] == socket.gethostname()
    rows = {row["slot"]: row for row in sweep.summarize(study, spec, out)["rows"]}
    assert rows[live.user_attrs["slot"]]["state"] == "running"
    assert rows[dead.user_attrs["slot"]]["state"] == "stopped" and rows[dead.user_attrs["slot"]]["stopped"] == (
        "its process ended without telling the study (kill -9, the out-of-memory killer, or a stop signal as it "
        "took the trial); the same sweep command again retries it")


# the test asks as a bare Optuna process would, outside Study.optimize (vaelab's own asks silence this)
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_on_a_shared_storage_a_trial_without_pid_waits_for_the_grace_period(tmp_path, monkeypatch):
    """Workers elsewhere (another --out on the same PostgreSQL study) take trials under their own lock: a trial
    without a pid may be theirs, just taken, so it is failed only once older than the grace period."""
    from vaelab import sweep

    spec, out, study = _new_study(tmp_path, shared=True)
    taken = study.ask()
    sweep.reconcile(study, spec, out, shared=True)
    assert _state_of(study, taken.number) == "RUNNING"
    monkeypatch.setattr(sweep, "GRACE_SECONDS", 0.5)
    time.sleep(1.0)
    sweep.reconcile(study, spec, out, shared=True)
    assert _state_of(study, taken.number) == "FAIL" and _waiting_slots(study) == [0, 1]


@pytest.mark.slow      # 7 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_trial_elsewhere_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    """A trial of another machine (its pid cannot be looked up here) stays running while its heartbeat is written,
    and is failed and its slot enqueued again once the heartbeat has been silent for the grace period. (Optuna
    writes heartbeats only inside Study.optimize; vaelab's workers ask and tell, and write them themselves.)"""
    from vaelab import sweep

    monkeypatch.setattr(sweep, "HEARTBEAT_SECONDS", 0.2)
    monkeypatch.setattr(sweep, "GRACE_SECONDS", 2)               # SQLite's clock has whole seconds
    spec, out, study = _new_study(tmp_path)
    trial = sweep._take(study, out)
    trial.set_user_attr("host", "another-machine.invalid")
    with sweep.heartbeat(study, trial):
        time.sleep(3.5)
        sweep.reconcile(study, spec, out)
        assert _state_of(study, trial.number) == "RUNNING"
    time.sleep(3.5)
    sweep.reconcile(study, spec, out)
    assert _state_of(study, trial.number) == "FAIL" and _waiting_slots(study) == [0, 1]


@pytest.mark.slow      # 7 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_trial_is_not_pruned_after_its_last_epoch(tmp_path, data_dir):
    """The trial far below the others of the test below, in a sweep of 2 epochs: its warm-up ends with its training,
    so it completes and its validation NLL is taken (until 2026-12-07 it was pruned after its last epoch, its
    training spent and its objective, which may rank it where its validation ELBO did not, never evaluated)."""
    spec = tmp_path / "spec.toml"
    spec.write_text("""\
preset = "seed"
trials = 3
objective = "validation-nll"
k = 10
pruner_warmup = 1
enqueue = [{ lr = 3e-3 }, { lr = 3e-3 }, { lr = 3e-6 }]
[fixed]
epochs = 2
train_examples = 1000
validation = 300
test_examples = 50
hidden = [64]
[search]
lr = { low = 1e-6, high = 1e-2, log = true }
""")
    process = sweep_cli(spec, tmp_path / "out", data_dir=data_dir)
    printed, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    states = {slot: state for _, state, slot, surplus in trial_states(tmp_path / "out") if not surplus}
    assert states == {0: "COMPLETE", 1: "COMPLETE", 2: "COMPLETE"}, printed
    row = next(line.split() for line in printed.splitlines() if line.split()[:1] == ["0002"])
    assert row[-1] == "complete" and float(row[2]) > 400, row     # its validation NLL, far above the others'


@pytest.mark.slow      # 24 s on 2 cores of a Zen 4 (2026-12-07)
@pytest.mark.parametrize("objective", ["validation-elbo", "validation-nll"])
def test_pruning_stops_a_trial_far_below_the_others(objective, tmp_path, data_dir):
    """Two enqueued trials that learn, then one whose learning rate is 1000 times too small: its validation ELBO
    is far below theirs at every epoch, and the median pruner stops it after its warm-up; its run is kept. Its row
    shows that last validation ELBO only where the objective is the ELBO (it showed −212 as a validation NLL)."""
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""\
preset = "seed"
trials = 3
objective = "{objective}"
k = 10
pruner_warmup = 1
enqueue = [{{ lr = 3e-3 }}, {{ lr = 3e-3 }}, {{ lr = 3e-6 }}]
[fixed]
epochs = 5
train_examples = 1000
validation = 300
test_examples = 50
hidden = [64]
[search]
lr = {{ low = 1e-6, high = 1e-2, log = true }}
""")
    process = sweep_cli(spec, tmp_path / "out", data_dir=data_dir)
    printed, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    states = {slot: state for _, state, slot, surplus in trial_states(tmp_path / "out") if not surplus}
    assert states == {0: "COMPLETE", 1: "COMPLETE", 2: "PRUNED"}
    slow = tmp_path / "out" / "trials" / "0002"
    assert 2 <= len((slow / ckpt.METRICS).read_text().splitlines()) - 1 < 5 and (slow / ckpt.WEIGHTS).exists()
    row = next(line.split() for line in printed.splitlines() if line.split()[:1] == ["0002"])
    assert row[-1] == "pruned" and (float(row[2]) < -100 if objective == "validation-elbo" else row[2] == "—")
    # the run directory says so too (`runs` read it as interrupted); trained on by hand, it is no longer pruned
    from vaelab.runs import read_run

    pruned = read_run(slow)
    assert pruned.status == "pruned" and pruned.resumable
    from vaelab.report import _summary

    assert _summary(pruned, None, [])["status"].startswith(f"pruned by its sweep after epoch {pruned.epochs_done}: ")
    assert json.loads((slow / ckpt.PRUNED).read_text())["epoch"] == pruned.epochs_done
    (slow / ckpt.PRUNED).unlink()             # as a sweep before 2026-12-04 left it: the same command again marks it
    process = sweep_cli(spec, tmp_path / "out", data_dir=data_dir)
    assert process.communicate(timeout=600)[0] and process.returncode == 0
    assert read_run(slow).status == "pruned"
    assert read_run(tmp_path / "out" / "trials" / "0000").status == "finished"
    from vaelab.cli import main

    assert main(["train", "--out", str(slow), "--resume", "--data-dir", str(data_dir), "--no-progress"]) == 0
    assert read_run(slow).status == "finished"


@pytest.mark.slow      # 22 s on 2 cores of a Zen 4 (2026-12-07)
def test_two_sweeps_on_one_directory_share_the_study_and_never_a_run(tmp_path, data_dir):
    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE.replace("trials = 4", "trials = 5").replace("validation-nll", "validation-elbo"))
    first = sweep_cli(spec, tmp_path / "out", data_dir=data_dir)
    time.sleep(1.0)
    second = sweep_cli(spec, tmp_path / "out", data_dir=data_dir)
    for process in (first, second):
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    states = trial_states(tmp_path / "out")
    assert finished_slots(tmp_path / "out") == [0, 1, 2, 3, 4]
    owners = [slot for _, state, slot, surplus in states if not surplus and state in ("COMPLETE", "PRUNED", "RUNNING")]
    assert sorted(owners) == [0, 1, 2, 3, 4]                          # one trial per run directory


DEPTH = 'trials = 2\n[fixed]\nvalidation = 100\nmodel = "hvae"\n'


@pytest.mark.parametrize("text, words", [
    ('trials = 2\n[fixed]\nvalidation = 100\n[search]\nlrr = [1e-3]\n', ["unknown field 'lrr'", "lr"]),
    ('trials = 2\n[fixed]\nvalidation = 100\n[search]\nlr = { low = 1e-2, high = 1e-3 }\n',
     ["search.lr", "empty range"]),
    ('trials = 2\n[fixed]\nvalidation = 100\nepochs = "many"\n', ["fixed", "--epochs", "'many'"]),
    ('trials = 2\nbudget = 3\n[fixed]\nvalidation = 100\n', ["unknown key 'budget'"]),
    ('trials = 2\n[fixed]\nepochs = 1\n', ["fixed.validation", "validation split"]),
    ('trials = 2\n[fixed]\nvalidation = 100\n[search]\nactivation = ["relu", "swish"]\n', ["search.activation", "swish"]),
    ('trials = [\n', ["not valid TOML"]),
    # a range of decimals for a field of whole numbers drew k = 2.098, and every trial failed; a step an integer range
    # cannot take was cut to 1, one wider than the range gave every trial its low end
    ('trials = 2\n[fixed]\nvalidation = 100\n[search]\nk = { low = 1.0, high = 3.0 }\n',
     ["search.k", "the values inside the range are refused", "got '1.764'", "(low = 1, high = 3)"]),
    ('trials = 2\n[fixed]\nvalidation = 100\n[search]\nk = { low = 1, high = 3, step = 1.5 }\n',
     ["search.k", "step 1.5 in a range of whole numbers"]),
    ('trials = 2\n[fixed]\nvalidation = 100\n[search]\nlr = { low = 1e-4, high = 1e-3, step = 5e-3 }\n',
     ["search.lr", "step 0.005 is wider than the range 0.0001 … 0.001: every trial would take 0.0001"]),
    ('trials = 2\n[fixed]\nvalidation = 100\nsampler = "random"\n',
     ["fixed.sampler", "'sampler' is a key of the spec itself", "move it above the first [table] line"]),
    ('trials = 2\n[fixed]\nvalidation = 100\n[search]\nlr = [1e-3]\npruner = "none"\n',
     ["search.pruner", "'pruner' is a key of the spec itself"]),
    # a searched name whose options set several fields together
    (f'{DEPTH}[search.latent]\na = {{ latent = [4, 2] }}\n', ["search.latent", "a name that is not a field"]),
    (f'{DEPTH}[search.depth]\na = {{ latent = [4, 2] }}\nb = {{ latent = [4, 2, 2], blocks = [[8], [8], [8]] }}\n',
     ["search.depth.b", "sets blocks, latent where a sets latent", "the same fields"]),
    (f'{DEPTH}[search.depth]\na = {{ latent = [4, 2], blockz = [[8], [8]] }}\n',
     ["unknown field 'blockz' in search.depth"]),
    # depth searched as plain choices: the line named only the preset's "--latent 50" (until 2026-12-07)
    (f'{DEPTH}[search]\nlatent = [[4, 2], [4, 2, 2]]\nblocks = [[[8], [8]], [[8], [8], [8]]]\n',
     ["fixed: model hvae takes 2 to 64", "got --latent 50; latent is searched, but the fixed fields must make a",
      "[search.depth] with two = { latent = [8, 4], blocks = [[64], [32]] }"]),
    (f'{DEPTH}blocks = [[8], [8]]\n[search.depth]\na = {{ latent = [4, 2], blocks = [[8], [8]] }}\n',
     ["field 'blocks'", "is set twice"]),
    (f'{DEPTH}[search]\nlatent = [[4, 2]]\n[search.depth]\na = {{ latent = [4, 2], blocks = [[8], [8]] }}\n',
     ["field 'latent'", "is set twice"]),
    (f'{DEPTH}[search.depth]\na = {{ latent = [4, 2], blocks = [[8], [8]] }}\n'
     f'b = {{ latent = [4, 2, 2], blocks = [[8], [8]] }}\n', ["search.depth.b", "3 stochastic layers needs 3 blocks"]),
    (f'{DEPTH}[search.depth]\na = {{ latent = [4, 2], blocks = [[8], [8]] }}\nb = {{}}\n',
     ["search.depth.b", "an option sets one or more fields"]),
    (f'enqueue = [{{ depth = "c" }}]\n{DEPTH}[search.depth]\na = {{ latent = [4, 2], blocks = [[8], [8]] }}\n',
     ["enqueue[0].depth", '"c" is not one of its options: a']),
    (f'enqueue = [{{ depth = [4, 2] }}]\n{DEPTH}[search.depth]\na = {{ latent = [4, 2], blocks = [[8], [8]] }}\n',
     ["enqueue[0].depth", "[4, 2] is not one of its options: a"]),
    # an enqueued value its parameter cannot take: a choice it lacks was a failed trial that spent its slot on
    # Optuna's "ValueError: '5' not in ('0.001', '0.002')"; a value outside a range was trained as given
    ('enqueue = [{ lr = 5 }]\ntrials = 2\n[fixed]\nvalidation = 100\n[search]\nlr = [1e-3, 2e-3]\n',
     ["enqueue[0].lr", "5 is not one of its choices: 0.001, 0.002"]),
    ('enqueue = [{ hidden = [7] }]\ntrials = 2\n[fixed]\nvalidation = 100\n[search]\nhidden = [[64], [128]]\n',
     ["enqueue[0].hidden", "[7] is not one of its choices: [64], [128]"]),
    ('enqueue = [{ activation = true }]\ntrials = 2\n[fixed]\nvalidation = 100\n[search]\nactivation = ["relu"]\n',
     ["enqueue[0].activation", 'true is not one of its choices: "relu"']),
    ('enqueue = [{ lr = 0.5 }]\ntrials = 2\n[fixed]\nvalidation = 100\n[search]\nlr = { low = 1e-4, high = 1e-3 }\n',
     ["enqueue[0].lr", "0.5 is outside the searched range 0.0001 … 0.001", "widen the range"]),
    ('enqueue = [{ k = 2.5 }]\ntrials = 2\n[fixed]\nvalidation = 100\n[search]\nk = { low = 1, high = 5 }\n',
     ["enqueue[0].k", "2.5 is not a whole number"]),
    ('enqueue = [{ k = 9 }]\ntrials = 2\n[fixed]\nvalidation = 100\n[search]\nk = { low = 1, high = 5 }\n',
     ["enqueue[0].k", "9 is outside the searched range 1 … 5;"]),        # as written, not 1.0 … 5.0
    ('enqueue = [{ lr = 2e-4 }]\ntrials = 2\n[fixed]\nvalidation = 100\n[search]\n'
     'lr = { low = 1e-4, high = 1e-3, step = 3e-4 }\n', ["enqueue[0].lr", "not on the range's grid 0.0001, 0.0004, …"]),
    # values shown as the spec wrote them (TOML), not as Python's repr; a list or table where a name belongs was a
    # traceback (TypeError: unhashable type)
    ('preset = ["seed"]\n', ['preset ["seed"]', "choose one of seed"]),
    ('objective = { a = 1 }\n', ["objective { a = 1 }", "choose one of validation-nll"]),
    ('trials = true\n', ["trials true:", "whole number"]),
    ('trials = 2\n[fixed]\nvalidation = 100\n[search]\nlr = { low = 1e-4, high = 1e-3, log = "yes" }\n',
     ["search.lr", 'log = "yes": write log = true or log = false']),
    ('trials = 2\n[fixed]\nvalidation = 100\n[search]\nlr = { low = nan, high = 1e-3 }\n',
     ["search.lr", "got nan and 0.001"]),
    # true or false for a flag that takes a value read "--lr: expected one argument"
    ('trials = 2\n[fixed]\nvalidation = 100\nlr = true\n', ["fixed", "--lr: expected a number, got 'true'"]),
    ('trials = 2\n[fixed]\nvalidation = 100\n[search]\nlr = [true, false]\n',
     ["search.lr", "--lr: expected a number, got 'true'"]),
])
def test_bad_specs_are_one_line_errors_naming_the_field(text, words, tmp_path, capsys):
    from vaelab.cli import main

    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    code = main(["sweep", str(spec), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "out" / "study.db").exists()


def test_a_new_sweep_needs_an_empty_or_new_directory(tmp_path, data_dir, capsys):
    """A new sweep wrote its sweep.toml and study.db into any directory: someone's folder, a run's."""
    from vaelab.cli import main

    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "sweep.toml").write_text("my own notes\n")
    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--epochs", "1", "--data-dir", str(data_dir), "--hidden", "8",
                 "--latent", "2", "--test-examples", "10", "--no-progress"]) == 0
    capsys.readouterr()
    for out, what in ((mine, "holds other files (sweep.toml), not a sweep"), (run_dir, "is a vaelab run, not a sweep"),
                      (spec, "is a file; a sweep needs a directory")):
        before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
        assert main(["sweep", str(spec), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"--out {out} {what}" in err, err
        assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before   # not even a lock file
    assert (mine / "sweep.toml").read_text() == "my own notes\n"


def test_a_storage_that_cannot_be_opened_leaves_no_sweep_tied_to_it(tmp_path, monkeypatch, capsys):
    """`--storage` with a typo wrote sweep.json naming it before opening it; every later command on that --out was
    then refused ("keeps its study in <the typo>; give that --storage"). Now nothing is written: a directory the
    command made is removed again, one that was there keeps only the lock file."""
    from vaelab import sweep
    from vaelab.cli import main

    pytest.importorskip("optuna")
    monkeypatch.setattr(sweep.time, "sleep", lambda seconds: None)      # its retries of a first open
    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE)
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty):
        bad = f"sqlite:///{tmp_path}/no/such/folder/study.db"
        assert main(["sweep", str(spec), "--out", str(out), "--storage", bad]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"storage {bad}: cannot open the study's database" in err, err
        assert not out.exists() if out != empty else [p.name for p in out.iterdir()] == [".reconcile.lock"]


def test_a_sweep_whose_files_cannot_be_written_leaves_nothing(tmp_path, monkeypatch, capsys):
    """On a full disk the new sweep's directory was left holding its lock file (sweep.json did not fit), or its
    sweep.json, sweep.toml and an empty study.db (the study's tables did not): taken back now, as for a storage
    that cannot be opened."""
    from vaelab import atomic
    from vaelab.cli import main

    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE)
    real = atomic.atomic_write
    for full in ("sweep.json", "sweep.toml"):
        def disk_full(path, write, *rest, **keywords):
            if path.name == full:
                what = f"cannot write {path}: No space left on device (errno 28)"
                raise atomic.WriteError(f"{what}; free some space or write elsewhere", what, 28)
            return real(path, write, *rest, **keywords)

        monkeypatch.setattr(atomic, "atomic_write", disk_full)
        assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert one_line(err) and f"{full}: No space left on device" in err, err
        assert not (tmp_path / "out").exists()


def test_a_sweep_on_a_read_only_file_system_is_one_line_naming_the_directory(tmp_path, monkeypatch, capsys):
    """It read "vaelab sweep: error: Read-only file system (…/.reconcile.lock, errno 30)"."""
    from vaelab import sweep
    from vaelab.cli import main

    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE)
    out = tmp_path / "out"
    out.mkdir()

    def read_only(path, *rest, **keywords):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(sweep, "open", read_only, raising=False)       # file_lock's open: a read-only mount's answer
    assert main(["sweep", str(spec), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and err.strip().endswith(f"cannot open {out}/.reconcile.lock: Read-only file system (errno "
                                                  f"30); a sweep writes in its directory: make {out} writable"), err


def in_process_workers(monkeypatch) -> None:
    """The sweep's worker processes run in this process, one after the other (so that a monkeypatch reaches them)."""
    import multiprocessing
    import types

    import torch

    class InProcess:
        def __init__(self, target, args):
            self.target, self.args, self.pid, self.exitcode = target, args, os.getpid(), None

        def start(self):
            threads = torch.get_num_threads()
            try:
                self.target(*self.args)
                self.exitcode = 0
            finally:
                torch.set_num_threads(threads)

        def join(self, timeout=None):
            pass

        def is_alive(self):
            return False

    # (the command's stop byte, shared with its workers: here a plain object in the one process)
    monkeypatch.setattr(multiprocessing, "get_context", lambda method: types.SimpleNamespace(
        Process=InProcess, RawValue=lambda typecode, value: types.SimpleNamespace(value=value)))


def in_process_sweep(tmp_path: Path, data_dir: Path, monkeypatch, trials: int,
                     objective: str = "validation-elbo") -> Path:
    """A spec of ``trials`` one-epoch trials on 600 digits (IWAE-100 for validation-nll), its workers run in this
    process."""
    in_process_workers(monkeypatch)
    monkeypatch.setenv("VAELAB_DATA", str(data_dir))
    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE.replace("trials = 4", f"trials = {trials}").replace("epochs = 2", "epochs = 1")
                    .replace("validation-nll", objective).replace("train_examples = 2000", "train_examples = 600")
                    .replace("validation = 500", "validation = 100"))
    return spec


@pytest.mark.parametrize("stop", ["Ctrl-C", "full disk"])
def test_a_trial_stopped_during_its_validation_evaluation_is_evaluated_by_the_next_sweep(tmp_path, data_dir,
                                                                                         monkeypatch, capsys, stop):
    """Ctrl-C (or a full disk) while a trained trial was evaluated on the validation digits failed the slot for good
    ("the validation evaluation failed (exit 130)"), and the next sweep said to change the spec. Now it is stopped,
    and the next sweep evaluates it without training it again."""
    from vaelab import atomic, cli

    spec = in_process_sweep(tmp_path, data_dir, monkeypatch, trials=1, objective="validation-nll")
    out, evaluate = tmp_path / "out", cli.cmd_evaluate
    what = "cannot write in X: No space left on device (errno 28)"
    error = KeyboardInterrupt() if stop == "Ctrl-C" else atomic.WriteError(what, what, errno.ENOSPC)
    monkeypatch.setattr(cli, "cmd_evaluate", lambda args: (_ for _ in ()).throw(error))
    assert cli.main(["sweep", str(spec), "--out", str(out)]) == 1
    said = "interrupted by SIGINT" if stop == "Ctrl-C" else what
    assert f"trial 0000 stopped (the next sweep goes on with it): {said}" in capsys.readouterr().out
    monkeypatch.setattr(cli, "cmd_evaluate", evaluate)
    assert cli.main(["sweep", str(spec), "--out", str(out)]) == 0
    assert finished_slots(out) == [0]
    log = (out / "trials" / "0000" / "train.log").read_text()
    assert log.count("epoch   1/1") == 1 and "resumed after epoch 1" in log   # its training was not done again


def test_a_trial_that_cannot_write_stops_the_sweep_and_the_same_command_goes_on(tmp_path, data_dir, monkeypatch,
                                                                               capsys):
    """A trial whose run could not be written (a full disk) was a failed trial for good: the slot was never retried,
    and once every slot had failed so, the command said to change the spec. Now the worker stops, the slot is
    "stopped" (not failed: no fault of its parameters), the command says so (exit 1), and the same command again
    trains it."""
    from vaelab import atomic, sweep
    from vaelab.cli import main

    spec = in_process_sweep(tmp_path, data_dir, monkeypatch, trials=2)
    out = tmp_path / "out"
    real = sweep.run_trial
    what = f"cannot write {out}/trials/0000/model.safetensors: No space left on device (errno 28)"

    def disk_full(trial, *rest):
        raise atomic.WriteError(what, what, 28)

    monkeypatch.setattr(sweep, "run_trial", disk_full)
    assert main(["sweep", str(spec), "--out", str(out)]) == 1
    printed = capsys.readouterr()
    assert one_line(printed.err) and printed.err.startswith(
        f"vaelab sweep: error: trial 0000 of {out} stopped: {what}; once that is mended, the same command again goes on")
    assert re.search(r"0000 .* stopped\n", printed.out) and re.search(r"0001 .* waiting\n", printed.out)
    assert [state for _, state, _, _ in trial_states(out)] == ["FAIL", "WAITING"]
    page = sweep.build_sweep_report(out)
    assert f"Trial 0000 stopped (the next sweep goes on with it): {what}" in page and "1 stopped, 1 waiting" in page
    monkeypatch.setattr(sweep, "run_trial", real)
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert finished_slots(out) == [0, 1]


def test_a_sweep_that_cannot_be_written_still_has_its_page(tmp_path, data_dir, monkeypatch, capsys):
    """`vaelab report` of a sweep on a read-only file system (or someone else's) ended in Optuna's traceback
    ("StorageInternalError … attempt to write a readonly database"): opening the study created it "if it does not
    exist", a write. Now the page is made from the study as it is, without a trial's report where its directory
    takes none; a sweep command that cannot write the study says so in one line."""
    from vaelab import atomic, sweep
    from vaelab.cli import main

    spec = in_process_sweep(tmp_path, data_dir, monkeypatch, trials=1)
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    real = atomic.atomic_write

    def read_only(path, *rest, **keywords):
        if out in Path(path).parents:
            what = f"cannot write in {Path(path).parent}: Read-only file system (errno 30)"
            raise atomic.WriteError(what, what, errno.EROFS)
        return real(path, *rest, **keywords)

    def no_write(*args, **keywords):
        from sqlalchemy.exc import OperationalError

        try:
            raise OperationalError("INSERT INTO studies", {}, Exception("attempt to write a readonly database"))
        except OperationalError as exc:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc

    monkeypatch.setattr(atomic, "atomic_write", read_only)
    monkeypatch.setattr(optuna, "create_study", no_write)
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "page.html")]) == 0
    page = (tmp_path / "page.html").read_text()
    assert "<td>complete</td>" in page and "trials/0000/report.html" not in page
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == before
    monkeypatch.setattr(atomic, "atomic_write", real)                # the files are written, the study is not
    monkeypatch.setattr(sweep.time, "sleep", lambda seconds: None)   # (its retries of a first open)
    assert main(["sweep", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "cannot open the study (OperationalError: " in err and "a readonly database)" in err, err
    # no --storage was given (until 2026-12-06 "--storage sqlite:///…/study.db: cannot open …")
    assert f"error: storage sqlite:///{(out / 'study.db').resolve()}: cannot open" in err and "--storage" not in err, err


def test_a_sweep_that_lost_its_spec_file_takes_it_back_from_its_state(tmp_path, data_dir, monkeypatch, capsys):
    """sweep.toml gone (a kill between the writes of sweep.json and sweep.toml, or a hand): every worker ended at its
    start ("sweep spec … does not exist", in its log), the command ended with status 0 and its trials "waiting", and
    `report` called the directory "not a vaelab run". sweep.json holds the spec's text: the file is written again."""
    from vaelab import sweep
    from vaelab.cli import main

    spec = in_process_sweep(tmp_path, data_dir, monkeypatch, trials=1)
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    text = (out / "sweep.toml").read_text()
    (out / "sweep.toml").unlink()
    assert sweep.is_sweep(out)
    assert main(["report", str(out), "--out", str(tmp_path / "page.html")]) == 0
    assert (out / "sweep.toml").read_text() == text
    (out / "sweep.toml").unlink()
    assert main(["sweep", str(spec), "--out", str(out), "--trials", "2"]) == 0
    assert finished_slots(out) == [0, 1] and (out / "sweep.toml").read_text() == text
    capsys.readouterr()


@pytest.mark.slow      # 6 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_sweep_whose_spec_copy_was_edited_is_shown_as_begun_and_not_continued(tmp_path, data_dir, monkeypatch,
                                                                                  capsys):
    """DIR/sweep.toml edited after the sweep began (a search widened by hand): the sweep's page read the edited file
    and ended in a ValueError ("'None' is not in list": a parameter no trial had drawn), and `vaelab sweep
    DIR/sweep.toml --out DIR` said "holds a sweep of another spec …; give the same spec", which it was (or the edit's
    TOML error). Now the page shows the sweep as begun (sweep.json's copy of the spec) and says the file was edited;
    the sweep says so in one line and how to go on; the file removed, the same command writes it again and goes on
    (until 2026-12-06)."""
    from vaelab.cli import main

    spec = in_process_sweep(tmp_path, data_dir, monkeypatch, trials=1)
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    own = out / "sweep.toml"
    text = own.read_text()
    page = tmp_path / "page.html"
    for edited in (text + "latent = [[2], [3]]\n", "garbage [["):
        own.write_text(edited)
        capsys.readouterr()
        assert main(["report", str(out), "--out", str(page)]) == 0
        shown = page.read_text()
        assert "sweep.toml</code> was edited after it began: the page shows the spec" in shown
        assert "latent against" not in shown and "lr against" in shown                       # the spec as begun
        assert main(["sweep", str(own), "--out", str(out), "--trials", "2"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{own} was edited after the sweep began ({out / 'sweep.json'} keeps the " \
            f"spec it was begun with): to go on with this sweep, put the file back" in err, err
        assert own.read_text() == edited and finished_slots(out) == [0]
    # the spec given from elsewhere, the copy edited: the workers train the spec as begun (they read the copy, and
    # trained the edited search into the study of the spec as begun)
    own.write_text(text.replace("[search]", "[search]\nlatent = [[2], [3]]"))
    assert main(["sweep", str(spec), "--out", str(out), "--trials", "2"]) == 0
    assert finished_slots(out) == [0, 1]
    assert json.loads((out / "trials" / "0001" / "config.json").read_text())["model"]["latent"] == [50]
    own.unlink()
    assert main(["sweep", str(own), "--out", str(out), "--trials", "3"]) == 0
    assert own.read_text() == text and finished_slots(out) == [0, 1, 2]
    assert main(["report", str(out), "--out", str(page)]) == 0 and "was edited" not in page.read_text()
    capsys.readouterr()


def test_a_trial_whose_metrics_are_damaged_leaves_the_rest_of_the_sweep_shown(tmp_path, data_dir, monkeypatch,
                                                                              capsys):
    """One trial's metrics.csv damaged (a line cut short, a header without a column vaelab writes): the sweep's page
    and its summary ended in that trial's one-line error, or a KeyError (until 2026-12-06), showing no trial. Now
    that trial's row says "?" epochs and a note names the file and the resume that writes it again; the others are
    shown, linked to their reports."""
    from vaelab.cli import main

    spec = in_process_sweep(tmp_path, data_dir, monkeypatch, trials=2)
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    metrics = out / "trials" / "0000" / "metrics.csv"
    lines = metrics.read_text().splitlines()
    page = tmp_path / "page.html"
    for damaged, said in ((lines[0] + "\n" + lines[1][:5] + "\n", "line 2, is malformed (2 values where the header "),
                          ("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n",
                           "is malformed (its header lacks elapsed_seconds)")):
        metrics.write_text(damaged)
        capsys.readouterr()
        assert main(["report", str(out), "--out", str(page)]) == 0
        shown = html.unescape(page.read_text())
        assert f"Trial 0000: {metrics}{', ' if 'line' in said else ' '}{said}" in shown, shown
        assert "trials/0001/report.html" in shown and "trials/0000/report.html" not in shown
        assert main(["sweep", str(spec), "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert f"trial 0000: {metrics}" in printed and "`vaelab train --out" in printed, printed
        assert re.search(r"\n[* ] +0000 .* \? +— +complete", printed), printed
    capsys.readouterr()


def test_a_sweep_moved_or_copied_keeps_its_own_study(tmp_path, data_dir, monkeypatch, capsys):
    """sweep.json named its study.db by its absolute path: a moved sweep could be neither reported nor continued
    ("cannot open the study's database"), and a copy trained its new trials into the original's study. Now the default
    study is the one beside sweep.json, and a sweep.json of before (its absolute path) is read so."""
    from vaelab import sweep
    from vaelab.cli import main

    spec = in_process_sweep(tmp_path, data_dir, monkeypatch, trials=1)
    first = tmp_path / "first"
    assert main(["sweep", str(spec), "--out", str(first)]) == 0
    assert json.loads((first / "sweep.json").read_text())["storage"] is None
    state = json.loads((first / "sweep.json").read_text())                  # as vaelab wrote it before
    (first / "sweep.json").write_text(json.dumps({**state, "storage": f"sqlite:///{first.resolve()}/study.db"}))
    moved = tmp_path / "moved"
    first.rename(moved)
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    assert main(["sweep", str(spec), "--out", str(copy), "--trials", "2"]) == 0
    assert finished_slots(copy) == [0, 1] and finished_slots(moved) == [0]
    assert "1 of 1 trials finished" in sweep.build_sweep_report(moved, trial_reports=False)
    assert main(["sweep", str(spec), "--out", str(moved)]) == 0
    assert json.loads((moved / "sweep.json").read_text())["storage"] is None
    capsys.readouterr()


@pytest.mark.slow      # 7 s on 2 cores of a Zen 4 (2026-12-07)
def test_workers_beyond_the_cores_are_refused_and_beyond_the_trials_not_started(tmp_path, data_dir, monkeypatch,
                                                                              capsys):
    """`--workers 100` on 2 cores started 100 processes of about 260 MB each (26 GB, more than the machine had) that
    waited for each other; now more workers than cores is one line, exit 2, nothing written, and workers beyond the
    spec's trials are not started (12 workers for 2 trials held 3 GB, 10 of them idle)."""
    from vaelab import resources
    from vaelab.cli import main

    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE.replace("trials = 4", "trials = 1").replace("epochs = 2", "epochs = 1"))
    monkeypatch.setattr(resources, "usable_cores", lambda: 2)
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--workers", "3"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--workers 3: this process may run on 2 cores" in err and \
        "give at most 2" in err, err
    assert not (tmp_path / "out").exists()
    # --trials as the spec's trials are checked, and named as the flag, not as "sweep spec: trials"
    with pytest.raises(SystemExit) as stopped:                 # argparse's own exit
        main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--trials", "100001"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert one_line(err) and "argument --trials: must be at least 1 and at most 100000, got 100001" in err, err
    assert not (tmp_path / "out").exists()
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two workers need two cores")
    process = sweep_cli(spec, tmp_path / "out", "--workers", "2", data_dir=data_dir)
    printed, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert "1 worker (of --workers 2: one per trial) × " in printed, printed
    assert len(list((tmp_path / "out" / "workers").iterdir())) == 1       # one worker's log


def test_without_optuna_the_command_says_what_to_install(tmp_path, monkeypatch, capsys):
    import builtins

    from vaelab.cli import main

    real_import = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError("No module named 'optuna'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE)
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert "pip install 'vaelab[sweep]'" in capsys.readouterr().err


def test_a_stepped_value_is_its_grid_point_as_written():
    """Optuna's stepped float is low + n·step in floating point: 7e-4 came as 0.0007000000000000001, in the trial's
    config, the table and the best command."""
    optuna = pytest.importorskip("optuna")
    from vaelab.sweep import Param

    param = Param("lr", 1e-4, 1e-3, False, 1e-4)
    raw = 1e-4 + 6 * 1e-4
    assert raw != 7e-4 and param.stored(raw) == 7e-4
    assert param.suggest(optuna.trial.FixedTrial({"lr": raw})) == 7e-4
    assert Param("lr", 1e-4, 1e-3).stored(raw) == raw                          # a continuous range: as drawn


def test_an_enqueued_value_is_the_choice_it_equals(tmp_path):
    """TOML's 1 enqueued for the choice 1.0 is that choice (Optuna stores choices as their JSON text, "1" ≠ "1.0"),
    a list the list choice, and a number of a range itself; the trial that takes the slot suggests exactly those."""
    from vaelab import sweep

    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(EXAMPLE.replace("trials = 4", "trials = 1\nenqueue = [{ lr = 1, hidden = [128], k = 3 }]")
                         .replace("lr = { low = 1e-4, high = 3e-3, log = true }", "lr = [1e-3, 1.0]\nk = { low = 1, "
                                                                              "high = 5 }"))
    spec, out = sweep.load_spec(spec_path), tmp_path / "out"
    out.mkdir()
    study = sweep.open_study(spec, sweep.storage_url(out, None), "study")
    sweep.reconcile(study, spec, out)
    trial = sweep._take(study, out)                      # as a worker takes it
    suggested = {param.name: param.suggest(trial) for param in spec.search}
    assert suggested == {"lr": 1.0, "k": 3, "hidden": [128], "activation": suggested["activation"]}
    assert trial.params["lr"] == "1.0" and suggested["activation"] in ("relu", "tanh")
    lr = next(param for param in spec.search if param.name == "lr")
    assert lr.choice_of(True) is None and lr.choice_of(1.0) == "1.0" and lr.refusal(2) is not None


def test_the_cpu_hour_choice_is_a_spec_that_parses(monkeypatch):
    """benchmarks/sweeps/cpu-hour.toml, the comparison that chose cpu-hour at a shorter budget, is a valid spec
    whose six enqueued candidates are its six trials. Its check parses thousands of combinations with one parser:
    until 2026-12-05 each made its own (4517 parsers, 35 s on a Zen 1, in the command and again in each worker)."""
    from vaelab import cli, sweep

    made, build_parser = [], cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda *args: made.append(args) or build_parser(*args))
    sweep._parser.cache_clear()
    spec = sweep.load_spec(Path(__file__).resolve().parents[1] / "benchmarks" / "sweeps" / "cpu-hour.toml")
    assert spec.trials == len(spec.enqueue) == 6 and spec.objective == "validation-nll"
    assert len(made) == 1


def test_the_best_trial_is_evaluated_on_the_weights_its_full_run_selects(tmp_path):
    """The command printed for the best trial evaluates the best-validation weights where its full run holds out the
    preset's validation digits (`vampprior-1`: 10 000), the last weights where it holds out none (`seed`). Before,
    it evaluated the last weights of every preset."""
    from vaelab.sweep import load_spec, summary_table

    for preset, evaluate in (("vampprior-1", "vaelab evaluate runs/best --checkpoint best --k 5000"),
                             ("seed", "vaelab evaluate runs/best --k 5000")):
        path = tmp_path / f"{preset}.toml"
        path.write_text(f'preset = "{preset}"\ntrials = 1\n[fixed]\nepochs = 1\nvalidation = 100\n'
                        f'[search]\nlr = [0.001, 0.002]\n')
        spec = load_spec(path)
        row = {"slot": 0, "params": {"lr": 0.001}, "value": 90.0, "stderr": 0.5, "epochs": 1, "seconds": 1.0,
               "state": "complete", "run_dir": "trials/0000", "best": True}
        printed = summary_table({"spec": spec, "rows": [row], "best": row, "objective": "validation-nll"})
        command = printed.splitlines()[-1]
        assert command.endswith(f"--lr 0.001 --out runs/best && {evaluate}"), command


def test_a_false_boolean_field_turns_off_what_the_preset_turns_on():
    """`batch_norm = false` against ladder-5 (which sets it) becomes --no-batch-norm, not a flag left out."""
    from vaelab.cli import _train_config, build_parser
    from vaelab.config import RunConfig
    from vaelab.sweep import flags_of

    assert flags_of({"batch_norm": False, "lr": 1e-3}) == ["--no-batch-norm", "--lr", "0.001"]
    assert flags_of({"batch_norm": True}) == ["--batch-norm"]
    parser = build_parser()
    for value in (False, True):
        args = parser.parse_args(["train", "--preset", "ladder-5", *flags_of({"batch_norm": value})])
        assert _train_config(args, RunConfig()).model.batch_norm is value


def test_a_sweep_into_a_directory_whose_name_begins_with_a_dash_trains_and_evaluates_its_trials(tmp_path, data_dir,
                                                                                                 monkeypatch, capsys):
    """`vaelab sweep SPEC --out=-sw` failed every trial ("--out: expected one argument"): the trial's run directory,
    -sw/trials/0000, was given to `train --out` and `evaluate` as a word of its own, which the parser took for a
    flag. Now both read it."""
    from vaelab import cli

    spec = in_process_sweep(tmp_path, data_dir, monkeypatch, trials=1, objective="validation-nll")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sweep", str(spec), "--out=-sw"]) == 0, capsys.readouterr()
    assert finished_slots(tmp_path / "-sw") == [0]
    assert list((tmp_path / "-sw" / "trials" / "0000").glob("eval-validation-best-k100-*.json"))


def test_flags_of_values_that_begin_with_a_dash_arrays_and_blocks():
    """A value that begins with a dash is joined to its flag; NumPy's arrays and scalars are their lists and numbers;
    `blocks` is one word per block, whether given as lists or as the command line's words."""
    import numpy as np
    import torch

    from vaelab.sweep import flags_of

    assert flags_of({"data_dir": "-data", "lr": -1.0}) == ["--data-dir=-data", "--lr=-1.0"]
    assert flags_of({"hidden": np.array([64, 32]), "latent": np.int64(5)}) == ["--hidden", "64", "32", "--latent", "5"]
    assert flags_of({"lr": np.float32(1e-3)}) == flags_of({"lr": torch.tensor(1e-3)}) == ["--lr", "0.001"]
    assert flags_of({"blocks": [[8, 8], "6,6"]}) == ["--blocks", "8,8", "6,6"]
    assert flags_of({"blocks": np.array([[8, 8], [6, 6]])}) == ["--blocks", "8,8", "6,6"]


# ---- PostgreSQL: a study shared by two `vaelab sweep` processes ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres(tmp_path):
    """A PostgreSQL server of Debian's package on a temporary directory and port (as the postgres user when the
    tests run as root), and its URL; skipped with the reason where it cannot start."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver of vaelab[sweep] is not installed")
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin")) if Path("/usr/lib/postgresql").exists() else []
    initdb = shutil.which("initdb") or (str(binaries[-1] / "initdb") if binaries else None)
    pg_ctl = shutil.which("pg_ctl") or (str(binaries[-1] / "pg_ctl") if binaries else None)
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL's server is not installed (Debian: apt-get install postgresql; .ci/run installs it)")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="vaelab-pg-"))           # outside pytest's 0700 tree: postgres must enter it
    os.chmod(base, 0o755)
    data = base / "pgdata"
    run_as: list[str] = []
    if os.geteuid() == 0:                                               # postgres refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: PostgreSQL cannot be started")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to start the server as")
        data.mkdir()
        shutil.chown(data, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    done = subprocess.run([*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "vaelab"], capture_output=True,
                          text=True, timeout=120)
    if done.returncode:
        pytest.skip(f"initdb failed: {done.stderr.strip()[-200:]}")
    log = base / "pg.log"
    if run_as:
        log.touch()
        shutil.chown(log, "postgres")
    done = subprocess.run([*run_as, pg_ctl, "-D", str(data), "-l", str(log), "-w", "-o",
                           f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], capture_output=True,
                          text=True, timeout=120)
    if done.returncode:
        pytest.skip(f"the PostgreSQL server did not start: {log.read_text()[-300:] if log.exists() else done.stderr}")
    try:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="vaelab", dbname="postgres", autocommit=True) as db:
            db.execute("create database sweeps")
        yield f"postgresql://vaelab@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow      # 12 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_study_on_postgresql_is_shared_by_two_sweeps(postgres, tmp_path, data_dir):
    """Two `vaelab sweep` processes (two machines' worth: each its own directory) on one PostgreSQL study complete
    the spec's trials between them, each slot once."""
    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE.replace("validation-nll", "validation-elbo"))
    processes = [sweep_cli(spec, tmp_path / name, "--storage", postgres, data_dir=data_dir) for name in ("a", "b")]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    name = json.loads((tmp_path / "a" / "sweep.json").read_text())["study"]
    assert name == json.loads((tmp_path / "b" / "sweep.json").read_text())["study"]
    assert json.loads((tmp_path / "a" / "sweep.json").read_text())["storage"] == postgres      # the URL as given
    # (the driver named: SQLAlchemy before 2.1, all there is on Python 3.10, takes psycopg2 for postgresql://)
    study = optuna.load_study(study_name=name, storage=postgres.replace("postgresql://", "postgresql+psycopg://"))
    finished = [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED") and not t.user_attrs.get("surplus")]
    assert sorted(t.user_attrs["slot"] for t in finished) == [0, 1, 2, 3]


@pytest.mark.slow      # 10 s on 2 cores of a Zen 4 (2026-12-07)
def test_the_report_of_a_sweep_renders_in_a_browser(example, tmp_path):
    from vaelab.cli import main
    from test_report import CHROMIUM, chromium

    root, _ = example
    assert main(["report", str(root / "out"), "--figures", str(tmp_path / "figures")]) == 2    # a run's, not a sweep's
    assert not (tmp_path / "figures").exists()
    assert main(["report", str(root / "out"), "--out", str(root / "out" / "sweep.html")]) == 0
    html = (root / "out" / "sweep.html").read_text()
    for text in ("Optimisation history", "parameter importances", "trials/0000/report.html", "best so far",
                 "validation NLL"):
        assert text in html, text
    complete = html.count('<td>complete</td>')
    assert complete >= 2 and (f"PED-ANOVA evaluator: how far each parameter&#39;s values among the best 10 % of "
                              f"the {complete} complete trials (here 1 trial) lie from their spread over all of them; "
                              f"with fewer than the 5 best trials Optuna advises for stable importances, read them as "
                              f"a hint, not a measurement") in html
    if CHROMIUM is None:
        pytest.skip("no Chromium to render the page (the HTML was checked above)")
    shot = tmp_path / "sweep.png"
    done = chromium("--window-size=1280,2000", f"--screenshot={shot}", (root / "out" / "sweep.html").as_uri())
    assert shot.exists() and shot.stat().st_size > 20_000, done.stderr


@pytest.mark.slow      # 7 s on 2 cores of a Zen 4 (2026-12-07)
def test_the_report_of_a_sweep_says_how_far_it_has_come_making_the_trials_reports(example, tmp_path, capsys,
                                                                                  monkeypatch):
    """The trials' own reports are made by the sweep's report where missing, about a second each: until 2026-12-05
    nothing was shown meanwhile (five minutes for 300 trials). In a log, a line a minute (here each refresh)."""
    import shutil

    from vaelab import evaluation
    from vaelab.cli import main

    root, _ = example
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    for page in out.glob("trials/*/report.html"):
        page.unlink()
    monkeypatch.setattr(evaluation, "LOG_EVERY_S", 0.0)
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "page.html")]) == 0
    made = len(list(out.glob("trials/*/report.html")))
    lines = capsys.readouterr().err.splitlines()
    assert made >= 2 and any(re.fullmatch(rf"trial reports: {made}/{made} reports \(100 %\), \d\d:\d\d so far, "
                                          r"about 00:00 to go", line) for line in lines), lines


@pytest.mark.slow      # 46 s on 2 cores of a Zen 4 (2026-12-07)
@pytest.mark.parametrize("sig, twice", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)])
def test_ctrl_c_stops_the_sweep_with_checkpoints_and_the_rerun_goes_on(tmp_path, data_dir, sig, twice):
    """Ctrl-C or SIGTERM: the workers write their checkpoints, the command says that the same command goes on (exit
    130 or 143: until 2026-12-05 130 for both); a second Ctrl-C while they do ends the command at once, saying the same (until 2026-12-05 "interrupted
    (Ctrl-C) before it finished"); the rerun finishes the study."""
    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE.replace("epochs = 2", "epochs = 4").replace("validation-nll", "validation-elbo"))
    out = tmp_path / "out"
    # started as a shell's background job is (`make test &`): SIGINT ignored; Ctrl-C must stop it all the same
    process = sweep_cli(spec, out, data_dir=data_dir, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(out.glob("trials/*/metrics.csv")):
        time.sleep(0.05)
    process.send_signal(sig)                                    # Ctrl-C, or a scheduler's SIGTERM
    if twice:
        time.sleep(0.5)                                         # while the workers write their checkpoints
        process.send_signal(sig)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + sig and "the same command again goes on" in err, err      # 130, 143
    assert ("stopped at once (a second signal)" in err) == twice, err
    assert len(finished_slots(out)) < 4
    rerun = sweep_cli(spec, out, data_dir=data_dir)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert finished_slots(out) == [0, 1, 2, 3]


@pytest.mark.slow      # 5 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_stop_signal_that_comes_inside_a_garbage_collector_callback_still_stops_the_sweep(tmp_path, data_dir,
                                                                                            monkeypatch, capsys):
    """Python runs a signal's handler between any two steps of Python code, among them those of a weakref callback
    run by the garbage collector (SQLAlchemy's, under Optuna's storage, which the sweep reads every few seconds),
    where an exception is printed as "Exception ignored" and lost: the sweep's handler raised KeyboardInterrupt, and
    a Ctrl-C landing there let the sweep run to its end (until 2026-12-06). Now the handler notes the signal and the
    sweep looks at it: it stops as for any Ctrl-C."""
    import weakref

    from vaelab import sweep
    from vaelab.cli import main

    monkeypatch.setenv("VAELAB_DATA", str(data_dir))
    monkeypatch.setattr(sweep, "WATCH_S", 0.1)
    spec = tmp_path / "spec.toml"
    spec.write_text(EXAMPLE.replace("trials = 4", "trials = 2").replace("epochs = 2", "epochs = 20")
                    .replace("validation-nll", "validation-elbo"))
    out, poll, stopped = tmp_path / "out", sweep.Watch.poll, []

    class Thing:
        pass

    def poll_and_stop(watch):
        poll(watch)
        if not stopped and list(out.glob("trials/*/metrics.csv")):     # a trial has begun its epochs
            stopped.append(Thing())
            watched = weakref.ref(stopped[0], lambda _: (signal.raise_signal(signal.SIGTERM), sum(range(100))))
            stopped[0] = None                   # the callback runs: the handler runs inside it
            assert watched() is None

    monkeypatch.setattr(sweep.Watch, "poll", poll_and_stop)
    assert main(["sweep", str(spec), "--out", str(out)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "the same command again goes on" in err and "Exception ignored" not in err, err
    assert stopped and len(finished_slots(out)) < 2


def two_trial_grid(tmp_path: Path, data_dir: Path, fixed: str, search: str,
                   exit_code: int = 0, trials: int = 2, examples: int = 600) -> tuple[str, list[str]]:
    """A grid sweep of ``trials`` (two) of one short epoch on 500 + 100 digits (``examples`` in all), ``fixed`` and
    ``search`` (TOML lines) added to its sections, run to its end (exiting with ``exit_code``): (what it printed, the
    states of its trials, sorted)."""
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""\
preset = "seed"
trials = {trials}
objective = "validation-elbo"
sampler = "grid"
[fixed]
epochs = 1
train_examples = {examples}
validation = 100
test_examples = 50
{fixed}
[search]
{search}
""")
    process = sweep_cli(spec, tmp_path / "out", data_dir=data_dir)
    printed, err = process.communicate(timeout=600)
    assert process.returncode == exit_code, err
    return printed + err, sorted(state for _, state, slot, surplus in trial_states(tmp_path / "out") if not surplus)


@pytest.mark.slow      # 7 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_sampled_combination_the_train_command_refuses_fails_that_trial_only(tmp_path, data_dir):
    """engine and activation searched independently: the fused engine with tanh is refused by `vaelab train`; that
    trial fails with its reason in the table, is not retried, and the others run (each value trains in some
    combination: the spec is not refused)."""
    printed, states = two_trial_grid(tmp_path, data_dir, 'hidden = [16]\nlatent = [3]', 'engine = ["fused", '
                                     '"autograd"]\nactivation = ["relu", "tanh"]', trials=4)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]       # the failed slot was not retried
    assert printed.count("failed:") == 2 and "--engine fused covers only the one-hidden-layer ReLU mlp" in printed


def test_a_value_no_combination_can_train_is_refused_before_any_trial(tmp_path, data_dir):
    """A choice that the train command refuses whatever the other searched fields draw (mlp2 beside a fixed single
    latent size; an --adam-eps below float32's smallest normal number): one line naming it and the train command's
    reason, exit 2, no sweep made (until 2026-12-05 every trial that drew it failed)."""
    for fixed, search, named in (('hidden = [16]\nlatent = [3]', 'model = ["mlp", "mlp2"]', "search.model: \"mlp2\""),
                                 ('hidden = [16]', 'adam_eps = [1e-8, 1e-39]\nlr = [1e-3, 2e-3]',
                                  "search.adam_eps: 1e-39")):
        out = tmp_path / named.split(":")[0]
        spec = tmp_path / "spec.toml"
        spec.write_text(f'trials = 2\nobjective = "validation-elbo"\n[fixed]\nvalidation = 100\n{fixed}\n[search]\n'
                        f'{search}\n')
        process = sweep_cli(spec, out, data_dir=data_dir)
        printed, err = process.communicate(timeout=300)
        assert process.returncode == 2 and one_line(err), err
        assert f"sweep spec: {named}: no trial could train it, whatever the other searched fields draw (" in err, err
        assert not out.exists()


@pytest.mark.slow      # 6 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_sweep_whose_every_trial_failed_exits_1_and_its_page_shows_why(tmp_path, data_dir):
    """Both trials refused by `vaelab train` (more training digits than the data set has, which only the data tell):
    the sweep ends with one line saying that no trial completed, exit status 1 (it was 0, as if there were a best
    configuration to train), and its report names the failures where it said "No trial has finished yet" and showed
    only "fail" in the table."""
    from vaelab.cli import main

    printed, states = two_trial_grid(tmp_path, data_dir, 'hidden = [16]\nlatent = [3]', 'lr = [1e-3, 2e-3]',
                                     exit_code=1, examples=5000)
    assert states == ["FAIL", "FAIL"]
    # as each ended, and under the table once for both: they failed for one reason (until 2026-12-06 a line each)
    assert printed.count("failed:") == 3 and "best:" not in printed
    assert "trials 0000 and 0001 failed: " in printed
    last = printed.strip().splitlines()[-1]
    assert last.startswith("vaelab sweep: error: no trial of") and "completed (2 failed of 2)" in last, last
    assert main(["report", str(tmp_path / "out")]) == 0
    html = (tmp_path / "out" / "report.html").read_text()
    assert "No trial has finished yet" not in html and "No trial has a value to show: 2 failed" in html
    assert html.count("failed: ") == 1 and "the data set has 2000 training digits" in html and "(2 failed)" in html
    assert "Trials 0000 and 0001 failed: " in html


def test_trials_that_failed_for_one_reason_are_named_on_one_line():
    """The table's notes give each reason once, with the trials that failed for it, in the order of the first."""
    from vaelab.sweep import failures

    rows = [{"slot": slot, "error": "UsageError: too few digits" if slot % 3 else "TrainingDiverged: NaN"}
            for slot in range(30)] + [{"slot": 30, "error": None}, {"slot": 31}]
    assert failures(rows) == [("trials 0000, 0003, 0006, 0009, 0012, 0015, … 0027 (10 trials)", "TrainingDiverged: NaN"),
                              ("trials 0001, 0002, 0004, 0005, 0007, 0008, … 0029 (20 trials)",
                               "UsageError: too few digits")]
    assert failures(rows[:3]) == [("trial 0000", "TrainingDiverged: NaN"),
                                  ("trials 0001 and 0002", "UsageError: too few digits")]
    assert failures([{"slot": n, "error": "x"} for n in range(8)]) == [
        ("trials 0000, 0001, 0002, 0003, 0004, 0005, 0006 and 0007", "x")]


@pytest.mark.slow
@needs_compiler
def test_a_worker_compiles_each_trial_afresh(tmp_path, data_dir, monkeypatch):
    """Trials of two architectures with the compiled engine in one worker, whose limit is lowered to one graph (by a
    sitecustomize every interpreter of the sweep imports): the second trial compiles its own graph instead of
    meeting the first's and the limit (without ``compiling.forget`` between trials it failed: 'recompile limit')."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import vaelab.compiling\nvaelab.compiling.GRAPHS = 1\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    printed, states = two_trial_grid(tmp_path, data_dir, 'batch_size = 100\nengine = "compiled"\nlatent = [2]',
                                     "hidden = [[8], [12]]")
    assert states == ["COMPLETE", "COMPLETE"], printed
    for slot in (0, 1):
        config = json.loads((tmp_path / "out" / "trials" / f"{slot:04d}" / ckpt.CONFIG).read_text())
        assert config["train"]["engine"] == "compiled"


def test_a_searched_field_the_trial_never_reads_is_unused_in_its_row_and_command(tmp_path):
    """A sweep over prior × prior_components: a standard-prior trial has no components, so its row says "unused"
    for K (not the sampled 10, which changed nothing), and when it wins the command to train it in full leaves
    --prior-components out."""
    import dataclasses
    import json

    from vaelab.config import RunConfig
    from vaelab.sweep import _unused_params, load_spec, summary_table

    path = tmp_path / "spec.toml"
    path.write_text('preset = "seed"\ntrials = 2\n[fixed]\nepochs = 1\nvalidation = 100\n'
                    '[search]\nprior = ["standard", "mog"]\nprior_components = [3, 10]\n')
    spec = load_spec(path)
    rows = []
    for slot, (prior, k, value) in enumerate([("standard", 10, 90.0), ("mog", 3, 91.0)]):
        run_dir = tmp_path / "trials" / f"{slot:04d}"
        run_dir.mkdir(parents=True)
        config = RunConfig()
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, prior=prior, prior_components=k))
        (run_dir / "config.json").write_text(json.dumps(config.to_dict()))
        rows.append({"slot": slot, "params": {"prior": prior, "prior_components": k}, "value": value, "stderr": 0.5,
                     "epochs": 1, "seconds": 1.0, "state": "complete", "run_dir": str(run_dir), "best": slot == 0,
                     "unused": _unused_params(spec, run_dir)})
    assert [row["unused"] for row in rows] == [["prior_components"], []]
    printed = summary_table({"spec": spec, "rows": rows, "best": rows[0], "objective": "validation-nll"})
    lines = printed.splitlines()
    assert lines[1].split()[2:4] == ["standard", "unused"] and lines[2].split()[1:3] == ["mog", "3"]
    assert "--prior standard --out runs/best" in lines[-1] and "--prior-components" not in lines[-1]
    # a fixed K beside a searched prior: left out of the standard winner's command too (until 2026-12-06 it was in,
    # and the run it trains says that --prior-components changes nothing); the mixture's keeps it
    path.write_text('preset = "seed"\ntrials = 2\n[fixed]\nepochs = 1\nvalidation = 100\nprior_components = 3\n'
                    '[search]\nprior = ["standard", "mog"]\n')
    spec = load_spec(path)
    for row in rows:
        row["params"].pop("prior_components")
        row["unused"] = _unused_params(spec, Path(row["run_dir"]))
    assert [row["unused"] for row in rows] == [["prior_components"], []]
    for best, flags in ((0, "--prior standard --out"), (1, "--prior-components 3 --prior mog --out")):
        summary = {"spec": spec, "rows": rows, "best": rows[best], "objective": "validation-nll"}
        assert flags in summary_table(summary).splitlines()[-1]


def test_a_field_the_model_would_not_read_is_not_sampled_and_its_bound_value_is_set(tmp_path):
    """Conditional search: a flow's steps beside no flow, a mixture's K beside the standard prior, the IAF width
    without IAF steps are not sampled (before, flow = "none" with a sampled flow_steps was a trial refused by
    `vaelab train`); on a preset with a flow, a trial without one trains with 0 steps; the grid trains the points
    that then coincide once; an enqueued trial naming such a field is accepted."""
    from vaelab.errors import UsageError
    from vaelab.sweep import _config_of, grid_points, load_spec, sample_params

    path = tmp_path / "spec.toml"
    path.write_text('preset = "planar-80"\ntrials = 2\nsampler = "grid"\n'
                    'enqueue = [{ flow = "none", flow_steps = 2, prior = "standard", prior_components = 3 }]\n'
                    '[fixed]\nepochs = 1\nvalidation = 100\n'
                    '[search]\nflow_width = [16, 32]\nflow = ["none", "planar", "iaf"]\nflow_steps = [0, 2]\n'
                    'prior = ["standard", "mog"]\nprior_components = [2, 3]\n')
    spec = load_spec(path)
    first = {"flow_width": 16, "flow": "none", "flow_steps": 2, "prior": "standard", "prior_components": 3}
    values, idle = sample_params(spec, lambda param: first[param.name])
    assert values == {"flow": "none", "prior": "standard"} and sorted(idle) == ["flow_steps", "flow_width",
                                                                                 "prior_components"]
    fields = spec.trial_fields(values)
    assert fields["flow_steps"] == 0                               # the preset's 80 would be refused without a flow
    assert _config_of(spec.preset, fields).model.flow_steps == 0
    iaf = {"flow_width": 32, "flow": "iaf", "flow_steps": 2, "prior": "mog", "prior_components": 2}
    values, idle = sample_params(spec, lambda param: iaf[param.name])
    assert values == iaf and idle == [] and spec.trial_fields(values) == {"epochs": 1, "validation": 100, **iaf}
    planar = dict(iaf, flow="planar")
    assert sample_params(spec, lambda param: planar[param.name])[1] == ["flow_width"]
    # a searched field no trial would read is refused with the spec: the seed preset has no flow, and no IAF steps
    for search, name, why in (("flow_steps = { low = 1, high = 3 }\nlr = [1e-3, 2e-3]", "flow_steps", "there is no "
                                                                                              "flow"),
                              ('flow_width = [8, 16]\nflow = ["planar", "iaf"]', "flow_width", "only IAF steps have")):
        bad = tmp_path / "bad.toml"
        bad.write_text(f'preset = "seed"\ntrials = 2\n[fixed]\nepochs = 1\nvalidation = 100\n[search]\n{search}\n')
        with pytest.raises(UsageError, match=rf"search\.{name}: no trial would read it \({why}.*preset seed give"):
            load_spec(bad)
    # of 2 × 3 × 2 × 2 × 2 = 48 points, flows: none 1, planar 2 (steps), iaf 1 (steps 0: no width) + 2 (steps 2, two
    # widths); priors: standard 1, mog 2 (K)
    assert len(grid_points(spec, 1000)) == (1 + 2 + 1 + 2) * 3


def test_a_grid_of_millions_of_points_is_drawn_from_not_enumerated(tmp_path, monkeypatch):
    """A grid of 10⁷ points (seven fields of ten choices): until 2026-12-05 every combination was made and read
    (minutes and gigabytes before the first trial, once per slot); now the slots' points are drawn at random, each
    once, reading a few times as many as there are slots. A grid of ranges is refused with the spec, naming the
    range (it was found while the study opened and said as "--storage …: cannot open the study")."""
    from vaelab import sweep
    from vaelab.errors import UsageError

    ten = ", ".join(str(n) for n in range(1, 11))
    path = tmp_path / "spec.toml"
    path.write_text('preset = "seed"\ntrials = 40\nsampler = "grid"\n[fixed]\nepochs = 1\nvalidation = 100\n'
                    f'[search]\nbatch_size = [{ten}]\nseed = [{ten}]\nwarmup = [{ten}]\nearly_stopping = [{ten}]\n'
                    f'train_examples = [{", ".join(str(1000 + n) for n in range(10))}]\n'
                    f'beta = [{", ".join(str(n / 10) for n in range(1, 11))}]\n'
                    f'lr = [{", ".join(f"{n}e-4" for n in range(1, 11))}]\n')
    spec = sweep.load_spec(path)
    read, real = [], sweep.sample_params

    def counted(*args):
        read.append(1)
        assert len(read) <= sweep.GRID_DRAWS_PER_SLOT * spec.trials, "the grid was enumerated"
        return real(*args)

    monkeypatch.setattr(sweep, "sample_params", counted)
    points = sweep.grid_points(spec, spec.trials)
    assert len(points) == 40 and len({json.dumps(point, sort_keys=True) for point in points}) == 40
    assert all(point[param.name] in param.choices for point in points for param in spec.search)
    assert sweep.grid_points(spec, spec.trials) == points                            # the spec's seed decides
    # a grid small enough to be enumerated keeps its order: the first slots' points are its first points
    small = tmp_path / "small.toml"
    small.write_text('preset = "seed"\ntrials = 3\nsampler = "grid"\n[fixed]\nepochs = 1\nvalidation = 100\n[search]\n'
                     f'seed = [{ten}]\nlr = [1e-3, 2e-3]\n')
    assert sweep.grid_points(sweep.load_spec(small), 3) == sweep.grid_points(sweep.load_spec(small), 20)[:3]
    ranged = tmp_path / "ranged.toml"
    ranged.write_text('preset = "seed"\ntrials = 3\nsampler = "grid"\n[fixed]\nepochs = 1\nvalidation = 100\n[search]\n'
                      'seed = [1, 2]\nlr = { low = 1e-4, high = 1e-2 }\n')
    with pytest.raises(UsageError, match=r"sampler grid: searches lists of choices only, and search.lr is a range: "
                                         r"give it choices, or use tpe or random"):
        sweep.load_spec(ranged)


def tiny_sweep(tmp_path: Path, data_dir: Path, head: str, search: str,
               model: str = "hidden = [32]\nlatent = [4]\n") -> str:
    """A sweep of a small seed model (by default 32 hidden units, 4 latents) on 400 training digits, one epoch a
    trial, on the validation ELBO without pruning, run to its end: what it printed."""
    spec = tmp_path / "spec.toml"
    spec.write_text(f'preset = "seed"\nobjective = "validation-elbo"\npruner = "none"\n{head}[fixed]\nepochs = 1\n'
                    f'train_examples = 400\nvalidation = 100\ntest_examples = 50\n{model}[search]\n{search}')
    process = sweep_cli(spec, tmp_path / "out", data_dir=data_dir)
    printed, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return printed


@pytest.mark.slow      # 7 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_sweep_over_a_flow_and_its_steps_trains_every_trial(tmp_path, data_dir):
    printed = tiny_sweep(tmp_path, data_dir, 'trials = 3\nsampler = "grid"\n',
                         'flow = ["none", "planar"]\nflow_steps = [1, 2]\n')
    assert [state for _, state, _, _ in trial_states(tmp_path / "out")] == ["COMPLETE"] * 3, printed
    configs = [json.loads((tmp_path / "out" / "trials" / f"{slot:04d}" / ckpt.CONFIG).read_text())["model"]
               for slot in range(3)]
    assert sorted((c["flow"], c["flow_steps"]) for c in configs) == [("none", 0), ("planar", 1), ("planar", 2)]
    row = next(line for line in printed.splitlines() if " none " in line)
    assert row.split()[-7] == "unused" and "failed" not in printed


@pytest.mark.slow      # 7 s on 2 cores of a Zen 4 (2026-12-07)
def test_importances_that_tell_no_trial_apart_are_a_note_not_equal_bars(tmp_path, data_dir):
    """Two trials whose searched field took one value: PED-ANOVA finds no parameter telling the best trial apart
    (all importances 0); Optuna's normalisation would draw that as equal bars."""
    from vaelab.sweep import build_sweep_report

    tiny_sweep(tmp_path, data_dir, "trials = 2\n", 'activation = ["relu"]\n')
    html = build_sweep_report(tmp_path / "out", trial_reports=False)
    assert "No parameter importances: they need two or more complete trials whose parameters differ" in html
    assert "importance (PED-ANOVA" not in html and "PED-ANOVA evaluator" not in html


@pytest.mark.parametrize("values, minimize", [(list(range(4)), True), (list(range(41)), True),
                                              (list(range(50)), False), ([1.0, 1.0, 1.0, 2.0, 3.0], True)])
def test_the_best_trials_of_the_importances_are_counted_as_optunas_filter_takes_them(values, minimize):
    """The page said "the best 10 % of the 4 complete trials", which is one trial, and nothing of how few (until
    2026-12-07). The count is the one Optuna's PED-ANOVA filter keeps (ties included); below 5, the caption cautions."""
    optuna = pytest.importorskip("optuna")
    from optuna.importance._ped_anova.evaluator import _QuantileFilter

    from vaelab.sweep import IMPORTANCE_QUANTILE, importance_trials

    study = optuna.create_study(direction="minimize" if minimize else "maximize")
    for value in values:
        study.add_trial(optuna.trial.create_trial(value=float(value), params={}, distributions={}))
    kept = _QuantileFilter(IMPORTANCE_QUANTILE, minimize, None).filter(study.trials)
    assert importance_trials(values, minimize) == len(kept)
    assert importance_trials(values, minimize) == {4: 1, 41: 5, 50: 5, 5: 3}[len(values)]


@pytest.mark.slow      # 7 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_searched_name_whose_options_set_several_fields_together(tmp_path, data_dir):
    """The depth of a hierarchy is its latent sizes and blocks together (either alone makes a config `vaelab train`
    refuses): `[search.depth]` with options `two = { latent, blocks, inference }` … is one categorical parameter.
    Each trial trains its option's fields, an option can make a field another searched one reads (a mixture's K is
    not sampled beside an option with the standard prior), the grid covers the options, enqueue names one, the
    table says what each option sets, and the best command sets its fields."""
    from vaelab.sweep import grid_points, load_spec, sample_params

    options = ('[search.depth]\n'
               'two = { latent = [4, 2], blocks = [[16], [16]], inference = "bottom-up", prior = "standard" }\n'
               'three = { latent = [4, 2, 2], blocks = [[16], [16], [16]], inference = "top-down", prior = "mog" }\n')
    path = tmp_path / "spec.toml"
    path.write_text('preset = "seed"\ntrials = 2\nsampler = "grid"\nenqueue = [{ depth = "three" }]\n[fixed]\n'
                    'epochs = 1\nvalidation = 100\nmodel = "hvae"\n[search]\nprior_components = [3, 5]\n' + options)
    spec = load_spec(path)
    chosen = {"depth": "two", "prior_components": 5}
    values, idle = sample_params(spec, lambda param: chosen[param.name])
    assert values == {"depth": "two"} and idle == ["prior_components"]
    assert spec.trial_fields(values) == {"epochs": 1, "validation": 100, "model": "hvae", "latent": [4, 2],
                                         "blocks": [[16], [16]], "inference": "bottom-up", "prior": "standard"}
    chosen["depth"] = "three"
    assert sample_params(spec, lambda param: chosen[param.name]) == ({"depth": "three", "prior_components": 5}, [])
    points = [{"depth": '"two"'}, {"depth": '"three"', "prior_components": "3"},
              {"depth": '"three"', "prior_components": "5"}]               # the mixture's K beside "three" only
    canonical = functools.partial(json.dumps, sort_keys=True)
    assert sorted(map(canonical, grid_points(spec, 1000))) == sorted(map(canonical, points))

    (tmp_path / "run").mkdir()
    printed = tiny_sweep(tmp_path / "run", data_dir, 'trials = 2\nsampler = "grid"\n', options,
                         model='model = "hvae"\n')
    trials = tmp_path / "run" / "out" / "trials"
    configs = sorted(json.loads((trials / f"{slot:04d}" / ckpt.CONFIG).read_text())["model"]["latent"]
                     for slot in range(2))
    assert configs == [[4, 2], [4, 2, 2]] and "failed" not in printed
    assert ("depth: two = --latent 4 2 --blocks 16 16 --inference bottom-up --prior standard; three = --latent 4 2 2 "
            "--blocks 16 16 16 --inference top-down --prior mog") in printed
    best = next(line for line in printed.splitlines() if line.startswith("  vaelab train"))
    assert re.search(r"--model hvae --latent 4 2(?: 2)? --blocks 16 16", best) and "--depth" not in best


@pytest.mark.slow      # 10 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_damaged_sweep_json_is_one_line_and_the_same_sweep_writes_it_again(tmp_path, data_dir, monkeypatch, capsys):
    """sweep.json ties a sweep's directory to its study; emptied, cut short or edited, it ended `sweep` and `report`
    in a traceback (JSONDecodeError, AttributeError, TypeError; until 2026-12-06), and trials = -1 in it ran a sweep
    of "-1 trials" and "-1 worker". Now each is one line naming the file, what is wrong and the fix, and the same
    sweep command writes it again from sweep.toml and the study, the trials --trials added kept."""
    from vaelab.cli import main

    spec = in_process_sweep(tmp_path, data_dir, monkeypatch, trials=2)
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--trials", "3"]) == 0
    state = out / "sweep.json"
    before = json.loads(state.read_text())
    for damage, said in (("", "not JSON: Expecting value"), (state.read_text()[:40], "not JSON: "),
                         ("[]", "a JSON list, not an object"),
                         (json.dumps({**before, "trials": "x"}), """'trials' is "x", not a whole number from 1 to 100 000"""),
                         (json.dumps({**before, "trials": -1}), "'trials' is -1, not a whole number"),
                         (json.dumps({**before, "storage": 5}), "'storage' is 5, not text or null")):
        state.write_text(damage)
        capsys.readouterr()
        assert main(["report", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert one_line(err) and f"{state} is damaged ({said}" in err and f"`vaelab sweep {out}/sweep.toml --out {out}`" in err, err
        assert main(["sweep", str(out / "sweep.toml"), "--out", str(out)]) == 0           # the command it names
        printed = capsys.readouterr().out
        assert f"note: {state} was damaged ({said}" in printed and "of 3 trials" in printed, printed
        assert json.loads(state.read_text()) | {"created": None} == before | {"created": None}
        assert main(["report", str(out), "--no-progress"]) == 0
    # sweep.toml lost too: the command to give names the spec it was begun with, and writes both again
    state.write_text("")
    (out / "sweep.toml").unlink()
    code, _, err = run(capsys, "report", out, "--no-progress")
    assert code == 2 and one_line(err) and f"`vaelab sweep SPEC --out {out}` writes it again from the spec it" in err
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert (out / "sweep.toml").read_text() == spec.read_text() and json.loads(state.read_text())["trials"] == 3
    # where it cannot be written again: another spec given, or no study beside it and no --storage
    state.write_text("")
    other = tmp_path / "other.toml"
    other.write_text(spec.read_text().replace("epochs = 1", "epochs = 2"))
    code, _, err = run(capsys, "sweep", other, "--out", out)
    assert code == 2 and one_line(err) and "and the spec given is not the sweep's" in err, err
    (out / "study.db").rename(tmp_path / "moved.db")
    code, _, err = run(capsys, "sweep", spec, "--out", out)
    assert code == 2 and one_line(err) and "holds no study.db: give the --storage the sweep was begun with" in err, err
    code, _, err = run(capsys, "sweep", spec, "--out", out, "--storage", f"sqlite:///{tmp_path / 'moved.db'}")
    assert code == 0 and json.loads(state.read_text())["study"] == before["study"], err


def test_a_spec_is_read_without_tomllib_as_on_python_3_10(monkeypatch):
    """pyproject.toml admits Python 3.10, whose standard library has no tomllib: sweep.py imported it at its top, and
    the command line imports sweep.py to build its parser, so every command failed there (until 2026-12-07). Now the
    parser is built without it, a spec is read with tomli (`vaelab[sweep]` installs it on 3.10), and without either a
    sweep says what to install."""
    import importlib

    from vaelab import sweep
    from vaelab.cli import build_parser
    from vaelab.errors import UsageError

    tomllib = sweep._toml()                                     # tomllib from 3.11, tomli on 3.10 (its test extra)
    monkeypatch.setitem(sys.modules, "tomllib", None)         # `import tomllib` raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "vaelab.sweep")
    monkeypatch.setattr(importlib.import_module("vaelab"), "sweep", None, raising=False)
    fresh = importlib.import_module("vaelab.sweep")            # imports without tomllib
    assert build_parser().parse_args(["sweep", "s.toml", "--out", "sw", "--trials", "3"]).trials == 3
    monkeypatch.setitem(sys.modules, "tomli", tomllib)         # tomli is the same parser
    assert fresh.parse_spec('trials = 2\n[fixed]\nvalidation = 100\n[search]\nlr = [1e-3, 2e-3]\n',
                            "s.toml").trials == 2
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(UsageError, match=r"^vaelab sweep reads its spec with tomli on Python 3.10: pip install "
                                         r"'vaelab\[sweep\]'"):
        fresh.parse_spec('preset = "seed"\n', "s.toml")
    assert sweep is not fresh


def test_a_postgresql_url_without_a_driver_is_given_psycopg_where_psycopg2_is_missing(monkeypatch):
    """SQLAlchemy before 2.1 (all there is on Python 3.10) takes psycopg2 for `postgresql://`, and vaelab[sweep]
    installs psycopg: the README's `--storage postgresql://USER@HOST:5432/DBNAME` was refused until 2026-12-07 as "its
    database driver is not installed" on 3.10 (the PostgreSQL test failed there). A URL that names its driver, or
    another database, is left as it is, and so is every URL where psycopg2 is installed."""
    import importlib.util

    from vaelab import sweep

    installed = {"psycopg"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert sweep._with_driver("postgresql://u@h:5432/db") == "postgresql+psycopg://u@h:5432/db"
    for url in ("postgresql+psycopg2://u@h/db", "postgresql+psycopg://u@h/db", "sqlite:////tmp/s/study.db",
                "mysql://u@h/db"):
        assert sweep._with_driver(url) == url
    installed.add("psycopg2")
    assert sweep._with_driver("postgresql://u@h:5432/db") == "postgresql://u@h:5432/db"
