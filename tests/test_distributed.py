"""Data-parallel training with two local processes (gloo on CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import needs_compiler
from vaelab import checkpoint as ckpt

# every test here starts processes (torchrun's agent and ranks): they take a temporary folder of pytest's
pytestmark = pytest.mark.usefixtures("children_temp")

ARGS = ["--hidden", "64", "--latent", "8", "--batch-size", "32", "--test-examples", "50", "--no-progress"]


def one_batch():
    """The model, its flat buffers, a batch of 64 digits and their draws, the same in every process."""
    from vaelab.models import ModelConfig, build_model
    from vaelab.training import FlatParameters

    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=((32,),), latent=(5,)))
    flat = FlatParameters(model)
    g = torch.Generator().manual_seed(1)
    return model, flat, (torch.rand(64, 784, generator=g) < 0.3).float(), torch.randn(1, 64, 5, generator=g)


def _rank_step(rank: int, world_size: int, store: str, out: str, engines: tuple[str, ...]) -> None:
    """One step of each of ``engines`` on rank ``rank`` of 2 on its half of a batch of 64 (the draws of its rows),
    via the trainer's ``parallel_step``; writes the flat gradient each ends with."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from vaelab.distributed import World
    from vaelab.engines import ENGINES
    from vaelab.training import parallel_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    model, flat, batch, eps = one_batch()
    for engine in engines:
        parallel_step(ENGINES[(engine, "fp32")], model, batch, eps[:, 32 * rank:32 * (rank + 1)], "elbo", 1.0,
                      flat.param.grad, World(rank, world_size, rank, world_size))
        save_file({"grad": flat.param.grad.clone()}, f"{out}-{engine}-{rank}.safetensors")
    dist.destroy_process_group()


@pytest.mark.parametrize("engines", [
    pytest.param(("fused", "autograd"), id="fused-autograd"),
    # each rank compiles its graph (20-40 s on one core)
    pytest.param(("compiled",), id="compiled", marks=[pytest.mark.slow, needs_compiler])])
def test_one_step_of_2_ranks_of_32_equals_one_step_of_1_of_64(tmp_path, engines):
    from safetensors.torch import load_file

    from vaelab.engines import ENGINES

    mp.start_processes(_rank_step, args=(2, str(tmp_path / "store"), str(tmp_path / "grad"), engines), nprocs=2,
                       join=True, start_method="spawn")
    model, flat, batch, eps = one_batch()
    for engine in engines:
        ENGINES[(engine, "fp32")](model, batch, eps)
        for rank in range(2):
            grad = load_file(str(tmp_path / f"grad-{engine}-{rank}.safetensors"))["grad"]
            # float32, another summation order (two half-batch sums, then their sum)
            torch.testing.assert_close(grad, flat.param.grad, rtol=1e-5, atol=1e-7)


def _rank_saddle(rank: int, world_size: int, store: str, out: str) -> None:
    """Rank ``rank`` of 2 evaluates its half of 40 digits with --laplace; on rank 1 the second batch's digit 3 (digit
    20 + 10 + 3 = 33 of all) has a Hessian that is not negative definite. Writes the summary's refusal and estimates."""
    import json

    import torch.distributed as dist

    from vaelab import evaluation
    from vaelab.distributed import World
    from vaelab.evaluation import EvalConfig, evaluate_run
    from vaelab.laplace import NotNegativeDefinite
    from vaelab.models import ModelConfig, build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    real, calls = evaluation._laplace_batch, []

    def second_fails_on_rank_1(*args):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise NotNegativeDefinite("not negative definite", 3, [-0.5, 0.25, 1.0])
        return real(*args)

    evaluation._laplace_batch = second_fails_on_rank_1
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=((16,),), latent=(2,))).eval()
    images = (torch.rand(40, 784, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    summary, per_digit = evaluate_run(model, images, EvalConfig(k=10, laplace=True, examples_per_batch=10),
                                      world=World(rank, world_size, rank, world_size))
    Path(f"{out}-{rank}.json").write_text(json.dumps([summary.get("laplace_refused"),
                                                      [e["name"] for e in summary["estimates"]],
                                                      len(per_digit["iwae"])]))
    dist.destroy_process_group()


def test_a_saddle_on_one_rank_refuses_laplace_on_every_rank_and_keeps_the_estimates(tmp_path):
    """Under torchrun one rank's saddle used to end that rank with its shard's digit number (5 where it was the
    whole set's 30) while the other waited in a gather. Now every rank learns the first such digit by its number
    among all digits, leaves Laplace out, and gathers the other estimates (rank 0 writes them)."""
    import json

    mp.start_processes(_rank_saddle, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True,
                       start_method="spawn")
    outcomes = [json.loads((tmp_path / f"out-{rank}.json").read_text()) for rank in range(2)]
    assert outcomes[0] == outcomes[1]
    refused, names, digits = outcomes[0]
    assert refused.startswith("--laplace: at digit 33 (from 0, of those evaluated) the Hessian") and "[-0.5, 0.25, 1.0]" in refused
    assert names == ["ELBO, one draw per digit", "IWAE-10, q(z|x)"] and digits == 40


def _rank_load(rank: int, world_size: int, store: str, runs: list[str], out: str) -> None:
    """Rank ``rank`` loads the weights of ``runs[0]`` as the others do, then those of ``runs[rank]``: as if a training
    replaced the file between the ranks' reads, every time. Writes what each load gave."""
    import json

    import torch.distributed as dist

    from vaelab.records import load_the_same_weights
    from vaelab.distributed import World
    from vaelab.errors import CheckpointError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    world = World(rank, world_size, rank, world_size)
    outcome = [load_the_same_weights(Path(runs[0]), "cpu", ckpt.WEIGHTS, world)[2].sha256]
    try:
        load_the_same_weights(Path(runs[rank]), "cpu", ckpt.WEIGHTS, world)
        outcome.append("loaded")
    except CheckpointError as exc:
        outcome.append(str(exc))
    Path(f"{out}-{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def test_the_ranks_of_an_evaluation_estimate_with_the_same_weights(tmp_path, data_dir):
    """Each rank of `torchrun … vaelab evaluate` reads the weights file itself; where a training of the run
    replaced it between their reads, the ranks compare digests and read again, and after three reads that differ
    every rank stops with one message (before, each would have estimated its shard with other weights)."""
    import json

    from vaelab.cli import main

    runs = [tmp_path / "a", tmp_path / "b"]
    for seed, run in enumerate(runs):
        assert main(["train", "--out", str(run), "--epochs", "1", "--seed", str(seed), "--data-dir", str(data_dir),
                     "--train-examples", "200", *ARGS]) == 0
    mp.start_processes(_rank_load, args=(2, str(tmp_path / "store"), [str(r) for r in runs], str(tmp_path / "out")),
                       nprocs=2, join=True, start_method="spawn")
    outcomes = [json.loads((tmp_path / f"out-{rank}.json").read_text()) for rank in range(2)]
    assert outcomes[0][0] == outcomes[1][0]
    for run, (_, message) in zip(runs, outcomes):                  # each rank names the file it read
        assert message == (f"{run / ckpt.WEIGHTS} changed while the 2 processes read it, 3 times (a training of "
                           f"this run writes it); evaluate again when it pauses, or evaluate a copy")


def torchrun(*args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "vaelab", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_all(process: subprocess.Popen) -> None:
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_tensors(run_dir / ckpt.WEIGHTS)[0]


@pytest.mark.slow      # 15 s on 2 cores of a Zen 4 (2026-12-07)
def test_two_process_run_resumes_exactly_after_a_kill(tmp_path, data_dir):
    """With every step's gradient clipped (a bound of 1e-3): the ranks clip alike, rank 0 alone counts."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ["--data-dir", data_dir, *ARGS, "--clip-grad-norm", "1e-3"]
    process = torchrun("train", "--out", straight, "--epochs", "4", *common)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "× 2 processes" in out and out.count("epoch   4/4") == 1          # rank 0 alone reports

    process = torchrun("train", "--out", killed, "--epochs", "4", *common)
    metrics = killed / ckpt.METRICS
    deadline = time.monotonic() + 300
    while not metrics.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    kill_all(process)                                                          # torchrun and both ranks
    process.communicate(timeout=60)
    assert len(metrics.read_text().splitlines()) - 1 < 4

    single = subprocess.run([sys.executable, "-m", "vaelab", "train", "--out", str(killed), "--resume",
                             "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=300)
    assert single.returncode == 2 and "written by 2 process(es)" in single.stderr
    # a lost weights file is written again by a resume of as many processes (it said `vaelab train … --resume`)
    assert ckpt.rewrite_fix(killed).startswith(f"`torchrun --nproc-per-node 2 -m vaelab train --out {killed} --resume`")
    assert ckpt.rewrite_fix(straight).startswith("`torchrun --nproc-per-node 2 -m vaelab train")
    from vaelab.runs import read_run

    assert read_run(killed).resume_command == f"torchrun --nproc-per-node 2 -m vaelab train --out {killed} --resume"

    process = torchrun("train", "--out", killed, "--resume", "--epochs", "4", "--data-dir", data_dir)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    expected = weights(straight)
    for name, tensor in weights(killed).items():
        assert torch.equal(tensor, expected[name]), name
    rows = [line.split(",")[:12] for line in metrics.read_text().splitlines()]
    assert rows == [line.split(",")[:12] for line in (straight / ckpt.METRICS).read_text().splitlines()]
    assert rows[0][10] == "clipped_steps"
    steps = -(-2000 // 32)                                     # the synthetic set's 2000 digits, batches of 32
    assert [int(row[10]) for row in rows[1:]] == [steps] * 4


def _rank_cli(rank: int, world_size: int, store: str, argv: list[str], cwd: str, out: str) -> None:
    """Rank ``rank`` of 2 runs ``vaelab *argv`` in ``cwd`` with torchrun's environment and a process group of its
    own making (a file store): nothing stops one rank when the other ends, as torchrun's agent does. Writes its exit
    status and stderr."""
    import contextlib
    import io
    import json

    import torch.distributed as dist

    from vaelab.cli import main

    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    os.chdir(cwd)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    Path(f"{out}-{rank}.json").write_text(json.dumps([code, err.getvalue()]))
    if dist.is_initialized():
        dist.destroy_process_group()


def every_rank(tmp_path: Path, *argv, cwd: Path) -> list[tuple[int, str]]:
    """Each of 2 ranks' exit status and stderr for ``vaelab *argv`` (``_rank_cli``)."""
    import json

    mp.start_processes(_rank_cli, args=(2, str(tmp_path / "store"), [str(a) for a in argv], str(cwd),
                                        str(tmp_path / "ranks")), nprocs=2, join=True, start_method="spawn")
    return [tuple(json.loads((tmp_path / f"ranks-{rank}.json").read_text())) for rank in range(2)]


# Refusals under torchrun: torchrun's agent stops the other ranks as soon as one ends with an error, so whether rank 1
# has said its line by then is a race (CI saw rank 1 stopped before it spoke, 2026-12-07). What the user sees under
# torchrun is tested with torchrun (at least one line, nothing written); that every rank refuses by itself, and none
# waits for another, with ranks started by ``every_rank``.

@pytest.mark.slow      # 7 s on 2 cores of a Zen 4 (2026-12-07)
def test_torchrun_into_a_run_that_exists_is_refused_on_every_rank(tmp_path, data_dir):
    """--out of a run already there: rank 0 checks it before the data are read and every rank ends with its line
    (a check on each rank would let a late one find rank 0's new run; one that only rank 0 raised would leave the
    others waiting in a collective)."""
    run_dir = tmp_path / "run"
    first = torchrun("train", "--out", run_dir, "--epochs", "1", "--data-dir", data_dir, *ARGS)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    said = f"vaelab train: error: {run_dir} already holds a run; add --resume to continue it, or choose another --out"
    again = torchrun("train", "--out", run_dir, "--epochs", "1", "--data-dir", data_dir, *ARGS)
    _, err = again.communicate(timeout=300)
    assert again.returncode != 0 and said in err, err
    assert every_rank(tmp_path, "train", "--out", run_dir, "--epochs", "1", "--data-dir", data_dir, *ARGS,
                      cwd=tmp_path) == [(2, said + "\n")] * 2
    assert {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()} == before


@pytest.mark.slow      # 9 s on 2 cores of a Zen 4 (2026-12-07)
@pytest.mark.parametrize("command", [["sample", "RUN"], ["sweep", "SPEC.toml", "--out", "SWEEP"]])
def test_a_command_of_one_process_is_refused_under_torchrun_on_every_rank(command, tmp_path):
    """Until 2026-12-06 each of torchrun's processes did the whole of it: `sample` wrote its picture twice (the second
    over the first), `sweep` ran as two sweeps. Refused before it reads its arguments; nothing written."""
    said = f"`vaelab {command[0]}` works in one process, and torchrun started 2: run it without torchrun"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    process = torchrun(*command, cwd=cwd)
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0 and said in err, err
    for code, err in every_rank(tmp_path, *command, cwd=cwd):
        assert code == 2 and err.count("\n") == 1 and said in err, err
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("command", ["train"])
def test_torchrun_needs_an_out_directory(command, data_dir):
    process = torchrun(command, "--epochs", "1", "--data-dir", data_dir)
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0 and "under torchrun give --out" in err


@pytest.mark.slow      # 7 s on 2 cores of a Zen 4 (2026-12-07)
def test_evaluation_shards_the_digits_and_gathers_them(tmp_path, data_dir):
    """Two processes each estimate half of 80 digits; rank 0's half uses the draws a single process would
    use for those digits (the batches of 20 line up), so those values are equal; the record holds all 80."""
    import json

    run = tmp_path / "run"
    single = subprocess.run([sys.executable, "-m", "vaelab", "train", "--out", str(run), "--epochs", "1",
                             "--data-dir", str(data_dir), *ARGS], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    args = ["evaluate", run, "--k", "50", "--test-examples", "80", "--data-dir", data_dir, "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "vaelab", *map(str, args), "--out", str(tmp_path / "one.json")],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    process = torchrun(*args, "--out", tmp_path / "two.json")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert out.count("NLL =") == 1
    rows = {name: [line.split(",") for line in (tmp_path / f"{name}.digits.csv").read_text().splitlines()[1:]]
            for name in ("one", "two")}
    assert len(rows["two"]) == 80 and [r[0] for r in rows["two"]] == [str(i) for i in range(80)]
    # IWAE, rank 0's half: the same draws, but one process ran 2 threads (the cores it may use) and each torchrun
    # worker 1, so float32 sums run in another order. Each log weight is a sum over 784 pixels of terms
    # xℓ − softplus(ℓ) ≤ 0 (plus a few latent terms), so Σ|terms| ≈ |log weight| ≈ |IWAE|, and two orders of a
    # float32 sum of n terms differ by at most 2(n − 1)·2⁻²⁴·Σ|terms|; the CSV rounds to 1e−6. (Other draws
    # would move a digit's IWAE-50 by tenths of a nat or more.) Bitwise equality held on one CPU and failed on
    # an AVX-512 Xeon: −224.653137 against −224.653152.
    one = [float(r[3]) for r in rows["one"][:40]]
    two = [float(r[3]) for r in rows["two"][:40]]
    for a, b in zip(one, two):
        assert abs(a - b) <= 2 * 783 * 2.0 ** -24 * abs(a) + 2e-6, (a, b)
    assert json.loads((tmp_path / "two.json").read_text())["processes"] == 2
