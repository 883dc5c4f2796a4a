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

import dataclasses
import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch
from torch.func import grad, hessian, jvp, vmap

from vaelab.errors import VaelabError
from vaelab.tables import plural

LOG_2PI = math.log(2.0 * math.pi)


class LaplaceError(VaelabError, ValueError):
    """Bad arguments, or a function Laplace's method does not apply to: no maximum found, or a Hessian
    at the mode that is not negative definite."""


class NotNegativeDefinite(LaplaceError):
    """The Hessian at the mode of ``example`` (its row in the batch) is not negative definite; ``eigenvalues``
    are the smallest of −∇²f there. ``converged``: whether the search stopped at a maximum (smooth or on a kink),
    or ran out of steps on its way to one (the point is then no mode)."""

    def __init__(self, message: str, example: int, eigenvalues: list[float], converged: bool = True):
        super().__init__(message)
        self.example, self.eigenvalues, self.converged = example, eigenvalues, converged


# Why the Newton search of each example stopped (NewtonResult.outcome).
RUNNING, SMOOTH, STALLED = 0, 1, 2
OUTCOMES = {RUNNING: "not converged", SMOOTH: "converged", STALLED: "stalled"}
# why a mode stalls (NewtonResult.outcome), as `evaluate` and the report say it: a smooth (tanh) model has no kinks
# (until 2026-12-07 "a kink of a ReLU network, …": the VampPrior paper's models have no ReLU, and their kinks are the
# clamps of their log-variances)
STALLED_CAUSE = "a kink of the model (a ReLU, a clamped log-variance), or the limit of the arithmetic's precision"


@dataclass
class NewtonResult:
    """Batched maximisation of f(z; x): mode (B, d), value f(mode) (B,), precision −∇²f (B, d, d),
    the Cholesky factor of the precision (B, d, d), and why each example stopped.

    ``outcome``: SMOOTH where the gradient or the Newton decrement met the tolerance (a smooth maximum);
    STALLED where no step along the search direction increased f, or the gain was negligible, while the
    gradient was not small (a maximum on a kink of a piecewise-smooth f, as with ReLU networks, or the
    limit of the float precision); RUNNING where ``max_steps`` ran out.
    """

    mode: torch.Tensor
    value: torch.Tensor
    precision: torch.Tensor
    cholesky: torch.Tensor
    outcome: torch.Tensor             # (B,) int8: RUNNING, SMOOTH or STALLED
    steps: int
    positive_definite: torch.Tensor   # (B,) whether the Cholesky factor of the precision exists

    @property
    def converged(self) -> torch.Tensor:
        """(B,) stopped at a maximum, smooth or not."""
        return self.outcome != RUNNING


def newton_maximize(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z0: torch.Tensor,
                    data: torch.Tensor, *, max_steps: int = 100, gtol: float = 1e-8, ftol: float = 1e-12,
                    jitter: float = 0.0,
                    curvature: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                    ) -> NewtonResult:
    """Maximise f(z, x) for each row (z₀[b], data[b]) by Newton's method with a backtracking line search.

    ``f`` takes one example, z (d,) and x (…), and returns a scalar; gradients and Hessians are exact
    (torch.func). Where −∇²f is not positive definite the step is Newton's with the absolute values of its
    eigenvalues (gradient ascent where it is zero), with the same (Armijo) line search, so every accepted step
    increases f. An example has converged when
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
    outcome = torch.full((batch,), RUNNING, dtype=torch.int8, device=z.device)
    steps = 0
    for steps in range(1, max_steps + 1):
        idx = (outcome == RUNNING).nonzero().squeeze(1)        # work on the examples still moving only
        if idx.numel() == 0:
            break
        zi, xi, vi = z[idx], data[idx], value[idx]
        g = grad_fn(zi, xi)                                                    # (b, d)
        precision = curvature(zi, xi) if curvature is not None else -hess_fn(zi, xi)  # (b, d, d)
        chol, info = torch.linalg.cholesky_ex(precision)
        newton = info == 0
        direction = g.clone()                                                  # (b, d)
        if bool(newton.any()):
            direction[newton] = torch.cholesky_solve(g[newton].unsqueeze(-1), chol[newton]).squeeze(-1)
        modify = ~newton & torch.isfinite(precision).all(-1).all(-1)             # (a NaN Hessian: gradient ascent)
        if bool(modify.any()):
            # −∇²f = V diag(λ) Vᵀ with some λ ≤ 0: the Newton step with |λ| (floored at 10⁻⁶ max|λ|),
            # V diag(1/|λ|) Vᵀ g, an ascent direction (slope gᵀ V diag(1/|λ|) Vᵀ g > 0) scaled by the curvature
            # along each eigenvector: it leaves a region of negative curvature in a few steps, where plain gradient
            # ascent, shortened by the line search to the steepest curvature's scale, crawled (Nocedal & Wright 2006,
            # §3.4; a two-layer VampPrior's digit climbed 0.8 nats in 270 steps that way; tests/test_laplace.py).
            # Where f has no curvature at all, gradient ascent.
            lam, vec = torch.linalg.eigh(precision[modify])                    # (n, d), (n, d, d)
            top = lam.abs().amax(-1, keepdim=True)                             # (n, 1)
            lam = lam.abs().clamp_min(1e-6 * top)
            modified = (vec @ ((vec.mT @ g[modify].unsqueeze(-1)) / lam.unsqueeze(-1))).squeeze(-1)
            direction[modify] = torch.where(top > 0, modified, g[modify])
        slope = (g * direction).sum(-1)                                        # > 0: an ascent direction
        scale = 1 + vi.abs()
        smooth = (g.abs().amax(-1) <= gtol * scale) | (newton & (slope <= 2 * ftol * scale))
        t = torch.ones(len(idx), dtype=z.dtype, device=z.device)
        active = ~smooth
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
        # No step increased f, or the gain was negligible: a maximum to working precision, not a smooth one.
        stalled = ~smooth & (active | (vi - before <= ftol * scale))
        z[idx], value[idx] = zi, vi
        outcome[idx] = torch.where(smooth, SMOOTH, torch.where(stalled, STALLED, RUNNING)).to(torch.int8)
    precision = -hess_fn(z, data) + jitter * eye
    chol, info = torch.linalg.cholesky_ex(precision)
    return NewtonResult(z, value, precision, chol, outcome, steps, info == 0)


def _require_negative_definite(result: NewtonResult) -> None:
    if not bool(result.positive_definite.all()):
        bad = int((~result.positive_definite).nonzero()[0, 0])
        eigenvalues = torch.linalg.eigvalsh(result.precision[bad]).tolist()[:4]
        converged = bool(result.converged[bad])
        where = "at the mode" if converged else \
            f"where the search stopped, {plural(result.steps, 'step')} without a maximum,"
        raise NotNegativeDefinite(f"the Hessian {where} is not negative definite (example {bad}, eigenvalues of "
                                  f"−∇²f: {eigenvalues}…); Laplace's method does not apply there; pass jitter > 0 to "
                                  f"regularise it explicitly", bad, eigenvalues, converged)


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
    if not callable(log_f):
        raise LaplaceError(f"log_f must be a function of x, got {type(log_f).__name__}")
    # (until 2026-12-07 jitter=True was taken as 1.0 and max_steps=True as 1; jitter="x", gtol=None and M=10**400
    # raised TypeError or OverflowError)
    M, gtol = _real("M", M, strict=True), _real("gtol", gtol, strict=True)
    jitter = _real("jitter", jitter, strict=False)
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise LaplaceError(f"max_steps must be a whole number ≥ 1, got {max_steps!r}")
    if not isinstance(correction, (bool, np.bool_)):
        raise LaplaceError(f"correction must be True or False, got {correction!r}")
    try:
        if x0.is_complex() if torch.is_tensor(x0) else np.iscomplexobj(x0):   # (torch dropped the imaginary part)
            raise TypeError("complex")
        start = torch.as_tensor(0.0 if x0 is None else x0, dtype=torch.float64).detach()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise LaplaceError(f"x0 must be a real number or a vector of real numbers, got {x0!r}") from exc
    if start.ndim > 1 or start.numel() == 0 or not bool(torch.isfinite(start).all()):
        raise LaplaceError(f"x0 must be a finite number or a non-empty vector of finite numbers, got {x0!r}")
    scalar = start.ndim == 0
    z0 = start.reshape(1, -1)
    if correction and z0.shape[1] != 1:     # (until 2026-12-07 a plain ValueError, after the search for the mode)
        raise LaplaceError(f"the (1 + c₁/M) correction is implemented for 1-D integrals only, and x0 has "
                           f"{z0.shape[1]} coordinates; pass correction=False")

    def f(z: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return log_f(z[0] if scalar else z)

    dummy = torch.zeros(1, dtype=torch.float64)
    shape = '()' if scalar else f'({z0.shape[1]},)'
    try:
        first = f(z0[0], dummy[0])
    except Exception as exc:
        raise LaplaceError(f"log_f failed at x0 = {start.tolist()} ({type(exc).__name__}: {exc}); it must take a "
                           f"float64 tensor {shape} and return a scalar tensor") from exc
    if not torch.is_tensor(first) or first.numel() != 1:
        # (a float or a vector failed later, in torch's words: "vmap(f, ...): `f` must only return Tensors")
        raise LaplaceError(f"log_f must return a scalar tensor made from x by torch operations (its derivatives are "
                           f"taken by autograd); at x0 = {start.tolist()} it returned "
                           f"{first.tolist() if torch.is_tensor(first) else repr(first)}")
    if not bool(torch.isfinite(first)):
        raise LaplaceError(f"f(x0) must be finite; at x0 = {start.tolist()} it is {first.item()}; start inside the "
                           f"domain")
    # ftol = 0: stop on the gradient (or a stall) only, since an error δ in x₀ costs M·δ²/2 in the log.
    result = newton_maximize(f, z0, dummy, max_steps=max_steps, gtol=gtol, ftol=0.0, jitter=0.0)
    if bool(result.converged.all()) and bool(result.positive_definite.all()):
        result = _polish_mode(f, result, M)
    if jitter > 0:
        warnings.warn(f"laplace_integral: subtracting jitter {jitter} × I from the Hessian", stacklevel=2)
        result = newton_maximize(f, result.mode, dummy, max_steps=1, gtol=math.inf, jitter=jitter)
    if not bool(result.converged.all()):
        raise LaplaceError(f"no maximum found in {max_steps} Newton steps (last x = {result.mode[0].tolist()}); "
                           f"f may be unbounded above, or start x0 nearer the mode")
    _require_negative_definite(result)
    mode = result.mode[0]
    d = mode.numel()
    if jitter == 0:
        _require_quadratic_maximum(f, result, M)
    log_det = float(log_det_from_cholesky(result.cholesky[0])) + d * math.log(M)   # log det(−M ∇²f)
    log_peak, log_width = M * float(result.value[0]), 0.5 * d * LOG_2PI - 0.5 * log_det
    c1 = None
    log_value = log_peak + log_width
    if correction:
        c1 = laplace_c1(lambda x: log_f(x if scalar else x.reshape(1)), float(mode))
        log_value += math.log1p(c1 / M)
    return LaplaceResult(log_value, mode[0] if scalar else mode, -result.precision[0], log_peak, log_width, c1)


def _real(name: str, value, strict: bool) -> float:
    """``value`` as a float where it is a finite real number, > 0 where ``strict`` else ≥ 0; otherwise LaplaceError
    naming ``name``."""
    if not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)):
        try:
            number = float(value)
        except OverflowError:                 # a whole number beyond float64's range (10**400)
            number = math.inf
        if math.isfinite(number) and (number > 0 if strict else number >= 0):
            return number
    raise LaplaceError(f"{name} must be a finite number {'>' if strict else '≥'} 0, got {value!r}")


def _polish_mode(f: Callable, result: NewtonResult, M: float, max_steps: int = 20) -> NewtonResult:
    """Newton steps on f alone until the mode is exact at the scale M puts on it, or a LaplaceError.

    An error δ in x₀ costs ½ M δᵀAδ in the log of the integral (A = −∇²f): the gradient test of the search,
    |∇f| ≤ gtol, is judged on f, but M multiplies what is left. The Newton decrement λ² = ∇fᵀ A⁻¹ ∇f is twice
    the gain still available, so M λ²/2 is the error left in the log. Steps are taken on f without a line
    search (near the mode f's values no longer differ in float64 while M times their difference still
    matters) until that error is within 10⁻¹² of the result's own magnitude |M f(x₀)| + |log width| + 1,
    the precision float64 can give it. Where no step gets there, the mode cannot be found to the precision
    M demands (e.g. an irrational mode with M = 10³⁰⁰: δ ≈ 10⁻¹⁶ costs ≈ 10²⁶⁸ nats) and Laplace's value would
    be wrong by more than its own size: refused, naming what is left.
    """
    value_fn, grad_fn, hess_fn = vmap(f), vmap(grad(f)), vmap(hessian(f))
    z, data = result.mode.clone(), torch.zeros(1, dtype=result.mode.dtype)
    d = z.shape[-1]
    best_z, best_error = z, math.inf
    for _ in range(max_steps + 1):
        g, precision = grad_fn(z, data)[0], -hess_fn(z, data)[0]                  # (d,), (d, d)
        chol, info = torch.linalg.cholesky_ex(precision)
        if int(info) != 0:
            break
        step = torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)          # A⁻¹ ∇f
        error = 0.5 * M * float(g @ step)                                      # M λ²/2, nats
        width = abs(0.5 * d * LOG_2PI - 0.5 * (float(log_det_from_cholesky(chol)) + d * math.log(M)))
        scale = abs(M * float(value_fn(z, data)[0])) + width + 1.0
        if error < best_error:
            best_z, best_error = z.clone(), error
        if error <= 1e-12 * scale or not math.isfinite(error):
            break
        z = z + step.unsqueeze(0)
    if not best_error <= 1e-12 * scale:
        raise LaplaceError(f"M = {M:g} leaves no precision: the mode x0 ≈ {best_z[0].tolist()} is known only to "
                           f"float64's resolution, and what is left of it moves M·f(x0) by ≈ {best_error:.3g} nats "
                           f"(the log of the Gaussian width is {width:.3g}); rescale f (e.g. shift x so that the mode is a "
                           f"representable number) or use a smaller M")
    precision = -hess_fn(best_z, data)
    chol, info = torch.linalg.cholesky_ex(precision)
    return dataclasses.replace(result, mode=best_z, value=value_fn(best_z, data), precision=precision,
                               cholesky=chol, positive_definite=info == 0)


def _require_quadratic_maximum(f: Callable, result: NewtonResult, M: float) -> None:
    """Raise LaplaceError where −∇²f at the mode is numerically singular, judged on its own scale.

    Two tests, neither with an absolute threshold:
    - the condition number: λ_min ≤ 100 · d · ε_dtype · λ_max (the smallest curvature is at the level of the
      rounding of the largest), the test of a singular matrix in its dtype;
    - the quadratic model itself (what the method assumes): a tenth of a width away along each eigenvector
      u, δ = 0.1/√(M λ), the curvature uᵀ(−∇²f)u must still be λ within a factor of 2. Where the curvature
      vanishes at the mode (f = −x⁴, whose mode is found only to a tolerance, with f'' ≈ 0 there) it is
      orders of magnitude larger a tenth of a width away, whatever the scale of f; every Gaussian passes
      exactly, whatever its scale, and the test needs no difference of values of f (none cancels at M = 10¹⁸).
    """
    precision, mode = result.precision[0], result.mode[0]
    curvatures, vectors = torch.linalg.eigh(precision)
    d = len(curvatures)
    message = (f"the Hessian at the mode x0 = {mode.tolist()} is numerically singular (eigenvalues of −∇²f from "
               f"{float(curvatures[0]):.3g} to {float(curvatures[-1]):.3g}{{}}), so not negative definite; "
               f"Laplace's method does not apply; pass jitter > 0 to regularise it explicitly")
    if float(curvatures[0]) <= 100 * d * torch.finfo(precision.dtype).eps * float(curvatures[-1]):
        raise LaplaceError(message.format(""))
    # uᵀ(−∇²f(x))u by one Hessian-vector product (forward over reverse), all 2d points at once: O(d) passes of f
    # where the full Hessian at each point took O(d²) (until 2026-12-06; laplace_integral of a 300-dimensional f took
    # 8.9 s against 2.1 s now, 1.8 s against 0.09 s at d = 100, on a 2-core Zen 1)
    gradient = grad(lambda z: f(z, torch.zeros((), dtype=z.dtype)))
    deltas = 0.1 / torch.sqrt(M * curvatures)                                  # (d,)
    points = torch.cat([mode + deltas[:, None] * vectors.T, mode - deltas[:, None] * vectors.T])   # (2d, d)
    directions = torch.cat([vectors.T, vectors.T])                             # (2d, d)
    nearby = -vmap(lambda x, u: jvp(gradient, (x,), (u,))[1] @ u)(points, directions)             # (2d,)
    for curvature, value in zip(torch.cat([curvatures, curvatures]).tolist(), nearby.tolist()):
        if not 0.5 * curvature <= value <= 2 * curvature:
            raise LaplaceError(message.format(
                f"; a tenth of a width away the curvature along its eigenvector is {value:.3g}, not "
                f"{curvature:.3g}: the maximum is not quadratic on its own scale"))


def laplace_c1(f: Callable[[torch.Tensor], torch.Tensor], x0: float) -> float:
    """c₁ = f⁗(x₀)/(8a²) + 5 f‴(x₀)²/(24a³), a = −f''(x₀): the O(1/M) term of the 1-D expansion."""
    if isinstance(x0, bool) or not isinstance(x0, (int, float, np.integer, np.floating)) or not math.isfinite(x0):
        raise LaplaceError(f"x0 must be a finite number (laplace_c1 is the 1-D term), got {x0!r}")
    x = torch.tensor(float(x0), dtype=torch.float64)
    d1 = grad(f)
    d2, d3 = grad(d1), grad(grad(d1))
    d4 = grad(d3)
    a = -float(d2(x))
    if not (math.isfinite(a) and a > 0):          # the expansion is about a maximum: a = −f''(x₀) > 0
        raise LaplaceError(f"f''(x0) = {-a:.6g} at x0 = {float(x0)!r}: c₁ needs a maximum, f''(x₀) < 0 (find the "
                           f"mode first, e.g. laplace_integral(f, x0).mode)")
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


# The series is asymptotic: for a given N its terms shrink until k ≈ πN and grow without bound after, so
# more terms never help beyond that; 30 terms already reach relative errors below 10⁻⁶⁰⁰ at N = 10¹⁸
# and the first omitted term of 30 exceeds 10²⁰ at N = 1. Larger counts are refused (they cost time and
# say nothing).
MAX_STIRLING_TERMS = 30


def _check_terms(terms) -> int:
    if isinstance(terms, bool) or not isinstance(terms, (int, np.integer)) or not 0 <= terms <= MAX_STIRLING_TERMS:
        raise LaplaceError(f"terms must be a whole number from 0 to {MAX_STIRLING_TERMS}, got {terms!r}: Stirling's "
                           f"series is asymptotic, its terms grow without bound after k ≈ πN, so more terms "
                           f"never improve it")
    return int(terms)


def _check_n(n) -> None:
    """N of N!: one finite number > 0 (Laplace's method on N! has M = N)."""
    _real("N", n, strict=True)


def log_stirling(n, terms: int = 0):
    """ln N! ≈ ½ ln(2πN) + N ln N − N + Σ_{k=1..terms} B₂ₖ / (2k(2k−1) N^{2k−1}), for a number or an array.

    ``terms`` = 0 is Stirling's formula √(2πN)(N/e)^N (with its e^{−N}). The error of a truncation is
    smaller than the first omitted term and has its sign (DLMF 5.11.1; checked in tests/test_laplace.py).
    N must be finite and > 0 (LaplaceError, a ValueError, otherwise).
    """
    terms = _check_terms(terms)
    try:
        array = np.asarray(n)
        if array.dtype.kind == "O" and all(type(v) is int for v in array.flat):
            array = array.astype(np.float64)      # whole numbers beyond int64 (10**30): "not a number" until 2026-12-06
        if array.dtype.kind not in "iuf":         # "5" and True were read as 5.0 and 1.0
            raise TypeError(array.dtype)
        array = array.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise LaplaceError(f"N must be a number or an array of numbers, got {n!r}") from exc
    if array.size == 0 or not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise LaplaceError(f"Stirling's formula needs finite N > 0, got {n!r}")
    value = 0.5 * np.log(2 * np.pi * array) + array * np.log(array) - array
    for k, coefficient in enumerate(stirling_coefficients(terms), start=1):
        value = value + float(coefficient) / array ** (2 * k - 1)
    return float(value) if np.ndim(n) == 0 else value


def log_factorial_laplace(n: float) -> LaplaceResult:
    """Laplace's method on N! = N^{N+1} ∫₀^∞ e^{N(ln x − x)} dx (the route in the module docstring).

    Returns the integral's result; ln N! ≈ (N+1) ln N + result.log_value.
    """
    _check_n(n)
    return laplace_integral(lambda x: torch.log(x) - x, x0=0.5, M=float(n))


def _log_stirling_mp(n, terms: int):
    """log_stirling in the current mpmath precision."""
    import mpmath

    n = mpmath.mpf(n)
    value = 0.5 * mpmath.log(2 * mpmath.pi * n) + n * mpmath.log(n) - n
    for k, c in enumerate(stirling_coefficients(terms), start=1):
        value += mpmath.mpf(c.numerator) / c.denominator / n ** (2 * k - 1)
    return value


def stirling_errors(n: float, terms: Sequence[int]) -> dict:
    """N!/approxₖ − 1 for each count k of correction terms, to about 20 significant digits beyond the
    relative size 1/N² of the next term after the first omitted one.

    The difference ln N! − ln approxₖ is about the first omitted term, |c_{k+1}| N^{−(2k+1)}, while both
    logs are about N ln N, so the work precision is chosen per N and k: the digits of N ln N, plus those
    of the omitted term's smallness, plus 2 log₁₀ N + 20 (so that the value resolves how far it sits below
    its DLMF bound; a fixed precision gave wrong signs at N = 10⁴ with 8 terms). Values far below
    float64's range stay mpmath numbers.
    """
    import mpmath

    _check_n(n)
    terms = [_check_terms(k) for k in terms]
    if not terms:
        raise LaplaceError("terms must name at least one count of correction terms, e.g. [0, 2]")
    coefficients = stirling_coefficients(max(terms) + 1)          # c₁ … c_{k+1}; cₖ₊₁ = coefficients[k]
    smallest = min(math.log10(abs(coefficients[k].numerator)) - math.log10(coefficients[k].denominator)
                   - (2 * k + 1) * math.log10(n) for k in terms)   # log₁₀ of the first omitted term
    digits = int(math.log10(n * max(1.0, math.log(n)) + 1) + max(0.0, -smallest) + 2 * math.log10(n) + 20)
    with mpmath.workdps(digits):
        exact = mpmath.loggamma(mpmath.mpf(n) + 1)
        return {k: +mpmath.expm1(exact - _log_stirling_mp(n, k)) for k in terms}


def stirling_table(ns: Sequence[int | float], terms: int) -> list[dict]:
    """Rows for `vaelab stirling`: exact ln N!, the Laplace value, relative errors of N!.

    ``stirling`` is Laplace's method computed numerically (``log_factorial_laplace``: Newton finds x₀ = 1
    and f''(x₀) = −1, in float64); the error columns are those of the formula it yields, √(2πN)(N/e)^N,
    and of the series with ``terms`` corrections, in the precision they need (``stirling_errors``), as
    mpmath numbers. Valid for 1 ≤ N ≤ 10¹⁸ and beyond; a whole number N is used exactly (as an mpmath number:
    float64 holds whole numbers exactly only to 2⁵³), the Laplace column aside (its M = N is a float64).
    """
    import mpmath

    terms = _check_terms(terms)
    rows = []
    for n in ns:
        if not (math.isfinite(n) and n >= 1):
            raise LaplaceError(f"N must be a finite number ≥ 1, got {n!r}")
        result = log_factorial_laplace(n)
        errors = stirling_errors(n, sorted({0, terms}))
        with mpmath.workdps(40):
            exact = mpmath.loggamma(mpmath.mpf(n) + 1)
            laplace = (n + 1) * mpmath.log(n) + mpmath.mpf(result.log_value)
            rows.append({"n": n, "exact": float(exact), "stirling": float(laplace), "rel_error": errors[0],
                         "scaled_error": 12 * mpmath.mpf(n) * errors[0], "rel_error_terms": errors[terms]})
    return rows


def stirling_error_curves(terms: int, ns: Sequence[float] | None = None) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """|N!/approx − 1| for 0..terms correction terms over N, as floats (0 below float64's range)."""
    terms = _check_terms(terms)
    ns = np.unique(np.round(np.logspace(0, 3, 31))) if ns is None else np.asarray(sorted(set(ns)), dtype=float)
    errors = [stirling_errors(float(n), range(terms + 1)) for n in ns]
    return ns, {k: np.array([float(abs(e[k])) for e in errors]) for k in range(terms + 1)}


# ------------------------------------------------------------------------------------------------
# The VAE bridge: log p(x) = log ∫ p(x, z) dz, M = 1.


@dataclass
class LaplaceMarginal:
    """Per example: log p(x) ≈ log p(x, z*) + (d/2) log 2π − ½ log det H, with z* (B, d) and the
    Cholesky factor L of H = −∇² log p(x, z*) (B, d, d), for the proposal N(z*, H⁻¹)."""

    log_marginal: torch.Tensor
    mode: torch.Tensor
    cholesky: torch.Tensor
    outcome: torch.Tensor          # (B,) NewtonResult.outcome: converged, stalled (a kink) or not converged


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
    return LaplaceMarginal(log_marginal, result.mode, result.cholesky, result.outcome)


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
