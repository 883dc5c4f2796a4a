"""Hierarchies of any depth L ≥ 2: stochastic layers z₁ … z_L (bottom first), one model with two inference
networks (``ModelConfig.inference``), the same generative model:

    generative  p(z_L) (a prior of ``models/priors.py``), p(zₗ|zₗ₊₁) = N(μ_p(zₗ₊₁), diag σ_p²(zₗ₊₁)),
                p(x|z₁) = Bernoulli(sigmoid ℓ(z₁))
    bottom-up   q(z₁|x) q(z₂|z₁) … q(z_L|z_{L−1}), each a diagonal Gaussian (Burda et al. 2016, §5; ``mlp2``
                is the L = 2 case), optionally each through a flow (``models/flows.py``)
    top-down    the Ladder VAE (Sønderby et al. 2016, eq. 17–21): a deterministic bottom-up pass dₗ = MLP(dₗ₋₁),
                d₀ = x, gives each layer a Gaussian N(μ̂ₗ, σ̂ₗ²); then from the top, q(z_L|x) = N(μ̂_L, σ̂_L²) and
                for l < L q(zₗ|·) merges N(μ̂ₗ, σ̂ₗ²) with the generative p(zₗ|zₗ₊₁) at the same draw of zₗ₊₁
                by precision weighting:
                    σ_q² = 1/(σ̂⁻² + σ_p⁻²),   μ_q = (μ̂ σ̂⁻² + μ_p σ_p⁻²) σ_q²
                (the product of two Gaussian densities, renormalised), so the top-down path is shared between
                p and q. Written stably: log σ_q² = −logaddexp(−log σ̂², −log σ_p²) and
                μ_q = μ̂ sigmoid(log σ_p² − log σ̂²) + μ_p sigmoid(log σ̂² − log σ_p²).

Networks (``batch_norm``: every deterministic layer normalised before its nonlinearity, the Ladder VAE's
batch normalisation; ``models/base.py``): inference block l maps x (l = 0, or dₗ₋₁ top-down) or zₗ₋₁ (bottom-up) through ``hidden[l]`` to
(μ̂ₗ, log σ̂ₗ²); generative block for layer l + 1 maps zₗ₊₁ through ``hidden[l + 1]`` reversed to (μ_p, log σ_p²) of
zₗ, and the bottom one z₁ through ``hidden[0]`` reversed to the 784 logits. With L = 2, tanh and hidden
((100, 100), (50, 50)), latent (100, 50) it is Burda's two-layer model; blocks are built in the order the
former ``TwoLayerVAE`` built them, so an ``mlp2`` run trains to the same weights and its run directory loads
(``LEGACY_NAMES``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.models.base import INITS, bernoulli_data_term, chain_shapes, evaluation_mlp, full_precision, mlp
from vaelab.models.flows import build_flow, flow_shapes
from vaelab.models.priors import build_prior
from vaelab.objectives import Parts, StochasticLayer, bernoulli_log_likelihood, log_normal_diag, reparameterize


class Block(nn.Module):
    """An MLP and the linear map after it."""

    def __init__(self, inputs: int, widths, outputs: int, activation: str, batch_norm: bool = False):
        super().__init__()
        self.net = mlp(inputs, widths, activation, batch_norm)
        self.out = nn.Linear(widths[-1], outputs)

    def forward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the MLP's output h, the map's output) for a (…, inputs)."""
        h = self.net(a)
        return h, full_precision(self.out(h))

    def evaluation(self, net: Callable[[torch.Tensor], torch.Tensor]
                   ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``forward`` in eval mode without autograd, with ``net`` = ``evaluation_mlp(self.net, activation)`` (batch
        normalisation folded into the linear maps, activations in place): the same function up to float rounding."""

        def run(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = net(a.reshape(-1, a.shape[-1]))                                 # (N, H), N = …·B
            return h.view(*a.shape[:-1], -1), F.linear(h, self.out.weight, self.out.bias).view(*a.shape[:-1], -1)

        return run


def merge_gaussians(mu_hat: torch.Tensor, logvar_hat: torch.Tensor, mu_p: torch.Tensor,
                    logvar_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ladder's precision-weighted q: N(μ̂, σ̂²) · N(μ_p, σ_p²) renormalised, as (μ_q, log σ_q²)."""
    logvar = -torch.logaddexp(-logvar_hat, -logvar_p)
    mu = mu_hat * torch.sigmoid(logvar_p - logvar_hat) + mu_p * torch.sigmoid(logvar_hat - logvar_p)
    return mu, logvar


class HierarchicalVAE(nn.Module):
    # weights of ``mlp2`` run directories written before this class (vaelab ≤ 0.2's TwoLayerVAE)
    LEGACY_NAMES = {"encoder1": "up.0.net", "encoder1_out": "up.0.out", "encoder2": "up.1.net",
                    "encoder2_out": "up.1.out", "decoder2": "down.0.net", "decoder2_out": "down.0.out",
                    "decoder1": "down.1.net", "decoder1_out": "down.1.out"}

    def __init__(self, config):
        super().__init__()
        self.config = config
        hidden, latent, act = config.hidden, config.latent, config.activation
        self.sizes = list(latent)
        self.top_down = config.inference == "top-down"
        levels = len(latent)
        up = []
        for l in range(levels):
            inputs = config.data_dim if l == 0 else (hidden[l - 1][-1] if self.top_down else latent[l - 1])
            up.append(Block(inputs, hidden[l], 2 * latent[l], act, config.batch_norm))
        self.up = nn.ModuleList(up)                                     # inference, bottom first
        self.down = nn.ModuleList([Block(latent[l], hidden[l][::-1], 2 * latent[l - 1] if l else config.data_dim, act,
                                         config.batch_norm)
                                   for l in range(levels - 1, -1, -1)])  # generative, from the top: zₗ → zₗ₋₁ … → x
        self.prior = build_prior(config, latent[-1])
        self.flows = nn.ModuleList([build_flow(config, latent[l], hidden[l][-1]) for l in range(levels)])
        INITS[config.init](self)

    @staticmethod
    def linear_shapes(config) -> list[tuple[int, int]]:
        hidden, latent, act = config.hidden, config.latent, config.activation
        top_down = config.inference == "top-down"
        shapes = []
        for l in range(len(latent)):
            inputs = config.data_dim if l == 0 else (hidden[l - 1][-1] if top_down else latent[l - 1])
            shapes += chain_shapes(inputs, hidden[l], 2 * latent[l], act)
        for l in range(len(latent) - 1, -1, -1):
            shapes += chain_shapes(latent[l], hidden[l][::-1], 2 * latent[l - 1] if l else config.data_dim, act)
        return shapes + [shape for l in range(len(latent)) for shape in flow_shapes(config, latent[l], hidden[l][-1])]

    # ---- the generative model -------------------------------------------------------------------

    def generative(self, l: int, z: torch.Tensor, blocks: Sequence[Callable] | None = None) -> torch.Tensor:
        """Layer l's latents (…, dₗ) → (μ_p, log σ_p²) of zₗ₋₁ as one (…, 2dₗ₋₁) tensor, or x's logits (l = 0);
        ``blocks``: the generative blocks' functions to use instead of the modules (``Block.evaluation``)."""
        return (blocks or self.down)[len(self.sizes) - 1 - l](z)[1]

    def prior_below(self, l: int, z: torch.Tensor,
                    blocks: Sequence[Callable] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ_p, log σ_p²) of p(zₗ₋₁ | zₗ), each (…, dₗ₋₁)."""
        mu, logvar = self.generative(l, z, blocks).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z1: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of p(x|z₁): (…, d₁) → (…, 784)."""
        return self.generative(0, z1)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z[..., :self.sizes[0]])

    def decode_layer(self, index: int, z: torch.Tensor) -> torch.Tensor:
        """Logits from layer ``index`` of the latent vector z (…, D), carried down through the means of
        p(zₗ₋₁|zₗ) (the layers below it in z are not used)."""
        z = z.split(self.sizes, dim=-1)[index]
        for l in range(index, 0, -1):
            z = self.prior_below(l, z)[0]
        return self.decode(z)

    def log_joint(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x, z₁ … z_L) for z = (z₁, …, z_L) (…, B, D) → (…, B)."""
        parts = z.split(self.sizes, dim=-1)
        total = bernoulli_log_likelihood(self.decode(parts[0]), x) + self.prior.log_density(parts[-1], self.encode_top)
        for l in range(1, len(parts)):
            total = total + log_normal_diag(parts[l - 1], *self.prior_below(l, parts[l]))
        return total

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoder means E[x|z₁] for z_L ~ p(z_L), then zₗ₋₁ ~ p(zₗ₋₁|zₗ) down to z₁: (n, 784) in [0, 1]."""
        like = self.down[0].out.weight
        z = self.prior.sample(n, generator, self.encode_top, like=like)
        for l in range(len(self.sizes) - 1, 0, -1):
            mu, logvar = self.prior_below(l, z)
            z = reparameterize(mu, logvar, torch.randn(mu.shape, generator=generator, device=like.device,
                                                       dtype=like.dtype))
        return torch.sigmoid(self.decode(z))

    # ---- inference ------------------------------------------------------------------------------

    def encode_top(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of the top layer's Gaussian for pixel inputs x (…, 784), along the means: what the
        VampPrior's components are. Top-down it is q(z_L|x) itself; bottom-up, q(z_L | the means below)."""
        a = x
        for block in self.up:
            h, out = block(a)
            mu, logvar = out.chunk(2, dim=-1)
            a = h if self.top_down else mu
        return mu, logvar

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ₁, log σ₁²) of q(z₁|·) along the means (B, d₁): bottom-up q(z₁|x) itself; top-down the merge with
        p(z₁|z₂) at the mean of z₂ (and so on from the top)."""
        means = self._means(x)
        return means[0]

    def _means(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (μ_q, log σ_q²) with every draw replaced by the mean of q (flows applied to the mean)."""
        return self._infer(x, None)[1]

    def posterior_start(self, x: torch.Tensor) -> torch.Tensor:
        """The start of the search for the joint mode of p(x, z): every layer at its mean under q, (B, D)."""
        return torch.cat(self._infer(x, None)[0], -1)

    def bottom_up(self, x: torch.Tensor) -> torch.Tensor:
        """The ladder's deterministic bottom-up pass (top-down inference only): every layer's Gaussian N(μ̂ₗ, σ̂ₗ²)
        as one (B, 2D) tensor, (μ̂₁ … μ̂_L, log σ̂₁² … log σ̂_L²). These are what the encoder amortises: given
        them, q(z|x) is fixed (the top-down merges with p), so they are the ladder's per-digit parameters
        (``forward(x, eps, hats)``; the gap decomposition optimises them per digit, vaelab.gaps)."""
        hats, a = [], x
        for block in self.up:
            a, out = block(a)
            hats.append(out.chunk(2, dim=-1))                                   # (μ̂ₗ, log σ̂ₗ²), each (B, dₗ)
        return torch.cat([torch.cat([mu for mu, _ in hats], -1), torch.cat([lv for _, lv in hats], -1)], -1)

    def _infer(self, x: torch.Tensor, eps: torch.Tensor | None, hats: torch.Tensor | None = None,
               blocks: Sequence[Callable] | None = None):
        """The draws z of every layer (eps None: the means), their Gaussians, and the layers' parts; top-down,
        ``hats`` (B, 2D) replaces the bottom-up pass (``bottom_up``); ``blocks`` as in ``generative``."""
        noise = [None] * len(self.sizes) if eps is None else list(eps.split(self.sizes, dim=-1))
        draws, gaussians, layers = [None] * len(self.sizes), [None] * len(self.sizes), [None] * len(self.sizes)

        def draw(mu, logvar, e):
            return mu if e is None else reparameterize(mu, logvar, e)

        if not self.top_down:
            a = x
            for l, block in enumerate(self.up):
                h, out = block(a)
                mu, logvar = out.chunk(2, dim=-1)                              # (B, d₁), then (K, B, dₗ)
                z, log_det = self.flows[l](draw(mu, logvar, noise[l]), h)
                draws[l], gaussians[l] = z, (mu, logvar)
                layers[l] = (mu, logvar, log_det, None)
                a = z
        else:
            if hats is None:
                hats = self.bottom_up(x)                                        # (B, 2D)
            mus, logvars = hats.chunk(2, dim=-1)
            hats = list(zip(mus.split(self.sizes, dim=-1), logvars.split(self.sizes, dim=-1)))  # (μ̂ₗ, log σ̂ₗ²)
            top = len(self.sizes) - 1
            mu, logvar = hats[top]
            draws[top], gaussians[top], layers[top] = draw(mu, logvar, noise[top]), (mu, logvar), (mu, logvar, None, None)
            for l in range(top - 1, -1, -1):
                p_mu, p_logvar = self.prior_below(l + 1, draws[l + 1], blocks)  # (K, B, dₗ)
                mu, logvar = merge_gaussians(*hats[l], p_mu, p_logvar)
                draws[l], gaussians[l] = draw(mu, logvar, noise[l]), (mu, logvar)
                layers[l] = (mu, logvar, None, (p_mu, p_logvar))               # p at the same draw of zₗ₊₁
        return draws, gaussians, layers

    def forward(self, x: torch.Tensor, eps: torch.Tensor, hats: torch.Tensor | None = None,
                log_likelihood: Callable[[torch.Tensor], torch.Tensor] | None = None,
                blocks: Sequence[Callable] | None = None) -> Parts:
        """Parts for the K draws in eps (K, B, d₁ + … + d_L); top-down, with ``hats`` (B, 2D) given in place of
        the bottom-up pass's Gaussians (``bottom_up``); ``log_likelihood``: z₁ ↦ log p(x|z₁) for this x, in place
        of the plain form, and ``blocks`` (``generative``) for p(zₗ₋₁|zₗ) (both: ``conditioned``)."""
        if hats is not None and not self.top_down:
            raise ValueError("hats are the ladder's bottom-up Gaussians: top-down inference only")
        draws, _, layers = self._infer(x, eps, hats, blocks)
        noise = eps.split(self.sizes, dim=-1)
        parts = []
        for l, (mu, logvar, log_det, p) in enumerate(layers):
            if l + 1 < len(self.sizes):
                p_mu, p_logvar = p if p is not None else self.prior_below(l + 1, draws[l + 1], blocks)
                parts.append(StochasticLayer(draws[l], noise[l], _with_draws(mu), _with_draws(logvar), p_mu, p_logvar,
                                             log_det=log_det, conditional=self.top_down))
            else:
                parts.append(StochasticLayer(draws[l], noise[l], _with_draws(mu), _with_draws(logvar), log_det=log_det,
                                             log_p=self.prior.layer_log_p(draws[l], self.encode_top)))
        reconstruction = (bernoulli_log_likelihood(self.decode(draws[0]), x) if log_likelihood is None
                          else log_likelihood(draws[0]))                       # (K, B)
        return Parts(reconstruction, tuple(parts))

    def conditioned(self, x: torch.Tensor, fast_data_term: bool = False) -> Callable[[torch.Tensor], Parts]:
        """eps ↦ ``forward(x, eps)`` with what depends on x alone computed once: the ladder's bottom-up pass; with
        ``fast_data_term`` (evaluation: eval mode, no autograd) also the generative blocks as ``Block.evaluation``
        (batch normalisation folded into the linear maps) and the data term's products with x
        (``bernoulli_data_term`` over the bottom block z₁ → x)."""
        hats = self.bottom_up(x) if self.top_down else None
        if not fast_data_term:
            return lambda eps: self(x, eps, hats)
        nets = [evaluation_mlp(block.net, self.config.activation) for block in self.down]    # each folded once
        blocks = [block.evaluation(net) for block, net in zip(self.down, nets)]
        log_likelihood = bernoulli_data_term(nets[-1], self.down[-1].out, x)   # the bottom block, z₁ → x
        return lambda eps: self(x, eps, hats, log_likelihood, blocks)

    def laplace_curvature(self):
        return None            # the exact Hessian (Newton falls back to gradient ascent where it is not PD)


def _with_draws(t: torch.Tensor) -> torch.Tensor:
    """A (B, d) parameter as (1, B, d), a per-draw (K, B, d) one unchanged."""
    return t.unsqueeze(0) if t.dim() == 2 else t
