"""Engines: one training step's gradient. Each writes the gradient of the batch mean of −objective into
the model's gradient views (the flat buffer) and returns the batch sums of (objective, ELBO,
reconstruction, KL) as a (4,) tensor on the device, without a host synchronisation.

``autograd`` serves every model and objective. ``fused`` is a backward pass derived by hand for the one
configuration it covers: the one-hidden-layer ReLU ``mlp`` model trained on the single-draw ELBO with
β = 1 (tests/test_training.py::test_fused_gradient_matches_autograd). ``select_engine`` picks by lookup.
``compiled`` (asked for by name, never chosen by ``auto``) is the autograd engine's loss and its gradient
(``torch.func.grad_and_value``) compiled together by ``torch.compile`` (TorchInductor) into one graph: the same
gradient to float32 rounding (tests/test_compiled.py), fewer and fused kernels and no autograd at run time, at the
price of a C++ compiler and tens of seconds of compilation when a process takes its first step
(benchmarks/README.md); in float32, or in bf16 with the forward pass's autocast inside the graph.

Precision ``bf16``: the matrix products run in bfloat16 (oneDNN's AVX-512 BF16 kernels on CPU, tensor
cores on GPU; products accumulate in float32 inside the kernel), everything else in float32: master
weights, gradients' buffers, Adam's state, the loss, softplus, KL and every reduction. The autograd engine
does it with ``torch.autocast`` (the models return their distribution parameters in float32,
``models.base.full_precision``); the fused engine has its own bf16 variant.

Precision ``bf16-emulated``: ``bf16`` with each product computed as a native bf16 kernel computes it, but
with float32 products (``vaelab.precision``): the same rounding of every operand and result. The fused
engine runs at about float32 speed; the autograd engine (autocast, its products intercepted by
``EmulatedBF16Products``) at 2–3× its float32 time. It answers "would bf16 change what this model learns?"
on a CPU without bf16; it is never faster than float32.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from vaelab import compiling, native
from vaelab.errors import UsageError
from vaelab.objectives import OBJECTIVES, softplus_sum
from vaelab.precision import BF16_PRODUCTS, EmulatedBF16Products

# (model, x (B, 784), eps (K, B, D), objective name, β, grad_squares=None) → (4,); ``grad_squares``: a (1,) float64
# tensor that receives ‖∇‖² where the engine has it without a pass of its own (``write_gradient``), else left alone
Engine = Callable[..., torch.Tensor]


def write_gradient(model, loss: torch.Tensor, grad_squares: torch.Tensor | None = None) -> None:
    """∇ ``loss`` into the parameters' gradients, written whole (no zeroing before).

    ``torch.autograd.grad`` hands back each gradient as the fresh tensor its last product wrote, where
    ``backward`` would add it into the gradient views (a pass that reads both, after a pass that zeroed them):
    the same numbers bitwise (0 + g = g), two passes over the gradients fewer. A parameter the loss does not reach
    gets zeros, as it did. The gradients are then written by ``write_gradients``."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    write_gradients(params, grads, grad_squares)


def write_gradients(params: list[torch.Tensor], grads, grad_squares: torch.Tensor | None = None) -> None:
    """Each gradient in ``grads`` into its parameter's gradient. Where the parameters' gradient views lie one after the
    other in one buffer (``training.FlatParameters``) one pass writes them all: ``torch.cat``, or where
    ``grad_squares`` (a (1,) float64 tensor) asks for ‖g‖² too (clipping), on the CPU the native gather
    (``native/gather.cpp``), which sums the squares on the way, so that clipping needs no pass of its own (a
    `planar-80` gradient: 0.66 ms against 1.60 ms for ``cat`` and a norm with 2 threads, 1.42 against 2.37 ms with 1;
    ``cat`` alone 0.68 and 1.09 ms; benchmarks/README.md)."""
    flat = _flat_gradient(params)
    if flat is not None:
        parts = [g.reshape(-1) for g in grads]
        wanted = grad_squares is not None and flat.device.type == "cpu" and flat.dtype == torch.float32
        gather = native.gather_kernel() if wanted else None
        if gather is not None and all(g.dtype == torch.float32 and g.is_contiguous() for g in parts):
            grad_squares.fill_(gather(parts, flat))
        else:
            # (under no_grad: torch 2.7, unlike 2.13, made materialize_grads' zeros require grad, and a cat with out=
            # refused them, "functions with out=... arguments don't support automatic differentiation")
            with torch.no_grad():
                torch.cat(parts, out=flat)
        return
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.detach()
        else:
            p.grad.copy_(g.detach())


def _flat_gradient(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The buffer the parameters' gradients are consecutive views of, in order and covering it, else None."""
    grads = [p.grad for p in params]
    base = grads[0]._base if grads and grads[0] is not None else None
    if base is None or not base.is_contiguous():
        return None
    offset = 0
    for g in grads:
        if (g is None or g._base is not base or not g.is_contiguous() or g.data_ptr() !=
                base.data_ptr() + offset * base.element_size()):
            return None
        offset += g.numel()
    return base if offset == base.numel() else None


def _loss_and_sums(model, objective: str, x: torch.Tensor, eps: torch.Tensor, beta, bf16: bool = False):
    """(−(1/B) Σ objective, the sums (objective, ELBO, reconstruction, KL)) of one step: the autograd step's forward,
    and the loss the compiled step differentiates (``model``: there the model called with other weights). ``bf16``:
    the model's forward under autocast (its products in bf16), the objective outside it."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        parts = model(x, eps)
    terms = OBJECTIVES[objective](parts, beta)
    sums = torch.stack([terms.objective.sum(), terms.elbo.sum(), terms.reconstruction.sum(), terms.kl.sum()])
    return -sums[0] / x.shape[0], sums


def autograd_step(model, x: torch.Tensor, eps: torch.Tensor, objective: str = "elbo",
                  beta: float = 1.0, precision: str = "fp32", grad_squares: torch.Tensor | None = None) -> torch.Tensor:
    loss, sums = _loss_and_sums(model, objective, x, eps, beta, bf16=precision == "bf16")
    write_gradient(model, loss, grad_squares)
    return sums.detach()


@torch.no_grad()
def fused_step(model, x: torch.Tensor, eps: torch.Tensor, objective: str = "elbo",
               beta: float = 1.0, grad_squares: torch.Tensor | None = None) -> torch.Tensor:
    """Forward and hand-derived backward of L = (1/B) Σ_b −ELBO_b for the one-hidden-layer MLP VAE.

    Forward:  h₁ = relu(x W₁ᵀ + b₁)  e = h₁ W₂ᵀ + b₂ = (μ, v)  σ = e^{v/2}  z = μ + σε
              h₂ = relu(z W₃ᵀ + b₃)  ℓ = h₂ W₄ᵀ + b₄
              −ELBO = Σⱼ [softplus(ℓⱼ) − xⱼℓⱼ] + ½ Σᵢ [σᵢ² + μᵢ² − 1 − vᵢ]
    Backward: ∂L/∂ℓ = (sigmoid(ℓ) − x)/B; through each linear layer dW = dyᵀ a, db = Σ_b dy, da = dy W;
              through relu keep dy where h > 0; at the sampling step ∂z/∂μ = 1, ∂z/∂v = ½σε, and the
              KL adds μ/B to dμ and ½(σ² − 1)/B to dv. Every gradient is written whole (no zeroing).
    eps: (1, B, d); ``objective`` and ``beta`` are the ELBO and 1 (``select_engine`` sees to it). ``grad_squares`` is
    left alone: the products write the gradient in place, and clipping takes ‖g‖ in a pass of its own.
    """
    enc1, enc2, dec1, dec2 = model.fused_layers()
    eps = eps[0]                                                            # (B, d)
    batch, latent = x.shape[0], model.latent
    scale = 1.0 / batch
    h1 = torch.addmm(enc1.bias, x, enc1.weight.t()).relu_()               # (B, H)
    e = torch.addmm(enc2.bias, h1, enc2.weight.t())                         # (B, 2d)
    mu, logvar = e[:, :latent], e[:, latent:]
    sigma = torch.exp(0.5 * logvar)                                         # (B, d)
    z = torch.addcmul(mu, sigma, eps)                                       # (B, d)
    h2 = torch.addmm(dec1.bias, z, dec1.weight.t()).relu_()               # (B, H)
    logits = torch.addmm(dec2.bias, h2, dec2.weight.t())                    # (B, 784)
    # −log p(x|z) = Σ softplus(ℓ) − x·ℓ: the logits form, finite for any ℓ.
    reconstruction = softplus_sum(logits).sum() - torch.dot(x.reshape(-1), logits.reshape(-1))
    variance = sigma * sigma
    kl = 0.5 * (variance + mu * mu - 1.0 - logvar).sum()

    d_logits = torch.sigmoid(logits).sub_(x).mul_(scale)                    # (B, 784)
    torch.mm(d_logits.t(), h2, out=dec2.weight.grad)
    torch.sum(d_logits, 0, out=dec2.bias.grad)
    d_h2 = torch.ops.aten.threshold_backward(torch.mm(d_logits, dec2.weight), h2, 0.0)  # (B, H)
    torch.mm(d_h2.t(), z, out=dec1.weight.grad)
    torch.sum(d_h2, 0, out=dec1.bias.grad)
    d_z = torch.mm(d_h2, dec1.weight)                                       # (B, d)
    d_e = torch.empty_like(e)                                               # (B, 2d) = (dμ, dv)
    torch.add(d_z, mu, alpha=scale, out=d_e[:, :latent])
    torch.addcmul(variance.sub_(1.0).mul_(0.5 * scale), d_z.mul_(eps), sigma.mul_(0.5), out=d_e[:, latent:])
    torch.mm(d_e.t(), h1, out=enc2.weight.grad)
    torch.sum(d_e, 0, out=enc2.bias.grad)
    d_h1 = torch.ops.aten.threshold_backward(torch.mm(d_e, enc2.weight), h1, 0.0)      # (B, H)
    torch.mm(d_h1.t(), x, out=enc1.weight.grad)
    torch.sum(d_h1, 0, out=enc1.bias.grad)
    negative_elbo = reconstruction + kl
    return torch.stack([-negative_elbo, -negative_elbo, -reconstruction, kl]).detach()


@torch.no_grad()
def fused_step_bf16(model, x: torch.Tensor, eps: torch.Tensor, objective: str = "elbo",
                    beta: float = 1.0, mm: Callable = torch.mm,
                    grad_squares: torch.Tensor | None = None) -> torch.Tensor:
    """``fused_step`` with its eleven matrix products in bfloat16; the same derivation, the same outputs.

    The weights are rounded to bf16 once per step (copies for the products; the float32 masters are what
    Adam updates), activations are rounded as they enter a product, and each product's bf16 result is
    widened to float32 where elementwise work follows (biases, ReLU masks, σ, sigmoid, the loss). Weight
    gradients leave their product in bf16 and are stored in the float32 gradient buffer. Rounding the logits
    to bf16 moves each pixel's loss by at most |sigmoid(ℓ) − x| · 2⁻⁸|ℓ|: nothing for confident pixels.
    Checked against the float32 engine in tests/test_training.py::test_fused_bf16_gradient_is_close.
    ``mm``: the bf16 product, torch's native one or ``precision.emulated_bf16_mm``.
    """
    enc1, enc2, dec1, dec2 = model.fused_layers()
    bf16 = torch.bfloat16
    w1, w2, w3, w4 = (layer.weight.to(bf16) for layer in (enc1, enc2, dec1, dec2))
    eps = eps[0]                                                            # (B, d)
    batch, latent = x.shape[0], model.latent
    scale = 1.0 / batch
    xb = x.to(bf16)                                                         # exact: pixels are 0/1
    h1 = mm(xb, w1.t()).float().add_(enc1.bias).relu_()                    # (B, H) float32
    h1b = h1.to(bf16)
    e = mm(h1b, w2.t()).float().add_(enc2.bias)                             # (B, 2d)
    mu, logvar = e[:, :latent], e[:, latent:]
    sigma = torch.exp(0.5 * logvar)
    z = torch.addcmul(mu, sigma, eps)
    zb = z.to(bf16)
    h2 = mm(zb, w3.t()).float().add_(dec1.bias).relu_()                    # (B, H)
    h2b = h2.to(bf16)
    logits = mm(h2b, w4.t()).float().add_(dec2.bias)                        # (B, 784) float32
    reconstruction = softplus_sum(logits).sum() - torch.dot(x.reshape(-1), logits.reshape(-1))
    variance = sigma * sigma
    kl = 0.5 * (variance + mu * mu - 1.0 - logvar).sum()

    d_logits = torch.sigmoid(logits).sub_(x).mul_(scale)                    # (B, 784)
    d_logits_b = d_logits.to(bf16)
    dec2.weight.grad.copy_(mm(d_logits_b.t(), h2b))
    torch.sum(d_logits, 0, out=dec2.bias.grad)
    d_h2 = torch.ops.aten.threshold_backward(mm(d_logits_b, w4).float(), h2, 0.0)   # (B, H)
    d_h2_b = d_h2.to(bf16)
    dec1.weight.grad.copy_(mm(d_h2_b.t(), zb))
    torch.sum(d_h2, 0, out=dec1.bias.grad)
    d_z = mm(d_h2_b, w3).float()                                            # (B, d)
    d_e = torch.empty_like(e)
    torch.add(d_z, mu, alpha=scale, out=d_e[:, :latent])
    torch.addcmul(variance.sub_(1.0).mul_(0.5 * scale), d_z.mul_(eps), sigma.mul_(0.5), out=d_e[:, latent:])
    d_e_b = d_e.to(bf16)
    enc2.weight.grad.copy_(mm(d_e_b.t(), h1b))
    torch.sum(d_e, 0, out=enc2.bias.grad)
    d_h1 = torch.ops.aten.threshold_backward(mm(d_e_b, w2).float(), h1, 0.0)       # (B, H)
    enc1.weight.grad.copy_(mm(d_h1.to(bf16).t(), xb))
    torch.sum(d_h1, 0, out=enc1.bias.grad)
    negative_elbo = reconstruction + kl
    return torch.stack([-negative_elbo, -negative_elbo, -reconstruction, kl]).detach()


def compiled_step(model, x: torch.Tensor, eps: torch.Tensor, objective: str = "elbo",
                  beta: float = 1.0, grad_squares: torch.Tensor | None = None,
                  precision: str = "fp32") -> torch.Tensor:
    """``autograd_step``'s gradient and four sums computed by one graph that ``torch.compile`` compiled: the loss
    −(1/B) Σ objective as a function of the parameters alone (``torch.func.functional_call``; the batch
    normalisations' running averages move in the model's buffers as in eager training), and its gradient by
    ``torch.func.grad_and_value``, traced forward and backward together into one graph of TorchInductor's fused C++
    or GPU kernels. Its inputs need no gradient, so it runs without autograd: no backward graph called by autograd's
    engine, one set of guards, one call a step. Against the loss compiled alone and differentiated by autograd (the
    forward graph, AOTAutograd's backward graph), the same gradient to float32 rounding, and the gradient's step
    0.90 × as long for `ladder-5`, 0.91 × `cpu-hour-vampprior`, 0.93 × `vampprior-2` and `planar-80`, 0.62 × `seed`
    (the Intel Xeon, 2 threads; benchmarks/README.md, thirty-third session).

    β enters as a 0-d tensor, so one graph serves the whole KL warm-up (a Python float would be a constant of the
    graph, one compilation per value); a new batch size (an epoch's last, short batch) or a new architecture compiles
    once more, a new model of a compiled architecture does not (the model is an argument of the graph). The whole
    step must be one graph and a compilation beyond the limit is an error (``vaelab.compiling``): a model the
    compiler cannot take whole fails loudly instead of running half or all of it uncompiled.
    ``precision`` ``bf16``: the model's forward pass under ``torch.autocast`` inside the graph, as ``autograd_step``
    runs it (bf16 products, float32 weights, distribution parameters, objective and reductions); a graph of its own."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    weights = {name: p.detach() for name, p in named}       # the gradient is the graph's output, not autograd's
    with compiling.limits():
        grads, sums = _compiled_gradient(precision)(model, weights, objective, x, eps,
                                                    torch.tensor(beta, dtype=x.dtype, device=x.device))
    write_gradients([p for _, p in named], grads, grad_squares)
    return sums


def _gradient_and_sums(model, weights: dict[str, torch.Tensor], objective: str, x: torch.Tensor, eps: torch.Tensor,
                       beta, bf16: bool = False) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(∇ of −(1/B) Σ objective with respect to each of ``weights``, in their order; the four sums): what the compiled
    step compiles. ``weights``: the model's trainable parameters by name, in place of its own in the forward pass."""

    def loss(values: dict[str, torch.Tensor]):
        return _loss_and_sums(lambda *args: torch.func.functional_call(model, values, args), objective, x, eps, beta,
                              bf16)

    grads, (_, sums) = torch.func.grad_and_value(loss, has_aux=True)(weights)
    return tuple(grads.values()), sums


@functools.cache
def _compiled_gradient(precision: str = "fp32") -> Callable:
    """``_gradient_and_sums`` compiled for ``precision`` (fp32 or bf16), built on first use (nothing is compiled at
    import)."""
    return compiling.compile(functools.partial(_gradient_and_sums, bf16=precision == "bf16"))


def _autograd_bf16(model, x, eps, objective="elbo", beta=1.0, grad_squares=None):
    return autograd_step(model, x, eps, objective, beta, precision="bf16", grad_squares=grad_squares)


def _autograd_bf16_emulated(model, x, eps, objective="elbo", beta=1.0, grad_squares=None):
    with EmulatedBF16Products():                      # forward and backward products
        return autograd_step(model, x, eps, objective, beta, precision="bf16", grad_squares=grad_squares)


# (engine, precision) → the step
ENGINES: dict[tuple[str, str], Engine] = {
    ("fused", "fp32"): fused_step, ("fused", "bf16"): fused_step_bf16,
    ("fused", "bf16-emulated"): functools.partial(fused_step_bf16, mm=BF16_PRODUCTS["bf16-emulated"]),
    ("autograd", "fp32"): autograd_step, ("autograd", "bf16"): _autograd_bf16,
    ("autograd", "bf16-emulated"): _autograd_bf16_emulated, ("compiled", "fp32"): compiled_step,
    ("compiled", "bf16"): functools.partial(compiled_step, precision="bf16")}
ENGINE_CHOICES = ("auto", "fused", "autograd", "compiled")

# The configurations a hand-derived engine covers, by ``fast_path_key``.
FAST_PATHS: dict[tuple, str] = {("mlp", (1,), "relu", "standard", 0, "elbo", 1, True): "fused"}


def fast_path_key(config) -> tuple:
    """(model, hidden layers per block, activation, prior, flow steps, objective, draws, β ≡ 1) of a RunConfig."""
    model, objective = config.model, config.objective
    return (model.name, tuple(len(block) for block in model.hidden), model.activation, model.prior,
            model.flow_steps, objective.name, objective.samples,
            objective.beta == 1.0 and objective.warmup_epochs == 0)


def select_engine(config) -> str:
    """The engine's name: the fast path covering this config for ``auto``, else what was asked for, if it
    covers the config. The step itself is ``ENGINES[(name, config.train.precision)]``."""
    covering = FAST_PATHS.get(fast_path_key(config), "autograd")
    wanted = config.train.engine
    if wanted == "auto":
        return covering
    if wanted == "compiled":
        if (wanted, config.train.precision) not in ENGINES:
            raise UsageError(f"--engine compiled runs in float32 or bf16, not --precision {config.train.precision}; "
                             f"use --precision fp32 or bf16, or --engine autograd for {config.train.precision}")
        return wanted
    if wanted != "autograd" and wanted != covering:
        raise UsageError(f"--engine {wanted} covers only the one-hidden-layer ReLU mlp model with the standard prior "
                         f"and no flow, on the single-draw ELBO with β = 1; use --engine auto or autograd for this "
                         f"configuration")
    return wanted
