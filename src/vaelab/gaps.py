"""Where the nats go (Cremer, Li & Duvenaud 2018, "Inference Suboptimality in Variational Autoencoders"):

    log p(x) − ELBO[q]  =  [log p(x) − ELBO[q*]]  +  [ELBO[q*] − ELBO[q]]
                            approximation gap        amortisation gap

q is the encoder's q(z|x); q* the best member of a Gaussian family for this digit alone, found by optimising
the family's per-digit parameters; log p(x) is estimated by IWAE-K (a lower bound: the approximation gap
measured with it is itself a lower bound of the true one, by IWAE-K's own gap).

The family optimised is a diagonal Gaussian N(m, diag s²) over every latent of the model (all layers at
once): for a one-layer model without a flow it is the encoder's own family, so the amortisation gap is exactly
Cremer et al.'s; for a hierarchy or a flow it is a simpler family than the model's q (whose layers depend on
each other), and the record says so. Its ELBO,

    ELBO(m, s) = E_ε[log p(x, m + s ⊙ ε)] + Σᵢ log sᵢ + (D/2) log 2πe,            ε ~ N(0, I)

(the Gaussian's entropy in closed form), is maximised per digit by Adam on (m, log s²) with fresh draws each
step, all digits of a batch together, starting from the encoder's q. The gradient of log p(x, z) in z comes from
autograd, or for the default model's configurations (one layer, standard prior, ReLU) from a form derived by
hand, about three times faster (``HAND_DERIVED_FORMS``).

Stopping rule: every ``CHECK`` steps each digit's ELBO is estimated on the same fixed draws (common random
numbers, so a change is the parameters' and not the draws'); a digit whose estimate rose by less than ``TOL``
nats since the last check has converged and stops moving. The steps and the converged fraction are reported.
Finally ELBO[q*] and the start's ELBO are estimated with ``FINAL_DRAWS`` common draws each, and a digit keeps
the better of q* and its start, so the optimiser never leaves a digit below where it began. Where q* is in the
model's own family the start's estimate is ELBO[q]; otherwise ELBO[q] is the model's own, on ``FINAL_DRAWS``
further draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from vaelab.models import MLPVAE
from vaelab.objectives import LOG_2PI, log_standard_normal

CHECK = 25                  # steps between plateau checks
TOL = 0.01                  # nats: a check that gains less than this is a plateau
CHECK_DRAWS = 32            # fixed draws of the convergence checks (a set per digit)
FINAL_DRAWS = 500           # the final ELBO[q*] and start estimates: a set per digit, common to the two
STEP_DRAWS = 4              # fresh draws per optimisation step
LEARNING_RATE = 0.1         # Adam's first rate, on (m, log s²), halved on each plateau
ROWS = 1000                 # decoded rows (draws × digits) per product of the ELBO estimates
HALVINGS = 3                # plateaus (rates 0.1, 0.05, 0.025) before a digit has converged


@dataclass
class GapResult:
    """Per digit (B,): ELBO[q*] and ELBO[q] with the standard errors of their Monte Carlo estimates, the steps
    taken and whether the stopping rule was met before the last step."""

    elbo_optimised: torch.Tensor
    elbo_optimised_stderr: torch.Tensor
    elbo_encoder: torch.Tensor
    elbo_encoder_stderr: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor


def gaussian_elbo(joint_for, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                  eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ELBO of N(μ, diag σ²) per digit, estimated on the draws eps, (S, D) shared by the batch or (S, B, D) a set per
    digit: (mean (B,), its Monte Carlo standard error (B,)). The entropy term is exact, so only E[log p(x, z)] is
    estimated, ``ROWS`` decoded rows at a time; ``joint_for(x)`` is log p(x, ·) for this batch (``JointForms``)."""
    log_joint = joint_for(x)
    sigma = torch.exp(0.5 * logvar)                                                     # (B, D)
    eps = eps[:, None, :] if eps.dim() == 2 else eps                                    # (S, 1 or B, D)
    chunk = max(1, ROWS // len(x))
    values = torch.cat([log_joint(mu + sigma * eps[start:start + chunk])             # (chunk, B)
                        for start in range(0, len(eps), chunk)])                        # (S, B)
    entropy = 0.5 * (logvar.shape[-1] * (LOG_2PI + 1.0) + logvar.sum(-1))               # (B,)
    stderr = values.std(0) / math.sqrt(len(values)) if len(values) > 1 else torch.zeros_like(entropy)
    return values.mean(0) + entropy, stderr


@dataclass(frozen=True)
class JointForms:
    """What the optimisation needs of a model: log p(x, z) without gradients and its gradient in z.

    ``joint_for(x)`` for a batch x (B, 784) returns z (S, B, D) → log p(x, z) (S, B) (work that depends on x alone
    done once); ``score(z, x)`` is ∇_z log p(x, z) (S, B, D)."""

    joint_for: Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def autograd_forms(log_joint: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> JointForms:
    """The forms of any log p(x, z) given as ``log_joint(z, x)``, its gradient by autograd."""

    def score(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(log_joint(z, x).sum(), z)
        return gradient

    return JointForms(lambda x: lambda z: log_joint(z, x), score)


def optimise_gaussians(forms: JointForms, x: torch.Tensor, mu0: torch.Tensor, logvar0: torch.Tensor, max_steps: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, GapResult]:
    """Maximise every digit's Gaussian ELBO from (μ₀, log σ₀²) (B, D): returns (μ*, log σ*², the result).

    ``forms`` gives log p(x, z) and its gradient in z (``JointForms``). With z = μ + e^{v/2} ε and v = log σ², the
    ELBO's gradient on the step's draws is

        ∂ELBO/∂μ = E_ε[∇_z log p(x, z)],    ∂ELBO/∂v = E_ε[∇_z log p(x, z) ⊙ ε] ⊙ ½e^{v/2} + ½

    (the chain rule through z, and ½ from the entropy ½ Σ v). Adam (β 0.9, 0.999) on (μ, v) with a learning rate
    per digit, reduced on a plateau: every ``CHECK`` steps a digit's ELBO on its fixed draws is compared with the
    best so far; a rise below ``TOL`` halves its rate, and after ``HALVINGS`` halvings it has converged and stops
    moving (the noise of a few draws per step cannot pass for progress, nor hide it, at the smallest rate). Only
    the digits still moving are computed."""
    batch, d = mu0.shape
    params = torch.cat([mu0, logvar0], -1).detach().clone()                        # (B, 2D)
    first, second = torch.zeros_like(params), torch.zeros_like(params)
    rate = torch.full((batch, 1), LEARNING_RATE, dtype=params.dtype, device=params.device)
    halvings = torch.zeros(batch, dtype=torch.long, device=params.device)
    check_eps = torch.randn((CHECK_DRAWS, batch, d), generator=generator, dtype=mu0.dtype, device=mu0.device)
    with torch.no_grad():
        best, _ = gaussian_elbo(forms.joint_for, x, mu0, logvar0, check_eps)
    moving = torch.ones(batch, dtype=torch.bool, device=mu0.device)
    steps = torch.zeros(batch, dtype=torch.long, device=mu0.device)
    with torch.no_grad():
        for step in range(1, max_steps + 1):
            active = moving.nonzero().squeeze(1)
            eps = torch.randn((STEP_DRAWS, 1, d), generator=generator, dtype=mu0.dtype, device=mu0.device)
            mu, logvar = params[active, :d], params[active, d:]                    # (A, D) each
            half_sigma = 0.5 * torch.exp(0.5 * logvar)
            g = forms.score(mu + 2.0 * half_sigma * eps, x[active])                      # (S, A, D)
            gradient = torch.cat([g.mean(0), (g * eps).mean(0) * half_sigma + 0.5], -1)   # ascent direction
            first[active] = 0.9 * first[active] + 0.1 * gradient
            second[active] = 0.999 * second[active] + 0.001 * gradient.square()
            corrected = (first[active] / (1 - 0.9 ** step)) / ((second[active] / (1 - 0.999 ** step)).sqrt() + 1e-8)
            params[active] += rate[active] * corrected
            params[:, d:].clamp_(-30.0, 10.0)
            steps[active] = step
            if step % CHECK == 0:
                now, _ = gaussian_elbo(forms.joint_for, x[active], params[active, :d], params[active, d:],
                                       check_eps[:, active])
                rose = now - best[active] >= TOL
                best[active] = torch.maximum(best[active], now)
                halvings[active] += (~rose).long()
                rate[active] = torch.where(rose[:, None], rate[active], rate[active] * 0.5)
                moving[active] = halvings[active] < HALVINGS
            if not bool(moving.any()):
                break
        mu, logvar = params[:, :d], params[:, d:]
        final_eps = torch.randn((FINAL_DRAWS, batch, d), generator=generator, dtype=mu0.dtype, device=mu0.device)
        optimised, optimised_se = gaussian_elbo(forms.joint_for, x, mu, logvar, final_eps)
        start, start_se = gaussian_elbo(forms.joint_for, x, mu0, logvar0, final_eps)
        better = optimised >= start                                  # never below where the digit began
        mu_star = torch.where(better[:, None], mu, mu0)
        logvar_star = torch.where(better[:, None], logvar, logvar0)
        result = GapResult(torch.where(better, optimised, start), torch.where(better, optimised_se, start_se),
                           start, start_se, steps, ~moving)
    return mu_star, logvar_star, result


def encoder_gaussian(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The start of the optimisation, (μ, log σ²) (B, D) over every latent: the means and log-variances of q's
    layers along the means (for a one-layer model without a flow, q(z|x) itself)."""
    with torch.no_grad():
        parts = model(x, torch.zeros((1, len(x), model.config.total_latent), dtype=x.dtype, device=x.device))
        logvar = torch.cat([layer.q_logvar.expand_as(layer.z)[0] for layer in parts.layers], -1)
        return model.posterior_start(x), logvar


def family_of(model) -> str:
    """Which family q* is optimised in, said in the record."""
    config = model.config
    if own_family(model):
        return "the encoder's own: a diagonal Gaussian q(z|x), its mean and log-variance optimised per digit"
    return (f"a diagonal Gaussian over all {config.total_latent} latents, its means and log-variances optimised per "
            f"digit: simpler than this model's q ({'a flow' if config.flow_steps else 'layers that depend on each other'}),"
            f" so the amortisation gap here also holds the difference of the two families")


def own_elbo(model, x: torch.Tensor, draws: int, generator: torch.Generator, chunk: int = 100
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """ELBO[q] with the model's own q (flows, hierarchies and all), log p(x, z) − log q(z|x) averaged over
    ``draws`` draws per digit: (mean (B,), its Monte Carlo standard error (B,))."""
    values = []
    with torch.no_grad():
        for start in range(0, draws, chunk):
            n = min(chunk, draws - start)
            eps = torch.randn((n, 1, model.config.total_latent), generator=generator, dtype=x.dtype, device=x.device)
            values.append(model(x, eps.expand(n, len(x), -1)).log_weights())            # (n, B)
    values = torch.cat(values)
    return values.mean(0), values.std(0) / math.sqrt(len(values))


def _relu_mlp_forms(model: MLPVAE) -> JointForms:
    """The one-layer MLP with the standard prior and ReLU layers: log p(x|z) by its evaluation fast form
    (``log_likelihood_for``), the gradient by hand (``log_joint_score``)."""

    def joint_for(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        log_likelihood = model.log_likelihood_for(x)
        return lambda z: log_likelihood(z) + log_standard_normal(z)

    return JointForms(joint_for, model.log_joint_score)


# Hand-derived forms by lookup, (model class, activation) → forms, for the models whose ``fast`` forms apply (the
# standard prior, no flow); every other model gets ``autograd_forms`` of its log_joint. Equal on the same draws
# (tests/test_gaps.py).
HAND_DERIVED_FORMS: dict[tuple[type, str], Callable[..., JointForms]] = {(MLPVAE, "relu"): _relu_mlp_forms}


def joint_forms(model) -> JointForms:
    hand = HAND_DERIVED_FORMS.get((type(model), model.config.activation))
    return hand(model) if hand is not None and getattr(model, "fast", False) else autograd_forms(model.log_joint)


def own_family(model) -> bool:
    """Whether q* is optimised in the model's own family (one stochastic layer, no flow): then ELBO[q] is the start's
    estimate, on the same draws as ELBO[q*]."""
    return len(model.config.latent) == 1 and model.config.flow_steps == 0


def gap_batch(model, x: torch.Tensor, max_steps: int, generator: torch.Generator) -> GapResult:
    """The gap optimisation of one batch of digits x (B, 784) against the model's log p(x, z); ELBO[q] is the
    encoder's Gaussian's on the final draws where it is the model's own q, else the model's own ELBO
    (``own_elbo``: flows, hierarchies); ELBO[q*] that of the optimised Gaussian."""
    mu0, logvar0 = encoder_gaussian(model, x)
    model.requires_grad_(False)
    try:
        _, _, result = optimise_gaussians(joint_forms(model), x, mu0, logvar0, max_steps, generator)
    finally:
        model.requires_grad_(True)
    if not own_family(model):
        result.elbo_encoder, result.elbo_encoder_stderr = own_elbo(model, x, FINAL_DRAWS, generator)
    return result
