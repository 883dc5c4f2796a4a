"""The Python API: ``vaelab.load_run(path)`` and ``vaelab.train(...)`` for notebooks and scripts (README
shows an example, which tests/test_report.py runs).

Everything returns torch tensors (float32 from the model, float64 for the per-digit log-likelihoods, which
are sums over thousands of draws), on the CPU. Bad arguments raise ``vaelab.errors.UsageError``, a
``ValueError`` whose message names the argument in the API's own terms (``epochs=``, not ``--epochs``).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import random
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab.errors import TrainingDiverged, UsageError
from vaelab.runs import RunInfo, pictured_weights, read_run

CHECKPOINTS = ("last", "best")


def in_api_terms(message: str) -> str:
    """A message written for the command line, in the API's terms: ``argument --epochs:`` → ``epochs:``, a switch
    ``--resume`` → ``resume=True`` (``--no-batch-norm`` → ``batch_norm=False``), a flag with its number, placeholder,
    quoted name or one of its choices ``--lr 0.5`` → ``lr=0.5``, ``--validation N`` → ``validation=N``,
    ``--engine fused`` → ``engine='fused'`` (until 2026-12-06 "engine= fused covers only …"), any other ``--out``
    → ``out=``."""
    from vaelab.config import DEVICE_NAMES
    from vaelab.sweep import train_actions

    actions = {option: action for action in train_actions().values() for option in action.option_strings}
    message = re.sub(r"argument --([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), message)

    def call(match: re.Match) -> str:
        """A whole command to paste, `vaelab train --out RUN --resume --lr X` → `vaelab.train(out='RUN',
        resume=True, lr=X)` (until 2026-12-07 "vaelab train out= RUN resume=True lr=X"; a diverged or stopped run's
        message named the command itself)."""
        words, arguments = shlex.split(match.group(1)), []
        while words:
            flag = words.pop(0)
            action = actions.get(flag)
            name = action.dest if action is not None else flag[2:].replace("-", "_")
            if action is not None and action.nargs == 0:
                arguments.append(f"{name}={flag[2:] == action.dest.replace('_', '-')}")     # --no-batch-norm: False
            elif words:
                value = words.pop(0)
                literal = re.fullmatch(r"-?[0-9][0-9.e+-]*|[A-Z][A-Z_]*", value)   # a number or a placeholder
                arguments.append(f"{name}={value if literal else repr(value)}")
        return f"vaelab.train({', '.join(arguments)})"

    # a value: a quoted word (``tables.shell_word``: shlex.quote's, of 'parts' and "'" where the path holds a quote;
    # until 2026-12-07 "--out 'it'"'"'s run'" became "out='it')"'"'s run' resume=True") or a word without the
    # sentence's punctuation after it; none after a switch, where the next word is the sentence's ("… --resume draws
    # them again" lost its "draws" until 2026-12-07)
    switches = "|".join(re.escape(option) for option, action in actions.items() if action.nargs == 0)
    message = re.sub(rf"\bvaelab train((?: (?:(?:{switches})(?![a-z0-9-])|--[a-z][a-z0-9-]*(?: (?!--)(?:(?:'[^']*'|"
                     rf"\"'\")+|[^\s;,()`']+))?))+)", call, message)

    def keyword(match: re.Match) -> str:
        flag, value = match.group(1), match.group(2)
        action = actions.get(flag)
        name = action.dest if action is not None else flag[2:].replace("-", "_")
        if value is not None and not value[0].islower():            # a number, a placeholder, a quoted name
            return f"{name}={value}"
        if value is not None and action is not None and (value in (action.choices or ()) or
                                                         name == "device" and DEVICE_NAMES.fullmatch(value)):
            return f"{name}={value!r}"            # a device is a choice without a list (it read "device= cuda")
        rest = "" if value is None else f" {value}"
        if action is not None and action.nargs == 0 or flag in ("--overwrite", "--laplace"):    # switches
            negated = action is not None and flag[2:] != action.dest.replace("_", "-")     # --no-batch-norm
            return f"{name}={not negated}{rest}"
        return f"{name}={rest}"

    def values(match: re.Match) -> str:
        """A flag of several values with them, as the list the keyword takes: ``--hidden W W`` → ``hidden=[W, W]``,
        ``--blocks 512,512 256`` → ``blocks=[[512, 512], [256]]`` (until 2026-12-07 "hidden=W W", "latent= d₁ …")."""
        action = actions.get(match.group(1))
        if action is None or action.nargs not in ("+", "*"):
            return match.group(0)
        blocks = action.type is not None and isinstance(action.type("1"), tuple)     # a list of widths each (--blocks)
        items = [f"[{', '.join(word.split(','))}]" if blocks else word for word in match.group(2).split()]
        return f"{action.dest}=[{', '.join(items)}]"

    message = re.sub(r"(--[a-z][a-z0-9-]*)((?: (?:[0-9]+(?:,[0-9]+)*|[A-Z]|d[₀-₉]+|d_L|…)(?![\w.]))+)", values,
                     message)
    return re.sub(r"(--[a-z][a-z0-9-]*)(?: (-?[0-9][0-9.e+-]*|[A-Z][A-Z_]*\b|'[^']*'|[a-z][a-z0-9_:-]*[a-z0-9]))?",
                  keyword, message)


class Run:
    """A run directory: its config, metrics, status and evaluations, and its model (loaded on first use).

    ``evaluations`` are the records of `vaelab evaluate`, each with ``stale``: True where the weights it measured
    are no longer the run's (it was trained further since), so its numbers do not describe this model."""

    def __init__(self, path: str | Path, checkpoint: str = "last"):
        from vaelab.training import BEST_WEIGHTS

        if checkpoint not in CHECKPOINTS:
            raise UsageError(f"checkpoint={checkpoint!r}: choose one of {', '.join(map(repr, CHECKPOINTS))}")
        self.info: RunInfo = read_run(path)
        if checkpoint == "best" and not (self.info.path / BEST_WEIGHTS).exists():
            raise UsageError(f"checkpoint='best': {self.info.path} has no {BEST_WEIGHTS} (best weights are kept only "
                             f"by runs trained with validation=N); use checkpoint='last'")
        self.checkpoint = checkpoint
        self._model = None
        self._weights: str | None = None

    def __repr__(self) -> str:
        from vaelab.tables import plural

        return f"Run({str(self.path)!r}: {self.config.model.name}, {self.status}, {plural(self.epochs_done, 'epoch')})"

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
            # building the modules initialises their weights from torch's global stream, then the file replaces
            # them: the caller's stream is put back (until 2026-12-06 opening a run moved it on by that draw)
            with torch.random.fork_rng(devices=[]):
                _, self._model, loaded = ckpt.load_model_weights(self.path, weights=weights)
            self._weights = pictured_weights(loaded, self.info)
        return self._model

    @property
    def weights(self) -> str:
        """Which weights ``model`` holds, e.g. 'model.safetensors after epoch 12' (loading them if not yet): read
        from the file itself, so a run that trained on after it was opened is not mislabelled."""
        self.model
        return self._weights

    @staticmethod
    def _pixels(x: Any) -> torch.Tensor:
        """Digits as (B, 784) float32: from (B, 784), (B, 28, 28), (B, 1, 28, 28) (torch's image batches, one
        channel), one (784,), (28, 28) or (1, 28, 28) digit; values in [0, 1]."""
        x = _real_tensor(x, "x", "digits")
        shape = tuple(x.shape)
        if shape in ((784,), (28, 28), (1, 28, 28)):
            x = x.reshape(1, 784)
        elif len(shape) == 2 and shape[1] == 784 or len(shape) == 3 and shape[1:] == (28, 28) or \
                len(shape) == 4 and shape[1:] == (1, 28, 28):
            x = x.reshape(-1, 784)
        else:
            raise UsageError(f"x must hold 784 pixels per digit, shaped (B, 784), (B, 28, 28) or (B, 1, 28, 28); got "
                             f"shape {shape}")
        if len(x) == 0:
            raise UsageError("x holds no digits (shape (0, 784)); pass at least one")
        if not bool(((x >= 0) & (x <= 1)).all()):
            nan = x.isnan()
            found = [f"{int(nan.sum())} NaN"] if bool(nan.any()) else []
            if not bool(nan.all()):
                low, high = float(x[~nan].min()), float(x[~nan].max())
                found.insert(0, f"values from {low:g} to {high:g}" + (
                    " (bytes 0 … 255? divide by 255)" if high > 1 and low >= 0 and bool((x[~nan] % 1 == 0).all())
                    else ""))
            raise UsageError("x must hold pixel values in [0, 1] (binary digits, or probabilities); found "
                             + " and ".join(found))
        return x

    def _require_rows(self, rows: int, what: str, fix: str) -> None:
        """Refuse, before allocating, a batch of ``rows`` digits or draws whose working memory cannot fit."""
        from vaelab.evaluation import row_bytes
        from vaelab.resources import require_memory

        require_memory(rows * row_bytes(self.config.model) + (64 << 20), what, fix,
                       next(self.model.parameters()).device)

    @torch.no_grad()
    def encode(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of the Gaussian q(z₁|x), each (B, d₁), for digits x (B, 784) or (B, 28, 28). Where a flow
        follows it (``--flow``), q(z₁|x) is not Gaussian and these are its base q₀(z₀|x), before the flow's steps
        (decoding μ₀ skips the flow: ``reconstruct`` goes through it); in a hierarchy whose q(z₁|·) depends on the
        layer above (``--inference top-down``, the two-layer tomczak), q(z₁|·) with every layer above at its mean."""
        x = self._pixels(x)
        self._require_rows(len(x), f"encode of {len(x)} digits", "pass fewer digits at a time")
        return self.model.encode(x)

    @torch.no_grad()
    def decode(self, z: Any) -> torch.Tensor:
        """Decoder means sigmoid(logits) of p(x|z) for the latents of every layer, bottom first (B, D), or of the
        first layer alone (B, d₁) where p(x|·) depends on z₁ alone (every model but the two-layer tomczak): (B, 784)."""
        z = _real_tensor(z, "z", "latents")
        sizes = self.config.model.latent
        alone = hasattr(self.model, "decode")
        if z.ndim != 2 or z.shape[1] not in (sum(sizes), *((sizes[0],) if alone else ())):
            shapes = f"(B, {sum(sizes)})" + (f" or (B, {sizes[0]})" if alone and len(sizes) > 1 else "")
            raise UsageError(f"z must be latents shaped {shapes}; got shape {tuple(z.shape)}")
        if not bool(torch.isfinite(z).all()):
            raise UsageError(f"z must be finite; it holds {int((~torch.isfinite(z)).sum())} infinite or NaN values")
        self._require_rows(len(z), f"decode of {len(z)} latents", "pass fewer latents at a time")
        return torch.sigmoid(self.model.decode_latents(z) if z.shape[1] == sum(sizes) else self.model.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: Any) -> torch.Tensor:
        """Decoder means sigmoid(logits) of p(x|z) at z = every layer's mean under q, each through its flow where it
        has one (z_T = f_T ∘ … ∘ f₁(μ₀)): (B, 784), what the run's reconstructions.png and its report show."""
        from vaelab.evaluation import reconstructions

        x = self._pixels(x)
        self._require_rows(len(x), f"reconstruct of {len(x)} digits", "pass fewer digits at a time")
        return reconstructions(self.model, x)

    def sample(self, n: int = 64, seed: int = 0) -> torch.Tensor:
        """Decoder means of n draws from p(z): (n, 784)."""
        _check_count("n", n, 1)
        _check_count("seed", seed, 0)
        self._require_rows(n, f"sample(n={n})", "use a smaller n, or draw in parts with different seeds")
        return self.model.sample(n, torch.Generator().manual_seed(seed))

    def log_likelihood(self, x: Any, k: int = 5000, seed: int = 0) -> torch.Tensor:
        """IWAE-K estimates of log p(x) per digit (nats), as `vaelab evaluate` computes them: (B,) float64. The
        digits must be binary: p(x|z) is a Bernoulli likelihood, and of grey values it would be a cross-entropy."""
        from vaelab.evaluation import EvalConfig, iwae_log_likelihood
        from vaelab.resources import require_memory

        _check_count("k", k, 1)
        _check_count("seed", seed, 0)
        pixels = self._pixels(x)
        if not bool(((pixels == 0) | (pixels == 1)).all()):
            raise UsageError("log_likelihood needs binary digits (pixels 0 or 1): the model's p(x|z) is Bernoulli, and "
                             "of grey values it would give a cross-entropy, not log p(x); binarise them first, e.g. "
                             "(x > 0.5).float() or torch.bernoulli(x)")
        config = EvalConfig(k=k, seed=seed)
        device = next(self.model.parameters()).device
        require_memory(config.memory_bytes(self.config.model, device, len(pixels)), f"log_likelihood(k={k})",
                       "use a smaller k", device)
        return iwae_log_likelihood(self.model, pixels, config)


def _real_tensor(value: Any, name: str, what: str) -> torch.Tensor:
    """``value`` (an array, tensor or nested lists of real numbers) as a float32 tensor; anything else is refused."""
    try:
        array = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{name} must be {what} as an array or tensor of numbers, got {type(value).__name__}") from exc
    if array.is_complex() or not (array.is_floating_point() or array.dtype in (torch.bool, torch.uint8, torch.int8,
                                                                                torch.int16, torch.int32, torch.int64)):
        raise UsageError(f"{name} must be {what} as real numbers, got {type(value).__name__} of {array.dtype}")
    return array.to(torch.float32)


def _check_count(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value < 2**63:
        # (the line said "≥ 0" of 2⁷⁰)
        raise UsageError(f"{name} must be a whole number ≥ {low} and below 2⁶³, got {value!r}")


def load_run(path: str | Path, checkpoint: str = "last") -> Run:
    """The run in ``path``; ``checkpoint="best"`` uses the weights with the best validation ELBO."""
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"vaelab.load_run: path must be a run directory (str or pathlib.Path), got "
                         f"{type(path).__name__}")
    return Run(path, checkpoint)


@contextlib.contextmanager
def _callers_state_kept():
    """The trainer seeds torch's, NumPy's and Python's global random streams (the weights are initialised from
    torch's) and sets torch's thread count, as the command may in a process of its own; in a caller's process all
    four are put back as they were when training ends, however it ends (until 2026-12-06 they stayed as training
    left them: every `vaelab.train` reseeded the caller's np.random and random with the run's seed)."""
    threads = torch.get_num_threads()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    # CUDA's generators too where training may draw on them (fork_rng reads each device's state: only once CUDA is up)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        torch.set_num_threads(threads)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def train(config=None, *, out: str | Path | None = None, resume: bool = False, progress: bool = False,
          **flags) -> Run:
    """Train as `vaelab train` does and return the run.

    ``config``: a RunConfig, or a dict as in config.json; or leave it out and give the command's flags as
    keyword arguments (``preset="burda-vae-1", epochs=10, hidden=[200, 200], validation=10000``), validated
    exactly as on the command line. ``out``: the run directory (default runs/<timestamp>). ``resume=True``
    continues the run in ``out`` from its checkpoint (``epochs=`` may raise its length).
    """
    from vaelab import checkpoint as ckpt
    from vaelab.cli import RaisingParser, _new_run, _resume, build_parser, notes_in
    from vaelab.config import RunConfig
    from vaelab.distributed import SINGLE
    from vaelab.sweep import flags_of, train_actions
    from vaelab.training import Interrupted

    if config is not None and not isinstance(config, (dict, RunConfig)):
        raise UsageError(f"vaelab.train: config must be a RunConfig or a dict as in config.json, got "
                         f"{type(config).__name__}" + (f"; for a preset pass preset={config!r}"
                                                       if isinstance(config, str) else ""))
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise UsageError(f"vaelab.train: out must be a path (str or pathlib.Path), got {type(out).__name__}")
    if config is not None and flags:
        raise UsageError(f"vaelab.train: give a config or flags ({', '.join(flags)}), not both")
    if config is not None and resume:
        raise UsageError("vaelab.train: resume=True continues the run in out= with its own config; pass no config")
    if resume and out is None:
        raise UsageError("vaelab.train: resume=True needs out=, the run directory to continue")
    if out is not None and not resume and ckpt.is_run(Path(out)):
        raise UsageError(f"vaelab.train: out={str(out)!r} already holds a run: open it with "
                         f"vaelab.load_run({str(out)!r}), continue it with resume=True (and a larger epochs=), "
                         f"or pass another out=")
    if isinstance(config, dict) and "version" not in config:    # flags written as a dict, {"lr": 1e-3}: not a config
        shown = ", ".join(f"{name}={value!r}" for name, value in config.items())
        raise UsageError(f"vaelab.train: a config dict is a whole config.json (its \"version\" and sections, "
                         f"json.load of a run's config.json, or vaelab.config.RunConfig().to_dict()); for the "
                         f"command's flags pass keywords: vaelab.train({shown})")
    if isinstance(config, dict):
        config = RunConfig.from_dict(config, "the config given to vaelab.train")
    # each keyword by its whole name, as Python takes keywords (until 2026-12-06 the parser's prefixes passed:
    # epoch=1 trained --epochs 1, and a keyword that a new flag makes ambiguous would have broken a script)
    unknown = [name + "".join(f" ({close}?)" for close in difflib.get_close_matches(name, train_actions(), 1))
               for name in flags if name not in train_actions()]
    if unknown:
        raise UsageError(f"vaelab.train: unknown keyword argument{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                         f"the keywords are the flags that `vaelab train` lists, with _ for - (help(vaelab.train))")
    # the flags as the sweep writes a trial's (until 2026-12-06 batch_norm=False was dropped, so that
    # preset="ladder-5" trained with batch norm; blocks=[[512, 512], …] and out="-run" did not parse)
    argv = ["train"] + ([f"--out={out}"] if out is not None else []) + (["--resume"] if resume else []) \
        + ([] if progress else ["--no-progress"]) + flags_of(flags)
    paths: list[Path] = []
    try:
        args = build_parser(RaisingParser).parse_args(argv)
        with _callers_state_kept(), notes_in(in_api_terms):
            if resume:
                _resume(args, SINGLE)
                paths.append(Path(out))
            else:
                _new_run(args, SINGLE, config=None if config is None else config.validate(), claimed_dir=paths)
    except (TrainingDiverged, Interrupted) as exc:     # the command to go on with, in the API's terms
        retold = type(exc).__new__(type(exc))
        retold.__dict__.update(exc.__dict__)
        retold.args = (f"vaelab.train: {in_api_terms(str(exc))}",)
        raise retold from None
    except UsageError as exc:
        message = str(exc)
        several = [f"{name}={value!r}" for name, value in flags.items() if isinstance(value, (list, tuple))]
        if message.startswith("unrecognized arguments:") and several:     # (unknown keywords are refused above)
            message = f"{' or '.join(several)}: more values than the flag takes; give one value"
        raise type(exc)(f"vaelab.train: {in_api_terms(message)}") from None
    return Run(paths[0])
