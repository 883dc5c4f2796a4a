"""The benchmark's own pieces (benchmarks/run.py): the reference pipeline it times is the exercise's, its
plain IWAE estimates what vaelab's does, measuring the step floor (float32 or bf16) leaves the trainer
untouched, and the speed issue's targets are judged in the right direction."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_compiler
from vaelab.config import RunConfig, TrainConfig
from vaelab.data import DataConfig, prepare
from vaelab.evaluation import EvalConfig, iwae_log_likelihood
from vaelab.models import ModelConfig
from vaelab.presets import apply_preset
from vaelab.training import Trainer

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vaelab_benchmark_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def step(tiny_arrays, monkeypatch):
    """benchmarks/step.py as a module, reading the synthetic digits instead of MNIST."""
    monkeypatch.syspath_prepend(str(RUN_PY.parent))                  # step.py imports run.py from beside it
    spec = importlib.util.spec_from_file_location("vaelab_benchmark_step", RUN_PY.parent / "step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "load_mnist", lambda log: tiny_arrays)
    return module


@pytest.fixture(scope="module")
def trainer(tiny_arrays, tmp_path_factory):
    config = RunConfig(model=ModelConfig(hidden=((32,),), latent=(5,)), data=DataConfig(test_examples=100),
                       train=TrainConfig(epochs=30))
    trainer = Trainer(config, tmp_path_factory.mktemp("bench-run"), prepare(tiny_arrays, config.data),
                      torch.device("cpu"), log=lambda m: None, progress=False)
    trainer.fit()
    return trainer


def test_reference_dataset_is_pil_to_tensor(bench, tiny_arrays):
    """torchvision's MNIST + ToTensor: (1, 28, 28) float32 grey levels / 255."""
    dataset = bench.ReferenceMNIST(tiny_arrays.train_images)
    assert len(dataset) == len(tiny_arrays.train_images)
    for index in (0, 7, len(dataset) - 1):
        image, _ = dataset[index]
        assert image.shape == (1, 28, 28) and image.dtype == torch.float32
        expected = torch.from_numpy(tiny_arrays.train_images[index].astype(np.float32) / 255).view(1, 28, 28)
        torch.testing.assert_close(image, expected, rtol=0, atol=1e-7)


def test_plain_iwae_estimates_what_vaelab_does(bench, trainer):
    """Two estimators of IWAE_K with independent draws: their means over 20 digits agree within the Monte
    Carlo spread. Measured on this model (30 epochs on the synthetic set, K = 2000, four seeds): the means
    differ by 0.08–0.30 nats, two runs of vaelab's by 0.005–0.12. The tolerance, 1 nat, is well below what
    a wrong density gives (σ taken as exp(log σ²) in the plain IWAE moves its mean by several nats)."""
    model = trainer.model
    digits = trainer.data.test_binary[:20]
    plain = bench.reference_iwae(model, digits, 2000, torch.Generator().manual_seed(0), chunk=500)
    ours = iwae_log_likelihood(model, digits, EvalConfig(k=2000, seed=1))
    assert plain.shape == ours.shape == (20,)
    assert abs(float(plain.double().mean() - ours.double().mean())) < 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_floor_leaves_the_trainer_as_it_was(bench, trainer, dtype):
    before_params = trainer.optimizer.param.clone()
    before_state = {name: t.clone() for name, t in trainer.optimizer.state_dict().items()}
    parts = bench.step_floor(trainer, dtype)
    assert set(parts) == {"products", "adam", "binarize"}
    assert all(seconds > 0 for seconds in parts.values())
    assert torch.equal(trainer.optimizer.param, before_params)
    for name, tensor in trainer.optimizer.state_dict().items():
        assert torch.equal(tensor, before_state[name]), name


def test_targets_compare_in_the_right_direction(bench):
    """Speed-ups must reach their bound from above, seconds from below; exactly on the bound is met."""
    result = {"training": {"speedup_fused_vs_reference": 5.0, "bf16": {"speedup_vs_reference": 7.9}},
              "evaluation": {"bf16": {"seconds_per_10000": 80.0}}}
    assert {name: row["met"] for name, row in bench.targets(result).items()} == {
        "training_fp32_speedup": True, "training_bf16_speedup": False, "evaluation_bf16_seconds_per_10000": True}
    result["evaluation"]["bf16"]["seconds_per_10000"] = 80.5
    assert not bench.targets(result)["evaluation_bf16_seconds_per_10000"]["met"]
    assert bench.targets(result)["training_bf16_speedup"]["measured"] == 7.9


def test_bf16_evaluation_of_a_prefix_uses_the_full_runs_draws(trainer):
    """The benchmark compares bf16 IWAE on the first digits with the float32 values of the whole set: the
    generator is seeded once and consumed batch by batch, so a prefix of whole batches sees the same draws."""
    digits = trainer.data.test_binary[:60]
    whole = iwae_log_likelihood(trainer.model, digits, EvalConfig(k=50))
    prefix = iwae_log_likelihood(trainer.model, digits[:20], EvalConfig(k=50))
    assert torch.equal(prefix, whole[:20])


def test_presets_table_reports_steps_per_second_and_the_schedule(bench, monkeypatch):
    """Burda's presets: batches of 20, so 3000 steps per epoch of 60 000 digits; 3280 epochs of 2 s are 1.82 h."""
    calls = []
    monkeypatch.setattr(bench, "epochs_in_child", lambda *flags, epochs=1, timed=1: calls.append((flags, epochs))
                        or (400.0, [2.0, 1.0, 3.0][:timed]))
    rows = {row["preset"]: row for row in bench.presets_table(60000)}
    iwae = rows["burda-iwae-2"]
    assert iwae["steps_per_second"] == pytest.approx(3000 / 2.0)
    assert iwae["schedule_epochs"] == 3280 and iwae["schedule_hours"] == pytest.approx(3280 * 2.0 / 3600)
    assert rows["seed"]["steps_per_second"] == pytest.approx(938 / 2.0)        # ⌈60 000 / 64⌉ steps
    assert rows["seed"]["schedule_epochs"] == 100 and rows["seed"]["engine"] == "auto"
    assert calls[0] == (("--preset", "seed", "--validation", "0", "--early-stopping", "0"), 1)
    calls.clear()                                 # the compiled engine: its second epoch is timed (the first compiles)
    (row,) = bench.presets_table(60000, names=["ladder-5"], engine="compiled")
    assert row["engine"] == "compiled"
    assert calls == [(("--preset", "ladder-5", "--validation", "0", "--early-stopping", "0", "--engine", "compiled"),
                      2)]
    calls.clear()                                 # the preset's own engine (compiled) unless one is asked for
    rows = bench.presets_table(60000, names=["ladder-5"]) + bench.presets_table(60000, names=["ladder-5"],
                                                                                 engine="autograd")
    assert [row["engine"] for row in rows] == ["compiled", "autograd"]
    own = ("--preset", "ladder-5", "--validation", "0", "--early-stopping", "0")
    assert calls == [(own, 2), ((*own, "--engine", "autograd"), 1)]
    calls.clear()                                 # three epochs timed after an untimed one: their median and fastest
    (row,) = bench.presets_table(60000, names=["planar-80"], timed=3)
    assert calls == [(("--preset", "planar-80", "--validation", "0", "--early-stopping", "0"), 4)]
    assert row["seconds_per_epoch"] == 2.0 and row["fastest_epoch_seconds"] == 1.0 and row["epochs_timed"] == [2, 1, 3]


def test_epochs_and_floors_timed_in_turn_in_one_process(bench, tiny_arrays):
    """An untimed epoch, then per round an epoch of the preset's trainer and its floor: the ratios are theirs, the
    engine the one asked for (else the preset's: ``auto`` resolves to the fused engine for ``seed``)."""
    row = bench.interleaved_epochs_and_floors("seed", tiny_arrays, rounds=2)
    assert row["interleaved_engine"] == "fused" and len(row["interleaved_epochs"]) == 2
    assert all(e > 0 for e in row["interleaved_epochs"]) and all(f > 0 for f in row["interleaved_floors"])
    assert row["interleaved_ratios"] == [e / f for e, f in zip(row["interleaved_epochs"], row["interleaved_floors"])]
    assert row["interleaved_ratio_median"] == pytest.approx(sum(row["interleaved_ratios"]) / 2)
    assert bench.interleaved_epochs_and_floors("seed", tiny_arrays, "autograd", rounds=1)["interleaved_engine"] == \
        "autograd"
    assert row["interleaved_steps"] == -(-len(tiny_arrays.train_images) // 64)    # all the digits, batches of 64


def test_epochs_timed_in_turn_can_be_short(bench, tiny_arrays):
    """``epoch_steps``: each round's epoch has that many steps (its first steps × B digits), and its floor replays
    as many."""
    row = bench.interleaved_epochs_and_floors("seed", tiny_arrays, rounds=3, epoch_steps=2)
    assert row["interleaved_steps"] == 2 and len(row["interleaved_ratios"]) == 3
    assert all(r > 0 for r in row["interleaved_ratios"])


def test_the_benchmarks_trainers_leave_no_run_behind(bench, step, tiny_arrays, monkeypatch, tmp_path):
    """The trainers of run.py and step.py write into temporary folders that go with them: while a trainer lives its
    run is there, and once it is collected nothing is left (before, every test run left three runs of tens of MB
    each in /tmp, and every benchmark its own)."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    trainer = bench.vaelab_trainer(tiny_arrays)
    trainer.fit()
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("vaelab-bench-") and (folder / "model.safetensors").exists()
    del trainer
    gc.collect()
    assert not folder.exists()
    bench.interleaved_epochs_and_floors("seed", tiny_arrays, rounds=1, epoch_steps=2)
    trainer, one = step.preset_step("seed", "auto")
    gc.collect()
    assert [f.name.split("-")[1] for f in tmp_path.iterdir()] == ["step"]
    del trainer, one
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_step_script_times_epochs_bare_steps_and_floors_in_turn(step, tiny_arrays):
    """benchmarks/step.py --in-turn: per round a whole epoch of the preset's trainer, its steps bare on each of the
    epoch's whole batches, binarised once (scaled to all its steps), and its floor; the medians are of the rounds'
    ratios."""
    result = step.epochs_steps_and_floors("seed", "auto", rounds=2)
    assert result["steps"] == -(-len(tiny_arrays.train_images) // 64) and len(result["rounds"]) == 2
    assert all(r[key] > 0 for r in result["rounds"] for key in ("epoch", "bare_steps", "floor"))
    for key, (top, bottom) in {"epoch_over_bare": ("epoch", "bare_steps"), "bare_over_floor": ("bare_steps", "floor"),
                               "epoch_over_floor": ("epoch", "floor")}.items():
        ratios = [r[top] / r[bottom] for r in result["rounds"]]
        assert result[f"{key}_median"] == pytest.approx(sum(ratios) / 2)
    assert "steps per epoch; medians: epoch ÷ bare steps" in step.in_turn_report(result)


def test_step_script_sets_the_steps_products_beside_their_replay(step):
    """benchmarks/step.py --products: the autograd step's products and the floor's replay of them (recorded from an
    autograd step) are the same products, so under the profiler they fall into the same shapes of matrix operands
    (the seed model's four forward products' among them), each with both times; each time, by shape and in all, is
    the median of the profiled rounds."""
    result = step.products_in_step("seed", "autograd", steps=3)
    assert result["steps"] == 3 and len(result["step_ms"]) == len(result["replay_ms"]) == 2
    assert all(t > 0 for t in result["step_ms"] + result["replay_ms"])
    assert set(result["in_step"]) == set(result["replayed"])
    forward = {((64, 784), (784, 256)), ((64, 256), (256, 100)), ((64, 50), (50, 256)), ((64, 256), (256, 784))}
    assert forward <= set(result["in_step"]), sorted(result["in_step"])
    assert all(result["in_step"][shape] > 0 and result["replayed"][shape] > 0 for shape in result["in_step"])
    rounds = result["rounds"]
    assert len(rounds) == step.PROFILED_ROUNDS == 3
    for side, total in (("in_step", "in_step_ms"), ("replayed", "replayed_ms")):
        assert result[total] == sorted(sum(r[side].values()) for r in rounds)[1]            # the median of 3 totals
        for shape, value in result[side].items():
            assert value == sorted(r[side].get(shape, 0.0) for r in rounds)[1]
    report = step.products_report(result)
    assert "under the profiler, products" in report and "64×784 · 784×256: in the step" in report


def test_the_recorded_floor_holds_every_product_of_a_step_and_replays_them(bench):
    """The product recorder sees the forward and backward products of an autograd step (3 per linear layer but
    the first's input gradient: 3·4 − 1 = 11 for the reference model), at their shapes, and replays them."""
    from vaelab.engines import autograd_step
    from vaelab.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig())
    from vaelab.training import FlatParameters

    FlatParameters(model)
    x = (torch.rand(64, 784) < 0.3).float()
    eps = torch.randn(1, 64, 50)
    recorder = bench.ProductRecorder()
    with recorder:
        autograd_step(model, x, eps)
    assert len(recorder.calls) == 11
    shapes = sorted(tuple(a[0]) for _, args, _ in recorder.calls for a in args if isinstance(a, tuple))
    assert (64, 784) in shapes and (784, 256) in shapes
    assert 0 < bench.replay_seconds(recorder.calls, 3) < float("inf")


def test_a_floor_is_the_fastest_of_its_rounds(bench):
    """``replay_seconds`` times the replays in rounds and keeps the fastest (a floor is the least the products can
    take); the warm-up call before the clock is not counted. A product that took 0.2, 0.02 and 0.1 s in its three
    rounds gives 0.02 s."""
    import time

    durations = iter([0.3, 0.2, 0.02, 0.1])                  # warm-up, then the three rounds

    def product():
        time.sleep(next(durations))

    assert 0.02 <= bench.replay_seconds([(product, [], {})], 1, rounds=3) < 0.09


def test_rounds_are_timed_one_by_one_for_the_median_of_a_measurement(bench):
    """``round_seconds`` gives each round's seconds (a preset's measured IWAE-5000 is their median, its floor their
    minimum): work that took 0.2, 0.02 and 0.1 s gives those three, median 0.1 s."""
    import statistics
    import time

    durations = iter([0.2, 0.02, 0.1])
    times = bench.round_seconds(lambda: time.sleep(next(durations)))
    assert len(times) == 3 and times[0] >= 0.2 and 0.02 <= times[1] < 0.09 and 0.1 <= statistics.median(times) < 0.19


def test_trained_weights_are_timed_on_a_copy_of_the_run(bench, data_dir, tmp_path, capsys):
    """``--trained NAME=RUN``: refused unless RUN is a run directory of preset NAME's model (one line, exit 2); the
    epoch is one more epoch of a copy, with the original left as it was."""
    import argparse
    import subprocess
    import sys

    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "vaelab", "train", "--preset", "seed", "--epochs", "1", "--data-dir",
                    str(data_dir), "--out", str(run), "--no-progress", "--threads", "1"], check=True, capture_output=True)
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    parser = argparse.ArgumentParser()
    assert bench.trained_runs(parser, [f"seed={run}"]) == {"seed": run}
    for pair, message in [(f"cpu-hour={run}", "is not preset cpu-hour's"), (f"nope={run}", "give NAME=RUN"),
                          (f"seed={tmp_path}", "is not a run directory")]:
        with pytest.raises(SystemExit) as stopped:
            bench.trained_runs(parser, [pair])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    _, seconds = bench.train_in_child(trained=run)
    assert seconds > 0
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before


@needs_compiler
def test_evaluations_in_turn_time_both_ways_on_the_runs_weights(bench, data_dir, tmp_path, capsys):
    """``--evaluations-in-turn RUN[:best]``: refused unless RUN has those weights (one line, exit 2); each round times
    the eager and the compiled IWAE of the same digits, whose estimates agree to float32 rounding."""
    import argparse

    from vaelab.cli import main

    run = tmp_path / "run"
    assert main(["train", "--hidden", "8", "--latent", "2", "--prior", "mog", "--prior-components", "2", "--epochs",
                 "1", "--train-examples", "100", "--test-examples", "40", "--data-dir", str(data_dir), "--out",
                 str(run), "--threads", "1", "--no-progress"]) == 0
    parser = argparse.ArgumentParser()
    assert bench.run_weights(parser, [str(run)]) == [(run, "model.safetensors")]
    for spec in (f"{run}:best", str(tmp_path)):                    # trained without --validation: no best weights
        with pytest.raises(SystemExit) as stopped:
            bench.run_weights(parser, [spec])
        assert stopped.value.code == 2 and "is not a run directory with" in capsys.readouterr().err
    (row,) = bench.evaluations_in_turn([(run, "model.safetensors")], digits=20, rounds=2)
    assert row["first_compiled_seconds_20_digits"] > 0 and len(row["rounds"]) == 2
    assert row["graphs_compiled"] == 1                              # one graph for every batch of 20 digits
    for entry in row["rounds"]:
        assert entry["eager_seconds"] > 0 and entry["compiled_seconds"] > 0
        assert entry["compiled_over_eager"] == pytest.approx(entry["compiled_seconds"] / entry["eager_seconds"])
        assert 0 <= entry["largest_difference_nats"] < 1e-3


GPU_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.mark.slow                      # five processes of vaelab and a profiled epoch, 25–60 s on 2 cores
def test_the_gpu_check_runs_through_and_records_what_it_measured(tmp_path):
    """benchmarks/gpu.py, the script a lent GPU machine runs in its few minutes, on the CPU with tiny sizes: every
    command exits 0, the epochs' seconds, steps per epoch and the projected schedule come from the runs' own files,
    and targets over all the digits are not judged on a few. Its profile trains on 3200 digits: a synthetic set of
    3300 (on the suite's 2000 it trained on 2000 while its config, and so the steps recorded, said 3200)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import make_arrays
    from vaelab.data import save_cache

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    save_cache(make_arrays(3300, 500), data_dir)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(GPU_PY.parents[1] / "src")}
    done = subprocess.run([sys.executable, str(GPU_PY), "--out", str(out), "--runs", str(tmp_path / "runs"),
                           "--data-dir", str(data_dir), "--device", "cpu", "--train-examples", "640",
                           "--eval-examples", "20", "--skip-tests", "--skip-engines", "--presets", "cpu-hour",
                           "--evaluate", "cpu-hour", "--profile", "--budget", "300"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "gpu.json").read_text())
    steps = {step["name"]: step for step in record["steps"]}
    assert [step["status"] for step in record["steps"]] == [0] * 5, record["steps"]
    seed = steps["train seed, default engine fp32"]
    assert len(seed["epoch_seconds"]) == 3 and seed["steps_per_epoch"] == 10                  # 640 digits, batch 64
    hour = steps["train cpu-hour, one epoch"]
    assert hour["steps_per_epoch"] == 5 and hour["schedule_epochs"] == 520                     # batch 128
    assert hour["projected_schedule_hours"] == round(520 * hour["epoch_seconds"][0] / 3600, 2)
    evaluation = steps["evaluate cpu-hour (one epoch) --k 5000, all test digits"]
    assert evaluation["n_examples"] == 20 and evaluation["k"] == 5000 and evaluation["record_seconds"] > 0
    assert record["targets"] == {}            # judged on 20 test digits and 640 training digits: neither target
    assert (out / "commands.log").read_text().count("$ ") == 5
    assert record["profile"]["seed"]["steps"] == 50 and record["profile"]["burda-iwae-2"]["steps"] == 160   # 3200
    assert "aten::mm" in (out / "profile.txt").read_text()


@pytest.mark.parametrize("args, says", [(["--presets", "nonesuch"], "unknown preset nonesuch; choose among seed,"),
                                        (["--presets", "ladder-5", "--evaluate", "cpu-hour"],
                                         "--evaluate cpu-hour: only presets this run trains can be evaluated (ladder-5)")])
def test_the_gpu_check_refuses_a_preset_it_cannot_train_or_evaluate_before_running_anything(tmp_path, args, says):
    """An unknown preset, or an evaluation of a preset the check does not train, is refused at once (exit 2), not
    found after minutes of a lent GPU's time; nothing is written."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(GPU_PY.parents[1] / "src")}
    done = subprocess.run([sys.executable, str(GPU_PY), "--out", str(tmp_path / "out"), "--device", "cpu", *args],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_the_gpu_check_skips_what_its_budget_cannot_hold(tmp_path):
    """A step that would start with less than 10 s of the budget left is recorded as skipped, not started."""
    spec = importlib.util.spec_from_file_location("vaelab_benchmark_gpu", GPU_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    check = module.Check(tmp_path, budget=5)
    step = check.run("never", ["false"], limit=60)
    assert step["status"].startswith("skipped") and "seconds" not in step
    assert (tmp_path / "gpu.json").exists() and "never" in (tmp_path / "gpu.json").read_text()


@pytest.fixture
def one_hour(monkeypatch):
    """benchmarks/one_hour.py as a module (it imports run.py from beside it)."""
    monkeypatch.syspath_prepend(str(RUN_PY.parent))
    spec = importlib.util.spec_from_file_location("vaelab_benchmark_one_hour", RUN_PY.parent / "one_hour.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_hour_trains_every_candidate_on_the_engine_asked_for(one_hour):
    """Each candidate's flags, with --engine or without, make the config `vaelab train` would train."""
    from vaelab.cli import _train_config, build_parser

    parser = build_parser()
    for name in one_hour.CANDIDATES:
        for engine in (None, "autograd", "compiled"):
            args = parser.parse_args(["train", *one_hour.candidate_flags(name, engine), *one_hour.COMMON,
                                      "--epochs", "3", "--out", "unused"])
            config = _train_config(args, RunConfig())
            own = apply_preset(RunConfig(), args.preset).train.engine
            assert config.train.engine == (engine or own) and config.train.epochs == 3
            assert config.data.validation == 10_000


def test_one_hour_goes_on_only_with_the_engine_and_budget_it_started_with(one_hour, tmp_path, capsys):
    """A rerun into the same --out with another engine or budget is refused in one line, exit 2, before any work."""
    (tmp_path / "settings.json").write_text('{"budget_minutes": 15.0, "engine": null}')
    for flags, named in ((["--engine", "compiled"], "with no --engine, not --engine compiled"),
                         (["--budget-minutes", "10"], "with --budget-minutes 15, not --budget-minutes 10")):
        with pytest.raises(SystemExit) as stopped:
            one_hour.main(["--out", str(tmp_path), *flags])
        assert stopped.value.code == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert named in message and "choose a new --out" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["settings.json"]


def _started(run: Path, preset: str, engine: str, epochs: int) -> None:
    """A run directory as `vaelab train` leaves it at its start: config.json (here alone)."""
    config = apply_preset(RunConfig(), preset)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, engine=engine, epochs=epochs))
    run.mkdir(parents=True)
    (run / "config.json").write_text(config.to_json())


@pytest.fixture
def older_out(tmp_path):
    """An --out of one_hour.py from before settings.json: h0 (cpu-hour) and h4 (vampprior-2) timed and trained on
    engine auto (as every candidate then), 15 minutes each (h0 450 epochs at 2 s, h4 100 at 9 s)."""
    for name, preset, seconds in (("h0", "cpu-hour", 2.0), ("h4", "vampprior-2", 9.0)):
        _started(tmp_path / "timing" / name, preset, "auto", 2)
        _started(tmp_path / name, preset, "auto", int(15 * 60 / seconds))
    (tmp_path / "timings.json").write_text('{"h0": 2.0, "h4": 9.0}')
    return tmp_path


@pytest.mark.parametrize("flags, named", [
    ([], "h4 trained on engine auto, and no --engine trains h4 on compiled: rerun with --engine auto to go on"),
    (["--engine", "compiled"], "h0 trained on engine auto, and --engine compiled trains h0 on compiled: rerun with "
                               "--engine auto to go on"),
    (["--engine", "auto", "--budget-minutes", "10"], "h0 was started with 450 epochs, and --budget-minutes 10 gives h0 "
                                                     "300 at its 2.00 s an epoch: rerun with the --budget-minutes it"),
])
def test_one_hour_reads_what_an_older_out_was_started_with_from_its_runs(one_hour, older_out, capsys, monkeypatch,
                                                                         flags, named):
    """Without settings.json, a rerun with another engine or budget than the runs there is refused all the same."""
    def no_work(*args):
        raise AssertionError("the refused rerun started work")

    monkeypatch.setattr(one_hour, "seconds_per_epoch", no_work)
    monkeypatch.setattr(one_hour, "train_and_validate", no_work)
    with pytest.raises(SystemExit) as stopped:
        one_hour.main(["--out", str(older_out), *flags])
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and named in message[0] and message[0].endswith("or choose a new --out")
    assert not (older_out / "settings.json").exists()


def test_one_hour_goes_on_in_an_older_out_with_its_settings_and_records_them(one_hour, older_out, monkeypatch):
    """The settings the runs were started with are accepted, and settings.json is written before any work."""
    trained = []

    def train_and_validate(name, flags, epochs, out, threads):
        assert json.loads((out / "settings.json").read_text()) == {"budget_minutes": 15.0, "engine": "auto"}
        trained.append((name, flags[-2:], epochs))
        return {"name": name, "error": "not trained in this test"}

    monkeypatch.setattr(one_hour, "train_and_validate", train_and_validate)
    monkeypatch.setattr(one_hour, "save_result", lambda result, stem: None)
    one_hour.main(["--out", str(older_out), "--engine", "auto", "--only", "h0", "h4"])
    assert trained == [("h0", ["--engine", "auto"], 450), ("h4", ["--engine", "auto"], 100)]


def test_one_hour_finds_the_validation_record_evaluate_writes_eager_or_compiled(one_hour, tmp_path):
    """The script reads the record under the name `vaelab evaluate RUN --split validation --k 1000` gives it, with
    the log weights computed eagerly or compiled (evaluate's default for a run trained with --engine compiled)."""
    from vaelab.cli import build_parser, evaluation_name

    assert one_hour.validation_record(tmp_path) is None
    for compiled in (True, False):
        args = build_parser().parse_args(["evaluate", str(tmp_path), "--split", "validation", "--k", "1000"])
        args.compiled = compiled
        record = tmp_path / evaluation_name(args, 10_000)
        record.write_text("{}")
        assert one_hour.validation_record(tmp_path) == record
        record.unlink()


def test_one_hour_prints_the_winner_first_and_the_comparison_on_validation_digits(one_hour, older_out, monkeypatch,
                                                                                    capsys):
    """The table is sorted by validation NLL, and the printed `vaelab compare` puts the winner first (its paired
    differences are against the first run) on the validation split."""
    nll = {"h0": 85.2, "h4": 83.1}

    def train_and_validate(name, flags, epochs, out, threads):
        return {"name": name, "epochs": epochs, "validation_nll": nll[name], "validation_nll_stderr": 0.2,
                "validation_elbo_last_epoch": -nll[name] - 3, "active_units": [40, 20]}

    monkeypatch.setattr(one_hour, "train_and_validate", train_and_validate)
    monkeypatch.setattr(one_hour, "save_result", lambda result, stem: None)
    one_hour.main(["--out", str(older_out), "--engine", "auto", "--only", "h0", "h4"])
    out = capsys.readouterr().out
    assert out.index("*  h4") < out.index("   h0") and "best: h4;" in out
    assert f"vaelab compare --split validation {older_out / 'h4'} {older_out / 'h0'}" in out
