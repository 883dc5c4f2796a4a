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

    python benchmarks/step.py PRESET ENGINE THREADS --products STEPS

asks whether the step's products cost inside it what the floor's replay of them costs: in one process, STEPS bare
steps (every whole batch of the epoch in turn) and STEPS replays of the floor's products (``run.recorded_products``)
under ``torch.profiler``, each product's self time summed by the shapes of its two matrix operands, three rounds in
turn (medians); and, in turn without the profiler, two rounds of STEPS steps and of STEPS replays. The profiler's
reading of a product inside an eager autograd step can be its own: `seed`'s first and last weight gradients read
0.57 ms a step there against 0.18 ms replayed, and leaving them out of the step saved 0.19–0.21 ms
(benchmarks/README.md, thirty-second session).
"""

import argparse
import dataclasses
import inspect
import math
import statistics
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
    from run import scratch_trainer                                       # benchmarks/run.py, beside this file

    trainer = scratch_trainer(config, data, "vaelab-step-")
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


PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
# rounds of profiled steps and replays in turn: one round under the profiler read 0.79 × where the next read 1.15 ×
# (`planar-80` on a Xeon whose replay under the profiler took 10.3 ms a step that took 6.2–6.3 ms without it)
PROFILED_ROUNDS = 3


def matrix_shapes(key: str, shapes: list) -> tuple:
    """The shapes of a product's two matrix operands, from the profiler's list of its inputs (``addmm`` and
    ``baddbmm`` take the bias first; a compiled graph's product lists its ``out`` buffer after them)."""
    start = 1 if key in ("aten::addmm", "aten::baddbmm") else 0
    return tuple(tuple(shape) for shape in shapes[start:start + 2])


def profiled_products(work, count: int) -> dict[tuple, float]:
    """Milliseconds per call of ``work(i)``, i < ``count``, that its matrix products take (the profiler's self time),
    summed by ``matrix_shapes``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(count):
            work(i)
    totals: dict[tuple, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in PRODUCTS:
            shape = matrix_shapes(event.key, event.input_shapes)
            totals[shape] = totals.get(shape, 0.0) + event.self_cpu_time_total / 1e3 / count
    return totals


def products_in_step(name: str, engine: str, steps: int) -> dict:
    """The preset's step and the floor's replay of its products, in one process: milliseconds per step of each
    without the profiler (two rounds in turn), and under it (``PROFILED_ROUNDS`` rounds in turn) the products'
    milliseconds per step, by shape and in all, each the median of the rounds, and each round's own."""
    from run import recorded_products, replay                            # benchmarks/run.py, beside this file

    trainer, one = preset_step(name, engine, all_digits=True)
    prepared = recorded_products(trainer)

    def replayed(_: int) -> None:
        with torch.no_grad():
            replay(prepared)

    def per_call(work, first: int) -> float:
        start = time.perf_counter()
        for i in range(first, first + steps):
            work(i)
        return (time.perf_counter() - start) / steps * 1e3

    with hot_loop_settings():
        for i in range(10):
            one(i)                                                          # compiles, warms the allocator
        step_ms, replay_ms = [], []
        for r in range(2):
            step_ms.append(per_call(one, 10 + r * steps))
            replay_ms.append(per_call(replayed, 0))
        profiled = []
        for r in range(PROFILED_ROUNDS):
            first = 10 + (2 + r) * steps
            profiled.append((profiled_products(lambda i: one(first + i), steps), profiled_products(replayed, steps)))
    in_step, replayed = ({shape: statistics.median(run.get(shape, 0.0) for run in runs)
                          for shape in set().union(*runs)} for runs in zip(*profiled))
    return {"steps": steps, "step_ms": step_ms, "replay_ms": replay_ms, "in_step": in_step, "replayed": replayed,
            "in_step_ms": statistics.median(sum(a.values()) for a, _ in profiled),
            "replayed_ms": statistics.median(sum(b.values()) for _, b in profiled),
            "rounds": [{"in_step": a, "replayed": b} for a, b in profiled]}


def products_report(result: dict, rows: int = 12) -> str:
    lines = [f"{result['steps']} steps: a step " + ", ".join(f"{t:.2f}" for t in result["step_ms"])
             + " ms, its products replayed " + ", ".join(f"{t:.2f}" for t in result["replay_ms"])
             + f" ms; under the profiler, products {result['in_step_ms']:.2f} ms a step in the step, "
             f"{result['replayed_ms']:.2f} ms replayed, medians of {len(result['rounds'])} rounds (each round's ratio "
             + ", ".join(f"{sum(r['in_step'].values()) / sum(r['replayed'].values()):.3f}" for r in result["rounds"])
             + ")"]
    shapes = sorted(set(result["in_step"]) | set(result["replayed"]),
                    key=lambda s: -max(result["in_step"].get(s, 0.0), result["replayed"].get(s, 0.0)))
    for shape in shapes[:rows]:
        a, b = result["in_step"].get(shape, 0.0), result["replayed"].get(shape, 0.0)
        ratio = f" ({a / b:.2f} ×)" if a and b else ""
        lines.append(f"  {' · '.join('×'.join(map(str, s)) for s in shape)}: in the step {a:.3f} ms, "
                     f"replayed {b:.3f} ms{ratio}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset")
    parser.add_argument("engine")
    parser.add_argument("threads", type=int)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--in-turn", type=int, metavar="ROUNDS",
                      help="epochs, bare steps and floors in turn, ROUNDS times, in this process")
    mode.add_argument("--products", type=int, metavar="STEPS",
                      help="the step's products against the floor's replay of them, over STEPS steps each")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.in_turn:
        report = in_turn_report(epochs_steps_and_floors(args.preset, args.engine, args.in_turn))
    elif args.products:
        report = products_report(products_in_step(args.preset, args.engine, args.products))
    else:
        report = steps_alone(args.preset, args.engine)
    print(f"{args.preset} {args.engine} {args.threads} thread(s): {report}")


if __name__ == "__main__":
    main()
