"""The CUDA paths, where a GPU is (every test here is skipped without one; CI has none, so they run on a lent GPU
machine: `python benchmarks/gpu.py` runs them first). Every model's log weights and gradient on the GPU against the
CPU's on the same weights and draws (float64), the estimators' fast forms against their generic form on the GPU, the
hand-derived engine against autograd there, the evaluation's chunk, and the CLI: training that resumes bit for bit
and moves between the GPU and the CPU, evaluation (with the Laplace and gap estimates) against the CPU's, bf16, the
compiled engine, and sizes the GPU cannot hold."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch

from test_models import TINY, tiny
from test_training import assert_bitwise_equal, elbo_columns, weights
from vaelab.cli import main
from vaelab.engines import autograd_step, compiled_step, fused_step
from vaelab.evaluation import EvalConfig, _iwae_one_layer, _iwae_parts, iwae_estimator, iwae_log_likelihood
from vaelab.models import ModelConfig, build_model
from vaelab.objectives import log_mean_exp
from vaelab.runs import per_digit
from vaelab.training import FlatParameters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (these run on a GPU machine)")
GPU = torch.device("cuda")


def to_gpu(model):
    """The model's copy on the GPU, each with its own flat parameter and gradient buffers (as the trainer makes them)."""
    gpu = copy.deepcopy(model).to(GPU)
    return FlatParameters(model), FlatParameters(gpu), gpu


@pytest.mark.parametrize("name", list(TINY))
def test_every_model_gives_the_cpu_log_weights_and_gradient_on_the_gpu(name):
    """The same weights and ε on both devices, float64, three steps of ELBO (β = 0.7) and IWAE: objective sums,
    the gradient the engine writes, the log weights and the weights after the steps (batch normalisation's running
    averages move) agree to 1e-10. A part computed on the CPU only, or a device-dependent formula, fails here."""
    model, x, g = tiny(name)
    cpu_flat, gpu_flat, gpu = to_gpu(model)
    for objective, beta in (("elbo", 0.7), ("iwae", 1.0), ("elbo", 1.0)):
        eps = torch.randn(3, len(x), model.config.total_latent, generator=g, dtype=torch.float64)   # (K, B, d)
        expected = autograd_step(model, x, eps, objective, beta)
        sums = autograd_step(gpu, x.to(GPU), eps.to(GPU), objective, beta)
        assert sums.device.type == "cuda" and gpu_flat.param.grad.device.type == "cuda"
        torch.testing.assert_close(sums.cpu(), expected, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(gpu_flat.param.grad.cpu(), cpu_flat.param.grad, rtol=1e-10, atol=1e-12)
        assert cpu_flat.param.grad.abs().max() > 0
        with torch.no_grad():
            for flat in (cpu_flat, gpu_flat):
                flat.param.sub_(flat.param.grad.to(flat.param.device), alpha=0.1 / float(cpu_flat.param.grad.norm()))
    for (key, a), b in zip(model.state_dict().items(), gpu.state_dict().values()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-10, atol=1e-12, msg=key)
    model.eval(), gpu.eval()
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.to(GPU), eps.to(GPU)).log_weights().cpu(), model(x, eps).log_weights(),
                                   rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("name", ["mlp-mog", "mlp-vampprior-gated", "mlp-planar", "mlp-iaf", "mlp2",
                                  "hvae-ladder-batchnorm", "hvae-ladder-vampprior", "hvae-iaf-mog", "tomczak-2-vampprior"])
def test_the_estimators_fast_forms_are_their_generic_form_on_the_gpu(name):
    """On the GPU (its own random stream): the model's estimator (``_iwae_conditioned`` but for the VampPrior HVAE)
    against the model's Parts chunk by chunk on the same
    draws, float64, to 1e-10; and the GPU's IWAE-150 within Monte Carlo error of the CPU's (different draws:
    |difference| < 5 standard errors of the difference, per digit)."""
    model, x, _ = tiny(name)
    model.eval()
    gpu = copy.deepcopy(model).to(GPU)
    with torch.no_grad():
        xg = x.to(GPU)
        conditioned = iwae_estimator(gpu)(gpu, xg, 150, torch.Generator(GPU).manual_seed(9), chunk=40, nested=(1, 150))
        generic = _iwae_parts(gpu, xg, 150, torch.Generator(GPU).manual_seed(9), chunk=40, nested=(1, 150))
        torch.testing.assert_close(conditioned, generic, rtol=1e-10, atol=1e-10)
        # the spread of one digit's log weights gives the standard error of an IWAE-150 estimate (delta method)
        log_w = model(x, torch.randn(2000, len(x), model.config.total_latent, generator=torch.Generator().manual_seed(3),
                                     dtype=torch.float64)).log_weights()                    # (2000, B)
        w = torch.exp(log_w - log_w.max(0).values)
        stderr = (w.std(0) / w.mean(0)) / 150 ** 0.5
        cpu = iwae_estimator(model)(model, x, 150, torch.Generator().manual_seed(10), chunk=40, nested=(150,))
    assert torch.all((conditioned[-1].cpu() - cpu[-1]).abs() < 5 * 2 ** 0.5 * stderr + 1e-9)


def test_the_one_layer_fast_path_is_the_parts_iwae_on_the_gpu():
    """The reference model's fast IWAE (ε shared by the digits of a batch) against the generic log weights on the
    draws it made (drawn again from the same GPU generator), float64."""
    torch.manual_seed(5)
    model = build_model(ModelConfig(hidden=((16, 12),), latent=(4,), activation="tanh")).double().to(GPU)
    x = (torch.rand(6, 784, generator=torch.Generator().manual_seed(6)) < 0.3).double().to(GPU)
    with torch.no_grad():
        fast = _iwae_one_layer(model, x, 37, torch.Generator(GPU).manual_seed(7), chunk=10)
        eps = torch.randn((37, 4), generator=torch.Generator(GPU).manual_seed(7), dtype=torch.float64, device=GPU)
        log_w = model(x, eps[:, None, :].expand(37, 6, 4)).log_weights()
    torch.testing.assert_close(fast, log_mean_exp(log_w, 0), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_the_hand_derived_engine_is_autograd_on_the_gpu(dtype, tol):
    """``fused_step`` (the reference model's hand-derived backward) against autograd on the GPU; every gradient entry
    is written (NaN-filled before)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=((32,),), latent=(5,))).to(dtype).to(GPU)
    FlatParameters(model)
    g = torch.Generator(GPU).manual_seed(1)
    x = (torch.rand(17, 784, generator=g, device=GPU) < 0.3).to(dtype)
    eps = torch.randn(1, 17, 5, generator=g, dtype=dtype, device=GPU)
    expected = autograd_step(model, x, eps)
    grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad.fill_(float("nan"))
    torch.testing.assert_close(fused_step(model, x, eps), expected, rtol=tol, atol=tol * 100)
    for (name, p), reference in zip(model.named_parameters(), grads):
        assert (p.grad - reference).abs().max() <= tol * reference.abs().max(), name


def train(*args) -> int:
    return main(["train", "--device", "cuda", "--no-progress", "--test-examples", "200", *map(str, args)])


@pytest.mark.parametrize("model", [[], ["--activation", "tanh", "--flow", "planar", "--flow-steps", "4", "--objective", "iwae", "--k", "3"],
                                   ["--model", "tomczak", "--activation", "gated", "--hidden", "16", "16", "--prior",
                                    "vampprior", "--prior-components", "5", "--optimizer", "adam-normgrad"]],
                         ids=["reference-fused", "planar-iwae-autograd", "vampprior-adam-normgrad"])
def test_a_gpu_run_resumes_bit_for_bit(tmp_path, data_dir, model):
    """Two epochs straight against one, then ``--resume`` to two, on the GPU: the same weights bit for bit and the
    same metrics (the data, their binarisation stream and the draws live on the GPU)."""
    common = ["--data-dir", data_dir, "--hidden", "32", "--latent", "4", *model]
    assert train("--out", tmp_path / "straight", "--epochs", "2", *common) == 0
    assert train("--out", tmp_path / "resumed", "--epochs", "1", *common) == 0
    assert train("--out", tmp_path / "resumed", "--epochs", "2", "--resume", *common) == 0
    assert_bitwise_equal(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    assert elbo_columns(tmp_path / "straight") == elbo_columns(tmp_path / "resumed")
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["train"]["device"] == "cuda"


def evaluate(run, device, *extra) -> tuple[dict, dict[str, torch.Tensor]]:
    """The evaluation record and its per-digit columns (float64)."""
    out = run / f"eval-{device}.json"
    assert main(["evaluate", str(run), "--device", device, "--no-progress", "--out", str(out), "--overwrite",
                 *map(str, extra)]) == 0
    record = json.loads(out.read_text())
    columns = {name: torch.from_numpy(values) for name, values in per_digit(run, record).items()
               if name not in ("digit", "label")}
    return record, columns


def test_gpu_evaluation_agrees_with_the_cpu(tmp_path, data_dir):
    """A model trained on the GPU, evaluated on both devices (different random streams), digit by digit: the ELBO
    and IWAE-200 differences average to zero within 5 standard errors of the paired difference, the Laplace
    approximation (a mode and a Hessian: no draws) agrees within 0.05 nats on every digit, the gap decomposition is
    finite; the same GPU evaluation twice gives the same numbers."""
    run = tmp_path / "run"
    assert train("--out", run, "--epochs", "2", "--data-dir", data_dir, "--hidden", "64", "--latent", "8",
                 "--activation", "tanh") == 0                     # smooth: every Laplace mode converges
    extra = ["--k", "200", "--test-examples", "60", "--laplace", "--gaps", "--gap-steps", "30", "--data-dir", data_dir]
    (gpu, on_gpu), (_, on_cpu) = evaluate(run, "cuda", *extra), evaluate(run, "cpu", *extra)
    assert on_gpu.keys() == on_cpu.keys() and {"elbo", "iwae", "laplace"} <= on_gpu.keys()
    for name in ("elbo", "iwae", "is_laplace"):
        difference = on_gpu[name] - on_cpu[name]                                   # (60,)
        assert abs(difference.mean()) <= 5 * difference.std() / len(difference) ** 0.5 + 1e-5, name
    assert (on_gpu["laplace"] - on_cpu["laplace"]).abs().max() < 0.05
    again, _ = evaluate(run, "cuda", *extra)
    assert [e["mean"] for e in again["estimates"]] == [e["mean"] for e in gpu["estimates"]]
    assert all(torch.isfinite(column).all() for column in on_gpu.values())


def test_bf16_trains_on_the_gpu_near_float32(tmp_path, data_dir):
    """``--precision bf16`` is taken on a GPU with bf16 (not refused), changes the arithmetic (other weights than
    float32 on the same draws) and ends within 1 nat of float32's test ELBO after two epochs."""
    common = ["--data-dir", data_dir, "--epochs", "2", "--hidden", "64", "--latent", "8"]
    assert train("--out", tmp_path / "fp32", *common) == 0
    assert train("--out", tmp_path / "bf16", "--precision", "bf16", *common) == 0
    a, b = weights(tmp_path / "fp32"), weights(tmp_path / "bf16")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    last = [float(elbo_columns(tmp_path / r)[-1][elbo_columns(tmp_path / r)[0].index("test_elbo")]) for r in ("fp32", "bf16")]
    assert abs(last[0] - last[1]) < 1.0, last


def test_the_compiled_step_and_iwae_on_the_gpu():
    """``--engine compiled`` and ``evaluate --compiled`` through TorchInductor's GPU backend (Triton): the VampPrior
    HVAE's step equals autograd's in float64 to 1e-10, and its compiled IWAE the eager one in float32 (log weights
    ≈ −550 nats: 1e-3), without TorchInductor's advice to allow TF32 (vaelab keeps float32 products float32)."""
    warnings.simplefilter("always")                                 # (pytest restores the filters afterwards)
    eager, x, g = tiny("tomczak-2-vampprior")
    eager = eager.to(GPU)
    compiled = copy.deepcopy(eager)
    flats = FlatParameters(eager), FlatParameters(compiled)
    x = x.to(GPU)
    for beta in (0.3, 1.0):
        eps = torch.randn(1, len(x), eager.config.total_latent, generator=g, dtype=torch.float64).to(GPU)
        expected = autograd_step(eager, x, eps, "elbo", beta)
        torch.testing.assert_close(compiled_step(compiled, x, eps, "elbo", beta), expected, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(flats[1].param.grad, flats[0].param.grad, rtol=1e-10, atol=1e-12)
    model, x, _ = tiny("tomczak-2-vampprior")
    model, x = model.float().eval().to(GPU), torch.cat([x, x.flip(1)])[:8].float().to(GPU)
    config = EvalConfig(k=30, sample_chunk=10, examples_per_batch=2)
    from torch._inductor import compile_fx

    advise = getattr(compile_fx, "_warn_tf32_disabled", None)       # it advises once per process (a cached function)
    if advise is not None:
        advise.cache_clear()                                          # so that this compilation would advise again
    with warnings.catch_warnings(record=True) as seen:
        compiled_iwae = iwae_log_likelihood(model, x, dataclasses.replace(config, compiled=True))
    torch.testing.assert_close(compiled_iwae, iwae_log_likelihood(model, x, config), rtol=0, atol=1e-3)
    assert not [w for w in seen if "TensorFloat32" in str(w.message)]    # the advice vaelab does not follow


def test_the_gpu_decodes_all_k_draws_at_once_and_the_fast_path_keeps_its_numbers():
    """On a GPU the evaluation decodes a batch's K = 5000 draws in one chunk (20 digits × 5000 = 100 000 rows), not 50
    at a time as on a CPU; the reference model's fast path draws ε for the whole batch, so the chunk only reorders
    its sums: the same estimates as chunks of 50 to float32 rounding (log weights ≈ −550 nats)."""
    from vaelab.evaluation import CPU

    torch.manual_seed(0)
    model = build_model(ModelConfig()).to(GPU).eval()                            # 784-256-50, random weights
    x = (torch.rand(40, 784, generator=torch.Generator().manual_seed(1)) < 0.3).float().to(GPU)
    config = EvalConfig(k=5000)
    assert config.chunk(GPU, model.config) == 5000 and config.chunk(CPU, model.config) == 50
    whole = iwae_log_likelihood(model, x, config)
    torch.testing.assert_close(whole, iwae_log_likelihood(model, x, dataclasses.replace(config, sample_chunk=50)),
                               rtol=0, atol=1e-3)


def test_sizes_the_gpu_cannot_hold_are_refused_in_one_line_before_allocating(tmp_path, data_dir, capsys):
    """`evaluate --device cuda --k 2e9`: the K draws of a batch alone would need hundreds of GB; refused with exit 2,
    one line naming the GPU's free memory (not the host's), no record written."""
    run = tmp_path / "run"
    assert train("--out", run, "--epochs", "1", "--data-dir", data_dir, "--hidden", "16", "--latent", "4") == 0
    capsys.readouterr()
    code = main(["evaluate", str(run), "--device", "cuda", "--k", "2000000000", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"free on {torch.cuda.get_device_name()}" in err and "use a smaller --k" in err
    assert not list(run.glob("eval-*"))


def test_a_run_moves_between_the_gpu_and_the_cpu(tmp_path, data_dir, capsys):
    """A run trained on the GPU goes on with `--resume --device cpu`, and one trained on the CPU with `--device cuda`:
    each says once that its noise stream goes on from a seed made of the other device's generator state."""
    common = ["--data-dir", data_dir, "--hidden", "16", "--latent", "4"]
    assert train("--out", tmp_path / "gpu", "--epochs", "1", *common) == 0
    assert main(["train", "--out", str(tmp_path / "cpu"), "--epochs", "1", "--device", "cpu", "--no-progress",
                 "--test-examples", "200", *map(str, common)]) == 0
    capsys.readouterr()
    for name, there, here in (("gpu", "cuda", "cpu"), ("cpu", "cpu", "cuda")):
        assert main(["train", "--out", str(tmp_path / name), "--resume", "--epochs", "2", "--device", here,
                     "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert out.count(f"note: this run drew its noise on {there}; on {here} the stream goes on") == 1, out
        assert len(elbo_columns(tmp_path / name)) == 3                        # a header and two epochs
