"""The model's pieces against the plain formulas."""

from __future__ import annotations

import torch

from vaelab.models import MLPVAE, ModelConfig
from vaelab.objectives import bernoulli_log_likelihood


def test_log_likelihood_matvec_form_equals_plain_form():
    torch.manual_seed(0)
    model = MLPVAE(ModelConfig(hidden=((32,),), latent=(4,))).double()
    x = (torch.rand(5, 784) < 0.3).double()
    z = torch.randn(7, 5, 4, dtype=torch.float64)
    plain = bernoulli_log_likelihood(model.decode(z), x)
    with torch.no_grad():   # the fast form: data term as h·(W₄ᵀx), softplus in base 2, grouped logs
        torch.testing.assert_close(model.log_likelihood_for(x)(z), plain, rtol=1e-12, atol=1e-9)
        model32 = model.float()   # float32: within rounding of Σ|terms| (≈ 600 nats here)
        torch.testing.assert_close(model32.log_likelihood_for(x.float())(z.float()).double(), plain,
                                   rtol=0, atol=600 * 1e-6)


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
