"""Schedules: the learning rate of each epoch and the KL weight β of each step.

Both are functions of the position in training alone (epoch, step), so a resumed run gets the same
values as an uninterrupted one.
"""

from __future__ import annotations

from typing import Callable


def constant_lr(epoch: int, base: float, epochs: int) -> float:
    """The same rate every epoch."""
    return base


def burda_stage(epoch: int) -> int:
    """Stage i of Burda et al.'s schedule for 0-based ``epoch``: stage i lasts 3^i epochs (i = 0 … 7 make
    3280 epochs; later epochs stay in the last stage)."""
    stage, end = 0, 1
    while epoch >= end and stage < 7:
        stage += 1
        end += 3 ** stage
    return stage


def burda_lr(epoch: int, base: float, epochs: int) -> float:
    """Burda, Grosse & Salakhutdinov (2016, §5): lr = base · 10^(−i/7) in stage i (3^i epochs), base 1e-3."""
    return base * 10.0 ** (-burda_stage(epoch) / 7)


BURDA_EPOCHS = sum(3 ** i for i in range(8))      # 3280

def exponential_lr(epoch: int, base: float, epochs: int) -> float:
    """lr = base · 10^(−epoch/(epochs − 1)): from base in the first epoch to base/10 in the last, falling by the
    same factor every epoch (Burda's schedule falls by 10 over its 3280 epochs too, in 8 steps). It depends
    on the run's --epochs: raising --epochs on resume stretches the rest of the decay."""
    return base * 10.0 ** (-epoch / max(1, epochs - 1))


# (0-based epoch, base rate, the run's epochs) → the epoch's rate
LR_SCHEDULES: dict[str, Callable[[int, float, int], float]] = {
    "constant": constant_lr, "burda": burda_lr, "exponential": exponential_lr}


def kl_weight(step: int, steps_per_epoch: int, beta: float, warmup_epochs: int) -> float:
    """β for the 0-based global ``step``: rises linearly from 0 to ``beta`` over ``warmup_epochs`` epochs
    (Sønderby et al. 2016, "KL warm-up"), step by step, then stays; no warm-up: ``beta`` throughout."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, (step + 1) / (warmup_epochs * steps_per_epoch))


def stages_of(epochs: int) -> str:
    """Which stages of Burda's schedule ``epochs`` epochs cover, e.g. '0–4 (121 epochs) and 41 of 243 of stage 5'."""
    whole, done = 0, 0
    while whole < 8 and done + 3 ** whole <= epochs:
        done += 3 ** whole
        whole += 1
    text = f"stages 0–{whole - 1} ({done} epochs)" if whole else "no whole stage"
    if epochs > done and whole < 8:
        text += f" and {epochs - done} of the {3 ** whole} epochs of stage {whole}"
    return text

