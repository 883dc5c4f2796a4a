"""Nothing a user made is lost or clobbered, and no input ends in a traceback (issue: Reliability II).

Each test names the fault or bad input it tries and the outcome vaelab defines for it; README's
reliability section links this table.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import vaelab
from conftest import run
from vaelab import atomic
from vaelab import checkpoint as ckpt
from vaelab import training
from vaelab.cli import main
from vaelab.config import RunConfig
from vaelab.data import CACHE_NAME, IDX_FILES, idx_bytes, load_mnist
from vaelab.errors import CheckpointError, DataError, ResourceError, UsageError

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--hidden", "32", "--latent", "4", "--test-examples", "50", "--no-progress"]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def one_line_error(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "error" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """Two epochs of a small model on the synthetic set."""
    run_dir = tmp_path_factory.mktemp("reliability") / "run"
    assert main(["train", "--out", str(run_dir), "--epochs", "2", "--data-dir", str(data_dir), *SMALL]) == 0
    return run_dir


@pytest.fixture
def copy(trained, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(trained, target)
    return target


def cli(*args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "vaelab.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


# ---- 1. --resume never starts over ----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_resume_with_a_missing_or_damaged_state_changes_nothing(copy, data_dir, capsys, damage):
    state = copy / ckpt.STATE
    if damage == "missing":
        state.unlink()
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[:1000])
    else:
        state.write_bytes(b"\x00" * 5000)
    before = snapshot(copy)
    code, out, err = run(capsys, "train", "--out", copy, "--resume", "--epochs", "4", "--data-dir", data_dir)
    assert code == 2 and one_line_error(err) and ckpt.STATE in err and "epoch" not in out
    assert snapshot(copy) == before


# ---- 2. one writer per run; unique default directories ---------------------------------------------


@pytest.mark.slow      # 7 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_second_process_on_a_run_fails_at_once_naming_the_first(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    first = cli("train", "--out", run_dir, "--epochs", "50", "--data-dir", data_dir, "--hidden", "256",
                "--test-examples", "50", "--no-progress")
    deadline = time.monotonic() + 60
    while not (run_dir / ckpt.CONFIG).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        for args in (["--epochs", "3"], ["--resume", "--epochs", "60"]):
            started = time.monotonic()
            second = cli("train", "--out", run_dir, "--data-dir", data_dir, "--no-progress", *args)
            out, err = second.communicate(timeout=60)
            assert second.returncode == 2 and f"in use by process {first.pid}" in err, err
            assert time.monotonic() - started < 30                 # at once, not after the first ends
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # kill -9 leaves no stale lock: the run resumes (it has a checkpoint by now, or says it has none)
    resumed = cli("train", "--out", run_dir, "--data-dir", data_dir, "--resume", "--epochs", "1", "--no-progress")
    out, err = resumed.communicate(timeout=120)
    assert "in use" not in err, err


def test_default_run_directories_are_unique_within_one_second(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.time, "strftime", lambda fmt: "20261128-120000")
    made = [ckpt.new_run_dir(tmp_path / "runs") for _ in range(3)]
    assert [p.name for p in made] == ["20261128-120000", "20261128-120000-2", "20261128-120000-3"]
    assert all(p.is_dir() for p in made)


def test_refused_start_leaves_no_empty_run_directory(tmp_path, data_dir, capsys):
    out = tmp_path / "new"
    code, _, err = run(capsys, "train", "--out", out, "--data-dir", data_dir, "--validation", "5000", *SMALL)
    assert code == 2 and one_line_error(err) and not out.exists()


# ---- 3. evaluations and pictures are never overwritten, never lost --------------------------------


def test_evaluations_with_other_settings_never_overwrite(copy, data_dir, capsys):
    args = ["--data-dir", data_dir, "--test-examples", "20", "--no-progress"]
    assert run(capsys, "evaluate", copy, "--k", "5", *args)[0] == 0
    first = (copy / "eval-k5-n20-seed0.json").read_bytes()
    assert run(capsys, "evaluate", copy, "--k", "7", *args)[0] == 0
    assert (copy / "eval-k7-n20-seed0.json").exists() and (copy / "eval-k5-n20-seed0.json").read_bytes() == first
    code, _, err = run(capsys, "evaluate", copy, "--k", "5", *args)
    assert code == 2 and "exists" in err and "--overwrite" in err and one_line_error(err)
    assert (copy / "eval-k5-n20-seed0.json").read_bytes() == first
    assert run(capsys, "evaluate", copy, "--k", "5", "--overwrite", *args)[0] == 0
    digits = (copy / "eval-k5-n20-seed0.digits.csv").read_text().splitlines()
    assert digits[0] == "digit,label,elbo,iwae" and len(digits) == 21


def test_evaluate_on_a_read_only_run_prints_first_and_saves_elsewhere(copy, data_dir, capsys, monkeypatch,
                                                                        tmp_path):
    real = atomic.tempfile.mkstemp

    def read_only(dir=None, **kwargs):
        if Path(dir).resolve() == copy.resolve():
            raise OSError(30, "Read-only file system")
        return real(dir=dir, **kwargs)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    before = snapshot(copy)
    code, out, err = run(capsys, "evaluate", copy, "--k", "5", "--test-examples", "10", "--data-dir", data_dir,
                         "--no-progress")
    assert code == 1 and "NLL =" in out and one_line_error(err) and "Read-only file system" in err
    saved = tmp_path / "vaelab-copy-evaluations" / "eval-k5-n10-seed0.json"
    assert str(saved) in err and json.loads(saved.read_text())["k"] == 5
    assert snapshot(copy) == before


def test_sample_without_out_keeps_the_runs_samples_png(copy, capsys):
    before = (copy / "samples.png").read_bytes()
    assert run(capsys, "sample", copy, "--n", "16")[0] == 0
    assert (copy / "samples.png").read_bytes() == before
    assert (copy / "samples-n16-seed0.png").read_bytes()[:8] == PNG
    code, _, err = run(capsys, "sample", copy, "--n", "16")
    assert code == 2 and "--overwrite" in err


def test_resume_of_a_folder_that_is_no_run_writes_nothing_there_and_never_says_remove_it(tmp_path, capsys):
    folder = tmp_path / "my-folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    code, _, err = run(capsys, "train", "--out", folder, "--resume", "--no-progress")
    assert code == 2 and one_line_error(err) and f"{folder} is not a vaelab run (it holds neither config.json nor " \
        f"training_state.safetensors); nothing was changed" in err and "remove" not in err   # was "remove it first"
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]                               # no .lock left there


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_lost_weights_and_metrics_are_named_by_runs_and_a_resume_writes_them_again(trained, tmp_path, data_dir,
                                                                                     capsys, damage):
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(trained, copy)
    weights, metrics = copy / ckpt.WEIGHTS, copy / ckpt.METRICS
    intact, table = weights.read_bytes(), metrics.read_text()
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(intact[:-100])            # its tensors' tail lost: the header alone still reads
    code, out, err = run(capsys, "runs", tmp_path / "runs")
    fix = f"`vaelab train --out {copy} --resume` writes it again from the training state"
    assert code == 0 and f"finished, model.safetensors {damage}" in out   # was "finished"
    assert f"note: {copy}: model.safetensors {damage}; {fix} (training_state.safetensors, after epoch 2)" in err
    code, _, err = run(capsys, "evaluate", copy, "--k", "2", "--test-examples", "4", "--data-dir", data_dir)
    assert code == 2 and one_line_error(err) and fix in err and "retrain" not in err
    metrics.write_text(table + "3,0.001\n")               # a line that lost its tail
    code, out, err = run(capsys, "runs", tmp_path / "runs")
    assert code == 0 and "unreadable (the note above)" in out
    assert f"{metrics}, line 4, is malformed (2 values where the header names " in err and fix in err
    code, _, _ = run(capsys, "train", "--out", copy, "--resume", "--data-dir", data_dir)
    assert code == 0 and weights.read_bytes() == intact and metrics.read_text() == table     # the same bytes
    code, out, err = run(capsys, "runs", tmp_path / "runs")
    assert code == 0 and "finished " in out and "model.safetensors" not in out + err


# ---- 4. SIGTERM and SIGHUP stop like Ctrl-C (tests/test_training.py checks the exact resume) --------
# (parametrised there over SIGINT, SIGTERM and SIGHUP)


# ---- 5. --resume trusts the training state, not a hand-edited config.json --------------------------


def test_resume_refuses_an_edited_config_and_names_the_field(copy, data_dir, capsys):
    config = json.loads((copy / ckpt.CONFIG).read_text())
    config["train"]["batch_size"] = 7
    (copy / ckpt.CONFIG).write_text(json.dumps(config))
    before = snapshot(copy)
    code, _, err = run(capsys, "train", "--out", copy, "--resume", "--epochs", "3", "--data-dir", data_dir)
    assert code == 2 and "train.batch_size: 64 → 7" in err and one_line_error(err)
    assert snapshot(copy) == before
    assert "training_state.safetensors keeps a copy of it: move it away (mv " in err    # the way back, spelled out


def test_resume_below_the_epochs_done_is_an_error(copy, data_dir, capsys):
    before = snapshot(copy)
    code, _, err = run(capsys, "train", "--out", copy, "--resume", "--epochs", "1", "--data-dir", data_dir)
    assert code == 2 and "below the 2 epochs" in err and snapshot(copy) == before
    assert "give --epochs 3 or more to train on" in err          # (it said "2 or more": 2 trains nothing)


def test_a_missing_config_is_restored_from_the_state(copy, data_dir, capsys):
    original = (copy / ckpt.CONFIG).read_text()
    (copy / ckpt.CONFIG).unlink()
    code, out, err = run(capsys, "train", "--out", copy, "--resume", "--epochs", "2", "--data-dir", data_dir,
                         "--no-progress")
    assert code == 0, err
    assert "restored" in out and RunConfig.load(copy / ckpt.CONFIG) == RunConfig.from_dict(json.loads(original))


# ---- 6. paths are stored absolute --------------------------------------------------------------------


def test_relative_data_dir_is_stored_absolute(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.chdir(data_dir.parent)
    code, _, err = run(capsys, "train", "--out", tmp_path / "run", "--epochs", "1", "--data-dir", data_dir.name,
                       *SMALL)
    assert code == 0, err
    stored = RunConfig.load(tmp_path / "run" / ckpt.CONFIG).data.data_dir
    assert Path(stored).is_absolute() and Path(stored) == data_dir.resolve()


# ---- 7. non-finite weights are refused; JSON is strict -------------------------------------------------


@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_nan_weights_are_refused_naming_the_tensor(copy, data_dir, capsys, command):
    tensors, _ = ckpt.load_tensors(copy / ckpt.WEIGHTS)
    tensors["decoder_out.bias"][3] = float("nan")
    ckpt.save_tensors(copy / ckpt.WEIGHTS, tensors)
    extra = ["--data-dir", data_dir, "--k", "5", "--no-progress"] if command == "evaluate" else []
    before = snapshot(copy)
    code, _, err = run(capsys, command, copy, *extra)
    assert code == 2 and "decoder_out.bias" in err and "NaN" in err and one_line_error(err)
    assert snapshot(copy) == before


def test_an_evaluation_of_one_digit_is_strict_json(copy, data_dir, capsys):
    code, out, _ = run(capsys, "evaluate", copy, "--k", "5", "--test-examples", "1", "--data-dir", data_dir,
                       "--no-progress")
    assert code == 0 and "(IWAE-5, 1 test digit, " in out                 # (it said "1 test digits")
    code, out, _ = run(capsys, "runs", copy.parent)
    assert code == 0 and "(K 5, 1 test digit, epoch " in out
    text = (copy / "eval-k5-n1-seed0.json").read_text()
    record = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON token {name}"))
    assert record["nll_stderr"] is None and record["n_examples"] == 1
    for key in ("vaelab", "torch", "threads", "device", "seed", "date", "seconds", "k", "data_sha256",
                "weights_sha256", "layers"):
        assert key in record, key


# ---- every remaining traceback is a one-line error ---------------------------------------------------


@pytest.mark.parametrize("section, field, value, message", [
    ("train", "engine", "warp", "unknown --engine 'warp'"),
    ("train", "seed", 2**64, "--seed must be in [0, 2⁶³)"),
    ("train", "lr", -1.0, "--lr must be a finite number > 0"),
    ("train", "lr_schedule", "cosine", "unknown --lr-schedule"),
    ("objective", "name", "vimco", "unknown --objective 'vimco'"),
    ("objective", "samples", 0, "--k must be in [1, 100 000]"),
    ("model", "activation", "swish", "unknown --activation 'swish'"),
    ("model", "latent", [50, 20], "give 1 latent size"),
    ("data", "binarize", "grey", "'grey' is not one of dynamic, static"),
    ("data", "validation_seed", -1, "validation_seed must be"),
    ("train", "adam_betas", [0.9], "not of type"),
    ("train", "adam_eps", 1e-39, "--adam-eps must be a finite number ≥ 1.18e-38 (float32's smallest normal number"),
])
def test_values_the_cli_would_refuse_are_refused_inside_config_json(copy, capsys, section, field, value, message):
    config = json.loads((copy / ckpt.CONFIG).read_text())
    config[section][field] = value
    (copy / ckpt.CONFIG).write_text(json.dumps(config))
    code, _, err = run(capsys, "sample", copy, "--out", copy / "x.png")
    assert code == 2 and message in err and one_line_error(err), err
    assert not (copy / "x.png").exists()


def test_a_version_1_run_directory_loads_and_evaluates_to_the_same_nll(copy, data_dir, capsys):
    """A run written before models/ existed: config version 1, weights named enc_hidden.* etc."""
    args = ["--k", "5", "--test-examples", "10", "--data-dir", data_dir, "--no-progress"]
    assert run(capsys, "evaluate", copy, *args)[0] == 0
    now = json.loads((copy / "eval-k5-n10-seed0.json").read_text())
    (copy / "eval-k5-n10-seed0.json").unlink()
    config = json.loads((copy / ckpt.CONFIG).read_text())
    legacy = {"version": 1, "model": {"data_dim": 784, "hidden": 32, "latent": 4},
              "data": {k: config["data"][k] for k in ("data_dir", "binarize", "train_examples", "test_examples",
                                                     "test_seed", "static_seed")},
              "train": {k: config["train"][k] for k in ("epochs", "batch_size", "lr", "seed", "device",
                                                       "eval_batch_size", "eval_seed")} | {"engine": "fused"}}
    names = {"encoder.0": "enc_hidden", "encoder_out": "enc_out", "decoder.0": "dec_hidden", "decoder_out": "dec_out"}
    rename = lambda key: names[key.rsplit(".", 1)[0]] + "." + key.rsplit(".", 1)[1]  # noqa: E731
    weights, _ = ckpt.load_tensors(copy / ckpt.WEIGHTS)
    ckpt.save_tensors(copy / ckpt.WEIGHTS, {rename(k): v for k, v in weights.items()})
    (copy / ckpt.CONFIG).write_text(json.dumps(legacy))
    code, out, _ = run(capsys, "evaluate", copy, *args)
    assert code == 0 and "NLL =" in out
    assert RunConfig.load(copy / ckpt.CONFIG).model.hidden == ((32,),)
    assert json.loads((copy / "eval-k5-n10-seed0.json").read_text())["nll"] == now["nll"]


@pytest.mark.parametrize("args, message", [
    (["sample", "RUN", "--n", "1000000000"], "at most 4096"),
    (["evaluate", "RUN", "--k", "1000000000"], "of memory, but only"),
    (["train", "--hidden", "1000000", "--out", "NEW"], "of memory, but only"),
    (["train", "--k", "100000", "--batch-size", "100000", "--hidden", "4096", "--out", "NEW"], "of memory"),
    (["stirling", "--terms", "100000"], "at most 30"),
    (["stirling", "--n", "0"], "at least 1"),
    (["stirling", "--n", "10", "--plot", "OUT.xyz"], "cannot write a .xyz picture"),
    (["train", "--model", "mlp2", "--latent", "50", "--out", "NEW"], "give 2 latent sizes"),
    (["train", "--objective", "vimco"], "invalid choice"),
    (["train", "--preset", "fast"], "invalid choice"),
    (["train", "--engine", "fused", "--objective", "iwae", "--k", "5", "--out", "NEW"], "--engine fused covers only"),
    (["evaluate", "RUN", "--split", "validation"], "trained without --validation"),
    (["evaluate", "RUN", "--checkpoint", "best"], "no model-best.safetensors"),
])
def test_bad_inputs_are_one_line_errors_that_write_nothing(copy, data_dir, tmp_path, capsys, monkeypatch,
                                                           args, message):
    monkeypatch.setenv("VAELAB_DATA", str(data_dir))
    before = snapshot(copy)
    argv = [str(copy) if a == "RUN" else str(tmp_path / "new") if a == "NEW" else
            str(tmp_path / "out.xyz") if a == "OUT.xyz" else a for a in args]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    _, err = capsys.readouterr()
    assert code == 2 and message in err and one_line_error(err), err
    assert snapshot(copy) == before and not (tmp_path / "new").exists() and not (tmp_path / "out.xyz").exists()


@pytest.mark.parametrize("args, fix", [
    (["--hidden", "200000", "200000"], "parameters, with their gradients and Adam's moments, take 2.9 TiB of it: use "
                                       "smaller --hidden or --latent"),
    (["--latent", "100000000"], "use smaller --hidden or --latent"),
    (["--flow", "iaf", "--flow-steps", "5", "--flow-width", "1000000"],
     "use smaller --hidden, --latent, --flow-steps or --flow-width"),
    (["--model", "hvae", "--latent", "4", "4", "--blocks", "400000", "8"], "use smaller --blocks or --latent"),
    (["--objective", "iwae", "--k", "100000", "--batch-size", "60000"],
     "a step's 6,000,000,000 rows (digits × draws) take 296.8 TiB of it: use smaller --batch-size, --k or --hidden"),
    (["--prior", "vampprior", "--prior-components", "100000", "--hidden", "30000"],
     "the 100,000 pseudo-inputs through the encoder at every step take 34.0 GiB of it: use smaller "
     "--prior-components or --hidden"),
    (["--latent", "2", "--hidden", "4", "--flow", "iaf", "--flow-steps", "8", "--flow-width", "1000000"],
     "each epoch's evaluation, 1,000 digits at a time, takes 119.2 GiB of it: use smaller --hidden, --latent, "
     "--flow-steps or --flow-width"),
])
def test_a_model_too_big_to_train_names_what_holds_the_memory_and_the_flags_that_size_it(args, fix, tmp_path, capsys,
                                                                                         monkeypatch):
    """Until 2026-12-08 the fix was always "use smaller --hidden, --batch-size or --k", also where --latent,
    --flow-width or --prior-components made the model too big; the largest part of the estimate is named now, with
    its flags."""
    from vaelab import resources

    monkeypatch.setattr(resources, "memory_limits", lambda: {"cgroup memory limit": 16 << 30})
    code = main(["train", "--out", str(tmp_path / "new"), *args])
    _, err = capsys.readouterr()
    assert code == 2 and one_line_error(err) and "of memory, but only 16.0 GiB is available" in err, err
    assert err.rstrip().endswith(fix) and not (tmp_path / "new").exists(), err


def test_memory_limits_include_ulimit(tmp_path):
    script = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.RLIM_INFINITY));"
              "from vaelab.resources import available_memory; print(available_memory())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    available, source = eval(out)            # (bytes, name): our own repr, in a test
    assert source == "ulimit -v" and 0 < available < 8 << 30


def test_require_memory_names_the_bytes_and_the_limit(monkeypatch):
    from vaelab import resources

    monkeypatch.setattr(resources, "memory_limits", lambda: {"cgroup memory limit": 1 << 30})
    with pytest.raises(ResourceError, match=r"needs about 2.0 GiB of memory, but only 1.0 GiB is available "
                                            r"\(cgroup memory limit\)"):
        resources.require_memory(2 << 30, "this", "do less")
    assert isinstance(ResourceError("x"), ValueError)


def test_the_evaluation_memory_estimate_counts_the_digits_evaluated(copy, data_dir, tmp_path, capsys, monkeypatch):
    """A batch holds at most 20 digits, fewer where fewer are evaluated: until 2026-12-07 `evaluate --k 10⁸` of 2
    digits of a 4-latent model was refused at an estimate of 23.9 GiB, made for 20 digits (4.2 GiB for the 2)."""
    from vaelab import resources
    from vaelab.config import ModelConfig
    from vaelab.evaluation import EvalConfig

    small, huge = ModelConfig(latent=(4,)), EvalConfig(k=10**8)
    assert huge.memory_bytes(small, digits=2) / 2**30 == pytest.approx(4.2, abs=0.05)
    assert huge.memory_bytes(small) == huge.memory_bytes(small, digits=20) == huge.memory_bytes(small, digits=10**4)
    assert huge.memory_bytes(small) / 2**30 == pytest.approx(23.9, abs=0.05)
    # the CLI and the API estimate for the digits they were given: a limit between 1 digit's and 20 digits' needs
    config = RunConfig.load(copy / ckpt.CONFIG).model
    one, twenty = (EvalConfig(k=20_000).memory_bytes(config, digits=n) for n in (1, 20))
    monkeypatch.setattr(resources, "memory_limits", lambda: {"MemAvailable": (one + twenty) // 2})
    code, out, err = run(capsys, "evaluate", copy, "--k", "20000", "--test-examples", "1", "--data-dir", data_dir,
                         "--no-progress")
    assert code == 0 and "NLL =" in out, err
    code, _, err = run(capsys, "evaluate", copy, "--k", "20000", "--test-examples", "20", "--data-dir",
                       tmp_path / "fresh", "--no-progress")
    assert code == 2 and "evaluate --k 20000 needs about" in err and one_line_error(err), err
    assert not (tmp_path / "fresh").exists()              # refused before the data are read (or fetched)
    vae = vaelab.load_run(copy)
    assert vae.log_likelihood(torch.ones(784), k=20_000).shape == (1,)
    with pytest.raises(ResourceError, match=r"log_likelihood\(k=20000\) needs about"):
        vae.log_likelihood(torch.ones(20, 784), k=20_000)


def test_a_batch_larger_than_the_training_digits_is_estimated_at_their_number(tmp_path, data_dir, capsys):
    """Until 2026-12-07 the training estimate counted --batch-size rows whatever the digits: `--batch-size 10⁷` of
    64 digits of a 784-32-4 model was refused at 446.6 GiB (a batch of 64 trains in megabytes)."""
    code, out, err = run(capsys, "train", "--out", tmp_path / "run", "--batch-size", "10000000", "--train-examples",
                         "64", "--epochs", "1", "--data-dir", data_dir, *SMALL)
    assert code == 0 and "done:" in out, err


@pytest.mark.slow      # 25 s on 2 cores of a Zen 4 (2026-12-07)
def test_the_training_estimate_counts_the_vampprior_pseudo_inputs_through_the_encoder(tmp_path, data_dir):
    """The K pseudo-inputs pass through the encoder at every step: until 2026-12-07 their activations were not
    counted, and K = 10⁵ of a 784-2048-50 model peaked at 4.3–4.4 GiB against an estimate of 3.5."""
    from vaelab.cli import training_memory_bytes

    run_dir = tmp_path / "run"
    script = ("import resource, sys\n"
              "from vaelab.cli import main\n"
              "assert main(sys.argv[1:]) == 0\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
    args = ["train", "--out", run_dir, "--prior", "vampprior", "--prior-components", "100000", "--hidden", "2048",
            "--train-examples", "64", "--test-examples", "10", "--epochs", "1", "--engine", "autograd",
            "--data-dir", data_dir, "--no-progress"]
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    peak = int(done.stdout.strip().splitlines()[-1])
    estimate = training_memory_bytes(RunConfig.load(run_dir / ckpt.CONFIG), 60_000)
    assert peak < estimate, f"peak {peak / 2**30:.2f} GiB, estimate {estimate / 2**30:.2f} GiB"


def test_importance_sampling_of_few_digits_with_many_draws_holds_its_weights_not_its_chunks(copy):
    """Each chunk's (n, B) log weights go into one (K, B) buffer: until 2026-12-07 they were kept as 12 000 small
    tensors among the chunks' freed logits and concatenated at the end, and the fragmented heap grew this
    process by 0.9–1.3 GiB for 2.3 MiB of weights (IWAE-600000 of one digit; 23 MiB now, the same numbers)."""
    script = ("import resource, sys, torch, vaelab\n"
              "from vaelab.evaluation import EvalConfig, iwae_log_likelihood\n"
              "vae = vaelab.load_run(sys.argv[1])\n"
              "x = torch.bernoulli(torch.full((1, 784), 0.2), generator=torch.Generator().manual_seed(0))\n"
              "iwae_log_likelihood(vae.model, x, EvalConfig(k=5000))\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "iwae_log_likelihood(vae.model, x, EvalConfig(k=600_000))\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n")
    grown = float(subprocess.run([sys.executable, "-c", script, str(copy)], capture_output=True, text=True,
                                 check=True).stdout)
    assert grown < 256, f"IWAE-600000 of one digit grew the process by {grown:.0f} MiB"


def test_require_memory_on_a_gpu_counts_the_gpus_free_memory_and_torchs_unused_cache(monkeypatch):
    """On a CUDA device the limit is the device's free memory plus what torch's allocator holds reserved but unused,
    whatever the host has (faked here: the test runs without a GPU; tests/test_gpu.py refuses a real one)."""
    from vaelab import resources

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 768 << 20)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 256 << 20)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(resources, "memory_limits", lambda: {"MemAvailable": 1 << 40})
    with pytest.raises(ResourceError, match=r"needs about 2.0 GiB of memory, but only 1.5 GiB is available "
                                            r"\(free on Some GPU\); do less"):
        resources.require_memory(2 << 30, "this", "do less", torch.device("cuda"))
    resources.require_memory(1400 << 20, "this", "do less", torch.device("cuda"))     # 1.37 GiB fits
    resources.require_memory(2 << 30, "this", "do less", torch.device("cpu"))         # the host's 1 TiB


# ---- the data cache in odd states ------------------------------------------------------------------


def official_idx(directory: Path, arrays) -> None:
    import gzip

    directory.mkdir(parents=True, exist_ok=True)
    for split, (name, _) in IDX_FILES.items():
        (directory / name).write_bytes(gzip.compress(idx_bytes(getattr(arrays, split))))


def test_a_directory_where_the_cache_belongs_is_a_clear_error(tmp_path, tiny_arrays, monkeypatch):
    (tmp_path / CACHE_NAME).mkdir()
    with pytest.raises(DataError, match="not a file"):
        load_mnist(tmp_path, download=False)


def test_a_damaged_cache_that_cannot_be_removed_is_bypassed(tmp_path, tiny_arrays, monkeypatch):
    from vaelab import data as D

    monkeypatch.setattr(D, "OFFICIAL_SHA256", tiny_arrays.digests())
    official_idx(tmp_path, tiny_arrays)
    (tmp_path / CACHE_NAME).write_bytes(b"PK\x03\x04 damaged")
    real_unlink = Path.unlink

    def read_only(self, *args, **kwargs):
        if self.parent == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(D, "save_cache", lambda *a: (_ for _ in ()).throw(atomic.WriteError("read-only")))
    messages = []
    arrays = load_mnist(tmp_path, download=False, log=messages.append)
    assert np.array_equal(arrays.train_images, tiny_arrays.train_images)
    assert any("cannot be removed" in m for m in messages) and any("not cached" in m for m in messages)


def test_unknown_user_in_vaelab_data_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("VAELAB_DATA", "~no-such-user-here/mnist")
    code, _, err = run(capsys, "data")
    assert code == 2 and "~no-such-user-here" in err and one_line_error(err)


def test_a_data_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "data", "--data-dir", blocker)         # a bad argument: exit 2 (it was 1 until 2026-12-04)
    assert code == 2 and str(blocker) in err and one_line_error(err)
    assert "cannot create the data directory" in err and "choose another with --data-dir" in err
    # which: the directory's own name, or a parent's (until 2026-12-07 "(File exists)", "(Not a directory)")
    assert f"{blocker} (a file has that name);" in err
    code, _, err = run(capsys, "data", "--data-dir", blocker / "mnist")
    assert code == 2 and one_line_error(err) and f"{blocker / 'mnist'} ({blocker} is a file, not a directory);" in err


# ---- a full disk while a checkpoint is written -------------------------------------------------------


@pytest.mark.parametrize("failing, epoch", [(1, 2), (2, 3)])    # the resume's own rewrite, or epoch 3's checkpoint
def test_a_failed_weights_write_leaves_a_checkpoint_that_resumes_exactly(tmp_path, data_dir, monkeypatch, capsys,
                                                                         failing, epoch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    args = ["--data-dir", data_dir, *SMALL]
    assert main(["train", "--out", str(straight), "--epochs", "3", *map(str, args)]) == 0
    assert main(["train", "--out", str(broken), "--epochs", "2", *map(str, args)]) == 0
    real = atomic.atomic_write

    writes = []

    def disk_full_on_weights(path, write, mode="wb"):
        if path.name == ckpt.WEIGHTS and len(writes.append(path) or writes) >= failing:
            raise atomic.WriteError(f"cannot write {path}: No space left on device (errno 28); …",
                                    f"cannot write {path}: No space left on device (errno 28)", errno.ENOSPC)
        return real(path, write, mode)

    monkeypatch.setattr(ckpt, "atomic_write", disk_full_on_weights)
    code, _, err = run(capsys, "train", "--out", broken, "--resume", "--epochs", "3", *args)
    assert code == 1 and err.strip().endswith(
        f"{ckpt.WEIGHTS}: No space left on device (errno 28); training stopped: the training state of epoch {epoch} "
        f"was written and resumes exactly; {ckpt.WEIGHTS}, {ckpt.METRICS} and latent.csv may hold the checkpoint "
        f"before it until a resume writes them again from the state; free some space, then: vaelab train --out "
        f"{broken} --resume"), err
    monkeypatch.undo()
    ckpt.load_model(broken)                                 # the previous weights file is intact
    assert main(["train", "--out", str(broken), "--resume", "--epochs", "3", *map(str, args)]) == 0
    for name, tensor in ckpt.load_tensors(straight / ckpt.WEIGHTS)[0].items():
        assert torch.equal(tensor, ckpt.load_tensors(broken / ckpt.WEIGHTS)[0][name]), name


def test_pictures_not_drawn_after_the_last_checkpoint_say_that_the_training_stands(tmp_path, data_dir, monkeypatch,
                                                                                   capsys):
    """A disk that fills between the last checkpoint and the pictures: the training is whole, and the line says so and
    how to draw them (until 2026-12-05: "cannot write …/samples.png: …; free some space or write elsewhere")."""
    run_dir, args = tmp_path / "run", ["--data-dir", data_dir, *SMALL]
    real = atomic.atomic_write

    def disk_full_on_samples(path, write, *rest, **keywords):
        if path.name == "samples.png":
            what = f"cannot write {path}: No space left on device (errno 28)"
            raise atomic.WriteError(f"{what}; free some space or write elsewhere", what, errno.ENOSPC)
        return real(path, write, *rest, **keywords)

    monkeypatch.setattr(atomic, "atomic_write", disk_full_on_samples)
    code, _, err = run(capsys, "train", "--out", run_dir, "--epochs", "2", *args)
    assert code == 1 and err.strip().endswith(
        "samples.png: No space left on device (errno 28); the training itself ended and its checkpoint (epoch 2) "
        "stands whole, but elbo.png, samples.png and reconstructions.png were not all drawn; free some space, then: "
        f"vaelab train --out {run_dir} --resume draws them again"), err
    monkeypatch.undo()
    assert not (run_dir / "samples.png").exists() and (run_dir / "elbo.png").exists()
    code, out, _ = run(capsys, "train", "--out", run_dir, "--resume", *args)
    assert code == 0 and "nothing to train" in out and (run_dir / "samples.png").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_last_pictures_are_drawn_says_that_the_training_stands(tmp_path, data_dir, monkeypatch,
                                                                                capsys, sig, sigint_as_at_a_terminal):
    """A scheduler's SIGTERM (or Ctrl-C) between the last checkpoint and the end of the pictures: the line says the
    training ended whole and how to draw them, train.log too (until 2026-12-07 "stopped by SIGTERM before it
    finished; vaelab replaces each file whole, …", the line of any command's stop, as if it had not ended)."""
    from vaelab import cli

    run_dir, args = tmp_path / "run", ["--data-dir", data_dir, *SMALL]
    monkeypatch.setattr(cli, "write_pictures", lambda *_: signal.raise_signal(sig))
    code, _, err = run(capsys, "train", "--out", run_dir, "--epochs", "2", *args)
    said = (f"stopped by {signal.Signals(sig).name} while drawing the pictures: the training itself ended and its "
            f"checkpoint (epoch 2) stands whole, but elbo.png, samples.png and reconstructions.png were not all drawn; "
            f"vaelab train --out {run_dir} --resume draws them again")
    assert code == 128 + sig and err.strip() == f"vaelab train: error: {said}", err
    assert (run_dir / training.TRAIN_LOG).read_text().splitlines()[-1].endswith(said)
    monkeypatch.undo()
    code, out, _ = run(capsys, "train", "--out", run_dir, "--resume", *args)
    assert code == 0 and "nothing to train" in out and (run_dir / "samples.png").exists()


def test_a_second_stop_while_a_stopped_runs_pictures_are_drawn_keeps_the_first_ones_line(tmp_path, data_dir,
                                                                                          monkeypatch, capsys,
                                                                                          sigint_as_at_a_terminal):
    """At a stop the pictures of what stands are drawn; Ctrl-C then (impatience) leaves the first stop's line, where
    the checkpoint is and how to resume, and a note on the pictures (until 2026-12-07 only "interrupted (Ctrl-C)
    before it finished", exit 130 for a SIGTERM's stop)."""
    from vaelab import cli

    run_dir, args = tmp_path / "run", ["--data-dir", data_dir, *SMALL]
    assert main(["train", "--out", str(run_dir), "--epochs", "1", *map(str, args)]) == 0
    stopped = "stopped by SIGTERM after epoch 1; checkpoint written (it resumes exactly)"

    def fit(self):
        raise training.Interrupted(stopped, signal.SIGTERM)

    monkeypatch.setattr(training.Trainer, "fit", fit)
    monkeypatch.setattr(cli, "write_pictures", lambda *_: signal.raise_signal(signal.SIGINT))
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", "2", *args)
    assert code == 143 and err.strip().splitlines() == [
        f"note: the pictures in {run_dir} were not redrawn (stopped again); they show the run as it was before",
        f"vaelab train: error: {stopped}"], err


def test_a_run_on_a_read_only_file_system_says_a_resume_cannot_move(tmp_path, data_dir, monkeypatch, capsys):
    """A resume of a run on a read-only mount said "choose a writable --out", which a resume cannot do."""
    run_dir, args = tmp_path / "run", ["--data-dir", data_dir, *SMALL]
    assert main(["train", "--out", str(run_dir), "--epochs", "1", *map(str, args)]) == 0
    real = ckpt.os.open

    def read_only(path, *rest, **keywords):
        if str(path).endswith(ckpt.LOCK):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(path, *rest, **keywords)

    monkeypatch.setattr(ckpt.os, "open", read_only)
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", "2", *args)
    assert code == 1 and err.strip().endswith(
        f"Read-only file system (errno 30); a run resumes where it is: make {run_dir} writable, or copy the run to a "
        f"writable place and resume the copy"), err
    code, _, err = run(capsys, "train", "--out", tmp_path / "new", "--epochs", "1", *args)
    assert code == 1 and err.strip().endswith("Read-only file system (errno 30); choose a writable --out"), err
    # `sample` said "choose a writable location with free space", not that --out puts the picture elsewhere
    monkeypatch.setattr(atomic, "atomic_write", lambda path, *rest, **keywords: (_ for _ in ()).throw(
        atomic.WriteError("…", f"cannot write in {path.parent}: Read-only file system (errno 30)", errno.EROFS)))
    code, _, err = run(capsys, "sample", run_dir)
    assert code == 1 and err.strip().endswith(f"Read-only file system (errno 30); make {run_dir} writable, or pass "
                                              f"--out FILE.png in a writable place"), err


def test_a_resume_removes_the_temporary_files_of_writes_a_kill_cut_short(tmp_path, data_dir, capsys):
    """A kill -9 inside a checkpoint's write left its temporary file (a training state's size) in the run for good.
    A resume, under the run's lock, removes those of the training's own files and says so; an evaluation's (it may
    write beside a training) and anything else stay."""
    run_dir, args = tmp_path / "run", ["--data-dir", data_dir, *SMALL]
    assert main(["train", "--out", str(run_dir), "--epochs", "1", *map(str, args)]) == 0
    cut = [".training_state.safetensors.k3x_9q0a.tmp", ".model.safetensors.0aa1bb2c.tmp", ".metrics.csv.abcdefgh.tmp"]
    kept = [".eval-k5-n50-seed0.json.abcdefgh.tmp", ".notes.tmp", ".model.safetensors.mine.tmp"]
    for name in cut + kept:
        (run_dir / name).write_bytes(b"a write cut short")
    code, out, _ = run(capsys, "train", "--out", run_dir, "--resume", "--epochs", "2", *args)
    assert code == 0 and f"removed 3 temporary files of a write a kill cut short: {', '.join(sorted(cut))}" in out
    assert sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")) == sorted(kept)
    assert "removed 3 temporary files" in (run_dir / training.TRAIN_LOG).read_text()


def test_library_functions_raise_value_errors_with_messages():
    from vaelab.laplace import laplace_integral, log_stirling

    for bad in (float("inf"), float("nan"), 0, -1.0, "abc", []):
        with pytest.raises(ValueError, match="N"):
            log_stirling(bad)
    for terms in (-1, 31, 2.5, True):
        with pytest.raises(ValueError, match="terms must be"):
            log_stirling(10, terms)
    for kwargs, message in [({"M": float("nan")}, "M must be"), ({"M": 0}, "M must be"),
                            ({"x0": float("inf")}, "x0 must be"), ({"x0": [[1.0]]}, "x0 must be"),
                            ({"max_steps": 0}, "max_steps"), ({"jitter": -1.0}, "jitter")]:
        with pytest.raises(ValueError, match=message):
            laplace_integral(lambda x: -x * x, **kwargs)
    with pytest.raises(ValueError, match="log_f must be a function"):
        laplace_integral(3.0)
    with pytest.raises(ValueError, match="log_f failed"):
        laplace_integral(lambda x: x.nonexistent())
    for error in (UsageError("x"), CheckpointError("x")):
        assert isinstance(error, ValueError)
