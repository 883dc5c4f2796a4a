"""One training step of a preset as the trainer takes it (the engine's gradient, clipping and clamping where the
preset does, Adam), timed: the fastest and the median of 7 rounds of 20 steps on 10 batches of training digits.

    PYTHONPATH=CODE/src python benchmarks/step.py PRESET ENGINE THREADS     # e.g. planar-80 autograd 2

Run it alternately with two checkouts (CODE: a worktree of the commit before a change, and this one) to compare
them process by process; older code, whose ``clip_norm_`` takes no precomputed norm, is timed as it stepped then.

    python benchmarks/step.py PRESET ENGINE THREADS --in-turn ROUNDS

times instead, in one process and in turn, ROUNDS times after one untimed epoch: a whole epoch of the trainer (all
60 000 training digits), the same step bare on each of the epoch's whole batches (binarised once, draws fixed
beforehand; their seconds scaled to the epoch's step count, whose last batch is short), and the step floor of the
epoch (``run.floor_seconds``: its products replayed and Adam's steps). An epoch ÷ its bare steps is
what the training loop adds to the step (the epoch's permutation and binarisation, a fresh batch and fresh draws
each step, the loss columns); the bare steps ÷ the floor is the step's own distance to its products.
"""

import argparse
import dataclasses
import inspect
import math
import statistics
import tempfile
import time

import torch

from vaelab import training
from vaelab.config import RunConfig
from vaelab.data import load_mnist, prepare
from vaelab.engines import ENGINES
from vaelab.evaluation import hot_loop_settings
from vaelab.presets import apply_preset


def preset_step(name: str, engine: str, all_digits: bool = False):
    """(trainer, one): a trainer of the preset on max(2000, ten batches) training digits, and ``one(i)``, the
    trainer's step on the (i mod 10)-th of 10 fixed batches with their fixed draws; ``all_digits``: on all the
    training digits, ``one`` stepping through each of their whole batches in turn (a model that took thousands of
    steps on 10 batches learnt them: `vampprior-1`'s bare steps then took 1.9–3.0 × as long, thirty-first session)."""
    base = apply_preset(RunConfig(), name)
    train = dataclasses.replace(base.train, epochs=1, engine=engine)
    if hasattr(train, "early_stopping"):
        train = dataclasses.replace(train, early_stopping=0)
    config = dataclasses.replace(base, train=train, data=dataclasses.replace(
        base.data, validation=0, train_examples=None if all_digits else max(2000, 10 * train.batch_size),
        test_examples=100))
    data = prepare(load_mnist(log=lambda m: None), config.data)
    trainer = training.Trainer(config, tempfile.mkdtemp(), data, torch.device("cpu"), log=lambda m: None,
                               progress=False)
    batch, objective, clip, value = train.batch_size, config.objective, train.clip_grad_norm, train.clip_grad_value
    count = data.n_train // batch if all_digits else 10
    xs = [data.train_grey[i * batch:(i + 1) * batch].gt(127).float() for i in range(count)]       # (B, 784) each
    eps = [torch.randn(objective.samples, batch, config.model.total_latent) for _ in range(count)]  # (K, B, D) each
    step = ENGINES[(trainer.engine_name, "fp32")]
    grad = trainer.flat.param.grad
    current = "squares" in inspect.signature(training.clip_norm_).parameters
    squares = torch.full((1,), math.nan, dtype=torch.float64) if current and clip else None

    def one(i: int) -> None:
        i %= count
        if squares is not None:
            squares.fill_(math.nan)
            step(trainer.model, xs[i], eps[i], objective.name, 0.5, grad_squares=squares)
            training.clip_norm_(grad, clip, squares)
        else:
            step(trainer.model, xs[i], eps[i], objective.name, 0.5)
            if clip:
                training.clip_norm_(grad, clip)
        if value:
            grad.clamp_(-value, value)
        trainer.optimizer.step()

    return trainer, one


def steps_alone(name: str, engine: str) -> str:
    _, one = preset_step(name, engine)
    with hot_loop_settings():
        for i in range(10):
            one(i)
        rounds = []
        for _ in range(7):
            start = time.perf_counter()
            for i in range(20):
                one(i)
            rounds.append((time.perf_counter() - start) / 20 * 1e3)
    rounds.sort()
    return f"step fastest {rounds[0]:.2f} ms, median {rounds[3]:.2f} ms"


def epochs_steps_and_floors(name: str, engine: str, rounds: int) -> dict:
    """Each round's seconds of a whole epoch, of its steps bare (``one``, scaled from the epoch's whole batches to
    its steps) and of its floor, in turn, after one untimed epoch; with their ratios."""
    from run import floor_seconds, recorded_products, vaelab_epoch     # benchmarks/run.py, beside this file

    trainer, one = preset_step(name, engine, all_digits=True)
    steps = trainer.steps_per_epoch
    full = trainer.data.n_train // trainer.config.train.batch_size          # the epoch's whole batches
    prepared = recorded_products(trainer)
    vaelab_epoch(trainer)                                                   # compiles, warms the allocator
    with hot_loop_settings():
        for i in range(10):
            one(i)                                                          # the fixed batches' graph, if new
    rows = []
    for _ in range(rounds):
        epoch = vaelab_epoch(trainer)
        with hot_loop_settings():
            start = time.perf_counter()
            for i in range(full):
                one(i)
            bare = (time.perf_counter() - start) * steps / full
        floor = floor_seconds(prepared, steps, trainer.optimizer)
        rows.append({"epoch": epoch, "bare_steps": bare, "floor": floor})
    return {"steps": steps, "rounds": rows,
            "epoch_over_bare_median": statistics.median(r["epoch"] / r["bare_steps"] for r in rows),
            "bare_over_floor_median": statistics.median(r["bare_steps"] / r["floor"] for r in rows),
            "epoch_over_floor_median": statistics.median(r["epoch"] / r["floor"] for r in rows)}


def in_turn_report(result: dict) -> str:
    lines = [f"{result['steps']} steps per epoch; medians: epoch ÷ bare steps {result['epoch_over_bare_median']:.3f}, "
             f"bare steps ÷ floor {result['bare_over_floor_median']:.2f}, epoch ÷ floor "
             f"{result['epoch_over_floor_median']:.2f}"]
    for r in result["rounds"]:
        lines.append(f"  epoch {r['epoch']:.2f} s, its steps bare {r['bare_steps']:.2f} s, floor {r['floor']:.2f} s: "
                     f"{r['epoch'] / r['bare_steps']:.3f}, {r['bare_steps'] / r['floor']:.2f}, "
                     f"{r['epoch'] / r['floor']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset")
    parser.add_argument("engine")
    parser.add_argument("threads", type=int)
    parser.add_argument("--in-turn", type=int, metavar="ROUNDS",
                        help="epochs, bare steps and floors in turn, ROUNDS times, in this process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = (in_turn_report(epochs_steps_and_floors(args.preset, args.engine, args.in_turn)) if args.in_turn
              else steps_alone(args.preset, args.engine))
    print(f"{args.preset} {args.engine} {args.threads} thread(s): {report}")


if __name__ == "__main__":
    main()
