"""The compiled engine (``--engine compiled``: the autograd engine's loss and its gradient in one graph compiled by
torch.compile) against the autograd engine on the same weights and draws: the same gradient, sums and
batch-normalisation averages to float64 rounding, one graph for every β of a warm-up, no autograd once compiled, an
exact resume; ``evaluate --compiled`` against the eager IWAE; and
their one-line refusals."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import warnings
from unittest import mock

import pytest
import torch
import torch._dynamo.utils

from conftest import needs_compiler
from test_models import tiny
from vaelab.cli import main
from vaelab.engines import autograd_step, compiled_step
from vaelab.models import ModelConfig, build_model
from vaelab.training import FlatParameters


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# each compilation takes 10–60 s on 2 cores: the VampPrior HVAE in the default run, the others among the slow tests
pytestmark = needs_compiler


@pytest.mark.parametrize("name, objective, samples", [
    ("tomczak-2-vampprior", "elbo", 1),
    pytest.param("hvae-ladder-batchnorm", "iwae", 3, marks=pytest.mark.slow),
    pytest.param("mlp-planar", "elbo", 2, marks=pytest.mark.slow)])
def test_the_compiled_step_is_the_autograd_step(name, objective, samples):
    """A VampPrior HVAE (mixture prior through the encoder, gated layers), a ladder with batch normalisation (its
    running averages move inside the graph) on IWAE, a planar flow (its hand-derived autograd Function): float64,
    two β of a warm-up and β = 1 through one graph, the same gradient and sums as autograd's to 1e-10. Once compiled,
    the graph gives the gradient itself: the steps after the first run without autograd."""
    eager, x, g = tiny(name)
    compiled = copy.deepcopy(eager)
    flats = FlatParameters(eager), FlatParameters(compiled)
    before = graphs_compiled()
    for step, beta in enumerate((0.3, 0.7, 1.0)):
        eps = torch.randn(samples, len(x), eager.config.total_latent, generator=g, dtype=torch.float64)
        expected = autograd_step(eager, x, eps, objective, beta)
        with (mock.patch("torch.autograd.grad", side_effect=AssertionError("autograd ran in a compiled step"))
              if step else contextlib.nullcontext()):
            sums = compiled_step(compiled, x, eps, objective, beta)
        assert graphs_compiled() == before + 1, "one graph for every β (and it was compiled, not run eagerly)"
        torch.testing.assert_close(sums, expected, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(flats[1].param.grad, flats[0].param.grad, rtol=1e-10, atol=1e-12)
        assert flats[0].param.grad.abs().max() > 0
        for (key, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=key)   # weights and running averages
        with torch.no_grad():                        # a step down the gradient, of length 0.1: the next step differs
            for flat in flats:
                flat.param.sub_(flat.param.grad, alpha=0.1 / float(flats[0].param.grad.norm()))


@pytest.mark.parametrize("name, objective, samples", [
    ("tomczak-2-vampprior", "elbo", 1),
    pytest.param("hvae-ladder-batchnorm", "iwae", 3, marks=pytest.mark.slow),
    pytest.param("mlp-planar", "elbo", 2, marks=pytest.mark.slow)])
def test_the_compiled_bf16_step_rounds_like_the_autograd_bf16_step(name, objective, samples):
    """``--engine compiled --precision bf16``: autocast inside the graph. Its gradient is off the float32 gradient by
    bf16's rounding (2⁻⁸ relative per product: above 1e-4 of its norm, so the products did run in bf16; compiled in
    float32 it differs from autograd's by float32's rounding, about 1e-7) and by no more than the autograd engine's
    bf16 step is (about 1 % here), through one graph (compiled, not run eagerly). Inductor rounds fewer intermediate
    results to bf16 than eager autocast does (a product's bias and what follows it fuse in float32), so the two bf16
    steps are not the same bits."""
    from vaelab.engines import ENGINES

    base, x, g = tiny(name)
    base, x = base.float(), x.float()
    models = {key: copy.deepcopy(base) for key in (("autograd", "fp32"), ("autograd", "bf16"), ("compiled", "bf16"))}
    flats = {key: FlatParameters(model) for key, model in models.items()}
    eps = torch.randn(samples, len(x), base.config.total_latent, generator=g)      # float32
    before = graphs_compiled()
    sums = {key: ENGINES[key](model, x, eps, objective, 0.7) for key, model in models.items()}
    assert graphs_compiled() == before + 1
    exact = flats[("autograd", "fp32")].param.grad
    off = {key: float((flats[key].param.grad - exact).norm() / exact.norm()) for key in models}
    assert 1e-4 < off[("compiled", "bf16")] <= max(2 * off[("autograd", "bf16")], 0.02), off
    assert 1e-4 < off[("autograd", "bf16")] < 0.05, off
    torch.testing.assert_close(sums[("compiled", "bf16")], sums[("autograd", "fp32")], rtol=1e-2, atol=0.5)


@pytest.mark.slow
def test_a_compiled_bf16_run_trains_and_resumes_exactly(tmp_path, data_dir, capsys, monkeypatch):
    """The CLI's ``--engine compiled --precision bf16`` (bf16 taken as native here, whatever this CPU does: the
    timing that decides is replaced; torch computes bf16 products on every CPU) trains, says so, and resumes to the
    same weights as one run of two epochs."""
    from vaelab import resources

    monkeypatch.setattr(resources, "bf16_product_ratio", lambda device: 0.5)
    args = ["--hidden", "8", "--latent", "2", "--activation", "gated", "--prior", "vampprior", "--prior-components",
            "3", "--warmup", "3", "--engine", "compiled", "--precision", "bf16", "--train-examples", "200",
            "--test-examples", "50", "--batch-size", "50", "--data-dir", str(data_dir), "--threads", "1",
            "--no-progress"]
    *_, outputs = straight_and_resumed(tmp_path, data_dir, capsys, args)
    assert all("engine compiled bf16" in out for out in outputs)


def straight_and_resumed(tmp_path, data_dir, capsys, args: list[str]):
    """A run of two epochs, and one of one epoch resumed to two (1 thread): the same weights bit for bit (same
    machine and threads). → (the two run directories, the graphs compiled after the first run, the stdout of
    the first run and of the resume)."""
    from vaelab.checkpoint import load_tensors

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", "--out", str(straight), "--epochs", "2", *args]) == 0
    first, graphs = capsys.readouterr().out, graphs_compiled()
    assert main(["train", "--out", str(resumed), "--epochs", "1", *args]) == 0
    assert main(["train", "--out", str(resumed), "--resume", "--epochs", "2", "--data-dir", str(data_dir),
                 "--threads", "1", "--no-progress"]) == 0
    a, _ = load_tensors(straight / "model.safetensors")
    b, _ = load_tensors(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    return straight, resumed, graphs, (first, capsys.readouterr().out)


def test_a_compiled_run_resumes_exactly_and_may_resume_with_another_engine(tmp_path, data_dir, capsys):
    args = ["--hidden", "8", "--latent", "2", "--activation", "tanh", "--prior", "vampprior", "--prior-components", "3",
            "--warmup", "3",
            "--train-examples", "200", "--test-examples", "50", "--batch-size", "50", "--data-dir", str(data_dir),
            "--threads", "1", "--no-progress"]
    straight, resumed, graphs, outputs = straight_and_resumed(tmp_path, data_dir, capsys, ["--engine", "compiled",
                                                                                          *args])
    assert "torch.compile builds the step's kernels" in outputs[0]
    assert all("engine compiled fp32" in out for out in outputs)
    assert graphs_compiled() == graphs              # new models of a compiled architecture (a run, a resume): no graph
    # a run trained compiled is evaluated compiled unless --no-compiled: the same estimate on the same draws (float32
    # rounding), in a record of its own name
    assert main(["evaluate", str(straight), "--k", "20", "--no-compiled", "--threads", "1", "--no-progress"]) == 0
    assert "log weights compiled" not in capsys.readouterr().out
    assert main(["evaluate", str(straight), "--k", "20", "--threads", "1", "--no-progress"]) == 0
    assert "log weights compiled, as this run trained (--engine compiled)" in capsys.readouterr().out
    (eager_path,) = straight.glob("eval-k20-n*-seed0.json")
    eager = json.loads(eager_path.read_text())
    compiled = json.loads(eager_path.with_name(eager_path.name.replace(".json", "-compiled.json")).read_text())
    assert (eager["compiled"], compiled["compiled"]) == (False, True)
    assert compiled["nll"] == pytest.approx(eager["nll"], abs=1e-4) and compiled["elbo"] == eager["elbo"]
    # the engine is how the step is computed, not what: a resume may change it
    assert main(["train", "--out", str(resumed), "--resume", "--epochs", "3", "--engine", "autograd",
                 "--data-dir", str(data_dir), "--threads", "1", "--no-progress"]) == 0
    assert '"engine": "autograd"' in (resumed / "config.json").read_text()
    assert "engine autograd fp32" in capsys.readouterr().out
    assert main(["evaluate", str(resumed), "--k", "20", "--threads", "1", "--no-progress"]) == 0   # now eager
    assert "log weights compiled" not in capsys.readouterr().out
    assert json.loads(next(resumed.glob("eval-k20-n*-seed0.json")).read_text())["compiled"] is False


def test_evaluate_compiles_as_the_run_trained_where_the_general_estimator_runs():
    """The default of ``evaluate --compiled``: only a run of ``--engine compiled``, only where the model's estimator
    is the general one (the hand-derived one-layer form is never compiled), only in float32, only on a CPU, and not
    where a part evaluates natively already (the planar flow: compiling its log weights gained nothing)."""
    from vaelab.evaluation import compiled_as_trained

    ladder, _, _ = tiny("hvae-ladder-vampprior")
    iaf, _, _ = tiny("hvae-iaf-mog")
    planar, _, _ = tiny("mlp-planar")
    fast = build_model(ModelConfig(name="mlp", hidden=((8,),), latent=(2,)))
    assert compiled_as_trained(ladder, "compiled", "fp32") and compiled_as_trained(iaf, "compiled", "fp32")
    assert not compiled_as_trained(ladder, "autograd", "fp32") and not compiled_as_trained(ladder, "auto", "fp32")
    assert not compiled_as_trained(ladder, "compiled", "bf16-emulated")
    assert not compiled_as_trained(fast, "compiled", "fp32") and fast.fast
    assert not compiled_as_trained(planar, "compiled", "fp32")
    # on a GPU compiling takes longer than the whole evaluation: eager unless --compiled
    assert compiled_as_trained(ladder, "compiled", "fp32", torch.device("cpu"))
    assert not compiled_as_trained(ladder, "compiled", "fp32", torch.device("cuda"))
    assert not compiled_as_trained(iaf, "compiled", "fp32", "cuda:0")


def test_evaluate_on_a_gpu_says_its_log_weights_are_eager_though_the_run_trained_compiled(capsys):
    """`evaluate`'s choice for a run of ``--engine compiled`` on a GPU (the device faked: no GPU is needed to choose):
    eager, with one line naming ``--compiled``; on the CPU compiled, as trained; ``--compiled`` on a GPU as asked."""
    import argparse

    from vaelab.cli import _evaluate_compiled
    from vaelab.config import RunConfig

    ladder, _, _ = tiny("hvae-ladder-vampprior")
    config = RunConfig(train=dataclasses.replace(RunConfig().train, engine="compiled"))
    default = argparse.Namespace(compiled=None, precision="fp32")
    assert _evaluate_compiled(default, config, ladder, torch.device("cuda"), True) is False
    out = capsys.readouterr().out
    assert out.count("log weights eager on a GPU, though this run trained with --engine compiled") == 1, out
    assert "--compiled compiles them" in out
    assert _evaluate_compiled(default, config, ladder, torch.device("cuda"), False) is False   # not the main rank
    assert capsys.readouterr().out == ""
    with mock.patch("vaelab.compiling.compiler_found", return_value=True):
        assert _evaluate_compiled(default, config, ladder, torch.device("cpu"), True) is True
    assert "log weights compiled, as this run trained" in capsys.readouterr().out
    config = RunConfig()                                              # a run not trained compiled: no line at all
    assert _evaluate_compiled(default, config, ladder, torch.device("cuda"), True) is False
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", ["tomczak-2-vampprior", pytest.param("hvae-ladder-batchnorm", marks=pytest.mark.slow),
                                  pytest.param("mlp-planar", marks=pytest.mark.slow)])
def test_the_compiled_iwae_is_the_eager_one(name):
    """evaluate --compiled: the model's own Parts (the VampPrior HVAE) or its ``conditioned`` estimator (the ladder,
    batch normalisation folded; the planar flow, its û, c and M computed once per batch and its recursion a native
    operator) as one compiled graph: the same IWAE on the same draws to float32 rounding (log
    weights ≈ −550 nats, a float32 step there 6e-5; a graph that kept one batch's digits for the next would be off
    by nats), four batches of different digits through one graph."""
    from vaelab.evaluation import EvalConfig, iwae_log_likelihood

    model, x, _ = tiny(name)
    model, x = model.float().eval(), x.float()
    for layer in model.modules():                                   # batch normalisation's averages away from 0, 1
        if hasattr(layer, "running_var"):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    x = torch.cat([x, x.flip(1)])[:8]
    config = EvalConfig(k=30, sample_chunk=10, examples_per_batch=2)
    eager = iwae_log_likelihood(model, x, config)
    before = graphs_compiled()
    compiled = iwae_log_likelihood(model, x, dataclasses.replace(config, compiled=True))
    assert graphs_compiled() == before + 1                          # four batches, one graph
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-3)


def test_the_compiled_engine_refuses_bf16_emulated_and_a_cpu_without_a_compiler(tmp_path, data_dir, capsys):
    from torch._inductor import config as inductor

    base = ["train", "--engine", "compiled", "--hidden", "8", "--latent", "2", "--epochs", "1",
            "--train-examples", "100", "--test-examples", "20", "--data-dir", str(data_dir), "--no-progress"]
    assert main([*base, "--precision", "bf16-emulated", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--engine compiled runs in float32 or bf16" in err
    assert "--engine autograd" in err
    run = tmp_path / "run"                                              # trained by the fused engine
    assert main([*base[:1], *base[3:], "--out", str(run)]) == 0
    moved = tmp_path / "moved"                                          # a model of the general estimator
    assert main([*base[:1], *base[3:], "--prior", "mog", "--prior-components", "2", "--out", str(moved)]) == 0
    config = moved / "config.json"
    config.write_text(config.read_text().replace('"engine": "auto"', '"engine": "compiled"'))
    assert '"engine": "compiled"' in config.read_text()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--k", "5", "--compiled", "--precision", "bf16-emulated", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--compiled runs in float32" in err
    # the config's own patch: monkeypatch's undo of an attribute of inductor's config deletes it (cpp.cxx "does not
    # exist" for every later compilation in the process)
    with inductor.patch({"cpp.cxx": (None, "no-such-compiler-c++")}):
        assert main([*base, "--out", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "needs a C++ compiler" in err and "no-such-compiler-c++" in err
        assert "--engine autograd" in err
        # a preset that trains compiled: the line says that the preset asked for it, and how to train without
        assert main(["train", "--preset", "planar-80", *base[3:], "--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "the preset planar-80's --engine compiled needs a C++ compiler" in err
        assert "pass --engine autograd" in err
        assert main(["evaluate", str(run), "--k", "5", "--compiled", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--compiled needs a C++ compiler" in err
        assert not list(run.glob("eval*"))
        # a run trained compiled on another machine (its config says so), evaluated here without a compiler: eagerly,
        # with a note that says why
        assert main(["evaluate", str(moved), "--k", "5", "--no-progress"]) == 0
        captured = capsys.readouterr()
        assert "note: this run trained with --engine compiled, but no C++ compiler was found" in captured.err
        assert "log weights compiled" not in captured.out
        (record,) = moved.glob("eval*.json")
        assert record.name.endswith("seed0.json") and json.loads(record.read_text())["compiled"] is False
    assert inductor.cpp.cxx != (None, "no-such-compiler-c++")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_compiled_calls_drop_only_inductors_tf32_advice():
    """On a GPU with TensorFloat-32 units TorchInductor advises allowing TF32 at every compilation (seen as a
    `vaelab train: warning:` line on an H200); vaelab keeps float32 products float32, so inside the compiled calls'
    context that advice is dropped, and any other warning still shows."""
    from vaelab import compiling

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with compiling.limits():
            warnings.warn(f"{compiling.TF32_ADVICE}. Consider setting `torch.set_float32_matmul_precision('high')` "
                          f"for better performance.", UserWarning)
            warnings.warn("another warning", UserWarning)
        warnings.warn(f"{compiling.TF32_ADVICE}.", UserWarning)            # outside the compiled calls: shown
    assert [str(w.message) for w in seen] == ["another warning", f"{compiling.TF32_ADVICE}."]
