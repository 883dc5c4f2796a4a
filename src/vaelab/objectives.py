"""The variational objectives, written once and shared by the model, the trainer and the evaluator.

Notation: x (B, D) data, z (…, B, d) latents, q(z|x) = N(μ, diag σ²) with σ = exp(½ log σ²),
prior p(z) = N(0, I), decoder p(x|z). All log densities are in nats and returned per example (no
reduction over the batch): callers sum over the batch and divide by the number of examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)
LOG2_E = 1.0 / math.log(2.0)

# log p(x|z) for latents (…, B, d) and data (B, D) -> (…, B)
LogLikelihood = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ELBOTerms:
    """Per-example parts of the evidence lower bound, each (B,), in nats.

    elbo = reconstruction − kl, with reconstruction = E_q[log p(x|z)] (a log-likelihood, ≤ 0 for
    Bernoulli pixels) and kl = KL(q(z|x) ‖ p(z)) ≥ 0.
    """

    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σᵢ (σᵢ² + μᵢ² − 1 − log σᵢ²), summed over the last axis.

    From KL = E_q[log q − log p] with E_q[(z−μ)²/σ²] = 1 and E_q[z²] = σ² + μ² (Kingma & Welling 2014, App. B).
    Checked against torch.distributions and Monte Carlo in tests/test_objectives.py::test_kl_*.
    """
    return 0.5 * (logvar.exp() + mu.square() - 1.0 - logvar).sum(-1)


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(ℓ)) = Σⱼ xⱼ ℓⱼ − softplus(ℓⱼ), summed over the last axis.

    From x log s + (1−x) log(1−s) with log s = ℓ − softplus(ℓ), log(1−s) = −softplus(ℓ): this is minus
    the binary cross-entropy *with logits*, finite for any ℓ (no sigmoid followed by log).
    Checked in tests/test_objectives.py::test_bernoulli_*.
    """
    return (x * logits - F.softplus(logits)).sum(-1)


def softplus_sum(logits: torch.Tensor, groups: int = 4) -> torch.Tensor:
    """Σⱼ softplus(ℓⱼ) = Σⱼ log(1 + e^{ℓⱼ}) over the last axis, with one exp2 per element and one log per 2^groups.

    softplus(ℓ) = max(ℓ, 0) + log(1 + u) with u = e^{−|ℓ|} = 2^{−|ℓ| log₂e} ∈ (0, 1]. The logs of a group
    are one log of a product, Σⱼ log(1 + uⱼ) = log Πⱼ (1 + uⱼ), formed by halving the axis ``groups``
    times; each product is ≤ 2^(2^groups), so it cannot overflow for any ℓ. Products are carried as
    P − 1 (two factors combine as a + b + ab) and closed with log1p, so the tiny u of confident pixels
    are not rounded away against 1. Same value as ``F.softplus(ℓ).sum(-1)`` to float32 rounding
    (tests/test_objectives.py::test_softplus_sum_*); on the 2-core CPU here ≈1.3 ns per element instead
    of ≈2–2.5 in isolation (exp2 costs about half of exp, and 1/16 of the logs), less after a matmul
    (benchmarks/README.md).
    With autograd recording through ``logits`` it is F.softplus(ℓ).sum(-1) (the fast form works in place).
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        return F.softplus(logits).sum(-1)
    while groups > 0 and 2.0 ** (2 ** groups) > torch.finfo(logits.dtype).max:   # float16: 2¹⁶ overflows
        groups -= 1
    positive = logits.clamp(min=0)                                            # (…, D)
    total = positive.sum(-1)                                                  # Σ max(ℓ, 0)
    p = torch.add(logits, positive, alpha=-2.0).mul_(LOG2_E).exp2_()          # u = 2^{−|ℓ| log₂e}
    for _ in range(groups):
        width = p.shape[-1]
        if width % 2:
            break
        a, b = p[..., :width // 2], p[..., width // 2:]
        p = torch.addcmul(b, a, b).add_(a)                                    # (1+a)(1+b) − 1 = a + b + ab
    return total + p.log1p_().sum(-1)


def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; μ, diag σ²) = −½ Σᵢ [log 2π + log σᵢ² + (zᵢ − μᵢ)²/σᵢ²], summed over the last axis."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).square() * torch.exp(-logvar)).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) = −½ Σᵢ (log 2π + zᵢ²), summed over the last axis."""
    return -0.5 * (LOG_2PI + z.square()).sum(-1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = μ + σ ε with σ = exp(½ log σ²) (the standard deviation, not the variance); ε ~ N(0, I)."""
    return mu + torch.exp(0.5 * logvar) * eps


def elbo(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, log_likelihood: LogLikelihood,
         eps: torch.Tensor) -> ELBOTerms:
    """ELBO(x) = E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)), the expectation estimated from the S draws in eps.

    eps: (S, B, d) standard-normal draws (S = 1 in training). Since log p(x) = ELBO + KL(q ‖ p(z|x)),
    the ELBO is a lower bound, tight when q = p(z|x) (tests/test_objectives.py::test_elbo_linear_gaussian).
    """
    z = reparameterize(mu, logvar, eps)                        # (S, B, d)
    reconstruction = log_likelihood(z, x).mean(0)              # (B,)
    kl = kl_standard_normal(mu, logvar)                        # (B,)
    return ELBOTerms(elbo=reconstruction - kl, reconstruction=reconstruction, kl=kl)


def log_mean_exp(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/K) Σₖ exp(vₖ), stable for any magnitude."""
    return torch.logsumexp(values, dim) - math.log(values.shape[dim])


def importance_sampled_log_marginal(log_weights: Callable[[int], torch.Tensor], k: int,
                                    chunk: int) -> torch.Tensor:
    """log (1/K) Σₖ wₖ over K importance weights drawn ``chunk`` at a time, merged in log space.

    ``log_weights(n)`` returns (n, B) values log p(x, zₖ) − log r(zₖ) for n fresh draws zₖ ~ r. With
    r = q(z|x) this is the K-sample importance-weighted bound IWAE_K (Burda et al. 2016): E[IWAE_K] ≤ log p(x),
    non-decreasing in K, equal to the ELBO at K = 1, and → log p(x) as K → ∞.
    Memory is bounded by the chunk; the running log-sum-exp is exact.
    """
    total: torch.Tensor | None = None
    drawn = 0
    while drawn < k:
        n = min(chunk, k - drawn)
        part = torch.logsumexp(log_weights(n), 0)               # (B,)
        total = part if total is None else torch.logaddexp(total, part)
        drawn += n
    assert total is not None, "k must be positive"
    return total - math.log(k)


def iwae_bound(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, log_likelihood: LogLikelihood,
               k: int, generator: torch.Generator | None = None, chunk: int = 1000) -> torch.Tensor:
    """IWAE_K(x) = log (1/K) Σₖ p(x, zₖ)/q(zₖ|x), zₖ ~ q(z|x): per example (B,), in nats.

    The B examples share the standard-normal draws: zₖ(x) = μ(x) + σ(x) εₖ with one εₖ for the batch
    (common random numbers). Each example still gets K independent draws from its own q(z|x), so each
    estimate is exactly IWAE_K; only the Monte Carlo errors of different examples become correlated,
    and it draws B times fewer normals (3 % of evaluation time, benchmarks/README.md).
    """

    def log_weights(n: int) -> torch.Tensor:
        eps = torch.randn((n, 1, mu.shape[-1]), generator=generator, device=mu.device, dtype=mu.dtype)  # (n, 1, d)
        z = reparameterize(mu, logvar, eps)                                                  # (n, B, d)
        # log q(z|x) with z = μ + σε: −½ Σ (log 2π + log σ² + ε²), no division needed.
        log_q = -0.5 * (mu.shape[-1] * LOG_2PI + logvar.sum(-1) + eps.square().sum(-1))      # (n, B)
        return log_likelihood(z, x) + log_standard_normal(z) - log_q

    return importance_sampled_log_marginal(log_weights, k, chunk)
