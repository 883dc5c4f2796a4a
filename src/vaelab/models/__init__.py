"""Model families, by name: ``MODELS[config.name](config)`` builds a model from its ``ModelConfig`` alone.

- ``mlp``: one stochastic layer, MLP encoder q(z|x) and Bernoulli MLP decoder p(x|z) (Kingma & Welling
  2014); with one hidden layer of 256 ReLU units and 50 latents it is vaelab's reference model.
- ``mlp2``: two stochastic layers, q(z₁|x) q(z₂|z₁) and p(z₂) p(z₁|z₂) p(x|z₁) (Burda et al. 2016, §5).

Every model returns ``Parts`` (``models/base.py``); the objectives are functions of those.
"""

from __future__ import annotations

from dataclasses import dataclass

from vaelab.errors import UsageError
from vaelab.models.base import ACTIVATIONS, INITS
from vaelab.objectives import Parts, StochasticLayer
from vaelab.models.hierarchical import TwoLayerVAE
from vaelab.models.mlp import MLPVAE

__all__ = ["MODELS", "ModelConfig", "build_model", "Parts", "StochasticLayer", "MLPVAE", "TwoLayerVAE",
           "ACTIVATIONS", "INITS"]

MODELS = {"mlp": MLPVAE, "mlp2": TwoLayerVAE}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. ``hidden[l]`` are the widths of the deterministic layers between stochastic layer l
    and the one below it (x for l = 0), on the inference side; the generative side mirrors them.
    ``latent[l]`` is the size of stochastic layer l, bottom first."""

    name: str = "mlp"
    data_dim: int = 784
    hidden: tuple[tuple[int, ...], ...] = ((256,),)
    latent: tuple[int, ...] = (50,)
    activation: str = "relu"
    init: str = "torch"

    def validate(self) -> "ModelConfig":
        """Raise UsageError naming the problem and the choices, else return self."""
        if self.name not in MODELS:
            raise UsageError(f"unknown model {self.name!r}; choose one of {', '.join(MODELS)}")
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.init not in INITS:
            raise UsageError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        layers = MODELS[self.name].stochastic_layers
        if len(self.latent) != layers:
            raise UsageError(f"model {self.name} has {layers} stochastic layer{'s' * (layers > 1)}: give "
                             f"{layers} latent size{'s' * (layers > 1)} (--latent), got {list(self.latent)}")
        if len(self.hidden) != layers:
            flag = "--hidden and --hidden-top" if layers > 1 else "--hidden"
            raise UsageError(f"model {self.name} needs {layers} block{'s' * (layers > 1)} of hidden widths "
                             f"({flag}), got {len(self.hidden)}")
        if any(len(block) == 0 for block in self.hidden):
            raise UsageError(f"each block of hidden widths needs at least one layer, got {self.hidden}")
        if any(w < 1 for block in self.hidden for w in block) or any(d < 1 for d in self.latent):
            raise UsageError(f"hidden widths and latent sizes must be ≥ 1, got hidden {self.hidden}, "
                             f"latent {self.latent}")
        if self.data_dim != 784:
            raise UsageError(f"data_dim must be 784 for MNIST, got {self.data_dim}")
        return self

    @property
    def total_latent(self) -> int:
        """D: the standard-normal draws one sample of all stochastic layers needs."""
        return sum(self.latent)

    def layers(self) -> list[tuple[int, int]]:
        """(inputs, outputs) of every linear layer, inference network first."""
        return MODELS[self.name].linear_shapes(self)

    def parameter_count(self) -> int:
        return sum((a + 1) * b for a, b in self.layers())

    def widest(self) -> int:
        return max(b for _, b in self.layers())

    def flops_per_example(self) -> int:
        """Multiply-adds × 2 of one training step per example and draw: forward, then backward.

        Forward: one (1×a)·(a×b) product per layer = 2ab FLOPs. Backward: the weight gradient (2ab) for
        every layer and the input gradient (2ab) for every layer but the first (x needs no gradient).
        """
        shapes = self.layers()
        forward = sum(2 * a * b for a, b in shapes)
        first_in, first_out = shapes[0]
        return forward + 2 * forward - 2 * first_in * first_out


def build_model(config: ModelConfig):
    """The model of ``config``; its weights are drawn from torch's global random stream."""
    return MODELS[config.validate().name](config)
