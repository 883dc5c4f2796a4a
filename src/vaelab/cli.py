"""The ``vaelab`` command line: train, evaluate, sample, data, stirling.

All argument parsing lives here. Every failure the user can fix is one line on stderr: bad arguments
and bad run directories exit with status 2 (nothing written), an interrupted training run with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

from vaelab.errors import UsageError, VaelabError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _whole_number(low: int, high: int = 2**63):
    """An argparse type for whole numbers in [low, high)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number ≥ {low}, got {text!r}") from None
        if not low <= value < high:
            raise argparse.ArgumentTypeError(f"must be at least {low}" + (" and below 2⁶³" if value >= high else "")
                                             + f", got {value}")
        return value

    return parse


_positive_int = _whole_number(1)
_non_negative_int = _whole_number(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu or cuda")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vaelab", description="Variational autoencoders on binarised MNIST, and Laplace's method.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a VAE (default: the reference setting, 100 epochs)")
    train.add_argument("--out", type=Path, help="run directory (default runs/<timestamp>)")
    train.add_argument("--epochs", type=_positive_int, help="epochs to train (default 100)")
    train.add_argument("--batch-size", type=_positive_int, help="examples per step (default 64)")
    train.add_argument("--lr", type=_positive_float, help="Adam learning rate (default 1e-3)")
    train.add_argument("--hidden", type=_positive_int, help="hidden units of encoder and decoder (default 256)")
    train.add_argument("--latent", type=_positive_int, help="latent dimensions d (default 50)")
    train.add_argument("--seed", type=_non_negative_int, help="seed of every random stream (default 0)")
    train.add_argument("--device", type=_device, help="auto (default: cuda if available), cpu or cuda")
    train.add_argument("--binarize", choices=["dynamic", "static"],
                       help="fresh Bernoulli pixels every batch (default) or once for the whole run")
    train.add_argument("--engine", choices=["fused", "autograd"], help="gradient code (default fused)")
    train.add_argument("--train-examples", type=_positive_int, help="use the first N training images")
    train.add_argument("--test-examples", type=_positive_int, help="use the first N test images")
    train.add_argument("--data-dir", type=Path, help="MNIST cache (default $VAELAB_DATA or ~/.cache/vaelab/mnist)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=cmd_train)

    evaluate = sub.add_parser("evaluate", help="test log-likelihood by importance sampling, and the ELBO")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--k", type=_positive_int, default=5000, help="importance samples per digit")
    evaluate.add_argument("--test-examples", type=_positive_int)
    evaluate.add_argument("--laplace", action="store_true", help="add the Laplace estimates of log p(x)")
    evaluate.add_argument("--seed", type=_non_negative_int, default=0)
    evaluate.add_argument("--device", type=_device, default="auto")
    evaluate.add_argument("--data-dir", type=Path)
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(run=cmd_evaluate)

    sample = sub.add_parser("sample", help="a grid of decoder means for z ~ N(0, I)")
    sample.add_argument("run_dir", type=Path)
    sample.add_argument("--n", type=_positive_int, default=64)
    sample.add_argument("--seed", type=_non_negative_int, default=0)
    sample.add_argument("--out", type=Path, help="PNG file (default RUN_DIR/samples.png)")
    sample.set_defaults(run=cmd_sample)

    data = sub.add_parser("data", help="fetch and verify MNIST, print where it lives")
    data.add_argument("--data-dir", type=Path)
    data.set_defaults(run=cmd_data)

    stirling = sub.add_parser("stirling", help="Stirling's formula from Laplace's method: a table of errors")
    stirling.add_argument("--n", type=_positive_int, nargs="+", default=[1, 2, 5, 10, 100, 1000, 10**6])
    stirling.add_argument("--terms", type=_non_negative_int, default=2, help="correction terms K")
    stirling.add_argument("--plot", type=Path, help="PNG: relative error against N for 0..K terms")
    stirling.set_defaults(run=cmd_stirling)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except VaelabError as exc:
        print(f"vaelab {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"vaelab {args.command}: interrupted", file=sys.stderr)
        return 130


def _log(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------------


def _train_config(args: argparse.Namespace, base):
    """The run's configuration: ``base`` (defaults, or the saved config on --resume) with the flags given."""
    from vaelab.config import RunConfig

    flags = {
        ("train", "epochs"): args.epochs, ("train", "batch_size"): args.batch_size, ("train", "lr"): args.lr,
        ("train", "seed"): args.seed, ("train", "device"): args.device, ("train", "engine"): args.engine,
        ("model", "hidden"): args.hidden, ("model", "latent"): args.latent,
        ("data", "binarize"): args.binarize, ("data", "train_examples"): args.train_examples,
        ("data", "test_examples"): args.test_examples,
        ("data", "data_dir"): str(args.data_dir) if args.data_dir else None,
    }
    parts = {name: getattr(base, name) for name in ("model", "data", "train")}
    changed = []
    for (part, name), value in flags.items():
        if value is None:
            continue
        old = getattr(parts[part], name)
        if value != old and (part, name) not in (("train", "epochs"), ("train", "device"), ("data", "data_dir")):
            changed.append(f"{name.replace('_', '-')} {old} → {value}")
        parts[part] = dataclasses.replace(parts[part], **{name: value})
    return RunConfig(**parts).validate(), changed


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from vaelab import checkpoint as ckpt
    from vaelab.config import RunConfig
    from vaelab.data import load_mnist, prepare
    from vaelab.training import Trainer, check_writable, resolve_device

    if args.resume:
        if args.out is None:
            raise UsageError("--resume needs --out RUN_DIR, the run to continue")
        if not ckpt.is_run(args.out):
            raise UsageError(f"--resume: {args.out} is not a vaelab run (no config.json); "
                             f"start it without --resume")
        saved = RunConfig.load(args.out / ckpt.CONFIG)
        config, changed = _train_config(args, saved)
        if changed:
            raise UsageError(f"--resume with a different config ({', '.join(changed)}); resume with the "
                             f"original flags (only --epochs and --device may change) or start a new --out")
        run_dir = args.out
    else:
        config, _ = _train_config(args, RunConfig())
        run_dir = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        if ckpt.is_run(run_dir):
            raise UsageError(f"{run_dir} already holds a run; add --resume to continue it, or choose another --out")
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise UsageError(f"{run_dir} exists and is not an empty directory; choose another --out")
    device = resolve_device(config.train.device)
    arrays = load_mnist(config.data.data_dir, log=_log)
    data = prepare(arrays, config.data, device)
    # a checkpoint is ≈3× the weights (weights, Adam's two moments), written beside the previous one
    check_writable(run_dir, need_bytes=8 * 4 * config.model.parameter_count() + (16 << 20))
    trainer = Trainer(config, run_dir, data, device, log=_log, progress=not args.no_progress)
    if args.resume and (run_dir / ckpt.STATE).exists():
        trainer.load_checkpoint()            # a damaged state is an error before anything is written
        _log(f"resuming {run_dir} after epoch {trainer.state.epoch}"
             + (f", step {trainer.state.step}" if trainer.state.step else ""))
    if not args.resume or config != saved:   # a resume may raise --epochs or change --device
        ckpt.write_text(run_dir / ckpt.CONFIG, config.to_json())
    _log(f"training {config.model} on {data.n_train} images ({config.data.binarize} binarisation), "
         f"test on {data.n_test}, device {device}, {torch.get_num_threads()} threads, run {run_dir}")
    metrics = trainer.fit()
    write_pictures(trainer.model, data, metrics, run_dir)
    last = metrics[-1]
    _log(f"done: test ELBO {last['test_elbo']:.3f} nats; files in {run_dir}; "
         f"next: vaelab evaluate {run_dir}")
    return 0


def write_pictures(model, data, metrics, run_dir: Path) -> None:
    """elbo.png, samples.png (8×8 decoder means) and reconstructions.png of a run."""
    import torch

    from vaelab.plots import plot_elbo, plot_grid, plot_reconstructions

    plot_elbo(metrics, run_dir / "elbo.png")
    model.eval()
    generator = torch.Generator(device=data.test_binary.device).manual_seed(0)
    plot_grid(model.sample(64, generator).cpu().numpy(), run_dir / "samples.png", "samples from p(x): decoder means")
    with torch.no_grad():
        x = data.test_binary[:30].float()
        mu, _ = model.encode(x)
        recon = torch.sigmoid(model.decode(mu))
    plot_reconstructions(x.cpu().numpy(), recon.cpu().numpy(), run_dir / "reconstructions.png")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vaelab import checkpoint as ckpt
    from vaelab.data import load_mnist, prepare
    from vaelab.evaluation import EvalConfig, evaluate_run
    from vaelab.training import resolve_device

    device = resolve_device(args.device)
    config, model = ckpt.load_model(args.run_dir, device)
    # the whole test set unless --test-examples says otherwise (not the training run's smoke setting)
    data_config = dataclasses.replace(config.data, test_examples=args.test_examples, train_examples=1,
                                      **({"data_dir": str(args.data_dir)} if args.data_dir else {}))
    data = prepare(load_mnist(data_config.data_dir, log=_log), data_config, device)
    eval_config = EvalConfig(k=args.k, seed=args.seed, laplace=args.laplace)
    _log(f"evaluating {args.run_dir} on {data.n_test} test digits, K = {args.k}, device {device}")
    result = evaluate_run(model, data.test_binary, eval_config, progress=not args.no_progress)
    ckpt.write_text(args.run_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    _log(format_eval_table(result))
    _log(f"written {args.run_dir / 'eval.json'}")
    return 0


def format_eval_table(result: dict) -> str:
    rows = [("estimator", "log p(x) (nats)", "± stderr", "bound?")]
    for entry in result["estimates"]:
        rows.append((entry["name"], f"{entry['mean']:.3f}", f"{entry['stderr']:.3f}", entry["kind"]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"NLL = {result['nll']:.3f} ± {result['nll_stderr']:.3f} nats (IWAE-{result['k']}, "
                 f"{result['n_examples']} digits, {result['seconds']:.1f} s)")
    return "\n".join(lines)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from vaelab import checkpoint as ckpt
    from vaelab.plots import plot_grid

    _, model = ckpt.load_model(args.run_dir)
    out = args.out or args.run_dir / "samples.png"
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the grid is written as PNG; give a file name ending in .png")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist; create it first")
    images = model.sample(args.n, torch.Generator().manual_seed(args.seed)).numpy()
    plot_grid(images, out, f"{args.n} samples from p(x), seed {args.seed}: decoder means")
    _log(f"written {out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from vaelab.data import CACHE_NAME, OFFICIAL_SHA256, default_data_dir, load_mnist

    directory = args.data_dir or default_data_dir()
    start = time.perf_counter()
    arrays = load_mnist(directory, log=_log)
    what = "MNIST (official SHA-256 of all four splits)" if arrays.digests() == OFFICIAL_SHA256 else \
        "a custom data set (not the official MNIST; its own checksums verified)"
    _log(f"{what}: {len(arrays.train_images)} training and {len(arrays.test_images)} test images in "
         f"{directory / CACHE_NAME} (loaded in {time.perf_counter() - start:.2f} s)")
    return 0


def cmd_stirling(args: argparse.Namespace) -> int:
    from vaelab.laplace import stirling_table

    table = stirling_table(args.n, args.terms)
    header = ["N", "ln N! (lgamma)", "Laplace/Stirling", "rel. error", "12N × rel. error",
              f"rel. error, {args.terms} terms"]
    rows = [[f"{r['n']:g}", f"{r['exact']:.10g}", f"{r['stirling']:.10g}", f"{r['rel_error']:.4e}",
             f"{r['scaled_error']:.6f}", f"{r['rel_error_terms']:.3e}"] for r in table]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    _log("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        _log("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    if args.plot:
        from vaelab.laplace import stirling_error_curves
        from vaelab.plots import plot_stirling

        ns, errors = stirling_error_curves(args.terms)
        plot_stirling(ns, errors, args.plot)
        _log(f"written {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
