"""Evaluation on the test set: the ELBO, the importance-sampled log-likelihood, the Laplace estimates,
and per stochastic layer the active units and the KL per latent dimension.

Which numbers are bounds (docs/derivations.md §5–7):
- ELBO ≤ log p(x) for every x (a bound, exact in expectation over ε only in the limit of many draws);
- IWAE-K with q(z|x) (the joint q(z₁, z₂|x) for two-layer models): E[IWAE_K] ≤ log p(x), tighter as K
  grows (a stochastic lower bound);
- IS-K with the Laplace proposal N(z*, H⁻¹): also a stochastic lower bound in expectation (Jensen), and
  an unbiased estimate of p(x) itself before the log;
- the plain Laplace estimate: neither upper nor lower bound; exact when log p(x, z) is quadratic in z.
Per-example values are averaged over the test digits; the standard error is the standard deviation over
digits divided by √N (it measures which digits were drawn, the dominant uncertainty).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from vaelab import compiling, native
from vaelab.data import test_batches
from vaelab.distributed import SINGLE, World, gather, gather_rows, shard, shard_start
from vaelab.errors import UsageError
from vaelab.laplace import (OUTCOMES, NotNegativeDefinite, laplace_log_marginal,
                            sample_laplace_proposal)
from vaelab.models import HierarchicalVAE, MLPVAE, build_model
from vaelab.models.priors import frozen_components
from vaelab.objectives import (Parts, chunked_log_weights, elbo_objective, importance_sampled_log_marginal, iwae_bound,
                               log_mean_exp, log_standard_normal)
from vaelab.precision import BF16_PRODUCTS, PRECISIONS
from vaelab.resources import gpu_memory
from vaelab.tables import plural

# Burda et al. (2016, §5.2): a latent unit u is active when Cov_x(E_{q(u|x)}[u]) exceeds this.
ACTIVE_UNIT_THRESHOLD = 1e-2


def unit_activity(variance: torch.Tensor, digits: int) -> dict:
    """A layer's ``posterior_mean_variance``, ``active`` (the units' numbers) and ``active_units`` from Cov_x E_q[u]
    (d,) over ``digits`` digits. A variance over digits needs two of them: over one, every unit's would be 0/0, so
    (until 2026-12-06 "0 of 50 units active" on one digit) all three are None, and what shows them says why."""
    if digits < 2:
        return {"posterior_mean_variance": None, "active": None, "active_units": None}
    active = (variance > ACTIVE_UNIT_THRESHOLD).nonzero().flatten().tolist()
    return {"posterior_mean_variance": variance.tolist(), "active": active, "active_units": len(active)}


@contextlib.contextmanager
def hot_loop_settings():
    """CPU settings for the training and evaluation loops (not nested):

    - float32 values below 1.2e-38 are treated as zero (FTZ/DAZ) while the block runs. Adam's moments of
      weights that rarely get a gradient (border pixels) decay geometrically into the denormal range
      (44 778 such entries after 6 epochs, measured), and exp of logits below −87 is denormal too;
      arithmetic on denormals is many times slower on x86. Flushing them changes nothing visible: the
      test ELBO after 6 epochs was identical to three decimals with and without (benchmarks/README.md).
      The flag is per thread: ``torch.set_flush_denormal`` sets it on this one, ``native.denormal_switch`` on
      every thread of torch's OpenMP team, which computes the other shares of the products and kernels (until
      2026-12-02 they computed on denormals: a product of them 200 × slower on 2 threads).
    - ``retain_freed_memory()``, once per process.
    """
    retain_freed_memory()
    enabled = torch.set_flush_denormal(True)
    switch = native.denormal_switch() if enabled else None
    if switch is not None:
        switch(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)
        if switch is not None:
            switch(False)


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


CPU = torch.device("cpu")
CPU_CHUNK = 50
GPU_ROWS = 1 << 17          # 131 072 rows of 784 float32 logits: 411 MB


@dataclass(frozen=True)
class EvalConfig:
    k: int = 5000                  # importance samples per test digit
    examples_per_batch: int = 20   # test digits evaluated together
    # Samples decoded at once; None: by device (``chunk``). On a CPU 50 × 20 digits = 1000 rows of 784 logits
    # (3.1 MB, within the shared L3). Measured on the 2-core CPUs (benchmarks/README.md): 1000-row products run
    # the decoder's matmul at ≈155 GFLOP/s; with the in-place softplus_sum, chunks of 50 took 2–5 % less time
    # than 25, 10 was 30 % slower, and 150 or more lost again (passes over tensors that leave the cache).
    sample_chunk: int | None = None
    seed: int = 0
    laplace: bool = False
    newton_steps: int = 30
    latent_draws: int = 64         # draws per digit for the active units and KL of layers above the first
    # The IWAE estimate's decoder products: fp32, or bf16 (rounded operands and results, float32 sums and
    # everything else; vaelab.precision), native or emulated. Measured on the 100-epoch seed model, all
    # 10 000 test digits, the same draws: bf16 against fp32 in the mean (benchmarks/README.md).
    precision: str = "fp32"
    k_curve: bool = False          # IWAE-K for K = 1, 10, 100, 1000 and k on nested draws (the first K of k)
    compiled: bool = False         # each chunk's IWAE log weights by one graph torch.compile built (fp32)
    gaps: bool = False             # the approximation and amortisation gaps (vaelab.gaps)
    gap_steps: int = 300           # the most optimisation steps per digit of the gaps

    def memory_bytes(self, model_config, device: torch.device = CPU, digits: int | None = None) -> int:
        """Peak working memory of the evaluation of ``digits`` digits (None: as many as a batch takes) on ``device``,
        a generous estimate (float32 unless said otherwise). A batch holds at most ``examples_per_batch`` digits,
        fewer where fewer are evaluated: until 2026-12-07 the estimate counted 20 for any number, and refused
        ``--k 10⁸`` on 2 digits of a 4-latent model at 23.9 GiB, where their batch needs 4.2 GiB."""
        b, d = min(self.examples_per_batch, digits or self.examples_per_batch), model_config.total_latent
        # float32 per draw, the most of two moments of the fast path (``objectives.iwae_bound``): the set-up, ε and ε²
        # (K, D), Σ z² (K, B) and Σ ε² (K, 1); the chunks and log-sum-exp, ε, log p(z)/q(z) and the log weights
        # (K, B) and log-sum-exp's pass over them (measured: IWAE-2·10⁷ of 2 digits, d = 4, peaked at the set-up's
        # 44 bytes a draw)
        per_batch = 4 * self.k * max(2 * d + b + 1, d + 3 * b)
        chunk = self.chunk(device, model_config) * b * row_bytes(model_config)  # a decoded chunk
        laplace = 8 * b * (d * d * 6 + 784 * d * 2) if self.laplace else 0     # float64 Hessians, Jacobians
        return per_batch + chunk + laplace + (64 << 20)

    def chunk(self, device: torch.device, model_config) -> int:
        """Draws decoded at once: ``sample_chunk`` where set; else 50 on a CPU (above), and on a GPU as many as
        give ``GPU_ROWS`` rows (draws × digits) within a quarter of the GPU memory left (``gpu_memory``), at most k: the GPU's
        evaluation is bound by kernel launches, not caches (H200: IWAE-5000 of the 10 000 test digits 14.0 s
        in chunks of 50, benchmarks/README.md). The draws of a chunk are made together, so on the models without
        the fast path the chunk is part of which draws a seed gives: the same device and version, the same numbers."""
        if self.sample_chunk is not None:
            return self.sample_chunk
        if device.type != "cuda":
            return CPU_CHUNK
        free, _ = gpu_memory(device)
        rows = min(GPU_ROWS, free // 4 // row_bytes(model_config))
        return max(1, min(self.k, rows // self.examples_per_batch))


def row_bytes(model_config) -> int:
    """Working memory per decoded row (one draw of one digit): logits and their passes, hidden units, latents, and a
    mixture prior's component densities (float64)."""
    d, widest = model_config.total_latent, model_config.widest()
    mixture = 0 if model_config.prior == "standard" else 8 * 3 * model_config.prior_components
    return 4 * (3 * 784 + 3 * widest + 4 * d) + mixture


# ------------------------------------------------------------------------------------------------
# Loops.


# ``progress`` of the loops below: True a bar (a terminal), False nothing, LINES a line a minute for a log.
LINES = "lines"
LOG_EVERY_S = 60.0           # a part of an evaluation that ends sooner writes nothing to a log
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit}s ({percentage:.0f} %), {elapsed} so far, about {remaining} to go"


class _Lines:
    """A file for tqdm's bar where stderr is a log, not a terminal: each refresh (one a minute, ``LOG_EVERY_S``) a
    line of its own, where tqdm's carriage returns would run them into one. Until 2026-12-05 a log saw nothing of
    an evaluation between its first line and its results: 15 minutes for --laplace on the 10 000 test digits."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        if self.stream is None:              # stderr closed when the command started (`2>&-`)
            return
        for line in text.replace("\r", "\n").split("\n"):
            line = line.strip()
            if line and line != self.last:
                self.last = line
                try:
                    self.stream.write(line + "\n")
                    self.stream.flush()
                except OSError:              # a closed pipe: the evaluation goes on without its lines
                    pass

    def flush(self) -> None:
        pass


def progress_bar(total: int, desc: str, progress: bool | str, unit: str = "digit") -> tqdm:
    """A bar of ``total`` ``unit``s on a terminal (``progress`` True), a line a minute for a log (``LINES``), or
    nothing (False)."""
    if progress == LINES:
        return tqdm(total=total, desc=desc, unit=unit, file=_Lines(sys.stderr), delay=LOG_EVERY_S,
                    mininterval=LOG_EVERY_S, bar_format=LOG_FORMAT)
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not progress, dynamic_ncols=True)


def _batches(images: torch.Tensor, size: int, desc: str, progress: bool | str) -> Iterator[torch.Tensor]:
    bar = progress_bar(len(images), desc, progress)
    for x in test_batches(images, size):
        yield x
        bar.update(len(x))
    bar.close()


@torch.no_grad()
def per_example(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, size: int,
                desc: str, progress: bool | str) -> torch.Tensor:
    """Apply ``fn`` (a batch → per-example values) over all images; returns (N,) on the CPU."""
    with hot_loop_settings():
        return torch.cat([fn(x).double().cpu() for x in _batches(images, size, desc, progress)])


def draws(model, k: int, batch: int, generator: torch.Generator, device) -> torch.Tensor:
    """ε (K, B, D) for every stochastic layer of ``model``."""
    return torch.randn((k, batch, model.config.total_latent), generator=generator, device=device)


# The per-epoch latent statistics draw a second time on the batches that begin within the first this many test digits.
SECOND_DRAW_DIGITS = 2000


def draws_move_means(model_config) -> bool:
    """Whether a layer's posterior mean can depend on the draws: every model with two or more stochastic layers
    (a layer above the first under bottom-up inference, every layer under the top one top-down, q(z₁|x, z₂)
    in Tomczak's) or a flow (E_q[z] of the draws themselves). Otherwise every E_q[u|x] is μ(x)."""
    return len(model_config.latent) > 1 or model_config.flow_steps > 0


@torch.no_grad()
def elbo_summary(model, images: torch.Tensor, batch_size: int = 1000, seed: int = 0,
                 units: list | None = None) -> dict[str, float]:
    """Mean ELBO, reconstruction and KL in nats per example, one draw per digit from a fixed seed
    (the per-epoch test and validation columns of metrics.csv).

    With ``units`` (a list), the same pass also appends per stochastic layer its mean KL per unit (None where the
    layer does not factorise), an estimate of the variance over digits of each unit's posterior mean Cov_x E_q[u|x],
    and the count of active units (> 0.01): the latent layers over training (``latent.csv``); the ELBO's draws and
    numbers are the same with and without ``units``.

    Where E_q[u|x] is μ(x), one pass gives it exactly. Where it depends on the draws above (``draws_move_means``),
    one draw's m̂(x) has Var_x m̂ = Var_x E_q[u|x] + E_x Var(m̂|x): the draw's own noise, which counted 16 of a
    ladder's 16 bottom units active where 64 draws per digit count 6. So a second, independent draw (the stream
    ``seed + 1``) is made on the batches that begin within the first ``SECOND_DRAW_DIGITS`` digits, and such a
    layer's variance is the covariance over those digits of the two draws' means, Σᵢ (m̂ᵢ − m̄)(m̂'ᵢ − m̄')/(n − 1):
    unbiased, since the draws are independent given x (Cov(m̂, m̂') = Var_x E_q[u|x]). A layer whose two draws
    give the same means bit for bit keeps the exact variance over all digits. Each layer records
    ``variance_digits`` (the digits its variance is over) and ``variance_draws`` (1 or 2)."""
    model.eval()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    second = (torch.Generator(device=images.device).manual_seed(seed + 1)
              if units is not None and draws_move_means(model.config) else None)
    sums = torch.zeros(3, dtype=torch.float64, device=images.device)
    kls, means, again = [], [], []
    start = 0
    for x in test_batches(images, batch_size):
        parts = model(x, draws(model, 1, len(x), generator, x.device))
        terms = elbo_objective(parts)
        sums += torch.stack([terms.elbo.sum(), terms.reconstruction.sum(), terms.kl.sum()]).double()
        if units is not None:
            kls.append([None if (kl := layer.kl_per_dimension()) is None else kl.mean(0).double().sum(0)
                        for layer in parts.layers])
            means.append([layer.posterior_mean().double() for layer in parts.layers])
            if second is not None and start < SECOND_DRAW_DIGITS:     # the same batch, so the same rows' products
                again.append([layer.posterior_mean().double()
                              for layer in model(x, draws(model, 1, len(x), second, x.device)).layers])
        start += len(x)
    if units is not None:
        for index in range(len(model.config.latent)):
            mean = torch.cat([batch[index] for batch in means])                              # (N, d)
            kl = None if kls[0][index] is None else (sum(batch[index] for batch in kls) / len(images)).tolist()
            other = torch.cat([batch[index] for batch in again]) if again else None          # (n, d), n ≤ N
            if other is None or torch.equal(mean[:len(other)], other):
                variance = mean.var(0, unbiased=True) if len(mean) > 1 else None
                digits, used = len(mean), 1
            else:
                first = mean[:len(other)]
                variance = (((first - first.mean(0)) * (other - other.mean(0))).sum(0) / max(len(other) - 1, 1))
                digits, used = len(other), 2
            activity = unit_activity(variance, digits)
            units.append({"layer": index + 1, "kl": kl, "posterior_mean_variance": activity["posterior_mean_variance"],
                          "active_units": activity["active_units"], "variance_digits": digits, "variance_draws": used})
    elbo, reconstruction, kl = (sums / len(images)).tolist()
    return {"elbo": elbo, "reconstruction": reconstruction, "kl": kl}


def reconstructions(model, x: torch.Tensor) -> torch.Tensor:
    """Decoder means sigmoid(logits) of p(x|z) at z = ``posterior_start(x)``, every layer at its mean under q (through
    its flow where it has one), for digits x (B, 784): (B, 784), what every reconstruction picture shows."""
    return torch.sigmoid(model.decode_latents(model.posterior_start(x)))


def summarize(values: torch.Tensor) -> tuple[float, float | None]:
    """Mean and its standard error (std over examples / √N) of per-example values; None for one example."""
    values = values.double()
    n = values.numel()
    stderr = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else None
    return float(values.mean()), stderr


# ------------------------------------------------------------------------------------------------
# Importance sampling with q.


def _iwae_one_layer(model: MLPVAE, x: torch.Tensor, k: int, generator: torch.Generator, chunk: int,
                    precision: str = "fp32", nested: tuple[int, ...] = ()) -> torch.Tensor:
    """The fast path of a one-stochastic-layer model (docs §6): log p(z) − log q(z|x) for all K draws from ε
    alone, the decoder's data term as a product over hidden units, softplus in base 2; with ``precision``
    bf16 the decoder's products in bfloat16 (``MLPVAE.bf16_log_likelihood_for``)."""
    mu, logvar = model.encode(x)
    log_likelihood = model.log_likelihood_for(x) if precision == "fp32" else \
        model.bf16_log_likelihood_for(x, BF16_PRODUCTS[precision])
    return iwae_bound(x, mu, logvar, log_likelihood, k, generator, chunk, nested)


def _iwae_parts(model, x: torch.Tensor, k: int, generator: torch.Generator, chunk: int,
                precision: str = "fp32", nested: tuple[int, ...] = (),
                parts: Callable[[torch.Tensor], Parts] | None = None, compiled: bool = False) -> torch.Tensor:
    """Any model: the log weights log p(x, z) − log q(z|x) of its Parts (``parts``: ε ↦ Parts for this x, by
    default ``model(x, ε)``), ``chunk`` draws at a time, the batch's digits sharing ε (common random numbers, as in
    the fast path). ``compiled``: ε ↦ log weights as one graph ``torch.compile`` built (``vaelab.compiling``;
    the same graph serves every batch of digits, its tensors are inputs), the same values to float rounding."""
    parts = parts or (lambda eps: model(x, eps))

    def weights(eps: torch.Tensor) -> torch.Tensor:
        return parts(eps).log_weights()                                        # (n, B)

    if compiled:
        # what the model caches while its weights stand still (the VampPrior's components, ``frozen_components``) is
        # filled here, eagerly, by a pass of one zero draw (no random numbers used), so that the graph only reads it
        parts(torch.zeros(1, len(x), model.config.total_latent, dtype=x.dtype, device=x.device))
        weights = compiling.compile(weights)

    def log_weights(_: int, n: int) -> torch.Tensor:
        eps = draws(model, n, 1, generator, x.device).expand(n, len(x), -1)     # (n, B, D)
        with compiling.limits() if compiled else contextlib.nullcontext():
            return weights(eps)

    return importance_sampled_log_marginal(log_weights, k, chunk, nested)


def _iwae_conditioned(model, x: torch.Tensor, k: int, generator: torch.Generator, chunk: int,
                      precision: str = "fp32", nested: tuple[int, ...] = (), compiled: bool = False) -> torch.Tensor:
    """``_iwae_parts`` (the same draws, the same Parts) for a model that computes what depends on x alone once
    per batch (``model.conditioned``: the encoder, a flow's parameters, the ladder's bottom-up pass) and the data
    term by its fast form where it has one."""
    return _iwae_parts(model, x, k, generator, chunk, precision, nested,
                       parts=model.conditioned(x, fast_data_term=True), compiled=compiled)


# The estimator of each model class, by lookup: the hand-derived forms for the models they apply to
# (``model.fast``: the standard prior, no flow, an elementwise activation), else that class's general one (the
# model's own Parts). Each equals ``_iwae_parts`` on the same draws (tests/test_models.py). Only the fast form
# has bf16 products.
IWAE_ESTIMATORS: dict[type, tuple[Callable | None, Callable]] = {
    MLPVAE: (_iwae_one_layer, _iwae_conditioned),
    HierarchicalVAE: (None, _iwae_conditioned),
}


def hand_derived(model) -> bool:
    """Whether the model's (eager) IWAE estimator is a hand-derived form: one exists for its class and covers it."""
    fast, _ = IWAE_ESTIMATORS.get(type(model), (None, _iwae_parts))
    return fast is not None and getattr(model, "fast", False)


def iwae_estimator(model, compiled: bool = False) -> Callable:
    """The model's IWAE estimator; ``compiled``: its general one with the log weights compiled (also where the
    hand-derived form applies: that form is not compiled)."""
    fast, general = IWAE_ESTIMATORS.get(type(model), (None, _iwae_parts))
    if compiled:
        return functools.partial(general, compiled=True)
    return fast if hand_derived(model) else general


def compiled_as_trained(model, engine: str, precision: str, device: torch.device | str = "cpu") -> bool:
    """``evaluate``'s default for ``--compiled``: a run trained with ``--engine compiled`` (the issue-21 presets'
    engine) has its IWAE log weights compiled too, in float32, on a CPU, where its estimator would otherwise be the
    general one (a hand-derived form is never compiled) and no part of the model evaluates natively already (the
    planar flow, ``native_evaluation``). Measured on the trained runs (benchmarks/README.md, twenty-fourth session):
    IWAE-5000 compiled in 0.69–0.83 × the eager time for `vampprior-1` and `vampprior-2`, 0.78–0.86 × for
    `ladder-5`, 0.94–1.22 × for `planar-80`; compiling takes seconds to a minute once per process. On a GPU the
    whole eager evaluation is shorter than compiling (an H200, benchmarks/README.md, forty-eighth session: IWAE-5000
    of the 10 000 test digits compiled 25.2 s for `vampprior-2` and 32.5 s for `ladder-5`, where eager it had taken
    4.1–5.6 s for `vampprior-1` and `ladder-5`), so there it stays eager unless asked."""
    return engine == "compiled" and precision == "fp32" and torch.device(device).type == "cpu" \
        and not hand_derived(model) and not any(getattr(part, "native_evaluation", False) for part in model.modules())


def check_precision(model, precision: str, compiled: bool = False) -> None:
    """Refuse an evaluation precision this model's IWAE estimator does not have, or with ``compiled`` any but fp32
    (``ValueError``)."""
    if compiled and precision != "fp32":
        raise UsageError(f"--compiled runs in float32, not --precision {precision}; drop one of the two")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown evaluation precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and not hand_derived(model):
        from vaelab.models.base import ACTIVATIONS

        c = model.config
        beyond = [what for what, outside in ((f"the {c.prior} prior", c.prior != "standard"),
                                             (f"{plural(c.flow_steps, 'step')} of {c.flow} flow", c.flow_steps > 0),
                                             (f"{c.activation} layers", ACTIVATIONS[c.activation].gated)) if outside]
        has = f"{c.name}" + (f" with {' and '.join(beyond)}" if beyond and c.name == "mlp" else "")
        raise UsageError(f"--precision {precision} covers the one-stochastic-layer mlp models with the standard prior, "
                         f"no flow and an elementwise activation; this run's model is {has}: use --precision fp32")


def curve_ks(k: int) -> tuple[int, ...]:
    """The K of the convergence curve: 1, 10, 100, 1000 and k itself (those below k)."""
    return tuple(sorted({n for n in (1, 10, 100, 1000) if n < k} | {k}))


def iwae_log_likelihood(model, images: torch.Tensor, config: EvalConfig, progress: bool | str = False,
                        nested: tuple[int, ...] = ()) -> torch.Tensor:
    """log p(x) ≈ IWAE_K with q(z|x) as the proposal, per test digit (N,); with ``nested`` (K values ≤ k), the
    estimates for every K from the first K of the same k draws, (N, len(nested))."""
    check_precision(model, config.precision, config.compiled)
    model.eval()
    generator = torch.Generator(device=images.device).manual_seed(config.seed)
    estimator = iwae_estimator(model, config.compiled)

    chunk = config.chunk(images.device, model.config)

    def batch(x: torch.Tensor) -> torch.Tensor:
        values = estimator(model, x, config.k, generator, chunk, config.precision, nested)
        return values.T if nested else values                                   # (B, len(nested)) or (B,)

    with frozen_components(model):
        return per_example(batch, images, config.examples_per_batch, f"IWAE-{config.k}", progress)


def elbo_per_example(model, images: torch.Tensor, seed: int = 0, samples: int = 1) -> torch.Tensor:
    """Per-digit ELBO (N,) with ``samples`` reparameterised draws each."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    return per_example(lambda x: elbo_objective(model(x, draws(model, samples, len(x), generator, x.device))).elbo,
                       images, 1000, "ELBO", False)


# ------------------------------------------------------------------------------------------------
# The latent layers.


@torch.no_grad()
def latent_statistics(model, images: torch.Tensor, samples: int = 64, seed: int = 0) -> list[dict]:
    """Per stochastic layer (bottom first): the variance over digits of each unit's posterior mean
    Cov_x(E_q[u|x]), the active units (Burda et al. 2016: that variance > 1e-2), the mean KL per dimension
    where the layer factorises (closed form where the layer's prior is N(0, I), else the draws' log q − log p;
    ``None`` for a flow or a mixture prior, which have no per-dimension KL) and the layer's KL.

    E_q[z₁|x] = μ₁(x) exactly without a flow; for a layer above, E_q[z₂|x] = E_{z₁~q(z₁|x)}[μ₂(z₁)], and with a
    flow E_q[z] itself, are averaged over draws (1 draw where nothing depends on the draw). The variance over
    digits of a mean over S draws would be Var_x E_q[u|x] + E_x Var(u-draw | x)/S, the draws' noise counted as
    activity; so the ``samples`` draws are split into two halves, and the variance is the covariance over digits of
    the halves' means, Σᵢ (m̂ᵢ − m̄)(m̂'ᵢ − m̄')/(N − 1), unbiased since the halves are independent given x (the
    same formula as the variance where the two means are equal, as for μ₁(x)). ``elbo_summary`` does the same with
    two single draws.
    """
    model.eval()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    config = model.config
    varies = len(config.latent) > 1 or config.flow_steps > 0 or config.prior != "standard"
    samples = samples if varies else 1
    means, kls, totals = [], [], []
    with hot_loop_settings():
        for x in test_batches(images, 100):
            parts = model(x, draws(model, samples, len(x), generator, x.device))
            half = max(samples // 2, 1)          # with one draw both "halves" are that draw: the exact μ(x)
            means.append([(layer.posterior_mean(slice(0, half)).double().cpu(),
                           layer.posterior_mean(slice(samples - half, samples)).double().cpu())
                          for layer in parts.layers])
            kls.append([None if (kl := layer.kl_per_dimension()) is None else kl.mean(0).double().cpu()
                        for layer in parts.layers])
            totals.append([layer.kl().double().cpu() for layer in parts.layers])
    layers = []
    for index in range(len(config.latent)):
        mean = torch.cat([batch[index][0] for batch in means])                # (N, d) the first half's means
        other = torch.cat([batch[index][1] for batch in means])               # (N, d) the second half's
        variance = ((mean - mean.mean(0)) * (other - other.mean(0))).sum(0) / max(len(mean) - 1, 1)
        per_dimension = None if kls[0][index] is None else torch.cat([batch[index] for batch in kls]).mean(0)  # (d,)
        kl = float(torch.cat([batch[index] for batch in totals]).mean())
        activity = unit_activity(variance, len(mean))
        layers.append({"layer": index + 1, "latent": mean.shape[1], "active_units": activity["active_units"],
                       "active": activity["active"], "posterior_mean_variance": activity["posterior_mean_variance"],
                       "kl_per_dimension": None if per_dimension is None else per_dimension.tolist(), "kl": kl})
    return layers


# ------------------------------------------------------------------------------------------------
# Laplace.


def _saddle_message(digit: int, eigenvalues, converged: bool, steps: int) -> str:
    """Why Laplace's method was refused; ``digit`` numbered from 0 among the digits evaluated (test or validation);
    ``converged``: whether the mode search had stopped at a maximum (else it ran out of its ``steps``, and the point
    is no mode: until 2026-12-07 that too was called a saddle or a kink)."""
    values = f"eigenvalues of −∇²: {[round(float(v), 4) for v in eigenvalues]}…"
    if not converged:
        return (f"--laplace: at digit {digit} (from 0, of those evaluated) the mode search of log p(x, z) did not "
                f"converge in its {steps} Newton steps, and where it stopped the Hessian is not negative definite "
                f"({values}): no mode was found there, so Laplace's method cannot be applied to that digit")
    return (f"--laplace: at digit {digit} (from 0, of those evaluated) the Hessian of log p(x, z) where the mode search "
            f"stopped is not negative definite ({values}), a saddle or a kink of this model, so Laplace's method does "
            f"not apply to that digit")


def laplace_estimates(model, images: torch.Tensor, config: EvalConfig, progress: bool | str = False,
                      first_digit: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per digit: the plain Laplace estimate of log p(x), IS-K with the Laplace proposal N(z*, H⁻¹), and
    why the mode search stopped (laplace.OUTCOMES). A digit whose Hessian there is not negative definite raises
    NotNegativeDefinite with its number among all digits (``first_digit``: this shard's first, under torchrun).

    The joint mode z* = argmax_z log p(x, z) over all latents is found by Newton from the encoder's means
    in float64 (search directions from the model's ``laplace_curvature``, e.g. Gauss–Newton, docs §7); H
    is the exact autograd Hessian at z*. The importance sampling runs in float32 like IWAE.
    """
    model.eval()
    model64 = build_model(model.config).to(images.device).double().eval()     # batch norm: its running averages
    model64.load_state_dict(model.state_dict())
    model64.requires_grad_(False)
    generator = torch.Generator(device=images.device).manual_seed(config.seed + 1)
    parts, done = [], 0
    with hot_loop_settings(), frozen_components(model64):
        for x in _batches(images, config.examples_per_batch, f"Laplace + IS-{config.k}", progress):
            try:
                parts.append(_laplace_batch(model, model64, x, config, generator))
            except NotNegativeDefinite as exc:
                digit = first_digit + done + exc.example
                raise NotNegativeDefinite(_saddle_message(digit, exc.eigenvalues, exc.converged, config.newton_steps),
                                          digit, exc.eigenvalues, exc.converged) from None
            done += len(x)
    plain, sampled, outcome, elbo = (torch.cat(column) for column in zip(*parts))
    return plain, sampled, outcome, elbo


def _laplace_batch(model, model64, x: torch.Tensor, config: EvalConfig,
                   generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One batch of digits: (Laplace estimate, IS-K estimate, outcome, ELBO of the Laplace Gaussian), each (B,)
    on the CPU. The ELBO of N(z*, H⁻¹) is the mean of the same K log weights log p(x, z) − log N(z; z*, H⁻¹)
    whose log-mean-exp is the IS-K estimate (E_r[log w] is the ELBO of r, by its definition)."""
    with torch.no_grad():
        z0 = model64.posterior_start(x.double())
    marginal = laplace_log_marginal(model64.log_joint, x.double(), z0, max_steps=config.newton_steps,
                                    ftol=1e-9, curvature=model64.laplace_curvature())
    if isinstance(model, MLPVAE) and model.fast:
        log_likelihood = model.log_likelihood_for(x)
        log_joint = lambda z: log_likelihood(z) + log_standard_normal(z)  # noqa: E731
    else:
        log_joint = lambda z: model.log_joint(z, x)  # noqa: E731

    def log_weights(_: int, n: int) -> torch.Tensor:
        z, log_r = sample_laplace_proposal(marginal, n, generator)
        return log_joint(z.float()) - log_r.float()

    with torch.no_grad():
        chunk = config.chunk(x.device, model.config)
        weights = chunked_log_weights(log_weights, config.k, chunk)                               # (K, B)
    return (marginal.log_marginal.detach().cpu(), log_mean_exp(weights, 0).double().cpu(), marginal.outcome.cpu(),
            weights.double().mean(0).cpu())


# ------------------------------------------------------------------------------------------------
# Where the nats go (vaelab.gaps).


def gap_decomposition(model, images: torch.Tensor, iwae: torch.Tensor, config: EvalConfig,
                      laplace_elbo: torch.Tensor | None, progress: bool | str) -> tuple[dict, dict]:
    """log p̂(x) (IWAE-K, given), ELBO[q*], ELBO[q] and the two gaps per digit and as means ± standard errors."""
    from vaelab.gaps import family_of, gap_batch

    generator = torch.Generator(device=images.device).manual_seed(config.seed + 2)
    model.eval()
    results = []
    with hot_loop_settings():
        for x in _batches(images, 100, "gaps", progress):
            results.append(gap_batch(model, x.float(), config.gap_steps, generator))
    cat = lambda name: torch.cat([getattr(r, name).double().cpu() for r in results])  # noqa: E731
    per_digit = {"elbo_optimised": cat("elbo_optimised"), "elbo_encoder": cat("elbo_encoder"),
                 "iwae_optimised_q": cat("log_px_optimised"), "gap_steps": cat("steps"),
                 "gap_converged": cat("converged")}
    if laplace_elbo is not None:
        per_digit["elbo_laplace"] = laplace_elbo.double().cpu()
    per_digit["iwae_for_gaps"] = iwae.double().cpu()
    mc = {"optimised": float(cat("elbo_optimised_stderr").square().mean().sqrt() / math.sqrt(len(images))),
          "encoder": float(cat("elbo_encoder_stderr").square().mean().sqrt() / math.sqrt(len(images)))}
    return _gaps_summary(per_digit, family_of(model), config, len(images), mc), \
        {k: v for k, v in per_digit.items() if k != "iwae_for_gaps"}


def _gaps_summary(per_digit: dict, family: str, config: EvalConfig, n: int, mc: dict | None = None) -> dict:
    from vaelab.gaps import CHECK, CHECK_DRAWS, FINAL_DRAWS, HALVINGS, LEARNING_RATE, STEP_DRAWS, TOL, gap_warning

    log_px = per_digit["iwae"] if "iwae" in per_digit else per_digit["iwae_for_gaps"]
    optimised, encoder = per_digit["elbo_optimised"], per_digit["elbo_encoder"]
    values = {"log_px": log_px, "elbo_optimised": optimised, "elbo_encoder": encoder,
              "approximation_gap": log_px - optimised, "amortisation_gap": optimised - encoder}
    if "elbo_laplace" in per_digit:
        values["elbo_laplace"] = per_digit["elbo_laplace"]
    if "iwae_optimised_q" in per_digit:
        values["log_px_optimised"] = per_digit["iwae_optimised_q"]
    out = {name: dict(zip(("mean", "stderr"), summarize(v))) for name, v in values.items()}
    out.update(family=family, log_px_estimator=f"IWAE-{config.k}", digits=n,
               log_px_optimised_estimator=f"IWAE-{FINAL_DRAWS} with q* as the proposal",
               converged_fraction=float(per_digit["gap_converged"].double().mean()),
               mean_steps=float(per_digit["gap_steps"].double().mean()), max_steps=config.gap_steps,
               rule=f"Adam on q*'s per-digit parameters (its family above) from rate {LEARNING_RATE}, {STEP_DRAWS} fresh draws per step; every {CHECK} "
                    f"steps the rate halves where the ELBO on {CHECK_DRAWS} fixed draws rose less than {TOL} nats, and "
                    f"after {HALVINGS} halvings the digit has converged; final ELBOs on {FINAL_DRAWS} draws per digit",
               monte_carlo_stderr_of_means=mc)
    warning = gap_warning(out)
    if warning:
        out["warning"] = warning
    return out


def evaluate_run(model, images: torch.Tensor, config: EvalConfig, progress: bool | str = False,
                 world: World = SINGLE) -> tuple[dict, dict]:
    """All estimators of the test log-likelihood side by side, and the latent layers' statistics.

    Returns (summary, per_digit): the summary is what goes into the evaluation record; per_digit maps
    each estimator's short name (elbo, iwae, laplace, is_laplace) to its (N,) values. Under torchrun each
    rank estimates a contiguous shard of the digits with its own draws (seed + rank: reproducible for a
    fixed number of processes) and the per-digit values are gathered in digit order on every rank.
    """
    with frozen_components(model):
        return _evaluate_run(model, images, config, progress, world)


def _evaluate_run(model, images: torch.Tensor, config: EvalConfig, progress: bool | str,
                  world: World) -> tuple[dict, dict]:
    start = time.perf_counter()
    mine = shard(images, world)
    config = dataclasses.replace(config, seed=config.seed + 1_000_003 * world.rank)
    elbo = gather_rows(elbo_per_example(model, mine, seed=config.seed), world)
    summary: dict = {}
    per_digit: dict = {"elbo": elbo}
    if config.k_curve:
        ks = curve_ks(config.k)
        curve = gather_rows(iwae_log_likelihood(model, mine, config, progress if world.main else False, nested=ks), world)
        iwae = curve[:, -1]
        summary["k_curve"] = [dict(zip(("k", "mean", "stderr"), (k, *summarize(curve[:, i])))) for i, k in enumerate(ks)]
        per_digit.update({f"iwae_k{k}": curve[:, i] for i, k in enumerate(ks[:-1])})
    else:
        iwae = gather_rows(iwae_log_likelihood(model, mine, config, progress if world.main else False), world)
    decoder = "" if config.precision == "fp32" else f", {config.precision} decoder products"
    # both estimates are of a bound: E over the draws of the one-draw ELBO is the ELBO ≤ log p(x), as IWAE-K's is the
    # IWAE bound; one draw's value is not itself a bound (until 2026-12-05 the row said "lower bound")
    estimates = [("ELBO, one draw per digit", elbo, "stochastic lower bound"),
                 (f"IWAE-{config.k}, q(z|x){decoder}", iwae, "stochastic lower bound")]
    per_digit["iwae"] = iwae
    laplace_elbo = None
    if config.laplace:
        try:
            found, saddle = laplace_estimates(model, mine, config, progress if world.main else False,
                                              shard_start(images, world)), None
        except NotNegativeDefinite as exc:
            found, saddle = None, exc
        # one digit's saddle, on any rank, refuses the method for all digits; every rank learns the first such digit
        # (its number and eigenvalues), and the estimates above are kept, the record saying why
        # digit, whether its search converged (1 or 0), 4 eigenvalues
        mark = torch.full((6,), math.nan, dtype=torch.float64, device=images.device)
        if saddle is not None:
            mark[0], mark[1], values = saddle.example, float(saddle.converged), list(saddle.eigenvalues)[:4]
            mark[2:2 + len(values)] = torch.tensor(values, dtype=torch.float64)
        marks = [m.cpu() for m in gather(mark, world) if not m[0].isnan()]
        if marks:
            worst = min(marks, key=lambda m: float(m[0]))
            summary["laplace_refused"] = _saddle_message(int(worst[0]), [v for v in worst[2:].tolist() if v == v],
                                                         bool(worst[1]), config.newton_steps)
            config = dataclasses.replace(config, laplace=False)
    if config.laplace:
        plain, sampled, outcome, laplace_elbo = (gather_rows(values, world) for values in found)
        estimates += [(f"IS-{config.k}, Laplace proposal", sampled, "stochastic lower bound"),
                      ("Laplace", plain, "approximation, not a bound")]
        per_digit.update(is_laplace=sampled, laplace=plain)
        counts = {name: int((outcome == code).sum()) for code, name in OUTCOMES.items()}
        summary["laplace_modes"] = {**counts, "newton_steps": config.newton_steps}
    if config.gaps:
        gaps, gap_digits = gap_decomposition(model, mine, iwae if not world.distributed else shard(iwae, world),
                                             config, laplace_elbo, progress if world.main else False)
        per_digit.update({name: gather_rows(values, world) for name, values in gap_digits.items()})
        summary["gaps"] = gaps if not world.distributed else _gaps_summary(
            per_digit, gaps["family"], config, len(images))
    nll, nll_stderr = summarize(-iwae)
    elbo_mean, elbo_stderr = summarize(elbo)
    summary.update({
        "nll": nll, "nll_stderr": nll_stderr, "elbo": elbo_mean, "elbo_stderr": elbo_stderr,
        "k": config.k, "precision": config.precision, "compiled": config.compiled, "n_examples": len(images),
        "seed": config.seed - 1_000_003 * world.rank,
        "processes": world.size,
        "estimates": [dict(zip(("name", "mean", "stderr", "kind"), (name, *summarize(values), kind)))
                      for name, values, kind in estimates],
        "layers": latent_statistics(model, images, config.latent_draws, config.seed) if world.main else [],
    })
    summary["seconds"] = time.perf_counter() - start
    return summary, per_digit
