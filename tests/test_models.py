"""The model's pieces against the plain formulas."""

from __future__ import annotations

import pytest
import torch

from vaelab.models import MLPVAE, ModelConfig
from vaelab.models.base import ACTIVATIONS, BatchNorm, evaluation_mlp, linear_layers
from vaelab.objectives import LN_2, LOG2_E, bernoulli_log_likelihood


@pytest.mark.parametrize("kernel", ["native", "product form"])
def test_log_likelihood_fast_form_equals_plain_form(kernel, monkeypatch):
    """``log_likelihood_for`` (``bernoulli_data_term``) against log p(x|z) written plainly: in float64 (the product
    form: data term h·(W_outᵀx), softplus in base 2) to 1e-12; in float32 within rounding of Σ|terms| (≈ 600 nats
    here), by the native kernel's −log p(x|z) in one pass where it can run, by the product form where it cannot
    (``VAELAB_NATIVE=0``, no compiler) and for draws that are not (…, B, d) of this batch's B digits."""
    from vaelab import native

    seen = []                                    # per call of the kernel: whether it took the data
    if kernel == "product form":
        monkeypatch.setitem(native._OPS, "softplus", None)
    elif native.softplus_kernel() is None:
        pytest.skip("no native kernel here")
    else:
        real = native.softplus_kernel()
        monkeypatch.setitem(native._OPS, "softplus", lambda y, base2, bias=None, data=None:
                            seen.append(data is not None) or real(y, base2, bias, data))
    torch.manual_seed(0)
    model = MLPVAE(ModelConfig(hidden=((32,),), latent=(4,))).double()
    x = (torch.rand(5, 784) < 0.3).double()
    z = torch.randn(7, 5, 4, dtype=torch.float64)
    plain = bernoulli_log_likelihood(model.decode(z), x)
    plain_one = bernoulli_log_likelihood(model.decode(z[:, :1]), x)   # (7, 1, 4): one draw for all digits
    with torch.no_grad():
        torch.testing.assert_close(model.log_likelihood_for(x)(z), plain, rtol=1e-12, atol=1e-9)
        fast = model.float().log_likelihood_for(x.float())
        torch.testing.assert_close(fast(z.float()).double(), plain, rtol=0, atol=600 * 1e-6)
        torch.testing.assert_close(fast(z[:, :1].float()).double(), plain_one, rtol=0, atol=600 * 1e-6)
    assert seen == ([True, False] if kernel == "native" else [])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_bf16_log_likelihood_is_the_plain_form_on_the_rounded_logits(activation):
    """The bf16 decoder's fast form against log p(x|z) written plainly on logits built step by step from
    bf16-rounded operands (products summed in float32, each result rounded to bf16, biases in float32): the
    data term and the softplus see the same rounded logits. Then against float32: close, but not equal."""
    from vaelab.precision import emulated_bf16_mm

    torch.manual_seed(0)
    model = MLPVAE(ModelConfig(hidden=((64, 32),), latent=(6,), activation=activation))
    x = (torch.rand(5, 784) < 0.3).float()
    z = torch.randn(7, 5, 6)
    bf16, act = torch.bfloat16, ACTIVATIONS[activation].inplace
    with torch.no_grad():
        h = z.reshape(-1, 6)
        for layer in linear_layers(model.decoder):
            h = act(emulated_bf16_mm(h.to(bf16), layer.weight.t().to(bf16)).float() + layer.bias)
        out = model.decoder_out
        y = emulated_bf16_mm(h.to(bf16), (out.weight * LOG2_E).t().to(bf16)).float() + out.bias * LOG2_E
        plain = bernoulli_log_likelihood((y.double() * LN_2).view(7, 5, 784), x.double())
        fast = model.bf16_log_likelihood_for(x, emulated_bf16_mm)(z).double()
        torch.testing.assert_close(fast, plain, rtol=0, atol=600 * 1e-6)
        full = model.log_likelihood_for(x)(z).double()
    assert 1e-4 < (fast - full).abs().max() < 0.5


def test_gauss_newton_precision_is_the_exact_hessian_for_relu():
    torch.manual_seed(1)
    model = MLPVAE(ModelConfig(hidden=((32,),), latent=(4,))).double()
    x = (torch.rand(3, 784) < 0.3).double()
    z = torch.randn(3, 4, dtype=torch.float64)
    exact = -torch.func.vmap(torch.func.hessian(model.log_joint))(z, x)
    torch.testing.assert_close(model.gauss_newton_precision(z, x), exact, rtol=1e-10, atol=1e-10)


def test_flops_per_example_of_the_reference_setting():
    # forward 2(784·256 + 256·100 + 50·256 + 256·784), backward twice that minus the first layer's input gradient
    forward = 2 * (784 * 256 + 256 * 100 + 50 * 256 + 256 * 784)
    assert ModelConfig().flops_per_example() == 3 * forward - 2 * 784 * 256


# ---- every model and objective: gradients, log weights, fast paths ---------------------------------

import math  # noqa: E402

import numpy as np  # noqa: E402
from scipy.stats import bernoulli, norm  # noqa: E402

from vaelab import checkpoint as ckpt  # noqa: E402
from vaelab.evaluation import _iwae_conditioned, _iwae_one_layer, _iwae_parts, iwae_estimator  # noqa: E402
from vaelab.models import HierarchicalVAE, build_model  # noqa: E402
from vaelab.objectives import elbo_objective, iwae_objective, log_mean_exp  # noqa: E402

TINY = {
    "mlp": ModelConfig(name="mlp", hidden=((7, 6),), latent=(3,), activation="tanh", init="glorot"),
    "mlp2": ModelConfig(name="mlp2", hidden=((6,), (5,)), latent=(4, 2), activation="tanh", init="glorot"),
    "mlp2-softplus": ModelConfig(name="mlp2", hidden=((5, 4), (3,)), latent=(3, 2), activation="softplus"),
    # the frontier models (issue 21): learned priors, flows, the ladder, the VampPrior paper's HVAE
    "mlp-mog": ModelConfig(hidden=((7,),), latent=(3,), activation="tanh", prior="mog", prior_components=4),
    "mlp-vampprior-gated": ModelConfig(hidden=((7,),), latent=(3,), activation="gated", prior="vampprior",
                                       prior_components=3),
    "mlp-planar": ModelConfig(hidden=((7,),), latent=(3,), activation="tanh", flow="planar", flow_steps=3),
    "mlp-iaf": ModelConfig(hidden=((7,),), latent=(3,), activation="tanh", flow="iaf", flow_steps=2, flow_width=6),
    "hvae-ladder-vampprior": ModelConfig(name="hvae", hidden=((6,), (5,), (4,)), latent=(4, 3, 2), activation="tanh",
                                         inference="top-down", prior="vampprior", prior_components=3),
    "hvae-ladder-batchnorm": ModelConfig(name="hvae", hidden=((6, 5), (5,), (4,)), latent=(4, 3, 2),
                                         activation="leaky_relu", inference="top-down", batch_norm=True),
    "hvae-iaf-mog": ModelConfig(name="hvae", hidden=((6,), (5,)), latent=(3, 2), activation="softplus", flow="iaf",
                                flow_steps=1, flow_width=5, prior="mog", prior_components=2),
    "tomczak-2-vampprior": ModelConfig(name="tomczak", hidden=((5, 5), (5, 5)), latent=(3, 2), activation="gated",
                                       prior="vampprior", prior_components=3, init="he"),
}


def tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(TINY[name]).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.rand(5, 784, generator=g) < 0.3).double()
    return model, x, g


def reference_objective(name: str, parts, beta: float) -> torch.Tensor:
    """The objectives' definitions written out from the parts (Burda et al. 2016, eqs. 3 and 8), per example."""
    ratio = sum(layer.log_ratio() for layer in parts.layers)                    # (K, B) log p(z) − log q(z|x)
    if name == "iwae":
        log_w = parts.reconstruction + beta * ratio
        return torch.logsumexp(log_w, 0) - math.log(len(log_w))
    return parts.reconstruction.mean(0) - beta * parts.kl()


@pytest.mark.parametrize("objective, samples, beta", [("elbo", 1, 1.0), ("elbo", 3, 0.4), ("iwae", 4, 1.0),
                                                      ("iwae", 3, 0.3), ("iwae", 1, 1.0)])
@pytest.mark.parametrize("name", list(TINY))
def test_objective_gradients_match_finite_differences(name, objective, samples, beta):
    """The gradient the training engine writes (autograd_step, into the flat gradient buffer) against
    central differences of the objective's definition in float64, along random directions, fixed draws ε.
    Public IWAE code has shipped with the normalised importance weights left in the graph (a spurious
    gradient term): such an engine fails this by O(1)."""
    from vaelab.engines import autograd_step
    from vaelab.training import FlatParameters

    model, x, g = tiny(name)
    flat = FlatParameters(model)
    eps = torch.randn(samples, len(x), model.config.total_latent, generator=g, dtype=torch.float64)
    values = autograd_step(model, x, eps, objective, beta)
    gradient = flat.param.grad.clone()
    with torch.no_grad():
        reference = reference_objective(objective, model(x, eps), beta)
    assert abs(float(values[0]) - float(reference.sum())) < 1e-9 * len(x) * 1000

    def loss() -> float:
        with torch.no_grad():
            return -float(reference_objective(objective, model(x, eps), beta).mean())

    for _ in range(3):
        direction = torch.randn(flat.param.shape, generator=g, dtype=torch.float64)
        analytic = float(gradient @ direction)
        h, ends = 1e-6, []
        for sign in (1, -1):
            flat.param.data.add_(sign * h * direction)
            ends.append(loss())
            flat.param.data.sub_(sign * h * direction)
        numeric = (ends[0] - ends[1]) / (2 * h)
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(analytic)), (analytic, numeric)


@pytest.mark.parametrize("name", list(TINY))
def test_iwae_with_one_draw_is_the_elbo_of_that_draw(name):
    """IWAE₁ = log w = log p(x|z) + Σ log p − log q: the single-draw ELBO estimate with the sampled KL, and
    the closed-form KL agrees with the sampled one in expectation (within 4 standard errors)."""
    model, x, g = tiny(name)
    eps = torch.randn(1, len(x), model.config.total_latent, generator=g, dtype=torch.float64)
    parts = model(x, eps)
    sampled_kl = -sum(layer.log_ratio() for layer in parts.layers)[0]
    torch.testing.assert_close(iwae_objective(parts).objective, parts.reconstruction[0] - sampled_kl,
                               rtol=1e-12, atol=1e-10)
    many = model(x, torch.randn(20000, len(x), model.config.total_latent, generator=g, dtype=torch.float64))
    sampled = -sum(layer.log_ratio() for layer in many.layers)                              # (K, B)
    stderr = sampled.std(0) / math.sqrt(len(sampled))
    assert torch.all((sampled.mean(0) - many.kl()).abs() < 4 * stderr)
    # with more draws the IWAE bound is higher than the ELBO from the same draws (Jensen)
    assert torch.all(iwae_objective(many).objective > elbo_objective(many).elbo)


def test_two_layer_log_weights_against_an_independent_float64_computation(tmp_path):
    """log p(x|z₁) + log p(z₁|z₂) + log p(z₂) − log q(z₁|x) − log q(z₂|z₁), recomputed with numpy and
    scipy from the saved weights alone."""
    torch.manual_seed(3)
    config = TINY["mlp2"]
    ckpt.save_weights(tmp_path / "w.safetensors", build_model(config))
    weights = {k: v.double().numpy() for k, v in ckpt.load_tensors(tmp_path / "w.safetensors")[0].items()}
    g = np.random.default_rng(4)
    x = (g.random((3, 784)) < 0.3).astype(float)
    eps = g.normal(size=(6, 3, sum(config.latent)))

    def net(prefix, h, hidden_layers):
        for i in range(hidden_layers):
            h = np.tanh(h @ weights[f"{prefix}.net.{2 * i}.weight"].T + weights[f"{prefix}.net.{2 * i}.bias"])
        out = h @ weights[f"{prefix}.out.weight"].T + weights[f"{prefix}.out.bias"]
        return out

    (h1, h2), (d1, _) = config.hidden, config.latent
    mu1, lv1 = np.split(net("up.0", x, len(h1)), 2, axis=-1)           # q(z₁|x)
    z1 = mu1 + np.exp(0.5 * lv1) * eps[..., :d1]
    mu2, lv2 = np.split(net("up.1", z1, len(h2)), 2, axis=-1)          # q(z₂|z₁)
    z2 = mu2 + np.exp(0.5 * lv2) * eps[..., d1:]
    pmu, plv = np.split(net("down.0", z2, len(h2)), 2, axis=-1)        # p(z₁|z₂)
    p = 1 / (1 + np.exp(-net("down.1", z1, len(h1))))                  # p(x|z₁)
    expected = (bernoulli.logpmf(x, p).sum(-1) + norm.logpdf(z1, pmu, np.exp(0.5 * plv)).sum(-1)
                + norm.logpdf(z2).sum(-1) - norm.logpdf(z1, mu1, np.exp(0.5 * lv1)).sum(-1)
                - norm.logpdf(z2, mu2, np.exp(0.5 * lv2)).sum(-1))
    model = build_model(config).double()
    model.load_state_dict(ckpt.load_tensors(tmp_path / "w.safetensors")[0])
    with torch.no_grad():
        value = model(torch.tensor(x), torch.tensor(eps)).log_weights()
        joint = model.log_joint(torch.cat([torch.tensor(z1), torch.tensor(z2)], -1), torch.tensor(x))
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-10, atol=1e-9)
    q = (norm.logpdf(z1, mu1, np.exp(0.5 * lv1)).sum(-1) + norm.logpdf(z2, mu2, np.exp(0.5 * lv2)).sum(-1))
    np.testing.assert_allclose(joint.numpy(), expected + q, rtol=1e-10, atol=1e-9)   # log p(x, z₁, z₂)


def test_fast_iwae_equals_parts_iwae_on_the_same_draws():
    """The one-layer fast path (ε-only prior/proposal ratio, hidden-unit data term, base-2 softplus) and the
    generic log weights of the model's Parts, on the same ε, in float64."""
    torch.manual_seed(5)
    model = build_model(ModelConfig(hidden=((16, 12),), latent=(4,), activation="tanh")).double()
    x = (torch.rand(6, 784, generator=torch.Generator().manual_seed(6)) < 0.3).double()
    k = 37
    with torch.no_grad():
        fast = _iwae_one_layer(model, x, k, torch.Generator().manual_seed(7), chunk=10)
        eps = torch.randn((k, 4), generator=torch.Generator().manual_seed(7), dtype=torch.float64)  # what it drew
        log_w = model(x, eps[:, None, :].expand(k, 6, 4)).log_weights()
        torch.testing.assert_close(fast, log_mean_exp(log_w, 0), rtol=1e-12, atol=1e-9)
        generic = _iwae_parts(model, x, 200, torch.Generator().manual_seed(8), chunk=64)
        assert generic.shape == (6,) and torch.all(torch.isfinite(generic))


@pytest.mark.parametrize("name", ["mlp-mog", "mlp-vampprior-gated", "mlp-planar", "mlp-iaf", "mlp2",
                                  "hvae-ladder-batchnorm", "hvae-ladder-vampprior", "hvae-iaf-mog"])
def test_conditioned_iwae_equals_parts_iwae_on_the_same_draws(name):
    """The models the fast path does not cover take ``_iwae_conditioned`` (what depends on x alone once per batch:
    the encoder and a flow's parameters, the ladder's bottom-up pass; the data term by its fast form where a
    one-layer model's activation is elementwise): the same estimates as the model's Parts chunk by chunk, on the
    same draws, in float64; and the estimator lookup picks it (and the fast path for the standard prior without a
    flow)."""
    model, x, _ = tiny(name)
    model.eval()
    if name == "hvae-ladder-batchnorm":
        randomize_batch_norm(model)
    if name == "mlp-vampprior-gated":
        with torch.no_grad():                                  # pseudo-inputs away from their start (all alike)
            model.prior.pseudo_logits.normal_(generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        conditioned = _iwae_conditioned(model, x, 150, torch.Generator().manual_seed(9), chunk=40, nested=(1, 10, 150))
        generic = _iwae_parts(model, x, 150, torch.Generator().manual_seed(9), chunk=40, nested=(1, 10, 150))
    torch.testing.assert_close(conditioned, generic, rtol=1e-12, atol=1e-10)
    assert iwae_estimator(model) is _iwae_conditioned
    assert iwae_estimator(tiny("mlp")[0]) is _iwae_one_layer


def randomize_batch_norm(model, seed: int = 4) -> None:
    """Running averages and affine parameters away from their start (0, 1, 1, 0), so that each enters a result."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BatchNorm):
                module.running_mean.normal_(generator=g)
                module.running_var.uniform_(0.2, 3.0, generator=g)
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.normal_(generator=g)


def test_evaluation_blocks_fold_batch_normalisation():
    """``Block.evaluation`` (batch normalisation folded into the linear maps, activations in place) against the
    block's modules in eval mode, in float64, with running averages and γ, β away from their start; refused in
    training mode, where batch normalisation uses the batch's statistics."""
    model, _, g = tiny("hvae-ladder-batchnorm")
    randomize_batch_norm(model)
    model.eval()
    for block in [*model.up, *model.down]:
        a = torch.randn(3, 5, block.net[0].in_features, generator=g, dtype=torch.float64)
        with torch.no_grad():
            h, out = block.evaluation(evaluation_mlp(block.net, model.config.activation))(a)
            h_ref, out_ref = block(a)
        torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        evaluation_mlp(model.down[0].net, model.config.activation)


def test_two_layer_sample_and_start_shapes():
    model, x, g = tiny("mlp2")
    assert isinstance(model, HierarchicalVAE)
    assert model.sample(7, g).shape == (7, 784) and model.posterior_start(x).shape == (5, 6)
    parts = model(x, torch.randn(3, 5, 6, generator=g, dtype=torch.float64))
    assert parts.reconstruction.shape == (3, 5) and [layer.z.shape for layer in parts.layers] == [(3, 5, 4), (3, 5, 2)]
    assert parts.layers[0].kl_per_dimension().shape == (3, 5, 4) and parts.layers[1].kl_per_dimension().shape == (3, 5, 2)


def test_model_config_errors_list_the_choices():
    from vaelab.errors import UsageError

    for config, message in [(ModelConfig(name="nope"), "choose one of mlp, mlp2"),
                            (ModelConfig(activation="sigmoid"), "choose one of relu, tanh"),
                            (ModelConfig(init="kaiming"), "choose one of torch, glorot, he"),
                            (ModelConfig(name="mlp2", hidden=((100,), (50,)), latent=(50,)), "give 2 latent sizes"),
                            (ModelConfig(name="mlp2", latent=(100, 50)), "needs 2 blocks of hidden widths")]:
        with pytest.raises(UsageError, match=message):
            config.validate()


def test_parameter_counts_match_the_modules():
    for config in [ModelConfig(), *TINY.values(), ModelConfig(name="mlp2", hidden=((100, 100), (50, 50)),
                                                              latent=(100, 50))]:
        model = build_model(config)
        assert sum(p.numel() for p in model.parameters()) == config.parameter_count()


def test_two_layer_evaluation_with_laplace_over_the_joint_latents():
    """IWAE-K with the joint q(z₁, z₂|x), the ELBO, the Laplace estimate at the joint mode over (z₁, z₂), and
    the per-layer statistics, on a tiny tanh model: every value finite, the ordering of bounds on average."""
    from vaelab.evaluation import EvalConfig, evaluate_run

    torch.manual_seed(9)
    model = build_model(TINY["mlp2"]).float().eval()
    x = (torch.rand(12, 784, generator=torch.Generator().manual_seed(10)) < 0.2).to(torch.uint8)
    summary, per_digit = evaluate_run(model, x, EvalConfig(k=200, laplace=True, examples_per_batch=4))
    assert set(per_digit) == {"elbo", "iwae", "is_laplace", "laplace"}
    assert all(torch.isfinite(v).all() for v in per_digit.values())
    assert float(per_digit["iwae"].mean()) > float(per_digit["elbo"].mean())
    assert sum(summary["laplace_modes"][k] for k in ("converged", "stalled", "not converged")) == 12
    assert [layer["latent"] for layer in summary["layers"]] == [4, 2]
    assert all(len(layer["kl_per_dimension"]) == layer["latent"] for layer in summary["layers"])


def test_stalled_laplace_modes_are_not_called_relu_kinks():
    """`evaluate --laplace` of a `planar-80` run (tanh, smooth: no kinks) said its 7 stalled modes had stopped at "a
    ReLU kink". A stall (laplace.NewtonResult) is a kink of a piecewise-linear network or the precision's limit; the
    warning names both."""
    from vaelab.records import format_eval_table

    result = {"estimates": [{"name": "Laplace", "mean": -90.0, "stderr": 1.0, "kind": "approximation, not a bound"}],
              "precision": "fp32", "nll": 90.0, "nll_stderr": 1.0, "k": 20, "n_examples": 30, "seconds": 1.0,
              "layers": [], "laplace_modes": {"converged": 20, "stalled": 7, "not converged": 3, "newton_steps": 30}}
    warning = format_eval_table(result).splitlines()[-1]
    assert warning.startswith("warning: of the Laplace modes, 20 converged, 7 stalled (") and "3 did not" in warning
    # the clamps of the VampPrior paper's log-variances are kinks too (its gated models have no ReLU; until 2026-12-07
    # "a kink of a ReLU network, …")
    assert "a kink of the model (a ReLU, a clamped log-variance), or the limit of the arithmetic's precision" in warning
    assert "a ReLU kink)" not in warning
