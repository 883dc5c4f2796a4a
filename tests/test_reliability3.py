"""Reliability III (issue 22): evaluations are never stale, divergence tells the truth, files vaelab did not
write are skipped with a note, the Python API speaks in its own terms, torchrun survivors say what stands, and
the log and commands say what they mean. Each test fails on the code before the issue.

(The suite's cross-CPU tolerances, the Laplace refusal at extreme M and bf16's decision by timing are tested
beside what they check: tests/test_distributed.py, test_training.py, test_laplace.py.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import one_line, run
import vaelab
from vaelab import checkpoint as ckpt
from vaelab import training
from vaelab.cli import main
from vaelab.engines import fused_step
from vaelab.errors import ResourceError, TrainingDiverged, UsageError

SMALL = ["--hidden", "32", "--latent", "4", "--test-examples", "50", "--train-examples", "600", "--no-progress"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, data_dir):
    """Two epochs, evaluated, then trained to a third epoch with --resume: the record measured other weights."""
    root = tmp_path_factory.mktemp("stale")
    run_dir = root / "try"
    assert main(["train", "--out", str(run_dir), "--epochs", "2", "--data-dir", str(data_dir), *SMALL]) == 0
    assert main(["evaluate", str(run_dir), "--k", "10", "--test-examples", "30", "--data-dir", str(data_dir),
                 "--no-progress"]) == 0
    assert main(["train", "--out", str(run_dir), "--resume", "--epochs", "3", "--data-dir", str(data_dir),
                 "--no-progress"]) == 0
    return run_dir


# ---- 2. an evaluation of other weights is never shown as the run's -------------------------------------------


def test_an_evaluation_of_earlier_weights_is_marked_stale_everywhere(evaluated, data_dir, tmp_path, capsys):
    from vaelab.runs import read_run

    info = read_run(evaluated)
    (record,) = info.evaluations
    assert record["stale"] is True and record["epochs_trained"] == 2 and info.epochs_done == 3
    assert info.headline_evaluation() is None                             # never the headline

    code, out, _ = run(capsys, "runs", evaluated.parent)
    line = next(line for line in out.splitlines() if "try" in line)
    assert code == 0 and "3/3" in line and "— (stale:" in line and "after epoch 2" in line

    code, out, _ = run(capsys, "report", evaluated, "--data-dir", data_dir, "--out", tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert code == 0 and "No evaluation of this run's current weights" in html
    assert "model.safetensors after epoch 2, stale" in html and 'class="stale"' in html

    other = tmp_path / "other"
    shutil.copytree(evaluated, other)
    code, out, _ = run(capsys, "compare", evaluated, other, "--out", tmp_path / "c.html")
    assert code == 0 and "measured earlier weights, not the run's current ones: stale" in out
    assert not re.search(r"\d+\.\d{3} ± ", out.split("config")[0])   # no NLL in the runs table


def test_a_record_written_into_another_run_names_the_run_it_measured(evaluated, data_dir, tmp_path, capsys):
    """`evaluate A --out B/eval-a.json` puts a record of A's weights in B: it was shown there as "stale: not the run's
    weights now", and compare said it "measured earlier weights" of B. Now each place names A as what it measured;
    B's own records and a run moved with its records are unaffected."""
    a, b = tmp_path / "a", tmp_path / "b"
    for seed, run_dir in enumerate((a, b)):
        assert main(["train", "--out", str(run_dir), "--epochs", "1", "--data-dir", str(data_dir), *SMALL,
                     "--seed", str(seed)]) == 0
    assert main(["evaluate", str(a), "--k", "5", "--test-examples", "20", "--data-dir", str(data_dir),
                 "--no-progress", "--out", str(b / "eval-a.json")]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "runs", tmp_path)
    line = next(line for line in out.splitlines() if line.split()[0].endswith("b"))
    assert code == 0 and "— (stale: " in line and f"of the weights after epoch 1 of {a.resolve()})" in line, out
    code, out, _ = run(capsys, "report", b, "--data-dir", data_dir, "--out", tmp_path / "b.html")
    html = (tmp_path / "b.html").read_text()
    assert code == 0 and f"its evaluations are of the weights of {a.resolve()}" in html
    assert f"model.safetensors after epoch 1, stale: the weights of {a.resolve()}, not the run&#39;s now" in html
    assert "earlier weights" not in html
    code, out, _ = run(capsys, "compare", a, b, "--out", tmp_path / "c.html")
    assert code == 0 and f"b: its evaluations (eval-a.json) measured the weights of {a.resolve()}, not the run's " \
        "current ones: stale" in out

    moved = tmp_path / "moved"
    shutil.copytree(a, moved)          # a run copied with its records: the record measured its own weights
    shutil.copy(b / "eval-a.json", moved / "eval-k5.json")
    from vaelab.runs import read_run
    info = read_run(moved)
    (record,) = info.evaluations
    assert record["stale"] is False and "elsewhere" not in record and info.headline_evaluation() is record


def test_a_new_evaluation_of_the_current_weights_is_the_headline_and_says_which_weights(evaluated, data_dir,
                                                                                       tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(evaluated, run_dir)
    assert main(["evaluate", str(run_dir), "--k", "10", "--test-examples", "40", "--data-dir", str(data_dir),
                 "--no-progress"]) == 0
    code, out, _ = run(capsys, "runs", tmp_path)
    assert re.search(r"\d+\.\d\d \(K 10, 40 test digits, epoch 3\)", out), out
    run(capsys, "report", run_dir, "--data-dir", data_dir)
    html = (run_dir / "report.html").read_text()
    assert "measured on <b>model.safetensors after epoch 3</b>" in html
    assert "eval-k10-n30-seed0.json" in html and "after epoch 2, stale" in html     # the old one, marked



def test_a_stale_evaluation_of_the_best_weights_says_their_epoch(tmp_path, data_dir, capsys):
    """An evaluation of model-best.safetensors made stale by a better epoch: `vaelab runs` names the best weights'
    own epoch, not the epochs the run had then ("of the weights after epoch 2" read as the last weights)."""
    run_dir = tmp_path / "run"
    train = ["--validation", "100", "--data-dir", str(data_dir), *SMALL]
    assert main(["train", "--out", str(run_dir), "--epochs", "2", *train]) == 0
    assert main(["evaluate", str(run_dir), "--checkpoint", "best", "--k", "5", "--test-examples", "20",
                 "--data-dir", str(data_dir), "--no-progress"]) == 0
    assert main(["train", "--out", str(run_dir), "--resume", "--epochs", "4", "--no-progress"]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "runs", tmp_path)
    (line,) = [line for line in out.splitlines() if line.startswith(str(run_dir))]
    assert code == 0 and "— (stale: " in line and "of the best weights of epoch 2)" in line, line


def test_an_evaluation_while_the_run_trains_on_records_the_weights_it_measured(tmp_path, data_dir, capsys,
                                                                                monkeypatch):
    """A training that goes on replaces model.safetensors and appends to metrics.csv while an evaluation runs
    (IWAE-5000 takes minutes, an epoch seconds). The record names the weights the evaluation loaded, their digest
    and epoch, not those on disk when it ended, so that it is stale once read, never the run's headline. Before,
    the digest and the epochs were read after the evaluation: the record claimed the newer weights."""
    import hashlib

    from vaelab import evaluation
    from vaelab.runs import read_run

    run_dir, later, same = tmp_path / "run", tmp_path / "later", tmp_path / "same"
    assert main(["train", "--out", str(run_dir), "--epochs", "2", "--validation", "100", "--data-dir", str(data_dir),
                 *SMALL]) == 0
    shutil.copytree(run_dir, later)
    shutil.copytree(run_dir, same)
    assert main(["train", "--out", str(later), "--resume", "--epochs", "3", "--no-progress"]) == 0
    measured = hashlib.sha256((run_dir / ckpt.WEIGHTS).read_bytes()).hexdigest()
    real = evaluation.evaluate_run

    def training_goes_on(*args, **kwargs):              # the next checkpoint lands as the evaluation starts
        for name in (ckpt.STATE, ckpt.WEIGHTS, ckpt.METRICS):
            shutil.copyfile(later / name, run_dir / f".{name}.tmp")
            os.replace(run_dir / f".{name}.tmp", run_dir / name)
        return real(*args, **kwargs)

    evaluate = ["--k", "5", "--test-examples", "20", "--data-dir", str(data_dir), "--no-progress"]
    assert main(["evaluate", str(same), *evaluate]) == 0
    monkeypatch.setattr(evaluation, "evaluate_run", training_goes_on)
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), *evaluate]) == 0
    assert f"evaluating {run_dir} (model.safetensors after epoch 2) on 20 test digits" in capsys.readouterr().out
    info = read_run(run_dir)
    (record,), (reference,) = info.evaluations, read_run(same).evaluations
    assert record["weights_sha256"] == measured and record["epochs_trained"] == 2 and "weights_step" not in record
    assert record["nll"] == reference["nll"]                           # the numbers of the weights it loaded
    assert record["stale"] is True and info.epochs_done == 3 and info.headline_evaluation() is None


def test_a_write_that_must_not_replace_leaves_a_file_that_appeared_meanwhile(tmp_path, monkeypatch):
    """``write_text(…, replace=False)`` never replaces: a file another process put there is left as it is
    (FileExistsError), no temporary file stays behind, and a new name is written whole; also where the file system
    has no hard links."""
    import errno

    from vaelab.atomic import write_text

    for links in (True, False):
        folder = tmp_path / f"links-{links}"
        folder.mkdir()
        if not links:
            def no_links(*args):
                raise OSError(errno.EPERM, "Operation not permitted")
            monkeypatch.setattr(os, "link", no_links)
        (folder / "taken.json").write_text("theirs")
        with pytest.raises(FileExistsError):
            write_text(folder / "taken.json", "ours", replace=False)
        write_text(folder / "free.json", "ours", replace=False)
        assert (folder / "taken.json").read_text() == "theirs" and (folder / "free.json").read_text() == "ours"
        assert sorted(p.name for p in folder.iterdir()) == ["free.json", "taken.json"]
        write_text(folder / "taken.json", "ours")                            # replace=True: as before
        assert (folder / "taken.json").read_text() == "ours"


def test_without_hard_links_a_file_that_appears_after_the_check_is_not_replaced(tmp_path, monkeypatch):
    """Where the file system has no hard links, the no-replace write renames with Linux's RENAME_NOREPLACE, so a
    file another process puts at the name after any check of ours is kept (FileExistsError). Here the check is made
    blind (``Path.exists`` says no, as it would have a moment before the other file came): the former
    check-then-rename replaced that file. Where the C library has no ``renameat2``, the fallback is the check."""
    import ctypes
    import errno

    from vaelab import atomic

    if not hasattr(ctypes.CDLL(None), "renameat2"):
        pytest.skip("no renameat2 in this C library (Linux with glibc 2.28 or later has it)")

    def no_links(*args):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(Path, "exists", lambda self: False)
    (tmp_path / "taken.json").write_text("theirs")
    with pytest.raises(FileExistsError):
        atomic.write_text(tmp_path / "taken.json", "ours", replace=False)
    atomic.write_text(tmp_path / "free.json", "ours", replace=False)
    assert (tmp_path / "taken.json").read_text() == "theirs" and (tmp_path / "free.json").read_text() == "ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["free.json", "taken.json"]

    def refused(*args):                             # a file system that refuses the flag: the check, as before
        return False

    monkeypatch.undo()                              # Path.exists answers truly again
    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(atomic, "_rename_no_replace", refused)
    with pytest.raises(FileExistsError):
        atomic.write_text(tmp_path / "taken.json", "ours", replace=False)
    atomic.write_text(tmp_path / "other.json", "ours", replace=False)
    assert (tmp_path / "other.json").read_text() == "ours" and (tmp_path / "taken.json").read_text() == "theirs"


def test_two_evaluations_of_the_same_settings_keep_both_records(tmp_path, data_dir, capsys, monkeypatch):
    """Two `vaelab evaluate` of one run with the same K, digits and seed, the second started before the first
    wrote its record: both pass the check for an earlier record, and before, the later one replaced the earlier
    (its JSON possibly beside the other's per-digit file). Now the later one is written under the next free name,
    with its own per-digit file, and a note says so; --overwrite still replaces."""
    from vaelab import evaluation
    from vaelab.runs import read_run

    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--epochs", "1", "--data-dir", str(data_dir), *SMALL]) == 0
    evaluate = ["evaluate", str(run_dir), "--k", "5", "--test-examples", "20", "--data-dir", str(data_dir),
                "--no-progress"]
    real, name = evaluation.evaluate_run, "eval-k5-n20-seed0"

    def the_other_finishes_first(*args, **kwargs):
        result = real(*args, **kwargs)
        monkeypatch.setattr(evaluation, "evaluate_run", real)
        assert main(evaluate) == 0                                      # the other process, quicker
        return result

    monkeypatch.setattr(evaluation, "evaluate_run", the_other_finishes_first)
    capsys.readouterr()
    assert main(evaluate) == 0
    out, err = capsys.readouterr()
    theirs = json.loads((run_dir / f"{name}.json").read_text())
    ours = json.loads((run_dir / f"{name}-2.json").read_text())
    assert theirs["per_digit"] == f"{name}.digits.csv" and ours["per_digit"] == f"{name}-2.digits.csv"
    assert (run_dir / f"{name}-2.digits.csv").read_text() == (run_dir / f"{name}.digits.csv").read_text()
    assert f"{name}.json was written by another evaluation of the same settings while this one ran: this one is " \
        f"{name}-2.json" in err
    assert len(read_run(run_dir).evaluations) == 2
    assert main([*evaluate, "--overwrite"]) == 0
    assert sorted(p.name for p in run_dir.glob("eval*")) == sorted(
        [f"{name}.json", f"{name}.digits.csv", f"{name}-2.json", f"{name}-2.digits.csv"])


def test_an_evaluation_never_replaces_someone_elses_file_beside_its_record(tmp_path, data_dir, capsys):
    """`evaluate --out ev.json` wrote its per-digit values over an ev.digits.csv that was not vaelab's (only the
    record's own name was checked); a per-digit file of vaelab's left without its record is still replaced."""
    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--epochs", "1", "--data-dir", str(data_dir), *SMALL]) == 0
    record, digits = tmp_path / "ev.json", tmp_path / "ev.digits.csv"
    digits.write_text("my own table\n")
    evaluate = ["evaluate", run_dir, "--k", "2", "--test-examples", "4", "--data-dir", data_dir, "--out", record]
    code, _, err = run(capsys, *evaluate)
    assert code == 2 and one_line(err) and f"{digits} exists and is not vaelab's per-digit values" in err
    assert digits.read_text() == "my own table\n" and not record.exists()
    assert run(capsys, *evaluate, "--overwrite")[0] == 0                     # replaced when asked
    assert digits.read_text().startswith("digit,label,elbo,iwae\n")
    record.unlink()                                                          # an orphan of vaelab's: replaced
    assert run(capsys, *evaluate)[0] == 0 and json.loads(record.read_text())["per_digit"] == digits.name
    from vaelab.records import write_evaluation

    digits.write_text("my own table\n")                                     # made while an evaluation ran
    record.unlink()
    written = write_evaluation(record, {"k": 2}, {"iwae": np.zeros(2)}, np.zeros(2, dtype=int), run_dir, False)
    assert written == (tmp_path / "ev-2.json", tmp_path / "ev-2.digits.csv")
    assert digits.read_text() == "my own table\n" and not record.exists()


def test_no_output_replaces_a_file_a_run_a_sweep_or_figures_are_made_of(two_runs, tmp_path, data_dir, capsys):
    """`evaluate RUN --out RUN/config.json --overwrite` wrote the record over the config the run is rebuilt from
    (until 2026-12-06: the run could not be read again), and `--out RUN/pruned.json` would have marked it pruned. A
    run's, a sweep's and a figures folder's own files are refused as outputs, --overwrite or not, in one line; a
    name of one's own in the run is written as before."""
    shutil.copytree(two_runs / "a", tmp_path / "a")
    run_dir, config = tmp_path / "a", (tmp_path / "a" / "config.json").read_bytes()
    evaluate = ["evaluate", run_dir, "--k", "2", "--test-examples", "3", "--data-dir", data_dir, "--no-progress"]
    for name, flags in [("config.json", ["--overwrite"]), ("pruned.json", []), ("diverged.json", []),
                        ("./config.json", ["--overwrite"])]:
        code, _, err = run(capsys, *evaluate, "--out", run_dir / name, *flags)
        assert code == 2 and one_line(err), err
        assert f"is a file of the run {run_dir}, which no output may replace (--overwrite or not)" in err
    assert (run_dir / "config.json").read_bytes() == config and not (run_dir / "pruned.json").exists()
    assert sorted(p.name for p in run_dir.glob("*.json")) == ["config.json"]        # no record, no per-digit file
    (tmp_path / "sweep.json").write_text("{}")                        # a sweep's state beside its spec
    (tmp_path / "sweep.toml").write_text("")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "vaelab-figures.json").write_text('{"run": "x"}')
    for target, owner in [(tmp_path / "sweep.json", f"the sweep {tmp_path}"),
                          (tmp_path / "figures" / "vaelab-figures.json", "the report's figures in")]:
        code, _, err = run(capsys, *evaluate, "--out", target, "--overwrite")
        assert code == 2 and one_line(err) and f"is a file of {owner}" in err, err
    assert (tmp_path / "sweep.json").read_text() == "{}"
    assert run(capsys, *evaluate, "--out", run_dir / "mine.json")[0] == 0 and (run_dir / "mine.digits.csv").exists()


def test_an_output_named_as_a_directory_is_refused_before_the_work(evaluated, tmp_path, data_dir, capsys):
    """`evaluate --out e.json`, `sample --out d.png` or `stirling --plot d.png` where that name is a directory said
    "exists …; pass --overwrite", and with --overwrite `evaluate` evaluated, failed to write, and advised to "free
    some space"; `sample --out /tmp` said "cannot write a suffix-less picture" (until 2026-12-07). Each is refused in
    one line before any work; a write that meets a directory anyway (made in the meantime) names that remedy."""
    from vaelab import atomic

    for name in ("e.json", "d.png"):
        (tmp_path / name).mkdir()
    for argv, words in [
            (["evaluate", evaluated, "--k", "2", "--test-examples", "3", "--data-dir", data_dir, "--no-progress",
              "--out", tmp_path / "e.json", "--overwrite"], f"--out {tmp_path / 'e.json'} is a directory; give a "
                                                            f"file name ending in .json"),
            (["sample", evaluated, "--out", tmp_path / "d.png"], f"--out {tmp_path / 'd.png'} is a directory; give "
                                                                 f"a file name ending in .png"),
            (["stirling", "--plot", tmp_path / "d.png", "--overwrite"], f"--plot {tmp_path / 'd.png'} is a "
                                                                        f"directory"),
            (["sample", evaluated, "--out", tmp_path], f"--out {tmp_path} is a directory; give a picture's file "
                                                       f"name, ending in .png, .pdf, .svg or another"),
            (["stirling", "--plot", tmp_path], f"--plot {tmp_path} is a directory")]:
        code, out, err = run(capsys, *argv)
        assert code == 2 and one_line(err) and words in err and out == "", err
    with pytest.raises(atomic.WriteError) as error:
        atomic.atomic_write(tmp_path / "d.png", lambda handle: handle.write(b"x"))
    assert str(error.value).endswith("(errno 21); move that directory away or write elsewhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "e.json"]


def test_a_run_evaluated_again_after_training_on_keeps_both_records(tmp_path, data_dir, capsys):
    """`vaelab evaluate RUN` after the run trained on: the default name holds the earlier weights' record, and the
    second evaluation was refused (exit 2) unless given --out (as for `vampprior-2` at epochs 651 and 956). Now it
    is written beside it with the weights' epoch in its name, and a note says so; the same weights evaluated again
    are refused as before, and --overwrite replaces that record, not the earlier one."""
    from vaelab.runs import read_run

    run_dir, name = tmp_path / "run", "eval-k5-n20-seed0"
    assert main(["train", "--out", str(run_dir), "--epochs", "1", "--data-dir", str(data_dir), *SMALL]) == 0
    evaluate = ["evaluate", str(run_dir), "--k", "5", "--test-examples", "20", "--data-dir", str(data_dir),
                "--no-progress"]
    assert main(evaluate) == 0
    first = (run_dir / f"{name}.json").read_bytes()
    assert main(["train", "--out", str(run_dir), "--resume", "--epochs", "2", "--data-dir", str(data_dir),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(evaluate) == 0
    err = capsys.readouterr().err
    assert f"note: {name}.json holds the evaluation of other weights, model.safetensors after epoch 1; this one " \
        f"is {name}-epoch2.json" in err, err
    second = json.loads((run_dir / f"{name}-epoch2.json").read_text())
    assert second["epochs_trained"] == 2 and second["per_digit"] == f"{name}-epoch2.digits.csv"
    assert (run_dir / f"{name}.json").read_bytes() == first
    stale = {Path(r["file"]).name: r["stale"] for r in read_run(run_dir).evaluations}
    assert stale == {f"{name}.json": True, f"{name}-epoch2.json": False}
    code = main(evaluate)
    assert code == 2 and f"{name}-epoch2.json exists (vaelab's or not, it is kept); pass --overwrite" in \
        capsys.readouterr().err
    assert main([*evaluate, "--overwrite"]) == 0
    assert (run_dir / f"{name}.json").read_bytes() == first
    assert sorted(p.name for p in run_dir.glob("eval*")) == sorted(
        [f"{name}.json", f"{name}.digits.csv", f"{name}-epoch2.json", f"{name}-epoch2.digits.csv"])


def test_a_run_sampled_again_after_training_on_keeps_both_pictures(tmp_path, data_dir, capsys):
    """`vaelab sample RUN` after the run trained on: the picture keeps the digest of the weights it drew from (a PNG
    text field), and where the default name holds one of other weights the new picture takes its weights' epoch into
    its name, as evaluation records do; the same weights again, or a PNG that names no weights (an older vaelab's),
    are refused as before."""
    from PIL import Image

    from vaelab import checkpoint as ckpt
    from vaelab.cli import PICTURE_WEIGHTS_KEY

    run_dir, name = tmp_path / "run", "samples-n16-seed0"
    assert main(["train", "--out", str(run_dir), "--epochs", "1", "--data-dir", str(data_dir), *SMALL]) == 0
    sample = ["sample", str(run_dir), "--n", "16"]
    assert main(sample) == 0
    first = (run_dir / f"{name}.png").read_bytes()
    with Image.open(run_dir / f"{name}.png") as image:
        assert image.text[PICTURE_WEIGHTS_KEY] == ckpt.read_tensors(run_dir / ckpt.WEIGHTS)[2]
    assert main(["train", "--out", str(run_dir), "--resume", "--epochs", "2", "--data-dir", str(data_dir),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(sample) == 0
    err = capsys.readouterr().err
    assert f"note: {name}.png holds a picture of other weights; this one is {name}-epoch2.png" in err, err
    assert (run_dir / f"{name}.png").read_bytes() == first and (run_dir / f"{name}-epoch2.png").exists()
    assert main(sample) == 2 and f"{name}-epoch2.png exists (vaelab's or not, it is kept)" in capsys.readouterr().err
    Image.new("L", (8, 8)).save(run_dir / "samples-n9-seed0.png")                 # names no weights
    assert main(["sample", str(run_dir), "--n", "9"]) == 2 and "samples-n9-seed0.png exists" in capsys.readouterr().err


def test_an_evaluation_whose_files_cannot_be_written_in_the_run_saves_both_elsewhere(tmp_path, data_dir, capsys,
                                                                                      monkeypatch):
    """A full disk as the per-digit file is written after the record: the record is taken back out of the run,
    and both go to the temporary directory, the record naming its per-digit file there; the message says where."""
    import tempfile

    from vaelab import atomic

    run_dir, elsewhere = tmp_path / "run", tmp_path / "tmp"
    elsewhere.mkdir()
    assert main(["train", "--out", str(run_dir), "--epochs", "1", "--data-dir", str(data_dir), *SMALL]) == 0
    real = atomic.write_text

    def disk_full_on_digits(path, text, replace=True):
        if path.parent == run_dir and path.name.endswith(".digits.csv"):
            raise atomic.WriteError(f"cannot write {path}: No space left on device (errno 28)")
        return real(path, text, replace)

    monkeypatch.setattr(atomic, "write_text", disk_full_on_digits)
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    code, out, err = run(capsys, "evaluate", run_dir, "--k", "5", "--test-examples", "20", "--data-dir", data_dir,
                         "--no-progress")
    folder = elsewhere / "vaelab-run-evaluations"
    saved = folder / "eval-k5-n20-seed0.json"
    assert code == 1 and "NLL =" in out and "No space left" in err and f"the record was saved to {saved} instead, " \
        f"with eval-k5-n20-seed0.digits.csv: move both into {run_dir} once it takes files (mv -n {folder}/" \
        f"eval-k5-n20-seed0.* {run_dir}/)" in err, err
    assert not list(run_dir.glob("eval*"))
    assert json.loads(saved.read_text())["per_digit"] == "eval-k5-n20-seed0.digits.csv"
    assert len((folder / "eval-k5-n20-seed0.digits.csv").read_text().splitlines()) == 21
    # a second evaluation (here of other digits) saved there never replaces the first: until 2026-12-05 it did
    first = saved.read_text()
    code, out, err = run(capsys, "evaluate", run_dir, "--k", "5", "--test-examples", "30", "--data-dir", data_dir,
                         "--no-progress", "--out", run_dir / "eval-k5-n20-seed0.json")
    second = folder / "eval-k5-n20-seed0-2.json"
    assert code == 1 and f"the record was saved to {second} instead" in err and saved.read_text() == first
    assert json.loads(second.read_text())["n_examples"] == 30
    assert json.loads(second.read_text())["per_digit"] == "eval-k5-n20-seed0-2.digits.csv"
    assert len((folder / "eval-k5-n20-seed0-2.digits.csv").read_text().splitlines()) == 31
    # moved as the line says, the run reads them as its own records, with their per-digit values
    monkeypatch.undo()
    subprocess.run(f"mv -n {folder}/eval-k5-n20-seed0.* {run_dir}/", shell=True, check=True)
    from vaelab.runs import per_digit, read_run
    (record,) = read_run(run_dir).evaluations
    assert record["stale"] is False and len(per_digit(run_dir, record)["iwae"]) == 20


def test_ctrl_c_during_an_evaluation_says_what_it_left(tmp_path, data_dir, capsys, monkeypatch):
    """Ctrl-C in `vaelab evaluate` is one line, exit 130, saying that no record was written; before, it said
    "stopped at once by a second signal; the last checkpoint stands", a training's message. A second signal in
    training keeps that message."""
    from vaelab import evaluation

    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--epochs", "1", "--data-dir", str(data_dir), *SMALL]) == 0
    assert repr(vaelab.load_run(run_dir)).endswith(": mlp, finished, 1 epoch)")      # (it said "1 epochs")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "evaluate_run", ctrl_c)
    code, _, err = run(capsys, "evaluate", run_dir, "--k", "5", "--test-examples", "20", "--data-dir", data_dir,
                       "--no-progress")
    assert code == 130 and one_line(err) and "interrupted (Ctrl-C) before it finished" in err
    assert "the evaluation's record is written at its end: none was" in err and not list(run_dir.glob("eval*"))

    # SIGTERM (a scheduler, `timeout`) and SIGHUP alike, where the default action killed it without a word; the
    # handlers are the previous ones afterwards
    import os
    import signal
    import time

    # pytest started under nohup inherits SIGHUP ignored, which the CLI keeps (as nohup asks): the default here
    inherited = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
        for signum, status in ((signal.SIGTERM, 143), (signal.SIGHUP, 129)):
            def stopped(*args, signum=signum, **kwargs):
                os.kill(os.getpid(), signum)
                time.sleep(5)                                       # the handler raises first
                raise AssertionError("not stopped")

            monkeypatch.setattr(evaluation, "evaluate_run", stopped)
            code, _, err = run(capsys, "evaluate", run_dir, "--k", "5", "--test-examples", "20", "--data-dir",
                               data_dir, "--no-progress")
            assert code == status and one_line(err) and not list(run_dir.glob("eval*"))
            assert f"stopped by {signal.Signals(signum).name} before it finished; vaelab replaces each file whole" in err
            assert {s: signal.getsignal(s) for s in before} == before
    finally:
        signal.signal(signal.SIGHUP, inherited)

    def second_signal(*args, **kwargs):
        raise training.StopNow(15)

    monkeypatch.setattr(training.Trainer, "fit", second_signal)
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", "2", "--no-progress")
    assert code == 143 and one_line(err) and "stopped at once by a second signal; the last checkpoint stands" in err


def test_weights_files_say_where_they_stand_in_their_run(tmp_path, data_dir, capsys):
    """model.safetensors holds its epoch and the steps into the next (a run stopped inside an epoch), and
    model-best.safetensors its epoch, in their metadata: an evaluation reads them from the file it loads, and says
    so ('after epoch 1 and 3 steps of epoch 2'). Files without them (written before) are read as before."""
    from vaelab.runs import weights_label

    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--epochs", "2", "--validation", "100", "--data-dir", str(data_dir),
                 *SMALL]) == 0
    _, meta, _ = ckpt.read_tensors(run_dir / ckpt.WEIGHTS)
    _, best, _ = ckpt.read_tensors(run_dir / training.BEST_WEIGHTS)
    state = ckpt.read_metadata(run_dir / ckpt.STATE)
    assert meta == {"epoch": 2, "step": 0} and best == {"epoch": state["best_epoch"], "step": 0}
    _, _, loaded = ckpt.load_model_weights(run_dir, weights=training.BEST_WEIGHTS)
    assert loaded.epoch == state["best_epoch"] and loaded.step == 0
    record = {"weights": ckpt.WEIGHTS, "epochs_trained": 1, "weights_step": 3, "stale": False}
    assert weights_label(record) == "model.safetensors after epoch 1 and 3 steps of epoch 2"
    assert weights_label({**record, "weights_step": None}) == "model.safetensors after epoch 1"
    assert weights_label({**record, "weights_step": 0}) == "model.safetensors after epoch 1"


def test_a_weights_file_that_cannot_be_read_is_not_called_corrupted(evaluated, tmp_path, capsys, monkeypatch):
    """A directory where model.safetensors belongs, or a file this user may not read: until 2026-12-05 both were
    "truncated or corrupted", the fix "`train --resume` writes it again", which the directory stopped too ("make RUN
    writable", which it was). Now each says what it is and what reads it: move the directory away (then the resume
    writes the weights again: followed here), or let this user read the file."""
    run_dir = tmp_path / "run"
    shutil.copytree(evaluated, run_dir)
    weights = run_dir / ckpt.WEIGHTS
    weights.unlink()
    weights.mkdir()
    code, _, err = run(capsys, "evaluate", run_dir, "--k", "2", "--test-examples", "5", "--no-progress")
    assert code == 2 and one_line(err) and "truncated or corrupted" not in err
    assert f"{weights} is a directory, not vaelab's file: move it away (mv {weights} {weights}.moved); then " \
           f"`vaelab train --out {run_dir} --resume` writes it again" in err
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--no-progress")
    assert code == 1 and err.rstrip().endswith(f"move that directory away, then: vaelab train --out {run_dir} --resume")
    weights.rename(tmp_path / "moved")
    assert run(capsys, "train", "--out", run_dir, "--resume", "--no-progress")[0] == 0 and weights.is_file()

    def refused(self, *args, **kwargs):      # (tests may run as root, whom chmod 000 does not stop)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refused)
    code, _, err = run(capsys, "evaluate", run_dir, "--k", "2", "--test-examples", "5", "--no-progress")
    assert code == 2 and one_line(err)
    assert f"{weights} cannot be read by this user (Permission denied, errno 13); the file may be whole: let this " \
           f"user read it (chmod u+r {weights}), or run as its owner" in err
    monkeypatch.undo()

    # config.json: "not valid JSON ([Errno 21] Is a directory…)" until 2026-12-05; the training state's copy of it
    # is written again once the directory is moved away
    config = run_dir / ckpt.CONFIG
    config.rename(tmp_path / "kept-config.json")
    config.mkdir()
    code, _, err = run(capsys, "evaluate", run_dir, "--k", "2", "--test-examples", "5", "--no-progress")
    assert code == 2 and one_line(err) and "not valid JSON" not in err
    assert err.startswith(f"vaelab evaluate: error: {config} is a directory, not vaelab's file; {ckpt.STATE} keeps a "
                          f"copy of it: move it away (mv {config} {config}.bad), then `vaelab train --out {run_dir} "
                          f"--resume` writes it again")
    config.rename(tmp_path / "config-dir")
    assert run(capsys, "train", "--out", run_dir, "--resume", "--no-progress")[0] == 0 and config.is_file()
    monkeypatch.setattr(Path, "read_text", refused)
    code, _, err = run(capsys, "runs", tmp_path)
    assert code == 0 and f"note: {config} cannot be read by this user (Permission denied, errno 13)" in err


# ---- 3. divergence --------------------------------------------------------------------------------------------


def test_divergence_before_the_first_checkpoint_says_nothing_was_trained(tmp_path, data_dir, capsys, monkeypatch):
    calls = {"n": 0}

    def exploding(model, x, eps, objective, beta, grad_squares=None):
        calls["n"] += 1                                      # from the second step: the first is the initial weights'
        return fused_step(model, x, eps) * (1e16 if calls["n"] > 1 else 1)  # a train ELBO of ≈ −3e18 nats per example

    monkeypatch.setitem(training.ENGINES, ("fused", "fp32"), exploding)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--out", out, "--epochs", "2", "--data-dir", data_dir, *SMALL)
    assert code == 1 and one_line(err)
    assert "epoch 1, step 2" in err and "nothing was trained yet" in err and "was removed" in err
    assert "try a lower --lr (it was 0.001)" in err and "epoch 0" not in err
    assert not out.exists()


def test_a_run_whose_training_diverged_is_said_to_have_diverged_not_to_be_interrupted(tmp_path, data_dir, capsys,
                                                                                      monkeypatch):
    """Until 2026-12-06 `runs`, the report and the API called a run whose resumed training diverged "interrupted",
    and the report offered its plain resume, which repeats the same steps. RUN/diverged.json now names the checkpoint
    it diverged from and what diverged; a later start from that checkpoint clears it, and a marker of another
    checkpoint (or not vaelab's) is not believed."""
    from vaelab.report import _summary
    from vaelab.runs import read_run

    out = tmp_path / "run"
    assert run(capsys, "train", "--out", out, "--epochs", "1", "--data-dir", data_dir, *SMALL)[0] == 0
    calls = {"n": 0}

    def exploding(model, x, eps, objective, beta, grad_squares=None):
        calls["n"] += 1
        return fused_step(model, x, eps) * (1e16 if calls["n"] > 2 else 1)        # the third step of epoch 2

    monkeypatch.setitem(training.ENGINES, ("fused", "fp32"), exploding)
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", "3")
    assert code == 1 and "the ELBO became -" in err and "at epoch 2, step 3 (below" in err
    marker = json.loads((out / ckpt.DIVERGED).read_text())
    assert marker["epoch"] == 1 and marker["step"] == 0
    assert re.fullmatch(r"the ELBO became -[0-9.]+e\+[0-9]+ nats per example at epoch 2, step 3", marker["what"])
    code, listing, _ = run(capsys, "runs", tmp_path)
    assert code == 0 and re.search(r"/run +seed\* +1/3 +diverged ", listing), listing
    assert vaelab.load_run(out).status == "diverged"
    status = _summary(read_run(out), None, [])["status"]
    assert status.startswith(f"diverged: {marker['what']}; the weights are those of the last good checkpoint (1 of 3 "
                             f"epochs); go on from it with vaelab train --out {out} --resume --lr X (lower)")
    assert not read_run(out).resumable                       # no plain resume offered: it would repeat the steps
    for other in ({**marker, "epoch": 0}, {**marker, "step": 7}, {"epoch": 1, "step": 0}, [1, 0], "x"):
        (out / ckpt.DIVERGED).write_text(json.dumps(other))
        assert read_run(out).status == "interrupted"        # of another checkpoint, or not vaelab's
    (out / ckpt.DIVERGED).write_text(json.dumps(marker))
    # a resume that keeps the diverged start's --lr and clipping is told that the same steps follow
    code, _, err = run(capsys, "train", "--out", out, "--resume")
    assert code == 1 and err.startswith(f"note: the last training from this checkpoint diverged ({marker['what']}), "
                                        f"and this resume keeps its --lr 0.001 and no clipping, so the same steps "
                                        f"follow; to go past them, resume with a lower --lr or with --clip-grad-norm C")
    monkeypatch.undo()
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--lr", "5e-4")
    assert code == 0 and "the last training" not in err, err
    assert not (out / ckpt.DIVERGED).exists() and read_run(out).status == "finished"


def test_a_resume_that_wrote_no_checkpoint_is_not_taken_for_the_weights_configuration(tmp_path, data_dir, capsys,
                                                                                         monkeypatch):
    """A resume with --lr amends config.json at once and the training state at its first checkpoint; one that
    diverged before it left config.json's train.lr 0.002 beside weights trained with 0.001 at every step, and the
    report and `compare` showed 0.002 as the run's (until 2026-12-06). Both now say which values config.json holds
    that the weights were not trained with; how long to train is no such value."""
    from vaelab.runs import read_run, uncheckpointed_changes

    out = tmp_path / "run"
    assert run(capsys, "train", "--out", out, "--epochs", "1", "--data-dir", data_dir, *SMALL)[0] == 0
    shutil.copytree(out, tmp_path / "other")
    monkeypatch.setitem(training.ENGINES, ("fused", "fp32"),
                        lambda model, x, eps, objective, beta, grad_squares=None: fused_step(model, x, eps) * 1e16)
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", "2", "--lr", "0.002")
    assert code == 1 and "became" in err
    monkeypatch.undo()
    assert uncheckpointed_changes(read_run(out)) == ["train.lr: 0.001 → 0.002"]        # not train.epochs: 1 → 2
    assert run(capsys, "report", out, "--data-dir", data_dir, "--no-progress")[0] == 0
    html = (out / "report.html").read_text()
    assert ("config.json differs from the copy in the last checkpoint: train.lr: 0.001 → 0.002. A resume that wrote "
            "no checkpoint set it") in html
    code, printed, _ = run(capsys, "compare", out, tmp_path / "other", "--out", tmp_path / "c.html")
    assert code == 0 and ("run: config.json holds train.lr: 0.001 → 0.002 from a resume that wrote no checkpoint (it "
                          "diverged or was stopped first); its weights were trained with the former values") in printed
    assert run(capsys, "train", "--out", out, "--resume")[0] == 0               # trains with 0.002: now the state's too
    assert uncheckpointed_changes(read_run(out)) == []
    assert run(capsys, "report", out, "--data-dir", data_dir, "--no-progress")[0] == 0
    html = (out / "report.html").read_text()
    assert "config.json differs" not in html and "Amended on resuming: after epoch 1, train.lr: 0.001 → 0.002" in html


def test_a_loss_beyond_the_limit_at_the_first_step_is_said_to_be_the_initial_weights(tmp_path, data_dir, capsys,
                                                                                    monkeypatch):
    """The first step's loss is that of the initial weights, before any update (He's init in a bottom-up ReLU
    hierarchy begins at NaN or beyond 10⁶ nats in nearly every seed): until 2026-12-06 the line said to try a lower
    --lr or clipping, which change nothing there; now it names the initialisation and the seed."""
    def exploding(model, x, eps, objective, beta, grad_squares=None):
        return fused_step(model, x, eps) * 1e16

    monkeypatch.setitem(training.ENGINES, ("fused", "fp32"), exploding)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--out", out, "--epochs", "2", "--seed", "3", "--data-dir", data_dir, *SMALL)
    assert code == 1 and one_line(err) and not out.exists()
    assert "at epoch 1, step 1 (below -5.43e+05" in err and "that of the initial weights, before any step" in err
    assert "try another --init (it was torch) or --seed (it was 3)" in err and "lower --lr" not in err
    monkeypatch.undo()                  # the real case: He's init in a bottom-up ReLU hierarchy (README, Models)
    code, _, err = run(capsys, "train", "--out", out, "--epochs", "1", "--model", "hvae", "--blocks", "512,512",
                       "256,256", "128,128", "--latent", "64", "32", "16", "--init", "he", "--train-examples", "200",
                       "--test-examples", "20", "--data-dir", data_dir, "--no-progress")
    assert code == 1 and one_line(err) and not out.exists()
    assert "at epoch 1, step 1" in err and "try another --init (it was he)" in err, err


def test_a_stopped_run_draws_its_pictures_from_what_it_holds(tmp_path, data_dir, capsys, monkeypatch):
    """Pictures were drawn only when training ended normally: a run that diverged (or was stopped by a signal)
    after resuming kept the elbo.png of its earlier end. Now elbo.png shows the completed epochs and the samples
    come from the weights the run directory holds."""
    out = tmp_path / "run"
    assert run(capsys, "train", "--out", out, "--epochs", "1", "--data-dir", data_dir, *SMALL)[0] == 0
    after_one = {name: (out / name).read_bytes() for name in ("elbo.png", "samples.png")}
    calls = {"n": 0}

    def poisoned(model, x, eps, objective, beta, grad_squares=None):
        calls["n"] += 1
        sums = fused_step(model, x, eps)
        return sums * float("nan") if calls["n"] > 10 else sums     # epoch 2 completes (10 steps), epoch 3 fails

    monkeypatch.setitem(training.ENGINES, ("fused", "fp32"), poisoned)
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", "3", "--data-dir", data_dir, "--no-progress")
    assert code == 1 and "epoch 3, step 1" in err and "not redrawn" not in err
    assert [row.split(",")[0] for row in (out / ckpt.METRICS).read_text().splitlines()[1:]] == ["1", "2"]
    assert all((out / name).read_bytes() != after_one[name] for name in after_one)       # redrawn: two epochs
    _, model = ckpt.load_model(out)                                                          # from the kept weights
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_absurd_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, tiny_arrays,
                                                                                monkeypatch):
    """An epoch with train ELBO −3.1e18 was once checkpointed as good: only NaN counted as divergence."""
    from vaelab.config import RunConfig, TrainConfig
    from vaelab.data import DataConfig, prepare
    from vaelab.models import ModelConfig

    def config(epochs):
        return RunConfig(model=ModelConfig(hidden=((32,),), latent=(4,)), data=DataConfig(test_examples=50),
                         train=TrainConfig(epochs=epochs))

    data = prepare(tiny_arrays, config(1).data)
    training.Trainer(config(1), tmp_path, data, torch.device("cpu"), log=lambda m: None, progress=False).fit()
    saved = {name: (tmp_path / name).read_bytes() for name in (ckpt.STATE, ckpt.WEIGHTS, ckpt.METRICS)}
    calls = {"n": 0}

    def exploding(model, x, eps, objective, beta, grad_squares=None):
        calls["n"] += 1
        sums = fused_step(model, x, eps)
        return sums * 1.2e16 if calls["n"] >= 5 else sums          # finite, ≈ −3.1e18 nats per example

    monkeypatch.setitem(training.ENGINES, ("fused", "fp32"), exploding)
    trainer = training.Trainer(config(2), tmp_path, data, torch.device("cpu"), log=lambda m: None, progress=False)
    trainer.load_checkpoint()
    with pytest.raises(TrainingDiverged, match=r"the ELBO became -[0-9.]+e\+18 nats per example at epoch 2, step 5 "
                                               r"\(below -5.43e\+05, .* predicting ½ for every pixel") as error:
        trainer.fit()
    assert "last good checkpoint (epoch 1)" in str(error.value)
    assert {name: (tmp_path / name).read_bytes() for name in saved} == saved


def test_a_run_directory_moved_while_it_trains_is_said_to_be_gone(tmp_path, tiny_arrays):
    """`mv RUN elsewhere` (or `rm -r RUN`) while it trains: the next checkpoint cannot be written. Until 2026-12-05
    the line said that the last checkpoint stood, left untouched, and to make RUN writable; now that RUN is gone,
    and how a moved run goes on from its last checkpoint where it went (it does: resumed here)."""
    from vaelab.config import RunConfig, TrainConfig
    from vaelab.data import DataConfig, prepare
    from vaelab.models import ModelConfig

    def config(epochs):
        return RunConfig(model=ModelConfig(hidden=((32,),), latent=(4,)), data=DataConfig(test_examples=50),
                         train=TrainConfig(epochs=epochs))

    run_dir, data = tmp_path / "run", prepare(tiny_arrays, config(1).data)
    run_dir.mkdir()
    training.Trainer(config(1), run_dir, data, torch.device("cpu"), log=lambda m: None, progress=False).fit()
    trainer = training.Trainer(config(2), run_dir, data, torch.device("cpu"), log=lambda m: None, progress=False)
    trainer.load_checkpoint()
    run_dir.rename(tmp_path / "moved")
    with pytest.raises(ckpt.WriteError) as error:
        trainer.fit()
    assert str(error.value).endswith(f"training stopped: {run_dir} is gone, removed or moved while it trained; if it "
                                     "was moved, its last checkpoint (epoch 1) goes on there with vaelab train --out "
                                     "NEW --resume, NEW its new place")
    assert not run_dir.exists()
    moved = training.Trainer(config(2), tmp_path / "moved", data, torch.device("cpu"), log=lambda m: None,
                             progress=False)
    moved.load_checkpoint()
    assert moved.state.epoch == 1
    moved.fit()
    assert moved.state.epoch == 2


def test_a_large_beta_is_not_taken_for_a_divergence(tmp_path, data_dir, capsys):
    """The β-ELBO trained is up to β times the ELBO's size: with --beta 10⁸ its −β·KL passed 5.4e5 nats at the first
    step and the run was stopped as diverged ("try a lower --lr"). Its limit is now β times the ELBO's; the ELBO's own
    limit is unchanged (the run's ELBO stays that of a working model)."""
    code, out, err = run(capsys, "train", "--out", tmp_path / "run", "--epochs", "1", "--beta", "1e8", "--data-dir",
                         data_dir, *SMALL)
    assert code == 0, err
    assert "train β-ELBO (β = 100000000.00)" in out and -1000 < float(out.split("train ELBO")[1].split(",")[0]) < 0


def test_a_divergence_names_the_limit_its_value_passed(tmp_path, tiny_arrays):
    """With β > 1 the β-ELBO trained has a limit β times the ELBO's: a divergence of it named the ELBO's limit
    (until 2026-12-05), which the value had passed by far less than the line implied; each now names its own."""
    from vaelab.config import ObjectiveConfig, RunConfig, TrainConfig
    from vaelab.data import DataConfig, prepare
    from vaelab.models import ModelConfig

    config = RunConfig(model=ModelConfig(hidden=((32,),), latent=(4,)), data=DataConfig(test_examples=50),
                       train=TrainConfig(epochs=1), objective=ObjectiveConfig(beta=10.0))
    trainer = training.Trainer(config, tmp_path, prepare(tiny_arrays, config.data), torch.device("cpu"),
                               log=lambda m: None, progress=False)
    limit, batch = trainer.loss_limit, config.train.batch_size                    # 784·ln 2·1000 ≈ 5.43e5
    beta_elbo_beyond = torch.tensor([[-20 * limit * batch, -100.0 * batch]])     # (objective, ELBO) batch sums
    # each value named as what it is, a bound (negative), not "the loss" (until 2026-12-06 "the loss became …")
    with pytest.raises(TrainingDiverged, match=r"^the β-ELBO \(β = 10.00\) became -1.087e\+07 nats per example at "
                                               r"epoch 1, step 1 \(below -5.43e\+06, β = 10 times the ELBO's limit "
                                               r"of -5.43e\+05, 1000× the -784·ln 2 nats of predicting ½ for every "
                                               r"pixel"):
        trainer._check_loss(beta_elbo_beyond, 1, 0)
    elbo_beyond = torch.tensor([[-100.0 * batch, -2 * limit * batch]])
    with pytest.raises(TrainingDiverged, match=r"^the ELBO became -1.087e\+06 nats per example at epoch 1, step 1 "
                                               r"\(below -5.43e\+05, 1000× the -784·ln 2 nats"):
        trainer._check_loss(elbo_beyond, 1, 0)
    # inside a KL warm-up, the β of that very step: the third step of epoch 2, a warm-up of 4 epochs
    trainer.config = dataclasses.replace(config, objective=ObjectiveConfig(name="iwae", samples=5, beta=10.0,
                                                                           warmup_epochs=4))
    steps = trainer.steps_per_epoch
    nan = torch.tensor([[-100.0 * batch] * 2] * 2 + [[math.nan, math.nan]])          # two good steps, then NaN
    beta = training.kl_weight(steps + 2, steps, 10.0, 4)
    with pytest.raises(TrainingDiverged, match=rf"^the β-IWAE-5 \(β = {beta:.2f}\) became nan nats per example at "
                                               r"epoch 2, step 3; "):
        trainer._check_loss(nan, 2, 0)


# ---- 4. files that vaelab did not write -----------------------------------------------------------------------


def test_a_hand_written_record_is_skipped_with_a_note_and_the_rest_is_shown(evaluated, data_dir, tmp_path, capsys):
    root = tmp_path / "runs"
    run_dir = root / "mine"
    shutil.copytree(evaluated, run_dir)
    shutil.copytree(evaluated, root / "other")
    (run_dir / "eval-mine.json").write_text('{"nll": 85.3}')
    (run_dir / "eval-broken.json").write_text("{not json")
    code, out, err = run(capsys, "runs", root)
    assert code == 0 and "mine" in out and "other" in out and "Traceback" not in err
    notes = err.strip().splitlines()
    assert len(notes) == 2 and all(line.startswith("note: ") for line in notes)
    assert re.search(r"eval-mine.json: not a vaelab evaluation record \(no '\w+'\); skipped", err)
    assert "eval-broken.json: not a vaelab evaluation record (not readable JSON" in err

    code, _, err = run(capsys, "compare", run_dir, root / "other", "--out", tmp_path / "c.html")
    assert code == 0 and "eval-mine.json: not a vaelab evaluation record" in (tmp_path / "c.html").read_text()
    code, _, err = run(capsys, "report", run_dir, "--data-dir", data_dir)
    assert code == 0 and "eval-mine.json: not a vaelab evaluation record" in (run_dir / "report.html").read_text()


@pytest.mark.slow      # 8 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_record_that_holds_only_what_a_record_must_is_shown_in_the_report(evaluated, data_dir, tmp_path, capsys):
    """A record written by hand, or by a vaelab before a field existed, with only the fields runs.RECORD_FIELDS asks
    for: `runs` and `compare` showed it, and `report` ended in a traceback (until 2026-12-06: KeyError
    'posterior_mean_variance' where its layers lack the per-unit statistics, then jinja's "no attribute 'seconds'").
    Now the page shows its NLL, and computes the latent statistics it lacks; a record whose "weights" or "per_digit"
    (file names) are of another type is skipped with a note, as one that lacks a field."""
    run_dir = tmp_path / "mine"
    shutil.copytree(evaluated, run_dir)
    record = {"nll": 90.125, "nll_stderr": 0.5, "elbo": -95.0, "k": 100, "n_examples": 500,    # conftest's 500
              "estimates": [{"name": "IWAE-100", "mean": -90.125, "stderr": 0.5, "kind": "stochastic lower bound"}],
              "layers": [{"layer": 1, "latent": 4, "active_units": 3, "kl": 20.0}]}
    (run_dir / "eval-mine.json").write_text(json.dumps(record))
    code, _, err = run(capsys, "report", run_dir, "--data-dir", data_dir, "--out", tmp_path / "r.html")
    assert code == 0 and "Traceback" not in err, err
    page = (tmp_path / "r.html").read_text()
    assert "90.12 ± 0.50" in page and "computed for this page on the 500 test digits" in page
    # a field that names a file, of another type: the record is not one (it ended report and compare in a TypeError)
    (run_dir / "eval-mine.json").write_text(json.dumps({**record, "weights": 5}))
    code, out, err = run(capsys, "runs", tmp_path)
    assert code == 0 and "eval-mine.json: not a vaelab evaluation record ('weights' is 5); skipped" in err, err
    for command in (["report", run_dir, "--data-dir", data_dir, "--out", tmp_path / "r.html"],
                    ["compare", run_dir, evaluated, "--out", tmp_path / "c.html"]):
        code, _, err = run(capsys, *command)
        assert code == 0 and "Traceback" not in err, err
    # its lists of another type, a number or true (until 2026-12-06 a TypeError in runs, compare and report)
    for key, value in (("estimates", 5), ("layers", True), ("layers", -1)):
        (run_dir / "eval-mine.json").write_text(json.dumps({**record, key: value}))
        code, out, err = run(capsys, "runs", tmp_path)
        said = f"eval-mine.json: not a vaelab evaluation record ({key!r} is {value!r}); skipped"
        assert code == 0 and said in err, err
        for command in (["report", run_dir, "--data-dir", data_dir, "--out", tmp_path / "r.html"],
                        ["compare", run_dir, evaluated, "--out", tmp_path / "c.html"]):
            code, out, err = run(capsys, *command)
            assert code == 0 and "Traceback" not in err, err


def test_a_record_under_a_name_of_ones_own_is_shown_and_compared(evaluated, data_dir, tmp_path, capsys):
    """`evaluate RUN --out RUN/best.json`: until 2026-12-05 only eval*.json was read, so that `runs` and `report`
    did not show the record and `compare RUN/best.json …` called it "not an evaluation record". A JSON file of the
    user's own in the run is passed over without a note (one named eval*.json still gets one)."""
    run_dir = tmp_path / "mine"
    shutil.copytree(evaluated, run_dir)
    (run_dir / "notes.json").write_text('{"idea": "try a larger K"}')
    code, _, _ = run(capsys, "evaluate", run_dir, "--k", "4", "--test-examples", "20", "--out", run_dir / "best.json",
                     "--data-dir", data_dir, "--no-progress")
    assert code == 0
    code, out, err = run(capsys, "runs", tmp_path)
    assert code == 0 and err == "" and "(K 4, 20 test digits, epoch 3)" in out
    code, out, err = run(capsys, "compare", run_dir / "best.json", evaluated, "--out", tmp_path / "c.html")
    assert code == 0 and "IWAE-4, 20 digits" in out and "not an evaluation record" not in err + out


def test_report_on_a_file_says_it_is_not_a_run_directory(evaluated, capsys):
    code, _, err = run(capsys, "report", evaluated / ckpt.CONFIG)
    assert code == 2 and one_line(err) and "is a file, not a run directory" in err and "does not exist" not in err


# ---- 5. the Python API ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, words", [
    ({"preset": "nope"}, ["preset", "invalid choice", "'seed'"]),
    ({"epochs": -1}, ["epochs", "at least 1", "-1"]),
    ({"epochz": 3}, ["unknown keyword argument epochz (epochs?)"]),
    # a prefix of a flag is not its keyword (until 2026-12-06 argparse's abbreviations passed: epoch=1 trained)
    ({"epoch": 1, "train_ex": 64}, ["unknown keyword arguments epoch (epochs?), train_ex (train_examples?)"]),
    ({"epochs": [1, 2]}, ["epochs=[1, 2]: more values than the flag takes"]),     # was "unknown keyword argument ;"
    ({"train_examples": 10**6}, ["train_examples=1000000: the data set has 2000 training digits"]),  # "…= 1000000"
    ({"early_stopping": 2}, ["give validation=N (e.g. 10000) or early_stopping=0"]),           # "validation= N"
    # a flag with one of its choices (it read "engine= fused covers only …; use engine= auto or autograd")
    ({"engine": "fused", "activation": "tanh"}, ["engine='fused' covers only", "use engine='auto' or autograd"]),
    ({"flow_steps": 3}, ["flow_steps=3 without a flow: add flow='planar' or flow='iaf'"]),
    # a device is a choice without a list (it read "device= cuda was asked for …; use device= cpu or auto")
    pytest.param({"device": "cuda:1"}, ["device='cuda:1' was asked for", "use device='cpu' or auto"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU: cuda:1 may be one")),
    ({"device": "gpu"}, ["unknown device 'gpu'; use auto, cpu, cuda or cuda:N"]),
    # flags of several values as the lists their keywords take (until 2026-12-07 "give hidden=W W …, got ((256,),)"
    # and "latent= d₁ … d_L")
    ({"model": "tomczak"}, ["give hidden=[W, W] (and hidden_top=[W, W], the same W, for two layers), got "
                            "hidden=[256]"]),
    ({"model": "tomczak", "latent": [4, 2], "hidden": [30, 30], "hidden_top": [20, 10]},
     ["got hidden=[30, 30] hidden_top=[20, 10]"]),
    ({"model": "hvae", "latent": [4]}, ["give 2 to 64 latent sizes (latent=[d₁, …, d_L]), got latent=[4]"]),
])
def test_api_errors_carry_the_reason_in_the_apis_terms(flags, words, data_dir, capsys):
    with pytest.raises(UsageError) as error:
        vaelab.train(**flags, data_dir=str(data_dir))
    message = str(error.value)
    assert all(word in message for word in words), message
    assert "--" not in message and capsys.readouterr().err == ""


@pytest.mark.parametrize("kwargs, message", [
    ({"config": "seed"}, "config must be a RunConfig or a dict as in config.json, got str; for a preset pass "
                         "preset='seed'"),                                     # AttributeError: no attribute 'validate'
    ({"out": 5}, "out must be a path (str or pathlib.Path), got int"),        # TypeError from pathlib
    # flags written as a dict: "config version None is not one this vaelab reads …, written by another version"
    ({"config": {"lr": 1e-3, "hidden": [64]}}, 'a config dict is a whole config.json (its "version" and sections, '
     "json.load of a run's config.json, or vaelab.config.RunConfig().to_dict()); for the command's flags pass "
     "keywords: vaelab.train(lr=0.001, hidden=[64])"),
])
def test_api_train_names_a_config_or_out_of_the_wrong_kind(kwargs, message):
    with pytest.raises(UsageError) as error:
        vaelab.train(**kwargs)
    assert str(error.value) == f"vaelab.train: {message}"


def test_api_train_says_its_notes_in_the_api_terms_and_the_command_in_its_own(tmp_path, data_dir, capsys):
    """A flag the model does not read, and a flow of 0 steps, are noted by `vaelab.train` with its keywords (until
    2026-12-08 "--prior-components 3 is not read …, give --flow-steps T"); the command still names its flags."""
    flags = dict(epochs=1, hidden=[16], latent=[2], test_examples=20, flow="planar", prior_components=3)
    vaelab.train(out=tmp_path / "api", data_dir=data_dir, **flags)
    api = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert api == ["note: prior_components=3 is not read by this model (the standard prior has no components); "
                   "config.json keeps it, and it changes nothing",
                   "note: flow='planar' has 0 steps (flow_steps= defaults to 0), which is the Gaussian q(z|x) itself, "
                   "no flow: give flow_steps=T (the preset planar-80 takes 80)"]
    assert main(["train", "--out", str(tmp_path / "cli"), "--data-dir", str(data_dir), "--no-progress", "--epochs", "1",
                 "--hidden", "16", "--latent", "2", "--test-examples", "20", "--flow", "planar",
                 "--prior-components", "3"]) == 0
    cli = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(cli) == 2 and cli[0].startswith("note: --prior-components 3 is not read"), cli
    assert cli[1].startswith("note: --flow planar has 0 steps (--flow-steps defaults to 0)"), cli
    assert "give --flow-steps T" in cli[1], cli


def test_api_train_runs_in_a_thread_other_than_the_main_one(tmp_path, data_dir):
    """`vaelab.train` from a worker thread (a notebook's background job, a web app) raised "ValueError: signal only
    works in main thread of the main interpreter" at its first epoch: no stop signal is taken there now, and the run
    trains and resumes as in the main thread."""
    import threading

    done = {}

    def job():
        try:
            run = vaelab.train(out=tmp_path / "run", epochs=1, hidden=[16], latent=[2], data_dir=data_dir,
                               test_examples=50, no_progress=True)
            done["first"] = run.status, len(run.metrics)
            run = vaelab.train(out=tmp_path / "run", resume=True, epochs=2, no_progress=True)
            done["resumed"] = run.status, len(run.metrics)
        except BaseException as exc:            # noqa: BLE001 - carried to the test's thread
            done["error"] = exc

    before = {signum: signal.getsignal(signum) for signum in training.STOP_SIGNALS}
    thread = threading.Thread(target=job)
    thread.start()
    thread.join(300)
    assert "error" not in done, done.get("error")
    assert done == {"first": ("finished", 1), "resumed": ("finished", 2)}
    assert {signum: signal.getsignal(signum) for signum in training.STOP_SIGNALS} == before   # the main thread's


def test_api_train_names_the_call_that_goes_on_after_a_divergence_or_a_stop(tmp_path, data_dir, monkeypatch):
    """A run that diverged in `vaelab.train`, or was stopped, raised the command's message: "vaelab train --out r
    --resume --lr X or --clip-grad-norm C" (until 2026-12-07). It names the call now, as the other errors do; the
    run's train.log keeps the command. A command inside a UsageError became "vaelab train out= r resume=True"."""
    from vaelab.api import in_api_terms
    from vaelab.errors import TrainingDiverged

    out = tmp_path / "r b"
    vaelab.train(out=out, epochs=1, hidden=[16], latent=[2], data_dir=data_dir, train_examples=300,
                 test_examples=20)
    with pytest.raises(TrainingDiverged) as error:
        vaelab.train(out=out, resume=True, epochs=3, lr=3.0)
    message = str(error.value)
    assert message.startswith("vaelab.train: the ELBO became ") and error.value.what in message
    assert message.endswith(f"vaelab.train(out={str(out)!r}, resume=True, lr=X) or clip_grad_norm=C"), message
    assert "--" not in message and error.value.exit_code == 1
    assert vaelab.load_run(out).status == "diverged"
    # a stop signal after the first epoch of another run, whose path the shell must quote
    real = training.Trainer._run_epoch

    def then_a_signal(self):
        real(self)
        self._signal = signal.SIGTERM

    monkeypatch.setattr(training.Trainer, "_run_epoch", then_a_signal)
    with pytest.raises(training.Interrupted) as error:
        vaelab.train(out=tmp_path / "s t", epochs=3, hidden=[16], latent=[2], data_dir=data_dir,
                     train_examples=300, test_examples=20)
    assert str(error.value).endswith(f"resume with: vaelab.train(out={str(tmp_path / 's t')!r}, resume=True)")
    assert error.value.exit_code == 143 and "--" not in str(error.value)
    assert "resume with: vaelab train --out " in (tmp_path / "s t" / training.TRAIN_LOG).read_text()
    assert in_api_terms("stopped by SIGTERM after epoch 1; checkpoint written to r b (it resumes exactly); resume "
                        "with: vaelab train --out 'r b' --resume") == (
        "stopped by SIGTERM after epoch 1; checkpoint written to r b (it resumes exactly); resume with: "
        "vaelab.train(out='r b', resume=True)")
    assert in_api_terms("then `vaelab train --out ./-r --resume --epochs N --no-batch-norm`.") == (
        "then `vaelab.train(out='./-r', resume=True, epochs=N, batch_norm=False)`.")
    assert in_api_terms("got --blocks 512,512 256 128; use --hidden 300 300 --hidden-top 200 100, or --lr 0.5.") == (
        "got blocks=[[512, 512], [256], [128]]; use hidden=[300, 300] hidden_top=[200, 100], or lr=0.5.")
    # the word after a switch is the sentence's: "… then: vaelab.train(out='r', resume=True) them again" lost "draws"
    # (a full disk, or a stop, while the last pictures were drawn; until 2026-12-07)
    assert in_api_terms("free some space, then: vaelab train --out r --resume draws them again") == (
        "free some space, then: vaelab.train(out='r', resume=True) draws them again")
    assert in_api_terms("vaelab train --out r --no-batch-norm now, or --epochs 3 more") == (
        "vaelab.train(out='r', batch_norm=False) now, or epochs=3 more")
    # a path with a quote, as shlex.quote writes it (until 2026-12-07 "out='it')\"'\"'s run' resume=True")
    from vaelab.tables import shell_word

    assert in_api_terms(f"resume with: vaelab train --out {shell_word(chr(39).join(['Tom', 's run']))} --resume") == (
        "resume with: vaelab.train(out=\"Tom's run\", resume=True)")


def test_api_train_takes_false_against_a_preset_blocks_as_lists_arrays_and_a_dash_path(tmp_path, data_dir,
                                                                                      monkeypatch):
    """Until 2026-12-06 `batch_norm=False` was dropped, so `preset="ladder-5"` trained with batch norm all the same;
    `blocks=[[8, 8], [6, 6]]` failed ("blocks: expected a whole number … got '[8'"), and so did `out="-run"`
    ("out: expected one argument"). The keywords are now written as a sweep writes a trial's flags."""
    monkeypatch.chdir(tmp_path)
    run = vaelab.train(out="-run", preset="ladder-5", batch_norm=False, blocks=[[8, 8], [6, 6]],
                       latent=np.array([3, 2]), engine="autograd", epochs=1, train_examples=64, test_examples=16, data_dir=data_dir)
    assert run.path == Path("-run") and run.status == "finished"
    assert run.config.model.batch_norm is False
    assert run.config.model.hidden == ((8, 8), (6, 6)) and run.config.model.latent == (3, 2)
    assert run.config.train.lr == 2e-3                  # the rest is the preset's
    with pytest.raises(UsageError) as error:            # (it read "preset= seed")
        vaelab.train(out="-run", resume=True, preset="seed")
    assert str(error.value) == ("vaelab.train: resume=True with preset='seed', but the run started from preset "
                                "'ladder-5'; resume without preset=")


def test_api_train_gives_the_callers_random_streams_and_threads_back(tmp_path, data_dir):
    """`vaelab.train` seeds torch's, NumPy's and Python's global random streams (the weights' initialisation draws
    from torch's) and sets torch's threads, as the command does in its own process: the caller's process gets all of
    them back as they were (until 2026-12-06 they stayed seeded with the run's seed, so that a loop drawing
    np.random.rand() around vaelab.train drew the same numbers each time round, and threads=1 left the caller's torch
    on one thread); the run itself is what the command trains. Opening a run keeps the caller's stream too."""
    import random

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        torch.manual_seed(123), np.random.seed(7), random.seed(5)
        states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
        run = vaelab.train(out=tmp_path / "api", epochs=1, hidden=[8], latent=[2], data_dir=data_dir,
                           train_examples=300, test_examples=20, threads=1)
        after = torch.rand(3), np.random.rand(3), random.random(), torch.get_num_threads()
        torch.random.set_rng_state(states[0]), np.random.set_state(states[1]), random.setstate(states[2])
        expected = torch.rand(3), np.random.rand(3), random.random(), 3
        assert torch.equal(after[0], expected[0]) and np.array_equal(after[1], expected[1]) and after[2:] == expected[2:]
    finally:
        torch.set_num_threads(before)
    assert main(["train", "--out", str(tmp_path / "cli"), "--epochs", "1", "--hidden", "8", "--latent", "2",
                 "--data-dir", str(data_dir), "--train-examples", "300", "--test-examples", "20", "--threads", "1",
                 "--no-progress"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == (run.path / "model.safetensors").read_bytes()
    # opening a run's model: its modules initialise from torch's stream before the file's weights replace them
    # (until 2026-12-06 that moved the caller's stream on), and its draws come from their own seeds
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    opened = vaelab.load_run(run.path)
    samples, log_px = opened.sample(4, seed=1), opened.log_likelihood(torch.ones(2, 784), k=3)
    assert torch.equal(torch.rand(3), expected) and samples.shape == (4, 784) and log_px.shape == (2,)


def test_api_load_run_names_a_path_of_the_wrong_kind():
    with pytest.raises(UsageError, match=r"^vaelab.load_run: path must be a run directory \(str or pathlib.Path\), "
                                         r"got int$"):
        vaelab.load_run(3)                                    # TypeError from pathlib


def test_api_refuses_bad_arguments_before_torch_does(evaluated):
    run = vaelab.load_run(evaluated)
    x = (torch.rand(3, 784, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    with pytest.raises(UsageError, match="k must be a whole number ≥ 1 and below 2⁶³, got -3"):
        run.log_likelihood(x, k=-3)
    with pytest.raises(UsageError, match="seed must be a whole number ≥ 0 and below 2⁶³, got 2361183241434822606848"):
        run.sample(4, seed=2**71)                            # (the line said "≥ 0" of it)
    with pytest.raises(UsageError, match=r"784 pixels per digit.* got shape \(10, 100\)"):
        run.encode(torch.zeros(10, 100))
    for shape in ((3, 28, 28), (3, 1, 28, 28)):              # torch's image batches (one channel) were refused
        assert torch.equal(run.log_likelihood(x.reshape(shape), k=5), run.log_likelihood(x, k=5))
    with pytest.raises(UsageError, match=r"needs binary digits \(pixels 0 or 1\).*binarise them first"):
        run.log_likelihood(x * 0.5, k=5)                     # grey values: a cross-entropy, not log p(x)
    assert run.encode(x * 0.5)[0].shape == (3, 4)           # the encoder takes probabilities
    with pytest.raises(UsageError, match=r"found values from 0 to 255 \(bytes 0 … 255\? divide by 255\)$"):
        run.encode((x * 255).to(torch.uint8))                # MNIST's raw bytes
    holed = x.clone()
    holed[0, :2] = float("nan")
    with pytest.raises(UsageError, match=r"found values from 0 to 1 and 2 NaN$"):
        run.encode(holed)                                    # the NaN counted, not read as -1 and 2
    with pytest.raises(UsageError, match=r"found 784 NaN$"):
        run.encode(torch.full((1, 784), float("nan")))
    with pytest.raises(UsageError, match="checkpoint='bset': choose one of 'last', 'best'"):
        vaelab.load_run(evaluated, checkpoint="bset")
    with pytest.raises(UsageError, match="has no model-best.safetensors"):
        vaelab.load_run(evaluated, checkpoint="best")
    values = run.log_likelihood(x, k=5)
    assert isinstance(values, torch.Tensor) and values.shape == (3,) and bool(torch.isfinite(values).all())
    assert run.encode(x.reshape(3, 28, 28))[0].shape == (3, 4)


def test_api_refuses_what_is_not_real_numbers_and_sizes_that_cannot_fit(evaluated, monkeypatch):
    from vaelab import resources

    run = vaelab.load_run(evaluated)
    for bad, kind in ((None, "NoneType"), ([["a"] * 4], "list"), ({"z": 1}, "dict")):
        with pytest.raises(UsageError, match=f"z must be latents as an array or tensor of numbers, got {kind}$"):
            run.decode(bad)                                  # torch said "must be real number, not NoneType"
    with pytest.raises(UsageError, match="z must be latents as real numbers, got Tensor of torch.complex64$"):
        run.decode(torch.zeros(2, 4, dtype=torch.complex64))  # torch dropped the imaginary part with a warning
    with pytest.raises(UsageError, match="x must be digits as real numbers, got ndarray of torch.complex128$"):
        run.encode(np.zeros((2, 784), dtype=complex))
    with pytest.raises(UsageError, match=r"z must be latents shaped \(B, 4\); got shape \(4,\)$"):
        run.decode(torch.zeros(4))
    with pytest.raises(UsageError, match="z must be finite; it holds 2 infinite or NaN values$"):
        run.decode(torch.tensor([[0.0, float("inf"), float("nan"), 0.0]]))
    assert run.decode(np.zeros((2, 4), dtype=np.int64)).shape == (2, 784)      # whole numbers are real numbers
    monkeypatch.setattr(resources, "available_memory", lambda: (1 << 30, "MemAvailable"))
    with pytest.raises(ResourceError, match=r"sample\(n=1000000\) needs about .* GiB of memory, but only 1.0 GiB is "
                                            r"available \(MemAvailable\); use a smaller n"):
        run.sample(10**6)                                    # was killed by the kernel's OOM killer at 10⁹
    with pytest.raises(ResourceError, match="decode of 1000000 latents needs about"):
        run.decode(torch.zeros(1, 4).expand(10**6, 4))       # 16 MB of latents, 3 GB of pixels
    assert run.sample(3).shape == run.decode(torch.zeros(3, 4)).shape == (3, 784)


def test_rerunning_the_api_example_says_what_to_do_in_python(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("VAELAB_DATA", str(data_dir))
    out = tmp_path / "api-example"
    kwargs = dict(epochs=1, hidden=[16], latent=[3], train_examples=300, test_examples=20)
    vaelab.train(out=out, **kwargs)
    with pytest.raises(UsageError) as error:
        vaelab.train(out=out, **kwargs)
    message = str(error.value)
    assert "vaelab.load_run(" in message and "resume=True" in message and "--" not in message
    run = vaelab.train(out=out, resume=True, epochs=2)
    assert run.epochs_done == 2 and run.status == "finished"


def test_dir_of_vaelab_lists_the_api():
    names = set(dir(vaelab))
    assert {"load_run", "train", "Run", "__version__", "evaluation", "presets", "gaps", "sweep"} <= names
    # every module by attribute after `import vaelab`, in a fresh interpreter where none is imported yet (vaelab.gaps
    # and vaelab.sweep were AttributeErrors); importing vaelab imports none of them
    modules = sorted(path.stem for path in Path(vaelab.__file__).parent.glob("[!_]*.py"))
    script = ("import sys, vaelab; assert not [m for m in sys.modules if m.startswith('vaelab.')]; "
              f"print([getattr(vaelab, name).__name__ for name in {modules!r}])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == str([f"vaelab.{name}" for name in modules]), done.stderr


# ---- 6. torchrun when a worker dies ---------------------------------------------------------------------------


def test_a_killed_torchrun_worker_leaves_one_line_per_survivor(tmp_path, data_dir, children_temp):
    from test_distributed import kill_all, torchrun

    run_dir = tmp_path / "run"
    process = torchrun("train", "--out", run_dir, "--epochs", "20", "--hidden", "256", "--latent", "8",
                       "--batch-size", "32", "--test-examples", "50", "--data-dir", data_dir, "--no-progress")
    metrics = run_dir / ckpt.METRICS
    deadline = time.monotonic() + 120
    while not metrics.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    rank1 = None
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"RANK=1" in environ and str(run_dir).encode() in command:
            rank1 = pid
    assert rank1 is not None, "rank 1 not found"
    os.kill(rank1, signal.SIGKILL)
    try:
        _, err = process.communicate(timeout=120)
    finally:
        kill_all(process)
    ours = [line for line in err.splitlines() if line.startswith("[rank0]") or line.startswith("vaelab train")]
    assert len(ours) == 1, err
    assert "lost rank 1" in ours[0] and "the checkpoint of epoch" in ours[0]
    assert f"resume with: torchrun --nproc-per-node 2 -m vaelab train --out {run_dir} --resume" in ours[0]
    assert "[rank0]: Traceback" not in err


def test_a_worker_that_lost_a_rank_ignores_torchruns_sigterm_while_it_says_why():
    """torchrun's agent sends SIGTERM to every worker once one has failed; a worker that learnt of it in a collective
    (RankLost, inside the trainer's signal handlers) leaves them with SIGTERM ignored, so that the default action
    cannot kill it before its one line (which the test above once missed under load: rank 0 exited by SIGTERM,
    silent). Any other way out restores the handler there was."""
    from vaelab.distributed import RankLost

    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(RankLost):
            with training.stop_signals(lambda signum, frame: None):
                raise RankLost("rank 0 of 2 lost rank 1 (Connection closed by peer)")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        signal.signal(signal.SIGTERM, before)
        with pytest.raises(ValueError):
            with training.stop_signals(lambda signum, frame: None):
                raise ValueError("a failure of another kind")
        assert signal.getsignal(signal.SIGTERM) == before
    finally:
        signal.signal(signal.SIGTERM, before)


# ---- 7. what the log and the commands say ---------------------------------------------------------------------


@pytest.mark.parametrize("words, hint", [
    (["train", "--beta", "-inf"], "; -inf begins with a dash, so it was read as a flag: write it --beta=-inf"),
    (["train", "--lr", "-1e-3"], "; -1e-3 begins with a dash, so it was read as a flag: write it --lr=-1e-3"),
    (["train", "--hidden", "-inf", "3"], "; -inf begins with a dash, so it was read as a flag: write it --hidden=-inf"),
    (["sample", "--out", "-x.png", "r"],
     "; -x.png begins with a dash, so it was read as a flag: write it --out=-x.png"),
    (["train", "--beta", "--lr", "3"], ""),                 # a flag of the command: the value was left out
    (["train", "--beta", "-h"], ""),
    (["train", "--beta"], ""),
])
def test_a_value_that_begins_with_a_dash_is_named_with_the_way_to_pass_it(words, hint, capsys):
    """argparse reads `-inf`, `-1e-3`, `-x.png` as flags (no negative number by its pattern) and said only "expected
    one argument", as though no value had been given (until 2026-12-06)."""
    with pytest.raises(SystemExit) as stopped:
        main(words)
    out, err = capsys.readouterr()
    expected = "at least one" if words[1] == "--hidden" else "one"
    assert stopped.value.code == 2 and one_line(err) and out == ""
    assert err.strip().endswith(f"argument {words[1]}: expected {expected} argument{hint}"), err


@pytest.mark.parametrize("words, message", [
    (["evaluate", "r", "--K", "5"],
     "vaelab evaluate: error: unrecognized arguments: --K 5; did you mean --k (for --K)?"),
    (["evaluate", "r", "--gapsteps=5", "x"],
     "vaelab evaluate: error: unrecognized arguments: --gapsteps=5 x; did you mean --gap-steps (for --gapsteps)?"),
    (["sample", "r", "--k", "5"], "vaelab sample: error: unrecognized arguments: --k 5"),     # (not "--n?")
    (["runs", ".", "extra"], "vaelab runs: error: unrecognized arguments: extra"),
])
def test_words_no_flag_takes_are_the_commands_error_with_the_flag_meant(words, message, capsys):
    """argparse's top parser reported them, "vaelab: error: unrecognized arguments: --K 5", as if of no command
    (until 2026-12-07)."""
    with pytest.raises(SystemExit) as stopped:
        main(words)
    out, err = capsys.readouterr()
    assert stopped.value.code == 2 and out == "" and err == message + "\n"


@pytest.mark.parametrize("flag, text, held", [("--clip-grad-norm", "1e-400", "0"), ("--adam-eps", "1e-400", "0"),
                                              ("--beta", "1e400", "inf"), ("--lr", "2e-1_000", "0")])
def test_a_number_a_float_cannot_hold_is_refused_not_rounded(flag, text, held, capsys):
    """`--clip-grad-norm 1e-400` is 0 as a float, which turned clipping off without a word (until 2026-12-06), and
    `--adam-eps 1e-400` said "must be a finite number > 0, got 1e-400"; each is now named with what the float holds."""
    with pytest.raises(SystemExit) as stopped:
        main(["train", flag, text])
    out, err = capsys.readouterr()
    assert stopped.value.code == 2 and one_line(err) and out == ""
    assert err.strip().endswith(f"argument {flag}: got {text}, which a 64-bit float holds as {held}; give a number "
                                f"between 1e-300 and 1e300 in size"), err


def test_a_small_beta_is_not_shown_as_zero(tmp_path, data_dir, capsys):
    """A warm-up of 1000 epochs ends its first at β = 0.001: until 2026-12-06 the epoch line said "β-ELBO (β = 0.00)"
    and the note "β ends at 0.00", as though the KL were not trained at all."""
    code, out, err = run(capsys, "train", "--warmup", "1000", "--epochs", "1", "--out", tmp_path / "run", "--data-dir",
                         data_dir, *SMALL)
    assert code == 0
    # β rose through the epoch from its first step's 1/(1000 × steps) (until 2026-12-07 labelled by its last alone)
    steps = math.ceil(int(SMALL[SMALL.index("--train-examples") + 1]) / 64)
    first = f"{1 / (1000 * steps):.2g}"
    assert f"train β-ELBO (β from {first} to 0.001) " in out and "β ends at 0.001," in err
    assert f"β-ELBO (β from {first} to 0.001)" in (tmp_path / "run" / training.TRAIN_LOG).read_text()


def test_the_epoch_line_names_the_objective_with_its_beta_and_puts_units_where_they_belong(tmp_path, data_dir,
                                                                                           capsys):
    code, out, err = run(capsys, "train", "--preset", "cpu-hour", "--epochs", "2", "--hidden", "32", "--hidden-top",
                         "16", "--latent", "4", "2", "--threads", "1", "--out", tmp_path / "run", "--data-dir",
                         data_dir, *SMALL[4:])
    assert code == 0
    assert "1 thread," in out and "1 threads" not in out
    epoch = next(line for line in out.splitlines() if line.startswith("epoch   1/2"))
    # the epoch's β-ELBO is its steps' mean, over the β of each: from the first step's to the last's
    assert "train β-ELBO (β from 0.0" in epoch and "to 0.10)" in epoch and "nats per example; " in epoch
    assert epoch.endswith(" s")
    log = (tmp_path / "run" / training.TRAIN_LOG).read_text()
    assert re.search(r"β-ELBO \(β from 0\.1[0-9] to 0\.20\)", log), log
    assert "schedule: learning rate 0.001 falling exponentially" in out
    assert "note: the KL warm-up of 10 epochs will not finish in 2: β ends at 0.20" in err
    assert "note: preset cpu-hour spans its decay over 520 epochs" in err


def test_a_resume_that_re_spans_the_exponential_decay_says_so(tmp_path, data_dir, capsys):
    """Each epoch's exponential rate is lr·10^(−e/(epochs − 1)): a resume with --epochs 4 of a run of 2 moved the
    epochs left onto the 4-epoch curve, so the rate rose from 1e-4 (epoch 2) to 2.15e-4 (epoch 3) while the schedule
    line read "falling exponentially … over the 4 epochs of this run" and nothing said that it rose."""
    from vaelab.runs import read_metrics
    from vaelab.schedules import exponential_lr

    common = ["--out", tmp_path / "run", "--lr-schedule", "exponential", "--hidden", "16", "--latent", "2",
              "--data-dir", data_dir, *SMALL[2:]]
    assert run(capsys, "train", "--epochs", "2", *common)[0] == 0
    code, out, err = run(capsys, "train", "--resume", "--epochs", "4", *common)
    assert code == 0, err
    assert "(re-spanned by this resume: until epoch 2 the decay spanned 2 epochs)" in out
    assert ("note: --epochs 4 re-spans the exponential decay, which spanned the run's 2 epochs until now: epoch 3 "
            "trains at 0.000215 where epoch 2 trained at 0.0001, and the rate reaches 0.0001 in epoch 4") in err, err
    rates = [row["lr"] for row in read_metrics(tmp_path / "run" / "metrics.csv")]
    assert rates == pytest.approx([1e-3, 1e-4, exponential_lr(2, 1e-3, 4), 1e-4], rel=1e-5)
    assert "re-spanned by this resume" in (tmp_path / "run" / training.TRAIN_LOG).read_text()
    code, out, err = run(capsys, "train", "--resume", "--epochs", "5", *common)   # from the curve of 4, now of 5
    assert code == 0 and "until epoch 4 the decay spanned 4 epochs" in out and "epoch 5 trains at 0.0001 where " \
        "epoch 4 trained at 0.0001" in err, err
    code, out, err = run(capsys, "train", "--resume", "--epochs", "5", *common)   # nothing re-spanned: no note
    assert code == 0 and "re-spanned" not in out + err
    # metrics.csv wrote rates to six decimals: 2.154e-4 as 0.000215, and 3e-7 as 0.000000
    assert run(capsys, "train", "--epochs", "1", "--lr", "3e-7", *common[2:], "--out", tmp_path / "slow")[0] == 0
    assert read_metrics(tmp_path / "slow" / "metrics.csv")[0]["lr"] == pytest.approx(3e-7, rel=1e-6)


def test_burdas_schedule_cut_short_is_said(tmp_path, data_dir, capsys):
    code, out, err = run(capsys, "train", "--preset", "burda-vae-1", "--epochs", "1", "--hidden", "16", "16",
                         "--out", tmp_path / "run", "--data-dir", data_dir, *SMALL[2:])
    assert code == 0 and "stage 0 (1 epoch)" in out and "Burda's schedule is cut short" in err


@pytest.mark.parametrize("text, value", [("1e6", 10**6), ("2.5e3", 2500), ("1E18", 10**18), ("1000", 1000)])
def test_whole_numbers_in_scientific_notation_are_accepted(text, value, capsys):
    from vaelab.cli import build_parser

    assert build_parser().parse_args(["stirling", "--n", text]).n == [value]
    assert main(["stirling", "--n", text]) == 0
    assert capsys.readouterr().out.count("\n") == 2


def test_stirling_prints_n_as_given(capsys):
    # N was printed in %g: 123456789012345678 as 1.23457e+17, and 999999999999999999 as 1e+18 (its float64)
    assert main(["stirling", "--n", "123456789012345678", "999999999999999999"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["123456789012345678", "999999999999999999"]


@pytest.mark.parametrize("text", ["1.5", "1e-3", "1e19", "nan", "1e999999"])
def test_other_numbers_are_still_refused(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["stirling", "--n", text])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and one_line(err) and "--n" in err


def test_compare_writes_beside_the_runs_and_shows_short_times(evaluated, tmp_path, capsys, monkeypatch):
    from vaelab.cli import default_comparison_page

    root = tmp_path / "runs"
    for name in ("a", "b"):
        shutil.copytree(evaluated, root / name)
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "compare", root / "a", root / "b")
    assert code == 0 and (root / "compare-a-b.html").exists() and not (tmp_path / "compare.html").exists()
    assert "training time" in out and "0.00" not in out and re.search(r"\d s ", out)
    assert default_comparison_page([root / f"run-{i:03d}-with-a-long-name" for i in range(9)]).name.startswith(
        "compare-run-000-with-a-long-name-and-8-more-")
    # runs that share no directory but the root: beside the first, never a page in /
    assert default_comparison_page([root / "a", Path("/elsewhere/b")]) == root / "compare-a-b.html"
    assert default_comparison_page([Path("/a"), Path("/b")]) == Path("/compare-a-b.html")     # runs in / itself


def test_a_page_replaces_only_a_page_vaelab_made(evaluated, tmp_path, capsys):
    mine = tmp_path / "notes.html"
    mine.write_text("<html><title>my notes</title><p>three weeks of them</p></html>")
    for command in (["compare", evaluated, evaluated], ["report", evaluated]):
        code, _, err = run(capsys, *command, "--out", mine)
        assert code == 2 and err.strip().endswith(f"--out {mine} exists and is not a page vaelab made; give another "
                                                  f"--out, or move that file away first")
    assert mine.read_text() == "<html><title>my notes</title><p>three weeks of them</p></html>"   # was replaced
    page = tmp_path / "page.html"
    assert run(capsys, "report", evaluated, "--out", page)[0] == 0
    code, out, _ = run(capsys, "compare", evaluated, evaluated, "--out", page)       # a vaelab page: made again
    assert code == 0 and "it replaces the earlier page" in out and "comparison" in page.read_text()[:400]


def test_compare_tells_apart_runs_of_the_same_name(evaluated, tmp_path, capsys):
    from vaelab.cli import default_comparison_page
    from vaelab.runs import distinct_labels

    for folder in ("one-hour-60", "one-hour-15"):
        shutil.copytree(evaluated, tmp_path / folder / "h4")
    first, second = tmp_path / "one-hour-60" / "h4", tmp_path / "one-hour-15" / "h4"
    code, out, _ = run(capsys, "compare", first, second, "--out", tmp_path / "c.html")
    rows = [line.split()[0] for line in out.splitlines()[2:4]]
    assert code == 0 and rows == ["one-hour-60/h4", "one-hour-15/h4"], out
    assert "one-hour-15/h4: its evaluations" in out       # the fixture's evaluation measured earlier weights
    html = (tmp_path / "c.html").read_text()
    assert "one-hour-60/h4" in html and "one-hour-15/h4" in html
    assert default_comparison_page([first, second]) == tmp_path / "compare-one-hour-60_h4-one-hour-15_h4.html"
    # the shortest tail that no other run shares; a path that is another's tail, whole; one run given twice, counted
    assert distinct_labels([first, second, tmp_path / "one-hour-60" / "h5"]) == [
        "one-hour-60/h4", "one-hour-15/h4", "h5"]
    assert distinct_labels([Path("/a/h4"), Path("/b/a/h4")]) == ["/a/h4", "b/a/h4"]
    assert distinct_labels([first, first]) == ["h4", "h4 (2)"]


def test_a_run_copied_without_its_training_state_is_listed_as_trained_and_refuses_to_resume(tmp_path, capsys):
    """tests/data's vaelab 0.2.0 `cpu-hour` run holds config, metrics, weights and an evaluation, no training state
    (as a run shared without it would): listed as finished (12 of 12 epochs), or "weights only" where its epochs fall
    short, never "not started"; --resume refuses in one line that offers evaluate, and changes nothing."""
    run_dir = tmp_path / "shared" / "cpu-hour"
    shutil.copytree(Path(__file__).parent / "data" / "runs-vaelab-0.2.0" / "cpu-hour", run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    code, out, _ = run(capsys, "runs", tmp_path / "shared")
    line = next(line for line in out.splitlines() if "cpu-hour" in line and "/" in line)
    assert code == 0 and "12/12" in line and "finished" in line and "not started" not in line
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--no-progress")
    assert code == 2 and one_line(err) and "holds trained weights without the training state" in err
    assert f"vaelab evaluate {run_dir}" in err and "remove" not in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != ".lock"} == before     # the flock's file
    config = json.loads((run_dir / "config.json").read_text())
    config["train"]["epochs"] = 20
    (run_dir / "config.json").write_text(json.dumps(config))
    code, out, _ = run(capsys, "runs", tmp_path / "shared")
    assert "weights only" in next(line for line in out.splitlines() if "cpu-hour" in line and "/" in line)
    (run_dir / "model.safetensors").unlink()
    code, out, _ = run(capsys, "runs", tmp_path / "shared")
    assert "not started" in next(line for line in out.splitlines() if "cpu-hour" in line and "/" in line)


def test_format_duration():
    from vaelab.runs import format_duration

    assert [format_duration(s) for s in (0.42, 42, 318, 3168, 7384.1, None)] == \
        ["0.4 s", "42 s", "5.3 min", "52.8 min", "2.05 h", "—"]
    # below 0.1 s two significant digits (until 2026-12-07 a trial of 0.02 s read "0.0 s"); 0 is 0
    assert [format_duration(s) for s in (0.0234, 0.0049, 0.096, 0.0)] == ["0.023 s", "0.0049 s", "0.1 s", "0.0 s"]


# ---- 1. threads: what the suite runs on ------------------------------------------------------------------------


def test_omp_num_threads_sets_the_default_threads_of_one_process(monkeypatch):
    from vaelab.resources import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                        # torchrun sets it: cores are shared out
    assert default_threads(local_size=2) == max(1, len(os.sched_getaffinity(0)) // 2)
    for odd in ("²", "٣", "-1", "0", "two", "1.5"):         # not a whole number in ASCII ≥ 1: the cores, as unset
        monkeypatch.setenv("OMP_NUM_THREADS", odd)                   # (until 2026-12-07 "²" ended in int()'s error)
        assert default_threads() == len(os.sched_getaffinity(0)), odd


def test_more_threads_than_cores_are_refused_or_lowered(data_dir, tmp_path, capsys, monkeypatch):
    """`--threads` above the cores this process may run on is one line, exit 2, before a run directory is made
    (libgomp ended the process with "Thread creation failed" where it could not make them, and left the run's
    lock); a count from $OMP_NUM_THREADS (or a resumed run's own, from a larger machine) is lowered to the cores."""
    cores = len(os.sched_getaffinity(0))
    tiny = ["--data-dir", data_dir, "--epochs", "1", "--hidden", "8", "--latent", "2", "--no-progress"]
    code, _, err = run(capsys, "train", "--out", tmp_path / "r", "--threads", cores + 1, *tiny)
    assert code == 2 and one_line(err) and f"--threads {cores + 1}: this process may run on {cores} core" in err
    assert f"give at most {cores}, or leave --threads out" in err and not (tmp_path / "r").exists()
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores + 7))
    before = torch.get_num_threads()
    try:
        code, _, err = run(capsys, "train", "--out", tmp_path / "r", *tiny)
        assert code == 0 and f"note: {cores + 7} threads (the run's own count or $OMP_NUM_THREADS) is more than" in err
        assert torch.get_num_threads() == cores
        assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["threads"] == cores
        code, _, err = run(capsys, "evaluate", tmp_path / "r", "--k", "2", "--threads", cores + 1)
        assert code == 2 and one_line(err) and "give at most" in err
    finally:
        torch.set_num_threads(before)


# ---- terminal tables: columns by what a terminal shows ---------------------------------------------------------


def test_display_width_counts_the_columns_a_terminal_gives():
    """Widths written out by hand (a terminal gives East Asian wide and full-width characters two columns, combining
    marks and zero-width characters none): ``len`` counts code points."""
    from vaelab.tables import display_width

    for text, width in (("plain", 5), ("実験一", 6), ("ｋ＝５", 6), ("e\u0301te", 3), ("log p̂(x) by", 11),
                        ("a\u200bb", 2), ("±β−×", 4), ("", 0)):
        assert display_width(text) == width, text


def test_text_tables_line_up_names_in_wide_and_combining_characters(data_dir, tmp_path, capsys, monkeypatch):
    """`vaelab runs` of runs named 実験一 (two columns a character) and e + U+0301 + te (the accent takes none):
    every row's second column starts in the same terminal column (until 2026-12-06 widths were ``len``: 実験一's row
    was 3 columns to the right, e\u0301te's one to the left); and the header of `compare`'s gap table, "log p̂(x) by"
    (a combining circumflex), sits over its column."""
    from vaelab.tables import text_table

    run_dir = tmp_path / "plain"
    assert main(["train", "--out", str(run_dir), "--data-dir", str(data_dir), "--epochs", "1", "--hidden", "8",
                 "--latent", "2", "--train-examples", "300", "--test-examples", "20", "--no-progress"]) == 0
    for name in ("実験一", "e\u0301te"):
        shutil.copytree(run_dir, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code, out, _ = run(capsys, "runs", ".")
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    # the run column is as wide as 実験一 on screen (6), two spaces after it: "seed*" at column 8 in every row
    assert lines["実験一"].startswith("実験一  seed*") and lines["plain"].startswith("plain   seed*")
    assert lines["e\u0301te"].startswith("e\u0301te     seed*") and lines["run"].startswith("run     preset/model")
    assert code == 0
    assert text_table(["log p̂(x) by", "ELBO"], [["IWAE-20, 7 digits", "-90.1"]], rule=True) == [
        "log p̂(x) by        ELBO ",
        "-----------------  -----",
        "IWAE-20, 7 digits  -90.1"]
    assert text_table(["N", "ln N!"], [["10", "15.1044"]], right=True) == [" N    ln N!", "10  15.1044"]


def test_evaluating_more_digits_than_the_split_has_is_refused(data_dir, tiny_arrays, tmp_path, capsys):
    """`evaluate --test-examples N` above the test digits there are, or above the validation digits the run held
    out: one line naming the count, exit 2, no record (until 2026-12-06 the first ones were evaluated without a
    word, as `train` refuses since 2026-12-05); at the count itself, the evaluation."""
    run_dir = tmp_path / "r"
    assert main(["train", "--out", str(run_dir), "--data-dir", str(data_dir), "--epochs", "1", "--hidden", "8",
                 "--latent", "2", "--train-examples", "300", "--validation", "40", "--test-examples", "20",
                 "--no-progress"]) == 0
    there = len(tiny_arrays.test_images)                            # the synthetic set's test digits
    for split, count, words in (("test", there + 1, f"the data set has {there} test digits"),
                                ("validation", 41, f"{run_dir} holds out 40 validation digits")):
        code, _, err = run(capsys, "evaluate", run_dir, "--k", "2", "--split", split, "--test-examples", count)
        assert code == 2 and one_line(err) and f"--test-examples {count}: " in err and words in err, err
        assert "give at most" in err and not list(run_dir.glob("eval-*"))
    code, out, _ = run(capsys, "evaluate", run_dir, "--k", "2", "--split", "validation", "--test-examples", 40)
    assert code == 0 and "40 validation digits" in out


def test_a_command_vaelab_suggests_for_a_run_named_with_a_dash_runs_as_given(data_dir, tmp_path, capsys, monkeypatch):
    """`train --out=-r`: the "next:" line's command, pasted, evaluates the run (it read -r as an option: "the
    following arguments are required: run_dir", exit 2); every such command writes the path ./-r."""
    import shlex

    from vaelab.tables import shell_word

    assert [shell_word(p) for p in ("-r", "-my run", "runs/-r", "/tmp/-r", "r")] == \
        ["./-r", "'./-my run'", "runs/-r", "/tmp/-r", "r"]
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "train", "--out=-r", "--data-dir", data_dir, "--epochs", "1", "--hidden", "8",
                       "--latent", "2", "--train-examples", "300", "--test-examples", "20", "--no-progress")
    hint = out.strip().splitlines()[-1].split("next: ", 1)[1]
    assert code == 0 and hint == "vaelab evaluate ./-r", out
    code, out, _ = run(capsys, *shlex.split(hint)[1:], "--k", "2", "--test-examples", "5")
    assert code == 0 and "NLL = " in out


def test_evaluations_with_other_seeds_are_not_paired(data_dir, tmp_path, capsys):
    """The digits of a batch share their draws (common random numbers): two evaluations with other --seed differ by
    noise that does not cancel digit by digit, and a paired standard error taking the digits' differences as
    independent misses it. Two copies of one run's weights, K = 10: paired, NLL(b) − NLL(a) came out many standard
    errors from 0 (−1.31 ± 0.29 nats on the issue's run; until 2026-12-06). Now the seeds are named and the NLLs
    shown unpaired; with one seed the pair is paired again, and exactly 0."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--out", str(a), "--data-dir", str(data_dir), "--epochs", "1", "--hidden", "8",
                 "--latent", "2", "--train-examples", "300", "--test-examples", "20", "--no-progress"]) == 0
    shutil.copytree(a, b)
    for run_dir, seed in ((a, 0), (b, 1)):
        assert run(capsys, "evaluate", run_dir, "--k", "10", "--test-examples", "50", "--seed", seed)[0] == 0
    code, out, _ = run(capsys, "compare", a, b, "--out", tmp_path / "c.html")
    assert code == 0 and "paired:" not in out and "b against a: evaluated with different settings (seed 0 vs 1)" in out
    for stale in b.glob("eval-*seed1*"):
        stale.unlink()
    assert run(capsys, "evaluate", b, "--k", "10", "--test-examples", "50", "--seed", 0)[0] == 0
    code, out, _ = run(capsys, "compare", a, b, "--out", tmp_path / "c.html", "--format", "markdown")
    assert code == 0 and "| b | " in out and "with the same K and seed of the draws" in out
    code, out, _ = run(capsys, "compare", a, b, "--out", tmp_path / "c.html")
    assert code == 0 and "paired: NLL(b) − NLL(a) = 0.000 ± 0.000 nats over 50 digits" in out


def _font_drawing(characters: str, monkeypatch):
    """The family of a font matplotlib can use that draws ``characters``: from its list of fonts, or else from the
    system's font files (its list is kept from before a font was installed: .ci/run installs Debian's
    fonts-wqy-zenhei on a machine whose list may be older), added to a copy of the list for the test; None if no
    font draws them."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    def _characters(path: str) -> set[int]:
        try:
            return set(FT2Font(str(path)).get_charmap())
        except (OSError, RuntimeError, ValueError):
            return set()

    wanted = {ord(c) for c in characters}
    for entry in font_manager.fontManager.ttflist:
        if not entry.name.startswith("Last Resort") and wanted <= _characters(entry.fname):
            return entry.name
    for path in sorted(font_manager.findSystemFonts()):
        if wanted <= _characters(path):
            monkeypatch.setattr(font_manager.fontManager, "ttflist", list(font_manager.fontManager.ttflist))
            font_manager.fontManager.addfont(path)
            return font_manager.fontManager.ttflist[-1].name
    return None


def test_figures_draw_run_names_in_scripts_their_default_font_lacks(evaluated, tmp_path, capsys, monkeypatch):
    """A run named 実験一: DejaVu Sans, matplotlib's font, has no CJK, and matplotlib falls back only among the
    families a text is given, so `compare`'s legend drew three boxes (until 2026-12-06), warning once per glyph.
    Now a text's characters its fonts lack are drawn in an installed font that has them: 実 and 験 are drawn
    differently (as boxes they were the same picture), with no warning, and the PDF embeds that font (no boxes:
    matplotlib's Last Resort font)."""
    import io

    from PIL import Image

    from vaelab import plots

    family = _font_drawing("実験一", monkeypatch)
    if family is None:
        pytest.skip("no installed font has CJK ideographs (.ci/run installs Debian's fonts-wqy-zenhei)")
    metrics = [{"epoch": 1, "train_elbo": -100.0, "test_elbo": -99.0}, {"epoch": 2, "train_elbo": -98.0,
                                                                        "test_elbo": -97.0}]
    pictures = [np.asarray(Image.open(io.BytesIO(plots.figure_png(plots.curves_figure([(name, metrics)])))))
                for name in ("実", "験")]
    assert pictures[0].shape == pictures[1].shape and (pictures[0] != pictures[1]).any()
    for name in ("実験一", "plain"):
        shutil.copytree(evaluated, tmp_path / name)
    code, out, err = run(capsys, "compare", tmp_path / "実験一", tmp_path / "plain", "--out", tmp_path / "c.html")
    assert code == 0 and "Glyph" not in err and "warning" not in err, err
    figure = plots.curves_figure([("実験一", metrics), ("plain", metrics)], width=3.25)
    plots.save_vector(figure, tmp_path / "c.pdf")
    embedded = {name.decode() for name in re.findall(rb"/FontName /[A-Z]{6}\+(\S+)", (tmp_path / "c.pdf").read_bytes())}
    assert embedded - {"DejaVuSans"} and not any(name.startswith("LastResort") for name in embedded), embedded


def test_characters_no_font_has_are_named_once(evaluated, tmp_path, capsys, monkeypatch):
    """A run named in Linear A (no installed font has it): matplotlib warned once per glyph (and per figure where a
    command makes several; until 2026-12-06); now one line names the characters and what to do."""
    from vaelab import plots

    if _font_drawing("\U00010600", monkeypatch) is not None:
        pytest.skip("a font here draws Linear A")
    monkeypatch.setattr(plots, "_UNDRAWN_NAMED", set(), raising=False)
    for name in ("\U00010600\U00010601", "plain"):
        shutil.copytree(evaluated, tmp_path / name)
    code, out, err = run(capsys, "compare", tmp_path / "\U00010600\U00010601", tmp_path / "plain",
                         "--out", tmp_path / "c.html")
    warned = [line for line in err.splitlines() if "warning" in line]
    assert code == 0 and len(warned) == 1 and "Glyph" not in err, err
    assert warned[0].startswith("vaelab compare: warning: \U00010600, \U00010601: no font that matplotlib knows "
                                "of has them, so figures draw boxes (install a font that has")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no Chromium installed (.ci/run installs Debian's chromium)")
def test_a_run_named_in_cjk_stays_on_one_line_in_a_pages_table(evaluated, tmp_path, capsys):
    """In a window narrow enough that the comparison's table wraps its cells, a browser may break CJK text between
    any two characters, and did: 実験一 stood as 実験 over 一 (until 2026-12-06), where plain, a Latin word, kept
    whole. Measured in headless Chromium: the lines each run's name takes in the runs table."""
    from test_report import chromium

    for name in ("実験一", "plain"):
        shutil.copytree(evaluated, tmp_path / name)
    page = tmp_path / "c.html"
    assert run(capsys, "compare", tmp_path / "実験一", tmp_path / "plain", "--out", page)[0] == 0
    measured = tmp_path / "measured.html"            # the page, and a script that counts each name's line boxes
    measured.write_text(page.read_text().replace("</body>", """<script>
      const lines = [...document.querySelector("table").querySelectorAll("td:first-child")].map(td => { const range = document.createRange(); range.selectNodeContents(td);
                     return [td.textContent.trim(), new Set([...range.getClientRects()].map(r => r.top)).size]; });
      document.body.setAttribute("data-lines", JSON.stringify(lines));</script></body>"""))
    dom = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--window-size=560,900", "--virtual-time-budget=5000",
                   "--dump-dom", measured.as_uri())
    lines = dict(json.loads(re.search(r'data-lines="([^"]*)"', dom.stdout).group(1).replace("&quot;", '"')))
    assert lines == {"実験一": 1, "plain": 1}, lines


def test_files_saved_with_a_byte_order_mark_are_read(evaluated, tmp_path, capsys):
    """An editor's UTF-8 byte-order mark (Notepad's until 2019, PowerShell 5's `-Encoding utf8`) before a hand-edited
    config.json made the run unusable ("not valid JSON (Unexpected UTF-8 BOM …)", with the advice to move the edited
    file away), and before a sweep spec "not valid TOML (Invalid statement (at line 1, column 1))", a line that
    looks right (until 2026-12-06). The mark is not part of either: both are read as without it."""
    from vaelab import sweep

    bom = "\ufeff".encode()
    run_dir = tmp_path / "edited"
    shutil.copytree(evaluated, run_dir)
    (run_dir / "config.json").write_bytes(bom + (run_dir / "config.json").read_bytes())
    code, out, err = run(capsys, "evaluate", run_dir, "--k", "2", "--test-examples", "5")
    assert code == 0 and "NLL = " in out, err
    code, out, err = run(capsys, "runs", tmp_path)
    assert code == 0 and "note" not in err and "edited" in out
    spec = tmp_path / "spec.toml"
    spec.write_bytes(bom + b'preset = "seed"\ntrials = 2\n[fixed]\nepochs = 1\nvalidation = 500\n'
                           b'[search]\nlr = [1e-3, 3e-3]\n')
    assert sweep.load_spec(spec).trials == 2
    (run_dir / "eval-mine.json").write_bytes(bom + next(run_dir.glob("eval-k2-*.json")).read_bytes())
    code, out, err = run(capsys, "report", run_dir, "--out", tmp_path / "r.html")
    assert code == 0 and "eval-mine.json" not in err, err


def test_counts_of_one_are_singular(data_dir, tmp_path, capsys):
    """"r has trained all its 1 epochs", "on 1 test digits", in the command's lines and the report (until
    2026-12-06): one is one epoch, one digit."""
    run_dir = tmp_path / "r"
    assert main(["train", "--out", str(run_dir), "--data-dir", str(data_dir), "--epochs", "1", "--hidden", "8",
                 "--latent", "2", "--train-examples", "300", "--test-examples", "20", "--no-progress"]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "train", "--out", run_dir, "--resume", "--no-progress")
    assert code == 0 and f"{run_dir} has trained all its 1 epoch: nothing to train" in out, out
    code, out, _ = run(capsys, "evaluate", run_dir, "--k", "2", "--test-examples", "1")
    assert code == 0 and " on 1 test digit, K = 2" in out, out
    assert run(capsys, "report", run_dir, "--data-dir", data_dir, "--out", tmp_path / "r.html")[0] == 0
    page = (tmp_path / "r.html").read_text()
    assert "1 test digit, K = 2" in page and "1 test digits" not in page


def test_of_one_digit_active_units_are_not_counted(data_dir, tmp_path, capsys):
    """Active units are those whose posterior mean varies over digits (Cov_x E_q[u] > 0.01). Of one digit there
    is no variance, and vaelab said "0 of 4 units active" (the variance taken as 0; until 2026-12-06), in the
    evaluation, its record, latent.csv and the pictures, and "unpaired standard error 0.000" of two runs' one-digit
    NLLs, which have none. Now "not counted" there, an empty cell, a dash."""
    import csv

    from vaelab import plots, runs

    run_dir = tmp_path / "r"
    assert main(["train", "--out", str(run_dir), "--data-dir", str(data_dir), "--epochs", "1", "--hidden", "8",
                 "--latent", "4", "--prior", "mog", "--prior-components", "2", "--train-examples", "300",
                 "--test-examples", "1", "--no-progress"]) == 0
    rows = list(csv.DictReader((run_dir / "latent.csv").open()))
    assert len(rows) == 4 and all(row["posterior_mean_variance"] == row["active"] == "" for row in rows), rows
    code, out, err = run(capsys, "evaluate", run_dir, "--k", "2", "--test-examples", "1")
    assert code == 0 and "layer 1: active units not counted (Cov_x E_q[u], a variance over digits, needs 2" in out
    assert "units active" not in out, out
    record = json.loads(next(run_dir.glob("eval-k2-n1-*.json")).read_text())
    assert record["layers"][0]["active_units"] is None and record["layers"][0]["active"] is None
    code, out, err = run(capsys, "evaluate", run_dir, "--k", "2", "--test-examples", "2")
    assert code == 0 and "of 4 units active" in out, out      # two digits: counted
    shutil.copytree(run_dir, tmp_path / "s")
    for path in (run_dir, tmp_path / "s"):
        next(path.glob("eval-k2-n2-*.json")).unlink()
    code, out, err = run(capsys, "compare", run_dir, tmp_path / "s", "--out", tmp_path / "c.html")
    assert code == 0 and "(unpaired standard error —)" in out, out
    code, out, err = run(capsys, "compare", run_dir, tmp_path / "s", "--format", "csv")
    table = list(csv.DictReader(out.splitlines()))
    assert code == 0 and [row["active units"] for row in table] == ["", ""], out
    history = runs.read_run(run_dir).meta["latent"]
    assert history[0]["layers"][0]["active_units"] is None
    plots.figure_png(plots.latent_heatmap_figure(history))
    figure = plots.kl_figure(record["layers"])
    assert "active units not counted" in figure.axes[0].get_title()
    assert "a variance over\ndigits needs two" in figure.axes[1].texts[0].get_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_handled_where_python_cannot_raise_still_stops_the_command(signum, capsys,
                                                                                 sigint_as_at_a_terminal):
    """Python runs a signal's handler between any two steps of Python code, among them those of a weakref callback
    run by the garbage collector, where an exception cannot propagate: matplotlib makes many while it builds a
    figure, and Ctrl-C 4 s into `vaelab report` was printed as "Exception ignored in: <function
    TransformNode.set_children…> … KeyboardInterrupt" and lost: the report went on and wrote its page (until
    2026-12-06). Now the stop is sent again, and raised where the command can stop, without the ignored-exception
    lines; where the command ends first, it is dropped."""
    import weakref

    from vaelab import cli

    class Thing:
        pass

    def stop_in_a_callback():
        thing = Thing()
        watched = weakref.ref(thing, lambda _: (signal.raise_signal(signum), sum(range(100))))
        del thing                                            # the callback runs: the handler raises inside it
        assert watched() is None

    caught = None
    with cli._stop_signals_raise():
        try:
            stop_in_a_callback()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.01)
        except KeyboardInterrupt as exc:
            caught = exc
    assert isinstance(caught, cli.Stopped) and caught.stop_signal == signum
    assert "Exception ignored" not in capsys.readouterr().err
    # a stop sent again that has not landed when the command ends is dropped (the command's work is done), not
    # raised after it, where nothing would say what it stopped
    with cli._stop_signals_raise():
        stop_in_a_callback()
    time.sleep(0.3)
    assert "Exception ignored" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data_dir):
    """Two one-epoch runs, a and b (seeds 0 and 1), not evaluated: each test copies them (its evaluations, and the
    damage it does to their files, stay its own)."""
    root = tmp_path_factory.mktemp("two")
    for name, seed in (("a", "0"), ("b", "1")):
        assert main(["train", "--out", str(root / name), "--epochs", "1", "--seed", seed, "--data-dir",
                     str(data_dir), *SMALL]) == 0
    return root


def test_compare_pairs_two_gap_decompositions_only_where_compare_would_pair_their_nlls(two_runs, tmp_path, data_dir,
                                                                                       capsys):
    """The paired differences of two runs' gaps (`evaluate --gaps`) took the same K, seed and checksum (None alike)
    for the same measurement (until 2026-12-06): two budgets for the optimisation of q*, or two records without their
    digits' checksum, were differenced digit by digit. Now they are paired where compare pairs the runs' NLLs, with
    the same budget, and otherwise it says what differs or is missing."""
    import html

    for name in ("a", "b"):
        shutil.copytree(two_runs / name, tmp_path / name)
    gaps = ["--gaps", "--k", "20", "--test-examples", "40", "--data-dir", str(data_dir), "--no-progress"]
    for name in ("a", "b"):
        assert main(["evaluate", str(tmp_path / name), "--gap-steps", "3", *gaps]) == 0

    def compared() -> str:
        """b's row in the terminal's table of gaps, its last column; the page's says the same."""
        capsys.readouterr()
        assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.html")]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if re.match(r"b\s+IWAE-20, 40 digits", line))
        paired = re.split(r"\s{2,}", row.strip())[-1]
        assert paired in html.unescape((tmp_path / "c.html").read_text())
        return paired

    assert "minus a, paired over 40 digits: approximation " in compared()
    time.sleep(1.1)                            # the newest record is the one compared: a second on its date
    assert main(["evaluate", str(tmp_path / "b"), "--gap-steps", "5", *gaps]) == 0
    assert compared() == "not paired with a: evaluated with different settings (q* in at most 3 vs 5 steps)"
    for record in [*(tmp_path / "a").glob("eval-*.json"), *(tmp_path / "b").glob("eval-*.json")]:
        saved = json.loads(record.read_text())
        if saved["gaps"]["max_steps"] == 5:
            record.unlink()
            continue
        del saved["data_sha256"]                # as a record of before the checksum was kept
        record.write_text(json.dumps(saved))
    assert compared() == "not paired with a: a record without its digits' checksum"


def test_runs_renamed_to_names_vaelab_refuses_are_listed_one_line_each(evaluated, tmp_path, capsys):
    """vaelab refuses to write a run under a name holding a control character or a byte that is not UTF-8, but a
    run renamed afterwards is still found by `vaelab runs`: until 2026-12-06 a line break in its name broke its row
    in two, a tab pushed the row's columns out of line, and a byte that is not UTF-8 ended `runs` in a traceback
    where the stream is strict UTF-8 (PYTHONIOENCODING=utf-8, or a UTF-8 locale other than C.UTF-8). Now such
    characters are shown escaped, as Python writes them (\\n, \\t, \\xff)."""
    import os
    import subprocess
    import sys

    root = tmp_path / "runs"
    names = {"x\ny": "x\\ny", "r\ttab": "r\\ttab", os.fsdecode(b"r\xff"): "r\\xff", "plain": "plain"}
    for name in names:
        shutil.copytree(evaluated, root / name)
    code, out, err = run(capsys, "runs", root)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 1 + len(names) + 1, out                  # header, a row each, the footnote
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert sorted(rows) == sorted(f"{root}/{shown}" for shown in names.values())
    # each row's second column begins where the header's does (the names are ASCII once escaped: a column each)
    column = lines[0].index("preset/model")
    assert all(len(line[:column].rstrip()) < column and line[column] != " " for line in rows.values()), out
    # a note naming such a run, on a strict stream: the byte as the table writes it, and the symbols as they are
    assert (os.fsdecode(b"r\xff") + " ± β").encode("utf-8", "vaelab.ascii") == "r\\xff ± β".encode()
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-m", "vaelab", "runs", str(root)], env=env, capture_output=True,
                          timeout=300)
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")
    assert f"{root}/r\\xff ".encode() in done.stdout and f"{root}/x\\ny ".encode() in done.stdout


def test_notes_naming_a_run_with_a_line_break_stay_one_line(evaluated, tmp_path, capsys):
    """A note naming a run renamed to a name with a line break or a tab (a record skipped in it, a damaged config)
    was broken in two there (until 2026-12-06; the tables already escaped such names, and vaelab refuses such a path
    given on its command line). Now each is one line, the characters escaped as the tables write them (\\n, \\t)."""
    root = tmp_path / "runs"
    shutil.copytree(evaluated, root / "x\ny")
    (root / "x\ny" / "eval-mine.json").write_text('{"nll": 85.3}')
    code, _, err = run(capsys, "runs", root)
    assert code == 0 and err.count("\n") == 1, err
    assert f"note: {root}/x\\ny/eval-mine.json: not a vaelab evaluation record" in err, err
    shutil.copytree(evaluated, root / "t\tab")
    (root / "t\tab" / "config.json").write_text("{")
    code, _, err = run(capsys, "runs", root)
    assert code == 0 and err.count("\n") == 2 and f"note: {root}/t\\tab" in err and "\t" not in err, err


@pytest.mark.slow      # 11 s on 2 cores of a Zen 4 (2026-12-07)
def test_damaged_per_digit_values_are_said_to_be_so_and_nothing_is_paired_with_them(two_runs, tmp_path, data_dir,
                                                                                    capsys):
    """An evaluation's per-digit values (….digits.csv) with a row too many, or a header without iwae, ended `compare`
    in a traceback (a broadcast ValueError, a KeyError; until 2026-12-06), and a damaged one was said to have been
    "written by vaelab 0.1" in the report. Now such a file gives no paired difference, and both commands say it is
    missing or damaged."""
    for name in ("a", "b"):
        shutil.copytree(two_runs / name, tmp_path / name)
        assert main(["evaluate", str(tmp_path / name), "--k", "20", "--test-examples", "40", "--data-dir",
                     str(data_dir), "--no-progress"]) == 0
    (digits,) = (tmp_path / "a").glob("eval-*.digits.csv")
    whole = digits.read_text()
    assert "paired: NLL(b) − NLL(a)" in run(capsys, "compare", tmp_path / "a", tmp_path / "b")[1]
    for damaged in (whole + "40,3,-1,-1\n", whole.replace(",iwae", ",iwea", 1), whole[:len(whole) // 2],
                    whole.replace("\n", "\n\n", 5), "", "\xff\xfe"):
        digits.write_text(damaged, encoding="latin-1" if damaged == "\xff\xfe" else "utf-8")
        code, out, err = run(capsys, "compare", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "c.html")
        assert code == 0 and "Traceback" not in err and "paired:" not in out, err
        assert "b against a: no per-digit values (missing or damaged); the NLLs are shown" in out, out
        code, _, err = run(capsys, "report", tmp_path / "a", "--no-progress")
        assert code == 0 and f"per-digit values ({digits.name}) are missing or damaged" in \
            (tmp_path / "a" / "report.html").read_text(), err


@pytest.mark.slow      # 17 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_record_whose_gap_decomposition_lacks_a_field_is_skipped_with_a_note(two_runs, tmp_path, data_dir,
                                                                               capsys):
    """A record's gap decomposition without one of its fields, or with one of another type (a hand-edited record),
    ended `report` and `compare` in a traceback (KeyError, TypeError; until 2026-12-06). Now such a record is skipped
    with the note every malformed record gets, and one that `evaluate --gaps --laplace` wrote is shown."""
    import html

    for name in ("a", "b"):
        shutil.copytree(two_runs / name, tmp_path / name)
    assert main(["evaluate", str(tmp_path / "a"), "--gaps", "--gap-steps", "2", "--laplace", "--k", "5",
                 "--test-examples", "10", "--data-dir", str(data_dir), "--no-progress"]) == 0
    (record,) = (tmp_path / "a").glob("eval-*.json")
    whole = json.loads(record.read_text())
    assert {"log_px_optimised", "elbo_laplace", "log_px_optimised_estimator"} <= set(whole["gaps"])
    code, out, _ = run(capsys, "compare", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "c.html")
    assert code == 0 and "where the nats go" in out and "skipped" not in out
    for key, value in (("log_px", "DROP"), ("elbo_encoder", "x"), ("amortisation_gap", {"mean": "x"}),
                       ("family", "DROP"), ("digits", "DROP"), ("converged_fraction", "x"), ("mean_steps", None),
                       ("rule", "DROP"), ("log_px_optimised", 5), ("elbo_laplace", {"stderr": 1})):
        damaged = json.loads(json.dumps(whole))
        if value == "DROP":
            del damaged["gaps"][key]
        else:
            damaged["gaps"][key] = value
        record.write_text(json.dumps(damaged))
        for command in (["compare", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "c.html"],
                        ["report", tmp_path / "a", "--no-progress"]):
            code, out, err = run(capsys, *command)
            assert code == 0 and "Traceback" not in err, (key, value, err)
            page = tmp_path / "a" / "report.html"                    # the report's notes are on its page
            said = out + err if command[0] == "compare" else html.unescape(page.read_text())
            assert f"{record.name}: not a vaelab evaluation record (" in said, (key, value, said)
            assert f"gaps.{key}." in said or f"gaps.{key!r}" in said, (key, value, said)     # it names the field
    # null means (vaelab writes a value that was not finite as null) are shown as "—", the record kept
    kept = json.loads(json.dumps(whole))
    kept["gaps"]["amortisation_gap"]["mean"] = kept["gaps"]["elbo_laplace"]["mean"] = None
    record.write_text(json.dumps(kept))
    code, _, err = run(capsys, "report", tmp_path / "a", "--no-progress")
    page = html.unescape((tmp_path / "a" / "report.html").read_text())
    assert code == 0 and "not a vaelab evaluation record" not in page and "amortisation gap</td><td class=\"num\">—" \
        in page, err
    # and the page says why it has no figure of the gaps (until 2026-12-06 the figure was only missing)
    assert f"No figure of the gaps: {record.name} holds a gap whose mean was not finite" in page, err


@pytest.mark.slow      # 15 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_record_whose_curve_in_k_is_damaged_is_skipped_with_a_note(two_runs, tmp_path, data_dir, capsys):
    """A record's convergence curve in K (`evaluate --k-curve`) that was not a list of points, or a point without
    its K, mean or standard error, ended `report` in a traceback (TypeError, KeyError; until 2026-12-06), and a point
    whose mean is null (a value that was not finite when written) did too. Now the first kind of record is skipped
    with the note every malformed record gets; the second keeps its record, the figure drawing the finite points
    and, where there is none, the page saying so."""
    import html

    shutil.copytree(two_runs / "a", tmp_path / "a")
    assert main(["evaluate", str(tmp_path / "a"), "--k", "1000", "--k-curve", "--test-examples", "10", "--data-dir",
                 str(data_dir), "--no-progress"]) == 0
    (record,) = (tmp_path / "a").glob("eval-*.json")
    whole = json.loads(record.read_text())
    assert [point["k"] for point in whole["k_curve"]] == [1, 10, 100, 1000]
    page = tmp_path / "a" / "report.html"

    def report(curve) -> str:
        record.write_text(json.dumps(dict(whole, k_curve=curve)))
        code, _, err = run(capsys, "report", tmp_path / "a", "--no-progress")
        assert code == 0 and "Traceback" not in err, (curve, err)
        return html.unescape(page.read_text())

    points = whole["k_curve"]
    for curve, named in (("x", "k_curve is 'x', not a list"), (None, "k_curve is None, not a list"),
                         ({"k": 1}, "k_curve is {'k': 1}, not a list"), ([1], "k_curve[0] is not an object"),
                         ([{}], "no k_curve[0].'k'"),
                         ([*points[:3], {"k": 1000, "mean": -90.0}], "no k_curve[3].'stderr'"),
                         ([dict(points[0], k="1")], "k_curve[0].'k' is '1'"),
                         ([dict(points[0], k=0)], "k_curve[0].k is 0, not ≥ 1")):
        said = report(curve)
        assert f"{record.name}: not a vaelab evaluation record ({named})" in said, (curve, said)
        assert "IWAE-K against K" not in said
    said = report([dict(point, mean=None) if point["k"] == 10 else point for point in points])
    assert "not a vaelab evaluation record" not in said and "IWAE-K against K, nested draws" in said
    said = report([dict(point, mean=None, stderr=None) for point in points])
    assert "not a vaelab evaluation record" not in said and "IWAE-K against K" not in said
    assert f"No figure of the convergence curve in K: {record.name} holds no point whose mean is finite." in said
    record.write_text(json.dumps(dict(whole, k_curve=[1])))            # `runs` skips a damaged record alike
    code, out, err = run(capsys, "runs", tmp_path / "a")
    assert code == 0 and f"{record.name}: not a vaelab evaluation record (k_curve[0] is not an object)" in err, err


def test_a_metrics_table_without_a_column_vaelab_writes_is_named_as_malformed(evaluated, tmp_path, capsys):
    """metrics.csv whose header lacks a column every vaelab wrote (a hand edit, a spreadsheet's export) ended
    `report` in a traceback where its page or a figure read it (until 2026-12-06: jinja2's UndefinedError for
    elapsed_seconds, a KeyError for train_elbo). Now it is malformed as a cut line is: one line naming the columns
    and the resume that writes the file again; `runs` lists the run as unreadable. vaelab 0.1's columns (seconds,
    total_seconds; no lr, β or train_objective) still make a page."""
    import csv
    import io

    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)
    metrics = copy / "metrics.csv"
    rows = list(csv.DictReader(io.StringIO(metrics.read_text())))
    fix = f"`vaelab train --out {copy} --resume` writes it again from the training state"

    def write(columns: list[str], header: list[str] | None = None):     # the values of ``columns`` under ``header``
        lines = [",".join(header or columns)] + [",".join(row[c] for c in columns) for row in rows]
        metrics.write_text("\n".join(lines) + "\n")

    for lost in ("elapsed_seconds", "train_elbo", "test_kl"):
        write([column for column in rows[0] if column != lost])
        code, _, err = run(capsys, "report", copy, "--no-progress")
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"{metrics} is malformed (its header lacks {lost}); {fix}" in err, err
        code, out, err = run(capsys, "runs", copy)
        assert code == 0 and "unreadable (the note above)" in out and f"its header lacks {lost}" in err, err
    # vaelab 0.1's header: the epoch's seconds and the total with the evaluation, renamed when read
    kept = ["epoch", "train_elbo", "train_reconstruction", "train_kl", "test_elbo", "test_reconstruction", "test_kl"]
    write([*kept, "epoch_seconds", "epoch_seconds"], [*kept, "seconds", "total_seconds"])
    code, _, err = run(capsys, "report", copy, "--no-progress")
    assert code == 0 and "malformed" not in err, err
