"""The Python API: ``vaelab.load_run(path)`` and ``vaelab.train(...)`` for notebooks and scripts (README
shows an example, which tests/test_report.py runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab.runs import RunInfo, read_run


class Run:
    """A run directory: its config, metrics, status and evaluations, and its model (loaded on first use)."""

    def __init__(self, path: str | Path, checkpoint: str = "last"):
        self.info: RunInfo = read_run(path)
        self.checkpoint = checkpoint
        self._model = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}: {self.config.model.name}, {self.status}, {self.epochs_done} epochs)"

    path = property(lambda self: self.info.path)
    config = property(lambda self: self.info.config)
    metrics = property(lambda self: self.info.metrics)
    status = property(lambda self: self.info.status)
    epochs_done = property(lambda self: self.info.epochs_done)
    evaluations = property(lambda self: self.info.evaluations)

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            from vaelab import checkpoint as ckpt
            from vaelab.training import BEST_WEIGHTS

            weights = BEST_WEIGHTS if self.checkpoint == "best" else ckpt.WEIGHTS
            self._model = ckpt.load_model(self.path, weights=weights)[1]
        return self._model

    @staticmethod
    def _pixels(x: Any) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
        return x.reshape(-1, 784)

    @torch.no_grad()
    def encode(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z₁|x) for binary digits x (B, 784) or (B, 28, 28)."""
        return self.model.encode(self._pixels(x))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder means sigmoid(logits) of p(x|z₁) for z₁ (B, d₁)."""
        return torch.sigmoid(self.model.decode(torch.as_tensor(z, dtype=torch.float32)))

    def sample(self, n: int = 64, seed: int = 0) -> torch.Tensor:
        """Decoder means of n draws from p(z): (n, 784)."""
        return self.model.sample(n, torch.Generator().manual_seed(seed))

    def log_likelihood(self, x: Any, k: int = 5000, seed: int = 0) -> np.ndarray:
        """IWAE-K estimates of log p(x) per digit (nats), as `vaelab evaluate` computes them."""
        from vaelab.evaluation import EvalConfig, iwae_log_likelihood

        return iwae_log_likelihood(self.model, self._pixels(x), EvalConfig(k=k, seed=seed)).numpy()


def load_run(path: str | Path, checkpoint: str = "last") -> Run:
    """The run in ``path``; ``checkpoint="best"`` uses the weights with the best validation ELBO."""
    return Run(path, checkpoint)


def train(config=None, *, out: str | Path | None = None, progress: bool = False, **flags) -> Run:
    """Train as `vaelab train` does and return the run.

    ``config``: a RunConfig, or a dict as in config.json; or leave it out and give the command's flags as
    keyword arguments (``preset="burda-vae-1", epochs=10, hidden=[200, 200], validation=10000``), validated
    exactly as on the command line. ``out``: the run directory (default runs/<timestamp>).
    """
    from vaelab.cli import _new_run, build_parser
    from vaelab.config import RunConfig
    from vaelab.distributed import SINGLE
    from vaelab.errors import UsageError

    if config is not None and flags:
        raise UsageError(f"vaelab.train: give a config or flags ({', '.join(flags)}), not both")
    if isinstance(config, dict):
        config = RunConfig.from_dict(config, "the config given to vaelab.train")
    argv = ["train"] + (["--out", str(out)] if out is not None else []) + ([] if progress else ["--no-progress"])
    for name, value in flags.items():
        option = "--" + name.replace("_", "-")
        if value is True:
            argv.append(option)
        elif value is not False and value is not None:
            argv += [option, *map(str, value if isinstance(value, (list, tuple)) else [value])]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        raise UsageError(f"vaelab.train: invalid arguments {flags} (see `vaelab train --help`)") from exc
    paths: list[Path] = []
    _new_run(args, SINGLE, config=None if config is None else config.validate(), claimed_dir=paths)
    return Run(paths[0])
