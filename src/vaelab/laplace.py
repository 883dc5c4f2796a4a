"""Laplace's method: ∫ e^{M f(x)} dx ≈ (2π)^{d/2} |det(−M ∇²f(x₀))|^{−1/2} e^{M f(x₀)}, x₀ = argmax f.

Derivation: expand f to second order at its maximum, f(x) ≈ f(x₀) − ½ (x−x₀)ᵀ A (x−x₀) with A = −∇²f(x₀),
and integrate the Gaussian: ∫ e^{−(M/2) uᵀAu} du = (2π)^{d/2} det(MA)^{−1/2}. Everything is kept in
log space, so M = 10⁶ (Stirling at N = 10⁶) works. In 1-D the next order of the expansion gives the
factor (1 + c₁/M), c₁ = f⁗/(8a²) + 5 f‴²/(24a³), a = −f''(x₀) (e.g. Bender & Orszag 1978, §6.4).

Stirling: N! = ∫₀^∞ e^{−t} t^N dt; with t = N x, N! = N^{N+1} ∫₀^∞ e^{N(ln x − x)} dx, so f = ln x − x,
x₀ = 1, f(x₀) = −1, f''(x₀) = −1, M = N, and Laplace gives N! ≈ N^{N+1} √(2π/N) e^{−N} = √(2πN) (N/e)^N.
Its full asymptotic series is ln N! = ½ ln(2πN) + N ln N − N + Σₖ B₂ₖ / (2k(2k−1) N^{2k−1}) (DLMF 5.11.1).

The same Newton core, batched over examples with exact per-example Hessians (torch.func.vmap of
hessian), gives the Laplace estimate of a VAE's log p(x) = log ∫ p(x|z) p(z) dz (M = 1).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch
from torch.func import grad, hessian, vmap

from vaelab.errors import VaelabError

LOG_2PI = math.log(2.0 * math.pi)


class LaplaceError(VaelabError):
    """The mode was not found, or the Hessian at the mode is not negative definite."""


@dataclass
class NewtonResult:
    """Batched maximisation of f(z; x): mode (B, d), value f(mode) (B,), precision −∇²f (B, d, d),
    the Cholesky factor of the precision (B, d, d), and whether each example converged."""

    mode: torch.Tensor
    value: torch.Tensor
    precision: torch.Tensor
    cholesky: torch.Tensor
    converged: torch.Tensor
    steps: int
    positive_definite: torch.Tensor   # (B,) whether the Cholesky factor of the precision exists


def newton_maximize(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z0: torch.Tensor,
                    data: torch.Tensor, *, max_steps: int = 100, gtol: float = 1e-8, ftol: float = 1e-12,
                    jitter: float = 0.0,
                    curvature: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                    ) -> NewtonResult:
    """Maximise f(z, x) for each row (z₀[b], data[b]) by Newton's method with a backtracking line search.

    ``f`` takes one example, z (d,) and x (…), and returns a scalar; gradients and Hessians are exact
    (torch.func). Where −∇²f is not positive definite the step falls back to gradient ascent with the
    same (Armijo) line search, so every accepted step increases f. An example has converged when
    ‖∇f‖∞ ≤ gtol·(1+|f|), or when the Newton decrement λ² = ∇fᵀ(−∇²f)⁻¹∇f (twice the predicted gain)
    is ≤ 2·ftol·(1+|f|), or when no step along the direction increases f any more (a maximum on a kink of
    a piecewise-smooth f, as with ReLU networks), or when a step gains less than ftol·(1+|f|).
    ``curvature(z, x)`` (B, d, d), if given, replaces −∇²f in the search directions (e.g. a Gauss–Newton
    matrix); the returned precision is always the exact −∇²f at the mode, plus ``jitter``·I.
    """
    value_fn, grad_fn, hess_fn = vmap(f), vmap(grad(f)), vmap(hessian(f))
    z = z0.clone()
    batch, d = z.shape
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    value = value_fn(z, data)
    converged = torch.zeros(batch, dtype=torch.bool, device=z.device)
    steps = 0
    for steps in range(1, max_steps + 1):
        idx = (~converged).nonzero().squeeze(1)        # work on the examples still moving only
        if idx.numel() == 0:
            break
        zi, xi, vi = z[idx], data[idx], value[idx]
        g = grad_fn(zi, xi)                                                    # (b, d)
        precision = curvature(zi, xi) if curvature is not None else -hess_fn(zi, xi)  # (b, d, d)
        chol, info = torch.linalg.cholesky_ex(precision)
        newton = info == 0
        direction = g.clone()                                                  # gradient ascent fallback
        if bool(newton.any()):
            direction[newton] = torch.cholesky_solve(g[newton].unsqueeze(-1), chol[newton]).squeeze(-1)
        slope = (g * direction).sum(-1)                                        # > 0: an ascent direction
        scale = 1 + vi.abs()
        done = (g.abs().amax(-1) <= gtol * scale) | (newton & (slope <= 2 * ftol * scale))
        t = torch.ones(len(idx), dtype=z.dtype, device=z.device)
        active = ~done
        before = vi
        for _ in range(40):
            if not bool(active.any()):
                break
            trial = zi + t.unsqueeze(-1) * direction
            trial_value = value_fn(trial, xi)
            ok = torch.nan_to_num(trial_value, nan=-math.inf) >= vi + 1e-4 * t * slope
            accept = active & ok
            zi = torch.where(accept.unsqueeze(-1), trial, zi)
            vi = torch.where(accept, trial_value, vi)
            active = active & ~ok
            t = torch.where(active, t * 0.5, t)
        # No step increased f, or the gain was negligible: a maximum to working precision.
        done = done | active | (vi - before <= ftol * scale)
        z[idx], value[idx], converged[idx] = zi, vi, done
    precision = -hess_fn(z, data) + jitter * eye
    chol, info = torch.linalg.cholesky_ex(precision)
    return NewtonResult(z, value, precision, chol, converged, steps, info == 0)


def _require_negative_definite(result: NewtonResult) -> None:
    if not bool(result.positive_definite.all()):
        bad = int((~result.positive_definite).nonzero()[0, 0])
        raise LaplaceError(f"the Hessian at the mode is not negative definite (example {bad}, eigenvalues of "
                           f"−∇²f: {torch.linalg.eigvalsh(result.precision[bad]).tolist()[:4]}…); Laplace's "
                           f"method does not apply there; pass jitter > 0 to regularise it explicitly")


def log_det_from_cholesky(chol: torch.Tensor) -> torch.Tensor:
    """log det P = 2 Σ log Lᵢᵢ for P = L Lᵀ."""
    return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


# ------------------------------------------------------------------------------------------------
# One integral.


@dataclass
class LaplaceResult:
    """Laplace's approximation of log ∫ e^{M f(x)} dx, with the mode and the Hessian of f there."""

    log_value: float       # log of the integral (with the 1-D correction if asked for)
    mode: torch.Tensor     # x₀, shape () or (d,)
    hessian: torch.Tensor  # ∇²f(x₀), shape () → (1, 1) or (d, d)
    log_peak: float        # M f(x₀)
    log_width: float       # (d/2) log 2π − ½ log det(−M ∇²f(x₀)); log_peak + log_width = leading order
    c1: float | None = None   # the 1-D correction coefficient, when computed


def laplace_integral(log_f: Callable[[torch.Tensor], torch.Tensor], x0: float | Sequence[float] | torch.Tensor | None = None,
                     M: float = 1.0, *, correction: bool = False, jitter: float = 0.0,
                     max_steps: int = 200, gtol: float = 1e-12) -> LaplaceResult:
    """log ∫ e^{M f(x)} dx by Laplace's method, f = ``log_f`` (torch-differentiable, scalar or vector x).

    Finds x₀ = argmax f by Newton with a line search from ``x0`` (default 0), in float64. Raises
    LaplaceError if the maximum is not found or ∇²f(x₀) is not negative definite (unless ``jitter`` > 0,
    which subtracts jitter·I from ∇²f with a warning). ``correction`` (1-D only) multiplies by (1 + c₁/M).
    """
    if not (M > 0 and math.isfinite(M)):
        raise ValueError(f"M must be a finite number > 0, got {M}")
    start = torch.as_tensor(0.0 if x0 is None else x0, dtype=torch.float64)
    scalar = start.ndim == 0
    z0 = start.reshape(1, -1)

    def f(z: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return log_f(z[0] if scalar else z)

    dummy = torch.zeros(1, dtype=torch.float64)
    if not bool(torch.isfinite(f(z0[0], dummy[0]))):
        raise LaplaceError(f"f(x0) is not finite at the start x0 = {start.tolist()}; start inside the domain")
    # ftol = 0: stop on the gradient (or a stall) only, since an error δ in x₀ costs M·δ²/2 in the log.
    result = newton_maximize(f, z0, dummy, max_steps=max_steps, gtol=gtol, ftol=0.0, jitter=0.0)
    if jitter > 0:
        warnings.warn(f"laplace_integral: subtracting jitter {jitter} × I from the Hessian", stacklevel=2)
        result = newton_maximize(f, result.mode, dummy, max_steps=1, gtol=math.inf, jitter=jitter)
    if not bool(result.converged.all()):
        raise LaplaceError(f"no maximum found in {max_steps} Newton steps (last x = {result.mode[0].tolist()}); "
                           f"f may be unbounded above, or start x0 nearer the mode")
    _require_negative_definite(result)
    mode = result.mode[0]
    d = mode.numel()
    curvatures = torch.linalg.eigvalsh(result.precision[0])
    if float(curvatures[0]) <= 1e-6 * max(1.0, float(curvatures[-1])):
        # A maximum where f'' → 0 (e.g. f = −x⁴): the Gaussian has no width scale, the method does not apply.
        raise LaplaceError(f"the Hessian at the mode x0 = {mode.tolist()} is numerically singular (eigenvalues "
                           f"of −∇²f from {float(curvatures[0]):.3g}), so not negative definite; Laplace's "
                           f"method does not apply; pass jitter > 0 to regularise it explicitly")
    log_det = float(log_det_from_cholesky(result.cholesky[0])) + d * math.log(M)   # log det(−M ∇²f)
    log_peak, log_width = M * float(result.value[0]), 0.5 * d * LOG_2PI - 0.5 * log_det
    c1 = None
    log_value = log_peak + log_width
    if correction:
        if d != 1:
            raise ValueError("the (1 + c₁/M) correction is implemented for 1-D integrals only")
        c1 = laplace_c1(lambda x: log_f(x if scalar else x.reshape(1)), float(mode))
        log_value += math.log1p(c1 / M)
    return LaplaceResult(log_value, mode[0] if scalar else mode, -result.precision[0], log_peak, log_width, c1)


def laplace_c1(f: Callable[[torch.Tensor], torch.Tensor], x0: float) -> float:
    """c₁ = f⁗(x₀)/(8a²) + 5 f‴(x₀)²/(24a³), a = −f''(x₀): the O(1/M) term of the 1-D expansion."""
    x = torch.tensor(x0, dtype=torch.float64)
    d1 = grad(f)
    d2, d3 = grad(d1), grad(grad(d1))
    d4 = grad(d3)
    a = -float(d2(x))
    return float(d4(x)) / (8 * a**2) + 5 * float(d3(x)) ** 2 / (24 * a**3)


# ------------------------------------------------------------------------------------------------
# Stirling.


@lru_cache(maxsize=None)
def bernoulli_numbers(count: int) -> tuple[Fraction, ...]:
    """B₀ … B_{count−1} exactly, from Σ_{j<m+1} C(m+1, j) B_j = 0 (B₁ = −½)."""
    b: list[Fraction] = []
    for m in range(count):
        if m == 0:
            b.append(Fraction(1))
            continue
        total = sum(Fraction(math.comb(m + 1, j)) * b[j] for j in range(m))
        b.append(-total / (m + 1))
    return tuple(b)


def stirling_coefficients(terms: int) -> list[Fraction]:
    """B₂ₖ / (2k(2k−1)) for k = 1..terms: 1/12, −1/360, 1/1260, −1/1680, 1/1188, −691/360360, …"""
    b = bernoulli_numbers(2 * terms + 1)
    return [b[2 * k] / (2 * k * (2 * k - 1)) for k in range(1, terms + 1)]


def log_stirling(n, terms: int = 0):
    """ln N! ≈ ½ ln(2πN) + N ln N − N + Σ_{k=1..terms} B₂ₖ / (2k(2k−1) N^{2k−1}), for a number or an array.

    ``terms`` = 0 is Stirling's formula √(2πN)(N/e)^N (with its e^{−N}). The error of a truncation is
    smaller than the first omitted term and has its sign (DLMF 5.11.1; checked in tests/test_laplace.py).
    """
    if terms < 0:
        raise ValueError(f"terms must be ≥ 0, got {terms}")
    array = np.asarray(n, dtype=np.float64)
    if np.any(array <= 0):
        raise ValueError("Stirling's formula needs N > 0")
    value = 0.5 * np.log(2 * np.pi * array) + array * np.log(array) - array
    for k, coefficient in enumerate(stirling_coefficients(terms), start=1):
        value = value + float(coefficient) / array ** (2 * k - 1)
    return float(value) if np.ndim(n) == 0 else value


def log_factorial_laplace(n: float) -> LaplaceResult:
    """Laplace's method on N! = N^{N+1} ∫₀^∞ e^{N(ln x − x)} dx (the route in the module docstring).

    Returns the integral's result; ln N! ≈ (N+1) ln N + result.log_value.
    """
    return laplace_integral(lambda x: torch.log(x) - x, x0=0.5, M=float(n))


def _log_stirling_mp(n, terms: int):
    """log_stirling in mpmath precision (the table's differences reach 1e-30)."""
    import mpmath

    n = mpmath.mpf(n)
    value = 0.5 * mpmath.log(2 * mpmath.pi * n) + n * mpmath.log(n) - n
    for k, c in enumerate(stirling_coefficients(terms), start=1):
        value += mpmath.mpf(c.numerator) / c.denominator / n ** (2 * k - 1)
    return value


def stirling_table(ns: Sequence[float], terms: int) -> list[dict[str, float]]:
    """Rows for `vaelab stirling`: exact ln N!, the Laplace value, relative errors of N!.

    The Laplace value is assembled in high precision from its parts ((N+1) ln N, M f(x₀) and the width
    term, each exact to float64 relative precision), so the relative error is meaningful even at N = 10⁶.
    """
    import mpmath

    rows = []
    with mpmath.workdps(60):
        for n in ns:
            exact = mpmath.loggamma(mpmath.mpf(n) + 1)
            result = log_factorial_laplace(n)
            laplace = (n + 1) * mpmath.log(n) + mpmath.mpf(result.log_peak) + mpmath.mpf(result.log_width)
            rel = float(mpmath.expm1(exact - laplace))
            rows.append({"n": n, "exact": float(exact), "stirling": float(laplace), "rel_error": rel,
                         "scaled_error": 12 * n * rel,
                         "rel_error_terms": float(mpmath.expm1(exact - _log_stirling_mp(n, terms)))})
    return rows


def stirling_error_curves(terms: int, ns: np.ndarray | None = None) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """|N!/approx − 1| for 0..terms correction terms over N (high precision throughout)."""
    import mpmath

    ns = np.unique(np.round(np.logspace(0, 3, 31))) if ns is None else np.asarray(ns, dtype=float)
    curves: dict[int, np.ndarray] = {}
    with mpmath.workdps(80):
        exact = [mpmath.loggamma(mpmath.mpf(n) + 1) for n in ns]
        for k in range(terms + 1):
            curves[k] = np.array([abs(float(mpmath.expm1(e - _log_stirling_mp(n, k)))) for n, e in zip(ns, exact)])
    return ns, curves


# ------------------------------------------------------------------------------------------------
# The VAE bridge: log p(x) = log ∫ p(x, z) dz, M = 1.


@dataclass
class LaplaceMarginal:
    """Per example: log p(x) ≈ log p(x, z*) + (d/2) log 2π − ½ log det H, with z* (B, d) and the
    Cholesky factor L of H = −∇² log p(x, z*) (B, d, d), for the proposal N(z*, H⁻¹)."""

    log_marginal: torch.Tensor
    mode: torch.Tensor
    cholesky: torch.Tensor
    converged: torch.Tensor


def laplace_log_marginal(log_joint: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                         z0: torch.Tensor, *, max_steps: int = 50, gtol: float = 1e-8, ftol: float = 1e-12,
                         curvature: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                         ) -> LaplaceMarginal:
    """Laplace's estimate of log ∫ exp(log_joint(z, x)) dz for each row of x, from the starts z0 (B, d).

    ``log_joint(z, x)`` takes one example (z (d,), x (D,)) and returns log p(x, z); ``curvature`` as in
    ``newton_maximize``. H is the exact −∇² log p(x, z*) in any case.
    """
    result = newton_maximize(log_joint, z0, x, max_steps=max_steps, gtol=gtol, ftol=ftol, curvature=curvature)
    _require_negative_definite(result)
    d = z0.shape[-1]
    log_marginal = result.value + 0.5 * d * LOG_2PI - 0.5 * log_det_from_cholesky(result.cholesky)
    return LaplaceMarginal(log_marginal, result.mode, result.cholesky, result.converged)


def sample_laplace_proposal(marginal: LaplaceMarginal, n: int, generator: torch.Generator | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """n draws z ~ N(z*, H⁻¹) per example and their log densities: (n, B, d), (n, B).

    With H = L Lᵀ, z = z* + L⁻ᵀ ε has covariance L⁻ᵀ L⁻¹ = H⁻¹, and
    log N(z) = −(d/2) log 2π + ½ log det H − ½ |ε|².
    """
    mode, chol = marginal.mode, marginal.cholesky
    batch, d = mode.shape
    eps = torch.randn((batch, d, n), generator=generator, dtype=mode.dtype, device=mode.device)   # (B, d, n)
    offset = torch.linalg.solve_triangular(chol.mT, eps, upper=True)                                # L⁻ᵀ ε
    z = mode.unsqueeze(0) + offset.permute(2, 0, 1)                                                  # (n, B, d)
    log_r = (-0.5 * d * LOG_2PI + 0.5 * log_det_from_cholesky(chol)).unsqueeze(0) \
        - 0.5 * eps.square().sum(1).T                                                               # (n, B)
    return z, log_r
