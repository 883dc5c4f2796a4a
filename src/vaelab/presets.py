"""Presets: named sets of config fields, as data. ``--preset NAME`` starts from the defaults, applies the
preset's fields, then the flags given on the command line (explicit flags win). ``paper``: the test NLL the
paper reports for the preset's setting (dynamically binarised MNIST, IWAE-5000), with its source; ``deviations``:
what vaelab does differently from the paper, said wherever the preset is listed.

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

# The presets of issue 21's models train with ``--engine compiled`` (torch.compile's fused kernels for the
# elementwise passes around the products, the loss and its gradient in one graph): the four papers' schedules run
# 833–2000 epochs, where compiling (tens of seconds at each start of a process) is lost in the hours, and since
# 2026-12-03 `cpu-hour-vampprior` too, whose hour on the Xeon holds 630 compiled epochs where it held 320 on
# autograd. In every side-by-side timing of benchmarks/README.md (the Xeon, sessions 14, 18, 20 and 22, 1 and 2
# threads) the VampPrior, ladder and planar presets' compiled epochs took 1–28 % less time than the autograd engine's
# (the median of 19 pairs 16 %), never more, for 200–250 MiB more memory. Both engines compute the same gradient to
# float32 rounding (tests/test_compiled.py); --engine autograd trains without a C++ compiler. On an NVIDIA H200
# (forty-eighth session) the compiled epochs took 0.33–0.51 × autograd's after a first epoch of compiling (20–62 s).
_COMPILED = {"engine": "compiled"}

# Tomczak & Welling (2018), §5 and the authors' code (jmtomczak/vae_vampprior, experiment.py): gated dense
# layers of 300 units, 40 latents per layer, K = 500 pseudo-inputs, He initialisation, Adam 5e-4, batch 100,
# KL warm-up over 100 epochs, at most 2000 epochs with early stopping on a validation split (50 000 / 10 000):
# utils/perform_experiment.py counts the epochs without a better validation loss, from the warm-up's end, and stops
# when the count exceeds early_stopping_epochs = 50, at the 51st (--early-stopping 51; schedules.stops_early).
_TOMCZAK_MODEL = {"name": "tomczak", "activation": "gated", "init": "he", "prior": "vampprior", "prior_components": 500}
_TOMCZAK_OBJECTIVE = {"name": "elbo", "samples": 1, "warmup_epochs": 100}
_TOMCZAK_TRAIN = {"batch_size": 100, "lr": 5e-4, "epochs": 2000, "early_stopping": 51, **_COMPILED}
_TOMCZAK_DATA = {"validation": 10_000}
_TOMCZAK_HVAE = {**_TOMCZAK_MODEL, "hidden": ((300, 300), (300, 300)), "latent": (40, 40)}   # their two-layer HVAE
_TOMCZAK_DEVIATIONS = ("Adam with per-tensor normalised gradients (their AdamNormGrad) replaced by plain Adam, as "
                       "vaelab's runs of these presets trained (--optimizer adam-normgrad is theirs); "
                       "their early stopping counts from the warm-up's last epoch (β = 1 there) where vaelab's counts "
                       "from the epoch after it (β reaches 1 at the warm-up's end): one epoch later where the best "
                       "validation ELBO came in the warm-up; evaluate the best-validation weights (evaluate "
                       "--checkpoint best) as they do; "
                       "pseudo-inputs kept in (0, 1) by a sigmoid of their parameters, as one version of their code "
                       "does (models/Model.py at commit 20d3234), where another (aa909ef) clips them to [0, 1] with a "
                       "hardtanh, whose gradient vanishes outside it")

PRESETS: dict[str, dict[str, Any]] = {
    "seed": {
        "about": "the reference model: 784-256-50 ReLU, ELBO, Adam 1e-3, batch 64, 100 epochs (NLL 91.60)",
        "fields": {},
    },
    "burda-vae-1": {
        "about": "Burda et al.'s VAE, one stochastic layer, 3280 epochs (paper: NLL 86.76)",
        "paper": (86.76, "Burda, Grosse & Salakhutdinov 2016, Table 1, VAE, one stochastic layer, k = 1"),
        "fields": {"model": _BURDA_1, "objective": {"name": "elbo", "samples": 1}, "train": _BURDA_TRAIN},
    },
    "burda-iwae-1": {
        "about": "Burda et al.'s IWAE k = 50, one stochastic layer, 3280 epochs (paper: NLL 84.78)",
        "paper": (84.78, "Burda, Grosse & Salakhutdinov 2016, Table 1, IWAE, one stochastic layer, k = 50"),
        "fields": {"model": _BURDA_1, "objective": {"name": "iwae", "samples": 50}, "train": _BURDA_TRAIN},
    },
    "burda-vae-2": {
        "about": "Burda et al.'s VAE, two stochastic layers, 3280 epochs (paper: NLL 85.33)",
        "paper": (85.33, "Burda, Grosse & Salakhutdinov 2016, Table 1, VAE, two stochastic layers, k = 1"),
        "fields": {"model": _BURDA_2, "objective": {"name": "elbo", "samples": 1}, "train": _BURDA_TRAIN},
    },
    "cpu-hour": {
        # its measured hour and NLL, as `cpu-hour-vampprior`'s (until 2026-12-07 neither, nor which CPU)
        "about": "the best model found for one hour of training on a 2-core CPU: two stochastic layers (chosen on a "
                 "validation split), 520 epochs (52.8 min on a 2-core AMD EPYC with AVX2; NLL 84.27; "
                 "benchmarks/README.md)",
        "fields": {"model": {"name": "mlp2", "hidden": ((300, 300), (100, 100)), "latent": (64, 32),
                             "activation": "relu", "init": "torch"},
                   "objective": {"name": "elbo", "samples": 1, "warmup_epochs": 10},
                   "train": {"batch_size": 128, "lr": 1e-3, "lr_schedule": "exponential", "epochs": 520}},
    },
    "cpu-hour-vampprior": {
        "about": "the best model found for one hour of training on a 2-core CPU with the models of issue 21: "
                 "Tomczak & Welling's two-layer HVAE with a VampPrior of 100 pseudo-inputs (chosen on a validation "
                 "split), 630 epochs (57.5 min with the compiled engine on a 2-core Intel Xeon; NLL 81.01; "
                 "benchmarks/README.md)",
        "fields": {"model": {**_TOMCZAK_HVAE, "prior_components": 100},
                   "objective": {"name": "elbo", "samples": 1, "warmup_epochs": 10},
                   "train": {"batch_size": 128, "lr": 1e-3, "lr_schedule": "exponential", "epochs": 630,
                             **_COMPILED}},
    },
    "burda-iwae-2": {
        "about": "Burda et al.'s IWAE k = 50, two stochastic layers, 3280 epochs (paper: NLL 82.90)",
        "paper": (82.90, "Burda, Grosse & Salakhutdinov 2016, Table 1, IWAE, two stochastic layers, k = 50"),
        "fields": {"model": _BURDA_2, "objective": {"name": "iwae", "samples": 50}, "train": _BURDA_TRAIN},
    },
    "vampprior-1": {
        "about": "Tomczak & Welling's VAE with the VampPrior, one stochastic layer of 40, gated layers of 300 "
                 "(paper: NLL 85.57)",
        "paper": (85.57, "Tomczak & Welling 2018, Table 2, VAE (L = 1) + VampPrior, dynamic MNIST"),
        "deviations": _TOMCZAK_DEVIATIONS,
        "fields": {"model": {**_TOMCZAK_MODEL, "hidden": ((300, 300),), "latent": (40,)},
                   "objective": _TOMCZAK_OBJECTIVE, "train": _TOMCZAK_TRAIN, "data": _TOMCZAK_DATA},
    },
    "vampprior-2": {
        "about": "Tomczak & Welling's HVAE with the VampPrior: q(z₂|x) q(z₁|x, z₂), p(x|z₁, z₂), 40 + 40 latents, "
                 "gated layers of 300 (paper: NLL 83.19)",
        "paper": (83.19, "Tomczak & Welling 2018, Table 2, HVAE (L = 2) + VampPrior, dynamic MNIST"),
        "deviations": _TOMCZAK_DEVIATIONS,
        "fields": {"model": _TOMCZAK_HVAE,
                   "objective": _TOMCZAK_OBJECTIVE, "train": _TOMCZAK_TRAIN, "data": _TOMCZAK_DATA},
    },
    "ladder-5": {
        "about": "Sønderby et al.'s Ladder VAE: five stochastic layers 64-32-16-8-4 inferred top-down, MLPs of two "
                 "layers of 512-256-128-64-32 leaky-ReLU units, warm-up (paper: NLL 81.74)",
        "paper": (81.74, "Sønderby et al. 2016, Table 1, LVAE with five stochastic layers, MNIST"),
        "deviations": ("the optimiser is that of the authors' code (run_models.py of github.com/casperkaae/LVAE, read "
                       "2026-11-30 in the copy GhassenJ/LVAE at 9fd6c0f): Adam with ε 1e-4 on the gradient whose total "
                       "norm is clipped at 4 and then each element to ±0.9 (--clip-grad-value; after the norm clip it "
                       "binds only where one element carries over 5 % of the squared norm, 0.9² / 4²), batch 256; its "
                       "learning rate is 2e-3 by default and 2e-4 in its README's example (3 layers), 2e-3 here as in "
                       "our notes of the paper; the 200 warm-up epochs from 0 and the 2000 epochs are in that example "
                       "too. Where "
                       "this model differs from that code's settings: its batch normalisation also on the μ and σ² "
                       "maps, variances by softplus with 1e-5 added inside the log, the bottom-up path through each "
                       "layer's μ̂ (only_mu_up), and q's top-down networks separate from p's (ladder_share_params "
                       "False; here shared, as issue 21 asks); batch normalisation before each deterministic layer's "
                       "nonlinearity in both paths, running averages at evaluation (that code collects them over the "
                       "training set)"),
        "fields": {"model": {"name": "hvae", "inference": "top-down", "latent": (64, 32, 16, 8, 4),
                             "hidden": ((512, 512), (256, 256), (128, 128), (64, 64), (32, 32)),
                             "activation": "leaky_relu", "init": "torch", "batch_norm": True},
                   "objective": {"name": "elbo", "samples": 1, "warmup_epochs": 200},
                   "train": {"batch_size": 256, "lr": 2e-3, "epochs": 2000, "adam_eps": 1e-4, "clip_grad_norm": 4.0,
                             "clip_grad_value": 0.9, **_COMPILED}},
    },
    "planar-80": {
        "about": "Rezende & Mohamed's VAE with 80 planar flow steps in q(z|x), 40 latents, one hidden layer of 400 "
                 "(paper: NLL ≤ 85.10)",
        "paper": (85.10, "Rezende & Mohamed 2015, Table 2, DLGM + NF (k = 80), −log p(x) ≤ 85.10"),
        "deviations": ("Adam 5e-4 instead of their RMSprop (lr 1e-5, momentum 0.9): at Adam 1e-3 training diverged "
                       "(NaN in epoch 5), 5e-4 is the largest of 1e-3, 5e-4, 2e-4, 1e-4 whose first 8 epochs on 20 000 "
                       "training digits stayed finite (benchmarks/README.md); each step's gradient clipped to norm "
                       "200 (--clip-grad-norm; the paper does not clip): without it a run diverged in epoch 155 on one "
                       "batch's gradient of norm 3370 (train ELBO −2189 after −97.6), with it the same run went on "
                       "(README; typical norms 65–115, about 1 step in 500 clipped); 500 000 updates of batch 100 are 833 "
                       "epochs of 60 000 digits; their annealed free energy (β from 0.01 to 1 over 10 000 updates) "
                       "as a 17-epoch warm-up from 0; tanh hidden units (the unit of the paper's deterministic layer "
                       "is not checked against its text)"),
        "fields": {"model": {"name": "mlp", "hidden": ((400,),), "latent": (40,), "activation": "tanh",
                             "init": "glorot", "flow": "planar", "flow_steps": 80},
                   "objective": {"name": "elbo", "samples": 1, "warmup_epochs": 17},
                   "train": {"batch_size": 100, "lr": 5e-4, "epochs": 833, "clip_grad_norm": 200.0, **_COMPILED}},
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
    data subset, threads, engine (the same gradient to float rounding) or data directory)."""
    if config.preset not in PRESETS:
        return []
    base = apply_preset(config.__class__(), config.preset)
    ignored = ("train.threads", "train.engine", "data.data_dir", "train.epochs", "data.train_examples",
               "data.test_examples")
    return [d.split(":")[0] for d in base.differences(config) if d.split(":")[0] not in ignored]


# what the * of ``preset_label`` means, said wherever a table shows one (until 2026-12-07 `vaelab runs` alone did:
# compare's table, page and pasted tables showed "seed*" unexplained)
CHANGED_MARK = "* the run's flags changed fields of its preset (`vaelab report RUN` lists them)"


def changed_mark(labels) -> str | None:
    """``CHANGED_MARK`` where one of the ``preset_label`` labels carries the *, else None."""
    return CHANGED_MARK if any("*" in label for label in labels) else None


def preset_label(config) -> str:
    """The preset's name, with * when flags changed its fields, after the model's name where they changed that
    ('hvae (seed*)'); the model's name for runs without a preset."""
    if config.preset is None:
        return config.model.name
    changed = changed_fields(config)
    label = config.preset + ("*" if changed else "")
    return f"{config.model.name} ({label})" if "model.name" in changed else label
