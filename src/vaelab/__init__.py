"""vaelab: variational autoencoders and Laplace approximations, fast and checked.

Modules: data (MNIST), models (the registry of model families), objectives (ELBO, IWAE, KL), engines,
training, evaluation, laplace, report, runs, plots, cli. Importing vaelab does no work: ``load_run`` and
``train`` (vaelab.api) are imported on first use.
"""

__version__ = "0.2.0"
__all__ = ["load_run", "train", "Run", "__version__"]


def __dir__() -> list[str]:
    """What tab completion offers: the API and the modules (imported on first use)."""
    return sorted({*__all__, *_MODULES, *(n for n in globals() if n.startswith("__"))})


_MODULES = ("api", "checkpoint", "cli", "config", "data", "distributed", "engines", "errors", "evaluation", "laplace",
            "models", "objectives", "plots", "precision", "presets", "report", "resources", "runs", "schedules",
            "training")


def __getattr__(name: str):
    if name in ("load_run", "train", "Run"):
        from vaelab import api

        return getattr(api, name)
    if name in _MODULES:
        import importlib

        return importlib.import_module(f"vaelab.{name}")
    raise AttributeError(f"module 'vaelab' has no attribute {name!r}")
