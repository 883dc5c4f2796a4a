"""One stochastic layer: q(z|x) = N(μ(x), diag σ²(x)) (optionally through a flow), a prior p(z) (N(0, I), a
mixture or the VampPrior: ``models/priors.py``), p(x|z) Bernoulli on MLP logits.

Encoder  x (B, 784) → [Linear → act] × len(hidden) → h → Linear → (μ, log σ²), each (B, d)
Flow     z₀ = μ + σ ε → z = f_T ∘ … ∘ f₁(z₀), its parameters from h (``models/flows.py``; none by default)
Decoder  z (…, d)   → [Linear → act] × len(hidden), widths mirrored → Linear → logits (…, 784)
With hidden = (256,), ReLU and d = 50 this is the reference model of Kingma & Welling's MNIST setting;
with hidden = (200, 200), tanh, d = 50 Burda et al.'s one-layer model; with gated layers of 300 units, d = 40
and the VampPrior the one-layer model of Tomczak & Welling (2018) (without its log-variance clamp).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vaelab.models.base import (ACTIVATIONS, INITS, bernoulli_data_term, chain_shapes, evaluation_mlp, full_precision,
                                linear_layers, mlp)
from vaelab.models.flows import build_flow, flow_shapes
from vaelab.models.priors import build_prior
from vaelab.objectives import (LN_2, LOG2_E, Parts, StochasticLayer, bernoulli_log_likelihood, reparameterize,
                               softplus_sum)


class MLPVAE(nn.Module):
    # weights of run directories written before models/ existed (config version 1)
    LEGACY_NAMES = {"enc_hidden": "encoder.0", "enc_out": "encoder_out", "dec_hidden": "decoder.0",
                    "dec_out": "decoder_out"}

    def __init__(self, config):
        super().__init__()
        self.config = config
        (hidden,), (latent,) = config.hidden, config.latent
        self.latent = latent
        self.activation = config.activation
        # built in this order (encoder, its output, decoder, its output) so that the reference model draws
        # its initial weights from torch's stream exactly as vaelab always did
        self.encoder = mlp(config.data_dim, hidden, config.activation)
        self.encoder_out = nn.Linear(hidden[-1], 2 * latent)
        self.decoder = mlp(latent, hidden[::-1], config.activation)
        self.decoder_out = nn.Linear(hidden[0], config.data_dim)
        # after the layers above, so that the standard prior without a flow (no parameters) draws nothing more
        self.prior = build_prior(config, latent)
        self.flow = build_flow(config, latent, hidden[-1])
        INITS[config.init](self)

    @property
    def fast(self) -> bool:
        """Whether the hand-derived forms apply: standard prior, no flow, an elementwise activation."""
        config = self.config
        return config.prior == "standard" and config.flow_steps == 0 and not ACTIVATIONS[config.activation].gated

    @staticmethod
    def linear_shapes(config) -> list[tuple[int, int]]:
        (hidden,), (latent,) = config.hidden, config.latent
        return (chain_shapes(config.data_dim, hidden, 2 * latent, config.activation)
                + chain_shapes(latent, hidden[::-1], config.data_dim, config.activation)
                + flow_shapes(config, latent, hidden[-1]))

    # ---- the distributions ---------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z|x), each (B, d)."""
        mu, logvar = full_precision(self.encoder_out(self.encoder(x))).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of p(x|z): (…, d) → (…, 784)."""
        return full_precision(self.decoder_out(self.decoder(z)))

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> Parts:
        """Parts for the K draws in eps (K, B, d): log p(x|z) (K, B) and the one stochastic layer."""
        return self.conditioned(x)(eps)

    def conditioned(self, x: torch.Tensor, fast_data_term: bool = False) -> Callable[[torch.Tensor], Parts]:
        """eps (K, B, d) ↦ the Parts of ``forward`` for this batch x, with what depends on x alone (the encoder, the
        flow's parameters) computed once: importance sampling scores thousands of draws of the same digits, a
        chunk at a time. With ``fast_data_term`` (evaluation, no autograd) log p(x|z) by
        ``log_likelihood_for``, the same value by fewer passes over the logits (tests/test_models.py)."""
        h = self.encoder(x)                                              # (B, H)
        mu, logvar = full_precision(self.encoder_out(h)).chunk(2, dim=-1)  # (B, d) each
        flow = self.flow.conditioned(h)
        if fast_data_term:
            log_likelihood = self.log_likelihood_for(x)
        else:
            def log_likelihood(z: torch.Tensor) -> torch.Tensor:
                return bernoulli_log_likelihood(self.decode(z), x)

        def parts(eps: torch.Tensor) -> Parts:
            z, log_det = flow(reparameterize(mu, logvar, eps))           # (K, B, d), (K, B) or None
            log_p = self.prior.layer_log_p(z, self.encode)               # (K, B) or None: N(0, I)
            return Parts(log_likelihood(z), (StochasticLayer(z, eps, mu.unsqueeze(0), logvar.unsqueeze(0),
                                                             log_det=log_det, log_p=log_p),))
        return parts

    def posterior_start(self, x: torch.Tensor) -> torch.Tensor:
        """Where the search for the mode of p(x, z) starts: the encoder's mean μ(x) (through the flow), (B, d)."""
        h = self.encoder(x)
        mu = full_precision(self.encoder_out(h)).chunk(2, dim=-1)[0]
        return self.flow(mu, h)[0]

    def log_joint(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x, z) = log p(x|z) + log p(z) for z (…, B, d), x (B, 784) → (…, B)."""
        return bernoulli_log_likelihood(self.decode(z), x) + self.prior.log_density(z, self.encode)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits from the latent vector of all layers (here the one): (…, d) → (…, 784)."""
        return self.decode(z)

    def decode_layer(self, index: int, z: torch.Tensor) -> torch.Tensor:
        """Logits from layer ``index`` (0 here) of the latent vector z (…, d): the decoder itself."""
        return self.decode(z)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoder means E[x|z] = sigmoid(logits) for z ~ p(z): (n, 784) in [0, 1]."""
        z = self.prior.sample(n, generator, self.encode, like=self.decoder_out.weight)
        return torch.sigmoid(self.decode(z))

    # ---- fast forms for evaluation -------------------------------------------------------------

    def log_likelihood_for(self, x: torch.Tensor) -> Callable[..., torch.Tensor]:
        """log p(x|·) for this batch x as a function of z (…, B, d) → (…, B) by ``bernoulli_data_term`` (the data
        term over the hidden units, softplus in base 2), without autograd, in eval mode; the decoder's hidden
        layers by ``evaluation_mlp``."""
        return bernoulli_data_term(evaluation_mlp(self.decoder, self.activation), self.decoder_out, x)

    def log_joint_score(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """∇_z log p(x, z) derived by hand for the standard prior and ReLU layers (the configurations the gap
        optimisation looks this up for, ``vaelab.gaps``), without autograd: z (…, B, d), x (B, 784) → (…, B, d).

        With h₀ = z, hₖ = relu(hₖ₋₁Wₖᵀ + bₖ) and ℓ = h_L W_outᵀ + b_out: ∂/∂ℓ Σⱼ [xⱼℓⱼ − softplus(ℓⱼ)] =
        x − sigmoid(ℓ); back through a linear layer ∂/∂(input) = ∂/∂(output) W, through ReLU kept where h > 0;
        log N(z; 0, I) adds −z.
        Equal to autograd's gradient (tests/test_gaps.py)."""
        layers, out = linear_layers(self.decoder), self.decoder_out
        hidden = [z.reshape(-1, z.shape[-1])]                                   # (N, d), N = …·B
        for layer in layers:
            hidden.append(torch.addmm(layer.bias, hidden[-1], layer.weight.t()).relu_())   # (N, H)
        s = torch.addmm(out.bias, hidden[-1], out.weight.t()).sigmoid_()        # (N, 784) sigmoid(ℓ)
        d_logits = s.view(*z.shape[:-1], -1).neg_().add_(x)                     # (…, B, 784) x − sigmoid(ℓ)
        d = d_logits.view(len(s), -1) @ out.weight                              # (N, H)
        for layer, h in zip(reversed(layers), reversed(hidden[1:])):
            d = torch.ops.aten.threshold_backward(d, h, 0.0) @ layer.weight     # (N, in)
        return d.view(z.shape) - z

    def bf16_log_likelihood_for(self, x: torch.Tensor, mm: Callable) -> Callable[..., torch.Tensor]:
        """``log_likelihood_for`` with the decoder's matrix products in bfloat16 (``mm``: a product of
        ``vaelab.precision``, native or emulated): weights and activations are rounded to bf16 as they enter a
        product, each bf16 result is widened to float32 for its bias, activation, softplus and every sum.

        The data term Σⱼ xⱼℓⱼ is taken from the same rounded logits as the softplus: a rounding δ of ℓⱼ then
        moves the pixel's log-likelihood xⱼℓⱼ − softplus(ℓⱼ) by (xⱼ − sigmoid ℓⱼ)δ, nothing for a confident
        pixel. (The float32 form's h·(W_outᵀx) would take it from unrounded logits, and the two roundings
        would not cancel: up to 2⁻⁹|ℓⱼ| per confident pixel.)
        """
        bf16 = torch.bfloat16
        layers = [(layer.weight.t().to(bf16), layer.bias) for layer in linear_layers(self.decoder)]  # (in, out)
        weight2 = (self.decoder_out.weight * LOG2_E).t().to(bf16)                # (H, 784) W_outᵀ log₂e
        bias2 = self.decoder_out.bias * LOG2_E                                   # (784,)
        x_b = x @ self.decoder_out.bias                                          # (B,) b_out·x
        act = ACTIVATIONS[self.activation].inplace

        def log_likelihood(z: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
            batch = z.shape[:-1]
            h = z.reshape(-1, z.shape[-1])                                       # (…·B, d)
            for weight, bias in layers:
                h = act(mm(h.to(bf16), weight).float().add_(bias))               # (…·B, H)
            y = mm(h.to(bf16), weight2).float()                                  # (…·B, 784) (ℓ − b_out) log₂e
            # Σⱼ xⱼℓⱼ = ln 2 · Σⱼ xⱼ yⱼ + b_out·x, before softplus_sum works in place on y
            data = torch.mul(y.view(*batch, -1), x).sum(-1).mul_(LN_2).add_(x_b)   # (…, B)
            return data - softplus_sum(y.add_(bias2), base2=True).view(batch)

        return log_likelihood

    def gauss_newton_precision(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Jᵀ diag(s(1−s)) J + I for z (B, d), J = ∂logits/∂z (B, 784, d), s = sigmoid(logits): (B, d, d).

        The generalised Gauss–Newton form of −∇²_z log p(x, z): the Hessian of the Bernoulli term is
        −Jᵀ diag(s(1−s)) J − Σⱼ (xⱼ − sⱼ) ∇²ℓⱼ, and ∇²ℓⱼ = 0 wherever a ReLU decoder is linear in z, so
        for ReLU this is the exact Hessian almost everywhere; positive definite always (a search direction
        for any activation; the Laplace estimate itself always uses the exact Hessian).
        """
        jac = torch.func.vmap(torch.func.jacfwd(self.decode))(z)                # (B, 784, d)
        s = torch.sigmoid(self.decode(z))                                       # (B, 784)
        eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
        return torch.einsum("bjd,bj,bje->bde", jac, s * (1 - s), jac) + eye

    def laplace_curvature(self):
        """Gauss–Newton search directions where the prior is N(0, I) (its Hessian is −I), else the exact one."""
        return self.gauss_newton_precision if self.config.prior == "standard" else None

    def fused_layers(self) -> list[nn.Linear]:
        """The four linear layers of a one-hidden-layer model, in the order the fused step uses them."""
        return [*linear_layers(self.encoder), self.encoder_out, *linear_layers(self.decoder), self.decoder_out]
