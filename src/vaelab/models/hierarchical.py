"""Two stochastic layers (Burda, Grosse & Salakhutdinov 2016, §5):

    generative  p(z₂) = N(0, I),  p(z₁|z₂) = N(μ_p(z₂), diag σ_p²(z₂)),  p(x|z₁) = Bernoulli(sigmoid ℓ(z₁))
    inference   q(z₁|x) = N(μ₁(x), diag σ₁²(x)),  q(z₂|z₁) = N(μ₂(z₁), diag σ₂²(z₁))

Each arrow is an MLP: x → hidden[0] → z₁ → hidden[1] → z₂ on the inference side, mirrored on the
generative side (Burda's model: 784 → 100 → 100 → 100 → 50 → 50 → 50, tanh). The latent vector of one
draw is z = (z₁, z₂), D = d₁ + d₂ standard-normal numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from vaelab.models.base import INITS, full_precision, mlp
from vaelab.objectives import (Parts, StochasticLayer, bernoulli_log_likelihood, log_normal_diag,
                               log_standard_normal, reparameterize)


class TwoLayerVAE(nn.Module):
    stochastic_layers = 2
    LEGACY_NAMES: dict[str, str] = {}

    def __init__(self, config):
        super().__init__()
        self.config = config
        (h1, h2), (d1, d2) = config.hidden, config.latent
        self.d1, self.d2 = d1, d2
        act = config.activation
        self.encoder1, self.encoder1_out = mlp(config.data_dim, h1, act), nn.Linear(h1[-1], 2 * d1)  # q(z₁|x)
        self.encoder2, self.encoder2_out = mlp(d1, h2, act), nn.Linear(h2[-1], 2 * d2)               # q(z₂|z₁)
        self.decoder2, self.decoder2_out = mlp(d2, h2[::-1], act), nn.Linear(h2[0], 2 * d1)         # p(z₁|z₂)
        self.decoder1, self.decoder1_out = mlp(d1, h1[::-1], act), nn.Linear(h1[0], config.data_dim)  # p(x|z₁)
        INITS[config.init](self)

    @staticmethod
    def linear_shapes(config) -> list[tuple[int, int]]:
        (h1, h2), (d1, d2) = config.hidden, config.latent

        def chain(inputs, widths, outputs):
            sizes = (inputs, *widths)
            return list(zip(sizes[:-1], sizes[1:])) + [(widths[-1], outputs)]

        return (chain(config.data_dim, h1, 2 * d1) + chain(d1, h2, 2 * d2)
                + chain(d2, h2[::-1], 2 * d1) + chain(d1, h1[::-1], config.data_dim))

    # ---- the distributions ---------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ₁, log σ₁²) of q(z₁|x), each (B, d₁)."""
        mu, logvar = full_precision(self.encoder1_out(self.encoder1(x))).chunk(2, dim=-1)
        return mu, logvar

    def encode_top(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ₂, log σ₂²) of q(z₂|z₁): (…, d₁) → (…, d₂) each."""
        mu, logvar = full_precision(self.encoder2_out(self.encoder2(z1))).chunk(2, dim=-1)
        return mu, logvar

    def prior_bottom(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ_p, log σ_p²) of p(z₁|z₂): (…, d₂) → (…, d₁) each."""
        mu, logvar = full_precision(self.decoder2_out(self.decoder2(z2))).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z1: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of p(x|z₁): (…, d₁) → (…, 784)."""
        return full_precision(self.decoder1_out(self.decoder1(z1)))

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> Parts:
        """Parts for the K draws in eps (K, B, d₁ + d₂): z₁ ~ q(z₁|x), then z₂ ~ q(z₂|z₁)."""
        eps1, eps2 = eps[..., :self.d1], eps[..., self.d1:]                 # (K, B, d₁), (K, B, d₂)
        mu1, logvar1 = self.encode(x)                                       # (B, d₁)
        z1 = reparameterize(mu1, logvar1, eps1)                             # (K, B, d₁)
        mu2, logvar2 = self.encode_top(z1)                                  # (K, B, d₂)
        z2 = reparameterize(mu2, logvar2, eps2)                             # (K, B, d₂)
        p_mu, p_logvar = self.prior_bottom(z2)                              # (K, B, d₁)
        reconstruction = bernoulli_log_likelihood(self.decode(z1), x)       # (K, B)
        return Parts(reconstruction, (
            StochasticLayer(z1, eps1, mu1.unsqueeze(0), logvar1.unsqueeze(0), p_mu, p_logvar),
            StochasticLayer(z2, eps2, mu2, logvar2),
        ))

    def posterior_start(self, x: torch.Tensor) -> torch.Tensor:
        """The start of the search for the joint mode of p(x, z₁, z₂): (μ₁(x), μ₂(μ₁(x))), (B, d₁ + d₂)."""
        mu1 = self.encode(x)[0]
        return torch.cat([mu1, self.encode_top(mu1)[0]], -1)

    def log_joint(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x, z₁, z₂) = log p(x|z₁) + log p(z₁|z₂) + log N(z₂; 0, I), z = (z₁, z₂) (…, B, D) → (…, B)."""
        z1, z2 = z[..., :self.d1], z[..., self.d1:]
        p_mu, p_logvar = self.prior_bottom(z2)
        return (bernoulli_log_likelihood(self.decode(z1), x) + log_normal_diag(z1, p_mu, p_logvar)
                + log_standard_normal(z2))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoder means E[x|z₁] for z₂ ~ N(0, I), z₁ ~ p(z₁|z₂): (n, 784) in [0, 1]."""
        weight = self.decoder1_out.weight
        z2 = torch.randn((n, self.d2), generator=generator, device=weight.device, dtype=weight.dtype)
        mu, logvar = self.prior_bottom(z2)
        z1 = reparameterize(mu, logvar, torch.randn((n, self.d1), generator=generator, device=weight.device,
                                                    dtype=weight.dtype))
        return torch.sigmoid(self.decode(z1))

    def laplace_curvature(self):
        return None            # the exact Hessian (Newton falls back to gradient ascent where it is not PD)
