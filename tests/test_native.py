"""The native kernels (vaelab/native): the planar flow's recursions against its PyTorch loops, their tanh against
float64, the build's cache and its fall back."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from vaelab import native
from vaelab.models.flows import PlanarSteps

needs_native = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler for vaelab's native kernels")


def _steps(z0, params, use_native: bool, monkeypatch):
    """z_T, Σ log-det and their gradients for a fixed random loss, with the native recursions or the PyTorch loops."""
    with monkeypatch.context() as patch:
        if not use_native:
            patch.setitem(native._OPS, "planar", None)
        z0, params = z0.clone().requires_grad_(), params.clone().requires_grad_()
        z, log_det = PlanarSteps.apply(z0, params)
        generator = torch.Generator().manual_seed(3)
        weights = torch.randn(z.shape, generator=generator, dtype=torch.float64).to(z.dtype)
        loss = (z * weights).sum() + (log_det * torch.linspace(0.5, 1.5, log_det.numel(), dtype=z.dtype)
                                      .reshape(log_det.shape)).sum()
        return (z, log_det, *torch.autograd.grad(loss, (z0, params)))


@needs_native
@pytest.mark.parametrize("z_shape, param_shape", [
    ((100, 40), (100, 80, 81)),          # training: one draw per digit
    ((70, 3, 40), (3, 80, 81)),          # IWAE: 70 draws of 3 digits, a tile of 64 and one of 6
    ((65, 2, 40), (2, 80, 81)),          # a tile of 64 and one of a single draw
    ((5, 2, 40), (80, 81)),              # one flow for all
    ((20, 3, 6), (3, 13, 13)),           # 13 steps: a block of 8 and a shorter last one
])
def test_native_recursions_equal_the_pytorch_loops(z_shape, param_shape, monkeypatch):
    """The same flow and gradients with either implementation: to 1e-12 in float64 (the same arithmetic in another
    order), and in float32 at planar-80's size both within 1e-5 of float64, relative to the largest value (measured
    at most 9.2e-7 for either, the Xeon)."""
    assert native.planar_ops() is not None, "the library was not built: this test would compare the loop with itself"
    generator = torch.Generator().manual_seed(0)
    z0 = torch.randn(z_shape, generator=generator, dtype=torch.float64)
    params = 0.2 * torch.randn(param_shape, generator=generator, dtype=torch.float64)
    ours, loop = _steps(z0, params, True, monkeypatch), _steps(z0, params, False, monkeypatch)
    for a, b in zip(ours, loop):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ours32 = _steps(z0.float(), params.float(), True, monkeypatch)
    loop32 = _steps(z0.float(), params.float(), False, monkeypatch)
    for a, b, exact in zip(ours32, loop32, ours):
        scale = exact.abs().max().item()
        assert (a.double() - exact).abs().max().item() <= 1e-5 * max(scale, 1.0)
        assert (b.double() - exact).abs().max().item() <= 1e-5 * max(scale, 1.0)


@needs_native
def test_native_tanh_is_within_two_ulps_of_float64():
    """One step is aₜ = tanh(sₜ): the kernel's own float32 tanh against float64's, relative error in units of 2⁻²³
    over [−12, 12] and down to 1e-30, and odd."""
    forward = native.planar_ops().forward
    x = torch.cat([torch.linspace(-12, 12, 400_001), torch.logspace(-30, 0, 3001), -torch.logspace(-30, 0, 3001),
                   torch.tensor([0.0, 9.0, 9.5, 88.0, -88.0, float("inf"), -float("inf")])])
    a = forward(x.reshape(1, 1, -1), torch.zeros(1, 1, 1), torch.zeros(1, 1))[0].flatten()
    exact = torch.tanh(x.double())
    ulps = (a.double() - exact).abs() / exact.abs().clamp_min(1e-300) / 2.0 ** -23
    assert ulps[exact != 0].max().item() < 2.0
    assert a[x == 0].eq(0).all()
    torch.testing.assert_close(forward(-x.reshape(1, 1, -1), torch.zeros(1, 1, 1), torch.zeros(1, 1))[0].flatten(), -a,
                               rtol=0, atol=0)


@needs_native
def test_the_tanh_activation_kernel_is_the_flows_tanh_in_place_and_falls_back_where_it_cannot_run(monkeypatch):
    """``native.tanh_kernel`` (a tanh network's layers outside autograd) applies the flow's tanh (the test above) in
    place: the same bits as the planar forward's aₜ, on 1 and 2 threads, NaN kept NaN (the clamp at 9 once made it
    ±1). The activation takes it for contiguous float32 CPU tensors only: float64, a strided view and a tensor that
    autograd records get torch.tanh_."""
    from vaelab.models.base import ACTIVATIONS

    x = torch.cat([torch.linspace(-12, 12, 100_003), torch.logspace(-30, 0, 301), torch.tensor([0.0, -0.0, 88.0])])
    flow = native.planar_ops().forward(x.reshape(1, 1, -1), torch.zeros(1, 1, 1), torch.zeros(1, 1))[0].flatten()
    kernel = native.tanh_kernel()
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        y = x.clone()
        assert kernel(y) is y and torch.equal(y, flow)
    nan = kernel(torch.tensor([float("nan"), 1.0, -float("inf")]))
    assert nan[0].isnan() and nan[2] == -1.0
    tanh_ = ACTIVATIONS["tanh"].inplace
    assert torch.equal(tanh_(x.clone()), flow)
    wide = torch.linspace(-3, 3, 2000).reshape(1000, 2)
    expected = torch.tanh(wide.t())
    assert torch.equal(tanh_(wide.t()), expected)                                       # not contiguous: torch's
    assert torch.equal(tanh_(x.double()), torch.tanh(x.double()))
    recorded = x.clone().requires_grad_()
    assert torch.equal(tanh_(recorded * 1.0), torch.tanh(x))
    assert not torch.equal(torch.tanh(x), flow)                  # so that the cases above tell the two apart


@needs_native
def test_native_log_determinant_is_within_its_rounding_bound_of_float64():
    """The forward's log-determinant Σₜ log(1 + (1 − aₜ²)cₜ), kept in float32 as a product renormalised by its
    exponent (planar.cpp, LogDet), against float64's sum of log1p of the same float32 arguments: within the bound its
    2T roundings give, 2T · 6e-8 + 2⁻²³|Σ| (T steps). One step with s = 0 (a = 0) gives log(1 + c), for c from −1 + 2⁻²⁴
    to 1e30 and ±1e-30 … 1; 80 steps of random a and c, of factors near 2⁻²⁴ (the product would underflow float32
    without its renormalisation) and near 1e30 (it would overflow); a factor 0 gives −inf, c = inf +inf, NaN NaN."""
    forward = native.planar_ops().forward

    def check(s, c):
        a, log_det = forward(s, torch.zeros(s.shape[0], s.shape[1], s.shape[1]), c)
        argument = (1 - a.square()) * c.unsqueeze(-1)                                   # float32, as the kernel forms it
        exact = torch.log1p(argument.double()).sum(1)                                   # (N, R)
        bound = 2 * s.shape[1] * 6e-8 + 2.0 ** -23 * exact.abs()
        assert ((log_det.double() - exact).abs() <= bound).all(), (log_det.double() - exact).abs().max()
        return log_det

    c = torch.cat([torch.linspace(-1 + 2.0 ** -24, 3, 200_001), torch.logspace(-30, 30, 6001),
                   -torch.logspace(-30, 0, 3001)[:-1], torch.tensor([2.0 ** -0.5 - 1, 2.0 ** 0.5 - 1, 0.0, 2.0 ** 25])])
    single = check(torch.zeros(c.numel(), 1, 1), c.reshape(-1, 1))
    assert single[c == 0].eq(0).all()
    generator = torch.Generator().manual_seed(6)
    check(3 * torch.randn(400, 80, 2, generator=generator), 4 * torch.rand(400, 80, generator=generator) - 0.999)
    check(torch.zeros(3, 80, 1), torch.full((3, 80), -1 + 2.0 ** -24))                  # Σ = 80 log 2⁻²⁴ = −1331
    check(torch.zeros(3, 80, 1), torch.full((3, 80), 1e30))                             # Σ = 5526
    special = forward(torch.zeros(3, 2, 1), torch.zeros(3, 2, 2), torch.tensor([[0.5, -1.0], [math.inf, 0.5],
                                                                                    [math.nan, 0.5]]))[1].flatten()
    assert special[0].item() == -math.inf and special[1].item() == math.inf and special[2].isnan().item()


@needs_native
@pytest.mark.parametrize("draws", [1, 50, 150])          # groups of digits; one tile; three tiles of one digit
def test_native_kernels_give_the_same_bits_on_one_and_two_threads(draws):
    """The work is split by tiles of draws (or groups of digits, or rows of parameters) and each one's arithmetic is
    the same on any thread; ∂L/∂c of a digit's tiles is summed in one order."""
    ops = native.planar_ops()
    generator = torch.Generator().manual_seed(1)
    s, d = torch.randn(20, 80, draws, generator=generator), torch.randn(20, 80, draws, generator=generator)
    m, c = 0.05 * torch.randn(20, 80, 80, generator=generator), torch.rand(20, 80, generator=generator)
    ell, params = torch.randn(20, draws, generator=generator), 0.3 * torch.randn(20, 80, 81, generator=generator)
    grads = torch.randn(2, 20, 80, 40, generator=generator)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            a, log_det = ops.forward(s, m, c)
            p, grad_c = ops.backward(m, a, d, c, ell)
            u_hat, scalars = ops.quantities(params, 1e-12)
            results.append((a, log_det, p, grad_c, ops.backward(m, a, d, c, None)[0], u_hat, scalars,
                            ops.parameter_gradient(params, scalars, grads[0], grads[1], grad_c, p, 1e-12)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@needs_native
def test_native_step_quantities_and_their_chain_rule_against_float64():
    """``quantities`` (û, κ, c, wᵀu, ‖w‖²) and ``parameter_gradient`` (∂L/∂[u, w, b] through û and c) in float32
    against the PyTorch forms in float64 on the same inputs: within 2e-6 of the largest value each (float32's
    rounding of sums of 40 terms). Rows include wᵀu = ±40, the ends of softplus (m(40) = −1 + 4e-18, m(−40) = 39 +
    4e-18, with ‖w‖² = 40), and w = 0, where ‖w‖² is clamped: û = u, c = 0; in float64, also 0 < ‖w‖² below the
    clamp, where no gradient passes it."""
    from vaelab.models.flows import _MIN_SQUARED_NORM, _parameter_gradient, _step_quantities

    ops = native.planar_ops()
    generator = torch.Generator().manual_seed(7)
    params = 0.3 * torch.randn(6, 80, 81, generator=generator, dtype=torch.float64)
    params[0, :2, 40:80] = 1.0                                       # w = 1: wᵀu = Σu
    params[0, 0, :40], params[0, 1, :40] = 1.0, -1.0                 # wᵀu = ±40
    params[1, :3, 40:80] = 0.0                                       # w = 0: ‖w‖² clamped
    grad_u_hat, grad_w = torch.randn(2, 6, 80, 40, generator=generator, dtype=torch.float64)
    grad_c, p = torch.randn(6, 80, generator=generator, dtype=torch.float64), \
        torch.randn(6, 80, 3, generator=generator, dtype=torch.float64)
    exact = _step_quantities(params)
    ours = _step_quantities(params.float(), ops)
    for name in ("u_hat", "scalars", "m"):
        mine, reference = getattr(ours, name).double(), getattr(exact, name)
        assert (mine - reference).abs().max().item() <= 2e-6 * reference.abs().max().item(), name
    assert ours.scalars[0, 0, :2].tolist() == pytest.approx([-1 / 40, 39 / 40], rel=1e-7)     # κ = m(±40)/‖w‖²
    assert torch.equal(ours.u_hat[1, :3], params[1, :3, :40].float()) and ours.scalars[1, 1, :3].eq(0).all()
    reference = _parameter_gradient(params, exact.scalars, grad_u_hat, grad_w.clone(), grad_c, p)
    mine = ops.parameter_gradient(params.float(), ours.scalars, grad_u_hat.float(), grad_w.float(), grad_c.float(),
                                  p.float(), _MIN_SQUARED_NORM).double()
    assert (mine - reference).abs().max().item() <= 2e-6 * reference.abs().max().item()
    float64 = ops.parameter_gradient(params, exact.scalars, grad_u_hat, grad_w, grad_c, p, _MIN_SQUARED_NORM)
    torch.testing.assert_close(float64, reference, rtol=1e-12, atol=1e-12)
    tiny = params.clone()                              # 0 < ‖w‖² = 4e-13 < ε: κ from the clamp, no gradient through it
    tiny[:, :, 40:80] = 1e-7
    reference = _parameter_gradient(tiny, _step_quantities(tiny).scalars, grad_u_hat, grad_w.clone(), grad_c, p)
    float64 = ops.parameter_gradient(tiny, _step_quantities(tiny, ops).scalars, grad_u_hat, grad_w, grad_c, p,
                                     _MIN_SQUARED_NORM)
    torch.testing.assert_close(float64, reference, rtol=1e-12, atol=0)


@needs_native
def test_native_m_and_its_derivative_against_float64():
    """The kernel's own float32 m(s) = softplus(s) − 1 − s (an exp and a log1p written to vectorise) and
    m'(s) = σ(s) − 1, read through the operators (κ = m(wᵀu)/‖w‖² with w = e₁, u = s e₁; ∂L/∂u₂ = m'(s)/2 with
    w = e₁ + e₂ and ∂L/∂û = e₁), against float64 at the same float32 s, for s over [−100, 100] and near 0: m within
    2.5e-7 · max(1, |m|) (two float32 roundings of the largest term), m' within 1e-6 relative (e^{−s} keeps its
    digits down to 1e-38) for s < 87 and within 1.7e-38 of it from there (only denormals there: 0)."""
    ops = native.planar_ops()
    values = torch.cat([torch.linspace(-100, 100, 40_001), torch.logspace(-30, 0, 301), -torch.logspace(-30, 0, 301)])
    rows, d = values.numel(), 3
    params = torch.zeros(2, rows, 2 * d + 1)
    params[:, :, 0], params[:, :, d] = values, 1.0                   # u = s e₁, w = e₁: wᵀu = s
    params[1, :, d + 1] = 1.0                                         # w = e₁ + e₂ in the second set: ‖w‖² = 2
    _, scalars = ops.quantities(params, 1e-12)
    s64 = values.double()
    m64 = torch.log1p(torch.exp(-s64.abs())) + torch.clamp_min(-s64, 0) - 1
    assert ((scalars[0, 0].double() - m64).abs() <= 2.5e-7 * m64.abs().clamp_min(1)).all()
    grad_u_hat = torch.zeros(2, rows, d)
    grad_u_hat[:, :, 0] = 1.0
    grad = ops.parameter_gradient(params, scalars, grad_u_hat, torch.zeros(2, rows, d), torch.zeros(2, rows),
                                  torch.zeros(2, rows, 1), 1e-12)
    derivative64 = -1 / (1 + torch.exp(s64))
    error = (2 * grad[1, :, 1].double() - derivative64).abs()
    assert (error <= torch.where(s64 < 87, 1e-6 * derivative64.abs(), torch.full_like(s64, 1.7e-38))).all()


@needs_native
def test_native_operators_pass_torch_library_opcheck():
    """Their registrations (output shapes for torch.compile, no hidden mutation) as torch.library checks them."""
    ops = native.planar_ops()
    generator = torch.Generator().manual_seed(2)
    s, m = torch.randn(3, 6, 5, generator=generator), 0.1 * torch.randn(3, 6, 6, generator=generator)
    c, params = torch.rand(3, 6, generator=generator), torch.randn(3, 6, 9, generator=generator)
    u_hat, scalars = ops.quantities(params, 1e-12)
    for op, args in ((ops.forward, (s, m, c)), (ops.backward, (m, torch.tanh(s), s, c, torch.randn(3, 5))),
                     (ops.backward, (m, torch.tanh(s), s, c, None)), (ops.quantities, (params, 1e-12)),
                     (ops.parameter_gradient, (params, scalars, u_hat, u_hat, c, s, 1e-12))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@needs_native
def test_build_caches_one_library_per_source_and_writes_nothing_else(tmp_path, monkeypatch):
    """The first build writes one .so into $VAELAB_CACHE/native, the second finds it; where the cache directory
    cannot be made the library goes to the temporary directory."""
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    library = native.build("planar")
    assert library.parent == tmp_path / "cache" / "native"
    assert sorted(p.name for p in library.parent.iterdir()) == [library.name]
    stamp = library.stat().st_mtime_ns
    assert native.build("planar") == library and library.stat().st_mtime_ns == stamp
    blocked = tmp_path / "a-file"                  # a cache that cannot be made (even by root): a file is in the way
    blocked.write_text("")
    monkeypatch.setenv("VAELAB_CACHE", str(blocked))
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    fallback = native.build("planar")
    assert fallback.parent == tmp_path / "tmp" / f"vaelab-native-{os.getuid()}" and fallback.exists()


@needs_native
def test_a_compiler_without_openmp_builds_the_serial_library_with_the_same_results(tmp_path, monkeypatch):
    """Where -fopenmp fails (clang without libomp), the build goes on without it: one thread, the same numbers."""
    import ctypes

    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "THREADING", (("--no-such-openmp-flag",), ("-fopenmp-simd",)))
    serial = ctypes.CDLL(str(native.build("planar")))
    forward = native.planar_ops().forward
    generator = torch.Generator().manual_seed(5)
    s, m = torch.randn(20, 80, 50, generator=generator), 0.05 * torch.randn(20, 80, 80, generator=generator)
    c = torch.rand(20, 80, generator=generator)
    a, log_det = torch.empty_like(s), torch.empty(20, 50)
    serial.planar_forward_f32.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    serial.planar_forward_f32(m.data_ptr(), c.data_ptr(), s.data_ptr(), a.data_ptr(), log_det.data_ptr(), 80, 20, 50, 2)
    assert torch.equal(a, forward(s, m, c)[0]) and torch.equal(log_det, forward(s, m, c)[1])


@needs_native
def test_a_cache_directory_others_may_write_in_is_not_used(tmp_path, monkeypatch):
    """A library is loaded into the process: never from a directory where someone else could have put it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path))
    (tmp_path / "native").symlink_to(shared)
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    library = native.build("planar")
    assert library.parent == tmp_path / "tmp" / f"vaelab-native-{os.getuid()}"
    assert not list(shared.iterdir())
    (tmp_path / "tmp" / f"vaelab-native-{os.getuid()}").chmod(0o777)
    with pytest.raises(native.NativeBuildError, match="is not this user's own .*mode 777"):
        native.build("planar")


@needs_native
def test_two_processes_building_at_once_each_load_a_whole_library(tmp_path):
    """torchrun's ranks build the same library at the same moment: each loads a whole one, one file remains."""
    script = ("import torch; from vaelab import native; f = native.planar_ops().forward; "
              "print(float(f(torch.ones(1, 1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1))[0]))")
    env = {**os.environ, "VAELAB_CACHE": str(tmp_path)}
    runs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        assert float(out) == pytest.approx(0.7615941559557649, rel=1e-6) and "not available" not in err
    assert len(list((tmp_path / "native").iterdir())) == 1


def test_without_a_compiler_the_flow_warns_once_and_runs_its_pytorch_loop(monkeypatch):
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.delitem(native._OPS, "planar", raising=False)
    with pytest.warns(RuntimeWarning, match="native kernel is not available .*no C\\+\\+ compiler.*PyTorch loop"):
        z, log_det = PlanarSteps.apply(torch.zeros(2, 3), torch.zeros(2, 4, 7))
    assert native._OPS["planar"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PlanarSteps.apply(torch.zeros(2, 3), torch.zeros(2, 4, 7))
    assert torch.equal(z, torch.zeros(2, 3)) and torch.equal(log_det, torch.zeros(2))   # u = w = b = 0: identity


def test_without_a_compiler_the_kernels_that_change_no_result_are_left_out_without_a_warning(monkeypatch):
    """The binarisation's draws and the denormal switch give the same bits as the PyTorch code they replace: where
    their libraries cannot be had, they resolve to None silently, and the pixels come from torch.randint."""
    from vaelab.data import binarize

    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setattr(native, "_QUIET", {})
    grey = torch.randint(0, 256, (7, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.binarize_kernel() is None and native.denormal_switch() is None
        pixels = binarize(grey, torch.Generator().manual_seed(9))
    expected = torch.randint(0, 255, (7, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(9)).lt(grey)
    assert torch.equal(pixels, expected.to(pixels.dtype)) and native._QUIET == {"binarize": None, "denormals": None}


def test_planar_flow_without_gradients_reuses_its_step_quantities_and_gives_the_same_bits():
    """IWAE computes û, c and M once per batch of digits (``PlanarFlow.conditioned`` under no_grad): the same values,
    bit for bit, as the flow applied whole, for draws of the digits and for one set broadcast to all."""
    from vaelab.models.flows import PlanarFlow

    generator = torch.Generator().manual_seed(4)
    flow = PlanarFlow(6, 5, steps=7)
    h = torch.randn(3, 5, generator=generator)
    for z0 in (torch.randn(11, 3, 6, generator=generator), torch.randn(3, 6, generator=generator)):
        with torch.no_grad():
            fast = flow.conditioned(h)(z0)
        whole = flow.conditioned(h)(z0)                    # with gradients: PlanarSteps.apply
        for a, b in zip(fast, whole):
            assert torch.equal(a, b.detach())
    with torch.no_grad():                                  # one set of parameters for all draws and digits
        one = flow.conditioned(h[0])(torch.randn(4, 3, 6, generator=generator))
    assert one[0].shape == (4, 3, 6) and one[1].shape == (4, 3)


def test_the_cli_says_in_one_line_each_that_the_kernels_run_without_their_native_library(tmp_path, data_dir, monkeypatch, capfd):
    from vaelab.cli import main

    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setattr(native, "_OPS", {})            # nothing resolved yet, and what this resolves is undone after
    assert main(["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--flow", "planar", "--flow-steps", "2",
                 "--latent", "4", "--hidden", "16", "--train-examples", "200", "--test-examples", "20",
                 "--data-dir", str(data_dir), "--threads", "1", "--no-progress"]) == 0
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "native kernel" in line]
    assert lines == ["vaelab train: warning: the planar flow's native kernel is not available (no C++ compiler "
                     "(install one, e.g. apt install g++, or set CXX)); the flow runs its PyTorch loop instead (the "
                     "same result, slower)",
                     "vaelab train: warning: the softplus sum's native kernel is not available (no C++ compiler "
                     "(install one, e.g. apt install g++, or set CXX)); its PyTorch form runs instead (the same "
                     "result to float32 rounding, slower)"], err
    assert "flows.py" not in err


def test_records_say_whether_the_flow_ran_natively(tmp_path, data_dir, monkeypatch):
    """The native loop and the PyTorch loop round differently: a planar run's checkpoint and evaluation record which
    ran (``native_kernels``); a run without a flow records only the softplus sum's kernel (every run uses it); the
    gradient gather, which a clipping run's autograd engine takes (the norm it hands clipping rounds differently from
    torch's), is recorded too."""
    import json

    from vaelab import checkpoint as ckpt
    from vaelab.cli import main
    from vaelab.provenance import provenance

    args = ["--epochs", "1", "--latent", "4", "--hidden", "16", "--train-examples", "200", "--test-examples", "20",
            "--data-dir", str(data_dir), "--threads", "1", "--no-progress"]
    ops = native.planar_ops()                  # resolved (and registered) once, as in any process
    softplus = native.FALLBACKS["softplus"] if native.softplus_kernel() is None else "native"
    monkeypatch.setattr(native, "_OPS", {"softplus": native.softplus_kernel()})
    assert provenance("cpu", 1)["native_kernels"] == {"softplus": softplus}
    assert main(["train", "--out", str(tmp_path / "plain"), *args]) == 0
    assert main(["evaluate", str(tmp_path / "plain"), "--k", "5", "--threads", "1", "--no-progress"]) == 0
    record = json.loads(next((tmp_path / "plain").glob("eval-*.json")).read_text())
    assert record["native_kernels"] == {"softplus": softplus}
    native._OPS["planar"] = ops
    expected = "PyTorch loop" if ops is None else "native"
    assert main(["train", "--out", str(tmp_path / "flow"), "--flow", "planar", "--flow-steps", "2", *args]) == 0
    assert main(["evaluate", str(tmp_path / "flow"), "--k", "5", "--threads", "1", "--no-progress"]) == 0
    record = json.loads(next((tmp_path / "flow").glob("eval-*.json")).read_text())
    assert record["native_kernels"] == {"planar": expected, "softplus": softplus}
    gather = native.FALLBACKS["gather"] if native.gather_kernel() is None else "native"
    assert main(["train", "--out", str(tmp_path / "clipped"), "--clip-grad-norm", "10", "--engine", "autograd",
                 *args]) == 0                          # clipping asks the autograd engine for the gradient's norm
    _, meta = ckpt.load_tensors(tmp_path / "clipped" / ckpt.STATE)
    assert meta["provenance"]["native_kernels"] == {"gather": gather, "planar": expected, "softplus": softplus}
    monkeypatch.setitem(native._OPS, "planar", None)
    monkeypatch.setitem(native._OPS, "softplus", None)
    monkeypatch.setitem(native._OPS, "gather", None)
    assert provenance("cpu", 1)["native_kernels"] == {"gather": "torch.cat", "planar": "PyTorch loop",
                                                       "softplus": "PyTorch"}


@needs_native
def test_a_kernel_resolved_anew_keeps_its_one_operator_registration(monkeypatch):
    """Resolving the kernels again (``_OPS`` reset, as some tests do) returns the operators registered the first
    time: defining ``vaelab::softplus_sum`` a second time would destroy the first definition's registrations under
    the functions that still hold it (a segmentation fault in a later compiled trace, seen once in the suite)."""
    from torch._library.custom_ops import OPDEF_TO_LIB

    softplus, planar = native.softplus_kernel(), native.planar_ops()
    libraries = {name: OPDEF_TO_LIB[name] for name in ("vaelab::softplus_sum", "vaelab::planar_forward")}
    monkeypatch.setattr(native, "_OPS", {})
    assert native.softplus_kernel() is softplus and native.planar_ops() is planar
    assert all(OPDEF_TO_LIB[name] is library for name, library in libraries.items())
    y = torch.randn(3, 784)
    torch.testing.assert_close(torch.ops.vaelab.softplus_sum(y, None, None, False), softplus(y, False))


@needs_native
@pytest.mark.parametrize("base2", [False, True])
def test_native_softplus_sum_is_within_float32_rounding_of_float64(base2):
    """``softplus.cpp`` against max(ℓ, 0) + log1p(e^{−|ℓ|}) summed in float64 on the same float32 inputs: every row
    within 6e-7 of its sum (all terms are positive; 49 terms summed per float32 lane for 784 pixels; the PyTorch form
    is held to 2e-6), at moderate, huge (±100: e^{ℓ} overflows float32), zero and evenly spread logits, and rows of
    800 (not a multiple of 16 lanes) and 5; tiny terms (ℓ = −80: e^{ℓ} ≈ 2e-35 each) are kept. It leaves its input as
    it was, takes (…, D) of any leading shape, and gives the same bits on 1 and 2 threads (each row is one
    thread's)."""
    kernel = native.softplus_kernel()
    g = torch.Generator().manual_seed(1)
    for width in (784, 800, 5):
        logits = (torch.randn(400, width, generator=g, dtype=torch.float64) * 8 - 2).float()
        logits[0], logits[1], logits[2], logits[3] = 100.0, -80.0, 0.0, torch.linspace(-120, 120, width)
        exact = logits.double()
        expected = (exact.clamp(min=0) + torch.log1p(torch.exp(-exact.abs()))).sum(-1)        # (400,)
        given = (logits * (1 / torch.log(torch.tensor(2.0))).item()) if base2 else logits
        copy = given.clone()
        value = kernel(given.view(20, 20, width), base2).reshape(-1).double()
        assert torch.equal(given, copy)
        if base2:       # the input was ℓ log₂e rounded to float32: compare with that ℓ
            exact = given.double() * torch.log(torch.tensor(2.0, dtype=torch.float64))
            expected = (exact.clamp(min=0) + torch.log1p(torch.exp(-exact.abs()))).sum(-1)
        assert ((value - expected).abs() <= 6e-7 * expected).all(), ((value - expected) / expected).abs().max()
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            two = kernel(given, base2)
            torch.set_num_threads(1)
            assert torch.equal(kernel(given, base2), two)
        finally:
            torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize("base2", [False, True])
def test_native_bernoulli_negative_log_likelihood_is_within_float32_rounding_of_float64(base2):
    """With data x (B, D) the kernel returns Σⱼ softplus(ℓⱼ) − xⱼℓⱼ for every row, row i against digit i mod B (rows
    are draws × digits): against float64 on the same float32 inputs (ℓ = y + b rounded to float32 as the kernel
    adds it), within 6e-7 of each row's value, every pixel's term being ≥ 0 for x ∈ [0, 1] (binary digits, one
    of fractional values, and huge, zero and evenly spread logits; rows of 784, 800 and 5). The same bits on 1 and
    2 threads; data of the wrong shape, or a number of digits that does not divide the rows, is refused."""
    kernel = native.softplus_kernel()
    g = torch.Generator().manual_seed(3)
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    for width in (784, 800, 5):
        digits = 6
        x = (torch.rand(digits, width, generator=g) < 0.3).float()
        x[1] = torch.rand(width, generator=g)                                # grey levels in [0, 1]
        logits = (torch.randn(50 * digits, width, generator=g, dtype=torch.float64) * 8 - 2).float()
        logits[0], logits[7], logits[14], logits[21] = 100.0, -80.0, 0.0, torch.linspace(-120, 120, width)
        bias = torch.randn(width, generator=g)
        given = (logits * (1 / ln2).item()).float() if base2 else logits
        sums = (given + bias).double() * (ln2 if base2 else 1.0)             # ℓ as the kernel sees it
        data = x.double().repeat(50, 1)                                       # row i: digit i mod B
        terms = sums.clamp(min=0) - data * sums + torch.log1p(torch.exp(-sums.abs()))
        assert (terms >= 0).all()
        expected = terms.sum(-1)                                              # (300,)
        value = kernel(given.view(50, digits, width), base2, bias, x).reshape(-1).double()
        assert ((value - expected).abs() <= 6e-7 * expected).all(), ((value - expected) / expected).abs().max()
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            two = kernel(given, base2, bias, x)
            torch.set_num_threads(1)
            assert torch.equal(kernel(given, base2, bias, x), two)
        finally:
            torch.set_num_threads(threads)
        for wrong in (x[:, :-1], torch.cat([x, x[:1]]), x[0], x[:0]):
            with pytest.raises(ValueError, match="data of shape"):
                kernel(given, base2, bias, wrong)


def test_softplus_sum_takes_the_native_kernel_for_float32_on_the_cpu_and_its_pytorch_form_otherwise(monkeypatch):
    """Without gradients a float32 CPU tensor goes to the kernel; float64, a tensor that needs its gradient, and a
    process without the library (``VAELAB_NATIVE=0`` or no compiler) take the PyTorch form, within float32 rounding
    of each other."""
    from vaelab.objectives import softplus_sum

    calls = []
    monkeypatch.setitem(native._OPS, "softplus",
                        lambda y, base2, bias: calls.append(y.shape) or torch.zeros(y.shape[:-1]))
    logits = torch.randn(3, 4, 784)
    with torch.no_grad():
        softplus_sum(logits)
        softplus_sum(logits.double())
    softplus_sum(logits.clone().requires_grad_())
    assert calls == [torch.Size([3, 4, 784])]
    monkeypatch.setitem(native._OPS, "softplus", None)
    with torch.no_grad():
        fallback = softplus_sum(logits.clone())
    bias = torch.randn(784)
    with torch.no_grad():
        fallback_bias = softplus_sum(logits.clone(), bias=bias)
    torch.testing.assert_close(fallback_bias, softplus_sum(logits + bias), rtol=2e-6, atol=0)
    monkeypatch.delitem(native._OPS, "softplus")
    if native.softplus_kernel() is not None:
        with torch.no_grad():
            torch.testing.assert_close(softplus_sum(logits), fallback, rtol=2e-6, atol=0)
            # the bias is added as the kernel reads each logit: the same float32 sums as adding it first
            assert torch.equal(softplus_sum(logits, bias=bias), softplus_sum(logits + bias))
            torch.testing.assert_close(softplus_sum(logits, bias=bias), fallback_bias, rtol=2e-6, atol=0)
        with pytest.raises(ValueError, match="bias of shape"):
            native.softplus_kernel()(logits, False, torch.zeros(3))
        # a NaN logit (a diverged decoder) gives NaN, as the PyTorch form does, never a finite likelihood; ±inf
        special = torch.zeros(4, 784)
        special[0, 5], special[1, 700], special[2, 3], special[3, 3] = float("nan"), float("nan"), float("inf"), -float("inf")
        with torch.no_grad():
            value, torch_form = softplus_sum(special), softplus_sum(special.double()).float()
        assert value[:2].isnan().all() and torch_form[:2].isnan().all()
        assert value[2] == float("inf") and torch.isclose(value[3], torch.tensor(783 * math.log(2)))
    # with gradients through the bias, autograd's softplus of logits + bias
    b = bias.clone().requires_grad_()
    softplus_sum(logits, bias=b).sum().backward()
    torch.testing.assert_close(b.grad, torch.sigmoid(logits + bias).sum((0, 1)), rtol=1e-5, atol=1e-5)


@needs_native
def test_a_compiled_graph_calls_the_native_softplus_sum_as_an_operator():
    """``evaluate --compiled`` takes the kernel too: traced, ``softplus_sum`` becomes the operator
    ``vaelab::softplus_sum`` (its registration as torch.library checks it), and the compiled function gives the
    eager kernel's sums bit for bit (the PyTorch form inside a graph would round differently); with gradients a
    compiled graph keeps autograd's softplus."""
    from vaelab import compiling
    from vaelab.objectives import softplus_sum

    generator = torch.Generator().manual_seed(7)
    logits, bias = 4 * torch.randn(50, 20, 784, generator=generator), torch.randn(784, generator=generator)
    assert native.softplus_kernel() is not None
    x = (torch.rand(20, 784, generator=generator) < 0.3).float()
    for data in (None, x):
        torch.library.opcheck(torch.ops.vaelab.softplus_sum.default, (logits[:2], bias, data, True),
                              test_utils=("test_schema", "test_faketensor"))
    kernel = native.softplus_kernel()
    with torch.no_grad():
        eager = softplus_sum(logits, base2=True, bias=bias)
        compiled = compiling.compile(lambda y, b: softplus_sum(y, base2=True, bias=b))(logits, bias)
        eager_nll = kernel(logits, True, bias, x)
        compiled_nll = compiling.compile(lambda y, b, x: kernel(y, True, b, x))(logits, bias, x)
    assert torch.equal(compiled, eager)
    assert torch.equal(compiled_nll, eager_nll)
    y = logits.clone().requires_grad_()
    total = compiling.compile(lambda y: softplus_sum(y).sum())(y)
    total.backward()
    torch.testing.assert_close(y.grad, torch.sigmoid(logits), rtol=1e-6, atol=1e-6)


@needs_native
def test_native_gather_writes_the_concatenation_and_its_squared_norm():
    """``gather_squares`` against ``torch.cat`` (the same bits: a copy) and ‖·‖² against float64 (1e-12 relative: the
    squares are exact in double, only their sum rounds), for parts of every kind of size: empty, shorter than a lane,
    spanning several blocks of 2¹⁴, a block's boundary falling inside a part and between parts; the same bits with 1
    and 2 threads. Sizes that do not add up to the buffer, and a part in float64, are ValueErrors."""
    gather = native.gather_kernel()
    assert gather is not None, "the library was not built"
    generator = torch.Generator().manual_seed(5)
    sizes = [0, 3, 16384 - 3, 1, 0, 40_000, 7, 16384, 100_003, 5]
    parts = [torch.randn(n, generator=generator) * 10.0 ** torch.randint(-4, 3, (1,), generator=generator).item()
             for n in sizes]
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            out = torch.full((sum(sizes),), math.nan)
            results.append((out, gather(parts, out)))
    finally:
        torch.set_num_threads(threads)
    (one, squares_one), (two, squares_two) = results
    expected = torch.cat(parts)
    assert torch.equal(one, expected) and torch.equal(two, expected) and squares_one == squares_two
    exact = expected.double().pow(2).sum().item()
    assert abs(squares_one - exact) <= 1e-12 * exact
    with pytest.raises(ValueError, match="parts of 3 numbers for a buffer of 4"):
        gather([torch.zeros(3)], torch.zeros(4))
    with pytest.raises(ValueError, match="contiguous float32 CPU tensors"):
        gather([torch.zeros(3, dtype=torch.float64)], torch.zeros(3))


@needs_native
def test_write_gradient_gives_the_norm_it_gathered_and_the_gradient_torch_cat_gives(monkeypatch):
    """The autograd engine with the native gather writes the same flat gradient as with ``torch.cat`` (bit for bit)
    and hands ‖g‖² to clipping, within 1e-12 of float64's; clipping with it rescales g by c/‖g‖ (to float32
    rounding of float64's). Without the kernel ``grad_squares`` stays NaN and clipping takes its own pass."""
    from vaelab.config import RunConfig
    from vaelab.engines import autograd_step
    from vaelab.models import ModelConfig, build_model
    from vaelab.training import FlatParameters, clip_norm_

    assert native.gather_kernel() is not None, "the library was not built"
    torch.manual_seed(0)
    model = build_model(RunConfig(model=ModelConfig(name="mlp2", hidden=((32,), (16,)), latent=(6, 3))).model)
    flat = FlatParameters(model)
    x = torch.rand(8, 784, generator=torch.Generator().manual_seed(1)).round()
    eps = torch.randn(1, 8, 9, generator=torch.Generator().manual_seed(2))
    squares = torch.full((1,), math.nan, dtype=torch.float64)
    autograd_step(model, x, eps, grad_squares=squares)
    gathered = flat.param.grad.clone()
    exact = gathered.double().pow(2).sum().item()
    assert abs(squares.item() - exact) <= 1e-12 * exact
    with monkeypatch.context() as patch:
        patch.setitem(native._OPS, "gather", None)
        fallback = torch.full((1,), math.nan, dtype=torch.float64)
        autograd_step(model, x, eps, grad_squares=fallback)
        assert torch.equal(flat.param.grad, gathered) and math.isnan(fallback.item())
    bound = 0.5 * math.sqrt(exact)                             # g · c/‖g‖ = g/2, in float64
    norm = clip_norm_(flat.param.grad, bound, squares)
    assert norm.item() == pytest.approx(math.sqrt(exact), rel=1e-7)
    torch.testing.assert_close(flat.param.grad.double(), gathered.double() / 2, rtol=1e-6, atol=0)


@needs_native
def test_hot_loop_settings_flush_denormals_on_every_thread_and_restore_them(monkeypatch):
    """FTZ/DAZ is a per-thread flag: inside ``hot_loop_settings`` a denormal times one is zero in every share of a
    parallel kernel (2 threads split a million numbers; before, the second thread's half stayed 1e-39), and after
    the block every share computes on denormals again."""
    from vaelab.evaluation import hot_loop_settings

    monkeypatch.setattr(native, "_QUIET", {})               # resolved afresh (a test before may have had no compiler)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.full((1 << 20,), 1e-39)                       # denormal in float32 (below 1.18e-38)
        assert int((x * 1.0).ne(0).sum()) == x.numel()
        with hot_loop_settings():
            assert int((x * 1.0).ne(0).sum()) == 0
            product = torch.mm(torch.full((256, 256), 1e-39), torch.ones(256, 256))    # MKL's threads too
            assert int(product.ne(0).sum()) == 0
        assert int((x * 1.0).ne(0).sum()) == x.numel()
    finally:
        torch.set_num_threads(threads)


# ---- the binarisation's draws (binarize.cpp) -----------------------------------------------------------------


@pytest.fixture
def binarize_kernel(monkeypatch):
    """The kernel resolved afresh (a test before may have resolved it without a compiler)."""
    monkeypatch.setattr(native, "_QUIET", {})
    kernel = native.binarize_kernel()
    assert kernel is not None
    return kernel


def _advanced(seed: int, draws: int) -> torch.Generator:
    generator = torch.Generator().manual_seed(seed)
    if draws:
        torch.randint(0, 255, (draws,), dtype=torch.uint8, generator=generator)
    return generator


@needs_native
@pytest.mark.parametrize("before", [0, 1, 623, 624, 625, 1000, 2 * 624 + 5])
def test_the_binarisation_kernel_draws_torchs_pixels_and_leaves_its_generator_where_torch_does(before,
                                                                                          binarize_kernel):
    """MT19937 as torch.randint(0, 255, uint8) runs it, bit for bit: from a fresh generator and from every kind of
    position in its 624 words (just before, at and after a twist), for sizes that end before, at and after one."""
    kernel = binarize_kernel
    for n in (0, 1, 5, 623, 624, 625, 1249, 100_003):
        grey = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        ours, theirs = _advanced(7, before), _advanced(7, before)
        expected = torch.randint(0, 255, (n,), dtype=torch.uint8, generator=theirs).lt(grey).to(torch.uint8)
        out = torch.empty_like(grey)
        assert kernel(grey, out, ours)
        assert torch.equal(out, expected), n
        assert torch.equal(ours.get_state(), theirs.get_state()), n
        assert torch.equal(torch.rand(9, generator=ours), torch.rand(9, generator=theirs))   # and later draws too


@needs_native
def test_the_binarisation_kernel_reads_rows_through_an_index_and_refuses_what_it_cannot_take(binarize_kernel):
    kernel = binarize_kernel
    grey = torch.randint(0, 256, (50, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    rows = torch.randperm(50, generator=torch.Generator().manual_seed(2))[:31]
    out = torch.empty(31, 784, dtype=torch.uint8)
    ours, theirs = _advanced(3, 100), _advanced(3, 100)
    assert kernel(grey, out, ours, rows)
    expected = torch.randint(0, 255, (31, 784), dtype=torch.uint8, generator=theirs).lt(grey[rows]).to(torch.uint8)
    assert torch.equal(out, expected) and torch.equal(ours.get_state(), theirs.get_state())
    untouched = ours.get_state()
    assert not kernel(grey.t(), torch.empty(784, 50, dtype=torch.uint8), ours)            # not contiguous
    assert not kernel(grey.float(), out.float(), ours, rows)                               # not grey levels
    assert not kernel(grey, torch.empty(30, 784, dtype=torch.uint8), ours, rows)           # a row too few
    assert torch.equal(ours.get_state(), untouched)
    with pytest.raises(ValueError, match="row indices .* … 50 for 50 rows"):
        kernel(grey, out, ours, torch.cat([rows[:-1], torch.tensor([50])]))


@pytest.mark.parametrize("parts", [1, 2])
def test_binarize_gives_the_same_pixels_with_and_without_the_native_kernel_and_with_an_index(parts, monkeypatch):
    from vaelab.data import binarize

    monkeypatch.setattr(native, "_QUIET", {})                                    # resolved afresh
    grey = torch.randint(0, 256, (301, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    order = torch.randperm(301, generator=torch.Generator().manual_seed(5))
    ours = binarize(grey, torch.Generator().manual_seed(6), parts, order)
    assert torch.equal(ours, binarize(grey[order], torch.Generator().manual_seed(6), parts))
    monkeypatch.setitem(native._QUIET, "binarize", None)                         # torch.randint draws
    assert torch.equal(ours, binarize(grey, torch.Generator().manual_seed(6), parts, order))
    assert torch.equal(ours, binarize(grey[order], torch.Generator().manual_seed(6), parts))
