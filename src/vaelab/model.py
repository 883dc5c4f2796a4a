"""The VAE: an MLP encoder q(z|x) = N(μ, diag σ²) and an MLP Bernoulli decoder p(x|z) (Kingma & Welling 2014).

Encoder  x (B, 784) → Linear → ReLU → Linear → (μ, log σ²), each (B, d)
Decoder  z (…, d)   → Linear → ReLU → Linear → logits (…, 784)
The model is rebuilt from its ``ModelConfig`` alone (saved as JSON beside the weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.objectives import LOG2_E, ELBOTerms, bernoulli_log_likelihood, elbo, log_standard_normal, softplus_sum


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: data_dim-hidden-(latent, latent) encoder, latent-hidden-data_dim decoder, ReLU."""

    data_dim: int = 784
    hidden: int = 256
    latent: int = 50

    def layers(self) -> list[tuple[int, int]]:
        """(inputs, outputs) of the four linear layers: encoder hidden, encoder out, decoder hidden, out."""
        return [(self.data_dim, self.hidden), (self.hidden, 2 * self.latent),
                (self.latent, self.hidden), (self.hidden, self.data_dim)]

    def parameter_count(self) -> int:
        return sum((a + 1) * b for a, b in self.layers())

    def flops_per_example(self) -> int:
        """Multiply-adds × 2 of one training step per example: forward, then backward.

        Forward: one (1×a)·(a×b) product per layer = 2ab FLOPs. Backward: the weight gradient (2ab) for
        every layer and the input gradient (2ab) for every layer but the first (x needs no gradient).
        """
        forward = sum(2 * a * b for a, b in self.layers())
        backward = 2 * forward - 2 * self.data_dim * self.hidden
        return forward + backward


class VAE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.enc_hidden = nn.Linear(config.data_dim, config.hidden)
        self.enc_out = nn.Linear(config.hidden, 2 * config.latent)
        self.dec_hidden = nn.Linear(config.latent, config.hidden)
        self.dec_out = nn.Linear(config.hidden, config.data_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z|x), each (B, d)."""
        mu, logvar = self.enc_out(torch.relu(self.enc_hidden(x))).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of p(x|z): (…, d) → (…, 784)."""
        return self.dec_out(torch.relu(self.dec_hidden(z)))

    def log_likelihood(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) = Σⱼ xⱼℓⱼ − softplus(ℓⱼ) for z (…, B, d), x (B, 784) → (…, B), in the plain form
        (``bernoulli_log_likelihood``): what one call, autograd and torch.func transforms (the Laplace
        Newton solve) want. ``log_likelihood_for`` is the fast form for many draws of z."""
        return bernoulli_log_likelihood(self.decode(z), x)

    def log_likelihood_for(self, x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """log p(x|·) for this batch x as a function of z (its second argument is ignored), for the many
        draws of z that importance sampling decodes; same value as ``log_likelihood`` (tests/test_model.py).

        With ℓ = h W₄ᵀ + b₄, the data term is Σⱼ xⱼℓⱼ = h·(W₄ᵀx) + b₄·x: a product over the H hidden units
        instead of the 784 pixels, so only softplus touches every logit. W₄ᵀx, b₄·x and the last layer
        scaled by log₂e are computed once per batch; the scaled layer gives y = ℓ log₂e directly, the input
        of ``softplus_sum(…, base2=True)`` (one pass over the logits fewer).
        """
        x_w = x @ self.dec_out.weight                                          # (B, H)
        x_b = x @ self.dec_out.bias                                            # (B,)
        weight2, bias2 = self.dec_out.weight * LOG2_E, self.dec_out.bias * LOG2_E  # (784, H), (784,)

        def log_likelihood(z: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
            batch = z.shape[:-1]
            h = F.linear(z.reshape(-1, z.shape[-1]), self.dec_hidden.weight, self.dec_hidden.bias).relu_()  # (…·B, H)
            logits2 = F.linear(h, weight2, bias2)                              # (…·B, 784) ℓ log₂e: 2-D, no bias copies
            h = h.view(*batch, -1)                                             # (…, B, H)
            return (h * x_w).sum(-1) + x_b - softplus_sum(logits2, base2=True).view(batch)

        return log_likelihood

    def log_joint(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x, z) = log p(x|z) + log N(z; 0, I) → (…, B)."""
        return self.log_likelihood(z, x) + log_standard_normal(z)

    def gauss_newton_precision(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Jᵀ diag(s(1−s)) J + I for z (B, d), J = ∂logits/∂z (B, 784, d), s = sigmoid(logits): (B, d, d).

        The generalised Gauss–Newton form of −∇²_z log p(x, z): the Hessian of the Bernoulli term is
        −Jᵀ diag(s(1−s)) J − Σⱼ (xⱼ − sⱼ) ∇²ℓⱼ, and ∇²ℓⱼ = 0 wherever the ReLU decoder is linear in z, so
        this is the exact Hessian almost everywhere for this architecture, positive definite always.
        """
        jac = torch.func.vmap(torch.func.jacfwd(self.decode))(z)                # (B, 784, d)
        s = torch.sigmoid(self.decode(z))                                       # (B, 784)
        eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
        return torch.einsum("bjd,bj,bje->bde", jac, s * (1 - s), jac) + eye

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> ELBOTerms:
        """Per-example ELBO, reconstruction and KL with one reparameterised draw (or the S draws in eps)."""
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn((1, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        return elbo(x, mu, logvar, self.log_likelihood, eps)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoder means E[x|z] = sigmoid(logits) for z ~ N(0, I): (n, 784) in [0, 1]."""
        device = self.dec_out.weight.device
        z = torch.randn((n, self.config.latent), generator=generator, device=device)
        return torch.sigmoid(self.decode(z))
