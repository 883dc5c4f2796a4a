"""The ``vaelab`` command line: train, evaluate, sample, presets, data, stirling.

All argument parsing lives here. Every failure the user can fix is one line on stderr: bad arguments,
bad run directories and sizes that cannot fit exit with status 2 (nothing written), a stop signal with
128 + its number (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP): a training after a checkpoint, any other
command with no file half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import decimal
import difflib
import errno
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from vaelab.errors import TrainingDiverged, UsageError, VaelabError
from vaelab.tables import one_line, plural, shell_word, text_table

MAX_SAMPLE_GRID = 4096          # samples in one picture: 512 rows of 8 digits, ≈ 37 000 pixels tall
TABLE_FORMATS = ("text", "latex", "markdown", "csv")


def _path_arg(value: str) -> Path:
    """A path given on the command line; an empty one (`--out ""`, an unset shell variable) is refused: Path('')
    would be the current directory, where `report --figures ""` wrote its 90 files and `data` its cache."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"{value!r} is {'a blank' if value else 'an empty'} path (an unset shell "
                                         f"variable?); give a path, or leave the argument out where it has a default")
    from vaelab.atomic import path_problem           # (not vaelab.data: parsing an argument imports no torch)

    problem = path_problem(value) or _name_too_long(Path(value))
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return Path(value)


def _name_too_long(path: Path) -> str | None:
    """Why ``path`` cannot be a file here, where a name in it is longer than its file system takes (NAME_MAX, 255
    bytes on Linux's; the OS said "File name too long", exit 1, only when it was made); None where it can."""
    import os

    existing = path.absolute()
    while existing != existing.parent:
        try:
            if existing.exists():
                break
        except OSError:                  # a name too long itself
            pass
        existing = existing.parent
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            shown = part if len(part) <= 24 else f"{part[:12]}…{part[-8:]}"
            return (f"the name {shown!r} in it is {size} bytes long, and a file's name may have at most {name_max} "
                    f"here; give a shorter name")
    return None


class _Parser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        self._words = list(sys.argv[1:] if args is None else args)     # (a subcommand's parser gets its own words)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):
        """Words no flag of the command takes are the command's error, with the flag meant where one is close
        (until 2026-12-07 "vaelab: error: unrecognized arguments: --K 5", as if of no command)."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            subparsers = [action for action in self._actions if isinstance(action, argparse._SubParsersAction)]
            parser = subparsers[0].choices.get(getattr(namespace, "command", None), self) if subparsers else self
            flags = {flag.lstrip("-").lower(): flag for flag in parser._option_string_actions if flag.startswith("--")}
            meant = [f"{flags[close[0]]} (for {word.split('=')[0]})" for word in extras if word.startswith("-") and (
                close := difflib.get_close_matches(word.split("=")[0].lstrip("-").lower(), flags, 1))]
            parser.error(f"unrecognized arguments: {' '.join(extras)}" + (f"; did you mean {', '.join(meant)}?"
                                                                          if meant else ""))
        return namespace

    def error(self, message: str):  # one line, status 2
        self.exit(2, f"{self.prog}: error: {message}{self._dash_value(message)}\n")

    def _dash_value(self, message: str) -> str:
        """argparse reads a word that begins with a dash and is no negative number as a flag: `--beta -inf`,
        `--lr -1e-3`, `--out -run` end in "expected one argument" as though no value were given (until 2026-12-06
        with nothing more). Where the word after the flag is not one of the command's flags, say how to pass it."""
        match = re.fullmatch(r"argument (--[a-z0-9-]+): expected (?:one|at least one) argument", message)
        words = getattr(self, "_words", [])
        if match is None or match.group(1) not in words:
            return ""
        at = len(words) - 1 - words[::-1].index(match.group(1))
        value = words[at + 1] if at + 1 < len(words) else ""
        if not re.match(r"-[^-]", value) or value in self._option_string_actions:      # (`--lr --seed 1`: no value)
            return ""
        return f"; {value} begins with a dash, so it was read as a flag: write it {match.group(1)}={value}"


class RaisingParser(argparse.ArgumentParser):
    """For the Python API: a bad argument raises UsageError carrying argparse's reason (nothing printed)."""

    def error(self, message: str):
        raise UsageError(message)


def _whole_number(low: int, high: int = 2**63):
    """An argparse type for whole numbers in [low, high)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            # whole numbers in scientific notation too (1e6, 2.5E3), exactly: Decimal, not float
            try:
                number = decimal.Decimal(text.strip())
            except decimal.InvalidOperation:
                number = None
            if number is None or not number.is_finite() or number != number.to_integral_value():
                raise argparse.ArgumentTypeError(f"expected a whole number ≥ {low} (e.g. 1000 or 1e3), "
                                                 f"got {text!r}") from None
            value = int(number) if number.adjusted() <= 40 else high      # 1e999999: out of range, not built
        if not low <= value < high:
            most = high - 1
            power = len(str(most)) - 1 if most >= 10**6 and most == 10 ** (len(str(most)) - 1) else None
            shown = f"10{''.join(SUPERSCRIPTS[int(d)] for d in str(power))}" if power else str(most)   # 10¹⁸
            upper = " and below 2⁶³" if high == 2**63 else f" and at most {shown}"
            raise argparse.ArgumentTypeError(f"must be at least {low}{upper}, got {text}")
        return value

    return parse


_positive_int = _whole_number(1)
_non_negative_int = _whole_number(0)


def _model_field(bounds: tuple[int, int]):
    """The argparse type of a model field whose bounds (inclusive) ModelConfig.validate checks."""
    low, high = bounds
    return _whole_number(low, high + 1)


def _number(low: float, strict: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            exact = decimal.Decimal(text.strip().replace("_", ""))
        except decimal.InvalidOperation:        # (float's own spellings beyond Decimal's: '٣')
            exact = None
        if exact is not None and exact.is_finite() and exact != 0 and (value == 0 or not math.isfinite(value)):
            # 1e-400 is 0 and 1e400 inf as a float: until 2026-12-06 `--clip-grad-norm 1e-400` turned clipping off
            # (0), and `--adam-eps 1e-400` said "must be a finite number > 0, got 1e-400"
            raise argparse.ArgumentTypeError(f"got {text}, which a 64-bit float holds as {value:g}; give a number "
                                             f"between 1e-300 and 1e300 in size")
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '≥'} {low:g}, got {text}")
        return value

    return parse


_positive_float = _number(0.0, strict=True)
_non_negative_float = _number(0.0, strict=False)


def _widths(text: str) -> tuple[int, ...]:
    """One block of hidden widths, 'W' or 'W,W,…' (each a whole number ≥ 1)."""
    parts = text.split(",")
    widths = tuple(_positive_int(part) for part in parts if part.strip())
    if len(widths) != len(parts):
        raise argparse.ArgumentTypeError(f"expected widths separated by commas, like 512,512, got {text!r}")
    return widths


def _json_record(text: str) -> Path:
    """An evaluation record's path: JSON, named so (the runs' records are found as eval*.json)."""
    if not text.lower().endswith(".json"):
        raise argparse.ArgumentTypeError(f"the record is JSON: give a file name ending in .json, got {text!r}")
    return _path_arg(text)


def _device(text: str) -> str:
    from vaelab.config import DEVICE_NAMES

    if DEVICE_NAMES.fullmatch(text):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N")


# each command's line in `vaelab --help`
COMMANDS = {
    "train": "train a VAE (default: the seed preset, the reference setting)",
    "evaluate": "test log-likelihood by importance sampling, the ELBO, active units",
    "sample": "a grid of decoder means for z ~ p(z)",
    "presets": "list the presets and their fields",
    "report": "a self-contained HTML report of a run, or of a sweep",
    "compare": "compare runs: a table here and an HTML page",
    "sweep": "a hyperparameter search on the validation split (Optuna), resumable",
    "runs": "list the runs under a directory",
    "data": "fetch and verify MNIST, print where it lives",
    "stirling": "Stirling's formula from Laplace's method: a table of errors",
}


def build_parser(parser_class: type[argparse.ArgumentParser] = _Parser,
                 commands_only: bool = False) -> argparse.ArgumentParser:
    """The parser of every command. ``commands_only``: the commands without their flags, all that `vaelab --help`,
    `vaelab --version` or a mistyped command needs: the flags' choices come from the registries of models, engines
    and precisions, which import torch (1.3 s of a 1.5 s start; until 2026-12-07 `vaelab --version` took it)."""
    from vaelab import __version__

    parser = parser_class(prog="vaelab", description="Variational autoencoders on binarised MNIST, and Laplace's method.")
    parser.add_argument("--version", action="version", version=f"vaelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=parser_class)
    commands = {name: sub.add_parser(name, help=text) for name, text in COMMANDS.items()}
    if commands_only:
        return parser
    from vaelab.engines import ENGINE_CHOICES
    from vaelab.laplace import MAX_STIRLING_TERMS
    from vaelab.models import ACTIVATIONS, FIELD_RANGES, FLOWS, INFERENCE, INITS, MODELS, PRIORS
    from vaelab.models.priors import DEFAULT_COMPONENTS
    from vaelab.objectives import OBJECTIVES
    from vaelab.optimizers import OPTIMIZERS
    from vaelab.precision import PRECISIONS
    from vaelab.presets import PRESETS
    from vaelab.schedules import LR_SCHEDULES
    from vaelab.sweep import MAX_TRIALS

    train = commands["train"]
    train.add_argument("--out", type=_path_arg, help="run directory (default runs/<timestamp>, made unique)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--preset", choices=list(PRESETS), help="start from a named configuration "
                       "(default seed; explicit flags override its fields; see `vaelab presets`)")
    group = train.add_argument_group("model")
    group.add_argument("--model", choices=list(MODELS), help="mlp: one stochastic layer; mlp2: two (Burda); hvae: "
                       "any number, --inference bottom-up or top-down (Ladder VAE); tomczak: the VampPrior paper's "
                       "VAE (one layer) and HVAE (two)")
    group.add_argument("--hidden", type=_positive_int, nargs="+", metavar="W",
                       help="widths of the hidden layers between x and z₁ (default 256)")
    group.add_argument("--hidden-top", type=_positive_int, nargs="+", metavar="W",
                       help="widths of the hidden layers between z₁ and z₂ (two-layer models)")
    group.add_argument("--blocks", type=_widths, nargs="+", metavar="W[,W…]",
                       help="the hidden widths of every block, bottom first, one argument per stochastic layer "
                       "(e.g. --blocks 512,512 256,256 128,128 for three layers)")
    group.add_argument("--latent", type=_positive_int, nargs="+", metavar="D",
                       help="latent sizes, bottom first: one for mlp (default 50), two for mlp2, L ≥ 2 for hvae, "
                       "one or two for tomczak")
    group.add_argument("--inference", choices=list(INFERENCE), help="bottom-up (default: q(z₁|x) q(z₂|z₁) …) or "
                       "top-down (the Ladder VAE's precision-weighted merge; hvae)")
    group.add_argument("--activation", choices=list(ACTIVATIONS), help="hidden activation (default relu; gated: "
                       "gated dense layers, (W_h a + b) ⊙ sigmoid(W_g a + c))")
    group.add_argument("--init", choices=list(INITS), help="weight initialisation (default torch)")
    group.add_argument("--prior", choices=list(PRIORS), help="p(z) of the top layer: standard N(0, I) (default), "
                       "mog (a mixture of K learnt Gaussians) or vampprior (a mixture of q(z|u) at K learnt pseudo-inputs)")
    group.add_argument("--prior-components", type=_model_field(FIELD_RANGES["prior_components"]), metavar="K",
                       help=f"K of the mixture priors (default {DEFAULT_COMPONENTS}, as in the VampPrior paper)")
    group.add_argument("--flow", choices=list(FLOWS), help="a normalising flow in q(z|x): none (default), planar or "
                       "iaf (inverse autoregressive); bottom-up inference")
    group.add_argument("--flow-steps", type=_model_field(FIELD_RANGES["flow_steps"]), metavar="T",
                       help="steps of the flow (default 0)")
    group.add_argument("--flow-width", type=_model_field(FIELD_RANGES["flow_width"]), metavar="W",
                       help="hidden units of each IAF step (default 256)")
    group.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                       help="batch normalisation in every deterministic layer (the Ladder VAE's; hvae, mlp2; default off)")
    group = train.add_argument_group("objective")
    group.add_argument("--objective", choices=list(OBJECTIVES), help="elbo (default) or iwae")
    group.add_argument("--k", type=_whole_number(1, 100_001), help="draws per example (default 1)")
    group.add_argument("--beta", type=_non_negative_float, help="weight of the KL after warm-up (default 1)")
    group.add_argument("--warmup", type=_non_negative_int, metavar="EPOCHS",
                       help="KL warm-up: β rises linearly from 0 over this many epochs (default 0)")
    group = train.add_argument_group("optimisation")
    group.add_argument("--epochs", type=_positive_int, help="epochs to train (default 100)")
    group.add_argument("--batch-size", type=_positive_int, help="examples per step (default 64)")
    group.add_argument("--lr", type=_positive_float, help="Adam learning rate (default 1e-3)")
    group.add_argument("--lr-schedule", choices=list(LR_SCHEDULES),
                       help="constant (default); burda: lr · 10^(−i/7) for 3^i epochs; exponential: lr to lr/10 "
                       "over the run")
    group.add_argument("--adam-eps", type=_positive_float, help="Adam's ε (default 1e-8; Burda 1e-4)")
    group.add_argument("--optimizer", choices=list(OPTIMIZERS),
                       help="adam (default), or adam-normgrad: Adam on each tensor's gradient divided by its norm, "
                       "as Tomczak & Welling trained the VampPrior models (their AdamNormGrad)")
    group.add_argument("--clip-grad-norm", type=_non_negative_float, metavar="C",
                       help="rescale each step's gradient to Euclidean norm C where it is larger (default 0: never)")
    group.add_argument("--clip-grad-value", type=_non_negative_float, metavar="V",
                       help="then clamp each element of the gradient to ±V (default 0: never)")
    group.add_argument("--early-stopping", type=_non_negative_int, metavar="N",
                       help="stop once N epochs after the KL warm-up have passed without a better validation ELBO "
                       "(needs --validation; default 0: train every epoch); the best weights are kept either way")
    group.add_argument("--seed", type=_non_negative_int, help="seed of every random stream (default 0)")
    # the presets named from the table (until 2026-12-07 a list written here, without cpu-hour-vampprior)
    compiled = [name for name, preset in PRESETS.items()
                if preset["fields"].get("train", {}).get("engine") == "compiled"]
    group.add_argument("--engine", choices=ENGINE_CHOICES,
                       help="gradient code: auto (default: the hand-derived fast path where it applies, else "
                       "autograd); compiled: autograd's step compiled by torch.compile, fp32 or bf16 (needs a C++ "
                       f"compiler on the CPU; the default of the presets {', '.join(compiled[:-1])} and "
                       f"{compiled[-1]})")
    group.add_argument("--precision", choices=PRECISIONS, help="fp32 (default) or bf16: matrix products in "
                       "bfloat16, float32 weights, Adam, loss and reductions (refused where a timing shows bf16 emulated); bf16-emulated: "
                       "bf16's rounding with float32 products, to see whether bf16 would change a result")
    group = train.add_argument_group("data and machine")
    group.add_argument("--binarize", choices=["dynamic", "static"],
                       help="fresh Bernoulli pixels every epoch (default) or drawn once for the whole run (vaelab's "
                       "own draw, not Larochelle & Murray's binarized MNIST of the papers' static-MNIST numbers)")
    group.add_argument("--validation", type=_non_negative_int, metavar="N",
                       help="hold out the last N training digits; best-validation weights kept (default 0)")
    group.add_argument("--train-examples", type=_positive_int, metavar="N", help="use the first N training images")
    group.add_argument("--test-examples", type=_positive_int, metavar="N", help="use the first N test images")
    group.add_argument("--data-dir", type=_path_arg, help="MNIST cache (default $VAELAB_DATA, else an absolute "
                       "$XDG_CACHE_HOME/vaelab/mnist, else ~/.cache/vaelab/mnist)")
    group.add_argument("--device", type=_device, help="auto (default: cuda if available), cpu, cuda or cuda:N")
    group.add_argument("--threads", type=_whole_number(1, 4097),
                       help="CPU threads (default: the cores this process may use)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar (none either when stderr "
                       "is not a terminal)")
    group.add_argument("--tensorboard", action="store_true", help="write scalars and image grids every epoch "
                       "into RUN/tensorboard (needs pip install 'vaelab[tensorboard]')")
    train.set_defaults(run=cmd_train)

    evaluate = commands["evaluate"]
    evaluate.add_argument("run_dir", type=_path_arg, help="a run directory written by `vaelab train`")
    evaluate.add_argument("--k", type=_positive_int, default=5000, help="importance samples per digit (default 5000)")
    evaluate.add_argument("--test-examples", type=_positive_int, metavar="N", help="the first N digits (default all)")
    evaluate.add_argument("--split", choices=["test", "validation"], default="test",
                          help="test digits (default) or the run's validation digits (for choosing settings)")
    evaluate.add_argument("--checkpoint", choices=["last", "best"], default="last",
                          help="the last weights (default) or those with the best validation ELBO")
    evaluate.add_argument("--laplace", action="store_true", help="add the Laplace estimates of log p(x)")
    evaluate.add_argument("--gaps", action="store_true", help="split log p(x) − ELBO into the approximation and "
                          "amortisation gaps (Cremer et al. 2018): q optimised for each digit alone")
    evaluate.add_argument("--gap-steps", type=_positive_int, metavar="N",
                          help="the most optimisation steps per digit for --gaps (default 300; most digits stop "
                          "earlier, by the stopping rule)")
    evaluate.add_argument("--k-curve", action="store_true", help="IWAE-K for K = 1, 10, 100, 1000 and --k on nested "
                          "draws, to see whether the estimate has converged (needs --k 1000 or more)")
    evaluate.add_argument("--precision", choices=PRECISIONS, default="fp32",
                          help="the IWAE decoder's products: fp32 (default), bf16 (refused where emulated) or "
                          "bf16-emulated (bf16's rounding at float32 speed, a check); one-layer mlp models")
    evaluate.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                          help="compute each chunk's IWAE log weights by one graph torch.compile builds (fp32; needs a "
                          "C++ compiler on the CPU; compiles for seconds to a minute first). Default: as the run "
                          "trained: on a CPU compiled for a run of --engine compiled (the presets vampprior-1, "
                          "vampprior-2, ladder-5; not a planar flow, native already) where a compiler is found, else "
                          "eager; eager on a GPU; --no-compiled: eager")
    evaluate.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the draws (default 0)")
    evaluate.add_argument("--device", type=_device, default="auto",
                          help="auto (default: cuda if available), cpu, cuda or cuda:N")
    evaluate.add_argument("--threads", type=_whole_number(1, 4097), help="CPU threads (default: all allowed)")
    evaluate.add_argument("--data-dir", type=_path_arg, help="MNIST cache (default: the run's)")
    evaluate.add_argument("--out", type=_json_record, help="the evaluation record (.json; default a name in the run "
                          "that encodes the settings, and the weights' epoch where that name holds an evaluation of "
                          "other weights); per-digit values go beside it (.digits.csv)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing record of the same name")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal, nor a line a "
                          "minute in a log")
    evaluate.add_argument("--format", choices=list(TABLE_FORMATS), default="text",
                          help="the printed table: text (default), or latex (booktabs), markdown or csv to paste")
    evaluate.set_defaults(run=cmd_evaluate)

    sample = commands["sample"]
    sample.add_argument("run_dir", type=_path_arg, help="a run directory written by `vaelab train`")
    sample.add_argument("--n", type=_whole_number(1, MAX_SAMPLE_GRID + 1), default=64,
                        help=f"samples (default 64, at most {MAX_SAMPLE_GRID})")
    sample.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the draws (default 0)")
    sample.add_argument("--checkpoint", choices=["last", "best"], default="last",
                        help="the last weights (default) or those with the best validation ELBO")
    sample.add_argument("--out", type=_path_arg, help="picture (.png, .pdf, .svg, .jpg, …; default "
                        "RUN/samples-n<N>-seed<S>.png, with the weights' epoch added where that picture is of other "
                        "weights)")
    sample.add_argument("--overwrite", action="store_true", help="replace an existing picture")
    sample.set_defaults(run=cmd_sample)

    presets = commands["presets"]
    presets.add_argument("names", nargs="*", metavar="NAME", help=f"only these presets (default: all; "
                                                                   f"{', '.join(PRESETS)})")
    presets.set_defaults(run=cmd_presets)

    report = commands["report"]
    report.add_argument("run_dir", type=_path_arg, help="a run directory written by `vaelab train`, or a sweep's --out")
    report.add_argument("--out", type=_path_arg, help="the HTML file (default RUN/report.html, made again each time)")
    report.add_argument("--data-dir", type=_path_arg, help="MNIST cache (default: the run's)")
    report.add_argument("--figures", type=_path_arg, metavar="DIR", help="also write every figure of the page into DIR "
                        "as PDF and SVG, 3.25 in (one column) and 6.75 in (full width) wide, for a paper")
    report.add_argument("--no-progress", action="store_true", help="no progress bar (the page's parts as they are made)")
    report.set_defaults(run=cmd_report)

    compare = commands["compare"]
    compare.add_argument("run_dirs", type=_path_arg, nargs="+", metavar="RUN",
                         help="two or more run directories (each compared on its headline evaluation), or evaluation "
                         "records of runs (RUN/eval-….json: that evaluation, of whatever weights it measured)")
    compare.add_argument("--out", type=_path_arg,
                         help="the HTML page (default compare-<run>-<run>….html in the runs' "
                         "common parent directory, or the first run's where they share none but /; made again each "
                         "time)")
    compare.add_argument("--split", choices=("test", "validation"), default="test",
                         help="the evaluations compared: test (default), or validation (`vaelab evaluate RUN --split "
                         "validation`), to choose among runs without touching the test set")
    compare.add_argument("--format", choices=list(TABLE_FORMATS), default="text",
                         help="the printed table: text (default), or latex (booktabs), markdown or csv to paste")
    compare.set_defaults(run=cmd_compare)

    sweep = commands["sweep"]
    sweep.add_argument("spec", type=_path_arg,
                       help="the sweep's TOML spec: preset, [fixed], [search], trials, objective")
    sweep.add_argument("--out", type=_path_arg, required=True, help="the sweep directory (trials/NNNN run directories, "
                       "study.db); the same command again continues or joins it")
    sweep.add_argument("--workers", type=_whole_number(1, 257), default=1,
                       help="trial processes on this machine (threads split between them; default 1)")
    sweep.add_argument("--storage", help="Optuna storage URL shared by several machines, e.g. "
                       "postgresql://user@host/db (default: sqlite in DIR/study.db)")
    sweep.add_argument("--trials", type=_whole_number(1, MAX_TRIALS + 1),
                       help="the number of trials (default: the spec's)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar (the line of each trial as it "
                       "ends is printed either way; no bar either when stderr is not a terminal)")
    sweep.set_defaults(run=cmd_sweep)

    runs = commands["runs"]
    runs.add_argument("directory", type=_path_arg, nargs="?", default=Path("runs"), help="where to look (default runs)")
    runs.set_defaults(run=cmd_runs)

    data = commands["data"]
    data.add_argument("--data-dir", type=_path_arg, help="MNIST cache (default $VAELAB_DATA, else an absolute "
                      "$XDG_CACHE_HOME/vaelab/mnist, else ~/.cache/vaelab/mnist)")
    data.set_defaults(run=cmd_data)

    stirling = commands["stirling"]
    stirling.add_argument("--n", type=_whole_number(1, 10**18 + 1), nargs="+",
                          default=[1, 2, 5, 10, 100, 1000, 10**6],
                          help="values of N, 1 to 10¹⁸ (default 1 2 5 10 100 1000 1000000)")
    stirling.add_argument("--terms", type=_whole_number(0, MAX_STIRLING_TERMS + 1), default=2,
                          help=f"correction terms K, 0 to {MAX_STIRLING_TERMS} (default 2; the series is asymptotic)")
    stirling.add_argument("--plot", type=_path_arg, help="picture of the relative errors against N for 0..K terms")
    stirling.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    stirling.add_argument("--format", choices=list(TABLE_FORMATS), default="text",
                          help="the printed table: text (default), or latex (booktabs), markdown or csv to paste")
    stirling.set_defaults(run=cmd_stirling)
    return parser


class Stopped(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP outside a training's own handlers (evaluate, report, compare, …): the command ends
    with its one line (for SIGTERM and SIGHUP, where the default action killed it without a word)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.stop_signal = signum


@contextlib.contextmanager
def _stop_signals_raise():
    """SIGTERM (schedulers, `timeout`) and SIGHUP (a closed terminal; not where it was ignored: `nohup`) raise
    ``Stopped`` while the command runs, Ctrl-C a KeyboardInterrupt (Stopped of SIGINT); a training installs its own
    handlers inside (a checkpoint first), a sweep too. The previous handlers afterwards. Only the main thread can set
    them.

    Python runs a signal's handler between any two steps of Python code, and some of that code cannot pass an
    exception on: a weakref callback or ``__del__`` run by the garbage collector, of which matplotlib makes many
    while a figure is built and dropped. There the stop was printed as "Exception ignored in: <function
    TransformNode.set_children…> … KeyboardInterrupt" and lost, and the command went on (until 2026-12-06 Ctrl-C 4 s
    into `report` let it write its page). So, where such a stop reaches ``sys.unraisablehook`` while this block's
    handler is the signal's, it is not printed, and the signal is sent again from another thread a moment later,
    to be raised where the command can stop (again, until it lands there). One that has not landed when the block
    ends is dropped: the command's work is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    resending = threading.Event()              # set while the hook sends a stop again: its handler must not raise
    done = threading.Event()                   # the block has ended: a stop is moot
    senders: list[threading.Thread] = []

    def stop(signum, frame):
        if done.is_set():
            return
        if resending.is_set():                 # inside the hook itself: raised there, it would be lost again
            send_again(signum)
            return
        raise Stopped(signum)

    def send_again(signum):
        def later():
            time.sleep(0.05)                   # the main thread is out of the hook and the callback by then
            if not done.is_set():
                signal.raise_signal(signum)

        senders.append(threading.Thread(target=later, daemon=True))
        senders[-1].start()

    def hook(unraisable):
        signum = getattr(unraisable.exc_value, "stop_signal", None)
        if not isinstance(unraisable.exc_value, Stopped) or signal.getsignal(signum) is not stop:
            return outer_hook(unraisable)
        resending.set()
        try:
            send_again(signum)
        finally:
            resending.clear()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(signum) not in (signal.SIG_IGN, None)}
    outer_hook, sys.unraisablehook = sys.unraisablehook, hook
    try:
        yield
    finally:
        done.set()
        for sender in senders:                 # a stop they send now reaches ``stop``, which drops it
            sender.join()
        sys.unraisablehook = outer_hook
        for signum, before in previous.items():
            signal.signal(signum, before)


# How vaelab's symbols are spelled on a stream that cannot encode them (a locale that is not UTF-8:
# LANG=en_US.ISO-8859-1, the C locale where Python does not coerce it, PYTHONIOENCODING=ascii); any other such
# character becomes "?". Superscripts become a caret and their digits (2⁶³: 2^63).
ASCII_SPELLING = {"±": "+/-", "×": "x", "—": "-", "–": "-", "−": "-", "…": "...", "→": "->", "←": "<-", "≤": "<=",
                  "≥": ">=", "≈": "~", "≠": "!=", "·": "*", "√": "sqrt", "∞": "inf", "β": "beta", "μ": "mu",
                  "σ": "sigma", "Σ": "sum", "π": "pi", "ε": "eps", "θ": "theta", "∂": "d", "‖": "||",
                  "²": "2", "³": "3", "¹": "1", "⁰": "0", "⁴": "4", "⁵": "5", "⁶": "6", "⁷": "7", "⁸": "8", "⁹": "9",
                  "⁻": "-", "ₖ": "_k", "ü": "u", "é": "e", "°": " deg", "•": "*", "█": "#", "‘": "'", "’": "'",
                  "“": '"', "”": '"', "\u0302": "", "\u00a0": " ", "\u2009": " ", "\u202f": " "}
SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹⁻"


def _spell_in_ascii(error: UnicodeEncodeError) -> tuple[str, int]:
    """A codec error handler: the characters a stream cannot encode, spelled in ASCII (``ASCII_SPELLING``)."""
    text, spelled = error.object[error.start:error.end], []
    for index, character in enumerate(text):
        # a run of superscripts is one exponent: 2⁶³ → 2^63, 10⁻⁴ → 10^-4
        if character in SUPERSCRIPTS and (index == 0 or text[index - 1] not in SUPERSCRIPTS):
            spelled.append("^")
        # a surrogate, which no stream encodes: a byte of a file name that is not UTF-8 (\xff), as tables show it
        spelled.append(one_line(character) if "\ud800" <= character <= "\udfff" else ASCII_SPELLING.get(character, "?"))
    return "".join(spelled), error.end


def legible_streams() -> None:
    """stdout and stderr that cannot encode vaelab's symbols (±, ×, β, 2⁶³ …) spell them in ASCII instead: until
    2026-12-05 the first such symbol ended the command in a traceback (after an evaluation, before its record was
    written). A stream that encodes them (UTF-8) and would raise on what it cannot encode (errors "strict": the
    byte of a file name that is not UTF-8, held as a surrogate) writes that byte as \\xff: until 2026-12-06 a note
    naming such a run ended `vaelab runs` in a traceback under a UTF-8 locale other than C.UTF-8."""
    import codecs
    import io

    try:
        codecs.lookup_error("vaelab.ascii")
    except LookupError:
        codecs.register_error("vaelab.ascii", _spell_in_ascii)
    for stream in (sys.stdout, sys.stderr):
        if not isinstance(stream, io.TextIOWrapper):
            continue
        try:
            "±×—β⁶".encode(stream.encoding)
            legible = stream.errors != "strict"
        except (UnicodeEncodeError, LookupError):
            legible = False
        if not legible:
            stream.reconfigure(errors="vaelab.ascii")


def main(argv: Sequence[str] | None = None) -> int:
    global _OUTPUT
    legible_streams()
    words = list(sys.argv[1:] if argv is None else argv)
    # without a command's name there is nothing but --help, --version or an error to parse: no command's flags
    args = build_parser(commands_only=not any(word in COMMANDS for word in words)).parse_args(words)
    outer, _OUTPUT = _OUTPUT, _Output()              # (a command run inside another's: a test's, a sweep's)
    try:
        # around the error handling too: a torchrun rank that lost a peer leaves its training with SIGTERM ignored,
        # so that the agent's SIGTERM cannot kill it before its one line (training.stop_signals)
        with _stop_signals_raise():
            status = _run(args)
        return _OUTPUT.account(args.command, status)
    finally:
        _OUTPUT = outer


# the commands that share their work among torchrun's processes (vaelab.distributed)
TORCHRUN_COMMANDS = ("train", "evaluate")


def _one_process(command: str) -> None:
    """Refuse, on every rank, a command that works in one process when torchrun started several: each would do the
    whole of it (until 2026-12-06 `torchrun --nproc-per-node 2 -m vaelab sample RUN` wrote the picture twice, the
    second over the first, `report` the page twice, and `sweep` ran as two sweeps of a worker each)."""
    if command in TORCHRUN_COMMANDS:
        return
    from vaelab.distributed import world_from_environment

    world = world_from_environment()
    if world.distributed:
        raise UsageError(f"`vaelab {command}` works in one process, and torchrun started {world.size}: run it "
                         f"without torchrun (torchrun shares the work of `vaelab train` and `vaelab evaluate`"
                         f"{'; a sweep runs several trials at once with --workers N' if command == 'sweep' else ''})")


def _run(args: argparse.Namespace) -> int:
    try:
        with warnings.catch_warnings():
            # a warning is one line on stderr, like an error (Python's default adds the file and the source line)
            warnings.showwarning = lambda message, *_: _error(args.command, str(message), "warning")
            if hasattr(args, "format"):         # evaluate, compare: their table goes to stdout
                table_stream = sys.stdout
                args.print_table = lambda table: _log(table, table_stream)
            # --format csv|latex|markdown: the table alone on stdout (`vaelab compare A B --format csv > t.csv`),
            # every other line (what was written, notes) on stderr
            aside = getattr(args, "format", "text") != "text"
            _one_process(args.command)
            with contextlib.redirect_stdout(sys.stderr) if aside else contextlib.nullcontext():
                return args.run(args) or 0
    except VaelabError as exc:
        _error(args.command, str(exc))
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if hasattr(exc, "signum"):               # training.StopNow: a second signal while training
            _error(args.command, "stopped at once by a second signal; the last checkpoint stands")
            return 128 + exc.signum
        signum = getattr(exc, "stop_signal", signal.SIGINT)
        how = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        _error(args.command, f"{how} before it finished; vaelab replaces each file whole, so none is left "
                             "half-written" + (" (the evaluation's record is written at its end: none was)"
                                               if args.command == "evaluate" else ""))
        return 128 + signum
    except MemoryError:
        _error(args.command, "out of memory; use smaller sizes (--k, --batch-size, --hidden) or free memory")
        return 1
    except OSError as exc:
        _error(args.command, f"{exc.strerror or exc} ({getattr(exc, 'filename', None) or 'I/O'}, errno {exc.errno})")
        return 1


class _Output:
    """What became of the command's lines on stdout and stderr (one per command, made by ``main``). A stream that
    cannot take a line takes no more (its output is cut there, not holed), and the command ends with a line saying
    so and exit status 1 (``account``): until 2026-12-05 such lines were dropped without a word and the status was
    0, so that `vaelab compare A B --format csv > t.csv` on a full disk left t.csv empty, and `vaelab presets >
    /dev/full` said nothing. Not an error: a terminal gone (SIGHUP; its log file has the lines) and a reader that
    closed its pipe (`vaelab runs DIR | head -1`): writing stops there, quietly."""

    def __init__(self):
        self.terminals = {id(stream) for stream in (sys.stdout, sys.stderr) if _isatty(stream)}
        self.closed: set[int] = set()                # streams that take nothing more
        self.cut: list[tuple[str, str, str]] = []    # (where, why, the first line it did not take)

    def lose(self, stream, line: str, exc: OSError) -> None:
        self.closed.add(id(stream))
        if id(stream) not in self.terminals and exc.errno != errno.EPIPE:
            why = f"{exc.strerror or exc}, errno {exc.errno}"
            self.cut.append((_stream_name(stream), why, line.splitlines()[0] if line.strip() else line))

    def account(self, command: str, status: int) -> int:
        """The command's exit status, 1 where a stream cut its output; the line that says so (on stderr, if that
        is not the stream that failed)."""
        for where, why, line in self.cut:
            shown = line if len(line) <= 60 else line[:57] + "..."
            _write(sys.stderr, f"vaelab {command}: error: {where} could not take its output ({why}): it is cut "
                               f"from the line {shown!r} on" + ("; the command itself finished and each file it "
                                                                 "wrote is whole: make room there, or send the output "
                                                                 "elsewhere" if status == 0 else ""))
        return (status or 1) if self.cut else status


_OUTPUT: _Output | None = None                       # the running command's, in ``main``; the API keeps none


def _isatty(stream) -> bool:
    """Whether ``stream`` is a terminal; False for a closed one, and for None (Python's stdout where the command was
    started with it closed, `vaelab … >&-`)."""
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):
        return False


def _stream_name(stream) -> str:
    """'stdout (/path/t.csv)': the stream and, where it is one, the file it goes to."""
    name = "stderr" if stream is sys.__stderr__ else "stdout" if stream is sys.__stdout__ else "the output"
    with contextlib.suppress(OSError, ValueError):
        target = os.readlink(f"/proc/self/fd/{stream.fileno()}")
        if target.startswith("/"):
            return f"{name} ({target})"
    return name


def _write(stream, line: str) -> None:
    """``line`` on ``stream``; where the stream fails, the command's ``_Output`` learns of it (outside a command,
    through the API, the line is dropped)."""
    if stream is None or (_OUTPUT is not None and id(stream) in _OUTPUT.closed):
        return                          # (None: closed when the command started; print would take it for stdout)
    try:
        print(line, file=stream, flush=True)
    except OSError as exc:
        if _OUTPUT is not None:
            _OUTPUT.lose(stream, line, exc)


def _error(command: str, message: str, kind: str = "error") -> None:
    # one line whatever the message names: a path or a run's name holding a line break or a tab is escaped
    # (``tables.one_line``; until 2026-12-06 such a name broke the error, and a note, in two)
    _write(sys.stderr, one_line(f"vaelab {command}: {kind}: {message}"))


def _log(message: str, stream=None) -> None:
    _write(stream or sys.stdout, message)


# How notes name flags: as the command line does, or in the terms of a caller's API (``notes_in``).
_NOTE_TERMS: contextvars.ContextVar[Callable[[str], str] | None] = contextvars.ContextVar("note_terms", default=None)


@contextlib.contextmanager
def notes_in(terms: Callable[[str], str]):
    """Notes in ``terms`` while the block runs: ``vaelab.train`` says ``prior_components=3`` where the command says
    ``--prior-components 3`` (``api.in_api_terms``; until 2026-12-08 its notes named the command's flags)."""
    token = _NOTE_TERMS.set(terms)
    try:
        yield
    finally:
        _NOTE_TERMS.reset(token)


def _note(message: str) -> None:
    """A one-line remark on stderr that is not an error (a file skipped, a setting that will not finish)."""
    terms = _NOTE_TERMS.get()
    _write(sys.stderr, one_line(f"note: {terms(message) if terms else message}"))


def _progress(args: argparse.Namespace) -> bool:
    """Bars only on a terminal: a log redirected to a file gets the one line per epoch."""
    return not args.no_progress and _isatty(sys.stderr)


def _progress_or_lines(args: argparse.Namespace) -> bool | str:
    """A bar on a terminal; where stderr is a log, a line a minute of each part that lasts longer than one
    (``evaluation.LINES``); nothing with --no-progress."""
    from vaelab.evaluation import LINES

    return _progress(args) or (not args.no_progress and LINES)


def _set_threads(flag: int | None, fallback: int) -> int:
    """torch's CPU threads: ``--threads`` where given, else ``fallback`` (a resumed run's own count, $OMP_NUM_THREADS
    or the cores). More than the cores this process may run on is refused for --threads: such threads wait for each
    other (every product slower, not faster), and where the system cannot create them (a limit on processes or on
    memory) libgomp ends the process with one line of its own. A run's recorded count or $OMP_NUM_THREADS above the
    cores (a run resumed on a smaller machine) is lowered to them, and said."""
    import torch

    from vaelab.resources import usable_cores

    cores = usable_cores()
    if flag is not None and flag > cores:
        raise UsageError(f"--threads {flag}: this process may run on {plural(cores, 'core')} (its CPU affinity), and "
                         f"more threads than cores only wait for each other; give at most {cores}, or leave --threads "
                         f"out")
    threads = flag or fallback
    if threads > cores:
        _note(f"{threads} threads (the run's own count or $OMP_NUM_THREADS) is more than the {plural(cores, 'core')} "
              f"this process may run on: {plural(cores, 'thread')}")
        threads = cores
    torch.set_num_threads(threads)
    return threads


# ------------------------------------------------------------------------------------------------
# train


# flag → (section, field); --hidden/--hidden-top and --data-dir are built separately.
_FLAGS = {
    "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "lr": ("train", "lr"),
    "lr_schedule": ("train", "lr_schedule"), "adam_eps": ("train", "adam_eps"), "optimizer": ("train", "optimizer"),
    "clip_grad_norm": ("train", "clip_grad_norm"), "clip_grad_value": ("train", "clip_grad_value"),
    "early_stopping": ("train", "early_stopping"),
    "seed": ("train", "seed"),
    "device": ("train", "device"), "engine": ("train", "engine"), "threads": ("train", "threads"),
    "precision": ("train", "precision"),
    "model": ("model", "name"), "latent": ("model", "latent"), "activation": ("model", "activation"),
    "init": ("model", "init"), "inference": ("model", "inference"), "prior": ("model", "prior"),
    "prior_components": ("model", "prior_components"), "flow": ("model", "flow"),
    "flow_steps": ("model", "flow_steps"), "flow_width": ("model", "flow_width"), "batch_norm": ("model", "batch_norm"),
    "objective": ("objective", "name"), "k": ("objective", "samples"),
    "beta": ("objective", "beta"), "warmup": ("objective", "warmup_epochs"), "binarize": ("data", "binarize"),
    "train_examples": ("data", "train_examples"), "test_examples": ("data", "test_examples"),
    "validation": ("data", "validation"),
}
# What a resume may change: how long (the epochs, when to stop early), and where, with how many threads and with
# which engine it runs (each computes the same gradient, to float rounding).
RESUMABLE = {"train.epochs": "--epochs", "train.early_stopping": "--early-stopping", "train.device": "--device",
             "train.threads": "--threads", "train.engine": "--engine", "data.data_dir": "--data-dir"}
# What a resume may amend, recorded where it took effect (train.log and the training state's ``amendments``): the
# remedies of a run that diverged, so that it goes on from its last good checkpoint instead of starting anew.
AMENDABLE = {"train.lr": "--lr", "train.clip_grad_norm": "--clip-grad-norm",
             "train.clip_grad_value": "--clip-grad-value"}


def _train_config(args: argparse.Namespace, base, validate: bool = True):
    """``base`` (the preset's config, or the saved one on --resume) with the flags given; validated unless
    ``validate`` is False (a resume first says which fields its flags would change)."""
    from vaelab.data import resolve_path
    from vaelab.presets import apply_preset

    if args.preset and not args.resume:
        base = apply_preset(base, args.preset)
    sections: dict[str, dict[str, Any]] = {name: {} for name in ("model", "data", "objective", "train")}
    for flag, (section, name) in _FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            sections[section][name] = tuple(value) if isinstance(value, list) else value
    hidden = list(base.model.hidden)
    if args.blocks and (args.hidden or args.hidden_top):
        raise UsageError("--blocks gives every block of hidden widths; leave out --hidden and --hidden-top")
    if args.blocks:
        sections["model"]["hidden"] = tuple(args.blocks)
    for index, flag in enumerate(("hidden", "hidden_top")):
        widths = getattr(args, flag)
        if widths:
            hidden[index:index + 1] = [tuple(widths)]
            sections["model"]["hidden"] = tuple(hidden)
    if args.data_dir is not None:
        sections["data"]["data_dir"] = str(resolve_path(args.data_dir, "--data-dir"))
    replaced = {name: dataclasses.replace(getattr(base, name), **fields) for name, fields in sections.items()}
    config = dataclasses.replace(base, **replaced)
    return config.validate() if validate else config


def _unread_flags(args: argparse.Namespace, config) -> list[str]:
    """A note for each flag given that the model never reads (``RunConfig.unused``: --prior-components beside the
    standard prior, --flow-width without IAF steps): kept in config.json as asked, it changes nothing, which a
    forgotten --prior vampprior would otherwise leave unsaid; and --flow given without steps, a flow of none. A flag a
    model must not take (--flow-steps without a flow) is refused by ``ModelConfig.validate`` instead."""
    unused = config.unused()
    notes = []
    for flag, (section, name) in _FLAGS.items():
        value, why = getattr(args, flag), unused.get(f"{section}.{name}")
        if value is not None and why is not None:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            notes.append(f"--{flag.replace('_', '-')} {shown} is not read by this model ({why}); config.json keeps "
                         f"it, and it changes nothing")
    if args.flow not in (None, "none") and args.flow_steps is None and not config.model.flow_steps:
        # (until 2026-12-07 `--flow planar` alone trained the Gaussian q without a word but its start line's "of 0
        # steps")
        notes.append(f"--flow {args.flow} has 0 steps (--flow-steps defaults to 0), which is the Gaussian q(z|x) "
                     f"itself, no flow: give --flow-steps T (the preset planar-80 takes 80)")
    return notes


def training_memory_parts(config, n_train: int) -> dict[str, int]:
    """A generous estimate of the peak memory of training ``config`` on ``n_train`` digits, in its parts (bytes):
    ``model`` (the parameters and what they carry), ``batch`` (a step's activations), ``pseudo_inputs`` (the
    VampPrior's through the encoder), ``evaluation`` and ``data``."""
    params = config.model.parameter_count()
    widths = sum(b for _, b in config.model.layers())        # every linear layer's outputs, one row's activations
    rows = training_rows(config, n_train)
    # the K pseudo-inputs go through the encoder (about half the widths) at every step: each layer's output, its
    # activation and their gradient, float32 (their (K, 784) tensors are counted with the parameters); until
    # 2026-12-07 uncounted: K = 10⁵ pseudo-inputs of a 784-2048-50 model peaked at 4.3–4.4 GiB against an estimate
    # of 3.5 (6.3 now)
    pseudo = config.model.prior_components if config.model.prior == "vampprior" else 0
    # parameters, gradients, Adam's two moments, and the checkpoint's serialised copies of all but gradients
    return {"model": 4 * params * 10, "batch": 4 * rows * (widths + 4 * 784) * 3,
            "pseudo_inputs": 4 * pseudo * widths // 2 * 3,
            "evaluation": 4 * config.train.eval_batch_size * (widths + 4 * 784) * 2,
            "data": 5 * 784 * n_train + (200 << 20)}


def training_rows(config, n_train: int) -> int:
    """Rows of a training step: its digits times the objective's draws. A batch holds at most the training digits
    (until 2026-12-07 `--batch-size 10⁷` of 64 digits of a 784-32-4 model was refused at 446.6 GiB, for 64 rows')."""
    return min(config.train.batch_size, n_train, config.data.train_examples or n_train) * config.objective.samples


def training_memory_bytes(config, n_train: int) -> int:
    """A generous estimate of the peak memory of training ``config`` on ``n_train`` digits."""
    return sum(training_memory_parts(config, n_train).values())


def training_memory_fix(config, n_train: int) -> str:
    """What holds most of the memory training needs, and the flags that make it smaller (until 2026-12-08 always "use
    smaller --hidden, --batch-size or --k", also where --latent, --flow-width or --prior-components was the cause)."""
    from vaelab.resources import format_bytes

    parts, model = training_memory_parts(config, n_train), config.model
    hidden = "--blocks" if model.name == "hvae" else "--hidden"
    widths = [hidden, "--latent"] + ["--flow-steps"] * (model.flow_steps > 0) + ["--flow-width"] * (model.flow == "iaf")
    largest = max(("model", "batch", "pseudo_inputs", "evaluation"), key=parts.__getitem__)
    what, flags = {
        "model": (f"its {model.parameter_count():,} parameters, with their gradients and Adam's moments, take",
                  widths + ["--prior-components"] * (model.prior != "standard")),
        "batch": (f"a step's {training_rows(config, n_train):,} rows (digits × draws) take",
                  ["--batch-size", "--k", hidden]),
        "pseudo_inputs": (f"the {model.prior_components:,} pseudo-inputs through the encoder at every step take",
                          ["--prior-components", hidden]),
        "evaluation": (f"each epoch's evaluation, {config.train.eval_batch_size:,} digits at a time, takes", widths),
    }[largest]
    return f"{what} {format_bytes(parts[largest])} of it: use smaller {', '.join(flags[:-1])} or {flags[-1]}"


def cmd_train(args: argparse.Namespace) -> int:
    """One process, or one of torchrun's: every rank validates the same config and loads the same data; rank 0
    alone claims the run directory (lock, checks, config.json) and writes checkpoints."""
    from vaelab import distributed

    world = distributed.world_from_environment()
    if world.distributed and args.out is None:
        raise UsageError("under torchrun give --out RUN_DIR: every process must train into the same directory")
    distributed.init(world)
    try:
        return _resume(args, world) if args.resume else _new_run(args, world)
    except distributed.RankLost as exc:
        from vaelab.checkpoint import resume_command

        raise distributed.RankLost(f"{exc}; {_what_stands(args.out)}; resume with: "
                                   f"{resume_command(args.out, world)}") from None
    finally:
        distributed.shutdown(world)


def _what_stands(run_dir: Path) -> str:
    """What a run directory's checkpoint holds, read from disk: 'the checkpoint of epoch 3 in RUN stands'."""
    from vaelab import checkpoint as ckpt
    from vaelab.errors import CheckpointError

    try:
        meta = ckpt.read_metadata(run_dir / ckpt.STATE)
    except CheckpointError:
        return f"no checkpoint was written in {run_dir} yet (nothing to resume: start it again)"
    step = f", step {meta['step']}" if meta.get("step") else ""
    return f"the checkpoint of epoch {meta.get('epoch', '?')}{step} in {run_dir} stands"


def _new_run(args: argparse.Namespace, world, config=None, claimed_dir: list | None = None,
             observers: Sequence = ()) -> int:
    """A new run of ``config`` (default: built from the flags); the run directory is appended to
    ``claimed_dir`` when given (the Python API's vaelab.train); ``observers`` are called after each epoch with
    (model, metrics row), after its checkpoint (a sweep's pruning)."""
    from vaelab import checkpoint as ckpt
    from vaelab.config import RunConfig
    from vaelab.distributed import on_main

    if config is None:
        config = _train_config(args, RunConfig())
        if args.preset is None:
            config = dataclasses.replace(config, preset="seed")
        if world.main:
            for line in _unread_flags(args, config):
                _note(line)
    if args.out is not None:            # before the data are fetched; again under the lock below (rank 0 alone:
        on_main(world, lambda: _refuse_taken(args.out))       # a late rank would find rank 0's run there)
    run = _prepare_training(args, config)
    claimed: dict[str, Any] = {"created": False, "lock": None, "dir": args.out}

    def claim() -> str:
        run_dir = args.out
        if run_dir is None:
            run_dir, claimed["created"] = ckpt.new_run_dir(), True
        elif not run_dir.exists():
            try:
                run_dir.mkdir(parents=True)
                claimed["created"] = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise ckpt.WriteError(f"cannot create {run_dir}: {exc.strerror} (errno {exc.errno}); "
                                      f"choose a writable --out") from exc
        claimed["dir"] = run_dir
        if run_dir.is_dir() and not ckpt.is_run(run_dir):
            _refuse_taken(run_dir)      # before the lock, whose file would stay in a directory that is not a run
        claimed["lock"] = ckpt.RunLock(run_dir).acquire()
        _refuse_taken(run_dir, locked=True)     # again under the lock: another may have written there meanwhile
        return str(run_dir)

    try:
        run_dir = Path(on_main(world, claim))
        if claimed_dir is not None:
            claimed_dir.append(run_dir)
        return _train(args, config, run_dir, run, resumed=False, world=world, observers=observers)
    except BaseException as exc:
        if world.main and claimed["dir"] is not None:
            removed = _remove_if_untrained(claimed["dir"], claimed["created"])
            if removed and isinstance(exc, TrainingDiverged):
                raise TrainingDiverged(f"{exc}; the run directory {claimed['dir']} held no checkpoint and was "
                                       f"removed") from exc
        raise
    finally:
        if claimed["lock"] is not None:
            claimed["lock"].release()


def _refuse_taken(run_dir: Path, locked: bool = False) -> None:
    """A new run's --out must be new or an empty directory (its lock file aside): one that holds a run (named with
    the process training it, if one is, unless this process holds its lock: ``locked``), or anything else, is
    refused."""
    from vaelab import checkpoint as ckpt

    if ckpt.is_run(run_dir):
        if not locked and (holder := ckpt.lock_holder(run_dir)):
            raise ckpt.in_use(run_dir, holder)
        raise UsageError(f"{run_dir} already holds a run; add --resume to continue it, or choose another --out")
    if run_dir.exists() and (not run_dir.is_dir() or any(p.name != ckpt.LOCK for p in run_dir.iterdir())):
        raise UsageError(f"{run_dir} exists and is not an empty directory; choose another --out")


def _remove_if_untrained(run_dir: Path, created: bool) -> bool:
    """A directory this command made and that holds no checkpoint yet is removed on failure, so that a
    refused or failed start leaves nothing behind; anything with a checkpoint is kept. True if removed."""
    from vaelab import checkpoint as ckpt
    from vaelab.training import TRAIN_LOG

    if not created or (run_dir / ckpt.STATE).exists():
        return False
    for name in (ckpt.LOCK, ckpt.CONFIG, TRAIN_LOG):
        (run_dir / name).unlink(missing_ok=True)
    try:
        run_dir.rmdir()
        return True
    except OSError:
        return False


def _resume(args: argparse.Namespace, world, observers: Sequence = ()) -> int:
    from vaelab import checkpoint as ckpt
    from vaelab.config import RunConfig
    from vaelab.distributed import on_main
    from vaelab.errors import CheckpointError

    run_dir = args.out
    if run_dir is None:
        raise UsageError("--resume needs --out RUN_DIR, the run to continue")
    lock: list = []

    def claim() -> dict:
        from vaelab.sweep import not_a_sweep

        if not run_dir.is_dir():
            raise UsageError(f"--resume: {run_dir} is not a vaelab run (no such directory); pass the run to continue")
        not_a_sweep(run_dir)                        # before its lock: nothing written into the sweep
        state_path = run_dir / ckpt.STATE
        if not state_path.exists() and not ckpt.is_run(run_dir):      # before its lock: nothing written there
            raise CheckpointError(f"--resume: {run_dir} is not a vaelab run (it holds neither {ckpt.CONFIG} nor "
                                  f"{ckpt.STATE}); nothing was changed; pass the run to continue")
        lock.append(ckpt.RunLock(run_dir).acquire())
        if not state_path.exists():
            if (run_dir / ckpt.WEIGHTS).exists():      # copied without its state
                raise CheckpointError(f"--resume: {state_path} is missing: {run_dir} holds trained weights without "
                                      f"the training state a resume continues from; nothing was changed; evaluate "
                                      f"it (vaelab evaluate {shell_word(run_dir)}), or train anew into another --out")
            raise CheckpointError(f"--resume: {state_path} is missing: {run_dir} holds no checkpoint (it was stopped "
                                  f"before its first epoch ended); nothing was changed; train it anew into another "
                                  f"--out (or remove {run_dir} first)")
        _, meta = ckpt.load_tensors(state_path)      # a damaged state is an error before anything is written
        if "config" not in meta:
            raise CheckpointError(f"{state_path} holds no copy of the config; it cannot be resumed; start a new run")
        state_config = RunConfig.from_dict(meta["config"], f"{state_path} (its copy of config.json)")
        restored = not (run_dir / ckpt.CONFIG).exists()
        saved = state_config if restored else ckpt.load_config(run_dir)
        free = RESUMABLE.keys() | AMENDABLE.keys()
        resumable = ", ".join(RESUMABLE.values())
        # an amendment reaches config.json at the resume, the state at its first checkpoint: both may differ there
        edited = [d for d in state_config.differences(saved) if d.split(":")[0] not in free]
        if edited:
            raise UsageError(f"{run_dir / ckpt.CONFIG} differs from the copy in {ckpt.STATE} ({'; '.join(edited)}, "
                             f"the state's value → config.json's): it was edited after training started, and a "
                             f"resume only changes {resumable}; {ckpt.config_fix(run_dir)}; or start a new --out")
        if args.preset is not None and args.preset != saved.preset:
            raise UsageError(f"--resume with --preset {args.preset!r}, but the run started from preset "
                             f"{saved.preset!r}; resume without --preset")
        # the fields changed are said before whatever else is wrong with them (until 2026-12-07 --model hvae on a
        # resume of an mlp run was told to give more --latent sizes, which the resume then refused too)
        config = _train_config(args, saved, validate=False)
        changed = [d for d in saved.differences(config) if d.split(":")[0] not in free]
        if changed:
            *amendable, last = AMENDABLE.values()
            raise UsageError(f"--resume with a different config ({'; '.join(changed)}); resume with the original "
                             f"flags (only {resumable} may change, and {', '.join(amendable)} and {last} from "
                             f"where the run stands) or start a new --out")
        config = config.validate()
        amendments = [d for d in state_config.differences(config) if d.split(":")[0] in AMENDABLE]
        given = [d for d in saved.differences(config) if d.split(":")[0] in AMENDABLE]     # by this resume's flags
        done = int(meta.get("epoch", 0))
        if config.train.epochs < done:
            raise UsageError(f"--epochs {config.train.epochs} is below the {done} epochs {run_dir} has already "
                             f"trained; give --epochs {done + 1} or more to train on")
        from vaelab.runs import divergence

        # the last start from this checkpoint diverged, and config.json holds its --lr and clipping: these flags
        # change neither, so the same steps follow (until 2026-12-06 said nothing)
        diverged = divergence(run_dir, meta)
        repeats = diverged["what"] if diverged is not None and not given else None
        return {"config": config.to_dict(), "restored": restored, "changed": restored or config != saved,
                "amendments": amendments, "earlier": bool(amendments) and not given,
                "epochs_before": state_config.train.epochs, "repeats": repeats}

    try:
        claimed = on_main(world, claim)
        config = RunConfig.from_dict(claimed["config"], "the resumed config")
        run = _prepare_training(args, config)
        if claimed["restored"] and world.main:
            _log(f"{run_dir / ckpt.CONFIG} was missing; restored from the copy in {ckpt.STATE}")
        if claimed["repeats"] and world.main:
            train = config.train
            clipping = " ".join(f"{flag} {value:g}" for flag, value in (("--clip-grad-norm", train.clip_grad_norm),
                                                                          ("--clip-grad-value", train.clip_grad_value))
                                if value) or "no clipping"
            _note(f"the last training from this checkpoint diverged ({claimed['repeats']}), and this resume keeps its "
                  f"--lr {train.lr:g} and {clipping}, so the same steps follow; to go past them, resume with a lower "
                  f"--lr or with --clip-grad-norm C")
        return _train(args, config, run_dir, run, resumed=True, write_config=claimed["changed"], world=world,
                      observers=observers, amendments=claimed["amendments"], amended_earlier=claimed["earlier"],
                      epochs_before=claimed["epochs_before"])
    finally:
        for held in lock:
            held.release()


def _prepare_training(args: argparse.Namespace, config):
    """Everything that can be refused before a run directory is touched: engine, memory, device, data."""
    from vaelab.data import load_mnist, prepare
    from vaelab.distributed import world_from_environment
    from vaelab.compiling import require_compiler
    from vaelab.engines import select_engine
    from vaelab.resources import check_bf16, default_threads, require_memory
    from vaelab.training import resolve_device

    engine = select_engine(config)
    if getattr(args, "tensorboard", False):
        from vaelab.tensorboard import summary_writer_class

        summary_writer_class()                  # a one-line error now, not after the first epoch
    world = world_from_environment()
    threads = _set_threads(args.threads, config.train.threads or default_threads(world.local_size))
    device = resolve_device(config.train.device, world)
    require_memory(training_memory_bytes(config, 60_000), "training this model",    # where the tensors will be
                   training_memory_fix(config, 60_000), device)
    if config.train.precision == "bf16":
        _note(check_bf16(device))
    if engine == "compiled":
        asked = ("--engine compiled" if getattr(args, "engine", None) else "this run's --engine compiled"
                 if getattr(args, "resume", False) else f"the preset {config.preset}'s --engine compiled"
                 if config.preset else "--engine compiled")
        require_compiler(device, asked, "pass --engine autograd (the same gradient, slower)")
    arrays = load_mnist(config.data.data_dir, log=_log)
    if not getattr(args, "resume", False):      # a run that took more than there are (before 2026-12-05) resumes
        for flag, asked, there, kind in (
                ("--train-examples", config.data.train_examples, len(arrays.train_images), "training"),
                ("--test-examples", config.data.test_examples, len(arrays.test_images), "test")):
            # (until 2026-12-05 such a run took the first `there`, its config.json saying `asked`)
            _refuse_more_than_there(flag, asked, there, f"the data set has {there} {kind} digits")
    data = prepare(arrays, config.data, device)
    return device, threads, data


def _refuse_more_than_there(flag: str, asked: int | None, there: int, what: str) -> None:
    """One line for `train` and `evaluate` asked for more digits than there are (``what``: how many, and whose)."""
    if asked is not None and asked > there:
        raise UsageError(f"{flag} {asked}: {what}; give at most {there} (or leave it out: all of them)")


def _train(args: argparse.Namespace, config, run_dir: Path, run, resumed: bool, write_config: bool = True,
           world=None, observers: Sequence = (), amendments: Sequence[str] = (), amended_earlier: bool = False,
           epochs_before: int | None = None) -> int:
    from vaelab import checkpoint as ckpt
    from vaelab.distributed import SINGLE, on_main
    from vaelab.training import Interrupted, Trainer, check_writable

    world = world or SINGLE
    device, threads, data = run
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, threads=threads))
    log = _log if world.main else (lambda message: None)
    # a checkpoint is ≈3× the weights (weights, Adam's two moments) and the best weights, beside the previous
    # (the training state, the largest file: the weights and Adam's two moments, float32)
    weights_bytes = 4 * config.model.parameter_count()
    on_main(world, lambda: check_writable(run_dir, need_bytes=8 * weights_bytes + (16 << 20), resuming=resumed,
                                          largest_file=3 * weights_bytes + (1 << 20)))
    observers = list(observers)
    if getattr(args, "tensorboard", False) and world.main:
        from vaelab.tensorboard import TensorBoardLog

        observers.append(TensorBoardLog(run_dir, data.test_binary))
    trainer = Trainer(config, run_dir, data, device, log=log, progress=_progress(args), world=world,
                      observers=observers)
    if resumed:
        if world.main and (cut := trainer.remove_cut_writes()):
            note = f"removed {plural(len(cut), 'temporary file')} of a write a kill cut short: {', '.join(cut)}"
            log(note)
            trainer.append_log(note)
        trainer.load_checkpoint()
        finished = trainer.state.epoch >= config.train.epochs and not trainer.state.step
        if amendments and not amended_earlier and (finished or trainer.stopped_early):
            # kept in config.json, an amendment no step used was logged again at every later resume as if given then
            flags = " ".join(AMENDABLE[change.split(":")[0]] for change in amendments)
            fix = (f"add --epochs N above {config.train.epochs}" if finished else
                   "add --early-stopping 0 (or a larger N)")
            raise UsageError(f"{flags} changes how {run_dir} trains on, but it "
                             + (f"has trained all its {plural(config.train.epochs, 'epoch')}" if finished else
                                f"stopped early after epoch {trainer.state.epoch}")
                             + f"; {fix} to train on with it (nothing was changed)")
        trainer.rewrite_user_files()
        log(f"resuming {run_dir} after epoch {trainer.state.epoch}"
            + (f", step {trainer.state.step}" if trainer.state.step else ""))
        if amendments:
            # given at an earlier resume that wrote no checkpoint (killed before it): config.json holds them, the
            # state not yet; recorded now, and said so, not as if this resume's flags had changed them again
            log(trainer.amend(list(amendments), earlier=amended_earlier))
        if finished:
            log(f"{run_dir} has trained all its {plural(config.train.epochs, 'epoch')}: nothing to train (--epochs N "
                f"above {config.train.epochs} trains on); its files are written again from the training state")
    if (write_config or not resumed) and world.main:
        ckpt.write_text(run_dir / ckpt.CONFIG, config.to_json())
    validation = f", validation {len(data.validation_binary)}" if data.validation_binary is not None else ""
    processes = f" × {world.size} processes" if world.distributed else ""
    header = (f"training {config.model.name} {_architecture(config.model)} on {config.objective.name}"
              f"{f' (k = {config.objective.samples})' if config.objective.samples > 1 else ''}, {data.n_train} images "
              f"({config.data.binarize} binarisation{validation}), test on {data.n_test}, device {device}, "
              f"{plural(threads, 'thread')}{processes}, engine {trainer.engine_name} {config.train.precision}, "
              f"run {run_dir}")
    log(header)
    # train.log keeps where each start or resume ran, so that a run's epoch seconds across sessions and machines
    # can be read: the epochs after this line were trained so
    if world.main:
        from vaelab.provenance import provenance

        machine = provenance(device, threads)
        trainer.append_log((f"resumed after epoch {trainer.state.epoch}"
                            + (f", step {trainer.state.step}" if trainer.state.step else "") + ": " if resumed else "")
                           + f"{header}; machine {machine['cpu']}, torch {machine['torch']}, vaelab {machine['vaelab']}"
                           + (f" (commit {machine['commit']})" if machine.get("commit") else ""))
    from vaelab.schedules import describe_schedule

    amended_lr = resumed and any(change.startswith("train.lr:") for change in amendments)
    start = f"epoch {trainer.state.epoch + 1}" + (f", step {trainer.state.step + 1}" if trainer.state.step else "")
    done = trainer.state.metrics
    lines, warnings = describe_schedule(config, start if amended_lr else None,
                                        (len(done), epochs_before, done[-1]["lr"]) if resumed and done else None)
    if amended_lr and config.train.lr_schedule != "constant":
        lines[0] += f" (--lr amended: from {start} on; the steps before trained with the former)"
    schedule = "schedule: " + "; ".join(lines)
    log(schedule)
    trainer.append_log(schedule)                                  # what this start or resume trains with, kept
    if trainer.engine_name == "compiled":
        log("engine compiled: torch.compile builds the step's kernels at the first step of this process and again "
            "at the first short batch (tens of seconds each), counted in that epoch's seconds")
    if world.main:
        for warning in warnings:
            _note(warning)
    try:
        metrics = trainer.fit()
    except (Interrupted, TrainingDiverged):
        if world.main and trainer.state.metrics and (run_dir / ckpt.WEIGHTS).exists():
            try:
                _pictures_of_what_stands(data, trainer.state.metrics, run_dir, device)
            except KeyboardInterrupt:       # a second stop while they are drawn: the first one's line still says it
                _note(f"the pictures in {run_dir} were not redrawn (stopped again); they show the run as it was "
                      f"before")
        raise
    finally:
        for observer in observers:
            if hasattr(observer, "close"):
                observer.close()
    if world.main:
        not_drawn = (f"the training itself ended and its checkpoint ({trainer.last_checkpoint}) stands whole, but "
                     f"elbo.png, samples.png and reconstructions.png were not all drawn")
        try:
            write_pictures(trainer.model, data, metrics, run_dir)
        except ckpt.WriteError as exc:    # a disk that filled after the last checkpoint: that is whole, say so
            run = shell_word(run_dir)
            raise ckpt.WriteError(f"{exc.what}; {not_drawn}; {exc.remedy(run)}, then: {trainer.resume_command} draws "
                                  f"them again", exc.what, exc.errno) from exc
        except KeyboardInterrupt as exc:  # a stop after the last checkpoint (until 2026-12-07 the line of any
            # command's stop, "stopped by SIGTERM before it finished", as if the training had not ended)
            signum = getattr(exc, "stop_signal", signal.SIGINT)
            message = (f"stopped by {signal.Signals(signum).name} while drawing the pictures: {not_drawn}; "
                       f"{trainer.resume_command} draws them again")
            trainer.append_log(message)
            raise Interrupted(message, signum) from None
    # a run that holds out validation digits selects its weights on them (model-best), as the report's hint does
    best = " --checkpoint best" if trainer.state.best_epoch else ""
    log(f"done: test ELBO {metrics[-1]['test_elbo']:.3f} nats; files in {run_dir}; "
        f"next: vaelab evaluate {shell_word(run_dir)}{best}")
    return 0


def _architecture(model) -> str:
    """'784-256-50 relu', and in brackets the parts beyond Burda's Gaussian VAE where the model has them:
    '784-512-64 | … leaky_relu (top-down inference, batch norm)', '784-300-300-40 gated (vampprior prior, K = 500)',
    '784-400-40 tanh (planar flow of 80 steps)'."""
    blocks = [f"784-{'-'.join(map(str, model.hidden[0]))}-{model.latent[0]}"]
    blocks += [f"{'-'.join(map(str, h))}-{d}" for h, d in zip(model.hidden[1:], model.latent[1:])]
    parts = [f"{model.inference} inference"] * (model.inference != "bottom-up") + ["batch norm"] * model.batch_norm
    parts += [f"{model.prior} prior, K = {model.prior_components}"] * (model.prior != "standard")
    parts += [f"{model.flow} flow of {plural(model.flow_steps, 'step')}"] * (model.flow != "none")
    return " | ".join(blocks) + f" {model.activation}" + (f" ({', '.join(parts)})" if parts else "")


def _pictures_of_what_stands(data, metrics: list[dict], run_dir: Path, device) -> None:
    """At a stop (a signal, a divergence) the pictures of what the run directory holds: elbo.png of the completed
    epochs, samples and reconstructions of its model.safetensors (the checkpoint's weights), instead of those the
    last normal end left (a `ladder-5` run stopped at epoch 901 still showed the elbo.png of epoch 450)."""
    from vaelab import checkpoint as ckpt

    try:
        _, model = ckpt.load_model(run_dir, device)
        write_pictures(model, data, metrics, run_dir)
    except Exception as exc:           # the stop's own message matters more; say what the pictures show
        _note(f"the pictures in {run_dir} were not redrawn ({exc}); they show the run as it was before")


def write_pictures(model, data, metrics, run_dir: Path) -> None:
    """elbo.png, samples.png (8×8 decoder means) and reconstructions.png of a run."""
    import torch

    from vaelab.evaluation import reconstructions
    from vaelab.plots import plot_elbo, plot_grid, plot_reconstructions
    from vaelab.training import PICTURES

    elbo, samples, recons = (run_dir / name for name in PICTURES)
    plot_elbo(metrics, elbo)
    model.eval()
    generator = torch.Generator(device=data.test_binary.device).manual_seed(0)
    plot_grid(model.sample(64, generator).cpu().numpy(), samples, "samples from p(x): decoder means")
    with torch.no_grad():
        x = data.test_binary[:30].float()
        recon = reconstructions(model, x)
    plot_reconstructions(x.cpu().numpy(), recon.cpu().numpy(), recons)


# ------------------------------------------------------------------------------------------------
# evaluate


def evaluation_name(args: argparse.Namespace, n_examples: int) -> str:
    """eval[-validation][-best]-k<K>-n<N>-seed<S>[-laplace][-<precision>][…][-compiled].json: other settings never
    share a file (a float32 evaluation keeps the name it always had)."""
    parts = ["eval"] + (["validation"] if args.split == "validation" else []) \
        + (["best"] if args.checkpoint == "best" else []) + [f"k{args.k}", f"n{n_examples}", f"seed{args.seed}"] \
        + (["laplace"] if args.laplace else []) + ([args.precision] if args.precision != "fp32" else []) \
        + ([f"gaps{args.gap_steps}"] if args.gaps else []) + (["kcurve"] if args.k_curve else []) \
        + (["compiled"] if args.compiled else [])
    return "-".join(parts) + ".json"


def _default_record(path: Path, loaded, note: Callable[[str], None]) -> Path:
    """The default record's path, or where that file holds an evaluation of other weights, ``_beside_other_weights``'s
    name for this one."""
    def earlier(record_path: Path) -> tuple[str | None, str]:
        from vaelab.runs import weights_label

        try:
            record = json.loads(record_path.read_text(encoding="utf-8-sig"))      # (a BOM: as runs.read_evaluations)
        except (OSError, ValueError):
            return None, ""                             # not a record vaelab can read: refused, the user decides
        if not isinstance(record, dict):
            return None, ""
        label = weights_label({**record, "stale": False})
        return record.get("weights_sha256"), f"the evaluation of other weights, {label}"

    return _beside_other_weights(path, loaded, earlier, note)


def _default_picture(path: Path, loaded, note: Callable[[str], None]) -> Path:
    """The default picture's path (`vaelab sample`), or where that PNG was drawn from other weights (the digest its
    metadata holds, ``PICTURE_WEIGHTS_KEY``), ``_beside_other_weights``'s name for this one."""
    def earlier(picture: Path) -> tuple[str | None, str]:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(picture) as image:
                return getattr(image, "text", {}).get(PICTURE_WEIGHTS_KEY), "a picture of other weights"
        except (OSError, UnidentifiedImageError):
            return None, ""                             # not a picture vaelab can read: refused, the user decides

    return _beside_other_weights(path, loaded, earlier, note)


# the PNG text field where `vaelab sample` keeps the SHA-256 of the weights it drew from
PICTURE_WEIGHTS_KEY = "vaelab weights sha256"


def _beside_other_weights(path: Path, loaded, earlier: Callable[[Path], tuple[str | None, str]],
                          note: Callable[[str], None]) -> Path:
    """``path``, or where that file was made from other weights than ``loaded`` (``earlier`` reads the digest of the
    weights it was made from, and says what it holds; None: unknown) — the run trained on since — the same name with
    these weights' place in the run added (``…-epoch1003.json``, ``…-epoch12-step40.png``), so that a training run
    evaluated or sampled again needs no --out and the earlier file stays (as it was, the second was refused). The same
    weights under the same settings are refused as before (``_check_target``; --overwrite replaces their file, under
    whichever of the two names it has)."""
    if loaded.epoch is None or not path.exists():
        return path
    digest, what = earlier(path)
    if digest is None or digest == loaded.sha256:
        return path
    place = path.with_name(f"{path.stem}-epoch{loaded.epoch}" + (f"-step{loaded.step}" if loaded.step else "")
                           + path.suffix)
    note(f"{path.name} holds {what}; this one is {place.name}")
    return place


def _weights_file(run_dir: Path, checkpoint: str) -> str:
    from vaelab import checkpoint as ckpt
    from vaelab.training import BEST_WEIGHTS

    if checkpoint == "last":
        return ckpt.WEIGHTS
    if not (run_dir / BEST_WEIGHTS).exists():
        raise UsageError(f"{run_dir} has no {BEST_WEIGHTS}: best weights are kept only by runs trained with "
                         f"--validation N; use --checkpoint last")
    return BEST_WEIGHTS


def _check_target(path: Path, overwrite: bool, what: str, flag: str = "--out") -> None:
    _refuse_own_file(path, flag)
    if path.is_dir():       # (until 2026-12-07 "exists …; pass --overwrite", which then failed after all the work)
        raise UsageError(f"{flag} {path} is a directory; give a file name ending in {path.suffix}")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists (vaelab's or not, it is kept); pass --overwrite to replace it with this "
                         f"{what}, or {flag} another file")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {path.parent} does not exist; create it first")


def _refuse_own_file(path: Path, flag: str) -> None:
    """A file that a run, a sweep or a report's figures are made of is no command's output, --overwrite or not
    (until 2026-12-06 `evaluate RUN --out RUN/config.json --overwrite` wrote its record over the config the run is
    rebuilt from, and the run could not be read again; `--out RUN/pruned.json` would have marked it pruned)."""
    from vaelab import checkpoint as ckpt
    from vaelab.sweep import SPEC_FILE, STATE_FILE, STORAGE_FILE, is_sweep
    from vaelab.training import PICTURES, TRAIN_LOG, TRAINING_FILES

    parent, name = path.parent, path.name
    # its pictures aside: drawn again at the end of training, a picture of one's own may take their place
    run_files = {*TRAINING_FILES, TRAIN_LOG, ckpt.LOCK, ckpt.PRUNED, ckpt.DIVERGED} - set(PICTURES)
    owners = [("the run", ckpt.is_run(parent), run_files),
              ("the sweep", is_sweep(parent), {SPEC_FILE, STATE_FILE, STORAGE_FILE}),
              ("the report's figures in", True, {FIGURES_MANIFEST})]
    for owner, holds, names in owners:
        if holds and name in names:
            raise UsageError(f"{flag} {path}: {name} is a file of {owner} {parent}, which no output may replace "
                             f"(--overwrite or not); give {flag} another file")


def _check_evaluation_target(out: Path, overwrite: bool) -> None:
    """``_check_target`` of the record, and of the per-digit file beside it where that is not vaelab's."""
    from vaelab.records import digits_path, someone_elses

    _check_target(out, overwrite, "evaluation")
    if someone_elses(digits_path(out)) and not overwrite:
        raise UsageError(f"{digits_path(out)} exists and is not vaelab's per-digit values, which go beside {out.name}; "
                         f"pass --out another file, or --overwrite to replace it")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """One process, or torchrun's: each rank estimates a shard of the digits; rank 0 checks, prints, writes."""
    from vaelab import checkpoint as ckpt
    from vaelab import distributed
    from vaelab.data import idx_sha256, load_mnist, prepare, resolve_path
    from vaelab.evaluation import EvalConfig, check_precision, evaluate_run
    from vaelab.provenance import provenance
    from vaelab.records import evaluation_export, format_eval_table, load_the_same_weights, write_evaluation
    from vaelab.resources import check_bf16, default_threads, require_memory
    from vaelab.runs import pictured_weights, read_run, weights_position
    from vaelab.training import resolve_device

    if args.gap_steps is not None and not args.gaps:
        raise UsageError(f"--gap-steps {args.gap_steps} sets the optimisation of --gaps: add --gaps, or drop --gap-steps")
    args.gap_steps = args.gap_steps or EvalConfig.gap_steps
    world = distributed.world_from_environment()
    distributed.init(world)
    try:
        device = resolve_device(args.device, world)
        threads = _set_threads(args.threads, default_threads(world.local_size))
        weights = _weights_file(args.run_dir, args.checkpoint) if args.run_dir.is_dir() else ckpt.WEIGHTS
        config, model, loaded = load_the_same_weights(args.run_dir, device, weights, world)
        run = read_run(args.run_dir)                   # now, not after the evaluation: a training goes on
        position = weights_position(loaded, run)
        if args.split == "validation" and not config.data.validation:
            raise UsageError(f"--split validation: {args.run_dir} was trained without --validation; it has no "
                             f"held-out digits (evaluate on --split test)")
        if args.k_curve and args.k < 1000:
            raise UsageError(f"--k-curve draws the estimate at K = 1, 10, 100, 1000 and --k: give --k 1000 or more "
                             f"(got {args.k})")
        check_precision(model, args.precision, bool(args.compiled))
        args.compiled = _evaluate_compiled(args, config, model, device, world.main)
        if args.precision == "bf16":
            _note(check_bf16(device))
        eval_config = EvalConfig(k=args.k, seed=args.seed, laplace=args.laplace, precision=args.precision,
                                 k_curve=args.k_curve, gaps=args.gaps, gap_steps=args.gap_steps, compiled=args.compiled)
        # before the data are read (a fetch where the run's cache is gone), for the digits known now: --test-examples,
        # or a run's held-out digits (the test set is larger than a batch)
        digits = args.test_examples if args.test_examples is not None else \
            config.data.validation if args.split == "validation" else None
        require_memory(eval_config.memory_bytes(config.model, device, digits), f"evaluate --k {args.k}",
                       "use a smaller --k", device)
        data_dir = str(resolve_path(args.data_dir, "--data-dir")) if args.data_dir else config.data.data_dir
        # the whole test set unless --test-examples says otherwise (not the training run's smoke setting)
        data_config = dataclasses.replace(config.data, test_examples=args.test_examples, data_dir=data_dir)
        if args.split == "test":
            data_config = dataclasses.replace(data_config, validation=0, train_examples=1)
        arrays = load_mnist(data_dir, log=_log if world.main else lambda m: None)
        there = len(arrays.test_images) if args.split == "test" else config.data.validation
        # until 2026-12-06 the first `there` were evaluated without a word (the record said how many)
        holder = "the data set has" if args.split == "test" else f"{args.run_dir} holds out"
        _refuse_more_than_there("--test-examples", args.test_examples, there, f"{holder} {there} {args.split} digits")
        data = prepare(arrays, data_config, device)
        images, labels = (data.test_binary, data.test_labels) if args.split == "test" else \
            (data.validation_binary[: args.test_examples], data.validation_labels[: args.test_examples])
        out = args.out or _default_record(args.run_dir / evaluation_name(args, len(images)), loaded,
                                          _note if world.main else lambda m: None)
        distributed.on_main(world, lambda: _check_evaluation_target(out, args.overwrite))
        processes = f", {world.size} processes" if world.distributed else ""
        if world.main:
            _log(f"evaluating {args.run_dir} ({pictured_weights(loaded, run)}) on "
                 f"{plural(len(images), f'{args.split} digit')}, K = {args.k}, device {device}, "
                 f"{plural(threads, 'thread')}{processes}")
        summary, per_digit = evaluate_run(model, images, eval_config, progress=_progress_or_lines(args), world=world)
        if not world.main:
            return 0
        record = {**provenance(device, threads), "run": str(args.run_dir.resolve()), "weights": weights,
                  "weights_sha256": loaded.sha256, **position, "split": args.split,
                  "data_sha256": idx_sha256(images.cpu().numpy()), **summary}
        refused = summary.get("laplace_refused")
        renamed = refused and not args.out    # the record of what was estimated: named as an evaluation without Laplace
        if renamed:
            out = _default_record(args.run_dir / evaluation_name(argparse.Namespace(**{**vars(args), "laplace": False}),
                                                                 len(images)), loaded, _note)
        args.print_table(format_eval_table(record) if args.format == "text" else evaluation_export(record, args.format))
        # the name without Laplace was not this command's to check before it ran (its --overwrite is the Laplace
        # record's): an evaluation found there is kept (until 2026-12-07 it was said to have been written meanwhile)
        earlier = renamed and out.exists()
        written, digits = write_evaluation(out, record, per_digit, labels, args.run_dir, args.overwrite and not renamed)
        if written != out:
            _note(f"{out.name} " + ("holds an earlier evaluation of these settings without --laplace, kept" if earlier
                                    else "was written by another evaluation of the same settings while this one ran")
                  + f": this one is {written.name}")
        _log(f"written {written} and {digits.name}")
        if refused:
            raise UsageError(f"{refused}; the other estimators were written, as an evaluation without --laplace: "
                             f"{written}")
        return 0
    except distributed.RankLost as exc:
        raise distributed.RankLost(f"{exc}; nothing was written; evaluate again (the same {world.torchrun} "
                                   f"command, or one process)") from None
    finally:
        distributed.shutdown(world)


def _evaluate_compiled(args: argparse.Namespace, config, model, device, main: bool) -> bool:
    """Whether this evaluation compiles its log weights: ``--compiled`` / ``--no-compiled`` as given (the first
    refused without a compiler), else as the run trained on a CPU (``compiled_as_trained``), eager with a note where
    that would need a compiler this machine lacks, and with a line on a GPU."""
    from vaelab.compiling import compiler_found, require_compiler
    from vaelab.evaluation import compiled_as_trained

    if args.compiled:
        require_compiler(device, "--compiled")
    if args.compiled is not None:
        return args.compiled
    if not compiled_as_trained(model, config.train.engine, args.precision, device):
        if main and compiled_as_trained(model, config.train.engine, args.precision):
            _log("log weights eager on a GPU, though this run trained with --engine compiled (compiling them takes "
                 "longer there than the whole evaluation); --compiled compiles them")
        return False
    if not compiler_found(device):
        if main:
            _note("this run trained with --engine compiled, but no C++ compiler was found: its log weights are "
                  "computed eagerly (the same estimate to float32 rounding; install g++ to compile them)")
        return False
    if main:
        _log("log weights compiled, as this run trained (--engine compiled); --no-compiled computes them eagerly")
    return True


# ------------------------------------------------------------------------------------------------
# sample, presets, data, stirling


def _picture_path(path: Path, flag: str = "--out") -> Path:
    from vaelab.plots import picture_formats

    formats = picture_formats()
    if path.is_dir() and not path.suffix:      # (until 2026-12-07 "/tmp: cannot write a suffix-less picture")
        raise UsageError(f"{flag} {path} is a directory; give a picture's file name, ending in .png, .pdf, .svg or "
                         f"another of matplotlib's formats")
    if path.suffix.lower().lstrip(".") not in formats:
        raise UsageError(f"{path}: cannot write a {path.suffix or 'suffix-less'} picture; end the name with one of "
                         f"{', '.join('.' + f for f in formats)}")
    return path


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from vaelab import checkpoint as ckpt
    from vaelab.plots import plot_grid
    from vaelab.runs import pictured_weights, read_run

    weights = _weights_file(args.run_dir, args.checkpoint) if args.run_dir.is_dir() else ckpt.WEIGHTS
    _, model, loaded = ckpt.load_model_weights(args.run_dir, weights=weights)
    out = _picture_path(args.out or _default_picture(args.run_dir / f"samples-n{args.n}-seed{args.seed}.png", loaded,
                                                     _note))
    _check_target(out, args.overwrite, "picture")
    images = model.sample(args.n, torch.Generator().manual_seed(args.seed)).numpy()
    try:
        plot_grid(images, out, f"{args.n} samples from p(x), seed {args.seed}: decoder means\nof "
                               f"{pictured_weights(loaded, read_run(args.run_dir))}",
                  metadata={PICTURE_WEIGHTS_KEY: loaded.sha256})
    except ckpt.WriteError as exc:      # a run on a read-only mount or a full disk: the picture can go elsewhere
        raise ckpt.WriteError(f"{exc.what}; {exc.remedy(shell_word(out.parent))}, or pass --out FILE.png in a "
                              f"writable place", exc.what, exc.errno) from exc
    _log(f"written {out}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from vaelab.config import RunConfig
    from vaelab.presets import PRESETS, apply_preset

    unknown = [name for name in args.names if name not in PRESETS]    # (argparse's choices refuse nargs="*" empty)
    if unknown:
        raise UsageError(f"no preset {unknown[0]!r}: choose from {', '.join(PRESETS)}")
    for name in dict.fromkeys(args.names) or PRESETS:       # each once, in the order asked (`presets seed seed`)
        preset = PRESETS[name]
        _log(f"{name}: {preset['about']}")
        if "paper" in preset:
            _log(f"    paper's test NLL: {preset['paper'][0]:.2f} ({preset['paper'][1]})")
        if "deviations" in preset:
            _log(f"    differs from the paper: {preset['deviations']}")
        for change in RunConfig().differences(apply_preset(RunConfig(), name)):
            if not change.startswith("preset:"):
                _log(f"    {change}")
    return 0


def _check_page_target(out: Path) -> None:
    """Refuse, before any work, a page that cannot be written: not .html, a directory, a missing or read-only
    directory."""
    import os

    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {out}: the page is HTML; give a file name ending in .html")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name ending in .html")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"--out {out}: {out.parent} is not writable; give --out in a writable directory")
    if out.exists() and not _made_by_vaelab(out):
        raise UsageError(f"--out {out} exists and is not a page vaelab made; give another --out, or move that file "
                         f"away first")


def _made_by_vaelab(page: Path) -> bool:
    """Whether an existing HTML file is a page of `report` or `compare` (each version's <title> begins 'vaelab'),
    which a new page may replace: it is made again from the runs' files. Any other file is someone's own."""
    try:
        with open(page, "rb") as handle:
            return b"<title>vaelab" in handle.read(4096)
    except OSError:
        return False


# what `report --figures DIR` leaves in DIR beside the figures: which run they are of (so that a report of another
# run never replaces them silently)
FIGURES_MANIFEST = "vaelab-figures.json"
# the names of the figures a report writes: KEY-column.pdf, KEY-full.svg, …, and training.png, samples.png (the
# raster ones, report.FigureSet)
_FIGURE_NAME = re.compile(r"[a-z0-9-]+-(column|full)\.(pdf|svg)|(training|samples)\.png")


def _check_figures_target(directory: Path | None, run_dir: Path) -> bool:
    """Refuse, before any work, a --figures directory that cannot take the figures: a file, not writable, or one
    holding figures of another run's report (or files named as the figures are, from no report), which the
    figures would replace. True where it holds those of an earlier report of this run (replaced, and said)."""
    import os

    if directory is None:
        return False
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--figures {directory} is a file; give a directory for the figures")
    parent = directory if directory.exists() else directory.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--figures {directory}: {parent} is missing or not writable; give a writable directory")
    taken = sorted(_figure_files(directory))
    if not taken:
        return False
    of = _figures_owner(directory)
    if of != str(run_dir.resolve()):
        whose = f"the figures of the report of {of}" if isinstance(of, str) else \
            f"files named as this report's figures ({', '.join(taken[:3])}{', …' if len(taken) > 3 else ''})"
        raise UsageError(f"--figures {directory} holds {whose}, which these would replace; give another directory "
                         f"(e.g. {directory / run_dir.resolve().name})")
    return True


def _figure_files(directory: Path | None) -> set[str]:
    """The names in ``directory`` that a report's figures take (none without it)."""
    if directory is None or not directory.is_dir():
        return set()
    return {path.name for path in directory.iterdir() if _FIGURE_NAME.fullmatch(path.name)}


def _figures_owner(directory: Path) -> str | None:
    """The run whose report's figures ``directory`` holds, as its vaelab-figures.json says (None: none readable)."""
    try:
        return json.loads((directory / FIGURES_MANIFEST).read_text(encoding="utf-8")).get("run")
    except (OSError, ValueError, AttributeError):
        return None


def _claim_figures(directory: Path, run_dir: Path, again: bool) -> None:
    """``directory``/vaelab-figures.json naming ``run_dir``, written before any figure. Where the folder held none
    of this run's figures it is written without replacing: a second report that started at the same moment into
    the same folder (both found it free) finds the first's and stops, one line, before writing a figure."""
    from vaelab.atomic import WriteError, write_text

    made = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    me = str(run_dir.resolve())
    try:
        write_text(directory / FIGURES_MANIFEST, json.dumps({"run": me}) + "\n", replace=again)
    except WriteError:                  # a full disk: the folder made for the figures is not left behind, empty
        if made:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    except FileExistsError:
        of = _figures_owner(directory)
        if of != me:
            whose = f"the report of {of}" if isinstance(of, str) else "a report vaelab cannot read"
            raise UsageError(f"--figures {directory} holds {FIGURES_MANIFEST} of {whose} (being written now, or its "
                             f"figures were removed); give another directory, or remove that file if its figures are "
                             f"gone") from None


def _write_page(out: Path, html: str) -> None:
    from vaelab.atomic import write_text

    _check_page_target(out)
    replaced = out.exists()
    write_text(out, html)
    _log(f"written {out}" + (" (it replaces the earlier page; pages are made from the run's files)" if replaced else ""))


def cmd_report(args: argparse.Namespace) -> int:
    from vaelab.data import resolve_path
    from vaelab.report import build_report
    from vaelab.sweep import build_sweep_report, is_sweep

    from vaelab import checkpoint as ckpt

    ckpt.require_run_dir(args.run_dir)
    out = args.out or args.run_dir / "report.html"
    _check_page_target(out)                       # before the page is built: a minute is not wasted
    if is_sweep(args.run_dir) and args.figures is not None:
        raise UsageError(f"--figures writes a run's figures; {args.run_dir} is a sweep: give one of its trials "
                         f"(vaelab report {shell_word(args.run_dir / 'trials' / '0000')} --figures "
                         f"{shell_word(args.figures)})")
    again = _check_figures_target(args.figures, args.run_dir)
    data_dir = str(resolve_path(args.data_dir, "--data-dir")) if args.data_dir else None
    if is_sweep(args.run_dir):
        start = time.perf_counter()
        html = build_sweep_report(args.run_dir, data_dir=data_dir, progress=_progress_or_lines(args))
        _write_page(out, html)
        _log(f"report of the sweep {args.run_dir} made in {time.perf_counter() - start:.1f} s")
        return 0
    if args.figures is not None:
        _claim_figures(args.figures, args.run_dir, again)
    before = _figure_files(args.figures)
    html, seconds, written = build_report(args.run_dir, data_dir, figures_dir=args.figures, progress=_progress(args))
    _write_page(out, html)
    _log(f"report of {args.run_dir} made in {seconds:.1f} s ({len(html) / 2**20:.1f} MiB, self-contained)")
    if args.figures is not None:
        # counted from what this report wrote, not from the folder: an earlier report's figures may be there too
        count = len({path.name.rsplit("-", 1)[0] for path in written if path.suffix == ".pdf"})
        left = sorted(before - {path.name for path in written})
        _log(f"figures in {args.figures}: {count}, each as PDF and as SVG 3.25 in (one column, -column) and 6.75 in "
             f"(full width, -full) wide, fonts embedded; the training curves and samples also as 300-dpi PNG "
             f"({len(written)} files)" + ("; they replace those of the earlier report of this run" if again else ""))
        if left:
            named = f"{plural(len(left), 'file')} named as {'a figure' if len(left) == 1 else 'figures'}"
            _note(f"{named}, from an earlier report (or not vaelab's), "
                  f"{'is' if len(left) == 1 else 'are'} left as before and {'is' if len(left) == 1 else 'are'} not of "
                  f"this page: {', '.join(left[:4])}{', …' if len(left) > 4 else ''}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vaelab import checkpoint as ckpt
    from vaelab.report import build_comparison, comparison_export, comparison_table
    from vaelab.runs import runs_inside

    if len(args.run_dirs) < 2:
        given = args.run_dirs[0]
        # a folder of runs: said so (until 2026-12-07 "give another run directory … to compare runs/ with")
        inside = "" if ckpt.is_run(given) else runs_inside(given, "two or more of them", fewest=2)
        if inside:
            raise UsageError(f"compare needs two or more runs, got 1: {given} is not a run{inside}")
        raise UsageError(f"compare needs two or more runs, got {len(args.run_dirs)}: give another run directory (or "
                         f"an eval-….json record in one) to compare {given} with")
    out = args.out or default_comparison_page(args.run_dirs)
    _check_page_target(out)
    html, comparison = build_comparison(args.run_dirs, args.split)
    args.print_table(comparison_table(comparison) if args.format == "text" else
                     comparison_export(comparison, args.format))
    _write_page(out, html)
    return 0


def default_comparison_page(run_dirs: Sequence[Path]) -> Path:
    """compare-<name>-<name>….html in the runs' common parent directory (not wherever the shell happens to be), or
    beside the first run where the runs share no directory but the file system's root (/tmp/a and ~/runs/b: not
    a page in /); a long list of names is shortened to the first and a digest of all."""
    import hashlib
    import os

    from vaelab.runs import distinct_labels

    names = [label.removesuffix(".json").replace("/", "_").replace(" ", "") for label in distinct_labels(run_dirs)]
    parents = [Path(p).resolve().parent for p in run_dirs]
    parent = Path(os.path.commonpath(parents))
    if parent == Path(parent.anchor):
        parent = parents[0]
    stem = "compare-" + "-".join(names)
    if len(stem) > 100:
        digest = hashlib.sha256("\0".join(str(Path(p).resolve()) for p in run_dirs).encode()).hexdigest()[:8]
        stem = f"compare-{names[0][:40]}-and-{len(names) - 1}-more-{digest}"
    return parent / f"{stem}.html"


def cmd_sweep(args: argparse.Namespace) -> int:
    from vaelab.resources import usable_cores
    from vaelab.sweep import summary_table, sweep

    cores = usable_cores()
    if args.workers > cores:
        # each worker trains on a thread of its own at least: more of them than cores only wait for each other, and
        # each holds its own torch and data (2 cores, --workers 100: 26 GB before a trial began)
        raise UsageError(f"--workers {args.workers}: this process may run on {plural(cores, 'core')} (its CPU "
                         f"affinity), and each worker trains on one at least; give at most {cores} (a sweep command on "
                         f"another machine with the same --storage adds its workers to the study)")
    summary = sweep(args.spec, args.out, args.workers, args.storage, args.trials, log=_log, progress=_progress(args))
    _log(summary_table(summary))
    states = [row["state"] for row in summary["rows"]]
    if summary.get("workers_ended"):     # a worker killed or crashed: the trial it held is left for the next sweep
        raise VaelabError(f"{summary['workers_ended'][0]}; the same command again goes on with the study (a trial "
                          f"left running is retried from its last checkpoint)")
    stopped = [row for row in summary["rows"] if row["state"] == "stopped"]
    if stopped:                          # a worker that could not write (a full disk) ended: the sweep is not done
        raise VaelabError(f"trial {stopped[0]['slot']:04d} of {args.out} stopped: {stopped[0]['stopped']}; once that "
                          f"is mended, the same command again goes on with the study (its slot"
                          f"{'s' * (len(stopped) > 1)} retried from {'their' if len(stopped) > 1 else 'its'} last "
                          f"checkpoint)")
    if summary["best"] is None and states and set(states) <= {"fail", "pruned"}:
        # every slot has ended and none completed: nothing to train in full (the exit status said 0 before)
        ended = f"{states.count('fail')} failed" + (f", {states.count('pruned')} pruned" if "pruned" in states else "")
        raise VaelabError(f"no trial of {args.out} completed ({ended} of {len(states)}): there is no best "
                          f"configuration; the lines above say why each failed; change the spec (its ranges or "
                          f"[fixed] fields) and sweep into another --out")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from vaelab import checkpoint as ckpt
    from vaelab.errors import CheckpointError
    from vaelab.presets import changed_mark, preset_label
    from vaelab.runs import find_runs, headline_nll, read_run

    if not args.directory.is_dir():
        # until 2026-12-07 a path that does not exist was said to be "not a directory"
        there = "is not a directory" if args.directory.exists() else "does not exist"
        raise UsageError(f"{args.directory} {there}; give the directory that holds your runs")
    rows = []
    for path in find_runs(args.directory):
        try:
            run = read_run(path)
        except CheckpointError as exc:
            _note(str(exc))
            rows.append([str(path), "?", "?", "unreadable (the note above)", "—", "—", "—"])
            continue
        for note in run.notes:
            _note(note)
        problem = ckpt.weights_problem(path) if run.epochs_done and not run.holder else None
        if problem:
            _note(f"{path}: {problem}; " + (ckpt.rewrite_fix(path) or "retrain it"))
        nll = headline_nll(run)
        state_file = path / "training_state.safetensors"
        date = (run.meta.get("provenance") or {}).get("date") or (
            time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(state_file.stat().st_mtime))
            if state_file.exists() else "—")
        status = run.status + (f" (pid {run.holder})" if run.holder and run.holder > 0 else "") \
            + (f", {problem}" if problem else "")
        best = run.best_validation
        rows.append([str(path), preset_label(run.config), f"{run.epochs_done}/{run.epochs_total}", status,
                     f"{best[1]:.2f} (epoch {best[0]})" if best else "—", nll, date])
    if not rows:
        _log(f"no runs under {args.directory}")
        return 0
    # "status", as compare, the report and the API's Run.status call it (until 2026-12-07 "state" here alone); the
    # headline NLL, the one the report leads with (the most digits, then the largest K: until 2026-12-07 "best NLL",
    # which it is not where a record of fewer digits reads lower)
    header = ["run", "preset/model", "epochs", "status", "best validation ELBO", "headline NLL", "last checkpoint"]
    for line in text_table(header, rows):
        _log(line)
    if mark := changed_mark(row[1] for row in rows):
        _log(mark)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from vaelab.data import CACHE_NAME, OFFICIAL_SHA256, default_data_dir, load_mnist, resolve_path

    directory = resolve_path(args.data_dir, "--data-dir") if args.data_dir else default_data_dir()
    start = time.perf_counter()
    arrays = load_mnist(directory, log=_log)
    what = "MNIST (official SHA-256 of all four splits)" if arrays.digests() == OFFICIAL_SHA256 else \
        "a custom data set (not the official MNIST; its own checksums verified)"
    cache = directory / CACHE_NAME
    where = f"in {cache}" if cache.is_file() else f"(not cached in {directory}: the line above says why)"
    _log(f"{what}: {len(arrays.train_images)} training and {len(arrays.test_images)} test images {where} "
         f"(loaded in {time.perf_counter() - start:.2f} s)")
    return 0


def cmd_stirling(args: argparse.Namespace) -> int:
    import mpmath
    import numpy as np

    from vaelab.laplace import stirling_table
    from vaelab.tables import Written, render_table

    plot = _picture_path(args.plot, "--plot") if args.plot else None
    if plot:
        _check_target(plot, args.overwrite, "picture", "--plot")
    table = stirling_table(args.n, args.terms)          # whole numbers as given: 10¹⁸ − 1 is not a float64
    header = ["N", "ln N! (lgamma)", "Laplace/Stirling", "rel. error", "12N × rel. error",
              f"rel. error, {args.terms} terms"]
    rows = [[r["n"], Written(f"{r['exact']:.10g}"), Written(f"{r['stirling']:.10g}"),
             Written(mpmath.nstr(r["rel_error"], 5)), Written(mpmath.nstr(r["scaled_error"], 7, strip_zeros=False)),
             Written(mpmath.nstr(r["rel_error_terms"], 4))] for r in table]
    if args.format == "text":
        for line in text_table(header, [[str(cell) for cell in row] for row in rows], right=True):
            _log(line)
    else:   # (until 2026-12-08 the text table alone: a report on the exercise retyped it)
        caption = ("ln N! by lgamma and by Laplace's method (Stirling's formula, √(2πN)(N/e)^N), and the relative "
                   f"error of N! from the formula alone and with {plural(args.terms, 'correction term')} of Stirling's "
                   "series; 12N times the first tends to 1")
        args.print_table(render_table(header, rows, args.format, "" if args.format == "csv" else caption))
    # Stirling's series is asymptotic, not convergent: its k-th term B₂ₖ / (2k(2k−1) N^{2k−1}) shrinks while k is
    # below about πN (|B₂ₖ| ≈ 2 (2k)! / (2π)^{2k}: consecutive terms have the ratio ≈ (k / πN)²) and then grows
    # without bound, so many terms at a small N give errors like 5.7e+2594435231320763920825695904915 (N = 1, K = 30),
    # right, and until 2026-12-07 shown without a word
    if worse := [str(r["n"]) for r in table if args.terms and abs(r["rel_error_terms"]) > abs(r["rel_error"])]:
        _log(f"note: Stirling's series diverges: its k-th term shrinks only while k is below about πN, so "
             f"{plural(args.terms, 'correction term')} make N = {', '.join(worse)} worse than none; give fewer "
             f"--terms for a small N (the best is about πN)")
    if plot:
        from vaelab.laplace import stirling_error_curves
        from vaelab.plots import plot_stirling

        ns = [float(n) for n in args.n]                 # one N: the curve from 1 to it
        ns = ns if len(ns) > 1 else sorted({float(round(v)) for v in np.logspace(0, math.log10(ns[0]), 31)})
        ns, errors = stirling_error_curves(args.terms, ns)
        plot_stirling(ns, errors, plot)
        _log(f"written {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
