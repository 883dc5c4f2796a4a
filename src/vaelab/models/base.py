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



# ------------------------------------------------------------------------------------------------
# Building blocks.

@dataclass(frozen=True)
class Activation:
    module: Callable[[], nn.Module]                       # for nn.Sequential (autograd)
    inplace: Callable[[torch.Tensor], torch.Tensor]       # for the no-grad fast paths


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(nn.ReLU, torch.relu_),
    "tanh": Activation(nn.Tanh, torch.tanh_),
    "softplus": Activation(nn.Softplus, F.softplus),
    "elu": Activation(nn.ELU, lambda t: F.elu_(t)),
    "leaky_relu": Activation(nn.LeakyReLU, lambda t: F.leaky_relu_(t)),
}


def _glorot(module: nn.Module) -> None:
    """Glorot & Bengio (2010): W ~ U(±√(6/(fan_in + fan_out))), b = 0 (the IWAE paper's initialisation)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)


# "torch": PyTorch's default, drawn as each layer is built (W, b ~ U(±1/√fan_in)).
INITS: dict[str, Callable[[nn.Module], None]] = {"torch": lambda module: None, "glorot": _glorot}


def mlp(inputs: int, widths: Sequence[int], activation: str) -> nn.Sequential:
    """Linear → activation, once per width: inputs → widths[0] → … → widths[-1]."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(inputs, width), ACTIVATIONS[activation].module()]
        inputs = width
    return nn.Sequential(*layers)


def linear_layers(sequential: nn.Sequential) -> list[nn.Linear]:
    return [layer for layer in sequential if isinstance(layer, nn.Linear)]


def run_mlp_inplace(sequential: nn.Sequential, h: torch.Tensor, activation: str) -> torch.Tensor:
    """The same function as ``sequential(h)`` for 2-D h without autograd, activations in place."""
    act = ACTIVATIONS[activation].inplace
    for layer in linear_layers(sequential):
        h = act(F.linear(h, layer.weight, layer.bias))
    return h



def full_precision(t: torch.Tensor) -> torch.Tensor:
    """float32 for a bfloat16/float16 tensor (a product under autocast), unchanged otherwise (float32, float64).

    The models return every distribution parameter through this, so that under ``--precision bf16`` only the
    matrix products run in bfloat16 while log densities, the KL, softplus and every reduction over pixels or
    draws stay in float32 (a 784-pixel sum rounded to bfloat16 would carry ±0.4 nats)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t
