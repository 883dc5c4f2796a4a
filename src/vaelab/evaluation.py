"""Evaluation on the test set: the ELBO, the importance-sampled log-likelihood, and the Laplace estimates.

Which numbers are bounds (docs/derivations.md §5–6):
- ELBO ≤ log p(x) for every x (a bound, exact in expectation over ε only in the limit of many draws);
- IWAE-K with q(z|x): E[IWAE_K] ≤ log p(x), tighter as K grows (a stochastic lower bound);
- IS-K with the Laplace proposal N(z*, H⁻¹): also a stochastic lower bound in expectation (Jensen), and
  an unbiased estimate of p(x) itself before the log;
- the plain Laplace estimate: neither upper nor lower bound; exact when log p(x, z) is quadratic in z.
Per-example values are averaged over the test digits; the standard error is the standard deviation over
digits divided by √N (it measures which digits were drawn, the dominant uncertainty).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import platform
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from vaelab.data import test_batches
from vaelab.laplace import laplace_log_marginal, sample_laplace_proposal
from vaelab.model import VAE
from vaelab.objectives import importance_sampled_log_marginal, iwae_bound, log_standard_normal


@contextlib.contextmanager
def hot_loop_settings():
    """CPU settings for the training and evaluation loops (not nested):

    - float32 values below 1.2e-38 are treated as zero (FTZ/DAZ) while the block runs. Adam's moments of
      weights that rarely get a gradient (border pixels) decay geometrically into the denormal range
      (44 778 such entries after 6 epochs, measured), and exp of logits below −87 is denormal too;
      arithmetic on denormals is many times slower on x86. Flushing them changes nothing visible: the
      test ELBO after 6 epochs was identical to three decimals with and without (benchmarks/README.md).
    - ``retain_freed_memory()``, once per process.
    """
    retain_freed_memory()
    enabled = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def retain_freed_memory() -> None:
    """glibc only, process-wide, once: serve blocks below 32 MiB from the heap and keep up to 1 GiB of freed
    heap memory for reuse, instead of handing it back to the kernel and faulting it in again as fresh
    zeroed pages.

    With glibc's adaptive defaults an evaluation chunk (a few MB of logits and their intermediates) was
    returned and re-faulted every time: 180–320 minor page faults per 1000-row chunk, 3–6 % of the
    evaluation's time (measured, benchmarks/README.md). Resident memory keeps its high-water mark
    instead of shrinking between chunks. Does nothing on other C libraries.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)      # the ceiling of glibc's own adaptive threshold on 64-bit
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)


@dataclass(frozen=True)
class EvalConfig:
    k: int = 5000                  # importance samples per test digit
    examples_per_batch: int = 20   # test digits evaluated together
    # Samples decoded at once: 50 × 20 digits = 1000 rows of 784 logits (3.1 MB, within the shared L3).
    # Measured here (benchmarks/README.md): 1000-row products run the decoder's matmul at ≈155 GFLOP/s;
    # with the in-place softplus_sum, chunks of 50 took 2–5 % less time than 25, 10 was 30 % slower, and
    # 150 or more lost again (passes over tensors that leave the cache).
    sample_chunk: int = 50
    seed: int = 0
    laplace: bool = False
    newton_steps: int = 30


@torch.no_grad()
def test_elbo(model: VAE, images: torch.Tensor, batch_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean ELBO, reconstruction and KL in nats per example, one draw per digit from a fixed seed."""
    model.eval()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    sums = torch.zeros(3, dtype=torch.float64, device=images.device)
    for x in test_batches(images, batch_size):
        terms = model(x, generator=generator)
        sums += torch.stack([terms.elbo.sum(), terms.reconstruction.sum(), terms.kl.sum()]).double()
    n = len(images)
    elbo, rec, kl = (sums / n).tolist()
    return {"elbo": elbo, "reconstruction": rec, "kl": kl}


def summarize(values: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error (std over examples / √N) of per-example values."""
    values = values.double()
    n = values.numel()
    stderr = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(values.mean()), stderr


def _batches(images: torch.Tensor, size: int, desc: str, progress: bool) -> Iterator[torch.Tensor]:
    bar = tqdm(total=len(images), desc=desc, unit="digit", leave=False, disable=not progress, dynamic_ncols=True)
    for x in test_batches(images, size):
        yield x
        bar.update(len(x))
    bar.close()


@torch.no_grad()
def per_example(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, size: int,
                desc: str, progress: bool) -> torch.Tensor:
    """Apply ``fn`` (a batch → per-example values) over all images; returns (N,) on the CPU."""
    with hot_loop_settings():
        return torch.cat([fn(x).double().cpu() for x in _batches(images, size, desc, progress)])


def iwae_log_likelihood(model: VAE, images: torch.Tensor, config: EvalConfig,
                        progress: bool = False) -> torch.Tensor:
    """log p(x) ≈ IWAE_K with q(z|x) as the proposal, per test digit (N,)."""
    model.eval()
    generator = torch.Generator(device=images.device).manual_seed(config.seed)

    def one_batch(x: torch.Tensor) -> torch.Tensor:
        mu, logvar = model.encode(x)
        return iwae_bound(x, mu, logvar, model.log_likelihood_for(x), config.k, generator, config.sample_chunk)

    return per_example(one_batch, images, config.examples_per_batch, f"IWAE-{config.k}", progress)


def elbo_per_example(model: VAE, images: torch.Tensor, seed: int = 0, draws: int = 1) -> torch.Tensor:
    """Per-digit ELBO (N,) with ``draws`` reparameterised draws each."""
    generator = torch.Generator(device=images.device).manual_seed(seed)

    def one_batch(x: torch.Tensor) -> torch.Tensor:
        mu, _ = model.encode(x)
        eps = torch.randn((draws, *mu.shape), generator=generator, device=mu.device)
        return model(x, eps=eps).elbo

    return per_example(one_batch, images, 1000, "ELBO", False)


def laplace_estimates(model: VAE, images: torch.Tensor, config: EvalConfig,
                      progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per digit: the plain Laplace estimate of log p(x), and IS-K with the Laplace proposal N(z*, H⁻¹).

    The mode z* = argmax_z log p(x, z) is found by Newton from μ(x) in float64 (Gauss–Newton search
    directions, docs §7); H is the exact autograd Hessian at z*. The importance sampling runs in float32
    like IWAE. Returns (laplace (N,), is_k (N,), fraction of digits whose Newton solve converged).
    """
    model.eval()
    model64 = VAE(model.config).to(images.device).double()
    model64.load_state_dict(model.state_dict())
    model64.requires_grad_(False)
    generator = torch.Generator(device=images.device).manual_seed(config.seed + 1)
    with hot_loop_settings():
        parts = [_laplace_batch(model, model64, x, config, generator)
                 for x in _batches(images, config.examples_per_batch, f"Laplace + IS-{config.k}", progress)]
    plain, sampled, converged = (torch.cat(column) for column in zip(*parts))
    return plain, sampled, float(converged.double().mean())


def _laplace_batch(model: VAE, model64: VAE, x: torch.Tensor, config: EvalConfig,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of digits: (Laplace estimate, IS-K estimate, converged), each (B,) on the CPU."""
    with torch.no_grad():
        z0 = model64.encode(x.double())[0]
    marginal = laplace_log_marginal(model64.log_joint, x.double(), z0, max_steps=config.newton_steps,
                                    ftol=1e-9, curvature=model64.gauss_newton_precision)
    log_likelihood = model.log_likelihood_for(x)

    def log_weights(_: int, n: int) -> torch.Tensor:
        z, log_r = sample_laplace_proposal(marginal, n, generator)
        z = z.float()
        return log_likelihood(z) + log_standard_normal(z) - log_r.float()

    with torch.no_grad():
        sampled = importance_sampled_log_marginal(log_weights, config.k, config.sample_chunk)
    return marginal.log_marginal.detach().cpu(), sampled.double().cpu(), marginal.converged.cpu()


def evaluate_run(model: VAE, images: torch.Tensor, config: EvalConfig, progress: bool = False) -> dict:
    """All estimators of the test log-likelihood side by side; the dict written to eval.json."""
    start = time.perf_counter()
    elbo = elbo_per_example(model, images, seed=config.seed)
    iwae = iwae_log_likelihood(model, images, config, progress)
    estimates = [("ELBO", elbo, "lower bound"), (f"IWAE-{config.k}, q(z|x)", iwae, "stochastic lower bound")]
    result: dict = {}
    if config.laplace:
        plain, sampled, converged = laplace_estimates(model, images, config, progress)
        estimates += [(f"IS-{config.k}, Laplace proposal", sampled, "stochastic lower bound"),
                      ("Laplace", plain, "approximation, not a bound")]
        result["laplace_converged_fraction"] = converged
    nll, nll_stderr = summarize(-iwae)
    elbo_mean, elbo_stderr = summarize(elbo)
    result.update({"nll": nll, "nll_stderr": nll_stderr, "elbo": elbo_mean, "elbo_stderr": elbo_stderr,
                   "k": config.k, "n_examples": len(images), "seconds": time.perf_counter() - start,
                   "estimates": [dict(zip(("name", "mean", "stderr", "kind"), (name, *summarize(values), kind)))
                                 for name, values, kind in estimates]})
    return result
