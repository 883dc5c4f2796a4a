"""Speed benchmark: vaelab against the reference exercise's pipeline, side by side in one run.

    python benchmarks/run.py [--reps 3] [--eval-examples 10000] [--quick]

What is timed (float32 unless said; the same machine, the same thread count, alternating so that drift hits both):
- reference: a faithful re-implementation of the exercise's pipeline: a Dataset whose __getitem__ turns
  one uint8 image into a PIL image and then into a float tensor (torchvision's MNIST + ToTensor), a
  DataLoader (batch 64, shuffle), the 784-256-50 MLP with sigmoid + binary_cross_entropy, Adam 1e-3,
  loss.item() every step. (Its targets are the grey levels, as in the exercise; the FLOPs are the same.)
- vaelab: the Trainer at the same setting (784-256-50, batch 64, dynamic binarisation, fused engine), and
  the same with `--precision bf16` (the fused engine's bf16 step with torch's bf16 products). Where the CPU
  has no bf16 kernels (no avx512_bf16 or amx_bf16) torch emulates them 22–124× slower, so the bf16 epochs run
  on the first --bf16-examples digits and their seconds are scaled to the full set.
- evaluation: `evaluate --k 5000` on the test set, and, alternating on the same digits, IWAE-5000 written
  the plain way (`reference_iwae`: decoder logits, BCE-with-logits, torch.distributions densities), in
  this process and in a fresh one (its speed depends on the allocator's state; the faster counts); and
  `evaluate --k 5000 --precision bf16` with the same draws (where emulated: on --bf16-eval-examples digits).
- the targets of the speed issue (#15) against these medians: ``targets``.
Seconds per epoch are the training loop only (no test evaluation, no checkpoint) on both sides.

FLOPs: ModelConfig.flops_per_example counts 2ab per (1×a)·(a×b) product: forward for all four layers,
backward the weight gradient for all four and the input gradient for all but the first (x needs none),
2.24 MFLOP per example at 784-256-50 (REFERENCES.md counts the first layer's input gradient too: 2.64).
The matmul peak is measured on the spot: the best of 2048² float32 products. The evaluation's floor is
K decoder passes per digit, 2·(d·H + H·784) FLOPs each, at that peak. The training step's floor
(``step_floor``) is measured in place instead of computed: the step's eleven products at their real
shapes, Adam's kernel and one epoch's binarisation, timed alternating with the epochs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import operator
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vaelab import checkpoint as ckpt
from vaelab.config import RunConfig, TrainConfig
from vaelab.data import BINARIZE_PARTS, DataConfig, binarize, load_mnist, prepare
from vaelab.evaluation import EvalConfig, hot_loop_settings, iwae_log_likelihood, summarize
from vaelab.models import ModelConfig
from vaelab.objectives import importance_sampled_log_marginal
from vaelab.precision import EmulatedBF16Products
from vaelab.provenance import cpu_name
from vaelab.presets import PRESETS
from vaelab.resources import has_native_bf16, kernel_flags
from vaelab.training import Trainer

RESULTS = Path(__file__).parent / "results"


# ---- the reference pipeline ---------------------------------------------------------------------


class ReferenceMNIST(torch.utils.data.Dataset):
    """One example at a time: uint8 → PIL image → float tensor in [0, 1] (what ToTensor does)."""

    def __init__(self, images: np.ndarray):
        self.images = images.reshape(-1, 28, 28)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index], mode="L")
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).float().div(255).unsqueeze(0)
        return tensor, 0


class ReferenceVAE(nn.Module):
    def __init__(self, hidden: int = 256, latent: int = 50):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, hidden), nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.fc3, self.fc4 = nn.Linear(latent, hidden), nn.Linear(hidden, 784)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def reference_epoch(loader, model, optimizer) -> float:
    start = time.perf_counter()
    total = 0.0
    for x, _ in loader:
        x = x.view(-1, 784)
        recon, mu, logvar = model(x)
        bce = F.binary_cross_entropy(recon, x, reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        loss = bce + kld
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item()
    return time.perf_counter() - start


@torch.no_grad()
def reference_iwae(model, images: torch.Tensor, k: int, generator: torch.Generator, chunk: int = 1000,
                   digits: int = 20) -> torch.Tensor:
    """IWAE_K per digit written the plain way (what one writes from the paper, for comparison): decoder
    logits for every draw, −BCE-with-logits as log p(x|z), log q and log p(z) from their densities,
    one fresh ε per digit and draw; chunks merged by vaelab's log-sum-exp (not what differs)."""
    out = []
    for x in images.float().split(digits):
        mu, logvar = model.encode(x)
        std = torch.exp(0.5 * logvar)

        def log_weights(_: int, n: int) -> torch.Tensor:
            eps = torch.randn((n, *mu.shape), generator=generator)                        # (n, B, d)
            z = mu + std * eps
            logits = model.decode(z)                                                       # (n, B, 784)
            log_px_z = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
            log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
            log_qz = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
            return log_px_z + log_pz - log_qz                                              # (n, B)

        out.append(importance_sampled_log_marginal(log_weights, k, chunk))
    return torch.cat(out)


# ---- measurements ------------------------------------------------------------------------------


def matmul_peak() -> float:
    """Best GFLOP/s of 2048² float32 products (and 1024²), measured now."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


@contextlib.contextmanager
def adam_kept(adam):
    """Adam's state and the flat parameters as they were before the block: a floor times Adam's steps on whatever
    gradient is there, and the trainer goes on afterwards exactly as before."""
    saved = {key: t.clone() for key, t in adam.state_dict().items()}
    param = adam.param.clone()
    try:
        yield
    finally:
        adam.load_state_dict(saved)
        adam.param.copy_(param)


def step_floor(trainer, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Seconds, over one epoch, of the parts of a batch-64 step that no eager step in ``dtype`` avoids.

    Timed on the trainer's own model, flat buffers and data: the eleven matrix products of
    ``engines.fused_step`` (four forward; the weight gradients of all four layers and the input gradients
    of the last three), each into a preallocated output, and the Adam kernel over the flat buffer, for
    every step of an epoch; plus drawing one epoch's binary pixels. Everything else a step does (the
    elementwise passes over the logits and activations, ≈40 operator dispatches) is left out, so the sum
    is a lower bound for any implementation that keeps dense float32 products at batch 64 (with this
    torch's BLAS), and the reference's seconds per epoch over it bounds the speed-up such an
    implementation can show here.
    With ``dtype`` bf16 the products take bf16 operands and write bf16 results, as ``engines.fused_step_bf16``'s
    do (the rounding of the weights to bf16, once per step, is left out too); Adam and the binarisation stay
    float32. The epoch is the trainer's own (a trainer on fewer digits times fewer steps and a smaller draw).
    Adam's parameters are restored afterwards, so the trainer goes on exactly as before.
    """
    model, adam, data = trainer.model, trainer.optimizer, trainer.data
    cfg, batch = trainer.config.model, trainer.config.train.batch_size
    steps = -(-data.n_train // batch)
    x = data.train_grey[:batch].gt(127).to(dtype)                            # (B, 784) binary pixels
    # the four layers' weights and biases in dtype (float32: the trainer's own tensors, not copies)
    (w1, b1), (w2, b2), (w3, b3), (w4, b4) = ((layer.weight.to(dtype), layer.bias.to(dtype))
                                              for layer in model.fused_layers())
    (hidden,), latent = cfg.hidden[0], cfg.total_latent
    h1, e = torch.randn(batch, hidden).to(dtype), torch.randn(batch, 2 * latent).to(dtype)  # (B, H), (B, 2d)
    z, h2 = torch.randn(batch, latent).to(dtype), torch.randn(batch, hidden).to(dtype)      # (B, d), (B, H)
    logits = torch.randn(batch, cfg.data_dim).to(dtype)                                      # (B, 784)
    d_h2, d_z, d_h1 = torch.empty_like(h2), torch.empty_like(z), torch.empty_like(h1)
    grads = [torch.empty_like(w) for w in (w1, w2, w3, w4)]

    def products() -> None:
        torch.addmm(b1, x, w1.t(), out=h1)
        torch.addmm(b2, h1, w2.t(), out=e)
        torch.addmm(b3, z, w3.t(), out=h2)
        torch.addmm(b4, h2, w4.t(), out=logits)
        torch.mm(logits.t(), h2, out=grads[3])
        torch.mm(logits, w4, out=d_h2)
        torch.mm(d_h2.t(), z, out=grads[2])
        torch.mm(d_h2, w3, out=d_z)
        torch.mm(e.t(), h1, out=grads[1])
        torch.mm(e, w2, out=d_h1)
        torch.mm(d_h1.t(), x, out=grads[0])

    generator = torch.Generator().manual_seed(0)
    seconds = {}
    with torch.no_grad(), hot_loop_settings(), adam_kept(adam):
        start = time.perf_counter()
        for _ in range(steps):
            products()
        seconds["products"] = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            adam.step()
        seconds["adam"] = time.perf_counter() - start
        order = torch.randperm(len(data.train_grey), generator=generator)
        start = time.perf_counter()
        binarize(data.train_grey, generator, BINARIZE_PARTS, order)          # as an epoch draws them
        seconds["binarize"] = time.perf_counter() - start
    return seconds


def scratch_trainer(config: RunConfig, data, prefix: str = "vaelab-bench-") -> Trainer:
    """A quiet Trainer on the CPU whose run directory is a fresh temporary folder, removed with the trainer (when it
    is collected, or when the process exits): a benchmark's runs are measurements, not models, and one holds tens of
    MB of weights and checkpoints (before, each test run of this file and of step.py left them in /tmp)."""
    folder = tempfile.mkdtemp(prefix=prefix)
    trainer = Trainer(config, folder, data, torch.device("cpu"), log=lambda m: None, progress=False)
    weakref.finalize(trainer, shutil.rmtree, folder, ignore_errors=True)
    return trainer


def vaelab_trainer(arrays, batch: int = 64, hidden: int = 256, engine: str = "fused", precision: str = "fp32",
                   train_examples: int | None = None):
    config = RunConfig(model=ModelConfig(hidden=((hidden,),)), data=DataConfig(train_examples=train_examples),
                       train=TrainConfig(epochs=1, batch_size=batch, engine=engine, precision=precision))
    return scratch_trainer(config, prepare(arrays, config.data))


def vaelab_epoch(trainer) -> float:
    """One more epoch; returns its training-loop seconds (from the metrics the trainer records)."""
    trainer.config = dataclasses.replace(trainer.config, train=dataclasses.replace(
        trainer.config.train, epochs=trainer.state.epoch + 1))
    trainer.fit()
    return trainer.state.metrics[-1]["epoch_seconds"]


def train_in_child(*flags: str, trained: Path | None = None, epochs: int = 1) -> tuple[float, float]:
    """`vaelab train --epochs 1 FLAGS` in a child process: (peak resident MiB, seconds of the epoch's steps).
    With ``trained`` (a run directory), a copy of it resumed for one more epoch instead: the same step on weights
    that have learnt (a trained decoder's confident logits cost some kernels more than a fresh one's).
    ``epochs``: that many epochs instead of one, the last one timed (``--engine compiled`` compiles in the first)."""
    memory, seconds = epochs_in_child(*flags, trained=trained, epochs=epochs)
    return memory, seconds[-1]


def epochs_in_child(*flags: str, trained: Path | None = None, epochs: int = 1,
                    timed: int = 1) -> tuple[float, list[float]]:
    """``train_in_child``'s run, with the seconds of each of its last ``timed`` epochs (of ``epochs``).

    The child trains with this process's number of threads (``torch.get_num_threads()``: OMP_NUM_THREADS or
    the cores), the threads the floors are timed with here.
    The peak is the child's own VmHWM (getrusage's ru_maxrss of a child started by fork and exec keeps the
    parent's high-water mark, here the benchmark's own ≈700 MiB)."""
    threads = ("--threads", str(torch.get_num_threads()))
    script = ("import sys\nfrom vaelab.cli import main\ncode = main(sys.argv[1:])\n"
              "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')))\nsys.exit(code)")
    with tempfile.TemporaryDirectory() as tmp:
        if trained is None:
            command = ["train", "--out", f"{tmp}/run", "--epochs", str(epochs), "--no-progress", *threads, *flags]
        else:
            shutil.copytree(trained, f"{tmp}/run")
            done_epochs = len((trained / "metrics.csv").read_text().splitlines()) - 1
            command = ["train", "--out", f"{tmp}/run", "--resume", "--epochs", str(done_epochs + epochs),
                       "--no-progress", *threads, *flags]
        done = subprocess.run([sys.executable, "-c", script, *command], check=True, capture_output=True, text=True)
        rows = (Path(tmp) / "run" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("epoch_seconds")
    seconds = [float(row.split(",")[column]) for row in rows[1:][-timed:]]
    line = next(l for l in done.stdout.splitlines() if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024, seconds             # "VmHWM:   489464 kB"


def peak_memory_of_training(epochs: int = 1) -> float:
    """Peak resident set (MiB) of one epoch of `vaelab train` at the default setting."""
    return train_in_child()[0]


class ProductRecorder(TorchDispatchMode):
    """While active, records every matrix product (mm, addmm, bmm, baddbmm; those autograd's backward runs too)
    with the shapes, strides and dtypes of its operands, so that they can be replayed alone: a model's floor."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in EmulatedBF16Products.PRODUCTS:
            self.calls.append((func, [(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a
                                      for a in args], kwargs))
        return func(*args, **kwargs)


def round_seconds(work, rounds: int = 3) -> list[float]:
    """The seconds of each of ``rounds`` timings of ``work()``."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return times


def fastest_seconds(work, rounds: int = 3) -> float:
    """The fastest of ``rounds`` timings of ``work()``: a floor is the least its work can take (one round on a shared
    machine read up to 30 % more from one run to the next)."""
    return min(round_seconds(work, rounds))


def prepared_products(calls: list[tuple]) -> list[tuple]:
    """The recorded products (``ProductRecorder.calls``) on fresh operands of the same shapes and strides, each run
    once (its kernel chosen and warmed before any clock starts)."""
    prepared = [(func, [torch.empty_strided(a[0], a[1], dtype=a[2]).normal_() if isinstance(a, tuple) else a
                        for a in args], kwargs) for func, args, kwargs in calls]
    with torch.no_grad():
        replay(prepared)
    return prepared


def replay(prepared: list[tuple]) -> None:
    """Each prepared product once, in the recorded order (the caller holds ``torch.no_grad``)."""
    for func, args, kwargs in prepared:
        func(*args, **kwargs)


def replay_seconds(calls: list[tuple], repeats: int, rounds: int = 3) -> float:
    """Seconds of ``repeats`` replays of the recorded products on operands of the same shapes and strides, the
    fastest of ``rounds`` rounds (``fastest_seconds``)."""
    prepared = prepared_products(calls)

    def replays() -> None:
        for _ in range(repeats):
            replay(prepared)

    with torch.no_grad():
        return fastest_seconds(replays, rounds)


def preset_floors(name: str, arrays, n_train: int, eval_digits: int = 40, trained: Path | None = None,
                  engine: str = "auto") -> dict[str, float]:
    """A preset's floors on this machine: every matrix product of one training step (forward and autograd's
    backward, recorded at their real shapes) replayed for an epoch's steps, plus Adam's kernel over the flat
    buffer as often; and every product of IWAE-5000 on 20 digits replayed for 10 000; each the fastest of three
    rounds. Beside them, its measured IWAE-5000 seconds per 10 000 digits (timed on ``eval_digits``, scaled, the
    median of three), with the fresh weights and, given ``trained`` (a run directory of this preset), with its
    weights (the floors do not depend on the values).
    IWAE-5000 as ``vaelab evaluate`` computes it by default for a run trained with ``engine``: compiled where
    ``compiled_as_trained`` says so, timed after one compiling pass over 20 digits."""
    from vaelab.engines import ENGINES
    from vaelab.evaluation import compiled_as_trained, iwae_estimator
    from vaelab.presets import apply_preset

    base = apply_preset(RunConfig(), name)
    config = dataclasses.replace(base, data=dataclasses.replace(base.data, validation=0, train_examples=None,
                                                                 test_examples=100),
                                 train=dataclasses.replace(base.train, epochs=1, early_stopping=0,
                                                           engine="auto"))       # products recorded uncompiled
    data = prepare(arrays, config.data)
    trainer = scratch_trainer(config, data, "vaelab-floor-")
    batch, objective = config.train.batch_size, config.objective
    x = data.train_grey[:batch].gt(127).float()
    eps = torch.randn(objective.samples, batch, config.model.total_latent)
    step = ENGINES[(trainer.engine_name, "fp32")]
    step(trainer.model, x, eps, objective.name, 1.0)                        # once before recording
    recorder = ProductRecorder()
    with recorder:
        step(trainer.model, x, eps, objective.name, 1.0)
    steps = -(-n_train // batch)
    adam = trainer.optimizer
    with hot_loop_settings(), adam_kept(adam):
        products = replay_seconds(recorder.calls, steps)
        adam_seconds = fastest_seconds(lambda: [adam.step() for _ in range(steps)])
    model = trainer.model.eval()
    test = data.test_binary
    estimator = iwae_estimator(model)
    recorder = ProductRecorder()
    with torch.no_grad(), recorder:
        estimator(model, test[:20].float(), 5000, torch.Generator().manual_seed(0), 50)
    with hot_loop_settings():
        eval_floor = replay_seconds(recorder.calls, 1) * 10000 / 20
    compiled = compiled_as_trained(model, engine, "fp32")
    evaluation = EvalConfig(k=5000, compiled=compiled)
    if compiled:
        iwae_log_likelihood(model, test[:20], dataclasses.replace(evaluation, k=evaluation.chunk(test.device, model.config)))

    def iwae_seconds_per_10000() -> float:
        """The median of three timings: what a user's evaluation takes, less at the mercy of one noisy round (its
        floor is the fastest of three; one round on this shared machine read up to 20 % more than the next)."""
        times = round_seconds(lambda: iwae_log_likelihood(model, test[:eval_digits], evaluation))
        return statistics.median(times) * 10000 / eval_digits

    row = {"iwae5000_compiled": compiled, "step_floor_products": products, "step_floor_adam": adam_seconds,
           "step_floor": products + adam_seconds, "iwae5000_seconds_per_10000": iwae_seconds_per_10000(),
           "iwae5000_floor_per_10000": eval_floor}
    if trained is not None:
        model.load_state_dict(ckpt.load_model(trained)[1].state_dict())
        row["trained_iwae5000_seconds_per_10000"] = iwae_seconds_per_10000()
    return row


SHORT_STEPS, SHORT_ROUNDS = 20, 15       # the presets table's second in-turn reading: 15 rounds of 20-step epochs


def recorded_products(trainer) -> list[tuple]:
    """The products of one autograd step of ``trainer``'s model on its first training digits (batch, draws and
    latents as it trains), recorded and prepared for replay (``prepared_products``): what its floor times."""
    from vaelab.engines import ENGINES

    config, data = trainer.config, trainer.data
    batch, objective = config.train.batch_size, config.objective
    x = data.train_grey[:batch].gt(127).float()                              # (B, 784)
    eps = torch.randn(objective.samples, batch, config.model.total_latent)   # (K, B, D)
    recorder = ProductRecorder()
    with recorder:
        ENGINES[("autograd", "fp32")](trainer.model, x, eps, objective.name, 1.0)
    return prepared_products(recorder.calls)


def floor_seconds(prepared: list[tuple], steps: int, adam) -> float:
    """Seconds of ``steps`` replays of the prepared products and as many of Adam's steps (its state and the
    parameters restored afterwards, ``adam_kept``): the step floor of that many steps, timed once."""
    with torch.no_grad(), hot_loop_settings(), adam_kept(adam):
        start = time.perf_counter()
        for _ in range(steps):
            replay(prepared)
        for _ in range(steps):
            adam.step()
        return time.perf_counter() - start


def interleaved_epochs_and_floors(name: str, arrays, engine: str | None = None, rounds: int = 3,
                                  epoch_steps: int | None = None) -> dict:
    """A preset's epoch and its step floor timed in turn in this one process, ``rounds`` times, after one untimed
    epoch (compiling, first steps): each round an epoch of the trainer (its engine: ``engine``, else the preset's)
    and then the products of an epoch's steps replayed (one round, recorded from an autograd step of the same
    model) with Adam's kernel as often. Epochs and floors a few seconds apart share the machine's state of the
    moment, which on a shared host moved a floor by 40 % between runs minutes apart (benchmarks/README.md,
    twenty-third session); the ratio of each round and their median are what the 1.5 × bound is judged on.
    ``epoch_steps``: epochs of that many steps (the first ``epoch_steps`` × B training digits) instead of all
    60 000 digits' (235–600 steps): rounds of a second or so, so that many of them pair an epoch with its floor
    where the machine's speed drifts within a whole epoch's pair (a floor moved by 1.4 × within one run, thirtieth
    session); an epoch's work per step is the same (its permutation and binarisation scale with its digits)."""
    from vaelab.presets import apply_preset

    base = apply_preset(RunConfig(), name)
    train = dataclasses.replace(base.train, epochs=1, early_stopping=0, engine=engine or base.train.engine)
    config = dataclasses.replace(base, train=train, data=dataclasses.replace(
        base.data, validation=0, train_examples=None if epoch_steps is None else epoch_steps * train.batch_size,
        test_examples=100))
    data = prepare(arrays, config.data)
    trainer = scratch_trainer(config, data, "vaelab-interleaved-")
    prepared = recorded_products(trainer)
    steps = -(-data.n_train // train.batch_size)
    vaelab_epoch(trainer)                                                    # compiles, warms the allocator
    epochs, floors = [], []
    for _ in range(rounds):
        epochs.append(vaelab_epoch(trainer))
        floors.append(floor_seconds(prepared, steps, trainer.optimizer))
    ratios = [e / f for e, f in zip(epochs, floors)]
    return {"interleaved_engine": trainer.engine_name, "interleaved_steps": steps,
            "interleaved_epochs": epochs, "interleaved_floors": floors,
            "interleaved_ratios": ratios, "interleaved_ratio_median": statistics.median(ratios)}


def presets_table(n_train: int, arrays=None, names=None, trained: dict[str, Path] | None = None,
                  engine: str | None = None, timed: int = 1) -> list[dict]:
    """One epoch of every preset (its own batch size, objective, model; on the default device, so a GPU where
    there is one): seconds, optimiser steps per second, peak memory, and the preset's whole schedule at that
    speed (3280 epochs for Burda's); with ``arrays`` (on the CPU) also its step floor and IWAE-5000 against its
    own products' floor (``preset_floors``), and the ratios the models issue bounds by 1.5. ``names``: a subset
    of the presets (all of them by default). ``trained``: preset → a run directory of it; for those, the epoch
    and IWAE-5000 once more with that run's weights (one more epoch of a copy of the run), and their ratios.
    ``engine``: the epochs with ``--engine ENGINE`` (default: each preset's own); where that is ``compiled``, two
    epochs, the second timed (the floor is the same products, recorded from the autograd step), and IWAE-5000 as
    ``vaelab evaluate`` computes it for a run of that engine (compiled but for the planar flow).
    ``timed`` > 1: that many epochs timed after a first one that is not (compiling, or the process's first steps),
    in one child process; the row's seconds per epoch are their median (what a long run's epochs take, less at the
    mercy of one noisy epoch), beside their fastest, which compares like with like with the floor (itself the
    fastest of three rounds), and epochs timed in turn with their floors (``interleaved_epochs_and_floors``):
    ``timed`` whole epochs, then ``SHORT_ROUNDS`` epochs of ``SHORT_STEPS`` steps (keys ``short_…``)."""
    trained = trained or {}
    flags = ("--engine", engine) if engine else ()
    from vaelab.presets import apply_preset

    rows = []
    for name in names or PRESETS:
        own = engine or apply_preset(RunConfig(), name).train.engine       # a preset may ask for the compiled engine
        epochs = (2 if own == "compiled" else 1) if timed == 1 else 1 + timed
        memory, times = epochs_in_child("--preset", name, "--validation", "0", "--early-stopping", "0", *flags,
                                        epochs=epochs, timed=timed)
        seconds, fastest = statistics.median(times), min(times)
        train = apply_preset(RunConfig(), name).train
        steps = -(-n_train // train.batch_size)
        row = {"preset": name, "engine": own, "seconds_per_epoch": seconds,
               "steps_per_second": steps / seconds,
               "schedule_epochs": train.epochs, "schedule_hours": train.epochs * seconds / 3600,
               "peak_rss_mib": memory, "epochs_timed": times, "fastest_epoch_seconds": fastest}
        text = (f"preset {name:14s}{f' (--engine {own})' if own != 'auto' else ''}: {seconds:7.2f} s/epoch, "
                f"{steps / seconds:7.1f} steps/s, its {train.epochs} epochs "
                f"{train.epochs * seconds / 3600:6.1f} h, peak {memory:6.0f} MiB")
        if arrays is not None and not torch.cuda.is_available():
            floors = preset_floors(name, arrays, n_train, trained=trained.get(name), engine=own)
            if timed > 1:
                floors.update(interleaved_epochs_and_floors(name, arrays, engine, rounds=timed))
                short = interleaved_epochs_and_floors(name, arrays, engine, rounds=SHORT_ROUNDS,
                                                      epoch_steps=SHORT_STEPS)
                floors.update({f"short_{key}": value for key, value in short.items()})
            row.update(floors, epoch_over_floor=seconds / floors["step_floor"],
                       fastest_epoch_over_floor=fastest / floors["step_floor"],
                       iwae_over_floor=floors["iwae5000_seconds_per_10000"] / floors["iwae5000_floor_per_10000"])
            fastest_text = f", the fastest of {timed} {row['fastest_epoch_over_floor']:.2f} ×" if timed > 1 else ""
            text += (f"; step floor {floors['step_floor']:.2f} s (epoch {row['epoch_over_floor']:.2f} × it"
                     f"{fastest_text}); "
                     f"IWAE-5000{' compiled' if floors['iwae5000_compiled'] else ''} "
                     f"{floors['iwae5000_seconds_per_10000']:.0f} s per 10 000, floor "
                     f"{floors['iwae5000_floor_per_10000']:.0f} s ({row['iwae_over_floor']:.2f} ×)")
            if timed > 1:
                text += ("; in turn in one process: epoch ÷ floor " + ", ".join(
                    f"{e:.2f} ÷ {f:.2f} s" for e, f in zip(row["interleaved_epochs"], row["interleaved_floors"]))
                         + f", median ratio {row['interleaved_ratio_median']:.2f} ×; in turn, {SHORT_ROUNDS} epochs of "
                         f"{SHORT_STEPS} steps: median ratio {row['short_interleaved_ratio_median']:.2f} × "
                         f"({min(row['short_interleaved_ratios']):.2f}–{max(row['short_interleaved_ratios']):.2f})")
            if name in trained:
                _, epoch = train_in_child(*flags, trained=trained[name], epochs=epochs)
                iwae = floors["trained_iwae5000_seconds_per_10000"]
                row.update(trained_run=str(trained[name]), trained_seconds_per_epoch=epoch,
                           trained_epoch_over_floor=epoch / floors["step_floor"],
                           trained_iwae_over_floor=iwae / floors["iwae5000_floor_per_10000"])
                text += (f"; trained ({trained[name]}): epoch {epoch:.2f} s ({row['trained_epoch_over_floor']:.2f} ×), "
                         f"IWAE-5000 {iwae:.0f} s ({row['trained_iwae_over_floor']:.2f} ×)")
        rows.append(row)
        print(text, flush=True)
    return rows


def evaluations_in_turn(runs: list[tuple[Path, str]], digits: int = 40, rounds: int = 2) -> list[dict]:
    """For each run (its directory and weights file): IWAE-5000 of the first ``digits`` test digits, eagerly and
    with the log weights compiled (``evaluate --no-compiled`` / ``--compiled``), in turn, ``rounds`` times in this
    one process, after one compiling pass over the 20 digits that follow (timed apart: what a process pays once).
    Each round's compiled ÷ eager seconds, and the largest difference between the two estimates of a digit."""
    rows = []
    for run_dir, weights in runs:
        config, model = ckpt.load_model(run_dir, torch.device("cpu"), weights)
        model.eval()
        data = prepare(load_mnist(config.data.data_dir, log=lambda m: None), dataclasses.replace(
            config.data, validation=0, train_examples=1, test_examples=digits + 20))
        x, later = data.test_binary[:digits], data.test_binary[digits:digits + 20]
        eager, compiled = EvalConfig(k=5000), EvalConfig(k=5000, compiled=True)
        graphs, start = torch._dynamo.utils.counters["stats"]["unique_graphs"], time.perf_counter()
        iwae_log_likelihood(model, later, compiled)
        row = {"run": str(run_dir), "weights": weights, "digits": digits,
               "first_compiled_seconds_20_digits": time.perf_counter() - start, "rounds": []}
        for _ in range(rounds):
            times, values = [], []
            for setting in (eager, compiled):
                start = time.perf_counter()
                values.append(iwae_log_likelihood(model, x, setting))
                times.append(time.perf_counter() - start)
            row["rounds"].append({"eager_seconds": times[0], "compiled_seconds": times[1],
                                  "compiled_over_eager": times[1] / times[0],
                                  "largest_difference_nats": float((values[0] - values[1]).abs().max())})
            print(f"{run_dir} ({weights}): IWAE-5000 of {digits} digits eager {times[0]:.2f} s, compiled "
                  f"{times[1]:.2f} s ({times[1] / times[0]:.2f} ×)", flush=True)
        row["graphs_compiled"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs     # one: all batches
        torch._dynamo.reset()                       # the next run's graph compiled afresh, as in its own process
        rows.append(row)
    return rows


def threads_table() -> list[dict]:
    """The seed configuration's epoch with 1 and 2 threads, alone and beside a process that keeps one core busy.

    On 2 cores, two OpenMP threads beside a busy process wait for each other at every barrier of every
    product: the epoch slows many times over, where one thread only halves its share."""
    rows = []
    for competitor in (False, True):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if competitor else None
        try:
            for threads in (1, 2):
                _, seconds = train_in_child("--threads", str(threads))
                rows.append({"threads": threads, "busy_process_beside": competitor, "seconds_per_epoch": seconds})
                print(f"threads {threads}{', a busy process beside' if competitor else ''}: {seconds:.2f} s/epoch")
        finally:
            if busy:
                busy.kill()
                busy.wait()
    return rows


def bf16_products() -> dict:
    """Whether the CPU has native bf16, and a bf16 product's time over float32's, one thread, at the shapes of
    the training step and at 1024³ (best of 20 after a warm-up)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ratios = {}
    try:
        for m, k, n in ((64, 784, 256), (64, 256, 784), (1024, 1024, 1024)):
            best = {}
            for dtype in (torch.float32, torch.bfloat16):
                a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
                torch.mm(a, b)
                timings = []
                for _ in range(20 if m < 1024 else 3):
                    start = time.perf_counter()
                    torch.mm(a, b)
                    timings.append(time.perf_counter() - start)
                best[dtype] = min(timings)
            ratios[f"{m}x{k}x{n}"] = {"fp32_gflops": 2 * m * k * n / best[torch.float32] / 1e9,
                                      "bf16_gflops": 2 * m * k * n / best[torch.bfloat16] / 1e9,
                                      "bf16_over_fp32_time": best[torch.bfloat16] / best[torch.float32]}
    finally:
        torch.set_num_threads(threads)
    native = has_native_bf16(torch.device("cpu"))
    for shape, row in ratios.items():
        print(f"bf16 {shape}: {row['bf16_gflops']:.1f} GFLOP/s against {row['fp32_gflops']:.1f} in float32 "
              f"(time ×{row['bf16_over_fp32_time']:.1f}), native bf16: {native}")
    return {"native": native, "products": ratios}          # the CPU's kernel flags: the record's machine.flags


def targets(result: dict) -> dict[str, dict]:
    """The speed issue's targets (#15) against this run's medians: training's epoch against the reference
    pipeline's, in float32 and in bf16, and IWAE-5000 over 10 000 digits with bf16 decoder products."""
    training, evaluation = result["training"], result["evaluation"]
    rows = {"training_fp32_speedup": (training["speedup_fused_vs_reference"], ">=", 5.0),
            "training_bf16_speedup": (training["bf16"]["speedup_vs_reference"], ">=", 8.0),
            "evaluation_bf16_seconds_per_10000": (evaluation["bf16"]["seconds_per_10000"], "<=", 80.0)}
    compare = {">=": operator.ge, "<=": operator.le}
    return {name: {"target": f"{relation} {bound:g}", "measured": measured, "met": compare[relation](measured, bound)}
            for name, (measured, relation, bound) in rows.items()}


def plain_iwae_in_fresh_process(run_dir: Path, n_examples: int, seed: int) -> float:
    """Seconds of ``reference_iwae`` (K = 5000) on the first test digits, in a new Python process."""
    script = ("import sys, time, torch\n"
              f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from run import reference_iwae\n"
              "from vaelab.checkpoint import load_model\n"
              "from vaelab.data import DataConfig, load_mnist, prepare\n"
              f"_, model = load_model({str(run_dir)!r})\n"
              f"test = prepare(load_mnist(), DataConfig(test_examples={n_examples}, train_examples=1)).test_binary\n"
              "start = time.perf_counter()\n"
              f"reference_iwae(model, test, 5000, torch.Generator().manual_seed({seed}))\n"
              "print(time.perf_counter() - start)")
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return float(done.stdout.split()[-1])


def machine() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None    # what `vaelab train` runs on
    return {"cpu": cpu_name(), "flags": kernel_flags(), "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(), "node": platform.node()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="alternating epochs per side")
    parser.add_argument("--eval-examples", type=int, default=10000, help="test digits for evaluate --k 5000")
    parser.add_argument("--side-examples", type=int, default=200,
                        help="test digits for the side-by-side IWAE timing (3 alternating repetitions)")
    parser.add_argument("--quick", action="store_true", help="skip the scaling table and the memory run")
    parser.add_argument("--presets-only", action="store_true", help="only the presets table (seconds per epoch, "
                        "memory, step and evaluation floors of every preset)")
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), metavar="NAME",
                        help="with --presets-only: these presets only (vaelab presets lists them)")
    parser.add_argument("--engine", choices=["autograd", "compiled"],
                        help="with --presets-only: train the presets' epochs with this engine (default: their own); "
                             "compiled: IWAE-5000 compiled too, as vaelab evaluate computes it for such a run")
    parser.add_argument("--timed-epochs", type=int, default=3, metavar="N",
                        help="with --presets-only: time N epochs of each preset after a first untimed one, in one "
                             "process (their median and fastest; default 3); 1: the first epoch (compiled: the "
                             f"second). N > 1 also times N epochs, then {SHORT_ROUNDS} of {SHORT_STEPS} steps, each "
                             "in turn with its floor")
    parser.add_argument("--trained", nargs="+", default=[], metavar="NAME=RUN",
                        help="with --presets-only: time preset NAME also with the weights of RUN, a run directory of it "
                             "(one more epoch of a copy of the run, and IWAE-5000)")
    parser.add_argument("--evaluations-in-turn", nargs="+", default=[], metavar="RUN[:best]",
                        help="only this: IWAE-5000 of the first 40 test digits of each run eagerly and compiled, in "
                             "turn, twice (':best': its best-validation weights)")
    parser.add_argument("--bf16-examples", type=int, default=3200,
                        help="where bf16 is emulated (22-124x slower): the training digits of the bf16 epochs, "
                             "scaled to 60 000 (native bf16: all of them)")
    parser.add_argument("--gap-examples", type=int, default=500, help="test digits of the --gaps timing")
    parser.add_argument("--bf16-eval-examples", type=int, default=20,
                        help="where bf16 is emulated: the test digits of the bf16 IWAE-5000 timing")
    args = parser.parse_args()
    trained = trained_runs(parser, args.trained)
    if trained and (not args.presets_only or not set(trained) <= set(args.presets or PRESETS)):
        parser.error("--trained NAME=RUN goes with --presets-only, and NAME among its --presets")
    torch.manual_seed(0)
    result: dict = {"machine": machine(), "date": datetime.date.today().isoformat()}
    if args.evaluations_in_turn:
        result["evaluations_in_turn"] = evaluations_in_turn(run_weights(parser, args.evaluations_in_turn))
        save_result(result)
        return
    arrays = load_mnist(log=print)
    if args.presets_only:
        result["presets"] = presets_table(len(arrays.train_images), arrays, args.presets, trained, args.engine,
                                          max(1, args.timed_epochs))
        save_result(result)
        return
    peak = matmul_peak()
    result["matmul_peak_gflops"] = peak
    print(f"matmul peak {peak:.1f} GFLOP/s on {result['machine']['cpu']}, {torch.get_num_threads()} threads")

    # -- training, alternating ----------------------------------------------------------------------
    model = ReferenceVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(ReferenceMNIST(arrays.train_images), batch_size=64, shuffle=True)
    trainers = {"fused": vaelab_trainer(arrays), "autograd": vaelab_trainer(arrays, engine="autograd")}
    # bf16 (the fused engine's bf16 step and its floor) on all digits where this CPU has bf16 kernels; where
    # torch emulates them, on the first --bf16-examples digits, seconds scaled to the full set
    native = has_native_bf16(torch.device("cpu"))
    n_train = len(arrays.train_images)
    bf16_examples = n_train if native else min(args.bf16_examples, n_train)
    bf16_scale = n_train / bf16_examples
    bf16_trainer = vaelab_trainer(arrays, precision="bf16", train_examples=bf16_examples)
    times: dict[str, list[float]] = {"reference": [], "fused": [], "autograd": [], "floor": [], "fused_bf16": [],
                                     "floor_bf16": []}
    floor_parts: dict[str, list[dict[str, float]]] = {"fp32": [], "bf16": []}
    for rep in range(args.reps):
        times["reference"].append(reference_epoch(loader, model, optimizer))
        for engine, trainer in trainers.items():
            times[engine].append(vaelab_epoch(trainer))
        floor_parts["fp32"].append(step_floor(trainers["fused"]))
        times["floor"].append(sum(floor_parts["fp32"][-1].values()))
        times["fused_bf16"].append(vaelab_epoch(bf16_trainer) * bf16_scale)
        floor_parts["bf16"].append(step_floor(bf16_trainer, torch.bfloat16))
        times["floor_bf16"].append(sum(floor_parts["bf16"][-1].values()) * bf16_scale)
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    flops_epoch = ModelConfig().flops_per_example() * n_train
    median = {k: float(np.median(v)) for k, v in times.items()}
    result["training"] = {
        "seconds_per_epoch": times, "median": median,
        "speedup_fused_vs_reference": median["reference"] / median["fused"],
        "speedup_autograd_vs_reference": median["reference"] / median["autograd"],
        "autograd_over_fused": median["autograd"] / median["fused"],      # the models issue's target: ≤ 1.5
        "flops_per_epoch": flops_epoch, "fused_gflops": flops_epoch / median["fused"] / 1e9,
        "fused_fraction_of_peak": flops_epoch / median["fused"] / 1e9 / peak,
        "floor_seconds_at_peak": flops_epoch / peak / 1e9,
        # the products, Adam and the binarisation alone, timed in place (step_floor), alternating with the
        # epochs above: what bounds any eager float32 step at batch 64 on this machine
        "step_floor": {"seconds_per_epoch": floor_parts["fp32"], "median": median["floor"],
                       "max_speedup_vs_reference": median["reference"] / median["floor"],
                       "fused_over_floor": median["fused"] / median["floor"]},
        # the fused engine's bf16 step (engines.fused_step_bf16, torch's bf16 products) and its floor (the
        # eleven products in bf16, Adam, the binarisation), timed on bf16_examples digits, scaled to all
        "bf16": {"native": native, "examples_timed": bf16_examples, "seconds_scaled_by": bf16_scale,
                 "speedup_vs_reference": median["reference"] / median["fused_bf16"],
                 "over_fp32": median["fused_bf16"] / median["fused"],
                 "step_floor": {"seconds_per_epoch_unscaled": floor_parts["bf16"], "median": median["floor_bf16"],
                                "max_speedup_vs_reference": median["reference"] / median["floor_bf16"],
                                "fused_over_floor": median["fused_bf16"] / median["floor_bf16"]}},
    }
    # accuracy: both engines from the same seed after the same epochs (test ELBO on all 10 000 digits)
    result["training"]["test_elbo_after_reps"] = {k: tr.state.metrics[-1]["test_elbo"] for k, tr in trainers.items()}
    t = result["training"]
    print(f"training: reference {median['reference']:.2f} s/epoch, vaelab {median['fused']:.2f} s/epoch "
          f"(×{t['speedup_fused_vs_reference']:.2f}), autograd engine {median['autograd']:.2f} s "
          f"(×{t['speedup_autograd_vs_reference']:.2f}, {t['autograd_over_fused']:.2f} × fused); "
          f"vaelab {t['fused_gflops']:.1f} GFLOP/s = "
          f"{100 * t['fused_fraction_of_peak']:.0f} % of peak; floor {t['floor_seconds_at_peak']:.2f} s")
    print(f"step floor (products + Adam + binarisation, timed in place): {median['floor']:.2f} s/epoch, "
          f"so at most ×{t['step_floor']['max_speedup_vs_reference']:.2f} over the reference at batch 64; "
          f"vaelab's epoch is {t['step_floor']['fused_over_floor']:.2f} × the floor")
    print(f"test ELBO after {args.reps} epochs, seed 0: " +
          ", ".join(f"{k} {v:.3f}" for k, v in t["test_elbo_after_reps"].items()))
    b = t["bf16"]
    print(f"bf16 ({'native' if native else 'emulated by torch'}, timed on {bf16_examples} digits, ×{bf16_scale:.2f}): "
          f"{median['fused_bf16']:.2f} s/epoch (×{b['speedup_vs_reference']:.2f} over the reference, "
          f"{b['over_fp32']:.2f} × fp32), floor {median['floor_bf16']:.2f} s "
          f"(at most ×{b['step_floor']['max_speedup_vs_reference']:.2f})")

    # -- evaluation -------------------------------------------------------------------------------
    trained = trainers["fused"].model
    test = prepare(arrays, DataConfig(test_examples=args.eval_examples, train_examples=1)).test_binary
    decoder_flops = 2 * (50 * 256 + 256 * 784)
    start = time.perf_counter()
    fp32_values = iwae_log_likelihood(trained, test, EvalConfig(k=5000))                     # (N,)
    seconds = time.perf_counter() - start
    floor = 5000 * decoder_flops * len(test) / peak / 1e9
    result["evaluation"] = {"k": 5000, "n_examples": len(test), "seconds": seconds, "floor_seconds": floor,
                            "seconds_per_10000": seconds * 10000 / len(test)}
    print(f"evaluate --k 5000 on {len(test)} digits: {seconds:.1f} s (floor at peak {floor:.1f} s)")
    # evaluate --gaps adds the per-digit optimisation of q (issue 24: within 2× evaluate --k 5000 in all)
    from vaelab.evaluation import gap_decomposition

    gap_digits = test[: args.gap_examples]
    start = time.perf_counter()
    gaps, _ = gap_decomposition(trained, gap_digits, fp32_values[: len(gap_digits)], EvalConfig(k=5000), None, False)
    gap_seconds = (time.perf_counter() - start) * 10000 / len(gap_digits)
    total = result["evaluation"]["seconds_per_10000"] + gap_seconds
    result["evaluation"]["gaps"] = {
        "n_examples": len(gap_digits), "seconds_per_10000": gap_seconds, "mean_steps": gaps["mean_steps"],
        "converged_fraction": gaps["converged_fraction"],
        "evaluate_with_gaps_over_evaluate": total / result["evaluation"]["seconds_per_10000"]}
    print(f"--gaps on {len(gap_digits)} digits: {gap_seconds:.1f} s per 10 000 ({gaps['mean_steps']:.0f} steps on "
          f"average, {100 * gaps['converged_fraction']:.1f} % converged); evaluate --k 5000 --gaps is "
          f"{total / result['evaluation']['seconds_per_10000']:.2f} × evaluate --k 5000")
    # the same estimate with bf16 decoder products, the same draws (the same seed, the same first digits)
    bf16_test = test if native else test[: args.bf16_eval_examples]
    start = time.perf_counter()
    bf16_values = iwae_log_likelihood(trained, bf16_test, EvalConfig(k=5000, precision="bf16"))
    bf16_seconds = (time.perf_counter() - start) * 10000 / len(bf16_test)
    difference, difference_stderr = summarize(bf16_values - fp32_values[: len(bf16_test)])      # per digit (n,)
    result["evaluation"]["bf16"] = {
        "native": native, "n_examples": len(bf16_test), "seconds_per_10000": bf16_seconds,
        "over_fp32": bf16_seconds / result["evaluation"]["seconds_per_10000"],
        "mean_difference_nats": difference, "standard_error_nats": difference_stderr}
    print(f"evaluate --k 5000 --precision bf16 on {len(bf16_test)} digits: {bf16_seconds:.1f} s per 10 000 "
          f"({result['evaluation']['bf16']['over_fp32']:.2f} × fp32); IWAE(bf16) − IWAE(fp32), same draws: "
          f"{difference:+.4f} nats")
    # side by side with the plain IWAE, alternating on the same digits (robust to the machine's drift)
    # The plain IWAE's speed depends on the state of the process's allocator: in this process, after
    # vaelab's loops have set glibc's thresholds and grown the heap, its 63 MB temporaries come without
    # page faults; in a fresh process each chunk faults them in again (≈ 600 k faults per 40 digits,
    # benchmarks/README.md). Both are timed; the ratio reported is the one against the faster.
    side: dict[str, list[float]] = {"plain": [], "plain_fresh_process": [], "vaelab": []}
    subset = test[: args.side_examples]
    run_dir = trainers["fused"].run_dir                       # weights and config, as `vaelab train` leaves them
    ckpt.write_text(run_dir / ckpt.CONFIG, trainers["fused"].config.to_json())
    for rep in range(3):
        start = time.perf_counter()
        plain = reference_iwae(trained, subset, 5000, torch.Generator().manual_seed(rep))
        side["plain"].append((time.perf_counter() - start) * 10000 / len(subset))
        start = time.perf_counter()
        ours = iwae_log_likelihood(trained, subset, EvalConfig(k=5000, seed=rep))
        side["vaelab"].append((time.perf_counter() - start) * 10000 / len(subset))
        side["plain_fresh_process"].append(plain_iwae_in_fresh_process(run_dir, len(subset), rep) * 10000 / len(subset))
    side_median = {name: float(np.median(v)) for name, v in side.items()}
    plain_best = min(side_median["plain"], side_median["plain_fresh_process"])
    result["evaluation"]["side_by_side"] = {
        "n_examples": len(subset), "seconds_per_10000": side, "median": side_median,
        "speedup": plain_best / side_median["vaelab"],
        "mean_iwae": {"plain": float(plain.double().mean()), "vaelab": float(ours.double().mean())}}
    print(f"IWAE-5000 side by side on {len(subset)} digits, seconds per 10 000: plain {side_median['plain']:.0f} "
          f"(in a fresh process {side_median['plain_fresh_process']:.0f}), vaelab {side_median['vaelab']:.0f} "
          f"(×{plain_best / side_median['vaelab']:.2f} against the faster plain); mean IWAE "
          f"plain {plain.double().mean():.3f}, vaelab {ours.double().mean():.3f}")

    if not args.quick:
        # -- scaling ------------------------------------------------------------------------------
        scaling = []
        for batch, hidden in [(64, 256), (128, 256), (256, 256), (512, 256), (1024, 256), (64, 512), (64, 1024)]:
            trainer = vaelab_trainer(arrays, batch, hidden)
            seconds = vaelab_epoch(trainer)
            flops = ModelConfig(hidden=((hidden,),)).flops_per_example() * len(arrays.train_images)
            scaling.append({"batch": batch, "hidden": hidden, "seconds": seconds, "gflops": flops / seconds / 1e9})
            print(f"batch {batch:5d} hidden {hidden:5d}: {seconds:6.2f} s/epoch, {flops / seconds / 1e9:6.1f} GFLOP/s")
        result["scaling_training"] = scaling
        subset = test[:500]
        eval_scaling = []
        for k in (100, 500, 1000, 5000):
            start = time.perf_counter()
            iwae_log_likelihood(trained, subset, EvalConfig(k=k))
            seconds = (time.perf_counter() - start) * 10000 / len(subset)
            eval_scaling.append({"k": k, "seconds_per_10000": seconds})
            print(f"evaluate K = {k:5d}: {seconds:7.1f} s per 10 000 digits (timed on {len(subset)})")
        result["scaling_evaluation"] = eval_scaling
        result["peak_rss_mib_training"] = peak_memory_of_training()
        print(f"peak resident memory of `vaelab train` (1 epoch): {result['peak_rss_mib_training']:.0f} MiB")
        result["presets"] = presets_table(n_train, arrays)
        result["threads"] = threads_table()
    result["bf16"] = bf16_products()
    result["targets"] = targets(result)
    for name, row in result["targets"].items():
        print(f"target {name}: {row['target']}, measured {row['measured']:.2f} — {'met' if row['met'] else 'not met'}")

    save_result(result)


def trained_runs(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, Path]:
    """``NAME=RUN`` pairs → {preset: run directory}; a pair that is not a preset and a finished run directory of
    that preset's model is refused (one line, exit 2)."""
    from vaelab.presets import apply_preset

    runs = {}
    for pair in pairs:
        name, _, run = pair.partition("=")
        if name not in PRESETS or not run:
            parser.error(f"--trained {pair!r}: give NAME=RUN with NAME one of {', '.join(PRESETS)}")
        path = Path(run)
        if not (path / "config.json").is_file() or not (path / "metrics.csv").is_file():
            parser.error(f"--trained {pair!r}: {run} is not a run directory (no config.json and metrics.csv)")
        if RunConfig.load(path / "config.json").model != apply_preset(RunConfig(), name).model:
            parser.error(f"--trained {pair!r}: the model of {run} is not preset {name}'s")
        runs[name] = path
    return runs


def run_weights(parser: argparse.ArgumentParser, specs: list[str]) -> list[tuple[Path, str]]:
    """``RUN`` or ``RUN:best`` → (run directory, weights file); one that is not a run directory with those weights is
    refused (one line, exit 2)."""
    from vaelab.training import BEST_WEIGHTS

    runs = []
    for spec in specs:
        run, best = (spec[:-5], True) if spec.endswith(":best") else (spec, False)
        path, weights = Path(run), BEST_WEIGHTS if best else ckpt.WEIGHTS
        if not (path / "config.json").is_file() or not (path / weights).is_file():
            parser.error(f"--evaluations-in-turn {spec!r}: {run} is not a run directory with {weights}")
        runs.append((path, weights))
    return runs


def save_result(result: dict, stem: str | None = None) -> None:
    """``result`` as ``results/<stem>.json`` (default stem: the machine's name and the date), never over an
    earlier file: a second result of the same stem gets ``-2``, ``-3`` …"""
    RESULTS.mkdir(exist_ok=True)
    stem = stem or f"{platform.node() or 'machine'}-{result['date']}"
    path = RESULTS / f"{stem}.json"
    run = 1
    while path.exists():                  # several runs on one day: keep them all
        run += 1
        path = RESULTS / f"{stem}-{run}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
