"""The pieces the model families are built from: activations, initialisations, MLP blocks.

A model maps binary digits x (B, 784) and standard-normal draws ε (K, B, D) to ``Parts``
(``vaelab.objectives``): the reconstruction term log p(x|z₁) for each of the K draws and one
``StochasticLayer`` per latent layer (its draw, q's and p's Gaussian parameters). The objectives are
functions of the parts alone, so a new model touches no objective and a new objective touches no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vaelab import native
from vaelab.objectives import LOG2_E, native_softplus, softplus_sum



# ------------------------------------------------------------------------------------------------
# Building blocks.

class Gated(nn.Module):
    """A gated dense layer: a ↦ (W_h a + b_h) ⊙ sigmoid(W_g a + b_g), two linear maps of the same input, one
    gating the other (Dauphin et al. 2017; the layers of Tomczak & Welling 2018's VampPrior models)."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.h = nn.Linear(inputs, outputs)
        self.g = nn.Linear(inputs, outputs)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.h(a) * torch.sigmoid(self.g(a))


class BatchNorm(nn.Module):
    """Batch normalisation (Ioffe & Szegedy 2015) of (…, C) over every leading axis (draws × digits):

        training    y = γ ⊙ (a − m) / √(v + ε) + β,  m, v the batch's mean and (biased) variance per unit, while
                    the running averages move by 0.1 towards m and the unbiased variance (torch's convention);
        evaluation  the same with the running averages: a fixed affine map of each unit.

    γ, β are parameters; the running averages float32 buffers saved with the weights, so a resumed run goes on
    with them. The Ladder VAE's deterministic layers use it (Sønderby et al. 2016, §3). Not nn.BatchNorm1d: that
    normalises axis 1 of a 3-D input (here the digits of (K, B, C), not the units) and keeps an int64 batch counter
    among weights that are all float32."""

    def __init__(self, width: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("running_var", torch.ones(width))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        flat = a.reshape(-1, a.shape[-1])                                             # (N, C), N = …·B
        return F.batch_norm(flat, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps).view(a.shape)


@dataclass(frozen=True)
class Activation:
    module: Callable[[], nn.Module] | None                # for nn.Sequential (autograd); None: a gated layer
    inplace: Callable[[torch.Tensor], torch.Tensor] | None  # for the no-grad fast paths (None: none)

    @property
    def gated(self) -> bool:
        return self.module is None


def _tanh_(t: torch.Tensor) -> torch.Tensor:
    """tanh in place: the native kernel (``native.tanh_kernel``) for a contiguous float32 CPU tensor outside a trace
    and autograd, else ``torch.tanh_`` (the IWAE's decoders of `planar-80` and the Burda presets: torch's float32
    tanh took 11 % of `planar-80`'s IWAE-5000 on the Zen 4, benchmarks/README.md)."""
    kernel = None if torch.compiler.is_compiling() else native.tanh_kernel()
    if (kernel is None or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()
            or (t.requires_grad and torch.is_grad_enabled())):
        return torch.tanh_(t)
    return kernel(t)


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(nn.ReLU, torch.relu_),
    "tanh": Activation(nn.Tanh, _tanh_),
    "softplus": Activation(nn.Softplus, F.softplus),
    "elu": Activation(nn.ELU, lambda t: F.elu_(t)),
    "leaky_relu": Activation(nn.LeakyReLU, lambda t: F.leaky_relu_(t)),
    "gated": Activation(None, None),                      # each hidden layer a ``Gated`` layer (two linears)
}


def _glorot(module: nn.Module) -> None:
    """Glorot & Bengio (2010): W ~ U(±√(6/(fan_in + fan_out))), b = 0 (the IWAE paper's initialisation)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)


def _he(module: nn.Module) -> None:
    """He et al. (2015): W ~ N(0, 2/fan_in), biases as drawn when built (the VampPrior code's ``he_init``)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, (2.0 / layer.in_features) ** 0.5)


# "torch": PyTorch's default, drawn as each layer is built (W, b ~ U(±1/√fan_in)).
INITS: dict[str, Callable[[nn.Module], None]] = {"torch": lambda module: None, "glorot": _glorot, "he": _he}


def mlp(inputs: int, widths: Sequence[int], activation: str, batch_norm: bool = False) -> nn.Sequential:
    """Linear → activation (or one gated layer), once per width: inputs → widths[0] → … → widths[-1]; with
    ``batch_norm`` Linear → BatchNorm → activation (normalised before the nonlinearity, as Ioffe & Szegedy)."""
    layers: list[nn.Module] = []
    kind = ACTIVATIONS[activation]
    for width in widths:
        norm = [BatchNorm(width)] if batch_norm else []
        layers += [Gated(inputs, width)] if kind.gated else [nn.Linear(inputs, width), *norm, kind.module()]
        inputs = width
    return nn.Sequential(*layers)


def chain_shapes(inputs: int, widths: Sequence[int], outputs: int, activation: str) -> list[tuple[int, int]]:
    """(inputs, outputs) of every linear map of ``mlp(inputs, widths)`` followed by a Linear to ``outputs``
    (a gated layer is two maps of the same shape)."""
    sizes = (inputs, *widths)
    copies = 2 if ACTIVATIONS[activation].gated else 1
    return [shape for shape in zip(sizes[:-1], sizes[1:]) for _ in range(copies)] + [(sizes[-1], outputs)]


def linear_layers(sequential: nn.Sequential) -> list[nn.Linear]:
    return [layer for layer in sequential if isinstance(layer, nn.Linear)]


def evaluation_mlp(sequential: nn.Sequential, activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function ``sequential`` (built by ``mlp``) computes in evaluation mode, for 2-D input without autograd,
    in fewer passes: each batch normalisation, with its running averages a fixed affine map s ⊙ a + t
    (s = γ/√(v + ε), t = β − s ⊙ m), folded into the linear map before it, W' = diag(s) W and b' = s ⊙ b + t;
    the activations in place. The same function up to float rounding (tests/test_models.py); gated layers: the
    Sequential itself. The folded weights are computed here, once: call it again after the weights change."""
    if sequential.training and any(isinstance(m, BatchNorm) for m in sequential):
        raise ValueError("evaluation_mlp folds batch normalisation's running averages: put the model in eval mode")
    kind = ACTIVATIONS[activation]
    if kind.gated:
        return sequential
    modules, maps = list(sequential), []
    for index, layer in enumerate(modules):
        if not isinstance(layer, nn.Linear):
            continue
        weight, bias = layer.weight, layer.bias
        norm = modules[index + 1] if index + 1 < len(modules) else None
        if isinstance(norm, BatchNorm):
            scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)              # (C,) s
            weight, bias = weight * scale[:, None], bias * scale + (norm.bias - scale * norm.running_mean)
        maps.append((weight, bias))
    act = kind.inplace

    def run(h: torch.Tensor) -> torch.Tensor:
        for weight, bias in maps:
            h = act(F.linear(h, weight, bias))
        return h

    return run


def bernoulli_data_term(hidden: Callable[[torch.Tensor], torch.Tensor], out: nn.Linear,
                        x: torch.Tensor) -> Callable[..., torch.Tensor]:
    """log p(x|·) for this batch x (B, 784) of a decoder ℓ = hidden(z) W_outᵀ + b_out, as a function of z (…, B, d)
    → (…, B), without autograd, for the many draws of z that importance sampling decodes (a second argument, the
    data, is ignored: it is this x). ``hidden``: the decoder's last hidden layer for 2-D input (N, d) → (N, H).
    Same value as ``bernoulli_log_likelihood(decode(z), x)`` (tests/test_models.py).

    The last layer is scaled by log₂e once per batch, so that its product gives y = ℓ log₂e directly, the input
    of the softplus kernels' base-2 form. On the CPU in float32 the native kernel (``native/softplus.cpp``) takes
    that product's output without its bias and returns −log p(x|z) = Σⱼ softplus(ℓⱼ) − xⱼℓⱼ, adding the bias and
    the data term as it reads each logit: one pass over the (…·B, 784) logits in all. Elsewhere the data term is
    Σⱼ xⱼℓⱼ = h·(W_outᵀx) + b_out·x, a product over the H hidden units instead of the 784 pixels (W_outᵀx and b_out·x
    once per batch), so that only softplus touches every logit.
    """
    x_w = x @ out.weight                                                       # (B, H)
    x_b = x @ out.bias                                                         # (B,)
    weight2, bias2 = out.weight * LOG2_E, out.bias * LOG2_E                    # (784, H), (784,)
    native = native_softplus(x_w)

    def log_likelihood(z: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
        batch = z.shape[:-1]
        h = hidden(z.reshape(-1, z.shape[-1]))                                 # (…·B, H)
        if native is not None and batch[-1:] == x.shape[:1] and not torch.is_grad_enabled():  # row i: digit i mod B
            return -native(torch.mm(h, weight2.t()), True, bias2, x).view(batch)   # (…, B)
        if h.device.type == "cpu":      # the native kernel adds the bias as it reads: the product writes none first
            softplus = softplus_sum(torch.mm(h, weight2.t()), base2=True, bias=bias2)       # (…·B,)
        else:                           # a GPU: one kernel launch fewer with the bias in the product
            softplus = softplus_sum(F.linear(h, weight2, bias2), base2=True)                # (…·B,)
        h = h.view(*batch, -1)                                                 # (…, B, H)
        return (h * x_w).sum(-1) + x_b - softplus.view(batch)

    return log_likelihood


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """float32 for a bfloat16/float16 tensor (a product under autocast), unchanged otherwise (float32, float64).

    The models return every distribution parameter through this, so that under ``--precision bf16`` only the
    matrix products run in bfloat16 while log densities, the KL, softplus and every reduction over pixels or
    draws stay in float32 (a 784-pixel sum rounded to bfloat16 would carry ±0.4 nats)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t
