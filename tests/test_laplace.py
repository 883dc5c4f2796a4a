"""Laplace's method and Stirling's formula against closed forms, lgamma, quadrature and DLMF's series."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from conftest import latex_compiles
from vaelab.laplace import (SMOOTH, LaplaceError, NotNegativeDefinite, laplace_c1, laplace_integral,
                            laplace_log_marginal, log_factorial_laplace, log_stirling, sample_laplace_proposal,
                            stirling_coefficients, stirling_errors, stirling_table)
from vaelab.objectives import LOG_2PI


def test_quadratic_1d_is_exact():
    # ∫ exp(M(c − a(x−m)²/2)) dx = e^{Mc} √(2π/(Ma))
    a, m, c, M = 2.5, 0.7, -1.3, 3.0
    result = laplace_integral(lambda x: c - 0.5 * a * (x - m) ** 2, x0=-4.0, M=M)
    assert abs(result.log_value - (M * c + 0.5 * math.log(2 * math.pi / (M * a)))) < 1e-10
    assert abs(float(result.mode) - m) < 1e-10
    assert abs(float(result.hessian.squeeze()) + a) < 1e-10


def test_quadratic_5d_is_exact():
    rng = np.random.default_rng(0)
    B = rng.normal(size=(5, 5))
    A = torch.tensor(B @ B.T + 5 * np.eye(5))
    m = torch.tensor(rng.normal(size=5))
    M = 7.0
    result = laplace_integral(lambda x: 0.3 - 0.5 * (x - m) @ A @ (x - m), x0=np.zeros(5), M=M)
    expected = M * 0.3 + 2.5 * math.log(2 * math.pi) - 0.5 * float(torch.logdet(M * A))
    assert abs(result.log_value - expected) < 1e-10
    torch.testing.assert_close(result.mode, m, rtol=0, atol=1e-10)
    torch.testing.assert_close(result.hessian, -A, rtol=0, atol=1e-10)


def test_the_check_of_a_quadratic_maximum_calls_f_as_often_in_any_dimension():
    """The check takes uᵀ(−∇²f)u a tenth of a width away along each eigenvector by Hessian-vector products, all at
    once: log_f is called as often at d = 40 as at d = 2 (until 2026-12-06 a full Hessian at each of the 2d points,
    2d more calls and O(d²) work: 8.9 s at d = 300 against 2.1 s now on a 2-core Zen 1). The value is Laplace's
    closed form at the mode 0, where f = 0 and f'' = −1 along each axis: d · ½ log(2π/M)."""
    calls = {}
    for d in (2, 40):
        calls[d] = 0

        def log_f(x, d=d):
            calls[d] += 1
            return -0.5 * (x * x).sum() - 0.1 * (x ** 4).sum()

        result = laplace_integral(log_f, torch.full((d,), 0.3), M=5.0)
        one = 0.5 * math.log(2 * math.pi / 5.0)                       # √(2π/M) per axis
        assert result.log_value == pytest.approx(d * one, rel=1e-12)
    assert calls[40] == calls[2], calls


def test_not_negative_definite_is_a_clear_error_not_nan():
    # f(x) = -x⁴ has its maximum at 0 with f'' = 0: Laplace's method does not apply.
    with pytest.raises(LaplaceError, match="not negative definite"):
        laplace_integral(lambda x: -x**4, x0=1.0)
    # unbounded above: no maximum is found
    with pytest.raises(LaplaceError, match="no maximum"):
        laplace_integral(lambda x: x, x0=0.0, max_steps=20)


def test_the_mode_search_leaves_a_region_of_negative_curvature_of_an_ill_conditioned_f():
    """f = −500 z₁² − (z₂² − 1)² − 5 z₃² − 10 z₄², from z₂ = 0.1 where ∂²f/∂z₂² = 4 − 12 z₂² > 0: −∇²f is not
    positive definite. Until 2026-12-07 the search took gradient steps there, which the line search shortens to the
    steepest curvature's scale (500 along z₁), and after 30 steps z₂ had moved from 0.1 to 0.13; Newton's step with
    the eigenvalues' absolute values reaches the maximum at (0, 1, 0, 0), f = 0, in a few steps."""
    from vaelab.laplace import newton_maximize

    def f(z, _):
        return -500 * z[0] ** 2 - (z[1] ** 2 - 1) ** 2 - 5 * z[2] ** 2 - 10 * z[3] ** 2

    z0 = torch.tensor([[0.3, 0.1, 0.5, 0.5]], dtype=torch.float64)
    assert bool((torch.linalg.eigvalsh(-torch.func.hessian(f)(z0[0], None)) < 0).any())
    # stopped short of the maximum there, the refusal says so: no mode, not a saddle
    with pytest.raises(NotNegativeDefinite, match="where the search stopped, 1 step without a maximum, is not") as info:
        laplace_log_marginal(f, torch.zeros(1, 1, dtype=torch.float64), z0, max_steps=1)
    assert not info.value.converged
    result = newton_maximize(f, z0, torch.zeros(1, 1, dtype=torch.float64), max_steps=30)
    assert result.outcome.tolist() == [SMOOTH] and result.steps < 15
    torch.testing.assert_close(result.mode[0], torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64), rtol=0,
                               atol=1e-8)
    assert abs(float(result.value[0])) < 1e-12


def test_jitter_regularises_with_a_warning():
    with pytest.warns(UserWarning, match="jitter"):
        result = laplace_integral(lambda x: -x**4, x0=1.0, jitter=1.0)
    assert math.isfinite(result.log_value)


def test_stirling_against_lgamma_1_to_1000():
    n = np.arange(1, 1001, dtype=float)
    exact = np.array([math.lgamma(k + 1) for k in n])
    rel = np.expm1(exact - log_stirling(n, 0))           # relative error of N!
    assert np.all(rel > 0)
    # Robbins (1955): e^{1/(12N+1)} < N!/(√(2πN)(N/e)^N) < e^{1/(12N)}
    log_ratio = exact - log_stirling(n, 0)
    assert np.all(log_ratio > 1 / (12 * n + 1)) and np.all(log_ratio < 1 / (12 * n))
    scaled = 12 * n * rel
    assert abs(scaled[99] - 1) < 1e-3                     # N = 100
    assert np.all(np.diff(scaled) < 0) and abs(scaled[-1] - 1) < 1e-4
    # values in REFERENCES.md: 0.0844 at N = 1, 8.365e-3 at N = 10, 8.337e-4 at N = 100
    assert rel[0] == pytest.approx(0.0844, abs=1e-4)
    assert rel[9] == pytest.approx(8.365e-3, rel=1e-3) and rel[99] == pytest.approx(8.337e-4, rel=1e-3)


def test_stirling_series_coefficients_and_error_bound():
    assert [str(c) for c in stirling_coefficients(8)] == [
        "1/12", "-1/360", "1/1260", "-1/1680", "1/1188", "-691/360360", "1/156", "-3617/122400"]
    import mpmath

    mpmath.mp.dps = 50
    for n in (1, 2, 3, 5, 10, 30):
        exact = mpmath.loggamma(n + 1)
        for k in range(0, 6):
            # error of the k-term truncation vs the first omitted term: smaller, and of its sign
            approx = 0.5 * mpmath.log(2 * mpmath.pi * n) + n * mpmath.log(n) - n + sum(
                mpmath.mpf(c.numerator) / c.denominator / mpmath.mpf(n) ** (2 * j - 1)
                for j, c in enumerate(stirling_coefficients(k), start=1))
            omitted = stirling_coefficients(k + 1)[k]
            term = mpmath.mpf(omitted.numerator) / omitted.denominator / mpmath.mpf(n) ** (2 * k + 1)
            error = exact - approx
            assert abs(error) < abs(term) and error * term > 0
            if k <= 3 and n >= 2:   # float64 log_stirling agrees with the high-precision sum
                assert abs(log_stirling(n, k) - float(approx)) < 1e-12 * max(1.0, n * math.log(n))


def test_laplace_on_log_x_minus_x_reproduces_stirling():
    for n in (1, 2, 10, 100, 1000, 10**6):
        result = laplace_integral(lambda x: torch.log(x) - x, x0=0.5, M=float(n))
        assert abs(float(result.mode) - 1) < 1e-10 and abs(float(result.hessian.squeeze()) + 1) < 1e-10
        laplace = (n + 1) * math.log(n) + result.log_value
        assert abs(laplace - log_stirling(n, 0)) < 1e-12 * max(1, n * math.log(n))


def test_stirling_table_columns():
    rows = stirling_table([100, 10**6], terms=2)
    assert abs(rows[0]["scaled_error"] - 1) < 1e-3 and abs(rows[1]["scaled_error"] - 1) < 1e-5
    assert rows[0]["rel_error_terms"] == pytest.approx(1 / (1260 * 100**5), rel=1e-3)


def test_stirling_table_takes_whole_numbers_exactly():
    # 10¹⁸ − 1 is not a float64 (it rounds to 10¹⁸): the table takes it as the whole number it is (until 2026-12-05
    # `vaelab stirling` passed it as a float64, so its row was of 10¹⁸)
    import mpmath

    n = 10**18 - 1
    (row,) = stirling_table([n], terms=0)
    assert row["n"] == n
    with mpmath.workdps(80):
        exact = mpmath.loggamma(mpmath.mpf(n) + 1)
        stirling = 0.5 * mpmath.log(2 * mpmath.pi * n) + n * mpmath.log(n) - n
        assert abs(row["rel_error"] / mpmath.expm1(exact - stirling) - 1) < 1e-30


def test_correction_c1_values():
    assert laplace_c1(lambda x: torch.log(x) - x, 1.0) == pytest.approx(1 / 12, abs=1e-12)
    assert laplace_c1(lambda x: -x**2 / 2 - x**4 / 4, 0.0) == pytest.approx(-3 / 4, abs=1e-12)


@pytest.mark.parametrize("call, message", [
    # each was a ZeroDivisionError, "math domain error", an IndexError, a message naming M, or an answer for a string
    (lambda: laplace_c1(lambda x: 0 * x, 0.0), r"^f''\(x0\) = 0 at x0 = 0.0: c₁ needs a maximum, f''\(x₀\) < 0"),
    (lambda: laplace_c1(lambda x: x**2, 0.0), r"^f''\(x0\) = 2 at x0 = 0.0"),
    (lambda: laplace_c1(lambda x: -x**2, float("nan")), r"^x0 must be a finite number"),
    (lambda: stirling_errors(0, [0, 1]), r"^N must be a finite number > 0, got 0$"),
    (lambda: stirling_errors(5, [-1]), r"^terms must be a whole number from 0 to 30, got -1"),
    (lambda: stirling_errors(5, []), r"^terms must name at least one count"),
    (lambda: log_factorial_laplace(0), r"^N must be a finite number > 0, got 0$"),
    (lambda: log_factorial_laplace(float("inf")), r"^N must be a finite number > 0, got inf$"),
    (lambda: log_stirling("5"), r"^N must be a number or an array of numbers, got '5'$"),
    (lambda: log_stirling(True), r"^N must be a number or an array of numbers, got True$"),
    # until 2026-12-06: torch's "vmap(f, ...): `f` must only return Tensors"; "start inside the domain" of a vector;
    # a complex x0 taken as its real part with a warning
    (lambda: laplace_integral(lambda x: 1.0, [0.0, 0.0]), r"^log_f must return a scalar tensor .* returned 1.0$"),
    (lambda: laplace_integral(lambda x: -x * x, [0.0, 0.0]), r"^log_f must return a scalar tensor .* \[-0.0, -0.0\]$"),
    (lambda: laplace_integral(lambda x: -x * x, torch.zeros(2, dtype=torch.complex64)),
     r"^x0 must be a real number or a vector of real numbers"),
    (lambda: laplace_integral(lambda x: -x * x, 1 + 0j), r"^x0 must be a real number"),
    # until 2026-12-07: True taken as 1 (jitter=True a Hessian regularised by I, a wrong integral); TypeError for a
    # string or None, OverflowError for a whole M beyond float64; a plain ValueError for the correction in 2-D, after
    # the search for the mode
    (lambda: laplace_integral(lambda x: -x * x, 0.0, jitter=True), r"^jitter must be a finite number ≥ 0, got True$"),
    (lambda: laplace_integral(lambda x: -x * x, 0.0, jitter="1"), r"^jitter must be a finite number ≥ 0, got '1'$"),
    (lambda: laplace_integral(lambda x: -x * x, 0.0, gtol=None), r"^gtol must be a finite number > 0, got None$"),
    (lambda: laplace_integral(lambda x: -x * x, 0.0, M=10**400), r"^M must be a finite number > 0, got 1000"),
    (lambda: laplace_integral(lambda x: -x * x, 0.0, max_steps=True), r"^max_steps must be a whole number ≥ 1"),
    (lambda: laplace_integral(lambda x: -x * x, 0.0, correction="yes"), r"^correction must be True or False"),
    (lambda: laplace_integral(lambda x: -(x * x).sum(), [0.0, 0.0], correction=True),
     r"^the \(1 \+ c₁/M\) correction is implemented for 1-D integrals only, and x0 has 2 coordinates"),
    (lambda: log_factorial_laplace(10**400), r"^N must be a finite number > 0, got 1000"),
])
def test_the_stirling_and_correction_functions_refuse_what_they_cannot_take(call, message):
    with pytest.raises(LaplaceError, match=message):
        call()
    assert issubclass(LaplaceError, ValueError)


def test_laplace_takes_an_x0_that_requires_grad_and_n_beyond_int64():
    # an x0 with requires_grad (a model's output) is its value (it warned of a tensor converted to a scalar);
    # a whole N beyond int64 is a number (it was "N must be a number or an array of numbers, got 10³⁰")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = laplace_integral(lambda x: -0.5 * (x * x).sum(), torch.ones(2, requires_grad=True), M=2.0)
    assert result.log_value == pytest.approx(math.log(math.pi), rel=1e-12)
    assert log_stirling(10**30) == pytest.approx(log_stirling(1e30), rel=1e-15)


def test_correction_improves_quartic_against_quadrature():
    M = 1000.0
    f = lambda x: -x**2 / 2 - x**4 / 4  # noqa: E731
    # integrand rescaled by its peak, breakpoints every 1/√M around the mode
    points = np.arange(-10, 11) / math.sqrt(M)
    value, error = integrate.quad(lambda x: math.exp(M * (-x * x / 2 - x**4 / 4)), -1, 1, points=points,
                                  epsabs=0, epsrel=1e-13, limit=500)
    exact = math.log(value)
    result = laplace_integral(f, x0=0.3, M=M, correction=True)
    assert result.c1 == pytest.approx(-0.75, abs=1e-12)
    leading_error = abs(result.log_peak + result.log_width - exact)
    corrected_error = abs(result.log_value - exact)
    assert leading_error == pytest.approx(0.75 / M, rel=0.01)          # the O(1/M) term, 7.5e-4
    assert corrected_error < 1e-5 and corrected_error < leading_error / 50  # what is left is O(1/M²)


def test_ppca_laplace_is_exact_and_laplace_proposal_has_equal_weights():
    # p(z) = N(0, I₃), p(x|z) = N(Wz + b, s²I₆): log p(x, z) is quadratic in z, so Laplace is exact.
    rng = np.random.default_rng(1)
    W, b, s = torch.tensor(rng.normal(size=(6, 3))), torch.tensor(rng.normal(size=6)), 0.6
    x = torch.tensor(rng.normal(size=(4, 6)))

    def log_joint(z, xi):
        mean = W @ z + b
        return (-0.5 * ((xi - mean) / s) ** 2 - math.log(s) - 0.5 * LOG_2PI).sum() - 0.5 * (3 * LOG_2PI + z @ z)

    cov = W @ W.T + s**2 * torch.eye(6)
    exact = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    marginal = laplace_log_marginal(log_joint, x, torch.zeros(4, 3, dtype=torch.float64))
    torch.testing.assert_close(marginal.log_marginal, exact, rtol=0, atol=1e-6)
    assert (marginal.outcome == SMOOTH).all()       # a smooth maximum, found by the gradient test
    z, log_r = sample_laplace_proposal(marginal, 1000, torch.Generator().manual_seed(0))
    log_w = torch.func.vmap(torch.func.vmap(log_joint))(z, x.expand(1000, -1, -1)) - log_r   # (1000, 4)
    assert float(log_w.std(0).max()) < 1e-9
    torch.testing.assert_close(log_w.mean(0), exact, rtol=0, atol=1e-6)


def test_stirling_columns_obey_dlmf_bounds_from_1_to_1e18():
    """DLMF 5.11(ii): for real N > 0 the error of the K-term truncation of ln N! is smaller in magnitude than
    the first omitted term and has its sign. The table's columns (relative errors of N!) must show that at
    every N from 1 to 10¹⁸, and 12N × the leading error must tend to 1 from above (1 + 1/(24N) + …)."""
    import mpmath

    from vaelab.laplace import stirling_coefficients

    ns = [1, 2, 3, 10, 100, 10**4, 10**6, 10**8, 10**12, 10**15, 10**18]
    for terms in (0, 1, 2, 4, 8):
        omitted = stirling_coefficients(terms + 1)[terms]
        for row in stirling_table([float(n) for n in ns], terms):
            n = mpmath.mpf(row["n"])
            with mpmath.workdps(600):
                bound = mpmath.mpf(omitted.numerator) / omitted.denominator / n ** (2 * terms + 1)
                log_error = mpmath.log1p(row["rel_error_terms"])         # ln N! − ln approximation
                assert abs(log_error) < abs(bound) and log_error * bound > 0, (terms, row["n"])
                if n >= 100:                                                  # and close to it for large N
                    assert abs(log_error) > abs(bound) * (1 - 1 / n)
                scaled = row["scaled_error"]
                assert 1 < scaled < 1 + 1 / (12 * n) and abs(scaled - 1 - 1 / (24 * n)) < 1 / (10 * n * n) + 1e-30
    rows = stirling_table([1e18], 2)
    assert rows[0]["exact"] == pytest.approx(math.lgamma(1e18 + 1), rel=1e-15)


def test_stirling_says_where_its_correction_terms_make_the_error_worse(capsys):
    """Stirling's series is asymptotic: 30 correction terms at N = 1 give a relative error of N! of
    5.7e+2594435231320763920825695904915, right, and printed without a word until 2026-12-07. The note names the N
    made worse than by no term, and says the best count is about πN, which is checked here against the table."""
    from vaelab.cli import main
    from vaelab.laplace import stirling_table

    assert main(["stirling", "--n", "1", "2", "3", "10", "--terms", "30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[-1].startswith("note: Stirling's series diverges"), lines
    assert "30 correction terms make N = 1, 2, 3 worse than none" in lines[-1] and "about πN" in lines[-1]
    for n in (1, 2, 3, 5):
        errors = [abs(stirling_table([n], k)[0]["rel_error_terms"]) for k in range(31)]
        assert abs(min(range(31), key=errors.__getitem__) - math.pi * n) <= 1
    # by size, not sign: one term at N = 1 leaves −0.0023 of 0.084, better; the default 2 terms say nothing
    assert stirling_table([1], 1)[0]["rel_error_terms"] < 0
    for terms in ("1", "2", "0"):
        assert main(["stirling", "--n", "1", "--terms", terms]) == 0
        assert "note" not in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["latex", "markdown", "csv"])
def test_stirling_prints_a_table_to_paste(kind, tmp_path, capsys):
    """`stirling --format latex|markdown|csv`: the table alone on stdout, its numbers those of the text table with
    the same digits (in LaTeX 8.3337e-5 as $8.3337 \\times 10^{-5}$, in math mode), the note on the series'
    divergence on stderr; the LaTeX table compiles in a bare article with booktabs (where pdflatex is installed).
    Until 2026-12-08 the text table alone: a report on the exercise retyped it."""
    import csv

    from vaelab.cli import main

    assert main(["stirling", "--n", "1", "1000", "--terms", "30"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert main(["stirling", "--n", "1", "1000", "--terms", "30", "--format", kind]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("note: Stirling's series diverges") and "note" not in captured.out
    cells = [line.split()[:4] for line in text[1:3]]          # N, ln N!, Laplace, rel. error of the text table
    assert cells[1][3] == "8.3337e-5" and cells[0][3] == "0.084438", text
    if kind == "csv":
        rows = list(csv.reader(captured.out.splitlines()))
        assert rows[0] == ["N", "ln N! (lgamma)", "Laplace/Stirling", "rel. error", "12N × rel. error",
                           "rel. error, 30 terms"]
        assert [row[:4] for row in rows[1:]] == cells and rows[1][5] == "5.727e+2594435231320763920825695904915"
        return
    if kind == "markdown":
        lines = captured.out.splitlines()
        assert lines[1] == "|---:|---:|---:|---:|---:|---:|" and lines[3].startswith("| 1000 | 5912.128178 | ")
        assert "| 8.3337e-5 |" in lines[3] and "relative error of N!" in lines[-1]
        return
    table = captured.out
    assert r"\begin{tabular}{rrrrrr}" in table and "1000 & $5912.128178$ & $5912.128095$ & $8.3337 \\times 10^{-5}$" \
        in table and r"$5.727 \times 10^{2594435231320763920825695904915}$" in table, table
    assert r"\caption{ln N! by lgamma and by Laplace's method (Stirling's formula, $\surd$(2$\pi$N)" in table, table
    latex_compiles(table, tmp_path)


def test_the_stirling_plot_of_many_terms_has_a_colour_scale_and_a_capped_axis():
    """`stirling --terms 30 --plot` drew 31 curves in a 10-colour cycle with a legend of 32 entries, taller than the
    axes and covering them, on an axis up to 10¹⁷⁸ (the divergent series at N < K/π) that squeezed the useful curves
    together (until 2026-12-07). Beyond 3 terms a colour scale names K; the axis ends at 10 and a line says why."""
    import matplotlib.pyplot as plt

    from vaelab.laplace import stirling_error_curves
    from vaelab.plots import STIRLING_ERROR_CAP, stirling_figure

    fig = stirling_figure(*stirling_error_curves(30, [1, 2, 3, 10, 100, 1000]))
    ax, bar = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["1/(12N)"]
    assert bar.get_ylabel() == "correction terms K"
    assert len({tuple(line.get_color()) for line in ax.get_lines()[:-1]}) == 31            # one colour per K
    assert ax.get_ylim()[1] == STIRLING_ERROR_CAP and any("off the axis" in t.get_text() for t in ax.texts)
    fig.canvas.draw()
    inside, legend = ax.get_window_extent(), ax.get_legend().get_window_extent()
    assert inside.x0 <= legend.x0 and legend.x1 <= inside.x1 and inside.y0 <= legend.y0 and legend.y1 <= inside.y1
    plt.close(fig)
    fig = stirling_figure(*stirling_error_curves(2, [1, 10, 100]))          # the default: a legend, as before
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "0 correction terms", "1 correction term", "2 correction terms", "1/(12N)"]
    assert len(fig.axes) == 1 and not fig.axes[0].texts and fig.axes[0].get_ylim()[1] < 1
    plt.close(fig)


def test_stirling_plot_honours_n_and_the_file_format(tmp_path, capsys):
    from vaelab.cli import main

    assert main(["stirling", "--n", "3", "30", "300", "--terms", "1", "--plot", str(tmp_path / "s.jpg")]) == 0
    assert (tmp_path / "s.jpg").read_bytes()[:3] == b"\xff\xd8\xff"               # JPEG, not a PNG in disguise
    assert main(["stirling", "--n", "1000", "--plot", str(tmp_path / "s.svg")]) == 0
    assert b"<svg" in (tmp_path / "s.svg").read_bytes()[:1000]
    from vaelab.laplace import stirling_error_curves

    ns, curves = stirling_error_curves(1, [3.0, 30.0, 300.0])
    assert list(ns) == [3, 30, 300] and curves[0][0] == pytest.approx(math.expm1(math.lgamma(4) - log_stirling(3)))


@pytest.mark.parametrize("scale", [1.0, 1e-7])
def test_wide_and_narrow_gaussians_integrate_to_their_closed_form(scale):
    """Hessian eigenvalues from 1e-3 to 1e4 (condition 10⁷), and all of them scaled by 1e-7: the singularity
    test is relative to the Hessian's own scale and the dtype, so these are valid Gaussians."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    A = torch.tensor(q @ np.diag([1e-3, 1.0, 50.0, 1e4]) @ q.T * scale)
    m = torch.tensor(rng.normal(size=4))
    result = laplace_integral(lambda x: 0.7 - 0.5 * (x - m) @ A @ (x - m), x0=np.zeros(4))
    expected = 0.7 + 2 * math.log(2 * math.pi) - 0.5 * float(torch.logdet(A))
    assert abs(result.log_value - expected) < 1e-8 * max(1.0, abs(expected))
    one_d = laplace_integral(lambda x: -0.5 * 1e-3 * scale * (x - 2.0) ** 2, x0=0.0)
    assert abs(one_d.log_value - 0.5 * math.log(2 * math.pi / (1e-3 * scale))) < 1e-8


def test_extreme_m_finds_the_mode_on_f_to_the_precision_m_needs():
    """f = −x² from x0 = 0.3 with M = 10³⁰⁰: the search's first stop (x ≈ 5.6e−17, where |f'| ≈ 1e−16 passes
    the gradient test on f) costs M·x² ≈ 3e267 nats; the result must be the exact ½ log(π/M) = −344.815…"""
    result = laplace_integral(lambda x: -x * x, x0=0.3, M=1e300)
    assert result.log_value == pytest.approx(0.5 * math.log(math.pi / 1e300), abs=1e-9)


def test_extreme_m_without_a_representable_mode_is_refused_in_one_line():
    """f = −(x² − 2)²: no float64 x makes f' vanish (x² rounds to 2 ± 4e−16), so at M = 10³⁰ the mode's
    last bit moves M·f(x₀) by ≈ 0.2 nats, far beyond what the answer (≈ −35) can carry: refused, not wrong.
    At M = 10¹⁸ it is still exact to 1e−9 against ½ log(2π/(16M))."""
    f = lambda x: -(x * x - 2) ** 2  # noqa: E731
    assert laplace_integral(f, x0=1.3, M=1e18).log_value == pytest.approx(0.5 * math.log(2 * math.pi / 16e18),
                                                                            abs=1e-9)
    with pytest.raises(LaplaceError, match="leaves no precision") as error:
        laplace_integral(f, x0=1.3, M=1e30)
    assert "\n" not in str(error.value)
