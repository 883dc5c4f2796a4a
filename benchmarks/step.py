"""One training step of a preset as the trainer takes it (the engine's gradient, clipping and clamping where the
preset does, Adam), timed: the fastest and the median of 7 rounds of 20 steps on 10 batches of training digits.

    PYTHONPATH=CODE/src python benchmarks/step.py PRESET ENGINE THREADS     # e.g. planar-80 autograd 2

Run it alternately with two checkouts (CODE: a worktree of the commit before a change, and this one) to compare
them process by process; older code, whose ``clip_norm_`` takes no precomputed norm, is timed as it stepped then.
"""

import dataclasses
import inspect
import math
import sys
import tempfile
import time

import torch

from vaelab import training
from vaelab.config import RunConfig
from vaelab.data import load_mnist, prepare
from vaelab.engines import ENGINES
from vaelab.evaluation import hot_loop_settings
from vaelab.presets import apply_preset


def main() -> None:
    name, engine, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = apply_preset(RunConfig(), name)
    train = dataclasses.replace(base.train, epochs=1, engine=engine)
    if hasattr(train, "early_stopping"):
        train = dataclasses.replace(train, early_stopping=0)
    config = dataclasses.replace(base, train=train, data=dataclasses.replace(
        base.data, validation=0, train_examples=max(2000, 10 * train.batch_size), test_examples=100))
    data = prepare(load_mnist(log=lambda m: None), config.data)
    trainer = training.Trainer(config, tempfile.mkdtemp(), data, torch.device("cpu"), log=lambda m: None,
                               progress=False)
    batch, objective, clip, value = train.batch_size, config.objective, train.clip_grad_norm, train.clip_grad_value
    xs = [data.train_grey[i * batch:(i + 1) * batch].gt(127).float() for i in range(10)]       # (B, 784) each
    eps = [torch.randn(objective.samples, batch, config.model.total_latent) for _ in range(10)]  # (K, B, D) each
    step = ENGINES[(trainer.engine_name, "fp32")]
    grad = trainer.flat.param.grad
    current = "squares" in inspect.signature(training.clip_norm_).parameters
    squares = torch.full((1,), math.nan, dtype=torch.float64) if current and clip else None

    def one(i: int) -> None:
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

    with hot_loop_settings():
        for i in range(10):
            one(i)
        rounds = []
        for _ in range(7):
            start = time.perf_counter()
            for i in range(20):
                one(i % 10)
            rounds.append((time.perf_counter() - start) / 20 * 1e3)
    rounds.sort()
    print(f"{name} {engine} {threads} thread(s): step fastest {rounds[0]:.2f} ms, median {rounds[3]:.2f} ms")


if __name__ == "__main__":
    main()
