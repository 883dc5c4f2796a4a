"""vaelab: variational autoencoders and Laplace approximations, fast and checked.

Modules: data (MNIST), models (the registry of model families), objectives (ELBO, IWAE, KL), engines,
training, evaluation, gaps (the inference gaps), laplace, report, runs, plots, sweep, cli. Importing vaelab does
no work: ``load_run`` and ``train`` (vaelab.api) and the modules are imported on first use.
"""

__version__ = "0.2.0"
__all__ = ["load_run", "train", "Run", "__version__"]


def __dir__() -> list[str]:
    """What tab completion offers: the API and the modules (imported on first use)."""
    return sorted({*__all__, *_modules(), *(n for n in globals() if n.startswith("__"))})


def _modules() -> list[str]:
    """vaelab's modules, read from its directory when asked (until 2026-12-06 a list kept by hand, which lacked gaps,
    sweep and others: `vaelab.gaps` was an AttributeError after `import vaelab`)."""
    import pkgutil

    return [module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_")]


def __getattr__(name: str):
    if name in ("load_run", "train", "Run"):
        from vaelab import api

        return getattr(api, name)
    if name in _modules():
        import importlib

        return importlib.import_module(f"vaelab.{name}")
    raise AttributeError(f"module 'vaelab' has no attribute {name!r}")
