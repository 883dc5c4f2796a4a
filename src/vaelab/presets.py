"""Presets: named sets of config fields, as data. ``--preset NAME`` starts from the defaults, applies the
preset's fields, then the flags given on the command line (explicit flags win).

References (../shared/REFERENCES.md): Burda, Grosse & Salakhutdinov (2016, §5): Adam β₁ 0.9, β₂ 0.999,
ε 1e-4, batches of 20, learning rate 1e-3 · 10^(−i/7) for 3^i epochs, i = 0 … 7 (3280 epochs), Glorot
initialisation, tanh; one stochastic layer 784 → 200 → 200 → 50, two: 784 → 100 → 100 → 100 → 50 → 50 → 50.
Test NLL (IWAE-5000, dynamic binarisation): VAE 86.76, IWAE k=50 84.78; two layers: VAE 85.33, IWAE 82.90.
"""

from __future__ import annotations

from typing import Any

_BURDA_TRAIN = {"batch_size": 20, "lr": 1e-3, "lr_schedule": "burda", "adam_betas": (0.9, 0.999),
                "adam_eps": 1e-4, "epochs": 3280}
_BURDA_1 = {"name": "mlp", "hidden": ((200, 200),), "latent": (50,), "activation": "tanh", "init": "glorot"}
_BURDA_2 = {"name": "mlp2", "hidden": ((100, 100), (50, 50)), "latent": (100, 50), "activation": "tanh",
            "init": "glorot"}

PRESETS: dict[str, dict[str, Any]] = {
    "seed": {
        "about": "the reference model: 784-256-50 ReLU, ELBO, Adam 1e-3, batch 64, 100 epochs (NLL 91.60)",
        "fields": {},
    },
    "burda-vae-1": {
        "about": "Burda et al.'s VAE, one stochastic layer, 3280 epochs (paper: NLL 86.76)",
        "fields": {"model": _BURDA_1, "objective": {"name": "elbo", "samples": 1}, "train": _BURDA_TRAIN},
    },
    "burda-iwae-1": {
        "about": "Burda et al.'s IWAE k = 50, one stochastic layer, 3280 epochs (paper: NLL 84.78)",
        "fields": {"model": _BURDA_1, "objective": {"name": "iwae", "samples": 50}, "train": _BURDA_TRAIN},
    },
    "burda-vae-2": {
        "about": "Burda et al.'s VAE, two stochastic layers, 3280 epochs (paper: NLL 85.33)",
        "fields": {"model": _BURDA_2, "objective": {"name": "elbo", "samples": 1}, "train": _BURDA_TRAIN},
    },
    "cpu-hour": {
        "about": "the best model found for one hour of training on a 2-core CPU: two stochastic layers, 520 "
                 "epochs (chosen on a validation split; benchmarks/README.md)",
        "fields": {"model": {"name": "mlp2", "hidden": ((300, 300), (100, 100)), "latent": (64, 32),
                             "activation": "relu", "init": "torch"},
                   "objective": {"name": "elbo", "samples": 1, "warmup_epochs": 10},
                   "train": {"batch_size": 128, "lr": 1e-3, "lr_schedule": "exponential", "epochs": 520}},
    },
    "burda-iwae-2": {
        "about": "Burda et al.'s IWAE k = 50, two stochastic layers, 3280 epochs (paper: NLL 82.90)",
        "fields": {"model": _BURDA_2, "objective": {"name": "iwae", "samples": 50}, "train": _BURDA_TRAIN},
    },
}


def apply_preset(config, name: str):
    """``config`` (a RunConfig) with the preset's fields replaced and ``preset`` set to its name."""
    import dataclasses

    from vaelab.errors import UsageError

    if name not in PRESETS:
        raise UsageError(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    sections = {section: dataclasses.replace(getattr(config, section), **fields)
                for section, fields in PRESETS[name]["fields"].items()}
    return dataclasses.replace(config, **sections, preset=name)


def changed_fields(config) -> list[str]:
    """The fields of ``config`` that flags changed from the preset it started from (not the run's length,
    data subset, threads or data directory)."""
    if config.preset not in PRESETS:
        return []
    base = apply_preset(config.__class__(), config.preset)
    ignored = ("train.threads", "data.data_dir", "train.epochs", "data.train_examples", "data.test_examples")
    return [d.split(":")[0] for d in base.differences(config) if d.split(":")[0] not in ignored]


def preset_label(config) -> str:
    """The preset's name, with * when flags changed its fields; the model's name for runs without a preset."""
    if config.preset is None:
        return config.model.name
    return config.preset + ("*" if changed_fields(config) else "")
