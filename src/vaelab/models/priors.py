"""Priors p(z) of the top stochastic layer, by name (``PRIORS``): parts a model is composed from, so a new prior
touches no model.

- ``standard``: N(0, I). The layer keeps its closed-form KL (``StochasticLayer``: ``log_p`` is None).
- ``mog``: a mixture of K learnable diagonal Gaussians with equal weights,
  p(z) = (1/K) Σₖ N(z; mₖ, diag sₖ²).
- ``vampprior``: the variational mixture of posteriors (Tomczak & Welling 2018, eq. 9),
  p(z) = (1/K) Σₖ q(z | uₖ), with K learnable pseudo-inputs uₖ in pixel space passed through the model's own
  encoder of the top layer, all K at once (one batched pass per step, not one per example). The pseudo-inputs
  are uₖ = sigmoid(wₖ), so they stay in (0, 1) like the pixel probabilities they stand for, with wₖ drawn from
  N(−0.05, 0.01²) (both as in the authors' released code, jmtomczak/vae_vampprior, models/Model.py).

Neither mixture has a closed-form KL against q; the ELBO then uses log p(z) − log q(z|x) on the drawn z, and
IWAE sums the components by log-sum-exp inside every weight. Mixture log densities are checked against a
direct float64 sum over components in tests/test_frontier.py.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Callable

import torch
from torch import nn

from vaelab.objectives import LOG_2PI, log_standard_normal

# pixel probabilities (…, 784) → (μ, log σ²) of q(z_top | x) (…, d): the model's top-layer encoder
Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

PSEUDO_INPUT_INIT = (-0.05, 0.01)     # mean and standard deviation of wₖ, uₖ = sigmoid(wₖ)


def mixture_log_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log (1/K) Σₖ N(z; μₖ, diag σₖ²) for z (…, d) and components μ, log σ² (K, d): (…).

    Each component's quadratic form is expanded so that all K of them are three matrix products instead of a
    (…, K, d) tensor: Σᵢ (zᵢ − μₖᵢ)²/σₖᵢ² = z²·(1/σₖ²) − 2 z·(μₖ/σₖ²) + Σᵢ μₖᵢ²/σₖᵢ². The expansion cancels
    where z is near a narrow component, so without autograd (evaluation) it runs in float64; in training the
    float32 rounding (≈1e-4 nats) is far below the Monte Carlo noise of the gradient.
    """
    batch, d = z.shape[:-1], z.shape[-1]
    dtype = z.dtype if torch.is_grad_enabled() and (z.requires_grad or mu.requires_grad) else torch.float64
    flat, mu, logvar = z.reshape(-1, d).to(dtype), mu.to(dtype), logvar.to(dtype)
    precision = torch.exp(-logvar)                                                  # (K, d) 1/σ²
    with torch.autocast(z.device.type, enabled=False):                             # never in bf16: it cancels
        quadratic = (flat.square() @ precision.T - 2.0 * (flat @ (mu * precision).T)
                     + (mu.square() * precision).sum(-1))                           # (N, K)
    log_components = -0.5 * (d * LOG_2PI + logvar.sum(-1) + quadratic)              # (N, K)
    value = torch.logsumexp(log_components, -1) - math.log(mu.shape[0])             # (N,)
    return value.to(z.dtype).reshape(batch)


class StandardPrior(nn.Module):
    """p(z) = N(0, I)."""

    def __init__(self, latent: int, components: int = 1):
        super().__init__()
        self.latent = latent

    def log_density(self, z: torch.Tensor, encoder: Encoder) -> torch.Tensor:
        return log_standard_normal(z)

    def layer_log_p(self, z: torch.Tensor, encoder: Encoder) -> None:
        """None: the layer scores z under N(0, I) itself (closed-form KL)."""
        return None

    @torch.no_grad()
    def sample(self, n: int, generator, encoder: Encoder, like: torch.Tensor) -> torch.Tensor:
        return torch.randn((n, self.latent), generator=generator, device=like.device, dtype=like.dtype)


class MixturePrior(StandardPrior):
    """p(z) = (1/K) Σₖ N(z; mₖ, diag sₖ²), every mₖ and log sₖ² learnt; mₖ ~ N(0, I) and sₖ = 1 at the start,
    so the mixture begins as a spread of unit Gaussians around the standard prior."""

    cache: dict | None = None         # set by ``frozen_components``: the components, computed once

    def __init__(self, latent: int, components: int):
        super().__init__(latent)
        self.means = nn.Parameter(torch.randn(components, latent))
        self.logvars = nn.Parameter(torch.zeros(components, latent))

    def components(self, encoder: Encoder) -> tuple[torch.Tensor, torch.Tensor]:
        return self.means, self.logvars

    def cached_components(self, encoder: Encoder) -> tuple[torch.Tensor, torch.Tensor]:
        """The components, computed once while ``frozen_components`` holds (an evaluation) where nothing asks for
        their gradient: autograd off, or the weights frozen (``requires_grad_(False)``: the float64 copy whose
        joint mode Laplace's method searches with torch.func, where autograd is on for z alone, and the model whose
        gaps ``vaelab.gaps`` optimises per digit; until 2026-12-07 both ran the K pseudo-inputs through the encoder at
        every value, gradient and Hessian, or step)."""
        if self.cache is None or (torch.is_grad_enabled() and next(self.parameters()).requires_grad):
            return self.components(encoder)
        # the model of a bound method (inspect.ismethod: torch.compile's tracer gives the method itself for hasattr
        # and getattr of __self__, and the compiled IWAE then missed the cache filled outside it)
        key = (encoder.__self__ if inspect.ismethod(encoder) else encoder, next(self.parameters()).dtype)
        if key not in self.cache:
            with torch.no_grad():
                self.cache[key] = self.components(encoder)
        return self.cache[key]

    def log_density(self, z: torch.Tensor, encoder: Encoder) -> torch.Tensor:
        return mixture_log_density(z, *self.cached_components(encoder))

    def layer_log_p(self, z: torch.Tensor, encoder: Encoder) -> torch.Tensor:
        return self.log_density(z, encoder)

    def picked_components(self, pick: torch.Tensor, encoder: Encoder) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of the components ``pick`` (n,) names, (n, d) each."""
        mu, logvar = self.cached_components(encoder)
        return mu[pick], logvar[pick]

    @torch.no_grad()
    def sample(self, n: int, generator, encoder: Encoder, like: torch.Tensor) -> torch.Tensor:
        """n draws of the equal-weight mixture: a component uniformly, then its Gaussian: (n, d)."""
        weights = next(self.parameters())                  # (K, …): the means, or the pseudo-inputs' logits
        pick = torch.randint(0, weights.shape[0], (n,), generator=generator, device=weights.device)
        mu, logvar = self.picked_components(pick, encoder)                          # (n, d) each
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps


@contextlib.contextmanager
def frozen_components(model):
    """While the weights do not change (an evaluation), compute the mixture's components once instead of at
    every call: the VampPrior's K pseudo-inputs through the encoder are otherwise half again the cost of an
    IWAE chunk's decoder (500 rows of the encoder for 1000 rows of the decoder, the paper's one-layer model)."""
    prior = getattr(model, "prior", None)
    if not isinstance(prior, MixturePrior) or prior.cache is not None:      # nothing to cache, or cached already
        yield
        return
    prior.cache = {}
    try:
        yield
    finally:
        prior.cache = None


class VampPrior(MixturePrior):
    """p(z) = (1/K) Σₖ q(z | uₖ), uₖ = sigmoid(wₖ) ∈ (0, 1)⁷⁸⁴: the components are the encoder's Gaussians at
    the K pseudo-inputs, computed in one batched pass each time the prior is evaluated (K × 784 through the
    encoder: 500 rows, a few percent of a training step of batch 100)."""

    def __init__(self, latent: int, components: int, data_dim: int = 784):
        StandardPrior.__init__(self, latent)
        mean, std = PSEUDO_INPUT_INIT
        self.pseudo_logits = nn.Parameter(torch.randn(components, data_dim) * std + mean)

    def pseudo_inputs(self) -> torch.Tensor:
        """The K pseudo-inputs uₖ (K, 784), in (0, 1)."""
        return torch.sigmoid(self.pseudo_logits)

    def components(self, encoder: Encoder) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = encoder(self.pseudo_inputs())                                  # (K, d) each
        return mu, logvar

    def picked_components(self, pick: torch.Tensor, encoder: Encoder) -> tuple[torch.Tensor, torch.Tensor]:
        """The components drawn, of their pseudo-inputs alone (the encoder treats each row alone: a batch
        normalisation, which would not, is refused beside a VampPrior), or of all K where they are cached: until
        2026-12-07 all K went through it, and 64 samples of K = 10⁵ pseudo-inputs of a 784-4096-4096-50 model took
        33 s (4.4 s now)."""
        if self.cache is not None:
            return super().picked_components(pick, encoder)
        return encoder(torch.sigmoid(self.pseudo_logits[pick]))                     # (n, d) each


PRIORS: dict[str, type[StandardPrior]] = {"standard": StandardPrior, "mog": MixturePrior, "vampprior": VampPrior}
DEFAULT_COMPONENTS = 500          # K of the VampPrior paper (Tomczak & Welling 2018, §5), for both mixtures


def build_prior(config, latent: int) -> StandardPrior:
    return PRIORS[config.prior](latent, config.prior_components)
