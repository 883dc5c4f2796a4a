"""Normalising flows in q(z|x), by name (``FLOWS``): parts a model is composed from.

z₀ ~ N(μ(x), diag σ²(x)), z_T = f_T ∘ … ∘ f₁(z₀), and by the change of variables
    log q(z_T|x) = log N(z₀; μ, σ²) − Σₜ log|det ∂fₜ/∂z_{t−1}|.
Each flow returns z_T and Σₜ log|det|, computed exactly (checked against the log-determinant of the full
Jacobian from autograd in tests/test_frontier.py). The flows' parameters are amortised: functions of the
encoder's last hidden layer h (B, H) (or (K, B, H) for a layer above the first), as in both papers.

- ``planar`` (Rezende & Mohamed 2015, §4.1): f(z) = z + û tanh(wᵀz + b), log|det| = log|1 + ûᵀψ(z)| with
  ψ = (1 − tanh²(wᵀz + b)) w. Invertible when wᵀû ≥ −1, which û = u + (m(wᵀu) − wᵀu) w/‖w‖² with
  m(a) = −1 + softplus(a) guarantees (their Appendix A.1): then wᵀû = m(wᵀu) > −1 and 1 + ûᵀψ > 0.
- ``iaf`` (Kingma et al. 2016, §4, eq. 10–11, the numerically stable form): [m, s] = MADE(z, h),
  σ = sigmoid(s + 1), z ← σ ⊙ z + (1 − σ) ⊙ m, log|det| = Σᵢ log σᵢ (the Jacobian is triangular because
  MADE's masks make output i depend on inputs before i only). MADE (Germain et al. 2015): one masked hidden
  layer of ``width`` ELU units with the context h added, the order of the dimensions reversed from one step
  to the next. The +1 starts σ near 0.73, each step near the identity, as the paper advises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.models.base import full_precision


class NoFlow(nn.Module):
    """z_T = z₀: the diagonal Gaussian itself (log_det None keeps the layer's closed forms)."""

    def __init__(self, latent: int, context: int, steps: int = 0, width: int = 0):
        super().__init__()

    def forward(self, z0: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, None]:
        return z0, None


class PlanarFlow(NoFlow):
    def __init__(self, latent: int, context: int, steps: int, width: int = 0):
        super().__init__(latent, context)
        self.latent, self.steps = latent, steps
        self.parameters_of = nn.Linear(context, steps * (2 * latent + 1))     # h ↦ (u, w, b) for every step

    def forward(self, z0: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.latent
        params = full_precision(self.parameters_of(h)).unflatten(-1, (self.steps, 2 * d + 1))   # (…, T, 2d + 1)
        # what depends on the parameters alone, for all T steps at once: û and wᵀû
        u, w, b = params[..., :d], params[..., d:2 * d], params[..., 2 * d]            # (…, T, d), (…, T, d), (…, T)
        wu = (w * u).sum(-1, keepdim=True)                                              # (…, T, 1) wᵀu
        u_hat = u + (F.softplus(wu) - 1.0 - wu) * w / w.square().sum(-1, keepdim=True).clamp_min(1e-12)
        w_u_hat = (w * u_hat).sum(-1)                                                   # (…, T) wᵀû = m(wᵀu) > −1
        return PlanarSteps.apply(z0, u_hat, w, b, w_u_hat)


class PlanarSteps(torch.autograd.Function):
    """The T planar steps with a backward pass derived by hand: z (…, d), û and w (…, T, d), b and c = wᵀû (…, T)
    (broadcast against z's leading axes) → (z_T, Σₜ log(1 + (1 − aₜ²) cₜ)).

    Forward, per step: aₜ = tanh(wₜᵀz_{t−1} + bₜ), zₜ = z_{t−1} + ûₜ aₜ; the log-determinants from all aₜ at once
    (ûᵀψ = (1 − a²) wᵀû). Backward, with g = ∂L/∂zₜ and ℓ = ∂L/∂(Σ log-det): the only sequential recursion is

        pₜ = (gₜᵀûₜ + ℓ ∂lₜ/∂aₜ)(1 − aₜ²),   g_{t−1} = gₜ + pₜ wₜ,     ∂lₜ/∂aₜ = −2aₜcₜ / (1 + (1 − aₜ²)cₜ)

    (pₜ is ∂L/∂ of the step's pre-activation); then for all steps at once ∂L/∂ûₜ = gₜ aₜ, ∂L/∂wₜ = pₜ z_{t−1},
    ∂L/∂bₜ = pₜ, ∂L/∂cₜ = ℓ (1 − aₜ²)/(1 + (1 − aₜ²)cₜ), each summed over the axes it was broadcast along.
    Four kernels per step each way instead of autograd's graph of a dozen: the 80 steps of ``planar-80`` are
    rounds of small kernels whose count, not their arithmetic, sets the time. Checked against finite differences
    (torch.autograd.gradcheck, float64) and against the full Jacobian's log-determinant (tests/test_frontier.py).
    """

    @staticmethod
    def forward(ctx, z0, u_hat, w, b, c):
        steps = w.shape[-2]
        u_t, w_t = u_hat.movedim(-2, 0), w.movedim(-2, 0)                               # (T, …, d)
        b_t = b.movedim(-1, 0)                                                          # (T, …)
        shape = torch.broadcast_shapes(z0.shape, u_hat.shape[:-2] + u_hat.shape[-1:])
        zs = z0.new_empty((steps + 1, *shape))                                          # z₀ … z_T (T + 1, …, d)
        a = z0.new_empty((steps, *shape[:-1]))                                          # (T, …)
        zs[0] = z0
        for t in range(steps):                                         # the only sequential part: z through the steps
            torch.tanh(torch.linalg.vecdot(zs[t], w_t[t]).add_(b_t[t]), out=a[t])
            torch.addcmul(zs[t], u_t[t], a[t].unsqueeze(-1), out=zs[t + 1])
        a_last = a.movedim(0, -1)                                                       # (…, T)
        one_minus = 1.0 - a_last.square()                                               # (…, T) 1 − a²
        log_det = torch.log1p(one_minus * c).sum(-1)                   # Σₜ log(1 + ûᵀψ), each term finite (wᵀû > −1)
        ctx.save_for_backward(zs, a, u_hat, w, c)
        ctx.z0_shape, ctx.b_shape = z0.shape, b.shape
        return zs[-1].clone(), log_det

    @staticmethod
    def backward(ctx, grad_z, grad_log_det):
        zs, a, u_hat, w, c = ctx.saved_tensors
        steps = len(a)
        u_t, w_t = u_hat.movedim(-2, 0), w.movedim(-2, 0)                               # (T, …, d)
        c_t = c.movedim(-1, 0)                                                          # (T, …) as broadcast with a:
        c_t = c_t.view(steps, *[1] * (a.dim() - c_t.dim()), *c_t.shape[1:])            # ones where z has more axes
        one_minus = 1.0 - a.square()                                                    # (T, …)
        denominator = 1.0 + one_minus * c_t
        if grad_log_det is None:
            grad_log_det = torch.zeros_like(a[0])
        from_log_det = grad_log_det * (-2.0 * a * c_t / denominator)                   # (T, …) ℓ ∂lₜ/∂aₜ
        g = (grad_z if grad_z is not None else torch.zeros_like(zs[-1])).clone()       # (…, d)
        gs = torch.empty_like(zs[1:])                                                   # ∂L/∂zₜ for t = 1 … T
        pre = torch.empty_like(a)                                                       # pₜ (T, …)
        for t in range(steps - 1, -1, -1):
            gs[t] = g
            torch.mul(torch.linalg.vecdot(g, u_t[t]).add_(from_log_det[t]), one_minus[t], out=pre[t])
            g.addcmul_(pre[t].unsqueeze(-1), w_t[t])
        grad_u = (gs * a.unsqueeze(-1)).movedim(0, -2).sum_to_size(u_hat.shape)        # (…, T, d)
        grad_w = (zs[:-1] * pre.unsqueeze(-1)).movedim(0, -2).sum_to_size(w.shape)
        grad_b = pre.movedim(0, -1).sum_to_size(ctx.b_shape)                            # (…, T)
        grad_c = (grad_log_det * one_minus / denominator).movedim(0, -1).sum_to_size(c.shape)
        return g.sum_to_size(ctx.z0_shape), grad_u, grad_w, grad_b, grad_c


class MaskedLinear(nn.Linear):
    """A linear map whose weight is multiplied by a fixed 0/1 mask (a buffer, saved with the weights)."""

    def __init__(self, inputs: int, outputs: int, mask: torch.Tensor):
        super().__init__(inputs, outputs)
        self.register_buffer("mask", mask.float())

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return F.linear(a, self.weight * self.mask, self.bias)


class IAFStep(nn.Module):
    """One inverse autoregressive step: MADE(z, h) → (m, s) with output i a function of z_{<i} (in this step's
    order) and the context."""

    def __init__(self, latent: int, context: int, width: int, reverse: bool):
        super().__init__()
        order = torch.arange(latent, 0, -1) if reverse else torch.arange(1, latent + 1)   # degree of each input
        hidden = torch.arange(width) % max(1, latent - 1) + 1                           # degrees 1 … d−1
        self.hidden = MaskedLinear(latent, width, hidden[:, None] >= order[None, :])
        self.context = nn.Linear(context, width)
        mask_out = (order[:, None] > hidden[None, :]).repeat(2, 1)                       # (2d, width)
        self.out = MaskedLinear(width, 2 * latent, mask_out)

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.elu(self.hidden(z) + self.context(h))
        m, s = full_precision(self.out(hidden)).chunk(2, dim=-1)
        sigma = torch.sigmoid(s + 1.0)
        return sigma * z + (1.0 - sigma) * m, F.logsigmoid(s + 1.0).sum(-1)


class IAF(NoFlow):
    def __init__(self, latent: int, context: int, steps: int, width: int):
        super().__init__(latent, context)
        self.steps = nn.ModuleList([IAFStep(latent, context, width, reverse=t % 2 == 1) for t in range(steps)])

    def forward(self, z0: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det = z0, torch.zeros(z0.shape[:-1], dtype=z0.dtype, device=z0.device)
        for step in self.steps:
            z, step_log_det = step(z, h)
            log_det = log_det + step_log_det
        return z, log_det


FLOWS: dict[str, type[NoFlow]] = {"none": NoFlow, "planar": PlanarFlow, "iaf": IAF}


def flow_shapes(config, latent: int, context: int) -> list[tuple[int, int]]:
    """(inputs, outputs) of the flow's linear maps for one layer (parameter counts, FLOPs, memory)."""
    steps, width = config.flow_steps, config.flow_width
    if config.flow == "planar" and steps:
        return [(context, steps * (2 * latent + 1))]
    if config.flow == "iaf" and steps:
        return [(latent, width), (context, width), (width, 2 * latent)] * steps
    return []


def build_flow(config, latent: int, context: int) -> NoFlow:
    """The flow of ``config`` for a layer of ``latent`` units whose encoder's last hidden layer has ``context``
    units; zero steps (or ``none``) is the Gaussian itself."""
    if config.flow == "none" or config.flow_steps == 0:
        return NoFlow(latent, context)
    return FLOWS[config.flow](latent, context, config.flow_steps, config.flow_width)
