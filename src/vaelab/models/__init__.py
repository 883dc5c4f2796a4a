"""Model families, by name: ``MODELS[config.name](config)`` builds a model from its ``ModelConfig`` alone.

- ``mlp``: one stochastic layer, MLP encoder q(z|x) and Bernoulli MLP decoder p(x|z) (Kingma & Welling
  2014); with one hidden layer of 256 ReLU units and 50 latents it is vaelab's reference model.
- ``mlp2``: two stochastic layers, q(z₁|x) q(z₂|z₁) and p(z₂) p(z₁|z₂) p(x|z₁) (Burda et al. 2016, §5).
- ``hvae``: any number L ≥ 2 of stochastic layers, bottom-up inference (Burda's, ``mlp2`` is its L = 2 case)
  or top-down (the Ladder VAE, Sønderby et al. 2016): ``models/hierarchical.py``.
- ``tomczak``: Tomczak & Welling's (2018) VAE (L = 1) and two-layer HVAE, q(z₂|x) q(z₁|x, z₂) and
  p(z₂) p(z₁|z₂) p(x|z₁, z₂), gated layers, log-variances clamped to [−6, 2]: ``models/tomczak.py``.

Every model is composed with a prior of its top layer (``models/priors.py``: standard, mog, vampprior) and,
where its inference allows, a flow in q (``models/flows.py``: none, planar, iaf). Every model returns
``Parts`` (``objectives.py``); the objectives are functions of those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from vaelab.errors import UsageError
from vaelab.models.base import ACTIVATIONS, INITS
from vaelab.models.flows import FLOWS
from vaelab.models.hierarchical import HierarchicalVAE
from vaelab.models.mlp import MLPVAE
from vaelab.models.priors import DEFAULT_COMPONENTS, PRIORS
from vaelab.models.tomczak import TomczakVAE
from vaelab.objectives import Parts, StochasticLayer

__all__ = ["MODELS", "ModelConfig", "build_model", "Parts", "StochasticLayer", "MLPVAE", "HierarchicalVAE",
           "TomczakVAE", "ACTIVATIONS", "INITS", "PRIORS", "FLOWS", "INFERENCE", "FIELD_RANGES"]

MODELS = {"mlp": MLPVAE, "mlp2": HierarchicalVAE, "hvae": HierarchicalVAE, "tomczak": TomczakVAE}
# The stochastic layers each model name takes: (fewest, most).
LAYERS = {"mlp": (1, 1), "mlp2": (2, 2), "hvae": (2, 64), "tomczak": (1, 2)}
INFERENCE = ("bottom-up", "top-down")
# The bounds (inclusive) of the model's whole-number fields, as ``validate`` checks them and `vaelab train`'s flags as
# they are parsed (until 2026-12-07 the flags said "below 2⁶³" of 10²⁰ and "from 1 to 100000" of 10⁹).
FIELD_RANGES = {"prior_components": (1, 100_000), "flow_steps": (0, 1000), "flow_width": (1, 1 << 20)}
# Fields a model reads only under a condition on its other fields: field → (when it is not read, given a lookup of
# field values; the value it must then hold, or None where any value is accepted; why). In dependency order (a
# condition reads only fields before it or unconditional ones). ``ModelConfig.unused`` names the free ones; a
# sweep samples none of them where the condition holds and sets the bound one (a flow's steps without a flow: 0).
CONDITIONAL_FIELDS: dict[str, tuple[Callable[[Callable[[str], Any]], bool], Any, str]] = {
    "prior_components": (lambda value: value("prior") == "standard", None, "the standard prior has no components"),
    "flow_steps": (lambda value: value("flow") == "none", 0, "there is no flow"),
    "flow_width": (lambda value: value("flow") != "iaf" or not value("flow_steps"), None,
                   "only IAF steps have hidden units"),
}


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
    inference: str = "bottom-up"       # bottom-up | top-down (the Ladder VAE; hierarchies only)
    prior: str = "standard"            # standard | mog | vampprior: p(z) of the top layer
    prior_components: int = DEFAULT_COMPONENTS   # K of the mixture priors
    flow: str = "none"                 # none | planar | iaf: a flow in q (bottom-up inference)
    flow_steps: int = 0                # T; 0 is the Gaussian itself
    flow_width: int = 256              # hidden units of each IAF step's MADE
    batch_norm: bool = False           # batch normalisation in every deterministic layer (hierarchies: hvae, mlp2)

    def validate(self) -> "ModelConfig":
        """Raise UsageError naming the problem and the choices, else return self."""
        choices = [("model", self.name, MODELS), ("--activation", self.activation, ACTIVATIONS),
                   ("--init", self.init, INITS), ("--inference", self.inference, INFERENCE),
                   ("--prior", self.prior, PRIORS), ("--flow", self.flow, FLOWS)]
        for flag, value, allowed in choices:
            if value not in allowed:
                raise UsageError(f"unknown {flag} {value!r}; choose one of {', '.join(allowed)}")
        for field, (low, high) in FIELD_RANGES.items():
            if not low <= getattr(self, field) <= high:
                raise UsageError(f"--{field.replace('_', '-')} must be a whole number from {low} to {high}, got "
                                 f"{getattr(self, field)}")
        fewest, most = LAYERS[self.name]
        if not fewest <= len(self.latent) <= most:
            wanted = str(fewest) if fewest == most else f"{fewest} to {most}"
            sizes = len(self.latent)
            got = f"--latent {' '.join(map(str, self.latent))}" if sizes <= 8 else f"{sizes} sizes"
            raise UsageError(f"model {self.name} takes {wanted} stochastic layer{'s' * (most > 1)}: give {wanted} latent "
                             f"size{'s' * (most > 1)} (--latent d₁ … d_L), got {got}")
        layers = len(self.latent)
        if len(self.hidden) != layers:
            flag = "--hidden" if layers == 1 else "--hidden and --hidden-top, or --blocks"
            raise UsageError(f"model {self.name} with {layers} stochastic layer{'s' * (layers > 1)} needs {layers} "
                             f"block{'s' * (layers > 1)} of hidden widths ({flag}), got {len(self.hidden)}")
        if self.inference == "top-down" and (layers == 1 or self.name == "tomczak"):
            why = "a single stochastic layer has no generative layer above it to merge with" if layers == 1 else \
                "its q(z₁|x, z₂) is already conditioned from the top, with its own networks"
            raise UsageError(f"--inference top-down (the Ladder VAE) does not apply to model {self.name} with "
                             f"{layers} layer{'s' * (layers > 1)}: {why}; use --inference bottom-up, or --model hvae "
                             f"with two or more --latent sizes")
        if self.name == "tomczak" and any(block != (self.hidden[0][0],) * 2 for block in self.hidden):
            raise UsageError(f"model tomczak is made of hidden layers of one width W, two per network (the paper's "
                             f"W = 300): give --hidden W W (and --hidden-top W W, the same W, for two layers), got "
                             f"{_widths_flags(self.hidden)}")
        if self.flow == "none" and self.flow_steps:
            raise UsageError(f"--flow-steps {self.flow_steps} without a flow: add --flow planar or --flow iaf")
        if self.flow != "none" and (self.inference == "top-down" or self.name == "tomczak"):
            raise UsageError(f"--flow {self.flow} applies to bottom-up inference (models mlp, mlp2, hvae): the "
                             f"{'ladder merges Gaussians' if self.inference == 'top-down' else 'tomczak model has its own q'}"
                             f"; use --flow none")
        if self.batch_norm and self.name not in ("hvae", "mlp2"):
            raise UsageError(f"--batch-norm applies to the hierarchies (models hvae, mlp2), not model {self.name}"
                             f"{' (its fast forms have no normalisation)' if self.name == 'mlp' else ''}; leave it out")
        if self.batch_norm and self.prior == "vampprior":
            raise UsageError("--batch-norm with --prior vampprior: the pseudo-inputs would be normalised with statistics "
                             "of their own batch; use --prior standard or mog, or leave --batch-norm out")
        if any(len(block) == 0 for block in self.hidden):
            raise UsageError(f"each block of hidden widths needs at least one layer, got {self.hidden}")
        if any(w < 1 for block in self.hidden for w in block) or any(d < 1 for d in self.latent):
            raise UsageError(f"hidden widths and latent sizes must be ≥ 1, got hidden {self.hidden}, "
                             f"latent {self.latent}")
        if self.data_dim != 784:
            raise UsageError(f"data_dim must be 784 for MNIST, got {self.data_dim}")
        return self

    def unused(self) -> dict[str, str]:
        """{field: why} for the fields whose values this model never reads (shown as such where configs are compared)."""
        return {name: why for name, (idle, bound, why) in CONDITIONAL_FIELDS.items()
                if bound is None and idle(lambda field: getattr(self, field))}

    @property
    def total_latent(self) -> int:
        """D: the standard-normal draws one sample of all stochastic layers needs."""
        return sum(self.latent)

    def layers(self) -> list[tuple[int, int]]:
        """(inputs, outputs) of every linear layer, inference network first."""
        return MODELS[self.name].linear_shapes(self)

    def parameter_count(self) -> int:
        """Weights and biases of every linear map, the prior's own parameters (K·784 pseudo-inputs, or
        K means and log-variances) and the batch normalisations' scales and shifts."""
        prior = {"standard": 0, "mog": 2 * self.prior_components * self.latent[-1],
                 "vampprior": self.prior_components * self.data_dim}[self.prior]
        norms = 2 * 2 * sum(sum(block) for block in self.hidden) if self.batch_norm else 0   # γ, β; both sides
        return sum((a + 1) * b for a, b in self.layers()) + prior + norms

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


def _widths_flags(hidden: tuple[tuple[int, ...], ...]) -> str:
    """Hidden widths as the flags that give them, for a message: "--hidden 256", "--hidden 300 300 --hidden-top 200
    200" (until 2026-12-07 messages printed the tuple, "got ((256,),)"), or "--blocks 512,512 256 128" beyond two."""
    flags = ["--hidden", "--hidden-top"]
    if len(hidden) <= 2:
        return " ".join(f"{flag} {' '.join(map(str, block))}" for flag, block in zip(flags, hidden))
    return "--blocks " + " ".join(",".join(map(str, block)) for block in hidden)


def build_model(config: ModelConfig):
    """The model of ``config``; its weights are drawn from torch's global random stream."""
    return MODELS[config.validate().name](config)
