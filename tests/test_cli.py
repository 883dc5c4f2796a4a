"""The command line: every command with tiny arguments, and every bad input a one-line error (status 2)."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import one_line, run
from vaelab import checkpoint as ckpt
from vaelab.cli import _train_config, build_parser, main
from vaelab.config import RunConfig
from vaelab.errors import UsageError

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """One epoch on the synthetic set (2000 images), as `vaelab train` leaves it."""
    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    assert main(["train", "--out", str(run_dir), "--epochs", "1", "--data-dir", str(data_dir),
                 "--test-examples", "200", "--no-progress"]) == 0
    return run_dir


def test_train_leaves_a_complete_run(trained):
    for name in ("config.json", "model.safetensors", "training_state.safetensors", "metrics.csv",
                 "elbo.png", "samples.png", "reconstructions.png"):
        assert (trained / name).exists(), name
    for name in ("elbo.png", "samples.png", "reconstructions.png"):
        assert (trained / name).read_bytes()[:8] == PNG
    rows = list(csv.DictReader(open(trained / "metrics.csv")))
    assert len(rows) == 1 and float(rows[0]["train_elbo"]) < 0 and float(rows[0]["test_elbo"]) < 0
    assert abs(float(rows[0]["test_elbo"]) - (float(rows[0]["test_reconstruction"]) - float(rows[0]["test_kl"]))) < 1e-4
    config = RunConfig.load(trained / "config.json")
    assert config.model.hidden == ((256,),) and config.model.latent == (50,) and config.train.batch_size == 64
    assert config.preset == "seed" and config.train.threads >= 1
    _, model = ckpt.load_model(trained)      # rebuilt from config.json alone
    count = 784 * 256 + 256 + 256 * 100 + 100 + 50 * 256 + 256 + 256 * 784 + 784
    assert sum(p.numel() for p in model.parameters()) == config.model.parameter_count() == count


def test_evaluate_writes_eval_json(trained, data_dir, capsys):
    code, out, _ = run(capsys, "evaluate", trained, "--k", "20", "--test-examples", "40", "--data-dir", data_dir,
                       "--no-progress")
    assert code == 0 and "NLL =" in out
    result = json.loads((trained / "eval-k20-n40-seed0.json").read_text())
    assert result["k"] == 20 and result["n_examples"] == 40
    assert result["nll"] > 0 and result["nll_stderr"] > 0 and result["elbo"] < 0
    assert -result["nll"] >= result["elbo"] - 3 * result["elbo_stderr"]   # IWAE-20 ≥ ELBO up to noise


def test_evaluate_with_bf16_decoder_products(trained, data_dir, capsys):
    """`--precision bf16-emulated`: its own record (the float32 one keeps its name and stays the run's
    headline), the same draws as float32, so the per-digit values differ by bf16's rounding alone."""
    from vaelab.runs import read_run

    common = ["evaluate", trained, "--k", "20", "--test-examples", "40", "--data-dir", data_dir, "--no-progress"]
    assert run(capsys, *common, "--overwrite")[0] == 0
    code, out, _ = run(capsys, *common, "--precision", "bf16-emulated")
    assert code == 0 and "with bf16-emulated decoder products" in out
    fp32 = json.loads((trained / "eval-k20-n40-seed0.json").read_text())
    bf16 = json.loads((trained / "eval-k20-n40-seed0-bf16-emulated.json").read_text())
    assert bf16["precision"] == "bf16-emulated" and fp32["precision"] == "fp32"
    assert bf16["estimates"][1]["name"] == "IWAE-20, q(z|x), bf16-emulated decoder products"
    assert bf16["elbo"] == fp32["elbo"]                     # only the IWAE estimate's decoder changes
    assert 0 < abs(bf16["nll"] - fp32["nll"]) < 0.1
    assert read_run(trained).headline_evaluation()["file"] == "eval-k20-n40-seed0.json"


def test_bf16_evaluation_is_refused_where_it_does_not_apply(trained, data_dir, tmp_path, capsys):
    run_dir = tmp_path / "two"
    assert run(capsys, "train", "--out", run_dir, "--model", "mlp2", "--hidden", "16", "--hidden-top", "8",
               "--latent", "4", "2", "--epochs", "1", "--train-examples", "200", "--test-examples", "20",
               "--data-dir", data_dir, "--no-progress")[0] == 0
    code, _, err = run(capsys, "evaluate", run_dir, "--k", "5", "--precision", "bf16-emulated", "--data-dir", data_dir)
    assert code == 2 and "covers the one-stochastic-layer mlp models" in err and len(err.strip().splitlines()) == 1
    assert not list(run_dir.glob("eval*"))
    # an mlp outside the hand-derived forms is told what puts it there (it read "this run's model is mlp")
    from vaelab.evaluation import check_precision
    from vaelab.models import ModelConfig, build_model

    for fields, has in [({"flow": "planar", "flow_steps": 3}, "mlp with 3 steps of planar flow"),
                        ({"flow": "iaf", "flow_steps": 2}, "mlp with 2 steps of iaf flow"),   # read "a iaf flow"
                        ({"prior": "mog", "prior_components": 2, "activation": "gated"},
                         "mlp with the mog prior and gated layers")]:
        with pytest.raises(UsageError, match=f"this run's model is {has}: use --precision fp32$"):
            check_precision(build_model(ModelConfig(hidden=((8,),), latent=(2,), **fields)), "bf16")


def test_gap_steps_without_gaps_is_refused_not_ignored(trained, data_dir, capsys):
    code, _, err = run(capsys, "evaluate", trained, "--k", "5", "--gap-steps", "50", "--data-dir", data_dir)
    assert code == 2 and err.strip() == ("vaelab evaluate: error: --gap-steps 50 sets the optimisation of --gaps: add "
                                         "--gaps, or drop --gap-steps")


def test_evaluate_laplace_table(trained, data_dir, capsys):
    code, out, _ = run(capsys, "evaluate", trained, "--k", "10", "--test-examples", "10", "--laplace",
                       "--data-dir", data_dir, "--no-progress")
    assert code == 0
    names = [e["name"] for e in json.loads((trained / "eval-k10-n10-seed0-laplace.json").read_text())["estimates"]]
    assert names == ["ELBO, one draw per digit", "IWAE-10, q(z|x)", "IS-10, Laplace proposal", "Laplace"]
    assert "approximation, not a bound" in out


def test_sample_and_stirling_and_data(trained, data_dir, tmp_path, capsys, monkeypatch):
    from vaelab import plots

    titles, plot_grid = [], plots.plot_grid
    monkeypatch.setattr(plots, "plot_grid", lambda images, path, title, **kw: (titles.append(title),
                                                                                plot_grid(images, path, title, **kw)))
    code, out, _ = run(capsys, "sample", trained, "--n", "16", "--seed", "3", "--out", tmp_path / "s.png")
    assert code == 0 and (tmp_path / "s.png").read_bytes()[:8] == PNG
    assert titles == ["16 samples from p(x), seed 3: decoder means\nof model.safetensors after epoch 1"]
    code, out, _ = run(capsys, "stirling", "--n", "1", "10", "100", "--terms", "2", "--plot", tmp_path / "st.png")
    assert code == 0 and (tmp_path / "st.png").read_bytes()[:8] == PNG
    picture = (tmp_path / "st.png").read_bytes()                 # an existing picture needs --overwrite
    code, _, err = run(capsys, "stirling", "--n", "5", "--plot", tmp_path / "st.png")
    assert code == 2 and ("exists (vaelab's or not, it is kept); pass --overwrite to replace it with this picture, or "
                          "--plot another file") in err
    assert (tmp_path / "st.png").read_bytes() == picture
    code, _, err = run(capsys, "stirling", "--n", "5", "--plot", tmp_path / "nowhere" / "st.png")
    assert code == 2 and f"--plot {tmp_path / 'nowhere' / 'st.png'}: directory" in err   # the flag given, not --out
    assert run(capsys, "stirling", "--n", "5", "--plot", tmp_path / "st.png", "--overwrite")[0] == 0
    row_100 = out.strip().splitlines()[-2].split()
    assert row_100[0] == "100" and abs(float(row_100[4]) - 1) < 1e-3
    code, out, _ = run(capsys, "data", "--data-dir", data_dir)
    assert code == 0 and "2000 training and 500 test images" in out


BAD = [
    ["train", "--epochs", "0"], ["train", "--epochs", "-3"], ["train", "--batch-size", "0"],
    ["train", "--latent", "0"], ["train", "--hidden", "-1"], ["train", "--lr", "0"], ["train", "--lr", "-1e-3"],
    ["train", "--lr", "nan"], ["train", "--lr", "inf"], ["train", "--device", "tpu"], ["train", "--epochs", "abc"],
    ["train", "--binarize", "grey"], ["evaluate", "RUN", "--k", "0"], ["evaluate", "RUN", "--k", "-5"],
    ["train", "--precision", "fp16"], ["train", "--clip-grad-norm", "-1"], ["train", "--clip-grad-norm", "nan"],
    ["train", "--clip-grad-value", "-0.5"], ["train", "--clip-grad-value", "inf"], ["train", "--early-stopping", "-1"],
    ["evaluate", "RUN", "--precision", "bf8"],
    ["sample", "RUN", "--n", "0"], ["frobnicate"], ["evaluate", "RUN", "--out", "e.txt"],
]


def test_a_bound_that_is_a_power_of_ten_is_written_as_one(capsys):
    """stirling --n's bound read "at most 1000000000000000000" (eighteen zeros to count) until 2026-12-07."""
    with pytest.raises(SystemExit):
        main(["stirling", "--n", "1e19"])
    assert capsys.readouterr().err.strip() == "vaelab stirling: error: argument --n: must be at least 1 and at most " \
        "10¹⁸, got 1e19"
    with pytest.raises(SystemExit):
        main(["train", "--flow-width", "1e9"])
    assert "at most 1048576, got 1e9" in capsys.readouterr().err


@pytest.mark.parametrize("args", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_arguments_exit_2_with_one_line(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "run") if a == "RUN" else a for a in args])
    _, err = capsys.readouterr()
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "error" in err
    assert list(tmp_path.iterdir()) == []          # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(tmp_path, data_dir, capsys):
    code, _, err = run(capsys, "train", "--out", tmp_path / "r", "--device", "cuda", "--data-dir", data_dir)
    assert code == 2 and "no CUDA GPU" in err and not (tmp_path / "r").exists()


def test_a_gpu_the_machine_does_not_have_is_refused_in_one_line(tmp_path, data_dir, trained, capsys, monkeypatch):
    """`--device cuda:1` on a machine with one GPU, and a torchrun rank beyond the machine's GPUs: exit 2, one line
    naming the GPUs there are and the fix, nothing written (the GPU count is faked: this runs without a GPU)."""
    from vaelab.distributed import World
    from vaelab.training import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = run(capsys, "train", "--out", tmp_path / "r", "--device", "cuda:1", "--data-dir", data_dir)
    assert code == 2 and err.strip() == ("vaelab train: error: --device cuda:1, but this machine has 1 CUDA GPU; use "
                                         "--device cuda") and not (tmp_path / "r").exists()
    before = sorted(trained.iterdir())
    code, _, err = run(capsys, "evaluate", trained, "--device", "cuda:3", "--k", "10", "--no-progress")
    assert code == 2 and "--device cuda:3, but this machine has 1 CUDA GPU" in err and len(err.splitlines()) == 1
    assert sorted(trained.iterdir()) == before
    with pytest.raises(UsageError, match=r"^rank 3 needs cuda:1, but this machine has 1 CUDA GPU; start at most 1 "
                                         r"process per machine \(torchrun --nproc-per-node\)$"):
        resolve_device("cuda", World(rank=3, size=4, local_rank=1, local_size=2))
    assert resolve_device("auto", World(rank=1, size=2, local_rank=0, local_size=1)) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(UsageError, match=r"has 4 CUDA GPUs; use --device cuda:0 … cuda:3$"):
        resolve_device("cuda:4")


def test_a_resumed_run_that_asked_for_more_digits_than_there_are_still_resumes(data_dir):
    """A new run asking for more digits than the data set has is refused (below); one trained before that check
    (it took all 2000, its config.json saying 2500) still prepares its data, on all of them, when resumed."""
    import argparse

    from vaelab.cli import _prepare_training

    config = _train_config(build_parser().parse_args(["train", "--train-examples", "2500", "--validation", "100",
                                                      "--data-dir", str(data_dir), "--engine", "autograd"]),
                           RunConfig())
    flags = dict(threads=torch.get_num_threads(), tensorboard=False, engine=None)
    _, _, data = _prepare_training(argparse.Namespace(resume=True, **flags), config)
    assert data.n_train == 1900 and len(data.validation_binary) == 100
    with pytest.raises(UsageError, match="^--train-examples 2500: the data set has 2000 training digits; give at "
                                         r"most 2000 \(or leave it out: all of them\)$"):
        _prepare_training(argparse.Namespace(resume=False, **flags), config)


def test_run_directories_are_protected(trained, data_dir, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    code, _, err = run(capsys, "train", "--out", trained, "--data-dir", data_dir, "--epochs", "1")
    assert code == 2 and "already holds a run; add --resume" in err
    # refused before the data are read: it fetched and cached MNIST into a new --data-dir first
    code, _, err = run(capsys, "train", "--out", trained, "--data-dir", tmp_path / "fresh-data", "--epochs", "1")
    assert code == 2 and "already holds a run; add --resume" in err and not (tmp_path / "fresh-data").exists()
    # more digits than the data set has: it trained on all of them, its config.json saying the number asked for
    for flag, there in (("--train-examples", 2000), ("--test-examples", 500)):
        code, _, err = run(capsys, "train", "--out", tmp_path / "too-many", "--data-dir", data_dir, flag,
                           str(there + 1), "--epochs", "1")
        assert code == 2 and err.count("\n") == 1 and f"{flag} {there + 1}: the data set has {there}" in err
        assert f"give at most {there}" in err and not (tmp_path / "too-many").exists()
    (tmp_path / "a-file").write_text("mine")
    code, _, err = run(capsys, "train", "--out", tmp_path / "a-file", "--data-dir", data_dir, "--epochs", "1")
    assert code == 2 and "a-file exists and is not an empty directory" in err
    assert (tmp_path / "a-file").read_text() == "mine"
    code, _, err = run(capsys, "train", "--out", trained, "--resume", "--hidden", "128", "--data-dir", data_dir)
    assert code == 2 and "different config (model.hidden: [[256]] → [[128]])" in err
    assert "only --epochs, --early-stopping, --device, --threads, --engine, --data-dir may change" in err
    # what changes is said first (until 2026-12-07 --model hvae was told to give more --latent sizes)
    code, _, err = run(capsys, "train", "--out", trained, "--resume", "--model", "hvae", "--data-dir", data_dir)
    assert code == 2 and one_line(err) and "different config (model.name: \"mlp\" → \"hvae\")" in err, err
    code, _, err = run(capsys, "train", "--out", tmp_path / "nothing", "--resume")
    assert code == 2 and "not a vaelab run" in err
    code, _, err = run(capsys, "evaluate", tmp_path / "missing")
    assert code == 2 and "does not exist" in err
    # `vaelab runs` of a folder that is not there says so (until 2026-12-07 "is not a directory")
    code, _, err = run(capsys, "runs", tmp_path / "missing")
    assert code == 2 and one_line(err) and f"{tmp_path / 'missing'} does not exist; give the directory" in err, err
    code, _, err = run(capsys, "runs", tmp_path / "a-file")
    assert code == 2 and f"{tmp_path / 'a-file'} is not a directory; give the directory" in err, err
    code, _, err = run(capsys, "evaluate", tmp_path)
    assert code == 2 and "not a vaelab run" in err
    # a folder of runs names what it holds (until 2026-12-07 only that it was not a run)
    folder = trained.parent
    code, _, err = run(capsys, "evaluate", folder)
    assert code == 2 and one_line(err) and err.strip().endswith(
        f"{folder} is not a vaelab run (no config.json) but holds one: pass {trained}"), err
    (folder / "second").mkdir()
    (folder / "second" / "config.json").write_text("{}")
    for command in ("evaluate", "sample", "report"):
        code, _, err = run(capsys, command, folder)
        assert code == 2 and one_line(err) and err.strip().endswith(
            f"but holds 2 runs ({folder / 'second'} …; vaelab runs {folder} lists them): pass one of them"), err
    code, _, err = run(capsys, "compare", folder)
    assert code == 2 and one_line(err) and err.strip().endswith(
        f"compare needs two or more runs, got 1: {folder} is not a run but holds 2 runs ({folder / 'second'} …; "
        f"vaelab runs {folder} lists them): pass two or more of them"), err
    shutil.rmtree(folder / "second")
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before
    # a directory that is not a run is left as it was (a refused --out wrote its lock file there); a sweep's
    # directory is named as one, with where its runs are
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "train", "--out", folder, "--data-dir", data_dir, "--epochs", "1")
    assert code == 2 and "is not an empty directory" in err and [p.name for p in folder.iterdir()] == ["notes.txt"]
    sweep = tmp_path / "sweep"
    (sweep / "trials").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    (sweep / "sweep.toml").write_text("")
    for command in (["evaluate", sweep], ["sample", sweep], ["compare", sweep, trained], ["train", "--out", sweep,
                                                                                        "--resume"]):
        code, _, err = run(capsys, *command)
        assert code == 2 and f"{sweep} is a sweep's directory (vaelab sweep), not a run: its runs are its trials" \
            in err, (command, err)
    assert sorted(p.name for p in sweep.iterdir()) == ["sweep.json", "sweep.toml", "trials"]


def edited(path, section, field, value):
    """config.json with one field replaced, as a user's editor would leave it."""
    raw = json.loads(path.read_text())
    raw[section][field] = value
    return json.dumps(raw, indent=2).encode()


def damaged_copy(trained, tmp_path, name, content):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    (copy / name).write_bytes(content(copy / name) if callable(content) else content)
    return copy


@pytest.mark.parametrize("name, content, message", [
    ("model.safetensors", lambda p: p.read_bytes()[: len(p.read_bytes()) // 2], "truncated or corrupted"),
    ("model.safetensors", b"\x00" * 100, "truncated or corrupted"),
    ("config.json", b"{not json", "not valid JSON"),
    ("config.json", json.dumps({"version": 1, "model": {"hidden": 256}}).encode(), "missing"),
    ("config.json", lambda p: edited(p, "model", "hidden", [[128]]), "does not match the architecture in "
     "config.json (decoder.0.bias (128,) by config.json, (256,) in the file, "),
    ("config.json", lambda p: edited(p, "model", "hidden", "big"), "not of type"),
    ("config.json", lambda p: edited(p, "model", "future_field", 3), "unknown fields"),
])
def test_damaged_files_are_clear_errors(trained, tmp_path, capsys, data_dir, name, content, message):
    copy = damaged_copy(trained, tmp_path, name, content)
    code, _, err = run(capsys, "sample", copy, "--out", tmp_path / "x.png")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
    if name == "config.json":
        # the fix it names (until 2026-12-05 "restore it from a copy or retrain", or none): the state's copy is
        # written again by a resume once the damaged file is moved away
        assert f"training_state.safetensors keeps a copy of it: move it away (mv {copy}/config.json " \
            f"{copy}/config.json.bad), then `vaelab train --out {copy} --resume` writes it again" in err, err
        (copy / "config.json").rename(copy / "config.json.bad")
        assert main(["train", "--out", str(copy), "--resume", "--data-dir", str(data_dir), "--no-progress"]) == 0
        assert run(capsys, "sample", copy, "--out", tmp_path / "x.png")[0] == 0


@pytest.mark.parametrize("argv", [
    ["report", "RUN", "--figures", ""],          # wrote its 90 figures into the current directory
    ["data", "--data-dir", ""],                  # cached MNIST there
    ["runs", ""], ["train", "--out", "", "--epochs", "1"], ["evaluate", ""], ["sample", "RUN", "--out", " "],
    ["compare", "RUN", ""], ["stirling", "--plot", ""], ["sweep", "", "--out", "sw"],
])
def test_an_empty_path_is_refused_not_read_as_the_current_directory(trained, tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:              # argparse's exit
        main([str(trained) if word == "RUN" else word for word in argv])
    err = capsys.readouterr().err
    blank = " " if " " in argv else ""
    assert exit_info.value.code == 2 and one_line(err)
    assert f"{blank!r} is {'a blank' if blank else 'an empty'} path (an unset shell variable?)" in err
    assert list(tmp_path.iterdir()) == []                                    # nothing written where it ran


@pytest.mark.parametrize("argv", [
    ["train", "--out", "LONG", "--epochs", "1"], ["evaluate", "RUN", "--out", "LONG.json"], ["runs", "LONG"],
    ["report", "RUN", "--out", "sub/LONG.html"], ["sample", "RUN", "--out", "LONG/x.png"],
])
def test_a_name_longer_than_the_file_system_takes_is_refused(trained, tmp_path, capsys, monkeypatch, argv):
    """A name of 300 bytes (NAME_MAX is 255 on Linux's file systems): one line naming it and the limit, exit 2,
    nothing written (was "File name too long (…the whole path…, errno 36)", exit 1, or a traceback from `runs`)."""
    monkeypatch.chdir(tmp_path)
    long = "ü" + "a" * 298                                                  # 300 bytes in UTF-8
    with pytest.raises(SystemExit) as exit_info:
        main([str(trained) if word == "RUN" else word.replace("LONG", long) for word in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and one_line(err)
    assert re.search(r"the name 'üaaaaaaaaaaa…a{3,8}(\.json|\.html)?' in it is 30\d bytes long, and a file's name "
                     r"may have at most 255 here; give a shorter name", err), err
    assert list(tmp_path.iterdir()) == []


def test_a_blank_vaelab_data_is_refused(capsys, monkeypatch):
    monkeypatch.setenv("VAELAB_DATA", "  ")
    code, _, err = run(capsys, "data")
    assert code == 2 and err.strip() == ("vaelab data: error: $VAELAB_DATA is '  ', blank; set it to a directory, "
                                         "or unset it")


def test_a_relative_xdg_cache_home_is_ignored_as_the_specification_says(tmp_path, monkeypatch):
    """An absolute $XDG_CACHE_HOME (or one under ~) holds the MNIST cache and the native libraries; a relative one is
    invalid by the XDG Base Directory Specification and ignored: until 2026-12-08 it was taken from the working
    directory, so that every folder a command ran in had a cache of its own."""
    from vaelab import native
    from vaelab.data import default_data_dir

    monkeypatch.delenv("VAELAB_DATA", raising=False)
    monkeypatch.delenv("VAELAB_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for value, base in [("relative/cache", tmp_path / "home" / ".cache"), ("./c", tmp_path / "home" / ".cache"),
                        (str(tmp_path / "xdg"), tmp_path / "xdg"), ("~/xdg", tmp_path / "home" / "xdg")]:
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert default_data_dir() == base / "vaelab" / "mnist", value
        assert native._cache_dirs()[0] == base / "vaelab" / "native", value


def test_pickle_in_place_of_checkpoint_is_refused_not_loaded(trained, tmp_path, capsys, data_dir):
    import io

    class Exploit:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    buffer = io.BytesIO()
    torch.save({"weights": Exploit()}, buffer)
    for name in ("model.safetensors", "training_state.safetensors"):
        copy = damaged_copy(trained, tmp_path / name, name, buffer.getvalue())
        command = ["sample", copy, "--out", tmp_path / "x.png"] if name == "model.safetensors" else \
            ["train", "--out", copy, "--resume", "--epochs", "2", "--data-dir", data_dir, "--no-progress"]
        code, _, err = run(capsys, *command)
        assert code == 2 and "truncated or corrupted" in err
    assert not list(tmp_path.rglob("PWNED")) and not (tmp_path.parent / "PWNED").exists()


# ---- property-based: any flag values are either a valid config or a one-line error ------------------

ints = st.one_of(st.integers(-10, 10**6), st.just(0))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-3]))


@settings(max_examples=300, deadline=None)
@given(epochs=ints, batch=ints, hidden=ints, latent=ints, lr=floats, seed=st.integers(-5, 2**64))
def test_config_values_property(epochs, batch, hidden, latent, lr, seed):
    argv = ["train", "--epochs", str(epochs), "--batch-size", str(batch), "--hidden", str(hidden),
            "--latent", str(latent), "--lr", repr(lr), "--seed", str(seed)]
    valid = (epochs >= 1 and batch >= 1 and hidden >= 1 and latent >= 1 and math.isfinite(lr) and lr > 0
             and 0 <= seed < 2**63)
    try:
        args = build_parser().parse_args(argv)
        config = _train_config(args, RunConfig())
    except SystemExit as exc:
        assert exc.code == 2 and not valid
        return
    except UsageError:
        assert not valid
        return
    assert valid
    assert RunConfig.from_dict(json.loads(config.to_json())) == config   # round trip through config.json


def test_unwritable_out_is_reported_before_training(tmp_path, data_dir, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, out, err = run(capsys, "train", "--out", blocker / "run", "--data-dir", data_dir, "--no-progress")
    assert code == 1 and "cannot create" in err and str(blocker) in err and "epoch" not in out


def test_early_stopping_ends_the_run_where_the_validation_elbo_stopped_improving(tmp_path, data_dir, capsys,
                                                                                 monkeypatch):
    """--early-stopping N: the run ends after N epochs past the warm-up without a better validation ELBO, says so on
    the terminal and in train.log, and is "stopped early" (not "interrupted") for `runs` and the report; a resume
    with the same flags trains nothing, one with --early-stopping 0 goes on. The validation ELBOs are scripted
    (the trainer's own test ELBOs stay real): −100, −90 (the best, epoch 2), −95, −91, then −89, −88."""
    import vaelab.training
    from vaelab.runs import read_run

    real, scripted = vaelab.training.elbo_summary, iter([-100.0, -90.0, -95.0, -91.0, -89.0, -88.0])

    def summary(model, images, batch, seed, units=None):
        values = real(model, images, batch, seed, units)
        return values if units is not None else {**values, "elbo": next(scripted)}   # units: the test split's

    monkeypatch.setattr(vaelab.training, "elbo_summary", summary)
    out = tmp_path / "run"
    common = ["--data-dir", data_dir, "--test-examples", "100", "--validation", "500", "--no-progress"]
    code, stdout, _ = run(capsys, "train", "--out", out, "--epochs", "10", "--warmup", "1", "--early-stopping", "2",
                          *common)
    line = ("stopped early after epoch 4 of 10: no better validation ELBO than -90.000 (epoch 2) in the 2 epochs "
            "since (--early-stopping 2)")
    assert code == 0 and line in stdout and "early stopping after 2 epochs without a better validation ELBO (counted "\
        "after the warm-up's 1)" in stdout
    assert line in (out / "train.log").read_text()
    assert f"to train on: vaelab train --out {out} --resume --early-stopping 0 (or a larger N)" in stdout
    assert f"next: vaelab evaluate {out} --checkpoint best" in stdout
    assert len((out / ckpt.METRICS).read_text().splitlines()) == 1 + 4
    _, meta = ckpt.load_tensors(out / ckpt.STATE)
    assert meta["epoch"] == 4 and meta["best_epoch"] == 2
    assert read_run(out).status == "stopped early" and not read_run(out).resumable
    code, stdout, _ = run(capsys, "runs", tmp_path)
    assert code == 0 and "stopped early" in stdout and "4/10" in stdout
    assert "best validation ELBO" in stdout and "-90.00 (epoch 2)" in stdout
    assert run(capsys, "report", out, "--out", tmp_path / "report.html")[0] == 0
    page = (tmp_path / "report.html").read_text()
    assert "stopped early: no better validation ELBO in the 2 epochs after epoch 2 (--early-stopping 2)" in page
    assert f"-90.00 nats at epoch 2\n      (model-best.safetensors: <code>vaelab evaluate {out} --checkpoint best" in page
    assert f"<code>vaelab evaluate {out} --gaps</code>" in page                 # nothing evaluated yet: the last weights
    # once the headline NLL is of the best weights, the page's hints (gaps, K curve) evaluate those weights too
    assert run(capsys, "evaluate", out, "--checkpoint", "best", "--k", "5", "--test-examples", "50")[0] == 0
    assert run(capsys, "report", out, "--out", tmp_path / "report-best.html")[0] == 0
    page = (tmp_path / "report-best.html").read_text()
    assert f"<code>vaelab evaluate {out} --checkpoint best --gaps</code>" in page
    assert f"<code>vaelab evaluate {out} --checkpoint best --k-curve</code>" in page
    code, stdout, _ = run(capsys, "train", "--out", out, "--resume", *common)          # nothing more to train
    assert code == 0 and line in stdout and len((out / ckpt.METRICS).read_text().splitlines()) == 1 + 4
    code, stdout, _ = run(capsys, "train", "--out", out, "--resume", "--epochs", "6", "--early-stopping", "0", *common)
    assert code == 0 and "stopped early" not in stdout and "epoch   6/6" in stdout
    assert f"next: vaelab evaluate {out} --checkpoint best\n" in stdout     # finished, its weights chosen on validation
    assert read_run(out).status == "finished" and RunConfig.load(out / ckpt.CONFIG).train.early_stopping == 0
    code, stdout, _ = run(capsys, "train", "--out", tmp_path / "plain run", "--epochs", "1", "--data-dir", data_dir,
                          "--test-examples", "100", "--no-progress")
    assert code == 0 and f"next: vaelab evaluate '{tmp_path / 'plain run'}'\n" in stdout   # no validation: the last
    # weights; and the path quoted, so that the command pastes into a shell as one word (was: two)
    code, _, err = run(capsys, "train", "--out", tmp_path / "other", "--early-stopping", "5", "--data-dir", data_dir)
    assert code == 2 and err.strip() == ("vaelab train: error: --early-stopping 5 watches the validation ELBO, and "
                                         "this run holds out no validation digits; give --validation N (e.g. 10000) "
                                         "or --early-stopping 0") and not (tmp_path / "other").exists()


def test_a_resume_may_amend_the_learning_rate_and_clipping_and_says_from_where(tmp_path, data_dir, capsys):
    """A run that went wrong goes on from its last checkpoint with a lower --lr or with --clip-grad-norm (and
    --clip-grad-value, said in the schedule's line): the
    epochs before keep their rows, train.log and the training state say what changed after which epoch, and
    config.json holds the values in force. Any other change is still refused. A config.json amended by a resume
    whose first checkpoint never came (or by hand) is an amendment of the state's values at the next resume."""
    from vaelab import checkpoint as ckpt
    from vaelab.config import RunConfig

    out = tmp_path / "run"
    common = ["--data-dir", data_dir, "--test-examples", "100", "--no-progress"]
    assert run(capsys, "train", "--out", out, "--epochs", "2", *common)[0] == 0
    before = (out / ckpt.METRICS).read_text().splitlines()
    code, stdout, _ = run(capsys, "train", "--out", out, "--resume", "--epochs", "3", "--lr", "5e-4",
                          "--clip-grad-norm", "1e-3", "--clip-grad-value", "0.5", *common)
    assert code == 0 and ("amended on resuming after epoch 2: train.clip_grad_norm: 0.0 → 0.001; "
                          "train.clip_grad_value: 0.0 → 0.5; train.lr: 0.001 → 0.0005") in stdout
    assert "each element of the gradient clamped to ±0.5 after its norm is clipped at 0.001" in stdout
    assert "learning rate 0.0005 from epoch 3 on (amended; the steps before trained with the former rate)" in stdout
    rows = [line.split(",") for line in (out / ckpt.METRICS).read_text().splitlines()]
    header = rows[0]
    assert [row[:len(header) - 4] for row in rows[1:3]] == [line.split(",")[:len(header) - 4] for line in before[1:]]
    assert rows[3][header.index("lr")] == "0.0005" and rows[3][header.index("clipped_steps")] == "32"
    assert rows[1][header.index("clipped_steps")] == ""                      # not clipped then
    log = (out / "train.log").read_text()
    assert log.index("amended on resuming after epoch 2") < log.index("epoch   3/3")
    config = RunConfig.load(out / ckpt.CONFIG)
    assert config.train.lr == 5e-4 and config.train.clip_grad_norm == 1e-3 and config.train.clip_grad_value == 0.5
    _, meta = ckpt.load_tensors(out / ckpt.STATE)
    assert meta["amendments"] == [{"epoch": 2, "step": 0, "changes": ["train.clip_grad_norm: 0.0 → 0.001",
                                                                       "train.clip_grad_value: 0.0 → 0.5",
                                                                       "train.lr: 0.001 → 0.0005"]}]
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", "4", "--batch-size", "32", *common)
    assert code == 2 and "--lr, --clip-grad-norm and --clip-grad-value from where the run stands" in err
    assert run(capsys, "report", out, "--out", tmp_path / "report.html")[0] == 0     # the report says it too
    assert ("Amended on resuming: after epoch 2, train.clip_grad_norm: 0.0 → 0.001; train.clip_grad_value: 0.0 → "
            "0.5; train.lr: 0.001 → 0.0005" in (tmp_path / "report.html").read_text())

    (out / ckpt.CONFIG).write_bytes(edited(out / ckpt.CONFIG, "train", "lr", 2e-4))
    code, stdout, _ = run(capsys, "train", "--out", out, "--resume", "--epochs", "4", *common)
    assert code == 0 and ("amended on resuming after epoch 3: train.lr: 0.0005 → 0.0002 (the steps before trained "
                          "with the former values; config.json held them already: set by an earlier resume that "
                          "wrote no checkpoint, or by hand)") in stdout
    _, meta = ckpt.load_tensors(out / ckpt.STATE)
    assert [entry["epoch"] for entry in meta["amendments"]] == [2, 3]
    # a finished run: an amendment nothing would use is refused, not kept in config.json to be logged again at every
    # later resume as if given then; a plain resume says that it has nothing to train (it writes the files again)
    kept = {name: (out / name).read_bytes() for name in (ckpt.CONFIG, "train.log", ckpt.STATE)}
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--lr", "1e-4", *common)
    assert code == 2 and one_line(err) and ("--lr changes how " + str(out) + " trains on, but it has trained all its 4 "
                                            "epochs; add --epochs N above 4 to train on with it") in err
    assert {name: (out / name).read_bytes() for name in kept} == kept
    code, stdout, _ = run(capsys, "train", "--out", out, "--resume", *common)
    assert code == 0 and f"{out} has trained all its 4 epochs: nothing to train (--epochs N above 4 trains on)" \
        in stdout
    assert "amended" not in stdout


def test_symbols_are_spelled_in_ascii_on_a_stream_that_cannot_encode_them():
    from vaelab.cli import legible_streams

    legible_streams()                                       # registers the error handler
    assert "2⁶³ ± β — 10⁻⁴, p̂(x) 中".encode("ascii", "vaelab.ascii") == b"2^63 +/- beta - 10^-4, p(x) ?"
    assert "± ×".encode("latin-1", "vaelab.ascii") == "± ×".encode("latin-1")       # what it encodes, it keeps


@pytest.mark.slow      # 12 s on 2 cores of a Zen 4 (2026-12-07)
def test_the_commands_work_in_a_locale_that_is_not_utf8(tmp_path, data_dir):
    """The C locale where Python does not coerce it to UTF-8 (as LANG=…ISO-8859-1 or PYTHONIOENCODING=ascii): until
    2026-12-05 `vaelab train` ended in a traceback before training (the native kernel's source read as ASCII), and
    the first ±, × or β printed ended any command (an evaluation before its record was written). Now the files are
    read and written as UTF-8 whatever the locale, and the terminal gets the symbols spelled in ASCII."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0", "VAELAB_DATA": str(data_dir)}
    env.pop("PYTHONIOENCODING", None)
    run_dir = tmp_path / "run"

    def vaelab(*argv):
        done = subprocess.run([sys.executable, "-m", "vaelab", *map(str, argv)], env=env, capture_output=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return done.stdout.decode("ascii") + done.stderr.decode("ascii")           # ASCII, whatever was printed

    assert "beta" in vaelab("train", "--out", run_dir, "--epochs", "2", "--warmup", "2", "--hidden", "32", "--latent",
                            "4", "--train-examples", "300", "--test-examples", "30", "--no-progress")
    assert "β rises from 0 to 1" in (run_dir / "train.log").read_text(encoding="utf-8")
    assert "NLL = " in vaelab("evaluate", run_dir, "--k", "5", "--no-progress") and list(run_dir.glob("eval-k5-*.json"))
    vaelab("report", run_dir, "--no-progress")
    assert "±" in (run_dir / "report.html").read_text(encoding="utf-8")
    assert "12N x rel. error" in vaelab("stirling", "--n", "5")


@pytest.mark.slow      # 5 s on 2 cores of a Zen 4 (2026-12-07)
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full (a device that is always full)")
def test_output_that_stdout_cannot_take_is_an_error_and_a_closed_pipe_is_not(trained, tmp_path, data_dir):
    """stdout on a full disk (/dev/full: every write fails with ENOSPC): until 2026-12-05 the lines were dropped
    without a word and the status was 0, so that `vaelab evaluate RUN --format csv > t.csv` left t.csv empty. Now one
    line on stderr naming where the output went and the first line lost, exit 1; the record is written all the same.
    A reader that closed its pipe (`vaelab presets | head -1`) is no error: nothing on stderr, exit 0."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "VAELAB_DATA": str(data_dir)}

    def vaelab(*argv, stdout):
        return subprocess.run([sys.executable, "-m", "vaelab", *map(str, argv)], env=env, stdout=stdout,
                              stderr=subprocess.PIPE, text=True, timeout=600)

    with open("/dev/full", "w") as full:
        done = vaelab("presets", stdout=full)
        assert done.returncode == 1 and one_line(done.stderr), done.stderr
        assert done.stderr.startswith("vaelab presets: error: stdout (/dev/full) could not take its output (No space "
                                      "left on device, errno 28): it is cut from the line 'seed: the reference model")
        assert done.stderr.rstrip().endswith("the command itself finished and each file it wrote is whole: make room "
                                             "there, or send the output elsewhere")
        record = tmp_path / "eval.json"
        done = vaelab("evaluate", trained, "--k", "3", "--test-examples", "20", "--format", "csv", "--out", record,
                      "--no-progress", stdout=full)
        assert done.returncode == 1
        assert "vaelab evaluate: error: stdout (/dev/full) could not take its output" in done.stderr.splitlines()[-1]
        assert json.loads(record.read_text(encoding="utf-8"))["k"] == 3
    reader, writer = os.pipe()
    os.close(reader)                                     # gone before the first line: every write is EPIPE
    try:
        done = vaelab("presets", stdout=writer)
    finally:
        os.close(writer)
    assert done.returncode == 0 and done.stderr == ""


@pytest.mark.parametrize("argv", [
    ["train", "--out", "BAD", "--epochs", "1"], ["evaluate", "BAD"], ["report", "RUN", "--out", "BAD.html"],
    ["sample", "RUN", "--out", "BAD.png"], ["runs", "BAD"], ["data", "--data-dir", "BAD"],
])
def test_a_path_that_is_not_utf8_is_refused_in_one_line(trained, tmp_path, capsys, monkeypatch, argv):
    """A name whose bytes are not UTF-8 (b"bad\\xffname"): until 2026-12-05 `train --out` trained, then ended in a
    traceback writing train.log ("surrogates not allowed"), leaving the new run directory; now one line, exit 2."""
    import os

    monkeypatch.chdir(tmp_path)
    bad = os.fsdecode(b"bad\xffname")
    with pytest.raises(SystemExit) as exit_info:
        main([str(trained) if word == "RUN" else word.replace("BAD", bad) for word in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and one_line(err) and "bad\\xffname" in err and "is not UTF-8 (its byte 0xff)" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow      # 10 s on 2 cores of a Zen 4 (2026-12-07)
def test_a_command_started_with_stdout_or_stderr_closed_does_its_work(trained, tmp_path, data_dir):
    """`vaelab evaluate RUN 2>&-`: Python's sys.stderr is None there, and until 2026-12-05 asking it whether it was
    a terminal ended the command in a traceback (exit 1, no record written). A closed stream takes nothing, quietly;
    the command does its work (exit 0)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "VAELAB_DATA": str(data_dir)}
    record = tmp_path / "eval.json"
    for closing in ("2>&-", ">&-", ">&- 2>&-"):
        done = subprocess.run(["bash", "-c", f'"$@" {closing}', "bash", sys.executable, "-m", "vaelab", "evaluate",
                               str(trained), "--k", "2", "--test-examples", "5", "--out", str(record), "--overwrite"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and json.loads(record.read_text(encoding="utf-8"))["k"] == 2, (closing, done)
        record.unlink()
    # the lines a long evaluation writes for a log (each refresh here), and an error, with stderr closed: nothing
    # (the lines' writer met None; an error line went to stdout, which print takes None for)
    code = ("import sys; import vaelab.evaluation as e; e.LOG_EVERY_S = 0.0; from vaelab.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    for argv, status in ((["evaluate", str(trained), "--k", "2", "--test-examples", "30", "--out", str(record)], 0),
                         (["evaluate", str(tmp_path / "missing")], 2)):
        done = subprocess.run(["bash", "-c", '"$@" 2>&-', "bash", sys.executable, "-c", code, *argv], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == status and "error" not in done.stdout and "digits (" not in done.stdout, done


@pytest.mark.parametrize("name", ["new\nline", "tab\there", "bell\x07"])
@pytest.mark.parametrize("argv", [["train", "--out", "BAD", "--epochs", "1"], ["evaluate", "BAD"],
                                  ["report", "RUN", "--out", "BAD.html"], ["data", "--data-dir", "BAD"]])
def test_a_path_holding_a_control_character_is_refused_in_one_line(trained, tmp_path, capsys, monkeypatch, argv,
                                                                    name):
    """`--out $'new\\nline'`: until 2026-12-05 the run was made, and every line naming it (the log's, errors', rows
    of `runs`) broke in two; now one line naming the character, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(trained) if word == "RUN" else word.replace("BAD", name) for word in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and one_line(err)
    control = next(character for character in name if ord(character) < 32)
    assert f"holds a control character ({control!r}); vaelab names its paths in lines" in err
    assert list(tmp_path.iterdir()) == []


def test_a_data_directory_that_is_not_utf8_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    import os

    monkeypatch.setenv("VAELAB_DATA", os.fsdecode(bytes(tmp_path) + b"/x\xfe"))
    code, _, err = run(capsys, "data")
    assert code == 2 and one_line(err) and "$VAELAB_DATA: " in err and "is not UTF-8 (its byte 0xfe)" in err


def test_an_evaluation_logged_to_a_file_writes_a_line_a_minute_of_each_long_part(trained, data_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    """stderr not a terminal (a log): a part of the evaluation that lasts longer than LOG_EVERY_S (a minute) writes
    a line each such interval and one at its end (until 2026-12-05 nothing until the results); shorter parts write
    nothing, and --no-progress none at all. Here the interval is made 0 s, so that every refresh is a line."""
    from vaelab import evaluation

    argv = ["evaluate", str(trained), "--k", "5", "--test-examples", "40", "--laplace", "--data-dir", str(data_dir)]
    assert main([*argv, "--out", str(tmp_path / "a.json")]) == 0
    assert "digits (" not in capsys.readouterr().err                  # the parts took less than a minute
    monkeypatch.setattr(evaluation, "LOG_EVERY_S", 0.0)
    assert main([*argv, "--out", str(tmp_path / "b.json")]) == 0
    lines = capsys.readouterr().err.splitlines()
    # (the time so far as a pattern: on a busy machine the 40 Laplace modes take seconds)
    assert any(re.fullmatch(r"Laplace \+ IS-5: 40/40 digits \(100 %\), \d\d:\d\d so far, about 00:00 to go", line)
               for line in lines), lines
    assert any(re.fullmatch(r"IWAE-5: 40/40 digits \(100 %\), .*", line) for line in lines), lines
    assert not any("\r" in line for line in lines)
    assert main([*argv, "--out", str(tmp_path / "c.json"), "--no-progress"]) == 0
    assert "digits (" not in capsys.readouterr().err
