"""The trainer: hand-derived gradients, Adam, exact resume, interruption, divergence, write failures."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from vaelab import atomic
from vaelab import checkpoint as ckpt
from vaelab import training
from vaelab.config import RunConfig, TrainConfig
from vaelab.data import DataConfig, prepare
from vaelab.engines import autograd_step, fused_step
from vaelab.errors import TrainingDiverged
from vaelab.models import MLPVAE, ModelConfig
from vaelab.optimizers import FlatAdam
from vaelab.training import FlatParameters, Trainer


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_fused_gradient_matches_autograd(dtype, tol):
    torch.manual_seed(0)
    model = MLPVAE(ModelConfig(hidden=((32,),), latent=(5,))).to(dtype)
    FlatParameters(model)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(17, 784, generator=g) < 0.3).to(dtype)
    eps = torch.randn(1, 17, 5, generator=g, dtype=dtype)
    sums_auto = autograd_step(model, x, eps)
    grads_auto = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad.fill_(float("nan"))       # the fused engine must write every gradient entry
    sums_fused = fused_step(model, x, eps)
    torch.testing.assert_close(sums_fused, sums_auto, rtol=tol, atol=tol * 100)
    for (name, p), expected in zip(model.named_parameters(), grads_auto):
        scale = expected.abs().max()
        assert (p.grad - expected).abs().max() <= tol * scale, name


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("name", ["tomczak-2-vampprior", "mlp-planar", "hvae-ladder-batchnorm"])
def test_the_written_gradient_is_backwards_bitwise_and_covers_every_parameter(name, flat):
    """``write_gradient`` (autograd.grad, then one cat into the flat buffer or a copy per parameter) against
    ``backward`` accumulating into zeroed gradients: the same bits in float32 (a VampPrior HVAE, the planar flow's
    hand-derived backward, a ladder with batch normalisation); a parameter the loss does not reach gets zeros over
    whatever its gradient held."""
    from test_models import tiny
    from vaelab.engines import _flat_gradient, write_gradient
    from vaelab.objectives import OBJECTIVES

    model, x, g = tiny(name)
    model = model.float()
    model.unused = torch.nn.Parameter(torch.ones(3))
    if flat:
        FlatParameters(model)
    else:                                                    # gradients that are not views of one buffer
        for p in model.parameters():
            p.grad = torch.zeros_like(p.t()).t() if p.dim() == 2 else torch.zeros_like(p)
    assert (_flat_gradient(list(model.parameters())) is not None) == flat
    eps = torch.randn(2, len(x), model.config.total_latent, generator=g)

    def loss() -> torch.Tensor:
        return -OBJECTIVES["iwae"](model(x.float(), eps), 0.7).objective.sum()

    for p in model.parameters():
        p.grad.zero_()
    loss().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad.fill_(float("nan"))
    write_gradient(model, loss())
    for (name, p), e in zip(model.named_parameters(), expected):
        assert torch.equal(p.grad, e), name
    assert torch.equal(model.unused.grad, torch.zeros(3))


@pytest.mark.parametrize("fused", [True, False])
def test_flat_adam_matches_torch_adam(fused):
    torch.manual_seed(0)
    reference = torch.randn(1000, requires_grad=True)
    ours = reference.detach().clone()
    grad = torch.zeros_like(ours)
    torch_adam = torch.optim.Adam([reference], lr=1e-2)
    adam = FlatAdam(ours, grad, lr=1e-2, fused=fused)
    for _ in range(20):
        g = torch.randn(1000)
        reference.grad = g.clone()
        grad.copy_(g)
        torch_adam.step()
        adam.step()
    # float32, other operation order: 20 steps of size ≈ 1e-2 agree to 1e-5
    torch.testing.assert_close(ours, reference.detach(), rtol=0, atol=1e-5 if not fused else 1e-6)


def small_config(epochs=3, **train):
    return RunConfig(model=ModelConfig(hidden=((64,),), latent=(8,)), data=DataConfig(test_examples=200),
                     train=TrainConfig(epochs=epochs, **train))


def weights(run_dir):
    return ckpt.load_tensors(run_dir / ckpt.WEIGHTS)[0]


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_latent_history_is_formatted_once_an_epoch_and_written_whole(tmp_path, data_dir, monkeypatch):
    """latent.csv and the training state hold every epoch's latent statistics; each epoch's rows and JSON are made
    once (``FormattedOnce``), where until 2026-12-07 the whole history was formatted again at every epoch's end
    (0.25 s of a small model's 0.26 s epoch by its 870th). The files are what formatting the whole would write: the
    state's metadata is json.dumps' own text of itself, and a resume (a history loaded) makes it again."""
    import csv
    import json

    from safetensors import safe_open

    from vaelab.cli import main

    made = []
    rows_of = Trainer._latent_rows
    monkeypatch.setattr(Trainer, "_latent_rows", lambda self, entry: made.append(entry["epoch"]) or rows_of(self, entry))
    run = tmp_path / "run"
    args = ["--hidden", "32", "--latent", "5", "--test-examples", "50", "--train-examples", "300", "--data-dir",
            str(data_dir), "--no-progress"]
    assert main(["train", "--out", str(run), "--epochs", "4", *args]) == 0
    assert made == [1, 2, 3, 4]
    assert main(["train", "--out", str(run), "--resume", "--epochs", "5", *args]) == 0
    assert made == [1, 2, 3, 4] + [1, 2, 3, 4] + [5]          # the loaded history made again, then the new epoch
    with safe_open(run / ckpt.STATE, "pt") as state:
        text = state.metadata()["json"]
    meta = json.loads(text)
    assert json.dumps(meta) == text and list(meta)[-1] == "latent"
    assert [entry["epoch"] for entry in meta["latent"]] == [1, 2, 3, 4, 5]
    rows = list(csv.DictReader(open(run / "latent.csv")))
    assert [(int(r["epoch"]), int(r["unit"])) for r in rows] == [(e, u) for e in range(1, 6) for u in range(5)]
    assert [float(r["kl"]) for r in rows[-5:]] == pytest.approx(meta["latent"][-1]["layers"][0]["kl"], rel=1e-5)

    count = []
    formatted = training.FormattedOnce(lambda item: count.append(item) or str(len(count)))
    a, b, c = object(), object(), object()
    assert formatted([a, b]) == ["1", "2"] and formatted([a, b, c]) == ["1", "2", "3"] and len(count) == 3
    assert formatted([a, c]) == ["1", "4"] and len(count) == 4            # a history replaced from its second item


@pytest.mark.parametrize("train", [{}, {"clip_grad_norm": 25.0}])
def test_resume_is_bitwise_identical_in_process(tmp_path, tiny_arrays, train):
    data = prepare(tiny_arrays, small_config().data)
    straight = tmp_path / "straight"
    straight.mkdir()
    Trainer(small_config(3, **train), straight, data, torch.device("cpu"), log=lambda m: None, progress=False).fit()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    Trainer(small_config(1, **train), resumed, data, torch.device("cpu"), log=lambda m: None, progress=False).fit()
    trainer = Trainer(small_config(3, **train), resumed, data, torch.device("cpu"), log=lambda m: None,
                      progress=False)
    trainer.load_checkpoint()
    assert trainer.state.epoch == 1
    trainer.fit()
    assert_bitwise_equal(weights(straight), weights(resumed))
    assert elbo_columns(straight) == elbo_columns(resumed)


def elbo_columns(run_dir):
    """metrics.csv without the timing columns (seconds differ between runs)."""
    lines = [line.split(",") for line in (run_dir / ckpt.METRICS).read_text().splitlines()]
    keep = [i for i, name in enumerate(lines[0]) if name not in training.TIME_FIELDS]
    return [[row[i] for i in keep] for row in lines]


def run_cli(*args, env_extra=None, hangup=signal.SIG_DFL, **kwargs):
    """`python -m vaelab.cli ARGS` in a child whose SIGHUP disposition is ``hangup``: SIG_DFL as started from a
    terminal, whatever the test runner inherited (under `nohup make test` it would be SIG_IGN), or SIG_IGN to
    stand for `nohup vaelab train`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "vaelab.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, hangup), **kwargs)


TRAIN_ARGS = ["--epochs", "3", "--hidden", "256", "--batch-size", "32", "--test-examples", "100", "--no-progress"]


def interrupt_after_first_epoch(run_dir, data_dir, sig, hangup=signal.SIG_DFL):
    """Start a 3-epoch run, send ``sig`` as soon as epoch 1's checkpoint exists; returns the exit status and
    the output."""
    process = run_cli("train", "--out", run_dir, "--data-dir", data_dir, *TRAIN_ARGS, hangup=hangup)
    metrics = run_dir / ckpt.METRICS
    deadline = time.monotonic() + 120
    while not metrics.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    rows_at_signal = len(metrics.read_text().splitlines()) - 1 if metrics.exists() else 0
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    assert rows_at_signal < 3, "the run finished before the signal: make the epochs longer"
    return process.returncode, out, err


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    """The uninterrupted 3-epoch run both interruption tests compare against."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    process = run_cli("train", "--out", run_dir, "--data-dir", data_dir, *TRAIN_ARGS)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    return run_dir


@pytest.mark.slow      # 22 s on 2 cores of a Zen 4 (2026-12-07)
@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130),
                                       (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_interrupt_and_resume_is_bitwise_identical(tmp_path, data_dir, straight, sig, code):
    """kill -9 loses the epoch under way; Ctrl-C, SIGTERM (schedulers, `timeout`) and SIGHUP (a closed
    terminal) finish the step, write a checkpoint, say so and exit with 128 + the signal; every case resumes
    to bitwise the weights of an uninterrupted run."""
    run = tmp_path / "run"
    returncode, out, err = interrupt_after_first_epoch(run, data_dir, sig)
    assert returncode == code, err
    if sig != signal.SIGKILL:
        assert f"stopped by {signal.Signals(sig).name}" in err and "resume with: vaelab train --out" in err
        assert len(err.strip().splitlines()) == 1
        assert "stopped by" in (run / training.TRAIN_LOG).read_text()
    # the run directory is loadable at once
    ckpt.load_model(run)
    resume = run_cli("train", "--out", run, "--data-dir", data_dir, "--resume", "--epochs", "3", "--no-progress")
    out, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err
    assert "resuming" in out
    assert_bitwise_equal(weights(straight), weights(run))
    assert elbo_columns(straight) == elbo_columns(run) and len(elbo_columns(run)) == 4


def test_hangup_is_ignored_under_nohup(tmp_path, data_dir, straight):
    """A run started with SIGHUP ignored (`nohup vaelab train …`) asked to survive a closed terminal: the
    hangup neither stops it nor changes what it computes."""
    run = tmp_path / "run"
    returncode, out, err = interrupt_after_first_epoch(run, data_dir, signal.SIGHUP, hangup=signal.SIG_IGN)
    assert returncode == 0, err
    assert "stopped by" not in err
    assert_bitwise_equal(weights(straight), weights(run))
    assert elbo_columns(straight) == elbo_columns(run) and len(elbo_columns(run)) == 4


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(tmp_path, tiny_arrays, monkeypatch):
    data = prepare(tiny_arrays, small_config().data)
    trainer = Trainer(small_config(1), tmp_path, data, torch.device("cpu"), log=lambda m: None, progress=False)
    trainer.fit()
    saved = {name: (tmp_path / name).read_bytes() for name in (ckpt.STATE, ckpt.WEIGHTS, ckpt.METRICS)}
    calls = {"n": 0}

    def poisoned(model, x, eps, objective, beta, grad_squares=None):
        calls["n"] += 1
        sums = fused_step(model, x, eps)
        return sums * float("nan") if calls["n"] >= 5 else sums

    monkeypatch.setitem(training.ENGINES, ("fused", "fp32"), poisoned)
    trainer = Trainer(small_config(2), tmp_path, data, torch.device("cpu"), log=lambda m: None, progress=False)
    trainer.load_checkpoint()
    with pytest.raises(TrainingDiverged, match="epoch 2, step 5"):
        trainer.fit()
    assert {name: (tmp_path / name).read_bytes() for name in saved} == saved
    last = (tmp_path / training.TRAIN_LOG).read_text().splitlines()[-1]       # the log says why it ends there
    assert "the ELBO became nan nats per example at epoch 2, step 5" in last and "epoch 1" in last
    assert "a lower --lr (it was 0.001) or --clip-grad-norm C" in last                  # what to try instead
    assert f"vaelab train --out {tmp_path} --resume --lr X or --clip-grad-norm C" in last


def test_failed_write_names_the_path_and_keeps_the_old_file(tmp_path, tiny_arrays, monkeypatch):
    """A disk that fills during a checkpoint: training stops naming the file, what stands and the command that goes on
    (until 2026-12-05 the line said only "free some space or write elsewhere", and train.log nothing)."""
    data = prepare(tiny_arrays, small_config().data)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:                        # before the first checkpoint: nothing stands
        patch.setattr(atomic.os, "fsync", full_disk)
        first = Trainer(small_config(1), tmp_path / "new", data, torch.device("cpu"), log=lambda m: None,
                        progress=False)
        (tmp_path / "new").mkdir()
        with pytest.raises(ckpt.WriteError, match=r"errno 28\); training stopped: no checkpoint was written yet, so "
                                                  r"nothing was trained; free some space and start the run again$"):
            first.fit()
    trainer = Trainer(small_config(1), tmp_path, data, torch.device("cpu"), log=lambda m: None, progress=False)
    trainer.fit()
    before = (tmp_path / ckpt.STATE).read_bytes()
    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    trainer.config = small_config(2)
    with pytest.raises(ckpt.WriteError) as raised:
        trainer.fit()
    said = (f"training_state.safetensors: No space left on device (errno 28); training stopped: the last checkpoint "
            f"(epoch 1) is left untouched and resumes exactly; free some space, then: vaelab train --out {tmp_path} "
            f"--resume")
    assert str(raised.value).endswith(said)
    assert (tmp_path / training.TRAIN_LOG).read_text().splitlines()[-1].endswith(said)
    assert (tmp_path / ckpt.STATE).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_the_commands_a_torchrun_run_is_told_to_resume_with_start_its_processes(tmp_path, tiny_arrays):
    """A run of two processes resumes exactly only under two (a resume of one is refused): its messages for a signal, a
    divergence, an early stop and a checkpoint that did not fit said `vaelab train --out RUN --resume`."""
    from vaelab.distributed import World

    data = prepare(tiny_arrays, small_config().data)
    trainer = Trainer(small_config(1), tmp_path, data, torch.device("cpu"), log=lambda m: None, progress=False)
    trainer.fit()
    trainer.world = World(rank=0, size=2, local_rank=0, local_size=2)
    launcher = f"torchrun --nproc-per-node 2 -m vaelab train --out {tmp_path} --resume"
    with pytest.raises(training.Interrupted, match=re.escape(f"resume with: {launcher}")):
        trainer._stop(signal.SIGTERM, 2, 0)
    assert f"{launcher} --lr X" in trainer._what_stands() and f"{launcher} --early-stopping 0" in \
        trainer.early_stop_line()
    full = trainer._checkpoint_failed(ckpt.WriteError("…", "cannot write X: No space left on device (errno 28)",
                                                      errno.ENOSPC), state_written=False)
    assert str(full).endswith(f"free some space, then: {launcher}")


def test_full_disk_is_reported_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(training.shutil, "disk_usage", lambda path: os.statvfs_result((0,) * 10) and
                        type("usage", (), {"free": 1024})())
    with pytest.raises(ckpt.WriteError, match="MiB free, a run needs about 10.0 MiB; free some space or choose "
                                              "another --out$"):
        training.check_writable(tmp_path, need_bytes=10 << 20)
    with pytest.raises(ckpt.WriteError, match="MiB; free some space$"):          # a resumed run stays where it is
        training.check_writable(tmp_path, need_bytes=10 << 20, resuming=True)
    # the probe itself fails on a full disk: free space, not "choose a writable --out" (a resume cannot move)
    monkeypatch.setattr(training.Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(ckpt.WriteError, match=r"No space left on device \(errno 28\); free some space$"):
        training.check_writable(tmp_path, need_bytes=0, resuming=True)
    # as a full disk does it: the probe's name made, its bytes refused; the name is not left in the run (it was)
    monkeypatch.setattr(training.Path, "write_bytes", lambda self, data: self.touch() or (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(ckpt.WriteError, match="errno 28"):
        training.check_writable(tmp_path, need_bytes=0, resuming=True)
    assert list(tmp_path.iterdir()) == []


def test_a_limit_on_file_sizes_below_the_training_state_is_refused_before_training(tmp_path, monkeypatch):
    """`ulimit -f` below the training state's size: until 2026-12-05 the first checkpoint failed with "File too
    large" and the line said "make RUN writable"; now refused before training, naming the limit, the size and the
    fix. A write refused for a full quota or a file's size names its own fix too."""
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (3 << 20, resource.RLIM_INFINITY))
    with pytest.raises(ckpt.WriteError, match=r"^a file may have at most 3.0 MiB here \(ulimit -f\), and the "
                                              r"training state of this model takes about 6.0 MiB; raise the limit "
                                              r"\(ulimit -f unlimited\) in the shell that starts the run$"):
        training.check_writable(tmp_path, need_bytes=0, largest_file=6 << 20)
    training.check_writable(tmp_path, need_bytes=0, largest_file=2 << 20)
    assert list(tmp_path.iterdir()) == []
    for code, fix in ((errno.EFBIG, "raise the limit on a file's size (ulimit -f unlimited)"),
                      (errno.EDQUOT, "free some space within your disk quota"), (errno.EROFS, "make RUN writable")):
        assert ckpt.WriteError("…", "cannot write X", code).remedy("RUN") == fix


def test_a_new_run_on_a_full_disk_is_locked_and_says_the_disk_is_full(tmp_path, monkeypatch):
    """The lock file's pid could not be written on a full disk: "vaelab train: error: No space left on device (I/O,
    errno 28)", naming no file. The lock holds without it; the space check after it names the disk."""
    real_write = os.write
    monkeypatch.setattr(ckpt.os, "write", lambda fd, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    lock = ckpt.RunLock(tmp_path).acquire()
    monkeypatch.setattr(ckpt.os, "write", real_write)
    try:
        with pytest.raises(ckpt.RunLocked, match=r"in use by process \(unknown pid\)"):
            ckpt.RunLock(tmp_path).acquire()
    finally:
        lock.release()


def small_fused_problem():
    """A 784-64-8 model on flat buffers, 32 binary digits and their draws, from fixed seeds."""
    torch.manual_seed(0)
    model = MLPVAE(ModelConfig(hidden=((64,),), latent=(8,)))
    FlatParameters(model)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(32, 784, generator=g) < 0.3).float()
    return model, x, torch.randn(1, 32, 8, generator=g)


def test_fused_bf16_gradient_is_close():
    """The bf16 fused step against the float32 one on one batch: the same loss and gradients up to the rounding
    of the products' inputs and outputs to 8 significant bits (2⁻⁸ ≈ 0.4 % of each term; a weight gradient is
    a batch sum of cancelling terms, so its error relative to its largest entry is larger: measured up to
    5.4 % over three seeds; the loss within 0.002 %, the KL within 0.2 %)."""
    from vaelab.engines import fused_step_bf16

    model, x, eps = small_fused_problem()
    exact = fused_step(model, x, eps)
    grads = [p.grad.clone() for p in model.parameters()]
    approx = fused_step_bf16(model, x, eps)
    torch.testing.assert_close(approx[:3], exact[:3], rtol=1e-3, atol=0.0)
    torch.testing.assert_close(approx[3], exact[3], rtol=3e-3, atol=0.0)
    for (name, p), expected in zip(model.named_parameters(), grads):
        assert (p.grad - expected).abs().max() <= 0.08 * expected.abs().max(), name


def small_autograd_problem(name: str, seed: int):
    """A small tanh model of family ``name`` on flat buffers, 16 binary digits and 4 draws each."""
    from vaelab.models import build_model

    config = ModelConfig(name=name, hidden=((32,),) if name == "mlp" else ((32,), (16,)),
                         latent=(6,) if name == "mlp" else (6, 3), activation="tanh")
    torch.manual_seed(seed)
    model = build_model(config)
    FlatParameters(model)
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.rand(16, 784, generator=g) < 0.3).float()
    return model, x, torch.randn(4, 16, config.total_latent, generator=g)


@pytest.mark.parametrize("name", ["mlp", "mlp2"])
def test_autograd_bf16_keeps_the_loss_in_float32(name):
    """Under autocast the products run in bf16 but every distribution parameter comes back as float32, so
    the objective and its parts are float32 and close to the float32 engine's."""
    from vaelab.engines import ENGINES

    model, x, eps = small_autograd_problem(name, seed=2)
    exact = ENGINES[("autograd", "fp32")](model, x, eps, "iwae", 1.0)
    grads = [p.grad.clone() for p in model.parameters()]
    approx = ENGINES[("autograd", "bf16")](model, x, eps, "iwae", 1.0)
    assert approx.dtype == torch.float32
    torch.testing.assert_close(approx, exact, rtol=3e-3, atol=0.0)
    for (pname, p), expected in zip(model.named_parameters(), grads):
        assert (p.grad - expected).abs().max() <= 0.08 * expected.abs().max() + 1e-6, pname


def test_the_commit_is_vaelabs_own_not_that_of_a_repository_it_was_installed_into(tmp_path):
    """A vaelab installed into a project's `.venv` lies inside the project's repository (git finds it from any
    directory below, ignored or not): until 2026-12-07 every record named the project's commit as vaelab's, with
    "+modified" for the project's own changes. Now only a checkout that tracks vaelab's files gives a commit."""
    import importlib.util
    import shutil
    import subprocess

    from vaelab import provenance

    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text(".venv/\n")
    (tmp_path / "notes.txt").write_text("a project of one's own\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "project"], check=True)
    (tmp_path / "notes.txt").write_text("changed\n")                       # the project's own change
    installed = tmp_path / ".venv" / "lib" / "site-packages" / "vaelab"
    installed.mkdir(parents=True)
    shutil.copy(provenance.__file__, installed / "provenance.py")
    spec = importlib.util.spec_from_file_location("installed_provenance", installed / "provenance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.git_commit() is None
    subprocess.run([*git, "add", "-f", str(installed / "provenance.py")], check=True)   # vaelab's checkout: tracked
    subprocess.run([*git, "commit", "-q", "-m", "vaelab"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    module.git_commit.cache_clear()
    assert module.git_commit() == head + "+modified"


def test_the_cpu_is_named_by_its_family_and_model_and_its_kernel_flags(monkeypatch, tmp_path):
    """A virtual machine's /proc/cpuinfo may name only "AMD EPYC", whatever the generation: a result names the
    family and model numbers too, each /proc/cpuinfo key matched whole ("model" is not "model name", whichever
    comes first), and which of the flags that choose product kernels the CPU has."""
    from vaelab import provenance, resources

    fake = tmp_path / "cpuinfo"
    monkeypatch.setattr(provenance, "CPUINFO", fake)
    try:
        fake.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                        "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vp2intersect\n")
        provenance.cpu_name.cache_clear()
        assert provenance.cpu_name() == "AMD EPYC (family 26, model 2)"
        assert resources.kernel_flags() == ["avx2", "avx512_bf16", "avx512f"]
        fake.write_text("model name\t: Intel Xeon Processor\nmodel\t\t: 143\ncpu family\t: 6\nflags\t: avx2\n")
        provenance.cpu_name.cache_clear()
        assert provenance.cpu_name() == "Intel Xeon Processor (family 6, model 143)"
        fake.write_text("processor\t: 0\nFeatures\t: fp asimd\nCPU part\t: 0xd0c\n")   # ARM: no family, no name
        provenance.cpu_name.cache_clear()
        assert "family" not in provenance.cpu_name() and resources.kernel_flags() == []
    finally:
        provenance.cpu_name.cache_clear()      # the next caller reads the real /proc/cpuinfo


def test_bf16_is_decided_by_a_timing_on_the_spot(monkeypatch):
    """Emulated bf16 (22–124× float32 on an AVX2 EPYC) is refused; a native kernel slower than float32 (1.5× on an
    AVX-512 BF16 Xeon without AMX) runs with a one-line note saying so; a faster one (AMX, Zen 4) says how much.
    The CPU flags are named, not trusted: the timing decides."""
    from vaelab import resources
    from vaelab.errors import UsageError

    cpu = torch.device("cpu")
    monkeypatch.setattr(resources, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(resources, "bf16_product_ratio", lambda device: 41.0)
    with pytest.raises(UsageError, match=r"runs 41\.0× the time of float32 .* neither avx512_bf16 nor amx_bf16"):
        resources.check_bf16(cpu)
    monkeypatch.setattr(resources, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    with pytest.raises(UsageError, match=r"lists avx512_bf16\): it is emulated"):
        resources.check_bf16(cpu)
    monkeypatch.setattr(resources, "bf16_product_ratio", lambda device: 1.53)
    note = resources.check_bf16(cpu)
    assert "1.53× the time of float32" in note and "slower than fp32 here" in note and "\n" not in note
    monkeypatch.setattr(resources, "bf16_product_ratio", lambda device: 0.31)
    assert "slower" not in resources.check_bf16(cpu) and "0.31×" in resources.check_bf16(cpu)


def test_bf16_product_ratio_is_measured():
    from vaelab import resources

    ratio = resources.bf16_product_ratio(torch.device("cpu"))
    assert 0.01 < ratio < 1000


def test_bf16_product_ratio_times_the_two_dtypes_in_turn_so_a_passing_load_reaches_both(monkeypatch):
    """A clock advanced only by the products: float32 takes 2 ms, bf16 1 ms, each 10 × longer while another
    process's load lasts (the first 150 ms). Timed one dtype after the other, float32's whole block fell inside the
    load and the ratio read 0.05; in turn, both are timed after it too and the ratio is bf16's true 0.5. An emulated
    bf16 product (0.2 s) stops the rounds at the budget, after three."""
    import time

    from vaelab import resources

    clock = [0.0]
    calls = {torch.float32: 0, torch.bfloat16: 0}
    base = {torch.float32: 2e-3, torch.bfloat16: 1e-3}

    def product(a, b):
        calls[a.dtype] += 1
        clock[0] += base[a.dtype] * (10 if clock[0] < 0.15 else 1)
        return a

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(torch, "mm", product)
    assert resources.bf16_product_ratio(torch.device("cpu")) == pytest.approx(0.5)
    assert calls == {torch.float32: 21, torch.bfloat16: 21}                 # 20 rounds and an untimed first call
    base[torch.bfloat16] = 0.2
    clock[0] = 1.0
    calls.update({torch.float32: 0, torch.bfloat16: 0})
    assert resources.bf16_product_ratio(torch.device("cpu")) == pytest.approx(100.0)          # budget 0.5 s
    assert calls == {torch.float32: 4, torch.bfloat16: 4}



@pytest.mark.parametrize("shape", [(64, 784, 256), (256, 64, 784), (64, 50, 256), (7, 3, 5)])
def test_emulated_bf16_product_equals_torch_bf16(shape):
    """The emulated product against torch's own bf16 product (emulated by torch on a CPU without bf16, native
    where there is, e.g. AVX-512 BF16's dot-product instructions): bf16 operands, float32 sums, one rounding.

    Tolerance, from what differs: the two float32 sums of the k exact products aᵢbᵢ run in different orders
    (and kernels), and a float32 sum of k terms in any order is within (k − 1)·2⁻²⁴·Σ|aᵢbᵢ| of the exact sum;
    each is then rounded to bf16 once, moving it by at most half a bf16 step, 2⁻⁸ of its magnitude. So
    |native − emulated| ≤ 2·(k − 1)·2⁻²⁴·Σ|aᵢbᵢ| + 2⁻⁸·(|native| + |emulated|). Where the sum cancels
    (Σ|aᵢbᵢ| ≫ |Σ aᵢbᵢ|) the first term dominates: on an AVX-512 BF16 Xeon an entry of −6.6e−5 with
    Σ|aᵢbᵢ| = 34 differed by 1e−6, more than one bf16 step of the entry itself."""
    from vaelab.precision import emulated_bf16_mm

    m, k, n = shape
    g = torch.Generator().manual_seed(m + k + n)
    a, b = torch.randn(m, k, generator=g).bfloat16(), torch.randn(k, n, generator=g).bfloat16()
    native, emulated = torch.mm(a, b), emulated_bf16_mm(a, b)
    assert emulated.dtype == torch.bfloat16
    differ = native != emulated
    assert differ.float().mean() <= 1e-3
    magnitude = a.double().abs() @ b.double().abs()                                   # Σᵢ |aᵢbᵢ| per entry
    bound = 2 * (k - 1) * 2.0 ** -24 * magnitude + 2.0 ** -8 * (native.double().abs() + emulated.double().abs())
    assert ((native.double() - emulated.double()).abs() <= bound).all()


def test_emulated_bf16_step_equals_the_native_bf16_step():
    """The bf16-emulated engine is the bf16 fused step with the emulated product: the same loss and
    gradients as with torch's bf16 product, up to those one-step differences in a few products' entries."""
    from vaelab.engines import ENGINES, fused_step_bf16

    model, x, eps = small_fused_problem()
    native = fused_step_bf16(model, x, eps)
    grads = [p.grad.clone() for p in model.parameters()]
    emulated = ENGINES[("fused", "bf16-emulated")](model, x, eps)
    torch.testing.assert_close(emulated, native, rtol=1e-5, atol=0.0)
    for (name, p), expected in zip(model.named_parameters(), grads):
        assert (p.grad - expected).abs().max() <= 1e-2 * expected.abs().max(), name


@pytest.mark.parametrize("name", ["mlp", "mlp2"])
def test_emulated_autocast_step_equals_the_native_one(name, monkeypatch):
    """bf16-emulated with the autograd engine: autocast's products, forward and backward, computed by
    EmulatedBF16Products, against the same step with torch's bf16 products: the same loss and gradients up to
    one-step differences in a few entries. Every product is intercepted: per linear layer one forward, one
    weight gradient and one input gradient (none for the first layer: x needs no gradient)."""
    from vaelab.engines import ENGINES, select_engine
    from vaelab.precision import EmulatedBF16Products

    intercepted = []
    dispatch = EmulatedBF16Products.__torch_dispatch__

    def counting(self, func, types, args=(), kwargs=None):
        if func in self.PRODUCTS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            intercepted.append(func)
        return dispatch(self, func, types, args, kwargs)

    monkeypatch.setattr(EmulatedBF16Products, "__torch_dispatch__", counting)

    model, x, eps = small_autograd_problem(name, seed=4)
    assert select_engine(RunConfig(model=model.config, train=TrainConfig(precision="bf16-emulated"))) == "autograd"
    results = {}
    for precision in ("bf16", "bf16-emulated", "fp32"):
        sums = ENGINES[("autograd", precision)](model, x, eps, "iwae", 1.0)
        results[precision] = sums, torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    (native, g_native), (emulated, g_emulated), (exact, g_exact) = results.values()
    layers = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(intercepted) == 3 * layers - 1
    torch.testing.assert_close(emulated, native, rtol=1e-5, atol=0.0)
    assert (g_emulated - g_native).abs().max() <= 1e-2 * g_native.abs().max()
    assert (g_emulated - g_native).abs().max() < (g_exact - g_native).abs().max()


def test_clip_norm_rescales_only_gradients_longer_than_the_bound():
    """g · min(1, c/‖g‖) in float64: a long gradient ends with norm c and its direction, a short one and zero
    stay as they are, and on the CPU a short one is not even written (its version counter stays: no pass over a
    gradient of millions of numbers to multiply it by 1); the returned norm is the one before. NaN still spreads."""
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)                       # ‖g‖ = 5
    assert training.clip_norm_(g, 2.0).item() == 5.0
    torch.testing.assert_close(g, torch.tensor([1.2, 1.6], dtype=torch.float64), rtol=1e-15, atol=0)
    short = torch.tensor([0.3, -0.4], dtype=torch.float64)
    version = short._version
    assert training.clip_norm_(short, 2.0).item() == pytest.approx(0.5, rel=1e-15)
    assert short.tolist() == [0.3, -0.4] and short._version == version
    at_bound = torch.tensor([3.0, 4.0], dtype=torch.float64)
    training.clip_norm_(at_bound, 5.0)
    assert at_bound.tolist() == [3.0, 4.0]
    nan = torch.tensor([float("nan"), 1.0])
    training.clip_norm_(nan, 1.0)
    assert torch.isnan(nan).all()
    zero = torch.zeros(3, dtype=torch.float64)
    training.clip_norm_(zero, 1.0)
    assert zero.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("value, name", [(0.0, "fused"), (0.05, "fused"), (0.0, "autograd")])
def test_clipped_training_equals_adam_on_gradients_clipped_by_torch(tmp_path, tiny_arrays, monkeypatch, value, name):
    """--clip-grad-norm (and --clip-grad-value) against a loop written independently: the same engine's gradient on
    the batches and draws the trainer used, torch.nn.utils.clip_grad_norm_ (then clip_grad_value_) over the model's
    parameter tensors, torch.optim.Adam. The bound is chosen so that some steps are clipped and some not, the
    value so that some elements are clamped after the norm's rescaling; metrics.csv counts the clipped steps. The
    fused engine writes the gradient itself (clipping takes the norm in a pass of its own); the autograd engine
    writes it through ``write_gradient``, whose native gather hands clipping the norm."""
    bound = 25.0
    config = small_config(2, clip_grad_norm=bound, clip_grad_value=value, engine=name)
    data = prepare(tiny_arrays, config.data)
    engine, seen = training.ENGINES[(name, "fp32")], []

    def recording(model, x, eps, objective, beta, grad_squares=None):
        seen.append((x.clone(), eps.clone(), objective, beta))
        return engine(model, x, eps, objective, beta, grad_squares=grad_squares)

    monkeypatch.setitem(training.ENGINES, (name, "fp32"), recording)
    Trainer(config, tmp_path, data, torch.device("cpu"), log=lambda m: None, progress=False).fit()

    torch.manual_seed(config.train.seed)
    model = MLPVAE(config.model)
    flat = FlatParameters(model)                             # the engine writes into the flat gradient's views
    adam = torch.optim.Adam(model.parameters(), lr=config.train.lr, eps=config.train.adam_eps)
    norms, clamped = [], 0
    for x, eps, objective, beta in seen:
        engine(model, x, eps, objective, beta)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), bound)))
        if value:
            clamped += sum(int((p.grad.abs() > value).sum()) for p in model.parameters())
            torch.nn.utils.clip_grad_value_(model.parameters(), value)
        adam.step()
    clipped = sum(norm > bound for norm in norms)
    assert 0 < clipped < len(norms), f"the bound {bound} must clip some steps and not others: {norms}"
    assert (clamped > 0) == (value > 0), clamped
    ours = weights(tmp_path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    rows = [line.split(",") for line in (tmp_path / ckpt.METRICS).read_text().splitlines()]
    counts = [int(row[rows[0].index("clipped_steps")]) for row in rows[1:]]
    assert sum(counts) == clipped
    steps = len(norms) // 2
    means = [float(row[rows[0].index("gradient_norm_mean")]) for row in rows[1:]]
    assert means == pytest.approx([sum(norms[:steps]) / steps, sum(norms[steps:]) / steps], rel=1e-5)
    assert "gradient rescaled to norm 25" in (tmp_path / training.TRAIN_LOG).read_text()


def test_configs_before_clipping_load_without_it():
    """A version-5 config.json (before --clip-grad-norm) has no train.clip_grad_norm: its runs never clipped."""
    raw = {**small_config(clip_grad_norm=3.0).to_dict(), "version": 5}
    raw["train"] = {k: v for k, v in raw["train"].items() if k != "clip_grad_norm"}
    assert RunConfig.from_dict(raw).train.clip_grad_norm == 0.0
    assert "clipped_steps" not in training.metric_fields(small_config())


def test_configs_before_clamping_load_without_it():
    """A version-6 config.json (before --clip-grad-value) has no train.clip_grad_value: no element was clamped."""
    raw = {**small_config(clip_grad_value=0.5).to_dict(), "version": 6}
    raw["train"] = {k: v for k, v in raw["train"].items() if k != "clip_grad_value"}
    assert RunConfig.from_dict(raw).train.clip_grad_value == 0.0


def test_configs_before_early_stopping_load_without_it():
    """A version-7 config.json (before --early-stopping) has no train.early_stopping: it trained every epoch."""
    raw = {**small_config(early_stopping=5).to_dict(), "version": 7}
    raw["train"] = {k: v for k, v in raw["train"].items() if k != "early_stopping"}
    assert RunConfig.from_dict(raw).train.early_stopping == 0


def test_clipping_taken_up_inside_an_epoch_counts_the_steps_it_measured(tmp_path, tiny_arrays, monkeypatch):
    """A run stopped inside epoch 2 and resumed with --clip-grad-norm: epoch 2's mean gradient norm is the mean
    over the steps after the resume (the ones measured), not over the whole epoch, and its count of clipped steps
    is theirs; epoch 3 measures all its steps."""
    data = prepare(tiny_arrays, small_config().data)
    first = Trainer(small_config(1), tmp_path, data, torch.device("cpu"), log=lambda m: None, progress=False)
    first.fit()
    engine, calls = training.ENGINES[("fused", "fp32")], {"n": 0}

    def stop_at_step_10(model, x, eps, objective, beta, grad_squares=None):
        calls["n"] += 1
        if calls["n"] == 10:
            second._signal = signal.SIGTERM                    # as the handler would: the step finishes, then a stop
        return engine(model, x, eps, objective, beta, grad_squares=grad_squares)

    monkeypatch.setitem(training.ENGINES, ("fused", "fp32"), stop_at_step_10)
    second = Trainer(small_config(3), tmp_path, data, torch.device("cpu"), log=lambda m: None, progress=False)
    second.load_checkpoint()
    with pytest.raises(training.Interrupted):
        second.fit()
    assert ckpt.read_tensors(tmp_path / ckpt.WEIGHTS)[1] == {"epoch": 1, "step": 10}   # the weights say where they are
    monkeypatch.setitem(training.ENGINES, ("fused", "fp32"), engine)
    measured, clip_norm_ = [], training.clip_norm_

    def recording(grad, bound, squares=None):
        norm = clip_norm_(grad, bound, squares)
        measured.append(float(norm))
        return norm

    monkeypatch.setattr(training, "clip_norm_", recording)
    third = Trainer(small_config(3, clip_grad_norm=25.0), tmp_path, data, torch.device("cpu"), log=lambda m: None,
                    progress=False)
    third.load_checkpoint()
    assert third.state.step == 10
    third.amend(["train.clip_grad_norm: 0.0 → 25.0"])
    third.fit()
    steps = third.steps_per_epoch
    epoch2, epoch3 = measured[:steps - 10], measured[steps - 10:]
    assert len(epoch3) == steps
    rows = third.state.metrics
    assert rows[1]["gradient_norm_mean"] == pytest.approx(sum(epoch2) / len(epoch2), rel=1e-6)
    assert rows[1]["clipped_steps"] == sum(n > 25.0 for n in epoch2)
    assert rows[2]["gradient_norm_mean"] == pytest.approx(sum(epoch3) / steps, rel=1e-6)
    log = (tmp_path / training.TRAIN_LOG).read_text()
    assert f"in {rows[1]['clipped_steps']} of {steps - 10} steps" in log and "after epoch 1, step 10" in log


def test_a_run_moved_between_a_gpu_and_the_cpu_resumes_from_a_stream_seeded_by_the_other(tmp_path, data_dir, capsys):
    """`--resume` on a CPU of a run whose noise stream was a GPU's (faked here: a 16-byte Philox state, and the
    checkpoint's word for whose it is): a CPU generator cannot take that state, so the run goes on from a stream
    seeded by it, says so once on the terminal and in train.log, and two resumes of the same checkpoint end bit for
    bit equal; a checkpoint written before the state named its device is read by the state's size. (On a GPU,
    tests/test_gpu.py moves real runs both ways.)"""
    import shutil

    from vaelab.cli import main

    common = ["--data-dir", str(data_dir), "--hidden", "16", "--latent", "4", "--test-examples", "200", "--no-progress"]
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "1", *common]) == 0
    tensors, meta = ckpt.load_tensors(run / ckpt.STATE)
    assert meta["noise_device"] == "cpu"
    tensors["rng.noise"] = torch.arange(16, dtype=torch.uint8)          # what a CUDA generator's get_state() gives
    ckpt.save_tensors(run / ckpt.STATE, tensors, {**meta, "noise_device": "cuda"})
    shutil.copytree(run, tmp_path / "again")
    shutil.copytree(run, tmp_path / "older")
    del meta["noise_device"]
    ckpt.save_tensors(tmp_path / "older" / ckpt.STATE, tensors, meta)
    capsys.readouterr()
    for name in ("run", "again", "older"):
        assert main(["train", "--out", str(tmp_path / name), "--resume", "--epochs", "2", *common]) == 0
        out = capsys.readouterr().out
        assert out.count("note: this run drew its noise on cuda; on cpu the stream goes on from a seed") == 1, out
        assert "drew its noise on cuda" in (tmp_path / name / "train.log").read_text()
    assert_bitwise_equal(weights(run), weights(tmp_path / "again"))
    assert_bitwise_equal(weights(run), weights(tmp_path / "older"))
    assert elbo_columns(run) == elbo_columns(tmp_path / "older")
