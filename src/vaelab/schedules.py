"""Schedules: the learning rate of each epoch, the KL weight β of each step, and where early stopping ends a run.

Each is a function of the position in training alone (epoch, step; for early stopping also the epoch of the best
validation ELBO, which the training state keeps), so a resumed run gets the same values as an uninterrupted one.
"""

from __future__ import annotations

from typing import Callable

from vaelab.tables import plural


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
    on the run's --epochs: a resume with another --epochs moves the epochs left onto the curve of the new count (the
    next epoch's rate above the last one's where --epochs grew), and says so (``describe_schedule``)."""
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


def beta_text(beta: float) -> str:
    """β as the log and notes show it: two decimals (0.30, 1.00, 100000000.00), or two significant digits where two
    decimals would show a positive β as 0.00 (a warm-up of 1000 epochs ends its first at β = 0.001: until 2026-12-06
    the line read "β-ELBO (β = 0.00)", the objective without its KL)."""
    return f"{beta:.2f}" if beta == 0 or abs(beta) >= 0.095 else f"{beta:.2g}"


def epochs_without_improvement(epoch: int, best_epoch: int, warmup_epochs: int) -> int:
    """The epochs up to ``epoch`` since the best validation ELBO (that of ``best_epoch``), not counting the KL
    warm-up: epoch − max(best_epoch, warmup_epochs), at least 0. The warm-up's epochs train with β < 1 (β reaches 1
    at the end of epoch ``warmup_epochs``), so none of them counts, as in Tomczak & Welling's code
    (jmtomczak/vae_vampprior, utils/perform_experiment.py), which resets its counter while epoch < warmup."""
    return max(0, epoch - max(best_epoch, warmup_epochs))


def stops_early(config, epoch: int, best_epoch: int) -> bool:
    """Whether ``--early-stopping N`` ends the run after ``epoch``: N > 0 and N epochs past the warm-up have
    brought no better validation ELBO than that of ``best_epoch``. Tomczak & Welling's code stops when its
    counter exceeds its ``early_stopping_epochs`` (50), at the 51st such epoch: ``--early-stopping 51``."""
    patience = config.train.early_stopping
    return patience > 0 and epochs_without_improvement(epoch, best_epoch, config.objective.warmup_epochs) >= patience


def stages_of(epochs: int) -> str:
    """Which stages of Burda's schedule ``epochs`` epochs cover, e.g. '0–4 (121 epochs) and 41 of 243 of stage 5'."""
    whole, done = 0, 0
    while whole < 8 and done + 3 ** whole <= epochs:
        done += 3 ** whole
        whole += 1
    text = (f"stages 0–{whole - 1} ({done} epochs)" if whole > 1 else "stage 0 (1 epoch)") if whole else "no whole stage"
    if epochs > done and whole < 8:
        text += f" and {epochs - done} of the {3 ** whole} epochs of stage {whole}"
    return text



def describe_schedule(config, lr_amended_from: str | None = None,
                      resumed: tuple[int, int | None, float] | None = None) -> tuple[list[str], list[str]]:
    """What the learning-rate schedule and the KL warm-up will do over the epochs asked for, said before
    training starts: (lines, warnings). A preset shortened with --epochs changes silently otherwise: an
    exponential decay is squeezed into the shorter run, Burda's schedule is cut short, and a warm-up longer
    than the run never reaches β, so the objective trained is not the ELBO reported. ``lr_amended_from``: where
    a resume that amended --lr begins ("epoch 3"; the steps before trained with the former rate). ``resumed``:
    (epochs trained, the run's --epochs until this resume, the last epoch's rate) of a resume, whose new --epochs
    re-spans an exponential decay (the rate of the next epoch may be above the last one's)."""
    from vaelab.presets import PRESETS

    train, objective = config.train, config.objective
    epochs, lr = train.epochs, train.lr
    preset_epochs = PRESETS.get(config.preset or "", {}).get("fields", {}).get("train", {}).get("epochs")
    shortened = preset_epochs is not None and preset_epochs != epochs
    lines, warnings = [], []
    rate = LR_SCHEDULES[train.lr_schedule]
    if train.lr_schedule == "constant":
        lines.append(f"learning rate {lr:g} " + ("throughout" if lr_amended_from is None else
                                                 f"from {lr_amended_from} on (amended; the steps before trained "
                                                 f"with the former rate)"))
    elif train.lr_schedule == "exponential":
        lines.append(f"learning rate {lr:g} falling exponentially to {rate(epochs - 1, lr, epochs):.3g} in epoch "
                     f"{epochs}, over the {plural(epochs, 'epoch')} of this run")
        if shortened:
            warnings.append(f"preset {config.preset} spans its decay over {preset_epochs} epochs; with --epochs {epochs} "
                            f"the same tenfold decay is squeezed into {epochs}")
        done, before, last = resumed or (0, None, lr)
        if before is not None and before != epochs and 0 < done < epochs:
            # each epoch's rate is a function of (epoch, --epochs): a new --epochs moves the rest onto the new curve
            lines[-1] += f" (re-spanned by this resume: until epoch {done} the decay spanned {before} epochs)"
            warnings.append(f"--epochs {epochs} re-spans the exponential decay, which spanned the run's {before} "
                            f"epochs until now: epoch {done + 1} trains at {rate(done, lr, epochs):.3g} where epoch "
                            f"{done} trained at {last:.3g}, and the rate reaches {rate(epochs - 1, lr, epochs):.3g} in "
                            f"epoch {epochs}")
    elif train.lr_schedule == "burda":
        lines.append(f"Burda's schedule: {epochs} epoch{'s' * (epochs != 1)} cover {stages_of(epochs)}, learning rate {lr:g} to "
                     f"{rate(epochs - 1, lr, epochs):.3g}")
        if epochs < BURDA_EPOCHS:
            warnings.append(f"Burda's schedule is cut short: its {BURDA_EPOCHS} epochs end at learning rate "
                            f"{rate(BURDA_EPOCHS - 1, lr, BURDA_EPOCHS):.3g}; this run stops after {epochs}")
    else:
        lines.append(f"learning-rate schedule {train.lr_schedule} from {lr:g}")
    if objective.warmup_epochs > 0:
        lines.append(f"KL warm-up: β rises from 0 to {objective.beta:g} over {objective.warmup_epochs} "
                     f"epoch{'s' * (objective.warmup_epochs != 1)}")
        if epochs < objective.warmup_epochs:
            warnings.append(f"the KL warm-up of {objective.warmup_epochs} epoch{'s' * (objective.warmup_epochs != 1)} "
                            f"will not finish in {epochs}: β ends at "
                            f"{beta_text(objective.beta * epochs / objective.warmup_epochs)}, so the objective "
                            f"trained to the end is not the ELBO that is reported")
    elif objective.beta != 1:
        lines.append(f"β = {objective.beta:g} throughout (the ELBO is reported with β = 1)")
    if train.early_stopping:
        lines.append(f"early stopping after {train.early_stopping} epoch{'s' * (train.early_stopping != 1)} without a "
                     f"better validation ELBO"
                     + (f" (counted after the warm-up's {objective.warmup_epochs})" if objective.warmup_epochs else ""))
    if train.clip_grad_value:
        lines.append(f"each element of the gradient clamped to ±{train.clip_grad_value:g}"
                     + (f" after its norm is clipped at {train.clip_grad_norm:g}" if train.clip_grad_norm else ""))
    from vaelab.optimizers import OPTIMIZERS

    optimizer = OPTIMIZERS[train.optimizer]
    if optimizer.prepare is not None:                 # plain Adam goes without saying
        lines.append(f"optimiser {train.optimizer}: {optimizer.about}")
    return lines, warnings
