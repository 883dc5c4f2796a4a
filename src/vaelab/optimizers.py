"""Optimisers: Adam on the flat parameter buffer (``FlatAdam``), and what is done to the gradient before its update.

``OPTIMIZERS`` (``--optimizer``), name → what it is and what is done to the gradient before each update:

    adam            Adam (Kingma & Ba 2015) on the gradient.
    adam-normgrad   Adam on each tensor's gradient divided by its Euclidean norm, gₜ ← gₜ / (‖gₜ‖₂ + 10⁻⁷) for each
                    tensor t of the model: the optimiser Tomczak & Welling trained the VampPrior models with (their
                    code's ``AdamNormGrad``, utils/optimizer.py of jmtomczak/vae_vampprior, whose update also adds ε
                    to √v before the bias corrections: ``FlatAdam``'s ``raw_eps``). Every tensor then moves Adam's
                    moments by a unit-length gradient, whatever its scale; a whole-gradient norm clip before it
                    changes nothing but the 10⁻⁷. "Each tensor" is each of the model's parameters, except where a
                    model stores several of the reference code's tensors in one (``tensor_parts``: the ``tomczak``
                    model's maps to μ and log σ², two ``Linear`` layers there, one of twice the outputs here).

The preparation acts on the flat gradient, after the ranks' all-reduce and any clipping, before Adam's moments.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import torch

NORMGRAD_EPS = 1e-7        # AdamNormGrad's constant: g / (‖g‖₂ + 1e-7)


def normalise_per_tensor(parts: Sequence[torch.Tensor]) -> None:
    """Each of ``parts`` (views of the flat gradient, one per tensor) divided in place by its norm + 10⁻⁷."""
    norms = torch._foreach_norm(parts)                  # one 0-d tensor per part, no host synchronisation
    torch._foreach_add_(norms, NORMGRAD_EPS)
    torch._foreach_div_(parts, norms)


class Optimizer(NamedTuple):
    about: str                                                        # what it does, for train.log's schedule line
    prepare: Callable[[Sequence[torch.Tensor]], None] | None          # done to the per-tensor gradients first
    raw_eps: bool = False                                             # ε added before the bias corrections (FlatAdam)


OPTIMIZERS: dict[str, Optimizer] = {
    "adam": Optimizer("Adam on the gradient", None),
    "adam-normgrad": Optimizer("Adam on each tensor's gradient divided by its norm (Tomczak & Welling's AdamNormGrad)",
                               normalise_per_tensor, raw_eps=True)}


def tensor_gradients(model: torch.nn.Module, grad: torch.Tensor) -> list[torch.Tensor]:
    """Views of the flat gradient ``grad`` (``training.FlatParameters``: the parameters' gradients one after the
    other, in ``model.parameters()`` order), one per tensor: each parameter's, split where ``model.tensor_parts()``
    (name → n) says a parameter holds n tensors of the reference code stacked along its first axis (a (2d, W)
    weight's first d rows and its last d rows)."""
    parts = getattr(model, "tensor_parts", dict)()
    unknown = set(parts) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"tensor_parts names parameters the model does not have: {sorted(unknown)}")
    views, offset = [], 0
    for name, param in model.named_parameters():
        n, pieces = param.numel(), parts.get(name, 1)
        if param.shape[0] % pieces:
            raise ValueError(f"{name} of shape {tuple(param.shape)} does not split into {pieces} along its first axis")
        views += grad[offset:offset + n].chunk(pieces)
        offset += n
    if offset != grad.numel():
        raise ValueError(f"the flat gradient holds {grad.numel()} numbers, the model's parameters {offset}")
    return views


def build_optimizer(name: str, model: torch.nn.Module, param: torch.Tensor, grad: torch.Tensor, lr: float,
                    betas: tuple[float, float], eps: float) -> "FlatAdam":
    """The optimiser ``name`` of ``OPTIMIZERS`` on the flat ``param`` and ``grad`` of ``model``."""
    optimizer = OPTIMIZERS[name]
    prepare = optimizer.prepare
    if prepare is not None:
        prepare = functools.partial(prepare, tensor_gradients(model, grad))
    return FlatAdam(param, grad, lr=lr, betas=betas, eps=eps, prepare=prepare, raw_eps=optimizer.raw_eps)


class FlatAdam:
    """Adam (Kingma & Ba 2015) on one flat parameter tensor, the update of torch.optim.Adam:

    m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  θ ← θ − lr · (m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε).

    Uses PyTorch's fused kernel where it exists (one pass over memory, no Python per tensor), else the
    same update in plain tensor operations; tests/test_training.py checks both against torch.optim.Adam.
    ``lr`` may change between steps (a schedule). ``prepare``, where given, is called on the gradient before each
    update (``OPTIMIZERS``: Tomczak & Welling's per-tensor normalisation). ``raw_eps``: ε added to √v before the
    bias corrections, as AdamNormGrad's update does (and Kingma & Ba's "more efficient" order of Algorithm 1),
    θ ← θ − lr · √(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + ε); the same update as above with ε/√(1−β₂ᵗ) in place of ε, so the
    fused kernel is given that (ε about 30 × larger at t = 1, tending to ε).
    """

    def __init__(self, param: torch.Tensor, grad: torch.Tensor, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fused: bool | None = None,
                 prepare: Callable[[], None] | None = None, raw_eps: bool = False):
        self.param, self.grad, self.lr, self.betas, self.eps = param, grad, lr, betas, eps
        self.prepare, self.raw_eps = prepare, raw_eps
        self.steps = 0                                  # step_count on the host (ε of raw_eps), without a sync
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.step_count = torch.zeros((), dtype=torch.float32, device=param.device)
        available = hasattr(torch, "_fused_adam_") and param.device.type in ("cpu", "cuda")
        self.fused = available if fused is None else fused and available

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        if self.prepare is not None:
            self.prepare()
        self.step_count.add_(1)
        self.steps += 1
        eps = self.eps / math.sqrt(1 - beta2 ** self.steps) if self.raw_eps else self.eps
        if self.fused:
            torch._fused_adam_([self.param], [self.grad], [self.exp_avg], [self.exp_avg_sq], [],
                               [self.step_count], amsgrad=False, lr=self.lr, beta1=beta1, beta2=beta2,
                               weight_decay=0.0, eps=eps, maximize=False)
            return
        t = self.step_count
        self.exp_avg.lerp_(self.grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(self.grad, self.grad, value=1 - beta2)
        bias1 = 1 - beta1 ** t
        denom = (self.exp_avg_sq / (1 - beta2 ** t)).sqrt_().add_(eps)
        self.param.addcdiv_(self.exp_avg, denom * bias1, value=-self.lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.step_count}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in self.state_dict().items():
            if state[name].shape != tensor.shape:
                raise ValueError(f"optimizer state {name} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(tensor.shape)}")
            tensor.copy_(state[name])
        self.steps = round(float(self.step_count))
