"""Where the nats go (issue 24): the gap decomposition against a model whose posterior is known exactly, the
optimiser's guarantee, the nested K curve, the latent units over training, and the one-line refusals."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from vaelab.cli import main
from vaelab.gaps import autograd_forms, optimise_gaussians


class LinearGaussian:
    """p(z) = N(0, I), p(x|z) = N(Wz + b, σ²I): the posterior is Gaussian with precision Λ = I + WᵀW/σ², mean
    Λ⁻¹Wᵀ(x − b)/σ², and x ~ N(b, WWᵀ + σ²I), all in closed form (float64)."""

    def __init__(self, d: int = 2, n: int = 5, sigma: float = 0.7, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        column = torch.randn(n, 1, generator=g, dtype=torch.float64)        # nearly parallel columns: a correlated
        self.W = column + 0.25 * torch.randn(n, d, generator=g, dtype=torch.float64)   # posterior, a real gap
        self.b = torch.randn(n, generator=g, dtype=torch.float64)
        self.sigma2 = sigma ** 2

    def log_joint(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean = z @ self.W.T + self.b                                              # (…, B, n)
        prior = -0.5 * (z.square().sum(-1) + z.shape[-1] * math.log(2 * math.pi))
        likelihood = -0.5 * ((x - mean).square().sum(-1) / self.sigma2 + x.shape[-1] * math.log(2 * math.pi * self.sigma2))
        return prior + likelihood

    def sample(self, count: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(count, self.W.shape[1], generator=g, dtype=torch.float64)
        return z @ self.W.T + self.b + math.sqrt(self.sigma2) * torch.randn(count, self.W.shape[0], generator=g,
                                                                              dtype=torch.float64)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + self.sigma2 * torch.eye(len(self.b), dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def precision(self) -> torch.Tensor:
        return torch.eye(self.W.shape[1], dtype=torch.float64) + self.W.T @ self.W / self.sigma2

    def best_diagonal_gap(self) -> float:
        """KL(q* ‖ p(z|x)) for the best diagonal Gaussian q*: its precision is diag(Λ) (the same for every x), so
        the approximation gap is ½ (Σᵢ log Λᵢᵢ − log det Λ)."""
        precision = self.precision()
        return 0.5 * float(torch.log(torch.diagonal(precision)).sum() - torch.logdet(precision))


def test_the_measured_approximation_gap_is_the_exact_one_within_its_stated_error():
    model = LinearGaussian()
    x = model.sample(40, seed=1)
    start = torch.zeros(40, 2, dtype=torch.float64)                         # a poor encoder: the prior
    _, _, result = optimise_gaussians(autograd_forms(model.log_joint), x, start, start.clone(), 3000,
                                      torch.Generator().manual_seed(2))
    measured = model.log_px(x) - result.elbo_optimised                      # (B,)
    exact = model.best_diagonal_gap()
    assert exact > 0.5                                                      # the posterior is correlated: a real gap
    # per digit: within 4 stated standard errors of the final estimate plus the stopping rule's tolerance
    assert torch.all((measured - exact).abs() <= 4 * result.elbo_optimised_stderr + 0.05), (measured - exact)
    mean_error = float((measured - exact).mean())
    assert abs(mean_error) <= 4 * float(result.elbo_optimised_stderr.square().mean().sqrt()) / math.sqrt(40) + 0.02
    assert bool(result.converged.all()) and int(result.steps.max()) < 3000


def test_the_optimiser_never_leaves_a_digit_below_its_encoder(data_dir):
    """On a trained tiny VAE and a few optimisation steps (too few to converge), every digit's ELBO[q*] is at
    least the ELBO of where it started, on the same final draws."""
    from vaelab.data import DataConfig, load_mnist, prepare
    from vaelab.gaps import encoder_gaussian
    from vaelab.models import ModelConfig, build_model

    torch.manual_seed(3)
    model = build_model(ModelConfig(hidden=((32,),), latent=(4,))).double().eval()
    data = prepare(load_mnist(data_dir), DataConfig(test_examples=30, train_examples=10))
    x = data.test_binary.double()
    mu0, logvar0 = encoder_gaussian(model, x)
    model.requires_grad_(False)
    _, _, result = optimise_gaussians(autograd_forms(model.log_joint), x, mu0, logvar0, 5,
                                      torch.Generator().manual_seed(4))
    assert torch.all(result.elbo_optimised >= result.elbo_encoder)


@pytest.mark.parametrize("hidden", [(24,), (24, 12)])
def test_the_hand_derived_gap_forms_equal_autograd(hidden):
    """The ReLU MLP's log p(x, z) through its evaluation fast form and its gradient in z derived by hand
    (``MLPVAE.log_joint_score``) against the model's log_joint and autograd, float64, on the same z; and the
    lookup gives them only to the configurations they cover."""
    from vaelab.gaps import HAND_DERIVED_FORMS, joint_forms
    from vaelab.models import ModelConfig, build_model

    torch.manual_seed(8)
    model = build_model(ModelConfig(hidden=(hidden,), latent=(5,))).double().eval()
    x = (torch.rand(7, 784, generator=torch.Generator().manual_seed(9)) < 0.3).double()
    z = 2 * torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64)   # (S, B, d)
    forms, reference = joint_forms(model), autograd_forms(model.log_joint)
    assert forms.score.__func__ is type(model).log_joint_score                 # the hand-derived form was chosen
    with torch.no_grad():
        torch.testing.assert_close(forms.joint_for(x)(z), model.log_joint(z, x), rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(forms.score(z, x), reference.score(z, x), rtol=1e-10, atol=1e-10)
        assert float(forms.score(z, x).abs().min()) > 0                        # not trivially zero
    for config in (ModelConfig(hidden=(hidden,), latent=(5,), activation="tanh"),
                   ModelConfig(hidden=(hidden,), latent=(5,), prior="mog", prior_components=3),
                   ModelConfig(hidden=(hidden,), latent=(5,), flow="planar", flow_steps=2)):
        other = build_model(config)
        assert not hasattr(joint_forms(other).score, "__func__"), config       # autograd for everything else
    assert set(HAND_DERIVED_FORMS) == {(type(model), "relu")}


def test_elbo_of_the_encoder_shares_the_optimised_draws_in_its_own_family(data_dir):
    """One layer without a flow: ELBO[q] is the start's estimate on the final draws of ELBO[q*] (the same q);
    with two layers it is the model's own ELBO, log p(x, z) − log q(z|x) on its own draws."""
    from vaelab.data import DataConfig, load_mnist, prepare
    from vaelab.gaps import FINAL_DRAWS, encoder_gaussian, gap_batch, gaussian_elbo, joint_forms, own_elbo
    from vaelab.models import ModelConfig, build_model

    data = prepare(load_mnist(data_dir), DataConfig(test_examples=6, train_examples=10))
    x = data.test_binary.double()
    torch.manual_seed(11)
    one = build_model(ModelConfig(hidden=((16,),), latent=(3,))).double().eval()
    result = gap_batch(one, x, 30, torch.Generator().manual_seed(12))

    def replay(steps: int, d: int) -> tuple[torch.Generator, torch.Tensor]:
        """The optimisation's stream: check draws, each step's draws, then the final draws (returned)."""
        g = torch.Generator().manual_seed(12)
        torch.randn((32, 6, d), generator=g, dtype=torch.float64)
        for _ in range(steps):
            torch.randn((4, 1, d), generator=g, dtype=torch.float64)
        return g, torch.randn((FINAL_DRAWS, 6, d), generator=g, dtype=torch.float64)

    _, final = replay(int(result.steps.max()), 3)
    with torch.no_grad():
        start, _ = gaussian_elbo(joint_forms(one).joint_for, x, *encoder_gaussian(one, x), final)
    torch.testing.assert_close(result.elbo_encoder, start, rtol=1e-12, atol=1e-9)
    two = build_model(ModelConfig(name="mlp2", hidden=((16,), (8,)), latent=(3, 2))).double().eval()
    result = gap_batch(two, x, 5, torch.Generator().manual_seed(12))
    g, _ = replay(5, 5)
    own, _ = own_elbo(two, x, FINAL_DRAWS, g)                 # the next draws of the same stream
    torch.testing.assert_close(result.elbo_encoder, own, rtol=1e-12, atol=1e-9)


def test_nested_k_estimates_are_the_ordinary_ones_on_the_same_draws_and_rise_with_k():
    from vaelab.evaluation import _iwae_one_layer
    from vaelab.models import ModelConfig, build_model
    from vaelab.objectives import log_mean_exp

    torch.manual_seed(5)
    model = build_model(ModelConfig(hidden=((16,),), latent=(3,), activation="tanh")).double().eval()
    x = (torch.rand(200, 784, generator=torch.Generator().manual_seed(6)) < 0.3).double()
    with torch.no_grad():
        curve = _iwae_one_layer(model, x, 100, torch.Generator().manual_seed(7), 30, nested=(1, 10, 100))   # (3, B)
        eps = torch.randn((100, 3), generator=torch.Generator().manual_seed(7), dtype=torch.float64)       # its draws
        for row, n in enumerate((1, 10, 100)):
            log_w = model(x, eps[:n, None, :].expand(n, 200, 3)).log_weights()
            torch.testing.assert_close(curve[row], log_mean_exp(log_w, 0), rtol=1e-12, atol=1e-9)
    means = curve.mean(1)
    assert means[0] < means[1] < means[2]


def test_the_per_epoch_kl_of_every_unit_sums_to_the_epochs_kl(tmp_path, data_dir):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "3", "--hidden", "32", "--latent", "5", "--warmup", "2",
                 "--test-examples", "200", "--train-examples", "600", "--data-dir", str(data_dir),
                 "--no-progress"]) == 0
    rows = list(csv.DictReader(open(run / "latent.csv")))
    metrics = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 3 * 5
    for epoch, row in enumerate(metrics, start=1):
        units = [r for r in rows if int(r["epoch"]) == epoch]
        assert sum(float(u["kl"]) for u in units) == pytest.approx(float(row["test_kl"]), abs=1e-4)
        assert all(int(u["active"]) == (float(u["posterior_mean_variance"]) > 0.01) for u in units)
    # a resume keeps the history: it is in the training state, written again with every checkpoint
    assert main(["train", "--out", str(run), "--resume", "--epochs", "4", "--data-dir", str(data_dir),
                 "--no-progress"]) == 0
    again = list(csv.DictReader(open(run / "latent.csv")))
    assert again[:15] == rows and len(again) == 20


def test_gaps_and_the_k_curve_in_the_record_table_and_report(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "2", "--hidden", "32", "--latent", "4", "--test-examples",
                 "40", "--train-examples", "600", "--data-dir", str(data_dir), "--no-progress"]) == 0
    assert main(["evaluate", str(run), "--k", "1000", "--gaps", "--gap-steps", "60", "--k-curve", "--laplace",
                 "--test-examples", "40",
                 "--data-dir", str(data_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "approximation gap" in out and "amortisation gap" in out and "IWAE-10 " in out
    record = json.loads((run / "eval-k1000-n40-seed0-laplace-gaps60-kcurve.json").read_text())
    gaps = record["gaps"]
    assert [p["k"] for p in record["k_curve"]] == [1, 10, 100, 1000]
    assert record["k_curve"][-1]["mean"] == pytest.approx(-record["nll"])
    assert gaps["approximation_gap"]["mean"] + gaps["amortisation_gap"]["mean"] == pytest.approx(
        gaps["log_px"]["mean"] - gaps["elbo_encoder"]["mean"])
    assert 0 <= gaps["converged_fraction"] <= 1 and gaps["max_steps"] == 60 and "elbo_laplace" in gaps
    assert "encoder's own" in gaps["family"]
    digits = list(csv.DictReader(open(run / record["per_digit"])))
    assert {"elbo_optimised", "elbo_encoder", "iwae_k10", "gap_steps"} <= set(digits[0])
    assert main(["report", str(run), "--data-dir", str(data_dir)]) == 0
    html = (run / "report.html").read_text()
    for text in ('<section id="nats">', "approximation gap", "IWAE-K against K", "the latent units over training"):
        assert text in html, text


@pytest.mark.parametrize("flags, words", [(["--gap-steps", "0", "--gaps"], ["--gap-steps", "at least 1"]),
                                          (["--k-curve", "--k", "500"], ["--k-curve", "--k 1000 or more"])])
def test_bad_gap_and_curve_values_are_one_line_errors(flags, words, tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "1", "--hidden", "16", "--latent", "2", "--test-examples",
                 "20", "--train-examples", "300", "--data-dir", str(data_dir), "--no-progress"]) == 0
    capsys.readouterr()
    try:
        code = main(["evaluate", str(run), *flags, "--data-dir", str(data_dir), "--no-progress"])
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert not list(run.glob("eval-*"))


def test_a_family_that_stays_below_the_models_own_q_is_said_not_to_measure_the_gaps():
    """ELBO[q*] below ELBO[q] (a hierarchy whose diagonal Gaussian did not reach its q) carries a warning in the
    record; the ordinary case none."""
    from vaelab.evaluation import EvalConfig, _gaps_summary

    n = 8
    base = {"iwae": torch.full((n,), -90.0, dtype=torch.float64), "gap_steps": torch.full((n,), 100),
            "gap_converged": torch.ones(n, dtype=torch.bool)}
    good = _gaps_summary({**base, "elbo_optimised": torch.full((n,), -93.0, dtype=torch.float64),
                          "elbo_encoder": torch.full((n,), -97.0, dtype=torch.float64)}, "family", EvalConfig(), n)
    bad = _gaps_summary({**base, "elbo_optimised": torch.full((n,), -5000.0, dtype=torch.float64),
                         "elbo_encoder": torch.full((n,), -97.0, dtype=torch.float64)}, "family", EvalConfig(), n)
    assert "warning" not in good
    assert "below the model's own ELBO[q] by 4.9e+03 nats" in bad["warning"] and "do not measure" in bad["warning"]


def test_laplace_says_which_test_digit_it_does_not_apply_to_and_runs_batch_norm_in_evaluation_mode(monkeypatch):
    """A Hessian that is not negative definite at the mode of digit 3 of the second batch is reported as test
    digit 23 in the CLI's terms; and a ladder with batch normalisation goes through Laplace with its running
    averages (one digit per batch would be refused by batch statistics)."""
    from vaelab import evaluation
    from vaelab.evaluation import EvalConfig, laplace_estimates
    from vaelab.laplace import LaplaceError, NotNegativeDefinite
    from vaelab.models import ModelConfig, build_model

    torch.manual_seed(12)
    model = build_model(ModelConfig(name="hvae", hidden=((8,), (6,)), latent=(3, 2), activation="leaky_relu",
                                    inference="top-down", batch_norm=True)).eval()
    x = (torch.rand(2, 784, generator=torch.Generator().manual_seed(13)) < 0.3).float()
    try:
        laplace_estimates(model, x, EvalConfig(k=10, laplace=True, examples_per_batch=1))
    except LaplaceError:
        pass                                      # a saddle is the model's; batch statistics would be a ValueError
    real, calls = evaluation._laplace_batch, []

    def second_fails(*args):
        calls.append(1)
        if len(calls) == 2:
            raise NotNegativeDefinite("the Hessian at the mode is not negative definite", 3, [-0.5, 0.25])
        return real(*args)

    monkeypatch.setattr(evaluation, "_laplace_batch", second_fails)
    images = (torch.rand(50, 784, generator=torch.Generator().manual_seed(14)) < 0.3).float()
    with pytest.raises(LaplaceError, match=r"at test digit 23 .*not negative definite.*evaluate without --laplace"):
        laplace_estimates(build_model(ModelConfig(hidden=((8,),), latent=(2,))).eval(), images,
                          EvalConfig(k=10, laplace=True, examples_per_batch=20))
