"""Training: Adam on −ELBO per example, with exact resume, atomic checkpoints and clean interruption.

Speed (see benchmarks/README.md): parameters and gradients live in one flat buffer each, so Adam is a
single fused kernel; the default ``fused`` engine computes the gradient with the backward pass derived
by hand below (≈25 tensor operations instead of ≈60 autograd nodes), checked against autograd in
tests/test_training.py::test_fused_gradient_matches_autograd. The per-step loss stays on the device
(no host synchronisation per step); finiteness is checked before every checkpoint.

Random streams: ``data`` draws each epoch's permutation and binarised pixels at the start of the epoch;
``noise`` draws ε for the reparameterisation, step by step. A checkpoint keeps the data stream's state
*at the start of the epoch* and the noise stream's current state, so a resume rebuilds the same epoch
and continues with bitwise the same weights as an uninterrupted run (same machine, same thread count).
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from vaelab import checkpoint as ckpt
from vaelab.config import RunConfig
from vaelab.data import MNISTData, training_batches
from vaelab.errors import CheckpointError, TrainingDiverged, UsageError, VaelabError
from vaelab.evaluation import hot_loop_settings, test_elbo
from vaelab.model import VAE
from vaelab.objectives import softplus_sum

METRIC_FIELDS = ("epoch", "train_elbo", "train_reconstruction", "train_kl", "test_elbo",
                 "test_reconstruction", "test_kl", "seconds", "total_seconds")


class Interrupted(VaelabError):
    """SIGINT: the current step finished, a checkpoint was written; exit status 130."""

    exit_code = 130


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


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


class FlatAdam:
    """Adam (Kingma & Ba 2015) on one flat parameter tensor, the update of torch.optim.Adam:

    m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  θ ← θ − lr · (m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε).

    Uses PyTorch's fused kernel where it exists (one pass over memory, no Python per tensor), else the
    same update in plain tensor operations; tests/test_training.py checks both against torch.optim.Adam.
    """

    def __init__(self, param: torch.Tensor, grad: torch.Tensor, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fused: bool | None = None):
        self.param, self.grad, self.lr, self.betas, self.eps = param, grad, lr, betas, eps
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.step_count = torch.zeros((), dtype=torch.float32, device=param.device)
        available = hasattr(torch, "_fused_adam_") and param.device.type in ("cpu", "cuda")
        self.fused = available if fused is None else fused and available

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        self.step_count.add_(1)
        if self.fused:
            torch._fused_adam_([self.param], [self.grad], [self.exp_avg], [self.exp_avg_sq], [],
                               [self.step_count], amsgrad=False, lr=self.lr, beta1=beta1, beta2=beta2,
                               weight_decay=0.0, eps=self.eps, maximize=False)
            return
        t = self.step_count
        self.exp_avg.lerp_(self.grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(self.grad, self.grad, value=1 - beta2)
        bias1 = 1 - beta1 ** t
        denom = (self.exp_avg_sq / (1 - beta2 ** t)).sqrt_().add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom * bias1, value=-self.lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.step_count}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in self.state_dict().items():
            if state[name].shape != tensor.shape:
                raise ValueError(f"optimizer state {name} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(tensor.shape)}")
            tensor.copy_(state[name])


# --------------------------------------------------------------------------------------------------
# Engines: each writes the gradient of mean(−ELBO) into the model's gradient views (the flat buffer)
# and returns the batch sums of (−ELBO, −reconstruction, KL) as a (3,) tensor on the device.


def autograd_step(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    for p in model.parameters():
        p.grad.zero_()                   # backward accumulates into the flat gradient views
    terms = model(x, eps=eps.unsqueeze(0))
    loss = -terms.elbo.sum()
    (loss / x.shape[0]).backward()
    return torch.stack([loss, -terms.reconstruction.sum(), terms.kl.sum()]).detach()


@torch.no_grad()
def fused_step(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Forward and hand-derived backward of L = (1/B) Σ_b −ELBO_b for the one-hidden-layer MLP VAE.

    Forward:  h₁ = relu(x W₁ᵀ + b₁)  e = h₁ W₂ᵀ + b₂ = (μ, v)  σ = e^{v/2}  z = μ + σε
              h₂ = relu(z W₃ᵀ + b₃)  ℓ = h₂ W₄ᵀ + b₄
              −ELBO = Σⱼ [softplus(ℓⱼ) − xⱼℓⱼ] + ½ Σᵢ [σᵢ² + μᵢ² − 1 − vᵢ]
    Backward: ∂L/∂ℓ = (sigmoid(ℓ) − x)/B; through each linear layer dW = dyᵀ a, db = Σ_b dy, da = dy W;
              through relu keep dy where h > 0; at the sampling step ∂z/∂μ = 1, ∂z/∂v = ½σε, and the
              KL adds μ/B to dμ and ½(σ² − 1)/B to dv. Every gradient is written whole (no zeroing).
    """
    enc1, enc2, dec1, dec2 = model.enc_hidden, model.enc_out, model.dec_hidden, model.dec_out
    batch, latent = x.shape[0], model.config.latent
    scale = 1.0 / batch
    h1 = torch.addmm(enc1.bias, x, enc1.weight.t()).relu_()               # (B, H)
    e = torch.addmm(enc2.bias, h1, enc2.weight.t())                         # (B, 2d)
    mu, logvar = e[:, :latent], e[:, latent:]
    sigma = torch.exp(0.5 * logvar)                                         # (B, d)
    z = torch.addcmul(mu, sigma, eps)                                       # (B, d)
    h2 = torch.addmm(dec1.bias, z, dec1.weight.t()).relu_()               # (B, H)
    logits = torch.addmm(dec2.bias, h2, dec2.weight.t())                    # (B, 784)
    # −log p(x|z) = Σ softplus(ℓ) − x·ℓ: the logits form, finite for any ℓ.
    reconstruction = softplus_sum(logits).sum() - torch.dot(x.reshape(-1), logits.reshape(-1))
    variance = sigma * sigma
    kl = 0.5 * (variance + mu * mu - 1.0 - logvar).sum()

    d_logits = torch.sigmoid(logits).sub_(x).mul_(scale)                    # (B, 784)
    torch.mm(d_logits.t(), h2, out=dec2.weight.grad)
    torch.sum(d_logits, 0, out=dec2.bias.grad)
    d_h2 = torch.ops.aten.threshold_backward(torch.mm(d_logits, dec2.weight), h2, 0.0)  # (B, H)
    torch.mm(d_h2.t(), z, out=dec1.weight.grad)
    torch.sum(d_h2, 0, out=dec1.bias.grad)
    d_z = torch.mm(d_h2, dec1.weight)                                       # (B, d)
    d_e = torch.empty_like(e)                                               # (B, 2d) = (dμ, dv)
    torch.add(d_z, mu, alpha=scale, out=d_e[:, :latent])
    torch.addcmul(variance.sub_(1.0).mul_(0.5 * scale), d_z.mul_(eps), sigma.mul_(0.5), out=d_e[:, latent:])
    torch.mm(d_e.t(), h1, out=enc2.weight.grad)
    torch.sum(d_e, 0, out=enc2.bias.grad)
    d_h1 = torch.ops.aten.threshold_backward(torch.mm(d_e, enc2.weight), h1, 0.0)      # (B, H)
    torch.mm(d_h1.t(), x, out=enc1.weight.grad)
    torch.sum(d_h1, 0, out=enc1.bias.grad)
    return torch.stack([reconstruction + kl, reconstruction, kl]).detach()


ENGINES: dict[str, Callable[[VAE, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "fused": fused_step,
    "autograd": autograd_step,
}


# --------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Where training stands: completed epochs, position inside the current epoch, history."""

    epoch: int = 0                     # completed epochs
    step: int = 0                      # steps done inside epoch + 1 (0 at an epoch boundary)
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # partial epoch sums
    seconds: float = 0.0               # partial epoch time
    metrics: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    def __init__(self, config: RunConfig, run_dir: Path, data: MNISTData, device: torch.device,
                 log: Callable[[str], None] = print, progress: bool = True):
        self.config, self.run_dir, self.data, self.device = config, Path(run_dir), data, device
        self.log, self.progress = log, progress
        seed = config.train.seed
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.model = VAE(config.model).to(device, torch.float32)  # initialised from torch's global stream
        self.flat = FlatParameters(self.model)
        self.optimizer = FlatAdam(self.flat.param.data, self.flat.param.grad, lr=config.train.lr)
        self.data_rng = torch.Generator().manual_seed(seed)
        self.noise_rng = torch.Generator(device=device).manual_seed((seed + 0x9E3779B97F4A7C15) % 2**63)
        self.epoch_start_rng = self.data_rng.get_state()
        self.state = TrainState()
        self.engine = ENGINES[config.train.engine]
        self._interrupted = False

    # ---- checkpoint ------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Training state first (it holds the weights too), then the user-facing weights and metrics."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({
            "rng.data_epoch_start": self.epoch_start_rng,
            "rng.noise": self.noise_rng.get_state(),
            "rng.torch_global": torch.get_rng_state(),
        })
        tensors.update({f"optim.{k}": v for k, v in self.optimizer.state_dict().items()})
        np_state = np.random.get_state()
        meta = {
            "epoch": self.state.epoch, "step": self.state.step, "sums": self.state.sums,
            "seconds": self.state.seconds, "metrics": self.state.metrics,
            "config": self.config.to_dict(),
            "python_random": _jsonable(random.getstate()),
            "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        ckpt.save_tensors(self.run_dir / ckpt.STATE, tensors, meta)
        ckpt.save_weights(self.run_dir / ckpt.WEIGHTS, self.model)
        self.write_metrics()

    def load_checkpoint(self) -> None:
        tensors, meta = ckpt.load_tensors(self.run_dir / ckpt.STATE)
        path = self.run_dir / ckpt.STATE
        try:
            weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict({k.removeprefix("optim."): v for k, v in tensors.items()
                                            if k.startswith("optim.")})
            self.epoch_start_rng = tensors["rng.data_epoch_start"]
            self.data_rng.set_state(self.epoch_start_rng)
            self.noise_rng.set_state(tensors["rng.noise"])
            torch.set_rng_state(tensors["rng.torch_global"])
            random.setstate(_tupled(meta["python_random"]))
            name, keys, *rest = meta["numpy_random"]
            np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
            self.state = TrainState(epoch=int(meta["epoch"]), step=int(meta["step"]),
                                    sums=[float(s) for s in meta["sums"]], seconds=float(meta["seconds"]),
                                    metrics=list(meta["metrics"]))
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: incomplete or mismatched training state ({exc}); "
                                  f"it cannot be resumed: start a new run") from exc

    def write_metrics(self) -> None:
        lines = [",".join(METRIC_FIELDS)]
        for row in self.state.metrics:
            lines.append(",".join(_fmt(row[k]) for k in METRIC_FIELDS))
        ckpt.write_text(self.run_dir / ckpt.METRICS, "\n".join(lines) + "\n")

    # ---- loop ------------------------------------------------------------------------------------

    def _on_sigint(self, signum, frame) -> None:
        if self._interrupted:           # a second Ctrl-C: stop at once, the last checkpoint stands
            raise KeyboardInterrupt
        self._interrupted = True

    def fit(self) -> list[dict[str, float]]:
        """Train to ``config.train.epochs``; returns the metrics of every epoch."""
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            with hot_loop_settings():
                while self.state.epoch < self.config.train.epochs:
                    self._run_epoch()
        finally:
            signal.signal(signal.SIGINT, previous)
        return self.state.metrics

    def _run_epoch(self) -> None:
        cfg = self.config.train
        epoch = self.state.epoch + 1
        start_step = self.state.step
        self.epoch_start_rng = self.data_rng.get_state()
        steps = math.ceil(self.data.n_train / cfg.batch_size)
        losses = torch.zeros((steps, 3), dtype=torch.float64, device=self.device)  # per-step batch sums
        batches = training_batches(self.data, cfg.batch_size, self.data_rng)
        bar = tqdm(total=steps, initial=start_step, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=not self.progress, unit="step", dynamic_ncols=True)
        latent = self.config.model.latent
        started = time.perf_counter()
        self.model.train()
        for step, x in enumerate(batches):
            if step < start_step:        # resuming inside an epoch: the same batches, skipped
                continue
            eps = torch.randn((x.shape[0], latent), generator=self.noise_rng, device=self.device)
            losses[step] = self.engine(self.model, x, eps)
            self.optimizer.step()
            bar.update(1)
            if self._interrupted:
                self.state.step = step + 1
                self._stop_interrupted(losses, epoch, start_step, started, bar)
        bar.close()
        seconds = self.state.seconds + time.perf_counter() - started
        self._check_finite(losses[start_step:], epoch, start_step)
        sums = losses.sum(0).tolist()
        totals = [a + b for a, b in zip(sums, self.state.sums)]
        test = test_elbo(self.model, self.data.test_binary, cfg.eval_batch_size, cfg.eval_seed)
        if not all(math.isfinite(v) for v in test.values()):
            raise TrainingDiverged(f"the test ELBO became {test['elbo']} at epoch {epoch}; the last good "
                                   f"checkpoint (epoch {epoch - 1}) is left untouched; try a lower --lr")
        n = self.data.n_train
        row = {"epoch": epoch, "train_elbo": -totals[0] / n, "train_reconstruction": -totals[1] / n,
               "train_kl": totals[2] / n, "test_elbo": test["elbo"], "test_reconstruction": test["reconstruction"],
               "test_kl": test["kl"], "seconds": seconds,
               "total_seconds": self.state.seconds + time.perf_counter() - started}  # with the test ELBO
        self.state = TrainState(epoch=epoch, step=0, metrics=self.state.metrics + [row])
        self.epoch_start_rng = self.data_rng.get_state()   # the next epoch starts from here
        self.save_checkpoint()
        self.log(f"epoch {epoch:3d}/{cfg.epochs}  train ELBO {row['train_elbo']:9.3f}  "
                 f"test ELBO {row['test_elbo']:9.3f}  nats/example  {seconds:6.2f} s")

    def _check_finite(self, losses: torch.Tensor, epoch: int, offset: int) -> None:
        bad = ~torch.isfinite(losses[:, 0])
        if bool(bad.any()):
            step = offset + int(bad.nonzero()[0, 0]) + 1
            raise TrainingDiverged(
                f"the loss became {float(losses[step - 1 - offset, 0])} at epoch {epoch}, step {step}; "
                f"training stopped and the last good checkpoint (epoch {epoch - 1}) is left untouched; "
                f"try a lower --lr")

    def _stop_interrupted(self, losses, epoch, start_step, started, bar) -> None:
        bar.close()
        done = self.state.step
        self._check_finite(losses[start_step:done], epoch, start_step)
        partial = losses[start_step:done].sum(0).tolist()
        self.state.sums = [a + b for a, b in zip(partial, self.state.sums)]
        self.state.seconds += time.perf_counter() - started
        self.save_checkpoint()
        raise Interrupted(f"interrupted at epoch {epoch}, step {done}; checkpoint written to {self.run_dir}; "
                          f"resume with: vaelab train --out {self.run_dir} --resume")


def check_writable(run_dir: Path, need_bytes: int) -> None:
    """Create ``run_dir`` and prove it writable and roomy before any training starts."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise ckpt.WriteError(f"cannot write in {run_dir}: {exc.strerror} (errno {exc.errno}); "
                              f"choose a writable --out") from exc
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise ckpt.WriteError(f"{run_dir} has {free / 2**20:.1f} MiB free, a run needs about "
                              f"{need_bytes / 2**20:.1f} MiB; free some space or choose another --out")


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _fmt(value: float) -> str:
    return str(int(value)) if isinstance(value, int) else f"{value:.6f}"
