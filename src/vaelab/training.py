"""Training: Adam on the batch mean of −objective, with exact resume, atomic checkpoints and clean stops.

Speed (see benchmarks/README.md): parameters and gradients live in one flat buffer each, so Adam is a
single fused kernel; the engine (``vaelab.engines``) computes each step's gradient: the hand-derived
``fused`` backward where it covers the configuration, autograd otherwise. The per-step losses stay on
the device (no host synchronisation per step); finiteness is checked before every checkpoint.

Random streams: ``data`` draws each epoch's permutation and binarised pixels at the start of the epoch;
``noise`` draws ε for the reparameterisation, step by step, (K, B, D) per step. A checkpoint keeps the
data stream's state *at the start of the epoch* and the noise stream's current state, so a resume
rebuilds the same epoch and continues with bitwise the same weights as an uninterrupted run (same
machine, same thread count). The learning rate and β are functions of the position (epoch, step).

Stops: SIGINT (Ctrl-C), SIGTERM (schedulers, ``timeout``) and SIGHUP (a closed terminal; unless the
process ignores it, as under ``nohup``) finish the current step, write a checkpoint that resumes
exactly, and exit with 128 + the signal's number; a second signal stops at once (the last checkpoint
stands). A kill -9 loses at most the epoch under way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from vaelab import checkpoint as ckpt
from vaelab.atomic import WRITE_REMEDIES
from vaelab.config import RunConfig
from vaelab.data import MNISTData, training_batches
from vaelab.distributed import SINGLE, RankLost, World, all_reduce_, any_rank, gather, shard
from vaelab.engines import ENGINES, select_engine
from vaelab.errors import CheckpointError, TrainingDiverged, UsageError, VaelabError
from vaelab.evaluation import ACTIVE_UNIT_THRESHOLD, elbo_summary, hot_loop_settings
from vaelab.models import build_model
from vaelab.optimizers import build_optimizer
from vaelab.provenance import provenance
from vaelab.schedules import LR_SCHEDULES, beta_text, kl_weight, stops_early
from vaelab.tables import plural, shell_word

# Columns of metrics.csv (nats per example; the validation columns only with --validation).
METRIC_FIELDS = ("epoch", "lr", "beta", "train_objective", "train_elbo", "train_reconstruction", "train_kl",
                 "test_elbo", "test_reconstruction", "test_kl")
VALIDATION_FIELDS = ("validation_elbo", "validation_reconstruction", "validation_kl")
TIME_FIELDS = ("epoch_seconds", "elapsed_seconds")    # the epoch's steps; training so far, with evaluations
# with --clip-grad-norm: the epoch's steps whose gradient was rescaled, and the mean of its steps' norms before
CLIP_FIELDS = ("clipped_steps", "gradient_norm_mean")
# per-step columns of an epoch's losses: batch sums of (objective, ELBO, reconstruction, KL), then, with clipping,
# the gradient's norm before it, 1 where it was rescaled and 1 where it was measured (a resume that took up clipping
# inside an epoch measured only its later steps); rank 0's only, so that the all-reduce keeps them
STEP_COLUMNS = 7
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals(handler):
    """``handler`` for Ctrl-C, SIGTERM and SIGHUP while the block runs, the previous handlers after it. SIGINT is
    taken even where it was ignored (a shell's background job); SIGHUP not where it was ignored (nohup: the user
    asked to survive a hangup). Leaving by ``RankLost`` (a torchrun peer has gone), SIGTERM is ignored instead:
    torchrun's agent sends it to every worker once one has failed, and with the default action it killed this one
    between here and its one line saying what stands (seen under load in tests/test_reliability3.py).

    Outside the main thread (`vaelab.train` called from a worker thread) Python takes no handler, and the signals
    are the main thread's: none is taken here, and the checkpoint of each epoch stands (it raised "ValueError:
    signal only works in main thread of the main interpreter")."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS
                if signum != signal.SIGHUP or signal.getsignal(signum) != signal.SIG_IGN}
    try:
        yield
    except RankLost:
        previous[signal.SIGTERM] = signal.SIG_IGN     # the process is on its way out, with its reason
        raise
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)

# Divergence: a per-example loss no working model can have. Predicting ½ for every pixel costs D·ln 2 nats
# (543.4 for MNIST), the loss of a model that has learnt nothing; a train or test ELBO a thousand times
# worse than that (or NaN/±inf) means the weights have blown up (an ELBO of −3.1e18 was once checkpointed
# as good), and training stops as it does for NaN, the last good checkpoint kept.
DIVERGENCE_FACTOR = 1000
BEST_WEIGHTS = "model-best.safetensors"
LATENT_FILE = "latent.csv"
TRAIN_LOG = "train.log"
PICTURES = ("elbo.png", "samples.png", "reconstructions.png")     # drawn at the end of training and at a stop
# what the training process (alone, under the run's lock) writes, each through a temporary ".NAME.XXXXXXXX.tmp"
TRAINING_FILES = (ckpt.STATE, ckpt.WEIGHTS, BEST_WEIGHTS, ckpt.METRICS, LATENT_FILE, ckpt.CONFIG, *PICTURES)


class Interrupted(VaelabError):
    """A stop signal: the current step finished and a checkpoint was written; exit status 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopNow(KeyboardInterrupt):
    """A second stop signal: stop at once, the last checkpoint stands."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def resolve_device(name: str, world: World = SINGLE) -> torch.device:
    """``--device`` as a torch.device: auto is cuda where there is a GPU; under torchrun each rank of a GPU run takes
    the GPU of its local rank. A GPU this machine does not have is a UsageError, before anything is allocated."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu or auto")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if world.distributed:
        device = torch.device("cuda", world.local_rank)
    count = torch.cuda.device_count()
    if (device.index or 0) >= count:
        fix = (f"start at most {count} process{'es' if count > 1 else ''} per machine (torchrun --nproc-per-node)"
               if world.distributed else f"use --device cuda{'' if count == 1 else f':0 … cuda:{count - 1}'}")
        raise UsageError(f"{'rank ' + str(world.rank) + ' needs ' if world.distributed else '--device '}{device}, but "
                         f"this machine has {count} CUDA GPU{'s' if count != 1 else ''}; {fix}")
    return device


class FlatParameters:
    """All parameters in one contiguous tensor, all gradients in another; the module's parameters
    become views into them, so one fused Adam kernel updates everything."""

    def __init__(self, model: torch.nn.Module):
        params = list(model.parameters())
        first = params[0]
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.param = torch.nn.Parameter(flat)
        self.param.grad = torch.zeros_like(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.data = self.param.data[offset:offset + n].view_as(p)
            p.grad = self.param.grad[offset:offset + n].view_as(p)
            offset += n
        assert first.data.data_ptr() == self.param.data_ptr()


# --------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Where training stands: completed epochs, position inside the current epoch, history."""

    epoch: int = 0                     # completed epochs
    step: int = 0                      # steps done inside epoch + 1 (0 at an epoch boundary)
    sums: list[float] = field(default_factory=lambda: [0.0] * STEP_COLUMNS)  # partial epoch sums of STEP_COLUMNS
    seconds: float = 0.0               # partial epoch time
    metrics: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0                # epoch of the best validation ELBO so far (0: none yet)
    best_validation_elbo: float = -math.inf
    started: str = ""                  # when the run started (ISO 8601, UTC), kept across resumes
    latent: list[dict] = field(default_factory=list)   # per epoch: each layer's KL per unit, Cov_x E_q[u], active
    amendments: list[dict] = field(default_factory=list)  # {epoch, step, changes}: what a resume changed, from where


def parallel_step(engine, model, batch: torch.Tensor, eps: torch.Tensor, objective: str, beta: float,
                  grad: torch.Tensor, world: World, grad_squares: torch.Tensor | None = None) -> torch.Tensor:
    """One step's gradient of the global batch mean into ``grad`` (the flat buffer), on this rank's shard of
    ``batch`` (B, 784) with this rank's draws ``eps`` (K, B_r, D); returns the shard's loss sums (4,).
    ``grad_squares`` (one process only: a rank's own ‖∇‖² is not that of the all-reduced sum) receives ‖∇‖²
    where the engine has it on the way (``engines.write_gradient``); it is NaN otherwise.

    Rank r's engine writes ∇ (1/B_r) Σ_shard; scaled by B_r/B and summed over ranks (one all-reduce) that is
    ∇ (1/B) Σ_batch, whatever the sizes of the shards (tests/test_distributed.py)."""
    x = shard(batch, world)                                                              # (B_r, 784)
    if grad_squares is not None:
        grad_squares.fill_(math.nan)
    sums = engine(model, x, eps, objective, beta, grad_squares=None if world.distributed else grad_squares)
    if world.distributed:
        all_reduce_(grad.mul_(len(x) / len(batch)), world)
    return sums


def metric_fields(config: RunConfig) -> tuple[str, ...]:
    return (METRIC_FIELDS + (VALIDATION_FIELDS if config.data.validation else ())
            + (CLIP_FIELDS if config.train.clip_grad_norm else ()) + TIME_FIELDS)


def clip_norm_(grad: torch.Tensor, max_norm: float, squares: torch.Tensor | None = None) -> torch.Tensor:
    """Rescale ``grad`` in place to Euclidean norm ``max_norm`` where it is larger, g ← g · min(1, c/‖g‖)
    (Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural networks", §3.2): one step's
    direction is kept, its length bounded, so that one outlying batch cannot move Adam's moments far. Returns
    ‖g‖ before (a tensor: no wait for the device). ‖g‖ = 0 gives c/0 = inf, clamped to 1: nothing changes.
    ``squares``: ‖g‖² (a (1,) float64 CPU tensor) where the engine summed it while writing g, else NaN or None:
    then ‖g‖ takes a pass over g here. On the CPU, where reading the factor costs no wait, a factor of exactly 1
    (most steps of a run that clips rarely) skips the pass over g: g · 1 = g bit for bit."""
    if squares is not None and not math.isnan(known := squares.item()):
        norm = torch.tensor(math.sqrt(known), dtype=grad.dtype)
    else:
        norm = torch.linalg.vector_norm(grad)
    scale = (max_norm / norm).clamp_(max=1.0)
    if grad.device.type != "cpu" or scale.item() != 1.0:
        grad.mul_(scale)
    return norm


def migrate_metrics(rows: list[dict], config: RunConfig) -> list[dict]:
    """Rows of a version-1 training state: ``seconds`` was the epoch's steps and ``total_seconds`` the epoch
    with its test ELBO; they become ``epoch_seconds`` and the cumulative ``elapsed_seconds``."""
    migrated, elapsed = [], 0.0
    for row in rows:
        if "seconds" not in row:
            migrated.append(row)
            continue
        row = dict(row)
        elapsed += row.pop("total_seconds")
        row.update(epoch_seconds=row.pop("seconds"), elapsed_seconds=elapsed, lr=config.train.lr, beta=1.0,
                   train_objective=row["train_elbo"])
        migrated.append(row)
    return migrated


class FormattedOnce:
    """The texts of the items of a list that only grows, each made once: ``formatted(items)`` makes the text of the
    items it has not seen (an item is the same object as before, ``is``), and keeps those it has. The latent units'
    history grows by an epoch's entry at each epoch's end, and latent.csv and the training state hold all of it:
    until 2026-12-07 both were made whole at every epoch's end, which took 96 % of a small model's epoch by its
    870th (0.25 s; 150 latent units, 40 test digits), and by that rate about 1.1 s an epoch by the 3280th of a
    two-layer Burda preset (benchmarks/README.md)."""

    def __init__(self, make: Callable[[Any], str]):
        self.make, self.items, self.texts = make, [], []

    def __call__(self, items: Sequence) -> list[str]:
        same = 0
        while same < min(len(items), len(self.items)) and items[same] is self.items[same]:
            same += 1
        del self.items[same:], self.texts[same:]           # a history replaced (a checkpoint loaded): made again
        for item in items[same:]:
            self.items.append(item)
            self.texts.append(self.make(item))
        return self.texts


class Trainer:
    def __init__(self, config: RunConfig, run_dir: Path, data: MNISTData, device: torch.device,
                 log: Callable[[str], None] = print, progress: bool = True, world: World = SINGLE,
                 observers: Sequence[Callable[[torch.nn.Module, dict], None]] = ()):
        self.config, self.run_dir, self.data, self.device = config, Path(run_dir), data, device
        self.log, self.progress, self.world = log, progress and world.main, world
        self.observers = list(observers)            # called on rank 0 with (model, metrics row) after each epoch
        if config.model.batch_norm and world.distributed:
            raise UsageError(f"--batch-norm trains in one process: under torchrun each of the {world.size} processes "
                             f"would normalise with the statistics of its own share of the batch; run without "
                             f"torchrun, or without --batch-norm")
        batch, n_train = config.train.batch_size, data.n_train
        if config.model.batch_norm and (batch == 1 or n_train % batch == 1):
            # the normalisation's variance over a batch of one example is 0/0 (torch refuses it mid-epoch)
            other = next(b for b in range(max(batch, 2), n_train + 2) if b >= n_train or n_train % b != 1)
            raise UsageError("--batch-norm normalises each training batch by its own mean and variance, and one "
                             "example has no variance: " + ("batches of 1" if batch == 1 else
                             f"{n_train} training digits in batches of {batch} leave a last batch of 1") +
                             f"; choose another --batch-size (e.g. {other})")
        seed = config.train.seed
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.model = build_model(config.model).to(device, torch.float32)  # initialised from torch's global stream
        self.flat = FlatParameters(self.model)
        self.optimizer = build_optimizer(config.train.optimizer, self.model, self.flat.param.data,
                                         self.flat.param.grad, config.train.lr, config.train.adam_betas,
                                         config.train.adam_eps)
        self.data_rng = torch.Generator().manual_seed(seed)
        # each rank's own noise stream; rank 0's is the stream of a single process
        self.noise_rng = torch.Generator(device=device).manual_seed(
            (seed + 0x9E3779B97F4A7C15 + world.rank * 0x632BE59BD9B4E019) % 2**63)
        self.epoch_start_rng = self.data_rng.get_state()
        self.state = TrainState()
        self.engine_name = select_engine(config)
        self.engine = ENGINES[(self.engine_name, config.train.precision)]
        self._signal: int | None = None
        self.last_checkpoint: str | None = None       # what the last checkpoint holds, for messages
        self.loss_limit = DIVERGENCE_FACTOR * config.model.data_dim * math.log(2)   # nats per example
        self.latent_rows = FormattedOnce(self._latent_rows)   # latent.csv's rows of each epoch
        self.latent_json = FormattedOnce(json.dumps)          # the training state's JSON of each epoch's entry

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.data.n_train / self.config.train.batch_size)

    # ---- checkpoint ------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Training state first (it holds the weights too), then the user-facing weights and metrics.
        Every rank calls it (it gathers the ranks' noise streams); rank 0 alone writes."""
        noise = gather(self.noise_rng.get_state(), self.world)
        if not self.world.main:
            return
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({
            "rng.data_epoch_start": self.epoch_start_rng,
            "rng.noise": noise[0],
            "rng.torch_global": torch.get_rng_state(),
        })
        tensors.update({f"rng.noise.rank{rank}": state for rank, state in enumerate(noise) if rank})
        tensors.update({f"optim.{k}": v for k, v in self.optimizer.state_dict().items()})
        np_state = np.random.get_state()
        meta = {
            "epoch": self.state.epoch, "step": self.state.step, "sums": self.state.sums,
            "seconds": self.state.seconds, "metrics": self.state.metrics,
            "best_epoch": self.state.best_epoch,
            "best_validation_elbo": _json_number(self.state.best_validation_elbo),
            "world_size": self.world.size,
            "noise_device": self.noise_rng.device.type,         # whose generator state rng.noise is
            "started": self.state.started,
            "amendments": self.state.amendments,
            "provenance": provenance(self.device, torch.get_num_threads()),   # of this checkpoint's process
            "config": self.config.to_dict(),
            "python_random": _jsonable(random.getstate()),
            "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        # the latent history last, its entries' JSON made once each (``FormattedOnce``): the text json.dumps makes of
        # the whole with "latent" as its last key (json.dumps of a list joins its items' texts with ", ")
        encoded = json.dumps(meta)[:-1] + ', "latent": [' + ", ".join(self.latent_json(self.state.latent)) + "]}"
        try:
            ckpt.save_tensors(self.run_dir / ckpt.STATE, tensors, encoded=encoded)
        except ckpt.WriteError as exc:
            raise self._checkpoint_failed(exc, state_written=False) from exc
        self.last_checkpoint = self._position()
        self.rewrite_user_files()

    @property
    def resume_command(self) -> str:
        """`vaelab train --out RUN --resume`, or torchrun's of this run's processes (``checkpoint.resume_command``)."""
        return ckpt.resume_command(self.run_dir, self.world)

    def rewrite_user_files(self) -> None:
        """What a resume does first: the weights and metrics written again from the training state just loaded."""
        try:
            self.write_user_files()
        except ckpt.WriteError as exc:
            raise self._checkpoint_failed(exc, state_written=True) from exc

    def _checkpoint_failed(self, exc: ckpt.WriteError, state_written: bool) -> ckpt.WriteError:
        """A checkpoint not written whole (a disk that filled, a directory made read-only): training stops, and the
        message (also in train.log where it still takes a line) says what stands and the command that goes on. The
        files are written state first, so either the previous checkpoint stands whole, or the new state does and the
        weights and metrics beside it lag until a resume writes them again from it."""
        run = shell_word(self.run_dir)
        if not self.run_dir.is_dir():
            # removed or moved while it trained (`rm -r`, `mv`): nothing stands here, and where it went is not known
            # (until 2026-12-05 the line said that the last checkpoint stood and to make the directory writable)
            moved = ("nothing had been checkpointed yet" if self.last_checkpoint is None else
                     f"if it was moved, its last checkpoint ({self.last_checkpoint}) goes on there with "
                     f"{ckpt.resume_command(Path('NEW'), self.world)}, NEW its new place")
            return ckpt.WriteError(f"{exc.what}; training stopped: {run} is gone, removed or moved while it trained; "
                                   f"{moved}", exc.what, exc.errno)
        if state_written:
            stands = (f"the training state of {self._position()} was written and resumes exactly; "
                      f"{ckpt.WEIGHTS}, {ckpt.METRICS} and {LATENT_FILE} may hold the checkpoint before it until a "
                      f"resume writes them again from the state")
        elif self.last_checkpoint is None:
            stands = "no checkpoint was written yet, so nothing was trained"
        else:
            stands = f"the last checkpoint ({self.last_checkpoint}) is left untouched and resumes exactly"
        fix = exc.remedy(run)
        goes_on = (f"{fix} and start the run again" if self.last_checkpoint is None and not state_written else
                   f"{fix}, then: {self.resume_command}")
        message = f"{exc.what}; training stopped: {stands}; {goes_on}"
        try:
            self.append_log(message)
        except ckpt.WriteError:
            pass                         # the disk that refused the checkpoint may refuse the line too
        return ckpt.WriteError(message, exc.what, exc.errno)

    def _position(self) -> str:
        return f"epoch {self.state.epoch}" + (f", step {self.state.step} of epoch {self.state.epoch + 1}"
                                              if self.state.step else "")

    def _restore_noise(self, state: torch.Tensor, meta: dict) -> None:
        """The noise stream where the checkpoint left it. A run resumed on the other kind of device (``--resume
        --device cpu`` after a GPU, or cuda after a CPU) cannot take the other generator's state (a CPU's
        Mersenne twister, a GPU's Philox counter), so its stream goes on from a seed made of that state: the same
        resume draws the same numbers every time, but not those the other device would have drawn (whose
        arithmetic differs in the last digits anyway). Said on the terminal and in train.log."""
        cpu_state = torch.Generator().get_state().numel()
        saved = meta.get("noise_device") or ("cpu" if state.numel() == cpu_state else "cuda")   # older states
        here = self.noise_rng.device.type
        if saved == here:
            self.noise_rng.set_state(state)
            return
        digest = hashlib.sha256(state.contiguous().numpy().tobytes()).digest()
        self.noise_rng.manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
        note = (f"note: this run drew its noise on {saved}; on {here} the stream goes on from a seed made of that "
                f"stream's state (the same on every resume, not the draws {saved} would have made)")
        self.log(note)
        self.append_log(note)

    def write_user_files(self) -> None:
        """model.safetensors and metrics.csv from the training state. A resume writes them again, so a
        checkpoint whose state was written but whose weights were not (a disk that filled in between)
        never leaves older weights beside a newer state."""
        if not self.world.main:
            return
        ckpt.save_weights(self.run_dir / ckpt.WEIGHTS, self.model, self.state.epoch, self.state.step)
        self.write_metrics()

    def remove_cut_writes(self) -> list[str]:
        """The temporary files of the training's own writes that a kill -9 cut short (atomic_write's
        ".NAME.XXXXXXXX.tmp", a checkpoint's size each), removed; their names. Called under the run's lock, so no
        write of this run is under way; an evaluation's temporary files (it writes beside a training) are not
        touched."""
        names = re.compile("|".join(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp" for name in TRAINING_FILES))
        cut = sorted(entry.name for entry in self.run_dir.iterdir() if names.fullmatch(entry.name))
        for name in cut:
            (self.run_dir / name).unlink(missing_ok=True)
        return cut

    def load_checkpoint(self) -> None:
        path = self.run_dir / ckpt.STATE
        tensors, meta = ckpt.load_tensors(path)
        saved_world = int(meta.get("world_size", 1))
        if saved_world != self.world.size:
            raise UsageError(f"{path} was written by {saved_world} process(es) and this resume runs {self.world.size}: "
                             f"each process has its own noise stream and shard of every batch, so the run resumes "
                             f"exactly only under the same world size; resume with {saved_world} process(es)")
        try:
            weights = ckpt.current_names({k.removeprefix("model."): v for k, v in tensors.items()
                                          if k.startswith("model.")}, self.model)
            ckpt.check_finite(weights, path)
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict({k.removeprefix("optim."): v for k, v in tensors.items()
                                            if k.startswith("optim.")})
            self.epoch_start_rng = tensors["rng.data_epoch_start"]
            self.data_rng.set_state(self.epoch_start_rng)
            self._restore_noise(tensors["rng.noise" + (f".rank{self.world.rank}" if self.world.rank else "")], meta)
            torch.set_rng_state(tensors["rng.torch_global"])
            random.setstate(_tupled(meta["python_random"]))
            name, keys, *rest = meta["numpy_random"]
            np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
            sums = [float(s) for s in meta["sums"]]
            if len(sums) == 3:           # version 1: (−ELBO, −reconstruction, KL), always the ELBO
                sums = [-sums[0], -sums[0], -sums[1], sums[2]]
            sums += [0.0] * (STEP_COLUMNS - len(sums))         # before --clip-grad-norm: four columns
            best = meta.get("best_validation_elbo")
            self.state = TrainState(epoch=int(meta["epoch"]), step=int(meta["step"]), sums=sums,
                                    seconds=float(meta["seconds"]),
                                    metrics=migrate_metrics(list(meta["metrics"]), self.config),
                                    best_epoch=int(meta.get("best_epoch", 0)),
                                    best_validation_elbo=-math.inf if best is None else float(best),
                                    started=str(meta.get("started", "")), latent=list(meta.get("latent", [])),
                                    amendments=list(meta.get("amendments", [])))
            self.last_checkpoint = self._position()
        except CheckpointError:
            raise
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: incomplete or mismatched training state ({exc}); "
                                  f"it cannot be resumed: start a new run") from exc

    def write_metrics(self) -> None:
        fields = metric_fields(self.config)
        lines = [",".join(fields)]
        for row in self.state.metrics:
            lines.append(",".join(_fmt(row.get(k, math.nan), k in RATE_FIELDS) for k in fields))
        ckpt.write_text(self.run_dir / ckpt.METRICS, "\n".join(lines) + "\n")
        # the latent layers over training, one row per epoch, layer and unit (test digits, the test pass's draws):
        # posterior collapse, and units that come alive under warm-up. variance_draws: 1 where E_q[u|x] is exact, 2
        # where it is two draws' covariance over variance_digits digits (evaluation.elbo_summary); empty digits: a
        # row of a vaelab before 2026-12-04, one draw's variance, which counts the draw's noise as activity
        # where of one test digit, no variance over digits (evaluation.unit_activity): those two columns empty
        lines = ["epoch,layer,unit,kl,posterior_mean_variance,active,variance_draws,variance_digits"]
        rows = [text for text in self.latent_rows(self.state.latent) if text]      # an entry without layers: none
        ckpt.write_text(self.run_dir / LATENT_FILE, "\n".join(lines + rows) + "\n")

    def _latent_rows(self, entry: dict) -> str:
        """latent.csv's rows of one epoch's entry of the latent history, one line per layer and unit."""
        lines = []
        for layer in entry["layers"]:
            units = self.config.model.latent[layer["layer"] - 1]
            kls = layer["kl"] or [math.nan] * units
            how = f"{layer.get('variance_draws', 1)},{layer.get('variance_digits', '')}"
            for unit, (kl, variance) in enumerate(zip(kls, layer["posterior_mean_variance"] or [None] * units)):
                counted = "," if variance is None else f"{_fmt(variance)},{int(variance > ACTIVE_UNIT_THRESHOLD)}"
                lines.append(f"{entry['epoch']},{layer['layer']},{unit},{_fmt(kl)},{counted},{how}")
        return "\n".join(lines)

    # ---- loop ------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:    # a second signal: stop at once, the last checkpoint stands
            raise StopNow(signum)
        self._signal = signum

    def fit(self) -> list[dict[str, float]]:
        """Train to ``config.train.epochs``, or until ``--early-stopping`` ends the run (``schedules.stops_early``,
        said on the terminal and in train.log); returns the metrics of every epoch."""
        self.state.started = self.state.started or time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        if self.world.main:                 # this start trains from the checkpoint anew: an earlier divergence is past
            with contextlib.suppress(OSError):
                (self.run_dir / ckpt.DIVERGED).unlink(missing_ok=True)
        with stop_signals(self._on_signal), hot_loop_settings():
            while self.state.epoch < self.config.train.epochs and not self.stopped_early:
                try:
                    self._run_epoch()
                except TrainingDiverged as exc:      # the log says why the epochs end where they do
                    self.append_log(str(exc))
                    self._mark_diverged(exc)
                    raise
                stop = any_rank(self._signal is not None, self.world, self.device)
                if stop and self.state.epoch < self.config.train.epochs and not self.stopped_early:
                    self._stop(self._signal or signal.SIGTERM, self.state.epoch + 1, 0)
        if self.stopped_early and self.state.epoch < self.config.train.epochs:
            line = self.early_stop_line()
            self.log(line)
            self.append_log(line)
        return self.state.metrics

    def _mark_diverged(self, exc: TrainingDiverged) -> None:
        """RUN/diverged.json beside the last good checkpoint, naming where that checkpoint stands and what diverged,
        so that `runs`, the report and the API say "diverged" of the run, not "interrupted" with a resume that would
        repeat the same steps (until 2026-12-06). Rank 0, where a checkpoint stands; a file that cannot be written
        (a full disk) leaves the run as before, said "interrupted"."""
        if not self.world.main or self.last_checkpoint is None or not (self.run_dir / ckpt.STATE).exists():
            return
        with contextlib.suppress(OSError, ckpt.WriteError, CheckpointError):
            meta = ckpt.read_metadata(self.run_dir / ckpt.STATE)
            ckpt.write_text(self.run_dir / ckpt.DIVERGED, json.dumps(
                {"epoch": meta.get("epoch", 0), "step": meta.get("step", 0), "what": exc.what}) + "\n")

    @property
    def stopped_early(self) -> bool:
        """Whether ``--early-stopping`` ends the run after the last whole epoch (never inside one)."""
        return not self.state.step and stops_early(self.config, self.state.epoch, self.state.best_epoch)

    def early_stop_line(self) -> str:
        state, cfg = self.state, self.config.train
        return (f"stopped early after epoch {state.epoch} of {cfg.epochs}: no better validation ELBO than "
                f"{state.best_validation_elbo:.3f} (epoch {state.best_epoch}) in the "
                f"{plural(cfg.early_stopping, 'epoch')} "
                f"since{' the warm-up' if state.best_epoch < self.config.objective.warmup_epochs else ''} "
                f"(--early-stopping {cfg.early_stopping}); its weights are {BEST_WEIGHTS}: vaelab evaluate "
                f"{shell_word(self.run_dir)} --checkpoint best; to train on: {self.resume_command} "
                f"--early-stopping 0 (or a larger N)")

    def _run_epoch(self) -> None:
        cfg, objective = self.config.train, self.config.objective
        epoch = self.state.epoch + 1
        start_step = self.state.step
        self.epoch_start_rng = self.data_rng.get_state()
        steps = self.steps_per_epoch
        self.optimizer.lr = LR_SCHEDULES[cfg.lr_schedule](epoch - 1, cfg.lr, cfg.epochs)
        losses = torch.zeros((steps, STEP_COLUMNS), dtype=torch.float64, device=self.device)  # per step
        clip, clip_value = cfg.clip_grad_norm, cfg.clip_grad_value
        batches = training_batches(self.data, cfg.batch_size, self.data_rng)
        bar = tqdm(total=steps, initial=start_step, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=not self.progress, unit="step", dynamic_ncols=True)
        noise_shape = (objective.samples, self.config.model.total_latent)
        beta = objective.beta
        world, grad = self.world, self.flat.param.grad
        squares = torch.full((1,), math.nan, dtype=torch.float64) if clip and grad.device.type == "cpu" else None
        started = time.perf_counter()
        self.model.train()
        for step, batch in enumerate(batches):
            if step < start_step:        # resuming inside an epoch: the same batches, skipped
                continue
            rows = len(shard(batch, world))
            eps = torch.randn((noise_shape[0], rows, noise_shape[1]), generator=self.noise_rng,
                              device=self.device)                                        # (K, B_r, D)
            beta = kl_weight((epoch - 1) * steps + step, steps, objective.beta, objective.warmup_epochs)
            losses[step, :4] = parallel_step(self.engine, self.model, batch, eps, objective.name, beta, grad, world,
                                             squares)
            if clip:                     # every rank holds the same all-reduced gradient, so clips alike
                norm = clip_norm_(grad, clip, squares)
                if world.main:
                    losses[step, 4] = norm
                    losses[step, 5] = norm > clip
                    losses[step, 6] = 1.0
            if clip_value:               # after the norm's rescaling, as the Ladder VAE's code (lasagne) does
                grad.clamp_(-clip_value, clip_value)
            self.optimizer.step()
            bar.update(1)
            if any_rank(self._signal is not None, world, self.device):
                self.state.step = step + 1
                bar.close()
                self._save_partial(losses, epoch, start_step, started)
                self._stop(self._signal or signal.SIGTERM, epoch, step + 1)
        bar.close()
        seconds = self.state.seconds + time.perf_counter() - started
        all_reduce_(losses, world)
        self._check_loss(losses[start_step:], epoch, start_step)
        totals = [a + b for a, b in zip(losses.sum(0).tolist(), self.state.sums)]
        evaluations = {"test": self.data.test_binary, "validation": self.data.validation_binary}
        row = {"epoch": epoch, "lr": self.optimizer.lr, "beta": beta}
        n = self.data.n_train
        row.update(zip(("train_objective", "train_elbo", "train_reconstruction", "train_kl"),
                       (total / n for total in totals)))
        if clip:
            row.update(clipped_steps=round(totals[5]), gradient_norm_mean=totals[4] / max(totals[6], 1.0))
        for name, images in evaluations.items():
            if images is None:
                continue
            units = [] if name == "test" else None
            summary = elbo_summary(self.model, images, cfg.eval_batch_size, cfg.eval_seed, units)
            if units is not None:
                latent = {"epoch": epoch, "layers": units}
            if not all(math.isfinite(v) for v in summary.values()) or abs(summary["elbo"]) > self.loss_limit:
                what = f"the {name} ELBO became {summary['elbo']:.4g} nats per digit at epoch {epoch}"
                raise TrainingDiverged(f"{what}{self._beyond(summary['elbo'])}; {self._what_stands()}", what)
            row.update({f"{name}_{key}": value for key, value in summary.items()})
        previous_elapsed = self.state.metrics[-1]["elapsed_seconds"] if self.state.metrics else 0.0
        row.update(epoch_seconds=seconds,
                   elapsed_seconds=previous_elapsed + self.state.seconds + time.perf_counter() - started)
        best_epoch, best = self.state.best_epoch, self.state.best_validation_elbo
        if "validation_elbo" in row and row["validation_elbo"] > best:
            best_epoch, best = epoch, row["validation_elbo"]
            if self.world.main:          # before the state that records it
                try:
                    ckpt.save_weights(self.run_dir / BEST_WEIGHTS, self.model, epoch)
                except ckpt.WriteError as exc:
                    raise self._checkpoint_failed(exc, state_written=False) from exc
        self.state = TrainState(epoch=epoch, step=0, metrics=self.state.metrics + [row], best_epoch=best_epoch,
                                best_validation_elbo=best, started=self.state.started,
                                latent=self.state.latent + [latent], amendments=self.state.amendments)
        self.epoch_start_rng = self.data_rng.get_state()   # the next epoch starts from here
        self.save_checkpoint()
        parts = [f"train ELBO {row['train_elbo']:9.3f}"]
        # under warm-up β rose step by step through the epoch: the mean objective is over that range of β
        first = kl_weight((epoch - 1) * steps, steps, objective.beta, objective.warmup_epochs)
        if objective.name != "elbo" or beta != 1 or first != 1:
            label = objective_label(objective.name, objective.samples, beta, first)
            parts.append(f"train {label} {row['train_objective']:9.3f}")
        if "validation_elbo" in row:
            parts.append(f"validation ELBO {row['validation_elbo']:9.3f}")
        parts.append(f"test ELBO {row['test_elbo']:9.3f}")
        measured = round(totals[6])                     # the epoch's steps, less those before clipping was taken up
        clipped = (f"; gradient rescaled to norm {clip:g} in {row['clipped_steps']} of {plural(measured, 'step')} "
                   f"(mean norm {row['gradient_norm_mean']:.3g})" if clip else "")
        line = f"epoch {epoch:3d}/{cfg.epochs}  " + ", ".join(parts) + f" nats per example{clipped}; {seconds:.2f} s"
        self.log(line)
        self.append_log(line)
        if self.world.main:
            for observer in self.observers:
                observer(self.model, row)

    def amend(self, changes: list[str], earlier: bool = False) -> str:
        """Record that this resume changed ``changes`` ("train.lr: 0.001 → 0.0005", the config's differences) from
        where the loaded checkpoint stands (kept in the training state with its next checkpoint, and a line in
        train.log now); ``earlier``: given at an earlier resume that wrote no checkpoint. Returns the line."""
        self.state.amendments = self.state.amendments + [{"epoch": self.state.epoch, "step": self.state.step,
                                                          "changes": changes}]
        where = f"epoch {self.state.epoch}" + (f", step {self.state.step}" if self.state.step else "")
        line = (f"amended on resuming after {where}: {'; '.join(changes)} (the steps before trained with the former "
                f"values" + ("; config.json held them already: set by an earlier resume that wrote no "
                                      "checkpoint, or by hand" if earlier else "")
                + ")")
        self.append_log(line)
        return line

    def append_log(self, line: str) -> None:
        """A line in RUN/train.log (one per epoch, and what a start or resume trains with, an amendment, an early
        stop), whatever the terminal shows (rank 0 only)."""
        if not self.world.main:
            return
        try:
            with open(self.run_dir / TRAIN_LOG, "a", encoding="utf-8") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}\n")
        except OSError as exc:
            raise ckpt.WriteError(f"cannot write {self.run_dir / TRAIN_LOG}: {exc.strerror} (errno {exc.errno}); "
                                  f"free some space or make it writable (the checkpoints written so far stand)") from exc

    def _check_loss(self, losses: torch.Tensor, epoch: int, offset: int) -> None:
        """Raise TrainingDiverged at the first step whose objective or ELBO (batch sums in columns 0 and 1) is
        NaN, ±inf, or beyond ``loss_limit`` nats per example (the batch's mean)."""
        per_example = losses[:, :2] / self.config.train.batch_size       # the last, smaller batch: a lower bound
        # the objective trained, −(E log p(x|z) − β·KL), is up to β times the ELBO's size: its limit is β times the
        # ELBO's (until 2026-12-05 a run with --beta 10⁴ and a KL of 100 nats was stopped as diverged)
        limits = torch.tensor([self.loss_limit * max(1.0, self.config.objective.beta), self.loss_limit],
                              dtype=per_example.dtype, device=per_example.device)
        bad = ~torch.isfinite(per_example).all(1) | (per_example.abs() > limits).any(1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            objective, elbo = per_example[row].tolist()
            scaled = not math.isfinite(objective) or abs(objective) > float(limits[0])   # the β-ELBO beyond its own
            value = objective if scaled else elbo
            # named as what it is, a bound to maximise (negative), not a loss (until 2026-12-06 "the loss became
            # -6.114e+07"): the trained objective with the step's β (warm-up: kl_weight), or the ELBO
            o = self.config.objective
            beta = kl_weight((epoch - 1) * self.steps_per_epoch + offset + row, self.steps_per_epoch, o.beta,
                             o.warmup_epochs)
            bound = objective_label(o.name, o.samples, beta) if scaled else "ELBO"
            if epoch == 1 and offset + row == 0:
                # the first step's value is that of the initial weights, before any update: no learning rate or
                # clipping changes it (He's init in a bottom-up ReLU hierarchy: each draw between blocks scales the
                # next block's input by e^{½ log σ²}, and log σ² grows layer by layer to NaN; README, Models)
                stands = (f": that of the initial weights, before any step, which no --lr or clipping changes; "
                          f"nothing was trained; try another --init (it was {self.config.model.init}) or --seed (it "
                          f"was {self.config.train.seed})")
            else:
                stands = f"; {self._what_stands()}"
            what = f"the {bound} became {value:.4g} nats per example at epoch {epoch}, step {offset + row + 1}"
            raise TrainingDiverged(f"{what}{self._beyond(value, scaled)}{stands}", what)

    def _beyond(self, value: float, scaled: bool = False) -> str:
        """Which limit ``value`` passed: the ELBO's, or (``scaled``) the trained β-ELBO's, β times it where β > 1
        (until 2026-12-05 the ELBO's was named for both)."""
        if not math.isfinite(value):
            return ""
        # the limit on the bound's size, with the value's sign: a bound is negative, so it fell below −limit (until
        # 2026-12-06 "the loss became -6.114e+07 … (beyond 5.43e+05"); a positive one (numerically) rose above it
        sign, word = (-1, "below") if value < 0 else (1, "above")
        elbo = (f"{DIVERGENCE_FACTOR}× the {'-' if sign < 0 else ''}{self.config.model.data_dim}·ln 2 nats of "
                f"predicting ½ for every pixel")
        beta = self.config.objective.beta
        if scaled and beta > 1:
            return (f" ({word} {sign * self.loss_limit * beta:.3g}, β = {beta:g} times the ELBO's limit of "
                    f"{sign * self.loss_limit:.3g}, {elbo}: no working model has it)")
        return f" ({word} {sign * self.loss_limit:.3g}, {elbo}: no working model has it)"

    def _what_stands(self) -> str:
        """The truth about what is kept: the last checkpoint, or that nothing was trained yet."""
        if self.last_checkpoint is None:
            return f"training stopped before its first checkpoint, so nothing was trained yet; try {self._remedy()}"
        return (f"training stopped; the last good checkpoint ({self.last_checkpoint}) is left untouched (its weights "
                f"load and evaluate; resuming as it is would repeat the same steps); go on from it with "
                f"{self._remedy()}: {self.resume_command} --lr X or --clip-grad-norm C")

    def _remedy(self) -> str:
        train = self.config.train
        clip = (f"a lower --clip-grad-norm (it was {train.clip_grad_norm:g})" if train.clip_grad_norm else
                "--clip-grad-norm C (train.log then gives each epoch's mean gradient norm and how often it clipped)")
        return f"a lower --lr (it was {train.lr:g}) or {clip}"

    def _save_partial(self, losses, epoch, start_step, started) -> None:
        done = self.state.step
        all_reduce_(losses, self.world)
        self._check_loss(losses[start_step:done], epoch, start_step)
        partial = losses[start_step:done].sum(0).tolist()
        self.state.sums = [a + b for a, b in zip(partial, self.state.sums)]
        self.state.seconds += time.perf_counter() - started
        self.save_checkpoint()

    def _stop(self, signum: int, epoch: int, step: int) -> None:
        where = f"after epoch {epoch - 1}" if step == 0 else f"at epoch {epoch}, step {step}"
        message = (f"stopped by {signal.Signals(signum).name} {where}; checkpoint written to {self.run_dir} "
                   f"(it resumes exactly); resume with: {self.resume_command}")
        self.append_log(message)
        raise Interrupted(message, signum)


def objective_label(name: str, samples: int, beta: float, first: float | None = None) -> str:
    """What the trained objective is called in the log: 'β-ELBO (β = 0.30)', 'IWAE-50', 'β-IWAE-5 (β = 0.50)'; with
    ``first``, the β of an epoch's first step where it differs from ``beta``, its last (a warm-up): 'β-ELBO (β from
    0.0001 to 0.01)', the epoch's mean being over that range (until 2026-12-07 'β = 0.01', the last step's alone:
    twice the mean β of the first epoch of a warm-up)."""
    base = {"elbo": "ELBO", "iwae": f"IWAE-{samples}"}.get(name, name)
    if first is not None and first != beta:
        return f"β-{base} (β from {beta_text(first)} to {beta_text(beta)})"
    return base if beta == 1 else f"β-{base} (β = {beta_text(beta)})"


def check_writable(run_dir: Path, need_bytes: int, resuming: bool = False, largest_file: int = 0) -> None:
    """Prove ``run_dir`` (existing) writable and roomy before any training starts, and its largest file
    (``largest_file`` bytes: the training state) within the process's limit on a file's size (`ulimit -f`: until
    2026-12-05 the first checkpoint failed with "File too large" and the line said to make the run writable). The
    fix named is to free space (or, for a new run, to choose another --out; a resumed run stays where it is)."""
    import resource

    elsewhere = "" if resuming else " or choose another --out"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < largest_file:
        raise ckpt.WriteError(f"a file may have at most {limit / 2**20:.1f} MiB here (ulimit -f), and the training "
                              f"state of this model takes about {largest_file / 2**20:.1f} MiB; raise the limit "
                              "(ulimit -f unlimited) in the shell that starts the run")
    probe = run_dir / ".write-test"
    try:
        try:
            probe.write_bytes(b"\0" * 4096)
        finally:
            probe.unlink(missing_ok=True)   # made even where its bytes did not fit: never left in the run
    except OSError as exc:
        fix = WRITE_REMEDIES.get(exc.errno)
        fix = f"{fix}{elsewhere}" if fix else "make it writable" if resuming else "choose a writable --out"
        raise ckpt.WriteError(f"cannot write in {run_dir}: {exc.strerror} (errno {exc.errno}); {fix}") from exc
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise ckpt.WriteError(f"{run_dir} has {free / 2**20:.1f} MiB free, a run needs about "
                              f"{need_bytes / 2**20:.1f} MiB; free some space{elsewhere}")


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


# metrics.csv's columns that are factors, not nats: six significant digits (six decimals wrote an exponential
# decay's 2.154e-4 as 0.000215 and any rate below 5e-7 as 0.000000)
RATE_FIELDS = frozenset({"lr", "beta"})


def _fmt(value: float, significant: bool = False) -> str:
    if isinstance(value, int):
        return str(value)
    return (f"{value:.6g}" if significant else f"{value:.6f}") if math.isfinite(value) else ""
