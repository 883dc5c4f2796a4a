"""The objectives against closed forms, torch.distributions and Monte Carlo, with stated tolerances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from vaelab.objectives import (bernoulli_log_likelihood, elbo, iwae_bound, kl_standard_normal, log_normal_diag,
                               StochasticLayer, log_standard_normal, softplus_sum)

@pytest.fixture(autouse=True)
def float64():
    """These comparisons run in float64; the default is restored for the other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(32, 7, generator=g), torch.randn(32, 7, generator=g)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(kl_standard_normal(mu, logvar), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p_logvar", [-2.0, -60.0, -100.0, -150.0])
def test_gaussian_terms_stay_finite_where_p_is_nearly_deterministic(p_logvar):
    """A ladder's generative p(zₗ|zₗ₊₁) can drive a unit's log σ_p² far below −88, where exp(−log σ_p²) overflows
    float32: written as exp(log σ_q² − log σ_p²) and ((μ_q − μ_p)/σ_p)², the conditional KL and log N(z; μ_p, σ_p²)
    stay finite and equal their float64 values (`ladder-5` gave NaN at epoch 195 with σ_q²·σ_p⁻²: 0 · inf)."""
    g = torch.Generator().manual_seed(3)
    p_mu = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    p_lv = torch.full((2, 3, 4), p_logvar, dtype=torch.float64)
    hat_lv = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    q_lv = -torch.logaddexp(-hat_lv, -p_lv)                                   # a merge: σ_q² ≤ σ_p²
    q_mu = p_mu + torch.randn(2, 3, 4, generator=g, dtype=torch.float64) * torch.exp(0.5 * q_lv)
    eps = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    z = q_mu + torch.exp(0.5 * q_lv) * eps
    # the reference in float64 from the float32 values the layer gets (rounding to float32 moves μ_q and z by
    # more than σ_q itself where σ_p² is tiny)
    z, eps, q_mu, q_lv, p_mu, p_lv = (t.float().double() for t in (z, eps, q_mu, q_lv, p_mu, p_lv))
    expected_kl = 0.5 * (p_lv - q_lv + torch.exp(q_lv - p_lv) + (q_mu - p_mu) ** 2 / torch.exp(p_lv) - 1)
    # log p at the draw μ_q + σ_q ε (the layer's), and at the given z (log_normal_diag's)
    residual = (q_mu - p_mu) / torch.exp(0.5 * p_lv) + torch.exp(0.5 * (q_lv - p_lv)) * eps
    expected_log_p = -0.5 * (math.log(2 * math.pi) + p_lv + residual ** 2)
    expected_at_z = -0.5 * (math.log(2 * math.pi) + p_lv + (z - p_mu) ** 2 / torch.exp(p_lv))
    layer = StochasticLayer(*(t.float() for t in (z, eps, q_mu, q_lv, p_mu, p_lv)), conditional=True)
    kl, log_p = layer.kl_per_dimension(), layer.log_p_per_dimension()
    assert torch.isfinite(kl).all() and torch.isfinite(log_p).all()
    scale = 1 + abs(p_logvar)
    torch.testing.assert_close(kl.double(), expected_kl, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(log_p.double(), expected_log_p, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(log_normal_diag(z.float(), p_mu.float(), p_lv.float()).double(),
                               expected_at_z.sum(-1), rtol=1e-5, atol=1e-4 * scale)


@pytest.mark.parametrize("p_logvar", [-150.0, -200.6, -300.0])
def test_a_ladder_unit_whose_q_equals_p_stays_finite_with_its_gradient(p_logvar):
    """Below log σ_p² ≈ −176 e^{−½ log σ_p²} overflows float32. There the ladder's merge gives μ_q = μ_p exactly
    (σ_p² underflows against the encoder's σ̂²), and (μ_q − μ_p) e^{−½ log σ_p²} was 0 · inf = NaN: `ladder-5` stopped
    at epoch 600 on a unit with log σ_p² = −200.6. The layer's KL, its log p at the draws, log N(z; μ_p, σ_p²) at z =
    μ_p and their gradients are finite, and the KL equals float64's ½(log σ_p² − log σ_q² + σ_q²/σ_p² − 1)."""
    from vaelab.models.hierarchical import merge_gaussians

    g = torch.Generator().manual_seed(4)
    f32 = torch.float32                                            # this module's default dtype is float64
    p_mu, mu_hat, hat_lv = (torch.randn(2, 3, 4, generator=g, dtype=f32) for _ in range(3))
    p_lv = torch.full((2, 3, 4), p_logvar, dtype=f32).requires_grad_(True)
    p_mu.requires_grad_(True)
    q_mu, q_lv = merge_gaussians(mu_hat, hat_lv, p_mu, p_lv)
    assert torch.equal(q_mu, p_mu) and (p_logvar > -176 or not torch.isfinite(torch.exp(-0.5 * p_lv)).all())
    eps = torch.randn(2, 3, 4, generator=g, dtype=f32)
    layer = StochasticLayer(q_mu + torch.exp(0.5 * q_lv) * eps, eps, q_mu, q_lv, p_mu, p_lv, conditional=True)
    kl, log_p = layer.kl_per_dimension(), layer.log_p_per_dimension()
    at_mean = log_normal_diag(p_mu, p_mu.detach(), p_lv)
    for value in (kl, log_p, at_mean):
        assert torch.isfinite(value).all()
    gradients = torch.autograd.grad(kl.sum() + log_p.sum() + at_mean.sum(), (p_mu, p_lv))
    assert all(torch.isfinite(grad).all() for grad in gradients)
    q_lv64, p_lv64 = q_lv.detach().double(), p_lv.detach().double()
    expected = 0.5 * (p_lv64 - q_lv64 + torch.exp(q_lv64 - p_lv64) - 1)
    torch.testing.assert_close(kl.detach().double(), expected, rtol=0, atol=1e-5)


def test_log_weights_of_a_nearly_deterministic_unit_match_float64():
    """A unit with σ_q ≈ σ_p ≈ e^{−44} (a ladder's, after some hundred epochs): σ_q ε vanishes against μ_q when z is
    formed in float32, so log p(z) must come from the draw's parts, as log q does. The float32 log p − log q equals
    float64's (within 1e-4 of the per-unit values' size); formed from z it gained ½ε² per unit (IWAE-5000 of
    `ladder-5` at epoch 450 overstated log p(x) by 2.6 nats)."""
    g = torch.Generator().manual_seed(11)
    p_mu = torch.randn(1, 6, 8, generator=g, dtype=torch.float64)
    p_lv = torch.full((1, 6, 8), -88.0, dtype=torch.float64) + torch.rand(1, 6, 8, generator=g, dtype=torch.float64)
    hat_lv = p_lv + 3.0                                                        # the encoder's Gaussian, wider
    q_lv = -torch.logaddexp(-hat_lv, -p_lv)
    q_mu = p_mu + 1e-3 * torch.exp(0.5 * p_lv) * torch.randn(1, 6, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(500, 6, 8, generator=g, dtype=torch.float64)
    parts = [t.float() for t in (eps, q_mu, q_lv, p_mu, p_lv)]
    layer = StochasticLayer(torch.addcmul(parts[1], torch.exp(0.5 * parts[2]), parts[0]), *parts, conditional=True)
    ratio = (layer.log_p_per_dimension() - layer.log_q_per_dimension()).double()
    eps, q_mu, q_lv, p_mu, p_lv = (t.double() for t in parts)                 # the reference from the same values
    residual = (q_mu - p_mu) / torch.exp(0.5 * p_lv) + torch.exp(0.5 * (q_lv - p_lv)) * eps   # (z − μ_p)/σ_p
    expected = -0.5 * (p_lv + residual ** 2) + 0.5 * (q_lv + eps ** 2)
    torch.testing.assert_close(ratio, expected, rtol=0, atol=1e-4 * 88)


def test_kl_matches_monte_carlo_within_standard_error():
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    eps = torch.randn(200_000, 4, 5, generator=g)
    z = mu + torch.exp(0.5 * logvar) * eps        # the standard deviation is exp(½ log σ²)
    samples = log_normal_diag(z, mu, logvar) - log_standard_normal(z)
    estimate, stderr = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
    assert torch.all((estimate - kl_standard_normal(mu, logvar)).abs() < 4 * stderr)


def test_bernoulli_likelihood_equals_log_bernoulli_of_sigmoid():
    g = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(16, 784, generator=g)
    x = (torch.rand(16, 784, generator=g) < 0.3).double()
    expected = torch.distributions.Bernoulli(probs=torch.sigmoid(logits)).log_prob(x).sum(-1)
    torch.testing.assert_close(bernoulli_log_likelihood(logits, x), expected, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_likelihood_is_finite_and_exact_at_extreme_logits(dtype):
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0]], dtype=dtype)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=dtype)
    value = bernoulli_log_likelihood(logits, x)
    assert torch.isfinite(value).all()
    # matching pixels cost e^{-100} nats each, mismatched ones 100 nats each (log sigmoid(-100) ≈ -100)
    torch.testing.assert_close(value, torch.tensor([-200.0], dtype=dtype), rtol=1e-6, atol=1e-6)


def exact_softplus_sum(logits: torch.Tensor) -> torch.Tensor:
    """max(ℓ, 0) + log1p(e^{−|ℓ|}) summed, in float64 (F.softplus returns ℓ itself above ℓ = 20, off by e^{−20})."""
    return (logits.clamp(min=0) + torch.log1p(torch.exp(-logits.abs()))).sum(-1)


@pytest.mark.parametrize("base2", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [784, 1, 7, 96, 1000])
def test_softplus_sum_matches_softplus_in_float64(dtype, width, base2):
    g = torch.Generator().manual_seed(width)
    logits = torch.randn(300, width, generator=g, dtype=torch.float64) * 8 - 2
    logits[0] = 100.0                   # e^{ℓ} would overflow float32
    logits[1] = -100.0                  # every term far below float32's resolution of 1
    logits[2, : width // 2 + 1] = 0.0   # softplus(0) = log 2 exactly
    logits[3] = torch.linspace(-30, 30, width, dtype=torch.float64)
    expected = exact_softplus_sum(logits)
    with torch.no_grad():   # base2: the input is ℓ log₂e, as a decoder scaled by log₂e gives it
        value = softplus_sum((logits / math.log(2) if base2 else logits).to(dtype), base2=base2).double()
    # float32: a relative error of a few units of rounding of the sum of |terms| (a 784-term float32 sum
    # itself carries that much); float64: 1e-12.
    scale = expected + logits.abs().sum(-1)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert torch.all((value - expected).abs() <= tol * scale + 1e-300), (value - expected).abs().max()
    # the tiny terms survive: 784 values of e^{-100}-scale sum to 784·e^{-100}, not 0
    assert value[1] > 0 and torch.isclose(value[1], expected[1], rtol=1e-5 if dtype == torch.float32 else 1e-12)


def test_softplus_sum_does_not_overflow_in_float16():
    logits = torch.full((2, 784), 0.0, dtype=torch.float64)
    logits[1] = -30.0                    # products of 16 factors (1 + u) reach 2¹⁶ > float16's 65504 at ℓ = 0
    expected = exact_softplus_sum(logits)
    with torch.no_grad():
        value = softplus_sum(logits.half()).double()
    torch.testing.assert_close(value, expected, rtol=2e-3, atol=1e-9)


def test_softplus_sum_gradient_is_sigmoid():
    logits = torch.randn(5, 784, dtype=torch.float64, requires_grad=True)
    softplus_sum(logits).sum().backward()    # under autograd it is softplus itself
    torch.testing.assert_close(logits.grad, torch.sigmoid(logits.detach()), rtol=1e-12, atol=1e-12)
    y = (logits.detach() / math.log(2)).requires_grad_()   # base 2: d/dy softplus(y ln 2) = ln 2 · sigmoid(ℓ)
    softplus_sum(y, base2=True).sum().backward()
    torch.testing.assert_close(y.grad, math.log(2) * torch.sigmoid(logits.detach()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(softplus_sum(y, base2=True), exact_softplus_sum(logits.detach()), rtol=1e-12, atol=0)


def test_bernoulli_likelihood_forms_agree_on_a_trained_decoders_range():
    """Without a graph the fast softplus (``softplus_sum``), recording one or under torch.func the formula: the same
    value on logits down to ≈ −200 as a trained decoder gives its background (float32: a few units of rounding of
    the sum of |terms|); torch.func's derivatives hold with weights that take no gradient (the Laplace's float64
    copy), where the fast form's in-place kernels would not run under vmap."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 784, generator=g, dtype=torch.float64) * 40 - 30
    x = (torch.rand(6, 784, generator=g) < 0.2).double()
    exact = (x * logits).sum(-1) - exact_softplus_sum(logits)
    low = logits.float()
    with torch.no_grad():
        fast = bernoulli_log_likelihood(low, x.float())
    assert torch.equal(fast, (x.float() * low).sum(-1) - softplus_sum(low))          # the fast form was taken
    recorded = bernoulli_log_likelihood(low.clone().requires_grad_(), x.float())
    bound = 1e-6 * logits.abs().sum(-1)
    assert ((fast.double() - exact).abs() <= bound).all()
    assert ((recorded.detach().double() - exact).abs() <= bound).all()

    weights = torch.randn(784, 3, generator=g, dtype=torch.float64) * 20             # requires_grad False
    z = torch.randn(6, 3, generator=g, dtype=torch.float64)

    def f(point, pixels):
        return bernoulli_log_likelihood(point @ weights.T, pixels)

    value = torch.func.vmap(f)(z, x)
    gradient = torch.func.vmap(torch.func.grad(f))(z, x)
    scores = z @ weights.T
    # F.softplus returns ℓ itself above ℓ = 20 (off by e^{−20} ≈ 2e-9 per such logit)
    torch.testing.assert_close(value, (x * scores).sum(-1) - exact_softplus_sum(scores), rtol=1e-12, atol=1e-6)
    torch.testing.assert_close(gradient, (x - torch.sigmoid(scores)) @ weights, rtol=1e-8, atol=1e-6)


def test_bernoulli_likelihood_recorded_by_hand_matches_autograd_of_the_formula():
    """The training form (``BernoulliLogLikelihood``): its value and gradient are the formula's and autograd's
    (float64, 1e-12), with draws (K, B, D) against data (B, D); gradcheck and gradgradcheck hold."""
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(3, 4, 784, generator=g, dtype=torch.float64) * 30 - 10).requires_grad_()
    x = (torch.rand(4, 784, generator=g) < 0.3).double()
    value = bernoulli_log_likelihood(logits, x)
    assert value.grad_fn is not None and "BernoulliLogLikelihood" in type(value.grad_fn).__name__
    weights = torch.randn(3, 4, generator=g, dtype=torch.float64)
    (gradient,) = torch.autograd.grad((value * weights).sum(), logits)
    formula = (x * logits - torch.nn.functional.softplus(logits, threshold=1e9)).sum(-1)
    (expected,) = torch.autograd.grad((formula * weights).sum(), logits)
    torch.testing.assert_close(value, formula, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-12)
    small = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    data = (torch.rand(3, 5, generator=g) < 0.5).double()
    assert torch.autograd.gradcheck(bernoulli_log_likelihood, (small, data))
    assert torch.autograd.gradgradcheck(bernoulli_log_likelihood, (small, data))


class LinearGaussian:
    """p(z) = N(0, I), p(x|z) = N(W z + b, s² I): p(x) and p(z|x) in closed form (probabilistic PCA)."""

    def __init__(self, d=3, D=6, s=0.7, orthogonal=False, seed=0):
        rng = np.random.default_rng(seed)
        W = rng.normal(size=(D, d))
        if orthogonal:   # WᵀW diagonal makes p(z|x) a diagonal Gaussian
            W = np.linalg.qr(W)[0] * np.array([1.5, 0.8, 2.0][:d])
        self.W, self.b, self.s, self.d = torch.tensor(W), torch.tensor(rng.normal(size=D)), s, d
        self.x = torch.tensor(rng.normal(size=(2, D)))

    def log_likelihood(self, z, x):
        mean = z @ self.W.T + self.b
        return (-0.5 * ((x - mean) / self.s) ** 2 - math.log(self.s) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def log_marginal(self):
        cov = self.W @ self.W.T + self.s**2 * torch.eye(len(self.b))
        return torch.tensor([multivariate_normal(self.b.numpy(), cov.numpy()).logpdf(x) for x in self.x.numpy()])

    def posterior(self):
        precision = torch.eye(self.d) + self.W.T @ self.W / self.s**2
        cov = torch.linalg.inv(precision)
        means = (self.x - self.b) @ self.W / self.s**2 @ cov
        return means, cov


def sigma_points(d: int, batch: int) -> torch.Tensor:
    """±√d eᵢ: 2d points with mean 0 and covariance I, so their average is the exact expectation of
    any quadratic function of ε under N(0, I)."""
    points = math.sqrt(d) * torch.cat([torch.eye(d), -torch.eye(d)])
    return points.unsqueeze(1).expand(2 * d, batch, d)


def gaussian_kl(mu_q, var_q, mu_p, cov_p):
    """KL(N(μq, diag var_q) ‖ N(μp, Σp)) in closed form."""
    inv = torch.linalg.inv(cov_p)
    diff = mu_p - mu_q
    return 0.5 * (torch.trace(inv @ torch.diag(var_q)) + diff @ inv @ diff - len(mu_q)
                  + torch.logdet(cov_p) - torch.log(var_q).sum())


def test_elbo_equals_log_marginal_minus_posterior_kl_linear_gaussian():
    model = LinearGaussian()
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(2, model.d, generator=g), 0.5 * torch.randn(2, model.d, generator=g)
    terms = elbo(model.x, mu, logvar, model.log_likelihood, sigma_points(model.d, 2))
    post_mean, post_cov = model.posterior()
    expected = model.log_marginal() - torch.stack(
        [gaussian_kl(mu[i], logvar[i].exp(), post_mean[i], post_cov) for i in range(2)])
    torch.testing.assert_close(terms.elbo, expected, rtol=0, atol=1e-6)
    assert torch.all(terms.elbo < model.log_marginal())


def test_elbo_is_tight_at_the_posterior():
    model = LinearGaussian(orthogonal=True)
    post_mean, post_cov = model.posterior()
    assert torch.allclose(post_cov, torch.diag(torch.diagonal(post_cov)), atol=1e-12)
    logvar = torch.log(torch.diagonal(post_cov)).expand(2, -1)
    terms = elbo(model.x, post_mean, logvar, model.log_likelihood, sigma_points(model.d, 2))
    torch.testing.assert_close(terms.elbo, model.log_marginal(), rtol=0, atol=1e-6)


def test_iwae_is_ordered_and_converges_to_log_marginal():
    model = LinearGaussian(orthogonal=True, seed=4)   # diagonal p(z|x): a wider diagonal q dominates it
    post_mean, post_cov = model.posterior()
    # a deliberately poor q: shifted mean, too wide (wider than p(z|x), so the weights are bounded)
    mu = post_mean + 0.5 * torch.diagonal(post_cov).sqrt()
    logvar = torch.log(torch.diagonal(post_cov) * 1.5).expand(2, -1)
    log_px = model.log_marginal()
    g = torch.Generator().manual_seed(5)
    repeats = 200
    estimates = {}
    for k in (1, 10, 100):
        values = torch.stack([iwae_bound(model.x, mu, logvar, model.log_likelihood, k, g) for _ in range(repeats)])
        estimates[k] = (values.mean(0), values.std(0) / math.sqrt(repeats))
    exact_elbo = elbo(model.x, mu, logvar, model.log_likelihood, sigma_points(model.d, 2)).elbo
    # IWAE_1 is the ELBO estimator; on average ELBO ≤ IWAE_10 ≤ IWAE_100 ≤ log p(x)
    assert torch.all((estimates[1][0] - exact_elbo).abs() < 4 * estimates[1][1])
    assert torch.all(estimates[1][0] < estimates[10][0]) and torch.all(estimates[10][0] < estimates[100][0])
    assert torch.all(estimates[100][0] < log_px)
    big = iwae_bound(model.x, mu, logvar, model.log_likelihood, 400_000, g, chunk=50_000)
    torch.testing.assert_close(big, log_px, rtol=0, atol=2e-3)


def test_iwae_is_exact_for_every_k_at_the_posterior():
    model = LinearGaussian(orthogonal=True, seed=6)
    post_mean, post_cov = model.posterior()
    logvar = torch.log(torch.diagonal(post_cov)).expand(2, -1)
    value = iwae_bound(model.x, post_mean, logvar, model.log_likelihood, 7, torch.Generator().manual_seed(0), chunk=3)
    torch.testing.assert_close(value, model.log_marginal(), rtol=0, atol=1e-9)


def test_iwae_weights_match_the_densities():
    # iwae_bound computes log p(z) − log q(z|x) for all draws from ε alone (|μ + σε|² expanded); here the
    # same draws go through the densities themselves, at a q that is not the posterior, in float64.
    model = LinearGaussian(seed=8)
    g = torch.Generator().manual_seed(9)
    mu, logvar = torch.randn(2, model.d, generator=g, dtype=torch.float64), torch.randn(2, model.d, generator=g, dtype=torch.float64)
    k = 11
    eps = torch.randn((k, model.d), generator=torch.Generator().manual_seed(10), dtype=torch.float64)  # what iwae_bound draws
    z = mu + torch.exp(0.5 * logvar) * eps[:, None, :]                                                 # (K, B, d)
    log_w = model.log_likelihood(z, model.x) + log_standard_normal(z) - log_normal_diag(z, mu, logvar)
    expected = torch.logsumexp(log_w, 0) - math.log(k)
    value = iwae_bound(model.x, mu, logvar, model.log_likelihood, k, torch.Generator().manual_seed(10), chunk=4)
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-10)
