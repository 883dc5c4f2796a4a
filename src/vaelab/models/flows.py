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

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vaelab import native
from vaelab.models.base import full_precision


class NoFlow(nn.Module):
    """z_T = z₀: the diagonal Gaussian itself (log_det None keeps the layer's closed forms)."""

    # Whether the flow's evaluation is one native operator already, so that ``evaluate`` gains nothing by compiling
    # its model's log weights and does not do so by default (``evaluation.compiled_as_trained``)
    native_evaluation = False

    def __init__(self, latent: int, context: int, steps: int = 0, width: int = 0):
        super().__init__()

    def forward(self, z0: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, None]:
        return z0, None

    def conditioned(self, h: torch.Tensor) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
        """z₀ ↦ ``forward(z₀, h)`` for one context h, with what depends on h alone computed once."""
        return lambda z0: self(z0, h)


class PlanarFlow(NoFlow):
    # the recursion is native/planar.cpp eagerly too: IWAE-5000 of the full-schedule planar-80 compiled took 0.94–1.22 ×
    # the eager time (benchmarks/README.md, twenty-fourth session), where the VampPrior's and the ladder's 0.69–0.86 ×
    native_evaluation = True

    def __init__(self, latent: int, context: int, steps: int, width: int = 0):
        super().__init__(latent, context)
        self.latent, self.steps = latent, steps
        self.parameters_of = nn.Linear(context, steps * (2 * latent + 1))     # h ↦ (u, w, b) for every step

    def forward(self, z0: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conditioned(h)(z0)

    def conditioned(self, h: torch.Tensor) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        params = full_precision(self.parameters_of(h)).unflatten(-1, (self.steps, 2 * self.latent + 1))  # (…, T, 2d + 1)
        if torch.is_grad_enabled():
            return lambda z0: PlanarSteps.apply(z0, params)
        # without gradients (IWAE, chunk after chunk of draws for the same digits): û, c and M once per context
        with torch.autocast(h.device.type, enabled=False):
            flat = params.reshape(-1, *params.shape[-2:])                                # (N, T, 2d + 1)
            quantities = _step_quantities(flat, _per_step(native.usable(native.planar_ops(), flat)))
        return lambda z0: PlanarSteps.without_gradient(z0, params, quantities)


# ‖w‖² is clamped below at this in κ = m(wᵀu)/‖w‖² (a division by it); the clamp passes no gradient
_MIN_SQUARED_NORM = 1e-12


def _groups(lead: torch.Size, param_lead: torch.Size) -> tuple[int, int] | None:
    """(R, N) when z's leading axes ``lead`` are R draws (leading axes the parameters broadcast along) of N
    parameter sets (the parameters' own axes, trailing), e.g. K draws of B digits' flows; None otherwise."""
    padded = (1,) * (len(lead) - len(param_lead)) + tuple(param_lead)
    split = 0
    while split < len(lead) and padded[split] == 1:
        split += 1
    if tuple(padded[split:]) != tuple(lead[split:]):
        return None
    return math.prod(lead[:split]), math.prod(lead[split:])


class PlanarSteps(torch.autograd.Function):
    """The T planar steps with û and the backward pass derived by hand: z₀ (…, d) and the steps' parameters
    (…, T, 2d + 1) = [u, w, b] (broadcast against z's leading axes) → (z_T, Σₜ log(1 + (1 − aₜ²) wₜᵀûₜ)).

    **û.** ûₜ = uₜ + κₜwₜ with κ = m(wᵀu)/‖w‖², m(s) = softplus(s) − 1 − s, so that cₜ = wₜᵀûₜ = wᵀu + κ‖w‖²
    = softplus(wᵀu) − 1 > −1 (invertibility, Rezende & Mohamed's Appendix A.1).

    **Forward.** With aₜ = tanh(sₜ) the steps are zₜ = z_{t−1} + ûₜaₜ, so z_{t−1} = z₀ + Σ_{r<t} ûᵣaᵣ and each
    pre-activation is a scalar recursion,

        sₜ = wₜᵀz₀ + bₜ + Σ_{r<t} Mₜᵣ aᵣ,   Mₜᵣ = wₜᵀûᵣ,      z_T = z₀ + Σₜ ûₜaₜ,

    so z is never formed step by step: wₜᵀz₀ for all t and M are two batched products per parameter set (a
    digit's flow serves all its K draws), the loop runs over T scalars per draw, two kernels per step (tanh of
    column t, then its contribution to the later columns), and z_T is one more product. The log-determinant is
    Σₜ log(1 + ûₜᵀψₜ) with ψₜ = (1 − aₜ²)wₜ, i.e. log(1 + (1 − aₜ²)cₜ), for all steps at once.

    **Backward**, with g = ∂L/∂z_T and ℓ = ∂L/∂(Σ log-det): the direct part of ∂L/∂aₜ is
    Dₜ = gᵀûₜ − 2ℓaₜcₜ/(1 + (1 − aₜ²)cₜ); the only sequential recursion is, from t = T down,

        pₜ = ∂L/∂sₜ = (Dₜ + Σ_{r>t} pᵣMᵣₜ)(1 − aₜ²)      (two kernels per step),

    then for all steps at once ∂L/∂z₀ = g + Σₜ pₜwₜ, ∂L/∂bₜ = Σ pₜ, ∂L/∂cₜ = Σ ℓ(1 − aₜ²)/(1 + (1 − aₜ²)cₜ),
    ∂L/∂ûₜ = Σ aₜg + Σ_{r>t} ∂Mᵣₜ wᵣ, ∂L/∂wₜ = Σ pₜz₀ + Σ_{r<t} ∂Mₜᵣ ûᵣ with ∂Mₜᵣ = Σ pₜaᵣ (t > r), sums over the
    draws as products; and through û and c to u and w: ∂κ = ∂ûᵀw + ∂c‖w‖², ∂(wᵀu) = ∂c + ∂κ (σ(wᵀu) − 1)/‖w‖²,
    ∂‖w‖² = ∂c κ − ∂κ κ/‖w‖², ∂u = ∂û + ∂(wᵀu) w, ∂w += κ∂û + ∂(wᵀu) u + 2∂‖w‖² w.

    (‖w‖² is clamped below at ``_MIN_SQUARED_NORM`` in κ; the clamp passes no gradient.) The two recursions, and the
    log-determinant with the forward one, run as native loops (``vaelab/native/planar.cpp``: a tile of draws kept in
    L1 through all T steps) where that library can be built, else as the PyTorch loops below (two kernels per step,
    their count not their arithmetic setting the time; benchmarks/README.md); so do û, c and κ from the parameters,
    and the chain rule back to them from ∂û, ∂w, ∂c and p, one pass each instead of about thirty small ones (eager
    only: under torch.compile Inductor fuses those operations itself). Both keep a digit's pre-activations as one
    (T, R) block, (N, T, R) in all: the batched products before and after read and write that layout as it is.
    Checked against the steps written plainly and autograd, finite differences (gradcheck, float64) and the full
    Jacobian's log-determinant (tests/test_frontier.py), and the native loops
    against the PyTorch ones (tests/test_native.py).
    """

    @staticmethod
    def forward(ctx, z0, params):
        # autocast (--precision bf16) would run the batched products below in bfloat16; the flow is part of q's
        # density and stays in float32, like the log densities (models.base.full_precision)
        with torch.autocast(z0.device.type, enabled=False):
            return PlanarSteps._forward(ctx, z0, params)

    @staticmethod
    def without_gradient(z0, params, quantities):
        """``apply(z0, params)``'s values, without autograd, from ``_step_quantities`` of ``params`` computed once
        (the same operations on the same tensors: the same bits); where the parameters broadcast along inner axes
        of z₀ (one set per draw), ``apply`` itself."""
        lead = torch.broadcast_shapes(z0.shape[:-1], params.shape[:-2])
        if _groups(lead, params.shape[:-2]) is None:
            return PlanarSteps.apply(z0, params)
        with torch.autocast(z0.device.type, enabled=False):
            return PlanarSteps._forward(_NoContext(), z0, params, quantities)

    @staticmethod
    def _forward(ctx, z0, params, quantities=None):
        d, steps = z0.shape[-1], params.shape[-2]
        lead = torch.broadcast_shapes(z0.shape[:-1], params.shape[:-2])
        params_shape, groups = params.shape, _groups(lead, params.shape[:-2])
        ctx.expanded = groups is None
        if groups is None:                                      # parameters broadcast along inner axes: one set each
            params = params.expand(*lead, *params.shape[-2:])
            groups = (1, math.prod(lead))
        r, n = groups
        ops = native.usable(native.planar_ops(), z0, params)
        ctx.native = ops is not None
        z = z0.expand(*lead, d).reshape(r, n, d).transpose(0, 1)                       # (N, R, d)
        if quantities is None:
            quantities = _step_quantities(params.reshape(n, steps, 2 * d + 1), _per_step(ops))
        params, u_hat, scalars, m = quantities
        w, b, c = params[..., d:2 * d], params[..., 2 * d], scalars[1]                # (N, T, d), (N, T), (N, T)
        # pre-activations, a (T, R) block per digit: the product writes them where the recursion reads them
        a = torch.baddbmm(b.unsqueeze(-1), w, z.transpose(1, 2))                           # (N, T, R) wₜᵀz₀ + bₜ
        if ops:                                                        # the only sequential part: T scalars per draw
            a, log_det = ops.forward(a, m, c)                                # (N, T, R), (N, R): native/planar.cpp
        else:
            for t in range(steps):
                column = a[:, t].tanh_()                                                # (N, R) aₜ
                if t + 1 < steps:                                                       # sᵣ += Mᵣₜ aₜ, r > t
                    a[:, t + 1:].addcmul_(column.unsqueeze(1), m[:, t, t + 1:].unsqueeze(-1))
            log_det = torch.log1p((1.0 - a.square()) * c.unsqueeze(-1)).sum(1)          # (N, R), each term finite
        z_t = torch.baddbmm(z, a.transpose(1, 2), u_hat)                                # (N, R, d) z₀ + Σ ûₜaₜ
        ctx.save_for_backward(z, a, params, u_hat, scalars, m)
        ctx.shapes, ctx.device_type = (z0.shape, params_shape, lead), z0.device.type
        return z_t.transpose(0, 1).reshape(*lead, d), log_det.T.reshape(lead)

    @staticmethod
    def backward(ctx, grad_z, grad_log_det):
        # float32 as the forward: under torch.compile the backward is traced in the forward's autocast state
        with torch.autocast(ctx.device_type, enabled=False):
            return PlanarSteps._backward(ctx, grad_z, grad_log_det)

    @staticmethod
    def _backward(ctx, grad_z, grad_log_det):
        z, a, params, u_hat, scalars, m = ctx.saved_tensors                                # a: (N, T, R)
        z0_shape, params_shape, lead = ctx.shapes
        n, steps, r = a.shape
        d = z.shape[-1]
        w = params[..., d:2 * d]                                                        # (N, T, d)
        g = (torch.zeros_like(z) if grad_z is None else
             grad_z.expand(*lead, d).reshape(r, n, d).transpose(0, 1))                 # (N, R, d)
        ell = None if grad_log_det is None else grad_log_det.expand(lead).reshape(r, n).T  # (N, R)
        # ∂L/∂sₜ, laid out like a, from its direct part ûₜᵀg (and the log-determinant's, with ℓ)
        p = torch.bmm(u_hat, g.transpose(1, 2))                                         # (N, T, R) ûₜᵀg
        ops = native.planar_ops() if ctx.native else None
        if ops:                                                        # pₜ = (Dₜ + Σ_{r>t} pᵣMᵣₜ)(1 − aₜ²), and ∂L/∂c
            p, grad_c = ops.backward(m, a, p, scalars[1], ell)                          # native/planar.cpp
        else:
            p, grad_c = _backward_recursion(m, a, p, scalars[1], ell)
        grad_m = _draw_sums(p, a.transpose(1, 2)).tril_(-1)                             # (N, T, T) ∂Mₜᵣ, t > r
        grad_u_hat = _draw_sums(a, g).baddbmm_(grad_m.transpose(1, 2), w)               # (N, T, d)
        grad_w = _draw_sums(p, z).baddbmm_(grad_m, u_hat)                               # (N, T, d) direct part
        grad_z0 = torch.baddbmm(g, p.transpose(1, 2), w)                                # (N, R, d)
        if _per_step(ops):                                               # through û = u + κw and c = wᵀu + κ‖w‖²
            grad_params = ops.parameter_gradient(params, scalars, grad_u_hat, grad_w, grad_c, p, _MIN_SQUARED_NORM)
        else:
            grad_params = _parameter_gradient(params, scalars, grad_u_hat, grad_w, grad_c, p)
        grad_params = grad_params.reshape(*lead, steps, 2 * d + 1).sum_to_size(params_shape) if ctx.expanded else \
            grad_params.reshape(params_shape)
        grad_z0 = grad_z0.transpose(0, 1).reshape(*lead, d).sum_to_size(z0_shape)
        return grad_z0, grad_params


def _per_step(ops):
    """``ops`` for the per-step work before and after the recursions (û, c and κ; the chain rule back to the
    parameters), except while torch.compile traces: Inductor fuses those PyTorch operations with their neighbours
    itself, and with the two operators inside its graphs the compiled step was no faster (benchmarks/README.md)."""
    return None if torch.compiler.is_compiling() else ops


class _Quantities(NamedTuple):
    """What N sets of the steps' parameters alone determine (``PlanarSteps``' docstring)."""
    params: torch.Tensor        # (N, T, 2d + 1): [u, w, b] per step
    u_hat: torch.Tensor         # (N, T, d) û = u + κw
    scalars: torch.Tensor       # (4, N, T): κ, c = wᵀû, wᵀu, ‖w‖²
    m: torch.Tensor             # (N, T, T): [t, r] = ûₜᵀwᵣ


def _step_quantities(p: torch.Tensor, ops=None) -> _Quantities:
    """``_Quantities`` of N sets of the steps' parameters p (N, T, 2d + 1): by ``ops.quantities`` (planar.cpp, one pass)
    where the native operators ``ops`` are given, else as PyTorch operations."""
    d = (p.shape[-1] - 1) // 2
    u, w = p[..., :d], p[..., d:2 * d]                                                  # (N, T, d)
    if ops:
        u_hat, scalars = ops.quantities(p, _MIN_SQUARED_NORM)
    else:
        wu = torch.linalg.vecdot(w, u)                                                  # (N, T) wᵀu
        ww_raw = torch.linalg.vecdot(w, w)                                              # (N, T) ‖w‖²
        kappa = (F.softplus(wu) - 1.0 - wu) / ww_raw.clamp_min(_MIN_SQUARED_NORM)       # (N, T) κ = m(wᵀu)/‖w‖²
        u_hat = torch.addcmul(u, kappa.unsqueeze(-1), w)                                # (N, T, d)
        scalars = torch.stack([kappa, torch.addcmul(wu, kappa, ww_raw), wu, ww_raw])    # c = wᵀu + κ‖w‖²
    m = torch.bmm(u_hat, w.transpose(1, 2))                                             # (N, T, T) [t, r] = ûₜᵀwᵣ
    return _Quantities(p, u_hat, scalars, m)


def _backward_recursion(m: torch.Tensor, a: torch.Tensor, p: torch.Tensor, c: torch.Tensor,
                        ell: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.backward`` as PyTorch operations: (p, ∂L/∂c) from p = ûᵀg (N, T, R), overwritten."""
    one_minus = 1.0 - a.square()                                                        # (N, T, R)
    grad_c = torch.zeros_like(c)
    if ell is not None:
        ell = ell.unsqueeze(1)                                                          # (N, 1, R)
        c_t = c.unsqueeze(-1)                                                           # (N, T, 1)
        denominator = torch.addcmul(torch.ones_like(a), one_minus, c_t)                # (N, T, R)
        p.addcmul_(ell, a * c_t / denominator, value=-2.0)                              # Dₜ
        grad_c = (ell * one_minus / denominator).sum(-1)                                # (N, T)
    for t in range(a.shape[1] - 1, -1, -1):
        column = p[:, t].mul_(one_minus[:, t])                                          # (N, R) pₜ
        if t:                                                                           # pᵣ += Mₜᵣ pₜ, r < t
            p[:, :t].addcmul_(column.unsqueeze(1), m[:, :t, t].unsqueeze(-1))
    return p, grad_c


def _parameter_gradient(params: torch.Tensor, scalars: torch.Tensor, grad_u_hat: torch.Tensor, grad_w: torch.Tensor,
                        grad_c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``ops.parameter_gradient`` as PyTorch operations: [∂u, ∂w, ∂b] (N, T, 2d + 1) through û and c (the formulas in
    ``PlanarSteps``' docstring)."""
    d = grad_u_hat.shape[-1]
    u, w = params[..., :d], params[..., d:2 * d]
    kappa, _, wu, ww_raw = scalars
    ww = ww_raw.clamp_min(_MIN_SQUARED_NORM)
    grad_kappa = torch.linalg.vecdot(grad_u_hat, w).addcmul_(grad_c, ww_raw)           # (N, T)
    grad_wu = grad_c + grad_kappa * (torch.sigmoid(wu) - 1.0) / ww
    grad_ww = grad_c * kappa - grad_kappa * kappa / ww * (ww_raw > _MIN_SQUARED_NORM)
    # [∂u, ∂w, ∂b] per step, written into one buffer; torch.compile takes no out= into its strided views and
    # gets them as pieces (its own kernels write them where they go)
    tracing = torch.compiler.is_compiling()
    grad_params = torch.empty_like(params, memory_format=torch.contiguous_format)
    out = (None, None) if tracing else (grad_params[..., :d], grad_params[..., d:2 * d])
    grad_u = torch.addcmul(grad_u_hat, grad_wu.unsqueeze(-1), w, out=out[0])            # ∂û + ∂(wᵀu) w
    # ∂w = direct + κ∂û + ∂(wᵀu) u + 2∂‖w‖² w, with κ∂û = κ∂u − κ∂(wᵀu) w
    grad_w.addcmul_(kappa.unsqueeze(-1), grad_u).addcmul_((2.0 * grad_ww - kappa * grad_wu).unsqueeze(-1), w)
    grad_w = torch.addcmul(grad_w, grad_wu.unsqueeze(-1), u, out=out[1])
    if tracing:
        return torch.cat([grad_u, grad_w, p.sum(-1, keepdim=True)], -1)
    grad_params[..., 2 * d] = p.sum(-1)                                                 # ∂bₜ = Σ pₜ
    return grad_params


class _NoContext:
    """The autograd context ``PlanarSteps._forward`` writes into, where nothing will go backward."""

    def save_for_backward(self, *tensors):
        pass


def _draw_sums(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ over draws of outer products: x (N, S, R), y (N, R, d) → (N, S, d); with one draw a broadcast product
    (a batched product of inner size 1 is several times slower)."""
    if x.shape[-1] == 1:
        return x.contiguous() * y.contiguous()          # (N, S, 1) · (N, 1, d): a contiguous result
    return torch.bmm(x, y)


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
