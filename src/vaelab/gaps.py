"""Where the nats go (Cremer, Li & Duvenaud 2018, "Inference Suboptimality in Variational Autoencoders"):

    log p(x) − ELBO[q]  =  [log p(x) − ELBO[q*]]  +  [ELBO[q*] − ELBO[q]]
                            approximation gap        amortisation gap

q is the encoder's q(z|x); q* the best member of a Gaussian family for this digit alone, found by optimising
the family's per-digit parameters; log p(x) is estimated by IWAE-K (a lower bound: the approximation gap
measured with it is itself a lower bound of the true one, by IWAE-K's own gap).

The family optimised is, for a Ladder VAE (top-down inference), its own q with the bottom-up Gaussians
(μ̂ₗ, log σ̂ₗ²) of every layer as the per-digit parameters (``PER_DIGIT_FAMILIES``, ``optimise_family``: the
reparameterisation gradient by autograd, the entropy estimated with the rest); for every other model a diagonal
Gaussian N(m, diag s²) over every latent of the model (all layers at once): for a one-layer model without a flow
it is the encoder's own family, so the amortisation gap is exactly Cremer et al.'s; for a bottom-up hierarchy or a
flow it is a simpler family than the model's q (whose layers depend on each other), and the record says so. The
Gaussian's ELBO,

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

from vaelab.models import HierarchicalVAE, MLPVAE
from vaelab.objectives import LOG_2PI, chunked_log_weights, log_mean_exp, log_standard_normal

CHECK = 25                  # steps between plateau checks
TOL = 0.01                  # nats: a check that gains less than this is a plateau
CHECK_DRAWS = 32            # fixed draws of the convergence checks (a set per digit)
FINAL_DRAWS = 500           # the final ELBO[q*] and start estimates: a set per digit, common to the two
STEP_DRAWS = 4              # fresh draws per optimisation step
LEARNING_RATE = 0.1         # Adam's first rate, on (m, log s²), halved on each plateau
ROWS = 1000                 # decoded rows (draws × digits) per product of the ELBO estimates
HALVINGS = 3                # plateaus (rates 0.1, 0.05, 0.025) before a digit has converged
CONVERGED_ENOUGH = 0.9      # below this fraction of converged digits the record warns (the runs above: 99.5 %+)


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
    # IWAE-FINAL_DRAWS with q* (the q kept) as the proposal, on the final draws of ELBO[q*]: a second estimate of
    # log p(x), far better than IWAE-K with the encoder's q where that q is a poor proposal (a large amortisation gap)
    log_px_optimised: torch.Tensor


def _over_draws(fn: Callable[[torch.Tensor], torch.Tensor], eps: torch.Tensor, batch: int) -> torch.Tensor:
    """fn of the draws eps (S, …) → (S, B), ``ROWS`` decoded rows (draws × digits) at a time."""
    return chunked_log_weights(lambda start, n: fn(eps[start:start + n]), len(eps), max(1, ROWS // batch))  # (S, B)


def _monte_carlo_stderr(values: torch.Tensor) -> torch.Tensor:
    """The standard error of the mean over draws of values (S, B): (B,), zero for one draw."""
    if len(values) > 1:
        return values.std(0) / math.sqrt(len(values))
    return torch.zeros(values.shape[1], dtype=values.dtype, device=values.device)


def gaussian_elbo(joint_for, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                  eps: torch.Tensor, iwae: bool = False) -> tuple[torch.Tensor, ...]:
    """ELBO of N(μ, diag σ²) per digit, estimated on the draws eps, (S, D) shared by the batch or (S, B, D) a set per
    digit: (mean (B,), its Monte Carlo standard error (B,)). The entropy term is exact, so only E[log p(x, z)] is
    estimated, ``ROWS`` decoded rows at a time; ``joint_for(x)`` is log p(x, ·) for this batch (``JointForms``).
    With ``iwae`` also IWAE-S with this Gaussian as the proposal on the same draws (B,): log (1/S) Σ p(x, z)/q(z),
    log q(z) = −½ Σᵢ (log 2π + log σᵢ² + εᵢ²) at z = μ + σ ⊙ ε."""
    log_joint = joint_for(x)
    sigma = torch.exp(0.5 * logvar)                                                     # (B, D)
    eps = eps[:, None, :] if eps.dim() == 2 else eps                                    # (S, 1 or B, D)
    values = _over_draws(lambda e: log_joint(mu + sigma * e), eps, len(x))             # (S, B)
    entropy = 0.5 * (logvar.shape[-1] * (LOG_2PI + 1.0) + logvar.sum(-1))               # (B,)
    stderr = _monte_carlo_stderr(values)
    if not iwae:
        return values.mean(0) + entropy, stderr
    log_q = -0.5 * (logvar.shape[-1] * LOG_2PI + logvar.sum(-1) + eps.square().sum(-1))  # (S, B)
    return values.mean(0) + entropy, stderr, log_mean_exp(values - log_q, 0)


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


class PlateauAdam:
    """Adam ascent (β 0.9, 0.999) on per-digit parameters (B, P), a learning rate per digit reduced on a plateau:
    every ``CHECK`` steps a digit's ELBO on its fixed draws is compared with the best so far; a rise below ``TOL``
    halves its rate, and after ``HALVINGS`` halvings it has converged and stops moving (the noise of a few draws
    per step cannot pass for progress, nor hide it, at the smallest rate). Only the digits still moving are
    computed (``active``)."""

    def __init__(self, params: torch.Tensor, best: torch.Tensor):
        batch = len(params)
        self.params = params.detach().clone()                                          # (B, P)
        self.first, self.second = torch.zeros_like(self.params), torch.zeros_like(self.params)
        self.rate = torch.full((batch, 1), LEARNING_RATE, dtype=params.dtype, device=params.device)
        self.halvings = torch.zeros(batch, dtype=torch.long, device=params.device)
        self.moving = torch.ones(batch, dtype=torch.bool, device=params.device)
        self.steps = torch.zeros(batch, dtype=torch.long, device=params.device)
        self.best = best                                                               # (B,) the start's ELBO

    def active(self) -> torch.Tensor:
        return self.moving.nonzero().squeeze(1)

    def step(self, step: int, active: torch.Tensor, gradient: torch.Tensor) -> None:
        """One ascent step of the active digits along ``gradient`` (A, P), the ELBO's gradient."""
        self.first[active] = 0.9 * self.first[active] + 0.1 * gradient
        self.second[active] = 0.999 * self.second[active] + 0.001 * gradient.square()
        corrected = (self.first[active] / (1 - 0.9 ** step)) / ((self.second[active] / (1 - 0.999 ** step)).sqrt() + 1e-8)
        self.params[active] += self.rate[active] * corrected
        self.steps[active] = step

    def check(self, active: torch.Tensor, now: torch.Tensor) -> None:
        """The plateau rule, given the active digits' ELBO ``now`` (A,) on their fixed draws."""
        rose = now - self.best[active] >= TOL
        self.best[active] = torch.maximum(self.best[active], now)
        self.halvings[active] += (~rose).long()
        self.rate[active] = torch.where(rose[:, None], self.rate[active], self.rate[active] * 0.5)
        self.moving[active] = self.halvings[active] < HALVINGS


def _result(optimised, optimised_se, optimised_iwae, start, start_se, start_iwae,
            ascent: PlateauAdam) -> tuple[torch.Tensor, GapResult]:
    """A digit keeps the better of q* and its start (never below where it began): (which, the result)."""
    better = optimised >= start
    return better, GapResult(torch.where(better, optimised, start), torch.where(better, optimised_se, start_se),
                             start, start_se, ascent.steps, ~ascent.moving,
                             torch.where(better, optimised_iwae, start_iwae))


def optimise_gaussians(forms: JointForms, x: torch.Tensor, mu0: torch.Tensor, logvar0: torch.Tensor, max_steps: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, GapResult]:
    """Maximise every digit's Gaussian ELBO from (μ₀, log σ₀²) (B, D): returns (μ*, log σ*², the result).

    ``forms`` gives log p(x, z) and its gradient in z (``JointForms``). With z = μ + e^{v/2} ε and v = log σ², the
    ELBO's gradient on the step's draws is

        ∂ELBO/∂μ = E_ε[∇_z log p(x, z)],    ∂ELBO/∂v = E_ε[∇_z log p(x, z) ⊙ ε] ⊙ ½e^{v/2} + ½

    (the chain rule through z, and ½ from the entropy ½ Σ v), followed by ``PlateauAdam``."""
    batch, d = mu0.shape
    check_eps = torch.randn((CHECK_DRAWS, batch, d), generator=generator, dtype=mu0.dtype, device=mu0.device)
    with torch.no_grad():
        best, _ = gaussian_elbo(forms.joint_for, x, mu0, logvar0, check_eps)
    ascent = PlateauAdam(torch.cat([mu0, logvar0], -1), best)                          # (B, 2D)
    params = ascent.params
    with torch.no_grad():
        for step in range(1, max_steps + 1):
            active = ascent.active()
            eps = torch.randn((STEP_DRAWS, 1, d), generator=generator, dtype=mu0.dtype, device=mu0.device)
            mu, logvar = params[active, :d], params[active, d:]                    # (A, D) each
            half_sigma = 0.5 * torch.exp(0.5 * logvar)
            g = forms.score(mu + 2.0 * half_sigma * eps, x[active])                      # (S, A, D)
            gradient = torch.cat([g.mean(0), (g * eps).mean(0) * half_sigma + 0.5], -1)   # ascent direction
            ascent.step(step, active, gradient)
            params[:, d:].clamp_(-30.0, 10.0)
            if step % CHECK == 0:
                now, _ = gaussian_elbo(forms.joint_for, x[active], params[active, :d], params[active, d:],
                                       check_eps[:, active])
                ascent.check(active, now)
            if not bool(ascent.moving.any()):
                break
        mu, logvar = params[:, :d], params[:, d:]
        final_eps = torch.randn((FINAL_DRAWS, batch, d), generator=generator, dtype=mu0.dtype, device=mu0.device)
        optimised, optimised_se, optimised_iwae = gaussian_elbo(forms.joint_for, x, mu, logvar, final_eps, iwae=True)
        start, start_se, start_iwae = gaussian_elbo(forms.joint_for, x, mu0, logvar0, final_eps, iwae=True)
        better, result = _result(optimised, optimised_se, optimised_iwae, start, start_se, start_iwae, ascent)
        mu_star = torch.where(better[:, None], mu, mu0)
        logvar_star = torch.where(better[:, None], logvar, logvar0)
    return mu_star, logvar_star, result


def family_elbo(log_weights: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                theta: torch.Tensor, eps: torch.Tensor, iwae: bool = False) -> tuple[torch.Tensor, ...]:
    """ELBO of the q with per-digit parameters θ (B, P), estimated on eps (S, B, D) a set per digit: (mean (B,),
    its Monte Carlo standard error (B,)); ``log_weights(x, θ, ε)`` is log p(x, z) − log q_θ(z) (S, B) at the
    draws z the family makes of ε. ``ROWS`` rows at a time. With ``iwae`` also IWAE-S with q_θ as the proposal on
    the same draws (B,)."""
    values = _over_draws(lambda e: log_weights(x, theta, e), eps, len(x))               # (S, B)
    stderr = _monte_carlo_stderr(values)
    return (values.mean(0), stderr, log_mean_exp(values, 0)) if iwae else (values.mean(0), stderr)


def optimise_family(log_weights: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                    theta0: torch.Tensor, latent: int, max_steps: int, generator: torch.Generator,
                    clamp: slice | None = None) -> tuple[torch.Tensor, GapResult]:
    """Maximise every digit's ELBO over its own parameters θ (B, P) of a reparameterised family (``family_elbo``)
    from θ₀: the gradient of the step's estimate E_ε[log p(x, z_θ(ε)) − log q_θ(z_θ(ε))] by autograd (the
    reparameterisation gradient, entropy included), ``STEP_DRAWS`` draws shared by the batch, then
    ``PlateauAdam`` as for the Gaussians; ``clamp`` the columns of log-variances, kept in [−30, 10]. Returns
    (θ*, the result), with ELBO[q] the start's estimate on the same final draws (θ₀ is the encoder's q)."""
    batch, dtype, device = len(theta0), theta0.dtype, theta0.device
    check_eps = torch.randn((CHECK_DRAWS, batch, latent), generator=generator, dtype=dtype, device=device)
    with torch.no_grad():
        best, _ = family_elbo(log_weights, x, theta0, check_eps)
    ascent = PlateauAdam(theta0, best)
    params = ascent.params
    for step in range(1, max_steps + 1):
        active = ascent.active()
        eps = torch.randn((STEP_DRAWS, 1, latent), generator=generator, dtype=dtype, device=device)
        theta = params[active].requires_grad_(True)                                    # (A, P)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(log_weights(x[active], theta, eps.expand(-1, len(active), -1))
                                              .mean(0).sum(), theta)
        with torch.no_grad():
            ascent.step(step, active, gradient)
            if clamp is not None:
                params[:, clamp].clamp_(-30.0, 10.0)
            if step % CHECK == 0:
                now, _ = family_elbo(log_weights, x[active], params[active], check_eps[:, active])
                ascent.check(active, now)
        if not bool(ascent.moving.any()):
            break
    with torch.no_grad():
        final_eps = torch.randn((FINAL_DRAWS, batch, latent), generator=generator, dtype=dtype, device=device)
        optimised, optimised_se, optimised_iwae = family_elbo(log_weights, x, params, final_eps, iwae=True)
        start, start_se, start_iwae = family_elbo(log_weights, x, theta0, final_eps, iwae=True)
        better, result = _result(optimised, optimised_se, optimised_iwae, start, start_se, start_iwae, ascent)
        theta_star = torch.where(better[:, None], params, theta0)
    return theta_star, result


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
    family = per_digit_family(model)
    if family is not None:
        return family.about
    if own_family(model):
        return "the encoder's own: a diagonal Gaussian q(z|x), its mean and log-variance optimised per digit"
    return (f"a diagonal Gaussian over all {config.total_latent} latents, its means and log-variances optimised per "
            f"digit: simpler than this model's q ({'a flow' if config.flow_steps else 'layers that depend on each other'}),"
            f" so the amortisation gap here also holds the difference of the two families")


def own_elbo(model, x: torch.Tensor, draws: int, generator: torch.Generator, chunk: int = 100
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """ELBO[q] with the model's own q (flows, hierarchies and all), log p(x, z) − log q(z|x) averaged over
    ``draws`` draws per digit: (mean (B,), its Monte Carlo standard error (B,))."""
    def log_weights(_: int, n: int) -> torch.Tensor:                                 # the draws in order, n at a time
        eps = torch.randn((n, 1, model.config.total_latent), generator=generator, dtype=x.dtype, device=x.device)
        return model(x, eps.expand(n, len(x), -1)).log_weights()                        # (n, B)

    with torch.no_grad():
        values = chunked_log_weights(log_weights, draws, chunk)                         # (S, B)
    return values.mean(0), _monte_carlo_stderr(values)


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


@dataclass(frozen=True)
class PerDigitFamily:
    """A model's own q written with per-digit parameters θ (B, P): ``start(x)`` the encoder's θ₀ for a batch,
    ``log_weights(x, θ, ε)`` log p(x, z) − log q_θ(z) (S, B) at the draws z the family makes of ε (S, B, D),
    ``clamp`` the columns of θ that are log-variances, ``about`` the record's words for it."""

    start: Callable[[torch.Tensor], torch.Tensor]
    log_weights: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    clamp: slice
    about: str


def _ladder_family(model: HierarchicalVAE) -> PerDigitFamily:
    """The Ladder VAE's q: given the bottom-up Gaussians N(μ̂ₗ, σ̂ₗ²) of every layer, q(z|x) is fixed (each layer
    merged top-down with p(zₗ|zₗ₊₁) by precision weighting), so they are what its encoder amortises; optimising
    them per digit finds the best member of the ladder's own family (Cremer et al.'s amortisation gap for it)."""
    d = model.config.total_latent
    return PerDigitFamily(model.bottom_up, lambda x, theta, eps: model(x, eps, theta).log_weights(), slice(d, None),
                          f"the ladder's own q: the bottom-up Gaussians (μ̂ₗ, log σ̂ₗ²) of its {len(model.sizes)} layers "
                          f"optimised per digit, merged top-down with p as in the model")


# Families with per-digit parameters other than one diagonal Gaussian, by lookup (model class, inference); a model
# not here gets the diagonal Gaussian over all its latents (its own family for one layer without a flow).
PER_DIGIT_FAMILIES: dict[tuple[type, str], Callable[..., PerDigitFamily]] = {
    (HierarchicalVAE, "top-down"): _ladder_family}


def per_digit_family(model) -> PerDigitFamily | None:
    make = PER_DIGIT_FAMILIES.get((type(model), model.config.inference))
    return make(model) if make is not None and model.config.flow_steps == 0 else None


def own_family(model) -> bool:
    """Whether q* is optimised in the model's own family (one stochastic layer without a flow, or a family of
    ``PER_DIGIT_FAMILIES``): then ELBO[q] is the start's estimate, on the same draws as ELBO[q*]."""
    return (len(model.config.latent) == 1 and model.config.flow_steps == 0) or per_digit_family(model) is not None


def gap_batch(model, x: torch.Tensor, max_steps: int, generator: torch.Generator) -> GapResult:
    """The gap optimisation of one batch of digits x (B, 784) against the model's log p(x, z); ELBO[q] is the
    encoder's on the final draws where q* is in the model's own family, else the model's own ELBO (``own_elbo``:
    flows, bottom-up hierarchies); ELBO[q*] that of the optimised q."""
    family = per_digit_family(model)
    model.requires_grad_(False)
    try:
        if family is not None:
            with torch.no_grad():
                theta0 = family.start(x)                                                  # (B, P)
            _, result = optimise_family(family.log_weights, x, theta0, model.config.total_latent, max_steps, generator,
                                        family.clamp)
            return result
        mu0, logvar0 = encoder_gaussian(model, x)
        _, _, result = optimise_gaussians(joint_forms(model), x, mu0, logvar0, max_steps, generator)
    finally:
        model.requires_grad_(True)
    if not own_family(model):
        result.elbo_encoder, result.elbo_encoder_stderr = own_elbo(model, x, FINAL_DRAWS, generator)
    return result


def gap_warning(gaps: dict) -> str | None:
    """What the gap decomposition ``gaps`` (a record's "gaps": `evaluate --gaps`) should not be read as, from its
    numbers alone, or None. The record keeps the text it was written with; `evaluate`, the report and compare show
    this one, so that a record written before a warning existed gets it too (until 2026-12-07 a record of
    --gap-steps 20 from before the convergence warning showed 0.0 % converged and no warning)."""
    from vaelab.evaluation import EvalConfig
    from vaelab.tables import plural

    def mean(name: str) -> float | None:          # null where it was not finite (``records.strict_json``)
        return (gaps.get(name) or {}).get("mean")

    steps = plural(gaps["max_steps"], "step")
    warnings = []
    if (mean("amortisation_gap") or 0) < 0:
        # q* can only be below the model's own q when the family is simpler than q (a hierarchy, a flow) and the
        # optimiser did not reach that family's best from where it started
        warnings.append(f"ELBO[q*] is below the model's own ELBO[q] by {-mean('amortisation_gap'):.3g} nats: the "
                        f"diagonal Gaussian, started from q's layers along their means, did not reach a member as good "
                        f"as this model's q in {steps} (its layers depend on each other), so these two gaps do not "
                        f"measure the encoder and the family here")
    if (mean("approximation_gap") or 0) < 0:
        # ELBO[q*] ≤ log p(x) for every q, so a log p̂(x) below it is an estimate that has not converged: the
        # encoder's q is a poor proposal (IWAE-K gains at most about log K over its ELBO when q misses the posterior)
        better = mean("log_px_optimised")
        warnings.append(
            f"log p̂(x) by {gaps['log_px_estimator']} with the encoder's q is below ELBO[q*] by "
            f"{-mean('approximation_gap'):.3g} nats, and ELBO[q*] is a lower bound of log p(x): that estimate has not "
            f"converged (q is a poor proposal for this model), so the NLL from it overstates the model's by at least "
            f"as much" + (f"; {gaps.get('log_px_optimised_estimator', f'IWAE-{FINAL_DRAWS} with q* as the proposal')} "
                          f"gives {better:.2f}" if better is not None else ""))
    if gaps["converged_fraction"] < CONVERGED_ENOUGH:
        # a q* stopped short of its family's best: its ELBO is too low, which moves nats from the amortisation gap to
        # the approximation gap (until 2026-12-06 only the fraction said so: --gap-steps 20 read 0.0 %, no warning)
        warnings.append(
            f"only {100 * gaps['converged_fraction']:.1f} % of the digits converged in at most {steps} (the rule "
            f"needs {CHECK * HALVINGS} or more: {HALVINGS} plateaus {CHECK} steps apart), so q* stopped short of its "
            f"family's best for the others: the approximation gap is overstated and the amortisation gap understated "
            f"by what their optimisation had left; give a larger --gap-steps (the default is {EvalConfig.gap_steps})")
    # until 2026-12-07 joined by a space alone, so that two ran on as one sentence ("… gives -474.05 only 0.0 % …")
    return "; ".join(warnings) or None
