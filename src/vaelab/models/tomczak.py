"""Tomczak & Welling's (2018, "VAE with a VampPrior", §3 and §5) VAE and two-layer HVAE, as in the authors'
released code (jmtomczak/vae_vampprior, models/VAE.py and models/HVAE_2level.py):

    L = 1   q(z|x) = N(μ(x), σ²(x)),  p(x|z)
    L = 2   q(z₂|x) q(z₁|x, z₂),  p(z₂) p(z₁|z₂) p(x|z₁, z₂)

Every network is made of hidden layers of one width W (``hidden[0][0]``; 300 in the paper, gated dense layers
there: ``--activation gated``): q(z|x), q(z₂|x), p(z₁|z₂) and the one-layer p(x|z) take two layers; in
q(z₁|x, z₂) and p(x|z₁, z₂) each input goes through one layer of its own, the two outputs are concatenated (2W)
and go through one more. Every log-variance of q and of p(z₁|z₂) is clamped to [−6, 2] (hardtanh). The prior
of the top layer is any of ``models/priors.py`` (the paper's VampPrior: ``--prior vampprior``), and q(z₂|x) is
what its pseudo-inputs go through. p(z₁|z₂) and q(z₁|x, z₂) are conditioned on the same draw of z₂, so the
layer's KL given that draw is the closed form between two Gaussians.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.models.base import INITS, chain_shapes, full_precision, mlp
from vaelab.models.priors import build_prior
from vaelab.objectives import Parts, StochasticLayer, bernoulli_log_likelihood, log_normal_diag, reparameterize

LOGVAR_RANGE = (-6.0, 2.0)


def _gaussian(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, log σ²) from a linear map's (…, 2d) output, log σ² clamped to LOGVAR_RANGE."""
    mu, logvar = full_precision(out).chunk(2, dim=-1)
    return mu, F.hardtanh(logvar, *LOGVAR_RANGE)


class Joint(nn.Module):
    """Two inputs, one layer each, concatenated, one more layer: (a, b) ↦ h (…, W)."""

    def __init__(self, a: int, b: int, width: int, activation: str):
        super().__init__()
        self.a, self.b = mlp(a, (width,), activation), mlp(b, (width,), activation)
        self.joint = mlp(2 * width, (width,), activation)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ha, hb = self.a(a), self.b(b)
        ha, hb = torch.broadcast_tensors(ha, hb)
        return self.joint(torch.cat([ha, hb], -1))


class TomczakVAE(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.sizes = list(config.latent)
        width, act, D = config.hidden[0][0], config.activation, config.data_dim
        if len(self.sizes) == 1:
            (d,) = self.sizes
            self.q_top = mlp(D, (width, width), act)
            self.q_top_out = nn.Linear(width, 2 * d)
            self.p_x = mlp(d, (width, width), act)
        else:
            d1, d2 = self.sizes
            self.q_top = mlp(D, (width, width), act)                           # q(z₂|x)
            self.q_top_out = nn.Linear(width, 2 * d2)
            self.q_bottom = Joint(D, d2, width, act)                           # q(z₁|x, z₂)
            self.q_bottom_out = nn.Linear(width, 2 * d1)
            self.p_bottom = mlp(d2, (width, width), act)                       # p(z₁|z₂)
            self.p_bottom_out = nn.Linear(width, 2 * d1)
            self.p_x = Joint(d1, d2, width, act)                               # p(x|z₁, z₂)
        self.p_x_out = nn.Linear(width, D)
        self.prior = build_prior(config, self.sizes[-1])
        INITS[config.init](self)

    @staticmethod
    def linear_shapes(config) -> list[tuple[int, int]]:
        width, act, D = config.hidden[0][0], config.activation, config.data_dim
        sizes = list(config.latent)
        if len(sizes) == 1:
            return (chain_shapes(D, (width, width), 2 * sizes[0], act)
                    + chain_shapes(sizes[0], (width, width), D, act))
        d1, d2 = sizes

        def joint(a, b, out):
            return (chain_shapes(a, (width,), width, act)[:-1] + chain_shapes(b, (width,), width, act)[:-1]
                    + chain_shapes(2 * width, (width,), out, act))

        return (chain_shapes(D, (width, width), 2 * d2, act) + joint(D, d2, 2 * d1)
                + chain_shapes(d2, (width, width), 2 * d1, act) + joint(d1, d2, D))

    def tensor_parts(self) -> dict[str, int]:
        """The parameters that hold two of the authors' tensors (``optimizers.tensor_gradients``): each map to a
        Gaussian's (μ, log σ²) is one ``Linear`` of 2d outputs here, two of d there (``q_z_mean``, ``q_z_logvar``)."""
        heads = [name for name in ("q_top_out", "q_bottom_out", "p_bottom_out") if hasattr(self, name)]
        return {f"{head}.{kind}": 2 for head in heads for kind in ("weight", "bias")}

    # ---- the distributions ---------------------------------------------------------------------

    def encode_top(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z_top|x), (…, d_top): also the VampPrior's component at a pseudo-input."""
        return _gaussian(self.q_top_out(self.q_top(x)))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ₁, log σ₁²) of q(z₁|x) (L = 1), or of q(z₁|x, z₂) at z₂'s mean (L = 2): (B, d₁) each."""
        mu, logvar = self.encode_top(x)
        if len(self.sizes) == 1:
            return mu, logvar
        return self.encode_bottom(x, mu)

    def encode_bottom(self, x: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _gaussian(self.q_bottom_out(self.q_bottom(x, z2)))

    def prior_below(self, l: int, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ_p, log σ_p²) of p(z₁|z₂) (l = 1)."""
        return _gaussian(self.p_bottom_out(self.p_bottom(z2)))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of p(x|z) or p(x|z₁, z₂) for z (…, D) → (…, 784)."""
        if len(self.sizes) == 1:
            return full_precision(self.p_x_out(self.p_x(z)))
        z1, z2 = z.split(self.sizes, dim=-1)
        return full_precision(self.p_x_out(self.p_x(z1, z2)))

    def decode_layer(self, index: int, z: torch.Tensor) -> torch.Tensor:
        """Logits with layer ``index`` of the latent vector z (…, D) as given and the layers below it at the
        means of p given the layer above (the layers above are taken from z)."""
        if index == 1:
            z1 = self.prior_below(1, z[..., self.sizes[0]:])[0]
            z = torch.cat([z1, z[..., self.sizes[0]:]], -1)
        return self.decode_latents(z)

    def posterior_start(self, x: torch.Tensor) -> torch.Tensor:
        """(μ₁(x, μ₂(x)), μ₂(x)) (B, D): the means of q, the start of the search for the joint mode."""
        mu, _ = self.encode_top(x)
        if len(self.sizes) == 1:
            return mu
        return torch.cat([self.encode_bottom(x, mu)[0], mu], -1)

    def log_joint(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x, z) for z (…, B, D) → (…, B)."""
        top = z[..., -self.sizes[-1]:]
        total = bernoulli_log_likelihood(self.decode_latents(z), x) + self.prior.log_density(top, self.encode_top)
        if len(self.sizes) == 2:
            total = total + log_normal_diag(z[..., :self.sizes[0]], *self.prior_below(1, top))
        return total

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> Parts:
        """Parts for the K draws in eps (K, B, D), D = d₁ (+ d₂): z₂ ~ q(z₂|x) first, then z₁ ~ q(z₁|x, z₂)."""
        noise = eps.split(self.sizes, dim=-1)
        mu, logvar = self.encode_top(x)                                          # (B, d_top)
        top = reparameterize(mu, logvar, noise[-1])                              # (K, B, d_top)
        top_layer = StochasticLayer(top, noise[-1], mu.unsqueeze(0), logvar.unsqueeze(0),
                                    log_p=self.prior.layer_log_p(top, self.encode_top))
        if len(self.sizes) == 1:
            return Parts(bernoulli_log_likelihood(self.decode_latents(top), x), (top_layer,))
        q_mu, q_logvar = self.encode_bottom(x, top)                              # (K, B, d₁)
        z1 = reparameterize(q_mu, q_logvar, noise[0])
        p_mu, p_logvar = self.prior_below(1, top)                                # (K, B, d₁)
        bottom = StochasticLayer(z1, noise[0], q_mu, q_logvar, p_mu, p_logvar, conditional=True)
        reconstruction = bernoulli_log_likelihood(self.decode_latents(torch.cat([z1, top], -1)), x)
        return Parts(reconstruction, (bottom, top_layer))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoder means for z_top ~ p(z_top) (and z₁ ~ p(z₁|z₂)): (n, 784) in [0, 1]."""
        like = self.p_x_out.weight
        top = self.prior.sample(n, generator, self.encode_top, like=like)
        if len(self.sizes) == 1:
            return torch.sigmoid(self.decode_latents(top))
        mu, logvar = self.prior_below(1, top)
        z1 = reparameterize(mu, logvar, torch.randn(mu.shape, generator=generator, device=like.device, dtype=like.dtype))
        return torch.sigmoid(self.decode_latents(torch.cat([z1, top], -1)))

    def laplace_curvature(self):
        return None
